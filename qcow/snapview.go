package qcow

import (
	"fmt"
	"math"
)

// SnapshotView is a read-only view of the virtual disk as an internal
// snapshot holds it: its own L1 table, its own virtual size, and the
// image's data and backing chain. It reads the file as it is on disk, so
// on an image open for writing it sees what the writer has written (a
// correct writer never changes a snapshot's clusters). It is valid until
// the image is closed and is safe for concurrent use.
type SnapshotView struct {
	v *Image // the image with the snapshot's L1 table and size, read-only
	s Snapshot
}

// SnapshotView returns the view of snapshot s, one of those Snapshots
// returned. The snapshot's L1 table (bounded by MaxL1Bytes and the file,
// as Snapshots checks) is read and every entry validated now; its virtual
// size is its disk_size, or the image's size when the entry has none
// (extra data shorter than 16 bytes, as qemu reads it).
func (im *Image) SnapshotView(s Snapshot) (*SnapshotView, error) {
	if im.format != FormatQCOW2 {
		return nil, fmt.Errorf("%w: %s: format %s has no internal snapshots", ErrUnsupported, im.name, im.format)
	}
	if w := im.w; w != nil {
		w.mu.RLock()
		defer w.mu.RUnlock()
	}
	cs := uint64(im.clusterSize)
	if uint64(s.L1Size) > MaxL1Bytes/8 {
		return nil, limitErr("snapshot_l1_size", -1, uint64(s.L1Size), "entries exceeds limit %d (snapshot %q)", MaxL1Bytes/8, s.ID)
	}
	if s.L1Size > 0 {
		if err := checkTable("snapshot_l1_table_offset", -1, s.L1Offset, uint64(s.L1Size)*8, cs, im.fileSize); err != nil {
			return nil, err
		}
	}
	size := s.DiskSize
	if size == 0 {
		size = im.h.size
	}
	perL1 := cs * uint64(im.l2Entries)
	if size > math.MaxInt64-perL1 || (size+perL1-1)/perL1 > MaxL1Bytes/8 {
		return nil, formatErr("snapshot_disk_size", -1, size, "is too large for the cluster size %d (snapshot %q)", cs, s.ID)
	}
	h := *im.h
	h.size = size
	h.l1Off, h.l1Size = s.L1Offset, s.L1Size
	v := &Image{
		fsys: im.fsys, name: im.name, f: im.f, fileSize: im.fileSize, format: im.format, h: &h,
		dataFile: im.dataFile, dataSize: im.dataSize,
		clusterBits: im.clusterBits, clusterSize: im.clusterSize, l2Entries: im.l2Entries, extL2: im.extL2,
		backing: im.backing,
		l2c:     newL2Cache(4<<20, im.l2Bytes()),
	}
	if s.L1Size > 0 {
		l1, err := v.readTable(int64(s.L1Offset), int(s.L1Size))
		if err != nil {
			return nil, err
		}
		for i, e := range l1 {
			if err := v.checkSnapshotL1Entry(i, e, s.ID); err != nil {
				return nil, err
			}
		}
		v.l1 = l1
	}
	return &SnapshotView{v: v, s: s}, nil
}

// checkSnapshotL1Entry validates entry i of a snapshot's L1 table.
func (im *Image) checkSnapshotL1Entry(i int, e uint64, id string) error {
	at := int64(im.h.l1Off) + int64(i)*8
	if e&l1ReservedMask != 0 {
		return formatErr("snapshot_l1_entry", at, e, "has reserved bits set (index %d, snapshot %q)", i, id)
	}
	off := e & l1OffsetMask
	if off == 0 {
		return nil
	}
	if off%uint64(im.clusterSize) != 0 {
		return formatErr("snapshot_l1_entry", at, e, "points at unaligned L2 table offset %#x (index %d, snapshot %q)", off, i, id)
	}
	if off+uint64(im.clusterSize) > uint64(im.fileSize) {
		return formatErr("snapshot_l1_entry", at, e, "points at L2 table %#x beyond the end of the file (%d bytes; snapshot %q)", off, im.fileSize, id)
	}
	return nil
}

// Snapshot returns the snapshot the view shows.
func (sv *SnapshotView) Snapshot() Snapshot { return sv.s }

// Size returns the snapshot's virtual size in bytes.
func (sv *SnapshotView) Size() int64 { return sv.v.size() }

// ReadAt reads len(p) bytes of the snapshot's virtual disk at off, like
// Image.ReadAt (io.EOF at the end of the disk).
func (sv *SnapshotView) ReadAt(p []byte, off int64) (int, error) { return sv.v.readAt(p, off) }

// BlockStatus is Image.BlockStatus of the snapshot's disk.
func (sv *SnapshotView) BlockStatus(off, n int64) (length int64, zero bool, err error) {
	return sv.v.BlockStatus(off, n)
}
