package vfs

import (
	"bytes"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// memPageSize is the unit in which MemFS stores file data.
const memPageSize = 4096

// zeroPage is compared against to recognise all-zero data.
var zeroPage [memPageSize]byte

// MemFS is an in-memory FS that stores each file as a sparse map of 4 KiB
// pages: a page never written (or written only with zeros) costs nothing, so
// a 64 GiB image with 1 MiB written costs about 1 MiB.
//
// Names are cleaned with path.Clean, so "a", "./a" and "a/" name one file;
// "a" and "/a" are different files. Directories are implicit: any name may
// be created, SyncDir always succeeds, and Stat knows only files.
//
// All handles to one file share its data, as with the OS. Open with
// ReadWrite (and Create) takes an in-memory exclusive writer lock, released
// on Close; a second writer fails with ErrLocked. The lock belongs to the
// file, not the name: after Remove, a new file of the same name is unlocked,
// and open handles to the removed file keep working, as with unlink(2).
//
// Every sync is a no-op that succeeds: MemFS keeps one copy of each file and
// it always survives. Crashes and durability are modelled by faultfs above
// it.
//
// A MemFS is safe for concurrent use.
type MemFS struct {
	mu    sync.Mutex
	files map[string]*memNode
}

// memNode is one file's data: the "inode".
type memNode struct {
	mu    sync.RWMutex
	size  int64
	pages map[int64]*[memPageSize]byte // absent page = zeros

	// writer is set while a ReadWrite handle is open; guarded by MemFS.mu.
	writer bool
}

// memFile is an open handle to a memNode.
type memFile struct {
	fs       *MemFS
	node     *memNode
	name     string
	readOnly bool
	closed   atomic.Bool
}

// memFileInfo is what MemFS.Stat returns.
type memFileInfo struct {
	name string
	size int64
}

var (
	_ FS          = (*MemFS)(nil)
	_ Renamer     = (*MemFS)(nil)
	_ File        = (*memFile)(nil)
	_ Allocator   = (*memFile)(nil)
	_ os.FileInfo = memFileInfo{}
)

// NewMem returns an empty in-memory file system.
func NewMem() *MemFS {
	return &MemFS{files: make(map[string]*memNode)}
}

// Open opens an existing file. With ReadWrite it takes the file's writer
// lock or fails with an error wrapping ErrLocked.
func (m *MemFS) Open(name string, flag OpenFlag) (File, error) {
	name = path.Clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	node := m.files[name]
	if node == nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	if flag == ReadWrite {
		if node.writer {
			return nil, &fs.PathError{Op: "lock", Path: name, Err: ErrLocked}
		}
		node.writer = true
	}
	return &memFile{fs: m, node: node, name: name, readOnly: flag != ReadWrite}, nil
}

// Create creates an empty file, holding its writer lock, or fails with an
// error wrapping fs.ErrExist.
func (m *MemFS) Create(name string) (File, error) {
	name = path.Clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.files[name] != nil {
		return nil, &fs.PathError{Op: "create", Path: name, Err: fs.ErrExist}
	}
	node := &memNode{pages: make(map[int64]*[memPageSize]byte), writer: true}
	m.files[name] = node
	return &memFile{fs: m, node: node, name: name}, nil
}

// Remove removes the name of a file; open handles keep its data.
func (m *MemFS) Remove(name string) error {
	name = path.Clean(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.files[name] == nil {
		return &fs.PathError{Op: "remove", Path: name, Err: fs.ErrNotExist}
	}
	delete(m.files, name)
	return nil
}

// Rename gives the file oldname the name newname, replacing any file of
// that name (whose open handles keep its data, as with rename(2)). It fails
// with an error wrapping fs.ErrNotExist when oldname does not exist.
func (m *MemFS) Rename(oldname, newname string) error {
	oldname, newname = path.Clean(oldname), path.Clean(newname)
	m.mu.Lock()
	defer m.mu.Unlock()
	node := m.files[oldname]
	if node == nil {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: fs.ErrNotExist}
	}
	if oldname == newname {
		return nil
	}
	delete(m.files, oldname)
	m.files[newname] = node
	return nil
}

// SyncDir does nothing and succeeds: directories are implicit.
func (m *MemFS) SyncDir(dir string) error { return nil }

// Stat reports a file's name and size, or an error wrapping fs.ErrNotExist.
func (m *MemFS) Stat(name string) (os.FileInfo, error) {
	name = path.Clean(name)
	m.mu.Lock()
	node := m.files[name]
	m.mu.Unlock()
	if node == nil {
		return nil, &fs.PathError{Op: "stat", Path: name, Err: fs.ErrNotExist}
	}
	node.mu.RLock()
	defer node.mu.RUnlock()
	return memFileInfo{name: path.Base(name), size: node.size}, nil
}

// Clone returns a deep copy of m: the same names, sizes and contents, sharing
// nothing with m. The copy has no open handles, so no file in it is locked.
func (m *MemFS) Clone() *MemFS {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := &MemFS{files: make(map[string]*memNode, len(m.files))}
	for name, node := range m.files {
		node.mu.RLock()
		n := &memNode{size: node.size, pages: make(map[int64]*[memPageSize]byte, len(node.pages))}
		for idx, pg := range node.pages {
			cp := *pg
			n.pages[idx] = &cp
		}
		node.mu.RUnlock()
		c.files[name] = n
	}
	return c
}

// AllocatedBytes returns the memory held for file data by the files that
// currently have a name: the number of stored pages times their size (4 KiB).
// Sparse ranges, and pages only ever written with zeros, cost nothing.
func (m *MemFS) AllocatedBytes() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	var total int64
	for _, node := range m.files {
		node.mu.RLock()
		total += int64(len(node.pages)) * memPageSize
		node.mu.RUnlock()
	}
	return total
}

