package hostile

import (
	"encoding/binary"
	"fmt"
	"sort"
	"strings"
	"sync"
)

// Class names the sentinel error of package qcow that a variant must
// produce. Package hostile does not import qcow (qcow's own tests import
// hostile), so tests map classes to sentinels.
type Class string

// The classes.
const (
	AnyError    Class = ""            // any error
	Format      Class = "format"      // qcow.ErrFormat
	Limit       Class = "limit"       // qcow.ErrLimit
	Unsupported Class = "unsupported" // qcow.ErrUnsupported
	Backing     Class = "backing"     // qcow.ErrBacking
	NotQCOW     Class = "not-qcow"    // qcow.ErrNotQCOW
	NotExist    Class = "not-exist"   // fs.ErrNotExist (a missing file named by the image)
)

// Stage is the latest step at which a variant must be flagged. The steps
// run in order: open, info, read of the whole disk, check; a variant is
// flagged by the first step that returns an error, or by check reporting
// corruption or leaks.
type Stage int

// The stages.
const (
	AtOpen  Stage = iota + 1 // Open fails
	AtInfo                   // Open or Info fails
	AtRead                   // Open, Info or reading the disk fails
	AtCheck                  // any step, possibly only Check, flags it
	// Benign variants are valid images that probe resource bounds (a
	// decompression bomb, the corrupt bit on a read-only open): every
	// step succeeds within the time and memory bounds.
	Benign
)

// String names the stage.
func (s Stage) String() string {
	switch s {
	case AtOpen:
		return "open"
	case AtInfo:
		return "info"
	case AtRead:
		return "read"
	case AtCheck:
		return "check"
	case Benign:
		return "benign"
	}
	return fmt.Sprintf("Stage(%d)", int(s))
}

// Want is what a variant must produce.
type Want struct {
	Stage Stage
	// Class is the sentinel the first error must match.
	Class Class
	// Field, when set, is the *qcow.FormatError field the first error
	// must name; with HasValue, Value is the decimal value it must show.
	Field    string
	Value    uint64
	HasValue bool
	// Text is a substring the first error message must contain.
	Text string
	// Corrupt: Info must report the corrupt bit (that is how the variant
	// is flagged; it must open read-only).
	Corrupt bool
	// ReadOff and ReadData: for benign variants, the bytes the disk must
	// read at ReadOff.
	ReadOff  int64
	ReadData []byte
}

// Variant is one hostile image: a named mutation of a base.
type Variant struct {
	Name   string
	Files  map[string][]byte // every file, by name relative to one directory
	Main   string            // the image to open
	Format string            // "" to probe; else the format to force ("qcow", "qcow2")
	Want   Want
}

var (
	variantsOnce sync.Once
	variants     []Variant
)

// Variants returns the hostile variants, in a stable order. The result is
// shared: do not modify it.
func Variants() []Variant {
	variantsOnce.Do(func() { variants = makeVariants() })
	return variants
}

func be32(b []byte, off int64, v uint32) { binary.BigEndian.PutUint32(b[off:], v) }
func be64(b []byte, off int64, v uint64) { binary.BigEndian.PutUint64(b[off:], v) }
func get64(b []byte, off int64) uint64   { return binary.BigEndian.Uint64(b[off:]) }
func get32(b []byte, off int64) uint32   { return binary.BigEndian.Uint32(b[off:]) }

// fieldErr is the usual expectation: stage, class, field and value.
func fieldErr(s Stage, c Class, field string, v uint64) Want {
	return Want{Stage: s, Class: c, Field: field, Value: v, HasValue: true}
}

// variantOf copies base's files and lets f mutate the main image.
func variantOf(b *Base, name string, want Want, f func(img []byte, L *Layout) []byte) Variant {
	files := map[string][]byte{}
	for k, v := range b.Files {
		files[k] = v
	}
	files[b.Main] = f(b.Built.Clone(), &b.Built.Layout)
	return Variant{Name: b.Name + "/" + name, Files: files, Main: b.Main, Want: want}
}

// setBacking rewrites the backing name of a QCOW2 image in cluster 0 at
// L.BackingOff (or just after the extensions when there is none).
func setBacking(img []byte, L *Layout, name string) []byte {
	off := L.BackingOff
	if off == 0 {
		off = L.ExtEnd + 8
	}
	clear(img[off:L.ClusterSize])
	copy(img[off:], name)
	be64(img, OffBackingOffset, uint64(off))
	be32(img, OffBackingSize, uint32(len(name)))
	return img
}

// ext is one header extension record.
type ext struct {
	typ  uint32
	data []byte
}

