package faultfs

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// State is one crash state: the files as a restarted machine finds them
// after a crash at some point under some persistence model. It is a
// vfs.FS: open, read and write it as the writer's recovery would.
//
// A state is cheap: each file reads through to the point's immutable data
// (the durable pages shared by every state of the point, and the unit
// versions the model chose), so materializing one costs time proportional
// to the number of pending units, not to the file sizes. Writes go to a
// private copy-on-write overlay of 4 KiB pages. A state shares nothing
// mutable with the FS it came from or with any other state: crashed and
// restarted worlds never interfere.
//
// Like vfs.MemFS, names are cleaned with path.Clean, directories are
// implicit, syncs do nothing (wrap the state in a new faultfs FS to model a
// crash during recovery), and Open with ReadWrite or Create takes an
// in-memory writer lock. A State is safe for concurrent use.
type State struct {
	model Model
	ops   int
	seed  uint64
	key   uint64
	index int
	lay   *layout
	vec   []uint32
	gseed uint64

	mu    sync.Mutex
	files map[string]*stNode
}

// stNode is one file of a state.
type stNode struct {
	mu    sync.RWMutex
	v     *view // nil for a file created in the state
	limit int64 // v's bytes at or beyond limit read as zeros
	size  int64
	over  map[int64]*page // private pages, written by the state's users

	writer bool // guarded by State.mu
}

// view is a file's crash contents: durable pages plus the chosen unit
// versions. Immutable.
type view struct {
	fl     *fileLay
	choice []uint32 // per slot of fl
	unit   int64
	gseed  uint64
}

// read fills p with the crash contents at off: runs of durable bytes in
// one read, each pending unit from its chosen version.
func (v *view) read(p []byte, off int64) {
	fl := v.fl
	if len(fl.units) == 0 {
		fl.ino.dur.readAt(p, off)
		return
	}
	U := v.unit
	// units is sorted; i walks it alongside the read: units[i] is the
	// first pending unit at or after the current position.
	i, _ := slices.BinarySearch(fl.units, off/U)
	for done := 0; done < len(p); {
		pos := off + int64(done)
		if i < len(fl.units) && fl.units[i] == pos/U {
			in := pos % U
			c := int(min(U-in, int64(len(p)-done)))
			copy(p[done:done+c], fl.unitBytes(int32(i), v.choice[i], U, v.gseed)[in:])
			done += c
			i++
			continue
		}
		end := len(p)
		if i < len(fl.units) {
			end = int(min(int64(end), fl.units[i]*U-off))
		}
		fl.ino.dur.readAt(p[done:end], pos)
		done = end
	}
}

// state materializes vector v (already canonical, with hash key).
func (e *enum) state(v []uint32, key uint64) *State {
	l := e.l
	s := &State{
		model: e.m, ops: e.p.ops, seed: e.seed, key: key, index: e.n,
		lay: l, vec: v, gseed: e.gseed,
		files: make(map[string]*stNode, len(l.names)),
	}
	nodes := make(map[int]*stNode)
	for _, nl := range l.names {
		id := nl.vers[0]
		if nl.dim >= 0 {
			id = nl.vers[v[nl.dim]]
		}
		fl := l.byID[id]
		if fl == nil {
			continue
		}
		n := nodes[id]
		if n == nil {
			size := fl.sizes[0]
			if fl.sizeDim >= 0 {
				size = fl.sizes[v[fl.sizeDim]]
			}
			n = &stNode{
				v:     &view{fl: fl, choice: v[fl.dim0 : fl.dim0+len(fl.units)], unit: l.unit, gseed: e.gseed},
				limit: size,
				size:  size,
			}
			nodes[id] = n
		}
		s.files[nl.name] = n
	}
	return s
}

// Model returns the persistence model the state was drawn from.
func (s *State) Model() Model { return s.model }

// Point returns the crash point: the number of operations applied.
func (s *State) Point() int { return s.ops }

