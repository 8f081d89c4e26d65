// Package hostile builds small QCOW images in Go — valid bases and hostile
// variants of them — for the reader's hostile-input tests, the CLI's
// hostile-input tests and the fuzz seed corpus.
//
// Nothing here is made by qemu: every image is assembled byte by byte from
// a description (QCOW2, QCOW1), and the builder reports where it put each
// structure (Layout) so that a variant can poke exactly one field.
package hostile

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"fmt"
	"sort"

	"github.com/klauspost/compress/zstd"
)

// Header extension types of QCOW2.
const (
	ExtBackingFormat = 0xE2792ACA
	ExtFeatureTable  = 0x6803F857
	ExtCrypto        = 0x0537BE77
	ExtDataFile      = 0x44415441
)

// Cluster is the content of one guest cluster.
type Cluster struct {
	Index int64  // guest cluster index
	Data  []byte // contents, at most one cluster (the rest reads as zeros)
}

// QCOW2 describes a small valid QCOW2 image (version 2 or 3).
type QCOW2 struct {
	Version      uint32 // 2 or 3
	ClusterBits  uint32 // 9..21 (>= 14 with ExtendedL2)
	RefcountBits uint32 // version 3 only: 1, 2, 4, ..., 64 (0 means 16, which version 2 implies)
	HeaderLength uint32 // version 3: 104 or 112 (0 means 112)
	Size         uint64 // virtual size in bytes
	ExtendedL2   bool
	Zstd         bool // compress with zstd (compression_type 1) instead of deflate

	Data       []Cluster // normal data clusters
	Compressed []Cluster // compressed clusters (packed byte-granular)
	Zero       []int64   // guest clusters that read as zeros (version 3)

	BackingFile   string
	BackingFormat string // written as the backing format extension if non-empty
	FeatureTable  int    // number of feature-name-table entries (0 none, max 8)
	Snapshot      bool   // add one internal snapshot that shares every cluster
}

// Layout records where the builder placed each structure of an image, so
// that variants can mutate one field at a known offset.
type Layout struct {
	ClusterSize int64
	HeaderLen   int64
	// Exts maps a header extension type to the offset of its 8-byte record
	// header (type, length).
	Exts       map[uint32]int64
	ExtEnd     int64 // offset of the end-of-extensions record
	BackingOff int64 // offset of the backing file name (0: none)

	RTOff  int64   // refcount table
	RBOffs []int64 // refcount blocks
	L1Off  int64
	L1Size int
	L2Offs []int64 // L2 table by L1 index (0: none)

	// Entry maps a guest cluster index to the file offset of its L2 entry
	// (QCOW2: the first word; the bitmap follows with extended L2).
	Entry map[int64]int64
	// Host maps a guest data cluster to its host offset.
	Host map[int64]int64
	// CompOff maps a compressed guest cluster to the host offset of its
	// compressed bytes, CompLen to their length.
	CompOff map[int64]int64
	CompLen map[int64]int64

	SnapOff   int64 // snapshot table (0: none)
	SnapL1Off int64 // the snapshot's L1 table
}

// Built is an image and its layout.
type Built struct {
	Bytes []byte
	Layout
}

// Clone returns a copy of b's bytes that a variant may mutate.
func (b *Built) Clone() []byte { return append([]byte(nil), b.Bytes...) }

// Pattern returns n bytes of printable text that identify tag and guest
// cluster idx. The text has a short period, so deflate back-references
// stay within qemu's 4 KiB window.
func Pattern(tag string, idx int64, n int) []byte {
	unit := []byte(fmt.Sprintf("%s:%d|", tag, idx))
	out := bytes.Repeat(unit, n/len(unit)+1)
	return out[:n]
}

// Deflate returns data compressed as a raw deflate stream.
func Deflate(data []byte) []byte {
	var buf bytes.Buffer
	w, err := flate.NewWriter(&buf, flate.BestCompression)
	if err != nil {
		panic(err) // only for an invalid level
	}
	w.Write(data)
	w.Close()
	return buf.Bytes()
}

// Zstd returns data compressed as one zstd frame.
func Zstd(data []byte) []byte {
	// A small window and the default level keep the encoder's own memory
	// (and so the test process's peak RSS, which children inherit in
	// their rusage) low.
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(1<<16), zstd.WithLowerEncoderMem(true))
	if err != nil {
		panic(err) // only for invalid options
	}
	defer enc.Close()
	return enc.EncodeAll(data, nil)
}

