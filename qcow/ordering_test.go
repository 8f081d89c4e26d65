package qcow_test

import (
	"bytes"
	"path/filepath"
	"runtime/debug"
	"slices"
	"testing"
	"time"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/harness"
	"github.com/qcowcrash/qcowcrash/internal/hostile"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// orderingWorkload creates a 512-byte-cluster image of format v1, v2 or
// v3, opens it for writing over a recording faultfs with the given bugs,
// writes new clusters (a new L2 table, data at the end of the file, an
// overwrite) in write-back mode with flushes, and returns the op log.
func orderingWorkload(t *testing.T, format string, bugs qcow.WriterBugs) *faultfs.Recording {
	t.Helper()
	mem := vfs.NewMem()
	o := qcow.CreateOptions{Format: qcow.FormatQCOW2, Version: 3, Size: 256 << 10, ClusterSize: 512}
	switch format {
	case "v1":
		o.Format, o.Version = qcow.FormatQCOW, 0
	case "v2":
		o.Version = 2
	}
	if err := qcow.Create(mem, "img", o); err != nil {
		t.Fatal(err)
	}
	ffs := faultfs.New(mem)
	im, err := qcow.Open(ffs, "img", &qcow.Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	qcow.SetWriterBugs(im, bugs)
	for i, off := range []int64{0, 100 << 10, 3 << 10, 0, 200 << 10} {
		if _, err := im.WriteAt(bytes.Repeat([]byte{byte(i + 1)}, 700), off); err != nil {
			t.Fatal(err)
		}
		if i%2 == 1 {
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	return ffs.Recording()
}

// TestCrashOrderingWriterBugs: the ordering rules (harness.CheckOrdering)
// catch this package's writer with each ordering bug, in the op log alone,
// and never flag it without.
func TestCrashOrderingWriterBugs(t *testing.T) {
	for _, tc := range []struct {
		name    string
		bugs    qcow.WriterBugs
		formats []string
		rule    string
	}{
		{"correct", 0, []string{"v1", "v2", "v3"}, ""},
		{"no-data-barrier", qcow.BugNoDataBarrier, []string{"v1", "v2", "v3"}, harness.RuleContents},
		{"no-refcount-update", qcow.BugNoRefcountUpdate, []string{"v2", "v3"}, harness.RuleRefcount},
	} {
		for _, f := range tc.formats {
			t.Run(tc.name+"/"+f, func(t *testing.T) {
				fails, judged := harness.CheckOrdering(orderingWorkload(t, f, tc.bugs), "img", 0)
				var rules []string
				for _, fl := range fails {
					if !slices.Contains(rules, fl.Rule) {
						rules = append(rules, fl.Rule)
					}
					t.Logf("%s", fl.Detail)
				}
				if judged == 0 {
					t.Fatal("no op judged")
				}
				switch {
				case tc.rule == "" && len(fails) > 0:
					t.Fatalf("the correct writer breaks %v", rules)
				case tc.rule != "" && !slices.Contains(rules, tc.rule):
					t.Fatalf("rules broken: %v, want %s among them", rules, tc.rule)
				}
			})
		}
	}
}

// layoutOf reads the layout of the file name of fsys.
func layoutOf(t *testing.T, fsys vfs.FS, name string) *qcow.Layout {
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
	l, err := qcow.ReadLayout(f, size)
	if err != nil {
		t.Fatalf("ReadLayout: %v", err)
	}
	return l
}

// consistent checks that every referenced cluster of l has the refcount
// its references need, exactly, and returns the pointer kinds seen.
func consistent(t *testing.T, l *qcow.Layout) map[qcow.PointerKind]int {
	t.Helper()
	kinds := map[qcow.PointerKind]int{}
	for _, p := range l.Pointers {
		kinds[p.Kind]++
	}
	if !l.HasRefcounts() {
		return kinds
	}
	for c, n := range l.References() {
		if rc := l.Refcount(c); rc != uint64(n) {
			t.Errorf("cluster %d: %d references, refcount %d", c, n, rc)
		}
	}
	return kinds
}

// TestReadLayoutOurImages: the layout of images this package wrote (and
// check found clean) lists the tables and data, and its references equal
// the refcounts.
func TestReadLayoutOurImages(t *testing.T) {
	for _, f := range []string{"v1", "v2", "v3"} {
		t.Run(f, func(t *testing.T) {
			rec := orderingWorkload(t, f, 0)
			st, err := rec.Point(rec.Len())
			if err != nil {
				t.Fatal(err)
			}
			fsys := st.Sample(faultfs.Process, 0)
			res, err := qcow.CheckFile(fsys, "img", "")
			if err != nil || res.Corruptions+res.Leaks > 0 {
				t.Fatalf("check: %v %+v", err, res)
			}
			kinds := consistent(t, layoutOf(t, fsys, "img"))
			if kinds[qcow.PtrL1Table] != 1 || kinds[qcow.PtrL2Table] == 0 || kinds[qcow.PtrData] < 4 {
				t.Fatalf("pointer kinds %v", kinds)
			}
			if f != "v1" && (kinds[qcow.PtrRefcountTable] != 1 || kinds[qcow.PtrRefcountBlock] == 0) {
				t.Fatalf("pointer kinds %v", kinds)
			}
		})
	}
}

// TestReadLayoutQemuImage reads an image qemu wrote, with an internal
// snapshot and compressed clusters: every reference qemu counted is found,
// none more (qemu's refcounts equal the layout's references).
func TestReadLayoutQemuImage(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "q.qcow2")
	qemutest.Create(t, img, "qcow2", "cluster_size=4096", 1<<20)
	qemutest.IO(t, "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -c -P 2 128k 4k", img)
	qemutest.Img(t, "snapshot", "-c", "s1", img)
	qemutest.IO(t, "-f", "qcow2", "-c", "write -P 3 0 8k", "-c", "write -P 4 512k 4k", img)
	if code, out := qemutest.Check(t, img); code != 0 {
		t.Fatalf("qemu-img check: %d %s", code, out)
	}
	kinds := consistent(t, layoutOf(t, vfs.OS, img))
	for _, k := range []qcow.PointerKind{qcow.PtrSnapshotTable, qcow.PtrSnapshotL1, qcow.PtrCompressed, qcow.PtrData, qcow.PtrL2Table} {
		if kinds[k] == 0 {
			t.Errorf("no %s pointer: %v", k, kinds)
		}
	}
}

// TestReadLayoutHostile: every hostile image gets an answer, quickly and
// without a panic; every valid base image gets a layout.
func TestReadLayoutHostile(t *testing.T) {
	one := func(name string, b []byte, valid bool) {
		start := time.Now()
		defer func() {
			if p := recover(); p != nil {
				t.Fatalf("%s: panic: %v\n%s", name, p, debug.Stack())
			}
		}()
		l, err := qcow.ReadLayout(bytes.NewReader(b), int64(len(b)))
		if valid && err != nil {
			t.Errorf("%s: %v", name, err)
		}
		if err == nil {
			l.References()
			l.MetadataRanges()
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("%s: took %v", name, d)
		}
	}
	for _, b := range hostile.Bases() {
		one(b.Name, b.Files[b.Main], true)
	}
	for _, v := range hostile.Variants() {
		one(v.Name, v.Files[v.Main], false)
	}
	for _, s := range hostile.TinySeeds() {
		one(s.Name, s.Data, false)
	}
}

// FuzzReadLayout: no input makes ReadLayout panic.
func FuzzReadLayout(f *testing.F) {
	for _, s := range hostile.TinySeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := qcow.ReadLayout(bytes.NewReader(data), int64(len(data)))
		if err == nil {
			l.References()
			l.MetadataRanges()
		}
	})
}
