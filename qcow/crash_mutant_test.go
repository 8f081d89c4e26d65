package qcow

// Tests written to kill the mutants of the writer that the Crash suite let
// live (scripts/mutation.sh). They are named TestCrash... so that the
// script's killing test set (`go test -short -run Crash ./qcow`) runs them;
// each asserts behaviour of the writer that a mutant changed: a bound, a
// guard, a cache size, a retry after an error. They are white-box where the
// behaviour cannot be reached from the public API in a few milliseconds.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/internal/hostile"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// mutOpen creates "img" (configuration c, virtual size size) in a new
// memory FS wrapped by faultfs and opens it for writing with opts.
func mutOpen(t *testing.T, c crashConfig, size int64, opts Options) (*faultfs.FS, *Image) {
	t.Helper()
	mem, _ := crashSetup(t, c, size, 1)
	ffs := faultfs.New(mem)
	opts.ReadWrite = true
	im, err := Open(ffs, "img", &opts)
	if err != nil {
		t.Fatalf("%s: open: %v", c, err)
	}
	return ffs, im
}

// mutClean requires "img" in fsys to check without corruption, check error
// or leak.
func mutClean(t *testing.T, fsys vfs.FS) {
	t.Helper()
	res, err := CheckFile(fsys, "img", "")
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	if res.Corruptions != 0 || res.CheckErrors != 0 || res.Leaks != 0 {
		t.Fatalf("check: %d corruptions, %d check errors, %d leaks: %s",
			res.Corruptions, res.CheckErrors, res.Leaks, crashFindings(res))
	}
}

// mutCloseClean closes im and requires the file "img" in fsys to check
// clean.
func mutCloseClean(t *testing.T, im *Image, fsys vfs.FS) {
	t.Helper()
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	mutClean(t, fsys)
}

// mutWriteReopen writes p at off through im, closes it, requires a clean
// check, and reopens the file "img" of fsys read-only (closed when the test
// ends). err says whether p reads back at off.
func mutWriteReopen(t *testing.T, im *Image, fsys vfs.FS, p []byte, off int64) (re *Image, err error) {
	t.Helper()
	if _, err := im.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	mutCloseClean(t, im, fsys)
	if re, err = Open(fsys, "img", nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { re.Close() })
	got := make([]byte, len(p))
	if _, err := re.ReadAt(got, off); err != nil {
		return re, fmt.Errorf("read back %d bytes at %d: %w", len(p), off, err)
	}
	if !bytes.Equal(got, p) {
		return re, fmt.Errorf("the %d bytes written at %d do not read back", len(p), off)
	}
	return re, nil
}

// mutNoRefsPastEnd requires that no cluster at or past the end of the file
// "img" in fsys has a refcount: a writable open, which allocates after the
// last such cluster, must allocate right at the end of the file.
func mutNoRefsPastEnd(t *testing.T, fsys vfs.FS) {
	t.Helper()
	st, err := fsys.Stat("img")
	if err != nil {
		t.Fatal(err)
	}
	im, err := Open(fsys, "img", &Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if want := (st.Size() + im.w.cs - 1) &^ (im.w.cs - 1); im.w.end != want {
		t.Fatalf("clusters past the end of the file (%d bytes) have refcounts: the next allocation is at %d", st.Size(), im.w.end)
	}
}

// TestCrashMutantAllocBounds: alloc refuses a non-positive count and any
// allocation that would end beyond MaxHostOffset, without moving the end of
// the file; otherwise it returns the old end and moves it by n clusters.
func TestCrashMutantAllocBounds(t *testing.T) {
	const cs = 512
	top := int64(MaxHostOffset) + 1 // 2^56, cluster aligned
	tests := []struct {
		name    string
		end     int64 // w.end before the call (0: as opened)
		n       int64
		wantErr bool
	}{
		{"no cluster", 0, 0, true},
		{"negative count", 0, -1, true},
		{"one cluster as opened", 0, 1, false},
		{"one cluster, last that fits", top - 2*cs, 1, false},
		{"two clusters below the limit", top - 3*cs, 2, false},
		{"one cluster ending at 2^56", top - cs, 1, true},
		{"two clusters, one too many", top - 2*cs, 2, true},
		{"far beyond", top + 8*cs, 1, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// QCOW version 1: no refcounts, so alloc only moves the end.
			_, im := mutOpen(t, crashConfig{version: 1, cs: cs}, 1<<20, Options{})
			defer im.Close()
			w := im.w
			if tt.end != 0 {
				w.end = tt.end
			}
			before := w.end
			got, err := w.alloc(tt.n)
			if tt.wantErr {
				if !errors.Is(err, ErrLimit) {
					t.Fatalf("alloc(%d) at end %#x = %#x, %v; want an error wrapping ErrLimit", tt.n, before, got, err)
				}
				if w.end != before {
					t.Fatalf("a refused alloc moved the end from %#x to %#x", before, w.end)
				}
				return
			}
			if err != nil || got != before {
				t.Fatalf("alloc(%d) at end %#x = %#x, %v; want %#x, nil", tt.n, before, got, err, before)
			}
			if w.end != before+tt.n*cs {
				t.Fatalf("end after alloc(%d) = %#x, want %#x", tt.n, w.end, before+tt.n*cs)
			}
			w.end = before // leave nothing for Close to trip over
		})
	}
}

// TestCrashMutantL2CacheBound: the L2 cache holds as many tables as fit in
// its byte budget (at least 4), evicts the least recently used one beyond
// that, and keeps every table up to the bound.
func TestCrashMutantL2CacheBound(t *testing.T) {
	tests := []struct {
		bytes, table int64
		want         int
	}{
		{1 << 20, 64 << 10, 16},
		{1 << 20, 512, 2048},
		{4 << 10, 512, 8},
		{1 << 10, 512, 4}, // at least 4
		{0, 512, 4},
		{1 << 20, 0, 1 << 20}, // a zero table size counts as 1 byte
	}
	for _, tt := range tests {
		c := newL2Cache(tt.bytes, tt.table)
		if c.max != tt.want {
			t.Errorf("newL2Cache(%d, %d) holds %d tables, want %d", tt.bytes, tt.table, c.max, tt.want)
		}
	}

	c := newL2Cache(8*512, 512) // 8 tables
	for i := range uint64(8) {
		c.put(i*512, []uint64{i})
	}
	for i := range uint64(8) {
		if got := c.get(i * 512); len(got) != 1 || got[0] != i {
			t.Fatalf("table %d of 8 not kept in a cache of 8: %v", i, got)
		}
	}
	// Table 0 was used first of all; touch it again so that 1 is the
	// least recently used, then overflow by one.
	c.get(0)
	c.put(8*512, []uint64{8})
	if c.get(1*512) != nil {
		t.Fatal("the least recently used table survived an overflow")
	}
	for _, i := range []uint64{0, 2, 7, 8} {
		if got := c.get(i * 512); len(got) != 1 || got[0] != i {
			t.Fatalf("table %d evicted instead of the least recently used: %v", i, got)
		}
	}
	// Replacing a cached table keeps one entry.
	c.put(8*512, []uint64{80})
	if got := c.get(8 * 512); len(got) != 1 || got[0] != 80 || c.ll.Len() != 8 {
		t.Fatalf("replaced table: %v, %d entries; want [80], 8", got, c.ll.Len())
	}
}

