package faultfs_test

import (
	"bytes"
	"errors"
	"io/fs"
	"math"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
)

func TestPredicates(t *testing.T) {
	w := faultfs.Op{Index: 12, Kind: faultfs.OpWrite, Path: "/img/a.qcow2", Offset: 4096, Length: 512}
	s := faultfs.Op{Index: 13, Kind: faultfs.OpSync, Path: "/img/a.qcow2"}
	tr := faultfs.Op{Index: 14, Kind: faultfs.OpTruncate, Path: "b.raw", Offset: 100}
	for _, c := range []struct {
		pred faultfs.Predicate
		op   faultfs.Op
		want bool
	}{
		{faultfs.Always(), s, true},
		{faultfs.OnIndex(12), w, true},
		{faultfs.OnIndex(12), s, false},
		{faultfs.Kinds(faultfs.KindSet(faultfs.OpWrite, faultfs.OpSync)), s, true},
		{faultfs.Kinds(faultfs.KindSet(faultfs.OpWrite)), s, false},
		{faultfs.Kinds(faultfs.SyncKinds), s, true},
		{faultfs.PathMatch("*.qcow2"), w, true}, // the base name
		{faultfs.PathMatch("/img/*"), w, true},  // the whole path
		{faultfs.PathMatch("*.raw"), w, false},
		{faultfs.PathMatch("[bad"), w, false},
		{faultfs.OffsetRange(4000, 4097), w, true},
		{faultfs.OffsetRange(4608, 9000), w, false}, // starts at the write's end
		{faultfs.OffsetRange(0, 4096), w, false},
		{faultfs.OffsetRange(0, 1<<40), s, false}, // no offset
		{faultfs.OffsetRange(100, 101), tr, true},
		{faultfs.And(faultfs.OnIndex(12), faultfs.Kinds(faultfs.KindSet(faultfs.OpWrite))), w, true},
		{faultfs.And(faultfs.OnIndex(12), faultfs.Kinds(faultfs.KindSet(faultfs.OpSync))), w, false},
		{faultfs.And(), w, true},
		{faultfs.Or(faultfs.OnIndex(1), faultfs.OnIndex(13)), s, true},
		{faultfs.Or(), s, false},
		{faultfs.Not(faultfs.OnIndex(13)), s, false},
		{faultfs.Randomly(1, 5), s, true},
		{faultfs.Randomly(0, 5), s, false},
	} {
		if got := c.pred.Match(c.op); got != c.want {
			t.Errorf("%s.Match(%v) = %v, want %v", c.pred, c.op, got, c.want)
		}
	}
}

func TestRandomly(t *testing.T) {
	const n = 20000
	for _, p := range []float64{0.05, 0.5, 0.9} {
		a, b := faultfs.Randomly(p, 1), faultfs.Randomly(p, 2)
		hits, same := 0, 0
		for i := range n {
			op := faultfs.Op{Index: i}
			if a.Match(op) {
				hits++
			}
			if a.Match(op) != faultfs.Randomly(p, 1).Match(op) {
				t.Fatalf("Randomly(%v, 1) is not deterministic at op %d", p, i)
			}
			if a.Match(op) == b.Match(op) {
				same++
			}
		}
		if got := float64(hits) / n; math.Abs(got-p) > 0.02 {
			t.Errorf("Randomly(%v) matched %.3f of ops", p, got)
		}
		if same == n {
			t.Errorf("Randomly(%v) gives the same decisions for seeds 1 and 2", p)
		}
	}
}

