package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/harness"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
)

var shrunkRE = regexp.MustCompile(`shrunk from (\d+) to (\d+) ops: crashtest repro (\S+)`)

// TestSoakOutShrinkSaveRepro walks the worked example of docs/worked-example.md: a
// soak against a broken target fails; every failure is shrunk and written
// to --out as a corpus entry and a report; repro of the printed ID
// reproduces the verdict and the first differing sector; repro --shrink
// and --save make an entry that repro FILE and the corpus check accept.
func TestSoakOutShrinkSaveRepro(t *testing.T) {
	out := t.TempDir()
	r := execCLI("soak", "--target", "qcow-nobarrier", "--models", "torn", "--cases", "2", "--seed", "7", "--workers", "1", "--out", out, "--progress", "0")
	if r.code != 1 {
		t.Fatalf("soak against qcow-nobarrier: exit %d, want 1:\n%v", r.code, r)
	}
	m := shrunkRE.FindStringSubmatch(r.stdout)
	if m == nil {
		t.Fatalf("no shrunk case printed:\n%v", r)
	}
	from, _ := strconv.Atoi(m[1])
	to, _ := strconv.Atoi(m[2])
	t.Logf("soak shrank a failure from %d to %d ops: %s", from, to, m[3])
	if to >= from || !strings.HasPrefix(m[3], "c2:") {
		t.Fatalf("shrunk %d -> %d ops, ID %s", from, to, m[3])
	}
	entries, _ := filepath.Glob(filepath.Join(out, "*.json"))
	reports, _ := filepath.Glob(filepath.Join(out, "*.txt"))
	_, _, failures := soakCounts(t, r)
	if len(entries) != failures || len(reports) != failures || failures == 0 {
		t.Fatalf("%d failures but %d entries and %d reports in --out", failures, len(entries), len(reports))
	}
	e, err := harness.LoadEntry(entries[0])
	if err != nil {
		t.Fatal(err)
	}
	if v, err := e.Run(); err != nil || e.Expect == harness.ExpectPass || !e.Case.Explicit {
		t.Fatalf("entry %s (expect %s): %v %v", e.Name, e.Expect, v.Failure, err)
	}
	rep, _ := os.ReadFile(reports[0])
	if !strings.Contains(string(rep), "repro: crashtest repro c1:") || !strings.Contains(string(rep), "corpus entry: ") {
		t.Errorf("report:\n%s", rep)
	}

	// The shrunk ID reproduces the same failure from the command line, and
	// repro -v shows the pending writes, findings and differing sectors.
	rp := execCLI("repro", "-v", m[3])
	if rp.code != 1 || !strings.Contains(rp.stdout, "FAIL ") || !strings.Contains(rp.stdout, "pending (not yet synced) writes") ||
		!strings.Contains(rp.stdout, "checker findings on the crash state") || !strings.Contains(rp.stdout, " event=") {
		t.Fatalf("repro -v of the shrunk case:\n%v", rp)
	}
	if strings.Contains(rp.stdout, "FAIL durability") || strings.Contains(rp.stdout, "FAIL content") {
		if !strings.Contains(rp.stdout, "first differing sectors") || !strings.Contains(rp.stdout, "    expected ") || !strings.Contains(rp.stdout, "    got      ") {
			t.Errorf("repro -v does not show the differing sectors in hex:\n%v", rp)
		}
	}

	// repro --shrink --save of the original case; then repro FILE.
	orig := reproRE.FindStringSubmatch(r.stdout)[1]
	dir := t.TempDir()
	sv := execCLI("repro", "--shrink", "--save", dir, "--name", "nobarrier-example", orig)
	if sv.code != 1 || !strings.Contains(sv.stdout, "shrunk "+orig) || !strings.Contains(sv.stdout, "saved corpus entry ") {
		t.Fatalf("repro --shrink --save:\n%v", sv)
	}
	file := filepath.Join(dir, "nobarrier-example.json")
	fr := execCLI("repro", file)
	if fr.code != 0 || !strings.Contains(fr.stdout, "corpus entry nobarrier-example: expect ") || !strings.Contains(fr.stdout, ": met") {
		t.Fatalf("repro of the saved entry:\n%v", fr)
	}
	// "Fixing" the target: the same entry against the real writer passes
	// once its expectation says so.
	e, err = harness.LoadEntry(file)
	if err != nil {
		t.Fatal(err)
	}
	e.Case.Target, e.Expect = harness.TargetQCOW, harness.ExpectPass
	if _, err := harness.SaveEntry(dir, e); err != nil {
		t.Fatal(err)
	}
	if fr := execCLI("repro", file); fr.code != 0 || !strings.Contains(fr.stdout, "PASS") {
		t.Fatalf("repro of the fixed entry:\n%v", fr)
	}
	// Without --shrink, --save still stores a trace with the same verdict.
	plain := execCLI("repro", "--save", dir, "--name", "unshrunk", orig)
	e, err = harness.LoadEntry(filepath.Join(dir, "unshrunk.json"))
	if plain.code != 1 || err != nil || !e.Case.Explicit || e.Case.Ops != sv0ops(t, orig) {
		t.Fatalf("repro --save without --shrink: %v %+v\n%v", err, e.Case, plain)
	}
	if _, err := e.Run(); err != nil {
		t.Fatal(err)
	}
}

