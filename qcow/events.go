package qcow

import "github.com/qcowcrash/qcowcrash/vfs"

// Event names what a file operation issued by the writer is for. Where an
// event means what one of qemu's blkdebug events means (qapi/block-core.json,
// BlkdebugEvent), it has that event's name, so a fault plan written for
// qemu's iotests (026) reads the same here; the events qemu has no name for
// are this writer's own (rollback steps, repair, the dirty rebuild, each
// flush stage).
//
// The writer reports an event through Options.Events just before the file
// operations it names; every operation until the next event is for the
// same thing. Events cost nothing when Options.Events is nil.
type Event string

// qemu's blkdebug events that this writer issues.
const (
	EventL1Update              Event = "l1_update"                   // entries of the L1 table written in place
	EventL1GrowAllocTable      Event = "l1_grow_alloc_table"         // a bigger L1 table allocated
	EventL1GrowWriteTable      Event = "l1_grow_write_table"         // the bigger L1 table written
	EventL1GrowActivateTable   Event = "l1_grow_activate_table"      // the header switched to it
	EventL2Load                Event = "l2_load"                     // an L2 table read
	EventL2Update              Event = "l2_update"                   // entries of an existing L2 table written in place
	EventL2AllocCOWRead        Event = "l2_alloc_cow_read"           // an L2 table shared with a snapshot read for its copy
	EventL2AllocWrite          Event = "l2_alloc_write"              // a new L2 table written whole
	EventRefblockLoad          Event = "refblock_load"               // a refcount block read
	EventRefblockUpdate        Event = "refblock_update"             // refcount entries written in place (increments)
	EventRefblockAlloc         Event = "refblock_alloc"              // a new refcount block allocated
	EventRefblockAllocWrite    Event = "refblock_alloc_write"        // the new refcount block written
	EventRefblockAllocWriteTbl Event = "refblock_alloc_write_table"  // a new refcount table written
	EventRefblockAllocSwitch   Event = "refblock_alloc_switch_table" // the header switched to the new refcount table
	EventReftableGrow          Event = "reftable_grow"               // refcount table entries for new blocks written
	EventClusterAlloc          Event = "cluster_alloc"               // a data cluster allocated
	EventClusterFree           Event = "cluster_free"                // refcount decrements written (stage 4)
	EventCOWRead               Event = "cow_read"                    // old contents read for a copy-on-write
	EventCOWWrite              Event = "cow_write"                   // a new cluster written complete (guest data and the rest)
	EventWriteAIO              Event = "write_aio"                   // guest data written in place
	EventWriteCompressed       Event = "write_compressed"            // a compressed cluster written
	EventFlushToDisk           Event = "flush_to_disk"               // a barrier (fdatasync)
)

// This writer's own events, which qemu's blkdebug has no name for.
const (
	EventHeaderUpdate     Event = "header_update"      // the header's size and L1 fields written (a resize)
	EventStage1           Event = "flush_stage1"       // flush stage 1 begins: new clusters and increments
	EventStage2           Event = "flush_stage2"       // flush stage 2 begins: the refcount table
	EventStage3           Event = "flush_stage3"       // flush stage 3 begins: pointers
	EventStage4           Event = "flush_stage4"       // flush stage 4 begins: decrements
	EventRollbackPointers Event = "rollback_pointers"  // a rollback rewrites old pointers
	EventRollbackRefTable Event = "rollback_reftable"  // a rollback rewrites the old refcount table entries
	EventRollbackRefcount Event = "rollback_refcounts" // a rollback rewrites the old refcounts
	EventRollbackTruncate Event = "rollback_truncate"  // a rollback cuts the file back
	EventRepair           Event = "repair"             // check -r or the dirty rebuild writes refcounts
	EventDirtyRebuild     Event = "dirty_rebuild"      // a writable open of a dirty image rebuilds refcounts
	EventDirtyClear       Event = "dirty_clear"        // the dirty bit cleared
	EventClose            Event = "close"              // Close's final barrier and file close
)

// Events lists every event the writer may report, qemu's first.
var Events = []Event{
	EventL1Update, EventL1GrowAllocTable, EventL1GrowWriteTable, EventL1GrowActivateTable,
	EventL2Load, EventL2Update, EventL2AllocCOWRead, EventL2AllocWrite,
	EventRefblockLoad, EventRefblockUpdate, EventRefblockAlloc, EventRefblockAllocWrite,
	EventRefblockAllocWriteTbl, EventRefblockAllocSwitch, EventReftableGrow,
	EventClusterAlloc, EventClusterFree, EventCOWRead, EventCOWWrite,
	EventWriteAIO, EventWriteCompressed, EventFlushToDisk,
	EventHeaderUpdate, EventStage1, EventStage2, EventStage3, EventStage4,
	EventRollbackPointers, EventRollbackRefTable, EventRollbackRefcount, EventRollbackTruncate,
	EventRepair, EventDirtyRebuild, EventDirtyClear, EventClose,
}

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