// injectors is a table of injectors covering every constructor.
var injectors = []faultfs.Injector{
	faultfs.EIO,
	faultfs.Crash,
	faultfs.Rule(faultfs.Always(), faultfs.ENOSPC),
	faultfs.Rule(faultfs.And(faultfs.Kinds(faultfs.KindSet(faultfs.OpWrite)), faultfs.OnIndex(12)), faultfs.EIO),
	faultfs.Rule(faultfs.Kinds(faultfs.SyncKinds), faultfs.FsyncDrop),
	faultfs.Rule(faultfs.Kinds(0), faultfs.EIO),
	faultfs.Rule(faultfs.PathMatch(`dir with space/"q"(*).img`), faultfs.ShortWrite(18446744073709551615)),
	faultfs.Rule(faultfs.Or(faultfs.OffsetRange(-5, 1<<40), faultfs.Not(faultfs.Randomly(0.1, 7))), faultfs.TearThenFail(3)),
	faultfs.Rule(faultfs.Randomly(1.0/3, 0), faultfs.Crash),
	faultfs.Rule(faultfs.And(), faultfs.EIO),
	faultfs.Rule(faultfs.Or(), faultfs.EIO),
	faultfs.Any(
		faultfs.Rule(faultfs.OnIndex(3), faultfs.EIO),
		faultfs.Any(faultfs.Rule(faultfs.Kinds(faultfs.AllKinds), faultfs.ENOSPC)),
	),
	// Event rules: short forms, and long ones where the label or the
	// action has no short form.
	faultfs.Rule(faultfs.Event("l2_update", 2), faultfs.EIO),
	faultfs.Rule(faultfs.Event("refblock_alloc_write", 1), faultfs.ENOSPC),
	faultfs.Rule(faultfs.After("l1_update", 1), faultfs.Crash),
	faultfs.Rule(faultfs.Event("cow_write", 0), faultfs.ShortWrite(0)),
	faultfs.Rule(faultfs.After("flush_to_disk", 0), faultfs.TearThenFail(0)),
	faultfs.Rule(faultfs.Event("a", 1), faultfs.FsyncDrop),
	faultfs.Rule(faultfs.Event("cow_write", 3), faultfs.ShortWrite(9)),
	faultfs.Rule(faultfs.Event(`odd "label" #2*`, 0), faultfs.EIO),
	faultfs.Rule(faultfs.Event("after:x", 1), faultfs.EIO),
	faultfs.Rule(faultfs.Event("", 0), faultfs.EIO),
	faultfs.Rule(faultfs.And(faultfs.Event("l2_load", 0), faultfs.Kinds(faultfs.KindSet(faultfs.OpRead))), faultfs.EIO),
	faultfs.Any(faultfs.Rule(faultfs.Event("x", 4), faultfs.Crash), faultfs.EIO),
}

// TestEventShortForms: the short forms of event rules parse to the rules
// they abbreviate and print back as themselves.
func TestEventShortForms(t *testing.T) {
	for _, c := range []struct{ short, long string }{
		{"eio@l2_update#2", `(rule (event "l2_update" 2) eio)`},
		{"enospc@refblock_alloc_write", `(rule (event "refblock_alloc_write" 1) enospc)`},
		{"crash@after:l1_update", `(rule (after "l1_update" 1) crash)`},
		{"short@cow_write", `(rule (event "cow_write" 1) (short-write 0))`},
		{"short@cow_write*", `(rule (event "cow_write") (short-write 0))`},
		{"tear@after:x#3", `(rule (after "x" 3) (tear 0))`},
		{"fsync-drop@flush_to_disk*", `(rule (event "flush_to_disk") fsync-drop)`},
		{"eio@a#1", "eio@a"},
	} {
		a, err := faultfs.ParseInjector(c.short)
		if err != nil {
			t.Fatalf("%s: %v", c.short, err)
		}
		b, err := faultfs.ParseInjector(c.long)
		if err != nil {
			t.Fatalf("%s: %v", c.long, err)
		}
		if a.String() != b.String() {
			t.Errorf("%s parses to %s, %s to %s", c.short, a, c.long, b)
		}
		if want := strings.TrimSuffix(c.short, "#1"); a.String() != want {
			t.Errorf("%s prints as %s", c.short, a)
		}
	}
	for _, s := range []string{"bogus@x", "eio@", "eio@#2", "eio@x#0", "eio@x#-1", "eio@x#y", "eio@x*#2", "eio@x#2*",
		"eio@after:", "eio@after:after:x", "(rule true eio@x)", `(rule (event) eio)`, `(rule (event x) eio)`,
		`(rule (event "x" 0) eio)`, `(rule (after "x" -2) eio)`, `(rule (event "x" 1 2) eio)`, "eio@x@y"} {
		if inj, err := faultfs.ParseInjector(s); err == nil {
			t.Errorf("ParseInjector(%q) = %v, want an error", s, inj)
		}
	}
}

