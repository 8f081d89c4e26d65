package qcow

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"pgregory.net/rapid"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// TestCrashStateMachine runs a rapid state machine per configuration
// (versions 1, 2 and 3; 512-byte and 64 KiB clusters; with and without a
// backing file): writes of every shape, zero writes, flushes, close and
// reopen, injected errors and crashes followed by recovery, with a flat
// model beside the image. After every action the image reads like the
// model; every crash state is judged by the verdicts of DESIGN.md. It runs
// crashRapidChecks (20) cases per configuration with or without -short
// (TestMain makes up for rapid's dividing by 5 under -short); more:
// -rapid.checks=N, also N with or without -short.
func TestCrashStateMachine(t *testing.T) {
	for _, c := range crashConfigs() {
		t.Run(c.String(), func(t *testing.T) {
			t.Parallel()
			rapid.Check(t, func(rt *rapid.T) {
				sm := newCrashMachine(rt, c)
				defer sm.close()
				rt.Repeat(rapid.StateMachineActions(sm))
			})
		})
	}
}

// crashMachine is the state of one rapid run: the image on faultfs and the
// model of what it must hold.
type crashMachine struct {
	cfg     crashConfig
	through bool // write-through mode
	size    int64
	cs      int64
	l2span  int64 // guest bytes one L2 table maps
	base    []byte

	ffs *faultfs.FS
	im  *Image
	m   *model.Disk

	leftovers  bool  // write-through: a failed write left data no barrier covered
	failedSync bool  // a barrier failed: the image must refuse writes until reopened
	leaksFrom  int64 // leaks allowed before this host offset (left by crashes); 0: none
	step       int
	crashes    int
	rng        uint64 // source of usability-write seeds
}

func newCrashMachine(t *rapid.T, c crashConfig) *crashMachine {
	size := int64(256 << 10)
	if c.cs > 4096 {
		size = 1 << 20
	}
	seed := rapid.Uint64().Draw(t, "setup-seed")
	mem, base := crashSetup(t, c, size, seed)
	sm := &crashMachine{
		cfg:     c,
		through: rapid.Bool().Draw(t, "write-through"),
		size:    size,
		base:    base,
		ffs:     faultfs.New(mem),
		m:       crashModel(size, base),
		rng:     seed,
	}
	sm.open(t)
	sm.cs = sm.im.ClusterSize()
	sm.l2span = sm.cs * sm.im.l2Entries
	return sm
}

// id is the one-line case ID of the current step.
func (sm *crashMachine) id() string {
	return fmt.Sprintf("crash:%s:wt=%d:step=%d", sm.cfg, crashB2i(sm.through), sm.step)
}

func (sm *crashMachine) open(t *rapid.T) {
	im, err := Open(sm.ffs, "img", &Options{ReadWrite: true, WriteThrough: sm.through, L2CacheBytes: 8 * sm.cs, RefcountCacheBytes: 8 * sm.cs})
	if err != nil {
		t.Fatalf("%s: open verdict: %v", sm.id(), err)
	}
	sm.im = im
	sm.failedSync, sm.leftovers = false, false
}

func (sm *crashMachine) close() {
	if sm.im != nil {
		sm.im.Close()
	}
}

// Check is the invariant: unless a barrier failed (after which reads are
// not promised until reopen), the image reads exactly like the model.
func (sm *crashMachine) Check(t *rapid.T) {
	if sm.failedSync {
		return
	}
	if err := sm.m.Check(wtSizedReader{sm.im}); err != nil {
		t.Fatalf("%s: content verdict: %v", sm.id(), err)
	}
}

// shape draws the range of a write: sub-sector, sector, unaligned,
// cluster-straddling, L2-table-straddling or large.
func (sm *crashMachine) shape(t *rapid.T, kinds ...string) (off, n int64) {
	kind := rapid.SampledFrom(kinds).Draw(t, "shape")
	S, C := sm.size, sm.cs
	switch kind {
	case "sub-sector":
		n = rapid.Int64Range(1, 511).Draw(t, "n")
		off = rapid.Int64Range(0, S-n).Draw(t, "off")
	case "sector":
		n = 512 * rapid.Int64Range(1, 4).Draw(t, "sectors")
		off = 512 * rapid.Int64Range(0, (S-n)/512).Draw(t, "sector")
	case "unaligned":
		n = rapid.Int64Range(1, 3*C).Draw(t, "n")
		off = rapid.Int64Range(0, S-n).Draw(t, "off")
	case "cluster":
		k := rapid.Int64Range(1, S/C-1).Draw(t, "boundary")
		a := rapid.Int64Range(1, C).Draw(t, "before")
		b := rapid.Int64Range(1, C).Draw(t, "after")
		off, n = k*C-a, a+b
	case "l2":
		if sm.l2span >= S {
			return sm.shape(t, "cluster")
		}
		k := rapid.Int64Range(1, (S-1)/sm.l2span).Draw(t, "l2-boundary")
		a := rapid.Int64Range(1, 2*C).Draw(t, "before")
		b := rapid.Int64Range(1, 2*C).Draw(t, "after")
		off, n = k*sm.l2span-a, min(a+b, S-k*sm.l2span+a)
	case "large":
		n = rapid.Int64Range(max(C, 8<<10), min(S/2, max(4*C, 96<<10))).Draw(t, "n")
		off = rapid.Int64Range(0, S-n).Draw(t, "off")
	}
	return off, n
}

