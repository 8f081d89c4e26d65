// Package qcow reads and writes QCOW disk images, versions 1, 2 and 3, over
// the small file interface of package vfs.
//
// Every field of an image is treated as hostile until validated: offsets are
// checked for alignment, for the largest host offset and against the size of
// the file before use, table sizes are bounded by the limits in this
// package (MaxL1Bytes, MaxRefcountTableBytes, ...) and by the file size
// before anything is allocated, and every rejection is a *FormatError naming
// the field and its value that unwraps to one of the sentinel errors.
//
// Create makes new images (crash-safely); Open with Options.ReadWrite opens
// one for writing with WriteAt, WriteZeroes, Resize, Flush and Close. The
// writer is crash consistent by construction: new clusters are appended and
// written complete before anything points at them, metadata is written in
// dependency order with an fdatasync between stages, and a failed write is
// rolled back by truncating the file. WriteAt documents the contract.
package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"path"
	"path/filepath"
	"sync"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// Format names an image format.
type Format string

// The formats this package reads.
const (
	FormatRaw   Format = "raw"
	FormatQCOW  Format = "qcow"  // QCOW version 1
	FormatQCOW2 Format = "qcow2" // QCOW2, versions 2 and 3
)

// Options configure Open. The zero value (or nil) opens read-only, probes
// the format, and follows the backing chain up to MaxBackingDepth.
type Options struct {
	// Format forces the image format instead of probing it from the magic.
	Format Format
	// NoBacking opens the image without its backing file: unallocated
	// clusters then read as zeros.
	NoBacking bool
	// MaxBackingDepth bounds the backing chain (0 means MaxBackingDepth).
	MaxBackingDepth int
	// L2CacheBytes bounds the memory used to cache L2 tables (0 means
	// 4 MiB). For a writable image it also bounds the dirty L2 tables kept
	// in write-back mode: beyond it the next write first flushes metadata.
	L2CacheBytes int64

	// ReadWrite opens the image for writing (the backing chain stays
	// read-only). See WriteAt for what is supported and refused.
	ReadWrite bool
	// WriteThrough makes every write durable when it returns (qemu's
	// cache=writethrough); the default is write-back (metadata cached in
	// memory and written, in dependency order, by Flush and Close).
	WriteThrough bool
	// RefcountCacheBytes bounds the memory used to cache refcount blocks
	// of a writable QCOW2 image (0 means 1 MiB, at least four blocks).
	RefcountCacheBytes int64
	// Events, when set, is told what the file operations the writer issues
	// next are for (see Event), just before it issues them. nil costs
	// nothing. A harness passes the events on to a vfs.Labeler such as
	// faultfs (see LabelEvents).
	Events func(Event)
}

// Image is an open disk image: QCOW, QCOW2 or raw. Its methods are safe for
// concurrent use.
type Image struct {
	fsys     vfs.FS
	name     string
	f        vfs.File
	fileSize int64
	format   Format
	h        *header // nil for raw images

	dataFile vfs.File // external data file, or f
	dataSize int64

	clusterBits uint32
	clusterSize int64
	l2Entries   int64
	extL2       bool
	l1          []uint64

	backing *Image

	l2c  *l2Cache
	comp decompCache

	mu     sync.Mutex
	closed bool

	w *writer // non-nil when opened with ReadWrite (see write.go)

	events   func(Event) // Options.Events (see events.go)
	repairEv Event       // the event of a repair's reads and writes (repair.go)
}

// Open opens the image called name in fsys for reading, validates its
// header and tables, and opens its backing chain.
func Open(fsys vfs.FS, name string, opts *Options) (*Image, error) {
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.MaxBackingDepth <= 0 {
		o.MaxBackingDepth = MaxBackingDepth
	}
	im, err := open(fsys, name, o, o.Format, 0, map[string]bool{})
	if err != nil || !o.ReadWrite {
		return im, err
	}
	if im.format == FormatQCOW2 && im.h.incompat&IncompatDirty != 0 && im.h.incompat&IncompatCorrupt == 0 {
		// A dirty image (lazy refcounts in use when it was last written)
		// has refcounts that may be too low: rebuild them before writing,
		// as qemu does on a writable open. Repair clears the bit last,
		// after everything else is durable, so a crash during it leaves a
		// dirty image that the next open repairs again.
		format := im.format
		im.Close()
		if err := rebuildDirty(fsys, name, format, o.Events); err != nil {
			return nil, err
		}
		if im, err = open(fsys, name, o, format, 0, map[string]bool{}); err != nil {
			return nil, err
		}
	}
	if err := im.openWriter(o); err != nil {
		im.Close()
		return nil, err
	}
	return im, nil
}