// TestCrashMutantDeferFree: only a positive range at a positive offset of a
// QCOW2 image queues a decrement (an L2 entry of 0 is unallocated, and
// cluster 0 is the header).
func TestCrashMutantDeferFree(t *testing.T) {
	const cs = 512
	tests := []struct {
		version int
		off, n  int64
		queued  bool
	}{
		{3, cs, cs, true},
		{3, 3 * cs, 1, true},
		{2, cs, cs, true},
		{3, 0, cs, false},
		{3, -cs, cs, false},
		{3, cs, 0, false},
		{3, cs, -1, false},
		{1, cs, cs, false}, // QCOW version 1 has no refcounts
	}
	for _, tt := range tests {
		_, im := mutOpen(t, crashConfig{version: tt.version, cs: cs}, 1<<20, Options{})
		w := im.w
		w.deferFree(tt.off, tt.n)
		if got := len(w.frees) == 1; got != tt.queued {
			t.Errorf("v%d: deferFree(%d, %d) queued %v, want %v", tt.version, tt.off, tt.n, w.frees, tt.queued)
		}
		w.frees = nil
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCrashMutantFreeOfZeroRefcount: a queued decrement of a cluster whose
// refcount is already 0 leaves it at 0 (it must not wrap around to the
// largest refcount) and Flush succeeds.
func TestCrashMutantFreeOfZeroRefcount(t *testing.T) {
	const cs = 512
	for _, bits := range []int{1, 16, 64} {
		c := crashConfig{version: 3, cs: cs, rcBits: bits}
		ffs, im := mutOpen(t, c, 1<<20, Options{})
		if _, err := im.WriteAt(crashData(cs, 2), 0); err != nil {
			t.Fatal(err)
		}
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		// The cluster at the end of the file is covered by a refcount
		// block (blocks are made ahead) but in use by nothing.
		w := im.w
		free := w.end / cs
		if v, err := w.rc.get(free); err != nil || v != 0 {
			t.Fatalf("%s: refcount of the free cluster %d = %d, %v; want 0", c, free, v, err)
		}
		w.deferFree(free*cs, cs)
		if err := im.Flush(); err != nil {
			t.Fatalf("%s: flush with a decrement of a zero refcount: %v", c, err)
		}
		if v, err := w.rc.get(free); err != nil || v != 0 {
			t.Fatalf("%s: refcount of cluster %d after a decrement from 0 = %d, %v; want 0", c, free, v, err)
		}
		mutCloseClean(t, im, ffs)
	}
}

// TestCrashMutantFreeRetry: when a refcount block cannot be read while
// Flush applies the queued decrements (stage 4), Flush fails with the
// injected error and keeps the decrements not yet done; the next Flush
// applies exactly those, so the image ends with no leak and no corruption.
func TestCrashMutantFreeRetry(t *testing.T) {
	const cs = 512
	for _, bits := range []int{16, 64} {
		c := crashConfig{version: 3, cs: cs, rcBits: bits}
		// A refcount cache of 4 blocks: most blocks are read back from
		// the file when the decrements are applied.
		ffs, im := mutOpen(t, c, 2<<20, Options{RefcountCacheBytes: 4 * cs})
		const n = 1 << 20
		data := crashData(n, 3)
		if _, err := im.WriteAt(data, 0); err != nil {
			t.Fatal(err)
		}
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		// Zero clusters drop their data clusters: one decrement each. The
		// second half spans at least 4 refcount blocks, one more than the
		// cache keeps after a flush, so some decrement must read a block.
		// A wrong remainder after the failure would decrement the clusters
		// after the data too: refcount blocks, whose refcount would drop.
		if err := im.WriteZeroes(n/2, n/2); err != nil {
			t.Fatal(err)
		}
		ffs.SetInjector(faultfs.Rule(faultfs.Kinds(faultfs.KindSet(faultfs.OpRead)), faultfs.EIO))
		err := im.Flush()
		ffs.SetInjector(nil)
		if !errors.Is(err, faultfs.ErrInjected) {
			t.Fatalf("%s: flush with refcount blocks unreadable = %v, want the injected error", c, err)
		}
		if len(im.w.frees) == 0 {
			t.Fatalf("%s: the failed decrements were not kept for a retry", c)
		}
		if err := im.Flush(); err != nil {
			t.Fatalf("%s: retried flush: %v", c, err)
		}
		if len(im.w.frees) != 0 {
			t.Fatalf("%s: %d decrements still queued after a successful flush", c, len(im.w.frees))
		}
		got := make([]byte, n)
		if _, err := im.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got[:n/2], data[:n/2]) || !bytes.Equal(got[n/2:], make([]byte, n/2)) {
			t.Fatalf("%s: the disk does not read as the data then zeros", c)
		}
		mutCloseClean(t, im, ffs)
	}
}

// TestCrashMutantGrowL1 grows a disk with small clusters and wide refcounts
// so much that the new L1 table spans more refcount blocks than the ones
// made ahead: every cluster of it must get a block and a refcount, and the
// image must check clean and take a write at its new end.
func TestCrashMutantGrowL1(t *testing.T) {
	const cs = 512
	for _, through := range []bool{false, true} {
		c := crashConfig{version: 3, cs: cs, rcBits: 64}
		ffs, im := mutOpen(t, c, 1<<20, Options{WriteThrough: through})
		// 64 refcounts per block; the L1 of 1.25 GiB is 320 KiB: 640
		// clusters, 10 blocks.
		const size = 5 << 28
		if err := im.Resize(size); err != nil {
			t.Fatalf("%s: resize to %d: %v", c, int64(size), err)
		}
		im, err := mutWriteReopen(t, im, ffs, crashData(cs, 4), size-cs)
		mutNoRefsPastEnd(t, ffs)
		if err != nil || im.Size() != size {
			t.Fatalf("%s: after the resize: size %d, last sector: %v", c, im.Size(), err)
		}
	}
}

// TestCrashMutantRefcountBatches: a long sequential write with small
// clusters gets its refcount blocks in batches (cover plans several blocks
// ahead once the end of the file leaves the covered range), not one block
// between every few data clusters.
func TestCrashMutantRefcountBatches(t *testing.T) {
	const cs = 512
	c := crashConfig{version: 3, cs: cs} // 256 refcounts per block
	ffs, im := mutOpen(t, c, 16<<20, Options{})
	const n = 8 << 20
	data := crashData(n, 5)
	rtOff := im.w.rc.rtOff
	for off := int64(0); off < n; off += 64 << 10 {
		if _, err := im.WriteAt(data[off:off+64<<10], off); err != nil {
			t.Fatal(err)
		}
		mutMetaComplete(t, im)
	}
	if im.w.rc.rtOff == rtOff {
		t.Fatal("the refcount table did not move")
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	var offs []int64
	for _, e := range im.w.rc.rt {
		if off := int64(e & rtOffsetMask); off != 0 {
			offs = append(offs, off)
		}
	}
	slices.Sort(offs)
	runs := 0
	for i, off := range offs {
		if i == 0 || off != offs[i-1]+cs {
			runs++
		}
	}
	t.Logf("%d refcount blocks in %d runs", len(offs), runs)
	// 8 MiB of 512-byte clusters need 64 blocks; batches of about 7.
	if len(offs) < 64 || runs*3 > len(offs) {
		t.Fatalf("%d refcount blocks in %d runs of adjacent clusters; want at least 64 blocks in batches of 3 or more on average", len(offs), runs)
	}
	mutCloseClean(t, im, ffs)
	mutNoRefsPastEnd(t, ffs)
}

// TestCrashMutantCreateEdges creates images at the edges of what Create
// accepts: each opens with the asked geometry and an L1 table of exactly
// ceil(size / bytes per L2 table) entries, checks clean (no cluster past
// the end of the file has a refcount), and takes a write of its last
// sector that reads back after a reopen.
func TestCrashMutantCreateEdges(t *testing.T) {
	const kib, mib, gib = 1 << 10, 1 << 20, 1 << 30
	long := strings.Repeat("b", MaxBackingNameLen)
	tests := []struct {
		name     string
		o        CreateOptions
		base     int64 // size of the raw backing file to make first (0: none)
		size     int64 // the virtual size expected
		cs       int64
		refBits  int // 0: not QCOW2
		lazy     bool
		l1Entrys int64
		features int    // feature name table entries expected in the header
		bfmt     string // backing format expected
	}{
		{"size 0", CreateOptions{}, 0, 0, 64 * kib, 16, false, 0, len(featureTable), ""},
		{"v2 size 0", CreateOptions{Version: 2, ClusterSize: 512}, 0, 0, 512, 16, false, 0, 0, ""},
		{"size from the backing file", CreateOptions{BackingFile: "base", ClusterSize: 512}, 3 * mib, 3 * mib, 512, 16, false, 96, 0, ""},
		{"backing name of the largest length", CreateOptions{Size: mib, BackingFile: long, ClusterSize: 4 * kib}, mib, mib, 4 * kib, 16, false, 1, 0, ""},
		{"L1 exactly one cluster", CreateOptions{Size: 2 * mib, ClusterSize: 512}, 0, 2 * mib, 512, 16, false, 64, 0, ""},
		{"L1 one entry into a second cluster", CreateOptions{Size: 2*mib + 512, ClusterSize: 512}, 0, 2*mib + 512, 512, 16, false, 65, 0, ""},
		{"size a multiple of an L2 table", CreateOptions{Size: 4 * gib, ClusterSize: 64 * kib}, 0, 4 * gib, 64 * kib, 16, false, 8, len(featureTable), ""},
		{"size one sector past an L2 table", CreateOptions{Size: 512*mib + 1}, 0, 512*mib + 512, 64 * kib, 16, false, 2, len(featureTable), ""},
		{"largest clusters", CreateOptions{Size: mib, ClusterSize: 2 * mib}, 0, mib, 2 * mib, 16, false, 1, len(featureTable), ""},
		{"smallest clusters", CreateOptions{Size: mib, ClusterSize: 512}, 0, mib, 512, 16, false, 32, 0, ""},
		{"64-bit refcounts", CreateOptions{Size: mib, ClusterSize: 512, RefcountBits: 64}, 0, mib, 512, 64, false, 32, 0, ""},
		// 64 refcounts per block; an L1 table of 128 clusters: 3 blocks.
		{"three refcount blocks", CreateOptions{Size: 256 * mib, ClusterSize: 512, RefcountBits: 64}, 0, 256 * mib, 512, 64, false, 8192, 0, ""},
		{"1-bit refcounts", CreateOptions{Size: mib, ClusterSize: 512, RefcountBits: 1}, 0, mib, 512, 1, false, 32, 0, ""},
		{"v3 lazy refcounts", CreateOptions{Size: mib, LazyRefcounts: true}, 0, mib, 64 * kib, 16, true, 1, len(featureTable), ""},
		{"v1 smallest", CreateOptions{Format: FormatQCOW, Size: 512}, 0, 512, 4 * kib, 0, false, 1, 0, ""},
		{"v1 largest clusters", CreateOptions{Format: FormatQCOW, Size: mib, ClusterSize: 64 * kib}, 0, mib, 64 * kib, 0, false, 1, 0, ""},
		// Like qemu: a feature name table for version 3 above 4 KiB clusters.
		{"v3 feature table", CreateOptions{Size: mib, ClusterSize: 8 * kib}, 0, mib, 8 * kib, 16, false, 1, len(featureTable), ""},
		{"v3 no feature table at 4 KiB", CreateOptions{Size: mib, ClusterSize: 4 * kib}, 0, mib, 4 * kib, 16, false, 1, 0, ""},
		{"v2 no feature table", CreateOptions{Version: 2, Size: mib, ClusterSize: 8 * kib}, 0, mib, 8 * kib, 16, false, 1, 0, ""},
		{"backing format recorded", CreateOptions{Size: mib, ClusterSize: 512, BackingFile: "base", BackingFormat: "raw"}, mib, mib, 512, 16, false, 32, 0, "raw"},
		// 112 header bytes and the 8-byte end of extensions: a name of 392
		// bytes ends exactly at the end of the 512-byte header cluster.
		{"backing name filling the header cluster", CreateOptions{Size: mib, ClusterSize: 512, BackingFile: strings.Repeat("f", 392)}, mib, mib, 512, 16, false, 32, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem := vfs.NewMem()
			if tt.base > 0 {
				f, err := mem.Create(tt.o.BackingFile)
				if err != nil {
					t.Fatal(err)
				}
				if err := f.Truncate(tt.base); err != nil {
					t.Fatal(err)
				}
				f.Close()
			}
			if err := Create(mem, "img", tt.o); err != nil {
				t.Fatalf("Create(%+v): %v", tt.o, err)
			}
			mutClean(t, mem)
			im, err := Open(mem, "img", &Options{ReadWrite: true})
			if err != nil {
				t.Fatal(err)
			}
			in, err := im.Info()
			if err != nil {
				t.Fatal(err)
			}
			if im.Size() != tt.size || im.ClusterSize() != tt.cs || in.RefcountBits != tt.refBits ||
				int64(len(im.l1)) != tt.l1Entrys || in.LazyRefcounts != tt.lazy {
				t.Fatalf("got size %d, clusters %d, refcount bits %d, L1 entries %d, lazy %v; want %d, %d, %d, %d, %v",
					im.Size(), im.ClusterSize(), in.RefcountBits, len(im.l1), in.LazyRefcounts,
					tt.size, tt.cs, tt.refBits, tt.l1Entrys, tt.lazy)
			}
			if len(im.h.features) != tt.features || in.BackingFormat != tt.bfmt {
				t.Fatalf("%d feature names, backing format %q; want %d, %q", len(im.h.features), in.BackingFormat, tt.features, tt.bfmt)
			}
			if tt.l1Entrys == 0 && im.h.l1Off != 0 {
				t.Fatalf("an empty L1 table has offset %#x, want 0 as qemu writes", im.h.l1Off)
			}
			if tt.size == 0 {
				im.Close()
				return
			}
			if _, err := mutWriteReopen(t, im, mem, crashData(512, 6), tt.size-512); err != nil {
				t.Fatalf("the last sector: %v", err)
			}
		})
	}
}

// TestCrashMutantCreateRejects: just past each edge, Create fails with the
// right error, naming the limit where there is one, and leaves no file.
func TestCrashMutantCreateRejects(t *testing.T) {
	const mib = 1 << 20
	tests := []struct {
		name string
		o    CreateOptions
		want error  // a sentinel, or nil for any error
		msg  string // the error names this
	}{
		{"negative size", CreateOptions{Size: -512}, nil, "negative size"},
		{"backing name one byte too long", CreateOptions{Size: mib, BackingFile: strings.Repeat("b", MaxBackingNameLen+1)}, ErrLimit, "exceeds 1023"},
		{"size from a missing backing file", CreateOptions{BackingFile: "missing"}, fs.ErrNotExist, "missing"},
		{"L1 one entry too many", CreateOptions{Size: (MaxL1Bytes/8 + 1) * 512 * 64, ClusterSize: 512}, ErrLimit, "limit 4194304"},
		{"clusters of 4 MiB", CreateOptions{Size: mib, ClusterSize: 4 * mib}, nil, "cluster size"},
		{"clusters not a power of two", CreateOptions{Size: mib, ClusterSize: 3 * 512}, nil, "cluster size"},
		{"128-bit refcounts", CreateOptions{Size: mib, RefcountBits: 128}, nil, "refcount bits"},
		{"3-bit refcounts", CreateOptions{Size: mib, RefcountBits: 3}, nil, "refcount bits"},
		{"v2 lazy refcounts", CreateOptions{Version: 2, Size: mib, LazyRefcounts: true}, ErrUnsupported, "lazy"},
		{"v1 below a sector", CreateOptions{Format: FormatQCOW, Size: 0}, nil, "at least 512"},
		{"backing name one byte past the header cluster", CreateOptions{Size: mib, ClusterSize: 512, BackingFile: strings.Repeat("f", 393)}, nil, "does not fit"},
		{"v1 L1 one entry too many", CreateOptions{Format: FormatQCOW, Size: (MaxL1Bytes/8 + 1) << 29, ClusterSize: 64 << 10}, ErrLimit, "limit 4194304"},
		{"v1 clusters of 128 KiB", CreateOptions{Format: FormatQCOW, Size: mib, ClusterSize: 128 << 10}, nil, "cluster size"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mem := vfs.NewMem()
			err := Create(mem, "img", tt.o)
			if err == nil || tt.want != nil && !errors.Is(err, tt.want) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("Create(%+v) = %v; want an error wrapping %v that names %q", tt.o, err, tt.want, tt.msg)
			}
			if names := mem.Names(); len(names) != 0 {
				t.Fatalf("files left after a failed Create: %q", names)
			}
		})
	}
}

