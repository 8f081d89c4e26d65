package qcow

import (
	"bytes"
	"compress/flate"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/zstd"
)

// extentKind says where the bytes of a guest range come from.
type extentKind int

const (
	extentUnallocated extentKind = iota // the backing file, or zeros
	extentZero                          // reads as zeros
	extentData                          // host clusters in the data file
	extentCompressed                    // a compressed cluster
)

// extent is a run of guest bytes of one kind starting at a guest offset.
type extent struct {
	kind   extentKind
	length int64
	host   int64  // extentData: host offset of the first byte
	entry  uint64 // extentCompressed: the L2 entry
}

// ReadAt reads len(p) bytes of the virtual disk at off. It follows
// io.ReaderAt: a read that reaches the end of the disk returns the bytes
// read and io.EOF.
func (im *Image) ReadAt(p []byte, off int64) (int, error) {
	if w := im.w; w != nil {
		w.mu.RLock()
		defer w.mu.RUnlock()
	}
	return im.readAt(p, off)
}

// readAt is ReadAt without locking: the writer calls it with its lock held.
func (im *Image) readAt(p []byte, off int64) (int, error) {
	return im.readAtEvent(p, off, EventReadAIO)
}

// readAtEvent is readAt with the event to report for the reads of guest
// data (read_aio, or cow_read when the writer reads for a copy-on-write).
func (im *Image) readAtEvent(p []byte, off int64, ev Event) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("qcow: negative offset %d", off)
	}
	size := im.size()
	if off >= size {
		if len(p) == 0 {
			return 0, nil
		}
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > size-off {
		p = p[:size-off]
		eof = io.EOF
	}
	done := 0
	for done < len(p) {
		n, err := im.readChunk(p[done:], off+int64(done), ev)
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, eof
}

// readChunk reads the start of p (at least one byte, at most one extent).
func (im *Image) readChunk(p []byte, off int64, ev Event) (int, error) {
	if im.format == FormatRaw {
		im.event(ev)
		n, err := im.f.ReadAt(p, off)
		if errors.Is(err, io.EOF) {
			clear(p[n:])
			return len(p), nil
		}
		return n, err
	}
	e, err := im.lookup(off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	q := p[:e.length]
	switch e.kind {
	case extentZero:
		clear(q)
	case extentUnallocated:
		if err := im.readBacking(q, off, ev); err != nil {
			return 0, err
		}
	case extentData:
		im.event(ev)
		n, err := im.dataFile.ReadAt(q, e.host)
		if err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("qcow: %s: read data at host offset %#x: %w", im.name, e.host, err)
		}
		clear(q[n:]) // a cluster that ends past EOF reads as zeros, as in qemu
	case extentCompressed:
		if ev == EventReadAIO {
			ev = EventReadCompressed
		}
		buf, err := im.cluster(e.entry, off>>im.clusterBits, ev)
		if err != nil {
			return 0, err
		}
		copy(q, buf[off&(im.clusterSize-1):])
	}
	return len(q), nil
}

// readBacking fills p from the backing file at off, or with zeros where
// there is none or it is shorter.
func (im *Image) readBacking(p []byte, off int64, ev Event) error {
	if im.backing == nil {
		clear(p)
		return nil
	}
	// A backing image is read-only (no writer, no lock to take).
	n, err := im.backing.readAtEvent(p, off, ev)
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	clear(p[n:])
	return nil
}

// lookup maps the guest range [off, off+max) and returns the extent that
// starts at off; its length is at most max and never crosses a point where
// the kind (or, for data, host contiguity) changes.
func (im *Image) lookup(off, max int64) (extent, error) {
	cs := im.clusterSize
	vcl := uint64(off) >> im.clusterBits
	l1i := vcl / uint64(im.l2Entries)
	perL1 := cs * im.l2Entries
	if l1i >= uint64(len(im.l1)) {
		return extent{kind: extentUnallocated, length: max}, nil
	}
	l2off, err := im.l1Entry(int(l1i))
	if err != nil {
		return extent{}, err
	}
	if l2off == 0 {
		rest := perL1 - off%perL1
		return extent{kind: extentUnallocated, length: min(rest, max)}, nil
	}
	table, err := im.l2Table(l2off)
	if err != nil {
		return extent{}, err
	}
	l2i := int64(vcl % uint64(im.l2Entries))
	in := off & (cs - 1)
	e, err := im.entryExtent(table, l2off, l2i, in)
	if err != nil {
		return extent{}, err
	}
	if e.length >= max {
		e.length = max
		return e, nil
	}
	// Merge following clusters of the same kind in this table.
	first := l2i
	for l2i++; l2i < im.l2Entries && e.length < max && e.kind != extentCompressed; l2i++ {
		if in+e.length != cs*(l2i-first) {
			break // the run ended inside the previous cluster
		}
		n, err := im.entryExtent(table, l2off, l2i, 0)
		if err != nil || n.kind != e.kind || (e.kind == extentData && n.host != e.host+e.length) {
			break
		}
		e.length += n.length
		if n.length < cs {
			break
		}
	}
	e.length = min(e.length, max)
	return e, nil
}

// l1Entry returns the L2 table offset of L1 entry i (already validated for
// QCOW2 at open; validated here for QCOW version 1).
func (im *Image) l1Entry(i int) (uint64, error) {
	e := im.l1[i]
	if im.format == FormatQCOW2 {
		return e & l1OffsetMask, nil
	}
	if e == 0 {
		return 0, nil
	}
	at := int64(im.h.l1Off) + int64(i)*8
	if e%8 != 0 || e < v1HeaderLen || e > MaxHostOffset {
		return 0, formatErr("l1_entry", at, e, "is not a valid L2 table offset (index %d)", i)
	}
	if e+uint64(im.l2Bytes()) > uint64(im.fileSize) {
		return 0, formatErr("l1_entry", at, e, "points at an L2 table beyond the end of the file (%d bytes)", im.fileSize)
	}
	return e, nil
}

// entryExtent classifies L2 entry l2i of table at guest offset in within
// its cluster and returns the extent from there to the end of the run of
// the same kind inside that cluster.
func (im *Image) entryExtent(table []uint64, l2off uint64, l2i, in int64) (extent, error) {
	e, bitmap, at := im.l2EntryAt(table, l2off, l2i)
	return im.classifyEntry(e, bitmap, at, in)
}

// l2EntryAt returns L2 entry l2i of the table at host offset l2off: the
// entry, its subcluster bitmap (extended L2 entries; else 0) and the host
// offset where it is stored.
func (im *Image) l2EntryAt(table []uint64, l2off uint64, l2i int64) (e, bitmap uint64, at int64) {
	if im.extL2 {
		return table[2*l2i], table[2*l2i+1], int64(l2off) + l2i*16
	}
	return table[l2i], 0, int64(l2off) + l2i*8
}

// classifyEntry is entryExtent for the L2 entry e (and, for extended L2
// entries, its subcluster bitmap) stored at host offset at.
func (im *Image) classifyEntry(e, bitmap uint64, at, in int64) (extent, error) {
	cs := im.clusterSize
	rest := cs - in
	if im.format == FormatQCOW {
		return im.v1EntryExtent(e, at, in, rest)
	}
	if e&flagCompressed != 0 {
		if err := im.checkCompressed(e, bitmap, at); err != nil {
			return extent{}, err
		}
		return extent{kind: extentCompressed, length: rest, entry: e}, nil
	}
	if e&l2ReservedMask != 0 {
		return extent{}, formatErr("l2_entry", at, e, "has reserved bits set")
	}
	host := e & l2OffsetMask
	if host%uint64(cs) != 0 {
		return extent{}, formatErr("l2_entry", at, e, "points at unaligned data cluster %#x", host)
	}
	// Offset 0 means unallocated, except in an external data file where it
	// is a valid offset; there COPIED (always set: refcount 1) tells them
	// apart, as in qemu.
	allocated := host != 0 || (im.dataFile != im.f && e&flagCopied != 0)
	if allocated && host >= uint64(im.dataSize) {
		return extent{}, formatErr("l2_entry", at, e, "points at data cluster %#x beyond the end of the data file (%d bytes)", host, im.dataSize)
	}
	if !im.extL2 {
		if e&flagZero != 0 {
			if im.h.version < 3 {
				return extent{}, formatErr("l2_entry", at, e, "has the zero flag set in a version 2 image")
			}
			return extent{kind: extentZero, length: rest}, nil
		}
		if !allocated {
			return extent{kind: extentUnallocated, length: rest}, nil
		}
		return extent{kind: extentData, length: rest, host: int64(host) + in}, nil
	}
	// Extended L2: classify per subcluster.
	if e&flagZero != 0 {
		return extent{}, formatErr("l2_entry", at, e, "has reserved bit 0 set in an extended L2 entry")
	}
	alloc, zero := uint32(bitmap), uint32(bitmap>>32)
	if alloc&zero != 0 {
		return extent{}, formatErr("l2_bitmap", at+8, bitmap, "marks subclusters %#x both allocated and zero", alloc&zero)
	}
	if alloc != 0 && !allocated {
		return extent{}, formatErr("l2_bitmap", at+8, bitmap, "marks subclusters allocated in an entry without a host offset")
	}
	sc := cs / 32
	kindOf := func(i int64) extentKind {
		switch {
		case alloc&(1<<i) != 0:
			return extentData
		case zero&(1<<i) != 0:
			return extentZero
		}
		return extentUnallocated
	}
	i := in / sc
	k := kindOf(i)
	j := i + 1
	for j < 32 && kindOf(j) == k {
		j++
	}
	x := extent{kind: k, length: j*sc - in}
	if k == extentData {
		x.host = int64(host) + in
	}
	return x, nil
}

func (im *Image) v1EntryExtent(e uint64, at, in, rest int64) (extent, error) {
	if e == 0 {
		return extent{kind: extentUnallocated, length: rest}, nil
	}
	if e&(1<<63) != 0 {
		if err := im.checkCompressed(e, 0, at); err != nil {
			return extent{}, err
		}
		return extent{kind: extentCompressed, length: rest, entry: e}, nil
	}
	if e%512 != 0 {
		return extent{}, formatErr("l2_entry", at, e, "points at a data cluster not aligned to 512 bytes")
	}
	if e >= uint64(im.fileSize) {
		return extent{}, formatErr("l2_entry", at, e, "points at a data cluster beyond the end of the file (%d bytes)", im.fileSize)
	}
	return extent{kind: extentData, length: rest, host: int64(e) + in}, nil
}

// compressedRange decodes a compressed descriptor into the host offset and
// the number of bytes to read.
func (im *Image) compressedRange(e uint64) (off, size uint64) {
	cb := uint64(im.clusterBits)
	if im.format == FormatQCOW {
		x := 63 - cb
		return e & (1<<x - 1), (e >> x) & (uint64(im.clusterSize) - 1)
	}
	x := 70 - cb
	off = e & (1<<x - 1)
	nsect := ((e >> x) & (1<<(cb-8) - 1)) + 1
	return off, nsect*512 - off&511
}

func (im *Image) checkCompressed(e, bitmap uint64, at int64) error {
	if im.format == FormatQCOW2 {
		if e&flagCopied != 0 {
			return formatErr("l2_entry", at, e, "has the COPIED flag set on a compressed cluster")
		}
		if bitmap != 0 {
			return formatErr("l2_bitmap", at+8, bitmap, "is non-zero on a compressed cluster")
		}
		if im.dataFile != im.f {
			return formatErr("l2_entry", at, e, "is compressed in an image with an external data file")
		}
	}
	off, size := im.compressedRange(e)
	if off < uint64(im.clusterSize) {
		return formatErr("l2_entry", at, e, "points compressed data at %#x inside cluster 0", off)
	}
	if off >= uint64(im.fileSize) || size == 0 {
		return formatErr("l2_entry", at, e, "points compressed data at %#x (%d bytes) beyond the end of the file (%d bytes)", off, size, im.fileSize)
	}
	return nil
}

// cluster returns the decompressed guest cluster vcl described by the
// compressed entry e, using a one-entry cache for sequential reads.
func (im *Image) cluster(e uint64, vcl int64, ev Event) ([]byte, error) {
	if b := im.comp.get(e); b != nil {
		return b, nil
	}
	off, size := im.compressedRange(e)
	end := im.fileSize
	if w := im.w; w != nil {
		// During a write im.fileSize counts clusters reserved but not yet
		// written: the compressed data may end the file before them.
		end = w.fileSize
	}
	size = min(size, uint64(max(end, int64(off)))-off)
	in := make([]byte, size)
	im.event(ev)
	if err := im.readFull(in, int64(off)); err != nil {
		return nil, err
	}
	out := make([]byte, im.clusterSize)
	var err error
	if im.format == FormatQCOW2 && im.h.compressionType == CompressionZstd {
		err = zstdDecompress(out, in)
	} else {
		err = deflateDecompress(out, in)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %s: compressed cluster for guest offset %#x at host %#x (%d bytes): %v",
			ErrFormat, im.name, vcl<<im.clusterBits, off, size, err)
	}
	im.comp.put(e, out)
	return out, nil
}

