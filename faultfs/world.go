package faultfs

import (
	"path"
	"sort"
)

// The world is what faultfs knows about durability: for every file (inode)
// its durable contents and size and the writes and size changes not yet
// durable, and for every name its durable and live binding with the
// directory operations not yet durable. The live FS keeps one, updated by
// apply after each operation; a replay rebuilds one from the op log with the
// same apply, so both agree by construction.

// record is a pending (not yet durable) change of a file's data: data
// written at off, or zeros (data == nil) for the range a shrinking truncate
// discarded.
type record struct {
	idx  int // op index
	off  int64
	n    int64
	data []byte // nil: zeros
}

func (r record) end() int64 { return r.off + r.n }

// sizeEv is a change of a file's size that is not yet durable.
type sizeEv struct {
	idx  int
	size int64
}

// nsEv is a directory-entry change not yet durable: name now binds file
// (created), or nothing (file == 0: removed).
type nsEv struct {
	idx  int
	name string
	file int
}

// inode is one file's durability state.
type inode struct {
	id    int
	dur   tree  // durable data
	dsize int64 // durable size
	size  int64 // live size
	recs  []record
	sizes []sizeEv
}

// world is the durability state of everything faultfs knows about.
type world struct {
	cfg    config
	epoch  uint64
	inodes map[int]*inode
	durNS  map[string]int // durable name -> inode
	liveNS map[string]int // live name -> inode
	nsPend []nsEv
}

func newWorld(cfg config) *world {
	return &world{
		cfg:    cfg,
		epoch:  newEpoch(),
		inodes: make(map[int]*inode),
		durNS:  make(map[string]int),
		liveNS: make(map[string]int),
	}
}

// cleanName is how names are keyed: path.Clean, so "a", "./a" and "a/" are
// one name.
func cleanName(name string) string { return path.Clean(name) }

// adopt adds a file that existed before faultfs saw it: fully durable, with
// contents t and size size.
func (w *world) adopt(name string, id int, t tree, size int64) {
	w.inodes[id] = &inode{id: id, dur: t, dsize: size, size: size}
	w.durNS[name] = id
	w.liveNS[name] = id
	w.epoch = newEpoch() // t may be shared: never mutate its nodes in place
}

// apply updates the world for op, which has already happened, and reports
// whether anything that could survive a crash changed.
func (w *world) apply(op *Op) bool {
	switch op.Kind {
	case OpCreate:
		if op.Err != nil {
			return false
		}
		name := cleanName(op.Path)
		w.inodes[op.File] = &inode{id: op.File}
		w.liveNS[name] = op.File
		w.nsPend = append(w.nsPend, nsEv{idx: op.Index, name: name, file: op.File})
		return true
	case OpRemove:
		if op.Err != nil {
			return false
		}
		name := cleanName(op.Path)
		delete(w.liveNS, name)
		w.nsPend = append(w.nsPend, nsEv{idx: op.Index, name: name})
		return true
	case OpSyncDir:
		if op.Err != nil {
			return false
		}
		return w.syncDir(cleanName(op.Path))
	}
	ino := w.inodes[op.File]
	if ino == nil {
		return false
	}
	switch op.Kind {
	case OpWrite:
		for _, e := range op.Written {
			if e.Len <= 0 {
				continue
			}
			at := e.Off - op.Offset
			w.write(ino, record{idx: op.Index, off: e.Off, n: e.Len, data: op.Data[at : at+e.Len]})
		}
		return len(op.Written) > 0
	case OpTruncate:
		if op.Err != nil {
			return false
		}
		return w.setSize(ino, op.Index, op.Offset)
	case OpAllocate:
		if op.Err != nil || op.Length <= 0 {
			return false
		}
		if end := op.Offset + op.Length; end > ino.size {
			return w.setSize(ino, op.Index, end)
		}
		return false
	case OpSync, OpDatasync:
		if op.Fault.Fault == FaultFsyncDrop {
			return w.flushRange(ino, 0, 1<<63-1, true)
		}
		if op.Err != nil {
			return false
		}
		return w.flush(ino)
	case OpSyncRange:
		if op.Err != nil && op.Fault.Fault != FaultFsyncDrop {
			return false
		}
		lo, hi, ok := w.pageSpan(op.Offset, op.Length)
		if !ok {
			return false
		}
		return w.flushRange(ino, lo, hi, op.Fault.Fault == FaultFsyncDrop)
	}
	return false
}