// Seed returns the seed the state was drawn with.
func (s *State) Seed() uint64 { return s.seed }

// Index returns the state's position among the states its enumeration
// yielded (0 for the first).
func (s *State) Index() int { return s.index }

// Key returns a hash of the state's choices: two states of one point and
// model with the same key have the same contents.
func (s *State) Key() uint64 { return s.key }

// Choices returns the version this state gives each pending unit of the
// file called name, aligned with the Units of Point.PendingUnits for the same
// model: Choices(name)[i] indexes Units[i].Versions, and equals
// len(Versions) for garbage. It returns nil when the file has no pending
// units or its binding is pending. The slice is shared: do not modify it.
func (s *State) Choices(name string) []uint32 {
	fl, ok := s.lay.fileOf(name)
	if !ok || fl == nil || len(fl.units) == 0 {
		return nil
	}
	return s.vec[fl.dim0 : fl.dim0+len(fl.units) : fl.dim0+len(fl.units)]
}

// Names returns the names of the files in the state, sorted.
func (s *State) Names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return sortedKeys(s.files)
}

// String describes the state on one line: model, point, index, seed, and
// for each file its size and the units not at their durable value (g marks
// garbage), e.g. `torn point=12 state=3 seed=7: "a.img" size=8192 units{0:1 5:g}`.
func (s *State) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s point=%d state=%d seed=%d:", s.model, s.ops, s.index, s.seed)
	for _, nl := range s.lay.names {
		id := nl.vers[0]
		if nl.dim >= 0 {
			id = nl.vers[s.vec[nl.dim]]
		}
		fl := s.lay.byID[id]
		if fl == nil {
			if nl.vers[0] != 0 || nl.dim >= 0 {
				fmt.Fprintf(&b, " %q absent", nl.name)
			}
			continue
		}
		size := fl.sizes[0]
		if fl.sizeDim >= 0 {
			size = fl.sizes[s.vec[fl.sizeDim]]
		}
		fmt.Fprintf(&b, " %q size=%d", nl.name, size)
		n := 0
		for i, u := range fl.units {
			c := s.vec[fl.dim0+i]
			if c == 0 {
				continue
			}
			if n == 0 {
				b.WriteString(" units{")
			} else {
				b.WriteByte(' ')
			}
			if n++; n > 16 {
				b.WriteString("...")
				break
			}
			if int(c) == len(fl.vers[i]) {
				fmt.Fprintf(&b, "%d:g", u)
			} else {
				fmt.Fprintf(&b, "%d:%d", u, c)
			}
		}
		if n > 0 {
			b.WriteByte('}')
		}
	}
	return b.String()
}

// snapshotter is implemented by FSs whose files faultfs can adopt without
// reading them: it returns the file's contents as a tree.
type snapshotter interface {
	snapshotFile(name string) (t tree, size int64, ok bool)
}

// snapshotFile returns the current contents of name as a new tree, sharing
// the point's durable pages: time proportional to the pending units and
// overlay pages, not to the file size.
func (s *State) snapshotFile(name string) (tree, int64, bool) {
	s.mu.Lock()
	n := s.files[cleanName(name)]
	s.mu.Unlock()
	if n == nil {
		return tree{}, 0, false
	}
	n.mu.RLock()
	defer n.mu.RUnlock()
	ep := newEpoch()
	var t tree
	if v := n.v; v != nil {
		fl := v.fl
		t = fl.ino.dur
		for i, u := range fl.units {
			c := v.choice[i]
			start := u * v.unit
			if c == 0 || start >= n.limit {
				continue
			}
			b := fl.unitBytes(int32(i), c, v.unit, v.gseed)
			t = t.write(b[:min(v.unit, n.limit-start)], start, min(v.unit, n.limit-start), ep)
		}
		t = t.truncate(n.limit, ep)
	}
	for idx, pg := range n.over {
		cp := *pg
		t = t.set(idx, &cp, ep)
	}
	return t, n.size, true
}

