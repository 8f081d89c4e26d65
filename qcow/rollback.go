package qcow

// Transactions and truncate rollback (see "Errors and rollback" in
// write.go).

import (
	"fmt"
)

// txn records how to undo one write.
type txn struct {
	fileSize int64
	grew     bool // a write reached beyond fileSize
	undo     []func()
	meta     [4][]metaWrite // in-place metadata writes by stage
}

// metaWrite is an in-place metadata write; enc re-encodes the bytes from
// the in-memory tables (after undo: the old bytes).
type metaWrite struct {
	off int64
	enc func() []byte
}

// remember records how to undo a change of the in-memory state, when a
// transaction is open.
func (w *writer) remember(f func()) {
	if w.tx != nil {
		w.tx.undo = append(w.tx.undo, f)
	}
}

// op runs fn as one transaction: on success in write-through mode (or when
// durable is set) the metadata is flushed before op returns; on failure
// everything is rolled back.
func (w *writer) op(durable bool, fn func() error) error {
	if err := w.relieve(); err != nil {
		return err
	}
	durable = durable || w.writeThrough
	w.tx = &txn{fileSize: w.fileSize}
	err := fn()
	if err == nil {
		err = w.flushRun()
	}
	if err == nil && durable {
		err = w.writeStages()
	}
	tx := w.tx
	w.tx = nil
	if err != nil {
		w.run.buf = w.run.buf[:0]
		w.rollback(tx, err)
		return err
	}
	if durable {
		if err := w.freeStage(); err != nil {
			return fmt.Errorf("qcow: %s: the write is durable but freeing replaced clusters failed (retried at the next flush): %w", w.name, err)
		}
	}
	return nil
}

// rollback undoes the transaction tx after cause made it fail.
func (w *writer) rollback(tx *txn, cause error) {
	for i := len(tx.undo) - 1; i >= 0 && w.bugs&bugRollbackKeepsMem == 0; i-- {
		tx.undo[i]()
	}
	// The failed call may have written guest data in place (all of it, or
	// a torn or short part) that no barrier covered: the next Flush must
	// issue one, so that what reads see then is what a crash keeps.
	w.unsynced = true
	var rerr error
	// Pointers first, then the refcount table, then refcounts: at every
	// instant nothing on disk points at a cluster with refcount 0.
	for stage := 3; stage >= 1 && rerr == nil; stage-- {
		if len(tx.meta[stage]) == 0 {
			continue
		}
		w.event(rollbackEvents[stage])
		for _, m := range tx.meta[stage] {
			if _, err := w.f.WriteAt(m.enc(), m.off); err != nil {
				rerr = err
				break
			}
		}
		if rerr == nil {
			w.event(EventFlushToDisk)
			rerr = w.f.Datasync()
		}
	}
	if rerr == nil && tx.grew {
		// Cut back to the first cluster boundary at or after the file's
		// size before the write, not to the old size itself: the last
		// cluster may end past the old size (only the guest's bytes of a
		// fresh cluster are written) and have been written in place by
		// this call, and a cut inside it would tear a sector (new bytes,
		// then zeros). Clusters reserved before the write but not yet
		// written (metadata waiting for a flush) lie beyond the cut, like
		// everything else past the end of the file. The harness checks
		// exactly this bound after every rollback (see package harness).
		size := (tx.fileSize + w.cs - 1) &^ (w.cs - 1)
		if w.bugs&bugRollbackNoTruncate == 0 {
			w.event(EventRollbackTruncate)
			rerr = w.f.Truncate(size)
		}
		if rerr == nil {
			w.event(EventFlushToDisk)
			rerr = w.f.Datasync()
		}
		if rerr == nil {
			w.fileSize = size
		}
	}
	if rerr != nil && w.failed == nil {
		w.failed = fmt.Errorf("qcow: %s: rollback after %v failed: %w", w.name, cause, rerr)
	}
}

// rollbackEvents names the rewrites of a rollback by the stage that wrote
// what they undo.
var rollbackEvents = [4]Event{1: EventRollbackRefcount, 2: EventRollbackRefTable, 3: EventRollbackPointers}
