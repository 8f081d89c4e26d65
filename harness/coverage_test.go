package harness

import (
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

func TestCoverageAddMergeJSON(t *testing.T) {
	var a, b Coverage
	a.Add("l2_update", "crash:torn", OutcomePass, 3)
	a.Add("-", "eio", KindErrors, 1)
	a.Add("l2_update", "crash:torn", OutcomePass, 2)
	a.Add("x", "y", "z", 0) // nothing
	b.Add("cow_write", "crash:torn", KindCheck, 1)
	b.Add("l2_update", "crash:torn", OutcomePass, 5)
	a.Merge(&b)
	a.Merge(nil)
	want := []Cell{
		{"-", "eio", KindErrors, 1},
		{"cow_write", "crash:torn", KindCheck, 1},
		{"l2_update", "crash:torn", OutcomePass, 10},
	}
	if got := a.Cells(); !slices.Equal(got, want) {
		t.Fatalf("cells %v, want %v", got, want)
	}
	if a.Len() != 3 || a.Total() != 12 || a.Count("l2_update", "crash:torn", OutcomePass) != 10 {
		t.Fatalf("len %d total %d", a.Len(), a.Total())
	}
	js, err := json.Marshal(&a)
	if err != nil {
		t.Fatal(err)
	}
	const wantJSON = `[{"event":"-","fault":"eio","outcome":"errors","count":1},{"event":"cow_write","fault":"crash:torn","outcome":"check","count":1},{"event":"l2_update","fault":"crash:torn","outcome":"pass","count":10}]`
	if string(js) != wantJSON {
		t.Fatalf("JSON %s\nwant %s", js, wantJSON)
	}
	var back Coverage
	if err := json.Unmarshal(js, &back); err != nil || !back.Equal(&a) || back.Equal(&b) {
		t.Fatalf("round trip: %v %v", back.Cells(), err)
	}
	var empty *Coverage
	if js, _ := json.Marshal(empty); string(js) != "null" {
		t.Fatalf("nil coverage: %s", js)
	}
	if js, _ := json.Marshal(&Coverage{}); string(js) != "[]" {
		t.Fatalf("empty coverage: %s", js)
	}
	for _, bad := range []string{
		`[{"event":"a","fault":"b","outcome":"c","count":-1}]`,
		`[{"event":"","fault":"b","outcome":"c","count":1}]`,
		`{"event":"a"}`,
	} {
		if err := json.Unmarshal([]byte(bad), &back); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
}

// labelTarget is the qcow writer with every workload call's file
// operations labelled by hand (test_write, test_zero, test_flush,
// test_close), as qcow.Options.Events labels them by writer event.
type labelTarget struct{}

func (labelTarget) Name() string      { return "test-labelled" }
func (labelTarget) Formats() []string { return Formats }
func (labelTarget) Open(fsys vfs.FS, name string, wt bool) (Writer, error) {
	// The writer sees fsys without its Label method, so that only the
	// labels below are set.
	w, err := qcow.Open(struct{ vfs.FS }{fsys}, name, &qcow.Options{ReadWrite: true, WriteThrough: wt})
	if err != nil {
		return nil, err
	}
	return labelWriter{w, fsys.(vfs.Labeler)}, nil
}

type labelWriter struct {
	Writer
	l vfs.Labeler
}

func (w labelWriter) WriteAt(p []byte, off int64) (int, error) {
	w.l.Label("test_write")
	return w.Writer.WriteAt(p, off)
}
func (w labelWriter) WriteZeroes(off, n int64) error {
	w.l.Label("test_zero")
	return w.Writer.WriteZeroes(off, n)
}
func (w labelWriter) Flush() error { w.l.Label("test_flush"); return w.Writer.Flush() }
func (w labelWriter) Close() error { w.l.Label("test_close"); return w.Writer.Close() }

var registerLabelTarget = sync.OnceFunc(func() { register(labelTarget{}) })

// TestRunCoverage: Run counts every state it checks under the crash time's
// event, the case's model and the state's outcome, and every injected
// fault under its event, its name and the case's outcome; Explore counts
// the same way, every state and every failure.
func TestRunCoverage(t *testing.T) {
	registerLabelTarget()
	ops := []Op{
		{Kind: OpWrite, Off: 0, Len: 4096, Pattern: 1}, {Kind: OpFlush},
		{Kind: OpWrite, Off: 5000, Len: 9000, Pattern: 2}, {Kind: OpZero, Off: 0, Len: 512},
		{Kind: OpWrite, Off: 30000, Len: 5000, Pattern: 4}, {Kind: OpFlush},
	}
	base := Case{Format: "v3", ClusterSize: 4096, Size: 64 << 10, Model: faultfs.Torn, StatesPerPoint: 4, Target: "test-labelled", Seed: 3}.WithTrace(ops)
	crash := CrashFault(faultfs.Torn)
	sumFault := func(cov *Coverage, fault string) (n int64, events map[string]bool, outcomes map[string]bool) {
		events, outcomes = map[string]bool{}, map[string]bool{}
		for _, c := range cov.Cells() {
			if c.Fault == fault {
				n += c.Count
				events[c.Event], outcomes[c.Outcome] = true, true
			}
		}
		return n, events, outcomes
	}

	v := Run(base)
	if !v.OK {
		t.Fatalf("%v", v.Failure)
	}
	n, events, outcomes := sumFault(v.Coverage, crash)
	if n != int64(v.States) || n != v.Coverage.Total() {
		t.Fatalf("crash cells count %d, states %d, total %d: %v", n, v.States, v.Coverage.Total(), v.Coverage.Cells())
	}
	for _, e := range []string{"test_write", "test_zero", "test_flush", "test_close", EventStart} {
		if !events[e] {
			t.Errorf("no crash state counted under event %s: %v", e, v.Coverage.Cells())
		}
	}
	if len(outcomes) != 1 || !outcomes[OutcomePass] {
		t.Errorf("outcomes %v of a passing case", outcomes)
	}

	// Injected faults: one cell count per fault, under the op's label.
	f := base
	f.Faults = `(rule (and (kind write) (randomly 0.3 9)) eio)`
	v = Run(f)
	if !v.OK || v.Faults == 0 {
		t.Fatalf("faults %d: %v", v.Faults, v.Failure)
	}
	n, events, _ = sumFault(v.Coverage, "eio")
	if n != int64(v.Faults) || !events["test_write"] {
		t.Fatalf("eio cells count %d, faults %d: %v", n, v.Faults, v.Coverage.Cells())
	}

	// A failing case: its failure counted once under its kind, and its
	// faults under the same outcome.
	broken := small("v3", faultfs.Torn, 12) // as in TestExploreMatchesRun
	broken.Target = TargetNoBarrier
	broken.Ops = max(broken.Ops, 6)
	broken.Faults = `(rule (and (kind write) (randomly 0.05 9)) eio)`
	v = Run(broken)
	if v.OK || v.Faults == 0 {
		t.Fatalf("the no-barrier target: faults %d, failure %v", v.Faults, v.Failure)
	}
	nfail := 0
	for _, c := range v.Coverage.Cells() {
		if c.Fault == crash && c.Outcome != OutcomePass {
			nfail++
			if c.Outcome != v.Failure.Kind || c.Count != 1 {
				t.Errorf("failure cell %+v, failure %v", c, v.Failure)
			}
		}
		if c.Fault == "eio" && c.Outcome != v.Failure.Kind {
			t.Errorf("fault cell %+v, failure %v", c, v.Failure)
		}
	}
	if nfail != 1 {
		t.Errorf("%d failure cells: %v", nfail, v.Coverage.Cells())
	}
	// Unlabelled file operations count under "-", crash point 0 under
	// "start".
	fops := []faultfs.Op{{Label: "a"}, {}}
	if got := []string{eventAt(fops, 0), eventAt(fops, 1), eventAt(fops, 2)}; !slices.Equal(got, []string{EventStart, "a", EventUnlabelled}) {
		t.Errorf("events %v", got)
	}

	// Explore: every state and every failure.
	ex, err := Explore(broken, ExploreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n, _, outcomes = sumFault(ex.Verdict.Coverage, crash)
	fails := int64(0)
	for _, c := range ex.Verdict.Coverage.Cells() {
		if c.Fault == crash && c.Outcome != OutcomePass {
			fails += c.Count
		}
	}
	// An ordering failure (the op log's, listed last) is no state's.
	nstate := len(ex.Failures)
	if nstate > 0 && ex.Failures[nstate-1].Kind == KindOrdering {
		nstate--
	}
	if n != int64(ex.Verdict.States) || fails != int64(nstate) || len(outcomes) < 2 {
		t.Fatalf("explore: %d counted of %d states, %d failures counted of %d", n, ex.Verdict.States, fails, nstate)
	}

	// A case that fails before any state: one cell.
	bad := base
	bad.Size = 1
	v = Run(bad)
	if cells := v.Coverage.Cells(); len(cells) != 1 || cells[0] != (Cell{EventUnlabelled, "none", KindSetup, 1}) {
		t.Fatalf("setup failure cells %v", cells)
	}
	if !strings.HasPrefix(CrashFault(faultfs.Prefix), "crash:") {
		t.Fatal(CrashFault(faultfs.Prefix))
	}
}
