package harness

import (
	"cmp"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

// Coverage counts what the harness has tried, in cells of event × fault ×
// outcome:
//
//   - For every crash state checked: the event (faultfs.Op.Label, which the
//     qcow target sets from qcow.Event) of the last file operation before
//     the crash point, the one just done or in flight; fault "crash:MODEL"
//     (the case's persistence model); outcome "pass" or the failure kind of
//     that state.
//   - For every injected fault (a case's fault plan): the event of the file
//     operation the fault fired on; fault its faultfs name (eio, enospc,
//     short-write, tear, fsync-drop, crash); outcome "pass" or the failure
//     kind of the case's verdict.
//   - A case that fails before any crash state is checked with no fault
//     fired counts once under event "-", fault "none" and its failure kind.
//
// Unlabelled operations count under event EventUnlabelled, a crash before
// the first operation under EventStart. Coverage is what soak and explore
// print, what `crashtest merge` adds up across shards, and what soak
// --steer steers by (Steer).
//
// The zero Coverage is empty and ready to use; a Coverage is not safe for
// concurrent use.
type Coverage struct {
	m map[cellKey]int64
}

// Coverage's special event and outcome names.
const (
	// EventUnlabelled is the event of a file operation with no label.
	EventUnlabelled = "-"
	// EventStart is the event of crash point 0: nothing done yet.
	EventStart = "start"
	// OutcomePass is the outcome of a state or case that passed.
	OutcomePass = "pass"
)

type cellKey struct{ event, fault, outcome string }

// Cell is one cell of a Coverage and its count. Its JSON keys are
// "event", "fault", "outcome" and "count".
type Cell struct {
	Event   string `json:"event"`
	Fault   string `json:"fault"`
	Outcome string `json:"outcome"`
	Count   int64  `json:"count"`
}

// Add counts n more in cell (event, fault, outcome). n <= 0 adds nothing.
func (c *Coverage) Add(event, fault, outcome string, n int64) {
	if n <= 0 {
		return
	}
	if c.m == nil {
		c.m = map[cellKey]int64{}
	}
	c.m[cellKey{event, fault, outcome}] += n
}

// Merge adds every count of o to c. A nil o adds nothing.
func (c *Coverage) Merge(o *Coverage) {
	if o == nil {
		return
	}
	for k, n := range o.m {
		c.Add(k.event, k.fault, k.outcome, n)
	}
}

// Len returns the number of cells with a count.
func (c *Coverage) Len() int {
	if c == nil {
		return 0
	}
	return len(c.m)
}

// Count returns the count of one cell.
func (c *Coverage) Count(event, fault, outcome string) int64 {
	if c == nil {
		return 0
	}
	return c.m[cellKey{event, fault, outcome}]
}

// Total returns the sum of every cell's count.
func (c *Coverage) Total() int64 {
	var t int64
	if c != nil {
		for _, n := range c.m {
			t += n
		}
	}
	return t
}

// Cells returns every cell with a count, sorted by event, fault and
// outcome.
func (c *Coverage) Cells() []Cell {
	if c == nil {
		return []Cell{}
	}
	cells := make([]Cell, 0, len(c.m))
	for k, n := range c.m {
		cells = append(cells, Cell{k.event, k.fault, k.outcome, n})
	}
	slices.SortFunc(cells, func(a, b Cell) int {
		return cmp.Or(cmp.Compare(a.Event, b.Event), cmp.Compare(a.Fault, b.Fault), cmp.Compare(a.Outcome, b.Outcome))
	})
	return cells
}

// Equal reports whether c and o have the same cells with the same counts.
func (c *Coverage) Equal(o *Coverage) bool {
	if c.Len() != o.Len() {
		return false
	}
	for k, n := range c.cells() {
		if o.cells()[k] != n {
			return false
		}
	}
	return true
}

func (c *Coverage) cells() map[cellKey]int64 {
	if c == nil {
		return nil
	}
	return c.m
}

// MarshalJSON writes the cells as Cells orders them: a JSON array of
// {"event", "fault", "outcome", "count"} objects.
func (c *Coverage) MarshalJSON() ([]byte, error) { return json.Marshal(c.Cells()) }

// UnmarshalJSON reads what MarshalJSON writes, adding up repeated cells.
// A negative count or an empty name is an error.
func (c *Coverage) UnmarshalJSON(b []byte) error {
	var cells []Cell
	if err := json.Unmarshal(b, &cells); err != nil {
		return fmt.Errorf("harness: coverage: %w", err)
	}
	nc := Coverage{}
	for i, x := range cells {
		if x.Count < 0 {
			return fmt.Errorf("harness: coverage cell %d: count %d is negative", i, x.Count)
		}
		if x.Event == "" || x.Fault == "" || x.Outcome == "" {
			return fmt.Errorf("harness: coverage cell %d: event %q, fault %q, outcome %q: want all three", i, x.Event, x.Fault, x.Outcome)
		}
		nc.Add(x.Event, x.Fault, x.Outcome, x.Count)
	}
	*c = nc
	return nil
}

// CrashFault returns the fault name crash states of model m count under:
// "crash:MODEL".
func CrashFault(m faultfs.Model) string { return "crash:" + m.String() }

// coverRec fills a case's Coverage while its crash states are checked:
// passing states are counted per crash time and added once per time, so
// checking a state costs no map operation.
type coverRec struct {
	cov   *Coverage
	ops   []faultfs.Op
	fault string
	n     int   // the crash time being counted
	pass  int64 // passing states at time n
}

func newCoverRec(c Case, ops []faultfs.Op) *coverRec {
	return &coverRec{cov: &Coverage{}, ops: ops, fault: CrashFault(c.Model)}
}

// eventAt returns the event of crash time n: the label of file operation
// n-1.
func eventAt(ops []faultfs.Op, n int) string {
	switch {
	case n <= 0 || n > len(ops):
		return EventStart
	case ops[n-1].Label == "":
		return EventUnlabelled
	}
	return ops[n-1].Label
}

// state counts a state checked at crash time n; f is its failure or nil.
func (cr *coverRec) state(n int, f *Failure) {
	if f != nil {
		cr.cov.Add(eventAt(cr.ops, n), cr.fault, f.Kind, 1)
		return
	}
	if n != cr.n {
		cr.flush()
		cr.n = n
	}
	cr.pass++
}

func (cr *coverRec) flush() {
	if cr.pass > 0 {
		cr.cov.Add(eventAt(cr.ops, cr.n), cr.fault, OutcomePass, cr.pass)
		cr.pass = 0
	}
}

// finish adds the injected faults (faults: indexes into ops) with the
// verdict's outcome and returns the coverage.
func (cr *coverRec) finish(v *Verdict, faults []int) *Coverage {
	cr.flush()
	coverFaults(cr.cov, v, cr.ops, faults)
	return cr.cov
}

// coverFaults adds to cov a cell per injected fault, with v's outcome;
// with none and a failure before any crash state, one cell for it.
func coverFaults(cov *Coverage, v *Verdict, ops []faultfs.Op, faults []int) {
	outcome := OutcomePass
	if v.Failure != nil {
		outcome = v.Failure.Kind
	}
	for _, i := range faults {
		if i < 0 || i >= len(ops) {
			continue
		}
		ev := ops[i].Label
		if ev == "" {
			ev = EventUnlabelled
		}
		cov.Add(ev, ops[i].Fault.Fault.String(), outcome, 1)
	}
	if len(faults) == 0 && v.Failure != nil && v.Failure.Point < 0 {
		cov.Add(EventUnlabelled, faultfs.NoFault.String(), outcome, 1)
	}
}

// earlyCoverage is the coverage of a case that failed before its crash
// states were checked (ffs nil: before recording began).
func (r *run) earlyCoverage(v *Verdict, ffs *faultfs.FS) *Coverage {
	cov := &Coverage{}
	var ops []faultfs.Op
	var faults []int
	if ffs != nil && r != nil && r.tap != nil {
		ops, faults = ffs.Log(), r.tap.faults
	}
	coverFaults(cov, v, ops, faults)
	return cov
}
