package faultfs_test

import (
	"bytes"
	"errors"
	"slices"
	"syscall"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// Two unsynced one-sector writes to different sectors of one page.
func TestTwoSectorWrites(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 1024))
	x.write(f, fill('b', 512), 0)
	x.write(f, fill('c', 512), 512)
	p := x.fs.Point()

	// torn: each sector independently: 2 x 2.
	sameSet(t, "torn", states(t, p, faultfs.Torn), []string{
		"f=a*1024", "f=b*512 a*512", "f=a*512 c*512", "f=b*512 c*512",
	})
	// reorder: one 4 KiB page, so its value is a prefix version: the second
	// write cannot reach the disk without the first.
	sameSet(t, "reorder", states(t, p, faultfs.Reorder), []string{
		"f=a*1024", "f=b*512 a*512", "f=b*512 c*512",
	})
	sameSet(t, "lose-unsynced", states(t, p, faultfs.LoseUnsynced), []string{"f=a*1024"})
	sameSet(t, "process", states(t, p, faultfs.Process), []string{"f=b*512 c*512"})
	got := states(t, p, faultfs.Prefix)
	if want := []string{"f=a*1024", "f=b*512 a*512", "f=b*512 c*512"}; !slices.Equal(got, want) {
		t.Fatalf("prefix: got %q, want %q in that order", got, want)
	}
	if n := p.Space(faultfs.Torn); n != 4 {
		t.Errorf("Space(torn) = %d, want 4", n)
	}
}

// Writes in different pages move independently under reorder, and a
// smaller page size splits a page.
func TestReorderUnits(t *testing.T) {
	for _, c := range []struct {
		name  string
		page  int64
		wantN int
	}{
		{"4KiB-pages", 4096, 3}, // both writes in page 0: prefix versions only
		{"512B-pages", 512, 4},  // separate units: any subset
	} {
		t.Run(c.name, func(t *testing.T) {
			x := newFx(t, faultfs.WithPageSize(c.page))
			f := x.durableFile("f", fill('a', 1024))
			x.write(f, fill('b', 512), 0)
			x.write(f, fill('c', 512), 512)
			if got := states(t, x.fs.Point(), faultfs.Reorder); len(got) != c.wantN {
				t.Fatalf("reorder with %d-byte pages: %d states %q, want %d", c.page, len(got), got, c.wantN)
			}
		})
	}
	x := newFx(t)
	f := x.durableFile("f", fill('a', 8192))
	x.write(f, fill('b', 100), 10)   // page 0
	x.write(f, fill('c', 100), 5000) // page 1
	sameSet(t, "two pages", states(t, x.fs.Point(), faultfs.Reorder), []string{
		"f=a*8192",
		"f=a*10 b*100 a*8082",
		"f=a*5000 c*100 a*3092",
		"f=a*10 b*100 a*4890 c*100 a*3092",
	})
}

// The same sector written twice has three versions; writing the durable
// value back adds none.
func TestSameSectorVersions(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 512))
	x.write(f, fill('b', 512), 0)
	x.write(f, fill('c', 512), 0)
	sameSet(t, "torn", states(t, x.fs.Point(), faultfs.Torn), []string{"f=a*512", "f=b*512", "f=c*512"})
	x.write(f, fill('a', 512), 0)
	sameSet(t, "torn after rewriting the durable value", states(t, x.fs.Point(), faultfs.Torn),
		[]string{"f=a*512", "f=b*512", "f=c*512"})
	got := states(t, x.fs.Point(), faultfs.Prefix)
	if want := []string{"f=a*512", "f=b*512", "f=c*512"}; !slices.Equal(got, want) {
		t.Fatalf("prefix: %q, want %q (the last cut equals the first)", got, want)
	}
}

// Prefix: k pending operations give k+1 states, in order, across files and
// including size changes.
func TestPrefixOrder(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 2048))
	g := x.durableFile("g", fill('z', 512))
	x.write(f, fill('b', 512), 1024)
	x.write(g, fill('y', 512), 0)
	x.write(f, fill('c', 512), 0)
	x.ok("truncate", f.Truncate(1536))
	got := states(t, x.fs.Point(), faultfs.Prefix)
	want := []string{
		"f=a*2048;g=z*512",
		"f=a*1024 b*512 a*512;g=z*512",
		"f=a*1024 b*512 a*512;g=y*512",
		"f=c*512 a*512 b*512 a*512;g=y*512",
		"f=c*512 a*512 b*512;g=y*512",
	}
	if !slices.Equal(got, want) {
		t.Fatalf("prefix:\n got %q\nwant %q", got, want)
	}
}

