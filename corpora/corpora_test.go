package corpora

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcowcrash/qcowcrash/harness"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
)

// TestCrashCorpus replays every corpus entry and checks its verdict: a
// "pass" entry must pass, an expected-to-fail entry must fail with exactly
// its expected kind.
func TestCrashCorpus(t *testing.T) {
	files, err := harness.LoadCorpus(".")
	if err != nil {
		t.Fatal(err)
	}
	groups := map[string]int{}
	for _, f := range files {
		groups[f.Group]++
		t.Run(f.Group+"/"+strings.TrimSuffix(filepath.Base(f.Path), ".json"), func(t *testing.T) {
			if f.Err != nil {
				t.Fatal(f.Err)
			}
			if f.Entry.Case.NeedsQemuImg() {
				qemutest.Require(t) // skips without qemu-img, fails under CI=true
			}
			start := time.Now()
			v, err := f.Entry.Run()
			if err != nil {
				t.Fatalf("%v\nrepro: crashtest repro %s", err, f.Path)
			}
			t.Logf("%s: expect %s: ok=%v points=%d states=%d failure=%v (%v)", f.Path, f.Entry.Expect, v.OK, v.Points, v.States, v.Failure, time.Since(start).Round(time.Millisecond))
			// Every finding of the historical writer has a known cause,
			// which soak and repro print: the target must recognise it.
			if f.Group == "kvmtool2011" && harness.Explain(v) == "" {
				t.Errorf("the kvmtool2011 target does not explain its failure %v", v.Failure)
			}
			if f.Entry.Case.Target == harness.TargetQCOW && harness.Explain(v) != "" {
				t.Errorf("the qcow target explains a failure: %q", harness.Explain(v))
			}
		})
	}
	for _, g := range []string{"qcow", "broken"} {
		if groups[g] == 0 {
			t.Errorf("the corpus has no %s entries: %v", g, groups)
		}
	}
}
