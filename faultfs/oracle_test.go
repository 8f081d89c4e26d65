package faultfs_test

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"testing"

	"pgregory.net/rapid"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// oracle is an independent, byte-array model of one file's durability, used
// to check faultfs's crash states on random workloads: the reachability
// oracle (reach_test.go: every byte's durable value and pending changes,
// the sizes a crash may leave) judged sector by sector.
type oracle struct {
	*reachOracle
	vstep int                // the step vers was computed at
	vers  map[int64][][]byte // sector -> its possible values, memoized
}

const osec, opage = 512, 4096

func newOracle() *oracle { return &oracle{reachOracle: newReachOracle()} }

// syncRange makes [lo, hi) (whole pages) durable, or with drop forgets the
// pending writes there.
func (o *oracle) syncRange(lo, hi int64, drop bool) {
	if drop {
		o.drop(lo, hi)
	} else {
		o.reachOracle.syncRange(lo, hi)
	}
}

// allows reports whether contents b is a state the oracle allows, and why
// not: its size is a possible size, and each sector holds one of its
// possible values.
func (o *oracle) allows(b []byte) error {
	size := int64(len(b))
	if !slices.Contains(o.sizeSet(), size) {
		return fmt.Errorf("size %d is not one of %v", size, o.sizeSet())
	}
	for s := int64(0); s*osec < size; s++ {
		got := b[s*osec : min(size, (s+1)*osec)]
		if o.vers == nil || o.vstep != o.step {
			o.vers, o.vstep = map[int64][][]byte{}, o.step
		}
		cands, memo := o.vers[s]
		if !memo {
			cands = o.unitVersions(s, osec)
			o.vers[s] = cands
		}
		ok := false
		for _, c := range cands {
			if bytes.Equal(c[:len(got)], got) {
				ok = true
				break
			}
		}
		if !ok {
			return fmt.Errorf("sector %d holds %s, not one of its %d possible values", s, runs(got), len(cands))
		}
	}
	return nil
}

// describe renders a state's file f, or "absent".
func describe(s *faultfs.State) string {
	b, err := s.ReadFile("f")
	if err != nil {
		return "absent"
	}
	return runs(b)
}

