package faultfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
	"sync"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// Default unit sizes.
const (
	// DefaultPageSize is the page size: the unit of the reorder model and
	// the granularity of sync_file_range.
	DefaultPageSize = 4096
	// DefaultSectorSize is the sector size: the unit of the torn and
	// garbage models and of torn writes.
	DefaultSectorSize = 512
)

// config holds the options of an FS.
type config struct {
	pageSize   int64
	sectorSize int64
	inj        Injector
}

// Option configures New.
type Option func(*config)

// WithPageSize sets the page size (default 4096): the unit of the reorder
// model and of sync_file_range, which makes whole pages durable. n <= 0
// selects the default.
func WithPageSize(n int64) Option {
	return func(c *config) {
		if n > 0 {
			c.pageSize = n
		}
	}
}

// WithSectorSize sets the sector size (default 512): the unit of the torn
// and garbage models and of TearThenFail. n <= 0 selects the default.
func WithSectorSize(n int64) Option {
	return func(c *config) {
		if n > 0 {
			c.sectorSize = n
		}
	}
}

// WithInjector sets the injector consulted before every operation (see
// also SetInjector).
func WithInjector(inj Injector) Option {
	return func(c *config) { c.inj = inj }
}

// FS wraps a vfs.FS, records every operation in an op log, tracks what of
// each file is durable, injects faults, and produces crash states.
//
// Every call is one operation, logged in call order with its result (reads,
// stats and closes too, so that injectors can target them; they change
// nothing that survives a crash). Calls are serialized: each holds the FS's
// lock while it runs on the inner FS, so the log order is the order in which
// they took effect. Writes are logged with a copy of their bytes, so the log
// holds every byte written: memory grows with the workload.
//
// Durability follows the vfs contract: Sync and Datasync make all of a
// file's data and its size durable (this model has no other metadata, so
// they are equivalent), SyncRange(off, n) makes the data in the pages
// overlapping [off, off+n) durable but not the size, and SyncDir(dir) makes
// the creations and removals of names in dir durable (fsync of a file does
// not make its new name durable). A shrinking Truncate is a pending change
// too: until it is durable, the discarded range may come back.
//
// A file that existed in the inner FS before this FS first opened or
// removed it is adopted as fully durable, with the contents it had then
// (read in full, except from a *State, whose files are adopted in time
// proportional to their pending units). Crash states contain only the files
// this FS knows: the ones it created or adopted. Changes made to the inner
// FS behind the wrapper's back are outside the model.
//
// An FS is safe for concurrent use.
type FS struct {
	inner vfs.FS
	cfg   config

	mu      sync.Mutex
	inj     Injector
	log     []Op
	w       *world
	base    []baseFile
	known   map[string]bool // names the world has seen
	nextID  int
	crashed bool
	label   string                 // the label of the next operations (Label)
	labels  map[string]int         // operations logged per label (Op.LabelSeq)
	handles map[int]map[*file]bool // open handles per inode
}

// baseFile is a file adopted from the inner FS.
type baseFile struct {
	name string
	id   int
	t    tree
	size int64
}

var (
	_ vfs.FS        = (*FS)(nil)
	_ vfs.Unwrapper = (*FS)(nil)
	_ vfs.Labeler   = (*FS)(nil)
	_ vfs.File      = (*file)(nil)
	_ vfs.File      = allocFile{}
	_ vfs.Allocator = allocFile{}
)

// New returns an FS that wraps inner. With no injector, every operation is
// passed to inner unchanged (and recorded).
func New(inner vfs.FS, opts ...Option) *FS {
	cfg := config{pageSize: DefaultPageSize, sectorSize: DefaultSectorSize}
	for _, o := range opts {
		o(&cfg)
	}
	return &FS{
		inner:   inner,
		cfg:     cfg,
		inj:     cfg.inj,
		w:       newWorld(cfg),
		known:   make(map[string]bool),
		handles: make(map[int]map[*file]bool),
	}
}

// Unwrap returns the wrapped FS.
func (f *FS) Unwrap() vfs.FS { return f.inner }

