package harness

import (
	"errors"
	"fmt"
	"slices"
)

// ShrinkOptions bound and observe a Shrink.
type ShrinkOptions struct {
	// MaxRuns bounds the number of candidate cases run (default 400).
	MaxRuns int
	// Run runs a candidate (default Run); soak --fs os:DIR shrinks with
	// RunWith.
	Run func(Case) Verdict
	// Log, if set, is told about every accepted step, on one line.
	Log func(string)
	// Stop, if set, is asked before every candidate run; when it returns
	// true Shrink returns the smallest failing case found so far.
	Stop func() bool
}

// ShrinkResult is what Shrink found.
type ShrinkResult struct {
	// Case is the smallest failing case found: a trace case that fails
	// with the same failure kind as the original.
	Case Case
	// Verdict is Case's verdict.
	Verdict Verdict
	// Before and After count the workload ops (not counting the final
	// close) of the original case and of Case.
	Before, After int
	// Runs is the number of candidate cases run.
	Runs int
}

// ErrNotFailing is returned by Shrink for a case that passes.
var ErrNotFailing = errors.New("harness: the case does not fail, so there is nothing to shrink")

// Shrink reduces a failing case to a smaller trace case that fails with
// the same failure kind: it cuts the workload after the op the failure
// happened in, removes chunks of ops and then single ops (delta
// debugging), shortens and aligns the remaining writes, and drops the
// backing file and write-through mode when the failure does not need them.
// It is deterministic: the same case shrinks to the same result.
func Shrink(c Case, o ShrinkOptions) (ShrinkResult, error) {
	if o.MaxRuns <= 0 {
		o.MaxRuns = 400
	}
	if o.Run == nil {
		o.Run = Run
	}
	logf := func(format string, args ...any) {
		if o.Log != nil {
			o.Log(fmt.Sprintf(format, args...))
		}
	}
	v := o.Run(c)
	res := ShrinkResult{Runs: 1, Before: c.Ops}
	if v.OK {
		return res, ErrNotFailing
	}
	if v.Failure.Kind == KindSetup {
		return res, fmt.Errorf("harness: shrink: %s", v.Failure)
	}
	kind := v.Failure.Kind
	best, bestV := c.AsTrace(), v
	ops, _ := DecodeOps(best.Trace)

	// try runs cand and adopts it when it still fails with kind.
	try := func(cand Case) bool {
		if res.Runs >= o.MaxRuns || (o.Stop != nil && o.Stop()) || cand.Validate() != nil {
			return false
		}
		res.Runs++
		cv := o.Run(cand)
		if cv.OK || cv.Failure.Kind != kind {
			return false
		}
		best, bestV = cand, cv
		ops, _ = DecodeOps(cand.Trace)
		return true
	}
	// cut drops the ops after the one the failure happened in.
	cut := func() {
		if f := bestV.Failure; f.Op >= 0 && f.Op+1 < len(ops) {
			n := len(ops)
			if try(best.WithTrace(ops[:f.Op+1])) {
				logf("cut after the failing op: %d -> %d ops", n, len(ops))
			}
		}
	}
	cut()

	// Delta debugging over the op list: remove chunks, halving their size
	// whenever no chunk can go.
	for chunks := 2; len(ops) >= 2 && res.Runs < o.MaxRuns; {
		size := (len(ops) + chunks - 1) / chunks
		removed := false
		for start := 0; start < len(ops) && !removed; start += size {
			n, end := len(ops), min(start+size, len(ops))
			if try(best.WithTrace(slices.Concat(ops[:start], ops[end:]))) {
				logf("removed ops [%d,%d): %d -> %d ops", start, end, n, len(ops))
				cut()
				removed = true
			}
		}
		if removed {
			chunks = max(chunks-1, 2)
			continue
		}
		if chunks >= len(ops) {
			break
		}
		chunks = min(chunks*2, len(ops))
	}

	// Simplify what is left: case options, then each op's range.
	simpler := []func(Case) (Case, bool){
		func(c Case) (Case, bool) { c.Backing = false; return c, best.Backing },
		func(c Case) (Case, bool) { c.WriteThrough = false; return c, best.WriteThrough },
		func(c Case) (Case, bool) { c.Faults = ""; return c, best.Faults != "" },
	}
	for _, f := range simpler {
		if cand, ok := f(best); ok && try(cand) {
			logf("simplified the case: %s", best.ID())
		}
	}
	for i := 0; i < len(ops) && res.Runs < o.MaxRuns; i++ {
		for progress := true; progress; {
			progress = false
			for _, edit := range opEdits(ops[i], best.ClusterSize) {
				cand := slices.Clone(ops)
				cand[i] = edit
				if try(best.WithTrace(cand)) {
					logf("op %d simplified to %s", i, edit)
					progress = true
					break
				}
			}
		}
	}
	res.Case, res.Verdict, res.After = best, bestV, len(ops)
	return res, nil
}

// opEdits returns simpler variants of op to try, simplest first: shorter
// (halved, or one sector), aligned to the sector or the cluster, with a
// small pattern.
func opEdits(op Op, cs int64) []Op {
	if op.Kind != OpWrite && op.Kind != OpZero {
		return nil
	}
	var out []Op
	add := func(o Op) {
		if o != op && o.Len >= 1 && !slices.Contains(out, o) {
			out = append(out, o)
		}
	}
	o := op
	o.Off = op.Off / cs * cs
	add(o)
	o = op
	o.Off = op.Off / 512 * 512
	add(o)
	o = op
	o.Len = min(op.Len, 512)
	add(o)
	o = op
	o.Len = op.Len / 2
	add(o)
	if op.Kind == OpWrite && op.Pattern > 0xff {
		o = op
		o.Pattern = op.Pattern & 0xff
		add(o)
	}
	return out
}
