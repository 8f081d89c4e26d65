package harness

import (
	"slices"
	"strings"
	"testing"
	"time"
)

// TestEventMatrix runs the event matrix (qemu iotest 026's error paths)
// over this project's writer: no cell may end in corruption, lost flushed
// data or a swallowed error, and enough cells must be reached (the fault
// fired) that the table cannot pass vacuously. Under -short only the
// once columns of eio and crash run, on four workloads.
func TestEventMatrix(t *testing.T) {
	start := time.Now()
	o := EventMatrixOptions{Workloads: []string{"026-write", "026-l2_update", "026-l2_load", "026-l1_grow", "cow", "zero", "rollback"}}
	if testing.Short() {
		o.Workloads = []string{"026-write", "026-l1_grow", "cow", "rollback"}
		o.OnceOnly, o.Faults = true, []string{"eio", "crash"}
	}
	rows, err := EventMatrix(o)
	if err != nil {
		t.Fatal(err)
	}
	// 026's refcount table growth is slow (an 8 MiB image of 512-byte
	// clusters): its own events only, and not under -short.
	if !testing.Short() {
		more, err := EventMatrix(EventMatrixOptions{
			Workloads: []string{"026-reftable"},
			Events:    []string{"refblock_alloc_write_blocks", "refblock_alloc_write_table", "refblock_alloc_switch_table"},
			Faults:    []string{"eio", "crash"},
			OnceOnly:  true,
		})
		if err != nil {
			t.Fatal(err)
		}
		rows = append(rows, more...)
	}
	count := map[string]int{}
	reached := map[string]bool{}
	for _, r := range rows {
		count[r.Outcome]++
		if EventBad(r.Outcome) {
			t.Errorf("%s %s %s always=%v wt=%v: %s: %s\n  repro: crashtest repro -v %s", r.Workload, r.Event, r.Fault, r.Always, r.WriteThrough, r.Outcome, r.Detail, r.ID)
		}
		if r.Outcome != OutcomeNotReached && r.Outcome != OutcomeNotApplicable {
			reached[r.Event] = true
			if r.Faults == 0 || r.Plan == "" || r.ID == "" {
				t.Errorf("reached cell without a fault, plan or ID: %+v", r)
			}
		}
	}
	t.Logf("%d cells in %v: %v", len(rows), time.Since(start).Round(time.Millisecond), count)
	n := count[OutcomeErrorReturned] + count[OutcomeLeaks] + count[OutcomeClean]
	if min := 400; testing.Short() {
		if n < min/8 {
			t.Errorf("only %d cells reached (want at least %d)", n, min/8)
		}
	} else if n < min {
		t.Errorf("only %d cells reached (want at least %d)", n, min)
	}
	if count[OutcomeErrorReturned] == 0 || count[OutcomeLeaks] == 0 {
		t.Errorf("outcomes %v: want both error-returned and leaks-only cells", count)
	}
	// The events qemu's 026 faults, and our own rollback steps, are hit.
	for _, e := range []string{"l1_update", "l2_load", "l2_update", "l2_alloc_write", "write_aio", "refblock_load",
		"refblock_update_part", "refblock_alloc_write", "refblock_alloc_hookup", "refblock_alloc_write_table",
		"refblock_alloc_switch_table", "cow_read", "cow_write", "flush_to_disk", "cluster_free",
		"rollback_pointers", "rollback_reftable", "rollback_refcounts", "rollback_truncate",
		"l1_grow_write_table", "l1_grow_activate_table", "header_update"} {
		if testing.Short() && strings.HasPrefix(e, "refblock_alloc_") && e != "refblock_alloc_write" && e != "refblock_alloc_hookup" {
			continue // 026-reftable's
		}
		if !reached[e] {
			t.Errorf("event %s: no cell reached", e)
		}
	}
}

// TestEventMatrixCatchesBrokenWriter: the table can fail. The writer
// whose barriers are dropped (qcow-nobarrier) loses flushed data or
// corrupts the image in some cell.
func TestEventMatrixCatchesBrokenWriter(t *testing.T) {
	rows, err := EventMatrix(EventMatrixOptions{Target: TargetNoBarrier, Workloads: []string{"cow"},
		Faults: []string{"crash"}, OnceOnly: true, WriteBackOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	bad := slices.IndexFunc(rows, func(r EventRow) bool { return EventBad(r.Outcome) })
	if bad < 0 {
		t.Fatalf("no bad cell among %d for %s: %+v", len(rows), TargetNoBarrier, rows)
	}
	t.Logf("first bad cell: %+v", rows[bad])
	// Its ID reproduces the failure.
	c, err := ParseID(rows[bad].ID)
	if err != nil {
		t.Fatal(err)
	}
	if v := Run(c); v.OK {
		t.Fatalf("%s passes when run by its ID", rows[bad].ID)
	}
}
