package qcow

import (
	"encoding/binary"
	"fmt"
	"time"
)

// Snapshot describes an internal snapshot stored in a QCOW2 image.
type Snapshot struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	Date        time.Time `json:"date"`
	VMClockNsec uint64    `json:"vm_clock_nsec"`
	VMStateSize uint64    `json:"vm_state_size"`
	DiskSize    uint64    `json:"disk_size,omitempty"`
	L1Offset    uint64    `json:"l1_table_offset"`
	L1Size      uint32    `json:"l1_size"`
}

const snapshotFixedLen = 40

// Snapshots reads and validates the snapshot table. Each entry and the
// table as a whole are bounded (MaxSnapshotExtraData, MaxSnapshotTableBytes,
// the file size) before anything is allocated.
func (im *Image) Snapshots() ([]Snapshot, error) {
	if im.format != FormatQCOW2 || im.h.nbSnapshots == 0 {
		return nil, nil
	}
	_, snaps, err := im.readSnapshots()
	return snaps, err
}

// readSnapshots returns the table's total size in bytes and its entries.
func (im *Image) readSnapshots() (int64, []Snapshot, error) {
	h := im.h
	off := int64(h.snapOff)
	start := off
	cs := uint64(im.clusterSize)
	var snaps []Snapshot
	var fixed [snapshotFixedLen]byte
	for i := uint32(0); i < h.nbSnapshots; i++ {
		if off-start+snapshotFixedLen > MaxSnapshotTableBytes {
			return 0, nil, limitErr("snapshot_table_size", int64(h.snapOff), uint64(off-start), "bytes exceeds limit %d at snapshot %d", MaxSnapshotTableBytes, i)
		}
		if off+snapshotFixedLen > im.fileSize {
			return 0, nil, formatErr("snapshot", off, uint64(i), "entry extends beyond the end of the file")
		}
		if err := im.readFull(fixed[:], off); err != nil {
			return 0, nil, fmt.Errorf("qcow: snapshot %d entry: %w", i, err) // an I/O error: keep it
		}
		c := cursor{b: fixed[:]}
		s := Snapshot{}
		s.L1Offset = c.u64()
		s.L1Size = c.u32()
		idLen := int64(c.u16())
		nameLen := int64(c.u16())
		sec := c.u32()
		nsec := c.u32()
		s.Date = time.Unix(int64(sec), int64(nsec)).UTC()
		s.VMClockNsec = c.u64()
		s.VMStateSize = uint64(c.u32())
		extra := int64(c.u32())
		if extra > MaxSnapshotExtraData {
			return 0, nil, limitErr("snapshot_extra_data_size", off+36, uint64(extra), "exceeds limit %d (snapshot %d)", MaxSnapshotExtraData, i)
		}
		if h.version >= 3 && extra < 16 {
			return 0, nil, formatErr("snapshot_extra_data_size", off+36, uint64(extra), "is below 16 in a version 3 image (snapshot %d)", i)
		}
		varLen := extra + idLen + nameLen
		if off+snapshotFixedLen+varLen-start > MaxSnapshotTableBytes {
			return 0, nil, limitErr("snapshot_table_size", int64(h.snapOff), uint64(off+snapshotFixedLen+varLen-start), "bytes exceeds limit %d at snapshot %d", MaxSnapshotTableBytes, i)
		}
		if off+snapshotFixedLen+varLen > im.fileSize {
			return 0, nil, formatErr("snapshot", off, uint64(i), "entry extends beyond the end of the file")
		}
		vb := make([]byte, varLen)
		if err := im.readFull(vb, off+snapshotFixedLen); err != nil {
			return 0, nil, err
		}
		if extra >= 16 {
			s.VMStateSize = binary.BigEndian.Uint64(vb)
			s.DiskSize = binary.BigEndian.Uint64(vb[8:])
		}
		s.ID = string(vb[extra : extra+idLen])
		s.Name = string(vb[extra+idLen:])
		if uint64(s.L1Size) > MaxL1Bytes/8 {
			return 0, nil, limitErr("snapshot_l1_size", off+8, uint64(s.L1Size), "entries exceeds limit %d (snapshot %d)", MaxL1Bytes/8, i)
		}
		if s.L1Size > 0 {
			if err := checkTable("snapshot_l1_table_offset", off, s.L1Offset, uint64(s.L1Size)*8, cs, im.fileSize); err != nil {
				return 0, nil, err
			}
		}
		snaps = append(snaps, s)
		off += (snapshotFixedLen + varLen + 7) &^ 7
	}
	return off - start, snaps, nil
}
