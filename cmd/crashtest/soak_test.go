package main

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/harness"
)

var summaryRE = regexp.MustCompile(`soak summary: seed=(\S+) shard=(\S+) target=(\S+) cases=(\d+) points=(\d+) states=(\d+) elapsed=\S+ states/s=\d+ failures=(\d+)`)

// soakCounts parses the summary line of a text soak: cases, states and
// failures.
func soakCounts(t *testing.T, r cliResult) (cases, states, failures int) {
	t.Helper()
	m := summaryRE.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("no summary line:\n%v", r)
	}
	atoi := func(s string) int { n, _ := strconv.Atoi(s); return n }
	return atoi(m[4]), atoi(m[6]), atoi(m[7])
}

func TestSoakSummary(t *testing.T) {
	// --cases 5 bounds the run on fast machines too, so the cases checked
	// are always among the first five of seed 1.
	r := execCLI("soak", "--duration", "3s", "--cases", "5", "--seed", "1", "--workers", "1")
	if r.code != 0 {
		t.Fatalf("soak failed:\n%v", r)
	}
	cases, states, failures := soakCounts(t, r)
	if cases < 1 || states < cases || failures != 0 {
		t.Fatalf("cases=%d states=%d failures=%d:\n%v", cases, states, failures, r)
	}
	if !strings.Contains(r.stdout, "seed=0x1 ") {
		t.Errorf("summary does not print the seed:\n%v", r)
	}
	t.Logf("%s", strings.TrimSpace(r.stdout))
}

// caseLines returns the -v lines of a soak run, sorted.
func caseLines(r cliResult) []string {
	var out []string
	for _, l := range strings.Split(r.stderr, "\n") {
		if strings.HasPrefix(l, "case ") {
			out = append(out, l)
		}
	}
	slices.Sort(out)
	return out
}

func TestSoakDeterministic(t *testing.T) {
	args := []string{"soak", "--cases", "3", "--seed", "0x77", "--formats", "v1,v3", "--models", "process,lose-unsynced", "--duration", "0", "-v", "--progress", "0"}
	a := execCLI(append(args, "--workers", "1")...)
	b := execCLI(append(args, "--workers", "2")...)
	// The verdicts may fail (the writer is under test); they must agree.
	if a.code != b.code || a.code > 1 {
		t.Fatalf("exit codes %d and %d:\n%v\n%v", a.code, b.code, a, b)
	}
	la, lb := caseLines(a), caseLines(b)
	if len(la) != 3 || !slices.Equal(la, lb) {
		t.Fatalf("same seed, different cases:\n%s\n---\n%s", strings.Join(la, "\n"), strings.Join(lb, "\n"))
	}
	ca, sa, fa := soakCounts(t, a)
	cb, sb, fb := soakCounts(t, b)
	if ca != 3 || ca != cb || sa != sb || fa != fb {
		t.Fatalf("counts differ: cases %d/%d states %d/%d failures %d/%d", ca, cb, sa, sb, fa, fb)
	}
	for _, l := range la {
		if !strings.Contains(l, ":v1:") && !strings.Contains(l, ":v3:") {
			t.Errorf("case outside --formats v1,v3: %s", l)
		}
	}
	// Another seed gives other cases.
	c := execCLI("soak", "--cases", "3", "--seed", "0x78", "--formats", "v1,v3", "--models", "process,lose-unsynced", "-v", "--progress", "0")
	if slices.Equal(caseLines(c), la) {
		t.Fatal("seeds 0x77 and 0x78 give the same cases")
	}
	// Shards are disjoint and cover the seed space: shard 1/2 runs the odd
	// cases, and they are the cases seed 0x77 runs there.
	s := execCLI("soak", "--cases", "1", "--seed", "0x77", "--formats", "v1,v3", "--models", "process,lose-unsynced", "--shard", "1/2", "-v", "--progress", "0")
	ls := caseLines(s)
	if len(ls) != 1 || !strings.HasPrefix(ls[0], "case 1: ") {
		t.Fatalf("shard 1/2 ran %q, want case 1", ls)
	}
	for _, l := range la {
		if strings.HasPrefix(l, "case 1: ") && l != ls[0] {
			t.Fatalf("case 1 differs between the shard and the full run:\n%s\n%s", l, ls[0])
		}
	}
}

