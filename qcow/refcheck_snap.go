package qcow

// The checker's walk of the internal snapshots (their tables and L1
// tables) and of the persistent bitmaps extension.

import (
	"encoding/binary"
	"fmt"
	"slices"
)

// snapL1 is one snapshot's L1 table as the checker walks it.
type snapL1 struct {
	off  uint64
	size uint32
	refs uint64
	id   string
	at   int64
}

// checkSnapshots parses the snapshot table tolerantly (every bad entry is a
// finding, not an error), counts the table, and walks each snapshot's L1
// table and, through it, its L2 tables and data.
func (c *checker) checkSnapshots() {
	h := c.h
	if h.nbSnapshots == 0 {
		return
	}
	if c.dataFile {
		c.corrupt(1, 60, "%d snapshots in an image with an external data file", h.nbSnapshots)
	}
	var snaps []snapL1
	off := int64(h.snapOff)
	var tableLen int64 // qemu's snapshots_size
	var fixed [snapshotFixedLen]byte
	for i := uint32(0); i < h.nbSnapshots && c.err == nil; i++ {
		off = (off + 7) &^ 7
		tableLen = (tableLen + 7) &^ 7
		if off+snapshotFixedLen > c.fileSize {
			c.corrupt(uint64(h.nbSnapshots-i), off, "snapshot table entry %d at %#x lies beyond the end of the file (%d bytes); %d snapshots not checked", i, off, c.fileSize, h.nbSnapshots-i)
			c.incomplete = true
			break
		}
		copy(fixed[:], c.readPadded(off, snapshotFixedLen))
		s := snapL1{off: binary.BigEndian.Uint64(fixed[0:]), size: binary.BigEndian.Uint32(fixed[8:]), refs: 1, at: off}
		idLen := int64(binary.BigEndian.Uint16(fixed[12:]))
		nameLen := int64(binary.BigEndian.Uint16(fixed[14:]))
		extra := int64(binary.BigEndian.Uint32(fixed[36:]))
		kept := extra
		if extra > MaxSnapshotExtraData {
			c.corrupt(1, off+36, "snapshot table entry %d: extra data size %d exceeds %d", i, extra, MaxSnapshotExtraData)
			kept = MaxSnapshotExtraData
		}
		if h.version >= 3 && extra < 16 {
			c.corrupt(1, off+36, "snapshot table entry %d is incomplete: extra data size %d is below 16 in a version 3 image", i, extra)
		}
		idOff := off + snapshotFixedLen + extra
		s.id = string(c.readPadded(idOff, min(idLen, 64)))
		off = idOff + idLen + nameLen
		tableLen += snapshotFixedLen + kept + idLen + nameLen
		if tableLen > MaxSnapshotTableBytes {
			c.corrupt(uint64(h.nbSnapshots-i), s.at, "snapshot table is too big (over %d bytes at entry %d); %d snapshots not checked", MaxSnapshotTableBytes, i, h.nbSnapshots-i)
			c.incomplete = true
			break
		}
		switch {
		case s.off%uint64(c.cs) != 0:
			c.corrupt(1, s.at, "snapshot %q: L1 table offset %#x is not cluster aligned", s.id, s.off)
			c.incomplete = true
			continue
		case uint64(s.size) > MaxL1Bytes/8:
			c.corrupt(1, s.at+8, "snapshot %q: L1 table of %d entries is too large (limit %d)", s.id, s.size, MaxL1Bytes/8)
			c.incomplete = true
			continue
		case s.size > 0 && s.off == 0:
			c.corrupt(1, s.at, "snapshot %q: L1 table at offset 0 (the header)", s.id)
			c.incomplete = true
			continue
		case s.size == 0:
			continue
		}
		snaps = append(snaps, s)
	}
	c.ref(int64(h.snapOff), tableLen, kindSnapTable, 1, 64)

	// Each distinct L1 table is walked once, counted as often as snapshots
	// name it; L1 tables that overlap another are reported and not walked.
	slices.SortFunc(snaps, func(a, b snapL1) int {
		switch {
		case a.off != b.off:
			if a.off < b.off {
				return -1
			}
			return 1
		case a.size != b.size:
			return int(int64(a.size) - int64(b.size))
		}
		return 0
	})
	uniq := snaps[:0]
	for _, s := range snaps {
		if n := len(uniq); n > 0 && uniq[n-1].off == s.off && uniq[n-1].size == s.size {
			uniq[n-1].refs++
			continue
		}
		uniq = append(uniq, s)
	}
	activeOff, activeEnd := c.h.l1Off, c.h.l1Off+uint64(c.h.l1Size)*8
	var end uint64
	for _, s := range uniq {
		if c.err != nil {
			return
		}
		sEnd := s.off + uint64(s.size)*8
		if s.off < end || (c.h.l1Size > 0 && s.off < activeEnd && activeOff < sEnd) {
			c.corrupt(s.refs, int64(s.off), "snapshot %q: L1 table at %#x overlaps another L1 table; not walked", s.id, s.off)
			c.incomplete = true
			c.ref(int64(s.off), int64(s.size)*8, kindSnapL1, s.refs, s.at)
			continue
		}
		end = sEnd
		c.walkL1(int64(s.off), int64(s.size), s.refs, false, kindSnapL1, fmt.Sprintf("snapshot %q L1", s.id))
	}
}