// featureNames is the feature-name table qemu writes, in its order.
var featureNames = []struct {
	typ, bit byte
	name     string
}{
	{0, 0, "dirty bit"}, {0, 1, "corrupt bit"}, {0, 2, "external data file"},
	{0, 3, "compression type"}, {0, 4, "extended L2 entries"},
	{1, 0, "lazy refcounts"}, {2, 0, "bitmaps"}, {2, 1, "raw external data"},
}

// image is a growing file with a per-cluster reference count.
type image struct {
	cs   int64
	buf  []byte
	refs []uint64
}

func (m *image) alloc(n int64) int64 {
	off := int64(len(m.buf))
	off = (off + m.cs - 1) / m.cs * m.cs
	m.grow(off + n)
	for c := off / m.cs; c*m.cs < off+n; c++ {
		m.ref(c)
	}
	return off
}

func (m *image) grow(end int64) {
	if end > int64(len(m.buf)) {
		m.buf = append(m.buf, make([]byte, end-int64(len(m.buf)))...)
	}
}

func (m *image) ref(c int64) {
	for int64(len(m.refs)) <= c {
		m.refs = append(m.refs, 0)
	}
	m.refs[c]++
}

func (m *image) put64(off int64, v uint64) { binary.BigEndian.PutUint64(m.buf[off:], v) }
func (m *image) put32(off int64, v uint32) { binary.BigEndian.PutUint32(m.buf[off:], v) }
func (m *image) put16(off int64, v uint16) { binary.BigEndian.PutUint16(m.buf[off:], v) }

