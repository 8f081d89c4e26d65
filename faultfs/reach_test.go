package faultfs_test

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"sort"
	"testing"

	"pgregory.net/rapid"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// The reachability oracle: a byte-by-byte model of one file's durability,
// written from the package documentation (not from world.go), that can
// list every crash state each persistence model allows, so that a test can
// require faultfs to produce each of them and nothing else.
//
// Every byte has a durable value and a history of pending changes, each
// made by one operation (its step): a write's byte, or the zero a shrinking
// truncate leaves where it discarded the byte. The file's size has a
// durable value and a history of pending sizes. Then:
//
//   - fsync and fdatasync make everything durable;
//   - sync_file_range over whole pages makes durable each byte of the pages
//     whose latest pending change is a write (that dirty data is written
//     back); a byte whose latest change is a truncate's discard has no dirty
//     data, so its history stays pending, and so does the size: until the
//     truncate is durable the discarded bytes may come back;
//   - a failed sync that drops dirty data forgets the pending writes in its
//     range (a truncate's discard stays pending), and the live bytes become
//     what is left;
//   - under reorder (page units) and torn (sector units) each unit holds
//     its durable contents or its contents after any one step that changed
//     it, independently; the size is its durable size or any pending size,
//     independently of the data;
//   - under prefix the changes up to some step survive, in order (data and
//     size alike).
type reachOracle struct {
	dur   []byte // durable bytes; beyond its end, zeros
	dsize int64
	hist  map[int64][]bchange
	live  []byte
	sizes []schange
	step  int
}

type bchange struct {
	step int
	val  byte
	cut  bool // a truncate's discard (val 0)
}

type schange struct {
	step int
	size int64
}

func newReachOracle() *reachOracle { return &reachOracle{hist: map[int64][]bchange{}} }

func (o *reachOracle) durAt(i int64) byte {
	if i < int64(len(o.dur)) {
		return o.dur[i]
	}
	return 0
}

func (o *reachOracle) setSize(n int64) {
	if n == int64(len(o.live)) {
		return
	}
	if n < int64(len(o.live)) {
		for i := n; i < int64(len(o.live)); i++ {
			o.hist[i] = append(o.hist[i], bchange{o.step, 0, true})
		}
		o.live = o.live[:n]
	} else {
		o.live = append(o.live, make([]byte, n-int64(len(o.live)))...)
	}
	o.sizes = append(o.sizes, schange{o.step, n})
}

func (o *reachOracle) write(p []byte, off int64) {
	o.step++
	if end := off + int64(len(p)); end > int64(len(o.live)) {
		o.setSize(end)
	}
	for j, b := range p {
		i := off + int64(j)
		o.live[i] = b
		o.hist[i] = append(o.hist[i], bchange{o.step, b, false})
	}
}

func (o *reachOracle) truncate(n int64) {
	o.step++
	o.setSize(n)
}

// allocate grows the file to cover [off, off+n).
func (o *reachOracle) allocate(off, n int64) {
	o.step++
	if off+n > int64(len(o.live)) {
		o.setSize(off + n)
	}
}

func (o *reachOracle) sync() {
	o.step++
	o.dur = bytes.Clone(o.live)
	o.dsize = int64(len(o.live))
	o.hist = map[int64][]bchange{}
	o.sizes = nil
}

// syncRange makes durable the bytes of [lo, hi) whose latest pending change
// is a write.
func (o *reachOracle) syncRange(lo, hi int64) {
	o.step++
	for i, h := range o.hist {
		if i < lo || i >= hi || h[len(h)-1].cut {
			continue
		}
		for int64(len(o.dur)) <= i {
			o.dur = append(o.dur, 0)
		}
		o.dur[i] = h[len(h)-1].val
		delete(o.hist, i)
	}
}