// sv0ops returns the op count of a case ID.
func sv0ops(t *testing.T, id string) int {
	t.Helper()
	cs, err := harness.ParseID(id)
	if err != nil {
		t.Fatal(err)
	}
	return cs.Ops
}

// TestSoakShardDeterministic: the same seed and shard run the same cases
// with the same counts twice.
func TestSoakShardDeterministic(t *testing.T) {
	args := []string{"soak", "--cases", "3", "--seed", "0x5eed", "--shard", "2/5", "--formats", "v2,v3", "--models", "torn", "--workers", "2", "-v", "--progress", "0"}
	a, b := execCLI(args...), execCLI(args...)
	if a.code != 0 || b.code != 0 {
		t.Fatalf("soak failed:\n%v\n%v", a, b)
	}
	la, lb := caseLines(a), caseLines(b)
	if len(la) != 3 || !slices.Equal(la, lb) {
		t.Fatalf("same seed and shard, different cases:\n%s\n---\n%s", strings.Join(la, "\n"), strings.Join(lb, "\n"))
	}
	for i, want := range []string{"case 12: ", "case 2: ", "case 7: "} { // k = 2 + 5j, sorted as text
		if !strings.HasPrefix(la[i], want) {
			t.Errorf("shard 2/5 ran %q, want %q...", la[i], want)
		}
	}
	ca, sa, fa := soakCounts(t, a)
	cb, sb, fb := soakCounts(t, b)
	if ca != cb || sa != sb || fa != fb || sa == 0 {
		t.Fatalf("counts differ: cases %d/%d states %d/%d failures %d/%d", ca, cb, sa, sb, fa, fb)
	}
}

// TestSoakErrorsAndOSFiles: soak --errors passes against our writer, with
// fault plans in the case IDs; --fs os:DIR gives the same counts as the
// in-memory run and leaves nothing behind; without a terminal the
// progress lines are plain lines.
func TestSoakErrorsAndOSFiles(t *testing.T) {
	r := execCLI("soak", "--errors", "--cases", "4", "--seed", "3", "--workers", "2", "--json", "--progress", "0")
	var sum soakSummary
	if err := json.Unmarshal([]byte(r.stdout), &sum); err != nil || r.code != 0 || !sum.Errors || sum.Cases != 4 {
		t.Fatalf("soak --errors: %v\n%v", err, r)
	}
	v := execCLI("soak", "--errors", "--cases", "2", "--seed", "3", "--workers", "1", "-v", "--progress", "0")
	for _, l := range caseLines(v) {
		if !strings.Contains(l, ":f=") {
			t.Errorf("--errors case without a fault plan: %s", l)
		}
	}
	dir := t.TempDir()
	args := []string{"soak", "--cases", "3", "--seed", "11", "--workers", "2", "--progress", "0"}
	mem := execCLI(args...)
	osr := execCLI(append(args, "--fs", "os:"+dir)...)
	cm, sm, fm := soakCounts(t, mem)
	co, so, fo := soakCounts(t, osr)
	if mem.code != 0 || osr.code != 0 || cm != co || sm != so || fm != fo {
		t.Fatalf("--fs os: counts %d/%d/%d, in memory %d/%d/%d\n%v\n%v", co, so, fo, cm, sm, fm, osr, mem)
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("--fs os:%s left %d entries behind", dir, len(left))
	}
	p := execCLI("soak", "--duration", "1500ms", "--seed", "1", "--workers", "1", "--progress", "300ms")
	if p.code != 0 || !regexp.MustCompile(`(?m)^soak: \d+ cases, \d+ states, \d+ states/s, 0 failures, \d+s left$`).MatchString(p.stderr) ||
		strings.Contains(p.stderr, "\r") {
		t.Fatalf("no plain progress lines on a non-terminal:\n%v", p)
	}
}

