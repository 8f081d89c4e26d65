package harness

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/qcow"
)

// ExploreOptions say how Explore enumerates a case's crash states.
type ExploreOptions struct {
	// Options: where the case runs.
	Options
	// MaxStates stops the exploration after this many states in all
	// (0: no limit). Each point still yields up to Case.StatesPerPoint.
	MaxStates int
	// StopAtFailure stops at the first failing state, as Run does.
	StopAtFailure bool
	// Export, when set, is a directory every checked crash state is
	// written to before it is checked (see ExportState).
	Export string
	// Visit, if set, is called after each state is checked.
	Visit func(StateResult)
}

// StateResult is one checked crash state.
type StateResult struct {
	// Point is the crash point (file operations applied), Op the workload
	// op in flight there (see Failure.Op).
	Point, Op int
	// Index is the state's index among the point's states, Key its
	// faultfs key.
	Index int
	Key   uint64
	// Failure is nil when the state passed every verdict.
	Failure *Failure
	// Image is the exported image's path (ExploreOptions.Export), else "".
	Image string
}

// PointCount counts the states checked at one crash point.
type PointCount struct {
	Point    int `json:"point"`
	Op       int `json:"op"`
	States   int `json:"states"`
	Failures int `json:"failures"`
}

// Exploration is the result of Explore.
type Exploration struct {
	// Verdict is the case's verdict over the states explored: its Failure
	// is the first failure.
	Verdict Verdict `json:"verdict"`
	// Points counts the states of every crash point, in order.
	Points []PointCount `json:"points"`
	// Failures lists every failing state's failure (all of them unless
	// StopAtFailure).
	Failures []*Failure `json:"failures"`
	// Truncated is true when MaxStates stopped the exploration early.
	Truncated bool `json:"truncated"`
	// Exported counts the crash-state images written.
	Exported int `json:"exported"`
}

// Explore records the case's workload and checks its crash states point by
// point, like Run, but reports every failure and the counts per crash
// point, and can write every state out as image files. Like Run, it then
// checks the ordering rules (a failure of theirs is listed last, outside
// Points).
func Explore(c Case, o ExploreOptions) (*Exploration, error) {
	ex := &Exploration{Verdict: Verdict{Case: c}, Failures: []*Failure{}}
	r, ffs, cleanup, f := prepare(c, o.Options)
	defer cleanup()
	if ffs != nil {
		ex.Verdict.FileOps = len(ffs.Log())
		ex.Verdict.Faults = len(r.tap.faults)
	}
	if f != nil {
		f.Detail = shorten(f.Detail, 600)
		ex.Verdict.Failure = f
		ex.Verdict.Coverage = r.earlyCoverage(&ex.Verdict, ffs)
		ex.Failures = append(ex.Failures, f)
		return ex, nil
	}
	if o.Export != "" {
		if err := os.MkdirAll(o.Export, 0o755); err != nil {
			return nil, fmt.Errorf("harness: export: %w", err)
		}
	}
	rec := ffs.Recording()
	ex.Verdict.FileOps = rec.Len()
	cov := newCoverRec(c, rec.Ops())
	statesSeed := faultfs.SubSeed(c.Seed, "states")
	exportedBase := false
points:
	for p, n := range r.crashTimes(rec) {
		ex.Verdict.Points++
		pc := PointCount{Point: n, Op: r.inFlight(n)}
		for s := range p.States(c.Model, statesSeed, c.StatesPerPoint) {
			if o.MaxStates > 0 && ex.Verdict.States >= o.MaxStates {
				ex.Truncated = true
				ex.Points = append(ex.Points, pc)
				break points
			}
			res := StateResult{Point: n, Op: pc.Op, Index: s.Index(), Key: s.Key()}
			if o.Export != "" {
				img, err := r.export(o.Export, s, n, !exportedBase)
				if err != nil {
					return nil, err
				}
				exportedBase = true
				res.Image = img
				ex.Exported++
			}
			ex.Verdict.States++
			pc.States++
			f := r.checkState(n, s)
			cov.state(n, f)
			if f != nil {
				f.Point, f.Op = n, pc.Op
				f.StateKey = fmt.Sprintf("%d/%016x", s.Index(), s.Key())
				f.State = shorten(s.String(), 400)
				f.Detail = shorten(f.Detail, 600)
				res.Failure = f
				pc.Failures++
				ex.Failures = append(ex.Failures, f)
				if ex.Verdict.Failure == nil {
					ex.Verdict.Failure = f
				}
			}
			if o.Visit != nil {
				o.Visit(res)
			}
			if res.Failure != nil && o.StopAtFailure {
				ex.Points = append(ex.Points, pc)
				break points
			}
		}
		ex.Points = append(ex.Points, pc)
	}
	// The ordering rules judge the op log, as Run does after the states
	// (and, as Run, not after a failing state when stopping at one).
	if !o.StopAtFailure || ex.Verdict.Failure == nil {
		if f := r.ordering(rec, &ex.Verdict); f != nil {
			ex.Failures = append(ex.Failures, f)
			if ex.Verdict.Failure == nil {
				ex.Verdict.Failure = f
			}
		}
	}
	ex.Verdict.OK = ex.Verdict.Failure == nil
	ex.Verdict.Coverage = cov.finish(&ex.Verdict, r.tap.faults)
	return ex, nil
}