// TestCrashMutantLargestL1: Create accepts an L1 table of exactly
// MaxL1Bytes (laid out without writing its 32 MiB of zeros) and refuses one
// entry more, for both formats.
func TestCrashMutantLargestL1(t *testing.T) {
	const mib = 1 << 20
	const entries = MaxL1Bytes / 8
	tests := []struct {
		name    string
		o       CreateOptions
		l1Field int // offset of the L1 size field in the header (QCOW: none)
		size    int64
	}{
		// 2 MiB clusters: an L2 table maps 2^39 bytes.
		{"v3", CreateOptions{Size: entries << 39, ClusterSize: 2 * mib}, 36, entries << 39},
		// QCOW 64 KiB clusters: an L2 table maps 2^29 bytes.
		{"v1", CreateOptions{Format: FormatQCOW, Size: entries << 29, ClusterSize: 64 << 10}, -1, entries << 29},
	}
	for _, tt := range tests {
		img, err := buildImage(vfs.NewMem(), "img", tt.o)
		if err != nil {
			t.Fatalf("%s: an L1 table of %d entries: %v", tt.name, entries, err)
		}
		hdr := img.parts[0].data
		if got := int64(binary.BigEndian.Uint64(hdr[24:])); got != tt.size {
			t.Fatalf("%s: size field %d, want %d", tt.name, got, tt.size)
		}
		l1Off := int64(binary.BigEndian.Uint64(hdr[40:]))
		if tt.l1Field >= 0 {
			if got := binary.BigEndian.Uint32(hdr[tt.l1Field:]); got != entries {
				t.Fatalf("%s: l1_size %d, want %d", tt.name, got, entries)
			}
		}
		if want := l1Off + entries*8; img.size < want {
			t.Fatalf("%s: file of %d bytes, shorter than its L1 table's end %d", tt.name, img.size, want)
		}
		o := tt.o
		o.Size += 1 << 20 // one entry more
		if _, err := buildImage(vfs.NewMem(), "img", o); !errors.Is(err, ErrLimit) {
			t.Fatalf("%s: an L1 table of %d entries: %v, want ErrLimit", tt.name, entries+1, err)
		}
	}
}

// TestCrashMutantLog2: log2 is defined for powers of two only.
func TestCrashMutantLog2(t *testing.T) {
	tests := []struct {
		v    int64
		want int
	}{
		{1, 0}, {2, 1}, {512, 9}, {1 << 21, 21}, {1 << 62, 62},
		{0, -1}, {-1, -1}, {-512, -1}, {3, -1}, {12, -1}, {513, -1}, {1<<21 - 1, -1},
	}
	for _, tt := range tests {
		if got := log2(tt.v); got != tt.want {
			t.Errorf("log2(%d) = %d, want %d", tt.v, got, tt.want)
		}
	}
}

// mutNoRename hides the vfs.Renamer of a file system and logs the
// directory syncs and renames of the one it wraps.
type mutNoRename struct {
	vfs.FS
	log *[]string
}

func (m mutNoRename) SyncDir(dir string) error {
	*m.log = append(*m.log, "syncdir "+dir)
	return m.FS.SyncDir(dir)
}

// mutRenamer logs the renames and directory syncs of a MemFS.
type mutRenamer struct {
	*vfs.MemFS
	log *[]string
}

func (m mutRenamer) Rename(oldname, newname string) error {
	*m.log = append(*m.log, "rename "+newname)
	return m.MemFS.Rename(oldname, newname)
}

func (m mutRenamer) SyncDir(dir string) error {
	*m.log = append(*m.log, "syncdir "+dir)
	return m.MemFS.SyncDir(dir)
}

// TestCrashMutantCreateFinishes: Create over a file system without rename
// (magic written last) and over one with rename (temporary file renamed)
// leaves exactly the image, complete and clean, and syncs its directory
// after the rename.
func TestCrashMutantCreateFinishes(t *testing.T) {
	for _, rename := range []bool{false, true} {
		var log []string
		mem := vfs.NewMem()
		var fsys vfs.FS = mutNoRename{mem, &log}
		if rename {
			fsys = mutRenamer{mem, &log}
		}
		if err := Create(fsys, "d/img", CreateOptions{Size: 1 << 20, ClusterSize: 512}); err != nil {
			t.Fatalf("rename=%v: %v", rename, err)
		}
		if names := mem.Names(); len(names) != 1 || names[0] != "d/img" {
			t.Fatalf("rename=%v: files after Create: %q, want just d/img", rename, names)
		}
		res, err := CheckFile(mem, "d/img", "")
		if err != nil || res.Corruptions+res.Leaks+res.CheckErrors != 0 {
			t.Fatalf("rename=%v: the new image does not check clean: %v %+v", rename, err, res)
		}
		want := []string{"syncdir d"}
		if rename {
			want = []string{"rename d/img", "syncdir d"}
		}
		if !slices.Equal(log, want) {
			t.Fatalf("rename=%v: renames and directory syncs %q, want %q", rename, log, want)
		}
	}
}

// builtWorkload is an exhaustive crash workload over one of the images
// package hostile builds in Go (no qemu needed): compressed clusters,
// clusters shared with an internal snapshot, zero clusters, refcounts of 1,
// 8 and 64 bits, QCOW version 1, backing chains. It writes into every
// compressed and zero cluster and into data clusters (in place, or
// copy-on-write when a snapshot shares them), zeroes a data cluster, and
// writes across the last cluster boundary of the disk.
func builtWorkload(b *hostile.Base) exWorkload {
	l := b.Built.Layout
	cs, size := l.ClusterSize, int64(len(b.Raw))
	var data, comp, zero []int64
	for k := range l.Entry {
		_, isData := l.Host[k]
		_, isComp := l.CompOff[k]
		switch {
		case isData:
			data = append(data, k)
		case isComp:
			comp = append(comp, k)
		case b.Version == 3:
			zero = append(zero, k)
		}
	}
	if b.Version == 1 {
		data, comp = nil, nil
		for k := range l.Host {
			data = append(data, k)
		}
		for k := range l.CompOff {
			comp = append(comp, k)
		}
	}
	slices.Sort(data)
	slices.Sort(comp)
	slices.Sort(zero)
	var ops []exOp
	seed := uint64(1)
	write := func(off, n int64) {
		ops = append(ops, exOp{kind: "write", off: off, n: n, seed: seed})
		seed++
	}
	for i, k := range comp {
		if i%2 == 0 {
			write(k*cs+cs/4, cs/2)
		} else {
			write(k*cs, cs) // a whole cluster: nothing to read
		}
	}
	for _, k := range zero {
		write(k*cs+cs-100, 100)
	}
	for _, k := range data[:min(2, len(data))] {
		write(k*cs+10, 100)
	}
	ops = append(ops, exOp{kind: "flush"})
	if len(data) > 0 {
		ops = append(ops, exOp{kind: "zero", off: data[len(data)-1] * cs, n: cs})
	}
	write(size-cs-100, cs+100)
	ops = append(ops, exOp{kind: "flush"})
	backing := false
	for name := range b.Files {
		backing = backing || name != b.Main
	}
	return exWorkload{
		name: "built-" + b.Name,
		cfg:  crashConfig{version: b.Version, cs: cs, backing: backing},
		size: size,
		ops:  ops,
		prepare: func(t testing.TB) (*vfs.MemFS, []byte) {
			mem := vfs.NewMem()
			for name, content := range b.Files {
				if name == b.Main {
					name = "img"
				}
				crashPutFile(t, mem, name, content)
			}
			return mem, b.Raw
		},
	}
}

// TestCrashBuiltImages runs builtWorkload over every writable image of
// package hostile and checks every crash state of the torn model, as
// TestCrashExhaustive does.
func TestCrashBuiltImages(t *testing.T) {
	limit := crashLimit(t)
	n := 0
	for _, b := range hostile.Bases() {
		if b.Name == "v3-extl2" {
			continue // extended L2 images are read-only
		}
		n++
		for _, through := range []bool{false, true} {
			w := builtWorkload(b)
			w.through = through
			t.Run(fmt.Sprintf("%s/wt=%d", b.Name, crashB2i(through)), func(t *testing.T) {
				t.Parallel()
				states, err := exRun(t, w, limit, 0, nil)
				if err != nil {
					t.Fatal(err)
				}
				if states < 10 {
					t.Fatalf("%s: only %d crash states", w.id(), states)
				}
			})
		}
	}
	if n < 8 {
		t.Fatalf("only %d built images", n)
	}
}

// TestCrashMutantRefcountEntries: every refcount width (1 to 64 bits)
// holds values up to its maximum, and setting one entry changes exactly the
// bytes it reports and no other entry.
func TestCrashMutantRefcountEntries(t *testing.T) {
	const cs = 512
	wantMax := []uint64{1, 3, 15, 255, 65535, 1<<32 - 1, 1<<64 - 1}
	for order := uint32(0); order <= 6; order++ {
		g := refGeom{clusterBits: 9, order: order}
		if got := g.maxRefcount(); got != wantMax[order] {
			t.Errorf("order %d: maxRefcount %d, want %d", order, got, wantMax[order])
		}
		if got := g.perBlock(); got != cs*8>>order {
			t.Errorf("order %d: %d entries per block, want %d", order, got, cs*8>>order)
		}
		n := g.perBlock()
		b := make([]byte, cs)
		want := make([]uint64, n)
		r := crashData(16*n, uint64(order)) // values: bytes of random data
		for i := range n {
			v := binary.LittleEndian.Uint64(r[8*i:]) & g.maxRefcount()
			before := slices.Clone(b)
			lo, hi := setRefcountAt(b, order, i, v)
			want[i] = v
			bits := int64(1) << order
			if wlo, whi := int(i*bits/8), int((i*bits+bits-1)/8+1); lo != wlo || hi != whi {
				t.Fatalf("order %d entry %d: changed range [%d, %d), want [%d, %d)", order, i, lo, hi, wlo, whi)
			}
			for k := range b {
				if (k < lo || k >= hi) && b[k] != before[k] {
					t.Fatalf("order %d entry %d: byte %d outside [%d, %d) changed", order, i, k, lo, hi)
				}
			}
		}
		for i := range n {
			if got := refcountAt(b, order, i); got != want[i] {
				t.Fatalf("order %d entry %d: %d, want %d", order, i, got, want[i])
			}
		}
		// The largest value, at the first and last entries, next to zeros.
		clear(b)
		for _, i := range []int64{0, n - 1} {
			setRefcountAt(b, order, i, g.maxRefcount())
			if got := refcountAt(b, order, i); got != g.maxRefcount() {
				t.Fatalf("order %d entry %d: max reads back as %d", order, i, got)
			}
		}
		if n > 2 && (refcountAt(b, order, 1) != 0 || refcountAt(b, order, n-2) != 0) {
			t.Fatalf("order %d: setting the first and last entries changed their neighbours", order)
		}
	}
}

