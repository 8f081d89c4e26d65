package harness

import (
	"bytes"
	"errors"
	"fmt"
	"iter"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// Failure kinds (see the package documentation).
const (
	KindErrors     = "errors"
	KindOpen       = "open"
	KindCheck      = "check"
	KindDurability = "durability"
	KindContent    = "content"
	KindUsability  = "usability"
	KindSize       = "size"
	KindSnapshot   = "snapshot"
	KindSetup      = "setup"
	KindPanic      = "panic"
)

// Failure is the first thing that went wrong in a case.
type Failure struct {
	// Kind is one of the Kind constants.
	Kind string `json:"kind"`
	// Point is the crash point: the number of file operations (of the
	// faultfs log) applied; -1 when the failure is not at a crash point.
	Point int `json:"point"`
	// Op is the index of the workload op in flight at the crash point, or
	// the number of ops (all completed); -1 when not at a crash point.
	Op int `json:"op"`
	// StateKey identifies the crash state: "INDEX/KEY" with its index in
	// the point's enumeration and faultfs.State.Key in hex.
	StateKey string `json:"state_key,omitempty"`
	// State describes the crash state (faultfs.State.String, shortened).
	State string `json:"state,omitempty"`
	// Detail is the error, on one line.
	Detail string `json:"detail"`
	// Sector is the first sector whose content the model does not allow
	// (content and durability failures), -1 otherwise.
	Sector int64 `json:"sector"`
	// Mismatch shows, for that sector, where it first differs from each
	// allowed value, in hex: "byte J: got XX.. want YY..; ...".
	Mismatch string `json:"mismatch,omitempty"`
	// Rule names the broken ordering rule (kind "ordering", see
	// OrderingRules); Point is then one past the file op that broke it
	// and Op the workload op that made that file op.
	Rule string `json:"rule,omitempty"`
}

// String describes the failure on one line.
func (f *Failure) String() string {
	if f.Point < 0 {
		return fmt.Sprintf("%s: %s", f.Kind, f.Detail)
	}
	if f.StateKey == "" {
		return fmt.Sprintf("%s at crash point %d (workload op %d): %s", f.Kind, f.Point, f.Op, f.Detail)
	}
	return fmt.Sprintf("%s at crash point %d (workload op %d) state %s: %s", f.Kind, f.Point, f.Op, f.StateKey, f.Detail)
}

// Verdict is the result of running a Case.
type Verdict struct {
	Case Case `json:"case"`
	// OK is true when every checked crash state passed.
	OK bool `json:"ok"`
	// Failure is the first failure, nil when OK.
	Failure *Failure `json:"failure,omitempty"`
	// FileOps is the number of file operations the workload made.
	FileOps int `json:"file_ops"`
	// Points and States count the crash points and states checked (up to
	// and including the failing one).
	Points int `json:"points"`
	States int `json:"states"`
	// Faults counts the file operations the fault plan failed (those
	// after a crash not included).
	Faults int `json:"faults,omitempty"`
	// Coverage counts the states checked and the faults injected by
	// event, fault and outcome (see Coverage).
	Coverage *Coverage `json:"coverage,omitempty"`
	// OrderingOps counts the file operations (writes and truncates of the
	// image) judged by the ordering rules.
	OrderingOps int `json:"ordering_ops,omitempty"`
	// Rollbacks counts the failed writes the rollback verdict judged (see
	// the package documentation).
	Rollbacks int `json:"rollbacks,omitempty"`
}

const (
	imageName   = "disk.img"
	backingName = "base.raw"
)

// run holds one case's recorded workload.
type run struct {
	c Case
	// ops are the workload ops issued to the target: none when the
	// writable open failed (an op never issued contributes nothing).
	ops    []Op
	data   [][]byte         // data[i] is ops[i].Data()
	starts []int            // starts[i]: faultfs log length when ops[i] began
	ends   []int            // ends[i]: faultfs log length when ops[i] returned
	failed []bool           // failed[i]: ops[i] returned an error (faults injected)
	base   []byte           // the disk's contents before the workload, nil for zeros
	snaps  *model.Snapshots // the internal snapshots' frozen views, nil for none
	tap    *tap
	// rollbacks counts the failed ops the rollback verdict judged.
	rollbacks int
}

// Options are ways to run a Case that do not change what it means.
type Options struct {
	// Dir, when set, runs the case over real files: vfs.OS in a new
	// temporary directory under Dir (removed afterwards) instead of an
	// in-memory file system. faultfs still records every operation, and
	// the crash states are still materialized by faultfs, so the verdict
	// is the same unless the real file system behaves differently.
	Dir string
	// MaxStates, when positive, stops checking crash states after that
	// many in all (the ordering rules are still checked).
	MaxStates int
	// NoStates checks no crash state at all, only the ordering rules
	// (OrderingRules): `--max-states 0` on the command line.
	NoStates bool

	// inspect, when set, sees the recorded workload before its crash
	// states are checked (the event matrix checks the image it left).
	inspect func(r *run, ffs *faultfs.FS)
}

// Run runs the case in memory and returns its verdict. It never panics on
// a valid case; an invalid one gives a "setup" failure.
func Run(c Case) Verdict { return RunWith(c, Options{}) }

// RunWith runs the case as o says and returns its verdict.
func RunWith(c Case, o Options) (v Verdict) {
	v = Verdict{Case: c}
	r, ffs, cleanup, f := prepare(c, o)
	defer cleanup()
	if ffs != nil {
		v.FileOps = len(ffs.Log())
		v.Faults = len(r.tap.faults)
		v.Rollbacks = r.rollbacks
	}
	if f != nil {
		f.Detail = shorten(f.Detail, 600)
		v.Failure = f
		v.Coverage = r.earlyCoverage(&v, ffs)
		return v
	}
	if o.inspect != nil {
		o.inspect(r, ffs)
	}
	rec := ffs.Recording()
	v.FileOps = rec.Len()
	cov := newCoverRec(c, rec.Ops())
	defer func() { v.Coverage = cov.finish(&v, r.tap.faults) }()
	statesSeed := faultfs.SubSeed(c.Seed, "states")
	for p, n := range r.crashTimes(rec) {
		if o.NoStates || (o.MaxStates > 0 && v.States >= o.MaxStates) {
			break
		}
		v.Points++
		for s := range p.States(c.Model, statesSeed, c.StatesPerPoint) {
			if o.MaxStates > 0 && v.States >= o.MaxStates {
				break
			}
			v.States++
			f := r.checkState(n, s)
			cov.state(n, f)
			if f != nil {
				f.Point = n
				f.Op = r.inFlight(n)
				f.StateKey = fmt.Sprintf("%d/%016x", s.Index(), s.Key())
				f.State = shorten(s.String(), 400)
				f.Detail = shorten(f.Detail, 600)
				v.Failure = f
				return v
			}
		}
	}
	if f := r.ordering(rec, &v); f != nil {
		v.Failure = f
		return v
	}
	v.OK = true
	return v
}

// crashTimes yields every crash point of rec with each time n (a number of
// file operations done) at which a crash leaves the files as the point
// has them: the point's own, and every end of a workload op after it and
// before the next point. An op that returned without changing what can
// survive (a Close or a Flush that wrote nothing, or a target that skipped
// its barrier) makes no point of its own, but the model after it is
// stricter (a flush was acknowledged), so the same states are judged
// again against it.
func (r *run) crashTimes(rec *faultfs.Recording) iter.Seq2[*faultfs.Point, int] {
	return func(yield func(*faultfs.Point, int) bool) {
		var prev *faultfs.Point
		// emit yields prev at its own time and at every op end in
		// (prev.Ops(), next).
		emit := func(next int) bool {
			if !yield(prev, prev.Ops()) {
				return false
			}
			// r.ends ascends: ops are recorded one after another.
			last := prev.Ops()
			i, _ := slices.BinarySearch(r.ends, last+1)
			for _, e := range r.ends[i:] {
				if e >= next {
					break
				}
				if e > last {
					if !yield(prev, e) {
						return false
					}
					last = e
				}
			}
			return true
		}
		for p := range rec.Points() {
			if prev != nil && !emit(p.Ops()) {
				return
			}
			prev = p
		}
		if prev != nil {
			emit(rec.Len() + 1)
		}
	}
}

// prepare validates the case, creates its files (in memory, or under
// o.Dir) and records its workload. ffs is nil when the failure came before
// recording began. cleanup removes what prepare created; it is never nil.
// A panic in the code under test is a failure of kind "panic".
func prepare(c Case, o Options) (r *run, ffs *faultfs.FS, cleanup func(), f *Failure) {
	cleanup = func() {}
	defer func() {
		if p := recover(); p != nil {
			f = &Failure{Kind: KindPanic, Point: -1, Op: -1, Sector: -1, Detail: fmt.Sprintf("panic while recording the workload: %v", p)}
		}
	}()
	setupFailure := func(err error) *Failure {
		return &Failure{Kind: KindSetup, Point: -1, Op: -1, Sector: -1, Detail: err.Error()}
	}
	if err := c.Validate(); err != nil {
		return nil, nil, cleanup, setupFailure(err)
	}
	r = &run{c: c, ops: c.Workload()}
	for _, op := range r.ops {
		r.data = append(r.data, op.Data())
	}
	var inner vfs.FS = vfs.NewMem()
	if o.Dir != "" {
		dir, err := os.MkdirTemp(o.Dir, "crashcase-")
		if err != nil {
			return nil, nil, cleanup, setupFailure(fmt.Errorf("temporary directory: %w", err))
		}
		cleanup = func() { os.RemoveAll(dir) }
		inner = dirFS{dir}
	}
	if err := r.setup(inner); err != nil {
		return nil, nil, cleanup, setupFailure(err)
	}
	r.tap = &tap{}
	ffs = faultfs.New(inner, faultfs.WithInjector(r.tap))
	if c.Faults != "" {
		inj, err := faultfs.ParseInjector(c.Faults)
		if err != nil {
			return nil, nil, cleanup, setupFailure(fmt.Errorf("fault plan: %w", err))
		}
		// faultfs knows only the files opened through it: open each one
		// before any fault can fire, so that a crash state has the
		// backing file even when a fault stops the writer from opening it.
		// (Cases without faults skip this, so their file operation
		// numbers stay what they always were.)
		for _, name := range []string{backingName, imageName} {
			if name == backingName && !c.Backing {
				continue
			}
			f, err := ffs.Open(name, vfs.ReadOnly)
			if err != nil {
				return nil, nil, cleanup, setupFailure(fmt.Errorf("adopt %s: %w", name, err))
			}
			f.Close()
		}
		r.tap.inner = inj
	}
	return r, ffs, cleanup, r.record(targets[c.Target], ffs)
}

// tap is the injector every recording runs under: it asks the case's
// fault plan, if any, and notes how many file operations ran and which
// were failed, so the harness need not copy the op log after every op.
type tap struct {
	inner   faultfs.Injector
	n       int             // file operations so far
	faults  []int           // indexes of the operations a fault fired on
	fired   []faultfs.Fault // fired[j]: the fault injected into operation faults[j]
	kinds   []faultfs.OpKind
	crashed bool
}

func (t *tap) String() string {
	if t.inner == nil {
		return "(or)"
	}
	return t.inner.String()
}

// MaybeInject asks the fault plan. faultfs asks it before every operation
// until a crash (after which every operation fails without asking).
func (t *tap) MaybeInject(op faultfs.Op) faultfs.Action {
	t.n = op.Index + 1
	if t.inner == nil {
		return faultfs.Action{}
	}
	a := t.inner.MaybeInject(op)
	if a.Fault != faultfs.NoFault {
		t.faults = append(t.faults, op.Index)
		t.fired = append(t.fired, a.Fault)
		t.kinds = append(t.kinds, op.Kind)
		t.crashed = t.crashed || a.Fault == faultfs.FaultCrash
	}
	return a
}

// len returns the number of file operations logged so far, counting
// those after a crash (which the tap is not asked about) from the FS.
func (t *tap) len(ffs *faultfs.FS) int {
	if t.crashed {
		return len(ffs.Log())
	}
	return t.n
}

// faulted reports whether a fault was injected into an operation with
// index at least from (every operation after a crash is faulted).
func (t *tap) faulted(from int) bool {
	return t.crashed || (len(t.faults) > 0 && t.faults[len(t.faults)-1] >= from)
}

// cleanFailure reports whether the faults that fired from operation from on
// are exactly one, neither a crash nor on a barrier (sync, datasync,
// sync_file_range, directory sync), and describes it: the faults under
// which a writer's rollback runs to its end (see the package
// documentation).
func (t *tap) cleanFailure(from int) (string, bool) {
	j, _ := slices.BinarySearch(t.faults, from)
	if t.crashed || len(t.faults)-j != 1 || t.fired[j] == faultfs.FaultCrash || faultfs.SyncKinds.Has(t.kinds[j]) {
		return "", false
	}
	return fmt.Sprintf("%s on file operation #%d (%s)", t.fired[j], t.faults[j], t.kinds[j]), true
}

// Trace is a case's recorded workload, for reports.
type Trace struct {
	// Ops is the workload; Start[i] and End[i] delimit the file
	// operations op i made: FileOps[Start[i]:End[i]].
	Ops        []Op
	Start, End []int
	// FileOps is the faultfs log, one line per file operation; crash
	// point n is the state after FileOps[:n].
	FileOps []string
}

// Record runs the case's workload, without crashing it, and returns its
// trace. It is deterministic like Run; an error means the workload itself
// failed (Run reports the same as a failure).
func Record(c Case) (*Trace, error) {
	r, ffs, cleanup, f := prepare(c, Options{})
	defer cleanup()
	t := &Trace{}
	if r != nil {
		t.Ops = r.ops[:len(r.ends)]
		t.Start, t.End = r.starts, r.ends
	}
	if ffs != nil {
		for _, op := range ffs.Log() {
			t.FileOps = append(t.FileOps, op.String())
		}
	}
	if f != nil {
		return t, fmt.Errorf("harness: %s", f)
	}
	return t, nil
}

// setup creates the backing file and the image in mem, durably.
func (r *run) setup(mem vfs.FS) error {
	c := r.c
	if c.Image != "" {
		if err := r.buildImage(mem); err != nil {
			return err
		}
		if c.Setup == "" {
			return nil
		}
		return r.applySetup(mem)
	}
	o := qcow.CreateOptions{Format: qcow.FormatQCOW2, Size: c.Size, ClusterSize: c.ClusterSize}
	switch c.Format {
	case "v1":
		o.Format = qcow.FormatQCOW
	case "v2":
		o.Version = 2
	default:
		o.Version = 3
	}
	if c.Backing {
		r.base = Pattern(faultfs.SubSeed(c.Seed, "backing"), c.Size)
		f, err := mem.Create(backingName)
		if err != nil {
			return fmt.Errorf("create backing file: %w", err)
		}
		_, err = f.WriteAt(r.base, 0)
		if err == nil {
			err = f.Sync()
		}
		if e := f.Close(); err == nil {
			err = e
		}
		if err != nil {
			return fmt.Errorf("write backing file: %w", err)
		}
		o.BackingFile = backingName
		if c.Format != "v1" {
			o.BackingFormat = "raw"
		}
	}
	if err := qcow.Create(mem, imageName, o); err != nil {
		return fmt.Errorf("create image: %w", err)
	}
	if err := mem.SyncDir("."); err != nil {
		return fmt.Errorf("sync directory: %w", err)
	}
	if c.Setup == "" {
		return nil
	}
	return r.applySetup(mem)
}

// applySetup writes the case's setup ops through this project's writer,
// closes the image and makes the result the model's starting contents.
func (r *run) applySetup(mem vfs.FS) error {
	ops, err := DecodeOps(r.c.Setup)
	if err != nil {
		return fmt.Errorf("setup ops: %w", err)
	}
	im, err := qcow.Open(mem, imageName, &qcow.Options{ReadWrite: true})
	if err != nil {
		return fmt.Errorf("setup: open: %w", err)
	}
	for i, op := range ops {
		switch op.Kind {
		case OpWrite:
			_, err = im.WriteAt(op.Data(), op.Off)
		case OpZero:
			err = im.WriteZeroes(op.Off, op.Len)
		case OpFlush:
			err = im.Flush()
		}
		if err != nil {
			im.Close()
			return fmt.Errorf("setup op %d (%s): %w", i, op, err)
		}
	}
	if err := im.Close(); err != nil {
		return fmt.Errorf("setup: close: %w", err)
	}
	if im, err = qcow.Open(mem, imageName, nil); err != nil {
		return fmt.Errorf("setup: reopen: %w", err)
	}
	defer im.Close()
	r.base = make([]byte, r.c.Size)
	if _, err := im.ReadAt(r.base, 0); err != nil {
		return fmt.Errorf("setup: read back: %w", err)
	}
	return nil
}

// record runs the workload on the image through target over ffs, noting
// where each op begins and ends in ffs's log and which ops failed. Without
// a fault plan any error is a failure of kind "errors"; with one, every
// workload call must return an error wrapping the injected one when a
// fault fired during it, and nil only when none did (an error with no
// fault of its own is allowed once some fault has fired: the writer may
// refuse writes after a failure). The workload goes on after a failed op.
func (r *run) record(target Target, ffs *faultfs.FS) *Failure {
	r.failed = make([]bool, len(r.ops))
	fail := func(i int, format string, args ...any) *Failure {
		return &Failure{Kind: KindErrors, Point: -1, Op: i, Sector: -1, Detail: fmt.Sprintf(format, args...)}
	}
	im, err := target.Open(ffs, imageName, r.c.WriteThrough)
	if err != nil {
		if !r.tap.faulted(0) {
			return fail(-1, "open for writing failed with no fault injected: %v", err)
		}
		if !errors.Is(err, faultfs.ErrInjected) {
			return fail(-1, "open for writing: an injected fault gave an error that does not wrap it: %v", err)
		}
		// No op was issued: none contributes anything, and every crash
		// state must read as the start.
		r.ops, r.data, r.failed = r.ops[:0], r.data[:0], r.failed[:0]
		return nil
	}
	closed := false
	defer func() {
		if !closed {
			im.Close() // an early failure: release the image (and its lock)
		}
	}()
	for i, op := range r.ops {
		start := r.tap.len(ffs)
		r.starts = append(r.starts, start)
		var sizeBefore int64 = -1
		if r.c.Faults != "" && (op.Kind == OpWrite || op.Kind == OpZero) {
			sizeBefore = liveSize(ffs)
		}
		switch op.Kind {
		case OpWrite:
			_, err = im.WriteAt(r.data[i], op.Off)
		case OpZero:
			err = im.WriteZeroes(op.Off, op.Len)
		case OpFlush:
			err = im.Flush()
		case OpResize:
			err = resize(im, op.Size)
		case OpClose:
			err = im.Close()
			closed = true
		}
		r.ends = append(r.ends, r.tap.len(ffs))
		// An op that issued no file operation (after a crash, a write
		// that changed only the writer's memory) had none failed.
		hit := r.ends[i] > start && r.tap.faulted(start)
		switch {
		case err == nil && hit:
			return fail(i, "op %d (%s) returned nil although an injected fault failed one of its file operations", i, op)
		case err == nil:
			continue
		case r.c.Faults == "":
			return fail(i, "op %d (%s) failed with no fault injected: %v", i, op, err)
		case hit && !errors.Is(err, faultfs.ErrInjected):
			return fail(i, "op %d (%s): the injected fault gave an error that does not wrap it: %v", i, op, err)
		case !r.tap.faulted(0):
			return fail(i, "op %d (%s) failed before any fault was injected: %v", i, op, err)
		}
		r.failed[i] = true
		if fault, ok := r.tap.cleanFailure(start); ok && sizeBefore >= 0 {
			r.rollbacks++
			if f := r.checkRollback(ffs, i, start, sizeBefore, fault); f != nil {
				return f
			}
		}
	}
	return nil
}

// liveSize returns the image file's live size, asked of the file system
// under ffs so that nothing is logged (-1 when it cannot be known).
func liveSize(ffs *faultfs.FS) int64 {
	fi, err := ffs.Unwrap().Stat(imageName)
	if err != nil {
		return -1
	}
	return fi.Size()
}

// checkRollback is the rollback verdict on write op i, which failed with
// one clean fault (see tap.cleanFailure) and began at file operation start
// with the image file sizeBefore bytes long: the live file (the process
// model's state right after the op) has no corruption, is at most
// sizeBefore rounded up to a whole cluster, and has no more leaked
// clusters than before the op; or, in write-through mode, reads the op's
// new data in full (it took effect before the failure) and has no
// corruption.
func (r *run) checkRollback(ffs *faultfs.FS, i, start int, sizeBefore int64, fault string) *Failure {
	op := r.ops[i]
	fail := func(format string, args ...any) *Failure {
		d := fmt.Sprintf("op %d (%s) failed with %s, so its rollback ran with every file operation succeeding, but the live file after it ", i, op, fault)
		return &Failure{Kind: KindCheck, Point: -1, Op: i, Sector: -1, Detail: d + fmt.Sprintf(format, args...)}
	}
	live := ffs.Point().Sample(faultfs.Process, 0)
	res, err := qcow.CheckFile(live, imageName, "")
	if err != nil {
		return fail("cannot be checked: %v", err)
	}
	if res.Corruptions > 0 {
		return fail("is corrupt: %s", checkDetail(res))
	}
	if r.c.WriteThrough && r.committed(live, i) {
		return nil
	}
	fi, err := live.Stat(imageName)
	if err != nil {
		return fail("cannot be sized: %v", err)
	}
	cs := r.c.ClusterSize
	if lim := (sizeBefore + cs - 1) / cs * cs; fi.Size() > lim {
		return fail("holds %d bytes, more than its %d bytes before the op rounded up to a cluster (%d): the rollback did not cut the file back", fi.Size(), sizeBefore, lim)
	}
	if res.Leaks == 0 {
		return nil
	}
	before := 0
	if p, err := ffs.Recording().Point(start); err == nil {
		if rb, err := qcow.CheckFile(p.Sample(faultfs.Process, 0), imageName, ""); err == nil {
			before = rb.Leaks
		}
	}
	if res.Leaks > before {
		return fail("leaks %d clusters, %d before the op: %s", res.Leaks, before, checkDetail(res))
	}
	return nil
}

// committed reports whether the image of fsys reads op i's new data (its
// bytes, or zeros) over the op's whole range.
func (r *run) committed(fsys vfs.FS, i int) bool {
	op := r.ops[i]
	im, err := qcow.Open(fsys, imageName, nil)
	if err != nil {
		return false
	}
	defer im.Close()
	want := r.data[i]
	if op.Kind == OpZero {
		want = make([]byte, op.Len)
	}
	got := make([]byte, len(want))
	if _, err := im.ReadAt(got, op.Off); err != nil {
		return false
	}
	return bytes.Equal(got, want)
}

// inFlight returns the index of the workload op in flight at crash point n
// (some of its file operations applied, not all), or the index of the
// next op to start when none is.
func (r *run) inFlight(n int) int {
	for i := range r.ops {
		if r.ends[i] > n {
			return i
		}
	}
	return len(r.ops)
}

// modelAt returns the reference disk a crash at point n must match: the
// ops completed before n applied (flushes recorded unless noFlush), the op
// in flight as a failed write, and then a crash.
func (r *run) modelAt(n int, noFlush bool) *model.Disk {
	var base *bytes.Reader
	if r.base != nil {
		base = bytes.NewReader(r.base)
	}
	var m *model.Disk
	if base != nil {
		m = model.New(r.c.Size, base)
	} else {
		m = model.New(r.c.Size, nil)
	}
	flush := func() {
		if !noFlush {
			m.Flush()
		}
	}
	for i, op := range r.ops {
		switch {
		case r.ends[i] <= n && r.failed[i]: // returned an error
			switch op.Kind {
			case OpWrite:
				m.FailedWrite(r.data[i], op.Off)
			case OpZero:
				m.FailedWriteZeroes(op.Off, op.Len)
			case OpResize:
				m.FailedResize(op.Size)
			}
			continue
		case r.ends[i] <= n: // completed
			switch op.Kind {
			case OpWrite:
				m.Write(r.data[i], op.Off)
			case OpZero:
				m.WriteZeroes(op.Off, op.Len)
			case OpFlush, OpClose:
				flush()
			case OpResize:
				m.Resize(op.Size, !noFlush) // durable on return
			}
			if r.c.WriteThrough && (op.Kind == OpWrite || op.Kind == OpZero) {
				flush()
			}
			continue
		case r.starts[i] < n: // in flight: each sector old or new
			switch op.Kind {
			case OpWrite:
				m.FailedWrite(r.data[i], op.Off)
			case OpZero:
				m.FailedWriteZeroes(op.Off, op.Len)
			case OpResize:
				m.FailedResize(op.Size)
			}
		}
		break
	}
	m.Crash()
	return m
}

// checkState runs the verdicts on one crash state at point n. A panic in
// the code under test is a failure of kind "panic".
func (r *run) checkState(n int, s *faultfs.State) (f *Failure) {
	defer func() {
		if p := recover(); p != nil {
			f = &Failure{Kind: KindPanic, Sector: -1, Detail: fmt.Sprintf("panic: %v", p)}
		}
	}()
	im, err := qcow.Open(s, imageName, nil)
	if err != nil {
		return &Failure{Kind: KindOpen, Sector: -1, Detail: err.Error()}
	}
	res, err := qcow.CheckFile(s, imageName, "")
	if err != nil {
		im.Close()
		return &Failure{Kind: KindCheck, Sector: -1, Detail: "check could not complete: " + err.Error()}
	}
	if res.Corruptions > 0 {
		im.Close()
		return &Failure{Kind: KindCheck, Sector: -1, Detail: checkDetail(res)}
	}
	m := r.modelAt(n, false)
	if f := r.checkSize(n, m, im); f != nil {
		im.Close()
		return f
	}
	err = m.Check(im)
	if err != nil {
		f := &Failure{Kind: KindContent, Detail: err.Error(), Sector: -1}
		var me *model.MismatchError
		if errors.As(err, &me) {
			f.Sector, f.Mismatch = me.Sector, mismatch(me)
			if mn := r.modelAt(n, true); mn.CheckSize(im.Size()) == nil && mn.Check(im) == nil {
				f.Kind = KindDurability
			}
		}
		im.Close()
		return f
	}
	if err := r.checkSnapshots(im); err != nil {
		im.Close()
		return &Failure{Kind: KindSnapshot, Sector: -1, Detail: err.Error()}
	}
	im.Close()
	// m now holds what the recovered image holds.
	if err := r.usable(s, m, n); err != nil {
		if errors.Is(err, model.ErrSnapshot) {
			return &Failure{Kind: KindSnapshot, Sector: -1, Detail: "after the usability write: " + err.Error()}
		}
		return &Failure{Kind: KindUsability, Sector: -1, Detail: err.Error()}
	}
	return nil
}

// usable reopens the recovered image for writing, writes a new pattern,
// flushes, closes, and checks that every sector reads as m (with the new
// write) says and that the image is still free of corruption.
func (r *run) usable(s *faultfs.State, m *model.Disk, n int) error {
	seed := faultfs.SubSeed(r.c.Seed, fmt.Sprintf("usability/%d/%d", n, s.Index()))
	size := m.Size() // the recovered image's, adopted by the content check
	off := int64(seed % uint64(size))
	ln := min(size-off, r.c.ClusterSize+int64(seed>>40)%r.c.ClusterSize+1)
	p := Pattern(seed, ln)
	im, err := qcow.Open(s, imageName, &qcow.Options{ReadWrite: true})
	if err != nil {
		return fmt.Errorf("reopen for writing: %w", err)
	}
	if _, err := im.WriteAt(p, off); err != nil {
		im.Close()
		return fmt.Errorf("write %d bytes at %d: %w", ln, off, err)
	}
	if err := im.Flush(); err != nil {
		im.Close()
		return fmt.Errorf("flush: %w", err)
	}
	got := make([]byte, ln)
	if _, err := im.ReadAt(got, off); err != nil {
		im.Close()
		return fmt.Errorf("read back: %w", err)
	}
	if !bytes.Equal(got, p) {
		im.Close()
		return fmt.Errorf("read back %d bytes at %d: differ from what was written", ln, off)
	}
	if err := im.Close(); err != nil {
		return fmt.Errorf("close: %w", err)
	}
	if err := m.Write(p, off); err != nil {
		return err
	}
	im, err = qcow.Open(s, imageName, nil)
	if err != nil {
		return fmt.Errorf("open after write: %w", err)
	}
	defer im.Close()
	if err := m.CheckSize(im.Size()); err != nil {
		return fmt.Errorf("after writing %d bytes at %d: %w", ln, off, err)
	}
	if err := m.Check(im); err != nil {
		return fmt.Errorf("after writing %d bytes at %d: %w", ln, off, err)
	}
	if err := r.checkSnapshots(im); err != nil {
		return fmt.Errorf("after writing %d bytes at %d: %w", ln, off, err)
	}
	res, err := qcow.CheckFile(s, imageName, "")
	if err != nil {
		return fmt.Errorf("check after write: %w", err)
	}
	if res.Corruptions > 0 {
		return fmt.Errorf("corrupt after write: %s", checkDetail(res))
	}
	return nil
}

// mismatch shows where the sector first differs from each allowed value.
func mismatch(me *model.MismatchError) string {
	var b strings.Builder
	for i, a := range me.Allowed {
		if i == 4 {
			fmt.Fprintf(&b, "; (%d more allowed values)", len(me.Allowed)-i)
			break
		}
		j := 0
		for j < len(a) && j < len(me.Got) && a[j] == me.Got[j] {
			j++
		}
		end := min(j+16, len(a), len(me.Got))
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "byte %d: got %x want %x", j, me.Got[j:end], a[j:end])
	}
	return b.String()
}

