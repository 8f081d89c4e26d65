package kvmtool2011

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"sync"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// Options are the options of Open.
type Options struct {
	// WriteThrough makes every WriteAt and WriteZeroes call end with an
	// fsync, as a guest with a write-through cache would flush after each
	// write. kvmtool of 2011 had no such mode; see the package
	// documentation.
	WriteThrough bool
	// Events, when set, is told what each file operation is for just
	// before it is issued, with the names of qcow.Event (this port's
	// addition, so that a harness can label the op log as it does for its
	// own writer): open, l2_load, l2_alloc_write, l1_update, cluster_alloc
	// (the fstat that finds the end of the file for a new cluster),
	// write_aio, l2_update, flush_to_disk (fsync, and each
	// sync_file_range), rollback_truncate, close.
	Events func(string)
}

// Image is a QCOW version 1 or 2 image open for writing with kvmtool's
// 2011 write path. Calls are serialized by a mutex.
type Image struct {
	mu     sync.Mutex
	f      vfs.File
	h      *header
	l1     []uint64 // the in-core L1 table, CPU order, flags included
	wt     bool
	closed bool
	events func(string)
}

// event reports ev to Options.Events, if set.
func (im *Image) event(ev string) {
	if im.events != nil {
		im.events(ev)
	}
}

// Open opens the image name of fsys for reading and writing, reads its
// header and L1 table as kvmtool's qcow_probe did, and returns it. It
// fails with ErrNotQCOW, ErrHeader or ErrIO.
func Open(fsys vfs.FS, name string, o Options) (*Image, error) {
	if o.Events != nil {
		o.Events("open")
	}
	f, err := fsys.Open(name, vfs.ReadWrite)
	if err != nil {
		return nil, fmt.Errorf("%w: open %s: %w", ErrIO, name, err)
	}
	im, err := open(f, o)
	if err != nil {
		if o.Events != nil {
			o.Events("close")
		}
		f.Close()
		return nil, fmt.Errorf("kvmtool2011: open %s: %w", name, err)
	}
	return im, nil
}

func open(f vfs.File, o Options) (*Image, error) {
	size, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("%w: size: %w", ErrIO, err)
	}
	h, err := readHeader(f, size)
	if err != nil {
		return nil, err
	}
	l1, err := readL1(f, h)
	if err != nil {
		return nil, err
	}
	return &Image{f: f, h: h, l1: l1, wt: o.WriteThrough, events: o.Events}, nil
}

// Size returns the virtual size in bytes, as the header states it.
func (im *Image) Size() uint64 { return im.h.size }

// WriteAt writes p at byte offset off of the virtual disk, cluster by
// cluster, as kvmtool's qcow1_write_sector did (patch lines 183-209). It
// returns the number of bytes written before the first error; a cluster
// at or past the virtual size fails with ErrPastEnd.
func (im *Image) WriteAt(p []byte, off int64) (int, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, fmt.Errorf("%w: offset %d", ErrPastEnd, off)
	}
	n, err := im.writeSector(p, uint64(off))
	if err == nil && im.wt {
		err = im.fsync()
	}
	return n, err
}

// WriteZeroes writes n zero bytes at off through the same path as WriteAt
// (kvmtool of 2011 had no zero write: a guest wrote a buffer of zeros).
func (im *Image) WriteZeroes(off, n int64) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return ErrClosed
	}
	if off < 0 || n < 0 {
		return fmt.Errorf("%w: zero write of %d bytes at offset %d", ErrPastEnd, n, off)
	}
	zeros := make([]byte, min(n, zeroChunk))
	for n > 0 {
		k := min(n, zeroChunk)
		if _, err := im.writeSector(zeros[:k], uint64(off)); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	if im.wt {
		return im.fsync()
	}
	return nil
}

// zeroChunk is the size of the zero buffer WriteZeroes writes at a time.
const zeroChunk = 64 << 10

// Flush makes everything written durable with fsync, as kvmtool's
// disk_image__flush did for a format without a flush operation.
func (im *Image) Flush() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return ErrClosed
	}
	return im.fsync()
}