// deflateDecompress inflates raw deflate data from in into all of out.
// Output beyond len(out) is ignored, as qemu does; less is an error.
func deflateDecompress(out, in []byte) error {
	r := flate.NewReader(bytes.NewReader(in))
	defer r.Close()
	if _, err := io.ReadFull(r, out); err != nil {
		return fmt.Errorf("deflate: %w", err)
	}
	return nil
}

var zstdPool = sync.Pool{New: func() any {
	d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true), zstd.WithDecoderMaxMemory(64<<20))
	if err != nil {
		return err
	}
	return d
}}

// zstdDecompress stream-decodes zstd frames from in until out is full.
func zstdDecompress(out, in []byte) error {
	v := zstdPool.Get()
	d, ok := v.(*zstd.Decoder)
	if !ok {
		return fmt.Errorf("zstd: %v", v)
	}
	defer zstdPool.Put(d)
	if err := d.Reset(bytes.NewReader(in)); err != nil {
		return fmt.Errorf("zstd: %w", err)
	}
	if _, err := io.ReadFull(d, out); err != nil {
		return fmt.Errorf("zstd: %w", err)
	}
	return nil
}

// decompCache keeps the most recently decompressed cluster.
type decompCache struct {
	mu    sync.Mutex
	entry uint64
	data  []byte
}

