package harness

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/model"
)

// TestOldCasesDrawTheSame pins what older IDs and seeds mean now that
// cases can grow the disk and start from qemu-made snapshot images: the
// workload of an old ID, and the IDs Generate gave for a few seeds (before
// the new fields, which only ever add to an ID).
func TestOldCasesDrawTheSame(t *testing.T) {
	c, err := ParseID("c1:v3:cs=4096:sz=262144:b=0:m=torn:wt=0:ops=40:spp=8:t=qcow:seed=0x1234")
	if err != nil {
		t.Fatal(err)
	}
	if sum := fmt.Sprintf("%x", sha256.Sum256([]byte(c.AsTrace().Trace))); sum != "e2d06ed49e928597c3e77ede200ecc8151d3a92ee17ff109b91d3809438ce2d3" {
		t.Errorf("the workload of an old ID changed: sha256 %s of %s", sum, c.AsTrace().Trace)
	}
	for k, old := range []string{
		"c1:v1:cs=512:sz=361472:b=0:m=reorder:wt=1:ops=14:spp=8:t=qcow:seed=0x28cf3b93b44f5e13",
		"c1:v3:cs=4096:sz=56832:b=1:m=prefix:wt=1:ops=29:spp=8:t=qcow:seed=0x7eda580e4b442beb",
		"c1:v1:cs=4096:sz=261120:b=1:m=lose-unsynced:wt=1:ops=11:spp=8:t=qcow:seed=0xf79f63fe484e7f12",
	} {
		for _, sp := range []Space{{}, {Qemu: true}} {
			id := Generate(CaseSeed(5, uint64(k)), sp).ID()
			if !strings.HasPrefix(id, old) {
				t.Errorf("Generate(CaseSeed(5, %d), %+v) = %s, want %s with at most new fields", k, sp, id, old)
			}
		}
	}
}

func TestResizeTraceEncoding(t *testing.T) {
	ops := []Op{{Kind: OpWrite, Off: 0, Len: 512, Pattern: 1}, {Kind: OpResize, Size: 1 << 20}, {Kind: OpZero, Off: 1<<20 - 512, Len: 512}, {Kind: OpFlush}}
	enc, err := EncodeOps(ops)
	if err != nil || enc != "w0+512.1,r1048576,z1048064+512,f" {
		t.Fatalf("EncodeOps = %q, %v", enc, err)
	}
	back, err := DecodeOps(enc)
	if err != nil || fmt.Sprint(back) != fmt.Sprint(ops) {
		t.Fatalf("DecodeOps(%q) = %v, %v", enc, back, err)
	}
	for _, bad := range []string{"r", "r0", "r-512", "rx", fmt.Sprintf("r%d", MaxSize+1), "r512+1"} {
		if _, err := DecodeOps(bad); err == nil {
			t.Errorf("DecodeOps(%q) accepted", bad)
		}
	}
}

func TestValidateResize(t *testing.T) {
	base := "c2:v2:cs=4096:sz=65536:b=0:m=torn:wt=0:spp=8:seed=0x1"
	for _, tc := range []struct{ id, want string }{
		{base + ":t=qcow:ops=r131072,w65536+512.1,f", ""},
		{base + ":t=qcow:ops=w65536+512.1,r131072", "beyond"},
		{base + ":t=qcow:ops=r32768", "grow"},
		{base + ":t=qcow:ops=r66000", "multiple of 512"},
		{base + ":t=kvmtool2011:ops=r131072", "cannot resize"},
		{base + ":t=qcow:ops=f:pre=r131072", "setup ops cannot resize"},
		{"c1:v2:cs=4096:sz=65536:b=0:m=torn:wt=0:ops=4:spp=8:t=kvmtool2011:seed=1:grow=1", "cannot resize"},
		{"c1:v2:cs=4096:sz=65536:b=0:m=torn:wt=0:ops=4:spp=8:t=qcow:seed=1:grow=0", "want 1"},
		{"c2:v2:cs=4096:sz=65536:b=0:m=torn:wt=0:ops=f:spp=8:t=qcow:seed=1:grow=1", "only c1"},
		{"c1:v1:cs=4096:sz=65536:b=0:m=torn:wt=0:ops=4:spp=8:t=qcow:seed=1:img=qemu-snapshot", "v2 or v3"},
	} {
		_, err := ParseID(tc.id)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("ParseID(%q) = %v, want an error containing %q", tc.id, err, tc.want)
		}
	}
}