func open(fsys vfs.FS, name string, o Options, format Format, depth int, seen map[string]bool) (*Image, error) {
	flag := vfs.ReadOnly
	if o.ReadWrite && depth == 0 {
		flag = vfs.ReadWrite // only the top image; backing files stay read-only
	}
	if o.Events != nil {
		o.Events(EventOpen)
	}
	f, err := fsys.Open(name, flag)
	if err != nil {
		return nil, err
	}
	im, err := openFile(fsys, name, f, o, format, depth, seen)
	if err != nil {
		if o.Events != nil {
			o.Events(EventClose)
		}
		f.Close()
		return nil, err
	}
	return im, nil
}

func openFile(fsys vfs.FS, name string, f vfs.File, o Options, format Format, depth int, seen map[string]bool) (*Image, error) {
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	im := &Image{fsys: fsys, name: name, f: f, fileSize: size, dataFile: f, dataSize: size, events: o.Events}
	if format == "" {
		format, err = probe(f)
		if err != nil {
			return nil, err
		}
	}
	im.format = format
	switch format {
	case FormatRaw:
		return im, nil
	case FormatQCOW, FormatQCOW2:
	default:
		return nil, fmt.Errorf("%w: unknown format %q", ErrUnsupported, format)
	}

	var magic [8]byte
	if n, err := f.ReadAt(magic[:], 0); n < 8 {
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("qcow: %s: read the header: %w", name, err)
		}
		return nil, formatErr("header", 0, uint64(n), "bytes: file too short for a QCOW header")
	}
	if binary.BigEndian.Uint32(magic[:]) != Magic {
		return nil, fmt.Errorf("%w: %s: bad magic %#x", ErrNotQCOW, name, binary.BigEndian.Uint32(magic[:]))
	}
	version := binary.BigEndian.Uint32(magic[4:])
	switch {
	case version == 1 && format == FormatQCOW:
		err = im.openV1()
	case (version == 2 || version == 3) && format == FormatQCOW2:
		err = im.openV2()
	case version >= 1 && version <= 3:
		return nil, fmt.Errorf("%w: %s: version %d is not format %s", ErrFormat, name, version, format)
	default:
		return nil, unsupportedErr("version", 4, uint64(version), "is not a supported QCOW version (1, 2 or 3)")
	}
	if err != nil {
		return nil, err
	}
	cacheBytes := o.L2CacheBytes
	if cacheBytes <= 0 {
		cacheBytes = 4 << 20
	}
	im.l2c = newL2Cache(cacheBytes, im.l2Bytes())

	if im.h.backingFile != "" && !o.NoBacking {
		if err := im.openBacking(o, depth, seen); err != nil {
			im.event(EventClose)
			im.closeData()
			return nil, err
		}
	}
	return im, nil
}

// probe returns the format named by the file's magic: qcow or qcow2 when it
// starts with the QCOW magic, raw otherwise. Nothing else is ever guessed.
func probe(f vfs.File) (Format, error) {
	var b [8]byte
	n, err := f.ReadAt(b[:], 0)
	if n < 8 {
		if err != nil && !errors.Is(err, io.EOF) {
			return "", err
		}
		return FormatRaw, nil
	}
	if binary.BigEndian.Uint32(b[:]) != Magic {
		return FormatRaw, nil
	}
	if binary.BigEndian.Uint32(b[4:]) == 1 {
		return FormatQCOW, nil
	}
	return FormatQCOW2, nil
}

func (im *Image) readFull(p []byte, off int64) error {
	n, err := im.f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("qcow: %s: read %d bytes at %d: %w", im.name, len(p), off, err)
}

