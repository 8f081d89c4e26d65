package harness

import (
	"slices"
	"testing"
)

// steerRun runs n cases of root one after another, drawn by Generate or,
// when steer, by a Steer that observes each case before the next is
// drawn. It returns the coverage, the case IDs and, after each case, the
// number of fault columns (crash:MODEL, eio, ...) with a cell.
func steerRun(root uint64, n int, sp Space, steer bool) (cov *Coverage, ids []string, cols []int) {
	st := NewSteer(sp)
	for k := range uint64(n) {
		seed := CaseSeed(root, k)
		c := Generate(seed, sp)
		if steer {
			c = st.Generate(seed)
		}
		st.Observe(c, Run(c).Coverage)
		ids = append(ids, c.ID())
		cols = append(cols, len(st.cols))
	}
	return st.Coverage(), ids, cols
}

// TestSteer: for the same root seeds and number of cases, steering covers
// more coverage cells in all, at least as many for each seed, and reaches
// the fault columns (every model's crash states, every fault kind) sooner
// (summed over the seeds);
// it is deterministic; and before it has observed anything it draws what
// Generate draws.
func TestSteer(t *testing.T) {
	sp := Space{Errors: true, MaxOps: 6}
	const n = 16
	plainCells, steerCells, plainCols, steerCols := 0, 0, 0, 0
	sum := func(x []int) (s int) {
		for _, v := range x {
			s += v
		}
		return s
	}
	for root := uint64(1); root <= 3; root++ {
		a, ids, ca := steerRun(root, n, sp, false)
		b, sids, cb := steerRun(root, n, sp, true)
		t.Logf("root %d: %d cells without steering, %d with; fault columns after each case %v without, %v with", root, a.Len(), b.Len(), ca, cb)
		plainCells += a.Len()
		steerCells += b.Len()
		if b.Len() < a.Len() {
			t.Errorf("root %d: %d cells with steering, %d without", root, b.Len(), a.Len())
		}
		plainCols += sum(ca)
		steerCols += sum(cb)
		if ids[0] != sids[0] {
			t.Errorf("root %d: first case %s steered, %s not", root, sids[0], ids[0])
		}
		if root == 1 {
			b2, sids2, _ := steerRun(root, n, sp, true)
			if !slices.Equal(sids, sids2) || !b.Equal(b2) {
				t.Fatalf("two steered runs differ:\n%v\n%v", sids, sids2)
			}
		}
	}
	if steerCells <= plainCells || steerCols <= plainCols {
		t.Errorf("%d cells with steering, %d without; fault columns covered, summed after each case: %d with, %d without", steerCells, plainCells, steerCols, plainCols)
	}
}