// SetInjector replaces the injector (nil: no faults) for later operations,
// so a workload can set up its files before faults are armed.
func (f *FS) SetInjector(inj Injector) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.inj = inj
}

// Label implements vfs.Labeler: every operation logged after it carries
// label in Op.Label (and injectors see it), until the next call.
func (f *FS) Label(label string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.label = label
}

// Crash stops the world now, as a Crash action would on the next
// operation: every later operation fails with ErrCrashed.
func (f *FS) Crash() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.crashed = true
}

// Crashed reports whether the FS has crashed.
func (f *FS) Crashed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.crashed
}

// Log returns a copy of the op log so far. The ops' Data is shared and must
// not be modified.
func (f *FS) Log() []Op {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.log)
}

// Recording returns an immutable copy of the op log so far, with the
// adopted files, for replaying crash points.
func (f *FS) Recording() *Recording {
	f.mu.Lock()
	defer f.mu.Unlock()
	return &Recording{cfg: f.cfg, ops: f.log[:len(f.log):len(f.log)], base: slices.Clone(f.base)}
}

// Point returns the crash point now: the worlds a crash after the last
// operation could leave. It shares nothing mutable with the FS.
func (f *FS) Point() *Point {
	f.mu.Lock()
	defer f.mu.Unlock()
	return newPoint(f.w.freeze(), len(f.log))
}

// CrashState returns one crash state at the current point under model m,
// chosen by seed (see Point.Sample). After a Crash action it is a state of
// the world as the crash left it. The state shares nothing mutable with the
// FS: it can be opened, read and written as a restarted machine would.
func (f *FS) CrashState(m Model, seed uint64) (*State, error) {
	if !m.valid() {
		return nil, fmt.Errorf("faultfs: unknown model %d", int(m))
	}
	return f.Point().Sample(m, seed), nil
}

// begin assigns op its index and returns the fault to apply, if any.
// Called with f.mu held.
func (f *FS) begin(op *Op) Action {
	op.Index = len(f.log)
	op.Label = f.label
	if f.labels == nil {
		f.labels = map[string]int{}
	}
	op.LabelSeq = f.labels[op.Label]
	f.labels[op.Label]++
	if op.Index > 0 {
		prev := f.log[op.Index-1]
		op.PrevLabel, op.PrevLabelSeq = prev.Label, prev.LabelSeq
	}
	if f.crashed {
		return Crash
	}
	if f.inj == nil {
		return Action{}
	}
	act := fit(f.inj.MaybeInject(*op), op.Kind)
	if act.Fault == FaultCrash {
		f.crashed = true
	}
	return act
}

// fit returns the action as it applies to an op of kind k: faults that do
// not fit the op act as EIO.
func fit(a Action, k OpKind) Action {
	switch a.Fault {
	case NoFault, FaultEIO, FaultENOSPC, FaultCrash:
		return a
	case FaultShortWrite, FaultTear:
		if k == OpWrite {
			return a
		}
	case FaultFsyncDrop:
		if k == OpSync || k == OpDatasync || k == OpSyncRange {
			return a
		}
	default:
		return Action{}
	}
	return EIO
}

// injected returns the error for op failed by act.
func injected(op Op, act Action) error {
	op.Data, op.Written, op.Err = nil, nil, nil
	return &fs.PathError{Op: op.Kind.String(), Path: op.Path, Err: &InjectedError{Op: op, Action: act, Errno: act.errno()}}
}

// finish logs op and applies it to the world. Called with f.mu held.
func (f *FS) finish(op *Op) {
	f.log = append(f.log, *op)
	f.w.apply(&f.log[len(f.log)-1])
}

// fail logs op as failed by act and returns its error.
func (f *FS) fail(op *Op, act Action) error {
	op.Fault = act
	op.Err = injected(*op, act)
	f.finish(op)
	return op.Err
}