// Open opens a file of the state. With ReadWrite it takes the file's writer
// lock or fails with vfs.ErrLocked.
func (s *State) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	name = cleanName(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.files[name]
	if n == nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	if flag == vfs.ReadWrite {
		if n.writer {
			return nil, &fs.PathError{Op: "lock", Path: name, Err: vfs.ErrLocked}
		}
		n.writer = true
	}
	return &stateFile{s: s, n: n, name: name, readOnly: flag != vfs.ReadWrite}, nil
}

// Create creates an empty file in the state, holding its writer lock.
func (s *State) Create(name string) (vfs.File, error) {
	name = cleanName(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.files[name] != nil {
		return nil, &fs.PathError{Op: "create", Path: name, Err: fs.ErrExist}
	}
	n := &stNode{writer: true}
	s.files[name] = n
	return &stateFile{s: s, n: n, name: name}, nil
}

// Remove removes a name from the state; open handles keep the file.
func (s *State) Remove(name string) error {
	name = cleanName(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.files[name] == nil {
		return &fs.PathError{Op: "remove", Path: name, Err: fs.ErrNotExist}
	}
	delete(s.files, name)
	return nil
}

// SyncDir does nothing: a state models no further crashes by itself.
func (s *State) SyncDir(string) error { return nil }

// Stat reports a file's name and size.
func (s *State) Stat(name string) (os.FileInfo, error) {
	name = cleanName(name)
	s.mu.Lock()
	n := s.files[name]
	s.mu.Unlock()
	if n == nil {
		return nil, &fs.PathError{Op: "stat", Path: name, Err: fs.ErrNotExist}
	}
	n.mu.RLock()
	defer n.mu.RUnlock()
	return stateFileInfo{name: path.Base(name), size: n.size}, nil
}

// ReadFile returns the whole contents of a file of the state.
func (s *State) ReadFile(name string) ([]byte, error) {
	s.mu.Lock()
	n := s.files[cleanName(name)]
	s.mu.Unlock()
	if n == nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: fs.ErrNotExist}
	}
	n.mu.RLock()
	defer n.mu.RUnlock()
	b := make([]byte, n.size)
	n.read(b, 0)
	return b, nil
}

type stateFileInfo struct {
	name string
	size int64
}

func (fi stateFileInfo) Name() string       { return fi.name }
func (fi stateFileInfo) Size() int64        { return fi.size }
func (fi stateFileInfo) Mode() fs.FileMode  { return 0o644 }
func (fi stateFileInfo) ModTime() time.Time { return time.Time{} }
func (fi stateFileInfo) IsDir() bool        { return false }
func (fi stateFileInfo) Sys() any           { return nil }

// read fills p from off; off+len(p) <= n.size. Called with n.mu held.
func (n *stNode) read(p []byte, off int64) {
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos>>pageShift, int(pos&(pageBytes-1))
		c := min(pageBytes-in, len(p)-done)
		if pg := n.over[idx]; pg != nil {
			copy(p[done:done+c], pg[in:])
		} else {
			n.base(p[done:done+c], pos)
		}
		done += c
	}
}

// base fills p with the crash contents at pos, zeros at and beyond limit.
func (n *stNode) base(p []byte, pos int64) {
	if n.v == nil || pos >= n.limit {
		clear(p)
		return
	}
	k := int(min(int64(len(p)), n.limit-pos))
	n.v.read(p[:k], pos)
	clear(p[k:])
}

// stateFile is an open file of a State.
type stateFile struct {
	s        *State
	n        *stNode
	name     string
	readOnly bool
	closed   atomic.Bool
}