// imageExt returns the file name extension of the case's image format.
func (c Case) imageExt() string {
	if c.Format == "v1" {
		return ".qcow"
	}
	return ".qcow2"
}

// ExportName returns the base name (without extension) Explore gives the
// image of state index of crash point point: "p000123-s0004".
func ExportName(point, index int) string { return fmt.Sprintf("p%06d-s%04d", point, index) }

// export writes crash state s of point n into dir, before it is checked:
// the image as ExportName(n, index) + ".qcow" or ".qcow2", its backing
// file beside it under the name the image refers to (once per directory,
// when withBase: the workload never writes it), and once per point the
// model's expected raw image, "p000123.expected.raw": the disk after every
// op completed before the crash (the newest contents the model allows;
// sectors written since the last flush may also hold older values). It
// returns the image's path.
func (r *run) export(dir string, s *faultfs.State, n int, withBase bool) (string, error) {
	img := filepath.Join(dir, ExportName(n, s.Index())+r.c.imageExt())
	if err := copyOut(s, imageName, img); err != nil {
		return "", err
	}
	if withBase && r.c.Backing {
		if err := copyOut(s, backingName, filepath.Join(dir, backingName)); err != nil {
			return "", err
		}
	}
	exp := filepath.Join(dir, fmt.Sprintf("p%06d.expected.raw", n))
	if _, err := os.Stat(exp); errors.Is(err, os.ErrNotExist) {
		if err := os.WriteFile(exp, r.expected(n), 0o644); err != nil {
			return "", fmt.Errorf("harness: export: %w", err)
		}
	}
	return img, nil
}

// copyOut copies file name of s to the host file path.
func copyOut(s *faultfs.State, name, path string) error {
	f, err := s.Open(name, 0)
	if err != nil {
		return fmt.Errorf("harness: export %s: %w", name, err)
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return fmt.Errorf("harness: export %s: %w", name, err)
	}
	b := make([]byte, size)
	if _, err := f.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("harness: export %s: %w", name, err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("harness: export: %w", err)
	}
	return nil
}

// expected returns the disk after every workload op completed before
// crash point n (failed ops left out).
func (r *run) expected(n int) []byte {
	b := make([]byte, r.c.Size)
	copy(b, r.base)
	for i, op := range r.ops {
		if r.ends[i] > n {
			break
		}
		if r.failed[i] {
			continue
		}
		switch op.Kind {
		case OpWrite:
			copy(b[op.Off:], r.data[i])
		case OpZero:
			clear(b[op.Off : op.Off+op.Len])
		}
	}
	return b
}

// Inspection is what repro -v shows about a failing crash state.
type Inspection struct {
	// Pending lists the image's writes that were not durable at the crash
	// point (since the last fsync or fdatasync of the image) and how much
	// of each the crash state kept.
	Pending []PendingWrite
	// Findings are the checker's findings on the crash state, one line
	// each ("corruption at offset N: ..."), or the reason it could not
	// run.
	Findings []string
	// Sectors are the first sectors whose content the model does not
	// allow, with the bytes expected and got.
	Sectors []SectorDiff
}