// Close closes the file without syncing it, as kvmtool's
// qcow1_disk_close and disk_image__close did. Later calls fail with
// ErrClosed.
func (im *Image) Close() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.closed {
		return ErrClosed
	}
	im.closed = true
	im.l1 = nil
	im.event("close")
	if err := im.f.Close(); err != nil {
		return fmt.Errorf("%w: close: %w", ErrIO, err)
	}
	return nil
}

func (im *Image) fsync() error {
	im.event("flush_to_disk")
	if err := im.f.Sync(); err != nil {
		return fmt.Errorf("%w: fsync: %w", ErrIO, err)
	}
	return nil
}

// writeSector is qcow1_write_sector (patch lines 183-209) with a byte
// offset.
func (im *Image) writeSector(buf []byte, offset uint64) (int, error) {
	written := 0
	for written < len(buf) {
		if offset >= im.h.size { // line 195
			return written, fmt.Errorf("%w: offset %d, virtual size %d", ErrPastEnd, offset, im.h.size)
		}
		nr, err := im.writeCluster(offset, buf[written:])
		if err != nil {
			return written, fmt.Errorf("kvmtool2011: write at offset %d: %w", offset, err)
		}
		written += nr
		offset += uint64(nr)
	}
	return written, nil
}

// writeCluster is qcow1_write_cluster (patch lines 80-181): it writes the
// part of buf that falls in the cluster holding offset and returns its
// length.
func (im *Image) writeCluster(offset uint64, buf []byte) (int, error) {
	h := im.h
	l2tSz := uint64(1) << h.l2Bits
	clustSz := uint64(1) << h.clusterBits

	l1tIdx := offset >> (h.l2Bits + h.clusterBits) // get_l1_index
	if l1tIdx >= uint64(len(im.l1)) {              // line 102
		return 0, fmt.Errorf("%w: L1 index %d, table of %d entries", ErrL1Index, l1tIdx, len(im.l1))
	}
	l2tIdx := (offset >> h.clusterBits) & (l2tSz - 1) // get_l2_index; < l2tSz (line 106)
	clustOff := offset & (clustSz - 1)                // get_cluster_offset; < clustSz (line 110)

	length := clustSz - clustOff // lines 113-115
	if length > uint64(len(buf)) {
		length = uint64(len(buf))
	}

	l2t := make([]byte, l2tSz*8) // calloc, line 117
	l2tOff := im.l1[l1tIdx] &^ h.oflagMask
	if l2tOff != 0 { // lines 122-124
		im.event("l2_load")
		if err := im.preadInFull(l2t, l2tOff); err != nil {
			return 0, fmt.Errorf("read L2 table of L1 entry %d: %w", l1tIdx, err)
		}
	} else {
		// Capture the size of the consistent image (line 127).
		im.event("cluster_alloc")
		fSz, err := im.fileSize()
		if err != nil {
			return 0, err
		}
		// A table of zeros at the aligned end of the file (line 132).
		l2tOff, err = im.writeL2Table(l2t)
		if err != nil {
			return 0, err
		}
		// The L1 entry: the bare offset, no QCOW_OFLAG_COPIED (line 137).
		var t [8]byte
		binary.BigEndian.PutUint64(t[:], l2tOff)
		if err := im.pwriteSync("l1_update", t[:], h.l1TableOffset+l1tIdx*8); err != nil {
			// Restore the file to the captured size (line 141).
			return 0, im.rollback(fmt.Errorf("L1 entry %d: %w", l1tIdx, err), fSz)
		}
		im.l1[l1tIdx] = l2tOff // line 147
	}

	// Capture the size of the consistent image (line 151).
	im.event("cluster_alloc")
	fSz, err := im.fileSize()
	if err != nil {
		return 0, err
	}
	clustStart := binary.BigEndian.Uint64(l2t[l2tIdx*8:]) &^ h.oflagMask // line 155
	updateMeta := false
	if clustStart == 0 { // lines 157-160
		clustStart = align(fSz, clustSz)
		updateMeta = true
	}

	// The data, with a plain pwrite: no sync (line 163).
	im.event("write_aio")
	if err := im.pwriteInFull(buf[:length], clustStart+clustOff); err != nil {
		return 0, fmt.Errorf("data: %w", err)
	}

	if updateMeta { // lines 166-175
		var t [8]byte
		binary.BigEndian.PutUint64(t[:], clustStart) // no QCOW_OFLAG_COPIED
		if err := im.pwriteSync("l2_update", t[:], l2tOff+l2tIdx*8); err != nil {
			return 0, im.rollback(fmt.Errorf("L2 entry %d of the table at %d: %w", l2tIdx, l2tOff, err), fSz)
		}
	}
	return int(length), nil
}

