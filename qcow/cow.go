package qcow

// Cluster writes: in place where the active tables own the cluster alone,
// else copy-on-write into a new cluster written complete before anything
// points at it (see "What is written where" in write.go).

import (
	"errors"
	"fmt"
	"io"
)

// clusterLen is the number of guest bytes in guest cluster vcl (the last
// cluster may be partial).
func (w *writer) clusterLen(vcl int64) int64 {
	return min(w.cs, w.im.size()-vcl*w.cs)
}

// writeData writes p at guest offset off, cluster by cluster.
func (w *writer) writeData(p []byte, off int64) error {
	for len(p) > 0 {
		vcl := off / w.cs
		in := off % w.cs
		n := min(w.clusterLen(vcl)-in, int64(len(p)))
		if err := w.writeCluster(vcl, in, p[:n]); err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// writeZeroes zeroes [off, off+n), cluster by cluster.
func (w *writer) writeZeroes(off, n int64) error {
	for n > 0 {
		vcl := off / w.cs
		in := off % w.cs
		clen := w.clusterLen(vcl)
		k := min(clen-in, n)
		if err := w.zeroCluster(vcl, in, k, clen); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

func (w *writer) zeroCluster(vcl, in, k, clen int64) error {
	if w.im.backing == nil {
		unalloc, err := w.unallocated(vcl)
		if err != nil || unalloc {
			return err
		}
	}
	if in != 0 || k != clen || w.v1 || w.im.h.version < 3 {
		return w.writeCluster(vcl, in, w.zeros[:k])
	}
	t, toff, l2i, err := w.l2ForWrite(vcl)
	if err != nil {
		return err
	}
	e := t[l2i]
	if _, err := w.im.entryExtent(t, toff, l2i, 0); err != nil {
		return err
	}
	if e&^flagCopied == flagZero {
		return nil // already a plain zero cluster
	}
	w.setL2(toff, t, l2i, flagZero)
	w.dropRef(e)
	return nil
}

// unallocated reports whether guest cluster vcl has no data in this image
// (no L2 table or an unallocated entry).
func (w *writer) unallocated(vcl int64) (bool, error) {
	im := w.im
	l1i := vcl / im.l2Entries
	if l1i >= int64(len(im.l1)) {
		return true, nil
	}
	off, err := im.l1Entry(int(l1i))
	if err != nil || off == 0 {
		return off == 0, err
	}
	t, err := im.l2Table(off)
	if err != nil {
		return false, err
	}
	x, err := im.entryExtent(t, off, vcl%im.l2Entries, 0)
	if err != nil {
		return false, err
	}
	return x.kind == extentUnallocated, nil
}

// l2ForWrite returns the L2 table for guest cluster vcl, its host offset and
// the entry index, making it writable first: a missing table is allocated,
// and (QCOW2) a table shared with a snapshot (L1 entry without COPIED) is
// copied, the old one freed after the L1 change is durable.
func (w *writer) l2ForWrite(vcl int64) ([]uint64, uint64, int64, error) {
	im := w.im
	l1i := vcl / im.l2Entries
	l2i := vcl % im.l2Entries
	if l1i >= int64(len(im.l1)) {
		return nil, 0, 0, fmt.Errorf("qcow: %s: internal error: guest cluster %d beyond the L1 table", w.name, vcl)
	}
	e := im.l1[l1i]
	old, err := im.l1Entry(int(l1i))
	if err != nil {
		return nil, 0, 0, err
	}
	if old != 0 && (w.v1 || e&flagCopied != 0) {
		t, err := im.l2Table(old)
		return t, old, l2i, err
	}
	size := im.l2Bytes()
	off, err := w.alloc((size + w.cs - 1) / w.cs)
	if err != nil {
		return nil, 0, 0, err
	}
	w.markMeta(off, size)
	t := make([]uint64, size/8)
	if old != 0 {
		ot, err := im.l2TableEvent(old, EventL2AllocCOWRead)
		if err != nil {
			return nil, 0, 0, err
		}
		copy(t, ot) // entries keep their flags
		w.deferFree(int64(old), size)
	}
	w.l2[uint64(off)] = &dirtyTable{t: t, isNew: true}
	w.remember(func() { delete(w.l2, uint64(off)) })
	ne := uint64(off)
	if !w.v1 {
		ne |= flagCopied
	}
	w.setL1(int(l1i), ne)
	return t, uint64(off), l2i, nil
}

// setL1 changes L1 entry i.
func (w *writer) setL1(i int, v uint64) {
	l1 := w.im.l1
	old, oldLo, oldHi := l1[i], w.l1Lo, w.l1Hi
	l1[i] = v
	if !w.l1Moved {
		if w.l1Hi == 0 {
			w.l1Lo, w.l1Hi = i, i+1
		} else {
			w.l1Lo, w.l1Hi = min(w.l1Lo, i), max(w.l1Hi, i+1)
		}
	}
	w.remember(func() { l1[i], w.l1Lo, w.l1Hi = old, oldLo, oldHi })
}

// setL2 changes entry i of the L2 table t at host offset toff.
func (w *writer) setL2(toff uint64, t []uint64, i int64, v uint64) {
	d := w.l2[toff]
	if d == nil {
		d = &dirtyTable{t: t, lo: int(i), hi: int(i) + 1}
		w.l2[toff] = d
		w.remember(func() { delete(w.l2, toff) })
	} else if !d.isNew {
		lo, hi := d.lo, d.hi
		if d.hi == 0 { // clean: a new table already written whole
			d.lo, d.hi = int(i), int(i)+1
		} else {
			d.lo, d.hi = min(d.lo, int(i)), max(d.hi, int(i)+1)
		}
		w.remember(func() { d.lo, d.hi = lo, hi })
	}
	old := t[i]
	t[i] = v
	w.remember(func() { t[i] = old })
}

// dropRef queues the decrement for whatever the old L2 entry e referenced.
func (w *writer) dropRef(e uint64) {
	if w.rc == nil {
		return
	}
	if e&flagCompressed != 0 {
		off, size := w.im.compressedRange(e)
		w.deferFree(int64(off), int64(size))
		return
	}
	if host := e & l2OffsetMask; host != 0 {
		w.deferFree(int64(host), w.cs)
	}
}

// writeCluster writes data at offset in of guest cluster vcl.
func (w *writer) writeCluster(vcl, in int64, data []byte) error {
	im := w.im
	t, toff, l2i, err := w.l2ForWrite(vcl)
	if err != nil {
		return err
	}
	e := t[l2i]
	x, err := im.entryExtent(t, toff, l2i, 0)
	if err != nil {
		return err
	}
	if x.kind == extentData && (w.v1 || e&flagCopied != 0 || w.bugs&bugSnapshotInPlace != 0) {
		if err := w.checkOverlap(x.host, toff, l2i); err != nil {
			return err
		}
		return w.dataWrite(EventWriteAIO, x.host+in, data)
	}

	// Copy-on-write into a new cluster, written complete.
	clen := w.clusterLen(vcl)
	host, err := w.alloc(1)
	if err != nil {
		return err
	}
	buf, ev := data, EventWriteAIO
	if (x.kind == extentZero || x.kind == extentUnallocated && w.backingZero(vcl)) && host >= w.fileSize {
		// The rest of the cluster must read as zeros, and it does: the
		// cluster lies beyond everything ever written to the file (space
		// is never reused, and a rollback's truncate is made durable), so
		// its unwritten bytes are a hole or beyond the end of the file. Like
		// qemu, write the guest's bytes only.
		buf, host = data, host+in
	} else if in != 0 || int64(len(data)) != w.cs {
		buf, ev = make([]byte, w.cs), EventCOWWrite
		if in != 0 || int64(len(data)) < clen {
			if err := w.flushRun(); err != nil {
				return err
			}
			if _, err := im.readAtEvent(buf[:clen], vcl*w.cs, EventCOWRead); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("qcow: %s: read guest cluster %d for copy-on-write: %w", w.name, vcl, err)
			}
		}
		copy(buf[in:], data)
	}
	if err := w.dataWrite(ev, host, buf); err != nil {
		return err
	}
	host &^= w.cs - 1
	ne := uint64(host)
	if !w.v1 {
		ne |= flagCopied
	}
	w.setL2(toff, t, l2i, ne)
	w.dropRef(e)
	return nil
}

// backingZero reports whether guest cluster vcl reads as zeros from the
// backing chain when unallocated here: no backing file, or one that ends
// before the cluster.
func (w *writer) backingZero(vcl int64) bool {
	b := w.im.backing
	return b == nil || vcl*w.cs >= b.Size()
}

// checkOverlap refuses an in-place write into a cluster that holds
// metadata (a hostile or corrupt L2 entry).
func (w *writer) checkOverlap(host int64, toff uint64, l2i int64) error {
	c := host &^ (w.cs - 1)
	if w.meta[c] || (w.v1 && host < w.cs) {
		return formatErr("l2_entry", int64(toff)+l2i*8, uint64(host), "points at a data cluster that overlaps metadata")
	}
	return nil
}
