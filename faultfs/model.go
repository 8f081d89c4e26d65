package faultfs

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"fmt"
	"iter"
	"maps"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"sync"
)

// Model is a persistence model: which of the pending (not yet durable)
// changes a crash keeps.
//
// Every model starts from the durable state: each file's durable data and
// size and each directory's durable entries. What differs is what else
// survives:
//
//   - Process: everything. The process died but the kernel did not: every
//     completed call is in the page cache and reaches the disk. Exactly one
//     state, the live one.
//   - LoseUnsynced: nothing. Power loss on a file system that keeps nothing
//     it was not told to sync. Exactly one state, the durable one.
//   - Reorder: each page (4 KiB unless WithPageSize) independently holds its
//     durable value or its value after any one of the pending writes that
//     touched it: write-back of a page cache that flushes dirty pages in any
//     order, at any moment (so between any two writes).
//   - Torn: as Reorder in sectors (512 B unless WithSectorSize), so that one
//     write can be torn: a disk that only guarantees sector atomicity.
//   - Prefix: the first k pending operations survive, in order, for each k
//     from 0 to all of them: an ordered journal (data=journal) that loses
//     its tail. Sizes and directory entries are those at the cut.
//   - Garbage: as Torn, but a sector that did not get its latest value may
//     instead hold seeded random bytes, as FoundationDB's and SQLite's
//     crash simulators do: a disk that tore inside a sector, or firmware
//     that wrote the wrong data. QCOW has no checksums, so a writer can only
//     be judged on robustness under this model.
//
// In Reorder, Torn and Garbage, each file's size after the crash is,
// independently of its data, its durable size or any size it had since its
// size was last made durable (by Sync or Datasync; SyncRange does not make
// the size durable), and each name whose creation or removal is pending is
// independently bound as it was at any point since its directory was last
// synced (so a new file may or may not exist; a removed one may be back).
// Data beyond the chosen size is cut; a size beyond the surviving data
// reads as zeros.
type Model int

// The persistence models.
const (
	Process Model = iota
	LoseUnsynced
	Reorder
	Torn
	Prefix
	Garbage
	numModels
)

var modelNames = [numModels]string{
	Process:      "process",
	LoseUnsynced: "lose-unsynced",
	Reorder:      "reorder",
	Torn:         "torn",
	Prefix:       "prefix",
	Garbage:      "garbage",
}

// String returns the model's name: "process", "lose-unsynced", "reorder",
// "torn", "prefix" or "garbage".
func (m Model) String() string {
	if m.valid() {
		return modelNames[m]
	}
	return fmt.Sprintf("model(%d)", int(m))
}

// ParseModel is the inverse of Model.String.
func ParseModel(s string) (Model, error) {
	for m, name := range modelNames {
		if name == s {
			return Model(m), nil
		}
	}
	return 0, fmt.Errorf("faultfs: unknown persistence model %q", s)
}

// Models returns every model, weakest promise last.
func Models() []Model {
	return []Model{Process, LoseUnsynced, Prefix, Reorder, Torn, Garbage}
}

func (m Model) valid() bool { return m >= 0 && m < numModels }

// unit returns the unit size the model works in.
func (m Model) unit(cfg config) int64 {
	if m == Torn || m == Garbage {
		return cfg.sectorSize
	}
	return cfg.pageSize
}

// DefaultLimit is the default bound on the states visited per crash point:
// when a point has at most this many candidate states, all are visited;
// otherwise a seeded sample of this many.
const DefaultLimit = 4096

// Recording is an immutable op log with the files that existed before it,
// from FS.Recording: everything needed to rebuild the world after any
// prefix of the log.
type Recording struct {
	cfg  config
	ops  []Op
	base []baseFile
}

// Ops returns the recorded operations. The slice and the ops' Data are
// shared and must not be modified.
func (r *Recording) Ops() []Op { return r.ops }

// Len returns the number of recorded operations.
func (r *Recording) Len() int { return len(r.ops) }

