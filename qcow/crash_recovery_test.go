package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// TestCrashFaultDuringRollback injects a second fault while a truncate
// rollback runs. The first fault (EIO on the k-th file operation of the
// workload, never a barrier) starts a rollback; the second fires j
// operations later (any kind, barriers included, so it lands on the
// rollback's metadata writes, its fdatasync or its ftruncate) as EIO or as
// a crash after which every operation fails. For every k, j and action:
//
//   - errors: every call that fails returns an error wrapping the injected
//     fault, and once the writer has declared itself failed it refuses
//     writes (no call returns nil after the image lost track of its file);
//   - rollback: when the second fault comes after the failing call, its
//     rollback ran to its end, and the live file right after it passes
//     the rollback verdict (crashLive.verdict: no longer than before the
//     call rounded up to a cluster, no corruption, no new leaks);
//   - the live file (the process model) and up to 16 torn-model crash
//     states of the last point open, have no corruption (leaks allowed:
//     the rollback did not finish), hold what the model allows (every op
//     from the first failure on is a failed write; then a crash), and
//     accept, flush and read back a new write after a writable reopen.
func TestCrashFaultDuringRollback(t *testing.T) {
	states := 16
	maxJ := 8
	if lightTests() {
		states, maxJ = 4, 5
	}
	for _, c := range []struct {
		cfg     crashConfig
		through bool
	}{{crashConfig{version: 3, cs: 512, backing: true}, false}, {crashConfig{version: 3, cs: 512}, true}, {crashConfig{version: 2, cs: 4096}, false}, {crashConfig{version: 1, cs: 512, backing: true}, true}} {
		w := exWorkload{name: "rollback-fault", cfg: c.cfg, through: c.through, size: 64 << 10, ops: []exOp{
			{kind: "write", off: 700, n: 100, seed: 1},
			{kind: "write", off: 4096 - 100, n: 1300, seed: 2},
			{kind: "flush"},
			{kind: "write", off: 8192 + 10, n: 600, seed: 3},
			{kind: "zero", off: 0, n: 4096},
			{kind: "write", off: 32 << 10, n: 5000, seed: 4},
			{kind: "flush"},
		}}
		t.Run(w.id(), func(t *testing.T) {
			t.Parallel()
			runs, rollbacks := 0, 0
			for k := 0; ; k++ {
				more := false
				for j := 1; j <= maxJ; j++ {
					for _, act := range []faultfs.Action{faultfs.EIO, faultfs.Crash} {
						r, err := rollbackFaultRun(t, w, k, j, act, states)
						if err != nil {
							t.Fatal(err)
						}
						runs++
						more = more || r.more
						if r.secondHit {
							rollbacks++
						}
					}
				}
				if !more {
					break
				}
			}
			// The test must have reached rollbacks: a second fault that
			// fired inside the failing call.
			if rollbacks < 10 {
				t.Fatalf("only %d of %d runs put the second fault inside the failing call", rollbacks, runs)
			}
			t.Logf("%d runs, %d with the second fault inside the failing call's rollback", runs, rollbacks)
		})
	}
}

// rollbackFaultResult says what one run of TestCrashFaultDuringRollback saw.
type rollbackFaultResult struct {
	more      bool // k is inside the workload: a larger k may still fire
	secondHit bool // the second fault fired during the call the first failed
}

