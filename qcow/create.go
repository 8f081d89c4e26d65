package qcow

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
	"path/filepath"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// CreateOptions configure Create. The zero value (with a Size) makes a QCOW2
// version 3 image with 64 KiB clusters and 16-bit refcounts, like
// `qemu-img create -f qcow2`.
type CreateOptions struct {
	// Format is FormatQCOW2 (the default) or FormatQCOW (version 1).
	Format Format
	// Version is the QCOW2 version: 3 (compat=1.1, the default) or 2
	// (compat=0.10). Ignored for FormatQCOW.
	Version int
	// Size is the virtual size in bytes, rounded up to a multiple of 512 as
	// qemu-img does. 0 with a backing file takes the backing file's size.
	Size int64
	// ClusterSize is a power of two: for QCOW2 512 B..2 MiB (default
	// 64 KiB); for QCOW 512 B..64 KiB, with L2 tables of one cluster (0
	// chooses qemu's defaults: 4 KiB clusters and 512-entry L2 tables, or
	// 512 B clusters and 4096-entry tables with a backing file).
	ClusterSize int64
	// RefcountBits is the refcount width, a power of two 1..64 (default
	// 16; version 2 supports only 16). QCOW2 only.
	RefcountBits int
	// LazyRefcounts sets the lazy refcounts compatible feature (version 3
	// only). The writer of this package accepts it but always writes
	// refcounts.
	LazyRefcounts bool
	// BackingFile names the backing file, relative to the new image's
	// directory unless absolute. It is not opened unless Size is 0.
	BackingFile string
	// BackingFormat records the backing file's format ("raw", "qcow" or
	// "qcow2"; QCOW2 only). Empty means probe by magic when opening.
	BackingFormat string
}

// Create makes a new, empty image called name in fsys. It fails with an
// error wrapping fs.ErrExist when name exists.
//
// Creation is crash safe: a crash leaves either no image or a valid empty
// one, never a partial image under name. When fsys implements vfs.Renamer
// the image is written under a temporary name in the same directory,
// fsynced, renamed over name and the directory fsynced. Otherwise it is
// created under name with its magic number zeroed (so that it is not a
// QCOW image until complete), written, fsynced, then the magic written and
// fsynced, and the directory fsynced.
//
// QCOW2 images are laid out as qemu lays them out: the header (with the
// backing format and, for version 3 with clusters above 4 KiB, the feature
// name table as header extensions, and the backing file name after them)
// in cluster 0, then the refcount table, the refcount blocks and the L1
// table; every cluster has refcount 1. QCOW images are a 48-byte header,
// the backing file name and an 8-aligned L1 table.
func Create(fsys vfs.FS, name string, o CreateOptions) error {
	img, err := buildImage(fsys, name, o)
	if err != nil {
		return fmt.Errorf("qcow: create %s: %w", name, err)
	}
	if err := writeNewFile(fsys, name, img); err != nil {
		return fmt.Errorf("qcow: create %s: %w", name, err)
	}
	return nil
}

// newImage is the content of a new image: non-zero parts and the file size
// (everything else reads as zeros).
type newImage struct {
	size  int64
	parts []imagePart
}

type imagePart struct {
	off  int64
	data []byte
}

// buildImage validates o and lays out the new image.
func buildImage(fsys vfs.FS, name string, o CreateOptions) (*newImage, error) {
	if o.Size < 0 {
		return nil, fmt.Errorf("negative size %d", o.Size)
	}
	if o.BackingFile != "" {
		if len(o.BackingFile) > MaxBackingNameLen {
			return nil, fmt.Errorf("%w: backing file name of %d bytes exceeds %d", ErrLimit, len(o.BackingFile), MaxBackingNameLen)
		}
		if err := checkFileName("backing file", o.BackingFile); err != nil {
			return nil, err
		}
	}
	if o.Size == 0 && o.BackingFile != "" {
		size, err := backingSize(fsys, name, o)
		if err != nil {
			return nil, err
		}
		o.Size = size
	}
	if o.Size > 1<<62 {
		return nil, fmt.Errorf("%w: size %d is too large", ErrLimit, o.Size)
	}
	o.Size = (o.Size + 511) &^ 511
	switch o.Format {
	case "", FormatQCOW2:
		return buildQCOW2(o)
	case FormatQCOW:
		return buildQCOW1(o)
	}
	return nil, fmt.Errorf("%w: cannot create format %q", ErrUnsupported, o.Format)
}

