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
	"errors"
	"fmt"
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
