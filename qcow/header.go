package qcow

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"strings"
)

// Magic is the first four bytes of every QCOW image: "QFI\xfb".
const Magic = 0x514649FB

// Limits applied to untrusted images. They match qemu's where qemu has one;
// every allocation sized by a field of the file is bounded by one of them
// and by the file's size.
const (
	// MaxL1Bytes bounds the active (and each snapshot's) L1 table: 32 MiB,
	// qemu's QCOW_MAX_L1_SIZE.
	MaxL1Bytes = 32 << 20
	// MaxRefcountTableBytes bounds the refcount table: 8 MiB, qemu's
	// QCOW_MAX_REFTABLE_SIZE.
	MaxRefcountTableBytes = 8 << 20
	// MaxSnapshots bounds the number of internal snapshots (qemu's
	// QCOW_MAX_SNAPSHOTS).
	MaxSnapshots = 65536
	// MaxSnapshotTableBytes bounds the whole snapshot table: 64 MiB.
	MaxSnapshotTableBytes = 64 << 20
	// MaxSnapshotExtraData bounds a snapshot entry's extra data.
	MaxSnapshotExtraData = 1024
	// MaxBackingNameLen bounds a backing or data file name (qemu: 1023).
	MaxBackingNameLen = 1023
	// MaxHostOffset is the largest host offset a table entry may hold
	// (qemu's QCOW_MAX_CLUSTER_OFFSET, 2^56 - 1).
	MaxHostOffset = 1<<56 - 1
	// MaxBackingDepth is the default limit on the length of a backing chain.
	MaxBackingDepth = 16
)

// Feature bits of QCOW2 version 3.
const (
	IncompatDirty       = 1 << 0
	IncompatCorrupt     = 1 << 1
	IncompatDataFile    = 1 << 2
	IncompatCompression = 1 << 3
	IncompatExtendedL2  = 1 << 4
	incompatKnown       = IncompatDirty | IncompatCorrupt | IncompatDataFile | IncompatCompression | IncompatExtendedL2

	CompatLazyRefcounts = 1 << 0

	AutoclearBitmaps     = 1 << 0
	AutoclearDataFileRaw = 1 << 1
)

// Header extension types.
const (
	extEnd           = 0
	extBackingFormat = 0xE2792ACA
	extFeatureTable  = 0x6803F857
	extBitmaps       = 0x23852875
	extCrypto        = 0x0537BE77
	extDataFile      = 0x44415441
)

// Compression types.
const (
	CompressionDeflate = 0
	CompressionZstd    = 1
)

const (
	v1HeaderLen = 48
	v2HeaderLen = 72
	v3HeaderLen = 104
)

// Entry masks of QCOW2 tables.
const (
	l1OffsetMask   = 0x00fffffffffffe00
	l1ReservedMask = 0x7f000000000001ff
	l2OffsetMask   = 0x00fffffffffffe00
	l2ReservedMask = 0x3f000000000001fe
	flagCopied     = 1 << 63
	flagCompressed = 1 << 62
	flagZero       = 1 << 0
	rtOffsetMask   = 0xfffffffffffffe00
	rtReservedMask = 0x1ff
)

// FeatureName is one entry of the feature name table header extension.
type FeatureName struct {
	Type int    // 0 incompatible, 1 compatible, 2 autoclear
	Bit  int    // bit number
	Name string // human-readable name
}

// Extension is a header extension this package does not interpret; it is
// kept so that a writer can preserve it.
type Extension struct {
	Type uint32
	Data []byte
}

// header is the decoded, validated header of a QCOW image of any version.
type header struct {
	version         uint32
	backingOff      uint64
	backingLen      uint32
	clusterBits     uint32
	l2Bits          uint32 // log2 of entries per L2 table
	size            uint64
	cryptMethod     uint32
	l1Size          uint32
	l1Off           uint64
	rtOff           uint64
	rtClusters      uint32
	nbSnapshots     uint32
	snapOff         uint64
	incompat        uint64
	compat          uint64
	autoclear       uint64
	refcountOrder   uint32
	headerLen       uint32
	compressionType uint8

	backingFile   string
	backingFormat string
	dataFile      string
	features      []FeatureName
	unknownExts   []Extension
	bitmapsExt    *bitmapsExt
}

