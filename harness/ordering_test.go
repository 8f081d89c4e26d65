package harness

import (
	"encoding/binary"
	"slices"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// rulesOf returns the names of the rules the failures broke, sorted and
// without repeats.
func rulesOf(fails []*Failure) []string {
	var rs []string
	for _, f := range fails {
		if !slices.Contains(rs, f.Rule) {
			rs = append(rs, f.Rule)
		}
	}
	slices.Sort(rs)
	return rs
}

// recordCase records c's workload and returns its op log.
func recordCase(t *testing.T, c Case) *faultfs.Recording {
	t.Helper()
	_, ffs, cleanup, f := prepare(c, Options{})
	defer cleanup()
	if f != nil {
		t.Fatalf("%s: %v", c.ID(), f)
	}
	return ffs.Recording()
}

// TestCrashOrderingRulesListed checks the rule table: every rule a check
// can report is listed once, with a doc line.
func TestCrashOrderingRulesListed(t *testing.T) {
	want := []string{RuleContents, RuleRefcount, RuleFree, RuleSwitch, RuleRollbackOrder, RuleTruncate}
	var got []string
	for _, r := range OrderingRules {
		if r.Doc == "" || slices.Contains(got, r.Name) {
			t.Errorf("rule %q: empty doc or listed twice", r.Name)
		}
		got = append(got, r.Name)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("OrderingRules lists %v, want %v", got, want)
	}
	if !slices.Contains(FailureKinds, KindOrdering) {
		t.Fatalf("FailureKinds %v lacks %q", FailureKinds, KindOrdering)
	}
}

// TestCrashOrderingKvmtool2011 shows the ordering rules catch the 2011
// kvmtool writer with zero crash states, and under the process model,
// whose one crash state (the live files) passes every verdict: a broken
// rule is a failure even when no sampled state shows it.
func TestCrashOrderingKvmtool2011(t *testing.T) {
	for _, tc := range []struct {
		format string
		rules  []string // rules CheckOrdering must find (among others)
	}{
		{"v1", []string{RuleContents}},
		{"v2", []string{RuleContents, RuleRefcount}},
	} {
		t.Run(tc.format, func(t *testing.T) {
			c := Case{Format: tc.format, ClusterSize: 512, Size: 256 << 10, Model: faultfs.Process, StatesPerPoint: 1,
				Target: TargetKvmtool2011, Seed: 5}
			c = c.WithTrace([]Op{{Kind: OpWrite, Off: 200 << 10, Len: 512, Pattern: 7}, {Kind: OpFlush}, {Kind: OpWrite, Off: 1 << 10, Len: 700, Pattern: 9}})
			v := RunWith(c, Options{NoStates: true})
			if v.OK || v.Failure.Kind != KindOrdering || v.States != 0 {
				t.Fatalf("%s with zero crash states: want an ordering failure, got %+v", c.ID(), v)
			}
			t.Logf("zero states: %s", v.Failure)
			fails, judged := CheckOrdering(recordCase(t, c), imageName, 0)
			for _, r := range tc.rules {
				if !slices.Contains(rulesOf(fails), r) {
					t.Errorf("rules broken: %v; want %s among them", rulesOf(fails), r)
				}
			}
			for _, f := range fails {
				t.Logf("%s", f.Detail)
			}
			if judged == 0 {
				t.Error("no op judged")
			}
			if tc.format == "v1" {
				// Nothing is lost in the process model, and a QCOW
				// version 1 image has no refcounts to get wrong: only
				// the ordering rules see the bug.
				full := Run(c)
				if full.OK || full.Failure.Kind != KindOrdering || full.States == 0 {
					t.Fatalf("%s: want the crash states to pass and the ordering rules to fail, got %+v", c.ID(), full)
				}
			}
		})
	}
}

// TestCrashOrderingBrokenTargets: the targets that drop or weaken barriers
// are caught by the ordering rules alone, in every format.
func TestCrashOrderingBrokenTargets(t *testing.T) {
	for _, target := range []string{TargetNoBarrier, TargetSyncRange} {
		for _, format := range Formats {
			t.Run(target+"/"+format, func(t *testing.T) {
				for k := range uint64(4) {
					c := Generate(CaseSeed(21, k), Space{Formats: []string{format}, Target: target, MaxOps: 12})
					v := RunWith(c, Options{NoStates: true})
					if v.OK {
						continue
					}
					if v.Failure.Kind != KindOrdering || v.Failure.Rule != RuleContents || v.States != 0 {
						t.Fatalf("%s: want rule %s, got %+v", c.ID(), RuleContents, v.Failure)
					}
					t.Logf("%s: %s", c.ID(), v.Failure)
					return
				}
				t.Fatal("4 cases: no ordering failure")
			})
		}
	}
}

// TestCrashOrderingOurWriter: this project's writer keeps every rule, in
// every format, with and without a backing file, in write-through and
// write-back mode, with and without fault plans (whose failed writes are
// rolled back by truncating the file).
func TestCrashOrderingOurWriter(t *testing.T) {
	n := 120
	if testing.Short() {
		n = 60
	}
	var judged, truncates, rollbackWrites, faulted int
	for k := range n {
		c := Generate(CaseSeed(33, uint64(k)), Space{Errors: k%3 != 0, MaxOps: 24})
		c.Format = Formats[k%3]
		c.Backing = k%4 < 2
		c.WriteThrough = k%5 < 2
		if c.Format == "v1" && c.ClusterSize > 4096 {
			c.ClusterSize = 4096
		}
		v := RunWith(c, Options{NoStates: true})
		if !v.OK {
			t.Fatalf("%s: %v\nrepro: crashtest repro --max-states 0 %s", c.ID(), v.Failure, c.ID())
		}
		judged += v.OrderingOps
		if v.Faults > 0 {
			faulted++
			for _, op := range recordCase(t, c).Ops() {
				if op.Kind == faultfs.OpTruncate && op.Path == imageName {
					truncates++
				}
				if op.Kind == faultfs.OpWrite && strings.HasPrefix(op.Label, "rollback") {
					rollbackWrites++
				}
			}
		}
	}
	t.Logf("%d cases, %d with faults, %d file ops judged, %d truncates, %d rollback writes", n, faulted, judged, truncates, rollbackWrites)
	if judged < n || faulted == 0 || truncates == 0 || rollbackWrites == 0 {
		t.Fatalf("the cases did not exercise the rules: %d ops judged, %d faulted cases, %d truncates", judged, faulted, truncates)
	}
}

// ruleImage makes a QCOW image ("img", 512-byte clusters) with guest
// cluster 0 written, and returns its FS, its layout and its data pointer.
func ruleImage(t *testing.T, format string) (*vfs.MemFS, *qcow.Layout, qcow.Pointer) {
	t.Helper()
	mem := vfs.NewMem()
	o := qcow.CreateOptions{Format: qcow.FormatQCOW2, Version: 3, Size: 64 << 10, ClusterSize: 512}
	switch format {
	case "v1":
		o.Format, o.Version = qcow.FormatQCOW, 0
	case "v2":
		o.Version = 2
	}
	if err := qcow.Create(mem, "img", o); err != nil {
		t.Fatal(err)
	}
	im, err := qcow.Open(mem, "img", &qcow.Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := im.WriteAt(Pattern(1, 512), 0); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := mem.Open("img", vfs.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, _ := f.Size()
	l, err := qcow.ReadLayout(f, size)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range l.Pointers {
		if p.Kind == qcow.PtrData {
			return mem, l, p
		}
	}
	t.Fatalf("no data pointer in %+v", l.Pointers)
	return nil, nil, qcow.Pointer{}
}

// TestCrashOrderingRules breaks each rule, and keeps it, by hand: raw file
// operations on an image, in a broken and in a correct order.
func TestCrashOrderingRules(t *testing.T) {
	type env struct {
		t    *testing.T
		ffs  *faultfs.FS
		f    vfs.File
		l    *qcow.Layout
		data qcow.Pointer // guest cluster 0's data pointer
		end  int64        // the file size before the steps, cluster aligned
	}
	be64 := func(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
	write := func(e env, b []byte, off int64) {
		if _, err := e.f.WriteAt(b, off); err != nil {
			e.t.Fatal(err)
		}
	}
	sync := func(e env) {
		if err := e.f.Datasync(); err != nil {
			e.t.Fatal(err)
		}
	}
	setRefcount := func(e env, c int64, v uint16) {
		off, n, ok := e.l.RefcountLocation(c)
		if !ok || n != 2 {
			e.t.Fatalf("cluster %d: no 16-bit refcount entry", c)
		}
		write(e, binary.BigEndian.AppendUint16(nil, v), off)
	}
	const copied = 1 << 63
	// link points guest cluster 1 (the L2 entry after cluster 0's) at a
	// new cluster at the end of the file.
	newData := func(e env) { write(e, Pattern(2, 512), e.end) }
	link := func(e env) {
		v := uint64(e.end)
		if e.l.Format == qcow.FormatQCOW2 {
			v |= copied
		}
		write(e, be64(v), e.data.At+8)
	}
	for _, tc := range []struct {
		name, format string
		want         string // the rule broken; "" for none
		steps        func(e env)
	}{
		{"contents kept", "v3", "", func(e env) {
			setRefcount(e, e.end/512, 1)
			newData(e)
			sync(e)
			link(e)
		}},
		{"contents broken", "v3", RuleContents, func(e env) {
			setRefcount(e, e.end/512, 1)
			sync(e)
			newData(e)
			link(e)
		}},
		{"contents kept v1", "v1", "", func(e env) { newData(e); sync(e); link(e) }},
		{"contents broken v1", "v1", RuleContents, func(e env) { newData(e); link(e) }},
		{"refcount broken", "v2", RuleRefcount, func(e env) { newData(e); sync(e); link(e) }},
		{"free kept", "v3", "", func(e env) {
			write(e, be64(0), e.data.At)
			sync(e)
			setRefcount(e, e.data.Off/512, 0)
		}},
		{"free broken", "v3", RuleFree, func(e env) {
			setRefcount(e, e.data.Off/512, 0)
			write(e, be64(0), e.data.At)
		}},
		{"rollback order broken", "v3", RuleRollbackOrder, func(e env) {
			e.ffs.Label("rollback_refcounts")
			setRefcount(e, e.data.Off/512, 0)
			e.ffs.Label("rollback_pointers")
			write(e, be64(0), e.data.At)
		}},
		{"switch kept", "v3", "", func(e env) {
			l1 := e.l.Pointers[1] // the header's L1 table pointer
			b := make([]byte, l1.Len)
			e.f.ReadAt(b, l1.Off)
			setRefcount(e, e.end/512, 1)
			write(e, b, e.end)
			sync(e)
			write(e, be64(uint64(e.end)), 40)
		}},
		{"switch broken", "v3", RuleSwitch, func(e env) {
			l1 := e.l.Pointers[1]
			b := make([]byte, l1.Len)
			e.f.ReadAt(b, l1.Off)
			setRefcount(e, e.end/512, 1)
			sync(e)
			write(e, b, e.end)
			write(e, be64(uint64(e.end)), 40)
		}},
		{"truncate kept", "v2", "", func(e env) {
			newData(e)
			sync(e)
			if err := e.f.Truncate(e.end); err != nil {
				e.t.Fatal(err)
			}
		}},
		{"truncate broken", "v1", RuleTruncate, func(e env) {
			if err := e.f.Truncate(e.data.Off); err != nil {
				e.t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem, l, data := ruleImage(t, tc.format)
			if tc.format == "v1" && tc.name == "truncate broken" && data.Off+data.Len < l.FileSize {
				t.Fatalf("the data cluster is not last in the file: %+v", data)
			}
			ffs := faultfs.New(mem)
			f, err := ffs.Open("img", vfs.ReadWrite)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			size, _ := f.Size()
			e := env{t: t, ffs: ffs, f: f, l: l, data: data, end: (size + 511) &^ 511}
			tc.steps(e)
			fails, judged := CheckOrdering(ffs.Recording(), "img", 0)
			for _, f := range fails {
				t.Logf("%s", f.Detail)
				if f.Kind != KindOrdering || f.Point <= 0 || !strings.Contains(f.Detail, "file op") {
					t.Errorf("malformed failure %+v", f)
				}
			}
			if judged == 0 {
				t.Fatal("no op judged")
			}
			got := rulesOf(fails)
			switch {
			case tc.want == "" && len(got) > 0:
				t.Fatalf("correct order flagged: %v", got)
			case tc.want != "" && !slices.Equal(got, []string{tc.want}):
				t.Fatalf("rules broken: %v, want exactly %s", got, tc.want)
			}
		})
	}
}
