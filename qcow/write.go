package qcow

// The writer.
//
// # What is written where
//
// Writes append: every new cluster (guest data, L2 table, refcount block,
// refcount table, L1 table) goes at the end of the file (see alloc.go), and
// nothing is ever overwritten in place except guest data in a cluster the
// active tables own alone (QCOW2: an L2 entry with the COPIED flag; QCOW:
// any allocated, uncompressed cluster) and the table entries that point at
// new things. A write into any other cluster allocates a new one and writes
// it complete (the guest's bytes plus, for the rest of the cluster, what the
// guest saw there before: the backing file, zeros, the decompressed
// compressed cluster, or the shared cluster's data) before anything points
// at it. That covers unallocated clusters, QCOW2 v3 zero clusters (plain or
// allocated), compressed clusters, and clusters shared with an internal
// snapshot (refcount > 1, no COPIED flag); an L2 table whose L1 entry lacks
// COPIED is copied the same way (the copy keeps the entries' flags). When
// the rest of the new cluster must read as zeros, only the guest's bytes are
// written, as qemu does: the new cluster lies beyond everything ever written
// to the file (space is never reused, and a rollback's truncate is made
// durable before the space is allocated again), so its other bytes are a
// hole or past the end of the file, and read as zeros in every crash state.
//
// # Ordering
//
// Metadata is written by flushMeta in four stages, each ended by a barrier
// (fdatasync; never sync_file_range, which persists neither the file size
// nor the disk cache):
//
//  1. new clusters: new L2 tables (complete, with their new entries), new
//     refcount blocks, a new refcount table, a new L1 table, and every
//     refcount increment in existing blocks; guest data written since the
//     last barrier becomes durable with them. fdatasync.
//  2. refcount table: the entries for new blocks, or the header's
//     (refcount_table_offset, refcount_table_clusters) in one 12-byte write
//     when the table moved. fdatasync.
//  3. pointers: changed entries of existing L2 tables, of the L1 table, and
//     the header's (size, l1_size, l1_table_offset) in one 24-byte write
//     when the disk grew. fdatasync.
//  4. decrements: refcounts of clusters that lost a reference in stage 3
//     (the old cluster of a copy-on-write, an old L2 or refcount or L1
//     table). No barrier: losing them only leaks.
//
// So a pointer never reaches the disk before what it points to and that
// thing's refcount, and a refcount never drops while a pointer to its
// cluster may still be on disk. QCOW version 1 has stages 1 and 3 only
// (qemu's QCOW writer publishes the pointer before the data; this one does
// not).
//
// # Cache modes
//
// Write-back (the default, like qemu's cache=writeback): guest data is
// written at once (pwrite, no barrier), metadata changes are kept in memory
// (dirty L2 tables and refcount blocks are pinned in their caches; reads see
// them) and written by Flush, by Close, or when the dirty tables outgrow
// Options.L2CacheBytes or Options.RefcountCacheBytes (at the start of the
// next write). Write-through (Options.WriteThrough): every WriteAt,
// WriteZeroes and Resize runs the four stages before it returns, so it is
// durable on return.
//
// # Errors and rollback
//
// Every write is a transaction. When a file operation fails during it (in
// write-through mode anywhere in stages 1-3; in write-back mode while
// writing the guest data), the writer rolls back: it restores its in-memory
// tables, rewrites the old bytes of any metadata it had changed in place
// (pointers first, then the refcount table, then refcounts, with a barrier
// after each group), truncates the file back to its size before the write
// (rounded up to a whole cluster), fdatasyncs, and returns the error wrapped
// with %w. The image is then as it was before the write (no new leaks) and
// stays usable; guest data written in place by the failed call may hold old
// or new bytes. A failure in stage 4 is returned but not rolled back (the
// write itself is durable; replaced clusters leak until the decrements,
// which stay queued, are retried by the next flush). A failure while Flush
// (or a write that first relieves the caches) writes metadata in
// write-back mode leaves the metadata dirty in memory for the next Flush to
// retry. No failure is absorbed: every call during which a file operation
// failed returns an error wrapping it.
//
// A failed fdatasync is final: the page cache may have dropped the data it
// covered, so the writer never retries it as if it had succeeded. After
// attempting the rollback it remembers the failure: Flush and Close return
// it and every later write fails with an error wrapping it, until the image
// is reopened (which yields a valid image).
//
// # Not supported
//
// Writing to extended-L2 (subcluster) images, images with an external data
// file, persistent bitmaps or the corrupt bit set: Open with ReadWrite
// refuses them with an error wrapping ErrReadOnly. A dirty image (dirty bit
// set) is repaired by Open (Repair with RepairAll) before it is written,
// and refused if that does not make it clean. Lazy refcounts are accepted
// but not used (refcounts are always written). Shrinking.
// Freed clusters are never reused, and nothing is discarded.

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"sync"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// ErrOutOfRange is returned for a write (or resize) outside the virtual disk.
var ErrOutOfRange = errors.New("qcow: access beyond the end of the virtual disk")

