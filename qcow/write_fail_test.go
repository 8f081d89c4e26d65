package qcow

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// wtOp is one step of the failure-injection workload.
type wtOp struct {
	kind  string // "write", "zero", "flush", "resize"
	off   int64
	n     int64 // length; for resize the new size
	fill  uint64
	label string
	data  []byte // filled in once by wtFailRun
}

// wtFailWorkload is a fixed sequence of allocating and non-allocating
// writes for a disk of size bytes with clusters of cs bytes: new L2 tables,
// partial new clusters, rewrites in place, zero clusters and copy-on-write
// out of them, a long sequential write that needs new refcount blocks (and,
// with small clusters, a new refcount table), and an L1 table growth.
func wtFailWorkload(size, cs, long int64) []wtOp {
	return []wtOp{
		{kind: "write", off: 0, n: cs, fill: 1, label: "first cluster: new L2 table"},
		{kind: "write", off: size/2 + 100, n: 700, fill: 2, label: "partial new cluster"},
		{kind: "write", off: 10, n: 50, fill: 3, label: "rewrite in place"},
		{kind: "flush"},
		{kind: "write", off: cs - 300, n: 2*cs + 600, fill: 4, label: "three clusters, unaligned"},
		{kind: "zero", off: cs, n: cs, label: "zero a whole cluster"},
		{kind: "write", off: cs + 512, n: 512, fill: 5, label: "write into a zero cluster"},
		{kind: "zero", off: 100, n: 1000, label: "partial zero"},
		{kind: "write", off: size / 8, n: long, fill: 6, label: "long sequential write"},
		{kind: "flush"},
		{kind: "resize", n: size + size/4, label: "grow the L1 table"},
		{kind: "write", off: size + size/4 - cs - 512, n: cs + 512, fill: 7, label: "write in the grown area"},
		{kind: "zero", off: 0, n: 4 * cs, label: "zero four clusters"},
		{kind: "flush"},
	}
}

// wtSizedReader reads an image for the model. A read past the image's
// virtual size is an error naming both sizes, never zeros: a model of
// another size than the image is a size verdict, not a content pass.
type wtSizedReader struct{ im *Image }

func (r wtSizedReader) ReadAt(p []byte, off int64) (int, error) {
	if size := r.im.Size(); off+int64(len(p)) > size {
		return 0, fmt.Errorf("read %d bytes at %d past the virtual size %d of the image", len(p), off, size)
	}
	return r.im.ReadAt(p, off)
}

// BlockStatus passes the image's zero ranges on to the model.
func (r wtSizedReader) BlockStatus(off, n int64) (int64, bool, error) {
	return r.im.BlockStatus(off, n)
}

// wtCheckImage judges an open image against the model: first its virtual
// size (old or new while a resize is not durable, new once it is), which
// the model then adopts, then every sector up to that size.
func wtCheckImage(m *model.Disk, im *Image) error {
	if err := m.CheckSize(im.Size()); err != nil {
		return err
	}
	return m.Check(im)
}

// wtApplyOp applies op to im and the model; a failed op is recorded as
// such in the model.
func wtApplyOp(im *Image, m *model.Disk, op wtOp) error {
	switch op.kind {
	case "write":
		p := op.data
		if p == nil {
			p = wtFill(op.n, op.fill)
		}
		if _, err := im.WriteAt(p, op.off); err != nil {
			m.FailedWrite(p, op.off)
			return err
		}
		m.Write(p, op.off)
	case "zero":
		if err := im.WriteZeroes(op.off, op.n); err != nil {
			m.FailedWriteZeroes(op.off, op.n)
			return err
		}
		m.WriteZeroes(op.off, op.n)
	case "flush":
		if err := im.Flush(); err != nil {
			return err
		}
		m.Flush()
	case "resize":
		if err := im.Resize(op.n); err != nil {
			m.FailedResize(op.n)
			return err
		}
		m.Resize(op.n, true) // durable on return, whatever the cache mode
	}
	return nil
}