var crashWriteShapes = []string{"sub-sector", "sector", "unaligned", "cluster", "l2", "large"}

// write writes (or zeroes) [off, off+n) and updates the model; it returns
// the call's error. A refused write (after a failed barrier) must fail with
// the injected error and changes nothing.
func (sm *crashMachine) write(t *rapid.T, zero bool, off, n int64) error {
	var p []byte
	if !zero {
		p = crashData(n, rapid.Uint64().Draw(t, "data-seed"))
	}
	return sm.writeData(t, p, off, n)
}

// writeData writes p at off, or zeroes [off, off+n) when p is nil.
func (sm *crashMachine) writeData(t *rapid.T, p []byte, off, n int64) error {
	zero := p == nil
	var err error
	if zero {
		err = sm.im.WriteZeroes(off, n)
	} else {
		_, err = sm.im.WriteAt(p, off)
	}
	switch {
	case sm.failedSync:
		if err == nil || !crashInjected(err) {
			t.Fatalf("%s: errors verdict: a write after a failed barrier returned %v, want a refusal wrapping the injected error", sm.id(), err)
		}
		return err
	case err == nil && zero:
		sm.m.WriteZeroes(off, n)
	case err == nil:
		sm.m.Write(p, off)
	case zero:
		sm.m.FailedWriteZeroes(off, n)
	default:
		sm.m.FailedWrite(p, off)
	}
	if err != nil && sm.through {
		// The failed write may have left bytes in place that no barrier
		// covered: write-through makes each later write durable, not
		// them, so until the next Flush the model stops flushing.
		sm.leftovers = true
	}
	if err == nil && sm.through && !sm.leftovers {
		sm.m.Flush() // durable on return
	}
	return err
}

func (sm *crashMachine) mustWrite(t *rapid.T, zero bool, kinds ...string) {
	sm.step++
	off, n := sm.shape(t, kinds...)
	if err := sm.write(t, zero, off, n); err != nil && !sm.failedSync {
		t.Fatalf("%s: errors verdict: write of %d bytes at %d failed without an injected fault: %v", sm.id(), n, off, err)
	}
}

// WriteSmall writes a sub-sector, sector-aligned or unaligned range.
func (sm *crashMachine) WriteSmall(t *rapid.T) {
	sm.mustWrite(t, false, "sub-sector", "sector", "unaligned")
}

// WriteStraddle writes across a cluster or an L2 table boundary.
func (sm *crashMachine) WriteStraddle(t *rapid.T) { sm.mustWrite(t, false, "cluster", "l2") }

// WriteLarge writes many clusters at once.
func (sm *crashMachine) WriteLarge(t *rapid.T) { sm.mustWrite(t, false, "large") }

// WriteZeroes zeroes a range of any shape.
func (sm *crashMachine) WriteZeroes(t *rapid.T) { sm.mustWrite(t, true, crashWriteShapes...) }

// Flush flushes; afterwards everything acknowledged is durable.
func (sm *crashMachine) Flush(t *rapid.T) {
	sm.step++
	err := sm.im.Flush()
	if sm.failedSync {
		if err == nil || !crashInjected(err) {
			t.Fatalf("%s: errors verdict: Flush after a failed barrier returned %v, want the injected error", sm.id(), err)
		}
		return
	}
	if err != nil {
		t.Fatalf("%s: errors verdict: Flush failed without an injected fault: %v", sm.id(), err)
	}
	sm.m.Flush()
	sm.leftovers = false
}