func (w *world) write(ino *inode, r record) {
	ino.recs = append(ino.recs, r)
	if r.end() > ino.size {
		ino.size = r.end()
		ino.sizes = append(ino.sizes, sizeEv{idx: r.idx, size: ino.size})
	}
}

// setSize records a truncate (or an extending allocate) to size.
func (w *world) setSize(ino *inode, idx int, size int64) bool {
	if size == ino.size {
		return false
	}
	if size < ino.size {
		ino.recs = append(ino.recs, record{idx: idx, off: size, n: ino.size - size})
	}
	ino.size = size
	ino.sizes = append(ino.sizes, sizeEv{idx: idx, size: size})
	return true
}

// flush makes all of ino durable (fsync, fdatasync).
func (w *world) flush(ino *inode) bool {
	changed := len(ino.recs) > 0 || len(ino.sizes) > 0 || ino.dsize != ino.size
	for _, r := range ino.recs {
		ino.dur = ino.dur.write(r.data, r.off, r.n, w.epoch)
	}
	ino.recs = nil // never truncate in place: snapshots share the array
	ino.sizes = nil
	ino.dsize = ino.size
	return changed
}

// pageSpan widens [off, off+n) to whole pages of the configured page size,
// as sync_file_range does. ok is false for an empty or invalid range.
func (w *world) pageSpan(off, n int64) (lo, hi int64, ok bool) {
	if off < 0 || n <= 0 {
		return 0, 0, false
	}
	ps := w.cfg.pageSize
	end := off + n
	if end < off { // overflow
		end = 1<<63 - 1
	}
	lo = off - off%ps
	hi = end
	if r := end % ps; r != 0 {
		if end > 1<<63-1-(ps-r) {
			hi = 1<<63 - 1
		} else {
			hi = end + ps - r
		}
	}
	return lo, hi, true
}

// flushRange makes the pending data in [lo, hi) durable (sync_file_range):
// each byte whose latest pending change is a write gets that value durably,
// and its pending history is dropped. A byte whose latest pending change is
// a truncate's discard (a zero record) has no dirty data to write back, so
// its history stays pending, like the size: until the truncate is durable
// the discarded bytes may come back, with the old size. With drop it
// instead discards the written data in the range (a failed fsync's dropped
// dirty pages); the ranges of pending truncates stay pending: a truncate is
// not dirty data.
func (w *world) flushRange(ino *inode, lo, hi int64, drop bool) bool {
	if drop {
		var gone []Extent
		for _, r := range ino.recs {
			if s, e := max(r.off, lo), min(r.end(), hi); s < e && r.data != nil {
				gone = append(gone, Extent{s, e - s})
			}
		}
		return w.forget(ino, gone, true)
	}
	// Walk the records from the latest: the first one to cover a byte of
	// the range decides it.
	var decided, durable []Extent
	for i := len(ino.recs) - 1; i >= 0; i-- {
		r := ino.recs[i]
		s, e := max(r.off, lo), min(r.end(), hi)
		if s >= e {
			continue
		}
		for _, g := range gaps(decided, s, e) {
			if r.data != nil {
				ino.dur = ino.dur.write(r.slice(g.Off, g.Off+g.Len), g.Off, g.Len, w.epoch)
				durable = append(durable, g)
			}
			decided = addExtent(decided, g)
		}
	}
	return w.forget(ino, durable, false)
}

// forget removes from ino's pending records the bytes in the extents xs
// (which may overlap); with dataOnly, zero records keep them.
func (w *world) forget(ino *inode, xs []Extent, dataOnly bool) bool {
	if len(xs) == 0 {
		return false
	}
	var set []Extent
	for _, x := range xs {
		set = addExtent(set, x)
	}
	var keep []record
	for _, r := range ino.recs {
		if dataOnly && r.data == nil {
			keep = append(keep, r)
			continue
		}
		for _, g := range gaps(set, r.off, r.end()) {
			keep = append(keep, record{idx: r.idx, off: g.Off, n: g.Len, data: r.slice(g.Off, g.Off+g.Len)})
		}
	}
	ino.recs = keep // a new slice: snapshots share the old one
	return true
}