func (r *Recording) newWorld() *world {
	w := newWorld(r.cfg)
	for _, b := range r.base {
		w.adopt(b.name, b.id, b.t, b.size)
	}
	return w
}

// Points iterates the crash points of the recording: point 0, before any
// operation, and the point after each operation that changed what can
// survive a crash (a write, truncate, allocate, sync, create, remove or
// directory sync that had an effect). Points after reads, stats, closes and
// failed operations are skipped: they equal the point before. Each Point is
// independent of the iteration and of every other Point.
func (r *Recording) Points() iter.Seq[*Point] {
	return func(yield func(*Point) bool) {
		w := r.newWorld()
		p := newPoint(w.freeze(), 0)
		if !yield(p) {
			return
		}
		for i := range r.ops {
			if w.apply(&r.ops[i]) {
				next := newPoint(w.freeze(), i+1)
				next.prev = p.handOn()
				p = next
				if !yield(p) {
					return
				}
			}
		}
	}
}

// Point returns the crash point after the first n operations.
func (r *Recording) Point(n int) (*Point, error) {
	if n < 0 || n > len(r.ops) {
		return nil, fmt.Errorf("faultfs: crash point %d out of range [0, %d]", n, len(r.ops))
	}
	w := r.newWorld()
	for i := range n {
		w.apply(&r.ops[i])
	}
	return newPoint(w.freeze(), n), nil
}

