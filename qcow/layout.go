package qcow

import (
	"encoding/binary"
	"fmt"
	"io"
	"math"
	"slices"
)

// PointerKind names what holds a Pointer and what it points at.
type PointerKind uint8

// The pointer kinds of a Layout.
const (
	// PtrHeader is cluster 0 (QCOW2) or the header bytes (QCOW): held by
	// nothing, listed so that its refcount is accounted for.
	PtrHeader PointerKind = iota
	// PtrL1Table: the header's l1_table_offset to the active L1 table.
	PtrL1Table
	// PtrRefcountTable: the header's refcount_table_offset to the
	// refcount table.
	PtrRefcountTable
	// PtrSnapshotTable: the header's snapshots_offset to the snapshot
	// table.
	PtrSnapshotTable
	// PtrSnapshotL1: a snapshot table entry to that snapshot's L1 table.
	PtrSnapshotL1
	// PtrL2Table: an L1 entry (active or snapshot) to an L2 table.
	PtrL2Table
	// PtrRefcountBlock: a refcount table entry to a refcount block.
	PtrRefcountBlock
	// PtrData: an L2 entry to a data cluster (or, with extended L2
	// entries, a cluster some of whose subclusters are allocated).
	PtrData
	// PtrCompressed: a compressed L2 entry to its compressed bytes.
	PtrCompressed
	// PtrZero: a QCOW2 v3 L2 entry with the zero flag and a preallocated
	// host cluster: the cluster is owned (its refcount counts) but its
	// contents are never read.
	PtrZero
)

var pointerKindNames = [...]string{
	PtrHeader: "header", PtrL1Table: "L1 table", PtrRefcountTable: "refcount table",
	PtrSnapshotTable: "snapshot table", PtrSnapshotL1: "snapshot L1 table", PtrL2Table: "L2 table",
	PtrRefcountBlock: "refcount block", PtrData: "data cluster", PtrCompressed: "compressed data",
	PtrZero: "preallocated zero cluster",
}

// String names what the pointer points at: "L2 table", "data cluster", ...
func (k PointerKind) String() string {
	if int(k) < len(pointerKindNames) {
		return pointerKindNames[k]
	}
	return fmt.Sprintf("PointerKind(%d)", uint8(k))
}

// Metadata reports whether the pointer's target holds metadata (the
// header, a table or a refcount block) rather than guest data.
func (k PointerKind) Metadata() bool { return k < PtrData }

// Pointer is one reference stored in an image to a byte range of it.
type Pointer struct {
	Kind PointerKind
	// At is the file offset of the entry or header field that holds the
	// pointer; -1 for PtrHeader.
	At int64
	// Off and Len are the byte range pointed at.
	Off, Len int64
	// Refs is how many times the pointer counts towards the refcounts of
	// the clusters it covers: the number of L1 entries (active and
	// snapshots) that reach the L2 table holding it, 1 otherwise.
	Refs int64
}

// Layout is the metadata of a QCOW image as its bytes say, read without
// judging it: every pointer of the header, the snapshot table, the L1
// tables (active and snapshots), the L2 tables and the refcount table, and
// the refcounts. It is what a checker of write ordering compares between
// two versions of a file. Bitmaps and external data files are not
// followed (data clusters of an external data file are not listed).
type Layout struct {
	// Format is FormatQCOW or FormatQCOW2; Version the header's version.
	Format  Format
	Version int
	// ClusterSize is the cluster size in bytes; FileSize the size the
	// layout was read with.
	ClusterSize, FileSize int64
	// Pointers lists every pointer, in the order they were found
	// (header, snapshots, L1 tables, L2 tables, refcount table).
	Pointers []Pointer

	refOrder   uint32
	blockShift uint32
	rt         []uint64         // refcount table entries (QCOW2)
	blocks     map[int64][]byte // refcount blocks by offset
	headerLen  int64            // bytes of the header (QCOW: with the backing name)
}

// HasRefcounts reports whether the image has refcounts (QCOW2).
func (l *Layout) HasRefcounts() bool { return l.Format == FormatQCOW2 }

// Refcount returns the refcount of host cluster c as the refcount table
// and blocks of the layout say: 0 when no block covers it. QCOW images have
// none: always 0.
func (l *Layout) Refcount(c int64) uint64 {
	if l.Format != FormatQCOW2 || c < 0 {
		return 0
	}
	i := c >> l.blockShift
	if i >= int64(len(l.rt)) {
		return 0
	}
	off := int64(l.rt[i] & rtOffsetMask)
	b := l.blocks[off]
	j := c & (1<<l.blockShift - 1)
	if off == 0 || ((j+1)<<l.refOrder+7)/8 > int64(len(b)) {
		return 0 // no block, or beyond the end of the file: zeros
	}
	return refcountAt(b, l.refOrder, j)
}

