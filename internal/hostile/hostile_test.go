package hostile

import (
	"bytes"
	"testing"
)

// TestHostileVariantList checks the list itself: enough variants, unique names,
// the main file present, and every mutation really changing its base.
func TestHostileVariantList(t *testing.T) {
	vs := Variants()
	if len(vs) < 50 {
		t.Fatalf("%d variants, want at least 50", len(vs))
	}
	names := map[string]bool{}
	for _, v := range vs {
		if names[v.Name] {
			t.Errorf("duplicate variant %q", v.Name)
		}
		names[v.Name] = true
		main, ok := v.Files[v.Main]
		if !ok {
			t.Errorf("%s: main file %q missing", v.Name, v.Main)
			continue
		}
		if v.Want.Stage < AtOpen || v.Want.Stage > Benign {
			t.Errorf("%s: stage %v", v.Name, v.Want.Stage)
		}
		for _, b := range Bases() {
			if b.Main == v.Main && bytes.Equal(b.Files[b.Main], main) && len(b.Files) == len(v.Files) {
				same := true
				for name, data := range b.Files {
					same = same && bytes.Equal(v.Files[name], data)
				}
				if same {
					t.Errorf("%s: identical to base %s", v.Name, b.Name)
				}
			}
		}
	}
}

// TestHostileBuilderRefcounts checks the builder's refcounts for every width
// against an independent count of the clusters the layout uses.
func TestHostileBuilderRefcounts(t *testing.T) {
	for _, bits := range []uint32{1, 2, 4, 8, 16, 32, 64} {
		b, err := QCOW2{Version: 3, ClusterBits: 9, RefcountBits: bits, Size: 1 << 20,
			Data: clusters("r", 512, 0, 100), Compressed: clusters("rz", 512, 1)}.Build()
		if err != nil {
			t.Fatalf("%d-bit: %v", bits, err)
		}
		blk := b.Bytes[b.RBOffs[0]:]
		get := func(i int64) uint64 {
			var v uint64
			for j := uint32(0); j < bits; j++ {
				bit := i*int64(bits) + int64(j)
				if bits >= 8 {
					// Big-endian within the entry.
					byteIdx := i*int64(bits)/8 + int64(j)/8
					if blk[byteIdx]&(0x80>>(j%8)) != 0 {
						v |= 1 << (bits - 1 - j)
					}
					continue
				}
				if blk[bit/8]&(1<<(bit%8)) != 0 {
					v |= 1 << j
				}
			}
			return v
		}
		n := (int64(len(b.Bytes)) + 511) / 512
		for c := int64(0); c < n; c++ {
			if got := get(c); got != 1 {
				t.Errorf("%d-bit refcounts: cluster %d has refcount %d, want 1", bits, c, got)
			}
		}
		if got := get(n); got != 0 {
			t.Errorf("%d-bit refcounts: cluster %d past the end has refcount %d", bits, n, got)
		}
	}
}