// writeL2Table is qcow1_write_l2_table (patch lines 48-68): it writes
// table at the end of the file aligned up to a cluster, with pwrite and
// sync_file_range, and returns its offset.
func (im *Image) writeL2Table(table []byte) (uint64, error) {
	fSz, err := im.fileSize()
	if err != nil {
		return 0, err
	}
	off := align(fSz, uint64(1)<<im.h.clusterBits)
	if err := im.pwriteSync("l2_alloc_write", table, off); err != nil {
		return 0, fmt.Errorf("new L2 table: %w", err)
	}
	return off, nil
}

// rollback truncates the file to fSz after a failed metadata write, as
// the patch does (lines 141 and 171), and returns err (joined with the
// truncate's error, which kvmtool ignored).
func (im *Image) rollback(err error, fSz uint64) error {
	im.event("rollback_truncate")
	if terr := im.f.Truncate(int64(fSz)); terr != nil {
		return errors.Join(err, fmt.Errorf("%w: ftruncate to %d: %w", ErrIO, fSz, terr))
	}
	return err
}

// fileSize is file_size (patch lines 29-35): fstat's size, where 0 (or an
// error) makes the caller fail.
func (im *Image) fileSize() (uint64, error) {
	sz, err := im.f.Size()
	if err != nil {
		return 0, fmt.Errorf("%w: file_size: %w", ErrIO, err)
	}
	if sz <= 0 {
		return 0, fmt.Errorf("%w: file_size = %d", ErrIO, sz)
	}
	return uint64(sz), nil
}

// pwriteSync is pwrite_sync (patch lines 37-45): pwrite, then
// sync_file_range over the written range. ev names the write.
func (im *Image) pwriteSync(ev string, b []byte, off uint64) error {
	im.event(ev)
	if err := im.pwriteInFull(b, off); err != nil {
		return err
	}
	im.event("flush_to_disk")
	if err := im.f.SyncRange(int64(off), int64(len(b))); err != nil {
		return fmt.Errorf("%w: sync_file_range offset %d length %d: %w", ErrIO, off, len(b), err)
	}
	return nil
}

// pwriteInFull is kvmtool's pwrite_in_full.
func (im *Image) pwriteInFull(b []byte, off uint64) error {
	if off > math.MaxInt64-uint64(len(b)) {
		return fmt.Errorf("%w: pwrite offset %d length %d overflows", ErrIO, off, len(b))
	}
	if _, err := im.f.WriteAt(b, int64(off)); err != nil {
		return fmt.Errorf("%w: pwrite offset %d length %d: %w", ErrIO, off, len(b), err)
	}
	return nil
}

// preadInFull is kvmtool's pread_in_full: a read that reaches the end of
// the file after at least one byte succeeds (the rest of b keeps its
// zeros); a read that starts at or past the end fails.
func (im *Image) preadInFull(b []byte, off uint64) error {
	if off > math.MaxInt64-uint64(len(b)) {
		return fmt.Errorf("%w: pread offset %d length %d overflows", ErrIO, off, len(b))
	}
	n, err := im.f.ReadAt(b, int64(off))
	if err != nil && !(errors.Is(err, io.EOF) && n > 0) {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return fmt.Errorf("%w: pread offset %d length %d: %w", ErrIO, off, len(b), err)
	}
	return nil
}

// align is the kernel's ALIGN(x, a) for a power of two a.
func align(x, a uint64) uint64 { return (x + a - 1) &^ (a - 1) }
