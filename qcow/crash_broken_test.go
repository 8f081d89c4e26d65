package qcow

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// TestCrashCatchesBrokenWriters shows that the crash checks can fail: each
// deliberately broken writer must be caught, and the first failing case (in
// enumeration order: the earliest crash point or the first failing
// operation, which is the smallest case) is printed.
//
//   - no-data-barrier: flush stage 1 ends without fdatasync, so pointers can
//     reach the disk before the data and refcounts they cover;
//   - no-refcount-update: refcount increments are never written;
//   - rollback-keeps-tables: a failed write's truncate rollback forgets to
//     restore the in-memory tables;
//   - rollback-no-truncate (in write-back and write-through mode): the
//     rollback never cuts the file back (caught by the rollback verdict on
//     the live file: too long);
//   - swallow-data-error: a failed pwrite of guest data is ignored and the
//     call returns nil (caught by the errors verdict);
//   - sync-file-range-barrier: every fdatasync is replaced by
//     sync_file_range over what was written since the last barrier, which
//     makes the data durable but not the file size (a vfs.FS wrapper);
//   - resize-not-durable: Resize leaves the new size in memory until the
//     next flush, although it is documented durable on return: a crash
//     after it returned keeps the old size (the size verdict).
//
// The snapshot-in-place bug (guest data written in place into a cluster
// shared with an internal snapshot) is caught by the harness in
// TestCrashHarnessCatchesBrokenWriters.
func TestCrashCatchesBrokenWriters(t *testing.T) {
	var newL2 exWorkload // new-l2, v3, 512-byte clusters
	for _, w := range exWorkloads() {
		if w.name == "new-l2" && w.cfg.version == 3 {
			newL2 = w
		}
	}
	limit := min(crashLimit(t), 256)
	rollback := exWorkload{name: "rollback", cfg: crashConfig{version: 3, cs: 512, backing: true}, size: 64 << 10, ops: []exOp{
		{kind: "write", off: 700, n: 100, seed: 1},
		{kind: "write", off: 4096 - 100, n: 1300, seed: 2},
		{kind: "flush"},
		{kind: "write", off: 8192 + 10, n: 600, seed: 3},
		{kind: "flush"},
	}}
	cases := []struct {
		name string
		run  func(t *testing.T) error
	}{
		{"no-data-barrier", func(t *testing.T) error {
			_, err := exRun(t, newL2, limit, bugNoDataBarrier, nil)
			return err
		}},
		{"no-refcount-update", func(t *testing.T) error {
			_, err := exRun(t, newL2, limit, bugNoRefcountUpdate, nil)
			return err
		}},
		{"rollback-keeps-tables", func(t *testing.T) error {
			return exFaultRun(t, rollback, bugRollbackKeepsMem)
		}},
		{"rollback-no-truncate", func(t *testing.T) error {
			return exFaultRun(t, rollback, bugRollbackNoTruncate)
		}},
		{"rollback-no-truncate-write-through", func(t *testing.T) error {
			w := rollback
			w.through = true
			return exFaultRun(t, w, bugRollbackNoTruncate)
		}},
		{"swallow-data-error", func(t *testing.T) error {
			return exFaultRun(t, rollback, bugSwallowDataError)
		}},
		{"resize-not-durable", func(t *testing.T) error {
			return wtCrashRun(t, CreateOptions{ClusterSize: 512, RefcountBits: 64}, false, 6, bugResizeNotDurable)
		}},
		{"sync-file-range-barrier", func(t *testing.T) error {
			_, err := exRun(t, newL2, limit, 0, func(fsys vfs.FS) vfs.FS { return &syncRangeFS{FS: fsys} })
			return err
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			err := c.run(t)
			if err == nil {
				t.Fatalf("the broken writer %s was not caught", c.name)
			}
			var v *crashVerdict
			if !errors.As(err, &v) {
				t.Fatalf("the broken writer %s failed without a verdict: %v", c.name, err)
			}
			t.Logf("caught %s (verdict %s): %v", c.name, v.Verdict, err)
		})
	}
}