const (
	// maxRun bounds the guest data merged into one pwrite.
	maxRun = 4 << 20
	// defaultRefcountCache is the default bound on cached refcount blocks.
	defaultRefcountCache = 1 << 20
)

// writer is the write state of an Image opened with ReadWrite.
type writer struct {
	// mu serializes writers (Lock) against readers (RLock): readers see the
	// in-memory tables only between two writes.
	mu sync.RWMutex

	im           *Image
	f            vfs.File
	raw          bool
	v1           bool
	writeThrough bool
	cs           int64
	name         string

	failed error // sticky: a failed fdatasync or rollback
	closed bool

	end      int64 // next free host offset (cluster aligned); grows only
	origEnd  int64 // end when the image was opened
	fileSize int64 // bytes the file holds (largest end written)
	unsynced bool  // guest data written since the last barrier
	freed    bool  // refcount decrements written since the last barrier

	l1Lo, l1Hi  int  // dirty entries of the L1 table (written in place)
	l1Moved     bool // im.l1 is a new table: written whole, then the header switched
	headerDirty bool // size/L1 fields of the header must be written

	l2      map[uint64]*dirtyTable // dirty L2 tables by host offset
	l2Limit int64

	rc    *refcounts // nil for QCOW version 1
	frees []freeRange

	meta map[int64]bool // host offsets of metadata clusters, for the overlap check

	tx    *txn
	run   dataRun
	zeros []byte

	// bugs are deliberate bugs for harness self-tests; never set outside
	// tests (the zero value is the correct writer).
	bugs writerBugs
}

// writerBugs selects deliberate bugs, so that the crash tests can show that
// they catch broken writers (see crash_broken_test.go). Never set outside
// tests.
type writerBugs uint8

const (
	bugNoDataBarrier      writerBugs = 1 << iota // drop the stage-1 barrier: pointers may reach the disk before data
	bugNoRefcountUpdate                          // never write refcount increments to existing blocks
	bugRollbackKeepsMem                          // rollback forgets to restore the in-memory tables
	bugSnapshotInPlace                           // write guest data in place into a cluster shared with a snapshot (COPIED ignored)
	bugResizeNotDurable                          // Resize leaves the new size in memory until the next flush
	bugRollbackNoTruncate                        // rollback never cuts the file back (skips the ftruncate)
	bugSwallowDataError                          // a failed guest-data pwrite is ignored: the call returns nil
)

// dirtyTable is an L2 table changed since the last flush.
type dirtyTable struct {
	t      []uint64
	isNew  bool // never written: written whole in stage 1
	lo, hi int  // dirty entries of an existing table (stage 3)
}

// dataRun is guest data waiting to be written with one pwrite.
type dataRun struct {
	off int64
	buf []byte
	ev  Event // write_aio or cow_write: runs of different events are not merged
}

// txn records how to undo one write.
type txn struct {
	fileSize int64
	grew     bool // a write reached beyond fileSize
	undo     []func()
	meta     [4][]metaWrite // in-place metadata writes by stage
}

// metaWrite is an in-place metadata write; enc re-encodes the bytes from
// the in-memory tables (after undo: the old bytes).
type metaWrite struct {
	off int64
	enc func() []byte
}

