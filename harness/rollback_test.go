package harness

import (
	"bytes"
	"strings"
	"sync"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// noTruncateTarget is a broken test target: the qcow writer over a layer
// whose Truncate reports success without cutting anything, so a rollback
// never cuts the file back.
type noTruncateTarget struct{}

func (noTruncateTarget) Name() string      { return "test-notruncate" }
func (noTruncateTarget) Formats() []string { return Formats }
func (noTruncateTarget) Open(fsys vfs.FS, name string, wt bool) (Writer, error) {
	return qcowTarget{}.Open(noTruncateFS{fsys}, name, wt)
}

type noTruncateFS struct{ vfs.FS }

func (f noTruncateFS) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	h, err := f.FS.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return noTruncateFile{h}, nil
}

type noTruncateFile struct{ vfs.File }

func (noTruncateFile) Truncate(int64) error { return nil }

var registerRollbackTargets = sync.OnceFunc(func() {
	registerTestTargets()
	register(noTruncateTarget{})
})

// rollbackOps is a workload whose writes allocate (so that a failed one
// grows the file and its rollback must cut it back), overwrite in place
// and zero.
var rollbackOps = []Op{
	{Kind: OpWrite, Off: 0, Len: 4096, Pattern: 1}, {Kind: OpFlush},
	{Kind: OpWrite, Off: 5000, Len: 9000, Pattern: 2}, {Kind: OpZero, Off: 0, Len: 4096},
	{Kind: OpWrite, Off: 100, Len: 300, Pattern: 3}, {Kind: OpFlush},
	{Kind: OpWrite, Off: 30000, Len: 5000, Pattern: 4}, {Kind: OpWrite, Off: 40000, Len: 20000, Pattern: 5}, {Kind: OpFlush},
}

// TestCrashRollbackVerdict: after a write that failed with one clean fault
// (not a crash, not on a barrier, nothing else failing during it) the live
// file must be cut back, leak free and uncorrupted. The qcow writer passes
// in both cache modes, with the verdict judging rollbacks; a writer whose
// rollback never cuts the file back fails it (kind check), and one that
// swallows the injected error fails the errors verdict.
func TestCrashRollbackVerdict(t *testing.T) {
	registerRollbackTargets()
	plans := []string{
		`(rule (and (kind write) (randomly 0.15 9)) eio)`,
		`(rule (and (kind write) (randomly 0.2 3)) (tear 5))`,
		`(rule (and (kind read) (randomly 0.3 2)) eio)`,
		`(rule (and (kind write truncate) (randomly 0.2 4)) enospc)`,
	}
	for _, x := range []struct {
		name, target, want, kind string
	}{
		{"qcow", TargetQCOW, "", ""},
		{"no-truncate", "test-notruncate", "did not cut the file back", KindCheck},
		{"swallow", "test-swallow", "returned nil although an injected fault", KindErrors},
	} {
		t.Run(x.name, func(t *testing.T) {
			rollbacks, caught := 0, 0
			for _, format := range []string{"v1", "v3"} {
				for _, wt := range []bool{false, true} {
					for _, plan := range plans {
						c := Case{Format: format, ClusterSize: 4096, Size: 64 << 10, Model: faultfs.Torn, StatesPerPoint: 2,
							WriteThrough: wt, Target: x.target, Seed: 3, Backing: format == "v1"}.WithTrace(rollbackOps)
						c.Faults = plan
						v := Run(c)
						rollbacks += v.Rollbacks
						switch {
						case x.want == "" && !v.OK:
							t.Fatalf("%v\nrepro: crashtest repro %s", v.Failure, c.ID())
						case x.want != "" && !v.OK:
							if v.Failure.Kind != x.kind || !strings.Contains(v.Failure.Detail, x.want) {
								t.Fatalf("%s: %v, want a %s failure %q", c.ID(), v.Failure, x.kind, x.want)
							}
							if caught == 0 {
								t.Logf("caught %s: %s", x.target, c.ID())
								t.Logf("  %v", v.Failure)
							}
							caught++
						}
					}
				}
			}
			if x.want == "" && rollbacks < 8 {
				t.Fatalf("the rollback verdict judged only %d failed writes", rollbacks)
			}
			if x.want != "" && caught == 0 {
				t.Fatalf("the broken target %s was never caught", x.target)
			}
			t.Logf("%s: %d rollbacks judged, %d cases failed", x.target, rollbacks, caught)
		})
	}
}

// TestCrashOpenFailureContributesNothing: when the writable open fails, no
// op is issued, so none may contribute to the model: every crash state
// must read as the starting contents, and one holding the first write's
// data is rejected.
func TestCrashOpenFailureContributesNothing(t *testing.T) {
	c := Case{Format: "v3", ClusterSize: 4096, Size: 64 << 10, Model: faultfs.Torn, StatesPerPoint: 4, Target: TargetQCOW, Seed: 5, Backing: true}.WithTrace(rollbackOps)
	// File ops 0-3 adopt the backing file and the image; op 4 is the
	// writable open of the image.
	c.Faults = `(rule (index 4) eio)`
	v := Run(c)
	if !v.OK || v.Faults != 1 {
		t.Fatalf("%+v", v)
	}
	r, _, cleanup, f := prepare(c, Options{})
	defer cleanup()
	if f != nil {
		t.Fatal(f)
	}
	if len(r.ops) != 0 {
		t.Fatalf("the open failed, yet %d ops count as issued", len(r.ops))
	}
	start := bytes.Clone(r.base)
	if err := r.modelAt(1<<30, false).Check(bytes.NewReader(start)); err != nil {
		t.Fatalf("the starting contents are rejected: %v", err)
	}
	written := bytes.Clone(r.base)
	copy(written, rollbackOps[0].Data())
	if err := r.modelAt(1<<30, false).Check(bytes.NewReader(written)); err == nil {
		t.Fatal("a disk holding the data of a write never issued is accepted")
	}
}