// Reopen closes the image and opens it again. After a failed barrier
// Close must report it and unflushed writes may be lost, so the model
// treats it as a crash; otherwise the closed image must be clean (no new
// leaks) and read like the model.
func (sm *crashMachine) Reopen(t *rapid.T) {
	sm.step++
	err := sm.im.Close()
	sm.im = nil
	leaksFrom := sm.leaksFrom
	if sm.failedSync {
		if err == nil || !crashInjected(err) {
			t.Fatalf("%s: errors verdict: Close after a failed barrier returned %v, want the injected error", sm.id(), err)
		}
		sm.m.Crash()
		leaksFrom = -1
	} else if err != nil {
		t.Fatalf("%s: errors verdict: Close failed without an injected fault: %v", sm.id(), err)
	}
	if sm.failedSync {
		// Restart the process, as PostgreSQL does after a failed fsync:
		// the page cache (with whatever the failed barrier dropped
		// reverted) is what the restarted writer finds, and it is written
		// back eventually. Without the restart, data the new writer reads
		// would be durable only if it happened to sync.
		st, err := sm.ffs.CrashState(faultfs.Process, 0)
		if err != nil {
			t.Fatal(err)
		}
		sm.ffs = faultfs.New(st)
		crashStates.Add(1)
	}
	if err := crashVerify(sm.ffs, sm.m, leaksFrom); err != nil {
		t.Fatalf("%s: after close: %v", sm.id(), err)
	}
	sm.open(t)
	if leaksFrom < 0 {
		sm.leaksFrom = sm.im.w.end
	}
}

// hitInjector is a one-shot injector that remembers the op it failed.
type hitInjector struct {
	faultfs.Injector
	hit *faultfs.Op    // the op it failed (before it ran)
	act faultfs.Action // the action it applied
}

func (h *hitInjector) MaybeInject(op faultfs.Op) faultfs.Action {
	a := h.Injector.MaybeInject(op)
	if a.Fault != faultfs.NoFault && h.hit == nil {
		h.hit, h.act = &op, a
	}
	return a
}

// Inject runs a write, zero write or flush with a fault (EIO, ENOSPC,
// short write, tear then fail, fsync that drops dirty data) armed on one
// of its next file operations. If the fault fires the call must fail with
// an error wrapping it; the model records a failed write (old or new data);
// after a failed barrier the image must refuse writes until reopened; after
// a write that failed on any other file operation the live file must pass
// the rollback verdict (crashLive.verdict).
func (sm *crashMachine) Inject(t *rapid.T) {
	if sm.failedSync {
		t.Skip("the image already refuses writes")
	}
	sm.step++
	fault := rapid.SampledFrom([]string{"eio", "enospc", "short-write", "tear", "fsync-drop"}).Draw(t, "fault")
	seed := rapid.Uint64().Draw(t, "fault-seed")
	var act faultfs.Action
	switch fault {
	case "eio":
		act = faultfs.EIO
	case "enospc":
		act = faultfs.ENOSPC
	case "short-write":
		act = faultfs.ShortWrite(seed)
	case "tear":
		act = faultfs.TearThenFail(seed)
	case "fsync-drop":
		act = faultfs.FsyncDrop
	}
	var kinds faultfs.OpKinds
	if fault == "fsync-drop" {
		kinds = faultfs.KindSet(faultfs.OpSync, faultfs.OpDatasync, faultfs.OpSyncRange)
	} else if fault == "short-write" || fault == "tear" {
		kinds = faultfs.KindSet(faultfs.OpWrite)
	} else {
		kinds = faultfs.KindSet(faultfs.OpWrite, faultfs.OpDatasync, faultfs.OpSync, faultfs.OpRead, faultfs.OpTruncate)
	}
	nth := rapid.IntRange(0, 3).Draw(t, "nth-matching-op")
	op := rapid.SampledFrom([]string{"write", "zero", "flush"}).Draw(t, "op")
	ni := &nthInjector{kinds: kinds, n: nth, act: act}
	if fault == "short-write" {
		// A write comes back short when the disk fills up while blocks
		// are allocated for it: only a write that extends the file. (A
		// short in-place write could tear an 8-byte pointer inside one
		// sector, which no disk does.)
		fi, err := sm.ffs.Stat("img")
		if err != nil {
			t.Fatal(err)
		}
		ni.extending, ni.size = true, fi.Size()
	}
	inj := &hitInjector{Injector: ni}
	var (
		err        error
		p, old     []byte
		off, n, lo int64
		what       = op
	)
	if op != "flush" {
		off, n = sm.shape(t, crashWriteShapes...)
		what = fmt.Sprintf("%s of %d bytes at %d", op, n, off)
		if op == "write" {
			p = crashData(n, rapid.Uint64().Draw(t, "data-seed"))
		}
		// The sectors' values before the write (exact: Check resolved
		// every ambiguity after the last action).
		lo = off &^ (model.SectorSize - 1)
		old = make([]byte, min(sm.size, (off+n+model.SectorSize-1)&^(model.SectorSize-1))-lo)
		if err := sm.m.Read(old, lo); err != nil {
			t.Fatalf("%s: model: %v", sm.id(), err)
		}
	}
	// The rollback verdict applies when a write fails with this one fault
	// and the fault is not on a barrier; not when the write first flushes
	// earlier writes to relieve the caches (a failed flush is not rolled
	// back: it is retried, and leaks until then).
	var live crashLive
	rollback := op != "flush" && !sm.im.w.overBounds()
	if rollback {
		live = crashLiveBefore(t, sm.ffs.Unwrap(), sm.cs)
	}
	sm.ffs.SetInjector(inj)
	if op == "flush" {
		err = sm.im.Flush()
		if err == nil {
			sm.m.Flush()
			sm.leftovers = false
		}
	} else {
		err = sm.writeData(t, p, off, n)
	}
	sm.ffs.SetInjector(nil)
	id := fmt.Sprintf("%s:inject=%s", sm.id(), inj.Injector)
	switch {
	case inj.hit == nil && err != nil:
		t.Fatalf("%s: errors verdict: %s failed without an injected fault: %v", id, what, err)
	case inj.hit != nil && err == nil:
		t.Fatalf("%s: errors verdict: %s returned nil although %s failed", id, what, inj.hit)
	case inj.hit != nil && !crashInjected(err):
		t.Fatalf("%s: errors verdict: %s returned an error that does not wrap the injected one: %v", id, what, err)
	}
	if inj.hit != nil {
		switch inj.hit.Kind {
		case faultfs.OpSync, faultfs.OpDatasync, faultfs.OpSyncRange:
			sm.failedSync = true
		default:
			if rollback {
				want := p
				if want == nil {
					want = make([]byte, n)
				}
				if err := live.verdict(sm.ffs.Unwrap(), sm.through, off, want); err != nil {
					t.Fatalf("%s: %s: %v", id, what, err)
				}
			}
		}
	}
	if inj.hit != nil && inj.act.Fault == faultfs.FaultShortWrite && inj.hit.Kind == faultfs.OpWrite && op != "flush" && !sm.failedSync {
		sm.allowShortMix(t, id, p, off, n, old, lo)
	}
}