// drop forgets the pending writes in [lo, hi).
func (o *reachOracle) drop(lo, hi int64) {
	o.step++
	for i, h := range o.hist {
		if i < lo || i >= hi {
			continue
		}
		var keep []bchange
		for _, c := range h {
			if c.cut {
				keep = append(keep, c)
			}
		}
		if len(keep) == 0 {
			delete(o.hist, i)
		} else {
			o.hist[i] = keep
		}
		if i < int64(len(o.live)) {
			o.live[i] = o.durAt(i)
			if len(keep) > 0 {
				o.live[i] = 0
			}
		}
	}
}

func (o *reachOracle) durable() []byte {
	b := make([]byte, o.dsize)
	for i := range b {
		b[i] = o.durAt(int64(i))
	}
	return b
}

// at returns byte i after the pending changes up to step t survived.
func (o *reachOracle) at(i int64, t int) byte {
	v := o.durAt(i)
	for _, c := range o.hist[i] {
		if c.step > t {
			break
		}
		v = c.val
	}
	return v
}

// sizeSet returns the sizes a state may have.
func (o *reachOracle) sizeSet() []int64 {
	s := []int64{o.dsize}
	for _, c := range o.sizes {
		if !slices.Contains(s, c.size) {
			s = append(s, c.size)
		}
	}
	return s
}

// extent is how far any state's bytes can reach.
func (o *reachOracle) extent() int64 {
	n := slices.Max(o.sizeSet())
	return n
}

// unitVersions returns the distinct contents of unit u (U bytes): durable,
// then after each step that changed it.
func (o *reachOracle) unitVersions(u, U int64) [][]byte {
	var steps []int
	hs := make([][]bchange, U)
	for j := range hs {
		hs[j] = o.hist[u*U+int64(j)]
		for _, c := range hs[j] {
			steps = append(steps, c.step)
		}
	}
	sort.Ints(steps)
	steps = slices.Compact(steps)
	var vers [][]byte
	for _, t := range append([]int{-1}, steps...) {
		v := make([]byte, U)
		for j := range v {
			v[j] = o.durAt(u*U + int64(j))
			for _, c := range hs[j] {
				if c.step > t {
					break
				}
				v[j] = c.val
			}
		}
		if !slices.ContainsFunc(vers, func(x []byte) bool { return bytes.Equal(x, v) }) {
			vers = append(vers, v)
		}
	}
	return vers
}

// allowed returns every state model m allows, as file contents (strings),
// with unit size U (reorder: the page size; torn: the sector size), or
// ok false when there are more than limit.
func (o *reachOracle) allowed(m faultfs.Model, U int64, limit int) (map[string]bool, bool) {
	out := map[string]bool{}
	switch m {
	case faultfs.Process:
		out[string(o.live)] = true
		return out, true
	case faultfs.LoseUnsynced:
		out[string(o.durable())] = true
		return out, true
	case faultfs.Prefix:
		steps := []int{-1}
		for _, h := range o.hist {
			for _, c := range h {
				steps = append(steps, c.step)
			}
		}
		for _, c := range o.sizes {
			steps = append(steps, c.step)
		}
		for _, t := range steps {
			size := o.dsize
			for _, c := range o.sizes {
				if c.step <= t {
					size = c.size
				}
			}
			b := make([]byte, size)
			for i := range b {
				b[i] = o.at(int64(i), t)
			}
			out[string(b)] = true
		}
		return out, true
	}
	units := (o.extent() + U - 1) / U
	vers := make([][][]byte, units)
	total := len(o.sizeSet())
	for u := range units {
		vers[u] = o.unitVersions(u, U)
		if total *= len(vers[u]); total > limit {
			return nil, false
		}
	}
	choice := make([]int, units)
	for {
		full := make([]byte, units*U)
		for u, c := range choice {
			copy(full[int64(u)*U:], vers[u][c])
		}
		for _, size := range o.sizeSet() {
			out[string(full[:size])] = true
		}
		u := 0
		for ; u < len(choice); u++ {
			if choice[u]++; choice[u] < len(vers[u]) {
				break
			}
			choice[u] = 0
		}
		if u == len(choice) {
			return out, true
		}
	}
}