// Bitmap directory and table layout (qcow2 bitmaps extension).
const (
	bitmapDirEntryLen      = 24
	bitmapMaxTableEntries  = 0x8000000
	bitmapMaxNameLen       = 1023
	bitmapEntryReserved    = 0xff000000000001fe
	bitmapEntryOffsetMask  = 0x00fffffffffffe00
	bitmapEntryAllOnes     = 1
	bitmapMaxGranularity   = 31
	bitmapMinGranularity   = 9
	bitmapReservedFlags    = ^uint32(3)
	bitmapTypeDirtyTracker = 1
)

// checkBitmaps counts the bitmap directory, each bitmap table and each
// bitmap data cluster, as qemu's qcow2_check_bitmaps_refcounts does. The
// extension is only honoured when its autoclear bit is set.
func (c *checker) checkBitmaps() {
	b := c.h.bitmapsExt
	if b == nil {
		return
	}
	if !c.ref(int64(b.dirOff), int64(b.dirSize), kindBitmapDir, 1, -1) {
		return
	}
	dir := c.readPadded(int64(b.dirOff), int64(b.dirSize))
	type table struct {
		off  uint64
		size uint32
		at   int64
	}
	var tables []table
	var n uint32
	for p := int64(0); p < int64(len(dir)); n++ {
		at := int64(b.dirOff) + p
		if p+bitmapDirEntryLen > int64(len(dir)) {
			c.corrupt(1, at, "bitmap directory entry %d is truncated", n)
			c.incomplete = true
			return
		}
		e := dir[p:]
		t := table{off: binary.BigEndian.Uint64(e), size: binary.BigEndian.Uint32(e[8:]), at: at}
		flags := binary.BigEndian.Uint32(e[12:])
		typ, gran := e[16], e[17]
		nameLen := int64(binary.BigEndian.Uint16(e[18:]))
		extra := int64(binary.BigEndian.Uint32(e[20:]))
		entLen := (bitmapDirEntryLen + extra + nameLen + 7) &^ 7
		if entLen > int64(len(dir))-p {
			c.corrupt(1, at, "bitmap directory entry %d (%d bytes) extends beyond the directory", n, entLen)
			c.incomplete = true
			return
		}
		p += entLen
		if t.size == 0 || t.off == 0 || t.off%uint64(c.cs) != 0 || t.size > bitmapMaxTableEntries ||
			gran > bitmapMaxGranularity || gran < bitmapMinGranularity || flags&bitmapReservedFlags != 0 ||
			nameLen == 0 || nameLen > bitmapMaxNameLen || typ != bitmapTypeDirtyTracker {
			c.corrupt(1, at, "bitmap directory entry %d is invalid (table %#x of %d entries, flags %#x, type %d, granularity bits %d, name length %d)", n, t.off, t.size, flags, typ, gran, nameLen)
			c.incomplete = true
			continue
		}
		tables = append(tables, t)
	}
	if n != b.nbBitmaps {
		c.corrupt(1, int64(b.dirOff), "bitmap directory holds %d entries, the header extension says %d", n, b.nbBitmaps)
	}
	slices.SortFunc(tables, func(a, b table) int {
		if a.off < b.off {
			return -1
		} else if a.off > b.off {
			return 1
		}
		return 0
	})
	var end uint64
	for _, t := range tables {
		if c.err != nil {
			return
		}
		size := int64(t.size) * 8
		if !c.ref(int64(t.off), size, kindBitmapTable, 1, t.at) {
			continue
		}
		if t.off < end {
			c.corrupt(1, int64(t.off), "bitmap table at %#x overlaps another bitmap table; not walked", t.off)
			c.incomplete = true
			continue
		}
		end = t.off + uint64(size)
		const chunk = 1 << 17 // entries per read
		for base := int64(0); base < int64(t.size) && c.err == nil; base += chunk {
			cnt := min(chunk, int64(t.size)-base)
			buf := c.readPadded(int64(t.off)+8*base, 8*cnt)
			for i := int64(0); i < cnt; i++ {
				e := binary.BigEndian.Uint64(buf[8*i:])
				at := int64(t.off) + 8*(base+i)
				off := e & bitmapEntryOffsetMask
				if e&bitmapEntryReserved != 0 || (off != 0 && (e&bitmapEntryAllOnes != 0 || off%uint64(c.cs) != 0)) {
					c.corrupt(1, at, "bitmap table entry %#x is invalid", e)
					continue
				}
				if off != 0 {
					c.ref(int64(off), c.cs, kindBitmapData, 1, at)
				}
			}
		}
	}
}