// PendingWrite is one write not yet durable at the crash point.
type PendingWrite struct {
	// Op is the write's file operation, as the op log prints it.
	Op string
	// Kept is "kept", "lost" or "partly kept (K of N sectors)".
	Kept string
}

// SectorDiff is one sector the crash state got wrong: Got is what the
// recovered image reads, Want the first value the model allows (the
// newest durable one).
type SectorDiff struct {
	Sector    int64
	Got, Want []byte
}

// Inspect replays the case to the failure's crash point and state and
// reports what the crash state kept, what the checker finds and which
// sectors differ from what the model allows.
func Inspect(c Case, f *Failure) (*Inspection, error) {
	if f == nil || f.Point < 0 {
		return nil, errors.New("harness: inspect: the failure is not at a crash point")
	}
	r, ffs, cleanup, pf := prepare(c, Options{})
	defer cleanup()
	if pf != nil {
		return nil, fmt.Errorf("harness: inspect: %s", pf)
	}
	rec := ffs.Recording()
	p, err := rec.Point(f.Point)
	if err != nil {
		return nil, fmt.Errorf("harness: inspect: %w", err)
	}
	var st *faultfs.State
	for s := range p.States(c.Model, faultfs.SubSeed(c.Seed, "states"), c.StatesPerPoint) {
		if fmt.Sprintf("%d/%016x", s.Index(), s.Key()) == f.StateKey {
			st = s
			break
		}
	}
	if st == nil {
		return nil, fmt.Errorf("harness: inspect: crash state %s of point %d not found", f.StateKey, f.Point)
	}
	in := &Inspection{}
	// Pending writes of the image: since its last fsync or fdatasync.
	log := rec.Ops()[:f.Point]
	from := 0
	for i, op := range log {
		if op.Path == imageName && op.Err == nil && (op.Kind == faultfs.OpSync || op.Kind == faultfs.OpDatasync) {
			from = i + 1
		}
	}
	for _, op := range log[from:] {
		if op.Kind != faultfs.OpWrite || op.Path != imageName || len(op.Written) == 0 {
			continue
		}
		in.Pending = append(in.Pending, PendingWrite{Op: op.String(), Kept: kept(st, op)})
	}
	// The checker, on the state as the crash left it.
	if res, err := qcow.CheckFile(st, imageName, ""); err != nil {
		in.Findings = append(in.Findings, "check could not complete: "+err.Error())
	} else {
		for _, fd := range res.Findings {
			in.Findings = append(in.Findings, fmt.Sprintf("%s at offset %d: %s", fd.Kind, fd.Offset, fd.Msg))
		}
	}
	// The first sectors the model does not allow.
	im, err := qcow.Open(st, imageName, nil)
	if err != nil {
		return in, nil
	}
	defer im.Close()
	disk := make([]byte, im.Size())
	if _, err := im.ReadAt(disk, 0); err != nil && !errors.Is(err, io.EOF) {
		return in, nil
	}
	for len(in.Sectors) < 4 {
		var me *model.MismatchError
		m := r.modelAt(f.Point, false)
		if err := m.CheckSize(im.Size()); err != nil {
			break
		}
		if err := m.Check(bytes.NewReader(disk)); !errors.As(err, &me) || len(me.Allowed) == 0 {
			break
		}
		in.Sectors = append(in.Sectors, SectorDiff{Sector: me.Sector, Got: bytes.Clone(me.Got), Want: bytes.Clone(me.Allowed[0])})
		copy(disk[me.Sector*model.SectorSize:], me.Allowed[0])
	}
	return in, nil
}

// kept says how much of write op a crash state holds, by sector.
func kept(st *faultfs.State, op faultfs.Op) string {
	f, err := st.Open(imageName, 0)
	if err != nil {
		return "lost (no image file)"
	}
	defer f.Close()
	got := make([]byte, len(op.Data))
	n, _ := f.ReadAt(got, op.Offset)
	total, same := 0, 0
	for at := 0; at < len(op.Data); at += model.SectorSize {
		end := min(at+model.SectorSize, len(op.Data))
		total++
		if end <= n && bytes.Equal(got[at:end], op.Data[at:end]) {
			same++
		}
	}
	switch same {
	case total:
		return "kept"
	case 0:
		return "lost"
	}
	return fmt.Sprintf("partly kept (%d of %d sectors)", same, total)
}