// rollbackFaultRun runs w with the two faults of
// TestCrashFaultDuringRollback and checks the outcome.
func rollbackFaultRun(t *testing.T, w exWorkload, k, j int, act faultfs.Action, nstates int) (rollbackFaultResult, error) {
	var res rollbackFaultResult
	id := fmt.Sprintf("%s:fail-op=%d:then=+%d:%s", w.id(), k, j, act)
	mem, base := crashSetup(t, w.cfg, w.size, 7)
	ffs := faultfs.New(mem)
	im, err := Open(ffs, "img", &Options{ReadWrite: true, WriteThrough: w.through})
	if err != nil {
		t.Fatal(err)
	}
	n0 := len(ffs.Log())
	first := &hitInjector{Injector: faultfs.Rule(faultfs.And(
		faultfs.OnIndex(n0+k),
		faultfs.Not(faultfs.Kinds(faultfs.KindSet(faultfs.OpSync, faultfs.OpDatasync, faultfs.OpSyncRange))),
	), faultfs.EIO)}
	second := &hitInjector{Injector: faultfs.Rule(faultfs.OnIndex(n0+k+j), act)}
	ffs.SetInjector(faultfs.Any(first, second))
	type applied struct {
		op     exOp
		failed bool
	}
	var log []applied
	failing := -1 // the workload op the first fault failed
	for i, op := range w.ops {
		before := len(ffs.Log())
		var live crashLive
		if first.hit == nil && op.kind != "flush" {
			live = crashLiveBefore(t, mem, w.cfg.cs)
		}
		err := exApply(im, op)
		if first.hit != nil && failing < 0 {
			failing = i
			res.secondHit = second.hit != nil && len(ffs.Log()) > n0+k+j && before <= n0+k+j
			if err == nil {
				return res, verdictf("errors", "%s: op %d (%s) returned nil although its file operation %d failed", id, i, op.kind, first.hit.Index)
			}
			// Only the first fault fired during the call (the second
			// comes after it, so it has not fired at all yet): the
			// rollback ran to its end, and the rollback verdict applies.
			if second.hit == nil && op.kind != "flush" {
				if err := live.verdict(mem, w.through, op.off, exWant(op)); err != nil {
					return res, fmt.Errorf("%s: op %d (%s): %w", id, i, op.kind, err)
				}
			}
		}
		if err != nil && !errors.Is(err, faultfs.ErrInjected) {
			return res, verdictf("errors", "%s: op %d (%s) failed without wrapping an injected fault: %v", id, i, op.kind, err)
		}
		// From the first failure on, every op is a failed one: a write
		// that succeeded after a rollback that failed half way is still
		// only as durable as the crash makes it.
		log = append(log, applied{op, failing >= 0 || err != nil})
	}
	newModel := func() *model.Disk {
		m := crashModel(w.size, base)
		for _, a := range log {
			switch {
			case a.failed && a.op.kind == "write":
				m.FailedWrite(crashData(a.op.n, a.op.seed), a.op.off)
			case a.failed && a.op.kind == "zero":
				m.FailedWriteZeroes(a.op.off, a.op.n)
			case a.op.kind == "write":
				m.Write(crashData(a.op.n, a.op.seed), a.op.off)
			case a.op.kind == "zero":
				m.WriteZeroes(a.op.off, a.op.n)
			case a.op.kind == "flush" && !a.failed:
				m.Flush()
			}
		}
		m.Crash()
		return m
	}
	if cerr := im.Close(); cerr != nil && !errors.Is(cerr, faultfs.ErrInjected) {
		return res, verdictf("errors", "%s: Close failed without wrapping an injected fault: %v", id, cerr)
	}
	// k is inside the workload while the log reaches it.
	res.more = n0+k < len(ffs.Log())
	if failing < 0 {
		return res, nil
	}
	ffs.SetInjector(nil)
	rec := ffs.Recording()
	last, err := rec.Point(rec.Len())
	if err != nil {
		return res, err
	}
	seed := faultfs.SubSeed(1, id)
	check := func(s *faultfs.State) error {
		mm := newModel()
		if err := crashVerify(s, mm, -1); err != nil {
			return fmt.Errorf("%s:model=%s:state=%d: %w\n\tstate: %s", id, s.Model(), s.Index(), err, s)
		}
		rw, err := Open(s, "img", &Options{ReadWrite: true})
		if err != nil {
			return fmt.Errorf("%s:model=%s:state=%d: %w", id, s.Model(), s.Index(), &crashVerdict{"usability", err})
		}
		uerr := crashUsable(rw, mm, int64(seed%uint64(w.size)), seed)
		if cerr := rw.Close(); uerr == nil && cerr != nil {
			uerr = verdictf("usability", "close after recovery: %w", cerr)
		}
		if uerr != nil {
			return fmt.Errorf("%s:model=%s:state=%d: %w", id, s.Model(), s.Index(), uerr)
		}
		return nil
	}
	for _, pm := range []struct {
		m faultfs.Model
		n int
	}{{faultfs.Process, 1}, {faultfs.Torn, nstates}} {
		for s := range last.States(pm.m, seed, pm.n) {
			crashStates.Add(1)
			if err := check(s); err != nil {
				return res, err
			}
		}
	}
	return res, nil
}