type bitmapsExt struct {
	nbBitmaps uint32
	dirSize   uint64
	dirOff    uint64
}

// cursor reads big-endian integers from a byte slice without bounds
// surprises: the caller sizes the slice first.
type cursor struct {
	b   []byte
	off int
}

func (c *cursor) u8() uint8   { v := c.b[c.off]; c.off++; return v }
func (c *cursor) u16() uint16 { v := binary.BigEndian.Uint16(c.b[c.off:]); c.off += 2; return v }
func (c *cursor) u32() uint32 { v := binary.BigEndian.Uint32(c.b[c.off:]); c.off += 4; return v }
func (c *cursor) u64() uint64 { v := binary.BigEndian.Uint64(c.b[c.off:]); c.off += 8; return v }

// parseV1Header decodes and validates a QCOW version 1 header. buf holds
// the first bytes of the file (at least v1HeaderLen unless the file is
// shorter), fileSize is the size of the file.
func parseV1Header(buf []byte, fileSize int64) (*header, error) {
	if len(buf) < v1HeaderLen {
		return nil, formatErr("header", 0, uint64(len(buf)), "bytes: file too short for a QCOW version 1 header (need %d)", v1HeaderLen)
	}
	c := cursor{b: buf, off: 4}
	h := &header{}
	h.version = c.u32()
	h.backingOff = c.u64()
	h.backingLen = c.u32()
	c.u32() // mtime
	h.size = c.u64()
	h.clusterBits = uint32(c.u8())
	h.l2Bits = uint32(c.u8())
	c.u16()
	h.cryptMethod = c.u32()
	h.l1Off = c.u64()
	h.headerLen = v1HeaderLen
	h.refcountOrder = 0

	if h.size < 2 {
		// qemu refuses images smaller than two bytes; so do we.
		return nil, formatErr("size", 24, h.size, "is too small")
	}
	if h.clusterBits < 9 || h.clusterBits > 16 {
		return nil, formatErr("cluster_bits", 32, uint64(h.clusterBits), "out of range 9..16")
	}
	if h.l2Bits < 6 || h.l2Bits > 13 {
		return nil, formatErr("l2_bits", 33, uint64(h.l2Bits), "out of range 6..13")
	}
	switch h.cryptMethod {
	case 0:
	case 1:
		return nil, unsupportedErr("crypt_method", 36, 1, "(AES): encrypted images are not supported")
	default:
		return nil, formatErr("crypt_method", 36, uint64(h.cryptMethod), "is not a known encryption method")
	}
	shift := h.clusterBits + h.l2Bits
	if h.size > math.MaxInt64-(1<<shift) {
		return nil, formatErr("size", 24, h.size, "is too large")
	}
	l1Size := (h.size + (1 << shift) - 1) >> shift
	if l1Size > MaxL1Bytes/8 {
		return nil, limitErr("l1_size", -1, l1Size, "entries exceeds limit %d", MaxL1Bytes/8)
	}
	h.l1Size = uint32(l1Size)
	if h.l1Off%8 != 0 {
		return nil, formatErr("l1_table_offset", 40, h.l1Off, "is not 8-byte aligned")
	}
	if h.l1Off < v1HeaderLen {
		return nil, formatErr("l1_table_offset", 40, h.l1Off, "overlaps the header")
	}
	if h.l1Off > uint64(fileSize) || l1Size*8 > uint64(fileSize)-h.l1Off {
		return nil, formatErr("l1_table_offset", 40, h.l1Off, "with %d entries extends beyond the end of the file (%d bytes)", l1Size, fileSize)
	}
	if h.backingOff != 0 || h.backingLen != 0 {
		if h.backingLen > MaxBackingNameLen {
			return nil, limitErr("backing_file_size", 16, uint64(h.backingLen), "exceeds limit %d", MaxBackingNameLen)
		}
		if h.backingLen == 0 {
			return nil, formatErr("backing_file_size", 16, 0, "is zero with backing_file_offset %d", h.backingOff)
		}
		if h.backingOff < v1HeaderLen || h.backingOff > uint64(fileSize) || uint64(h.backingLen) > uint64(fileSize)-h.backingOff {
			return nil, formatErr("backing_file_offset", 8, h.backingOff, "with length %d lies outside the file (%d bytes)", h.backingLen, fileSize)
		}
	}
	return h, nil
}