// TestOracle drives faultfs with random writes, truncates, allocates,
// syncs and dropped syncs, and checks after every step that the process and
// lose-unsynced states are exactly the oracle's live and durable contents,
// that every sampled torn, reorder and prefix state is one the oracle
// allows, and finally that replaying the recording gives the same states at
// every point.
func TestOracle(t *testing.T) {
	rapid.Check(t, func(rt *rapid.T) {
		mem := vfs.NewMem()
		fsys := faultfs.New(mem)
		f, err := fsys.Create("f")
		if err != nil {
			rt.Fatal(err)
		}
		defer f.Close()
		if err := f.Sync(); err != nil {
			rt.Fatal(err)
		}
		if err := fsys.SyncDir("."); err != nil {
			rt.Fatal(err)
		}
		o := newOracle()
		type snap struct{ live, dur []byte }
		snaps := map[int]snap{}
		setup := len(fsys.Log())
		snaps[setup] = snap{nil, nil}
		seed := uint64(0)

		check := func() {
			snaps[len(fsys.Log())] = snap{bytes.Clone(o.live), o.durable()}
			p := fsys.Point()
			get := func(s *faultfs.State) []byte {
				b, err := s.ReadFile("f")
				if err != nil {
					rt.Fatalf("state %v: %v", s, err)
				}
				return b
			}
			if b := get(p.Sample(faultfs.Process, 0)); !bytes.Equal(b, o.live) {
				rt.Fatalf("process state %s, live %s", runs(b), runs(o.live))
			}
			if b := get(p.Sample(faultfs.LoseUnsynced, 0)); !bytes.Equal(b, o.durable()) {
				rt.Fatalf("lose-unsynced state %s, durable %s", runs(b), runs(o.durable()))
			}
			seed++
			for _, m := range []faultfs.Model{faultfs.Torn, faultfs.Reorder, faultfs.Prefix, faultfs.Garbage} {
				var first []byte
				rs, ok := p.Changeable(m, "f")
				if !ok {
					rt.Fatalf("%s: the binding of f is pending", m)
				}
				pf, ok := p.PendingUnits(m, "f")
				if !ok {
					rt.Fatalf("%s: PendingUnits: the binding of f is pending", m)
				}
				for s := range p.States(m, seed, 12) {
					b := get(s)
					if err := byChoices(b, pf, s.Choices("f")); err != nil {
						rt.Fatalf("%v: %v", s, err)
					}
					if m != faultfs.Garbage {
						if err := o.allows(b); err != nil {
							rt.Fatalf("%v: %v", s, err)
						}
					}
					// Outside Changeable every state holds the first's bytes.
					if first == nil {
						first = b
						continue
					}
					if err := sameOutside(first, b, rs); err != nil {
						rt.Fatalf("%s: changeable %v: %v (state %v)", m, rs, err, s)
					}
				}
			}
		}
		pageSpan := func(off, n int64) (int64, int64) {
			return off / opage * opage, (off + n + opage - 1) / opage * opage
		}

		rt.Repeat(map[string]func(*rapid.T){
			"write": func(rt *rapid.T) {
				off := rapid.Int64Range(0, 20000).Draw(rt, "off")
				n := rapid.IntRange(1, 3000).Draw(rt, "n")
				c := byte(rapid.IntRange('a', 'z').Draw(rt, "byte"))
				p := bytes.Repeat([]byte{c}, n)
				if _, err := f.WriteAt(p, off); err != nil {
					rt.Fatal(err)
				}
				o.write(p, off)
				check()
			},
			"truncate": func(rt *rapid.T) {
				n := rapid.Int64Range(0, 24000).Draw(rt, "size")
				if err := f.Truncate(n); err != nil {
					rt.Fatal(err)
				}
				o.truncate(n)
				check()
			},
			"allocate": func(rt *rapid.T) {
				off := rapid.Int64Range(0, 20000).Draw(rt, "off")
				n := rapid.Int64Range(1, 5000).Draw(rt, "n")
				if err := f.(vfs.Allocator).Allocate(off, n); err != nil {
					rt.Fatal(err)
				}
				if off+n > int64(len(o.live)) {
					o.truncate(off + n)
				}
				check()
			},
			"sync": func(rt *rapid.T) {
				var err error
				if rapid.Bool().Draw(rt, "data") {
					err = f.Datasync()
				} else {
					err = f.Sync()
				}
				if err != nil {
					rt.Fatal(err)
				}
				o.sync()
				check()
			},
			"sync-range": func(rt *rapid.T) {
				off := rapid.Int64Range(0, 20000).Draw(rt, "off")
				n := rapid.Int64Range(1, 9000).Draw(rt, "n")
				if err := f.SyncRange(off, n); err != nil {
					rt.Fatal(err)
				}
				lo, hi := pageSpan(off, n)
				o.syncRange(lo, hi, false)
				check()
			},
			"dropped-sync": func(rt *rapid.T) {
				fsys.SetInjector(faultfs.FsyncDrop)
				err := f.Sync()
				fsys.SetInjector(nil)
				if !errors.Is(err, faultfs.ErrInjected) {
					rt.Fatalf("dropped sync: %v", err)
				}
				o.syncRange(0, 1<<62, true)
				check()
			},
			"dropped-sync-range": func(rt *rapid.T) {
				off := rapid.Int64Range(0, 20000).Draw(rt, "off")
				n := rapid.Int64Range(1, 9000).Draw(rt, "n")
				lo, hi := pageSpan(off, n)
				fsys.SetInjector(faultfs.FsyncDrop)
				err := f.SyncRange(off, n)
				fsys.SetInjector(nil)
				if !errors.Is(err, faultfs.ErrInjected) {
					rt.Fatalf("dropped sync-range: %v", err)
				}
				o.syncRange(lo, hi, true)
				check()
			},
		})

		// Replay: every point of the recording equals the live run, and a
		// point built incrementally (Points) yields the same states as one
		// built from scratch (Point).
		rec := fsys.Recording()
		for p := range rec.Points() {
			fresh, err := rec.Point(p.Ops())
			if err != nil {
				rt.Fatal(err)
			}
			for _, m := range []faultfs.Model{faultfs.Torn, faultfs.Reorder, faultfs.Prefix} {
				if a, b := p.Space(m), fresh.Space(m); a != b {
					rt.Fatalf("point %d, %s: Space %d replayed incrementally, %d from scratch", p.Ops(), m, a, b)
				}
				var a, b []string
				for s := range p.States(m, 5, 10) {
					a = append(a, describe(s))
				}
				for s := range fresh.States(m, 5, 10) {
					b = append(b, describe(s))
				}
				if !slices.Equal(a, b) {
					rt.Fatalf("point %d, %s: incremental states %q, from scratch %q", p.Ops(), m, a, b)
				}
			}
			want, ok := snaps[p.Ops()]
			if p.Ops() < setup {
				continue
			}
			if !ok {
				rt.Fatalf("replay yielded point %d, which no step ended at", p.Ops())
			}
			for _, c := range []struct {
				m    faultfs.Model
				want []byte
			}{{faultfs.Process, want.live}, {faultfs.LoseUnsynced, want.dur}} {
				b, err := p.Sample(c.m, 0).ReadFile("f")
				if err != nil || !bytes.Equal(b, c.want) {
					rt.Fatalf("replay point %d, %s: %s (%v), live run had %s", p.Ops(), c.m, runs(b), err, runs(c.want))
				}
			}
		}
	})
}

