package vfs

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/spf13/afero"
)

// FromAfero adapts any afero file system to FS, smoothing over the ways afero
// backends differ from os.File:
//
//   - Negative offsets and sizes are refused with ErrNegativeOffset before
//     afero sees them (MemMapFs panics on them).
//   - ReadAt that reaches the end of the file returns the bytes read and
//     io.EOF, like os.File; MemMapFs returns a short count with a nil error,
//     or io.ErrUnexpectedEOF past the end, and both are translated.
//   - A handle opened ReadOnly refuses WriteAt and Truncate with ErrReadOnly
//     itself (MemMapFs hands out writable handles for some read-only flags).
//   - Every call on one handle is serialized by a mutex, because afero
//     handles may implement ReadAt and WriteAt by moving a shared file
//     position (MemMapFs does), which is unsafe from several goroutines.
//   - The writer lock of Open(ReadWrite) and Create is an in-process table
//     kept by this adapter, keyed by the name cleaned with filepath.Clean. It
//     excludes writers using the same FromAfero value only, not other
//     processes, other adapters over the same afero.Fs, or differently
//     spelled names of one file. Remove drops the name's lock, as unlink(2)
//     would.
//   - Files do not implement Allocator.
//
// Durability is not modelled by this backend: Sync and Datasync call the
// afero file's Sync, and SyncRange calls it too (a stronger barrier than
// asked for), and they mean whatever that backend makes of them (nothing at
// all for MemMapFs, fsync for OsFs). SyncDir opens the directory through
// afero and calls Sync on it. Crashes are modelled by faultfs above an FS,
// never by the backend.
//
// Memory: afero's MemMapFs stores each file as one contiguous byte slice, so
// a write far past the end allocates real zeros for the whole gap (a sparse
// 64 GiB image costs 64 GiB of RAM). Use NewMem for large sparse images.
func FromAfero(afs afero.Fs) FS {
	return &aferoFS{fs: afs, writers: make(map[string]*aferoFile)}
}

type aferoFS struct {
	fs afero.Fs

	mu      sync.Mutex
	writers map[string]*aferoFile // cleaned name -> the handle holding its writer lock
}

// aferoFile wraps an afero.File. mu serializes every call on the handle.
type aferoFile struct {
	afs      *aferoFS
	name     string // as given to Open or Create
	key      string // the writer-lock key; "" for read-only handles
	readOnly bool

	mu     sync.Mutex
	f      afero.File
	closed bool
}

var (
	_ FS      = (*aferoFS)(nil)
	_ Renamer = (*aferoFS)(nil)
	_ File    = (*aferoFile)(nil)
)

// aferoPathErr wraps err with op and name unless it already carries a path.
func aferoPathErr(op, name string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return err
	}
	return &fs.PathError{Op: op, Path: name, Err: err}
}

// lock takes the writer lock for f, or fails with ErrLocked.
func (a *aferoFS) lock(f *aferoFile) error {
	key := filepath.Clean(f.name)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.writers[key] != nil {
		return &fs.PathError{Op: "lock", Path: f.name, Err: ErrLocked}
	}
	a.writers[key] = f
	f.key = key
	return nil
}

// unlock releases f's writer lock, if it still holds it.
func (a *aferoFS) unlock(f *aferoFile) {
	if f.key == "" {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.writers[f.key] == f {
		delete(a.writers, f.key)
	}
}

func (a *aferoFS) Open(name string, flag OpenFlag) (File, error) {
	osFlag := os.O_RDONLY
	if flag == ReadWrite {
		osFlag = os.O_RDWR
	}
	af, err := a.fs.OpenFile(name, osFlag, 0)
	if err != nil {
		return nil, aferoPathErr("open", name, err)
	}
	f := &aferoFile{afs: a, name: name, readOnly: flag != ReadWrite, f: af}
	if flag == ReadWrite {
		if err := a.lock(f); err != nil {
			af.Close()
			return nil, err
		}
	}
	return f, nil
}

func (a *aferoFS) Create(name string) (File, error) {
	af, err := a.fs.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, aferoPathErr("create", name, err)
	}
	f := &aferoFile{afs: a, name: name, f: af}
	if err := a.lock(f); err != nil {
		af.Close()
		return nil, err
	}
	return f, nil
}

func (a *aferoFS) Remove(name string) error {
	if err := a.fs.Remove(name); err != nil {
		return aferoPathErr("remove", name, err)
	}
	a.mu.Lock()
	delete(a.writers, filepath.Clean(name))
	a.mu.Unlock()
	return nil
}