// parseV2Header decodes and validates a QCOW2 (version 2 or 3) header. buf
// holds the start of the file: all of cluster 0, or the whole file if it is
// shorter.
func parseV2Header(buf []byte, fileSize int64) (*header, error) {
	if len(buf) < v2HeaderLen {
		return nil, formatErr("header", 0, uint64(len(buf)), "bytes: file too short for a QCOW2 header (need %d)", v2HeaderLen)
	}
	c := cursor{b: buf, off: 4}
	h := &header{}
	h.version = c.u32()
	h.backingOff = c.u64()
	h.backingLen = c.u32()
	h.clusterBits = c.u32()
	h.size = c.u64()
	h.cryptMethod = c.u32()
	h.l1Size = c.u32()
	h.l1Off = c.u64()
	h.rtOff = c.u64()
	h.rtClusters = c.u32()
	h.nbSnapshots = c.u32()
	h.snapOff = c.u64()
	if h.clusterBits < 9 || h.clusterBits > 21 {
		return nil, formatErr("cluster_bits", 20, uint64(h.clusterBits), "out of range 9..21")
	}
	cs := uint64(1) << h.clusterBits
	if h.version == 2 {
		h.refcountOrder = 4
		h.headerLen = v2HeaderLen
	} else {
		if len(buf) < v3HeaderLen {
			return nil, formatErr("header", 0, uint64(len(buf)), "bytes: file too short for a QCOW2 version 3 header (need %d)", v3HeaderLen)
		}
		h.incompat = c.u64()
		h.compat = c.u64()
		h.autoclear = c.u64()
		h.refcountOrder = c.u32()
		h.headerLen = c.u32()
		if h.headerLen < v3HeaderLen {
			return nil, formatErr("header_length", 100, uint64(h.headerLen), "is smaller than %d", v3HeaderLen)
		}
		if uint64(h.headerLen) > cs {
			return nil, formatErr("header_length", 100, uint64(h.headerLen), "exceeds the cluster size %d", cs)
		}
		if h.headerLen%8 != 0 {
			return nil, formatErr("header_length", 100, uint64(h.headerLen), "is not a multiple of 8")
		}
		if uint64(h.headerLen) > uint64(len(buf)) {
			return nil, formatErr("header_length", 100, uint64(h.headerLen), "extends beyond the end of the file (%d bytes)", fileSize)
		}
		if h.headerLen > v3HeaderLen {
			h.compressionType = buf[104]
		}
	}

	// Features.
	if unknown := h.incompat &^ incompatKnown; unknown != 0 {
		return nil, unsupportedErr("incompatible_features", 72, h.incompat, "has unknown bits %#x", unknown)
	}
	if h.compressionType > CompressionZstd {
		return nil, unsupportedErr("compression_type", 104, uint64(h.compressionType), "is not a known compression type (0 deflate, 1 zstd)")
	}
	if (h.compressionType != 0) != (h.incompat&IncompatCompression != 0) {
		return nil, formatErr("compression_type", 104, uint64(h.compressionType), "disagrees with incompatible feature bit 3 (%v)", h.incompat&IncompatCompression != 0)
	}
	if h.incompat&IncompatExtendedL2 != 0 {
		if h.clusterBits < 14 {
			return nil, formatErr("cluster_bits", 20, uint64(h.clusterBits), "is below 14, the minimum for extended L2 entries")
		}
		h.l2Bits = h.clusterBits - 4
	} else {
		h.l2Bits = h.clusterBits - 3
	}
	if h.refcountOrder > 6 {
		return nil, formatErr("refcount_order", 96, uint64(h.refcountOrder), "exceeds 6 (64-bit refcounts)")
	}
	switch h.cryptMethod {
	case 0:
	case 1:
		return nil, unsupportedErr("crypt_method", 32, 1, "(AES): encrypted images are not supported")
	case 2:
		return nil, unsupportedErr("crypt_method", 32, 2, "(LUKS): encrypted images are not supported")
	default:
		return nil, formatErr("crypt_method", 32, uint64(h.cryptMethod), "is not a known encryption method")
	}

	// Backing file name: must lie inside cluster 0 after the header.
	if h.backingOff != 0 {
		if h.backingOff > cs {
			return nil, formatErr("backing_file_offset", 8, h.backingOff, "lies beyond cluster 0 (cluster size %d)", cs)
		}
		if h.backingOff < uint64(h.headerLen) {
			return nil, formatErr("backing_file_offset", 8, h.backingOff, "overlaps the header (%d bytes)", h.headerLen)
		}
		if h.backingLen > MaxBackingNameLen {
			return nil, limitErr("backing_file_size", 16, uint64(h.backingLen), "exceeds limit %d", MaxBackingNameLen)
		}
		if uint64(h.backingLen) > cs-h.backingOff {
			return nil, formatErr("backing_file_size", 16, uint64(h.backingLen), "extends beyond cluster 0")
		}
		if h.backingOff+uint64(h.backingLen) > uint64(len(buf)) {
			return nil, formatErr("backing_file_offset", 8, h.backingOff, "with length %d extends beyond the end of the file", h.backingLen)
		}
		h.backingFile = string(buf[h.backingOff : h.backingOff+uint64(h.backingLen)])
	} else if h.backingLen != 0 {
		return nil, formatErr("backing_file_size", 16, uint64(h.backingLen), "is non-zero without a backing_file_offset")
	}

	extEndOff := cs
	if h.backingOff != 0 {
		extEndOff = h.backingOff
	}
	if err := h.parseExtensions(buf, extEndOff); err != nil {
		return nil, err
	}

	if h.incompat&IncompatDataFile != 0 {
		if h.dataFile == "" {
			return nil, formatErr("incompatible_features", 72, h.incompat, "sets the external data file bit but the image names no data file")
		}
		if h.backingOff != 0 {
			// qemu forbids a backing file together with raw external data;
			// we keep the simpler rule for any external data file.
			if h.autoclear&AutoclearDataFileRaw != 0 {
				return nil, formatErr("autoclear_features", 88, h.autoclear, "sets data-file-raw together with a backing file")
			}
		}
	} else {
		if h.autoclear&AutoclearDataFileRaw != 0 {
			return nil, formatErr("autoclear_features", 88, h.autoclear, "sets data-file-raw without the external data file bit")
		}
		if h.dataFile != "" {
			return nil, formatErr("data_file", -1, uint64(len(h.dataFile)), "extension present without the external data file bit")
		}
	}

	// Size and L1.
	if h.size > math.MaxInt64 {
		return nil, formatErr("size", 24, h.size, "exceeds the largest supported virtual size")
	}
	perL1 := cs << h.l2Bits // bytes mapped by one L1 entry (<= 2^21 * 2^18 = 2^39)
	need := (h.size + perL1 - 1) / perL1
	if need > math.MaxInt32 {
		return nil, formatErr("size", 24, h.size, "is too large for the cluster size %d", cs)
	}
	if uint64(h.l1Size) > MaxL1Bytes/8 {
		return nil, limitErr("l1_size", 36, uint64(h.l1Size), "entries exceeds limit %d", MaxL1Bytes/8)
	}
	if uint64(h.l1Size) < need {
		return nil, formatErr("l1_size", 36, uint64(h.l1Size), "entries is too small for virtual size %d (need %d)", h.size, need)
	}
	if h.l1Size > 0 {
		if err := checkTable("l1_table_offset", 40, h.l1Off, uint64(h.l1Size)*8, cs, fileSize); err != nil {
			return nil, err
		}
	} else if h.l1Off%cs != 0 {
		return nil, formatErr("l1_table_offset", 40, h.l1Off, "is not aligned to the cluster size %d", cs)
	}

	// Refcount table.
	if h.rtClusters == 0 {
		return nil, formatErr("refcount_table_clusters", 56, 0, "is zero: the image has no refcount table")
	}
	if uint64(h.rtClusters)*cs > MaxRefcountTableBytes {
		return nil, limitErr("refcount_table_clusters", 56, uint64(h.rtClusters), "clusters exceeds limit of %d bytes", MaxRefcountTableBytes)
	}
	if err := checkTable("refcount_table_offset", 48, h.rtOff, uint64(h.rtClusters)*cs, cs, fileSize); err != nil {
		return nil, err
	}

	// Snapshot table location (contents are validated when loaded).
	if h.nbSnapshots > MaxSnapshots {
		return nil, limitErr("nb_snapshots", 60, uint64(h.nbSnapshots), "exceeds limit %d", MaxSnapshots)
	}
	if h.nbSnapshots > 0 {
		if err := checkTable("snapshots_offset", 64, h.snapOff, uint64(h.nbSnapshots)*40, cs, fileSize); err != nil {
			return nil, err
		}
	} else if h.snapOff%cs != 0 {
		return nil, formatErr("snapshots_offset", 64, h.snapOff, "is not aligned to the cluster size %d", cs)
	}
	if h.compat&CompatLazyRefcounts != 0 && h.version < 3 {
		return nil, formatErr("compatible_features", 80, h.compat, "sets lazy refcounts on a version 2 image")
	}
	return h, nil
}

