package harness

import (
	"fmt"
	"slices"
	"sort"

	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// Writer is an image open for writing, as a target hands it to the
// workload. Every method has the meaning of the same method of
// *qcow.Image.
type Writer interface {
	WriteAt(p []byte, off int64) (int, error)
	WriteZeroes(off, n int64) error
	Flush() error
	Close() error
}

// Resizer is implemented by Writers that can grow the virtual disk (as
// *qcow.Image does): Resize has the meaning of qcow's Image.Resize, durable
// on return. The harness checks for it by type assertion; a target whose
// writers implement it says so with ResizeTarget, and only such targets
// get resize ops.
type Resizer interface {
	Resize(newSize int64) error
}

// ResizeTarget is implemented by targets whose writers are Resizers when
// Resizes returns true.
type ResizeTarget interface {
	Resizes() bool
}

// targetResizes reports whether the target named name resizes.
func targetResizes(name string) bool {
	rt, ok := targets[name].(ResizeTarget)
	return ok && rt.Resizes()
}

// Target is a writer under test. The harness creates the image (and its
// backing file) with qcow.Create, durably, before the workload starts;
// the target only opens it and writes. The crash states are judged by
// this project's reader and checker whatever the target.
type Target interface {
	// Name is the target's name in case IDs and on the command line.
	Name() string
	// Formats lists the case formats ("v1", "v2", "v3") the target writes.
	Formats() []string
	// Open opens the image name of fsys for writing. fsys is the fault
	// layer; a target must make every file operation through it.
	Open(fsys vfs.FS, name string, writeThrough bool) (Writer, error)
}

// Explainer is implemented by targets whose failures have known causes:
// Explain returns, in plain words, why the target fails the way f says, or
// "" when it does not recognise the failure.
type Explainer interface {
	Explain(f *Failure) string
}

// Explain returns the target's explanation of the verdict's failure (see
// Explainer), or "" when the case passed, its target has none, or the
// target does not recognise the failure.
func Explain(v Verdict) string {
	if v.OK || v.Failure == nil {
		return ""
	}
	if e, ok := targets[v.Case.Target].(Explainer); ok {
		return e.Explain(v.Failure)
	}
	return ""
}

// targets holds the registered targets by name.
var targets = map[string]Target{}

// Register adds a writer under test to Targets (a user's own writer, or a
// test's deliberately broken one). A name that is taken is an error.
// Register is not safe for concurrent use with running cases.
func Register(t Target) error {
	if _, dup := targets[t.Name()]; dup || t.Name() == "" {
		return fmt.Errorf("harness: target name %q is empty or taken", t.Name())
	}
	register(t)
	return nil
}

// register adds t to the targets and to Targets; it panics on a duplicate
// name (a programming error caught by every test run).
func register(t Target) {
	if _, dup := targets[t.Name()]; dup {
		panic(fmt.Sprintf("harness: target %q registered twice", t.Name()))
	}
	targets[t.Name()] = t
	Targets = append(Targets, t.Name())
	if len(Targets) > 2 {
		sort.Strings(Targets[2:])
	}
}

// LookupTarget returns the target named name.
func LookupTarget(name string) (Target, bool) {
	t, ok := targets[name]
	return t, ok
}

func init() {
	register(qcowTarget{})
	register(noBarrierTarget{})
}

// qcowTarget is TargetQCOW: this project's writer.
type qcowTarget struct{}

func (qcowTarget) Name() string      { return TargetQCOW }
func (qcowTarget) Formats() []string { return slices.Clone(Formats) }
func (qcowTarget) Resizes() bool     { return true }
func (qcowTarget) Open(fsys vfs.FS, name string, wt bool) (Writer, error) {
	return qcow.Open(fsys, name, &qcow.Options{ReadWrite: true, WriteThrough: wt, Events: qcow.LabelEvents(fsys)})
}

// noBarrierTarget is TargetNoBarrier: this project's writer over a layer
// that drops every sync.
type noBarrierTarget struct{}

func (noBarrierTarget) Name() string      { return TargetNoBarrier }
func (noBarrierTarget) Formats() []string { return slices.Clone(Formats) }
func (noBarrierTarget) Resizes() bool     { return true }
func (noBarrierTarget) Open(fsys vfs.FS, name string, wt bool) (Writer, error) {
	return qcowTarget{}.Open(noBarrierFS{fsys}, name, wt)
}