// RefcountLocation returns the byte range of the file that holds cluster
// c's refcount (its refcount table entry's block), or ok false when no
// block covers c.
func (l *Layout) RefcountLocation(c int64) (off, n int64, ok bool) {
	if l.Format != FormatQCOW2 || c < 0 || c>>l.blockShift >= int64(len(l.rt)) {
		return 0, 0, false
	}
	b := int64(l.rt[c>>l.blockShift] & rtOffsetMask)
	if b == 0 {
		return 0, 0, false
	}
	bit := (c & (1<<l.blockShift - 1)) << l.refOrder
	return b + bit/8, max(1, int64(1)<<l.refOrder/8), true
}

// layoutBudgetMin is the least number of table entries ReadLayout reads
// before giving up; the budget grows with the file (see ReadLayout).
const layoutBudgetMin = 1 << 20

// ReadLayout reads the layout of the QCOW image held by r, whose size is
// size. It validates the header like Open (but not against the size of
// the file: a table beyond the end is listed, and bytes beyond the end
// read as zeros), and then trusts nothing: entries with reserved bits,
// misaligned or beyond the file are listed as what they point at, tables
// beyond the file are not followed. Every read and allocation is bounded:
// tables by the header limits, the total number of table entries read by
// 4 * size/8 + 2^20, so a hostile image gets an answer (or an ErrLimit
// error) in time proportional to its size.
func ReadLayout(r io.ReaderAt, size int64) (*Layout, error) {
	lr := &layoutReader{r: r, size: size, budget: max(layoutBudgetMin, size/2)}
	var m [8]byte
	if n := lr.read(m[:], 0); n < 8 || binary.BigEndian.Uint32(m[:]) != Magic {
		return nil, ErrNotQCOW
	}
	switch v := binary.BigEndian.Uint32(m[4:]); v {
	case 1:
		return lr.readV1()
	case 2, 3:
		return lr.readV2()
	default:
		return nil, unsupportedErr("version", 4, uint64(v), "is not a QCOW version (1, 2 or 3)")
	}
}

// layoutReader reads a layout with its budget of table entries.
type layoutReader struct {
	r      io.ReaderAt
	size   int64
	budget int64
	l      *Layout
}

// read reads p at off, zero-filling what lies beyond the end of the file,
// and returns how many bytes were inside it.
func (lr *layoutReader) read(p []byte, off int64) int {
	clear(p)
	if off < 0 || off >= lr.size {
		return 0
	}
	n := int(min(int64(len(p)), lr.size-off))
	got, _ := lr.r.ReadAt(p[:n], off)
	return got
}

// table reads n 64-bit entries at off (zeros beyond the end of the file),
// charging them to the budget.
func (lr *layoutReader) table(field string, off, n int64) ([]uint64, error) {
	if n <= 0 || off >= lr.size {
		return nil, nil
	}
	n = min(n, (lr.size-off+7)/8) // entries beyond the end are zeros
	if n > lr.budget {
		return nil, limitErr(field, off, uint64(n), "entries exceed what is left of the layout budget (%d)", lr.budget)
	}
	lr.budget -= n
	buf := make([]byte, n*8)
	lr.read(buf, off)
	t := make([]uint64, n)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(buf[8*i:])
	}
	return t, nil
}

func (lr *layoutReader) add(k PointerKind, at, off, n, refs int64) {
	lr.l.Pointers = append(lr.l.Pointers, Pointer{Kind: k, At: at, Off: off, Len: n, Refs: refs})
}