// allowShortMix accepts the one sector that a short write may have cut in
// the middle: faultfs cuts at any byte, so a guest sector overwritten in
// place may hold the new bytes up to the cut and the old ones after it
// (neither its old nor its new value, which is all the model allows a
// failed write). Any other value is a content failure. The mixed value is
// added to the model as a possible result of the failed write.
func (sm *crashMachine) allowShortMix(t *rapid.T, id string, p []byte, off, n int64, old []byte, lo int64) {
	const S = model.SectorSize
	cur := make([]byte, len(old))
	if _, err := (wtSizedReader{sm.im}).ReadAt(cur, lo); err != nil {
		t.Fatalf("%s: read after a short write: %v", id, err)
	}
	mixed := 0
	for s := int64(0); s < int64(len(old)); s += S {
		e := min(s+S, int64(len(old)))
		o, c := old[s:e], cur[s:e]
		nw := bytes.Clone(o)
		a, b := max(off-lo, s), min(off+n-lo, e) // the written part, relative to lo
		if p != nil {
			copy(nw[a-s:b-s], p[a-(off-lo):])
		} else {
			clear(nw[a-s : b-s])
		}
		if bytes.Equal(c, o) || bytes.Equal(c, nw) {
			continue
		}
		ok := false
		for j := range len(c) {
			if bytes.Equal(c[:j], nw[:j]) && bytes.Equal(c[j:], o[j:]) {
				ok = true
				break
			}
		}
		if !ok || mixed > 0 {
			t.Fatalf("%s: content verdict: after a short write, sector at %d is neither old, new, nor the one sector cut by the write", id, lo+s)
		}
		mixed++
		sm.m.FailedWrite(bytes.Clone(c[a-s:b-s]), lo+a)
	}
}

// nthInjector fails the n-th next operation of the given kinds (with
// extending set: the n-th write that extends the file, whose size starts at
// size; the FS holds one file).
type nthInjector struct {
	kinds     faultfs.OpKinds
	n         int
	act       faultfs.Action
	extending bool
	size      int64
	seen      int
	done      bool
}

