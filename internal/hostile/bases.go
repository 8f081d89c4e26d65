package hostile

import (
	"fmt"
	"sync"
)

// Base is a valid image (with any files it refers to), the starting point
// of the hostile variants.
type Base struct {
	Name    string
	Main    string            // the image to open
	Files   map[string][]byte // every file, by name relative to one directory
	Format  string            // "qcow" or "qcow2"
	Version int               // 1, 2 or 3
	Raw     []byte            // the guest disk the image (and its chain) must read as
	Built   *Built            // layout of Main
}

// Header field offsets of QCOW2.
const (
	OffVersion         = 4
	OffBackingOffset   = 8
	OffBackingSize     = 16
	OffClusterBits     = 20
	OffSize            = 24
	OffCryptMethod     = 32
	OffL1Size          = 36
	OffL1Offset        = 40
	OffRTOffset        = 48
	OffRTClusters      = 56
	OffNbSnapshots     = 60
	OffSnapshotsOffset = 64
	OffIncompat        = 72
	OffCompat          = 80
	OffAutoclear       = 88
	OffRefcountOrder   = 96
	OffHeaderLength    = 100
	OffCompressionType = 104
)

// Header field offsets of QCOW version 1.
const (
	V1OffBackingOffset = 8
	V1OffBackingSize   = 16
	V1OffSize          = 24
	V1OffClusterBits   = 32
	V1OffL2Bits        = 33
	V1OffCryptMethod   = 36
	V1OffL1Offset      = 40
)

const baseSize = 96 << 10 // 192 clusters of 512 bytes: three L1 entries

// rawPattern returns a raw disk of n bytes whose every 512-byte sector
// names tag and its index.
func rawPattern(tag string, n int) []byte {
	out := make([]byte, 0, n)
	for i := int64(0); len(out) < n; i++ {
		out = append(out, Pattern(tag, i, min(512, n-len(out)))...)
	}
	return out
}

// overlay describes what a QCOW image stores on top of its backing disk.
func overlay(disk []byte, cs int64, data, comp []Cluster, zero []int64) []byte {
	for _, c := range data {
		o := c.Index * cs
		clear(disk[o:min(o+cs, int64(len(disk)))])
		copy(disk[o:], c.Data)
	}
	for _, c := range comp {
		o := c.Index * cs
		clear(disk[o:min(o+cs, int64(len(disk)))])
		copy(disk[o:], c.Data)
	}
	for _, z := range zero {
		o := z * cs
		clear(disk[o:min(o+cs, int64(len(disk)))])
	}
	return disk
}

func clusters(tag string, cs int, idx ...int64) []Cluster {
	out := make([]Cluster, len(idx))
	for i, x := range idx {
		out[i] = Cluster{Index: x, Data: Pattern(tag, x, cs)}
	}
	return out
}

func must(b *Built, err error) *Built {
	if err != nil {
		// The bases are fixed descriptions: an error is a bug in this
		// package, not an input problem.
		panic(fmt.Sprintf("hostile: building a base image: %v", err))
	}
	return b
}

func qcow2Base(name string, q QCOW2) *Base {
	b := must(q.Build())
	main := name + ".qcow2"
	disk := overlay(make([]byte, q.Size), int64(1)<<q.ClusterBits, q.Data, q.Compressed, q.Zero)
	return &Base{Name: name, Main: main, Files: map[string][]byte{main: b.Bytes}, Format: "qcow2",
		Version: int(q.Version), Raw: disk, Built: b}
}

var (
	basesOnce sync.Once
	bases     []*Base
)

// Bases returns the valid base images. The result is shared: do not modify
// it (use Clone on a Built, or copy Files).
func Bases() []*Base {
	basesOnce.Do(func() { bases = makeBases() })
	return bases
}

// BaseByName returns the base called name, or nil.
func BaseByName(name string) *Base {
	for _, b := range Bases() {
		if b.Name == name {
			return b
		}
	}
	return nil
}

