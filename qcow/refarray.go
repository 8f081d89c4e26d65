package qcow

// The checker's reference counts: one small counter per host cluster,
// with the kind of structure that first referenced it, allocated in chunks
// only where the file has clusters that are referenced.

import (
	"math"
)

// refKind names what a host cluster (or, for version 1, a byte range) is
// used for, so that two different structures claiming the same cluster can
// be reported as an overlap.
type refKind uint8

const (
	kindNone refKind = iota
	kindHeader
	kindL1
	kindSnapL1
	kindSnapTable
	kindL2
	kindData
	kindCompressed
	kindRefTable
	kindRefBlock
	kindBitmapDir
	kindBitmapTable
	kindBitmapData
	kindBackingName
)

var refKindNames = [...]string{
	kindNone:        "nothing",
	kindHeader:      "the header",
	kindL1:          "the active L1 table",
	kindSnapL1:      "a snapshot L1 table",
	kindSnapTable:   "the snapshot table",
	kindL2:          "an L2 table",
	kindData:        "a data cluster",
	kindCompressed:  "compressed data",
	kindRefTable:    "the refcount table",
	kindRefBlock:    "a refcount block",
	kindBitmapDir:   "the bitmap directory",
	kindBitmapTable: "a bitmap table",
	kindBitmapData:  "a bitmap data cluster",
	kindBackingName: "the backing file name",
}

func (k refKind) String() string {
	if int(k) < len(refKindNames) {
		return refKindNames[k]
	}
	return "unknown"
}

// refArray holds the reference count computed for every host cluster, and
// the kind of the first structure that referenced it. Counts are one byte;
// counts of 255 and more live in a map. Chunks are allocated on first use,
// so memory follows the clusters actually referenced, not the file size.
type refArray struct {
	chunks []*refChunk
	big    map[int64]uint64
}

const (
	refChunkBits = 12
	refChunkLen  = 1 << refChunkBits
	refSaturated = math.MaxUint8
)

type refChunk struct {
	n    [refChunkLen]uint8
	kind [refChunkLen]refKind
}

func newRefArray(clusters int64) refArray {
	return refArray{chunks: make([]*refChunk, (clusters+refChunkLen-1)>>refChunkBits), big: map[int64]uint64{}}
}

func (a *refArray) get(i int64) uint64 {
	c := a.chunks[i>>refChunkBits]
	if c == nil {
		return 0
	}
	n := c.n[i&(refChunkLen-1)]
	if n == refSaturated {
		return a.big[i]
	}
	return uint64(n)
}

func (a *refArray) kind(i int64) refKind {
	if c := a.chunks[i>>refChunkBits]; c != nil {
		return c.kind[i&(refChunkLen-1)]
	}
	return kindNone
}

// add adds m references of kind k to cluster i, saturating at max. It
// returns the kind that had claimed the cluster before (kindNone if none)
// and the number of references that did not fit.
func (a *refArray) add(i int64, m, max uint64, k refKind) (prev refKind, lost uint64) {
	c := a.chunks[i>>refChunkBits]
	if c == nil {
		c = new(refChunk)
		a.chunks[i>>refChunkBits] = c
	}
	j := i & (refChunkLen - 1)
	prev = c.kind[j]
	if prev == kindNone {
		c.kind[j] = k
	}
	old := uint64(c.n[j])
	if old == refSaturated {
		old = a.big[i]
	}
	v := old + m
	if v < old || v > max {
		v = max
		lost = old + m - max
		if old+m < old { // wrapped: far beyond any width
			lost = math.MaxUint64
		}
	}
	if v >= refSaturated {
		c.n[j] = refSaturated
		a.big[i] = v
	} else {
		c.n[j] = uint8(v)
	}
	return prev, lost
}

// empty reports whether no cluster of the chunk holding i was referenced.
func (a *refArray) empty(i int64) bool { return a.chunks[i>>refChunkBits] == nil }
