package harness

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

func TestEntrySaveLoadCheck(t *testing.T) {
	dir := t.TempDir()
	c := small("v3", faultfs.Torn, 4).AsTrace()
	c.Faults = "(rule (index 9) eio)"
	e := Entry{Name: "round-trip", Case: c, Expect: ExpectPass, Explanation: "a test"}
	path, err := SaveEntry(filepath.Join(dir, "g"), e)
	if err != nil {
		t.Fatal(err)
	}
	back, err := LoadEntry(path)
	if err != nil {
		t.Fatal(err)
	}
	e.ID = c.ID()
	if !reflect.DeepEqual(back, e) {
		t.Fatalf("loaded %+v, saved %+v", back, e)
	}
	files, err := LoadCorpus(dir)
	if err != nil || len(files) != 1 || files[0].Group != "g" || files[0].Err != nil {
		t.Fatalf("LoadCorpus: %+v, %v", files, err)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "g", ".*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}

	pass := Verdict{OK: true, States: 3}
	fail := Verdict{Failure: &Failure{Kind: KindCheck}}
	for _, tc := range []struct {
		expect string
		v      Verdict
		ok     bool
	}{
		{ExpectPass, pass, true},
		{ExpectPass, fail, false},
		{KindCheck, fail, true},
		{KindCheck, pass, false},
		{KindDurability, fail, false},
	} {
		e := Entry{Name: "x", Expect: tc.expect}
		if err := e.Check(tc.v); (err == nil) != tc.ok {
			t.Errorf("expect %s, verdict ok=%v: Check = %v", tc.expect, tc.v.OK, err)
		}
	}

	for _, tc := range []struct {
		name, body, want string
	}{
		{"bad-expect", `{"name":"bad-expect","case":` + mustJSON(t, c) + `,"expect":"maybe"}`, "expect"},
		{"unknown", `{"name":"unknown","case":` + mustJSON(t, c) + `,"expect":"pass","extra":1}`, "unknown field"},
		{"other", `{"name":"mismatch","case":` + mustJSON(t, c) + `,"expect":"pass"}`, "file name"},
		{"bad-case", `{"name":"bad-case","case":{"version":"c2","model":"torn","format":"v3"},"expect":"pass"}`, "invalid case"},
	} {
		p := filepath.Join(dir, tc.name+".json")
		os.WriteFile(p, []byte(tc.body), 0o644)
		if _, err := LoadEntry(p); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("LoadEntry(%s) = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	if _, err := SaveEntry(dir, Entry{Name: "../escape", Case: c, Expect: ExpectPass}); err == nil {
		t.Error("SaveEntry accepted the name ../escape")
	}
}

func mustJSON(t *testing.T, c Case) string {
	t.Helper()
	b, err := c.MarshalJSON()
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestExploreMatchesRun: Explore stopping at the first failure gives Run's
// verdict; without stopping it finds every failure, with per-point counts
// that add up; Inspect finds the failing state and explains it.
func TestExploreMatchesRun(t *testing.T) {
	broken := small("v3", faultfs.Torn, 12)
	broken.Target = TargetNoBarrier
	broken.Ops = max(broken.Ops, 6)
	for _, c := range []Case{small("v2", faultfs.Reorder, 2), broken} {
		v := Run(c)
		ex, err := Explore(c, ExploreOptions{StopAtFailure: true})
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(ex.Verdict, v) {
			t.Fatalf("%s: Explore verdict %+v, Run %+v", c.ID(), ex.Verdict, v)
		}
		all, err := Explore(c, ExploreOptions{})
		if err != nil {
			t.Fatal(err)
		}
		n, nf := 0, 0
		for _, p := range all.Points {
			n += p.States
			nf += p.Failures
		}
		// An ordering failure is the op log's, listed last, at no point.
		if k := len(all.Failures); k > 0 && all.Failures[k-1].Kind == KindOrdering {
			nf++
		}
		if n != all.Verdict.States || nf != len(all.Failures) || len(all.Points) != all.Verdict.Points {
			t.Fatalf("%s: points add to %d states, %d failures; verdict %d states, %d failures", c.ID(), n, nf, all.Verdict.States, len(all.Failures))
		}
		if v.OK {
			continue
		}
		if len(all.Failures) < 2 || *all.Failures[0] != *v.Failure {
			t.Fatalf("%s: %d failures, first %v, want Run's %v first", c.ID(), len(all.Failures), all.Failures[0], v.Failure)
		}
		in, err := Inspect(c, v.Failure)
		if err != nil {
			t.Fatal(err)
		}
		if len(in.Pending) == 0 {
			t.Errorf("%s: no pending writes at the failing point (qcow-nobarrier never syncs)", c.ID())
		}
		if v.Failure.Sector >= 0 && (len(in.Sectors) == 0 || in.Sectors[0].Sector != v.Failure.Sector) {
			t.Errorf("%s: inspected sectors %+v, failure at sector %d", c.ID(), in.Sectors, v.Failure.Sector)
		}
		t.Logf("%s: %v; %d pending writes, %d findings, %d sectors", c.ID(), v.Failure, len(in.Pending), len(in.Findings), len(in.Sectors))
	}
}
