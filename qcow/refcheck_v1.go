package qcow

// The checker for QCOW version 1 images, which have no refcounts: it
// checks that no two structures or clusters overlap and that every offset
// lies inside the file.

import (
	"encoding/binary"
	"fmt"
	"slices"
)

// v1Extent is a host byte range used by a QCOW version 1 structure.
type v1Extent struct {
	off  uint64
	at   int64 // where it is referenced (-1: the header)
	n    uint32
	kind refKind
}

// runV1 checks a QCOW version 1 image, which has no refcounts: every L1 and
// L2 entry is checked for alignment and range, and no two structures (header,
// backing file name, L1, L2 tables, data and compressed clusters) may share
// a byte.
func (c *checker) runV1() (*CheckResult, error) {
	h := c.h
	size, err := c.im.f.Size()
	if err != nil {
		return nil, fmt.Errorf("qcow: %s: check: %w", c.im.name, err)
	}
	c.fileSize = size
	c.res.TotalClusters = int64((h.size + uint64(c.cs) - 1) >> c.cb)
	l2Bytes := c.im.l2Bytes()
	ext := []v1Extent{{off: 0, at: -1, n: v1HeaderLen, kind: kindHeader}}
	if h.backingLen > 0 {
		ext = append(ext, v1Extent{off: h.backingOff, at: 8, n: h.backingLen, kind: kindBackingName})
	}
	ext = append(ext, v1Extent{off: h.l1Off, at: 40, n: h.l1Size * 8, kind: kindL1})
	add := func(e v1Extent) bool {
		if len(ext) >= maxCheckV1Extents {
			if c.err == nil {
				c.err = limitErr("extents", -1, uint64(len(ext)), "host extents exceed the %d a check sorts", maxCheckV1Extents)
			}
			return false
		}
		ext = append(ext, e)
		return true
	}

	// L1 entries.
	var l2s []v1Extent
	l1 := c.readPadded(int64(h.l1Off), int64(h.l1Size)*8)
	for i := int64(0); i < int64(h.l1Size); i++ {
		e := binary.BigEndian.Uint64(l1[8*i:])
		at := int64(h.l1Off) + 8*i
		switch {
		case e == 0:
			continue
		case e%8 != 0:
			c.corrupt(1, at, "L1 entry %d: L2 table offset %#x is not 8-byte aligned", i, e)
		case e < v1HeaderLen:
			c.corrupt(1, at, "L1 entry %d: L2 table offset %#x overlaps the header", i, e)
		case e > MaxHostOffset || e+uint64(l2Bytes) > uint64(size):
			c.corrupt(1, at, "L1 entry %d: L2 table at %#x (%d bytes) extends beyond the end of the file (%d bytes)", i, e, l2Bytes, size)
		default:
			l2s = append(l2s, v1Extent{off: e, at: at, n: uint32(l2Bytes), kind: kindL2})
		}
	}
	l1 = nil
	slices.SortFunc(l2s, func(a, b v1Extent) int {
		if a.off < b.off {
			return -1
		} else if a.off > b.off {
			return 1
		}
		return int(a.at - b.at)
	})

	// L2 tables: each is an extent; only tables that do not overlap one
	// already walked are walked (overlaps are reported below).
	var end uint64
	for _, t := range l2s {
		if !add(t) {
			break
		}
		if t.off < end {
			continue
		}
		end = t.off + uint64(t.n)
		buf := c.readPadded(int64(t.off), l2Bytes)
		if c.err != nil {
			return nil, c.err
		}
		for j := int64(0); j < l2Bytes/8; j++ {
			e := binary.BigEndian.Uint64(buf[8*j:])
			if e == 0 {
				continue
			}
			at := int64(t.off) + 8*j
			c.res.AllocatedClusters++
			if e&(1<<63) != 0 {
				c.res.CompressedClusters++
				off, n := c.im.compressedRange(e)
				switch {
				case off < uint64(c.cs):
					c.corrupt(1, at, "L2 entry %#x: compressed data at %#x lies in the first cluster", e, off)
				case n == 0:
					c.corrupt(1, at, "L2 entry %#x: compressed data at %#x has size 0", e, off)
				case off >= uint64(size) || off+n > uint64(size):
					c.corrupt(1, at, "L2 entry %#x: compressed data at %#x (%d bytes) extends beyond the end of the file (%d bytes)", e, off, n, size)
				default:
					add(v1Extent{off: off, at: at, n: uint32(n), kind: kindCompressed})
				}
				continue
			}
			switch {
			case e%512 != 0:
				c.corrupt(1, at, "L2 entry %#x: data cluster is not 512-byte aligned", e)
			case e >= uint64(size):
				c.corrupt(1, at, "L2 entry %#x: data cluster lies beyond the end of the file (%d bytes)", e, size)
			default:
				add(v1Extent{off: e, at: at, n: uint32(min(uint64(c.cs), uint64(size)-e)), kind: kindData})
			}
		}
	}
	if c.err != nil {
		return nil, c.err
	}

	// Overlaps: sweep the extents in offset order.
	slices.SortFunc(ext, func(a, b v1Extent) int {
		if a.off < b.off {
			return -1
		} else if a.off > b.off {
			return 1
		}
		return int(a.at - b.at)
	})
	var top v1Extent // the extent reaching furthest so far
	var topEnd uint64
	for i, e := range ext {
		eEnd := e.off + uint64(e.n)
		if i > 0 && e.n > 0 && e.off < topEnd {
			c.corrupt(1, int64(e.off), "overlap: %s at %#x (%d bytes, referenced at %#x) overlaps %s at %#x (%d bytes, referenced at %#x)",
				e.kind, e.off, e.n, e.at, top.kind, top.off, top.n, top.at)
		}
		if eEnd > topEnd {
			top, topEnd = e, eEnd
		}
	}
	c.res.ImageEndOffset = int64(topEnd)
	return c.res, nil
}
