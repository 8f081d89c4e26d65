package qcow

// Flush stages: the dirty metadata written in dependency order, with a
// barrier between stages (see the ordering comment in write.go).

import (
	"cmp"
	"encoding/binary"
	"slices"
)

// flush writes all dirty metadata (stages 1-4).
func (w *writer) flush() error {
	if err := w.flushRun(); err != nil {
		return err
	}
	if err := w.writeStages(); err != nil {
		return err
	}
	return w.freeStage()
}

// sortedKeys returns the keys of m in ascending order, so that the sequence
// of file operations is deterministic.
func sortedKeys[K int64 | uint64, V any](m map[K]V) []K {
	keys := make([]K, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// writeStages writes the dirty metadata in stages 1-3 (see the package
// ordering comment) and then marks it clean.
func (w *writer) writeStages() error {
	im, rc := w.im, w.rc
	// Stage 1: everything new, and refcount increments.
	wrote := w.unsynced
	var news []newPiece
	l2Offs := sortedKeys(w.l2)
	for _, off := range l2Offs {
		if d := w.l2[off]; d.isNew {
			news = append(news, newPiece{int64(off), encodeTable(d.t), EventL2AllocWrite})
		}
	}
	var blockOffs []int64
	if rc != nil {
		blockOffs = sortedKeys(rc.blocks)
		for _, off := range blockOffs {
			b := rc.blocks[off]
			switch {
			case b.isNew:
				ev := EventRefblockAllocWrite
				if rc.rtMoved {
					ev = EventRefblockAllocWriteBlks
				}
				news = append(news, newPiece{off, b.b, ev})
			case b.hi > 0 && w.bugs&bugNoRefcountUpdate == 0:
				lo, hi := b.lo, b.hi
				if err := w.pwriteMeta(1, EventRefblockUpdatePart, off+int64(lo), func() []byte { return slices.Clone(b.b[lo:hi]) }); err != nil {
					return err
				}
				wrote = true
			}
		}
		if rc.rtMoved {
			news = append(news, newPiece{rc.rtOff, encodeTable(rc.rt), EventRefblockAllocWriteTbl})
		}
	}
	if w.l1Moved {
		news = append(news, newPiece{int64(im.h.l1Off), encodeTable(im.l1), EventL1GrowWriteTable})
	}
	if len(news) > 0 {
		if err := w.writeNew(news); err != nil {
			return err
		}
		wrote = true
	}
	if wrote && w.bugs&bugNoDataBarrier == 0 {
		if err := w.sync(); err != nil {
			return err
		}
	}
	// The new L2 tables are durable now. From here on a pointer to one may
	// reach the disk even if the flush fails (a torn or failed L1 write
	// can land), so they become existing tables: a retry updates them in
	// place after its barrier instead of rewriting them whole, before it,
	// with entries that point at data not yet durable.
	for _, off := range l2Offs {
		if d := w.l2[off]; d.isNew {
			d.isNew, d.lo, d.hi = false, 0, 0
		}
	}

	// Stage 2: the refcount table points at the new blocks.
	if rc != nil {
		wrote = false
		if rc.rtMoved {
			if err := w.pwriteMeta(2, EventRefblockAllocSwitch, 48, func() []byte {
				b := binary.BigEndian.AppendUint64(nil, uint64(rc.rtOff))
				return binary.BigEndian.AppendUint32(b, uint32(rc.rtClusters))
			}); err != nil {
				return err
			}
			wrote = true
		} else if rc.rtHi > 0 {
			rt, lo, hi := rc.rt, rc.rtLo, rc.rtHi
			if err := w.pwriteMeta(2, EventRefblockAllocHookup, rc.rtOff+int64(lo)*8, func() []byte { return encodeTable(rt[lo:hi]) }); err != nil {
				return err
			}
			wrote = true
		}
		if wrote {
			if err := w.sync(); err != nil {
				return err
			}
		}
	}

	// Stage 3: pointers to the new clusters.
	wrote = false
	for _, off := range l2Offs {
		d := w.l2[off]
		if d.isNew || d.hi == 0 {
			continue
		}
		t, lo, hi := d.t, d.lo, d.hi
		if err := w.pwriteMeta(3, EventL2Update, int64(off)+int64(lo)*8, func() []byte { return encodeTable(t[lo:hi]) }); err != nil {
			return err
		}
		wrote = true
	}
	if !w.l1Moved && w.l1Hi > 0 {
		l1, lo, hi := im.l1, w.l1Lo, w.l1Hi
		if err := w.pwriteMeta(3, EventL1Update, int64(im.h.l1Off)+int64(lo)*8, func() []byte { return encodeTable(l1[lo:hi]) }); err != nil {
			return err
		}
		wrote = true
	}
	if w.headerDirty {
		ev := EventHeaderUpdate
		if w.l1Moved {
			ev = EventL1GrowActivateTable
		}
		if err := w.pwriteMeta(3, ev, 24, w.headerSizeFields); err != nil {
			return err
		}
		wrote = true
	}
	if wrote {
		if err := w.sync(); err != nil {
			return err
		}
	}

	// Commit: everything is on disk.
	for _, off := range l2Offs {
		im.l2c.put(off, w.l2[off].t)
		delete(w.l2, off)
	}
	if rc != nil {
		for _, off := range blockOffs {
			b := rc.blocks[off]
			b.isNew, b.lo, b.hi = false, 0, 0
		}
		rc.rtMoved, rc.rtLo, rc.rtHi = false, 0, 0
		rc.evict()
	}
	w.l1Moved, w.l1Lo, w.l1Hi, w.headerDirty = false, 0, 0, false
	return nil
}

// newPiece is a new structure to write in flush stage 1.
type newPiece struct {
	off int64
	b   []byte
	ev  Event
}

// writeNew writes new structures (never referenced yet, so never part of
// a rollback's rewrite), merging adjacent ones of the same event into one
// pwrite.
func (w *writer) writeNew(news []newPiece) error {
	slices.SortFunc(news, func(a, b newPiece) int { return cmp.Compare(a.off, b.off) })
	for i := 0; i < len(news); {
		buf, end := news[i].b, news[i].off+int64(len(news[i].b))
		j := i + 1
		for ; j < len(news) && news[j].off == end && news[j].ev == news[i].ev && len(buf) < maxRun; j++ {
			if j == i+1 {
				buf = slices.Clone(buf)
			}
			buf = append(buf, news[j].b...)
			end += int64(len(news[j].b))
		}
		if err := w.pwrite(news[i].ev, buf, news[i].off); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// headerSizeFields encodes header bytes [24, 48): the virtual size and the
// L1 table's size and location (QCOW2), or the size, cluster_bits, l2_bits
// and L1 offset (QCOW), so that a resize switches them in one write.
func (w *writer) headerSizeFields() []byte {
	h := w.im.h
	b := binary.BigEndian.AppendUint64(nil, h.size)
	if w.v1 {
		b = append(b, byte(h.clusterBits), byte(h.l2Bits), 0, 0)
		b = binary.BigEndian.AppendUint32(b, h.cryptMethod)
	} else {
		b = binary.BigEndian.AppendUint32(b, h.cryptMethod)
		b = binary.BigEndian.AppendUint32(b, h.l1Size)
	}
	return binary.BigEndian.AppendUint64(b, h.l1Off)
}

// freeStage applies the deferred refcount decrements (stage 4) and writes
// the blocks they changed, without a barrier.
func (w *writer) freeStage() error {
	rc := w.rc
	if rc == nil || len(w.frees) == 0 {
		return nil
	}
	if err := w.applyFrees(); err != nil {
		return err
	}
	for _, off := range sortedKeys(rc.blocks) {
		b := rc.blocks[off]
		if b.isNew || b.hi == 0 {
			continue
		}
		if err := w.pwrite(EventClusterFree, b.b[b.lo:b.hi], off+int64(b.lo)); err != nil {
			return err
		}
		b.lo, b.hi = 0, 0
		w.freed = true
	}
	return nil
}