// openWriter prepares im for writing.
func (im *Image) openWriter(o Options) error {
	w := &writer{im: im, f: im.f, name: im.name, writeThrough: o.WriteThrough, fileSize: im.fileSize}
	if im.format == FormatRaw {
		w.raw = true
		im.w = w
		return nil
	}
	h := im.h
	if im.format == FormatQCOW2 {
		switch {
		case h.incompat&IncompatCorrupt != 0:
			return fmt.Errorf("%w: %s: the corrupt bit is set; repair the image first", ErrReadOnly, im.name)
		case im.extL2:
			return fmt.Errorf("%w: %s: read-only: extended L2 writing unsupported", ErrReadOnly, im.name)
		case h.dataFile != "" || h.incompat&IncompatDataFile != 0:
			return fmt.Errorf("%w: %s: read-only: external data file writing unsupported", ErrReadOnly, im.name)
		case h.incompat&IncompatDirty != 0:
			return fmt.Errorf("%w: %s: the dirty bit is set: refcounts must be rebuilt first (qemu-img check -r all)", ErrReadOnly, im.name)
		case h.autoclear&AutoclearBitmaps != 0:
			return fmt.Errorf("%w: %s: read-only: persistent bitmaps writing unsupported", ErrReadOnly, im.name)
		}
	}
	w.v1 = im.format == FormatQCOW
	w.cs = im.clusterSize
	w.end = (im.fileSize + w.cs - 1) &^ (w.cs - 1)
	w.origEnd = w.end
	w.l2 = map[uint64]*dirtyTable{}
	w.l2Limit = o.L2CacheBytes
	if w.l2Limit <= 0 {
		w.l2Limit = 4 << 20
	}
	w.zeros = make([]byte, w.cs)
	w.meta = map[int64]bool{0: true}
	im.w = w // l2Table and the helpers below consult it

	if !w.v1 {
		if err := w.openRefcounts(o); err != nil {
			im.w = nil
			return err
		}
	}
	if err := w.collectMeta(); err != nil {
		im.w = nil
		return err
	}
	if !w.v1 && h.version >= 3 && h.autoclear != 0 {
		// Unknown autoclear bits name extensions we would not keep
		// consistent: clear them, as qemu does on a read-write open.
		var b [8]byte
		if err := w.pwrite(EventHeaderUpdate, b[:], 88); err != nil {
			im.w = nil
			return err
		}
		if err := w.sync(); err != nil {
			im.w = nil
			return err
		}
		h.autoclear = 0
	}
	im.fileSize, im.dataSize = w.end, w.end
	return nil
}

// openRefcounts loads the refcount table and finds the first cluster after
// the last one in use.
func (w *writer) openRefcounts(o Options) error {
	im, h := w.im, w.im.h
	limit := o.RefcountCacheBytes
	if limit <= 0 {
		limit = defaultRefcountCache
	}
	rc := &refcounts{
		w:          w,
		g:          refGeom{clusterBits: im.clusterBits, order: h.refcountOrder},
		rtOff:      int64(h.rtOff),
		rtClusters: int64(h.rtClusters),
		blocks:     map[int64]*refblock{},
		limit:      int(max(limit/w.cs, 4)),
	}
	im.event(EventReftableLoad)
	rt, err := im.readTable(int64(h.rtOff), int(int64(h.rtClusters)*w.cs/8))
	if err != nil {
		return err
	}
	for i, e := range rt {
		if e&rtReservedMask != 0 {
			return formatErr("refcount_table_entry", int64(h.rtOff)+int64(i)*8, e, "has reserved bits set (index %d)", i)
		}
	}
	rc.rt = rt
	w.rc = rc
	// Clusters past the end of the file with a refcount are in use by
	// something: allocate after them.
	first := w.end / w.cs
	for bi := first >> rc.g.blockShift(); bi < int64(len(rt)); bi++ {
		if rt[bi] == 0 {
			continue
		}
		b, _, err := rc.blockFor(bi << rc.g.blockShift())
		if err != nil {
			return err
		}
		for i := int64(0); i < rc.g.perBlock(); i++ {
			c := bi<<rc.g.blockShift() + i
			if c >= first && refcountAt(b.b, rc.g.order, i) != 0 {
				w.end = (c + 1) * w.cs
			}
		}
	}
	return nil
}