// checkTable validates a table location: cluster aligned, not at cluster 0,
// below the maximal host offset, and inside the file.
func checkTable(field string, at int64, off, size, cs uint64, fileSize int64) error {
	if off%cs != 0 {
		return formatErr(field, at, off, "is not aligned to the cluster size %d", cs)
	}
	if off == 0 {
		return formatErr(field, at, off, "points at cluster 0 (the header)")
	}
	if off > MaxHostOffset || size > MaxHostOffset-off {
		return formatErr(field, at, off, "with %d bytes exceeds the largest host offset", size)
	}
	if off+size > uint64(fileSize) {
		return formatErr(field, at, off, "with %d bytes extends beyond the end of the file (%d bytes)", size, fileSize)
	}
	return nil
}

// parseExtensions walks the header extensions from the end of the header up
// to end (exclusive), validating every record before reading it.
func (h *header) parseExtensions(buf []byte, end uint64) error {
	off := uint64(h.headerLen)
	seen := map[uint32]bool{}
	// Bytes past the end of the file read as zeros, which is an end marker.
	at := func(o uint64) []byte {
		if o >= uint64(len(buf)) {
			return nil
		}
		return buf[o:]
	}
	for off < end {
		if end-off < 8 {
			return formatErr("header_extension", int64(off), end-off, "bytes left: too short for an extension header")
		}
		var typ, length uint32
		if b := at(off); len(b) >= 8 {
			typ = binary.BigEndian.Uint32(b)
			length = binary.BigEndian.Uint32(b[4:])
		} else if len(b) > 0 {
			return formatErr("header_extension", int64(off), uint64(len(b)), "bytes left before end of file: truncated extension header")
		}
		off += 8
		if typ == extEnd {
			return nil
		}
		if uint64(length) > end-off {
			return formatErr("header_extension_length", int64(off-4), uint64(length), "of extension %#x exceeds the header area (ends at %d)", typ, end)
		}
		if off+uint64(length) > uint64(len(buf)) {
			return formatErr("header_extension_length", int64(off-4), uint64(length), "of extension %#x extends beyond the end of the file", typ)
		}
		data := buf[off : off+uint64(length)]
		switch typ {
		case extBackingFormat, extFeatureTable, extBitmaps, extCrypto, extDataFile:
			if seen[typ] {
				return formatErr("header_extension", int64(off-8), uint64(typ), "appears twice")
			}
			seen[typ] = true
		}
		switch typ {
		case extBackingFormat:
			if length >= 16 {
				return formatErr("backing_format_length", int64(off-4), uint64(length), "is too long (max 15)")
			}
			h.backingFormat = string(bytes.TrimRight(data, "\x00"))
		case extFeatureTable:
			for i := 0; i+48 <= len(data); i += 48 {
				name := string(bytes.TrimRight(data[i+2:i+48], "\x00"))
				h.features = append(h.features, FeatureName{Type: int(data[i]), Bit: int(data[i+1]), Name: name})
			}
		case extBitmaps:
			if length != 24 {
				return formatErr("bitmaps_extension_length", int64(off-4), uint64(length), "is not 24")
			}
			b := &bitmapsExt{
				nbBitmaps: binary.BigEndian.Uint32(data),
				dirSize:   binary.BigEndian.Uint64(data[8:]),
				dirOff:    binary.BigEndian.Uint64(data[16:]),
			}
			if h.autoclear&AutoclearBitmaps != 0 {
				cs := uint64(1) << h.clusterBits
				if b.nbBitmaps == 0 || b.nbBitmaps > 65535 {
					return formatErr("nb_bitmaps", int64(off), uint64(b.nbBitmaps), "out of range 1..65535")
				}
				if b.dirSize > 1024*65535 {
					return limitErr("bitmap_directory_size", int64(off+8), b.dirSize, "exceeds limit %d", 1024*65535)
				}
				if b.dirOff%cs != 0 || b.dirOff == 0 || b.dirOff > MaxHostOffset {
					return formatErr("bitmap_directory_offset", int64(off+16), b.dirOff, "is not a valid cluster-aligned offset")
				}
				h.bitmapsExt = b
			}
		case extCrypto:
			if h.cryptMethod != 2 {
				return formatErr("crypt_method", 32, uint64(h.cryptMethod), "is not LUKS but a full-disk encryption header extension is present")
			}
		case extDataFile:
			if length > MaxBackingNameLen {
				return limitErr("data_file_name_length", int64(off-4), uint64(length), "exceeds limit %d", MaxBackingNameLen)
			}
			h.dataFile = string(bytes.TrimRight(data, "\x00"))
		default:
			h.unknownExts = append(h.unknownExts, Extension{Type: typ, Data: append([]byte(nil), data...)})
		}
		off += (uint64(length) + 7) &^ 7
	}
	return nil
}

// checkFileName refuses names that would make us reach for anything but a
// plain file: json: pseudo-protocol names (CVE-2024-4467 class) and
// protocol prefixes such as "nbd:" or "http:".
func checkFileName(field, name string) error {
	if name == "" {
		return fmt.Errorf("%w: %s is empty", ErrBacking, field)
	}
	if strings.ContainsRune(name, 0) {
		return fmt.Errorf("%w: %s %q contains a NUL byte", ErrBacking, field, name)
	}
	// Control characters (line breaks, escapes) have no place in a file
	// name and would leak into error messages unquoted via *fs.PathError.
	if strings.ContainsFunc(name, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return fmt.Errorf("%w: %s %q contains a control character", ErrBacking, field, name)
	}
	if i := strings.IndexByte(name, ':'); i > 0 {
		prefix := name[:i]
		isProto := true
		for _, r := range prefix {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '+' || r == '-' || r == '.') {
				isProto = false
				break
			}
		}
		if isProto && !strings.Contains(prefix, "/") {
			return fmt.Errorf("%w: %s %q is a protocol or json: name, not a file name", ErrBacking, field, name)
		}
	}
	return nil
}