// produced returns the contents of file f in every state the point's
// enumeration yields for m, or ok false when the point has more than limit
// choices (so that States would sample).
func produced(t reachTB, p *faultfs.Point, m faultfs.Model, limit int) (map[string]bool, bool) {
	if p.Space(m) > uint64(limit) {
		return nil, false
	}
	out := map[string]bool{}
	for s := range p.States(m, 1, limit) {
		b, err := s.ReadFile("f")
		if err != nil {
			t.Fatalf("%v: %v", s, err)
		}
		out[string(b)] = true
	}
	return out, true
}

// sameStates reports how the allowed and produced sets differ.
func sameStates(allowed, got map[string]bool) error {
	var missing, extra []string
	for s := range allowed {
		if !got[s] {
			missing = append(missing, runs([]byte(s)))
		}
	}
	for s := range got {
		if !allowed[s] {
			extra = append(extra, runs([]byte(s)))
		}
	}
	if len(missing)+len(extra) == 0 {
		return nil
	}
	sort.Strings(missing)
	sort.Strings(extra)
	return fmt.Errorf("%d allowed states never produced %q; %d produced states not allowed %q", len(missing), missing, len(extra), extra)
}

// reachTB is what the helpers need of a *testing.T or *rapid.T.
type reachTB interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
}

// reachScenario is a small file system for the reachability tests: pages
// of 512 bytes, sectors of 256, one durable file "f".
type reachScenario struct {
	fsys *faultfs.FS
	f    vfs.File
	o    *reachOracle
}

const reachPage, reachSector = 512, 256