// TestCrashFaultRollback runs the fault enumeration of
// TestCrashCatchesBrokenWriters against the correct writer: every
// operation of the workload fails in turn, and the image must stay valid,
// leak free and readable like the model.
func TestCrashFaultRollback(t *testing.T) {
	for _, c := range []crashConfig{{version: 3, cs: 512, backing: true}, {version: 2, cs: 4096}, {version: 1, cs: 512, backing: true}} {
		t.Run(c.String(), func(t *testing.T) {
			t.Parallel()
			err := exFaultRun(t, exWorkload{name: "rollback", cfg: c, size: 64 << 10, ops: []exOp{
				{kind: "write", off: 700, n: 100, seed: 1},
				{kind: "write", off: 4096 - 100, n: 1300, seed: 2},
				{kind: "flush"},
				{kind: "write", off: 8192 + 10, n: 600, seed: 3},
				{kind: "zero", off: 0, n: 4096},
				{kind: "flush"},
			}}, 0)
			if err != nil {
				t.Fatal(err)
			}
		})
	}
}

// exFaultRun fails, one run at a time, the k-th file operation after the
// image is opened, for every k (EIO; barriers are left alone: their failure
// is final by contract, which the state machines check),
// and checks the errors verdict (the failing call returns an error wrapping
// the injected one, the call during which the fault fired does not return
// nil, and no other call fails), the rollback verdict on the live file
// right after a failed write (crashRollbackVerdict), then after Close the
// check verdict without leaks (a rollback leaves none) and the content
// verdict. It returns the first failure.
func exFaultRun(t testing.TB, w exWorkload, bugs writerBugs) error {
	t.Helper()
	mem0, base := crashSetup(t, w.cfg, w.size, 7)
	for k := 0; ; k++ {
		id := fmt.Sprintf("%s:fail-op=%d", w.id(), k)
		mem := mem0.Clone()
		ffs := faultfs.New(mem)
		im, err := Open(ffs, "img", &Options{ReadWrite: true, WriteThrough: w.through})
		if err != nil {
			t.Fatal(err)
		}
		im.w.bugs = bugs
		n0 := len(ffs.Log())
		inj := &hitInjector{Injector: faultfs.Rule(faultfs.And(
			faultfs.OnIndex(n0+k),
			faultfs.Not(faultfs.Kinds(faultfs.KindSet(faultfs.OpSync, faultfs.OpDatasync, faultfs.OpSyncRange))),
		), faultfs.EIO)}
		ffs.SetInjector(inj)
		m := crashModel(w.size, base)
		for i, op := range w.ops {
			before := inj.hit != nil
			var live crashLive
			if !before && op.kind != "flush" {
				live = crashLiveBefore(t, mem, w.cfg.cs)
			}
			err := exApply(im, op)
			hitNow := !before && inj.hit != nil
			switch {
			case err == nil && hitNow:
				return verdictf("errors", "%s: op %d (%s) returned nil although its file operation %s failed", id, i, op.kind, inj.hit)
			case err != nil && (inj.hit == nil || !crashInjected(err)):
				return verdictf("errors", "%s: op %d (%s) failed without the injected fault: %v", id, i, op.kind, err)
			case err != nil && hitNow && op.kind != "flush":
				// One EIO on a file operation that is not a barrier, and
				// nothing else failed: the rollback ran to its end.
				if err := live.verdict(mem, w.through, op.off, exWant(op)); err != nil {
					return fmt.Errorf("%s: op %d (%s): %w", id, i, op.kind, err)
				}
			}
			switch {
			case err != nil && op.kind == "write":
				m.FailedWrite(crashData(op.n, op.seed), op.off)
			case err != nil && op.kind == "zero":
				m.FailedWriteZeroes(op.off, op.n)
			case op.kind == "write":
				m.Write(crashData(op.n, op.seed), op.off)
			case op.kind == "zero":
				m.WriteZeroes(op.off, op.n)
			case op.kind == "flush" && err == nil:
				m.Flush()
			}
		}
		ffs.SetInjector(nil)
		if err := im.Close(); err != nil {
			if inj.hit == nil || !crashInjected(err) {
				return verdictf("errors", "%s: Close: %v", id, err)
			}
		}
		if err := crashVerify(ffs, m, 0); err != nil {
			return fmt.Errorf("%s: %w", id, err)
		}
		if n := len(ffs.Log()) - n0; k >= n {
			if n < 10 {
				t.Fatalf("%s: the workload did only %d file operations", w.id(), n)
			}
			return nil
		}
	}
}

