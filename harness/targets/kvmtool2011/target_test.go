package kvmtool2011_test

import (
	"slices"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/harness"
)

// The harness knows the target by name, with formats v1 and v2 only.
func TestTargetRegistered(t *testing.T) {
	tg, ok := harness.LookupTarget(harness.TargetKvmtool2011)
	if !ok {
		t.Fatalf("target %q is not registered", harness.TargetKvmtool2011)
	}
	if got := tg.Formats(); !slices.Equal(got, []string{"v1", "v2"}) {
		t.Fatalf("Formats() = %v, want [v1 v2]", got)
	}
	if !slices.Contains(harness.Targets, harness.TargetKvmtool2011) {
		t.Fatalf("harness.Targets = %v lacks %q", harness.Targets, harness.TargetKvmtool2011)
	}
}

// The harness blames the target only for what it does, and says which
// check caught it. A v1 write of whole clusters survives every process
// crash, with or without a backing file (the target makes the fault layer
// see the backing file, which kvmtool never opened, so the crash states
// hold it): every crash state passes, and only the ordering rules fail it
// (R1-contents: sync_file_range never makes the grown file size durable,
// so the L1 entry may reach the disk pointing past its end); version 3 is
// not a format of the target.
func TestTargetCases(t *testing.T) {
	tests := []struct {
		name    string
		format  string
		backing bool
		trace   string
		want    string // the failure kind
		rule    string // the ordering rule, for kind "ordering"
		invalid bool
	}{
		{"v1 whole clusters", "v1", false, "w0+1024.1,f,w512+512.2", harness.KindOrdering, "R1-contents", false},
		{"v1 whole clusters, backing file", "v1", true, "w0+1024.1,f,w512+512.2", harness.KindOrdering, "R1-contents", false},
		{"v1 partial cluster, backing file", "v1", true, "w10+20.1", harness.KindContent, "", false},
		{"v2 refcounts", "v2", false, "w0+512.1", harness.KindCheck, "", false},
		{"v3 refused", "v3", false, "w0+512.1", "", "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ops, err := harness.DecodeOps(tc.trace)
			if err != nil {
				t.Fatal(err)
			}
			c := harness.Case{Format: tc.format, ClusterSize: 512, Size: 64 << 10, Backing: tc.backing,
				Model: faultfs.Process, StatesPerPoint: 8, Target: harness.TargetKvmtool2011, Seed: 7}.WithTrace(ops)
			if err := c.Validate(); (err != nil) != tc.invalid {
				t.Fatalf("Validate() = %v, want invalid=%v", err, tc.invalid)
			}
			if tc.invalid {
				return
			}
			v := harness.Run(c)
			if v.OK || v.Failure.Kind != tc.want || v.Failure.Rule != tc.rule {
				t.Fatalf("verdict ok=%v (%v), want a failure of kind %q (rule %q)", v.OK, v.Failure, tc.want, tc.rule)
			}
			if tc.want == harness.KindOrdering && v.States == 0 {
				t.Fatalf("no crash state was checked before the ordering rules")
			}
		})
	}
}