// adopt makes a file of the inner FS that the world does not know yet part
// of it, fully durable. Called with f.mu held.
func (f *FS) adopt(name, key string) error {
	if f.w.liveNS[key] != 0 || f.known[key] {
		return nil
	}
	var t tree
	var size int64
	if sn, ok := f.inner.(snapshotter); ok {
		if t, size, ok = sn.snapshotFile(name); !ok {
			return nil
		}
	} else {
		h, err := f.inner.Open(name, vfs.ReadOnly)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return fmt.Errorf("faultfs: adopting %s: %w", name, err)
		}
		defer h.Close()
		if t, size, err = readTree(h); err != nil {
			return fmt.Errorf("faultfs: adopting %s: %w", name, err)
		}
	}
	f.nextID++
	f.known[key] = true
	f.w.adopt(key, f.nextID, t, size)
	f.base = append(f.base, baseFile{name: key, id: f.nextID, t: t, size: size})
	return nil
}

// readTree reads all of h into a new tree, storing only non-zero pages.
func readTree(h vfs.File) (tree, int64, error) {
	var t tree
	size, err := h.Size()
	if err != nil {
		return t, 0, err
	}
	ep := newEpoch()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		chunk := buf[:min(int64(len(buf)), size-off)]
		if n, err := h.ReadAt(chunk, off); n < len(chunk) {
			if err == nil || err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return t, 0, err
		}
		for i := 0; i < len(chunk); i += pageBytes {
			pg := new(page)
			copy(pg[:], chunk[i:])
			if *pg != zeroPage {
				t = t.set((off+int64(i))>>pageShift, pg, ep)
			}
		}
	}
	return t, size, nil
}

// Open opens a file of the inner FS, adopting it first if it is new to the
// FS.
func (f *FS) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	key := cleanName(name)
	op := Op{Kind: OpOpen, Path: name, File: f.w.liveNS[key]}
	if act := f.begin(&op); act.Fault != NoFault {
		return nil, f.fail(&op, act)
	}
	if err := f.adopt(name, key); err != nil {
		op.Err = err
		f.finish(&op)
		return nil, err
	}
	h, err := f.inner.Open(name, flag)
	op.File, op.Err = f.w.liveNS[key], err
	f.finish(&op)
	if err != nil {
		return nil, err
	}
	return f.wrap(h, op.File, name, flag != vfs.ReadWrite), nil
}

// Create creates a file in the inner FS. Its name is durable only after
// SyncDir on its directory.
func (f *FS) Create(name string) (vfs.File, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	op := Op{Kind: OpCreate, Path: name}
	if act := f.begin(&op); act.Fault != NoFault {
		return nil, f.fail(&op, act)
	}
	h, err := f.inner.Create(name)
	op.Err = err
	if err == nil {
		f.nextID++
		op.File = f.nextID
		f.known[cleanName(name)] = true
	}
	f.finish(&op)
	if err != nil {
		return nil, err
	}
	return f.wrap(h, op.File, name, false), nil
}

// Remove removes a file from the inner FS. The removal is durable only
// after SyncDir on its directory; until then a crash brings the file back
// with its durable contents.
func (f *FS) Remove(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	key := cleanName(name)
	op := Op{Kind: OpRemove, Path: name, File: f.w.liveNS[key]}
	if act := f.begin(&op); act.Fault != NoFault {
		return f.fail(&op, act)
	}
	if err := f.adopt(name, key); err != nil {
		op.Err = err
		f.finish(&op)
		return err
	}
	op.File = f.w.liveNS[key]
	op.Err = f.inner.Remove(name)
	f.finish(&op)
	return op.Err
}

// SyncDir syncs a directory of the inner FS, making the creations and
// removals of names in it durable.
func (f *FS) SyncDir(dir string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	op := Op{Kind: OpSyncDir, Path: dir}
	if act := f.begin(&op); act.Fault != NoFault {
		return f.fail(&op, act)
	}
	op.Err = f.inner.SyncDir(dir)
	f.finish(&op)
	return op.Err
}

// Stat stats a file of the inner FS.
func (f *FS) Stat(name string) (os.FileInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	op := Op{Kind: OpStat, Path: name, File: f.w.liveNS[cleanName(name)]}
	if act := f.begin(&op); act.Fault != NoFault {
		return nil, f.fail(&op, act)
	}
	fi, err := f.inner.Stat(name)
	op.Err = err
	f.finish(&op)
	return fi, err
}