// TestEventPredicates: event rules fire on the labelled operations of a
// real FS: the nth, every one, or the one right after.
func TestEventPredicates(t *testing.T) {
	labels := []string{"a", "b", "a", "", "a", "b"}
	run := func(inj string) []int {
		t.Helper()
		in, err := faultfs.ParseInjector(inj)
		if err != nil {
			t.Fatal(err)
		}
		f := faultfs.New(vfs.NewMem())
		h, err := f.Create("x")
		if err != nil {
			t.Fatal(err)
		}
		f.SetInjector(in)
		for _, l := range labels {
			f.Label(l)
			h.WriteAt([]byte{1}, 0)
		}
		var hit []int
		for _, op := range f.Log()[1:] {
			if op.Fault.Fault != faultfs.NoFault {
				hit = append(hit, op.Index-1)
			}
		}
		return hit
	}
	for _, c := range []struct {
		inj  string
		want []int
	}{
		{"eio@a", []int{0}},
		{"eio@a#2", []int{2}},
		{"eio@a#3", []int{4}},
		{"eio@a#4", nil},
		{"eio@a*", []int{0, 2, 4}},
		{"eio@b*", []int{1, 5}},
		{"eio@after:a", []int{1}},
		{"eio@after:a#3", []int{5}},
		{"eio@after:a*", []int{1, 3, 5}},
		{`(rule (event "") eio)`, []int{3}},
		{"crash@after:b", []int{2, 3, 4, 5}}, // a crash fails every later op
	} {
		if got := run(c.inj); !slices.Equal(got, c.want) {
			t.Errorf("%s fired on ops %v, want %v", c.inj, got, c.want)
		}
	}
	// LabelSeq and PrevLabel as the predicates see them.
	f := faultfs.New(vfs.NewMem())
	h, _ := f.Create("x")
	for _, l := range labels {
		f.Label(l)
		h.WriteAt([]byte{1}, 0)
	}
	log := f.Log()
	if op := log[5]; op.Label != "a" || op.LabelSeq != 2 || op.PrevLabel != "" || op.PrevLabelSeq != 1 {
		t.Errorf("op 5: %+v", op)
	}
	if op := log[6]; op.Label != "b" || op.LabelSeq != 1 || op.PrevLabel != "a" || op.PrevLabelSeq != 2 {
		t.Errorf("op 6: %+v", op)
	}
}

func TestDSLRoundTrip(t *testing.T) {
	ops := []faultfs.Op{}
	for i := range 40 {
		ops = append(ops, faultfs.Op{
			Index: i, Kind: faultfs.OpKind(i % 14), Path: []string{"a.img", `dir with space/"q"(x).img`}[i%2],
			Offset: int64(i) * 4096, Length: 512,
			Label: []string{"l2_update", "cow_write", "l1_update", "flush_to_disk", ""}[i%5], LabelSeq: i / 5 % 4,
			PrevLabel: []string{"l2_update", "cow_write", "l1_update", "flush_to_disk", ""}[(i+4)%5], PrevLabelSeq: i / 7 % 3,
		})
	}
	for _, inj := range injectors {
		s := inj.String()
		back, err := faultfs.ParseInjector(s)
		if err != nil {
			t.Fatalf("ParseInjector(%s): %v", s, err)
		}
		if back.String() != s {
			t.Fatalf("round trip: %s became %s", s, back)
		}
		for _, op := range ops {
			if a, b := inj.MaybeInject(op), back.MaybeInject(op); a != b {
				t.Fatalf("%s: op %v: %v before and %v after the round trip", s, op, a, b)
			}
		}
	}
	// The grammar's example parses.
	ex := `(any (rule (and (kind write) (path "*.qcow2") (index 12)) (short-write 7))
	     (rule (kind sync datasync) fsync-drop))`
	if _, err := faultfs.ParseInjector(ex); err != nil {
		t.Fatalf("example: %v", err)
	}
}