// sync_file_range makes data durable but not the size; fdatasync makes the
// size durable.
func TestSyncRangeLosesSize(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", nil)
	x.write(f, fill('b', 8192), 0) // extends the file from 0 to 8192
	x.ok("SyncRange", f.SyncRange(0, 8192))
	p := x.fs.Point()
	sameSet(t, "lose-unsynced after sync_file_range", states(t, p, faultfs.LoseUnsynced), []string{"f="})
	// Under torn, the data is durable: whatever size survives shows it.
	sameSet(t, "torn after sync_file_range", states(t, p, faultfs.Torn), []string{"f=", "f=b*8192"})

	x.ok("Datasync", f.Datasync())
	sameSet(t, "lose-unsynced after fdatasync", states(t, x.fs.Point(), faultfs.LoseUnsynced), []string{"f=b*8192"})

	// Within the durable size, sync_file_range makes exactly the pages of
	// its range durable.
	x.write(f, fill('c', 100), 4000) // straddles pages 0 and 1
	x.ok("SyncRange", f.SyncRange(10, 1))
	sameSet(t, "lose-unsynced after a one-page sync_file_range", states(t, x.fs.Point(), faultfs.LoseUnsynced),
		[]string{"f=b*4000 c*96 b*4096"})
	sameSet(t, "process", states(t, x.fs.Point(), faultfs.Process), []string{"f=b*4000 c*100 b*4092"})
}

// A new file exists after a crash only once its directory is synced; a
// removal is undone until then.
func TestDirectoryDurability(t *testing.T) {
	x := newFx(t)
	f, err := x.fs.Create("dir/new")
	x.ok("Create", err)
	x.write(f, fill('n', 512), 0)
	x.ok("Sync", f.Sync())
	x.ok("SyncDir(other)", x.fs.SyncDir("other"))
	p := x.fs.Point()
	sameSet(t, "lose-unsynced before SyncDir", states(t, p, faultfs.LoseUnsynced), []string{""})
	sameSet(t, "torn before SyncDir", states(t, p, faultfs.Torn), []string{"", "dir/new=n*512"})
	x.ok("SyncDir", x.fs.SyncDir("dir"))
	sameSet(t, "lose-unsynced after SyncDir", states(t, x.fs.Point(), faultfs.LoseUnsynced), []string{"dir/new=n*512"})

	x.write(f, fill('m', 512), 0) // pending when removed
	x.ok("Remove", x.fs.Remove("dir/new"))
	p = x.fs.Point()
	sameSet(t, "lose-unsynced after Remove", states(t, p, faultfs.LoseUnsynced), []string{"dir/new=n*512"})
	sameSet(t, "process after Remove", states(t, p, faultfs.Process), []string{""})
	sameSet(t, "torn after Remove", states(t, p, faultfs.Torn), []string{"", "dir/new=n*512", "dir/new=m*512"})
	x.ok("SyncDir", x.fs.SyncDir("dir/"))
	sameSet(t, "lose-unsynced after SyncDir", states(t, x.fs.Point(), faultfs.LoseUnsynced), []string{""})
	sameSet(t, "torn after SyncDir", states(t, x.fs.Point(), faultfs.Torn), []string{""})
}