func (lr *layoutReader) readV1() (*Layout, error) {
	buf := make([]byte, v1HeaderLen)
	lr.read(buf, 0)
	h, err := parseV1Header(buf, math.MaxInt64)
	if err != nil {
		return nil, err
	}
	cs := int64(1) << h.clusterBits
	l := &Layout{Format: FormatQCOW, Version: 1, ClusterSize: cs, FileSize: lr.size}
	lr.l = l
	l.headerLen = v1HeaderLen
	if h.backingLen > 0 {
		l.headerLen = max(l.headerLen, int64(h.backingOff)+int64(h.backingLen))
	}
	lr.add(PtrHeader, -1, 0, l.headerLen, 1)
	l1n := int64(h.l1Size)
	lr.add(PtrL1Table, 40, int64(h.l1Off), l1n*8, 1)
	l1, err := lr.table("l1_table", int64(h.l1Off), l1n)
	if err != nil {
		return nil, err
	}
	l2n := int64(1) << h.l2Bits
	cb := uint64(h.clusterBits)
	for i, e := range l1 {
		if e == 0 {
			continue
		}
		lr.add(PtrL2Table, int64(h.l1Off)+int64(i)*8, int64(e), l2n*8, 1)
		if e > MaxHostOffset {
			continue
		}
		l2, err := lr.table("l2_table", int64(e), l2n)
		if err != nil {
			return nil, err
		}
		for j, d := range l2 {
			at := int64(e) + int64(j)*8
			switch {
			case d == 0:
			case d&(1<<63) != 0:
				x := 63 - cb
				off, n := d&(1<<x-1), (d>>x)&(uint64(cs)-1)
				lr.add(PtrCompressed, at, int64(off), int64(n), 1)
			case d <= MaxHostOffset:
				lr.add(PtrData, at, int64(d), cs, 1)
			}
		}
	}
	return l, nil
}

func (lr *layoutReader) readV2() (*Layout, error) {
	var hb [24]byte
	lr.read(hb[:], 0)
	cb := binary.BigEndian.Uint32(hb[20:])
	if cb < 9 || cb > 21 {
		return nil, formatErr("cluster_bits", 20, uint64(cb), "out of range 9..21")
	}
	cs := int64(1) << cb
	buf := make([]byte, min(cs, max(lr.size, v3HeaderLen)))
	lr.read(buf, 0)
	h, err := parseV2Header(buf, math.MaxInt64)
	if err != nil {
		return nil, err
	}
	l := &Layout{Format: FormatQCOW2, Version: int(h.version), ClusterSize: cs, FileSize: lr.size,
		refOrder: h.refcountOrder, headerLen: cs, blocks: map[int64][]byte{}}
	l.blockShift = refGeom{clusterBits: cb, order: h.refcountOrder}.blockShift()
	lr.l = l
	lr.add(PtrHeader, -1, 0, cs, 1)
	extL2 := h.incompat&IncompatExtendedL2 != 0
	dataFile := h.incompat&IncompatDataFile != 0

	// The L1 tables: the active one and each snapshot's. Each distinct L2
	// table is read once, its entries counted once per L1 entry reaching it.
	type l1Table struct {
		kind    PointerKind
		at, off int64
		n       int64
	}
	l1s := []l1Table{{PtrL1Table, 40, int64(h.l1Off), int64(h.l1Size)}}
	lr.add(PtrL1Table, 40, int64(h.l1Off), int64(h.l1Size)*8, 1)
	if h.nbSnapshots > 0 {
		snaps, n := lr.snapshots(int64(h.snapOff), int64(h.nbSnapshots))
		lr.add(PtrSnapshotTable, 64, int64(h.snapOff), n, 1)
		for _, s := range snaps {
			lr.add(PtrSnapshotL1, s.at, s.off, s.n*8, 1)
			l1s = append(l1s, l1Table{PtrSnapshotL1, s.at, s.off, s.n})
		}
	}
	l2Refs := map[int64]int64{}
	var l2Order []int64
	for _, t := range l1s {
		l1, err := lr.table("l1_table", t.off, t.n)
		if err != nil {
			return nil, err
		}
		for i, e := range l1 {
			off := int64(e & l1OffsetMask)
			if off == 0 {
				continue
			}
			lr.add(PtrL2Table, t.off+int64(i)*8, off, cs, 1)
			if l2Refs[off] == 0 {
				l2Order = append(l2Order, off)
			}
			l2Refs[off]++
		}
	}
	entryBytes := int64(8)
	if extL2 {
		entryBytes = 16
	}
	for _, off := range l2Order {
		l2, err := lr.table("l2_table", off, cs/8)
		if err != nil {
			return nil, err
		}
		refs := l2Refs[off]
		for j := int64(0); j+entryBytes/8 <= int64(len(l2)); j += entryBytes / 8 {
			e := l2[j]
			at := off + j*8
			switch {
			case e&flagCompressed != 0:
				x := 70 - uint64(cb)
				coff := e & (1<<x - 1)
				nsect := ((e >> x) & (1<<(uint64(cb)-8) - 1)) + 1
				lr.add(PtrCompressed, at, int64(coff), int64(nsect*512-coff&511), refs)
			case dataFile:
			default:
				host := int64(e & l2OffsetMask)
				if host == 0 {
					continue
				}
				k := PtrData
				if !extL2 && e&flagZero != 0 {
					k = PtrZero
				}
				lr.add(k, at, host, cs, refs)
			}
		}
	}

	// The refcount table and blocks.
	rtn := int64(h.rtClusters) * cs / 8
	lr.add(PtrRefcountTable, 48, int64(h.rtOff), rtn*8, 1)
	if l.rt, err = lr.table("refcount_table", int64(h.rtOff), rtn); err != nil {
		return nil, err
	}
	for i, e := range l.rt {
		off := int64(e & rtOffsetMask)
		if off == 0 {
			continue
		}
		lr.add(PtrRefcountBlock, int64(h.rtOff)+int64(i)*8, off, cs, 1)
		if _, ok := l.blocks[off]; ok || off >= lr.size {
			continue
		}
		n := min(cs, lr.size-off) // the rest of the block reads as zeros
		if (n+7)/8 > lr.budget {
			return nil, limitErr("refcount_block", int64(h.rtOff)+int64(i)*8, uint64(off), "exceeds what is left of the layout budget (%d entries)", lr.budget)
		}
		lr.budget -= (n + 7) / 8
		b := make([]byte, n)
		lr.read(b, off)
		l.blocks[off] = b
	}
	return l, nil
}

