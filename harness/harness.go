// Package harness runs crash-consistency Cases against a QCOW writer and
// turns each into a Verdict. The Crash tests and the crashtest CLI (soak,
// repro) are thin layers over it.
//
// A Case names everything a run depends on: the image format and its
// options, the workload size and seed, the persistence model of the crash
// states, the number of states sampled per crash point and the target (the
// writer under test). Run(c) is deterministic: the same Case produces the
// same workload, the same file operations, the same crash states and the
// same Verdict in every process on every machine. Every random choice
// derives from Case.Seed through faultfs.SubSeed of a name ("workload",
// "backing", "states", "usability"), so adding a new named part never
// changes what an old seed does.
//
// A seed-generated case may grow the disk (Case.Grow: resize ops drawn
// from their own sub-seed) and may start from a qemu-made image with
// internal snapshots (Case.Image, ImageQemuSnapshot); both are new fields
// of the ID, absent when unset, so older IDs keep their meaning.
//
// A Case has a one-line, versioned ID (see Case.ID and ParseID), e.g.
//
//	c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=0x1234
//
// which `crashtest repro` accepts, and a JSON form (encoding/json).
//
// A trace case (Case.Explicit, made by WithTrace or AsTrace) carries its
// workload as an explicit op list instead of drawing it from the seed: its
// ID has version c2 and lists the ops ("w0+512.1,f,z300+100,r1048576"), and its
// JSON form holds them. Trace cases are what Shrink produces and what the
// corpus stores (Entry, SaveEntry, LoadCorpus), so they keep their meaning
// when workload generation changes. A case may also carry a fault plan
// (Case.Faults, the faultfs injector DSL) and, for a trace case, setup ops
// applied before the recorded workload.
//
// Run judges a case at the first failure; Explore checks every crash
// state, counts them per crash point and can export each as image files;
// Inspect explains one failing state; Shrink reduces a failing case.
//
// # Targets
//
// A target is the writer under test behind the same interface:
//
//   - "qcow": this project's qcow writer, over faultfs.
//   - "qcow-nobarrier": the same writer over a file system layer that turns
//     every Sync, Datasync and SyncRange into a no-op that reports success,
//     so the writer's barriers are silently dropped. It is deliberately
//     broken: with the reorder, torn, prefix or lose-unsynced model the
//     harness must report a failure (a flushed write lost, or metadata
//     reaching the disk before what it points to). It proves the harness
//     can fail.
//   - "qcow-syncrange": the same writer with every fsync and fdatasync
//     replaced by sync_file_range over what was written since the last
//     barrier: data reaches the disk, the file size does not. Broken.
//   - "kvmtool2011": a faithful port of the write path of the 2011 kvmtool
//     patch "kvm tools: Add QCOW write support" (package
//     harness/targets/kvmtool2011), for QCOW v1 and v2. Broken in the ways
//     corpora/kvmtool2011 records.
//
// # Verdicts
//
// Run checks, at every crash point of the recorded workload, up to
// Case.StatesPerPoint crash states of Case.Model, and stops at the first
// failure. A crash point is judged at its own time and again at the end
// of every workload op that completed before the next point (an op that
// changed nothing on disk, such as a Close, makes the model stricter). Failure kinds, in the order they are checked:
//
//   - "errors": a workload call returned an error although no fault was
//     injected (the writer failed on its own); or, with a fault plan, a
//     call during which a fault fired returned nil, or returned an error
//     that does not wrap the injected one (faultfs.ErrInjected). After an
//     injected fault later calls may fail (the writer may refuse writes
//     after a failure), and the model takes every failed write as leaving
//     each of its sectors old or new. No writer absorbs a failure: the
//     qcow writer returns every one (see "Errors and rollback" in
//     qcow/write.go). An op never issued contributes nothing: when the
//     writable open fails, the model is the starting contents.
//   - "check" after a rollback (see Rollback below), judged on the live
//     file right after the failed op, before any crash state.
//   - "open": the crash state does not open.
//   - "check": the image structure is corrupt (qcow.CheckFile reports
//     corruptions; leaked clusters are allowed after a crash) or cannot be
//     checked.
//   - "size": the image's virtual size is not one the model allows: the
//     size before a resize that is in flight or failed, or after it; once
//     a Resize has returned, only the new one (Resize is durable on
//     return). Detail says when a non-durable resize would explain it.
//   - "durability": a sector lost a value that a completed Flush (or Close,
//     or a write-through write) had made durable: the state would pass if
//     no flush had been acknowledged.
//   - "content": a sector holds a value the model never allows (neither its
//     durable value nor any value written since).
//   - "snapshot": the image's internal snapshots (ImageQemuSnapshot cases)
//     are not exactly those it started with, or a snapshot's view, read
//     through qcow.Image.SnapshotView, differs by a byte from its frozen
//     view (model.Snapshots), here or after the usability write. No
//     write, flush, resize, failure or crash may change a snapshot.
//   - "usability": the recovered image does not accept a new write, flush
//     it and read it back (with every other sector unchanged), or is
//     corrupt after doing so.
//   - "ordering": no crash state failed (or none was checked:
//     Options.NoStates, `--max-states 0`), but the op log breaks one of
//     the writer's dependency rules (OrderingRules, Failure.Rule): some
//     write let a pointer, a refcount or a header switch reach the disk
//     before what it depends on, or a truncate cut the file under a
//     durable pointer, so some crash state is broken whether or not one
//     was sampled. The rules are checked on the op log of the image file
//     whatever the target, from the durable contents before each write
//     and that write alone (see CheckOrdering).
//   - "panic": the code under test panicked (while recording the
//     workload, or on a crash state); Detail holds the panic value.
//   - "setup": the harness itself could not build the case (an invalid
//     Case); not a verdict on the writer.
//
// # Rollback
//
// A writer must undo a write that fails (the truncate rollback of
// DESIGN.md), and reading back is not enough to show it did: a rollback
// that leaves the failed write's clusters in the file reads fine. The
// harness knows a rollback ran to its end without knowing the writer's
// internals: a WriteAt or WriteZeroes call returned an error, exactly one
// injected fault fired while it ran, and that fault was neither a crash
// nor on a barrier (sync, datasync, sync_file_range, directory sync; a
// failed barrier is final, and a fault after the first one can stop the
// rollback half way). Then the live file (the process model's state right
// after the call) must
//
//   - have no corruption (qcow.CheckFile);
//   - be no longer than the image file was before the call, rounded up to a
//     whole cluster (a rollback cuts the file back; the last cluster may
//     have been only partly written before);
//   - have no more leaked clusters than before the call;
//
// or, in write-through mode only, read the call's new data over its whole
// range and have no corruption: the write took effect before the failure
// (the qcow writer returns a failure of its stage 4, freeing replaced
// clusters, after the write is durable; the clusters leak until the next
// flush). A failure otherwise is of kind "check", with the op and the fault
// in its Detail; Verdict.Rollbacks counts the calls judged. After a crash
// during a rollback, the crash states are judged as usual: leaks allowed,
// corruption not. (A writer that flushes earlier writes at the start of a
// call, as the qcow writer does when its dirty caches outgrow their bounds,
// could leak there; the harness's workloads never reach those bounds.)
package harness

