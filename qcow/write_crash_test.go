package qcow

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// TestWriteCrashStates is a first crash-consistency check of the writer's
// ordering (the randomized harness is a separate package): a small workload
// runs over faultfs, and at every crash point a sample of the states the
// torn model (any subset of unsynced 512-byte sectors survives, sizes
// included) allows must open, have no corruption (leaks are allowed), and
// hold in every sector a value the flat model permits.
func TestWriteCrashStates(t *testing.T) {
	perPoint := 24
	if testing.Short() {
		perPoint = 6
	}
	for _, c := range []struct {
		o       CreateOptions
		through bool
	}{
		{CreateOptions{ClusterSize: 512, RefcountBits: 64}, true},
		{CreateOptions{ClusterSize: 512, RefcountBits: 64}, false},
		{CreateOptions{ClusterSize: 4096, Version: 2}, false},
		{CreateOptions{Format: FormatQCOW, ClusterSize: 512}, true},
		{CreateOptions{Format: FormatQCOW}, false},
	} {
		name := fmt.Sprintf("%s-through=%v", wtName(c.o), c.through)
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if err := wtCrashRun(t, c.o, c.through, perPoint, 0); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// wtCrashRun runs the workload (with the deliberate bugs) and returns the
// first crash state that fails a verdict.
func wtCrashRun(t *testing.T, o CreateOptions, through bool, perPoint int, bugs writerBugs) error {
	const size = 160 << 10
	mem := vfs.NewMem()
	o.Size = size
	if err := Create(mem, "img", o); err != nil {
		t.Fatal(err)
	}
	ffs := faultfs.New(mem)
	im, err := Open(ffs, "img", &Options{ReadWrite: true, WriteThrough: through})
	if err != nil {
		t.Fatal(err)
	}
	im.w.bugs = bugs
	cs := im.ClusterSize()
	ops := []wtOp{
		{kind: "write", off: 0, n: cs, fill: 1},
		{kind: "write", off: size/2 + 100, n: 700, fill: 2},
		{kind: "flush"},
		{kind: "write", off: 10, n: 50, fill: 3},
		{kind: "write", off: cs - 300, n: 2*cs + 600, fill: 4},
		{kind: "zero", off: cs, n: cs},
		{kind: "write", off: cs + 512, n: 512, fill: 5},
		{kind: "flush"},
		{kind: "write", off: size / 4, n: size / 2, fill: 6},
		{kind: "resize", n: 2 * size},
		{kind: "write", off: 2*size - cs - 512, n: cs + 512, fill: 7},
		{kind: "flush"},
	}
	// ends[i] is the log length when op i returned.
	ends := make([]int, len(ops))
	shadow := model.New(size, nil)
	for i, op := range ops {
		if err := wtApplyOp(im, shadow, op); err != nil {
			t.Fatalf("op %d: %v", i, err)
		}
		ends[i] = len(ffs.Log())
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	rec := ffs.Recording()

	// modelAt replays into a fresh model the ops completed before log
	// position n; the op in flight at n counts as failed (old or new).
	modelAt := func(n int) *model.Disk {
		m := model.New(size, nil)
		for i, op := range ops {
			if ends[i] <= n {
				switch op.kind {
				case "write":
					m.Write(wtFill(op.n, op.fill), op.off)
				case "zero":
					m.WriteZeroes(op.off, op.n)
				case "flush":
					m.Flush()
				case "resize":
					m.Resize(op.n, true) // durable on return
				}
				if through {
					m.Flush() // durable on return
				}
				continue
			}
			switch op.kind {
			case "write":
				m.FailedWrite(wtFill(op.n, op.fill), op.off)
			case "zero":
				m.FailedWriteZeroes(op.off, op.n)
			case "resize":
				m.FailedResize(op.n)
			}
			break
		}
		m.Crash()
		return m
	}
	states := 0
	for p := range rec.Points() {
		for s := range p.States(faultfs.Torn, 7, perPoint) {
			states++
			what := fmt.Sprintf("crash after op %d of %d (%s)", p.Ops(), rec.Len(), s)
			res, err := CheckFile(s, "img", "")
			if err != nil {
				return verdictf("check", "%s: check: %v", what, err)
			}
			if res.Corruptions > 0 {
				return verdictf("check", "%s: %d corruptions: %+v", what, res.Corruptions, res.Findings)
			}
			im, err := Open(s, "img", nil)
			if err != nil {
				return verdictf("open", "%s: open: %v", what, err)
			}
			err = wtCheckImage(modelAt(p.Ops()), im)
			im.Close()
			var se *model.SizeError
			switch {
			case errors.As(err, &se):
				return verdictf("size", "%s: %v", what, err)
			case err != nil:
				return verdictf("content", "%s: %v", what, err)
			}
		}
	}
	t.Logf("%d crash states checked over %d file operations", states, rec.Len())
	if states < 50 {
		t.Fatalf("only %d crash states", states)
	}
	return nil
}

// TestCreateCrashStates crashes Create (over faultfs, which has no
// vfs.Renamer, so the magic number is written last) at every point: each
// torn state either has no QCOW image under the name (no file, or a file
// without the magic) or a complete, clean, empty one.
func TestCreateCrashStates(t *testing.T) {
	for _, o := range []CreateOptions{
		{Size: 64 << 20, ClusterSize: 512},
		{Version: 2, Size: 1 << 30},
		{Format: FormatQCOW, Size: 64 << 20},
	} {
		t.Run(wtName(o), func(t *testing.T) {
			ffs := faultfs.New(vfs.NewMem())
			if err := Create(ffs, "d/img", o); err != nil {
				t.Fatal(err)
			}
			images := 0
			for p := range ffs.Recording().Points() {
				for s := range p.States(faultfs.Torn, 3, 64) {
					b, err := s.ReadFile("d/img")
					if err != nil || len(b) < 4 || string(b[:4]) != "QFI\xfb" {
						continue // no image
					}
					images++
					res, err := CheckFile(s, "d/img", "")
					if err != nil || res.Corruptions+res.Leaks > 0 {
						t.Fatalf("crash after op %d (%s): image with the magic is not clean: %v %+v", p.Ops(), s, err, res)
					}
					im, err := Open(s, "d/img", nil)
					if err != nil {
						t.Fatalf("crash after op %d (%s): %v", p.Ops(), s, err)
					}
					buf := make([]byte, 1<<20)
					if _, err := im.ReadAt(buf, im.Size()/2); err != nil || !bytes.Equal(buf, make([]byte, len(buf))) {
						t.Fatalf("crash after op %d: image does not read as zeros: %v", p.Ops(), err)
					}
					im.Close()
				}
			}
			if images == 0 {
				t.Fatal("no crash state held the image")
			}
		})
	}
}