// TestExportQemuCheck: every crash state repro exports is valid input for
// qemu-img: `qemu-img check` finds no corruption (leaks are allowed after
// a crash; for QCOW version 1, which qemu-img cannot check, `qemu-img
// convert` reads it through), and at the last crash point (after the close)
// `qemu-img compare` finds the image equal to the model's expected raw
// image.
func TestExportQemuCheck(t *testing.T) {
	qemutest.Require(t)
	for _, tc := range []struct {
		name, format string
		model        faultfs.Model
	}{
		{"v1-backing", "v1", faultfs.Torn}, {"v2", "v2", faultfs.Reorder}, {"v3-backing", "v3", faultfs.Torn}, {"v3", "v3", faultfs.Prefix},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cs := harness.Generate(harness.CaseSeed(21, 0), harness.Space{Formats: []string{tc.format}, MaxOps: 8})
			cs.Backing = strings.HasSuffix(tc.name, "backing")
			cs.Model = tc.model
			cs.StatesPerPoint = 2
			dir := t.TempDir()
			r := execCLI("repro", "--export", dir, cs.ID())
			if r.code != 0 || !strings.Contains(r.stdout, "PASS") {
				t.Fatalf("repro --export:\n%v", r)
			}
			ext := ".qcow2"
			if tc.format == "v1" {
				ext = ".qcow"
			}
			imgs, _ := filepath.Glob(filepath.Join(dir, "*"+ext))
			if len(imgs) < 5 {
				t.Fatalf("%d images exported", len(imgs))
			}
			if _, err := os.Stat(filepath.Join(dir, "base.raw")); cs.Backing && err != nil {
				t.Fatalf("no backing file beside the images: %v", err)
			}
			codes := map[int]int{}
			for _, img := range imgs {
				if tc.format == "v1" {
					// qemu-img check does not check QCOW version 1 (exit
					// 63): qemu must read every state through instead.
					code, out := qemutest.RunImg(t, "convert", "-f", "qcow", "-O", "raw", img, filepath.Join(t.TempDir(), "raw"))
					codes[code]++
					if code != 0 {
						t.Fatalf("qemu-img convert %s: exit %d:\n%s\nrepro: crashtest repro -v %s", img, code, out, cs.ID())
					}
					continue
				}
				code, out := qemutest.Check(t, img)
				codes[code]++
				if code != 0 && code != 3 {
					t.Fatalf("qemu-img check %s: exit %d:\n%s\nrepro: crashtest repro -v %s", img, code, out, cs.ID())
				}
			}
			slices.Sort(imgs)
			last := imgs[len(imgs)-1]
			exp := filepath.Join(dir, strings.Split(filepath.Base(last), "-")[0]+".expected.raw")
			if code, out := qemutest.RunImg(t, "compare", "-F", "raw", last, exp); code != 0 {
				t.Fatalf("qemu-img compare %s %s: exit %d:\n%s", last, exp, code, out)
			}
			t.Logf("%s: %d crash states exported; qemu-img check exit codes %v", cs.ID(), len(imgs), codes)
		})
	}
	// The check can fail: among the exported states of the broken target
	// (which the harness's own checker finds corrupt) qemu-img finds
	// corruption too.
	t.Run("broken", func(t *testing.T) {
		dir := t.TempDir()
		id := "c2:v3:cs=512:sz=98304:b=0:m=torn:wt=0:ops=w0+512.1,f,w64836+1500.2,z300+100,f:spp=64:t=qcow-nobarrier:seed=0x1"
		r := execCLI("explore", "--workload", filepath.Join("..", "..", "corpora", "broken", "qcow-nobarrier-new-l2-torn.json"), "--max-states", "60", "--export", dir)
		if r.code != 1 || !strings.Contains(r.stdout, "FAIL check") {
			t.Fatalf("explore of %s:\n%v", id, r)
		}
		imgs, _ := filepath.Glob(filepath.Join(dir, "*.qcow2"))
		codes := map[int]int{}
		for _, img := range imgs {
			code, _ := qemutest.Check(t, img)
			codes[code]++
		}
		if codes[2] == 0 {
			t.Fatalf("qemu-img check found no corruption in %d states of the broken target: exit codes %v", len(imgs), codes)
		}
		t.Logf("broken target: %d states, qemu-img check exit codes %v", len(imgs), codes)
	})
}