// wrap returns the handle for h. Called with f.mu held.
func (f *FS) wrap(h vfs.File, id int, name string, readOnly bool) vfs.File {
	fh := &file{fs: f, inner: h, id: id, name: name, readOnly: readOnly}
	if f.handles[id] == nil {
		f.handles[id] = make(map[*file]bool)
	}
	f.handles[id][fh] = true
	if _, ok := h.(vfs.Allocator); ok {
		return allocFile{fh}
	}
	return fh
}

// file is an open file of an FS.
type file struct {
	fs       *FS
	inner    vfs.File
	id       int
	name     string
	readOnly bool
}

// allocFile is a file whose inner file implements vfs.Allocator.
type allocFile struct{ *file }

// op returns a new op of kind k on the file.
func (h *file) op(k OpKind, off, n int64) Op {
	return Op{Kind: k, File: h.id, Path: h.name, Offset: off, Length: n}
}

// ReadAt reads from the inner file. Reads are logged but change nothing.
func (h *file) ReadAt(p []byte, off int64) (int, error) {
	f := h.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	op := h.op(OpRead, off, int64(len(p)))
	if act := f.begin(&op); act.Fault != NoFault {
		return 0, f.fail(&op, act)
	}
	n, err := h.inner.ReadAt(p, off)
	op.Err = err
	f.finish(&op)
	return n, err
}

// WriteAt writes to the inner file and records a copy of p. The data is
// pending until a sync covers it.
func (h *file) WriteAt(p []byte, off int64) (int, error) {
	f := h.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	op := h.op(OpWrite, off, int64(len(p)))
	act := f.begin(&op)
	if len(p) > 0 {
		op.Data = bytes.Clone(p)
	}
	var n int
	var err error
	switch act.Fault {
	case NoFault:
		n, err = h.inner.WriteAt(p, off)
		if n > 0 {
			op.Written = []Extent{{off, int64(n)}}
		}
		op.Err = err
	case FaultShortWrite:
		if k := shortLen(act, op.Index, len(p)); k > 0 {
			if w, _ := h.inner.WriteAt(p[:k], off); w > 0 {
				n = w
				op.Written = []Extent{{off, int64(w)}}
			}
		}
		op.Fault, op.Err = act, injected(op, act)
		err = op.Err
	case FaultTear:
		for _, e := range tornExtents(act, op.Index, off, int64(len(p)), f.cfg.sectorSize) {
			at := e.Off - off
			if w, _ := h.inner.WriteAt(p[at:at+e.Len], e.Off); w > 0 {
				op.Written = append(op.Written, Extent{e.Off, int64(w)})
			}
		}
		op.Fault, op.Err = act, injected(op, act)
		err = op.Err
	default:
		return 0, f.fail(&op, act)
	}
	f.finish(&op)
	return n, err
}

// shortLen returns how much of an n-byte write a ShortWrite lets through:
// a seeded length in [0, n).
func shortLen(act Action, idx, n int) int {
	if n <= 0 {
		return 0
	}
	return int(mix(act.Seed, uint64(idx)) % uint64(n))
}

// tornExtents returns the sectors of [off, off+n) a TearThenFail writes: each
// sector (aligned to file offsets) independently, by the seed.
func tornExtents(act Action, idx int, off, n, sector int64) []Extent {
	var out []Extent
	if off < 0 || n <= 0 {
		return nil
	}
	for pos := off; pos < off+n; {
		s := pos / sector
		end := min((s+1)*sector, off+n)
		if mix(act.Seed, uint64(idx), uint64(s))&1 == 1 {
			out = append(out, Extent{pos, end - pos})
		}
		pos = end
	}
	return out
}

// Truncate truncates the inner file. The new size is pending until a sync;
// a shrink's discarded range may come back after a crash until then.
func (h *file) Truncate(size int64) error {
	f := h.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	op := h.op(OpTruncate, size, 0)
	if act := f.begin(&op); act.Fault != NoFault {
		return f.fail(&op, act)
	}
	op.Err = h.inner.Truncate(size)
	f.finish(&op)
	return op.Err
}