func makeBases() []*Base {
	var out []*Base

	// QCOW version 1.
	{
		q := QCOW1{ClusterBits: 9, L2Bits: 6, Size: baseSize,
			Data: clusters("v1", 512, 0, 1, 2, 100), Compressed: clusters("v1z", 512, 3, 150)}
		b := must(q.Build())
		out = append(out, &Base{Name: "v1", Main: "v1.qcow", Files: map[string][]byte{"v1.qcow": b.Bytes},
			Format: "qcow", Version: 1, Raw: overlay(make([]byte, q.Size), 512, q.Data, q.Compressed, nil), Built: b})
	}
	{
		raw := rawPattern("v1raw", baseSize)
		q := QCOW1{ClusterBits: 9, L2Bits: 6, Size: baseSize, BackingFile: "v1-backing.raw",
			Data: clusters("v1b", 512, 1), Compressed: clusters("v1bz", 512, 5)}
		b := must(q.Build())
		out = append(out, &Base{Name: "v1-backing", Main: "v1-backing.qcow",
			Files:  map[string][]byte{"v1-backing.qcow": b.Bytes, "v1-backing.raw": raw},
			Format: "qcow", Version: 1, Raw: overlay(append([]byte(nil), raw...), 512, q.Data, q.Compressed, nil), Built: b})
	}
	{
		q := QCOW1{ClusterBits: 12, L2Bits: 9, Size: 3 << 20,
			Data: clusters("v1big", 4096, 0, 700), Compressed: clusters("v1bigz", 4096, 1)}
		b := must(q.Build())
		out = append(out, &Base{Name: "v1-4k", Main: "v1-4k.qcow", Files: map[string][]byte{"v1-4k.qcow": b.Bytes},
			Format: "qcow", Version: 1, Raw: overlay(make([]byte, q.Size), 4096, q.Data, q.Compressed, nil), Built: b})
	}

	// QCOW2 version 2 and 3.
	out = append(out, qcow2Base("v2", QCOW2{Version: 2, ClusterBits: 9, Size: baseSize,
		Data: clusters("v2", 512, 0, 1, 2, 40, 130), Compressed: clusters("v2z", 512, 5, 70)}))
	out = append(out, qcow2Base("v3", QCOW2{Version: 3, ClusterBits: 9, Size: baseSize, FeatureTable: 5, Snapshot: true,
		Data: clusters("v3", 512, 0, 33), Compressed: clusters("v3z", 512, 2, 3), Zero: []int64{4, 64}}))
	out = append(out, qcow2Base("v3-104", QCOW2{Version: 3, ClusterBits: 9, HeaderLength: 104, Size: baseSize,
		Data: clusters("v3s", 512, 0), Compressed: clusters("v3sz", 512, 1)}))
	out = append(out, qcow2Base("v3-extl2", QCOW2{Version: 3, ClusterBits: 14, Size: 1 << 20, ExtendedL2: true,
		Data: clusters("x", 16384, 0, 5), Compressed: clusters("xz", 16384, 7), Zero: []int64{6}}))
	out = append(out, qcow2Base("v3-zstd", QCOW2{Version: 3, ClusterBits: 12, Size: baseSize, Zstd: true, FeatureTable: 5,
		Data: clusters("zd", 4096, 0), Compressed: clusters("zz", 4096, 1, 2, 20)}))
	for _, bits := range []uint32{1, 8, 64} {
		name := fmt.Sprintf("v3-refcount%d", bits)
		out = append(out, qcow2Base(name, QCOW2{Version: 3, ClusterBits: 9, RefcountBits: bits, Size: baseSize,
			Data: clusters(name, 512, 0, 1), Compressed: clusters(name+"z", 512, 2)}))
	}

	// A chain: raw <- qcow2 v2 <- qcow2 v3.
	{
		raw := rawPattern("chainraw", baseSize)
		mq := QCOW2{Version: 2, ClusterBits: 9, Size: baseSize, BackingFile: "chain-base.raw", BackingFormat: "raw",
			Data: clusters("mid", 512, 0, 1, 3)}
		mid := must(mq.Build())
		tq := QCOW2{Version: 3, ClusterBits: 9, Size: baseSize, BackingFile: "chain-mid.qcow2", BackingFormat: "qcow2",
			Data: clusters("top", 512, 0), Zero: []int64{1}, Compressed: clusters("topz", 512, 2)}
		top := must(tq.Build())
		disk := overlay(append([]byte(nil), raw...), 512, mq.Data, nil, nil)
		disk = overlay(disk, 512, tq.Data, tq.Compressed, tq.Zero)
		out = append(out, &Base{Name: "v3-backing", Main: "v3-backing.qcow2", Files: map[string][]byte{
			"v3-backing.qcow2": top.Bytes, "chain-mid.qcow2": mid.Bytes, "chain-base.raw": raw},
			Format: "qcow2", Version: 3, Raw: disk, Built: top})
	}
	return out
}

// Seed is a named input for the fuzz corpus.
type Seed struct {
	Name string
	Data []byte
}

// TinySeeds returns valid images small enough to be stored as fuzz corpus
// files (a few KiB once quoted). FuzzOpen stores its input under the name
// "img", so the self-backed seed makes a backing loop.
func TinySeeds() []Seed {
	var out []Seed
	add := func(name string, b *Built) { out = append(out, Seed{name, b.Bytes}) }
	add("tiny-v1", must(QCOW1{ClusterBits: 9, L2Bits: 6, Size: 32 << 10,
		Data: clusters("t1", 512, 0), Compressed: clusters("t1z", 512, 1)}.Build()))
	add("tiny-v1-backing-self", must(QCOW1{ClusterBits: 9, L2Bits: 6, Size: 32 << 10, BackingFile: "img",
		Compressed: clusters("t1b", 512, 3)}.Build()))
	add("tiny-v2-empty", must(QCOW2{Version: 2, ClusterBits: 9, Size: 32 << 10}.Build()))
	add("tiny-v3-empty", must(QCOW2{Version: 3, ClusterBits: 9, Size: 64 << 10, FeatureTable: 2}.Build()))
	add("tiny-v3-backing-self", must(QCOW2{Version: 3, ClusterBits: 9, Size: 32 << 10, BackingFile: "img", BackingFormat: "qcow2"}.Build()))
	add("tiny-v3-refcount1", must(QCOW2{Version: 3, ClusterBits: 9, HeaderLength: 104, RefcountBits: 1, Size: 32 << 10}.Build()))
	return out
}
