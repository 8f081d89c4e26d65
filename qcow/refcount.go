package qcow

import (
	"encoding/binary"
	"fmt"
)

// refGeom is the shape of the refcount structures of a QCOW2 image: cluster
// size and refcount width. A refcount block is one cluster holding
// 2^blockShift entries of 2^order bits; the refcount table is an array of
// 64-bit block offsets, one per block.
type refGeom struct {
	clusterBits uint32
	order       uint32 // refcount_order: entries are 1<<order bits wide
}

// blockShift is log2 of the number of clusters one refcount block covers.
func (g refGeom) blockShift() uint32 { return g.clusterBits + 3 - g.order }

// perBlock is the number of clusters one refcount block covers.
func (g refGeom) perBlock() int64 { return 1 << g.blockShift() }

// maxRefcount is the largest refcount an entry can hold.
func (g refGeom) maxRefcount() uint64 {
	if g.order == 6 {
		return ^uint64(0)
	}
	return 1<<(1<<g.order) - 1
}

// refcountAt decodes entry i of refcount block b (entries of 1, 2 and 4 bits
// are packed LSB-first in each byte; 8 bits are bytes; wider ones are
// big-endian).
func refcountAt(b []byte, order uint32, i int64) uint64 {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		bit := i * bits
		return uint64(b[bit/8]>>(bit%8)) & (1<<bits - 1)
	case 3:
		return uint64(b[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(b[2*i:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(b[4*i:]))
	default:
		return binary.BigEndian.Uint64(b[8*i:])
	}
}

// setRefcountAt encodes v (already bounded by maxRefcount) into entry i of
// block b and returns the byte range [lo, hi) it changed.
func setRefcountAt(b []byte, order uint32, i int64, v uint64) (lo, hi int) {
	switch order {
	case 0, 1, 2:
		bits := int64(1) << order
		bit := i * bits
		mask := byte(1<<bits-1) << (bit % 8)
		b[bit/8] = b[bit/8]&^mask | byte(v<<(bit%8))&mask
		return int(bit / 8), int(bit/8) + 1
	case 3:
		b[i] = byte(v)
		return int(i), int(i) + 1
	case 4:
		binary.BigEndian.PutUint16(b[2*i:], uint16(v))
		return int(2 * i), int(2*i) + 2
	case 5:
		binary.BigEndian.PutUint32(b[4*i:], uint32(v))
		return int(4 * i), int(4*i) + 4
	default:
		binary.BigEndian.PutUint64(b[8*i:], v)
		return int(8 * i), int(8*i) + 8
	}
}

// refArea is a plan for new refcount structures appended to an image: the
// indexes of the refcount blocks to create and, when the table is too small,
// the size of a new refcount table.
type refArea struct {
	blocks        []int64 // block indexes that need a new block, ascending
	tableClusters int64   // clusters of the new refcount table; 0 keeps the table
	tableEntries  int64   // entries the new table must hold at least
}

// planRefcountArea computes a self-consistent set of new refcount blocks
// (and possibly a new refcount table) for an area of the file that starts at
// cluster index start and is followed by after more clusters, so that every
// cluster in [from, end of area + after) is covered by a refcount block,
// including the new blocks and the new table themselves. present reports
// whether block index i already has a block; tableLen is the length of the
// current table in entries (0 when there is none). With slack, a new table
// gets room for half as many entries again, so that growth by appending is
// amortized.
//
// This is qemu's qcow2_refcount_area idea: the number of new blocks and
// table clusters feed back into the area they must cover, so iterate until
// both stop changing. Both only grow, so the loop ends.
func planRefcountArea(g refGeom, from, start, after, tableLen int64, present func(int64) bool, slack bool) (refArea, error) {
	cs := int64(1) << g.clusterBits
	shift := g.blockShift()
	var a refArea
	nb, nt := int64(0), int64(0)
	for iter := 0; ; iter++ {
		if iter > 64 {
			return refArea{}, fmt.Errorf("qcow: refcount area planning does not converge")
		}
		end := start + nb + nt + after // first cluster index past the area
		a.blocks = a.blocks[:0]
		hiBlock := int64(0)
		if end > from {
			loBlock := from >> shift
			hiBlock = (end-1)>>shift + 1
			for i := loBlock; i < hiBlock; i++ {
				if i >= tableLen || !present(i) {
					a.blocks = append(a.blocks, i)
				}
			}
		}
		newNt, entries := int64(0), int64(0)
		if hiBlock > tableLen {
			entries = hiBlock
			if slack {
				entries += hiBlock / 2
			}
			newNt = (entries*8 + cs - 1) / cs
			entries = newNt * cs / 8
		}
		if int64(len(a.blocks)) == nb && newNt == nt {
			a.tableClusters, a.tableEntries = nt, entries
			if nt*cs > MaxRefcountTableBytes {
				return refArea{}, fmt.Errorf("%w: the refcount table would need %d bytes (limit %d)", ErrLimit, nt*cs, MaxRefcountTableBytes)
			}
			return a, nil
		}
		nb, nt = int64(len(a.blocks)), newNt
	}
}

// refblock is a cached refcount block of a writable image.
type refblock struct {
	off   int64
	b     []byte
	isNew bool // never written: Flush writes it whole
	lo    int  // dirty byte range [lo, hi) of an existing block; hi == 0: clean
	hi    int
}

func (b *refblock) dirty() bool { return b.isNew || b.hi > 0 }

// refcounts is the in-memory state of the refcount structures of a writable
// QCOW2 image: the whole refcount table (at most MaxRefcountTableBytes) and a
// bounded cache of refcount blocks, where dirty blocks are pinned until
// Flush writes them.
type refcounts struct {
	w *writer
	g refGeom

	rt         []uint64 // the table the image uses in memory
	rtOff      int64    // where that table lives
	rtClusters int64
	rtMoved    bool // rt is a new table: Flush writes it whole and switches the header
	rtLo, rtHi int  // dirty entries of an unmoved table, written in place

	blocks map[int64]*refblock // by host offset
	limit  int                 // most blocks kept when clean ones can be dropped
}

// blockFor returns the refcount block covering cluster c, loading it, or nil
// when the table has no block for it.
func (rc *refcounts) blockFor(c int64) (*refblock, int64, error) {
	bi := c >> rc.g.blockShift()
	if bi >= int64(len(rc.rt)) {
		return nil, 0, nil
	}
	off := int64(rc.rt[bi] & rtOffsetMask)
	if off == 0 {
		return nil, 0, nil
	}
	idx := c & (rc.g.perBlock() - 1)
	if b := rc.blocks[off]; b != nil {
		return b, idx, nil
	}
	cs := int64(1) << rc.g.clusterBits
	if off%cs != 0 || off+cs > rc.w.fileSize {
		return nil, 0, formatErr("refcount_table_entry", rc.rtOff+bi*8, uint64(off), "points at refcount block beyond the end of the file or unaligned")
	}
	buf := make([]byte, cs)
	rc.w.im.event(EventRefblockLoad)
	if err := rc.w.im.readFull(buf, off); err != nil {
		return nil, 0, err
	}
	rc.evict()
	b := &refblock{off: off, b: buf}
	rc.blocks[off] = b
	return b, idx, nil
}

// evict drops clean blocks while the cache holds more than its limit.
func (rc *refcounts) evict() {
	if len(rc.blocks) < rc.limit {
		return
	}
	target := rc.limit * 3 / 4
	for off, b := range rc.blocks {
		if len(rc.blocks) <= target {
			return
		}
		if !b.dirty() {
			delete(rc.blocks, off)
		}
	}
}

// get returns the refcount of cluster c (0 when no block covers it).
func (rc *refcounts) get(c int64) (uint64, error) {
	b, i, err := rc.blockFor(c)
	if err != nil || b == nil {
		return 0, err
	}
	return refcountAt(b.b, rc.g.order, i), nil
}

// set sets the refcount of cluster c, whose block must exist, recording how
// to undo it in the writer's transaction.
func (rc *refcounts) set(c int64, v uint64) error {
	b, i, err := rc.blockFor(c)
	if err != nil {
		return err
	}
	if b == nil {
		return fmt.Errorf("qcow: internal error: no refcount block for cluster %d", c)
	}
	if v > rc.g.maxRefcount() {
		return fmt.Errorf("%w: refcount of cluster %d would exceed %d", ErrLimit, c, rc.g.maxRefcount())
	}
	old := refcountAt(b.b, rc.g.order, i)
	if old == v {
		return nil
	}
	oldLo, oldHi := b.lo, b.hi
	lo, hi := setRefcountAt(b.b, rc.g.order, i, v)
	if !b.isNew {
		if b.hi == 0 {
			b.lo, b.hi = lo, hi
		} else {
			b.lo, b.hi = min(b.lo, lo), max(b.hi, hi)
		}
	}
	rc.w.remember(func() {
		setRefcountAt(b.b, rc.g.order, i, old)
		b.lo, b.hi = oldLo, oldHi
	})
	return nil
}

// setRT sets refcount table entry i of the current (unmoved) table.
func (rc *refcounts) setRT(i int64, v uint64) {
	old, oldLo, oldHi := rc.rt[i], rc.rtLo, rc.rtHi
	rc.rt[i] = v
	if !rc.rtMoved {
		if rc.rtHi == 0 {
			rc.rtLo, rc.rtHi = int(i), int(i)+1
		} else {
			rc.rtLo, rc.rtHi = min(rc.rtLo, int(i)), max(rc.rtHi, int(i)+1)
		}
	}
	rc.w.remember(func() { rc.rt[i], rc.rtLo, rc.rtHi = old, oldLo, oldHi })
}

// cover makes sure refcount blocks exist for the clusters [from, to) that
// the writer just reserved at the end of the file. Missing blocks, and a
// bigger refcount table when the current one is too small, are appended at
// the end of the file (which moves w.end); they describe themselves. The
// old table is freed after the header points at the new one.
func (rc *refcounts) cover(from, to int64) error {
	shift := rc.g.blockShift()
	need := (to-1)>>shift + 1
	covered := true
	for i := from >> shift; i < need; i++ {
		if i >= int64(len(rc.rt)) || rc.rt[i]&rtOffsetMask == 0 {
			covered = false
			break
		}
	}
	if covered {
		return nil
	}
	w := rc.w
	cs := w.cs
	start := w.end / cs
	present := func(i int64) bool { return rc.rt[i]&rtOffsetMask != 0 }
	// Cover some clusters ahead too, so that a long sequential write with
	// small clusters gets its refcount blocks in batches and its data in
	// long contiguous runs, instead of a block every few clusters.
	ahead := min(7*rc.g.perBlock(), (4<<20)/cs)
	a, err := planRefcountArea(rc.g, from, start, ahead, int64(len(rc.rt)), present, true)
	if err != nil {
		return err
	}
	w.im.event(EventRefblockAlloc)
	if a.tableClusters > 0 {
		w.im.event(EventReftableGrow)
	}
	nb := int64(len(a.blocks))
	areaEnd := (start + nb + a.tableClusters) * cs
	if areaEnd > MaxHostOffset {
		return fmt.Errorf("%w: the image file would exceed the largest host offset", ErrLimit)
	}
	oldEnd := w.end
	w.end = areaEnd
	w.remember(func() { w.end = oldEnd })

	if a.tableClusters > 0 {
		oldRT, oldOff, oldClusters, oldMoved, oldLo, oldHi := rc.rt, rc.rtOff, rc.rtClusters, rc.rtMoved, rc.rtLo, rc.rtHi
		nt := make([]uint64, a.tableEntries)
		copy(nt, rc.rt)
		rc.rt = nt
		rc.rtOff = (start + nb) * cs
		rc.rtClusters = a.tableClusters
		rc.rtMoved = true
		rc.rtLo, rc.rtHi = 0, 0
		w.remember(func() {
			rc.rt, rc.rtOff, rc.rtClusters, rc.rtMoved, rc.rtLo, rc.rtHi = oldRT, oldOff, oldClusters, oldMoved, oldLo, oldHi
		})
		// The old table is freed once the header no longer points at it.
		w.deferFree(oldOff, oldClusters*cs)
	}
	for k, bi := range a.blocks {
		off := (start + int64(k)) * cs
		b := &refblock{off: off, b: make([]byte, cs), isNew: true}
		rc.blocks[off] = b
		w.remember(func() { delete(rc.blocks, off) })
		rc.setRT(bi, uint64(off))
	}
	w.markMeta(start*cs, (nb+a.tableClusters)*cs)
	// Every new block and table cluster is in use.
	for c := start; c < start+nb+a.tableClusters; c++ {
		if err := rc.set(c, 1); err != nil {
			return err
		}
	}
	return nil
}

// encodeTable encodes 64-bit table entries big-endian.
func encodeTable(t []uint64) []byte {
	b := make([]byte, 0, 8*len(t))
	for _, e := range t {
		b = binary.BigEndian.AppendUint64(b, e)
	}
	return b
}
