package faultfs

import (
	"fmt"
	"math/bits"
	"strings"
)

// OpKind names one kind of file-system operation.
type OpKind uint8

// The operation kinds faultfs records. Every call on the FS or on one of its
// files is one operation.
const (
	OpCreate    OpKind = iota // FS.Create
	OpOpen                    // FS.Open
	OpRead                    // File.ReadAt
	OpWrite                   // File.WriteAt
	OpTruncate                // File.Truncate; Offset is the new size
	OpAllocate                // vfs.Allocator.Allocate
	OpSync                    // File.Sync (fsync)
	OpDatasync                // File.Datasync (fdatasync)
	OpSyncRange               // File.SyncRange (sync_file_range)
	OpSyncDir                 // FS.SyncDir; Path is the directory
	OpRemove                  // FS.Remove
	OpClose                   // File.Close
	OpStat                    // FS.Stat
	OpSize                    // File.Size
	numOpKinds
)

var opKindNames = [numOpKinds]string{
	OpCreate:    "create",
	OpOpen:      "open",
	OpRead:      "read",
	OpWrite:     "write",
	OpTruncate:  "truncate",
	OpAllocate:  "allocate",
	OpSync:      "sync",
	OpDatasync:  "datasync",
	OpSyncRange: "sync-range",
	OpSyncDir:   "sync-dir",
	OpRemove:    "remove",
	OpClose:     "close",
	OpStat:      "stat",
	OpSize:      "size",
}

// String returns the kind's name as used by the injector DSL ("write",
// "sync-range", ...).
func (k OpKind) String() string {
	if k < numOpKinds {
		return opKindNames[k]
	}
	return fmt.Sprintf("opkind(%d)", uint8(k))
}

// ParseOpKind is the inverse of OpKind.String.
func ParseOpKind(s string) (OpKind, error) {
	for k, name := range opKindNames {
		if name == s {
			return OpKind(k), nil
		}
	}
	return 0, fmt.Errorf("faultfs: unknown op kind %q", s)
}

// OpKinds is a set of operation kinds.
type OpKinds uint32

// Commonly used sets of kinds.
const (
	// AllKinds holds every kind.
	AllKinds OpKinds = 1<<numOpKinds - 1
	// MutatingKinds holds the kinds that can change what survives a crash.
	MutatingKinds = OpKinds(1<<OpCreate | 1<<OpWrite | 1<<OpTruncate | 1<<OpAllocate |
		1<<OpSync | 1<<OpDatasync | 1<<OpSyncRange | 1<<OpSyncDir | 1<<OpRemove)
	// SyncKinds holds the barriers: sync, datasync, sync-range, sync-dir.
	SyncKinds = OpKinds(1<<OpSync | 1<<OpDatasync | 1<<OpSyncRange | 1<<OpSyncDir)
	// ReadKinds holds the kinds that only observe: open, read, stat, size.
	ReadKinds = OpKinds(1<<OpOpen | 1<<OpRead | 1<<OpStat | 1<<OpSize)
)

// KindSet returns the set holding ks.
func KindSet(ks ...OpKind) OpKinds {
	var s OpKinds
	for _, k := range ks {
		if k < numOpKinds {
			s |= 1 << k
		}
	}
	return s
}

// Has reports whether k is in the set.
func (s OpKinds) Has(k OpKind) bool { return k < numOpKinds && s&(1<<k) != 0 }

// List returns the kinds in the set in OpKind order.
func (s OpKinds) List() []OpKind {
	var ks []OpKind
	for s &= AllKinds; s != 0; s &= s - 1 {
		ks = append(ks, OpKind(bits.TrailingZeros32(uint32(s))))
	}
	return ks
}

// String returns the kinds' names joined by "|", or "none".
func (s OpKinds) String() string {
	ks := s.List()
	if len(ks) == 0 {
		return "none"
	}
	names := make([]string, len(ks))
	for i, k := range ks {
		names[i] = k.String()
	}
	return strings.Join(names, "|")
}

// Extent is a byte range [Off, Off+Len) of a file.
type Extent struct {
	Off, Len int64
}

// Op is one recorded operation. Ops are immutable once recorded; Data and
// Written are never modified after the call returns.
type Op struct {
	// Index is the operation's position in the log, from 0.
	Index int
	// Kind is what the operation did.
	Kind OpKind
	// File identifies the file (the inode) the operation acted on: stable
	// within one FS, 0 when none (a failed Open, SyncDir, Stat). Two handles
	// to one file share it; a file re-created under a removed name gets a
	// new one.
	File int
	// Path is the name the operation used (for file operations, the name the
	// handle was opened with; for SyncDir, the directory).
	Path string
	// Offset and Length are the byte range of a read, write, allocate or
	// sync-range; for a truncate, Offset is the new size.
	Offset, Length int64
	// Data is a copy of the bytes a write was asked to write.
	Data []byte
	// Written lists the byte ranges of Data that reached the file: all of it
	// for a successful write, a prefix for a short one, some sectors for a
	// torn one, nothing for a failed one.
	Written []Extent
	// Fault is the injected fault, the zero Action if none.
	Fault Action
	// Err is what the call returned.
	Err error
	// Label is what the caller said the operation was for (FS.Label), ""
	// when nothing was said. faultfs attaches no meaning to it; injectors
	// may match it (the DSL's event predicate) and reports print it.
	Label string
	// LabelSeq is how many operations before this one in the log carried
	// the same Label: 0 for the first (the DSL's "#N" counts from 1).
	LabelSeq int
	// PrevLabel and PrevLabelSeq are the Label and LabelSeq of the
	// operation just before this one in the log (for the DSL's after
	// predicate); for the first operation, "" and 0.
	PrevLabel    string
	PrevLabelSeq int
}

// String describes the op on one line, without its data.
func (op Op) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "#%d %s", op.Index, op.Kind)
	if op.Path != "" {
		fmt.Fprintf(&b, " %q", op.Path)
	}
	if op.File != 0 {
		fmt.Fprintf(&b, " file=%d", op.File)
	}
	switch op.Kind {
	case OpRead, OpWrite, OpAllocate, OpSyncRange:
		fmt.Fprintf(&b, " [%d,+%d)", op.Offset, op.Length)
	case OpTruncate:
		fmt.Fprintf(&b, " size=%d", op.Offset)
	}
	if op.Kind == OpWrite && op.Err != nil {
		var n int64
		for _, e := range op.Written {
			n += e.Len
		}
		fmt.Fprintf(&b, " written=%d", n)
	}
	if op.Fault.Fault != NoFault {
		fmt.Fprintf(&b, " fault=%s", op.Fault)
	}
	if op.Err != nil {
		fmt.Fprintf(&b, " err=%q", op.Err.Error())
	}
	if op.Label != "" {
		fmt.Fprintf(&b, " event=%s", op.Label)
	}
	return b.String()
}