// TestExplore: counts per crash point from an ops file, failures of a
// broken target with exit 1, --max-states, --json, and usage errors.
func TestExplore(t *testing.T) {
	ops := filepath.Join(t.TempDir(), "ops.txt")
	os.WriteFile(ops, []byte("# first cluster, then a new L2 table\nwrite 0 512\nflush\nwrite 0xfd44 1500 7\nzero 300 100\nflush\n"), 0o644)
	r := execCLI("explore", "--workload", ops, "--format", "v2", "--cluster-size", "512", "--size", "98304")
	m := regexp.MustCompile(`explore summary: points=(\d+) states=(\d+) failures=0`).FindStringSubmatch(r.stdout)
	if r.code != 0 || m == nil || !strings.Contains(r.stdout, ":ops=w0+512.2,f,w64836+1500.7,z300+100,f:") {
		t.Fatalf("explore of an ops file:\n%v", r)
	}
	if m[2] != "637" { // the exhaustive torn state count of this workload, plus the last point judged again after the Close
		t.Errorf("explored %s states, want 637:\n%s", m[2], r.stdout)
	}
	bad := execCLI("explore", "--workload", ops, "--format", "v2", "--cluster-size", "512", "--size", "98304", "--target", "qcow-nobarrier", "--max-states", "100", "--json")
	var out exploreOutput
	if err := json.Unmarshal([]byte(bad.stdout), &out); err != nil || bad.code != 1 {
		t.Fatalf("explore of a broken target: %v\n%v", err, bad)
	}
	if !out.Truncated || out.Verdict.States != 100 || len(out.Failures) < 2 || out.Verdict.OK {
		t.Fatalf("explore --max-states 100 of a broken target: truncated=%v states=%d failures=%d", out.Truncated, out.Verdict.States, len(out.Failures))
	}
	sum := 0
	for _, p := range out.Points {
		sum += p.States
	}
	if sum != out.Verdict.States {
		t.Errorf("points add up to %d states, verdict says %d", sum, out.Verdict.States)
	}
	if s := execCLI("explore", "--seed", "9", "--format", "v1", "--model", "lose-unsynced"); s.code != 0 || !strings.Contains(s.stdout, ":v1:") || !strings.Contains(s.stdout, "m=lose-unsynced") || !regexp.MustCompile(`:seed=0x9(:\S+)?\n`).MatchString(s.stdout) {
		t.Fatalf("explore --seed:\n%v", s)
	}
	if s := execCLI("explore", "--model", "process"); s.code != 0 || !regexp.MustCompile(`case: c1:v3:.*:seed=0x[0-9a-f]+(:\S+)?\n`).MatchString(s.stdout) {
		t.Fatalf("explore with no workload (a random seed):\n%v", s)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"explore", "--seed", "1", "--workload", ops}, "not both"},
		{[]string{"explore", "--seed", "1", "--states-per-point", "0"}, "states-per-point"},
		{[]string{"explore", "--seed", "1", "--model", "wobbly"}, "wobbly"},
		{[]string{"explore", "--workload", "/nonexistent"}, "nonexistent"},
		{[]string{"explore", "--workload", ops, "--size", "1000"}, "size"},
		{[]string{"repro", "--fs", "os:/nonexistent", "c1:v3"}, "nonexistent"},
		{[]string{"repro", "nosuchcase"}, "neither a case ID"},
		{[]string{"soak", "--fs", "disk"}, "mem or os:DIR"},
	} {
		wantOneLineError(t, execCLI(tc.args...), tc.want)
	}
}