func TestDSLErrors(t *testing.T) {
	for _, s := range []string{
		"", "(", ")", "eio eio", "bogus", "(rule)", "(rule true)", "(rule true eio", "(rule (index x) eio)",
		"(rule (kind wrte) eio)", "(rule (path unquoted) eio)", `(rule (path "unterminated) eio)`,
		"(rule (randomly 1.5 1) eio)", "(rule (randomly 0.5 -1) eio)", "(rule (randomly NaN 1) eio)",
		"(rule (not) eio)", "(rule (not true true) eio)", "(any)", "(short-write)", "(tear x)",
		"(rule (offset 1) eio)", "(rule (frobnicate) eio)", "(rule true (bogus 1))", "((", "(rule true eio))",
	} {
		if inj, err := faultfs.ParseInjector(s); err == nil {
			t.Errorf("ParseInjector(%q) = %v, want an error", s, inj)
		}
	}
}

func FuzzParseInjector(f *testing.F) {
	for _, inj := range injectors {
		f.Add(inj.String())
	}
	f.Add(`(rule (path "\"") eio)`)
	f.Fuzz(func(t *testing.T, s string) {
		inj, err := faultfs.ParseInjector(s)
		if err != nil {
			return
		}
		back, err := faultfs.ParseInjector(inj.String())
		if err != nil || back.String() != inj.String() {
			t.Fatalf("%q parsed to %s, which does not round-trip: %v", s, inj, err)
		}
	})
}

func TestParseModel(t *testing.T) {
	for _, m := range faultfs.Models() {
		back, err := faultfs.ParseModel(m.String())
		if err != nil || back != m {
			t.Errorf("ParseModel(%q) = %v, %v", m, back, err)
		}
	}
	if _, err := faultfs.ParseModel("sloppy"); err == nil {
		t.Error("ParseModel(sloppy) succeeded")
	}
	for _, k := range faultfs.AllKinds.List() {
		if back, err := faultfs.ParseOpKind(k.String()); err != nil || back != k {
			t.Errorf("ParseOpKind(%q) = %v, %v", k, back, err)
		}
	}
}

// Each action on each kind of op: the error wraps ErrInjected and the
// errno, and a failed op has no effect.
func TestActionErrors(t *testing.T) {
	for _, c := range []struct {
		act   faultfs.Action
		errno syscall.Errno
	}{
		{faultfs.EIO, syscall.EIO},
		{faultfs.ENOSPC, syscall.ENOSPC},
		{faultfs.ShortWrite(1), syscall.EIO}, // on non-writes: EIO
		{faultfs.TearThenFail(1), syscall.EIO},
		{faultfs.FsyncDrop, syscall.EIO},
	} {
		x := newFx(t)
		f := x.durableFile("f", fill('a', 100))
		x.fs.SetInjector(faultfs.Rule(faultfs.Not(faultfs.Kinds(faultfs.KindSet(faultfs.OpWrite))), c.act))
		calls := map[string]error{
			"Truncate": f.Truncate(0),
			"Allocate": f.(vfs.Allocator).Allocate(0, 1<<20),
			"SyncDir":  x.fs.SyncDir("."),
			"Remove":   x.fs.Remove("f"),
			"Sync":     f.Sync(),
		}
		_, calls["ReadAt"] = f.ReadAt(make([]byte, 10), 0)
		_, calls["Size"] = f.Size()
		_, calls["Stat"] = x.fs.Stat("f")
		_, calls["Open"] = x.fs.Open("f", vfs.ReadOnly)
		_, calls["Create"] = x.fs.Create("g")
		for name, err := range calls {
			if !errors.Is(err, faultfs.ErrInjected) || !errors.Is(err, c.errno) {
				t.Errorf("%s with %s: err = %v, want ErrInjected and %v", name, c.act, err, c.errno)
			}
			var pe *fs.PathError
			if !errors.As(err, &pe) {
				t.Errorf("%s: %v is not a *fs.PathError", name, err)
			}
		}
		x.fs.SetInjector(nil)
		s, _ := x.fs.CrashState(faultfs.Process, 0)
		if got := image(t, s); got != "f=a*100" {
			t.Errorf("%s: failed ops had an effect: %s", c.act, got)
		}
	}
}

