package kvmtool2011_test

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/harness"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
)

// corpusDir holds the kvmtool2011 corpus entries.
var corpusDir = filepath.Join("..", "..", "..", "corpora", "kvmtool2011")

// qemu confirms every crash-state finding of the kvmtool2011 corpus on the
// exported crash state the harness failed: qemu-img check reports the
// corruption for QCOW2; for QCOW version 1 qemu-img check refuses to run
// ("does not support checks", exit 63), so qemu-io or qemu-img compare
// shows the damage instead. As a control, the untouched image (crash
// point 0) passes qemu-img check. The entry whose finding is not a crash
// state (v1-l1-size-rounded-down: the write fails outright) has no image
// to export and is not listed.
func TestQemuConfirmsFindings(t *testing.T) {
	qemutest.Require(t)
	tests := []struct {
		entry     string
		checkExit int    // qemu-img check: 2 corruptions, 63 no checks for this format
		checkOut  string // in its output
		// A qemu-io script run on a copy of the state, and what its
		// output must (and must not) contain.
		io             []string
		ioOut, ioNotIn string
		// compareOut, when set: qemu-img compare with the model's
		// expected disk must report this mismatch.
		compareOut string
	}{
		{entry: "v2-no-refcounts", checkExit: 2, checkOut: "refcount=0 reference=1"},
		{entry: "v2-l2-table-past-eof", checkExit: 2, checkOut: "exceeding the end of the file"},
		{entry: "v2-data-cluster-past-eof", checkExit: 2, checkOut: "exceeding the end of the file"},
		{
			// L1 entry 2 (guest 64 KiB..96 KiB) points at an L2 table past
			// the end of the file; qemu puts its new data cluster there.
			entry: "v1-l2-table-past-eof", checkExit: 63, checkOut: "does not support checks",
			io:    []string{"write -P 0xaa 65536 512", "write -P 0xbb 66048 512", "read -P 0xaa 65536 512"},
			ioOut: "Pattern verification failed",
		},
		{
			// Guest cluster 1's L2 entry names the host cluster at the
			// end of the file; qemu's next new cluster (guest cluster 2)
			// goes there too, so guest cluster 1 reads what was written
			// to guest cluster 2.
			entry: "v1-data-cluster-past-eof", checkExit: 63, checkOut: "does not support checks",
			io:    []string{"write -P 0xaa 1024 512", "read -P 0xaa 512 512"},
			ioOut: "read 512/512 bytes at offset 512", ioNotIn: "Pattern verification failed",
		},
		{
			// The failed L1 entry's rollback left L1 entry 0 pointing at
			// a truncated-away L2 table; qemu's first data cluster lands
			// on it.
			entry: "v1-rollback-keeps-l1-entry", checkExit: 63, checkOut: "does not support checks",
			io:    []string{"write -P 0xaa 0 512", "write -P 0xbb 512 512", "read -P 0xaa 0 512"},
			ioOut: "Pattern verification failed",
		},
		{
			// The failed L2 entry's rollback left guest cluster 1 naming
			// the host cluster at the end of the file, as in
			// v1-data-cluster-past-eof.
			entry: "v1-rollback-keeps-l2-entry", checkExit: 63, checkOut: "does not support checks",
			io:    []string{"write -P 0xaa 1024 512", "read -P 0xaa 512 512"},
			ioOut: "read 512/512 bytes at offset 512", ioNotIn: "Pattern verification failed",
		},
		{entry: "v1-backing-not-copied", checkExit: 63, checkOut: "does not support checks", compareOut: "Content mismatch at offset 186368"},
	}
	for _, tc := range tests {
		t.Run(tc.entry, func(t *testing.T) {
			e, err := harness.LoadEntry(filepath.Join(corpusDir, tc.entry+".json"))
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			var failed harness.StateResult
			ex, err := harness.Explore(e.Case, harness.ExploreOptions{StopAtFailure: true, Export: dir, Visit: func(r harness.StateResult) {
				if r.Failure != nil {
					failed = r
				}
			}})
			if err != nil {
				t.Fatal(err)
			}
			if failed.Failure == nil || failed.Failure.Kind != e.Expect {
				t.Fatalf("exploration: %v; want a %q failure in an exported state", ex.Verdict.Failure, e.Expect)
			}
			img := failed.Image
			t.Logf("%s: %s", filepath.Base(img), failed.Failure)

			ext := filepath.Ext(img)
			if code, out := qemutest.Check(t, filepath.Join(dir, harness.ExportName(0, 0)+ext)); code != 0 && code != 63 {
				t.Errorf("control: qemu-img check of the untouched image exits %d:\n%s", code, out)
			}
			code, out := qemutest.Check(t, img)
			if code != tc.checkExit || !strings.Contains(out, tc.checkOut) {
				t.Errorf("qemu-img check exits %d, want %d with %q:\n%s", code, tc.checkExit, tc.checkOut, out)
			}
			format := map[string]string{".qcow": "qcow", ".qcow2": "qcow2"}[ext]
			if len(tc.io) > 0 {
				args := []string{"-f", format}
				for _, c := range tc.io {
					args = append(args, "-c", c)
				}
				_, out := qemutest.RunIO(t, append(args, img)...)
				if !strings.Contains(out, tc.ioOut) || (tc.ioNotIn != "" && strings.Contains(out, tc.ioNotIn)) {
					t.Errorf("qemu-io %q: want %q and not %q in:\n%s", tc.io, tc.ioOut, tc.ioNotIn, out)
				}
			}
			if tc.compareOut != "" {
				exp := filepath.Join(dir, fmt.Sprintf("p%06d.expected.raw", failed.Point))
				code, out := qemutest.RunImg(t, "compare", "-f", format, "-F", "raw", img, exp)
				if code != 1 || !strings.Contains(out, tc.compareOut) {
					t.Errorf("qemu-img compare exits %d, want 1 with %q:\n%s", code, tc.compareOut, out)
				}
			}
		})
	}
}