import (
	"fmt"
	"math/rand/v2"
	"slices"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

// Formats lists the format names a Case accepts: "v1" (QCOW version 1),
// "v2" and "v3" (QCOW2 versions 2 and 3).
var Formats = []string{"v1", "v2", "v3"}

// Targets lists the target names a Case accepts (see the package
// documentation): TargetQCOW and TargetNoBarrier first, then the other
// registered targets in name order. Read it, do not modify it.
var Targets []string

// The targets.
const (
	// TargetQCOW is this project's qcow writer.
	TargetQCOW = "qcow"
	// TargetNoBarrier is the qcow writer with every sync dropped: a
	// deliberately broken target.
	TargetNoBarrier = "qcow-nobarrier"
)

// DefaultModels are the persistence models soak draws from by default.
// Garbage is left out: QCOW has no checksums, so random bytes in metadata
// are not something a writer can be blamed for.
func DefaultModels() []faultfs.Model {
	return []faultfs.Model{faultfs.Process, faultfs.LoseUnsynced, faultfs.Reorder, faultfs.Torn, faultfs.Prefix}
}

// DefaultStatesPerPoint is the number of crash states sampled per crash
// point by Generate.
const DefaultStatesPerPoint = 8

// Space is the set of Cases Generate draws from.
type Space struct {
	// Formats to draw from (default: all of Formats).
	Formats []string
	// Models to draw from (default: DefaultModels()).
	Models []faultfs.Model
	// Target of every case (default TargetQCOW).
	Target string
	// MaxOps bounds the workload length (default 40).
	MaxOps int
	// Errors gives every case a fault plan drawn from its seed (see
	// FaultPlan), so the errors verdict is exercised too.
	Errors bool
	// Qemu lets Generate give a v2 or v3 case without a backing file an
	// image qemu made with internal snapshots (ImageQemuSnapshot), which
	// needs qemu-img and qemu-io when the case runs. soak sets it when
	// qemu-img is on the PATH.
	Qemu bool
}

// FaultPlan draws a fault plan from seed (through its "faults" sub-seed):
// one kind of fault (EIO or a torn write on writes, ENOSPC on writes,
// truncates and allocates, EIO on syncs and truncates, EIO on reads,
// fsync-drop on syncs, or a crash on a write or a sync), fired on each matching file operation with
// a small seeded probability. The result is in the faultfs DSL.
func FaultPlan(seed uint64) string {
	s := faultfs.SubSeed(seed, "faults")
	r := rand.New(rand.NewPCG(s, faultfs.SubSeed(s, "pcg")))
	p := []float64{0.01, 0.03, 0.1}[r.IntN(3)]
	ps := r.Uint64()
	var kinds faultfs.OpKinds
	var act faultfs.Action
	switch r.IntN(7) {
	case 0:
		kinds, act = faultfs.KindSet(faultfs.OpWrite), faultfs.EIO
	case 1:
		kinds, act = faultfs.KindSet(faultfs.OpWrite, faultfs.OpTruncate, faultfs.OpAllocate), faultfs.ENOSPC
	case 2:
		// Not short writes: their byte-granular prefix can end inside a
		// sector the guest is overwriting in place, which no writer can
		// keep at its old or new value (the model's promise for a
		// failed write). Torn writes keep whole sectors.
		kinds, act = faultfs.KindSet(faultfs.OpSync, faultfs.OpDatasync, faultfs.OpTruncate), faultfs.EIO
	case 3:
		kinds, act = faultfs.KindSet(faultfs.OpWrite), faultfs.TearThenFail(r.Uint64())
	case 4:
		kinds, act = faultfs.KindSet(faultfs.OpRead), faultfs.EIO
	case 5:
		kinds, act = faultfs.KindSet(faultfs.OpSync, faultfs.OpDatasync, faultfs.OpSyncRange), faultfs.FsyncDrop
	default:
		kinds, act = faultfs.KindSet(faultfs.OpWrite, faultfs.OpSync, faultfs.OpDatasync), faultfs.Crash
	}
	return faultfs.Rule(faultfs.And(faultfs.Kinds(kinds), faultfs.Randomly(p, ps)), act).String()
}

// CaseSeed returns the seed of the k-th case of a run with root seed root.
// Shard i of n runs the cases k ≡ i (mod n).
func CaseSeed(root uint64, k uint64) uint64 {
	return faultfs.SubSeed(root, fmt.Sprintf("case/%d", k))
}

// Generate draws a Case from sp, deterministically from seed (which
// becomes the Case's Seed).
func Generate(seed uint64, sp Space) Case {
	target := sp.Target
	if target == "" {
		target = TargetQCOW
	}
	formats := sp.Formats
	if len(formats) == 0 {
		formats = Formats
	}
	if t, ok := targets[target]; ok {
		// Only the formats the target writes; all of them when none is.
		tf := t.Formats()
		var both []string
		for _, f := range formats {
			if slices.Contains(tf, f) {
				both = append(both, f)
			}
		}
		if len(both) == 0 {
			both = tf
		}
		formats = both
	}
	models := sp.Models
	if len(models) == 0 {
		models = DefaultModels()
	}
	maxOps := sp.MaxOps
	if maxOps <= 0 {
		maxOps = 40
	}
	s := faultfs.SubSeed(seed, "case")
	r := rand.New(rand.NewPCG(s, faultfs.SubSeed(s, "pcg")))
	c := Case{
		Format:         formats[r.IntN(len(formats))],
		Model:          models[r.IntN(len(models))],
		Backing:        r.IntN(3) == 0,
		WriteThrough:   r.IntN(4) == 0,
		Ops:            min(maxOps, 4+r.IntN(37)),
		StatesPerPoint: DefaultStatesPerPoint,
		Target:         target,
		Seed:           seed,
	}
	if sp.Errors {
		c.Faults = FaultPlan(seed)
	}
	sizes := []int64{512, 4096, 65536}
	if c.Format == "v1" {
		sizes = sizes[:2]
	}
	c.ClusterSize = sizes[r.IntN(len(sizes))]
	// 32 KiB .. 512 KiB, a multiple of 512, not always of the cluster size.
	c.Size = int64(64+r.IntN(961)) * 512
	// Later additions draw from their own sub-seed, so that every field
	// above stays what it was for the same seed.
	x := faultfs.SubSeed(seed, "case/ext")
	rx := rand.New(rand.NewPCG(x, faultfs.SubSeed(x, "pcg")))
	grow, snap := rx.IntN(4) == 0, rx.IntN(4) == 0
	c.Grow = grow && targetResizes(target)
	if snap && sp.Qemu && c.Format != "v1" && !c.Backing {
		c.Image = ImageQemuSnapshot
	}
	return c
}

// validFormat reports whether f is one of Formats.
func validFormat(f string) bool { return slices.Contains(Formats, f) }

// validTarget reports whether t is one of Targets.
func validTarget(t string) bool { _, ok := targets[t]; return ok }