// backingSize opens the backing file to take its size.
func backingSize(fsys vfs.FS, name string, o CreateOptions) (int64, error) {
	bname := o.BackingFile
	if !filepath.IsAbs(bname) {
		bname = filepath.Join(filepath.Dir(name), bname)
	}
	var f Format
	switch o.BackingFormat {
	case "":
	case "raw":
		f = FormatRaw
	case "qcow":
		f = FormatQCOW
	case "qcow2":
		f = FormatQCOW2
	default:
		return 0, fmt.Errorf("%w: backing format %q", ErrUnsupported, o.BackingFormat)
	}
	b, err := Open(fsys, bname, &Options{Format: f})
	if err != nil {
		return 0, fmt.Errorf("backing file %q: %w", o.BackingFile, err)
	}
	defer b.Close()
	return b.Size(), nil
}

// log2 returns log2(v) when v is a power of two, else -1.
func log2(v int64) int {
	if v <= 0 || v&(v-1) != 0 {
		return -1
	}
	return bits.TrailingZeros64(uint64(v))
}

func buildQCOW2(o CreateOptions) (*newImage, error) {
	version := o.Version
	if version == 0 {
		version = 3
	}
	if version != 2 && version != 3 {
		return nil, fmt.Errorf("%w: QCOW2 version %d (want 2 or 3)", ErrUnsupported, version)
	}
	cs := o.ClusterSize
	if cs == 0 {
		cs = 64 << 10
	}
	cb := log2(cs)
	if cb < 9 || cb > 21 {
		return nil, fmt.Errorf("cluster size %d is not a power of two between 512 and 2097152", cs)
	}
	rb := o.RefcountBits
	if rb == 0 {
		rb = 16
	}
	order := log2(int64(rb))
	if order < 0 || order > 6 {
		return nil, fmt.Errorf("refcount bits %d is not a power of two between 1 and 64", rb)
	}
	if version == 2 && rb != 16 {
		return nil, fmt.Errorf("%w: refcount bits %d needs version 3 (compat=1.1); version 2 has 16", ErrUnsupported, rb)
	}
	if version == 2 && o.LazyRefcounts {
		return nil, fmt.Errorf("%w: lazy refcounts need version 3 (compat=1.1)", ErrUnsupported)
	}
	switch o.BackingFormat {
	case "", "raw", "qcow", "qcow2":
	default:
		return nil, fmt.Errorf("%w: backing format %q (want raw, qcow or qcow2)", ErrUnsupported, o.BackingFormat)
	}
	if o.BackingFormat != "" && o.BackingFile == "" {
		return nil, errors.New("a backing format without a backing file")
	}

	// Header cluster.
	hdr, err := qcow2Header(version, cb, order, o)
	if err != nil {
		return nil, err
	}

	// L1 table.
	perL1 := cs * (cs / 8)
	l1Size := (o.Size + perL1 - 1) / perL1
	if l1Size > MaxL1Bytes/8 {
		return nil, fmt.Errorf("%w: size %d needs an L1 table of %d entries (limit %d); use bigger clusters", ErrLimit, o.Size, l1Size, MaxL1Bytes/8)
	}
	l1Clusters := (l1Size*8 + cs - 1) / cs

	// Refcount table and blocks for header + table + blocks + L1.
	g := refGeom{clusterBits: uint32(cb), order: uint32(order)}
	a, err := planRefcountArea(g, 0, 1, l1Clusters, 0, func(int64) bool { return false }, false)
	if err != nil {
		return nil, err
	}
	nt, nb := a.tableClusters, int64(len(a.blocks))
	rtOff := cs
	rbOff := rtOff + nt*cs
	l1Off := rbOff + nb*cs
	total := 1 + nt + nb + l1Clusters // clusters in use

	binary.BigEndian.PutUint64(hdr[48:], uint64(rtOff))
	binary.BigEndian.PutUint32(hdr[56:], uint32(nt))
	binary.BigEndian.PutUint32(hdr[36:], uint32(l1Size))
	if l1Size > 0 {
		binary.BigEndian.PutUint64(hdr[40:], uint64(l1Off))
	}
	img := &newImage{parts: []imagePart{{0, hdr}}}

	rt := make([]uint64, nt*cs/8)
	for k, bi := range a.blocks {
		rt[bi] = uint64(rbOff + int64(k)*cs)
	}
	img.parts = append(img.parts, imagePart{rtOff, encodeTable(rt)})
	blocks := make([]byte, nb*cs)
	for c := int64(0); c < total; c++ {
		bi := c >> g.blockShift()
		setRefcountAt(blocks[bi*cs:(bi+1)*cs], g.order, c&(g.perBlock()-1), 1)
	}
	img.parts = append(img.parts, imagePart{rbOff, blocks})
	// Like qemu, the file ends with the L1 table's last entry.
	img.size = l1Off + l1Size*8
	if l1Size == 0 {
		img.size = l1Off
	}
	return img, nil
}