// Names returns the names of all files, sorted.
func (m *MemFS) Names() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	names := make([]string, 0, len(m.files))
	for name := range m.files {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

func (fi memFileInfo) Name() string       { return fi.name }
func (fi memFileInfo) Size() int64        { return fi.size }
func (fi memFileInfo) Mode() fs.FileMode  { return 0o644 }
func (fi memFileInfo) ModTime() time.Time { return time.Time{} }
func (fi memFileInfo) IsDir() bool        { return false }
func (fi memFileInfo) Sys() any           { return nil }

// check returns the error for op on f, if any: closed, a negative offset or
// length, or (for a write) a read-only handle.
func (f *memFile) check(op string, write bool, nums ...int64) error {
	if f.closed.Load() {
		return &fs.PathError{Op: op, Path: f.name, Err: fs.ErrClosed}
	}
	for _, v := range nums {
		if v < 0 {
			return &fs.PathError{Op: op, Path: f.name, Err: ErrNegativeOffset}
		}
	}
	if write && f.readOnly {
		return &fs.PathError{Op: op, Path: f.name, Err: ErrReadOnly}
	}
	return nil
}

// endOf returns off+n, or an EFBIG error if that overflows int64.
func (f *memFile) endOf(op string, off, n int64) (int64, error) {
	if off > (1<<63-1)-n {
		return 0, &fs.PathError{Op: op, Path: f.name, Err: syscall.EFBIG}
	}
	return off + n, nil
}

func (f *memFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.check("read", false, off); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	nd := f.node
	nd.mu.RLock()
	defer nd.mu.RUnlock()
	if off >= nd.size {
		return 0, io.EOF
	}
	n := len(p)
	if rest := nd.size - off; int64(n) > rest {
		n = int(rest)
	}
	for done := 0; done < n; {
		pos := off + int64(done)
		idx, in := pos/memPageSize, int(pos%memPageSize)
		c := min(memPageSize-in, n-done)
		if pg := nd.pages[idx]; pg != nil {
			copy(p[done:done+c], pg[in:])
		} else {
			clear(p[done : done+c])
		}
		done += c
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (f *memFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.check("write", true, off); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil // like pwrite(2): an empty write never extends the file
	}
	end, err := f.endOf("write", off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	nd := f.node
	nd.mu.Lock()
	defer nd.mu.Unlock()
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos/memPageSize, int(pos%memPageSize)
		c := min(memPageSize-in, len(p)-done)
		chunk := p[done : done+c]
		done += c
		zero := bytes.Equal(chunk, zeroPage[:c])
		pg := nd.pages[idx]
		switch {
		case pg == nil && zero:
			// Already zeros; stay sparse.
		case zero && c == memPageSize:
			delete(nd.pages, idx) // a whole page of zeros: make it sparse again
		default:
			if pg == nil {
				pg = new([memPageSize]byte)
				nd.pages[idx] = pg
			}
			copy(pg[in:], chunk)
		}
	}
	if end > nd.size {
		nd.size = end
	}
	return len(p), nil
}

// Truncate sets the size. Invariant kept here: every byte of a stored page
// at or beyond the size is zero, so growing needs no work.
func (f *memFile) Truncate(size int64) error {
	if err := f.check("truncate", true, size); err != nil {
		return err
	}
	nd := f.node
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if size < nd.size {
		first := (size + memPageSize - 1) / memPageSize // first page wholly beyond size
		last := (nd.size - 1) / memPageSize
		if last-first+1 <= int64(len(nd.pages)) {
			for idx := first; idx <= last; idx++ {
				delete(nd.pages, idx)
			}
		} else {
			for idx := range nd.pages {
				if idx >= first {
					delete(nd.pages, idx)
				}
			}
		}
		if in := size % memPageSize; in != 0 {
			if pg := nd.pages[size/memPageSize]; pg != nil {
				clear(pg[in:])
			}
		}
	}
	nd.size = size
	return nil
}

// Sync does nothing: MemFS models no crashes.
func (f *memFile) Sync() error { return f.check("fsync", false) }

// Datasync does nothing: MemFS models no crashes.
func (f *memFile) Datasync() error { return f.check("fdatasync", false) }

// SyncRange does nothing: MemFS models no crashes.
func (f *memFile) SyncRange(off, n int64) error { return f.check("sync_file_range", false, off, n) }

func (f *memFile) Size() (int64, error) {
	if err := f.check("stat", false); err != nil {
		return 0, err
	}
	f.node.mu.RLock()
	defer f.node.mu.RUnlock()
	return f.node.size, nil
}

// Allocate grows the file to cover [off, off+n). It stores no pages: in
// memory there is no space to reserve.
func (f *memFile) Allocate(off, n int64) error {
	if err := f.check("fallocate", true, off, n); err != nil {
		return err
	}
	end, err := f.endOf("fallocate", off, n)
	if err != nil || n == 0 {
		return err
	}
	f.node.mu.Lock()
	defer f.node.mu.Unlock()
	if end > f.node.size {
		f.node.size = end
	}
	return nil
}

func (f *memFile) Close() error {
	if f.closed.Swap(true) {
		return &fs.PathError{Op: "close", Path: f.name, Err: fs.ErrClosed}
	}
	if !f.readOnly {
		f.fs.mu.Lock()
		f.node.writer = false
		f.fs.mu.Unlock()
	}
	return nil
}