// Build assembles the image. Placement: cluster 0 header, extensions and
// backing name; cluster 1 the refcount table; then the refcount blocks, L2
// tables, data clusters, packed compressed data, the snapshot table and the
// snapshot's L1; the active L1 table comes last and the file ends right
// after it (not on a cluster boundary), which keeps images small.
func (q QCOW2) Build() (*Built, error) {
	if q.Version != 2 && q.Version != 3 {
		return nil, fmt.Errorf("hostile: version %d", q.Version)
	}
	if q.ClusterBits < 9 || q.ClusterBits > 21 || (q.ExtendedL2 && q.ClusterBits < 14) {
		return nil, fmt.Errorf("hostile: cluster_bits %d", q.ClusterBits)
	}
	if q.RefcountBits == 0 {
		q.RefcountBits = 16
	}
	if q.Version == 2 && (q.ExtendedL2 || len(q.Zero) > 0 || q.RefcountBits != 16) {
		return nil, fmt.Errorf("hostile: version 2 cannot have extended L2, zero clusters or %d-bit refcounts", q.RefcountBits)
	}
	order := uint32(0)
	for 1<<order < q.RefcountBits {
		order++
	}
	if 1<<order != q.RefcountBits || order > 6 {
		return nil, fmt.Errorf("hostile: %d-bit refcounts", q.RefcountBits)
	}
	hlen := int64(72)
	if q.Version == 3 {
		hlen = int64(q.HeaderLength)
		if hlen == 0 {
			hlen = 112
		}
		if hlen != 104 && hlen != 112 {
			return nil, fmt.Errorf("hostile: header_length %d", hlen)
		}
	}
	if q.Zstd && (q.Version != 3 || hlen < 112) {
		return nil, fmt.Errorf("hostile: zstd needs version 3 and header_length 112")
	}
	cs := int64(1) << q.ClusterBits
	entrySize := int64(8)
	if q.ExtendedL2 {
		entrySize = 16
	}
	l2Entries := cs / entrySize
	perL1 := cs * l2Entries
	l1Size := int((int64(q.Size) + perL1 - 1) / perL1)
	m := &image{cs: cs}
	L := Layout{ClusterSize: cs, HeaderLen: hlen, Exts: map[uint32]int64{},
		Entry: map[int64]int64{}, Host: map[int64]int64{}, CompOff: map[int64]int64{}, CompLen: map[int64]int64{}}

	// Cluster 0: header, extensions, backing name.
	m.alloc(cs)
	off := hlen
	addExt := func(typ uint32, data []byte) error {
		if off+8+int64(len(data)+7)&^7 > cs-8 {
			return fmt.Errorf("hostile: header extensions overflow cluster 0")
		}
		L.Exts[typ] = off
		m.put32(off, typ)
		m.put32(off+4, uint32(len(data)))
		copy(m.buf[off+8:], data)
		off += 8 + int64(len(data)+7)&^7
		return nil
	}
	if q.BackingFormat != "" {
		if err := addExt(ExtBackingFormat, []byte(q.BackingFormat)); err != nil {
			return nil, err
		}
	}
	if q.FeatureTable > 0 {
		var ft []byte
		for _, f := range featureNames[:min(q.FeatureTable, len(featureNames))] {
			e := make([]byte, 48)
			e[0], e[1] = f.typ, f.bit
			copy(e[2:], f.name)
			ft = append(ft, e...)
		}
		if err := addExt(ExtFeatureTable, ft); err != nil {
			return nil, err
		}
	}
	L.ExtEnd = off
	off += 8 // end marker: type 0, length 0
	if q.BackingFile != "" {
		if off+int64(len(q.BackingFile)) > cs {
			return nil, fmt.Errorf("hostile: backing name does not fit in cluster 0")
		}
		L.BackingOff = off
		copy(m.buf[off:], q.BackingFile)
	}

	// Refcount table, then the blocks (sized after everything else).
	L.RTOff = m.alloc(cs)

	// Count the other clusters first to size the refcount blocks.
	l2Needed := map[int]bool{}
	guest := func(idx int64) error {
		if idx < 0 || idx*cs >= int64(q.Size) {
			return fmt.Errorf("hostile: guest cluster %d outside the disk", idx)
		}
		l2Needed[int(idx/l2Entries)] = true
		return nil
	}
	for _, c := range q.Data {
		if err := guest(c.Index); err != nil {
			return nil, err
		}
	}
	for _, c := range q.Compressed {
		if err := guest(c.Index); err != nil {
			return nil, err
		}
	}
	for _, z := range q.Zero {
		if err := guest(z); err != nil {
			return nil, err
		}
	}
	comp := make([][]byte, len(q.Compressed))
	compBytes := int64(0)
	for i, c := range q.Compressed {
		if q.Zstd {
			comp[i] = Zstd(c.Data)
		} else {
			comp[i] = Deflate(c.Data)
		}
		compBytes += int64(len(comp[i]))
	}
	other := int64(len(l2Needed)+len(q.Data)) + compBytes/cs + 2 + (int64(l1Size)*8+cs-1)/cs + 1
	if q.Snapshot {
		other += 1 + (int64(l1Size)*8+cs-1)/cs
	}
	refBits := int64(q.RefcountBits)
	perBlock := cs * 8 / refBits
	nb := int64(1)
	for (2+nb+other+perBlock-1)/perBlock > nb {
		nb++
	}
	if nb > cs/8 {
		return nil, fmt.Errorf("hostile: image too large for one refcount table cluster")
	}
	for i := int64(0); i < nb; i++ {
		L.RBOffs = append(L.RBOffs, m.alloc(cs))
	}

	// L2 tables.
	L.L1Size = l1Size
	L.L2Offs = make([]int64, l1Size)
	var l1Idx []int
	for i := range l2Needed {
		l1Idx = append(l1Idx, i)
	}
	sort.Ints(l1Idx)
	for _, i := range l1Idx {
		L.L2Offs[i] = m.alloc(cs)
	}
	entryAt := func(idx int64) int64 {
		at := L.L2Offs[idx/l2Entries] + idx%l2Entries*entrySize
		L.Entry[idx] = at
		return at
	}
	type pending struct {
		at   int64
		word uint64
		bmap uint64
		host int64 // host cluster index whose refcount decides COPIED, -1 none
	}
	var entries []pending

	// Data clusters.
	for _, c := range q.Data {
		if int64(len(c.Data)) > cs {
			return nil, fmt.Errorf("hostile: data for guest cluster %d exceeds the cluster size", c.Index)
		}
		h := m.alloc(cs)
		copy(m.buf[h:], c.Data)
		L.Host[c.Index] = h
		var bm uint64
		if q.ExtendedL2 {
			bm = 0xffffffff
		}
		entries = append(entries, pending{at: entryAt(c.Index), word: uint64(h), bmap: bm, host: h / cs})
	}
	// Zero clusters.
	for _, z := range q.Zero {
		if q.ExtendedL2 {
			entries = append(entries, pending{at: entryAt(z), bmap: 0xffffffff << 32, host: -1})
		} else {
			entries = append(entries, pending{at: entryAt(z), word: 1, host: -1})
		}
	}
	// Compressed clusters, packed from a cluster boundary.
	if len(q.Compressed) > 0 {
		start := m.alloc(0)
		cur := start
		cb := uint64(q.ClusterBits)
		x := 70 - cb
		for i, c := range q.Compressed {
			d := comp[i]
			if int64(len(d)) >= cs {
				return nil, fmt.Errorf("hostile: guest cluster %d does not compress", c.Index)
			}
			m.grow(cur + int64(len(d)))
			copy(m.buf[cur:], d)
			for hc := cur / cs; hc*cs < cur+int64(len(d)); hc++ {
				m.ref(hc)
			}
			L.CompOff[c.Index] = cur
			L.CompLen[c.Index] = int64(len(d))
			nsect := uint64((cur+int64(len(d))-1)/512 - cur/512)
			word := 1<<62 | nsect<<x | uint64(cur)
			entries = append(entries, pending{at: entryAt(c.Index), word: word, host: -1})
			cur += int64(len(d))
		}
	}

	// Snapshot: table, then its L1 (a copy of the active one).
	var snapEntry []byte
	if q.Snapshot {
		L.SnapOff = m.alloc(0)
		e := make([]byte, 40)
		id, name := "1", "snap"
		extra := make([]byte, 16)
		binary.BigEndian.PutUint64(extra[8:], q.Size)
		binary.BigEndian.PutUint32(e[8:], uint32(l1Size))
		binary.BigEndian.PutUint16(e[12:], uint16(len(id)))
		binary.BigEndian.PutUint16(e[14:], uint16(len(name)))
		binary.BigEndian.PutUint32(e[16:], 1700000000)
		binary.BigEndian.PutUint32(e[36:], uint32(len(extra)))
		e = append(e, extra...)
		e = append(e, id...)
		e = append(e, name...)
		for len(e)%8 != 0 {
			e = append(e, 0)
		}
		snapEntry = e
		m.alloc(int64(len(e)))
		L.SnapL1Off = m.alloc(int64(l1Size) * 8)
		binary.BigEndian.PutUint64(snapEntry, uint64(L.SnapL1Off))
		copy(m.buf[L.SnapOff:], snapEntry)
		// The snapshot references every L2 table and, through them, every
		// data cluster a second time.
		for _, i := range l1Idx {
			m.ref(L.L2Offs[i] / cs)
		}
		for _, p := range entries {
			if p.host >= 0 {
				m.ref(p.host)
			}
		}
		for _, c := range q.Compressed {
			o, n := L.CompOff[c.Index], L.CompLen[c.Index]
			for hc := o / cs; hc*cs < o+n; hc++ {
				m.ref(hc)
			}
		}
	}

	// Active L1, last; the file ends right after it.
	L.L1Off = m.alloc(int64(l1Size) * 8)
	if l1Size == 0 {
		L.L1Off = 0
	}

	// Now fill in the entries, with COPIED where the refcount is exactly 1.
	for _, p := range entries {
		w := p.word
		if p.host >= 0 && m.refs[p.host] == 1 {
			w |= 1 << 63
		}
		m.put64(p.at, w)
		if q.ExtendedL2 {
			m.put64(p.at+8, p.bmap)
		}
	}
	for _, i := range l1Idx {
		w := uint64(L.L2Offs[i])
		if q.Snapshot {
			m.put64(L.SnapL1Off+int64(i)*8, w)
		}
		if m.refs[L.L2Offs[i]/cs] == 1 {
			w |= 1 << 63
		}
		m.put64(L.L1Off+int64(i)*8, w)
	}

	// Refcounts.
	if int64(len(m.refs)) > nb*perBlock {
		return nil, fmt.Errorf("hostile: refcount blocks undersized")
	}
	for i, rb := range L.RBOffs {
		m.put64(L.RTOff+int64(i)*8, uint64(rb))
	}
	for c, r := range m.refs {
		blk := L.RBOffs[int64(c)/perBlock]
		setRefcount(m.buf[blk:blk+cs], int64(c)%perBlock, order, r)
	}

	// Header.
	m.put32(0, 0x514649FB)
	m.put32(4, q.Version)
	if q.BackingFile != "" {
		m.put64(8, uint64(L.BackingOff))
		m.put32(16, uint32(len(q.BackingFile)))
	}
	m.put32(20, q.ClusterBits)
	m.put64(24, q.Size)
	m.put32(36, uint32(l1Size))
	m.put64(40, uint64(L.L1Off))
	m.put64(48, uint64(L.RTOff))
	m.put32(56, 1)
	if q.Snapshot {
		m.put32(60, 1)
		m.put64(64, uint64(L.SnapOff))
	}
	if q.Version == 3 {
		var incompat uint64
		if q.ExtendedL2 {
			incompat |= 1 << 4
		}
		if q.Zstd {
			incompat |= 1 << 3
			m.buf[104] = 1
		}
		m.put64(72, incompat)
		m.put32(96, order)
		m.put32(100, uint32(hlen))
	}
	return &Built{Bytes: m.buf, Layout: L}, nil
}