// gaps returns the parts of [s, e) that the sorted, disjoint extents xs do
// not cover, in order.
func gaps(xs []Extent, s, e int64) []Extent {
	var out []Extent
	for _, x := range xs {
		if x.Off+x.Len <= s {
			continue
		}
		if x.Off >= e {
			break
		}
		if x.Off > s {
			out = append(out, Extent{s, x.Off - s})
		}
		s = max(s, x.Off+x.Len)
		if s >= e {
			return out
		}
	}
	if s < e {
		out = append(out, Extent{s, e - s})
	}
	return out
}

// addExtent adds x to the sorted, disjoint extents xs, merging where they
// touch, and returns the result (a new slice).
func addExtent(xs []Extent, x Extent) []Extent {
	out := make([]Extent, 0, len(xs)+1)
	lo, hi := x.Off, x.Off+x.Len
	placed := false
	for _, y := range xs {
		switch {
		case y.Off+y.Len < lo:
			out = append(out, y)
		case y.Off > hi:
			if !placed {
				out = append(out, Extent{lo, hi - lo})
				placed = true
			}
			out = append(out, y)
		default:
			lo, hi = min(lo, y.Off), max(hi, y.Off+y.Len)
		}
	}
	if !placed {
		out = append(out, Extent{lo, hi - lo})
	}
	return out
}

// slice returns r's data for [s, e) (nil for a zero record).
func (r record) slice(s, e int64) []byte {
	if r.data == nil {
		return nil
	}
	return r.data[s-r.off : e-r.off]
}

// droppable returns the extents of pending written data of ino inside
// [lo, hi): what a failed sync of that range drops.
func (w *world) droppable(ino *inode, lo, hi int64) []Extent {
	var out []Extent
	for _, r := range ino.recs {
		if s, e := max(r.off, lo), min(r.end(), hi); s < e && r.data != nil {
			out = append(out, Extent{s, e - s})
		}
	}
	return out
}

// liveRead fills p with ino's live contents at off: the durable contents
// with every pending record applied in order.
func (ino *inode) liveRead(p []byte, off int64) {
	ino.dur.readAt(p, off)
	end := off + int64(len(p))
	for _, r := range ino.recs {
		s, e := max(r.off, off), min(r.end(), end)
		if s >= e {
			continue
		}
		if r.data == nil {
			clear(p[s-off : e-off])
		} else {
			copy(p[s-off:e-off], r.data[s-r.off:e-r.off])
		}
	}
}

// syncDir makes the pending entry changes in dir durable.
func (w *world) syncDir(dir string) bool {
	var keep []nsEv
	changed := false
	for _, ev := range w.nsPend {
		if path.Dir(ev.name) != dir {
			keep = append(keep, ev)
			continue
		}
		changed = true
		if ev.file == 0 {
			delete(w.durNS, ev.name)
		} else {
			w.durNS[ev.name] = ev.file
		}
	}
	if changed {
		w.nsPend = keep
	}
	return changed
}

// freeze returns an immutable copy of w holding only the files some name
// can reach after a crash, and moves w to a fresh epoch so that later
// mutations never touch the copy's pages.
func (w *world) freeze() *world {
	f := &world{
		cfg:    w.cfg,
		inodes: make(map[int]*inode),
		durNS:  make(map[string]int, len(w.durNS)),
		liveNS: make(map[string]int, len(w.liveNS)),
		nsPend: w.nsPend[:len(w.nsPend):len(w.nsPend)],
	}
	reach := func(id int) {
		if ino := w.inodes[id]; ino != nil && f.inodes[id] == nil {
			c := *ino
			c.recs = c.recs[:len(c.recs):len(c.recs)]
			c.sizes = c.sizes[:len(c.sizes):len(c.sizes)]
			f.inodes[id] = &c
		}
	}
	for name, id := range w.durNS {
		f.durNS[name] = id
		reach(id)
	}
	for name, id := range w.liveNS {
		f.liveNS[name] = id
		reach(id)
	}
	for _, ev := range w.nsPend {
		reach(ev.file)
	}
	w.epoch = newEpoch()
	return f
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
