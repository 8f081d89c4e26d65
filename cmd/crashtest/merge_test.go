package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// readSummaryT reads a summary file written by soak or merge.
func readSummaryT(t *testing.T, path string) soakSummary {
	t.Helper()
	s, err := readSummary(path)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestMergeShardsEqualOneRun is the acceptance of coverage merging: soak
// shards 0/2 and 1/2 of N cases each, merged, give what one soak of 2N
// cases over the same seed gives: the same counts, failures, case indexes
// covered and coverage cells. Merge refuses summaries of other settings,
// naming the field, and overlapping or differently split shards.
func TestMergeShardsEqualOneRun(t *testing.T) {
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	// A broken target and fault plans, so that failures and faults are
	// merged too; no shrinking (which a deadline may cut short).
	args := []string{"soak", "--seed", "0x5eed", "--duration", "0", "--progress", "0", "--errors",
		"--target", "qcow-nobarrier", "--shrink-runs", "0", "--formats", "v2,v3"}
	soak := func(summary string, more ...string) {
		t.Helper()
		r := execCLI(append(append(args, "--summary", p(summary)), more...)...)
		if r.code > 1 || r.stderr != "" {
			t.Fatalf("soak %v:\n%v", more, r)
		}
	}
	const n = 5
	soak("a.json", "--shard", "0/2", "--cases", "5")
	soak("b.json", "--shard", "1/2", "--cases", "5", "--workers", "1")
	soak("all.json", "--cases", "10")
	r := execCLI("merge", "--json", "--summary", p("m.json"), p("a.json"), p("b.json"))
	if r.code > 1 || r.stderr != "" {
		t.Fatalf("merge:\n%v", r)
	}
	var out soakSummary
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("merge --json: %v\n%s", err, r.stdout)
	}
	m, all := readSummaryT(t, p("m.json")), readSummaryT(t, p("all.json"))
	if !reflect.DeepEqual(out, m) {
		t.Fatal("merge --json and --summary differ")
	}
	if m.Cases != 2*n || m.Cases != all.Cases || m.Points != all.Points || m.States != all.States {
		t.Fatalf("merged cases %d points %d states %d, one run %d %d %d", m.Cases, m.Points, m.States, all.Cases, all.Points, all.States)
	}
	if m.Shard != "0/1" || m.Covered != "0..9" || all.Covered != m.Covered || len(m.Runs) != 2 {
		t.Fatalf("merged shard %q covered %q runs %v; one run covered %q", m.Shard, m.Covered, m.Runs, all.Covered)
	}
	if len(all.Failures) == 0 || !reflect.DeepEqual(m.Failures, all.Failures) {
		t.Fatalf("merged failures %v, one run %v", m.Failures, all.Failures)
	}
	if all.Coverage.Len() < 5 || !m.Coverage.Equal(all.Coverage) {
		t.Fatalf("merged coverage %v\none run %v", m.Coverage.Cells(), all.Coverage.Cells())
	}
	a := readSummaryT(t, p("a.json"))
	if a.Covered != "0/2:5" || a.Shard != "0/2" || a.Coverage.Equal(m.Coverage) {
		t.Fatalf("shard 0/2: covered %q shard %q", a.Covered, a.Shard)
	}
	t.Logf("merged: %d cases, %d states, %d failures, %d coverage cells", m.Cases, m.States, len(m.Failures), m.Coverage.Len())

	// The text report: the summary line and the coverage table.
	r = execCLI("merge", p("a.json"), p("b.json"))
	for _, want := range []string{"merged summary: seed=0x5eed shard=0/1 target=qcow-nobarrier cases=10 ", "covered case indexes 0..9", "coverage: ", "crash:"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("merge output lacks %q:\n%v", want, r)
		}
	}
	// A merged summary merges again.
	if r := execCLI("merge", "--json", p("m.json")); r.code > 1 || !strings.Contains(r.stdout, `"covered": "0..9"`) {
		t.Errorf("merge of a merged summary:\n%v", r)
	}

	// Refusals.
	raw, err := os.ReadFile(p("b.json"))
	if err != nil {
		t.Fatal(err)
	}
	edit := func(name, from, to string) string {
		s := string(raw)
		if !strings.Contains(s, from) {
			t.Fatalf("b.json lacks %q", from)
		}
		if err := os.WriteFile(p(name), []byte(strings.Replace(s, from, to, 1)), 0o644); err != nil {
			t.Fatal(err)
		}
		return p(name)
	}
	qemuOn, qemuOff := `"qemu": true`, `"qemu": false`
	if !strings.Contains(string(raw), qemuOn) {
		qemuOn, qemuOff = qemuOff, qemuOn
	}
	for _, x := range []struct{ file, want string }{
		{edit("seed.json", `"seed": "0x5eed"`, `"seed": "0x5eee"`), `seed "0x5eee" differs`},
		{edit("target.json", `"target": "qcow-nobarrier"`, `"target": "qcow"`), `target "qcow" differs`},
		{edit("errors.json", `"errors": true`, `"errors": false`), `errors "false" differs`},
		{edit("models.json", `"models": [`, `"models": ["garbage",`), `models "garbage,`},
		{edit("formats.json", `"v2",`, ``), `formats "v3" differs`},
		{edit("maxstates.json", `"max_states": -1`, `"max_states": 0`), `max_states "0" differs`},
		{edit("qemu.json", qemuOn, qemuOff), `qemu "` + qemuOff[8:] + `" differs`},
		{edit("split.json", `"shard": "1/2",`+"\n      \"cases\"", `"shard": "1/3",`+"\n      \"cases\""), "not of the split into 2 shards"},
		{p("a.json"), "also ran in"},
		{edit("runs.json", `"cases": 5,`, `"cases": 6,`), "cases 6, but its runs hold 5"},
		{edit("nosummary.json", string(raw), `{"cases": 1}`), "not a soak summary"},
		{edit("notjson.json", string(raw), `[1]`), "not a soak summary"},
	} {
		r := execCLI("merge", p("a.json"), x.file)
		wantOneLineError(t, r, x.want)
	}
	wantOneLineError(t, execCLI("merge"), "no SUMMARY")
}
