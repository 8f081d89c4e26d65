package qcow

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// exOp is one step of a fixed crash workload.
type exOp struct {
	kind   string // "write", "zero", "flush"
	off, n int64
	seed   uint64 // write data: crashData(n, seed)
}

// exWorkload is a small fixed workload whose every crash state of the torn
// model is checked.
type exWorkload struct {
	name    string
	cfg     crashConfig
	size    int64
	through bool
	ops     []exOp
	// prepare, if set, builds the FS with "img" instead of crashSetup and
	// returns the disk's contents before the workload (the model's base).
	prepare func(t testing.TB) (*vfs.MemFS, []byte)
	// exercised, if set, checks (before Close) that the workload did
	// what its name says.
	exercised func(im *Image) error
	// stride, if above 1, checks only every stride-th crash point.
	stride int
}

// id is the workload part of a case ID.
func (w exWorkload) id() string {
	return fmt.Sprintf("exh:%s:%s:wt=%d", w.name, w.cfg, crashB2i(w.through))
}

// exWorkloads are the exhaustive workloads: allocate the first cluster;
// allocate a new L2 table; a large write; grow the refcount table;
// overwrite a compressed cluster; write into an image with a backing file.
func exWorkloads() []exWorkload {
	var ws []exWorkload
	for _, c := range []crashConfig{{version: 1, cs: 512}, {version: 2, cs: 512}, {version: 3, cs: 512}, {version: 3, cs: 64 << 10}} {
		size := int64(64 << 10)
		if c.cs > 512 {
			size = 256 << 10
		}
		ws = append(ws, exWorkload{name: "first-cluster", cfg: c, size: size, ops: []exOp{
			{kind: "write", off: 0, n: c.cs, seed: 1},
			{kind: "flush"},
		}})
	}
	ws = append(ws, exWorkload{name: "first-cluster", cfg: crashConfig{version: 3, cs: 512}, size: 64 << 10, through: true, ops: []exOp{
		{kind: "write", off: 100, n: 1000, seed: 1},
	}})
	for _, v := range []int{1, 2, 3} {
		c := crashConfig{version: v, cs: 512}
		ws = append(ws, exWorkload{name: "new-l2", cfg: c, size: 96 << 10, ops: []exOp{
			{kind: "write", off: 0, n: 512, seed: 1},
			{kind: "flush"},
			// 512-byte clusters: one L2 table maps 32 KiB; this write
			// straddles the second and third.
			{kind: "write", off: 64<<10 - 700, n: 1500, seed: 2},
			{kind: "zero", off: 300, n: 100},
			{kind: "flush"},
		}, exercised: func(im *Image) error {
			if len(im.l1) < 3 || im.l1[1]&^flagCopied == 0 || im.l1[2]&^flagCopied == 0 {
				return fmt.Errorf("L1 entries 1 and 2 not allocated: %x", im.l1)
			}
			return nil
		}})
	}
	for _, v := range []int{1, 2} {
		// Many unsynced sectors: 4096 states at most points.
		ws = append(ws, exWorkload{name: "large-write", cfg: crashConfig{version: v, cs: 512}, size: 64 << 10, ops: []exOp{
			{kind: "write", off: 1000, n: 24 << 10, seed: 1},
			{kind: "flush"},
		}})
	}
	ws = append(ws, exRefcountGrowth())
	ws = append(ws, exWorkload{name: "compressed", cfg: crashConfig{version: 3, cs: 4096}, size: 64 << 10, prepare: exCompressed, ops: []exOp{
		{kind: "write", off: 4096 + 1000, n: 1000, seed: 1}, // inside compressed cluster 1
		{kind: "write", off: 3*4096 - 100, n: 600, seed: 2}, // across compressed clusters 2 and 3
		{kind: "flush"},
	}, exercised: func(im *Image) error {
		if im.h.version != 3 {
			return fmt.Errorf("qemu made a version %d image", im.h.version)
		}
		return nil
	}})
	for _, c := range []crashConfig{{version: 3, cs: 512, backing: true}, {version: 2, cs: 64 << 10, backing: true}, {version: 1, cs: 512, backing: true}} {
		size := int64(64 << 10)
		if c.cs > 512 {
			size = 256 << 10
		}
		ws = append(ws, exWorkload{name: "backing", cfg: c, size: size, ops: []exOp{
			{kind: "write", off: 700, n: 100, seed: 1}, // copy-on-write from the backing file
			{kind: "flush"},
			{kind: "write", off: c.cs + 10, n: 2000, seed: 2},
			{kind: "zero", off: 3 * c.cs, n: c.cs},
			{kind: "flush"},
		}})
	}
	return ws
}

