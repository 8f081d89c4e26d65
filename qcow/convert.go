package qcow

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/qcowcrash/qcowcrash/vfs"
)

const (
	// copyStatusStep is the longest range asked of BlockStatus at once.
	copyStatusStep = 1 << 30
	// copyChunk is the size of the buffer data ranges are read through.
	copyChunk = 2 << 20
	// SparseBlock is the granularity at which CopyRaw detects zeros inside
	// allocated data and leaves them as holes (qemu-img convert's -S 4k).
	SparseBlock = 4096
)

var zeroBlock [SparseBlock]byte

// CopyRaw writes the virtual disk of src to dst as a sparse raw image.
//
// dst's previous contents are discarded: it is truncated to zero and then
// to src.Size(), so everything that is never written reads as zeros and is
// a hole on file systems that support them. Ranges that BlockStatus
// reports as zero (unallocated throughout the backing chain, or zero
// clusters) are never read or written; allocated ranges are read in chunks
// of a few MiB and, within them, SparseBlock-sized blocks (aligned to the
// virtual disk) that hold only zeros are skipped too, as `qemu-img convert`
// does by default. A 64 GiB image with a few MiB of data therefore converts
// in milliseconds and the output takes only a few MiB of disk.
//
// CopyRaw does not sync dst; the caller decides on durability.
func CopyRaw(dst vfs.File, src *Image) error {
	size := src.Size()
	if err := dst.Truncate(0); err != nil {
		return fmt.Errorf("qcow: convert: truncate output: %w", err)
	}
	if err := dst.Truncate(size); err != nil {
		return fmt.Errorf("qcow: convert: resize output to %d bytes: %w", size, err)
	}
	var buf []byte // allocated on the first data range
	for off := int64(0); off < size; {
		n, zero, err := src.BlockStatus(off, min(size-off, copyStatusStep))
		if err != nil {
			return fmt.Errorf("qcow: convert: block status at %d: %w", off, err)
		}
		if n <= 0 || n > size-off {
			return fmt.Errorf("qcow: convert: block status at %d returned bad length %d", off, n)
		}
		if !zero {
			if buf == nil {
				buf = make([]byte, copyChunk)
			}
			if err := copyData(dst, src, off, n, buf); err != nil {
				return err
			}
		}
		off += n
	}
	return nil
}

// copyData copies the guest range [off, off+n) from src to dst through buf,
// skipping SparseBlock-aligned blocks of zeros and merging the rest into as
// few writes as possible.
func copyData(dst vfs.File, src *Image, off, n int64, buf []byte) error {
	for end := off + n; off < end; {
		p := buf[:min(int64(len(buf)), end-off)]
		m, err := src.ReadAt(p, off)
		if m < len(p) {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("qcow: convert: read %d bytes at %d: %w", len(p), off, err)
		}
		if err := WriteNonZeroAt(dst, p, off, SparseBlock); err != nil {
			return err
		}
		off += int64(len(p))
	}
	return nil
}

// WriteNonZeroAt writes p at off to w, leaving out every run of zeros that
// fills whole blocks of block bytes (aligned to offset 0 of w's space, so a
// partial block at either end is written unless it is all zeros too) and
// merging the rest into as few writes as possible. It is how sparse output
// is made: what it leaves out must already read as zeros in w.
func WriteNonZeroAt(w io.WriterAt, p []byte, off, block int64) error {
	start := -1 // start in p of the pending run of non-zero blocks
	flush := func(end int) error {
		if start < 0 {
			return nil
		}
		if _, err := w.WriteAt(p[start:end], off+int64(start)); err != nil {
			return fmt.Errorf("qcow: write %d bytes at %d: %w", end-start, off+int64(start), err)
		}
		start = -1
		return nil
	}
	zero := zeroBlock[:]
	if block > int64(len(zero)) {
		zero = make([]byte, block)
	}
	for i := 0; i < len(p); {
		// The block ends at the next block boundary.
		j := min(i+int(block-(off+int64(i))%block), len(p))
		if bytes.Equal(p[i:j], zero[:j-i]) {
			if err := flush(i); err != nil {
				return err
			}
		} else if start < 0 {
			start = i
		}
		i = j
	}
	return flush(len(p))
}