// TestCrashDuringDirtyRebuild crashes and fails the refcount rebuild that a
// writable open of a dirty (lazy-refcount) image runs. The image has two
// refcounts too low (the L2 table and the data cluster), one too high and
// cleared COPIED flags. Every torn and reorder crash state of the rebuild,
// and the file left by an EIO on each of its file operations in turn, must
// open for writing again (rebuilding what is left), then check clean with
// no leaks, read the guest data unchanged, and no longer be dirty.
func TestCrashDuringDirtyRebuild(t *testing.T) {
	const cs = 4096
	be := binary.BigEndian
	build := func(t *testing.T) vfs.FS {
		return checkTBuild(t, 4, 8, func(b []byte, set func(k, v uint64)) {
			be.PutUint64(b[72:], IncompatDirty)
			set(5, 0)                    // data cluster: too low
			set(4, 0)                    // L2 table: too low
			set(7, 1)                    // unused cluster: too high
			be.PutUint64(b[3*cs:], 4*cs) // L1 COPIED cleared
			be.PutUint64(b[4*cs:], 5*cs) // L2 COPIED cleared
		})
	}
	// after checks an image whose rebuild was interrupted.
	after := func(fsys vfs.FS) error {
		im, err := Open(fsys, "img.qcow2", &Options{ReadWrite: true})
		if err != nil {
			return fmt.Errorf("writable reopen: %w", err)
		}
		dirty := im.h.incompat&IncompatDirty != 0
		got := make([]byte, 10)
		_, rerr := im.ReadAt(got, 0)
		if err := im.Close(); err != nil {
			return fmt.Errorf("close: %w", err)
		}
		if dirty {
			return errors.New("still dirty after a writable open")
		}
		if rerr != nil || string(got) != "guest data" {
			return fmt.Errorf("guest data reads %q (%v)", got, rerr)
		}
		res, err := CheckFile(fsys, "img.qcow2", "")
		if err != nil {
			return err
		}
		if res.Corruptions != 0 || res.Leaks != 0 || res.CheckErrors != 0 {
			return fmt.Errorf("%d corruptions, %d leaks after the second rebuild: %s", res.Corruptions, res.Leaks, crashFindings(res))
		}
		return nil
	}

	t.Run("crash", func(t *testing.T) {
		ffs := faultfs.New(build(t))
		im, err := Open(ffs, "img.qcow2", &Options{ReadWrite: true})
		if err != nil {
			t.Fatal(err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		if err := after(ffs); err != nil {
			t.Fatalf("without a crash: %v", err)
		}
		rec := ffs.Recording()
		dirtyStates := 0
		for _, m := range []faultfs.Model{faultfs.Torn, faultfs.Reorder, faultfs.Prefix} {
			n, err := rec.Replay(m, 1, 256, func(s *faultfs.State) error {
				crashStates.Add(1)
				if r, err := CheckFile(s, "img.qcow2", ""); err == nil && r.Corruptions > 0 {
					dirtyStates++ // too-low refcounts are allowed while dirty
				}
				if err := after(s); err != nil {
					return fmt.Errorf("%s point %d state %d: %w\n\tstate: %s", m, s.Point(), s.Index(), err, s)
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if n < 8 {
				t.Fatalf("%s: only %d crash states", m, n)
			}
		}
		if dirtyStates == 0 {
			t.Fatal("no crash state still needed a rebuild: the test would prove nothing")
		}
	})

	t.Run("eio", func(t *testing.T) {
		fails := 0
		for k := 0; ; k++ {
			ffs := faultfs.New(build(t))
			inj := &hitInjector{Injector: faultfs.Rule(faultfs.OnIndex(k), faultfs.EIO)}
			ffs.SetInjector(inj)
			im, err := Open(ffs, "img.qcow2", &Options{ReadWrite: true})
			if err == nil {
				err = im.Close()
			}
			if inj.hit == nil {
				if err != nil {
					t.Fatalf("op %d: %v without a fault", k, err)
				}
				if fails < 5 {
					t.Fatalf("only %d file operations of the rebuild failed", fails)
				}
				return
			}
			fails++
			if err != nil && !errors.Is(err, faultfs.ErrInjected) {
				t.Fatalf("op %d (%s): the error does not wrap the injected one: %v", k, inj.hit.Kind, err)
			}
			ffs.SetInjector(nil)
			if err := after(ffs); err != nil {
				t.Fatalf("EIO on op %d (%s): %v", k, inj.hit.Kind, err)
			}
		}
	})
}