// A failed fsync that drops its dirty data: the data never reaches any
// crash state, and live reads show the durable contents again.
func TestFsyncDrop(t *testing.T) {
	for _, kind := range []faultfs.OpKind{faultfs.OpSync, faultfs.OpDatasync, faultfs.OpSyncRange} {
		t.Run(kind.String(), func(t *testing.T) {
			x := newFx(t)
			f := x.durableFile("f", fill('a', 8192))
			x.write(f, fill('b', 4096), 0) // page 0: dropped
			x.write(f, fill('c', 4096), 4096)
			x.fs.SetInjector(faultfs.Rule(faultfs.Kinds(faultfs.KindSet(kind)), faultfs.FsyncDrop))
			var err error
			switch kind {
			case faultfs.OpSync:
				err = f.Sync()
			case faultfs.OpDatasync:
				err = f.Datasync()
			default:
				err = f.SyncRange(0, 4096)
			}
			if !errors.Is(err, syscall.EIO) || !errors.Is(err, faultfs.ErrInjected) {
				t.Fatalf("failed %s: err = %v, want EIO wrapping ErrInjected", kind, err)
			}
			x.fs.SetInjector(nil)
			buf := make([]byte, 8192)
			if _, err := f.ReadAt(buf, 0); err != nil {
				t.Fatal(err)
			}
			live := "a*4096 c*4096" // only page 0 was covered by sync-range
			if kind != faultfs.OpSyncRange {
				live = "a*8192"
			}
			if got := runs(buf); got != live {
				t.Fatalf("live contents after the dropped %s: %s, want %s", kind, got, live)
			}
			// A later successful sync cannot bring the dropped page back.
			x.ok("Sync", f.Sync())
			x.write(f, fill('d', 512), 6000)
			for _, m := range faultfs.Models() {
				for s := range x.fs.Point().States(m, 7, 1<<12) {
					b, err := s.ReadFile("f")
					x.ok("ReadFile", err)
					if bytes.Contains(b, []byte("bbbbbbbb")) {
						t.Fatalf("%s state %v holds the dropped page", m, s)
					}
				}
			}
		})
	}
}

// The crash action: that op and every later one fail with ErrCrashed, and
// the crash states are those just before it.
func TestCrashAction(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 1024))
	x.write(f, fill('b', 512), 0)
	at := len(x.fs.Log()) + 1 // the second write from here
	x.fs.SetInjector(faultfs.Rule(faultfs.OnIndex(at), faultfs.Crash))
	x.write(f, fill('c', 512), 512)
	if _, err := f.WriteAt(fill('d', 512), 0); !errors.Is(err, faultfs.ErrCrashed) || !errors.Is(err, faultfs.ErrInjected) {
		t.Fatalf("write at the crash: err = %v, want ErrCrashed and ErrInjected", err)
	}
	for name, err := range map[string]error{
		"Sync":    f.Sync(),
		"SyncDir": x.fs.SyncDir("."),
		"Remove":  x.fs.Remove("f"),
		"Close":   f.Close(),
	} {
		if !errors.Is(err, faultfs.ErrCrashed) {
			t.Errorf("%s after the crash: err = %v, want ErrCrashed", name, err)
		}
	}
	if _, err := x.fs.Open("f", vfs.ReadOnly); !errors.Is(err, faultfs.ErrCrashed) {
		t.Errorf("Open after the crash: err = %v, want ErrCrashed", err)
	}
	if !x.fs.Crashed() {
		t.Error("Crashed() = false")
	}
	for _, c := range []struct {
		m    faultfs.Model
		want string
	}{
		{faultfs.Process, "f=b*512 c*512"},
		{faultfs.LoseUnsynced, "f=a*1024"},
	} {
		s, err := x.fs.CrashState(c.m, 1)
		x.ok("CrashState", err)
		if got := image(t, s); got != c.want {
			t.Errorf("%s after the crash: %s, want %s", c.m, got, c.want)
		}
	}
}

// Garbage: random bytes appear only in units with pending writes, and only
// instead of a value other than the latest.
func TestGarbage(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", cat(fill('a', 512), fill('k', 512), fill('a', 512)))
	x.write(f, fill('b', 512), 0)
	x.write(f, fill('b', 512), 1024)
	p := x.fs.Point()
	imgs := states(t, p, faultfs.Garbage)
	if len(imgs) != 9 {
		t.Fatalf("garbage: %d states, want 3 x 3 = 9:\n%q", len(imgs), imgs)
	}
	sawGarbage := 0
	for s := range p.States(faultfs.Garbage, 1, 100) {
		b, _ := s.ReadFile("f")
		if !bytes.Equal(b[512:1024], fill('k', 512)) {
			t.Fatalf("state %v: the sector without pending writes changed: %s", s, runs(b))
		}
		for _, sec := range [][]byte{b[:512], b[1024:]} {
			if !bytes.Equal(sec, fill('a', 512)) && !bytes.Equal(sec, fill('b', 512)) {
				sawGarbage++
			}
		}
	}
	if sawGarbage != 6 { // each pending sector is garbage in 3 of the 9 states
		t.Fatalf("garbage sectors seen: %d, want 6", sawGarbage)
	}
}

