package qcow

// Tests written to kill the mutants of the writer that the Crash suite let
// live (scripts/mutation.sh). They are named TestCrash... so that the
// script's killing test set (`go test -short -run Crash ./qcow`) runs them;
// each asserts behaviour of the writer that a mutant changed: a bound, a
// guard, a cache size, a retry after an error. They are white-box where the
// behaviour cannot be reached from the public API in a few milliseconds.

import (
	"bytes"
	"errors"
	"slices"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
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
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		mutClean(t, ffs)
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
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		mutClean(t, ffs)
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
		p := crashData(cs, 4)
		if _, err := im.WriteAt(p, size-cs); err != nil {
			t.Fatal(err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		mutClean(t, ffs)
		im, err := Open(ffs, "img", nil)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, cs)
		if _, err := im.ReadAt(got, size-cs); err != nil || !bytes.Equal(got, p) || im.Size() != size {
			t.Fatalf("%s: after the resize: size %d, last sector reads back %v, %v", c, im.Size(), bytes.Equal(got, p), err)
		}
		im.Close()
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
	for off := int64(0); off < n; off += 64 << 10 {
		if _, err := im.WriteAt(data[off:off+64<<10], off); err != nil {
			t.Fatal(err)
		}
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
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	mutClean(t, ffs)
}
