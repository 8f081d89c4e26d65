package kvmtool2011

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// Sentinel errors. Every error this package returns for a refused image
// or a refused write wraps one of them.
var (
	// ErrNotQCOW: the file does not start with the QCOW magic, or its
	// version is not 1 or 2 (kvmtool's qcow_probe of 2011 would not have
	// recognised it as QCOW).
	ErrNotQCOW = errors.New("kvmtool2011: not a QCOW version 1 or 2 image")
	// ErrHeader: a header field is out of the range this port accepts
	// (see the package documentation: these checks are additions).
	ErrHeader = errors.New("kvmtool2011: invalid header")
	// ErrPastEnd: a write reaches a cluster at or past the virtual size
	// (patch line 195), or its offset or length is negative.
	ErrPastEnd = errors.New("kvmtool2011: write past the virtual size")
	// ErrL1Index: the write maps to an L1 index at or past the L1 table
	// kvmtool read (patch line 102); for QCOW version 1 this is the last,
	// partial L1 range, because kvmtool rounded the table size down.
	ErrL1Index = errors.New("kvmtool2011: L1 index out of the table")
	// ErrIO: a file operation failed, or file_size returned 0; kvmtool's
	// write path returned -1.
	ErrIO = errors.New("kvmtool2011: I/O error")
	// ErrClosed: the image was closed.
	ErrClosed = errors.New("kvmtool2011: image is closed")
)

// The QCOW magic "QFI\xfb" and the header layouts kvmtool read in 2011
// (struct qcow1_header_disk, struct qcow2_header_disk).
const (
	magic       = 0x514649fb
	v1HeaderLen = 48 // up to and including l1_table_offset
	v2HeaderLen = 72 // up to and including snapshots_offset

	// oflag masks (kvm/qcow.h of 2011): v1 masks the compressed bit;
	// v2 masks QCOW_OFLAG_COPIED and QCOW_OFLAG_COMPRESSED.
	v1OflagMask = uint64(1) << 63
	v2OflagMask = uint64(1)<<63 | uint64(1)<<62

	// maxL1Bytes bounds the L1 table read at open (qemu's
	// QCOW_MAX_L1_SIZE); an addition, see the package documentation.
	maxL1Bytes = 32 << 20
)

// header is kvmtool's struct qcow_header: the fields of either version
// that the read and write paths use, in CPU order.
type header struct {
	version       uint32
	size          uint64 // virtual size in bytes
	l1TableOffset uint64
	l1Size        uint64 // entries in the L1 table kvmtool read
	clusterBits   uint32
	l2Bits        uint32
	oflagMask     uint64
}

// fieldErr returns an ErrHeader error naming the field and its value.
func fieldErr(field string, val uint64, format string, args ...any) error {
	return fmt.Errorf("%w: field %s = %d: %s", ErrHeader, field, val, fmt.Sprintf(format, args...))
}

// readHeader reads and validates the header of f (fileSize bytes long),
// as kvmtool's qcow1_read_header and qcow2_read_header did, with the
// bounds checks this port adds.
func readHeader(f vfs.File, fileSize int64) (*header, error) {
	if fileSize < 8 {
		return nil, fmt.Errorf("%w: file of %d bytes has no header", ErrNotQCOW, fileSize)
	}
	var buf [v2HeaderLen]byte
	n, err := f.ReadAt(buf[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: read header: %w", ErrIO, err)
	}
	b := buf[:n]
	if m := binary.BigEndian.Uint32(b[0:]); m != magic {
		return nil, fmt.Errorf("%w: field magic = %#x", ErrNotQCOW, m)
	}
	h := &header{version: binary.BigEndian.Uint32(b[4:])}
	switch h.version {
	case 1:
		if len(b) < v1HeaderLen {
			return nil, fieldErr("file_size", uint64(fileSize), "shorter than the %d-byte version 1 header", v1HeaderLen)
		}
		h.size = binary.BigEndian.Uint64(b[24:])
		h.clusterBits = uint32(b[32])
		h.l2Bits = uint32(b[33])
		h.l1TableOffset = binary.BigEndian.Uint64(b[40:])
		h.oflagMask = v1OflagMask
		// qemu's bounds for version 1.
		if h.clusterBits < 9 || h.clusterBits > 16 {
			return nil, fieldErr("cluster_bits", uint64(h.clusterBits), "out of range 9..16")
		}
		if h.l2Bits < 6 || h.l2Bits > 13 {
			return nil, fieldErr("l2_bits", uint64(h.l2Bits), "out of range 6..13")
		}
		// kvmtool: l1_size = size / ((1 << l2_bits) * (1 << cluster_bits)),
		// rounded down (see the package documentation).
		h.l1Size = h.size >> (h.l2Bits + h.clusterBits)
	case 2:
		if len(b) < v2HeaderLen {
			return nil, fieldErr("file_size", uint64(fileSize), "shorter than the %d-byte version 2 header", v2HeaderLen)
		}
		h.clusterBits = binary.BigEndian.Uint32(b[20:])
		h.size = binary.BigEndian.Uint64(b[24:])
		h.l1Size = uint64(binary.BigEndian.Uint32(b[36:]))
		h.l1TableOffset = binary.BigEndian.Uint64(b[40:])
		h.oflagMask = v2OflagMask
		// qemu's bounds for QCOW2.
		if h.clusterBits < 9 || h.clusterBits > 21 {
			return nil, fieldErr("cluster_bits", uint64(h.clusterBits), "out of range 9..21")
		}
		h.l2Bits = h.clusterBits - 3
	default:
		return nil, fmt.Errorf("%w: field version = %d (kvmtool of 2011 probed exactly 1 or 2)", ErrNotQCOW, h.version)
	}
	if h.l1Size > maxL1Bytes/8 {
		return nil, fieldErr("l1_size", h.l1Size, "L1 table exceeds %d bytes", maxL1Bytes)
	}
	end := h.l1TableOffset + h.l1Size*8 // no overflow: both bounded below
	if h.l1TableOffset > uint64(fileSize) || end > uint64(fileSize) {
		return nil, fieldErr("l1_table_offset", h.l1TableOffset, "L1 table of %d entries ends past the end of the file (%d bytes)", h.l1Size, fileSize)
	}
	return h, nil
}

// readL1 reads the L1 table and converts it to CPU order, as kvmtool's
// qcow_read_l1_table did.
func readL1(f vfs.File, h *header) ([]uint64, error) {
	raw := make([]byte, h.l1Size*8)
	if _, err := f.ReadAt(raw, int64(h.l1TableOffset)); err != nil {
		return nil, fmt.Errorf("%w: read L1 table at offset %d: %w", ErrIO, h.l1TableOffset, err)
	}
	l1 := make([]uint64, h.l1Size)
	for i := range l1 {
		l1[i] = binary.BigEndian.Uint64(raw[i*8:])
	}
	return l1, nil
}