// collectMeta records the clusters that hold metadata, so that an L2 entry
// of a hostile image cannot make the writer overwrite them with guest data.
func (w *writer) collectMeta() error {
	im, h := w.im, w.im.h
	addRange := func(off, n int64) {
		for c := off / w.cs; n > 0 && c <= (off+n-1)/w.cs; c++ {
			w.meta[c*w.cs] = true
		}
	}
	addRange(0, int64(h.headerLen))
	addRange(int64(h.l1Off), int64(h.l1Size)*8)
	for i := range im.l1 {
		off, err := im.l1Entry(i)
		if err != nil {
			return err
		}
		if off != 0 {
			addRange(int64(off), im.l2Bytes())
		}
	}
	if w.rc == nil {
		return nil
	}
	addRange(w.rc.rtOff, w.rc.rtClusters*w.cs)
	for _, e := range w.rc.rt {
		if off := int64(e & rtOffsetMask); off != 0 {
			w.meta[off] = true
		}
	}
	if h.nbSnapshots > 0 {
		im.event(EventOpen)
		size, snaps, err := im.readSnapshots()
		if err != nil {
			return err
		}
		addRange(int64(h.snapOff), size)
		for _, s := range snaps {
			addRange(int64(s.L1Offset), int64(s.L1Size)*8)
		}
	}
	return nil
}

// remember records how to undo a change of the in-memory state, when a
// transaction is open.
func (w *writer) remember(f func()) {
	if w.tx != nil {
		w.tx.undo = append(w.tx.undo, f)
	}
}

// usable returns why the writer cannot write, if it cannot.
func (w *writer) usable() error {
	if w.closed {
		return ErrClosed
	}
	if w.failed != nil {
		return fmt.Errorf("qcow: %s: refusing to write after an earlier failure (reopen the image): %w", w.name, w.failed)
	}
	return nil
}

// event reports e to the Options.Events hook, if any.
func (w *writer) event(e Event) { w.im.event(e) }

// pwrite writes b at off in the image file, reporting ev first. A write
// that extends the file is padded with zeros to a sector boundary: a file
// that ended inside a sector would let a later in-place write of that
// sector tear in a crash (its bytes before the old end survive, the size
// change does not).
func (w *writer) pwrite(ev Event, b []byte, off int64) error {
	end := off + int64(len(b))
	if pad := -end & 511; pad != 0 && end > w.fileSize {
		b = append(slices.Clip(b), make([]byte, pad)...)
		end += pad
	}
	if w.tx != nil && end > w.tx.fileSize {
		w.tx.grew = true
	}
	w.event(ev)
	if _, err := w.f.WriteAt(b, off); err != nil {
		return fmt.Errorf("qcow: %s: write %d bytes at %#x: %w", w.name, len(b), off, err)
	}
	w.fileSize = max(w.fileSize, end)
	return nil
}

// sync is the barrier. A failure is final: it is remembered and every later
// write fails.
func (w *writer) sync() error {
	w.event(EventFlushToDisk)
	if err := w.f.Datasync(); err != nil {
		err = fmt.Errorf("qcow: %s: fdatasync: %w", w.name, err)
		if w.failed == nil {
			w.failed = err
		}
		return err
	}
	w.unsynced, w.freed = false, false
	return nil
}

// pwriteMeta writes metadata at off for flush stage stage, recording it
// for rollback when it changes bytes that existed before the transaction.
func (w *writer) pwriteMeta(stage int, ev Event, off int64, enc func() []byte) error {
	if w.tx != nil && off < w.tx.fileSize {
		w.tx.meta[stage] = append(w.tx.meta[stage], metaWrite{off, enc})
	}
	return w.pwrite(ev, enc(), off)
}

// dataWrite queues guest data for host offset off, merging contiguous
// writes for the same event (write_aio or cow_write) into one pwrite.
func (w *writer) dataWrite(ev Event, off int64, b []byte) error {
	r := &w.run
	if len(r.buf) > 0 && ev == r.ev && off == r.off+int64(len(r.buf)) && len(r.buf)+len(b) <= maxRun {
		r.buf = append(r.buf, b...)
		return nil
	}
	if err := w.flushRun(); err != nil {
		return err
	}
	r.off, r.ev = off, ev
	r.buf = append(r.buf[:0], b...)
	return nil
}

// flushRun writes the queued guest data.
func (w *writer) flushRun() error {
	r := &w.run
	if len(r.buf) == 0 {
		return nil
	}
	b, off := r.buf, r.off
	r.buf = r.buf[:0]
	if err := w.pwrite(r.ev, b, off); err != nil && w.bugs&bugSwallowDataError == 0 {
		return err
	}
	w.unsynced = true
	if cap(r.buf) > maxRun {
		r.buf = nil
	}
	return nil
}

