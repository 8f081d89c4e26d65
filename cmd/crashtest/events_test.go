package main

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/harness"
)

// TestExploreEvents: explore --events prints the 026-style table for our
// writer (no bad cell, exit 0), the same as JSON, and exits 1 with the bad
// cells and their repro IDs for a writer that drops its barriers.
func TestExploreEvents(t *testing.T) {
	r := execCLI("explore", "--events", "--event-workloads", "026-l2_update", "--quick")
	if r.code != 0 || !strings.Contains(r.stdout, "event matrix (qemu iotest 026): target qcow, 1 workloads") ||
		!strings.Contains(r.stdout, "workload 026-l2_update:") || !strings.Contains(r.stdout, "  l2_update ") ||
		!strings.Contains(r.stdout, "not reached: ") || !strings.Contains(r.stdout, " bad=0") {
		t.Fatalf("explore --events:\n%v", r)
	}
	j := execCLI("explore", "--events", "--event-workloads", "026-l2_update", "--quick", "--json")
	var out eventsOutput
	if j.code != 0 || json.Unmarshal([]byte(j.stdout), &out) != nil || len(out.Rows) == 0 || out.Bad != 0 ||
		out.Summary[harness.OutcomeErrorReturned] == 0 || len(out.Workloads) != 1 {
		t.Fatalf("explore --events --json:\n%v", j)
	}
	b := execCLI("explore", "--events", "--event-workloads", "cow", "--quick", "--target", harness.TargetNoBarrier)
	if b.code != 1 || !strings.Contains(b.stdout, "LOST") || !strings.Contains(b.stdout, "repro: crashtest repro -v c2:") {
		t.Fatalf("explore --events --target %s:\n%v", harness.TargetNoBarrier, b)
	}
	for _, args := range [][]string{
		{"explore", "--events", "--seed", "3"},
		{"explore", "--quick"},
		{"explore", "--events", "--event-workloads", "nope"},
	} {
		if e := execCLI(args...); e.code == 0 {
			t.Errorf("%v: exit 0:\n%v", args, e)
		}
	}
}