// exRefcountGrowth is the workload that grows the refcount table: 512-byte
// clusters and 64-bit refcounts (a refcount block covers 64 clusters, a
// one-cluster table 4096), a 32 KiB disk rewritten over and over (v3 zero
// clusters make every rewrite allocate) until the file nearly fills what
// the table covers; the recorded workload then crosses the limit.
func exRefcountGrowth() exWorkload {
	c := crashConfig{version: 3, cs: 512, rcBits: 64}
	const size = 32 << 10
	var rtOff uint64
	return exWorkload{
		name: "refcount-table", cfg: c, size: size,
		prepare: func(t testing.TB) (*vfs.MemFS, []byte) {
			mem, _ := crashSetup(t, c, size, 0)
			im, err := Open(mem, "img", &Options{ReadWrite: true})
			if err != nil {
				t.Fatal(err)
			}
			rc := im.w.rc
			capacity := rc.rtClusters * 512 / 8 * rc.g.perBlock() * 512
			for pass := uint64(0); im.w.end+3*size < capacity; pass++ {
				if err := im.WriteZeroes(0, size); err != nil {
					t.Fatal(err)
				}
				if _, err := im.WriteAt(crashData(size, 1000+pass), 0); err != nil {
					t.Fatal(err)
				}
			}
			rtOff = im.h.rtOff
			base := make([]byte, size)
			if _, err := im.ReadAt(base, 0); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			return mem, base
		},
		ops: []exOp{
			{kind: "zero", off: 0, n: size},
			{kind: "write", off: 0, n: size, seed: 1},
			{kind: "flush"},
			{kind: "zero", off: 0, n: size},
			{kind: "write", off: 100, n: size - 200, seed: 2},
			{kind: "flush"},
			{kind: "zero", off: 0, n: size},
			{kind: "write", off: 0, n: size, seed: 3},
			{kind: "flush"},
		},
		exercised: func(im *Image) error {
			if im.h.rtOff == rtOff {
				return fmt.Errorf("the refcount table did not move (still at %#x)", rtOff)
			}
			return nil
		},
	}
}

