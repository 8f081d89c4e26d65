package main

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestSoakSteerDeterministic: soak --steer draws the same cases whatever
// --workers (each from the coverage of the cases steerLag before it),
// other cases than without --steer, and every one reproduces by its ID.
func TestSoakSteerDeterministic(t *testing.T) {
	dir := t.TempDir()
	args := []string{"soak", "--cases", "14", "--seed", "0x57ee2", "--errors", "--formats", "v2,v3", "--models", "process,lose-unsynced,prefix", "--duration", "0", "-v", "--progress", "0"}
	a := execCLI(append(args, "--steer", "--workers", "1", "--summary", filepath.Join(dir, "a.json"))...)
	b := execCLI(append(args, "--steer", "--workers", "2")...)
	plain := execCLI(append(args, "--workers", "2")...)
	if a.code != 0 || b.code != 0 || plain.code != 0 {
		t.Fatalf("soak failed:\n%v\n%v\n%v", a, b, plain)
	}
	la, lb, lp := caseLines(a), caseLines(b), caseLines(plain)
	if len(la) != 14 || !slices.Equal(la, lb) {
		t.Fatalf("--steer with 1 and 2 workers: different cases:\n%s\n---\n%s", strings.Join(la, "\n"), strings.Join(lb, "\n"))
	}
	// The first steerLag cases are drawn before anything is learnt: the
	// unsteered ones; later ones differ.
	if slices.Equal(la, lp) {
		t.Fatal("--steer drew the same cases as no steering")
	}
	if s := readSummaryT(t, filepath.Join(dir, "a.json")); !s.Steer || s.Coverage.Len() == 0 {
		t.Fatalf("summary: steer %v, %d cells", s.Steer, s.Coverage.Len())
	}
	// A steered case replays by its ID.
	last := strings.Fields(la[len(la)-1])
	if r := execCLI("repro", last[2]); r.code != 0 {
		t.Fatalf("repro %s:\n%v", last[2], r)
	}
}