func (i *nthInjector) String() string {
	if i.extending {
		return fmt.Sprintf("(nth-extending %d %s %s)", i.n, i.kinds, i.act)
	}
	return fmt.Sprintf("(nth %d %s %s)", i.n, i.kinds, i.act)
}

func (i *nthInjector) MaybeInject(op faultfs.Op) faultfs.Action {
	if i.done || !i.kinds.Has(op.Kind) {
		return faultfs.Action{}
	}
	if i.extending {
		end := op.Offset + op.Length
		if op.Path != "img" || end <= i.size {
			return faultfs.Action{}
		}
		i.size = end
	}
	if i.seen++; i.seen <= i.n {
		return faultfs.Action{}
	}
	i.done = true
	return i.act
}

// CrashGarbage takes a crash state of the garbage model (as torn, but a
// sector that did not get its latest value may come back as random bytes)
// and checks robustness only, since QCOW has no checksums to detect such
// sectors: opening it read-only and for writing, reading the whole disk,
// checking it and writing to it may fail, but only with an error, never a
// panic, and within a time bound. The machine goes on with its own file
// system, which the garbage state does not change.
func (sm *crashMachine) CrashGarbage(t *rapid.T) {
	seed := rapid.Uint64().Draw(t, "garbage-seed")
	id := fmt.Sprintf("%s:model=garbage:seed=%d", sm.id(), seed)
	st, err := sm.ffs.CrashState(faultfs.Garbage, seed)
	if err != nil {
		t.Fatalf("%s: %v", id, err)
	}
	crashStates.Add(1)
	done := make(chan string, 1)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				done <- fmt.Sprintf("panic: %v", p)
			}
		}()
		crashGarbageUse(st, sm.size)
		done <- ""
	}()
	select {
	case msg := <-done:
		if msg != "" {
			t.Fatalf("%s: %s (state %s)", id, msg, st)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: open, read, check and write of a garbage state did not finish in 30 s (state %s)", id, st)
	}
}

// crashGarbageUse opens, reads, checks and writes the image of a garbage
// crash state, ignoring every error (each is allowed there).
func crashGarbageUse(fsys vfs.FS, size int64) {
	if im, err := Open(fsys, "img", nil); err == nil {
		buf := make([]byte, 64<<10)
		for off := int64(0); off < im.Size(); off += int64(len(buf)) {
			if _, err := im.ReadAt(buf[:min(int64(len(buf)), im.Size()-off)], off); err != nil {
				break
			}
		}
		im.Close()
	}
	CheckFile(fsys, "img", "")
	if im, err := Open(fsys, "img", &Options{ReadWrite: true}); err == nil {
		if _, err := im.WriteAt(make([]byte, 700), size/3); err == nil {
			im.Flush()
		}
		im.Close()
	}
}

// Crash takes a crash state of the file system under a drawn persistence
// model, abandons the running image, and recovers: the state must open,
// have no corruption (leaks allowed), hold what the model allows (so
// nothing a completed flush covered is lost), and accept and read back a
// new write. The run continues on the recovered state.
func (sm *crashMachine) Crash(t *rapid.T) {
	sm.step++
	m := rapid.SampledFrom([]faultfs.Model{faultfs.Process, faultfs.LoseUnsynced, faultfs.Prefix, faultfs.Reorder, faultfs.Torn}).Draw(t, "model")
	seed := rapid.Uint64().Draw(t, "crash-seed")
	id := fmt.Sprintf("%s:model=%s:seed=%d", sm.id(), m, seed)
	st, err := sm.ffs.CrashState(m, seed)
	if err != nil {
		t.Fatalf("%s: %v", id, err)
	}
	sm.ffs.Crash() // the old process is dead: nothing it does reaches the disk
	sm.im.Close()
	sm.im = nil
	sm.m.Crash()
	if err := crashVerify(st, sm.m, -1); err != nil {
		t.Fatalf("%s: %v (state %s)", id, err, st)
	}
	sm.crashes++
	crashStates.Add(1)
	sm.ffs = faultfs.New(st)
	sm.open(t)
	sm.leaksFrom = sm.im.w.end // clusters before it may have leaked
	off := rapid.Int64Range(0, sm.size-1).Draw(t, "usability-off")
	sm.rng++
	if err := crashUsable(sm.im, sm.m, off, sm.rng); err != nil {
		t.Fatalf("%s: %v", id, err)
	}
	if sm.through {
		sm.m.Flush()
	}
}
