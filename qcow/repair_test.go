package qcow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// repairTRead returns the whole file name of fsys.
func repairTRead(t *testing.T, fsys vfs.FS, name string) []byte {
	t.Helper()
	f, err := fsys.Open(name, vfs.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, size)
	if n, err := f.ReadAt(b, 0); n != len(b) && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	return b
}

// TestRepairBuilt repairs hand-made images (no qemu) of every refcount
// width and checks the verdict before and after.
func TestRepairBuilt(t *testing.T) {
	const cs = 4096
	be := binary.BigEndian
	type poke = func(b []byte, set func(k, v uint64))
	cases := []struct {
		name       string
		order      uint32
		clusters   int64
		poke       poke
		mode       RepairMode
		beforeExit int
		afterExit  int
		leaks      int // LeaksFixed
		corr       int // CorruptionsFixed
		unrepaired string
	}{
		{"clean", 4, 6, nil, RepairAll, 0, 0, 0, 0, ""},
		{"leak-unused-r1", 0, 8, func(b []byte, set func(k, v uint64)) { set(7, 1) }, RepairLeaks, 3, 0, 1, 0, ""},
		{"leak-unused-r2", 1, 8, func(b []byte, set func(k, v uint64)) { set(6, 3); set(7, 2) }, RepairLeaks, 3, 0, 2, 0, ""},
		{"leak-unused-r4", 2, 8, func(b []byte, set func(k, v uint64)) { set(7, 15) }, RepairLeaks, 3, 0, 1, 0, ""},
		{"leak-unused-r8", 3, 8, func(b []byte, set func(k, v uint64)) { set(7, 200) }, RepairLeaks, 3, 0, 1, 0, ""},
		{"leak-unused-r32", 5, 8, func(b []byte, set func(k, v uint64)) { set(7, 1<<30) }, RepairLeaks, 3, 0, 1, 0, ""},
		{"leak-unused-r64", 6, 8, func(b []byte, set func(k, v uint64)) { set(7, 1<<40) }, RepairLeaks, 3, 0, 1, 0, ""},
		// Refcount 2 on an in-use cluster with COPIED: a leak (and a COPIED
		// corruption) that lowering to 1, not 0, repairs.
		{"leak-in-use-r2", 1, 6, func(b []byte, set func(k, v uint64)) { set(5, 2) }, RepairLeaks, 2, 0, 1, 0, ""},
		{"leak-in-use-r16", 4, 6, func(b []byte, set func(k, v uint64)) { set(5, 7); set(3, 9) }, RepairLeaks, 2, 0, 2, 0, ""},
		{"leak-unreferenced-l2", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[3*cs:], 0) }, RepairLeaks, 3, 0, 2, 0, ""},
		{"zero-refcount-leaks-mode", 4, 6, func(b []byte, set func(k, v uint64)) { set(5, 0) }, RepairLeaks, 2, 2, 0, 0, ""},
		{"zero-refcount-r1", 0, 6, func(b []byte, set func(k, v uint64)) { set(5, 0) }, RepairAll, 2, 0, 0, 1, ""},
		{"zero-refcount-r16", 4, 6, func(b []byte, set func(k, v uint64)) { set(5, 0); set(4, 0) }, RepairAll, 2, 0, 0, 2, ""},
		{"zero-refcount-and-leak-r4", 2, 8, func(b []byte, set func(k, v uint64)) { set(5, 0); set(7, 3) }, RepairAll, 2, 0, 1, 1, ""},
		{"copied-cleared-l2", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[4*cs:], 5*cs) }, RepairAll, 2, 0, 0, 1, ""},
		{"copied-cleared-l1", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[3*cs:], 4*cs) }, RepairAll, 2, 0, 0, 1, ""},
		// Leaks mode fixes COPIED flags when they are the only problem.
		{"copied-leaks-mode", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[4*cs:], 5*cs) }, RepairLeaks, 2, 0, 0, 1, ""},
		{"copied-and-zero-refcount-leaks-mode", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[4*cs:], 5*cs); set(3, 0) }, RepairLeaks, 2, 2, 0, 0, ""},
		// Refcount 2 with COPIED clear: lowering to 1 then wants COPIED.
		{"lowered-then-copied", 4, 6, func(b []byte, set func(k, v uint64)) { set(5, 2); be.PutUint64(b[4*cs:], 5*cs) }, RepairAll, 3, 0, 1, 1, ""},
		{"dirty-bit", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[72:], IncompatDirty); set(5, 0) }, RepairAll, 2, 0, 0, 1, ""},
		{"corrupt-bit-clean", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[72:], IncompatCorrupt) }, RepairAll, 0, 0, 0, 0, ""},
		// No refcount block at all: nothing can be raised in place.
		{"no-refblock", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[1*cs:], 0) }, RepairAll, 2, 2, 0, 0, "missing or unsound"},
		// An L1 entry beyond the end of the file: the check is incomplete,
		// so the leak of cluster 7 must stay.
		{"incomplete-walk", 4, 8, func(b []byte, set func(k, v uint64)) {
			be.PutUint32(b[36:], 2)
			be.PutUint64(b[3*cs+8:], flagCopied|1<<30)
			set(7, 1)
		}, RepairAll, 2, 2, 0, 0, "could not repair leaks"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fsys := checkTBuild(t, tc.order, tc.clusters, tc.poke)
			orig := repairTRead(t, fsys, "img.qcow2")
			r, err := Repair(fsys, "img.qcow2", "", tc.mode)
			if err != nil {
				t.Fatal(err)
			}
			if got := checkTExit(r.Before); got != tc.beforeExit {
				t.Errorf("before: exit %d, want %d:\n%s", got, tc.beforeExit, checkTDump(r.Before))
			}
			if got := checkTExit(r.After); got != tc.afterExit {
				t.Errorf("after: exit %d, want %d:\n%s", got, tc.afterExit, checkTDump(r.After))
			}
			if r.LeaksFixed != tc.leaks || r.CorruptionsFixed != tc.corr {
				t.Errorf("fixed %d leaks and %d corruptions, want %d and %d: %+v", r.LeaksFixed, r.CorruptionsFixed, tc.leaks, tc.corr, r.Repairs)
			}
			if len(r.Repairs) != r.LeaksFixed+r.CorruptionsFixed {
				t.Errorf("%d repair messages for %d repairs", len(r.Repairs), r.LeaksFixed+r.CorruptionsFixed)
			}
			found := tc.unrepaired == ""
			for _, f := range r.Unrepaired {
				found = found || strings.Contains(f.Msg, tc.unrepaired)
			}
			if !found {
				t.Errorf("no unrepaired finding mentions %q: %+v", tc.unrepaired, r.Unrepaired)
			}
			// The file checks the same as After, independently.
			again, err := CheckFile(fsys, "img.qcow2", "")
			if err != nil {
				t.Fatal(err)
			}
			if checkTExit(again) != tc.afterExit {
				t.Errorf("re-check: exit %d, want %d:\n%s", checkTExit(again), tc.afterExit, checkTDump(again))
			}
			now := repairTRead(t, fsys, "img.qcow2")
			if len(now) != len(orig) {
				t.Errorf("file size changed from %d to %d", len(orig), len(now))
			}
			if tc.leaks+tc.corr == 0 && tc.afterExit != 0 && !bytes.Equal(now, orig) {
				t.Error("nothing was repaired but the file changed")
			}
			// Guest data is untouched.
			if !bytes.Equal(now[5*cs:6*cs], orig[5*cs:6*cs]) {
				t.Error("the data cluster changed")
			}
			flags := be.Uint64(now[72:])
			if tc.afterExit == 0 && flags&(IncompatDirty|IncompatCorrupt) != 0 {
				t.Errorf("incompatible features %#x after a clean repair", flags)
			}
			if tc.afterExit == 0 {
				im, err := Open(fsys, "img.qcow2", &Options{ReadWrite: true})
				if err != nil {
					t.Fatalf("open for writing after repair: %v", err)
				}
				if err := im.Close(); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestRepairNeverLowersBelowReferences: every refcount after a repair is at
// least the references the check computed, whatever the starting values.
func TestRepairNeverLowersBelowReferences(t *testing.T) {
	for order := uint32(0); order <= 6; order++ {
		for _, mode := range []RepairMode{RepairLeaks, RepairAll} {
			fsys := checkTBuild(t, order, 8, func(b []byte, set func(k, v uint64)) {
				for k := uint64(0); k < 8; k++ {
					set(k, (k*7+uint64(order))%3) // 0, 1 or 2: every direction
				}
			})
			if _, err := Repair(fsys, "img.qcow2", "", mode); err != nil {
				t.Fatal(err)
			}
			b := repairTRead(t, fsys, "img.qcow2")
			for k := int64(0); k < 8; k++ {
				rc := refcountAt(b[2*4096:3*4096], order, k)
				want := uint64(0)
				if k < 6 {
					want = 1
				}
				if mode == RepairAll && rc != want {
					t.Errorf("order %d %s: cluster %d refcount %d, want %d", order, mode, k, rc, want)
				}
				if mode == RepairLeaks && rc > want && rc != 0 && want == 0 {
					t.Errorf("order %d %s: leaked cluster %d kept refcount %d", order, mode, k, rc)
				}
			}
		}
	}
}

// TestRepairLocked: Repair takes the writer lock and fails cleanly while
// another writer holds it.
func TestRepairLocked(t *testing.T) {
	fsys := checkTBuild(t, 4, 8, func(b []byte, set func(k, v uint64)) { set(7, 1) })
	f, err := fsys.Open("img.qcow2", vfs.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	before := repairTRead(t, fsys, "img.qcow2")
	if _, err := Repair(fsys, "img.qcow2", "", RepairLeaks); !errors.Is(err, vfs.ErrLocked) {
		t.Fatalf("Repair of a locked image: %v, want ErrLocked", err)
	}
	if !bytes.Equal(before, repairTRead(t, fsys, "img.qcow2")) {
		t.Fatal("a refused repair changed the file")
	}
	f.Close()
	r, err := Repair(fsys, "img.qcow2", "", RepairLeaks)
	if err != nil || r.LeaksFixed != 1 || checkTExit(r.After) != 0 {
		t.Fatalf("Repair after unlock: %+v, %v", r, err)
	}
	if _, err := Repair(fsys, "img.qcow2", "", RepairMode(0)); err == nil {
		t.Fatal("Repair with mode 0 succeeded")
	}
	if _, err := Repair(fsys, "missing.qcow2", "", RepairAll); err == nil {
		t.Fatal("Repair of a missing file succeeded")
	}
}

// TestRepairRaw: raw images have no refcounts: checked, left alone.
func TestRepairRaw(t *testing.T) {
	fsys := vfs.NewMem()
	f, err := fsys.Create("disk.raw")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("raw bytes"), 0)
	f.Close()
	r, err := Repair(fsys, "disk.raw", "", RepairAll)
	if err != nil {
		t.Fatal(err)
	}
	if r.Before != r.After || len(r.Repairs) != 0 || checkTExit(r.After) != 0 || r.After.Format != FormatRaw {
		t.Fatalf("raw repair: %+v", r)
	}
}

func TestParseRepairMode(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want RepairMode
		ok   bool
	}{{"leaks", RepairLeaks, true}, {"all", RepairAll, true}, {"", 0, false}, {"ALL", 0, false}, {"errors", 0, false}} {
		m, err := ParseRepairMode(tc.in)
		if (err == nil) != tc.ok || m != tc.want {
			t.Errorf("ParseRepairMode(%q) = %v, %v", tc.in, m, err)
		}
		if tc.ok && m.String() != tc.in {
			t.Errorf("%v.String() = %q", m, m.String())
		}
	}
}

// repairTCopy copies file src to dst.
func repairTCopy(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// repairTAgainstQemu repairs p with Repair and a copy with qemu-img check
// -r, then requires both checkers to find our copy clean and qemu-img
// compare to find the two identical.
func repairTAgainstQemu(t *testing.T, p string, mode RepairMode) *RepairResult {
	t.Helper()
	theirs := filepath.Join(t.TempDir(), "theirs.qcow2")
	repairTCopy(t, p, theirs)
	orig := filepath.Join(t.TempDir(), "orig.qcow2")
	repairTCopy(t, p, orig)
	r, err := Repair(vfs.OS, p, "", mode)
	if err != nil {
		t.Fatal(err)
	}
	if checkTExit(r.After) != 0 {
		t.Fatalf("after repair: exit %d:\n%s", checkTExit(r.After), checkTDump(r.After))
	}
	if q := checkTQemuCheck(t, p); q.Exit != 0 {
		t.Fatalf("qemu-img check after our repair: exit %d:\n%s", q.Exit, q.Stderr)
	}
	if code, out := qemutest.RunImg(t, "check", "-r", mode.String(), "-f", "qcow2", theirs); code != 0 {
		t.Fatalf("qemu-img check -r %s: exit %d\n%s", mode, code, out)
	}
	if code, out := qemutest.RunImg(t, "compare", "-f", "qcow2", "-F", "qcow2", p, theirs); code != 0 {
		t.Fatalf("qemu-img compare with qemu's repair: exit %d\n%s", code, out)
	}
	if code, out := qemutest.RunImg(t, "compare", "-f", "qcow2", "-F", "qcow2", p, orig); code != 0 {
		t.Fatalf("qemu-img compare with the image before repair: exit %d\n%s", code, out)
	}
	return r
}

// TestRepairAgainstQemu pokes qemu-made images and repairs them.
func TestRepairAgainstQemu(t *testing.T) {
	qemutest.Require(t)
	base := func(opts string) func(*testing.T, string) string {
		return checkTMake(opts, "4M", "write -P 1 0 256k", "write -P 2 1M 64k")
	}
	cases := []struct {
		name  string
		build func(*testing.T, string) string
		poke  func(m *checkTImage)
		mode  RepairMode
		want  int // qemu-img check's exit before
	}{
		{"leak-raised-in-use", base(""), func(m *checkTImage) { m.setRefcount(m.dataCluster(1), 3) }, RepairLeaks, 2},
		{"leak-unreferenced", base(""), func(m *checkTImage) { m.put64(m.l2Entry(0, 3), 0) }, RepairLeaks, 3},
		{"leak-unreferenced-r1", base("refcount_bits=1"), func(m *checkTImage) { m.put64(m.l2Entry(0, 3), 0) }, RepairLeaks, 3},
		{"leak-unused-cluster-r64", base("refcount_bits=64"), func(m *checkTImage) {
			k := uint64(len(m.b)) / m.cs()
			m.b = append(m.b, make([]byte, m.cs())...)
			m.setRefcount(k, 5)
		}, RepairLeaks, 3},
		{"zero-refcount", base(""), func(m *checkTImage) { m.setRefcount(m.dataCluster(1), 0) }, RepairAll, 2},
		{"zero-refcount-r4", base("refcount_bits=4"), func(m *checkTImage) { m.setRefcount(m.dataCluster(2), 0) }, RepairAll, 2},
		{"copied-cleared", base(""), func(m *checkTImage) {
			p := m.l2Entry(0, 2)
			m.put64(p, m.u64(p)&^flagCopied)
		}, RepairAll, 2},
		{"copied-cleared-leaks-mode", base(""), func(m *checkTImage) {
			p := m.l2Entry(0, 2)
			m.put64(p, m.u64(p)&^flagCopied)
		}, RepairLeaks, 2},
		{"l1-copied-cleared", base(""), func(m *checkTImage) { m.put64(m.l1Off(), m.u64(m.l1Off())&^flagCopied) }, RepairAll, 2},
		{"snapshot-refcount-low", checkTSnapshots(""), func(m *checkTImage) {
			e := m.u64(m.l2Entry(0, 32))
			if e&flagCompressed == 0 {
				m.t.Fatalf("L2 entry 32 (%#x) is not compressed", e)
			}
			m.setRefcount((e&(1<<(70-m.u32(20))-1))/m.cs(), 1)
		}, RepairAll, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := tc.build(t, t.TempDir())
			m := checkTLoad(t, p)
			tc.poke(m)
			m.save()
			if q := checkTQemuCheck(t, p); q.Exit != tc.want {
				t.Fatalf("test setup: qemu-img check exit %d, want %d\n%s", q.Exit, tc.want, q.Stderr)
			}
			r := repairTAgainstQemu(t, p, tc.mode)
			if r.LeaksFixed+r.CorruptionsFixed == 0 {
				t.Fatalf("nothing repaired: %+v", r)
			}
		})
	}
}

// TestRepairDirtyLazyRefcounts: qemu-io killed with lazy refcounts leaves a
// dirty image with stale refcounts; RepairAll makes it clean, clears the
// dirty bit, and our writer then opens it.
func TestRepairDirtyLazyRefcounts(t *testing.T) {
	qemutest.Require(t)
	p := checkTMake("lazy_refcounts=on", "4M")(t, t.TempDir())
	qemutest.RunIO(t, "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 192k", "-c", "sigraise 9", p)
	if m := checkTLoad(t, p); m.u64(72)&IncompatDirty == 0 {
		t.Fatal("test setup: the dirty bit is not set")
	}
	// Leaks mode cannot make it clean (refcounts are too low): the dirty
	// bit stays.
	r, err := Repair(vfs.OS, p, "", RepairLeaks)
	if err != nil {
		t.Fatal(err)
	}
	if checkTExit(r.After) != 2 || checkTLoad(t, p).u64(72)&IncompatDirty == 0 {
		t.Fatalf("leaks repair of a dirty image: exit %d, flags %#x", checkTExit(r.After), checkTLoad(t, p).u64(72))
	}
	r = repairTAgainstQemu(t, p, RepairAll)
	if r.CorruptionsFixed == 0 {
		t.Fatalf("nothing repaired: %+v", r)
	}
	if f := checkTLoad(t, p).u64(72); f&IncompatDirty != 0 {
		t.Fatalf("dirty bit still set: %#x", f)
	}
	im, err := Open(vfs.OS, p, &Options{ReadWrite: true})
	if err != nil {
		t.Fatalf("open for writing after repair: %v", err)
	}
	if _, err := im.WriteAt(bytes.Repeat([]byte{9}, 4096), 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if q := checkTQemuCheck(t, p); q.Exit != 0 {
		t.Fatalf("qemu-img check after writing: exit %d\n%s", q.Exit, q.Stderr)
	}
	qemutest.Script(t, "qcow2", p, "read -P 1 0 64k", "read -P 2 1M 192k", "read -P 9 2M 4k")
}

// TestRepairV1: QCOW version 1 has no refcounts: nothing to repair.
func TestRepairV1(t *testing.T) {
	qemutest.Require(t)
	p := filepath.Join(t.TempDir(), "v1.qcow")
	qemutest.Img(t, "create", "-q", "-f", "qcow", p, "1M")
	qemutest.Script(t, "qcow", p, "write -P 3 0 8k")
	before, _ := os.ReadFile(p)
	r, err := Repair(vfs.OS, p, "", RepairAll)
	if err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(p)
	if r.Before != r.After || len(r.Repairs) != 0 || checkTExit(r.After) != 0 || !bytes.Equal(before, after) {
		t.Fatalf("v1 repair: %+v (file changed: %v)", r, !bytes.Equal(before, after))
	}
}

// repairTLow returns the clusters whose stored refcount is below their
// references ("ERROR cluster N (...) refcount=a reference=b" findings).
func repairTLow(r *CheckResult) map[int64]bool {
	low := map[int64]bool{}
	for _, f := range r.Findings {
		var k, rc, ref int64
		var hex string
		if n, _ := fmt.Sscanf(f.Msg, "ERROR cluster %d %s refcount=%d reference=%d", &k, &hex, &rc, &ref); n == 4 && rc < ref {
			low[k] = true
		}
	}
	return low
}

// TestRepairCrashStates replays every crash state of a repair (writes torn
// per sector, reordered between barriers) and checks the write ordering:
// no state has a refcount below its references that was not already low
// before the repair, the dirty bit is only gone from states that check
// clean, and the repair's final state is clean.
func TestRepairCrashStates(t *testing.T) {
	const cs = 4096
	be := binary.BigEndian
	for _, order := range []uint32{1, 4} { // 1: 2-bit refcounts, several per byte
		mem := checkTBuild(t, order, 8, func(b []byte, set func(k, v uint64)) {
			be.PutUint64(b[72:], IncompatDirty)
			set(5, 0)                    // raise
			set(7, 1)                    // lower (unused cluster)
			set(4, 0)                    // raise the L2 table
			set(3, 2)                    // lower the L1 table to 1, not 0
			be.PutUint64(b[3*cs:], 4*cs) // L1 COPIED cleared
			be.PutUint64(b[4*cs:], 5*cs) // L2 COPIED cleared
		})
		before, err := CheckFile(mem, "img.qcow2", "")
		if err != nil {
			t.Fatal(err)
		}
		lowBefore := repairTLow(before)
		if len(lowBefore) != 2 {
			t.Fatalf("test setup: low refcounts %v:\n%s", lowBefore, checkTDump(before))
		}
		ffs := faultfs.New(mem)
		r, err := Repair(ffs, "img.qcow2", "", RepairAll)
		if err != nil {
			t.Fatal(err)
		}
		if checkTExit(r.After) != 0 || r.LeaksFixed != 2 || r.CorruptionsFixed != 4 {
			t.Fatalf("repair: fixed %d leaks %d corruptions:\n%s", r.LeaksFixed, r.CorruptionsFixed, checkTDump(r.After))
		}
		rec := ffs.Recording()
		clean := 0
		for _, m := range []faultfs.Model{faultfs.Torn, faultfs.Reorder} {
			n, err := rec.Replay(m, 1, 512, func(s *faultfs.State) error {
				res, err := CheckFile(s, "img.qcow2", "")
				if err != nil {
					return fmt.Errorf("point %d: %w", s.Point(), err)
				}
				for k := range repairTLow(res) {
					if !lowBefore[k] {
						return fmt.Errorf("%s point %d: cluster %d has a refcount below its references:\n%s", m, s.Point(), k, checkTDump(res))
					}
				}
				f, err := s.Open("img.qcow2", vfs.ReadOnly)
				if err != nil {
					return err
				}
				var hb [8]byte
				_, err = f.ReadAt(hb[:], 72)
				f.Close()
				if err != nil {
					return err
				}
				if be.Uint64(hb[:])&IncompatDirty == 0 {
					if checkTExit(res) != 0 {
						return fmt.Errorf("%s point %d: dirty bit cleared on an image that does not check clean:\n%s", m, s.Point(), checkTDump(res))
					}
					clean++
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			if n < 4 {
				t.Fatalf("%s: only %d crash states", m, n)
			}
		}
		if clean == 0 {
			t.Fatal("no crash state has the dirty bit cleared")
		}
	}
}
