package harness

import (
	"errors"
	"testing"
	"time"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

// TestShrink shrinks failing 1,000-op cases against the qcow-nobarrier
// target to a handful of ops that fail with the same kind, and prints the
// counts before and after.
func TestShrink(t *testing.T) {
	for _, tc := range []struct {
		name  string
		model faultfs.Model
		seed  uint64
	}{
		{"torn", faultfs.Torn, 1},
		{"lose-unsynced", faultfs.LoseUnsynced, 2},
		{"reorder", faultfs.Reorder, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Generate(CaseSeed(tc.seed, 0), Space{Models: []faultfs.Model{tc.model}, Target: TargetNoBarrier})
			c.Ops = 1000
			c.WriteThrough = false
			start := time.Now()
			v := Run(c)
			if v.OK {
				t.Fatalf("case %s passes against qcow-nobarrier", c.ID())
			}
			var steps int
			res, err := Shrink(c, ShrinkOptions{Log: func(string) { steps++ }})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("shrunk %d ops -> %d ops in %d runs, %d steps (%v): %s\n  failure: %v",
				res.Before, res.After, res.Runs, steps, time.Since(start).Round(time.Millisecond), res.Case.ID(), res.Verdict.Failure)
			if res.Before != 1000 || res.After > 5 || res.After < 1 {
				t.Fatalf("shrunk %d ops to %d, want 1000 to at most 5", res.Before, res.After)
			}
			if res.Verdict.OK || res.Verdict.Failure.Kind != v.Failure.Kind || !res.Case.Explicit {
				t.Fatalf("shrunk case %s: verdict %+v, want a trace case failing with %q", res.Case.ID(), res.Verdict.Failure, v.Failure.Kind)
			}
			// The shrunk case reproduces from its ID alone.
			back, err := ParseID(res.Case.ID())
			if err != nil {
				t.Fatal(err)
			}
			if rv := Run(back); rv.OK || *rv.Failure != *res.Verdict.Failure {
				t.Fatalf("the shrunk ID reproduces %v, want %v", rv.Failure, res.Verdict.Failure)
			}
			// The same case against the real writer passes: the shrunk
			// trace is a bug of the target, not of the harness.
			good := res.Case
			good.Target = TargetQCOW
			if gv := Run(good); !gv.OK {
				t.Fatalf("the real writer fails the shrunk case %s: %v", good.ID(), gv.Failure)
			}
		})
	}
	if _, err := Shrink(small("v3", faultfs.Torn, 1), ShrinkOptions{}); !errors.Is(err, ErrNotFailing) {
		t.Fatalf("Shrink of a passing case: %v, want ErrNotFailing", err)
	}
}

// TestShrinkKeepsKind shrinks a structural failure (open or check) of the
// broken target: the result must fail the same verdict, not the easier
// durability one.
func TestShrinkKeepsKind(t *testing.T) {
	for k := range uint64(12) {
		c := Generate(CaseSeed(1, k), Space{Models: []faultfs.Model{faultfs.Torn}, Target: TargetNoBarrier, MaxOps: 20})
		c.WriteThrough = false
		v := Run(c)
		if v.OK || (v.Failure.Kind != KindOpen && v.Failure.Kind != KindCheck) {
			continue
		}
		res, err := Shrink(c, ShrinkOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("shrunk %d ops -> %d ops in %d runs: %s\n  failure: %v", res.Before, res.After, res.Runs, res.Case.ID(), res.Verdict.Failure)
		if res.Verdict.OK || res.Verdict.Failure.Kind != v.Failure.Kind || res.After > res.Before {
			t.Fatalf("shrunk to %v, want a %s failure", res.Verdict.Failure, v.Failure.Kind)
		}
		return
	}
	t.Fatal("no open or check failure among 12 cases")
}