// Replay visits, at every crash point of the recording, the states of model
// m that Point.States yields with seed and limit, and returns how many it
// visited. It stops at the first error visit returns, and returns it.
func (r *Recording) Replay(m Model, seed uint64, limit int, visit func(*State) error) (int, error) {
	if !m.valid() {
		return 0, fmt.Errorf("faultfs: unknown model %d", int(m))
	}
	n := 0
	for p := range r.Points() {
		for s := range p.States(m, seed, limit) {
			n++
			if err := visit(s); err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// Point is one crash point: the world as a crash right after some
// operation would leave it, before a persistence model picks what of the
// pending changes survives. A Point is immutable and safe for concurrent
// use.
type Point struct {
	ops int
	w   *world

	mu   sync.Mutex
	lays map[int64]*layout
	// prev holds the layouts the previous point of a Points iteration had
	// built, to build this point's incrementally; entries are dropped once
	// used, so points never chain.
	prev map[int64]*layout
}

func newPoint(w *world, ops int) *Point {
	return &Point{ops: ops, w: w, lays: make(map[int64]*layout)}
}

// Ops returns the number of operations applied at this point: the crash
// happens after op Ops()-1.
func (p *Point) Ops() int { return p.ops }

// Pending reports how many units (of the model's size) have more than one
// possible value at this point, over all files.
func (p *Point) Pending(m Model) int {
	n := 0
	for _, fl := range p.layout(m.unit(p.w.cfg)).files {
		n += len(fl.units)
	}
	return n
}

// Space returns the number of choices model m has at this point: the
// product of every unit's, size's and name's number of possible values
// (for Prefix, the number of cuts), saturating at math.MaxUint64. It bounds
// the number of distinct states from above; choices that differ only in
// data beyond the chosen size, or in a file that does not exist, give the
// same state.
func (p *Point) Space(m Model) uint64 {
	switch m {
	case Process, LoseUnsynced:
		return 1
	case Prefix:
		return uint64(len(p.layout(m.unit(p.w.cfg)).events)) + 1
	}
	lay := p.layout(m.unit(p.w.cfg))
	n := uint64(1)
	for d := range lay.dims {
		r := uint64(lay.radix(m, d))
		if n > math.MaxUint64/r {
			return math.MaxUint64
		}
		n *= r
	}
	return n
}

// hist is one dimension of choice: a unit's data, a file's size or a
// name's binding. raw[j] is the distinct value index after the first j
// pending events (raw[0] = 0, the durable value); idx[j-1] is event j's op
// index, ascending.
type hist struct {
	raw  []uint32
	idx  []int
	n    uint32 // distinct values
	unit bool   // a data unit (gets a garbage value under Garbage)
}

// at returns the value index after the events up to op index c.
func (h *hist) at(c int) uint32 {
	return h.raw[sort.SearchInts(h.idx, c+1)]
}

func (h *hist) latest() uint32 { return h.raw[len(h.raw)-1] }

// layout is a point's choice structure for one unit size.
type layout struct {
	unit   int64
	names  []*nameLay
	files  []*fileLay
	byID   map[int]*fileLay
	dims   []*hist
	events []int // ops at which some dimension changes value, ascending
}

type nameLay struct {
	name string
	vers []int // distinct bindings (inode id, 0 = absent); vers[0] is durable
	h    hist
	dim  int // -1 when vers has one value
}

type fileLay struct {
	ino     *inode
	sizes   []int64 // distinct sizes; sizes[0] is durable
	sizeH   hist
	sizeDim int        // -1 when sizes has one value
	units   []int64    // pending unit indexes, sorted: a unit's position is its slot
	vers    [][][]byte // per slot, distinct unit contents; [0] is durable
	hs      []hist     // per slot
	dim0    int
	pos     int // index in layout.files
}

// radix returns how many values dimension d has under model m.
func (l *layout) radix(m Model, d int) uint32 {
	h := l.dims[d]
	if m == Garbage && h.unit {
		return h.n + 1
	}
	return h.n
}

// handOn returns the layouts the next point of a Points iteration may
// extend: those p built, and for unit sizes p never built, the ones p was
// handed. So a caller that visits only every k-th point still extends
// layouts instead of building each from scratch.
func (p *Point) handOn() map[int64]*layout {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := maps.Clone(p.lays)
	for unit, l := range p.prev {
		if out[unit] == nil {
			out[unit] = l
		}
	}
	return out
}

func (p *Point) layout(unit int64) *layout {
	p.mu.Lock()
	defer p.mu.Unlock()
	if l := p.lays[unit]; l != nil {
		return l
	}
	l := buildLayout(p.w, unit, p.prev[unit])
	p.lays[unit] = l
	delete(p.prev, unit)
	return l
}

// buildLayout builds the choice structure of world w for unit size unit.
// With prev, the layout of an earlier point of the same replay, the unit
// versions of each file whose durable contents are unchanged and whose
// pending records only grew are extended rather than rebuilt.
func buildLayout(w *world, unit int64, prev *layout) *layout {
	l := &layout{unit: unit, byID: make(map[int]*fileLay)}

	// Names: every name durable or with a pending change.
	pend := make(map[string][]nsEv)
	for _, ev := range w.nsPend {
		pend[ev.name] = append(pend[ev.name], ev)
	}
	all := make(map[string]bool)
	for name := range w.durNS {
		all[name] = true
	}
	for name := range pend {
		all[name] = true
	}
	ids := make(map[int]bool)
	for _, name := range sortedKeys(all) {
		nl := &nameLay{name: name, vers: []int{w.durNS[name]}, h: hist{raw: []uint32{0}}}
		for _, ev := range pend[name] {
			nl.h.raw = append(nl.h.raw, uint32(addDistinct(&nl.vers, ev.file)))
			nl.h.idx = append(nl.h.idx, ev.idx)
		}
		nl.h.n = uint32(len(nl.vers))
		for _, id := range nl.vers {
			if id != 0 {
				ids[id] = true
			}
		}
		if len(nl.vers) == 1 && nl.vers[0] == 0 {
			continue
		}
		nl.dim = -1
		if len(nl.vers) > 1 {
			nl.dim = len(l.dims)
			l.dims = append(l.dims, &nl.h)
		}
		l.names = append(l.names, nl)
	}

	idList := make([]int, 0, len(ids))
	for id := range ids {
		idList = append(idList, id)
	}
	sort.Ints(idList)
	var slab []byte
	alloc := func(n int64) []byte {
		if int64(len(slab)) < n {
			slab = make([]byte, max(n, 256<<10))
		}
		b := slab[:n:n]
		slab = slab[n:]
		return b
	}
	for _, id := range idList {
		ino := w.inodes[id]
		if ino == nil {
			continue
		}
		fl := &fileLay{ino: ino, sizes: []int64{ino.dsize}, sizeH: hist{raw: []uint32{0}}}
		for _, ev := range ino.sizes {
			fl.sizeH.raw = append(fl.sizeH.raw, uint32(addDistinct(&fl.sizes, ev.size)))
			fl.sizeH.idx = append(fl.sizeH.idx, ev.idx)
		}
		fl.sizeH.n = uint32(len(fl.sizes))
		fl.sizeDim = -1
		if len(fl.sizes) > 1 {
			fl.sizeDim = len(l.dims)
			l.dims = append(l.dims, &fl.sizeH)
		}
		var pf *fileLay
		if prev != nil {
			pf = prev.byID[id]
		}
		if pf != nil && extends(pf.ino, ino) {
			extendUnits(fl, pf, ino, ino.recs[len(pf.ino.recs):], unit, alloc)
		} else {
			extendUnits(fl, nil, ino, ino.recs, unit, alloc)
		}
		fl.dim0 = len(l.dims)
		for i := range fl.hs {
			l.dims = append(l.dims, &fl.hs[i])
		}
		fl.pos = len(l.files)
		l.files = append(l.files, fl)
		l.byID[id] = fl
	}
	// The prefix model's events: the ops at which some choice changes value.
	// (Ops that changed nothing surviving are not cuts of their own, and the
	// set does not depend on how the layout was built.)
	events := make(map[int]bool)
	for _, h := range l.dims {
		for j := 1; j < len(h.raw); j++ {
			if h.raw[j] != h.raw[j-1] {
				events[h.idx[j-1]] = true
			}
		}
	}
	for idx := range events {
		l.events = append(l.events, idx)
	}
	sort.Ints(l.events)
	return l
}

// addDistinct returns the index of v in *vs, appending it if absent.
func addDistinct[T comparable](vs *[]T, v T) int {
	for i, x := range *vs {
		if x == v {
			return i
		}
	}
	*vs = append(*vs, v)
	return len(*vs) - 1
}

// extends reports whether cur is old with records appended: the same
// durable tree, and old's records a prefix of cur's (the world only appends
// to a record slice, and replaces it whenever it removes records).
func extends(old, cur *inode) bool {
	if old.dur != cur.dur || len(old.recs) > len(cur.recs) {
		return false
	}
	return len(old.recs) == 0 || &old.recs[0] == &cur.recs[0]
}

// extendUnits fills fl's units: those of ino with more than one possible
// value, and their distinct values (the durable contents, then the contents
// after each pending record that touched the unit). pf, if not nil, holds
// the units of an earlier snapshot of ino whose pending records were ino's
// minus recs; only the units recs touch are recomputed, the rest are
// shared. Zero records (from truncates) only matter where the durable
// contents or a record put data, so only those units are visited: a
// truncate of a huge sparse file costs nothing.
func extendUnits(fl *fileLay, pf *fileLay, ino *inode, recs []record, U int64, alloc func(int64) []byte) {
	if pf == nil {
		pf = &fileLay{}
	}
	if len(recs) == 0 {
		fl.units, fl.vers, fl.hs = pf.units, pf.vers, pf.hs
		return
	}
	set := make(map[int64]bool)
	for _, r := range recs {
		if r.data != nil {
			for u := r.off / U; u <= (r.end()-1)/U; u++ {
				set[u] = true
			}
		}
	}
	for _, r := range recs {
		if r.data != nil {
			continue
		}
		ino.dur.ascend(r.off>>pageShift, (r.end()+pageBytes-1)>>pageShift, func(idx int64, _ *page) bool {
			s, e := max(idx<<pageShift, r.off), min((idx+1)<<pageShift, r.end())
			for u := s / U; u <= (e-1)/U; u++ {
				set[u] = true
			}
			return true
		})
		i, _ := slices.BinarySearch(pf.units, r.off/U)
		for ; i < len(pf.units) && pf.units[i]*U < r.end(); i++ {
			set[pf.units[i]] = true
		}
	}
	touched := make([]int64, 0, len(set))
	for u := range set {
		touched = append(touched, u)
	}
	slices.Sort(touched)
	touch := make([][]int32, len(touched))
	for ri, r := range recs {
		i, _ := slices.BinarySearch(touched, r.off/U)
		for ; i < len(touched) && touched[i]*U < r.end(); i++ {
			touch[i] = append(touch[i], int32(ri))
		}
	}

	type result struct {
		vers [][]byte
		h    hist
	}
	res := make([]result, len(touched))
	scratch := make([]byte, U)
	for i, u := range touched {
		base := u * U
		var vers [][]byte
		var h hist
		if s, ok := slices.BinarySearch(pf.units, u); ok {
			// Clipped, so appends copy: pf's slices are shared with its states.
			vers = slices.Clip(pf.vers[s])
			ph := pf.hs[s]
			h = hist{raw: slices.Clip(ph.raw), idx: slices.Clip(ph.idx), unit: true}
		} else {
			v0 := alloc(U)
			ino.dur.readAt(v0, base)
			vers = [][]byte{v0}
			h = hist{raw: make([]uint32, 1, len(touch[i])+1), unit: true}
		}
		copy(scratch, vers[h.latest()])
		for j, ri := range touch[i] {
			r := recs[ri]
			s, e := max(r.off, base), min(r.end(), base+U)
			if r.data == nil {
				clear(scratch[s-base : e-base])
			} else {
				copy(scratch[s-base:e-base], r.data[s-r.off:e-r.off])
			}
			if j+1 < len(touch[i]) && recs[touch[i][j+1]].idx == r.idx {
				// One operation's records (the pieces a sync_file_range
				// left of it) change the unit at once: no version holds
				// some of them and not the others.
				continue
			}
			k := -1
			for j, v := range vers {
				if bytes.Equal(v, scratch) {
					k = j
					break
				}
			}
			if k < 0 {
				nv := alloc(U)
				copy(nv, scratch)
				vers = append(vers, nv)
				k = len(vers) - 1
			}
			h.raw = append(h.raw, uint32(k))
			h.idx = append(h.idx, r.idx)
		}
		h.n = uint32(len(vers))
		res[i] = result{vers, h}
	}

	// Merge pf's untouched units with the recomputed ones, in unit order,
	// keeping only units with more than one value.
	n := len(pf.units) + len(touched)
	fl.units = make([]int64, 0, n)
	fl.vers = make([][][]byte, 0, n)
	fl.hs = make([]hist, 0, n)
	add := func(u int64, vers [][]byte, h hist) {
		if len(vers) < 2 {
			return
		}
		fl.units = append(fl.units, u)
		fl.vers = append(fl.vers, vers)
		fl.hs = append(fl.hs, h)
	}
	i, j := 0, 0
	for i < len(pf.units) || j < len(touched) {
		switch {
		case j == len(touched) || (i < len(pf.units) && pf.units[i] < touched[j]):
			add(pf.units[i], pf.vers[i], pf.hs[i])
			i++
		default:
			if i < len(pf.units) && pf.units[i] == touched[j] {
				i++
			}
			add(touched[j], res[j].vers, res[j].h)
			j++
		}
	}
}

// unitBytes returns the contents of slot s with value c: a recorded
// version, or (c == number of versions, under Garbage) seeded garbage.
func (fl *fileLay) unitBytes(s int32, c uint32, U int64, gseed uint64) []byte {
	if v := fl.vers[s]; int(c) < len(v) {
		return v[c]
	}
	return garbage(gseed, fl.ino.id, fl.units[s], U)
}

// garbage returns U seeded random bytes for unit u of file id.
func garbage(gseed uint64, id int, u, U int64) []byte {
	r := rand.NewPCG(mix(gseed, uint64(id)), uint64(u))
	b := make([]byte, (U+7)&^7)
	for i := 0; i < len(b); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64())
	}
	return b[:U]
}

// enum enumerates the states of one model at one point.
type enum struct {
	p     *Point
	l     *layout
	m     Model
	seed  uint64
	gseed uint64
	seen  map[uint64]bool
	n     int
	bound []bool // scratch: files bound by the current vector
}

func (p *Point) newEnum(m Model, seed uint64) *enum {
	l := p.layout(m.unit(p.w.cfg))
	return &enum{
		p: p, l: l, m: m, seed: seed,
		gseed: mix(SubSeed(seed, "faultfs/garbage"), uint64(p.ops)),
		seen:  make(map[uint64]bool),
		bound: make([]bool, len(l.files)),
	}
}

// rng returns the sampling source for the point.
func (e *enum) rng() *rand.Rand {
	return rand.New(rand.NewPCG(SubSeed(e.seed, "faultfs/states/"+e.m.String()), uint64(e.p.ops)))
}

func (e *enum) zero() []uint32 { return make([]uint32, len(e.l.dims)) }

func (e *enum) latest() []uint32 {
	v := e.zero()
	for d, h := range e.l.dims {
		v[d] = h.latest()
	}
	return v
}

// cut returns the vector of the prefix of k pending events.
func (e *enum) cut(k int) []uint32 {
	c := -1
	if k > 0 {
		c = e.l.events[min(k, len(e.l.events))-1]
	}
	v := e.zero()
	for d, h := range e.l.dims {
		v[d] = h.at(c)
	}
	return v
}

// random returns a seeded vector: uniform over every dimension, or (to
// reach the corners uniform sampling rarely hits) a prefix cut or the
// durable or latest state with a few dimensions changed.
func (e *enum) random(r *rand.Rand) []uint32 {
	nd := len(e.l.dims)
	var v []uint32
	switch r.IntN(4) {
	case 0, 1:
		return e.uniform(r)
	case 2:
		v = e.cut(r.IntN(len(e.l.events) + 1))
	default:
		if r.IntN(2) == 0 {
			v = e.zero()
		} else {
			v = e.latest()
		}
	}
	if nd > 0 {
		for range 1 + r.IntN(3) {
			d := r.IntN(nd)
			v[d] = r.Uint32N(e.l.radix(e.m, d))
		}
	}
	return v
}

// uniform returns a vector with every dimension drawn uniformly. Small
// radices (all but pathological ones) take 16 random bits each, four per
// draw from r: (bits*radix)>>16 is uniform within radix/65536.
func (e *enum) uniform(r *rand.Rand) []uint32 {
	v := e.zero()
	var pool uint64
	left := 0
	for d := range v {
		n := e.l.radix(e.m, d)
		if n > 1<<8 {
			v[d] = r.Uint32N(n)
			continue
		}
		if left == 0 {
			pool, left = r.Uint64(), 4
		}
		v[d] = uint32(((pool & 0xffff) * uint64(n)) >> 16)
		pool >>= 16
		left--
	}
	return v
}

// canon rewrites v so that equal states have equal vectors, and returns
// its hash: dimensions of files no name binds, and units beyond a file's
// chosen size, become 0; a unit straddling the size takes the lowest value
// with the same bytes below the size.
func (e *enum) canon(v []uint32) uint64 {
	l := e.l
	clear(e.bound)
	for _, nl := range l.names {
		b := nl.vers[0]
		if nl.dim >= 0 {
			b = nl.vers[v[nl.dim]]
		}
		if fl := l.byID[b]; fl != nil {
			e.bound[fl.pos] = true
		}
	}
	for fi, fl := range l.files {
		if !e.bound[fi] {
			if fl.sizeDim >= 0 {
				v[fl.sizeDim] = 0
			}
			clear(v[fl.dim0 : fl.dim0+len(fl.units)])
			continue
		}
		size := fl.sizes[0]
		if fl.sizeDim >= 0 {
			size = fl.sizes[v[fl.sizeDim]]
		}
		first, _ := slices.BinarySearch(fl.units, size/l.unit) // first unit at or past the size's unit
		for s := first; s < len(fl.units); s++ {
			d := fl.dim0 + s
			start := fl.units[s] * l.unit
			if start >= size {
				v[d] = 0
				continue
			}
			c := v[d]
			cb := fl.unitBytes(int32(s), c, l.unit, e.gseed)[:size-start]
			for k := uint32(0); k < c; k++ {
				if bytes.Equal(fl.unitBytes(int32(s), k, l.unit, e.gseed)[:size-start], cb) {
					v[d] = k
					break
				}
			}
		}
	}
	// A multiply-xorshift hash of the non-zero (dimension, value) pairs,
	// finalized with SplitMix64.
	h := uint64(14695981039346656037)
	for d, x := range v {
		if x != 0 {
			h = (h ^ (uint64(x)<<32 | uint64(d))) * 0x9e3779b97f4a7c15
			h ^= h >> 29
		}
	}
	return splitmix64(h)
}

// emit canonicalizes v and, if the state is new, yields it.
func (e *enum) emit(v []uint32, yield func(*State) bool) bool {
	key := e.canon(v)
	if e.seen[key] {
		return true
	}
	e.seen[key] = true
	s := e.state(v, key)
	e.n++
	return yield(s)
}

// States iterates distinct crash states of model m at this point: all of
// them when Space(m) <= limit, else up to limit distinct ones sampled with
// seed (the durable state and the latest state first, then seeded draws).
// limit <= 0 selects DefaultLimit. Identical states are yielded once. The
// same point, model, seed and limit always yield the same states in the
// same order. Each state is independent: it may be kept, read and written
// after the iteration moves on.
//
// Order in exhaustive mode: Process and LoseUnsynced yield their one state;
// Prefix yields the cuts k = 0, 1, ... in order; the others count through
// the choices with the first dimension fastest, starting from the durable
// state.
func (p *Point) States(m Model, seed uint64, limit int) iter.Seq[*State] {
	return func(yield func(*State) bool) {
		if !m.valid() {
			return
		}
		if limit <= 0 {
			limit = DefaultLimit
		}
		e := p.newEnum(m, seed)
		switch m {
		case Process:
			e.emit(e.latest(), yield)
			return
		case LoseUnsynced:
			e.emit(e.zero(), yield)
			return
		}
		space := p.Space(m)
		if space <= uint64(limit) {
			if m == Prefix {
				for k := 0; k <= len(e.l.events); k++ {
					if !e.emit(e.cut(k), yield) {
						return
					}
				}
				return
			}
			v := e.zero()
			for {
				if !e.emit(slices.Clone(v), yield) {
					return
				}
				d := 0
				for ; d < len(v); d++ {
					if v[d]++; v[d] < e.l.radix(m, d) {
						break
					}
					v[d] = 0
				}
				if d == len(v) {
					return
				}
			}
		}
		r := e.rng()
		if !e.emit(e.zero(), yield) || !e.emit(e.latest(), yield) {
			return
		}
		for tries := 0; e.n < limit && tries < 4*limit+16; tries++ {
			var v []uint32
			if m == Prefix {
				v = e.cut(r.IntN(len(e.l.events) + 1))
			} else {
				v = e.random(r)
			}
			if !e.emit(v, yield) {
				return
			}
		}
	}
}

// Sample returns one crash state of model m at this point, chosen by seed:
// the one state of Process and LoseUnsynced, a seeded cut for Prefix, and
// for the others a seeded choice for every unit, size and name.
func (p *Point) Sample(m Model, seed uint64) *State {
	if !m.valid() {
		m = LoseUnsynced
	}
	e := p.newEnum(m, seed)
	var v []uint32
	switch m {
	case Process:
		v = e.latest()
	case LoseUnsynced:
		v = e.zero()
	case Prefix:
		v = e.cut(e.rng().IntN(len(e.l.events) + 1))
	default:
		v = e.uniform(e.rng())
	}
	return e.state(v, e.canon(v))
}

// PendingFile is what the crash states of one file at one point may differ
// in, unit by unit: the finest description a checker can use to judge many
// states of a point by what each one chose (see State.Choices).
type PendingFile struct {
	// Unit is the model's unit size in bytes.
	Unit int64
	// Units are the file's pending units, sorted by offset.
	Units []PendingUnit
	// MinSize and MaxSize are the smallest and largest sizes a state may
	// give the file. Bytes at or beyond a state's size are not in the file.
	MinSize, MaxSize int64
}

// PendingUnit is one unit of a file that a crash may leave holding any of
// several contents.
type PendingUnit struct {
	// Off is the unit's byte offset in the file.
	Off int64
	// Versions are the distinct contents the unit may hold, each Unit
	// bytes; Versions[0] is the durable one. They are shared with every
	// state of the point and must not be modified.
	Versions [][]byte
}

// PendingUnits returns the pending units and possible sizes of the file named
// name under model m at this point. ok is false, as for Changeable, when the
// name's binding itself is pending; a name that exists in no state has no
// units and sizes 0. Under Garbage a unit may also hold seeded random bytes,
// which Versions does not list (State.Choices gives len(Versions) then).
func (p *Point) PendingUnits(m Model, name string) (pf PendingFile, ok bool) {
	l := p.layout(m.unit(p.w.cfg))
	pf.Unit = l.unit
	fl, ok := l.fileOf(name)
	if !ok || fl == nil {
		return pf, ok
	}
	pf.Units = make([]PendingUnit, len(fl.units))
	for i, u := range fl.units {
		pf.Units[i] = PendingUnit{Off: u * l.unit, Versions: fl.vers[i]}
	}
	pf.MinSize, pf.MaxSize = slices.Min(fl.sizes), slices.Max(fl.sizes)
	return pf, true
}

// fileOf returns the layout of the file the name is bound to in every
// state; ok is false when the binding is pending, and fl is nil when the
// name exists in no state.
func (l *layout) fileOf(name string) (fl *fileLay, ok bool) {
	name = cleanName(name)
	for _, nl := range l.names {
		if nl.name == name {
			if nl.dim >= 0 {
				return nil, false
			}
			return l.byID[nl.vers[0]], true
		}
	}
	return nil, true
}

// Changeable returns the byte ranges of the file named name in which two
// crash states of model m at this point may differ: its pending units and,
// when its size is pending, the range between its smallest and largest
// possible sizes. Outside them every state of the point holds the same
// bytes, so a checker that has judged one state can judge the others by
// what they may change. The ranges are sorted and do not overlap. ok is
// false when the name's binding itself is pending (the file may be absent,
// or another file): then nothing can be assumed. A name that exists in no
// state has no ranges.
func (p *Point) Changeable(m Model, name string) (rs []Extent, ok bool) {
	l := p.layout(m.unit(p.w.cfg))
	fl, ok := l.fileOf(name)
	if !ok || fl == nil {
		return nil, ok
	}
	for _, u := range fl.units { // sorted
		off := u * l.unit
		if n := len(rs); n > 0 && rs[n-1].Off+rs[n-1].Len >= off {
			rs[n-1].Len = max(rs[n-1].Len, off+l.unit-rs[n-1].Off)
			continue
		}
		rs = append(rs, Extent{Off: off, Len: l.unit})
	}
	if len(fl.sizes) > 1 {
		lo, hi := slices.Min(fl.sizes), slices.Max(fl.sizes)
		rs = append(rs, Extent{Off: lo, Len: hi - lo})
		slices.SortFunc(rs, func(a, b Extent) int { return cmp.Compare(a.Off, b.Off) })
		merged := rs[:1]
		for _, r := range rs[1:] {
			last := &merged[len(merged)-1]
			if last.Off+last.Len >= r.Off {
				last.Len = max(last.Len, r.Off+r.Len-last.Off)
				continue
			}
			merged = append(merged, r)
		}
		rs = merged
	}
	return rs, true
}
