package faultfs

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// TestTreePersistence drives the page tree with random writes, zero writes
// and truncates against a flat byte slice, taking snapshots along the way,
// and checks that every snapshot still reads as the slice did when it was
// taken: mutations after a snapshot never show through.
func TestTreePersistence(t *testing.T) {
	const span = 1 << 22 // offsets up to 4 MiB: heights 1 to 3
	r := rand.New(rand.NewPCG(7, 7))
	type snap struct {
		t    tree
		want []byte
	}
	var snaps []snap
	var tr tree
	flat := make([]byte, span+pageBytes)
	ep := newEpoch()
	for step := range 400 {
		off := r.Int64N(span)
		if r.IntN(3) == 0 {
			off = r.Int64N(5000) // keep the low pages busy too
		}
		n := 1 + r.Int64N(3*pageBytes)
		switch r.IntN(5) {
		case 0:
			tr = tr.write(nil, off, n, ep)
			clear(flat[off : off+n])
		case 1:
			size := r.Int64N(span)
			tr = tr.truncate(size, ep)
			clear(flat[size:])
		default:
			data := make([]byte, n)
			for i := range data {
				data[i] = byte(r.Uint32()) | 1
			}
			tr = tr.write(data, off, n, ep)
			copy(flat[off:], data)
		}
		if step%25 == 0 {
			snaps = append(snaps, snap{tr, bytes.Clone(flat)})
			ep = newEpoch()
		}
	}
	snaps = append(snaps, snap{tr, bytes.Clone(flat)})
	got := make([]byte, len(flat))
	for i, s := range snaps {
		s.t.readAt(got, 0)
		if !bytes.Equal(got, s.want) {
			t.Fatalf("snapshot %d reads differently from when it was taken", i)
		}
		// ascend visits exactly the non-zero pages, in order.
		prev := int64(-1)
		s.t.ascend(0, 1<<40, func(idx int64, pg *page) bool {
			if idx <= prev || *pg == zeroPage || !bytes.Equal(pg[:], s.want[idx<<pageShift:(idx+1)<<pageShift]) {
				t.Fatalf("snapshot %d: ascend gave page %d out of order, zero or wrong", i, idx)
			}
			prev = idx
			return true
		})
	}
}
