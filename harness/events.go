package harness

import (
	"fmt"
	"slices"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// The event matrix: qemu iotest 026 ("qcow2 error path testing") run
// against a target. 026 injects an error (EIO, ENOSPC) at a blkdebug event,
// once or always, into a write of 026's workloads, then checks the image;
// EventMatrix does the same with faultfs and the events the target names
// its file operations with (faultfs.Op.Label): every event × {eio, enospc,
// short write, crash} × {once, always} × {write-back, write-through} on
// each of EventWorkloads, judging each cell by the harness verdict (every
// crash state of the run) and a check of the image the run left.
//
// What 026 has and this has not: its "imm" (immediately) switch (a
// faultfs fault always lands on the operation the event names, which is
// blkdebug's immediately=off: the request issued after the event) and its
// vmstate (-b) writes (no vmstate here). Its once=off fails every request
// after the event; here "always" fails every operation labelled with the
// event (and only those). 026's L1 growth comes from a vmstate write past
// the end of the disk; this writer grows its L1 table only on Resize, so
// the 026-l1_grow workload resizes (targets that cannot resize skip it).

// EventWorkload is one workload of the event matrix: a trace case without
// a fault plan (write-through is chosen per cell).
type EventWorkload struct {
	// Name names the workload in the table ("026-write", ...).
	Name string `json:"name"`
	// Note says what it is for: its qemu 026 counterpart, or what of ours
	// it reaches.
	Note string `json:"note"`
	// Case is the trace case (Setup shapes the image, unchecked).
	Case Case `json:"case"`
	// Base is a fault plan every cell of the workload runs with, beside
	// the cell's own: the rollback workload fails a barrier so that the
	// rollback's own events are issued and can be faulted in turn.
	Base string `json:"base,omitempty"`
}

// EventWorkloads returns the workloads of the event matrix: qemu 026's,
// translated to harness ops on small disks, then ours.
func EventWorkloads() []EventWorkload {
	mk := func(name, note, format string, cs, size int64, backing bool, setup, trace, base string) EventWorkload {
		ops, err := DecodeOps(trace)
		if err != nil {
			panic(fmt.Sprintf("harness: event workload %s: %v", name, err))
		}
		c := Case{Format: format, ClusterSize: cs, Size: size, Backing: backing, Model: faultfs.LoseUnsynced,
			StatesPerPoint: 2, Target: TargetQCOW, Seed: 0x026}.WithTrace(ops)
		c.Setup = setup
		return EventWorkload{Name: name, Note: note, Case: c, Base: base}
	}
	return []EventWorkload{
		mk("026-write", "026's write 0 128k into an empty image (1 KiB clusters): a new L2 table, cluster allocation, refcount updates",
			"v3", 1024, 4<<20, false, "", "w0+131072.26", ""),
		mk("026-l2_update", "026's l2_update case: a first write of 512 bytes, then 128k beside it in the same L2 table",
			"v3", 1024, 4<<20, false, "w0+512.25", "w0+131072.26", ""),
		mk("026-l2_load", "026's l2_load case: the 128k write again on the reopened image (the L2 table is read)",
			"v3", 1024, 4<<20, false, "w0+131072.25", "w0+131072.26", ""),
		mk("026-refblock", "026's refcount block allocation, scaled down: 512-byte clusters, a write past what the first refcount block covers",
			"v3", 512, 4<<20, false, "", "w0+262144.26", ""),
		mk("026-reftable", "026's refcount table growth, scaled down: 512-byte clusters, a 6.9 MiB write in setup, then a write that needs a bigger refcount table",
			"v3", 512, 9<<20, false, "w0+7208960.25", "w7208960+262144.26", ""),
		mk("026-l1_grow", "026's L1 growth (there a vmstate write past the disk, here Resize): a resize within the L1 table (header only), then one that needs a bigger L1 table",
			"v3", 1024, 983040, false, "w0+512.25", "w1024+512.26,r1048576,r2097152,w1500000+100.27", ""),
		mk("cow", "ours: partial writes over a backing file (copy-on-write reads and writes), a flush, an in-place write",
			"v3", 4096, 256<<10, true, "", "w5000+100.26,w20000+9000.27,f,w5100+10.28", ""),
		mk("zero", "ours: zero clusters over allocated ones (L2 updates, clusters freed)",
			"v3", 4096, 256<<10, false, "w0+65536.25", "z0+8192,z12288+4096,f,w20000+100.26", ""),
		mk("v2", "ours: QCOW2 version 2 (no zero clusters: zeros written)",
			"v2", 4096, 256<<10, false, "w0+8192.25", "w4000+9000.26,z0+4096,f", ""),
		mk("rollback", "ours: a write whose stage-3 barrier fails, so that (write-through) it rolls back pointers, the refcount table, refcounts and the file's length; the cell's fault hits the rollback's own operations (write-back: the failed barrier is Flush's, which keeps the metadata for a retry)",
			"v3", 512, 1<<20, false, "w0+512.25", "w512+204800.26,f", "eio@after:l1_update"),
	}
}

// The fault kinds of the event matrix, by their names in its table.
var eventFaults = []string{"eio", "enospc", "short", "crash"}

// The outcomes of an event matrix cell, worst first.
const (
	// OutcomeCorruption: a crash state or the image the run left does not
	// open, checks corrupt (not only leaks), reads back data the model never
	// allows, or is unusable; or the code panicked.
	OutcomeCorruption = "corruption"
	// OutcomeLostFlushed: a crash state lost data that a completed Flush,
	// Close or write-through write had made durable.
	OutcomeLostFlushed = "lost-flushed-data"
	// OutcomeErrorSwallowed: a call during which an injected fault fired
	// returned nil, or an error that does not wrap the injected one, or a
	// call failed before any fault fired.
	OutcomeErrorSwallowed = "error-swallowed"
	// OutcomeLeaks: every state passed and the image the run left has
	// leaked clusters (qemu-img check's "leaks", harmless), nothing worse.
	OutcomeLeaks = "leaks-only"
	// OutcomeErrorReturned: every state passed, a call returned the
	// injected error, and the image the run left checks clean.
	OutcomeErrorReturned = "error-returned"
	// OutcomeClean: every state passed, no call failed, and the image
	// checks clean (the fault was absorbed: a crash after the last
	// operation that mattered, or a fault the writer documents it absorbs).
	OutcomeClean = "clean"
	// OutcomeNotReached: the workload issues no operation with the event
	// (for crash: none after it), so the fault never fired.
	OutcomeNotReached = "not-reached"
	// OutcomeNotApplicable: a short write fired on a write inside the
	// file. A write comes back short when the disk fills up while blocks
	// are allocated for it, so only a write that extends the file can; a
	// short in-place write (faultfs cuts at any byte) would tear an 8-byte
	// pointer or a sector inside one sector, which no disk does, and the
	// model (a failed write leaves each sector old or new) rejects it. The
	// qcow package's rapid test restricts short writes the same way.
	OutcomeNotApplicable = "n/a"
)

// EventOutcomes lists the outcomes, worst first.
var EventOutcomes = []string{OutcomeCorruption, OutcomeLostFlushed, OutcomeErrorSwallowed,
	OutcomeLeaks, OutcomeErrorReturned, OutcomeClean, OutcomeNotReached, OutcomeNotApplicable}

// EventBad reports whether outcome is one a correct writer never has.
func EventBad(outcome string) bool {
	return outcome == OutcomeCorruption || outcome == OutcomeLostFlushed || outcome == OutcomeErrorSwallowed
}

// EventRow is one cell of the event matrix.
type EventRow struct {
	Workload     string `json:"workload"`
	Event        string `json:"event"`
	Fault        string `json:"fault"` // eio, enospc, short, crash
	Always       bool   `json:"always"`
	WriteThrough bool   `json:"write_through"`
	// Plan is the fault plan of the run (the faultfs DSL), empty when the
	// cell was not run (not reached).
	Plan    string `json:"plan,omitempty"`
	Outcome string `json:"outcome"`
	// Faults counts the operations the plan failed; States the crash
	// states checked.
	Faults int `json:"faults,omitempty"`
	States int `json:"states,omitempty"`
	// Leaks counts the leaked clusters of the image the run left.
	Leaks int `json:"leaks,omitempty"`
	// Detail explains a bad outcome (the failure, or the check's finding).
	Detail string `json:"detail,omitempty"`
	// ID reproduces the cell: crashtest repro ID.
	ID string `json:"id,omitempty"`
}

// EventMatrixOptions selects the cells of EventMatrix.
type EventMatrixOptions struct {
	// Target is the writer under test (default TargetQCOW).
	Target string
	// Workloads names the workloads to run (nil: all of EventWorkloads).
	Workloads []string
	// Events limits the events (nil: every event the workload's operations
	// carry, and for TargetQCOW every qcow.Events entry besides, reported
	// not reached when the workload never issues it).
	Events []string
	// Faults limits the fault kinds (nil: eio, enospc, short, crash).
	Faults []string
	// OnceOnly skips the "always" column; WriteBackOnly the write-through
	// one (to thin a quick run).
	OnceOnly, WriteBackOnly bool
	// Progress, when set, is called after each cell.
	Progress func(EventRow)
}

// EventMatrix runs the event matrix and returns its rows in workload,
// event, fault, once/always, write-back/write-through order. An error
// means the harness could not run a cell (an invalid workload).
func EventMatrix(o EventMatrixOptions) ([]EventRow, error) {
	target := o.Target
	if target == "" {
		target = TargetQCOW
	}
	faults := o.Faults
	if faults == nil {
		faults = eventFaults
	}
	for _, f := range faults {
		if !slices.Contains(eventFaults, f) {
			return nil, fmt.Errorf("harness: event matrix: fault %q (want one of %v)", f, eventFaults)
		}
	}
	var rows []EventRow
	for _, w := range EventWorkloads() {
		if o.Workloads != nil && !slices.Contains(o.Workloads, w.Name) {
			continue
		}
		modes := []bool{false, true}
		if o.WriteBackOnly {
			modes = modes[:1]
		}
		size, err := imageSizeBefore(w.Case)
		if err != nil {
			return nil, fmt.Errorf("harness: event workload %s: %w", w.Name, err)
		}
		// The events each mode's run issues, from a run with the base plan only.
		seen := map[bool]map[string]bool{}
		var events []string
		for _, wt := range modes {
			c := w.Case
			c.Target, c.WriteThrough, c.Faults = target, wt, w.Base
			if c.Validate() != nil {
				continue // the target cannot run it (a resize)
			}
			labels, err := eventLabels(c)
			if err != nil {
				return nil, fmt.Errorf("harness: event workload %s: %w", w.Name, err)
			}
			seen[wt] = labels
			for l := range labels {
				if !slices.Contains(events, l) {
					events = append(events, l)
				}
			}
		}
		if len(seen) == 0 {
			continue
		}
		if target == TargetQCOW {
			for _, e := range qcow.Events {
				if !slices.Contains(events, string(e)) {
					events = append(events, string(e))
				}
			}
		}
		events = orderEvents(events)
		if o.Events != nil {
			events = slices.DeleteFunc(events, func(e string) bool { return !slices.Contains(o.Events, e) })
		}
		for _, ev := range events {
			for _, fault := range faults {
				for _, always := range []bool{false, true} {
					if always && o.OnceOnly {
						continue
					}
					for _, wt := range modes {
						row := EventRow{Workload: w.Name, Event: ev, Fault: fault, Always: always, WriteThrough: wt, Outcome: OutcomeNotReached}
						if seen[wt][ev] {
							if err := runEventCell(w, target, size, &row); err != nil {
								return rows, err
							}
						}
						rows = append(rows, row)
						if o.Progress != nil {
							o.Progress(row)
						}
					}
				}
			}
		}
	}
	return rows, nil
}

// orderEvents sorts events as qcow.Events lists them, others after in
// name order.
func orderEvents(events []string) []string {
	rank := func(e string) int {
		if i := slices.Index(qcow.Events, qcow.Event(e)); i >= 0 {
			return i
		}
		return len(qcow.Events)
	}
	slices.SortFunc(events, func(a, b string) int {
		if ra, rb := rank(a), rank(b); ra != rb {
			return ra - rb
		}
		if a < b {
			return -1
		}
		if a > b {
			return 1
		}
		return 0
	})
	return events
}

// eventLabels records c and returns the labels of its file operations
// (the harness's own, unlabelled, left out).
func eventLabels(c Case) (map[string]bool, error) {
	r, ffs, cleanup, f := prepare(c, Options{})
	defer cleanup()
	if f != nil && (f.Kind == KindSetup || ffs == nil || r == nil) {
		return nil, fmt.Errorf("%s", f)
	}
	labels := map[string]bool{}
	for _, op := range ffs.Log() {
		if op.Label != "" && op.Fault.Fault == faultfs.NoFault {
			labels[op.Label] = true
		}
	}
	return labels, nil
}

// eventPlan returns the fault plan of a cell: the fault on the first
// operation labelled ev, or on every one; a crash right after it.
func eventPlan(ev, fault string, always bool) string {
	var inj faultfs.Injector
	act := map[string]faultfs.Action{"eio": faultfs.EIO, "enospc": faultfs.ENOSPC,
		"short": faultfs.ShortWrite(0), "crash": faultfs.Crash}[fault]
	nth := 1
	if always {
		nth = 0
	}
	if fault == "crash" {
		inj = faultfs.Rule(faultfs.After(ev, nth), act)
	} else {
		inj = faultfs.Rule(faultfs.Event(ev, nth), act)
	}
	return inj.String()
}

// runEventCell runs one cell and fills row's outcome; size is the image
// file's size when the workload starts.
func runEventCell(w EventWorkload, target string, size int64, row *EventRow) error {
	c := w.Case
	c.Target, c.WriteThrough = target, row.WriteThrough
	row.Plan = eventPlan(row.Event, row.Fault, row.Always)
	c.Faults = row.Plan
	if w.Base != "" {
		c.Faults = "(any " + w.Base + " " + row.Plan + ")"
	}
	row.ID = c.ID()
	var (
		fired, leaks    int
		inPlace, failed bool
		detail          string
		err             error
	)
	v := RunWith(c, Options{inspect: func(r *run, ffs *faultfs.FS) {
		fired, inPlace, leaks, failed, detail, err = eventInspect(r, ffs, row.Plan, size)
	}})
	row.States = v.States
	if err != nil {
		return fmt.Errorf("harness: event cell %s: %w", row.ID, err)
	}
	row.Faults, row.Leaks = fired, leaks
	switch {
	case v.Failure != nil && v.Failure.Kind == KindSetup:
		return fmt.Errorf("harness: event cell %s: %s", row.ID, v.Failure)
	case fired == 0:
		row.Outcome = OutcomeNotReached
	case inPlace && row.Fault == "short":
		row.Outcome, row.Detail = OutcomeNotApplicable, "a short write inside the file"
	case v.Failure != nil:
		row.Detail = v.Failure.String()
		switch v.Failure.Kind {
		case KindDurability:
			row.Outcome = OutcomeLostFlushed
		case KindErrors:
			row.Outcome = OutcomeErrorSwallowed
		default:
			row.Outcome = OutcomeCorruption
		}
	case detail != "":
		row.Outcome, row.Detail = OutcomeCorruption, detail
	case leaks > 0:
		row.Outcome = OutcomeLeaks
	case failed:
		row.Outcome = OutcomeErrorReturned
	default:
		row.Outcome = OutcomeClean
	}
	return nil
}

// eventInspect looks at a cell's recorded run and returns how many
// operations plan (one of the case's injectors) failed and whether one of
// them was a write inside the image file (size: its size when the
// workload started), the leaks of the image the run left, whether a
// workload call failed, and what is wrong with that image if it is
// corrupt or does not check.
func eventInspect(r *run, ffs *faultfs.FS, plan string, size int64) (fired int, inPlace bool, leaks int, failed bool, detail string, err error) {
	inj, err := faultfs.ParseInjector(plan)
	if err != nil {
		return 0, false, 0, false, "", err
	}
	log := ffs.Log()
	faulted := map[int]bool{}
	for _, i := range r.tap.faults {
		op := log[i]
		op.Fault = faultfs.Action{}
		if inj.MaybeInject(op).Fault != faultfs.NoFault {
			fired++
			faulted[i] = true
		}
	}
	// The image file's size before each operation: a write that ends
	// within it is in place.
	for _, op := range log {
		if op.Path != imageName {
			continue
		}
		switch op.Kind {
		case faultfs.OpWrite:
			if faulted[op.Index] && op.Offset+op.Length <= size {
				inPlace = true
			}
			for _, e := range op.Written {
				size = max(size, e.Off+e.Len)
			}
		case faultfs.OpTruncate:
			if op.Err == nil {
				size = op.Offset
			}
		}
	}
	failed = slices.Contains(r.failed, true)
	res, cerr := qcow.CheckFile(ffs.Unwrap(), imageName, "")
	switch {
	case cerr != nil:
		detail = fmt.Sprintf("the image the run left does not check: %v", cerr)
	case res.Corruptions > 0 || res.CheckErrors > 0:
		detail = fmt.Sprintf("the image the run left: %d corruptions, %d check errors", res.Corruptions, res.CheckErrors)
		for _, fd := range res.Findings {
			if fd.Kind != qcow.Leak {
				detail += ": " + fd.Msg
				break
			}
		}
	default:
		leaks = res.Leaks
	}
	return fired, inPlace, leaks, failed, detail, nil
}

// imageSizeBefore returns the size of c's image file when its recorded
// workload starts (after the setup ops).
func imageSizeBefore(c Case) (int64, error) {
	r := &run{c: c}
	mem := vfs.NewMem()
	if err := r.setup(mem); err != nil {
		return 0, err
	}
	fi, err := mem.Stat(imageName)
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}
