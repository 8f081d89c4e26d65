package harness

import (
	"slices"
	"sync"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// TargetSyncRange is this project's writer over a layer that turns every
// Sync and Datasync into sync_file_range over the bytes written since the
// last barrier, as a writer that used sync_file_range as its only barrier
// would: the data reaches the disk, but neither the file size nor other
// metadata does. Deliberately broken: a crash after a flush that grew the
// image can lose the clusters the flushed metadata points at.
const TargetSyncRange = "qcow-syncrange"

func init() { register(syncRangeTarget{}) }

// syncRangeTarget is TargetSyncRange.
type syncRangeTarget struct{}

func (syncRangeTarget) Name() string      { return TargetSyncRange }
func (syncRangeTarget) Formats() []string { return slices.Clone(Formats) }
func (syncRangeTarget) Resizes() bool     { return true }
func (syncRangeTarget) Open(fsys vfs.FS, name string, wt bool) (Writer, error) {
	return qcowTarget{}.Open(syncRangeFS{fsys}, name, wt)
}

// syncRangeFS wraps the files it opens in syncRangeFile.
type syncRangeFS struct{ vfs.FS }

func (s syncRangeFS) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	f, err := s.FS.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return &syncRangeFile{File: f}, nil
}

func (s syncRangeFS) Create(name string) (vfs.File, error) {
	f, err := s.FS.Create(name)
	if err != nil {
		return nil, err
	}
	return &syncRangeFile{File: f}, nil
}

// Label forwards to the wrapped FS (see vfs.Labeler), so that the
// writer's events label the op log through this layer too.
func (s syncRangeFS) Label(label string) {
	if l, ok := s.FS.(vfs.Labeler); ok {
		l.Label(label)
	}
}

// syncRangeFile makes Sync and Datasync a SyncRange over [lo, hi), the
// span written since the last barrier.
type syncRangeFile struct {
	vfs.File
	mu     sync.Mutex
	lo, hi int64 // hi == 0: nothing written
}

func (f *syncRangeFile) WriteAt(p []byte, off int64) (int, error) {
	n, err := f.File.WriteAt(p, off)
	if n > 0 {
		f.mu.Lock()
		if f.hi == 0 {
			f.lo, f.hi = off, off+int64(n)
		} else {
			f.lo, f.hi = min(f.lo, off), max(f.hi, off+int64(n))
		}
		f.mu.Unlock()
	}
	return n, err
}

func (f *syncRangeFile) barrier() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.hi == 0 {
		return nil
	}
	err := f.File.SyncRange(f.lo, f.hi-f.lo)
	if err == nil {
		f.lo, f.hi = 0, 0
	}
	return err
}

func (f *syncRangeFile) Sync() error     { return f.barrier() }
func (f *syncRangeFile) Datasync() error { return f.barrier() }