var reproRE = regexp.MustCompile(`repro: crashtest repro (\S+)`)

func TestSoakBrokenTargetAndRepro(t *testing.T) {
	r := execCLI("soak", "--target", "qcow-nobarrier", "--models", "torn", "--cases", "2", "--seed", "1", "--duration", "0", "--workers", "1", "--json")
	if r.code != 1 {
		t.Fatalf("soak against qcow-nobarrier: exit %d, want 1:\n%v", r.code, r)
	}
	var sum soakSummary
	if err := json.Unmarshal([]byte(r.stdout), &sum); err != nil {
		t.Fatalf("--json summary: %v\n%v", err, r)
	}
	if len(sum.Failures) == 0 || sum.Cases != 2 || sum.States == 0 || sum.Target != harness.TargetNoBarrier {
		t.Fatalf("summary %+v", sum)
	}
	f := sum.Failures[0]
	t.Logf("soak found: %s: %v", f.ID, f.Failure)
	if f.Repro != "crashtest repro "+f.ID {
		t.Errorf("repro command %q", f.Repro)
	}

	// The text form prints the same failure with its repro command.
	txt := execCLI("soak", "--target", "qcow-nobarrier", "--models", "torn", "--cases", "2", "--seed", "1", "--duration", "0", "--workers", "2")
	m := reproRE.FindStringSubmatch(txt.stdout)
	if txt.code != 1 || m == nil || m[1] != f.ID {
		t.Fatalf("text soak does not print the repro of %s:\n%v", f.ID, txt)
	}

	rp := execCLI("repro", "-v", m[1])
	if rp.code != 1 {
		t.Fatalf("repro %s: exit %d, want 1:\n%v", m[1], rp.code, rp)
	}
	if !strings.Contains(rp.stdout, "FAIL "+f.Failure.String()) {
		t.Fatalf("repro does not reproduce %q:\n%v", f.Failure, rp)
	}
	if !strings.Contains(rp.stdout, "<- crash point") || !strings.Contains(rp.stdout, "op   0: file ops [") ||
		!strings.Contains(rp.stdout, "---- crash ----") {
		t.Errorf("repro -v does not list the ops and the file operations around the crash:\n%v", rp)
	}
	if f.Failure.Sector >= 0 && !strings.Contains(rp.stdout, fmt.Sprintf("sector %d (offset %d): byte ", f.Failure.Sector, f.Failure.Sector*512)) {
		t.Errorf("repro does not show the first differing sector:\n%v", rp)
	}
	js := execCLI("repro", "--json", m[1])
	var v harness.Verdict
	if err := json.Unmarshal([]byte(js.stdout), &v); err != nil || js.code != 1 {
		t.Fatalf("repro --json: exit %d, %v\n%v", js.code, err, js)
	}
	if v.Failure == nil || *v.Failure != *f.Failure || v.Case.ID() != f.ID {
		t.Fatalf("repro verdict %+v, soak failure %+v", v.Failure, f.Failure)
	}

	// The same case against the real writer passes.
	good := strings.Replace(m[1], ":t=qcow-nobarrier:", ":t=qcow:", 1)
	gp := execCLI("repro", good)
	if gp.code != 0 || !strings.Contains(gp.stdout, "PASS") {
		t.Fatalf("repro %s against qcow:\n%v", good, gp)
	}
}

func TestSoakAndReproUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"soak", "--shard", "2/2"}, "shard"},
		{[]string{"soak", "--shard", "x"}, "shard"},
		{[]string{"soak", "--formats", "v1,v4"}, "v4"},
		{[]string{"soak", "--models", "torn,wobbly"}, "wobbly"},
		{[]string{"soak", "--target", "ext4"}, "ext4"},
		{[]string{"soak", "--target", "qcow,qcow-nobarrier"}, "one target"},
		{[]string{"soak", "--workers", "0"}, "workers"},
		{[]string{"soak", "--seed", "-1"}, "seed"},
		{[]string{"soak", "extra"}, "extra"},
		{[]string{"repro"}, "CASE-ID"},
		{[]string{"repro", "a", "b"}, "CASE-ID"},
		{[]string{"repro", "c1:v9:cs=1"}, "repro"},
	} {
		wantOneLineError(t, execCLI(tc.args...), tc.want)
	}
}
