package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/harness"
)

// repro of a corpus entry prints the entry's explanation after whether
// its expectation was met (text), or as "explanation" (--json); a bare
// case ID has no explanation to print.
func TestReproPrintsExplanation(t *testing.T) {
	const path = "../../corpora/kvmtool2011/v2-no-refcounts.json"
	e, err := harness.LoadEntry(path)
	if err != nil {
		t.Fatal(err)
	}
	if e.Explanation == "" {
		t.Fatalf("%s has no explanation", path)
	}
	noWhy := filepath.Join(t.TempDir(), "v2-no-refcounts.json")
	e2 := e
	e2.Explanation = ""
	b, err := harness.MarshalEntry(e2)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(noWhy, b, 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		args    []string
		wantWhy bool
	}{
		{"entry", []string{"repro", path}, true},
		{"entry without explanation", []string{"repro", noWhy}, false},
		{"case ID", []string{"repro", e.Case.ID()}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := execCLI(tc.args...)
			if r.code != 0 && r.code != 1 {
				t.Fatalf("%v", r)
			}
			line := "  why: " + e.Explanation + "\n"
			if got := strings.Contains(r.stdout, line); got != tc.wantWhy {
				t.Fatalf("explanation printed=%v, want %v:\n%v", got, tc.wantWhy, r)
			}
			r = execCLI(append([]string{"repro", "--json"}, tc.args[1:]...)...)
			var out struct {
				Explanation string `json:"explanation"`
			}
			if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
				t.Fatalf("--json: %v\n%v", err, r)
			}
			if got := out.Explanation == e.Explanation; got != tc.wantWhy {
				t.Fatalf("--json explanation %q, want it present=%v", out.Explanation, tc.wantWhy)
			}
		})
	}
}