// syncRangeFS is a broken file system layer: every Sync and Datasync
// becomes sync_file_range over the bytes written since the last barrier, as
// a writer that used sync_file_range as its only barrier would do. It
// persists the data but neither the file size nor other metadata.
type syncRangeFS struct{ vfs.FS }

func (s *syncRangeFS) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	f, err := s.FS.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return &syncRangeFile{File: f}, nil
}

type syncRangeFile struct {
	vfs.File
	lo, hi int64 // written since the last barrier; hi == 0: nothing
}

func (f *syncRangeFile) WriteAt(p []byte, off int64) (int, error) {
	n, err := f.File.WriteAt(p, off)
	if n > 0 {
		if f.hi == 0 {
			f.lo, f.hi = off, off+int64(n)
		} else {
			f.lo, f.hi = min(f.lo, off), max(f.hi, off+int64(n))
		}
	}
	return n, err
}

func (f *syncRangeFile) barrier() error {
	if f.hi == 0 {
		return nil
	}
	err := f.File.SyncRange(f.lo, f.hi-f.lo)
	if err == nil {
		f.lo, f.hi = 0, 0
	}
	return err
}

func (f *syncRangeFile) Sync() error { return f.barrier() }

func (f *syncRangeFile) Datasync() error { return f.barrier() }

// crashLive is the live image file "img" before a write: its size and its
// leaked clusters, for the rollback verdict on it after the write.
type crashLive struct {
	size, cs int64
	leaks    int
}

// crashLiveBefore reads the size and leaks of "img" in fsys (the FS under
// faultfs, so that nothing is logged and no fault can fire).
func crashLiveBefore(t crashTB, fsys vfs.FS, cs int64) crashLive {
	t.Helper()
	fi, err := fsys.Stat("img")
	if err != nil {
		t.Fatal(err)
	}
	res, err := CheckFile(fsys, "img", "")
	if err != nil {
		t.Fatal(err)
	}
	return crashLive{size: fi.Size(), cs: cs, leaks: res.Leaks}
}

// verdict is the rollback verdict of package harness on the live file "img"
// of fsys right after the write op failed with one injected fault that was
// not a crash and not on a barrier, no other fault firing during it: the
// rollback ran with every file operation succeeding, so check finds no
// corruption, no more leaks than before the call, and the file is no
// longer than its size before the call rounded up to a whole cluster. In
// write-through mode a call whose data reads back in full took effect before
// the failure (a failed stage 4): then only corruption counts.
func (l crashLive) verdict(fsys vfs.FS, through bool, off int64, want []byte) error {
	res, err := CheckFile(fsys, "img", "")
	if err != nil {
		return verdictf("check", "after the rollback: %w", err)
	}
	if res.Corruptions > 0 || res.CheckErrors > 0 {
		return verdictf("check", "after the rollback: %d corruptions, %d check errors: %s", res.Corruptions, res.CheckErrors, crashFindings(res))
	}
	if through && crashCommitted(fsys, off, want) {
		return nil
	}
	fi, err := fsys.Stat("img")
	if err != nil {
		return err
	}
	if lim := (l.size + l.cs - 1) &^ (l.cs - 1); fi.Size() > lim {
		return verdictf("check", "after the rollback the file holds %d bytes; before the call %d (at most %d allowed: a whole cluster)", fi.Size(), l.size, lim)
	}
	if res.Leaks > l.leaks {
		return verdictf("check", "the rollback leaked: %d leaked clusters, %d before the call: %s", res.Leaks, l.leaks, crashFindings(res))
	}
	return nil
}

// crashCommitted reports whether the image "img" of fsys reads want at off.
func crashCommitted(fsys vfs.FS, off int64, want []byte) bool {
	im, err := Open(fsys, "img", nil)
	if err != nil {
		return false
	}
	defer im.Close()
	got := make([]byte, len(want))
	if _, err := im.ReadAt(got, off); err != nil {
		return false
	}
	return bytes.Equal(got, want)
}

// exWant returns what the write op leaves in its range: its data, or zeros.
func exWant(op exOp) []byte {
	if op.kind == "write" {
		return crashData(op.n, op.seed)
	}
	return make([]byte, op.n)
}