// The same seed gives the same states; another seed a different sample.
func TestDeterminism(t *testing.T) {
	build := func() *faultfs.Point {
		x := newFx(t)
		f := x.durableFile("f", fill('a', 64<<10))
		for i := range 40 {
			x.write(f, fill(byte('b'+i%20), 700), int64(i*1531%60000))
		}
		return x.fs.Point()
	}
	sample := func(p *faultfs.Point, m faultfs.Model, seed uint64) []string {
		var out []string
		for s := range p.States(m, seed, 20) {
			out = append(out, image(t, s))
		}
		return out
	}
	p1, p2 := build(), build()
	for _, m := range []faultfs.Model{faultfs.Torn, faultfs.Reorder, faultfs.Garbage, faultfs.Prefix} {
		a, b := sample(p1, m, 42), sample(p2, m, 42)
		if len(a) != 20 || !slices.Equal(a, b) {
			t.Fatalf("%s: two runs with seed 42 differ (or yield %d states, want 20)", m, len(a))
		}
		if c := sample(p1, m, 43); slices.Equal(a, c) {
			t.Fatalf("%s: seeds 42 and 43 give the same sample", m)
		}
		s1, s2 := p1.Sample(m, 9), p2.Sample(m, 9)
		if image(t, s1) != image(t, s2) || s1.Key() != s2.Key() {
			t.Fatalf("%s: Sample(9) differs between runs", m)
		}
	}
}

// A state is independent: writes to it touch neither the FS nor other
// states, and the FS moving on changes no state.
func TestStateIndependence(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 10000))
	x.write(f, fill('b', 3000), 2000)
	p := x.fs.Point()
	s1, s2 := p.Sample(faultfs.Process, 1), p.Sample(faultfs.Process, 1)
	before := image(t, s2)
	h, err := s1.Open("f", vfs.ReadWrite)
	x.ok("Open state", err)
	x.write(h, fill('x', 5000), 4000)
	x.ok("Truncate state", h.Truncate(6000))
	if got := image(t, s1); got != "f=a*2000 b*2000 x*2000" {
		t.Fatalf("written state: %s", got)
	}
	x.write(f, fill('y', 10000), 0)
	x.ok("Sync", f.Sync())
	if got := image(t, s2); got != before {
		t.Fatalf("other state changed: %s, was %s", got, before)
	}
	buf := make([]byte, 10000)
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, fill('y', 10000)) {
		t.Fatalf("FS contents changed by a state: %s, %v", runs(buf), err)
	}
	// Regrowing a state after a shrink reads zeros, not the cut data.
	x.ok("Truncate state", h.Truncate(9000))
	if got := image(t, s1); got != "f=a*2000 b*2000 x*2000 00*3000" {
		t.Fatalf("regrown state: %s", got)
	}
}

// A crash state wrapped in a new faultfs models a crash during recovery:
// the adopted file is durable as the state had it.
func TestCrashDuringRecovery(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("img", fill('a', 16384))
	x.write(f, fill('b', 512), 4096)
	x.write(f, fill('c', 100), 20000) // extends
	var target *faultfs.State
	for s := range x.fs.Point().States(faultfs.Torn, 3, 0) {
		if b, _ := s.ReadFile("img"); len(b) == 20100 && b[4096] == 'a' {
			target = s
			break
		}
	}
	if target == nil {
		t.Fatal("no torn state with the new size and the old sector")
	}
	want := image(t, target)
	rec := faultfs.New(target)
	h, err := rec.Open("img", vfs.ReadWrite)
	x.ok("Open", err)
	x.write(h, fill('r', 4096), 0)
	x.ok("Truncate", h.Truncate(100))
	s2, err := rec.CrashState(faultfs.LoseUnsynced, 1)
	x.ok("CrashState", err)
	if got := image(t, s2); got != want {
		t.Fatalf("recovery crash state: %s, want the adopted %s", got, want)
	}
	s3, _ := rec.CrashState(faultfs.Process, 1)
	if got := image(t, s3); got != "img=r*100" {
		t.Fatalf("recovery process state: %s", got)
	}
}