// layoutSnapL1 is a snapshot's L1 table as its snapshot table entry says.
type layoutSnapL1 struct{ at, off, n int64 }

// snapshots reads up to nb snapshot table entries at off (stopping at the
// first that does not fit in the file or the limits) and returns their L1
// tables and the bytes the entries read take.
func (lr *layoutReader) snapshots(off, nb int64) ([]layoutSnapL1, int64) {
	var out []layoutSnapL1
	start := off
	var fixed [snapshotFixedLen]byte
	for i := int64(0); i < nb; i++ {
		if off-start+snapshotFixedLen > MaxSnapshotTableBytes || off+snapshotFixedLen > lr.size {
			break
		}
		lr.read(fixed[:], off)
		c := cursor{b: fixed[:]}
		l1Off := c.u64()
		l1Size := c.u32()
		idLen := int64(c.u16())
		nameLen := int64(c.u16())
		c.off += 4 + 4 + 8 + 4
		extra := int64(c.u32())
		if extra > MaxSnapshotExtraData {
			break
		}
		end := off + snapshotFixedLen + extra + idLen + nameLen
		if end-start > MaxSnapshotTableBytes || end > lr.size {
			break
		}
		if uint64(l1Size) <= MaxL1Bytes/8 && l1Off <= MaxHostOffset {
			out = append(out, layoutSnapL1{at: off, off: int64(l1Off), n: int64(l1Size)})
		}
		off = (end + 7) &^ 7
	}
	return out, off - start
}

// MetadataRanges returns the byte ranges [start, end) holding the layout's
// metadata (header, tables, refcount blocks, also where they lie beyond
// the end of the file), sorted by offset and merged: a write outside them
// changes no pointer and no refcount.
func (l *Layout) MetadataRanges() [][2]int64 {
	var rs [][2]int64
	for _, p := range l.Pointers {
		if p.Kind.Metadata() && p.Len > 0 && p.Off >= 0 && p.Off <= MaxHostOffset {
			rs = append(rs, [2]int64{p.Off, p.Off + p.Len})
		}
	}
	slices.SortFunc(rs, func(a, b [2]int64) int {
		switch {
		case a[0] < b[0]:
			return -1
		case a[0] > b[0]:
			return 1
		}
		return 0
	})
	var out [][2]int64
	for _, r := range rs {
		if n := len(out); n > 0 && r[0] <= out[n-1][1] {
			out[n-1][1] = max(out[n-1][1], r[1])
			continue
		}
		out = append(out, r)
	}
	return out
}

// References counts the references to each host cluster inside the file
// (a cluster beyond its end is not counted): the number a consistent
// image's refcount of that cluster must reach. Each pointer counts Refs
// times for every cluster its range covers; the header counts once.
func (l *Layout) References() map[int64]int64 {
	refs := map[int64]int64{}
	cs := l.ClusterSize
	last := (l.FileSize - 1) / cs
	for _, p := range l.Pointers {
		if p.Len <= 0 || p.Off < 0 || p.Off > MaxHostOffset {
			continue
		}
		for k := p.Off / cs; k <= min((p.Off+p.Len-1)/cs, last); k++ {
			refs[k] += p.Refs
		}
	}
	return refs
}