// readHead reads up to len(p) bytes at offset 0: a file shorter than p is
// not an error here (the header parser judges the length), but a failed
// read is, and its error is wrapped.
func (im *Image) readHead(p []byte) (int, error) {
	n, err := im.f.ReadAt(p, 0)
	if err != nil && n < len(p) && !errors.Is(err, io.EOF) {
		return n, fmt.Errorf("qcow: %s: read the header: %w", im.name, err)
	}
	return n, nil
}

func (im *Image) openV1() error {
	buf := make([]byte, v1HeaderLen)
	n, err := im.readHead(buf)
	if err != nil {
		return err
	}
	h, err := parseV1Header(buf[:n], im.fileSize)
	if err != nil {
		return err
	}
	if h.backingLen > 0 {
		name := make([]byte, h.backingLen)
		if err := im.readFull(name, int64(h.backingOff)); err != nil {
			return err
		}
		h.backingFile = string(name)
	}
	im.h = h
	im.clusterBits = h.clusterBits
	im.clusterSize = 1 << h.clusterBits
	im.l2Entries = 1 << h.l2Bits
	return im.loadL1()
}

func (im *Image) openV2() error {
	var hb [v3HeaderLen]byte
	n, err := im.readHead(hb[:])
	if err != nil {
		return err
	}
	if n < 24 {
		return formatErr("header", 0, uint64(n), "bytes: file too short for a QCOW2 header")
	}
	cb := binary.BigEndian.Uint32(hb[20:])
	if cb < 9 || cb > 21 {
		return formatErr("cluster_bits", 20, uint64(cb), "out of range 9..21")
	}
	// Read all of cluster 0 (at most 2 MiB), or the file if it is shorter.
	c0 := int64(1) << cb
	if c0 > im.fileSize {
		c0 = im.fileSize
	}
	buf := getBuf(int(c0))
	err = im.readFull(buf, 0)
	var h *header
	if err == nil {
		h, err = parseV2Header(buf, im.fileSize) // keeps no reference to buf
	}
	putBuf(buf)
	if err != nil {
		return err
	}
	im.setQCOW2Header(h)
	if h.dataFile != "" {
		if err := checkFileName("data_file", h.dataFile); err != nil {
			return err
		}
		df, err := im.fsys.Open(im.resolve(h.dataFile), vfs.ReadOnly)
		if err != nil {
			return fmt.Errorf("qcow: %s: external data file %q: %w", im.name, h.dataFile, err)
		}
		im.dataFile = df
		if im.dataSize, err = df.Size(); err != nil {
			df.Close()
			return err
		}
	}
	return im.loadL1()
}

// setQCOW2Header installs a validated QCOW2 header and the geometry derived
// from it.
func (im *Image) setQCOW2Header(h *header) {
	im.h = h
	im.clusterBits = h.clusterBits
	im.clusterSize = 1 << h.clusterBits
	im.l2Entries = 1 << h.l2Bits
	im.extL2 = h.incompat&IncompatExtendedL2 != 0
}

// loadL1 reads the active L1 table, already bounded by MaxL1Bytes and the
// file size.
func (im *Image) loadL1() error {
	h := im.h
	if h.l1Size == 0 {
		return nil
	}
	l1, err := im.readTable(int64(h.l1Off), int(h.l1Size))
	if err != nil {
		return err
	}
	if im.format == FormatQCOW2 {
		for i, e := range l1 {
			if err := im.checkL1Entry(i, e); err != nil {
				return err
			}
		}
	}
	im.l1 = l1
	return nil
}

// readTable reads n big-endian 64-bit entries at off. Callers bound n.
func (im *Image) readTable(off int64, n int) ([]uint64, error) {
	buf := getBuf(n * 8)
	defer putBuf(buf)
	if err := im.readFull(buf, off); err != nil {
		return nil, err
	}
	t := make([]uint64, n)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	return t, nil
}

// checkL1Entry validates one active L1 entry of a QCOW2 image.
func (im *Image) checkL1Entry(i int, e uint64) error {
	at := int64(im.h.l1Off) + int64(i)*8
	if e&l1ReservedMask != 0 {
		return formatErr("l1_entry", at, e, "has reserved bits set (index %d)", i)
	}
	off := e & l1OffsetMask
	if off == 0 {
		return nil
	}
	if off%uint64(im.clusterSize) != 0 {
		return formatErr("l1_entry", at, e, "points at unaligned L2 table offset %#x (index %d)", off, i)
	}
	if off+uint64(im.clusterSize) > uint64(im.fileSize) {
		return formatErr("l1_entry", at, e, "points at L2 table %#x beyond the end of the file (%d bytes)", off, im.fileSize)
	}
	return nil
}