// Files that existed before the FS touched them are adopted as durable.
func TestAdoption(t *testing.T) {
	mem := vfs.NewMem()
	w, _ := mem.Create("base")
	w.WriteAt(cat(fill('q', 5000), make([]byte, 8192), fill('r', 10)), 0)
	w.Close()
	fsys := faultfs.New(mem)
	f, err := fsys.Open("base", vfs.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.WriteAt(fill('s', 10), 0)
	wantDurable := "base=q*5000 00*8192 r*10"
	s, _ := fsys.CrashState(faultfs.LoseUnsynced, 0)
	if got := image(t, s); got != wantDurable {
		t.Fatalf("adopted file: %s, want %s", got, wantDurable)
	}
	// Replay starts from the adopted contents at every point.
	rec := fsys.Recording()
	p0, err := rec.Point(0)
	if err != nil {
		t.Fatal(err)
	}
	if got := image(t, p0.Sample(faultfs.Process, 0)); got != wantDurable {
		t.Fatalf("point 0 of the replay: %s", got)
	}
	if err := fsys.Remove("base"); err != nil {
		t.Fatal(err)
	}
	s, _ = fsys.CrashState(faultfs.LoseUnsynced, 0)
	if got := image(t, s); got != wantDurable {
		t.Fatalf("after an unsynced Remove: %s, want %s", got, wantDurable)
	}
}

// A shrinking truncate of a huge sparse file costs nothing to enumerate.
func TestHugeTruncate(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 1000))
	a := f.(vfs.Allocator)
	x.ok("Allocate", a.Allocate(0, 64<<30))
	x.write(f, fill('e', 10), 64<<30-10)
	x.ok("Sync", f.Sync())
	x.ok("Truncate", f.Truncate(500))
	p := x.fs.Point()
	if n := p.Pending(faultfs.Torn); n != 3 { // sectors 0 and 1 (cut at 500) and the last
		t.Fatalf("pending torn units: %d, want 3", n)
	}
	sizes := map[int64]bool{}
	for s := range p.States(faultfs.Torn, 1, 0) {
		fi, err := s.Stat("f")
		x.ok("Stat", err)
		sizes[fi.Size()] = true
	}
	if len(sizes) != 2 || !sizes[500] || !sizes[64<<30] {
		t.Fatalf("sizes after a huge truncate: %v", sizes)
	}
}

// A dropped fsync drops written data but not a pending truncate: the
// truncate is metadata, not a dirty page.
func TestFsyncDropKeepsTruncate(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 10))
	x.write(f, fill('b', 10), 0)
	x.ok("Truncate", f.Truncate(5))
	x.ok("Truncate", f.Truncate(10))
	x.fs.SetInjector(faultfs.FsyncDrop)
	if err := f.Sync(); !errors.Is(err, faultfs.ErrInjected) {
		t.Fatalf("Sync: %v", err)
	}
	x.fs.SetInjector(nil)
	buf := make([]byte, 10)
	f.ReadAt(buf, 0)
	if got := runs(buf); got != "a*5 00*5" {
		t.Fatalf("live after the drop: %s, want a*5 00*5", got)
	}
	p := x.fs.Point()
	sameSet(t, "process", states(t, p, faultfs.Process), []string{"f=a*5 00*5"})
	sameSet(t, "torn", states(t, p, faultfs.Torn), []string{"f=a*10", "f=a*5", "f=a*5 00*5"})
}