func (f *stateFile) check(op string, write bool, nums ...int64) error {
	if f.closed.Load() {
		return &fs.PathError{Op: op, Path: f.name, Err: fs.ErrClosed}
	}
	for _, v := range nums {
		if v < 0 {
			return &fs.PathError{Op: op, Path: f.name, Err: vfs.ErrNegativeOffset}
		}
	}
	if write && f.readOnly {
		return &fs.PathError{Op: op, Path: f.name, Err: vfs.ErrReadOnly}
	}
	return nil
}

func (f *stateFile) endOf(op string, off, n int64) (int64, error) {
	if off > (1<<63-1)-n {
		return 0, &fs.PathError{Op: op, Path: f.name, Err: syscall.EFBIG}
	}
	return off + n, nil
}

// ReadAt reads the state's contents (io.ReaderAt semantics).
func (f *stateFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.check("read", false, off); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	n := f.n
	n.mu.RLock()
	defer n.mu.RUnlock()
	if off >= n.size {
		return 0, io.EOF
	}
	k := int(min(int64(len(p)), n.size-off))
	n.read(p[:k], off)
	if k < len(p) {
		return k, io.EOF
	}
	return k, nil
}

// WriteAt writes into the file's private overlay.
func (f *stateFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.check("write", true, off); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	end, err := f.endOf("write", off, int64(len(p)))
	if err != nil {
		return 0, err
	}
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos>>pageShift, int(pos&(pageBytes-1))
		c := min(pageBytes-in, len(p)-done)
		pg := n.over[idx]
		if pg == nil {
			pg = new(page)
			n.base(pg[:], idx<<pageShift)
			if n.over == nil {
				n.over = make(map[int64]*page)
			}
			n.over[idx] = pg
		}
		copy(pg[in:in+c], p[done:done+c])
		done += c
	}
	n.size = max(n.size, end)
	return len(p), nil
}

// Truncate sets the size; a shrink discards the overlay and the crash
// contents beyond it for good.
func (f *stateFile) Truncate(size int64) error {
	if err := f.check("truncate", true, size); err != nil {
		return err
	}
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	if size < n.size {
		n.limit = min(n.limit, size)
		for idx, pg := range n.over {
			switch start := idx << pageShift; {
			case start >= size:
				delete(n.over, idx)
			case start+pageBytes > size:
				clear(pg[size-start:])
			}
		}
	}
	n.size = size
	return nil
}

// Sync does nothing.
func (f *stateFile) Sync() error { return f.check("fsync", false) }

// Datasync does nothing.
func (f *stateFile) Datasync() error { return f.check("fdatasync", false) }

// SyncRange does nothing.
func (f *stateFile) SyncRange(off, n int64) error {
	return f.check("sync_file_range", false, off, n)
}

// Size returns the file size.
func (f *stateFile) Size() (int64, error) {
	if err := f.check("stat", false); err != nil {
		return 0, err
	}
	f.n.mu.RLock()
	defer f.n.mu.RUnlock()
	return f.n.size, nil
}

// Allocate grows the file to cover [off, off+n).
func (f *stateFile) Allocate(off, n int64) error {
	if err := f.check("fallocate", true, off, n); err != nil {
		return err
	}
	end, err := f.endOf("fallocate", off, n)
	if err != nil || n == 0 {
		return err
	}
	f.n.mu.Lock()
	defer f.n.mu.Unlock()
	f.n.size = max(f.n.size, end)
	return nil
}

// Close releases the handle and its writer lock.
func (f *stateFile) Close() error {
	if f.closed.Swap(true) {
		return &fs.PathError{Op: "close", Path: f.name, Err: fs.ErrClosed}
	}
	if !f.readOnly {
		f.s.mu.Lock()
		f.n.writer = false
		f.s.mu.Unlock()
	}
	return nil
}

var (
	_ vfs.FS        = (*State)(nil)
	_ vfs.File      = (*stateFile)(nil)
	_ vfs.Allocator = (*stateFile)(nil)
	_ snapshotter   = (*State)(nil)
)