// sameOutside reports where a and b differ outside the ranges rs (a byte
// beyond a file's end differs from any byte).
func sameOutside(a, b []byte, rs []faultfs.Extent) error {
	in := func(i int64) bool {
		for _, r := range rs {
			if i >= r.Off && i < r.Off+r.Len {
				return true
			}
		}
		return false
	}
	for i := int64(0); i < int64(max(len(a), len(b))); i++ {
		if in(i) {
			continue
		}
		if i >= int64(len(a)) || i >= int64(len(b)) {
			return fmt.Errorf("sizes %d and %d differ at byte %d outside the changeable ranges", len(a), len(b), i)
		}
		if a[i] != b[i] {
			return fmt.Errorf("byte %d differs (%#x, %#x) outside the changeable ranges", i, a[i], b[i])
		}
	}
	return nil
}

// byChoices checks a state's file contents b against its pending units and
// choices: its size lies in [MinSize, MaxSize], and each pending unit holds
// the version the state chose (where the file reaches; garbage excepted).
func byChoices(b []byte, pf faultfs.PendingFile, choices []uint32) error {
	if n := int64(len(b)); n < pf.MinSize || n > pf.MaxSize {
		return fmt.Errorf("size %d outside [%d, %d]", n, pf.MinSize, pf.MaxSize)
	}
	if len(choices) != len(pf.Units) {
		return fmt.Errorf("%d choices for %d pending units", len(choices), len(pf.Units))
	}
	for i, u := range pf.Units {
		if i > 0 && pf.Units[i-1].Off >= u.Off {
			return fmt.Errorf("pending units not sorted at %d", i)
		}
		c := choices[i]
		if int(c) == len(u.Versions) {
			continue // garbage
		}
		if int(c) > len(u.Versions) {
			return fmt.Errorf("unit at %d: choice %d of %d versions", u.Off, c, len(u.Versions))
		}
		if u.Off >= int64(len(b)) {
			continue
		}
		end := min(u.Off+pf.Unit, int64(len(b)))
		if want := u.Versions[c][:end-u.Off]; !bytes.Equal(b[u.Off:end], want) {
			return fmt.Errorf("unit at %d holds other bytes than its chosen version %d", u.Off, c)
		}
	}
	return nil
}