// Points skips operations that change nothing, and Replay visits every
// point's states.
func TestPointsAndReplay(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 1024)) // create, write, sync, syncdir: 4 points
	buf := make([]byte, 10)
	f.ReadAt(buf, 0)                   // no point
	x.write(f, fill('b', 512), 0)      // point
	x.ok("Sync", f.Sync())             // point
	x.ok("Sync", f.Sync())             // nothing pending: no point
	x.write(f, fill('c', 512), 512)    // point
	f.Size()                           // no point
	x.ok("SyncDir", x.fs.SyncDir(".")) // nothing pending: no point
	rec := x.fs.Recording()
	var ops []int
	for p := range rec.Points() {
		ops = append(ops, p.Ops())
	}
	if want := []int{0, 1, 2, 3, 4, 6, 7, 9}; !slices.Equal(ops, want) {
		t.Fatalf("points after ops %v, want %v (log: %v)", ops, want, rec.Ops())
	}
	n, err := rec.Replay(faultfs.Torn, 1, 0, func(s *faultfs.State) error { return nil })
	// states per point: 1 (no file), 1 or 2 (created: absent or not), ...
	want := 0
	for p := range rec.Points() {
		for range p.States(faultfs.Torn, 1, 0) {
			want++
		}
	}
	if err != nil || n != want || n < len(ops) {
		t.Fatalf("Replay visited %d states (%v), want %d", n, err, want)
	}
	stop := errors.New("stop")
	if n, err := rec.Replay(faultfs.Torn, 1, 0, func(*faultfs.State) error { return stop }); n != 1 || err != stop {
		t.Fatalf("Replay with a failing visit = %d, %v", n, err)
	}
	if _, err := rec.Point(len(rec.Ops()) + 1); err == nil {
		t.Fatal("Point past the end succeeded")
	}
	last, _ := rec.Point(len(rec.Ops()))
	if a, b := image(t, last.Sample(faultfs.Torn, 5)), image(t, x.fs.Point().Sample(faultfs.Torn, 5)); a != b {
		t.Fatalf("replayed last point %s, live %s", a, b)
	}
}

// A sampled point yields at most limit distinct states, the durable and
// latest ones first.
func TestSampling(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 64<<10))
	for i := range 30 {
		x.write(f, fill(byte('b'+i%20), 1000), int64(i*2111))
	}
	p := x.fs.Point()
	if p.Space(faultfs.Torn) <= 100 {
		t.Fatalf("Space(torn) = %d; the workload should need sampling", p.Space(faultfs.Torn))
	}
	var imgs []string
	keys := map[uint64]bool{}
	for s := range p.States(faultfs.Torn, 3, 100) {
		imgs = append(imgs, image(t, s))
		if keys[s.Key()] {
			t.Fatalf("key %x yielded twice", s.Key())
		}
		keys[s.Key()] = true
	}
	if len(imgs) != 100 {
		t.Fatalf("sampled %d states, want 100", len(imgs))
	}
	lose := image(t, p.Sample(faultfs.LoseUnsynced, 0))
	proc := image(t, p.Sample(faultfs.Process, 0))
	if imgs[0] != lose || imgs[1] != proc {
		t.Fatal("a sample does not start with the durable and the latest state")
	}
	seen := map[string]bool{}
	for _, img := range imgs {
		if seen[img] {
			t.Fatal("sampled the same contents twice")
		}
		seen[img] = true
	}
}

// Layouts extended across points that were never asked for states (a
// caller visiting every k-th point) give the same states as layouts built
// from scratch for each point.
func TestSkippedPointsExtendLayouts(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 4096))
	for i := range 12 {
		x.write(f, fill(byte('b'+i), 700), int64(i*300))
		if i == 6 {
			x.ok("Sync", f.Sync())
		}
	}
	rec := x.fs.Recording()
	for _, m := range []faultfs.Model{faultfs.Torn, faultfs.Reorder, faultfs.Prefix} {
		for _, k := range []int{1, 2, 3, 5} {
			i, compared := 0, 0
			for p := range rec.Points() {
				if i++; i%k != 0 {
					continue
				}
				fresh, err := rec.Point(p.Ops())
				if err != nil {
					t.Fatal(err)
				}
				var got, want []string
				for s := range p.States(m, 3, 40) {
					got = append(got, s.String()+" "+image(t, s))
				}
				for s := range fresh.States(m, 3, 40) {
					want = append(want, s.String()+" "+image(t, s))
				}
				if !slices.Equal(got, want) {
					t.Fatalf("%s, every %d-th point, point %d: states\n%v\nwant (layout built afresh)\n%v", m, k, p.Ops(), got, want)
				}
				compared += len(got)
			}
			if compared < 8 {
				t.Fatalf("%s, every %d-th point: only %d states compared", m, k, compared)
			}
		}
	}
}