// op runs fn as one transaction: on success in write-through mode (or when
// durable is set) the metadata is flushed before op returns; on failure
// everything is rolled back.
func (w *writer) op(durable bool, fn func() error) error {
	if err := w.relieve(); err != nil {
		return err
	}
	durable = durable || w.writeThrough
	w.tx = &txn{fileSize: w.fileSize}
	err := fn()
	if err == nil {
		err = w.flushRun()
	}
	if err == nil && durable {
		err = w.writeStages()
	}
	tx := w.tx
	w.tx = nil
	if err != nil {
		w.run.buf = w.run.buf[:0]
		w.rollback(tx, err)
		return err
	}
	if durable {
		if err := w.freeStage(); err != nil {
			return fmt.Errorf("qcow: %s: the write is durable but freeing replaced clusters failed (retried at the next flush): %w", w.name, err)
		}
	}
	return nil
}

// relieve flushes metadata in write-back mode when the dirty tables exceed
// their cache sizes, so that they stay bounded.
func (w *writer) relieve() error {
	if !w.overBounds() {
		return nil
	}
	return w.flush()
}

// overBounds reports whether, in write-back mode, the dirty tables exceed
// their cache sizes, so that the next write flushes first.
func (w *writer) overBounds() bool {
	if w.writeThrough || w.raw {
		return false
	}
	over := int64(len(w.l2))*w.im.l2Bytes() > w.l2Limit
	if !over && w.rc != nil {
		// Clean blocks are evicted down to the limit, so a cache twice as
		// big is mostly dirty blocks.
		over = len(w.rc.blocks) >= 2*w.rc.limit
	}
	return over
}

// rollback undoes the transaction tx after cause made it fail.
func (w *writer) rollback(tx *txn, cause error) {
	for i := len(tx.undo) - 1; i >= 0 && w.bugs&bugRollbackKeepsMem == 0; i-- {
		tx.undo[i]()
	}
	// The failed call may have written guest data in place (all of it, or
	// a torn or short part) that no barrier covered: the next Flush must
	// issue one, so that what reads see then is what a crash keeps.
	w.unsynced = true
	var rerr error
	// Pointers first, then the refcount table, then refcounts: at every
	// instant nothing on disk points at a cluster with refcount 0.
	for stage := 3; stage >= 1 && rerr == nil; stage-- {
		if len(tx.meta[stage]) == 0 {
			continue
		}
		w.event(rollbackEvents[stage])
		for _, m := range tx.meta[stage] {
			if _, err := w.f.WriteAt(m.enc(), m.off); err != nil {
				rerr = err
				break
			}
		}
		if rerr == nil {
			w.event(EventFlushToDisk)
			rerr = w.f.Datasync()
		}
	}
	if rerr == nil && tx.grew {
		// Cut back to the first cluster boundary at or after the file's
		// size before the write, not to the old size itself: the last
		// cluster may end past the old size (only the guest's bytes of a
		// fresh cluster are written) and have been written in place by
		// this call, and a cut inside it would tear a sector (new bytes,
		// then zeros). Clusters reserved before the write but not yet
		// written (metadata waiting for a flush) lie beyond the cut, like
		// everything else past the end of the file. The harness checks
		// exactly this bound after every rollback (see package harness).
		size := (tx.fileSize + w.cs - 1) &^ (w.cs - 1)
		if w.bugs&bugRollbackNoTruncate == 0 {
			w.event(EventRollbackTruncate)
			rerr = w.f.Truncate(size)
		}
		if rerr == nil {
			w.event(EventFlushToDisk)
			rerr = w.f.Datasync()
		}
		if rerr == nil {
			w.fileSize = size
		}
	}
	if rerr != nil && w.failed == nil {
		w.failed = fmt.Errorf("qcow: %s: rollback after %v failed: %w", w.name, cause, rerr)
	}
}

// rollbackEvents names the rewrites of a rollback by the stage that wrote
// what they undo.
var rollbackEvents = [4]Event{1: EventRollbackRefcount, 2: EventRollbackRefTable, 3: EventRollbackPointers}

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

// close flushes and closes the writer (the file is closed by Image.Close).
func (w *writer) close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return ErrClosed
	}
	w.closed = true
	if w.failed != nil {
		return w.failed
	}
	if w.raw {
		if w.unsynced {
			return w.sync()
		}
		return nil
	}
	if err := w.flush(); err != nil {
		return err
	}
	if w.freed || w.unsynced {
		// Make the last decrements durable too: no leaks after Close.
		return w.sync()
	}
	return nil
}