// checkDetail summarizes a check result with its first finding.
func checkDetail(res *qcow.CheckResult) string {
	d := fmt.Sprintf("%d corruptions, %d leaks", res.Corruptions, res.Leaks)
	for _, f := range res.Findings {
		if f.Kind == qcow.Corruption {
			d += fmt.Sprintf("; first corruption at offset %d: %s", f.Offset, f.Msg)
			break
		}
	}
	return d
}

// shorten folds s onto one line and cuts it to at most n bytes, marking
// the cut.
func shorten(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// noBarrierFS is the TargetNoBarrier layer: every sync of a file reports
// success without reaching the file system below.
type noBarrierFS struct{ vfs.FS }

func (f noBarrierFS) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	h, err := f.FS.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return noBarrierFile{h}, nil
}

func (f noBarrierFS) Create(name string) (vfs.File, error) {
	h, err := f.FS.Create(name)
	if err != nil {
		return nil, err
	}
	return noBarrierFile{h}, nil
}

// Label forwards to the wrapped FS (see vfs.Labeler).
func (f noBarrierFS) Label(label string) {
	if l, ok := f.FS.(vfs.Labeler); ok {
		l.Label(label)
	}
}

// noBarrierFile drops Sync, Datasync and SyncRange.
type noBarrierFile struct{ vfs.File }

func (noBarrierFile) Sync() error                  { return nil }
func (noBarrierFile) Datasync() error              { return nil }
func (noBarrierFile) SyncRange(off, n int64) error { return nil }

// dirFS is vfs.OS with every name relative to dir.
type dirFS struct{ dir string }

var _ vfs.Renamer = dirFS{}

func (d dirFS) path(name string) string { return filepath.Join(d.dir, name) }

func (d dirFS) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	return vfs.OS.Open(d.path(name), flag)
}
func (d dirFS) Create(name string) (vfs.File, error) { return vfs.OS.Create(d.path(name)) }
func (d dirFS) Remove(name string) error             { return vfs.OS.Remove(d.path(name)) }
func (d dirFS) SyncDir(dir string) error             { return vfs.OS.SyncDir(d.path(dir)) }
func (d dirFS) Stat(name string) (os.FileInfo, error) {
	return vfs.OS.Stat(d.path(name))
}
func (d dirFS) Rename(oldname, newname string) error {
	rn, ok := vfs.OS.(vfs.Renamer)
	if !ok {
		return fmt.Errorf("harness: %s: the OS file system cannot rename", d.dir)
	}
	return rn.Rename(d.path(oldname), d.path(newname))
}