// Allocate allocates in the inner file. The size change is pending until a
// sync.
func (a allocFile) Allocate(off, n int64) error {
	h, f := a.file, a.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	op := h.op(OpAllocate, off, n)
	if act := f.begin(&op); act.Fault != NoFault {
		return f.fail(&op, act)
	}
	op.Err = h.inner.(vfs.Allocator).Allocate(off, n)
	f.finish(&op)
	return op.Err
}

// Sync fsyncs the inner file and makes all of the file durable.
func (h *file) Sync() error { return h.sync(OpSync, 0, 0) }

// Datasync fdatasyncs the inner file and makes its data and size durable.
func (h *file) Datasync() error { return h.sync(OpDatasync, 0, 0) }

// SyncRange syncs a range of the inner file and makes the data in the pages
// overlapping [off, off+n) durable, but not the size.
func (h *file) SyncRange(off, n int64) error { return h.sync(OpSyncRange, off, n) }

func (h *file) sync(k OpKind, off, n int64) error {
	f := h.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	op := h.op(k, off, n)
	act := f.begin(&op)
	switch act.Fault {
	case NoFault:
		var err error
		switch k {
		case OpSync:
			err = h.inner.Sync()
		case OpDatasync:
			err = h.inner.Datasync()
		default:
			err = h.inner.SyncRange(off, n)
		}
		op.Err = err
		f.finish(&op)
		return err
	case FaultFsyncDrop:
		ino := f.w.inodes[h.id]
		var dropped []Extent
		if ino != nil {
			lo, hi := int64(0), int64(1<<63-1)
			ok := true
			if k == OpSyncRange {
				lo, hi, ok = f.w.pageSpan(off, n)
			}
			if ok {
				dropped = f.w.droppable(ino, lo, hi)
			}
		}
		err := f.fail(&op, act)
		if len(dropped) > 0 {
			f.revert(ino, dropped)
		}
		return err
	default:
		return f.fail(&op, act)
	}
}

// revert makes the inner file's contents in the dropped extents what the
// world now says they are (the durable contents, where no pending truncate
// zeroed them): the dropped dirty pages are gone, and the next read sees
// what is on disk. It writes through one of the file's writable handles, or
// a handle opened for it. Errors are ignored: the inner FS is a test double
// here. Called with f.mu held.
func (f *FS) revert(ino *inode, dropped []Extent) {
	var w vfs.File
	for h := range f.handles[ino.id] {
		if !h.readOnly {
			w = h.inner
			break
		}
	}
	if w == nil {
		for name, id := range f.w.liveNS {
			if id == ino.id {
				if h, err := f.inner.Open(name, vfs.ReadWrite); err == nil {
					defer h.Close()
					w = h
				}
				break
			}
		}
	}
	if w == nil {
		return
	}
	for _, e := range dropped {
		end := min(e.Off+e.Len, ino.size)
		if e.Off >= end {
			continue
		}
		buf := make([]byte, end-e.Off)
		ino.liveRead(buf, e.Off)
		w.WriteAt(buf, e.Off)
	}
}

// Size returns the inner file's size.
func (h *file) Size() (int64, error) {
	f := h.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	op := h.op(OpSize, 0, 0)
	if act := f.begin(&op); act.Fault != NoFault {
		return 0, f.fail(&op, act)
	}
	size, err := h.inner.Size()
	op.Err = err
	f.finish(&op)
	return size, err
}

// Close closes the inner file. An injected fault still closes it, as
// close(2) releases the descriptor even when it reports an error.
func (h *file) Close() error {
	f := h.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	op := h.op(OpClose, 0, 0)
	if delete(f.handles[h.id], h); len(f.handles[h.id]) == 0 {
		delete(f.handles, h.id)
	}
	if act := f.begin(&op); act.Fault != NoFault {
		h.inner.Close()
		return f.fail(&op, act)
	}
	op.Err = h.inner.Close()
	f.finish(&op)
	return op.Err
}