func newReachScenario(t reachTB, initial []byte) *reachScenario {
	t.Helper()
	mem := vfs.NewMem()
	h, err := mem.Create("f")
	if err == nil {
		_, err = h.WriteAt(initial, 0)
	}
	if err == nil {
		err = h.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
	fsys := faultfs.New(mem, faultfs.WithPageSize(reachPage), faultfs.WithSectorSize(reachSector))
	f, err := fsys.Open("f", vfs.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	o := newReachOracle()
	o.dur, o.dsize, o.live = bytes.Clone(initial), int64(len(initial)), bytes.Clone(initial)
	return &reachScenario{fsys: fsys, f: f, o: o}
}

func (x *reachScenario) pages(off, n int64) (int64, int64) {
	return off / reachPage * reachPage, (off + n + reachPage - 1) / reachPage * reachPage
}

// check compares, for every model but garbage, the states the oracle allows
// with those the point's enumeration yields, when both are small enough to
// list; it returns how many models it compared.
func (x *reachScenario) check(t reachTB, what string) int {
	t.Helper()
	const limit = 1 << 12
	p := x.fsys.Point()
	n := 0
	for _, m := range []faultfs.Model{faultfs.Process, faultfs.LoseUnsynced, faultfs.Prefix, faultfs.Reorder, faultfs.Torn} {
		U := int64(reachPage)
		if m == faultfs.Torn {
			U = reachSector
		}
		allowed, ok := x.o.allowed(m, U, limit)
		if !ok {
			continue
		}
		got, ok := produced(t, p, m, limit)
		if !ok {
			continue
		}
		if err := sameStates(allowed, got); err != nil {
			t.Fatalf("%s, %s: %v", what, m, err)
		}
		n++
	}
	return n
}

// TestSyncRangeKeepsPendingTruncate: a truncate followed by sync_file_range
// over the discarded range leaves the truncate pending, data and size
// alike, so a crash can bring back the old size with the old data (the
// truncate never reached the disk), as well as the new size, and every mix
// of pages the reorder model allows.
func TestSyncRangeKeepsPendingTruncate(t *testing.T) {
	x := newReachScenario(t, bytes.Repeat([]byte{'a'}, 1024))
	x.ok(t, x.f.Truncate(0))
	x.o.truncate(0)
	x.ok(t, x.f.SyncRange(0, 1024))
	x.o.syncRange(0, 1024)
	sameSet(t, "reorder after truncate and sync_file_range", states(t, x.fsys.Point(), faultfs.Reorder),
		[]string{"f=", "f=a*1024", "f=a*512 00*512", "f=00*512 a*512", "f=00*1024"})
	if x.check(t, "truncate, sync_file_range") != 5 {
		t.Fatal("not every model compared")
	}
	// A write after the truncate is dirty data: sync_file_range makes it
	// durable, while the rest of the discarded range stays pending.
	x.ok(t, writeAt(x.f, []byte("bb"), 100))
	x.o.write([]byte("bb"), 100)
	x.ok(t, x.f.SyncRange(0, 512))
	lo, hi := x.pages(0, 512)
	x.o.syncRange(lo, hi)
	if x.check(t, "then a write and sync_file_range") != 5 {
		t.Fatal("not every model compared")
	}
}

func (x *reachScenario) ok(t reachTB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func writeAt(f vfs.File, p []byte, off int64) error {
	_, err := f.WriteAt(p, off)
	return err
}

// TestEveryAllowedStateReachable runs small random workloads (writes,
// truncates, allocates, syncs, sync_file_range, dropped syncs) on a file of
// a few pages and, after every step, requires the states each model
// enumerates to be exactly the states the reachability oracle allows:
// every allowed state is produced, and nothing else.
func TestEveryAllowedStateReachable(t *testing.T) {
	compared := 0
	rapid.Check(t, func(rt *rapid.T) {
		init := bytes.Repeat([]byte{'a'}, rapid.IntRange(0, 3*reachPage).Draw(rt, "initial"))
		x := newReachScenario(rt, init)
		defer x.f.Close()
		steps := rapid.IntRange(1, 5).Draw(rt, "steps")
		for k := range steps {
			c := byte('b' + k)
			switch rapid.IntRange(0, 6).Draw(rt, "op") {
			case 0, 1:
				off := rapid.Int64Range(0, 3*reachPage).Draw(rt, "off")
				n := rapid.IntRange(1, reachPage).Draw(rt, "n")
				p := bytes.Repeat([]byte{c}, n)
				x.ok(rt, writeAt(x.f, p, off))
				x.o.write(p, off)
			case 2:
				n := rapid.Int64Range(0, 3*reachPage).Draw(rt, "size")
				x.ok(rt, x.f.Truncate(n))
				x.o.truncate(n)
			case 3:
				off := rapid.Int64Range(0, 3*reachPage).Draw(rt, "off")
				n := rapid.Int64Range(1, reachPage).Draw(rt, "n")
				x.ok(rt, x.f.(vfs.Allocator).Allocate(off, n))
				x.o.allocate(off, n)
			case 4:
				x.ok(rt, x.f.Datasync())
				x.o.sync()
			case 5:
				off := rapid.Int64Range(0, 3*reachPage).Draw(rt, "off")
				n := rapid.Int64Range(1, 2*reachPage).Draw(rt, "n")
				x.ok(rt, x.f.SyncRange(off, n))
				lo, hi := x.pages(off, n)
				x.o.syncRange(lo, hi)
			case 6:
				off := rapid.Int64Range(0, 3*reachPage).Draw(rt, "off")
				n := rapid.Int64Range(1, 2*reachPage).Draw(rt, "n")
				x.fsys.SetInjector(faultfs.FsyncDrop)
				err := x.f.SyncRange(off, n)
				x.fsys.SetInjector(nil)
				if !errors.Is(err, faultfs.ErrInjected) {
					rt.Fatalf("dropped sync_file_range: %v", err)
				}
				lo, hi := x.pages(off, n)
				x.o.drop(lo, hi)
			}
			compared += x.check(rt, fmt.Sprintf("step %d", k))
		}
	})
	if compared < 100 {
		t.Fatalf("only %d (step, model) pairs were small enough to compare", compared)
	}
	t.Logf("%d (step, model) pairs compared", compared)
}
