// Package vfs is the small file-system interface that qcowcrash's image code
// runs over. It holds only what a block-image reader and writer need, so every
// backend (the OS, memory, afero) and the fault-injection layer (faultfs) can
// implement it completely.
//
// Durability contract, shared by every backend:
//
//   - WriteAt, Truncate and Allocate change what later reads see at once, but
//     promise nothing about what survives a crash.
//   - Sync (fsync) makes all of the file durable: data, size and metadata.
//   - Datasync (fdatasync) makes the file's data and size durable.
//   - SyncRange(off, n) (sync_file_range with WAIT_BEFORE|WRITE|WAIT_AFTER)
//     makes the data pages of [off, off+n) durable, and nothing else: not the
//     file size, not metadata. It is a write-back hint in Linux; treat it as
//     the weakest barrier.
//   - FS.SyncDir makes the creation or removal of entries in a directory
//     durable.
//
// Concurrency: ReadAt and WriteAt on one File may be called from several
// goroutines at once (pread/pwrite semantics). Truncate, Allocate, the syncs
// and Close may also be called concurrently with them; each backend
// serializes internally as needed.
package vfs

import (
	"errors"
	"io"
	"os"
)

// File is an open file. Offsets are absolute; no method moves a file
// position.
type File interface {
	// ReadAt reads len(p) bytes at off, with io.ReaderAt semantics: a read
	// that reaches the end of the file returns the bytes read and io.EOF.
	// A read that fills p returns a nil error, even when it ends exactly at
	// the end of the file; an empty p returns 0, nil at any offset >= 0.
	io.ReaderAt
	// WriteAt writes len(p) bytes at off (pwrite semantics), extending the
	// file when the range lies beyond its end; the gap reads as zeros. A
	// short write returns a non-nil error. An empty p writes nothing and
	// does not extend the file. The caller may reuse p after the call
	// returns.
	io.WriterAt
	// Truncate sets the file size; bytes beyond it are discarded and a
	// grown range reads as zeros. Not durable until Sync or Datasync.
	Truncate(size int64) error
	// Sync makes the file's data, size and metadata durable (fsync).
	Sync() error
	// Datasync makes the file's data and size durable (fdatasync).
	Datasync() error
	// SyncRange makes the data pages of [off, off+n) durable, but not the
	// file size or other metadata (sync_file_range). n == 0 is an empty
	// range and does nothing (unlike sync_file_range(2), where it means "to
	// the end of the file").
	SyncRange(off, n int64) error
	// Size returns the current size of the file in bytes.
	Size() (int64, error)
	// Close releases the file and any lock it holds. It does not sync.
	// Every later call on the handle, Close included, returns an error
	// satisfying errors.Is(err, fs.ErrClosed).
	Close() error
}

// Allocator is implemented by files that can reserve space (fallocate with
// mode 0): the range is allocated and the file grows to cover it; contents
// of the range that were beyond the old end read as zeros. n == 0 does
// nothing; a handle opened ReadOnly refuses with ErrReadOnly.
type Allocator interface {
	Allocate(off, n int64) error
}

// OpenFlag selects how FS.Open opens a file.
type OpenFlag int

const (
	// ReadOnly opens an existing file for reading.
	ReadOnly OpenFlag = iota
	// ReadWrite opens an existing file for reading and writing and takes an
	// exclusive writer lock on it where the backend supports locks.
	ReadWrite
)

// FS is a file system: a place to open, create and remove files.
type FS interface {
	// Open opens an existing file. With ReadWrite the backend takes an
	// exclusive writer lock and fails with ErrLocked when another writer
	// holds it.
	Open(name string, flag OpenFlag) (File, error)
	// Create creates a new file for reading and writing, failing with an
	// error satisfying errors.Is(err, fs.ErrExist) if it exists. The new
	// directory entry is durable only after SyncDir on its directory.
	Create(name string) (File, error)
	// Remove removes a file. Durable only after SyncDir on its directory.
	Remove(name string) error
	// SyncDir makes the creation and removal of entries in directory dir
	// durable.
	SyncDir(dir string) error
	// Stat reports whether name exists and its size.
	Stat(name string) (os.FileInfo, error)
}

// Renamer is implemented by file systems that can rename a file atomically
// (rename(2)): if newname exists it is replaced in one step, so a reader sees
// either the old file or the new one under newname, never neither. Open
// handles keep working. The change is durable only after SyncDir on the
// directories of both names. It is an optional interface, not part of FS:
// callers check for it with a type assertion and fall back to something
// weaker when it is missing.
type Renamer interface {
	Rename(oldname, newname string) error
}

// Labeler is implemented by file systems that record what each operation is
// for (faultfs keeps the label beside every op in its log). Label sets the
// label of every operation issued after it, until the next call; "" clears
// it. A writer that knows why it issues an operation (qcow's writer events)
// calls Label before it; a file system that does not implement Labeler is
// simply not told. Like Renamer it is optional: callers check for it with a
// type assertion, and wrappers forward it.
type Labeler interface {
	Label(label string)
}

// ErrLocked is returned by FS.Open with ReadWrite when another writer holds
// the file's lock.
var ErrLocked = errors.New("vfs: file is locked by another writer")

// ErrNegativeOffset is returned for a negative offset or length.
var ErrNegativeOffset = errors.New("vfs: negative offset")

// ErrReadOnly is returned by WriteAt, Truncate and Allocate on a handle
// opened with ReadOnly. Every backend checks this itself, so the error is the
// same whatever the backend.
var ErrReadOnly = errors.New("vfs: file handle is read-only")

// Unwrapper is implemented by FS wrappers (such as faultfs) to expose the FS
// they wrap.
type Unwrapper interface {
	Unwrap() FS
}

// Root peels every wrapper off fs and returns the innermost FS.
func Root(fs FS) FS {
	for {
		u, ok := fs.(Unwrapper)
		if !ok {
			return fs
		}
		fs = u.Unwrap()
	}
}