// TestCrashMutantPlanRefcountArea checks the plan for new refcount
// structures against its contract on edge cases and seeded random inputs:
// every cluster from `from` to the end of the area (the new blocks and
// table included) plus `after` is covered by a block, present or new; the
// new blocks are exactly the missing ones in that range; a new table comes
// only when the current one is too short, with room for exactly the blocks
// (plus half as many again with slack), rounded up to whole clusters.
func TestCrashMutantPlanRefcountArea(t *testing.T) {
	type in struct {
		cb, order                    uint32
		from, start, after, tableLen int64
		slack                        bool
		presentEvery                 int64 // block i present when i%presentEvery == 0 (1: all, 0: none)
	}
	cases := []in{
		{9, 4, 0, 1, 3, 0, false, 0},         // Create: nothing yet
		{9, 4, 5, 5, 0, 8, true, 1},          // an empty area: nothing to cover
		{9, 6, 64, 64, 0, 4, true, 1},        // an empty area at a block boundary
		{9, 4, 5, 5, 0, 0, false, 0},         // an empty area, no table
		{9, 6, 10, 64, 0, 1, true, 1},        // ends exactly at a block boundary, table full
		{9, 6, 10, 63, 1, 1, true, 1},        // the same end, through after
		{9, 6, 10, 63, 1, 2, false, 1},       // the table has room: no new table
		{9, 6, 0, 100, 448, 64, true, 2},     // every other block missing
		{9, 0, 0, 1, 100000, 8, true, 0},     // 1-bit refcounts, a long area
		{16, 4, 0, 1, 7, 0, false, 0},        // 64 KiB clusters
		{9, 6, 4000, 4090, 448, 64, true, 1}, // crosses the end of a one-cluster table
	}
	r := rand.New(rand.NewPCG(6, 6))
	for range 300 {
		cb := uint32(9 + r.IntN(4))
		tableLen := int64(r.IntN(3)) * (1 << cb) / 8
		from := r.Int64N(5000)
		cases = append(cases, in{cb, uint32(r.IntN(7)), from, from + r.Int64N(3000), r.Int64N(2000),
			tableLen, r.IntN(2) == 0, int64(r.IntN(4))})
	}
	for _, c := range cases {
		g := refGeom{clusterBits: c.cb, order: c.order}
		cs := int64(1) << c.cb
		present := func(i int64) bool {
			if i < 0 || i >= c.tableLen {
				t.Fatalf("%+v: present(%d) asked beyond the table", c, i)
			}
			return c.presentEvery == 1 || c.presentEvery > 1 && i%c.presentEvery == 0
		}
		a, err := planRefcountArea(g, c.from, c.start, c.after, c.tableLen, present, c.slack)
		if err != nil {
			t.Fatalf("%+v: %v", c, err)
		}
		shift := g.blockShift()
		// needed returns the missing blocks of the range that ends at end
		// and one past the highest block index the range needs.
		needed := func(end int64) (need []int64, hi int64) {
			if end > c.from {
				hi = (end-1)>>shift + 1
				for i := c.from >> shift; i < hi; i++ {
					if i >= c.tableLen || !present(i) {
						need = append(need, i)
					}
				}
			}
			return need, hi
		}
		tableFor := func(hi int64) int64 {
			if hi <= c.tableLen {
				return 0
			}
			if c.slack {
				hi += hi / 2
			}
			return (hi*8 + cs - 1) / cs
		}
		end := c.start + int64(len(a.blocks)) + a.tableClusters + c.after
		need, hi := needed(end)
		if !slices.Equal(a.blocks, need) {
			t.Fatalf("%+v: new blocks %v, want %v", c, a.blocks, need)
		}
		// The plan is the smallest one that covers itself: the first fixed
		// point from no new block and no new table.
		nb, nt := int64(0), int64(0)
		for {
			need, hi := needed(c.start + nb + nt + c.after)
			if int64(len(need)) == nb && tableFor(hi) == nt {
				break
			}
			nb, nt = int64(len(need)), tableFor(hi)
		}
		if int64(len(a.blocks)) != nb || a.tableClusters != nt {
			t.Fatalf("%+v: %d new blocks and a table of %d clusters; the smallest plan has %d and %d", c, len(a.blocks), a.tableClusters, nb, nt)
		}
		switch {
		case hi <= c.tableLen && a.tableClusters != 0:
			t.Fatalf("%+v: a new table of %d clusters, but %d entries fit in the old one", c, a.tableClusters, hi)
		case hi > c.tableLen:
			want := hi
			if c.slack {
				want += hi / 2
			}
			if a.tableEntries < want || a.tableEntries-want >= cs/8 || a.tableClusters*cs/8 != a.tableEntries {
				t.Fatalf("%+v: new table of %d clusters, %d entries, for %d blocks (want %d entries, rounded up to a cluster)",
					c, a.tableClusters, a.tableEntries, hi, want)
			}
		}
	}
}

// TestCrashMutantRefcountTableLimit: a plan whose refcount table would be
// exactly MaxRefcountTableBytes is accepted, one cluster more fails with
// ErrLimit naming the limit.
func TestCrashMutantRefcountTableLimit(t *testing.T) {
	g := refGeom{clusterBits: 9, order: 6} // 64 refcounts per block, 64 entries per table cluster
	const cs = 512
	exact := false
	for start := int64(66_000_000); ; start += cs {
		if start > 68_000_000 {
			t.Fatal("no plan failed with ErrLimit")
		}
		a, err := planRefcountArea(g, start, start, 1, 0, func(int64) bool { return false }, false)
		if err != nil {
			var need int64
			msg := err.Error()
			_, scanErr := fmt.Sscanf(msg[max(strings.Index(msg, "would need"), 0):], "would need %d bytes", &need)
			if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), fmt.Sprintf("limit %d", MaxRefcountTableBytes)) ||
				scanErr != nil || need <= MaxRefcountTableBytes || need%cs != 0 {
				t.Fatalf("start %d: %v; want ErrLimit naming the bytes needed and the limit", start, err)
			}
			break
		}
		if a.tableClusters*cs > MaxRefcountTableBytes {
			t.Fatalf("start %d: a table of %d clusters accepted", start, a.tableClusters)
		}
		exact = exact || a.tableClusters*cs == MaxRefcountTableBytes
	}
	if !exact {
		t.Fatal("no plan had a table of exactly MaxRefcountTableBytes")
	}
}

// TestCrashMutantRefcountCache: with a refcount cache of 4 blocks, a flush
// of writes leaves exactly 3 (three quarters) of the clean blocks cached
// however many the writes touched, and the image stays exact and clean
// although most blocks are read back from the file to be changed. (The
// decrements of stage 4 may leave more cached: they are applied after the
// commit's eviction; the next load or write evicts them.)
func TestCrashMutantRefcountCache(t *testing.T) {
	const cs = 512
	c := crashConfig{version: 3, cs: cs, rcBits: 64} // 64 refcounts per block
	ffs, im := mutOpen(t, c, 4<<20, Options{RefcountCacheBytes: 4 * cs})
	m := crashModel(4<<20, nil)
	w := im.w
	step := func(what string, f func() error) {
		t.Helper()
		if err := f(); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if err := im.Flush(); err != nil {
			t.Fatalf("%s: flush: %v", what, err)
		}
		m.Flush()
	}
	writeStep := func(what string, f func() error) {
		t.Helper()
		step(what, f)
		if n := len(w.rc.blocks); n != 3 {
			t.Fatalf("%s: %d refcount blocks cached after a flush, want 3 (3/4 of 4)", what, n)
		}
	}
	const n = 1 << 20 // 2048 clusters: 32 blocks
	for pass := range uint64(3) {
		data := crashData(n, 10+pass)
		writeStep("write", func() error {
			for off := int64(0); off < n; off += 32 << 10 {
				if _, err := im.WriteAt(data[off:off+32<<10], off+int64(pass)*cs); err != nil {
					return err
				}
				m.Write(data[off:off+32<<10], off+int64(pass)*cs)
			}
			return nil
		})
		step("zero", func() error {
			m.WriteZeroes(int64(pass)*cs, n/2)
			return im.WriteZeroes(int64(pass)*cs, n/2)
		})
	}
	mutCloseClean(t, im, ffs)
	if err := crashVerify(ffs, m, 0); err != nil {
		t.Fatal(err)
	}
}

// TestCrashMutantRefcountLookups: the refcount of a cluster beyond what
// the refcount table covers is 0, and a table entry that points at a block
// beyond the end of the file or not cluster aligned makes a writable open
// fail with a FormatError naming the entry.
func TestCrashMutantRefcountLookups(t *testing.T) {
	_, im := mutOpen(t, crashConfig{version: 3, cs: 512}, 1<<20, Options{})
	rc := im.w.rc
	past := int64(len(rc.rt)) << rc.g.blockShift()
	for _, c := range []int64{past, past + 1, past << 4} {
		if v, err := rc.get(c); v != 0 || err != nil {
			t.Fatalf("refcount of cluster %d beyond the table = %d, %v; want 0, nil", c, v, err)
		}
	}
	im.Close()

	tests := []struct {
		base  string
		entry func(fileSize, cs int64) uint64
	}{
		{"v3-refcount64", func(n, cs int64) uint64 { return uint64((n + cs - 1) / cs * cs) }},     // at the end of the file
		{"v3-refcount64", func(n, cs int64) uint64 { return uint64((n+cs-1)/cs*cs - cs + cs/2) }}, // would end past it
		{"v3-zstd", func(n, cs int64) uint64 { return 512 }},                                      // inside a 4 KiB cluster
	}
	for _, tt := range tests {
		b := hostile.BaseByName(tt.base)
		img := b.Built.Clone()
		cs := b.Built.ClusterSize
		entry := tt.entry(int64(len(img)), cs)
		at := b.Built.RTOff + 8 // the table's second entry: no block yet
		if binary.BigEndian.Uint64(img[at:]) != 0 {
			t.Fatalf("%s: refcount table entry 1 is in use", tt.base)
		}
		binary.BigEndian.PutUint64(img[at:], entry)
		mem := crashMemImage(t, img)
		im, err := Open(mem, "img", &Options{ReadWrite: true})
		var fe *FormatError
		if !errors.As(err, &fe) || fe.Field != "refcount_table_entry" || fe.Offset != at || fe.Value != entry || !errors.Is(err, ErrFormat) {
			if err == nil {
				im.Close()
			}
			t.Fatalf("%s: refcount table entry %#x at %#x: open: %v; want a FormatError for that entry", tt.base, entry, at, err)
		}
	}
}