// TestWriteFailureRollback fails, one run at a time, every file operation
// (pwrite, fdatasync) that the workload performs, with EIO, ENOSPC or a
// short write, and checks the contract: the failing call returns an error
// wrapping the injected one; the image stays usable (or, after a failed
// fdatasync, refuses every later write); after Close and reopen it has no
// corruption and, except after a failed fdatasync in write-back mode, no
// leaks; and it reads back like the flat model.
func TestWriteFailureRollback(t *testing.T) {
	configs := []struct {
		o       CreateOptions
		through bool
		size    int64
		long    int64    // length of the long sequential write
		kinds   []string // failure kinds, rotated over the operations
		rtMove  bool     // the workload must move the refcount table
	}{
		// 512-byte clusters with 64-bit refcounts: one refcount table
		// cluster covers 2 MiB of file, so the long write moves it.
		{CreateOptions{ClusterSize: 512, RefcountBits: 64}, true, 3 * wtMiB, 2304 * wtKiB, []string{"EIO", "ENOSPC", "short"}, true},
		{CreateOptions{ClusterSize: 512, RefcountBits: 64}, false, 2 * wtMiB, 640 * wtKiB, []string{"short", "EIO"}, false},
		{CreateOptions{ClusterSize: 4096, Version: 2}, true, 4 * wtMiB, wtMiB, []string{"ENOSPC", "short", "EIO"}, false},
		{CreateOptions{ClusterSize: 65536, RefcountBits: 2}, false, 4 * wtMiB, wtMiB, []string{"EIO", "short", "ENOSPC"}, false},
		{CreateOptions{Format: FormatQCOW}, true, 4 * wtMiB, wtMiB, []string{"EIO", "short", "ENOSPC"}, false},
		{CreateOptions{Format: FormatQCOW, ClusterSize: 512}, false, 1 * wtMiB, 300 * wtKiB, []string{"short", "ENOSPC", "EIO"}, false},
	}
	for _, cfg := range configs {
		name := fmt.Sprintf("%s-through=%v", wtName(cfg.o), cfg.through)
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			wtFailRun(t, cfg.o, cfg.through, cfg.size, cfg.long, cfg.kinds, cfg.rtMove)
		})
	}
}