func TestShortWrite(t *testing.T) {
	hit := 0
	for seed := range uint64(20) {
		x := newFx(t)
		f := x.durableFile("f", fill('a', 2000))
		x.fs.SetInjector(faultfs.Rule(faultfs.Kinds(faultfs.KindSet(faultfs.OpWrite)), faultfs.ShortWrite(seed)))
		n, err := f.WriteAt(fill('b', 1000), 500)
		if !errors.Is(err, syscall.ENOSPC) || !errors.Is(err, faultfs.ErrInjected) || n >= 1000 {
			t.Fatalf("short write = %d, %v; want < 1000 bytes and ENOSPC", n, err)
		}
		if n > 0 {
			hit++
		}
		want := runs(cat(fill('a', 500), fill('b', n), fill('a', 1500-n)))
		for _, m := range []faultfs.Model{faultfs.Process} {
			s, _ := x.fs.CrashState(m, 0)
			if got := image(t, s); got != "f="+want {
				t.Fatalf("seed %d: %s state %s, want %s", seed, m, got, want)
			}
		}
		log := x.fs.Log()
		op := log[len(log)-1]
		if op.Fault.Fault != faultfs.FaultShortWrite || (n > 0) != (len(op.Written) == 1) {
			t.Fatalf("logged %v", op)
		}
	}
	if hit == 0 {
		t.Fatal("no seed wrote a non-empty prefix")
	}
}

func TestTearThenFail(t *testing.T) {
	x := newFx(t)
	f := x.durableFile("f", fill('a', 4096))
	x.fs.SetInjector(faultfs.Rule(faultfs.Always(), faultfs.TearThenFail(5)))
	_, err := f.WriteAt(fill('b', 4096-100), 100)
	if !errors.Is(err, syscall.EIO) || !errors.Is(err, faultfs.ErrInjected) {
		t.Fatalf("torn write: err = %v", err)
	}
	x.fs.SetInjector(nil)
	log := x.fs.Log()
	written := log[len(log)-1].Written
	if len(written) == 0 || len(written) == 8 {
		t.Fatalf("seed 5 wrote %d of 8 sectors; pick a seed that tears", len(written))
	}
	want := fill('a', 4096)
	for _, e := range written {
		if e.Off != 100 && e.Off%512 != 0 || e.Len > 512 {
			t.Fatalf("written extent %+v is not one sector", e)
		}
		copy(want[e.Off:], fill('b', int(e.Len)))
	}
	buf := make([]byte, 4096)
	f.ReadAt(buf, 0)
	if !bytes.Equal(buf, want) {
		t.Fatalf("live contents %s, want %s", runs(buf), runs(want))
	}
	// Under torn, exactly the written sectors vary: 2^len(written) states.
	if got := len(states(t, x.fs.Point(), faultfs.Torn)); got != 1<<len(written) {
		t.Fatalf("torn states after a torn write of %d sectors: %d", len(written), got)
	}
}