// writerFor returns im's writer, or an error if im is read-only.
func (im *Image) writerFor() (*writer, error) {
	if im.w == nil {
		return nil, fmt.Errorf("%w: %s was opened read-only", ErrReadOnly, im.name)
	}
	return im.w, nil
}

func (w *writer) checkRange(off, n int64) error {
	size := w.im.size()
	if off < 0 || n < 0 || off > size || n > size-off {
		return fmt.Errorf("%w: %d bytes at offset %d (disk size %d)", ErrOutOfRange, n, off, size)
	}
	return nil
}

// WriteAt writes len(p) bytes at off on the virtual disk. It implements
// io.WriterAt: it returns len(p) and nil, or 0 and an error. Writes beyond
// the end of the disk fail with ErrOutOfRange, on an image opened read-only
// with ErrReadOnly. Safe for concurrent use with every other method.
//
// Allocation: new clusters are appended at the end of the file and never
// reused after being freed. A write into a cluster the active tables do
// not own alone (unallocated, a zero cluster, compressed, or shared with an
// internal snapshot) goes to a new cluster, written complete (the rest from
// the backing file, zeros, the decompressed or the shared cluster) before
// anything points at it (where the rest must read as zeros, only the
// guest's bytes are written into the fresh space); only clusters the active
// tables own alone are overwritten in place.
//
// Ordering: metadata is written in four stages with an fdatasync after
// each of the first three: (1) new L2 tables, refcount blocks, refcount or
// L1 tables and refcount increments, with the guest data written before
// them; (2) refcount table entries, or the header's refcount table
// location in one write; (3) L2 and L1 entries, or the header's size and L1
// location in one write; (4) refcount decrements of what stage 3 stopped
// referencing. A pointer never reaches the disk before what it points at,
// and a refcount never drops while a pointer to it may still be on disk; a
// crash can leak clusters, never corrupt the image.
//
// Cache modes: in write-through mode (Options.WriteThrough) WriteAt runs the
// stages before it returns, so the write is durable on return. In
// write-back mode (the default) the guest data is written at once and the
// metadata cached in memory (reads see it) until Flush, Close, or the dirty
// tables outgrowing Options.L2CacheBytes or Options.RefcountCacheBytes.
//
// Errors: when a file operation fails during the write (write-through:
// anywhere before stage 4; write-back: while writing the guest data), the
// write is rolled back: the in-memory tables are restored, metadata changed
// in place is rewritten with its old bytes (pointers first), the file is
// truncated to its size before the write and fdatasynced, and the error is
// returned wrapped with %w. The image is then as before the write, except
// that guest data written in place may hold old or new bytes. A failed
// fdatasync is final: the image returns it from Flush and Close and refuses
// every later write until it is reopened.
//
// Not supported (Open with ReadWrite refuses them, wrapping ErrReadOnly):
// extended L2 entries, external data files, persistent bitmaps, and images
// with the dirty or corrupt bit set. Lazy refcounts are accepted but not
// used. See the comment at the top of write.go for the details.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	w, err := im.writerFor()
	if err != nil {
		return 0, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.usable(); err != nil {
		return 0, err
	}
	if err := w.checkRange(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	if w.raw {
		return w.rawWrite(p, off)
	}
	if err := w.op(false, func() error { return w.writeData(p, off) }); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteZeroes makes n bytes at off read as zeros. On QCOW2 version 3 whole
// clusters become zero clusters (the old cluster, if any, is freed);
// partial clusters, and every cluster on QCOW and QCOW2 version 2, get
// explicit zeros. Clusters that are unallocated in an image without a
// backing file already read as zeros and are left alone.
func (im *Image) WriteZeroes(off, n int64) error {
	w, err := im.writerFor()
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.usable(); err != nil {
		return err
	}
	if err := w.checkRange(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if w.raw {
		for n > 0 {
			k := min(n, int64(len(rawZeros)))
			if _, err := w.rawWrite(rawZeros[:k], off); err != nil {
				return err
			}
			off, n = off+k, n-k
		}
		return nil
	}
	return w.op(false, func() error { return w.writeZeroes(off, n) })
}

var rawZeros [64 << 10]byte

// Flush makes every write acknowledged so far durable: it writes the dirty
// metadata in dependency order with a barrier between stages. After a
// failed fdatasync it returns that failure (now and forever). On an image
// opened read-only it does nothing.
func (im *Image) Flush() error {
	w := im.w
	if w == nil {
		return nil
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.usable(); err != nil {
		return err
	}
	if w.raw {
		return w.sync()
	}
	if err := w.flush(); err != nil {
		return err
	}
	if w.unsynced {
		return w.sync()
	}
	return nil
}

// Resize grows the virtual disk to newSize bytes (a multiple of 512). When
// the L1 table is too small, a bigger one is written at the end of the file,
// made durable, and the header switched to it in one write; the old table is
// freed afterwards. Where a backing file is longer than the old size, the
// grown range is zeroed so that it does not show the backing file. Resize is
// durable when it returns, whatever the cache mode. Shrinking is not
// supported.
func (im *Image) Resize(newSize int64) error {
	w, err := im.writerFor()
	if err != nil {
		return err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err := w.usable(); err != nil {
		return err
	}
	old := im.size()
	switch {
	case newSize < old:
		return fmt.Errorf("%w: %s: shrinking from %d to %d bytes", ErrUnsupported, im.name, old, newSize)
	case newSize%512 != 0:
		return fmt.Errorf("qcow: %s: new size %d is not a multiple of 512", im.name, newSize)
	case newSize == old:
		return nil
	}
	if w.raw {
		w.event(EventHeaderUpdate)
		if err := w.f.Truncate(newSize); err != nil {
			return fmt.Errorf("qcow: %s: resize: %w", im.name, err)
		}
		im.fileSize, im.dataSize = newSize, newSize
		return w.sync()
	}
	if err := w.flush(); err != nil {
		return err
	}
	if err := w.op(w.bugs&bugResizeNotDurable == 0, func() error { return w.grow(newSize) }); err != nil {
		return err
	}
	if b := im.backing; b != nil && b.Size() > old {
		end := min(b.Size(), newSize)
		return w.op(true, func() error { return w.writeZeroes(old, end-old) })
	}
	return nil
}

// grow sets the new virtual size, moving the L1 table when it is too small.
func (w *writer) grow(newSize int64) error {
	im, h := w.im, w.im.h
	perL1 := w.cs * im.l2Entries
	need := (newSize + perL1 - 1) / perL1
	if need > MaxL1Bytes/8 {
		return fmt.Errorf("%w: %s: size %d needs %d L1 entries (limit %d)", ErrLimit, im.name, newSize, need, MaxL1Bytes/8)
	}
	oldSize := h.size
	h.size = uint64(newSize)
	w.headerDirty = true
	w.remember(func() { h.size, w.headerDirty = oldSize, false })
	if need <= int64(len(im.l1)) {
		return nil
	}
	n := (need*8 + w.cs - 1) / w.cs
	w.event(EventL1GrowAllocTable)
	off, err := w.alloc(n)
	if err != nil {
		return err
	}
	w.markMeta(off, n*w.cs)
	nl1 := make([]uint64, need)
	copy(nl1, im.l1)
	oldL1, oldOff, oldN, oldLo, oldHi := im.l1, h.l1Off, h.l1Size, w.l1Lo, w.l1Hi
	im.l1, h.l1Off, h.l1Size, w.l1Moved, w.l1Lo, w.l1Hi = nl1, uint64(off), uint32(need), true, 0, 0
	w.remember(func() {
		im.l1, h.l1Off, h.l1Size, w.l1Moved, w.l1Lo, w.l1Hi = oldL1, oldOff, oldN, false, oldLo, oldHi
	})
	w.deferFree(int64(oldOff), int64(oldN)*8)
	return nil
}

// markMeta records new metadata clusters for the overlap check.
func (w *writer) markMeta(off, n int64) {
	for c := off; c < off+n; c += w.cs {
		if !w.meta[c] {
			w.meta[c] = true
			w.remember(func() { delete(w.meta, c) })
		}
	}
}

// rawWrite writes to a raw image.
func (w *writer) rawWrite(p []byte, off int64) (int, error) {
	w.event(EventWriteAIO)
	if _, err := w.f.WriteAt(p, off); err != nil {
		return 0, fmt.Errorf("qcow: %s: write %d bytes at %d: %w", w.name, len(p), off, err)
	}
	w.unsynced = true
	if w.writeThrough {
		if err := w.sync(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

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