// Rename renames oldname to newname with the afero backend's Rename. The
// adapter's writer lock follows the file: a writer holding oldname now holds
// newname, and any lock on a replaced newname is dropped.
func (a *aferoFS) Rename(oldname, newname string) error {
	if err := a.fs.Rename(oldname, newname); err != nil {
		var le *os.LinkError
		if errors.As(err, &le) {
			return err
		}
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: err}
	}
	oldKey, newKey := filepath.Clean(oldname), filepath.Clean(newname)
	if oldKey == newKey {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.writers, newKey)
	if w := a.writers[oldKey]; w != nil {
		delete(a.writers, oldKey)
		a.writers[newKey] = w
		w.key = newKey
	}
	return nil
}

func (a *aferoFS) SyncDir(dir string) error {
	d, err := a.fs.Open(dir)
	if err != nil {
		return aferoPathErr("open", dir, err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil && cerr != nil {
		return aferoPathErr("close", dir, cerr)
	}
	if err != nil {
		return aferoPathErr("fsync", dir, err)
	}
	return nil
}

func (a *aferoFS) Stat(name string) (os.FileInfo, error) {
	fi, err := a.fs.Stat(name)
	if err != nil {
		return nil, aferoPathErr("stat", name, err)
	}
	return fi, nil
}

// begin locks the handle and checks it for op: open, offsets not negative,
// and writable when write is set. On success the caller must unlock f.mu.
func (f *aferoFile) begin(op string, write bool, nums ...int64) error {
	for _, v := range nums {
		if v < 0 {
			return &fs.PathError{Op: op, Path: f.name, Err: ErrNegativeOffset}
		}
	}
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return &fs.PathError{Op: op, Path: f.name, Err: fs.ErrClosed}
	}
	if write && f.readOnly {
		f.mu.Unlock()
		return &fs.PathError{Op: op, Path: f.name, Err: ErrReadOnly}
	}
	return nil
}

func (f *aferoFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.begin("read", false, off); err != nil {
		return 0, err
	}
	defer f.mu.Unlock()
	n := 0
	for n < len(p) {
		m, err := f.f.ReadAt(p[n:], off+int64(n))
		n += m
		switch {
		case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
			return n, io.EOF
		case err != nil:
			return n, aferoPathErr("read", f.name, err)
		case m == 0:
			return n, io.EOF // no progress and no error: the end of the file
		}
	}
	return n, nil
}

func (f *aferoFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.begin("write", true, off); err != nil {
		return 0, err
	}
	defer f.mu.Unlock()
	if len(p) == 0 {
		return 0, nil // like pwrite(2); MemMapFs would extend the file
	}
	n, err := f.f.WriteAt(p, off)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		return n, aferoPathErr("write", f.name, err)
	}
	return n, nil
}

func (f *aferoFile) Truncate(size int64) error {
	if err := f.begin("truncate", true, size); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if err := f.f.Truncate(size); err != nil {
		return aferoPathErr("truncate", f.name, err)
	}
	return nil
}

func (f *aferoFile) sync(op string, nums ...int64) error {
	if err := f.begin(op, false, nums...); err != nil {
		return err
	}
	defer f.mu.Unlock()
	if err := f.f.Sync(); err != nil {
		return aferoPathErr(op, f.name, err)
	}
	return nil
}

// Sync calls the afero file's Sync.
func (f *aferoFile) Sync() error { return f.sync("fsync") }

// Datasync calls the afero file's Sync.
func (f *aferoFile) Datasync() error { return f.sync("fdatasync") }

// SyncRange calls the afero file's Sync, which covers the whole file; an
// empty range does nothing.
func (f *aferoFile) SyncRange(off, n int64) error {
	if n == 0 {
		if err := f.begin("sync_file_range", false, off, n); err != nil {
			return err
		}
		f.mu.Unlock()
		return nil
	}
	return f.sync("sync_file_range", off, n)
}

func (f *aferoFile) Size() (int64, error) {
	if err := f.begin("stat", false); err != nil {
		return 0, err
	}
	defer f.mu.Unlock()
	fi, err := f.f.Stat()
	if err != nil {
		return 0, aferoPathErr("stat", f.name, err)
	}
	return fi.Size(), nil
}

func (f *aferoFile) Close() error {
	if err := f.begin("close", false); err != nil {
		return err
	}
	defer f.mu.Unlock()
	f.closed = true
	f.afs.unlock(f)
	if err := f.f.Close(); err != nil {
		return aferoPathErr("close", f.name, err)
	}
	return nil
}