// exCompressed makes, with qemu-img convert -c, a QCOW2 image of 4 KiB
// clusters whose clusters are compressed, and loads it into a memory FS.
func exCompressed(t testing.TB) (*vfs.MemFS, []byte) {
	qemutest.Require(t)
	dir := t.TempDir()
	raw := make([]byte, 64<<10)
	for i := range raw {
		raw[i] = byte(i/4096) + byte(i%7) // compressible, distinct per cluster
	}
	if err := os.WriteFile(filepath.Join(dir, "raw"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	qemutest.Img(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096,compat=1.1",
		filepath.Join(dir, "raw"), filepath.Join(dir, "img"))
	b, err := os.ReadFile(filepath.Join(dir, "img"))
	if err != nil {
		t.Fatal(err)
	}
	mem := crashMemImage(t, b)
	im, err := Open(mem, "img", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	info, err := im.Check()
	if err != nil || info.CompressedClusters < 4 {
		t.Fatalf("qemu-img convert -c made %d compressed clusters (%v)", info.CompressedClusters, err)
	}
	return mem, raw
}

// exApply applies op to the image.
func exApply(im *Image, op exOp) error {
	switch op.kind {
	case "write":
		_, err := im.WriteAt(crashData(op.n, op.seed), op.off)
		return err
	case "zero":
		return im.WriteZeroes(op.off, op.n)
	case "flush":
		return im.Flush()
	}
	return fmt.Errorf("unknown op %q", op.kind)
}

// exModel returns the flat model after a crash at log position n: the ops
// that had returned by then are acknowledged, the one in flight may or may
// not have happened (a failed write), then a crash.
func exModel(w exWorkload, base []byte, ends []int, n int) *model.Disk {
	return exModelData(w, exData(w), base, ends, n)
}

// exData returns the bytes of each write op of w (nil for the others).
func exData(w exWorkload) [][]byte {
	data := make([][]byte, len(w.ops))
	for i, op := range w.ops {
		if op.kind == "write" {
			data[i] = crashData(op.n, op.seed)
		}
	}
	return data
}

// exModelData is exModel with the ops' bytes made beforehand (exData).
func exModelData(w exWorkload, data [][]byte, base []byte, ends []int, n int) *model.Disk {
	m := crashModel(w.size, base)
	for i, op := range w.ops {
		done := ends[i] <= n
		switch {
		case op.kind == "write" && done:
			m.Write(data[i], op.off)
		case op.kind == "write":
			m.FailedWrite(data[i], op.off)
		case op.kind == "zero" && done:
			m.WriteZeroes(op.off, op.n)
		case op.kind == "zero":
			m.FailedWriteZeroes(op.off, op.n)
		case op.kind == "flush" && done:
			m.Flush()
		}
		if !done {
			break
		}
		if w.through {
			m.Flush()
		}
	}
	m.Crash()
	return m
}

// exRun records workload w (with the given deliberate bugs, and the file
// system seen by the writer wrapped by wrap if set), then checks every
// crash point times every state of the torn model (at most limit per
// point; a seeded sample beyond). It returns the number of states checked
// and the first failure, whose message starts with the case ID.
func exRun(t testing.TB, w exWorkload, limit int, bugs writerBugs, wrap func(vfs.FS) vfs.FS) (int, error) {
	t.Helper()
	return exRunJudged(t, w, limit, bugs, wrap, nil)
}

// exRecord records workload w on a new image (with the given deliberate
// bugs, and the file system seen by the writer wrapped by wrap if set) up
// to its Close, and returns the recording FS, the disk's contents before
// the workload and, per op, the number of file operations done when it
// returned.
func exRecord(t testing.TB, w exWorkload, bugs writerBugs, wrap func(vfs.FS) vfs.FS) (ffs *faultfs.FS, base []byte, ends []int) {
	t.Helper()
	var mem *vfs.MemFS
	if w.prepare != nil {
		mem, base = w.prepare(t)
	} else {
		mem, base = crashSetup(t, w.cfg, w.size, 7)
	}
	ffs = faultfs.New(mem)
	var fsys vfs.FS = ffs
	if wrap != nil {
		fsys = wrap(ffs)
	}
	im, err := Open(fsys, "img", &Options{ReadWrite: true, WriteThrough: w.through})
	if err != nil {
		t.Fatalf("%s: open: %v", w.id(), err)
	}
	if im.w != nil {
		im.w.bugs = bugs
	}
	ends = make([]int, len(w.ops))
	for i, op := range w.ops {
		if err := exApply(im, op); err != nil {
			t.Fatalf("%s: op %d (%s): %v", w.id(), i, op.kind, err)
		}
		ends[i] = len(ffs.Log())
	}
	if w.exercised != nil {
		if err := w.exercised(im); err != nil {
			t.Fatalf("%s: the workload does not exercise what it should: %v", w.id(), err)
		}
	}
	if err := im.Close(); err != nil {
		t.Fatalf("%s: close: %v", w.id(), err)
	}
	return ffs, base, ends
}

// exRunJudged is exRun; when judged is set, it is also called with every
// state and the unit verifier's verdict on it, and exRunJudged goes on
// after a failing state.
func exRunJudged(t testing.TB, w exWorkload, limit int, bugs writerBugs, wrap func(vfs.FS) vfs.FS,
	judged func(st *faultfs.State, base []byte, ends []int, verdict error) error) (int, error) {
	t.Helper()
	ffs, base, ends := exRecord(t, w, bugs, wrap)
	// After a clean close: no leaks, contents exact.
	m := crashModel(w.size, base)
	for _, op := range w.ops {
		switch op.kind {
		case "write":
			m.Write(crashData(op.n, op.seed), op.off)
		case "zero":
			m.WriteZeroes(op.off, op.n)
		}
	}
	if err := crashVerify(ffs, m, 0); err != nil {
		return 0, fmt.Errorf("%s:after-close: %w", w.id(), err)
	}

	seed := faultfs.SubSeed(1, w.id())
	states := 0
	log := ffs.Log()
	d := newExDriver(w, exData(w), base, ends)
	v := newUnitVerifier(faultfs.Torn, d.m, w.cfg.cs)
	d.v = v
	i := 0
	for p := range ffs.Recording().Points() {
		if i++; w.stride > 1 && i%w.stride != 0 {
			continue
		}
		// One model, advanced point by point; states judged by their
		// pending units (unitVerifier).
		d.advance(p.Ops())
		v.begin(p, log[:p.Ops()])
		for st := range p.States(faultfs.Torn, seed, limit) {
			states++
			crashStates.Add(1)
			err := v.verify(st, -1)
			if err != nil {
				err = fmt.Errorf("%s:model=torn:seed=%d:point=%d:state=%d: %w\n\tstate: %s", w.id(), seed, p.Ops(), st.Index(), err, st)
			}
			if judged != nil {
				if err := judged(st, base, ends, err); err != nil {
					return states, err
				}
				continue
			}
			if err != nil {
				return states, err
			}
		}
	}
	if judged != nil {
		t.Logf("%s: %d states: %d whole, %d by units (%d clusters read per state, %d static, %d reused, %d by units, %d entries in pending units judged), %d check verdicts remembered",
			w.id(), states, v.wholeN, v.unitN, v.directN, v.staticN, v.reusedN, v.byUnitN, v.varN, v.memoHits)
	}
	return states, nil
}

// TestCrashLargeWorkload checks the benchmark's workload (largeWorkload:
// 1,000 operations on a 64 MiB image) by the verdicts of the exhaustive
// tests: on the benchmark's v3 image with 64 KiB clusters at every crash
// point, 16 torn states each; with a backing file; and on a v2 image with
// 4 KiB clusters and a backing file (32 L2 tables, a growing refcount
// table) at every 4th point, 8 states each. Under -short, every 8th point
// (32nd for v2), 4 states each.
func TestCrashLargeWorkload(t *testing.T) {
	for _, c := range []struct {
		cfg           crashConfig
		stride, limit int
	}{
		{crashConfig{version: 3, cs: 64 << 10}, 1, 16},
		{crashConfig{version: 3, cs: 64 << 10, backing: true}, 2, 8},
		{crashConfig{version: 2, cs: 4096, backing: true}, 4, 8},
	} {
		t.Run(c.cfg.String(), func(t *testing.T) {
			t.Parallel()
			w := largeWorkload(c.cfg)
			w.stride = c.stride
			limit, want := c.limit, 2000
			if lightTests() {
				limit, w.stride, want = 4, 8*c.stride, 100
			}
			states, err := exRun(t, w, limit, 0, nil)
			if err != nil {
				t.Fatal(err)
			}
			if states < want {
				t.Fatalf("only %d crash states", states)
			}
			t.Logf("%s: %d crash states checked", w.id(), states)
		})
	}
}

// TestCrashExhaustive checks, for small fixed workloads, every crash point
// times every state of the torn model (any subset of the unsynced 512-byte
// sectors survives; file size independently): each state opens, has no
// corruption (leaks allowed), and holds what the flat model built from the
// same ops allows. The per-point bound is faultfs.DefaultLimit (64 under
// -short), or QCOWCRASH_EXHAUSTIVE_LIMIT.
func TestCrashExhaustive(t *testing.T) {
	limit := crashLimit(t)
	for _, w := range exWorkloads() {
		t.Run(fmt.Sprintf("%s/%s/wt=%d", w.name, w.cfg, crashB2i(w.through)), func(t *testing.T) {
			t.Parallel()
			states, err := exRun(t, w, limit, 0, nil)
			if err != nil {
				t.Fatal(err)
			}
			if states < 10 {
				t.Fatalf("%s: only %d crash states", w.id(), states)
			}
			t.Logf("%s: %d crash states checked", w.id(), states)
		})
	}
}