// TestCrashMutantFullRefcountTable: an image whose refcount table is full
// (every entry points at a block) takes a write: the writer sees that the
// new cluster lies beyond the table and moves the table.
func TestCrashMutantFullRefcountTable(t *testing.T) {
	const cs = 512
	// 64-bit refcounts: 64 clusters per block, 64 entries per table
	// cluster. 1 header + 1 table + 64 blocks + 4030 L1 clusters = 4096
	// clusters: the one-cluster table is exactly full.
	const size = 4030 * 64 * 32 << 10
	mem := vfs.NewMem()
	if err := Create(mem, "img", CreateOptions{Size: size, ClusterSize: cs, RefcountBits: 64}); err != nil {
		t.Fatal(err)
	}
	ffs := faultfs.New(mem)
	im, err := Open(ffs, "img", &Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	rc := im.w.rc
	for i, e := range rc.rt {
		if e == 0 {
			t.Fatalf("refcount table entry %d of %d is free: the table is not full", i, len(rc.rt))
		}
	}
	rtOff := im.h.rtOff
	im, err = mutWriteReopen(t, im, ffs, crashData(cs, 7), size-cs)
	if err != nil || im.h.rtOff == rtOff {
		t.Fatalf("after the write: %v, refcount table at %#x (was %#x)", err, im.h.rtOff, rtOff)
	}
}

// mutMetaComplete requires the writer's set of metadata clusters (for the
// overlap check) to hold every cluster of the L1 table, of every L2 table,
// of the refcount table and every refcount block the image has now.
func mutMetaComplete(t *testing.T, im *Image) {
	t.Helper()
	w := im.w
	need := func(what string, off, n int64) {
		t.Helper()
		for c := off &^ (w.cs - 1); c < off+n; c += w.cs {
			if !w.meta[c] {
				t.Fatalf("%s cluster %#x is not marked as metadata", what, c)
			}
		}
	}
	need("L1 table", int64(im.h.l1Off), int64(len(im.l1))*8)
	for i := range im.l1 {
		if off, err := im.l1Entry(i); err == nil && off != 0 {
			need("L2 table", int64(off), im.l2Bytes())
		}
	}
	if rc := w.rc; rc != nil {
		need("refcount table", rc.rtOff, rc.rtClusters*w.cs)
		for _, e := range rc.rt {
			if off := int64(e & rtOffsetMask); off != 0 {
				need("refcount block", off, w.cs)
			}
		}
	}
}

// TestCrashMutantCoverAhead: new refcount blocks cover the clusters being
// allocated plus some ahead, at most 7 blocks' or 4 MiB's worth of
// clusters, whichever is less, and every new block and table is marked as
// metadata.
func TestCrashMutantCoverAhead(t *testing.T) {
	tests := []struct {
		cs     int64
		rcBits int
		write  int64
	}{
		{4096, 64, 3 << 20}, // 512 refcounts per block: 4 MiB ahead is 2 blocks
		{512, 16, 2 << 20},  // 256 per block: 7 blocks ahead is 896 KiB
		{512, 64, 1 << 20},  // 64 per block: 7 blocks ahead is 224 KiB
	}
	for _, tt := range tests {
		c := crashConfig{version: 3, cs: tt.cs, rcBits: tt.rcBits}
		ffs, im := mutOpen(t, c, 8<<20, Options{})
		data := crashData(tt.write, 8)
		for off := int64(0); off < tt.write; off += 64 << 10 {
			if _, err := im.WriteAt(data[off:off+64<<10], off); err != nil {
				t.Fatal(err)
			}
			mutMetaComplete(t, im)
		}
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		rc := im.w.rc
		blocks := int64(0)
		for _, e := range rc.rt {
			if e != 0 {
				blocks++
			}
		}
		covered := blocks * rc.g.perBlock() * tt.cs
		ahead := min(7*rc.g.perBlock()*tt.cs, 4<<20)
		if limit := im.w.end + ahead + rc.g.perBlock()*tt.cs; covered > limit {
			t.Fatalf("%s: %d refcount blocks cover %d bytes; the file ends at %d and at most %d bytes ahead (plus a block) should be covered",
				c, blocks, covered, im.w.end, ahead)
		}
		mutCloseClean(t, im, ffs)
		mutNoRefsPastEnd(t, ffs)
	}
}

// mutLoad returns a memory FS holding the files of the hostile base called
// name, its main image renamed "img" and changed by poke (if set).
func mutLoad(t *testing.T, name string, poke func(img []byte)) *vfs.MemFS {
	t.Helper()
	b := hostile.BaseByName(name)
	if b == nil {
		t.Fatalf("no hostile base %q", name)
	}
	mem := vfs.NewMem()
	for fname, content := range b.Files {
		if fname == b.Main {
			fname = "img"
			content = slices.Clone(content)
			if poke != nil {
				poke(content)
			}
		}
		crashPutFile(t, mem, fname, content)
	}
	return mem
}

// TestCrashMutantOpenWritable: a writable open refuses QCOW2 images with
// the corrupt bit or extended L2 entries; it clears unknown autoclear bits
// of a version 3 header with one durable write (and fails if that write or
// its sync fails), and writes nothing to a version 2 header.
func TestCrashMutantOpenWritable(t *testing.T) {
	setBits := func(off int, bits uint64) func([]byte) {
		return func(img []byte) {
			binary.BigEndian.PutUint64(img[off:], binary.BigEndian.Uint64(img[off:])|bits)
		}
	}
	for _, tt := range []struct {
		base string
		poke func([]byte)
		msg  string
	}{
		{"v3", setBits(72, IncompatCorrupt), "corrupt bit"},
		{"v3-extl2", nil, "extended L2"},
	} {
		_, err := Open(mutLoad(t, tt.base, tt.poke), "img", &Options{ReadWrite: true})
		if !errors.Is(err, ErrReadOnly) || !strings.Contains(err.Error(), tt.msg) {
			t.Fatalf("%s: writable open: %v; want ErrReadOnly about the %s", tt.base, err, tt.msg)
		}
	}

	const unknown = 1 << 5
	header := func(fsys vfs.FS) []byte {
		t.Helper()
		f, err := fsys.Open("img", vfs.ReadOnly)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, 104)
		if _, err := f.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		return b
	}
	// Version 3: cleared, durably.
	mem := mutLoad(t, "v3", setBits(88, unknown))
	ffs := faultfs.New(mem)
	im, err := Open(ffs, "img", &Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := binary.BigEndian.Uint64(header(ffs)[88:]); got != 0 || im.h.autoclear != 0 {
		t.Fatalf("autoclear after a writable open: %#x on disk, %#x in memory; want 0", got, im.h.autoclear)
	}
	st, err := ffs.CrashState(faultfs.LoseUnsynced, 1)
	if err != nil {
		t.Fatal(err)
	}
	if got := binary.BigEndian.Uint64(header(st)[88:]); got != 0 {
		t.Fatalf("autoclear %#x after a crash: the clearing write was not synced", got)
	}
	im.Close()
	// Version 3, the write or its sync fails: the open fails.
	for _, fail := range []faultfs.Predicate{
		faultfs.And(faultfs.Kinds(faultfs.KindSet(faultfs.OpWrite)), faultfs.OffsetRange(88, 96)),
		faultfs.Kinds(faultfs.SyncKinds),
	} {
		ffs := faultfs.New(mutLoad(t, "v3", setBits(88, unknown)), faultfs.WithInjector(faultfs.Rule(fail, faultfs.EIO)))
		if im, err := Open(ffs, "img", &Options{ReadWrite: true}); !errors.Is(err, faultfs.ErrInjected) {
			if err == nil {
				im.Close()
			}
			t.Fatalf("writable open when %s fails: %v; want the injected error", fail, err)
		}
	}
	// Version 2 has no autoclear field: its header is not written.
	mem = mutLoad(t, "v2", nil)
	before := header(mem)
	im, err = Open(mem, "img", &Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	if after := header(mem); !bytes.Equal(before, after) {
		t.Fatalf("a writable open and close changed a version 2 header:\n%x\n%x", before, after)
	}
}

// TestCrashMutantWriteBackDefers: in write-back mode with the default
// cache sizes, writes that touch a few dozen L2 tables and refcount blocks
// issue no barrier until Flush (metadata waits in memory); Flush issues
// them and the image is then exact and clean.
func TestCrashMutantWriteBackDefers(t *testing.T) {
	const cs = 512
	c := crashConfig{version: 3, cs: cs, rcBits: 64} // an L2 table per 32 KiB, a block per 64 clusters
	ffs, im := mutOpen(t, c, 4<<20, Options{})
	m := crashModel(4<<20, nil)
	const n = 2 << 20
	data := crashData(n, 9)
	start := len(ffs.Log())
	for off := int64(0); off < n; off += 16 << 10 {
		if _, err := im.WriteAt(data[off:off+16<<10], off); err != nil {
			t.Fatal(err)
		}
		m.Write(data[off:off+16<<10], off)
	}
	syncs := func() int {
		k := 0
		for _, op := range ffs.Log()[start:] {
			if faultfs.SyncKinds.Has(op.Kind) {
				k++
			}
		}
		return k
	}
	if k := syncs(); k != 0 {
		t.Fatalf("%d barriers before Flush in write-back mode", k)
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	m.Flush()
	if k := syncs(); k == 0 {
		t.Fatal("Flush issued no barrier")
	}
	// Nothing dirty: a second Flush does nothing at all.
	n0 := len(ffs.Log())
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := len(ffs.Log()) - n0; n != 0 {
		t.Fatalf("a Flush with nothing to write did %d file operations", n)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if err := crashVerify(ffs, m, 0); err != nil {
		t.Fatal(err)
	}
}

// TestCrashMutantRanges: writes, zero writes and resizes outside the disk
// or otherwise invalid fail without touching the file; empty ones succeed
// without touching it; writes to a read-only image fail with ErrReadOnly.
func TestCrashMutantRanges(t *testing.T) {
	const size = 1 << 20
	for _, c := range []crashConfig{{version: 3, cs: 512}, {version: 1, cs: 512}} {
		ffs, im := mutOpen(t, c, size, Options{})
		ops := len(ffs.Log())
		p := make([]byte, 512)
		for _, tt := range []struct {
			name string
			f    func() error
			want error // nil: must succeed
		}{
			{"write past the end", func() error { _, err := im.WriteAt(p, size-511); return err }, ErrOutOfRange},
			{"write at the end", func() error { _, err := im.WriteAt(p[:1], size); return err }, ErrOutOfRange},
			{"write far past the end", func() error { _, err := im.WriteAt(p, size+512); return err }, ErrOutOfRange},
			{"write before the start", func() error { _, err := im.WriteAt(p, -512); return err }, ErrOutOfRange},
			{"empty write at the end", func() error { _, err := im.WriteAt(nil, size); return err }, nil},
			{"empty write inside", func() error { _, err := im.WriteAt(p[:0], 512); return err }, nil},
			{"zero past the end", func() error { return im.WriteZeroes(size-512, 513) }, ErrOutOfRange},
			{"zero beyond the end", func() error { return im.WriteZeroes(size+512, 0) }, ErrOutOfRange},
			{"zero a negative length", func() error { return im.WriteZeroes(0, -1) }, ErrOutOfRange},
			{"zero before the start", func() error { return im.WriteZeroes(-1, 1) }, ErrOutOfRange},
			{"zero nothing at the end", func() error { return im.WriteZeroes(size, 0) }, nil},
			{"shrink", func() error { return im.Resize(size - 512) }, ErrUnsupported},
			{"resize to the same size", func() error { return im.Resize(size) }, nil},
			{"resize to a non-multiple of 512", func() error { return im.Resize(size + 100) }, errors.New("not a multiple of 512")},
		} {
			err := tt.f()
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("%s: %s: %v", c, tt.name, err)
			case tt.want != nil && (err == nil || !errors.Is(err, tt.want) && !strings.Contains(err.Error(), tt.want.Error())):
				t.Fatalf("%s: %s: %v, want %v", c, tt.name, err, tt.want)
			}
			if n := len(ffs.Log()); n != ops {
				t.Fatalf("%s: %s: %d file operations", c, tt.name, n-ops)
			}
		}
		if im.Size() != size {
			t.Fatalf("%s: size %d after refused resizes", c, im.Size())
		}
		// A write that ends exactly at the end of the disk.
		if _, err := im.WriteAt(p, size-512); err != nil {
			t.Fatalf("%s: write of the last sector: %v", c, err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		for _, f := range []func() error{
			func() error { _, err := im.WriteAt(p, 0); return err },
			func() error { return im.WriteZeroes(0, 512) },
			func() error { return im.Resize(2 * size) },
		} {
			if err := f(); err == nil {
				t.Fatalf("%s: a write after Close succeeded", c)
			}
		}
		ro, err := Open(ffs, "img", nil)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range []func() error{
			func() error { _, err := ro.WriteAt(p, 0); return err },
			func() error { return ro.WriteZeroes(0, 512) },
			func() error { return ro.Resize(2 * size) },
		} {
			if err := f(); !errors.Is(err, ErrReadOnly) {
				t.Fatalf("%s: a write to a read-only image: %v, want ErrReadOnly", c, err)
			}
		}
		if err := ro.Flush(); err != nil {
			t.Fatalf("%s: Flush of a read-only image: %v", c, err)
		}
		ro.Close()
	}
}

// TestCrashMutantRaw: a raw image opened for writing takes writes and zero
// writes (longer than the 64 KiB zero buffer) that read back, grows, makes
// writes durable at Flush (write-back) or at once (write-through), and
// Close syncs what Flush did not.
func TestCrashMutantRaw(t *testing.T) {
	const size = 1 << 20
	for _, through := range []bool{false, true} {
		mem := vfs.NewMem()
		f, err := mem.Create("disk")
		if err == nil {
			err = f.Truncate(size)
		}
		if err == nil {
			err = f.Close()
		}
		if err != nil {
			t.Fatal(err)
		}
		ffs := faultfs.New(mem)
		im, err := Open(ffs, "disk", &Options{ReadWrite: true, Format: FormatRaw, WriteThrough: through})
		if err != nil {
			t.Fatal(err)
		}
		data := crashData(size, 11)
		phase1 := func(m *model.Disk) *model.Disk {
			m.Write(data[:300<<10], 1000)
			m.WriteZeroes(5000, 200<<10)
			if through {
				m.Flush()
			}
			return m
		}
		m := phase1(model.New(size, nil))
		if _, err := im.WriteAt(data[:300<<10], 1000); err != nil {
			t.Fatal(err)
		}
		if err := im.WriteZeroes(5000, 200<<10); err != nil {
			t.Fatal(err)
		}
		// Durable now in write-through mode; in write-back mode only after
		// Flush.
		st, err := ffs.CrashState(faultfs.LoseUnsynced, 2)
		if err != nil {
			t.Fatal(err)
		}
		r, err := Open(st, "disk", &Options{Format: FormatRaw})
		if err != nil {
			t.Fatal(err)
		}
		mc := phase1(model.New(size, nil))
		mc.Crash()
		if err := wtCheckImage(mc, r); err != nil {
			t.Fatalf("wt=%v: crash before Flush: %v", through, err)
		}
		r.Close()
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		m.Flush()
		if err := im.Resize(2 * size); err != nil {
			t.Fatal(err)
		}
		m.Resize(2*size, true)
		if im.Size() != 2*size {
			t.Fatalf("wt=%v: size %d after growing to %d", through, im.Size(), 2*size)
		}
		if _, err := im.WriteAt(data[:512], 2*size-512); err != nil {
			t.Fatal(err)
		}
		m.Write(data[:512], 2*size-512)
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		m.Flush()
		st, err = ffs.CrashState(faultfs.LoseUnsynced, 3)
		if err != nil {
			t.Fatal(err)
		}
		r, err = Open(st, "disk", &Options{Format: FormatRaw})
		if err != nil {
			t.Fatal(err)
		}
		if err := wtCheckImage(m, r); err != nil || r.Size() != 2*size {
			t.Fatalf("wt=%v: after Close and a crash: size %d, %v", through, r.Size(), err)
		}
		r.Close()
	}
}

// TestCrashMutantOverlap: an L2 entry that claims a data cluster which in
// fact holds metadata (the header, the L1 table, an L2 table, the refcount
// table, a refcount block, the snapshot table or a snapshot's L1 table) is
// refused with a FormatError on a write into it, and the metadata is left
// alone.
func TestCrashMutantOverlap(t *testing.T) {
	type target struct {
		name string
		off  func(l hostile.Layout) int64
	}
	qcow2 := []target{
		{"L1 table", func(l hostile.Layout) int64 { return l.L1Off }},
		{"L2 table", func(l hostile.Layout) int64 { return l.L2Offs[0] }},
		{"refcount table", func(l hostile.Layout) int64 { return l.RTOff }},
		{"refcount block", func(l hostile.Layout) int64 { return l.RBOffs[0] }},
	}
	tests := []struct {
		base    string
		guest   int64 // a data cluster of the base
		copied  uint64
		targets []target
	}{
		{"v2", 1, flagCopied, qcow2},
		{"v3", 33, flagCopied, append(slices.Clip(qcow2),
			target{"snapshot table", func(l hostile.Layout) int64 { return l.SnapOff }},
			target{"snapshot L1 table", func(l hostile.Layout) int64 { return l.SnapL1Off }})},
		{"v1", 1, 0, []target{
			{"header", func(l hostile.Layout) int64 { return l.L1Off &^ (l.ClusterSize - 1) }},
			{"L2 table", func(l hostile.Layout) int64 { return l.L2Offs[0] }},
		}},
	}
	for _, tt := range tests {
		b := hostile.BaseByName(tt.base)
		l := b.Built.Layout
		if _, ok := l.Host[tt.guest]; !ok {
			t.Fatalf("%s: guest cluster %d is not a data cluster", tt.base, tt.guest)
		}
		for _, tg := range tt.targets {
			off := tg.off(l)
			if off <= 0 && tg.name != "header" {
				t.Fatalf("%s: no %s", tt.base, tg.name)
			}
			entry := uint64(off) | tt.copied
			if off == 0 {
				entry = uint64(l.ClusterSize) / 2 // inside the header cluster, not 0 (unallocated)
			}
			mem := mutLoad(t, tt.base, func(img []byte) {
				binary.BigEndian.PutUint64(img[l.Entry[tt.guest]:], entry)
			})
			im, err := Open(mem, "img", &Options{ReadWrite: true})
			if err != nil {
				t.Fatalf("%s, entry at the %s: open: %v", tt.base, tg.name, err)
			}
			n := min(l.ClusterSize, int64(len(b.Files[b.Main]))-off)
			before := make([]byte, n)
			if err := im.readFull(before, off); err != nil {
				t.Fatal(err)
			}
			_, err = im.WriteAt(make([]byte, 100), tt.guest*l.ClusterSize+8)
			var fe *FormatError
			if !errors.As(err, &fe) || fe.Field != "l2_entry" {
				im.Close()
				t.Fatalf("%s: a write through an L2 entry pointing at the %s: %v; want a FormatError for the entry", tt.base, tg.name, err)
			}
			after := make([]byte, n)
			if err := im.readFull(after, off); err != nil || !bytes.Equal(before, after) {
				t.Fatalf("%s: the %s changed (%v)", tt.base, tg.name, err)
			}
			im.Close()
		}
	}
}

// TestCrashMutantResize: growing within what the L1 table maps keeps the
// table; one L2 table's worth more moves it; growing past MaxL1Bytes fails
// with ErrLimit and changes nothing; growing over a longer backing file
// makes the grown range read as zeros, not as the backing file.
func TestCrashMutantResize(t *testing.T) {
	const cs = 512
	const perL2 = cs * cs / 8 // bytes one L2 table maps: 32 KiB
	// 31 L2 tables and a sector: an L1 table of 32 entries.
	ffs, im := mutOpen(t, crashConfig{version: 3, cs: cs}, 31*perL2+512, Options{})
	l1Off := im.h.l1Off
	for _, tt := range []struct {
		size  int64
		moved bool
	}{
		{32*perL2 - 512, false},
		{32 * perL2, false}, // exactly 32 entries
		{32*perL2 + 512, true},
	} {
		if err := im.Resize(tt.size); err != nil {
			t.Fatalf("resize to %d: %v", tt.size, err)
		}
		if moved := im.h.l1Off != l1Off; moved != tt.moved || im.Size() != tt.size {
			t.Fatalf("resize to %d: L1 table moved %v (want %v), size %d", tt.size, moved, tt.moved, im.Size())
		}
		if want := (tt.size + perL2 - 1) / perL2; tt.moved && int64(len(im.l1)) != want {
			t.Fatalf("resize to %d: L1 table of %d entries, want %d", tt.size, len(im.l1), want)
		}
	}
	l1Off = im.h.l1Off
	size := im.Size()
	tooBig := int64(MaxL1Bytes/8)*perL2 + 512
	if err := im.Resize(tooBig); !errors.Is(err, ErrLimit) || im.Size() != size || im.h.l1Off != l1Off {
		t.Fatalf("resize to %d: %v, size %d; want ErrLimit and no change", tooBig, err, im.Size())
	}
	if err := im.Flush(); err != nil {
		t.Fatal(err)
	}
	mutClean(t, ffs)
	// The largest size the limit allows: an L1 table of 32 MiB (the image
	// is dropped without Close, which would write it).
	if err := im.Resize(int64(MaxL1Bytes/8) * perL2); err != nil || len(im.l1) != MaxL1Bytes/8 {
		t.Fatalf("resize to the largest size the L1 limit allows: %v", err)
	}

	// A backing file of 96 KiB under a disk of 64 KiB, grown to 128 KiB.
	c := crashConfig{version: 3, cs: cs, backing: true}
	mem, base := crashSetup(t, c, 128<<10, 12) // "base" holds 96 KiB
	if err := mem.Remove("img"); err != nil {
		t.Fatal(err)
	}
	if err := Create(mem, "img", CreateOptions{Size: 64 << 10, ClusterSize: cs, BackingFile: "base", BackingFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	ffs = faultfs.New(mem)
	im, err := Open(ffs, "img", &Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := im.Resize(128 << 10); err != nil {
		t.Fatal(err)
	}
	m := crashModel(128<<10, base)
	m.WriteZeroes(64<<10, 64<<10)
	m.Flush()
	if err := m.Check(wtSizedReader{im}); err != nil {
		t.Fatalf("after growing over the backing file: %v", err)
	}
	// Durable on return, whatever the cache mode.
	st, err := ffs.CrashState(faultfs.LoseUnsynced, 4)
	if err != nil {
		t.Fatal(err)
	}
	m.Crash()
	if err := crashVerify(st, m, -1); err != nil {
		t.Fatalf("crash after the resize: %v", err)
	}
	im.Close()
}

// TestCrashMutantL2CacheExact: write-back mode keeps exactly as many dirty
// L2 tables as L2CacheBytes holds before it writes them early.
func TestCrashMutantL2CacheExact(t *testing.T) {
	const cs = 512 // an L2 table of one cluster maps 64 clusters
	ffs, im := mutOpen(t, crashConfig{version: 3, cs: cs}, 1<<20, Options{L2CacheBytes: 4 * cs})
	n0 := len(ffs.Log())
	for _, vcl := range []int64{0, 64, 128, 192, 1, 65} { // 4 tables, then 2 more writes into them
		if _, err := im.WriteAt(crashData(cs, uint64(vcl)), vcl*cs); err != nil {
			t.Fatal(err)
		}
	}
	for _, op := range ffs.Log()[n0:] {
		if faultfs.SyncKinds.Has(op.Kind) {
			t.Fatalf("a barrier (op %s) with 4 dirty L2 tables in a cache of 4", op.Kind)
		}
	}
	if len(im.w.l2) != 4 {
		t.Fatalf("%d dirty L2 tables, want 4", len(im.w.l2))
	}
	if _, err := im.WriteAt(crashData(cs, 9), 256*cs); err != nil { // a fifth table
		t.Fatal(err)
	}
	if _, err := im.WriteAt(crashData(cs, 10), 2*cs); err != nil { // over the limit: flushed first
		t.Fatal(err)
	}
	if len(im.w.l2) > 1 {
		t.Fatalf("%d dirty L2 tables after the cache overflowed", len(im.w.l2))
	}
	mutCloseClean(t, im, ffs)
}

// TestCrashMutantWriteBackBounded: with small cache sizes, write-back mode
// writes the dirty metadata early (before Flush) so that the dirty L2
// tables and refcount blocks stay within about their bounds.
func TestCrashMutantWriteBackBounded(t *testing.T) {
	const cs = 512
	c := crashConfig{version: 3, cs: cs, rcBits: 64}
	for _, o := range []Options{{L2CacheBytes: 4 * cs}, {RefcountCacheBytes: 4 * cs}} {
		ffs, im := mutOpen(t, c, 4<<20, o)
		m := crashModel(4<<20, nil)
		const n = 2 << 20
		data := crashData(n, 13)
		start := len(ffs.Log())
		for off := int64(0); off < n; off += 4 << 10 {
			if _, err := im.WriteAt(data[off:off+4<<10], off); err != nil {
				t.Fatal(err)
			}
			m.Write(data[off:off+4<<10], off)
			if o.L2CacheBytes > 0 && int64(len(im.w.l2))*cs > o.L2CacheBytes+cs {
				t.Fatalf("%+v: %d dirty L2 tables", o, len(im.w.l2))
			}
			// relieve flushes at the start of a write once 2*4 blocks are
			// cached; one write may add a batch of 8 new blocks.
			if o.RefcountCacheBytes > 0 && len(im.w.rc.blocks) > 2*4+8 {
				t.Fatalf("%+v: %d refcount blocks cached", o, len(im.w.rc.blocks))
			}
		}
		syncs := 0
		for _, op := range ffs.Log()[start:] {
			if faultfs.SyncKinds.Has(op.Kind) {
				syncs++
			}
		}
		if syncs == 0 {
			t.Fatalf("%+v: no barrier before Flush although the caches overflowed", o)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		m.Flush()
		if err := crashVerify(ffs, m, 0); err != nil {
			t.Fatal(err)
		}
	}
}

// TestCrashMutantEndOfFile: a writable open puts the next allocation at
// the first cluster boundary at or after the end of the file, or after the
// last cluster beyond it that has a refcount (something uses it).
func TestCrashMutantEndOfFile(t *testing.T) {
	for _, c := range []crashConfig{{version: 1, cs: 512}, {version: 3, cs: 512}, {version: 2, cs: 64 << 10}} {
		mem, _ := crashSetup(t, c, 1<<20, 1)
		for round := range 2 {
			st, err := mem.Stat("img")
			if err != nil {
				t.Fatal(err)
			}
			im, err := Open(mem, "img", &Options{ReadWrite: true})
			if err != nil {
				t.Fatal(err)
			}
			if round > 0 && st.Size()%512 != 0 {
				// Writes that extend the file pad it to a whole sector, so
				// that no later in-place write of the last sector can tear.
				t.Fatalf("%s: the file ends inside a sector (%d bytes) after writes", c, st.Size())
			}
			if want := (st.Size() + c.cs - 1) / c.cs * c.cs; im.w.end != want {
				t.Fatalf("%s round %d: file of %d bytes: next allocation at %d, want %d", c, round, st.Size(), im.w.end, want)
			}
			if _, err := im.WriteAt(crashData(700, 1), int64(round)*(512<<10)+100); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
		}
	}

	// A refcount for a cluster past the end of the file.
	b := hostile.BaseByName("v3-refcount64") // 512-byte clusters, 64 refcounts per block
	n := int64(len(b.Files[b.Main]))
	for _, ahead := range []int64{0, 3, 63 - (n+511)/512} {
		used := (n+511)/512 + ahead // a cluster index in the first block
		mem := mutLoad(t, "v3-refcount64", func(img []byte) {
			binary.BigEndian.PutUint64(img[b.Built.RBOffs[0]+used*8:], 1)
		})
		im, err := Open(mem, "img", &Options{ReadWrite: true})
		if err != nil {
			t.Fatal(err)
		}
		if want := (used + 1) * 512; im.w.end != want {
			t.Fatalf("cluster %d past the end of a file of %d bytes has a refcount: next allocation at %d, want %d", used, n, im.w.end, want)
		}
		im.Close()
	}
}

// TestCrashMutantResizeReopen grows images of each version past their L1
// table (the header's size and L1 fields switch in one write) and checks
// that they reopen with the new size, their old data and the new.
func TestCrashMutantResizeReopen(t *testing.T) {
	const size = 256 << 10
	for _, c := range []crashConfig{{version: 1, cs: 512}, {version: 2, cs: 512}, {version: 3, cs: 4096}} {
		for _, through := range []bool{false, true} {
			ffs, im := mutOpen(t, c, size, Options{WriteThrough: through})
			m := crashModel(4*size, nil)
			p := crashData(3000, 14)
			for _, off := range []int64{0, size - 3000} {
				if _, err := im.WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
				m.Write(p, off)
			}
			if err := im.Resize(4 * size); err != nil {
				t.Fatalf("%s: %v", c, err)
			}
			if _, err := im.WriteAt(p, 4*size-3000); err != nil {
				t.Fatal(err)
			}
			m.Write(p, 4*size-3000)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			m.Flush()
			if err := crashVerify(ffs, m, 0); err != nil {
				t.Fatalf("%s wt=%v: %v", c, through, err)
			}
			im, err := Open(ffs, "img", nil)
			if err != nil {
				t.Fatal(err)
			}
			if im.Size() != 4*size || im.ClusterSize() != c.cs {
				t.Fatalf("%s: reopened with size %d, clusters %d", c, im.Size(), im.ClusterSize())
			}
			im.Close()
		}
	}
}

// TestCrashMutantFaultRollbackThrough is TestCrashFaultRollback in
// write-through mode, where every write runs the metadata stages and a
// failure anywhere in them rolls back, plus a resize and an L2 table copy.
func TestCrashMutantFaultRollbackThrough(t *testing.T) {
	for _, c := range []crashConfig{{version: 3, cs: 512, backing: true}, {version: 2, cs: 4096}, {version: 1, cs: 512}} {
		t.Run(c.String(), func(t *testing.T) {
			t.Parallel()
			err := exFaultRun(t, exWorkload{name: "rollback-wt", cfg: c, size: 64 << 10, through: true, ops: []exOp{
				{kind: "write", off: 700, n: 100, seed: 1},
				{kind: "write", off: 4096 - 100, n: 1300, seed: 2},
				{kind: "zero", off: 0, n: 4096},
				{kind: "write", off: 40<<10 + 10, n: 600, seed: 3},
			}}, 0)
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestCrashMutantFailedSync: when a barrier fails (and the kernel drops
// the dirty pages it covered), the call fails, every later write, Flush and
// Close fail with an error wrapping it, and the file, reopened, is a valid
// image holding what was durable before plus old or new data for the rest.
func TestCrashMutantFailedSync(t *testing.T) {
	for _, c := range []crashConfig{{version: 3, cs: 512}, {version: 1, cs: 512}} {
		for _, through := range []bool{false, true} {
			for k := 0; k < 3; k++ { // the k-th barrier after the first flush fails
				ffs, im := mutOpen(t, c, 64<<10, Options{WriteThrough: through})
				m := crashModel(64<<10, nil)
				p := crashData(1500, 15)
				if _, err := im.WriteAt(p, 100); err != nil {
					t.Fatal(err)
				}
				m.Write(p, 100)
				if err := im.Flush(); err != nil {
					t.Fatal(err)
				}
				m.Flush()
				ffs.SetInjector(faultfs.Rule(&nthSync{n: k + 1, hit: -1, seen: map[int]bool{}}, faultfs.FsyncDrop))
				var failed error
				for i, off := range []int64{5000, 20000, 40000} {
					q := crashData(700, uint64(16+i))
					if _, err := im.WriteAt(q, off); err != nil {
						m.FailedWrite(q, off)
						failed = err
						break
					}
					m.Write(q, off)
				}
				if failed == nil {
					failed = im.Flush()
				}
				if failed == nil && k > 0 {
					im.Close() // fewer than k+1 barriers in this mode
					continue
				}
				ffs.SetInjector(nil)
				if !errors.Is(failed, faultfs.ErrInjected) {
					t.Fatalf("%s wt=%v k=%d: %v, want the injected error", c, through, k, failed)
				}
				if _, err := im.WriteAt(p, 0); err == nil || !errors.Is(err, faultfs.ErrInjected) {
					t.Fatalf("%s wt=%v k=%d: a write after a failed barrier: %v", c, through, k, err)
				}
				if err := im.Flush(); err == nil {
					t.Fatalf("%s wt=%v k=%d: Flush after a failed barrier succeeded", c, through, k)
				}
				if err := im.Close(); err == nil {
					t.Fatalf("%s wt=%v k=%d: Close after a failed barrier succeeded", c, through, k)
				}
				m.Crash()
				if err := crashVerify(ffs, m, -1); err != nil {
					t.Fatalf("%s wt=%v k=%d: reopened: %v", c, through, k, err)
				}
			}
		}
	}
}

// nthSync matches the n-th barrier (fsync, fdatasync, sync_file_range) it
// sees, and only that one, however often it is asked about it.
type nthSync struct {
	n, hit int
	seen   map[int]bool
}

func (s *nthSync) String() string { return fmt.Sprintf("(nth-sync %d)", s.n) }

func (s *nthSync) Match(op faultfs.Op) bool {
	if faultfs.SyncKinds.Has(op.Kind) && !s.seen[op.Index] {
		s.seen[op.Index] = true
		if len(s.seen) == s.n {
			s.hit = op.Index
		}
	}
	return op.Index == s.hit
}

// mutWrites counts the write operations in ffs's log after position from.
func mutWrites(ffs *faultfs.FS, from int) int {
	n := 0
	for _, op := range ffs.Log()[from:] {
		if op.Kind == faultfs.OpWrite || op.Kind == faultfs.OpTruncate {
			n++
		}
	}
	return n
}

// TestCrashMutantZeroes: zeroing what already reads as zeros in an image
// without a backing file (unallocated clusters; on version 3, zero
// clusters) changes nothing and writes nothing; zeroing a whole data
// cluster of a version 3 image makes it a zero cluster and frees the old
// cluster; over a backing file, zeroing hides the backing data.
func TestCrashMutantZeroes(t *testing.T) {
	const cs = 512
	for _, c := range []crashConfig{{version: 3, cs: cs}, {version: 2, cs: cs}, {version: 1, cs: cs}} {
		ffs, im := mutOpen(t, c, 256<<10, Options{})
		m := crashModel(256<<10, nil)
		// Unallocated, no backing file: nothing to do.
		n0 := len(ffs.Log())
		if err := im.WriteZeroes(100, 100<<10); err != nil {
			t.Fatal(err)
		}
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		if k := mutWrites(ffs, n0); k != 0 || im.l1[0] != 0 {
			t.Fatalf("%s: zeroing unallocated clusters wrote %d times (L1[0] %#x)", c, k, im.l1[0])
		}
		// Whole data clusters.
		p := crashData(4*cs, 17)
		if _, err := im.WriteAt(p, 8*cs); err != nil {
			t.Fatal(err)
		}
		m.Write(p, 8*cs)
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		l2off, err := im.l1Entry(0)
		if err != nil {
			t.Fatal(err)
		}
		l2, err := im.l2Table(l2off)
		if err != nil {
			t.Fatal(err)
		}
		old := int64(l2[9] & l2OffsetMask)
		if err := im.WriteZeroes(9*cs, 2*cs); err != nil {
			t.Fatal(err)
		}
		m.WriteZeroes(9*cs, 2*cs)
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		m.Flush()
		l2, _ = im.l2Table(l2off)
		if c.version == 3 {
			if l2[9]&^flagCopied != flagZero || l2[10]&^flagCopied != flagZero {
				t.Fatalf("%s: zeroed whole clusters have entries %#x %#x, want zero clusters", c, l2[9], l2[10])
			}
			if v, err := im.w.rc.get(old / cs); err != nil || v != 0 {
				t.Fatalf("%s: the old cluster of a zeroed one has refcount %d (%v), want 0", c, v, err)
			}
			// Zeroing zero clusters again: nothing changes, nothing is written.
			n0 := len(ffs.Log())
			if err := im.WriteZeroes(9*cs, 2*cs); err != nil {
				t.Fatal(err)
			}
			if len(im.w.l2) != 0 {
				t.Fatalf("%s: zeroing zero clusters dirtied %d L2 tables", c, len(im.w.l2))
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			if k := mutWrites(ffs, n0); k != 0 {
				t.Fatalf("%s: zeroing zero clusters wrote %d times", c, k)
			}
		} else if int64(l2[9]&l2OffsetMask) != old {
			t.Fatalf("%s: version %d has no zero clusters: the cluster must stay (entry %#x, was at %#x)", c, c.version, l2[9], old)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		if err := crashVerify(ffs, m, 0); err != nil {
			t.Fatalf("%s: %v", c, err)
		}
	}

	// Over a backing file, whole and partial clusters, allocated or not.
	for _, c := range []crashConfig{{version: 3, cs: cs, backing: true}, {version: 2, cs: cs, backing: true}, {version: 1, cs: cs, backing: true}} {
		mem, base := crashSetup(t, c, 64<<10, 18)
		ffs := faultfs.New(mem)
		im, err := Open(ffs, "img", &Options{ReadWrite: true})
		if err != nil {
			t.Fatal(err)
		}
		m := crashModel(64<<10, base)
		for _, z := range [][2]int64{{0, 2 * cs}, {3*cs + 100, 200}, {5 * cs, 3*cs + 7*512}} {
			if err := im.WriteZeroes(z[0], z[1]); err != nil {
				t.Fatal(err)
			}
			m.WriteZeroes(z[0], z[1])
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		m.Flush()
		if err := crashVerify(ffs, m, 0); err != nil {
			t.Fatalf("%s: %v", c, err)
		}
	}
}

// TestCrashMutantLastCover: when the last allocation before Close is a data
// cluster that needs new refcount blocks, no cluster past the new blocks
// gets a refcount (it would be lost past the end of the file).
func TestCrashMutantLastCover(t *testing.T) {
	const cs = 512
	for _, through := range []bool{false, true} {
		c := crashConfig{version: 3, cs: cs, rcBits: 64} // 64 refcounts per block, 64 entries per L2 table
		ffs, im := mutOpen(t, c, 4<<20, Options{WriteThrough: through})
		blocks := func() int {
			n := 0
			for _, e := range im.w.rc.rt {
				if e != 0 {
					n++
				}
			}
			return n
		}
		for i := int64(1); ; i++ {
			if i == 4<<20/cs {
				t.Fatal("no data cluster needed a new refcount block")
			}
			before := blocks()
			if _, err := im.WriteAt(crashData(cs, uint64(i)), i*cs); err != nil {
				t.Fatal(err)
			}
			if blocks() != before && i%64 != 0 { // not an L2 table's first cluster
				break
			}
		}
		mutCloseClean(t, im, ffs)
		mutNoRefsPastEnd(t, ffs)
	}
}

// TestCrashMutantRollbackInPlace: a write-through write across three L2
// tables changes entries of each in place (flush stage 3); when the last of
// those writes fails, the rollback rewrites the first two with their old
// values durably before it truncates, restores the in-memory state (the
// next allocation goes where the failed one went, the writer knows the
// file's size), and leaves no refcount past the end of the file: every
// crash state from the failure on is a valid image, and so is the image
// after Close.
func TestCrashMutantRollbackInPlace(t *testing.T) {
	const cs = 512 // an L2 table maps 64 clusters
	for _, v := range []int{1, 2, 3} {
		c := crashConfig{version: v, cs: cs}
		ffs, im := mutOpen(t, c, 256<<10, Options{WriteThrough: true})
		m := crashModel(256<<10, nil)
		for _, off := range []int64{0, 64 * cs, 128 * cs} { // three L2 tables
			p := crashData(cs, uint64(off))
			if _, err := im.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			m.Write(p, off)
		}
		m.Flush()
		third, err := im.l1Entry(2)
		if err != nil || third == 0 {
			t.Fatalf("%s: no third L2 table (%v)", c, err)
		}
		// Entry 1 of the third table (guest cluster 129) changes in place
		// last.
		at := int64(third) + 8
		ffs.SetInjector(faultfs.Rule(&mutFirst{p: faultfs.And(faultfs.Kinds(faultfs.KindSet(faultfs.OpWrite)), faultfs.OffsetRange(at, at+8)), hit: -1}, faultfs.EIO))
		end := im.w.end
		n0 := len(ffs.Log())
		p := crashData(67*cs, 19)
		_, err = im.WriteAt(p, 63*cs) // guest clusters 63 to 129
		ffs.SetInjector(nil)
		if !errors.Is(err, faultfs.ErrInjected) {
			t.Fatalf("%s: the write across three L2 tables: %v, want the injected error", c, err)
		}
		m.FailedWrite(p, 63*cs)
		st, err := ffs.Stat("img")
		if err != nil {
			t.Fatal(err)
		}
		if im.w.end != end || im.w.fileSize != st.Size() {
			t.Fatalf("%s: after the rollback: next allocation at %d (was %d), file size %d known as %d", c, im.w.end, end, st.Size(), im.w.fileSize)
		}
		crashed := func() *model.Disk { // a fresh model per state: Check adopts what it sees
			mc := crashModel(256<<10, nil)
			for _, off := range []int64{0, 64 * cs, 128 * cs} {
				mc.Write(crashData(cs, uint64(off)), off)
			}
			mc.Flush()
			mc.FailedWrite(p, 63*cs)
			mc.Crash()
			return mc
		}
		states := 0
		for pt := range ffs.Recording().Points() {
			if pt.Ops() < n0 {
				continue
			}
			for s := range pt.States(faultfs.Torn, 20, 4) {
				states++
				if err := crashVerify(s, crashed(), -1); err != nil {
					t.Fatalf("%s: crash after op %d of the rollback (%s): %v", c, pt.Ops(), s, err)
				}
			}
		}
		if states == 0 {
			t.Fatalf("%s: no crash state after the failure", c)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		m.Flush()
		if err := crashVerify(ffs, m, 0); err != nil {
			t.Fatalf("%s: after the rollback: %v", c, err)
		}
		mutNoRefsPastEnd(t, ffs)
	}
}

// mutFirst matches the first operation p matches, and only that one.
type mutFirst struct {
	p   faultfs.Predicate
	hit int
}

func (f *mutFirst) String() string { return "(first " + f.p.String() + ")" }

func (f *mutFirst) Match(op faultfs.Op) bool {
	if f.hit < 0 && f.p.Match(op) {
		f.hit = op.Index
	}
	return op.Index == f.hit
}

// TestCrashMutantCloseDurable: after Close, everything is durable,
// including the refcount decrements of the last flush: a crash right after
// Close (losing whatever was not synced) leaves an exact image without
// leaks.
func TestCrashMutantCloseDurable(t *testing.T) {
	const cs = 512
	for _, c := range []crashConfig{{version: 3, cs: cs}, {version: 2, cs: cs}} {
		ffs, im := mutOpen(t, c, 256<<10, Options{})
		m := crashModel(256<<10, nil)
		p := crashData(8*cs, 20)
		if _, err := im.WriteAt(p, 0); err != nil {
			t.Fatal(err)
		}
		m.Write(p, 0)
		if err := im.Flush(); err != nil {
			t.Fatal(err)
		}
		// Zeroing whole clusters (v3) or rewriting them after a resize
		// frees clusters: their decrements are written last.
		if err := im.WriteZeroes(0, 4*cs); err != nil {
			t.Fatal(err)
		}
		m.WriteZeroes(0, 4*cs)
		if err := im.Resize(512 << 10); err != nil { // moves the L1 table: frees the old one
			t.Fatal(err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		m.Flush()
		st, err := ffs.CrashState(faultfs.LoseUnsynced, 5)
		if err != nil {
			t.Fatal(err)
		}
		if err := crashVerify(st, m, 0); err != nil {
			t.Fatalf("%s: crash after Close: %v", c, err)
		}
	}
}