// TestGenerateNewFields: the default space grows the disk in some cases
// (never for a target that cannot resize), and a space with Qemu gives
// some v2 and v3 cases without a backing file a qemu-made snapshot image.
func TestGenerateNewFields(t *testing.T) {
	grow, snap := 0, 0
	for k := range uint64(200) {
		c := Generate(CaseSeed(3, k), Space{Qemu: true})
		if err := c.Validate(); err != nil {
			t.Fatal(err)
		}
		grow += b2i(c.Grow)
		if c.Image == ImageQemuSnapshot {
			snap++
			if c.Format == "v1" || c.Backing {
				t.Fatalf("%s: snapshot image for v1 or with a backing file", c.ID())
			}
		}
		if Generate(CaseSeed(3, k), Space{}).Image != "" {
			t.Fatalf("an image recipe without Space.Qemu")
		}
		if kc := Generate(CaseSeed(3, k), Space{Target: TargetKvmtool2011}); kc.Grow {
			t.Fatalf("%s: a grow case for a target that cannot resize", kc.ID())
		}
	}
	if grow < 20 || grow > 100 || snap < 10 || snap > 80 {
		t.Fatalf("%d grow cases and %d snapshot cases in 200", grow, snap)
	}
}

// TestCrashResize runs cases that grow the disk on the correct writer: they
// pass, and some of their crash states have the new size.
func TestCrashResize(t *testing.T) {
	resized := 0
	for k := uint64(0); resized < 3; k++ {
		if k > 100 {
			t.Fatal("no grow cases with resize ops")
		}
		c := Generate(CaseSeed(11, k), Space{MaxOps: 16})
		c.StatesPerPoint = 2
		c.Size = min(c.Size, 96<<10)
		if !c.Grow || !strings.Contains(c.AsTrace().Trace, "r") {
			continue
		}
		resized++
		if v := Run(c); !v.OK {
			t.Fatalf("%s: %s", c.ID(), v.Failure)
		}
	}
	// A trace: grow (L1 table too), write in the grown range, crash.
	for _, m := range []faultfs.Model{faultfs.Torn, faultfs.LoseUnsynced} {
		c, err := ParseID(fmt.Sprintf("c2:v3:cs=512:sz=32768:b=1:m=%s:wt=0:ops=w100+1000.1,r1048576,w1000000+3000.2,f,r1049088,w1048576+512.3:spp=16:t=qcow:seed=0x5", m))
		if err != nil {
			t.Fatal(err)
		}
		if v := Run(c); !v.OK {
			t.Fatalf("%s: %s", c.ID(), v.Failure)
		}
	}
}

// TestCrashSnapshotImage runs cases on qemu-made images with internal
// snapshots: the correct writer passes every crash state, and the verdicts
// do read the snapshots (with a frozen view edited, the state after the
// workload fails with "snapshot"). harness.Run on such cases, with the
// correct and a broken writer, is in qcow's TestCrashHarnessCatchesBrokenWriters.
func TestCrashSnapshotImage(t *testing.T) {
	qemutest.Require(t)
	for _, id := range []string{
		"c1:v3:cs=512:sz=65536:b=0:m=torn:wt=0:ops=12:spp=4:t=qcow:seed=0x77:img=qemu-snapshot:grow=1",
		"c1:v2:cs=4096:sz=131072:b=0:m=reorder:wt=1:ops=10:spp=4:t=qcow:seed=0x78:img=qemu-snapshot",
	} {
		c, err := ParseID(id)
		if err != nil {
			t.Fatal(err)
		}
		r, ffs, cleanup, f := prepare(c, Options{})
		if f != nil {
			t.Fatal(f)
		}
		if r.snaps.Len() != 2 {
			t.Fatalf("%s: %d frozen snapshots", id, r.snaps.Len())
		}
		// Every crash state passes (as Run would find, without building
		// the image again); then, with one frozen byte changed, the last
		// one (everything done) fails.
		states := 0
		for p, n := range r.crashTimes(ffs.Recording()) {
			for s := range p.States(c.Model, faultfs.SubSeed(c.Seed, "states"), c.StatesPerPoint) {
				states++
				if f := r.checkState(n, s); f != nil {
					t.Fatalf("%s: crash time %d: %s", id, n, f)
				}
			}
		}
		if states < 10 {
			t.Fatalf("%s: only %d crash states", id, states)
		}
		r.snaps = editedSnapshots(t, r)
		var fail *Failure
		for p, n := range r.crashTimes(ffs.Recording()) {
			for s := range p.States(c.Model, 1, 1) {
				fail = r.checkState(n, s)
			}
		}
		cleanup()
		if fail == nil || fail.Kind != KindSnapshot {
			t.Fatalf("%s: an edited frozen view gave %v, want a snapshot failure", id, fail)
		}
	}
}

// editedSnapshots returns r's frozen views with one byte of s2 changed.
func editedSnapshots(t *testing.T, r *run) *model.Snapshots {
	t.Helper()
	var out model.Snapshots
	for _, name := range r.snaps.Names() {
		b, _ := r.snaps.Frozen(name)
		if name == "s2" {
			b = bytes.Clone(b)
			b[len(b)/3] ^= 0x40
		}
		if err := out.Add(name, b); err != nil {
			t.Fatal(err)
		}
	}
	return &out
}
