package qcow

import "github.com/qcowcrash/qcowcrash/vfs"

// Event names what a file operation issued by an Image is for. Where an
// event means what one of qemu's blkdebug events means (qapi/block-core.json,
// BlkdebugEvent), it has that event's name, so a fault plan written for
// qemu's iotests (026) reads the same here; the events qemu has no name for
// are this package's own (open, rollback steps, repair, the dirty rebuild,
// close).
//
// An Image reports an event through Options.Events just before each file
// operation it issues (or group of operations for the same thing): every
// operation until the next event is for that event, and no operation is
// issued without one. The exceptions are the markers (see Markers): they
// name an in-memory decision, not a file operation, and the operation that
// follows one always has its own event. Events cost nothing when
// Options.Events is nil (a nil check).
//
// Readers report events too (read_aio, l2_load, ...), so that their
// operations do not carry a writer's stale event. Concurrent readers of one
// image (ReadAt holds only a read lock) may interleave their events; the
// writer's operations never interleave with anyone's.
type Event string

// qemu's blkdebug events that this package issues.
const (
	EventL1Update               Event = "l1_update"                   // entries of the L1 table written in place (flush stage 3)
	EventL1GrowAllocTable       Event = "l1_grow_alloc_table"         // marker: a bigger L1 table allocated (Resize)
	EventL1GrowWriteTable       Event = "l1_grow_write_table"         // the bigger L1 table written (stage 1)
	EventL1GrowActivateTable    Event = "l1_grow_activate_table"      // the header switched to it with the new size (stage 3)
	EventL2Load                 Event = "l2_load"                     // an L2 table read (cache miss)
	EventL2Update               Event = "l2_update"                   // entries of an existing L2 table written in place (stage 3)
	EventL2AllocCOWRead         Event = "l2_alloc_cow_read"           // an L2 table shared with a snapshot read for its copy
	EventL2AllocWrite           Event = "l2_alloc_write"              // a new L2 table written whole (stage 1)
	EventReadAIO                Event = "read_aio"                    // guest data read
	EventReadCompressed         Event = "read_compressed"             // a compressed cluster read
	EventReftableLoad           Event = "reftable_load"               // the refcount table read (writable open)
	EventReftableGrow           Event = "reftable_grow"               // marker: a bigger refcount table planned
	EventRefblockLoad           Event = "refblock_load"               // a refcount block read
	EventRefblockUpdatePart     Event = "refblock_update_part"        // refcount increments written in place, part of a block (stage 1)
	EventRefblockAlloc          Event = "refblock_alloc"              // marker: new refcount blocks planned
	EventRefblockAllocHookup    Event = "refblock_alloc_hookup"       // refcount table entries for new blocks written in place (stage 2)
	EventRefblockAllocWrite     Event = "refblock_alloc_write"        // a new refcount block written (stage 1)
	EventRefblockAllocWriteBlks Event = "refblock_alloc_write_blocks" // new refcount blocks written for a new refcount table (stage 1)
	EventRefblockAllocWriteTbl  Event = "refblock_alloc_write_table"  // a new refcount table written (stage 1)
	EventRefblockAllocSwitch    Event = "refblock_alloc_switch_table" // the header switched to the new refcount table (stage 2)
	EventClusterAlloc           Event = "cluster_alloc"               // marker: clusters allocated at the end of the file
	EventClusterFree            Event = "cluster_free"                // refcount decrements written (stage 4, no barrier)
	EventCOWRead                Event = "cow_read"                    // old contents read for a copy-on-write
	EventCOWWrite               Event = "cow_write"                   // a new cluster written with bytes besides the guest's (the rest of the cluster)
	EventWriteAIO               Event = "write_aio"                   // guest bytes only written (in place, or into a fresh cluster)
	EventFlushToDisk            Event = "flush_to_disk"               // a barrier (fdatasync), rollback's included
)

// This package's own events, which qemu's blkdebug has no name for.
const (
	EventOpen             Event = "open"               // the file opened, its size, header, L1 and snapshot tables read
	EventHeaderUpdate     Event = "header_update"      // header fields written in place: a resize without a new L1 table (size, stage 3), clearing unknown autoclear bits at open; raw: the file truncated to the new size
	EventRollbackPointers Event = "rollback_pointers"  // a rollback rewrites the old L1/L2 entries and header fields
	EventRollbackRefTable Event = "rollback_reftable"  // a rollback rewrites the old refcount table entries
	EventRollbackRefcount Event = "rollback_refcounts" // a rollback rewrites the old refcounts
	EventRollbackTruncate Event = "rollback_truncate"  // a rollback cuts the file back
	EventRepair           Event = "repair"             // reads and refcount/COPIED writes of Repair (check -r)
	EventDirtyRebuild     Event = "dirty_rebuild"      // the same, when a writable open of a dirty image rebuilds refcounts
	EventDirtyClear       Event = "dirty_clear"        // the dirty (and corrupt) bits cleared, at the end of a repair
	EventClose            Event = "close"              // the image file closed
)

// Events lists every event an Image may report, qemu's first. qemu's
// write_compressed is missing: this writer never writes compressed
// clusters (it copies them into new uncompressed ones).
var Events = []Event{
	EventL1Update, EventL1GrowAllocTable, EventL1GrowWriteTable, EventL1GrowActivateTable,
	EventL2Load, EventL2Update, EventL2AllocCOWRead, EventL2AllocWrite,
	EventReadAIO, EventReadCompressed,
	EventReftableLoad, EventReftableGrow,
	EventRefblockLoad, EventRefblockUpdatePart, EventRefblockAlloc, EventRefblockAllocHookup,
	EventRefblockAllocWrite, EventRefblockAllocWriteBlks, EventRefblockAllocWriteTbl, EventRefblockAllocSwitch,
	EventClusterAlloc, EventClusterFree, EventCOWRead, EventCOWWrite,
	EventWriteAIO, EventFlushToDisk,
	EventOpen, EventHeaderUpdate,
	EventRollbackPointers, EventRollbackRefTable, EventRollbackRefcount, EventRollbackTruncate,
	EventRepair, EventDirtyRebuild, EventDirtyClear, EventClose,
}

// Markers lists the events that name an in-memory decision of the writer
// (an allocation planned), not a file operation: they are reported, but no
// file operation is issued under them, so a fault addressed to one never
// fires. (In qemu the allocation itself may write, e.g. a refcount cache
// flush; this writer keeps allocations in memory until Flush.)
var Markers = []Event{EventL1GrowAllocTable, EventReftableGrow, EventRefblockAlloc, EventClusterAlloc}

// LabelEvents returns an Options.Events hook that labels the file
// operations of fsys with the event names, when fsys is a vfs.Labeler
// (faultfs is), and nil otherwise.
func LabelEvents(fsys vfs.FS) func(Event) {
	l, ok := fsys.(vfs.Labeler)
	if !ok {
		return nil
	}
	return func(e Event) { l.Label(string(e)) }
}

// event reports e to the Options.Events hook, if any.
func (im *Image) event(e Event) {
	if im.events != nil {
		im.events(e)
	}
}