// featureTable is the feature name table qemu writes into version 3 images.
var featureTable = []FeatureName{
	{0, 0, "dirty bit"},
	{0, 1, "corrupt bit"},
	{0, 2, "external data file"},
	{0, 3, "compression type"},
	{0, 4, "extended L2 entries"},
	{1, 0, "lazy refcounts"},
	{2, 0, "bitmaps"},
	{2, 1, "raw external data"},
}

// qcow2Header encodes cluster 0 of a new QCOW2 image without the table
// locations (filled in by the caller).
func qcow2Header(version, cb, order int, o CreateOptions) ([]byte, error) {
	cs := 1 << cb
	hdr := make([]byte, cs)
	binary.BigEndian.PutUint32(hdr[0:], Magic)
	binary.BigEndian.PutUint32(hdr[4:], uint32(version))
	binary.BigEndian.PutUint32(hdr[20:], uint32(cb))
	binary.BigEndian.PutUint64(hdr[24:], uint64(o.Size))
	hlen := v2HeaderLen
	if version == 3 {
		hlen = v3HeaderLen + 8 // compression_type and padding, as qemu writes
		if o.LazyRefcounts {
			binary.BigEndian.PutUint64(hdr[80:], CompatLazyRefcounts)
		}
		binary.BigEndian.PutUint32(hdr[96:], uint32(order))
		binary.BigEndian.PutUint32(hdr[100:], uint32(hlen))
	}
	// Header extensions, then the backing file name.
	ext := hdr[:hlen]
	add := func(typ uint32, data []byte) {
		ext = binary.BigEndian.AppendUint32(ext, typ)
		ext = binary.BigEndian.AppendUint32(ext, uint32(len(data)))
		ext = append(ext, data...)
		for len(ext)%8 != 0 {
			ext = append(ext, 0)
		}
	}
	if o.BackingFormat != "" {
		add(extBackingFormat, []byte(o.BackingFormat))
	}
	if version == 3 && cs > 4096 {
		// qemu leaves the table out for clusters of 4 KiB and less.
		var ft []byte
		for _, f := range featureTable {
			e := make([]byte, 48)
			e[0], e[1] = byte(f.Type), byte(f.Bit)
			copy(e[2:], f.Name)
			ft = append(ft, e...)
		}
		add(extFeatureTable, ft)
	}
	add(extEnd, nil)
	if o.BackingFile != "" {
		if len(ext)+len(o.BackingFile) > cs {
			return nil, fmt.Errorf("backing file name of %d bytes does not fit in the %d-byte header cluster", len(o.BackingFile), cs)
		}
		binary.BigEndian.PutUint64(hdr[8:], uint64(len(ext)))
		binary.BigEndian.PutUint32(hdr[16:], uint32(len(o.BackingFile)))
		ext = append(ext, o.BackingFile...)
	}
	if len(ext) > cs {
		return nil, fmt.Errorf("header extensions of %d bytes do not fit in the %d-byte header cluster", len(ext), cs)
	}
	copy(hdr, ext) // ext grew in place inside hdr unless it reallocated
	return hdr, nil
}

