package harness

import (
	"strings"

	"github.com/qcowcrash/qcowcrash/harness/targets/kvmtool2011"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// TargetKvmtool2011 is the name of the kvmtool2011 target: a faithful
// port of the 2011 kvmtool QCOW write path (package kvmtool2011), a
// known-unsafe writer the harness must catch.
const TargetKvmtool2011 = "kvmtool2011"

func init() { register(kvmtoolTarget{}) }

// kvmtoolTarget is TargetKvmtool2011. It writes QCOW version 1 and 2
// only: kvmtool of 2011 did not recognise version 3.
type kvmtoolTarget struct{}

func (kvmtoolTarget) Name() string      { return TargetKvmtool2011 }
func (kvmtoolTarget) Formats() []string { return []string{"v1", "v2"} }

// Open opens the image with kvmtool2011.Open. kvmtool of 2011 never opened
// a backing file, but crash states hold only the files the fault layer
// has seen, and this project's reader, which judges them, needs the
// backing file. So when the case has one, Open first opens it read-only
// through fsys and closes it (two harness-only file operations, before
// any write): the fault layer adopts it as durable, as it does when the
// qcow target opens it.
func (kvmtoolTarget) Open(fsys vfs.FS, name string, wt bool) (Writer, error) {
	o := kvmtool2011.Options{WriteThrough: wt}
	if l, ok := fsys.(vfs.Labeler); ok {
		o.Events = l.Label // the port names its operations with qcow's event names
		l.Label("open")
	}
	if _, err := fsys.Stat(backingName); err == nil {
		if f, err := fsys.Open(backingName, vfs.ReadOnly); err == nil {
			f.Close()
		}
	}
	return kvmtool2011.Open(fsys, name, o)
}

// Explain says why the 2011 kvmtool writer fails as f says, for the failures
// the harness finds in it (corpora/kvmtool2011 has one entry per cause).
func (kvmtoolTarget) Explain(f *Failure) string {
	d := f.Detail
	has := func(subs ...string) bool {
		for _, s := range subs {
			if !strings.Contains(d, s) {
				return false
			}
		}
		return true
	}
	switch {
	case f.Kind == KindOrdering && f.Rule == RuleContents:
		return "kvmtool appends a new L2 table or data cluster with pwrite (and at best sync_file_range, which does not make the file's new size durable), then points an L1 or L2 entry at it with pwrite + sync_file_range: the pointer can be durable while what it points at is not. The ordering rules see it in the op log itself, even when no sampled crash state loses the target (under the process model none does)."
	case f.Kind == KindOrdering && f.Rule == RuleRefcount:
		return "kvmtool's QCOW2 writing never updated refcounts: every L1 or L2 entry it writes points at a cluster whose refcount is 0."
	case f.Kind == KindErrors && has("L1 index out of the table"):
		return "kvmtool computed the L1 table size by rounding down (size / (cluster_size * l2_entries)), so the last, partial L1 range of the disk has no L1 entry and writes there fail; below one L1 range nothing can be written. Not a crash bug."
	case (f.Kind == KindCheck || f.Kind == KindOpen) && (has("L2 table", "beyond the end of the file") || has("l1_entry", "beyond the end of the file")):
		return "A new L2 table goes at the end of the file with pwrite + sync_file_range, then the L1 entry is pointed at it the same way. sync_file_range makes written pages durable but not the new file size, so after a power loss the L1 entry (inside the old file) can survive while the file is back to its old length: the L1 entry points at an L2 table past the end of the file. (Or, after an injected error, the truncate rollback cut the table away but left the L1 entry pointing at it.)"
	case (f.Kind == KindCheck || f.Kind == KindOpen) && has("data cluster", "beyond the end of the file"):
		return "A new data cluster is written at the end of the file with a plain pwrite and no barrier, then its L2 entry with pwrite + sync_file_range. sync_file_range persists the entry but neither the data nor the new file size, so after a power loss the L2 entry points at a data cluster past the end of the file. (Or, after an injected error, the truncate rollback cut the cluster away but left the entry.)"
	case f.Kind == KindCheck && has("refcount="):
		return "kvmtool's QCOW2 writing never updated refcounts: every cluster it allocates (L2 tables, data) has refcount 0 while an L1 or L2 entry references it, which qemu-img check reports as corruption even without a crash."
	case f.Kind == KindDurability:
		return "Data written into an allocated cluster is a plain pwrite with no barrier, and kvmtool's close did not sync (sync_file_range covered only the L1 and L2 entries): data acknowledged before a flush or close is lost by a power loss."
	case f.Kind == KindContent:
		return "A write into a new cluster writes only the guest's bytes; the rest of the cluster is never filled from the backing file (nor zeroed), so after the write it reads zeros where the backing file's data was (or, after a crash, whatever the file held)."
	}
	return ""
}
