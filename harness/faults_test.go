package harness

import (
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// swallowTarget is a broken test target: the qcow writer with every error
// of WriteAt and Flush replaced by nil ("swallow") or by a new error that
// does not wrap the cause ("rewrap").
type swallowTarget struct{ name string }

func (s swallowTarget) Name() string      { return s.name }
func (s swallowTarget) Formats() []string { return Formats }
func (s swallowTarget) Open(fsys vfs.FS, name string, wt bool) (Writer, error) {
	w, err := qcowTarget{}.Open(fsys, name, wt)
	if err != nil {
		return nil, err
	}
	return swallowWriter{w, s.name}, nil
}

type swallowWriter struct {
	Writer
	mode string
}

func (w swallowWriter) fix(err error) error {
	switch {
	case err == nil:
		return nil
	case w.mode == "test-swallow":
		return nil
	}
	return errors.New("write failed: " + err.Error())
}

func (w swallowWriter) WriteAt(p []byte, off int64) (int, error) {
	n, err := w.Writer.WriteAt(p, off)
	return n, w.fix(err)
}
func (w swallowWriter) Flush() error { return w.fix(w.Writer.Flush()) }

// registerTestTargets registers the test targets once, from the tests
// that need them (not from init, which would run before target.go's and
// put them ahead of TargetQCOW in Targets).
var registerTestTargets = sync.OnceFunc(func() {
	register(swallowTarget{"test-swallow"})
	register(swallowTarget{"test-rewrap"})
})

// TestErrorsVerdict runs fixed fault plans: the qcow writer passes them
// all (errors wrap the injected one, the model treats failed ops as
// failed writes, a crash fails everything after it), and targets that
// swallow or rewrap errors fail the errors verdict.
func TestErrorsVerdict(t *testing.T) {
	registerTestTargets()
	base := Case{Format: "v3", ClusterSize: 4096, Size: 64 << 10, Model: faultfs.Torn, StatesPerPoint: 8, Target: TargetQCOW, Seed: 3}
	ops := []Op{
		{Kind: OpWrite, Off: 0, Len: 4096, Pattern: 1}, {Kind: OpFlush},
		{Kind: OpWrite, Off: 5000, Len: 9000, Pattern: 2}, {Kind: OpZero, Off: 0, Len: 512},
		{Kind: OpWrite, Off: 100, Len: 300, Pattern: 3}, {Kind: OpFlush},
		{Kind: OpWrite, Off: 30000, Len: 5000, Pattern: 4}, {Kind: OpFlush},
	}
	tc := base.WithTrace(ops)
	clean := Run(tc)
	if !clean.OK || clean.FileOps < 12 {
		t.Fatalf("the fault-free case fails: %+v", clean)
	}
	for _, x := range []struct {
		name, plan, target, want string
	}{
		{"eio-write", `(rule (and (kind write) (index 12)) eio)`, TargetQCOW, ""},
		{"eio-every-5th-write", `(rule (and (kind write) (randomly 0.2 9)) eio)`, TargetQCOW, ""},
		{"tear", `(rule (kind write) (tear 5))`, TargetQCOW, ""},
		{"enospc", `(rule (and (kind write truncate) (randomly 0.3 4)) enospc)`, TargetQCOW, ""},
		{"fsync-drop", `(rule (and (kind datasync sync) (randomly 0.5 1)) fsync-drop)`, TargetQCOW, ""},
		{"eio-read", `(rule (and (kind read) (randomly 0.3 2)) eio)`, TargetQCOW, ""},
		{"crash", `(rule (index 15) crash)`, TargetQCOW, ""},
		{"crash-at-open", `(rule (index 2) crash)`, TargetQCOW, ""}, // ops 0 and 1 open and close the image before faults start
		{"swallow", `(rule (and (kind write) (randomly 0.2 9)) eio)`, "test-swallow", "returned nil although an injected fault"},
		{"rewrap", `(rule (and (kind write) (randomly 0.2 9)) eio)`, "test-rewrap", "does not wrap"},
	} {
		t.Run(x.name, func(t *testing.T) {
			c := tc
			c.Faults, c.Target = x.plan, x.target
			v := Run(c)
			if !reflect.DeepEqual(v, Run(c)) {
				t.Fatal("two runs of the same fault case differ")
			}
			if v.Faults == 0 {
				t.Fatalf("%s: no fault fired", c.Faults)
			}
			switch {
			case x.want == "" && !v.OK:
				t.Fatalf("%s: %v\nrepro: crashtest repro %s", c.Faults, v.Failure, c.ID())
			case x.want != "" && (v.OK || v.Failure.Kind != KindErrors || !strings.Contains(v.Failure.Detail, x.want)):
				t.Fatalf("%s against %s: %+v, want an errors failure %q", c.Faults, c.Target, v.Failure, x.want)
			}
			t.Logf("%s: ok=%v points=%d states=%d file ops=%d (fault-free: %d) %v", x.name, v.OK, v.Points, v.States, v.FileOps, clean.FileOps, v.Failure)
		})
	}
}

// TestGeneratedFaultPlans: --errors cases against the qcow writer pass,
// and their fault plans parse and vary.
func TestGeneratedFaultPlans(t *testing.T) {
	plans := map[string]bool{}
	for k := range uint64(12) {
		c := Generate(CaseSeed(9, k), Space{Errors: true, MaxOps: 12})
		if _, err := faultfs.ParseInjector(c.Faults); err != nil {
			t.Fatalf("%s: %v", c.Faults, err)
		}
		plans[strings.Fields(c.Faults)[3]] = true
		noErr := Generate(CaseSeed(9, k), Space{MaxOps: 12})
		if noErr.Faults != "" || noErr.ID() != strings.Split(c.ID(), ":f=")[0] {
			t.Fatalf("--errors changed the rest of the case: %s vs %s", noErr.ID(), c.ID())
		}
		if v := Run(c); !v.OK {
			t.Fatalf("%s: %v\nrepro: crashtest repro %s", c.Faults, v.Failure, c.ID())
		}
	}
	if len(plans) < 3 {
		t.Errorf("12 plans use only the op kinds %v", plans)
	}
}

// TestRunOSDir: the same case over real files gives the same verdict.
func TestRunOSDir(t *testing.T) {
	for _, c := range []Case{
		small("v3", faultfs.Torn, 11),
		func() Case { c := small("v1", faultfs.Torn, 12); c.Backing = true; return c }(),
		func() Case { c := small("v2", faultfs.Torn, 13); c.Target = TargetNoBarrier; return c }(),
	} {
		dir := t.TempDir()
		a, b := Run(c), RunWith(c, Options{Dir: dir})
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("%s: in memory %+v, over files %+v", c.ID(), a, b)
		}
		if a.States == 0 {
			t.Fatalf("%s: no states", c.ID())
		}
	}
	if v := RunWith(small("v3", faultfs.Torn, 1), Options{Dir: "/nonexistent/x"}); v.OK || v.Failure.Kind != KindSetup {
		t.Fatalf("run under a missing directory: %+v", v)
	}
}
