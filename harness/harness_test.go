package harness

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

func TestIDRoundTrip(t *testing.T) {
	cases := []Case{
		{Format: "v1", ClusterSize: 512, Size: 512, Model: faultfs.Process, Ops: 0, StatesPerPoint: 1, Target: TargetQCOW, Seed: 0},
		{Format: "v3", ClusterSize: 2 << 20, Size: MaxSize, Backing: true, Model: faultfs.LoseUnsynced, WriteThrough: true,
			Ops: MaxOps, StatesPerPoint: MaxStatesPerPoint, Target: TargetNoBarrier, Seed: ^uint64(0)},
	}
	for k := range uint64(200) {
		c := Generate(CaseSeed(42, k), Space{MaxOps: 1 + int(k)})
		cases = append(cases, c)
		switch k % 4 {
		case 1:
			cases = append(cases, c.AsTrace())
		case 2:
			c.Faults = `(rule (and (kind write) (path "*.img") (index 12)) (short-write 7))`
			cases = append(cases, c, c.AsTrace())
		case 3:
			c = c.AsTrace()
			c.Setup = "w0+512.ff,f,z512+1024"
			cases = append(cases, c)
			if c.Format != "v1" && !c.Backing {
				c.Image = ImageQemuCompressed
				cases = append(cases, c)
			}
		}
	}
	cases = append(cases, cases[0].WithTrace(nil))
	for _, c := range cases {
		id := c.ID()
		if strings.ContainsAny(id, " \t\n'\"$&;|<>()*?`\\") {
			t.Errorf("ID %q holds a space or shell metacharacter", id)
		}
		got, err := ParseID(id)
		if err != nil {
			t.Fatalf("ParseID(%q): %v", id, err)
		}
		if got != c {
			t.Fatalf("ParseID(%q) = %+v, want %+v", id, got, c)
		}
		b, err := json.Marshal(c)
		if err != nil {
			t.Fatal(err)
		}
		var back Case
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatalf("Unmarshal(%s): %v", b, err)
		}
		if back != c {
			t.Fatalf("JSON %s read back as %+v, want %+v", b, back, c)
		}
	}
	b, _ := json.Marshal(cases[0])
	for _, want := range []string{`"version":"c1"`, `"model":"process"`, `"format":"v1"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("JSON %s lacks %s", b, want)
		}
	}
	tc := cases[0].WithTrace([]Op{{Kind: OpWrite, Off: 1, Len: 2, Pattern: 0xab}, {Kind: OpFlush}, {Kind: OpZero, Off: 0, Len: 512}})
	b, _ = json.Marshal(tc)
	for _, want := range []string{`"version":"c2"`, `"trace":[{"kind":"write","off":1,"len":2,"pattern":171},{"kind":"flush"},{"kind":"zero","len":512}]`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("JSON %s lacks %s", b, want)
		}
	}
	if want := "c2:v1:cs=512:sz=512:b=0:m=process:wt=0:ops=w1+2.ab,f,z0+512:spp=1:t=qcow:seed=0x0"; tc.ID() != want {
		t.Errorf("trace ID %s, want %s", tc.ID(), want)
	}
}

// TestOldIDsUnchanged pins the ID of seed-generated cases: IDs printed by
// older soaks must still parse to the same case and print the same.
func TestOldIDsUnchanged(t *testing.T) {
	for _, tc := range []struct {
		seed uint64
		id   string
	}{
		{CaseSeed(1, 0), Generate(CaseSeed(1, 0), Space{}).ID()},
		{0, "c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=0x1234"},
	} {
		c, err := ParseID(tc.id)
		if err != nil || c.ID() != tc.id || c.Explicit || c.Faults != "" {
			t.Fatalf("ParseID(%q) = %+v, %v", tc.id, c, err)
		}
	}
	c := Generate(CaseSeed(1, 0), Space{})
	tr := c.AsTrace()
	w := c.Workload()
	for i := range w {
		w[i].Shape = "" // traces do not keep shapes
	}
	if !reflect.DeepEqual(w, tr.Workload()) || !strings.HasPrefix(tr.ID(), "c2:") {
		t.Fatalf("AsTrace changed the workload or kept the c1 prefix: %s", tr.ID())
	}
}

func TestParseIDErrors(t *testing.T) {
	good := "c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=0x1234"
	if _, err := ParseID(good); err != nil {
		t.Fatalf("ParseID(%q): %v", good, err)
	}
	for _, tc := range []struct{ id, want string }{
		{"", "prefix"},
		{"c3:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=1", "prefix"},
		{"c2:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=1", "want wOFF+LEN"},
		{"c2:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=w0+512.1,close:spp=8:t=qcow:seed=1", "want wOFF+LEN"},
		{"c2:v3:cs=4096:sz=4096:b=0:m=torn:wt=0:ops=w4000+512.1:spp=8:t=qcow:seed=1", "beyond"},
		{"c2:v3:cs=4096:sz=4096:b=0:m=torn:wt=0:ops=f:spp=8:t=qcow:seed=1:pre=w0+0.1", "want wOFF+LEN"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=4:spp=8:t=qcow:seed=1:pre=f", "only c2"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=4:spp=8:t=qcow:seed=1:img=qemu-compressed", "seed-generated"},
		{"c2:v3:cs=4096:sz=4096:b=0:m=torn:wt=0:ops=f:spp=8:t=qcow:seed=1:img=cloud", "image recipe"},
		{"c2:v1:cs=4096:sz=4096:b=0:m=torn:wt=0:ops=f:spp=8:t=qcow:seed=1:img=qemu-compressed", "v2 or v3"},
		{"c2:v3:cs=4096:sz=4096:b=1:m=torn:wt=0:ops=f:spp=8:t=qcow:seed=1:img=qemu-compressed", "without a backing"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=4:spp=8:t=qcow:seed=1:f=!!", "illegal base64"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=4:spp=8:t=qcow:seed=1:f=KHJ1bGU", "fault plan"},
		{"c1:v4:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=1", "format"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow", "missing field \"seed\""},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=1:x=2", "unknown field"},
		{"c1:v3:cs=4096:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=1", "repeated"},
		{"c1:v3:cs=4096:sz=262144:b=2:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=1", "0 or 1"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=wobbly:wt=0:ops=40:spp=8:t=qcow:seed=1", "model"},
		{"c1:v3:cs=4095:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=1", "cluster size"},
		{"c1:v1:cs=131072:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=1", "cluster size"},
		{"c1:v3:cs=4096:sz=1000:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=1", "size"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=-1:spp=8:t=qcow:seed=1", "ops"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=4:spp=0:t=qcow:seed=1", "states per point"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=4:spp=8:t=ext4:seed=1", "target"},
		{"c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=4:spp=8:t=qcow:seed=zz", "seed"},
		{"c1:v3:cs:sz=262144", "key=value"},
	} {
		_, err := ParseID(tc.id)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseID(%q) = %v, want an error containing %q", tc.id, err, tc.want)
		}
	}
	var c Case
	if err := json.Unmarshal([]byte(`{"version":"c1","model":"torn","format":"v9"}`), &c); err == nil {
		t.Error("JSON case with format v9 accepted")
	}
	if v := Run(Case{Format: "v9"}); v.OK || v.Failure == nil || v.Failure.Kind != KindSetup {
		t.Errorf("Run(invalid case) = %+v, want a setup failure", v)
	}
}

func TestWorkload(t *testing.T) {
	shapes := map[string]int{}
	kinds := map[OpKind]int{}
	for k := range uint64(50) {
		c := Generate(CaseSeed(7, k), Space{})
		w := c.Workload()
		if !reflect.DeepEqual(w, c.Workload()) {
			t.Fatalf("%s: workload differs between two calls", c.ID())
		}
		if len(w) != c.Ops+1 || w[len(w)-1].Kind != OpClose {
			t.Fatalf("%s: %d ops ending in %v, want %d ending in close", c.ID(), len(w), w[len(w)-1], c.Ops+1)
		}
		size := c.Size
		for _, op := range w {
			kinds[op.Kind]++
			shapes[string(op.Kind)+"/"+op.Shape]++
			if op.Kind == OpWrite || op.Kind == OpZero {
				if op.Off < 0 || op.Len < 1 || op.Off+op.Len > size {
					t.Fatalf("%s: %v outside the %d-byte disk", c.ID(), op, size)
				}
			}
			if op.Kind == OpResize {
				if !c.Grow || op.Size <= size || op.Size%512 != 0 || op.Size > min(MaxSize, 4*c.Size) {
					t.Fatalf("%s: %v from %d bytes (grow=%v)", c.ID(), op, size, c.Grow)
				}
				size = op.Size
			}
			if op.Kind == OpWrite && int64(len(op.Data())) != op.Len {
				t.Fatalf("%s: %v has %d data bytes", c.ID(), op, len(op.Data()))
			}
		}
		c2 := c
		c2.Seed++
		if reflect.DeepEqual(w, c2.Workload()) {
			t.Fatalf("%s: seed+1 gives the same workload", c.ID())
		}
	}
	for _, s := range []string{"write/sub-sector", "write/unaligned", "write/straddle", "write/aligned", "write/large", "zero/cluster", "zero/unaligned", "flush/", "resize/"} {
		if shapes[s] == 0 {
			t.Errorf("no %s op in 50 workloads: %v", s, shapes)
		}
	}
	if a, b := Pattern(1, 64), Pattern(2, 64); string(a) == string(b) {
		t.Error("patterns 1 and 2 are equal")
	}
	if string(Pattern(5, 100)) != string(Pattern(5, 100)) || string(Pattern(5, 100)[:50]) != string(Pattern(5, 50)) {
		t.Error("Pattern is not deterministic or not prefix-stable")
	}
}

// small returns a quick case for the tests.
func small(format string, m faultfs.Model, seed uint64) Case {
	c := Generate(seed, Space{Formats: []string{format}, Models: []faultfs.Model{m}, MaxOps: 10})
	c.Size = min(c.Size, 128<<10)
	c.StatesPerPoint = 4
	return c
}

func TestRunDeterministic(t *testing.T) {
	for _, c := range []Case{
		small("v3", faultfs.Torn, 11),
		func() Case { c := small("v2", faultfs.Torn, 12); c.Target = TargetNoBarrier; return c }(),
	} {
		a, b := Run(c), Run(c)
		if !reflect.DeepEqual(a, b) {
			t.Fatalf("%s: two runs differ:\n%+v\n%+v", c.ID(), a, b)
		}
		if a.States == 0 || a.Points == 0 || a.FileOps == 0 {
			t.Fatalf("%s: nothing checked: %+v", c.ID(), a)
		}
		t.Logf("%s: ok=%v points=%d states=%d file ops=%d failure=%v", c.ID(), a.OK, a.Points, a.States, a.FileOps, a.Failure)
	}
}

// TestOurWriterPasses runs a few cases per format and model against the
// qcow writer: every crash state must pass every verdict.
func TestOurWriterPasses(t *testing.T) {
	n := uint64(1)
	for _, f := range Formats {
		for _, m := range DefaultModels() {
			t.Run(f+"/"+m.String(), func(t *testing.T) {
				for k := range n {
					c := small(f, m, CaseSeed(3, k))
					v := Run(c)
					if !v.OK {
						t.Fatalf("case %s failed: %v\nrepro: crashtest repro %s", c.ID(), v.Failure, c.ID())
					}
					if v.States < v.Points || v.Points < 2 {
						t.Fatalf("case %s: %d states over %d points", c.ID(), v.States, v.Points)
					}
				}
			})
		}
	}
}

// TestBrokenTargetFails proves the harness can fail: the qcow-nobarrier
// target (every sync dropped) must be caught within a few cases under each
// model that can lose unsynced data, while the same cases pass against the
// real writer.
func TestBrokenTargetFails(t *testing.T) {
	for _, m := range []faultfs.Model{faultfs.Torn, faultfs.Reorder, faultfs.LoseUnsynced, faultfs.Prefix} {
		t.Run(m.String(), func(t *testing.T) {
			for k := range uint64(8) {
				c := small(Formats[k%3], m, CaseSeed(5, k))
				c.Ops = max(c.Ops, 6)
				c.Target = TargetNoBarrier
				v := Run(c)
				if v.OK {
					continue
				}
				switch v.Failure.Kind {
				case KindOpen, KindCheck, KindContent, KindDurability:
				default:
					t.Fatalf("case %s: unexpected failure kind: %v", c.ID(), v.Failure)
				}
				if (v.Failure.Kind == KindContent || v.Failure.Kind == KindDurability) && (v.Failure.Sector < 0 || !strings.Contains(v.Failure.Mismatch, "got")) {
					t.Fatalf("case %s: %s failure without its sector: %+v", c.ID(), v.Failure.Kind, v.Failure)
				}
				t.Logf("broken target caught after %d cases: %s: %v; %s", k+1, c.ID(), v.Failure, v.Failure.Mismatch)
				good := c
				good.Target = TargetQCOW
				if gv := Run(good); !gv.OK {
					t.Fatalf("the real writer fails the same case %s: %v", good.ID(), gv.Failure)
				}
				return
			}
			t.Fatal("8 cases against qcow-nobarrier found no failure")
		})
	}
}

// TestBrokenTargetCorrupts shows the harness catches structural damage,
// not only lost flushes: in write-back mode under the torn model, dropped
// barriers let metadata reach the disk without what it depends on, and
// some case must fail the open or check verdict.
func TestBrokenTargetCorrupts(t *testing.T) {
	kinds := map[string]int{}
	for k := range uint64(12) {
		c := Generate(CaseSeed(1, k), Space{Models: []faultfs.Model{faultfs.Torn}, Target: TargetNoBarrier, MaxOps: 20})
		c.WriteThrough = false
		v := Run(c)
		if v.OK {
			continue
		}
		kinds[v.Failure.Kind]++
		if v.Failure.Kind == KindOpen || v.Failure.Kind == KindCheck {
			t.Logf("caught after %d cases: %s: %v", k+1, c.ID(), v.Failure)
			return
		}
	}
	t.Fatalf("12 write-back torn cases against qcow-nobarrier: no open or check failure (failure kinds: %v)", kinds)
}

func TestRecord(t *testing.T) {
	c := small("v3", faultfs.Torn, 21)
	tr, err := Record(c)
	if err != nil {
		t.Fatal(err)
	}
	if len(tr.Ops) != c.Ops+1 || len(tr.Start) != len(tr.Ops) || len(tr.End) != len(tr.Ops) {
		t.Fatalf("%d ops, %d starts, %d ends, want %d", len(tr.Ops), len(tr.Start), len(tr.End), c.Ops+1)
	}
	for i := range tr.Ops {
		if tr.End[i] < tr.Start[i] || (i > 0 && tr.Start[i] != tr.End[i-1]) {
			t.Fatalf("op %d: file ops [%d,%d) after [%d,%d)", i, tr.Start[i], tr.End[i], tr.Start[max(0, i-1)], tr.End[max(0, i-1)])
		}
	}
	if tr.End[len(tr.End)-1] != len(tr.FileOps) || Run(c).FileOps != len(tr.FileOps) {
		t.Fatalf("trace ends at %d of %d file ops", tr.End[len(tr.End)-1], len(tr.FileOps))
	}
	if !reflect.DeepEqual(tr.Ops, c.Workload()) {
		t.Fatal("trace ops differ from the workload")
	}
	if _, err := Record(Case{}); err == nil {
		t.Fatal("Record of an invalid case succeeded")
	}
}

// TestPanicIsFailure: a panic below checkState (here, a nil crash state)
// becomes a "panic" failure instead of killing a soak.
func TestPanicIsFailure(t *testing.T) {
	r := &run{c: small("v3", faultfs.Torn, 1)}
	f := r.checkState(0, nil)
	if f == nil || f.Kind != KindPanic || !strings.HasPrefix(f.Detail, "panic: ") {
		t.Fatalf("checkState(nil) = %+v, want a panic failure", f)
	}
}

// TestRecordLabels: every file operation a target issues carries the event
// that names it (qcow's writer, through the broken writers' layers, and
// the kvmtool2011 port), so that repro -v prints it.
func TestRecordLabels(t *testing.T) {
	for _, target := range []string{TargetQCOW, TargetNoBarrier, TargetSyncRange, TargetKvmtool2011} {
		c := small("v2", faultfs.Torn, 31)
		c.Target = target
		tr, err := Record(c)
		if err != nil && target != TargetKvmtool2011 {
			t.Fatalf("%s: %v", target, err)
		}
		if len(tr.FileOps) < 5 {
			t.Fatalf("%s: only %d file ops", target, len(tr.FileOps))
		}
		for _, op := range tr.FileOps {
			if !strings.Contains(op, " event=") {
				t.Errorf("%s: file op without an event: %s", target, op)
			}
		}
	}
}

// TestNoFileOpsAfterCrash: after a crash, an op that issues no file
// operation (zeroing a cluster that already reads as zeros) may return nil:
// no injected fault failed any operation of its own.
func TestNoFileOpsAfterCrash(t *testing.T) {
	ops, err := DecodeOps("w0+4096.1,f,w0+512.2,z8192+4096")
	if err != nil {
		t.Fatal(err)
	}
	c := Case{Format: "v3", ClusterSize: 4096, Size: 64 << 10, Model: faultfs.Torn, StatesPerPoint: 4,
		Target: TargetQCOW, Seed: 5, Faults: "(rule (index 1000000) crash)"}.WithTrace(ops)
	tr, err := Record(c)
	if err != nil {
		t.Fatal(err)
	}
	// Crash the in-place write of op 2 (no rollback write follows it, so
	// the writer stays usable); op 3 then changes nothing on disk.
	c.Faults = fmt.Sprintf("(rule (index %d) crash)", tr.Start[2])
	v := Run(c)
	if !v.OK {
		t.Fatalf("%s: %v", c.ID(), v.Failure)
	}
	if tr, _ = Record(c); tr.End[3] != tr.Start[3] {
		t.Fatalf("op 3 issued file operations %v", tr.FileOps[tr.Start[3]:tr.End[3]])
	}
}