func (c *decompCache) get(e uint64) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.data != nil && c.entry == e {
		return c.data
	}
	return nil
}

func (c *decompCache) put(e uint64, b []byte) {
	c.mu.Lock()
	c.entry, c.data = e, b
	c.mu.Unlock()
}

// BlockStatus describes the guest range that starts at off: its length (at
// most n) and whether it reads as zeros without any data being stored for
// it anywhere in the backing chain (unallocated throughout, or zero
// clusters). Callers use it to skip holes, e.g. to write sparse output.
func (im *Image) BlockStatus(off, n int64) (length int64, zero bool, err error) {
	if w := im.w; w != nil {
		w.mu.RLock()
		defer w.mu.RUnlock()
	}
	size := im.size()
	if off < 0 || off >= size {
		return 0, false, fmt.Errorf("qcow: block status offset %d outside the disk (size %d)", off, size)
	}
	n = min(n, size-off)
	if im.format == FormatRaw {
		return n, false, nil
	}
	e, err := im.lookup(off, n)
	if err != nil {
		return 0, false, err
	}
	switch e.kind {
	case extentZero:
		return e.length, true, nil
	case extentUnallocated:
		if im.backing == nil || off >= im.backing.Size() {
			return e.length, true, nil
		}
		return im.backing.BlockStatus(off, min(e.length, im.backing.Size()-off))
	}
	return e.length, false, nil
}