// insertExt writes extension records where the end-of-extensions record
// was, moves the backing name (if any) to the end of cluster 0, and leaves
// zeros (an end record) after them.
func insertExt(img []byte, L *Layout, exts ...ext) []byte {
	var backing []byte
	if L.BackingOff != 0 {
		n := get32(img, OffBackingSize)
		backing = append([]byte(nil), img[L.BackingOff:L.BackingOff+int64(n)]...)
	}
	off := L.ExtEnd
	clear(img[off:L.ClusterSize])
	for _, e := range exts {
		be32(img, off, e.typ)
		be32(img, off+4, uint32(len(e.data)))
		copy(img[off+8:], e.data)
		off += 8 + int64(len(e.data)+7)&^7
	}
	if backing != nil {
		bo := L.ClusterSize - int64(len(backing)+7)&^7
		copy(img[bo:], backing)
		be64(img, OffBackingOffset, uint64(bo))
	}
	return img
}

// chainImage returns a small QCOW2 image for backing-chain variants.
func chainImage(backing, format string) []byte {
	q := QCOW2{Version: 3, ClusterBits: 9, Size: baseSize, BackingFile: backing, BackingFormat: format,
		Data: clusters("chain", 512, 0)}
	return must(q.Build()).Bytes
}

func makeVariants() []Variant {
	var out []Variant
	add := func(v ...Variant) { out = append(out, v...) }
	v1 := BaseByName("v1")
	v1b := BaseByName("v1-backing")
	v2 := BaseByName("v2")
	v3 := BaseByName("v3")
	v3s := BaseByName("v3-104")
	v3x := BaseByName("v3-extl2")
	v3b := BaseByName("v3-backing")

	set32 := func(b *Base, name string, off int64, val uint32, want Want) {
		add(variantOf(b, name, want, func(img []byte, _ *Layout) []byte { be32(img, off, val); return img }))
	}
	set64 := func(b *Base, name string, off int64, val uint64, want Want) {
		add(variantOf(b, name, want, func(img []byte, _ *Layout) []byte { be64(img, off, val); return img }))
	}
	set8 := func(b *Base, name string, off int64, val byte, want Want) {
		add(variantOf(b, name, want, func(img []byte, _ *Layout) []byte { img[off] = val; return img }))
	}

	// Magic and version (§2, §7.1).
	for _, b := range []*Base{v1, v2, v3} {
		v := variantOf(b, "bad-magic", Want{Stage: AtOpen, Class: NotQCOW}, func(img []byte, _ *Layout) []byte {
			be32(img, 0, 0x514649FC)
			return img
		})
		v.Format = b.Format
		add(v)
	}
	for _, ver := range []uint32{0, 4, 0xffffffff} {
		set32(v3, fmt.Sprintf("version-%d", ver), OffVersion, ver, fieldErr(AtOpen, Unsupported, "version", uint64(ver)))
	}

	// QCOW2 header fields (§2, §7).
	for _, cb := range []uint32{0, 8, 22, 63, 64, 255} {
		set32(v2, fmt.Sprintf("cluster-bits-%d", cb), OffClusterBits, cb, fieldErr(AtOpen, Format, "cluster_bits", uint64(cb)))
	}
	set32(v3x, "cluster-bits-13-extl2", OffClusterBits, 13, fieldErr(AtOpen, Format, "cluster_bits", 13))
	for _, hl := range []uint32{72, 96, 108, 1024, 0xfffffff8} {
		set32(v3, fmt.Sprintf("header-length-%d", hl), OffHeaderLength, hl, fieldErr(AtOpen, Format, "header_length", uint64(hl)))
	}
	set32(v3, "refcount-order-7", OffRefcountOrder, 7, fieldErr(AtOpen, Format, "refcount_order", 7))
	set32(v3, "refcount-order-max", OffRefcountOrder, 0xffffffff, fieldErr(AtOpen, Format, "refcount_order", 0xffffffff))
	set32(v3, "refcount-table-clusters-0", OffRTClusters, 0, fieldErr(AtOpen, Format, "refcount_table_clusters", 0))
	set32(v3, "refcount-table-clusters-huge", OffRTClusters, 0xffffffff, fieldErr(AtOpen, Limit, "refcount_table_clusters", 0xffffffff))
	set32(v3, "refcount-table-clusters-beyond-eof", OffRTClusters, 1000, fieldErr(AtOpen, Format, "refcount_table_offset", uint64(v3.Built.RTOff)))
	set64(v3, "refcount-table-offset-unaligned", OffRTOffset, uint64(v3.Built.RTOff+8), fieldErr(AtOpen, Format, "refcount_table_offset", uint64(v3.Built.RTOff+8)))
	set64(v3, "refcount-table-offset-0", OffRTOffset, 0, fieldErr(AtOpen, Format, "refcount_table_offset", 0))
	set64(v3, "refcount-table-offset-beyond-eof", OffRTOffset, 1<<40, fieldErr(AtOpen, Format, "refcount_table_offset", 1<<40))
	set64(v3, "refcount-table-offset-overflow", OffRTOffset, 0x7ffffffffffffe00, fieldErr(AtOpen, Format, "refcount_table_offset", 0x7ffffffffffffe00))

	// L1 (§7.5, §7.6; CVE-2014-0143/0144).
	add(variantOf(v3, "l1-size-0x7fffffff", Want{Stage: AtOpen, Class: Limit, Field: "l1_size", Value: 0x7fffffff, HasValue: true,
		Text: "qcow: l1_size 2147483647 entries exceeds limit 4194304"},
		func(img []byte, _ *Layout) []byte { be32(img, OffL1Size, 0x7fffffff); return img }))
	set32(v3, "l1-size-too-small", OffL1Size, uint32(v3.Built.L1Size-1), fieldErr(AtOpen, Format, "l1_size", uint64(v3.Built.L1Size-1)))
	set32(v3, "l1-size-0", OffL1Size, 0, fieldErr(AtOpen, Format, "l1_size", 0))
	set64(v2, "size-huge", OffSize, 1<<62, fieldErr(AtOpen, Format, "size", 1<<62))
	set64(v2, "size-max", OffSize, 1<<64-1, fieldErr(AtOpen, Format, "size", 1<<64-1))
	set64(v3, "l1-offset-unaligned", OffL1Offset, uint64(v3.Built.L1Off+8), fieldErr(AtOpen, Format, "l1_table_offset", uint64(v3.Built.L1Off+8)))
	set64(v3, "l1-offset-0", OffL1Offset, 0, fieldErr(AtOpen, Format, "l1_table_offset", 0))
	set64(v3, "l1-offset-beyond-eof", OffL1Offset, 1<<40, fieldErr(AtOpen, Format, "l1_table_offset", 1<<40))
	set64(v3, "l1-offset-overflow", OffL1Offset, 0x7ffffffffffffe00, fieldErr(AtOpen, Format, "l1_table_offset", 0x7ffffffffffffe00))
	set64(v3, "l1-offset-int64-wrap", OffL1Offset, 0xfffffffffffffe00, fieldErr(AtOpen, Format, "l1_table_offset", 0xfffffffffffffe00))
	{
		at := v3.Built.L1Off
		l1 := get64(v3.Built.Bytes, at)
		set64(v3, "l1-entry-reserved-bits", at, l1|2, fieldErr(AtOpen, Format, "l1_entry", l1|2))
		set64(v3, "l1-entry-bit-56", at, l1|1<<56, fieldErr(AtOpen, Format, "l1_entry", l1|1<<56))
		set64(v3, "l1-entry-beyond-eof", at, 1<<40, fieldErr(AtOpen, Format, "l1_entry", 1<<40))
		// An L2 table on the refcount table: metadata overlap, only a
		// structural check sees it.
		set64(v3, "l1-entry-on-refcount-table", at, uint64(v3.Built.RTOff), Want{Stage: AtCheck})
		xat := v3x.Built.L1Off
		xl1 := get64(v3x.Built.Bytes, xat)
		set64(v3x, "l1-entry-unaligned", xat, xl1+512, fieldErr(AtOpen, Format, "l1_entry", xl1+512))
	}
	set64(v3, "l1-on-refcount-table", OffL1Offset, uint64(v3.Built.RTOff), Want{Stage: AtCheck})

	// L2 entries (§3, §7).
	{
		at := v2.Built.Entry[0]
		e := get64(v2.Built.Bytes, at)
		set64(v2, "l2-entry-reserved-bits", at, e|2, fieldErr(AtRead, Format, "l2_entry", e|2))
		set64(v2, "l2-entry-beyond-eof", at, 1<<63|1<<40, fieldErr(AtRead, Format, "l2_entry", 1<<63|1<<40))
		set64(v2, "l2-entry-offset-2^56", at, e|1<<56, fieldErr(AtRead, Format, "l2_entry", e|1<<56))
		set64(v2, "l2-entry-zero-flag-v2", at, e|1, fieldErr(AtRead, Format, "l2_entry", e|1))
		set64(v2, "l2-entry-on-refcount-block", at, 1<<63|uint64(v2.Built.RBOffs[0]), Want{Stage: AtCheck})
		set64(v2, "l2-entry-on-l1", at, 1<<63|uint64(v2.Built.L1Off), Want{Stage: AtCheck})
		ce := get64(v2.Built.Bytes, v2.Built.Entry[5])
		set64(v2, "compressed-copied", v2.Built.Entry[5], ce|1<<63, fieldErr(AtRead, Format, "l2_entry", ce|1<<63))
		x := uint64(70 - 9)
		nsect := ce >> x & 1
		set64(v2, "compressed-beyond-eof", v2.Built.Entry[5], 1<<62|nsect<<x|1<<40, fieldErr(AtRead, Format, "l2_entry", 1<<62|nsect<<x|1<<40))
		set64(v2, "compressed-in-cluster-0", v2.Built.Entry[5], 1<<62|nsect<<x|100, fieldErr(AtRead, Format, "l2_entry", 1<<62|nsect<<x|100))
		xa := v3x.Built.Entry[0]
		xe := get64(v3x.Built.Bytes, xa)
		set64(v3x, "l2-entry-unaligned", xa, xe+512, fieldErr(AtRead, Format, "l2_entry", xe+512))
	}
	// Compressed data that does not inflate to one cluster.
	add(variantOf(v2, "compressed-short", Want{Stage: AtRead, Class: Format, Text: "compressed"}, func(img []byte, L *Layout) []byte {
		d := Deflate(Pattern("short", 0, 100))
		o := L.CompOff[5]
		copy(img[o:o+L.CompLen[5]], make([]byte, L.CompLen[5]))
		copy(img[o:], d)
		return img
	}))
	add(variantOf(v2, "compressed-garbage", Want{Stage: AtRead, Class: Format, Text: "compressed"}, func(img []byte, L *Layout) []byte {
		o := L.CompOff[5]
		for i := o; i < o+L.CompLen[5]; i++ {
			img[i] = 0xff
		}
		return img
	}))
	{
		vz := BaseByName("v3-zstd")
		add(variantOf(vz, "zstd-short", Want{Stage: AtRead, Class: Format, Text: "compressed"}, func(img []byte, L *Layout) []byte {
			d := Zstd(Pattern("short", 0, 1000))
			o := L.CompOff[1]
			clear(img[o : o+L.CompLen[1]])
			copy(img[o:], d)
			return img
		}))
		add(variantOf(vz, "zstd-garbage", Want{Stage: AtRead, Class: Format, Text: "compressed"}, func(img []byte, L *Layout) []byte {
			o := L.CompOff[1]
			for i := o; i < o+L.CompLen[1]; i++ {
				img[i] = 0x5a
			}
			return img
		}))
		// A zstd frame that claims a huge window: the decoder's memory
		// limit must refuse it rather than allocate.
		add(variantOf(vz, "zstd-huge-window", Want{Stage: AtRead, Class: Format, Text: "compressed"}, func(img []byte, L *Layout) []byte {
			o := L.CompOff[1]
			// Frame header: magic, descriptor without single-segment flag,
			// window descriptor 0xf8 (2^41-byte window), then a raw block.
			f := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0x01, 0x00, 0x00}
			clear(img[o : o+L.CompLen[1]])
			copy(img[o:], f)
			return img
		}))
		set8(vz, "compression-type-1-header-104", OffHeaderLength+3, 104, fieldErr(AtOpen, Format, "compression_type", 0))
	}
	// A deflate bomb: 4 MiB of output from a few KiB of input, written
	// over the original compressed cluster (so the refcounts stay right).
	// Reading must stop after one cluster.
	{
		bomb := Pattern("bomb", 0, 4<<20)
		d := Deflate(bomb)
		if int64(len(d)) >= v3x.Built.ClusterSize {
			panic("hostile: the deflate bomb does not fit in one cluster")
		}
		add(variantOf(v3x, "compressed-bomb", Want{Stage: Benign, ReadOff: 7 << 14, ReadData: bomb[:16384]},
			func(img []byte, L *Layout) []byte {
				o := L.CompOff[7]
				copy(img[o:], d)
				nsect := uint64((o+int64(len(d))-1)/512 - o/512)
				be64(img, L.Entry[7], 1<<62|nsect<<(70-14)|uint64(o))
				return img
			}))
	}
	// Extended L2 bitmaps (§3).
	{
		at := v3x.Built.Entry[0]
		set64(v3x, "bitmap-alloc-and-zero", at+8, 1<<32|1, fieldErr(AtRead, Format, "l2_bitmap", 1<<32|1))
		ua := v3x.Built.L2Offs[0] + 16*20 // guest cluster 20 is unallocated
		set64(v3x, "bitmap-alloc-without-offset", ua+8, 1, fieldErr(AtRead, Format, "l2_bitmap", 1))
		set64(v3x, "bitmap-on-compressed", v3x.Built.Entry[7]+8, 1, fieldErr(AtRead, Format, "l2_bitmap", 1))
	}

	// Header extensions (§2; CVE-2014-0144).
	{
		ft := v3.Built.Exts[ExtFeatureTable]
		set32(v3, "ext-length-0xffffffff", ft+4, 0xffffffff, fieldErr(AtOpen, Format, "header_extension_length", 0xffffffff))
		set32(v3, "ext-length-past-cluster", ft+4, 1000, fieldErr(AtOpen, Format, "header_extension_length", 1000))
		bf := v3b.Built.Exts[ExtBackingFormat]
		add(variantOf(v3b, "ext-truncated-before-backing", fieldErr(AtOpen, Format, "header_extension", 4), func(img []byte, L *Layout) []byte {
			// The extension area ends 4 bytes into where the next record
			// header would be.
			name := img[L.BackingOff : L.BackingOff+int64(get32(img, OffBackingSize))]
			name = append([]byte(nil), name...)
			be32(img, L.ExtEnd, 0x12345678)
			copy(img[L.ExtEnd+4:], name)
			be64(img, OffBackingOffset, uint64(L.ExtEnd+4))
			return img
		}))
		add(variantOf(v3b, "ext-duplicate-backing-format", fieldErr(AtOpen, Format, "header_extension", ExtBackingFormat),
			func(img []byte, L *Layout) []byte { return insertExt(img, L, ext{ExtBackingFormat, []byte("qcow2")}) }))
		add(variantOf(v3b, "ext-backing-format-16", fieldErr(AtOpen, Format, "backing_format_length", 16), func(img []byte, L *Layout) []byte {
			img = insertExt(img, L, ext{0x11111111, make([]byte, 16)}) // room for 16 bytes of format
			be32(img, bf+4, 16)
			return img
		}))
		add(variantOf(v3b, "ext-duplicate-feature-table", fieldErr(AtOpen, Format, "header_extension", ExtFeatureTable), func(img []byte, L *Layout) []byte {
			return insertExt(img, L, ext{ExtFeatureTable, make([]byte, 48)}, ext{ExtFeatureTable, make([]byte, 48)})
		}))
	}

	// Backing file names (§2, §7.7; CVE-2024-4467, CVE-2008-2004).
	set64(v3b, "backing-offset-beyond-cluster", OffBackingOffset, 513, fieldErr(AtOpen, Format, "backing_file_offset", 513))
	set64(v3b, "backing-offset-in-header", OffBackingOffset, 16, fieldErr(AtOpen, Format, "backing_file_offset", 16))
	set32(v3b, "backing-size-1024", OffBackingSize, 1024, fieldErr(AtOpen, Limit, "backing_file_size", 1024))
	set32(v3b, "backing-size-past-cluster", OffBackingSize, 500, fieldErr(AtOpen, Format, "backing_file_size", 500))
	set32(v3, "backing-size-without-offset", OffBackingSize, 10, fieldErr(AtOpen, Format, "backing_file_size", 10))
	for _, n := range []struct{ name, file string }{
		{"json", `json:{"file.driver":"file","file.filename":"/etc/passwd"}`},
		{"nbd", "nbd://host/x"},
		{"http", "http://x"},
		{"nul", "a\x00b"},
		{"newline", "evil\nname.qcow2"}, // found by FuzzOpen: leaked into error messages
	} {
		add(variantOf(v3b, "backing-name-"+n.name, Want{Stage: AtOpen, Class: Backing},
			func(img []byte, L *Layout) []byte { return setBacking(img, L, n.file) }))
	}
	add(variantOf(v3b, "backing-missing", Want{Stage: AtOpen, Class: NotExist},
		func(img []byte, L *Layout) []byte { return setBacking(img, L, "no-such-file.qcow2") }))
	add(variantOf(v3b, "backing-format-unknown", Want{Stage: AtOpen, Class: Unsupported}, func(img []byte, L *Layout) []byte {
		copy(img[L.Exts[ExtBackingFormat]+8:], "vmdk\x00")
		be32(img, L.Exts[ExtBackingFormat]+4, 4)
		return img
	}))
	{
		// The backing file has a bad magic but the image says it is qcow2.
		v := variantOf(v3b, "backing-bad-magic", Want{Stage: AtOpen, Class: NotQCOW}, func(img []byte, _ *Layout) []byte { return img })
		mid := append([]byte(nil), v.Files["chain-mid.qcow2"]...)
		be32(mid, 0, 0xdeadbeef)
		v.Files["chain-mid.qcow2"] = mid
		add(v)
	}
	{
		// CVE-2008-2004: a raw backing file that looks like a qcow2 image
		// naming a json: backing file. Probing finds qcow2 (by magic, as
		// qemu does) and the json: name must be refused.
		v := variantOf(v2, "probe-backing-json", Want{Stage: AtOpen, Class: Backing}, func(img []byte, L *Layout) []byte {
			return setBacking(img, L, "guest.raw")
		})
		v.Files["guest.raw"] = chainImage(`json:{"file.filename":"/etc/shadow"}`, "")
		add(v)
	}
	// Backing loops and depth.
	add(Variant{Name: "chain/self-loop", Main: "a.qcow2", Want: Want{Stage: AtOpen, Class: Backing, Text: "loop"},
		Files: map[string][]byte{"a.qcow2": chainImage("a.qcow2", "qcow2")}})
	add(Variant{Name: "chain/self-loop-probed", Main: "a.qcow2", Want: Want{Stage: AtOpen, Class: Backing, Text: "loop"},
		Files: map[string][]byte{"a.qcow2": chainImage("./a.qcow2", "")}})
	add(Variant{Name: "chain/a-b-a", Main: "a.qcow2", Want: Want{Stage: AtOpen, Class: Backing, Text: "loop"},
		Files: map[string][]byte{"a.qcow2": chainImage("b.qcow2", "qcow2"), "b.qcow2": chainImage("a.qcow2", "qcow2")}})
	{
		v := variantOf(v1b, "self-loop", Want{Stage: AtOpen, Class: Backing, Text: "loop"}, func(img []byte, L *Layout) []byte {
			copy(img[48:], "v1-backing.qcow")
			be32(img, V1OffBackingSize, uint32(len("v1-backing.qcow")))
			return img
		})
		add(v)
	}
	{
		files := map[string][]byte{}
		const n = 18
		for i := 0; i < n; i++ {
			back := ""
			if i < n-1 {
				back = fmt.Sprintf("deep%02d.qcow2", i+1)
			}
			files[fmt.Sprintf("deep%02d.qcow2", i)] = chainImage(back, "qcow2")
		}
		add(Variant{Name: "chain/depth-18", Main: "deep00.qcow2", Files: files, Want: Want{Stage: AtOpen, Class: Backing}})
	}

	// Features, encryption, compression type (§2, §7.3, §7.4).
	set64(v3, "incompatible-bit-5", OffIncompat, 1<<5, fieldErr(AtOpen, Unsupported, "incompatible_features", 1<<5))
	set64(v3, "incompatible-bit-63", OffIncompat, 1<<63, fieldErr(AtOpen, Unsupported, "incompatible_features", 1<<63))
	for _, b := range []*Base{v2, v3} {
		set32(b, "crypt-method-1", OffCryptMethod, 1, Want{Stage: AtOpen, Class: Unsupported, Field: "crypt_method", Value: 1, HasValue: true,
			Text: "encrypted images are not supported"})
		set32(b, "crypt-method-2", OffCryptMethod, 2, Want{Stage: AtOpen, Class: Unsupported, Field: "crypt_method", Value: 2, HasValue: true,
			Text: "encrypted images are not supported"})
		set32(b, "crypt-method-3", OffCryptMethod, 3, fieldErr(AtOpen, Format, "crypt_method", 3))
	}
	add(variantOf(v3, "crypto-ext-without-luks", fieldErr(AtOpen, Format, "crypt_method", 0),
		func(img []byte, L *Layout) []byte { return insertExt(img, L, ext{ExtCrypto, make([]byte, 16)}) }))
	set64(v3, "corrupt-bit", OffIncompat, 1<<1, Want{Stage: Benign, Corrupt: true})
	set8(v3, "compression-type-1-without-bit", OffCompressionType, 1, fieldErr(AtOpen, Format, "compression_type", 1))
	set64(v3, "compression-bit-without-type", OffIncompat, 1<<3, fieldErr(AtOpen, Format, "compression_type", 0))
	set64(v3s, "compression-bit-header-104", OffIncompat, 1<<3, fieldErr(AtOpen, Format, "compression_type", 0))
	add(variantOf(v3, "compression-type-2", fieldErr(AtOpen, Unsupported, "compression_type", 2), func(img []byte, _ *Layout) []byte {
		img[OffCompressionType] = 2
		be64(img, OffIncompat, 1<<3)
		return img
	}))
	set64(v3, "data-file-bit-without-name", OffIncompat, 1<<2, fieldErr(AtOpen, Format, "incompatible_features", 1<<2))
	add(variantOf(v3, "data-file-missing", Want{Stage: AtOpen, Class: NotExist}, func(img []byte, L *Layout) []byte {
		be64(img, OffIncompat, 1<<2)
		return insertExt(img, L, ext{ExtDataFile, []byte("missing.raw")})
	}))
	add(variantOf(v3, "data-file-json", Want{Stage: AtOpen, Class: Backing}, func(img []byte, L *Layout) []byte {
		be64(img, OffIncompat, 1<<2)
		return insertExt(img, L, ext{ExtDataFile, []byte(`json:{"file.filename":"/etc/passwd"}`)})
	}))
	add(variantOf(v3, "data-file-name-without-bit", fieldErr(AtOpen, Format, "data_file", 5), func(img []byte, L *Layout) []byte {
		return insertExt(img, L, ext{ExtDataFile, []byte("x.raw\x00\x00")})
	}))

	// Snapshots (§5, §7.5; CVE-2014-0145, CVE-2014-0146).
	set32(v3, "nb-snapshots-65537", OffNbSnapshots, 65537, fieldErr(AtOpen, Limit, "nb_snapshots", 65537))
	set32(v3, "nb-snapshots-65536-beyond-eof", OffNbSnapshots, 65536, fieldErr(AtOpen, Format, "snapshots_offset", uint64(v3.Built.SnapOff)))
	set32(v3, "nb-snapshots-2", OffNbSnapshots, 2, Want{Stage: AtInfo})
	set64(v3, "snapshots-offset-unaligned", OffSnapshotsOffset, uint64(v3.Built.SnapOff+8), fieldErr(AtOpen, Format, "snapshots_offset", uint64(v3.Built.SnapOff+8)))
	set64(v3, "snapshots-offset-beyond-eof", OffSnapshotsOffset, 1<<40, fieldErr(AtOpen, Format, "snapshots_offset", 1<<40))
	set64(v3, "snapshots-offset-0", OffSnapshotsOffset, 0, fieldErr(AtOpen, Format, "snapshots_offset", 0))
	{
		s := v3.Built.SnapOff
		set32(v3, "snapshot-extra-data-0xffffffff", s+36, 0xffffffff, fieldErr(AtInfo, Limit, "snapshot_extra_data_size", 0xffffffff))
		set32(v3, "snapshot-extra-data-8-v3", s+36, 8, fieldErr(AtInfo, Format, "snapshot_extra_data_size", 8))
		set32(v3, "snapshot-id-name-len-huge", s+12, 0xffffffff, fieldErr(AtInfo, Format, "snapshot", 0))
		set32(v3, "snapshot-l1-size-huge", s+8, 0x7fffffff, fieldErr(AtInfo, Limit, "snapshot_l1_size", 0x7fffffff))
		set32(v3, "snapshot-l1-size-beyond-eof", s+8, 100000, fieldErr(AtInfo, Format, "snapshot_l1_table_offset", uint64(v3.Built.SnapL1Off)))
		set64(v3, "snapshot-l1-offset-beyond-eof", s, 1<<40, fieldErr(AtInfo, Format, "snapshot_l1_table_offset", 1<<40))
		// Found by FuzzOpen: an offset >= 2^63 became a negative int64 in
		// Check's reads.
		set64(v3, "snapshot-l1-offset-negative", s, 0xffffeb0000000200, fieldErr(AtInfo, Format, "snapshot_l1_table_offset", 0xffffeb0000000200))
		set64(v3, "snapshot-l1-offset-unaligned", s, uint64(v3.Built.SnapL1Off+8), fieldErr(AtInfo, Format, "snapshot_l1_table_offset", uint64(v3.Built.SnapL1Off+8)))
		set64(v3, "snapshot-l1-entry-beyond-eof", v3.Built.SnapL1Off, 1<<40, Want{Stage: AtCheck})
	}

	// Refcounts: only a structural check sees these (§4, §8; launchpad
	// 1728615: a zero refcount for cluster 0 lets an allocator overwrite
	// the header).
	{
		rb := v2.Built.RBOffs[0]
		add(variantOf(v2, "refcount-header-zero", Want{Stage: AtCheck}, func(img []byte, _ *Layout) []byte {
			img[rb], img[rb+1] = 0, 0
			return img
		}))
		dc := v2.Built.Host[0] / 512
		add(variantOf(v2, "refcount-data-zero", Want{Stage: AtCheck}, func(img []byte, _ *Layout) []byte {
			img[rb+dc*2], img[rb+dc*2+1] = 0, 0
			return img
		}))
		sdc := v3.Built.Host[0] / 512
		add(variantOf(v3, "refcount-leak", Want{Stage: AtCheck}, func(img []byte, L *Layout) []byte {
			img[L.RBOffs[0]+sdc*2+1]++
			return img
		}))
		set64(v2, "refcount-table-entry-0", v2.Built.RTOff, 0, Want{Stage: AtCheck})
		set64(v2, "refcount-table-entry-reserved", v2.Built.RTOff, uint64(rb)|1, Want{Stage: AtCheck})
		set64(v2, "refcount-table-entry-beyond-eof", v2.Built.RTOff, 1<<40, Want{Stage: AtCheck})
		set64(v2, "refcount-table-entry-on-l1", v2.Built.RTOff, uint64(v2.Built.L1Off), Want{Stage: AtCheck})
	}

	// QCOW version 1 (§1; CVE-2014-0222, CVE-2014-0223).
	for _, cb := range []byte{0, 8, 17, 255} {
		set8(v1, fmt.Sprintf("cluster-bits-%d", cb), V1OffClusterBits, cb, fieldErr(AtOpen, Format, "cluster_bits", uint64(cb)))
	}
	for _, l2 := range []byte{0, 5, 14, 255} {
		set8(v1, fmt.Sprintf("l2-bits-%d", l2), V1OffL2Bits, l2, fieldErr(AtOpen, Format, "l2_bits", uint64(l2)))
	}
	set64(v1, "size-huge", V1OffSize, 1<<64-1, fieldErr(AtOpen, Format, "size", 1<<64-1))
	set64(v1, "size-l1-limit", V1OffSize, 1<<62, fieldErr(AtOpen, Limit, "l1_size", 1<<62>>15))
	set64(v1, "size-1", V1OffSize, 1, fieldErr(AtOpen, Format, "size", 1))
	add(variantOf(v1, "size-and-l2-bits-huge", Want{Stage: AtOpen, Class: Format}, func(img []byte, _ *Layout) []byte {
		be64(img, V1OffSize, 1<<63)
		img[V1OffL2Bits] = 13
		img[V1OffClusterBits] = 16
		return img
	}))
	set32(v1, "crypt-method-1", V1OffCryptMethod, 1, Want{Stage: AtOpen, Class: Unsupported, Field: "crypt_method", Value: 1, HasValue: true,
		Text: "encrypted images are not supported"})
	set32(v1, "crypt-method-2", V1OffCryptMethod, 2, fieldErr(AtOpen, Format, "crypt_method", 2))
	set64(v1, "l1-offset-unaligned", V1OffL1Offset, uint64(v1.Built.L1Off+4), fieldErr(AtOpen, Format, "l1_table_offset", uint64(v1.Built.L1Off+4)))
	set64(v1, "l1-offset-in-header", V1OffL1Offset, 8, fieldErr(AtOpen, Format, "l1_table_offset", 8))
	set64(v1, "l1-offset-beyond-eof", V1OffL1Offset, 1<<40, fieldErr(AtOpen, Format, "l1_table_offset", 1<<40))
	set64(v1, "l1-offset-wrap", V1OffL1Offset, 1<<64-8, fieldErr(AtOpen, Format, "l1_table_offset", 1<<64-8))
	set32(v1b, "backing-size-1024", V1OffBackingSize, 1024, fieldErr(AtOpen, Limit, "backing_file_size", 1024))
	set64(v1b, "backing-offset-beyond-eof", V1OffBackingOffset, 1<<40, fieldErr(AtOpen, Format, "backing_file_offset", 1<<40))
	add(variantOf(v1b, "backing-name-json", Want{Stage: AtOpen, Class: Backing}, func(img []byte, L *Layout) []byte {
		// Rebuild with a json: name of the same length as the original.
		n := int(get32(img, V1OffBackingSize))
		name := (`json:{"a":"` + strings.Repeat("x", n))[:n-2] + `"}`
		copy(img[48:], name)
		return img
	}))
	{
		at := v1.Built.L1Off
		l1 := get64(v1.Built.Bytes, at)
		set64(v1, "l1-entry-unaligned", at, l1+4, fieldErr(AtRead, Format, "l1_entry", l1+4))
		set64(v1, "l1-entry-beyond-eof", at, 1<<40, fieldErr(AtRead, Format, "l1_entry", 1<<40))
		set64(v1, "l1-entry-in-header", at, 8, fieldErr(AtRead, Format, "l1_entry", 8))
		e := v1.Built.Entry[0]
		d := get64(v1.Built.Bytes, e)
		set64(v1, "l2-entry-unaligned", e, d+100, fieldErr(AtRead, Format, "l2_entry", d+100))
		set64(v1, "l2-entry-beyond-eof", e, 1<<40, fieldErr(AtRead, Format, "l2_entry", 1<<40))
		ce := v1.Built.Entry[3]
		cd := get64(v1.Built.Bytes, ce)
		set64(v1, "compressed-in-cluster-0", ce, cd&^(1<<54-1)|100, fieldErr(AtRead, Format, "l2_entry", cd&^(1<<54-1)|100))
		set64(v1, "compressed-beyond-eof", ce, cd&^(1<<54-1)|1<<40, fieldErr(AtRead, Format, "l2_entry", cd&^(1<<54-1)|1<<40))
		set64(v1, "compressed-size-0", ce, 1<<63|uint64(v1.Built.CompOff[3]), fieldErr(AtRead, Format, "l2_entry", 1<<63|uint64(v1.Built.CompOff[3])))
	}
	add(variantOf(v1, "compressed-garbage", Want{Stage: AtRead, Class: Format, Text: "compressed"}, func(img []byte, L *Layout) []byte {
		for i := L.CompOff[3]; i < L.CompOff[3]+L.CompLen[3]; i++ {
			img[i] = 0xa5
		}
		return img
	}))

	// Truncated files: at every offset inside the header, and at the start
	// of every table and data cluster.
	for _, b := range []*Base{v1, v2, v3} {
		L := &b.Built.Layout
		hl := L.HeaderLen
		for n := int64(0); n < hl; n++ {
			v := truncated(b, fmt.Sprintf("truncated-%d", n), n, Want{Stage: AtOpen})
			if n < 8 {
				// Shorter than magic and version: a raw file unless the
				// format is forced.
				v.Format = b.Format
			}
			add(v)
		}
		cuts := map[int64]string{L.L1Off: "l1"}
		if L.RTOff != 0 {
			cuts[L.RTOff] = "refcount-table"
			cuts[L.RBOffs[0]] = "refcount-block"
		}
		if L.SnapOff != 0 {
			cuts[L.SnapOff] = "snapshot-table"
			cuts[L.SnapL1Off] = "snapshot-l1"
		}
		if L.ExtEnd > hl {
			cuts[L.ExtEnd] = "extensions-end"
			for typ, o := range L.Exts {
				cuts[o] = fmt.Sprintf("ext-%08x", typ)
			}
		}
		for i, o := range L.L2Offs {
			if o != 0 {
				cuts[o] = fmt.Sprintf("l2-%d", i)
			}
		}
		for g, o := range L.Host {
			cuts[o] = fmt.Sprintf("data-%d", g)
		}
		for g, o := range L.CompOff {
			cuts[o] = fmt.Sprintf("compressed-%d", g)
			cuts[o+L.CompLen[g]/2] = fmt.Sprintf("compressed-%d-middle", g)
		}
		offs := make([]int64, 0, len(cuts))
		for o := range cuts {
			offs = append(offs, o)
		}
		sort.Slice(offs, func(i, j int) bool { return offs[i] < offs[j] })
		for _, o := range offs {
			add(truncated(b, fmt.Sprintf("truncated-at-%s-%d", cuts[o], o), o, Want{Stage: AtCheck}))
		}
	}
	return out
}

func truncated(b *Base, name string, n int64, want Want) Variant {
	return variantOf(b, name, want, func(img []byte, _ *Layout) []byte { return img[:n] })
}