// setRefcount stores refcount r for entry i of a refcount block with
// 2^order-bit entries (sub-byte widths packed LSB first, wider ones
// big-endian).
func setRefcount(blk []byte, i int64, order uint32, r uint64) {
	bits := int64(1) << order
	switch {
	case bits < 8:
		byteIdx, shift := i*bits/8, uint(i*bits%8)
		mask := byte(1<<bits-1) << shift
		blk[byteIdx] = blk[byteIdx]&^mask | byte(r)<<shift&mask
	case bits == 8:
		blk[i] = byte(r)
	case bits == 16:
		binary.BigEndian.PutUint16(blk[i*2:], uint16(r))
	case bits == 32:
		binary.BigEndian.PutUint32(blk[i*4:], uint32(r))
	default:
		binary.BigEndian.PutUint64(blk[i*8:], r)
	}
}

// QCOW1 describes a small valid QCOW version 1 image.
type QCOW1 struct {
	ClusterBits uint32 // 9..16
	L2Bits      uint32 // 6..13
	Size        uint64
	Data        []Cluster
	Compressed  []Cluster
	BackingFile string
}

// Build assembles the image the way qemu lays one out: the 48-byte header,
// the backing name, the L1 table at the next multiple of 8, then L2 tables
// and data clusters at cluster boundaries, and compressed data packed at
// the end.
func (q QCOW1) Build() (*Built, error) {
	if q.ClusterBits < 9 || q.ClusterBits > 16 || q.L2Bits < 6 || q.L2Bits > 13 {
		return nil, fmt.Errorf("hostile: cluster_bits %d l2_bits %d", q.ClusterBits, q.L2Bits)
	}
	cs := int64(1) << q.ClusterBits
	l2Entries := int64(1) << q.L2Bits
	shift := q.ClusterBits + q.L2Bits
	l1Size := int((q.Size + 1<<shift - 1) >> shift)
	m := &image{cs: cs}
	L := Layout{ClusterSize: cs, HeaderLen: 48, Exts: map[uint32]int64{},
		Entry: map[int64]int64{}, Host: map[int64]int64{}, CompOff: map[int64]int64{}, CompLen: map[int64]int64{}}
	m.grow(48)
	if q.BackingFile != "" {
		L.BackingOff = 48
		m.grow(48 + int64(len(q.BackingFile)))
		copy(m.buf[48:], q.BackingFile)
	}
	L.L1Off = (int64(len(m.buf)) + 7) &^ 7
	L.L1Size = l1Size
	m.grow(L.L1Off + int64(l1Size)*8)
	L.L2Offs = make([]int64, l1Size)
	l2For := func(idx int64) (int64, error) {
		if idx < 0 || idx*cs >= int64(q.Size) {
			return 0, fmt.Errorf("hostile: guest cluster %d outside the disk", idx)
		}
		i := idx / l2Entries
		if L.L2Offs[i] == 0 {
			L.L2Offs[i] = m.alloc(l2Entries * 8)
			m.put64(L.L1Off+i*8, uint64(L.L2Offs[i]))
		}
		at := L.L2Offs[i] + idx%l2Entries*8
		L.Entry[idx] = at
		return at, nil
	}
	for _, c := range q.Data {
		at, err := l2For(c.Index)
		if err != nil {
			return nil, err
		}
		h := m.alloc(cs)
		copy(m.buf[h:], c.Data)
		L.Host[c.Index] = h
		m.put64(at, uint64(h))
	}
	// L2 tables for compressed clusters first, so the data packs at the end.
	for _, c := range q.Compressed {
		if _, err := l2For(c.Index); err != nil {
			return nil, err
		}
	}
	cur := int64(len(m.buf))
	for _, c := range q.Compressed {
		d := Deflate(c.Data)
		if int64(len(d)) >= cs {
			return nil, fmt.Errorf("hostile: guest cluster %d does not compress", c.Index)
		}
		m.grow(cur + int64(len(d)))
		copy(m.buf[cur:], d)
		L.CompOff[c.Index], L.CompLen[c.Index] = cur, int64(len(d))
		m.put64(L.Entry[c.Index], 1<<63|uint64(len(d))<<(63-q.ClusterBits)|uint64(cur))
		cur += int64(len(d))
	}
	m.put32(0, 0x514649FB)
	m.put32(4, 1)
	if q.BackingFile != "" {
		m.put64(8, 48)
		m.put32(16, uint32(len(q.BackingFile)))
	}
	m.put64(24, q.Size)
	m.buf[32] = byte(q.ClusterBits)
	m.buf[33] = byte(q.L2Bits)
	m.put64(40, uint64(L.L1Off))
	return &Built{Bytes: m.buf, Layout: L}, nil
}