func wtFailRun(t *testing.T, o CreateOptions, through bool, size, long int64, kinds []string, rtMove bool) {
	base := vfs.NewMem()
	o.Size = size
	if err := Create(base, "img", o); err != nil {
		t.Fatal(err)
	}
	// Prefill a little so that existing tables are modified in place too.
	im, err := Open(base, "img", &Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	cs := im.ClusterSize()
	for i := int64(0); i < 6; i++ {
		if _, err := im.WriteAt(wtFill(cs+100, uint64(100+i)), i*size/6+cs/2); err != nil {
			t.Fatal(err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, _ = Open(base, "img", nil)
	initial := make([]byte, size)
	if _, err := im.ReadAt(initial, 0); err != nil {
		t.Fatal(err)
	}
	im.Close()
	ops := wtFailWorkload(size, cs, long)
	for i := range ops {
		if ops[i].kind == "write" {
			ops[i].data = wtFill(ops[i].n, ops[i].fill)
		}
	}

	opts := &Options{ReadWrite: true, WriteThrough: through, L2CacheBytes: 4 * cs, RefcountCacheBytes: 4 * cs}
	qemuChecks := 0
	// Every operation up to 64, then every third one: a long write with
	// small clusters repeats the same few kinds of operation many times.
	for k := 1; ; k += 1 + 2*min(k/64, 1) {
		kind := kinds[k%len(kinds)]
		var inj error
		switch kind {
		case "EIO", "short":
			inj = syscall.EIO
		case "ENOSPC":
			inj = syscall.ENOSPC
		}
		mem := base.Clone()
		ffs := &wtFailFS{FS: mem, failAt: k, err: inj, short: kind == "short"}
		m := model.New(size, bytes.NewReader(initial))
		im, err := Open(ffs, "img", opts)
		if err != nil {
			t.Fatal(err)
		}
		failedOp, syncFailed := -1, false
		cur := size
		for i, op := range ops {
			if op.kind != "resize" && op.off+op.n > cur {
				continue // the resize before it failed
			}
			err := wtApplyOp(im, m, op)
			if err == nil && op.kind == "resize" {
				cur = op.n
			}
			if err == nil {
				continue
			}
			if failedOp >= 0 {
				// Only a failed fdatasync may make later writes fail.
				if !syncFailed {
					t.Fatalf("k=%d (%s): op %d (%s) failed after the injected failure in op %d was handled: %v", k, kind, i, op.label, failedOp, err)
				}
				if !errors.Is(err, inj) {
					t.Fatalf("k=%d: later failure does not wrap the injected error: %v", k, err)
				}
				break
			}
			if !ffs.hit {
				t.Fatalf("k=%d: op %d (%s) failed without an injected failure: %v", k, i, op.label, err)
			}
			if !errors.Is(err, inj) {
				t.Fatalf("k=%d (%s at %s): op %d error does not wrap the injected %v: %v", k, kind, ffs.ops[k-1], i, inj, err)
			}
			failedOp = i
			syncFailed = ffs.ops[k-1] == "fdatasync"
		}
		cerr := im.Close()
		if failedOp < 0 && ffs.hit {
			// The failure hit Close: its flush or its last barrier.
			if !errors.Is(cerr, inj) {
				t.Fatalf("k=%d (%s at %s): Close error does not wrap the injected %v: %v", k, kind, ffs.ops[k-1], inj, cerr)
			}
			syncFailed = ffs.ops[k-1] == "fdatasync"
			if syncFailed && !through {
				m.Crash()
			}
			wtVerify(t, mem, m, syncFailed, fmt.Sprintf("k=%d (%s at %s in Close)", k, kind, ffs.ops[k-1]))
			continue
		}
		if !ffs.hit {
			if cerr != nil {
				t.Fatal(cerr)
			}
			if k < 10 {
				t.Fatalf("workload did only %d file operations", k-1)
			}
			wtVerify(t, mem, m, false, "without failures")
			if rtMove {
				im, err := Open(mem, "img", nil)
				if err != nil {
					t.Fatal(err)
				}
				if im.h.rtOff == uint64(cs) {
					t.Errorf("the workload did not move the refcount table")
				}
				im.Close()
			}
			t.Logf("failed file operations one at a time, %d in all", ffs.n)
			return
		}
		if !syncFailed && cerr != nil {
			t.Fatalf("k=%d (%s at %s): Close after a handled failure: %v", k, kind, ffs.ops[k-1], cerr)
		}
		if syncFailed && failedOp >= 0 && cerr == nil {
			t.Fatalf("k=%d: Close after a failed fdatasync returned nil", k)
		}
		leaksOK := syncFailed && !through
		if syncFailed && !through {
			m.Crash() // write-back: unflushed writes may be lost
		}
		wtVerify(t, mem, m, leaksOK, fmt.Sprintf("k=%d (%s at %s, op %d)", k, kind, ffs.ops[k-1], failedOp))
		if k%13 == 5 && qemuChecks < 2 && o.Format != FormatQCOW {
			if _, _, err := wtQemuAvailable(); err == nil {
				qemuChecks++
				wtQemuCheckMem(t, mem, "img", leaksOK)
			}
		}
	}
}

// wtVerify reopens img in mem and checks structure and content.
func wtVerify(t *testing.T, mem vfs.FS, m *model.Disk, leaksOK bool, what string) {
	t.Helper()
	res, err := CheckFile(mem, "img", "")
	if err != nil {
		t.Fatalf("%s: check: %v", what, err)
	}
	if res.Corruptions > 0 || (res.Leaks > 0 && !leaksOK) {
		t.Fatalf("%s: check: %d corruptions, %d leaks: %+v", what, res.Corruptions, res.Leaks, res.Findings)
	}
	im, err := Open(mem, "img", nil)
	if err != nil {
		t.Fatalf("%s: reopen: %v", what, err)
	}
	defer im.Close()
	if err := wtCheckImage(m, im); err != nil {
		t.Fatalf("%s: content: %v", what, err)
	}
}

// wtQemuAvailable reports whether qemu-img can be run (without skipping:
// the qemu cross-check is an extra; the test's own checks need no qemu).
func wtQemuAvailable() (string, string, error) {
	img, err := exec.LookPath("qemu-img")
	return img, "", err
}

// wtQemuCheckMem copies name out of mem and runs qemu-img check on it.
func wtQemuCheckMem(t *testing.T, mem vfs.FS, name string, leaksOK bool) {
	t.Helper()
	f, err := mem.Open(name, vfs.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, _ := f.Size()
	b := make([]byte, size)
	if _, err := f.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	code, out := qemutest.Check(t, path)
	if code != 0 && !(leaksOK && code == 3) {
		t.Fatalf("qemu-img check: exit %d\n%s", code, out)
	}
}