func buildQCOW1(o CreateOptions) (*newImage, error) {
	if o.BackingFormat != "" {
		return nil, fmt.Errorf("%w: QCOW version 1 stores no backing format", ErrUnsupported)
	}
	if o.LazyRefcounts || o.RefcountBits != 0 || o.Version != 0 {
		return nil, fmt.Errorf("%w: QCOW version 1 has no version, refcount or lazy refcount options", ErrUnsupported)
	}
	if o.Size < 512 {
		return nil, fmt.Errorf("QCOW version 1 images need a size of at least 512 bytes (got %d)", o.Size)
	}
	cb, l2b := 12, 9
	if o.BackingFile != "" {
		cb, l2b = 9, 12
	}
	if o.ClusterSize != 0 {
		cb = log2(o.ClusterSize)
		if cb < 9 || cb > 16 {
			return nil, fmt.Errorf("cluster size %d is not a power of two between 512 and 65536", o.ClusterSize)
		}
		l2b = cb - 3
	}
	shift := uint(cb + l2b)
	l1Size := (o.Size + 1<<shift - 1) >> shift
	if l1Size > MaxL1Bytes/8 {
		return nil, fmt.Errorf("%w: size %d needs an L1 table of %d entries (limit %d)", ErrLimit, o.Size, l1Size, MaxL1Bytes/8)
	}
	hdr := make([]byte, v1HeaderLen, v1HeaderLen+len(o.BackingFile))
	binary.BigEndian.PutUint32(hdr[0:], Magic)
	binary.BigEndian.PutUint32(hdr[4:], 1)
	binary.BigEndian.PutUint64(hdr[24:], uint64(o.Size))
	hdr[32], hdr[33] = byte(cb), byte(l2b)
	if o.BackingFile != "" {
		binary.BigEndian.PutUint64(hdr[8:], v1HeaderLen)
		binary.BigEndian.PutUint32(hdr[16:], uint32(len(o.BackingFile)))
		hdr = append(hdr, o.BackingFile...)
	}
	l1Off := (int64(len(hdr)) + 7) &^ 7
	binary.BigEndian.PutUint64(hdr[40:], uint64(l1Off))
	// qemu writes the L1 table as whole 512-byte sectors of zeros.
	return &newImage{size: l1Off + (l1Size*8+511)&^511, parts: []imagePart{{0, hdr}}}, nil
}

// writeNewFile writes img as name, crash-safely (see Create).
func writeNewFile(fsys vfs.FS, name string, img *newImage) error {
	if _, err := fsys.Stat(name); err == nil {
		return &fs.PathError{Op: "create", Path: name, Err: fs.ErrExist}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	dir := filepath.Dir(name)
	r, rename := fsys.(vfs.Renamer)
	target := name
	if rename {
		var rnd [6]byte
		if _, err := rand.Read(rnd[:]); err != nil {
			return err
		}
		target = filepath.Join(dir, "."+filepath.Base(name)+".tmp-"+hex.EncodeToString(rnd[:]))
	}
	f, err := fsys.Create(target)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		f.Close()
		fsys.Remove(target)
		return err
	}
	var magic [4]byte
	for _, p := range img.parts {
		data := p.data
		if !rename && p.off == 0 {
			// The magic comes last: until then this is not a QCOW image.
			copy(magic[:], data)
			data = append([]byte{0, 0, 0, 0}, data[4:]...)
		}
		if _, err := f.WriteAt(data, p.off); err != nil {
			return fail(err)
		}
	}
	if err := f.Truncate(img.size); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if !rename {
		if _, err := f.WriteAt(magic[:], 0); err != nil {
			return fail(err)
		}
		if err := f.Sync(); err != nil {
			return fail(err)
		}
	}
	if err := f.Close(); err != nil {
		fsys.Remove(target)
		return err
	}
	if rename {
		if err := r.Rename(target, name); err != nil {
			fsys.Remove(target)
			return err
		}
	}
	return fsys.SyncDir(dir)
}