// l2Bytes is the size of one L2 table in bytes.
func (im *Image) l2Bytes() int64 {
	if im.format == FormatQCOW {
		return im.l2Entries * 8
	}
	return im.clusterSize
}

// resolve names a file referred to by the image (backing or data file):
// relative names are taken relative to the image's directory.
func (im *Image) resolve(name string) string {
	if filepath.IsAbs(name) {
		return filepath.Clean(name)
	}
	return filepath.Join(filepath.Dir(im.name), name)
}

func (im *Image) openBacking(o Options, depth int, seen map[string]bool) error {
	h := im.h
	if err := checkFileName("backing_file", h.backingFile); err != nil {
		return fmt.Errorf("qcow: %s: %w", im.name, err)
	}
	if depth+1 >= o.MaxBackingDepth {
		return fmt.Errorf("%w: %s: backing chain deeper than %d", ErrBacking, im.name, o.MaxBackingDepth)
	}
	me, err := filepath.Abs(im.name)
	if err != nil {
		me = path.Clean(im.name)
	}
	seen[me] = true
	bname := im.resolve(h.backingFile)
	abs, err := filepath.Abs(bname)
	if err != nil {
		abs = path.Clean(bname)
	}
	if seen[abs] {
		return fmt.Errorf("%w: %s: backing file %q forms a loop", ErrBacking, im.name, h.backingFile)
	}
	var format Format
	switch h.backingFormat {
	case "":
		// Probe by magic only: qcow, qcow2, else raw (never anything that
		// a guest could fake into a protocol).
	case "raw", "file":
		format = FormatRaw
	case "qcow":
		format = FormatQCOW
	case "qcow2":
		format = FormatQCOW2
	default:
		return fmt.Errorf("%w: %s: backing format %q is not supported", ErrUnsupported, im.name, h.backingFormat)
	}
	b, err := open(im.fsys, bname, o, format, depth+1, seen)
	if err != nil {
		return fmt.Errorf("qcow: %s: backing file %q: %w", im.name, h.backingFile, err)
	}
	im.backing = b
	return nil
}

// Size returns the virtual size of the disk in bytes: for QCOW images the
// header's size rounded down to a multiple of 512, as qemu reads it.
func (im *Image) Size() int64 {
	if w := im.w; w != nil {
		w.mu.RLock()
		defer w.mu.RUnlock()
	}
	return im.size()
}

// size is Size without locking; callers hold the writer lock if any.
func (im *Image) size() int64 {
	if im.h == nil {
		return im.fileSize
	}
	// qemu counts a QCOW disk in 512-byte sectors (total_sectors =
	// size / 512): a header size that is not a multiple of 512 is rounded
	// down, and the bytes past it can be neither read nor written.
	return int64(im.h.size) &^ 511
}

// Format returns the image format.
func (im *Image) Format() Format { return im.format }

// Backing returns the backing image, or nil.
func (im *Image) Backing() *Image { return im.backing }

// Name returns the name the image was opened with.
func (im *Image) Name() string { return im.name }

// ClusterSize returns the cluster size in bytes (0 for raw images).
func (im *Image) ClusterSize() int64 { return im.clusterSize }

// Close closes the image and its backing chain.
func (im *Image) Close() error {
	im.mu.Lock()
	if im.closed {
		im.mu.Unlock()
		return ErrClosed
	}
	im.closed = true
	im.mu.Unlock()
	var err error
	if im.w != nil {
		err = im.w.close() // flushes
	}
	if im.backing != nil {
		if e := im.backing.Close(); err == nil {
			err = e
		}
	}
	im.event(EventClose)
	if e := im.closeData(); err == nil {
		err = e
	}
	return err
}

func (im *Image) closeData() error {
	var err error
	if im.dataFile != nil && im.dataFile != im.f {
		err = im.dataFile.Close()
	}
	if e := im.f.Close(); err == nil {
		err = e
	}
	return err
}
