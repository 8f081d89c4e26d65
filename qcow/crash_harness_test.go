package qcow_test

import (
	"slices"
	"sync"
	"testing"

	"github.com/qcowcrash/qcowcrash/harness"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// bugTarget is this writer with deliberate bugs, as a harness target.
type bugTarget struct {
	name string
	bugs qcow.WriterBugs
}

func (b bugTarget) Name() string      { return b.name }
func (b bugTarget) Formats() []string { return slices.Clone(harness.Formats) }
func (b bugTarget) Resizes() bool     { return true }
func (b bugTarget) Open(fsys vfs.FS, name string, wt bool) (harness.Writer, error) {
	im, err := qcow.Open(fsys, name, &qcow.Options{ReadWrite: true, WriteThrough: wt})
	if err != nil {
		return nil, err
	}
	qcow.SetWriterBugs(im, b.bugs)
	return im, nil
}

var registerBugTargets = sync.OnceValue(func() error {
	for _, t := range []bugTarget{
		{"qcow-bug-snapshot-in-place", qcow.BugSnapshotInPlace},
		{"qcow-bug-resize-not-durable", qcow.BugResizeNotDurable},
	} {
		if err := harness.Register(t); err != nil {
			return err
		}
	}
	return nil
})

// TestCrashHarnessCatchesBrokenWriters shows that the harness's verdicts
// catch the blind spots of issue 12 in this writer: each deliberately
// broken writer, run by harness.Run as a target, must fail with the
// expected kind, and the correct writer must pass the same case.
//
//   - snapshot-in-place: guest data is written in place into a cluster
//     shared with an internal snapshot (refcount 2, COPIED ignored): the
//     active disk reads back fine and the refcounts stay consistent, but
//     the snapshot's view changes (kind "snapshot"). The case starts from
//     a qemu-made image with two snapshots (harness.ImageQemuSnapshot).
//   - resize-not-durable: Resize leaves the new size in memory until the
//     next flush although it is documented durable on return (kind
//     "size").
func TestCrashHarnessCatchesBrokenWriters(t *testing.T) {
	if err := registerBugTargets(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, target, id, kind string
		qemu                   bool
	}{
		{"snapshot-in-place", "qcow-bug-snapshot-in-place",
			"c1:v3:cs=4096:sz=131072:b=0:m=torn:wt=0:ops=10:spp=2:t=T:seed=0x51:img=qemu-snapshot", harness.KindSnapshot, true},
		{"snapshot-in-place-v2", "qcow-bug-snapshot-in-place",
			"c2:v2:cs=512:sz=65536:b=0:m=reorder:wt=1:ops=w30000+700.1,f:spp=2:t=T:seed=0x52:img=qemu-snapshot", harness.KindSnapshot, true},
		{"resize-not-durable", "qcow-bug-resize-not-durable",
			"c2:v3:cs=512:sz=32768:b=0:m=lose-unsynced:wt=0:ops=w100+1000.1,r1048576,w1000000+3000.2,f:spp=4:t=T:seed=0x53", harness.KindSize, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if tc.qemu {
				qemutest.Require(t)
			}
			for _, target := range []string{tc.target, harness.TargetQCOW} {
				c, err := harness.ParseID(replaceTarget(tc.id, target))
				if err != nil {
					t.Fatal(err)
				}
				v := harness.Run(c)
				switch {
				case target == harness.TargetQCOW && !v.OK:
					t.Fatalf("the correct writer fails %s: %s", c.ID(), v.Failure)
				case target == harness.TargetQCOW:
				case v.OK:
					t.Fatalf("the broken writer %s was not caught by %s", tc.name, c.ID())
				case v.Failure.Kind != tc.kind:
					t.Fatalf("the broken writer %s failed %s with kind %s, want %s: %s", tc.name, c.ID(), v.Failure.Kind, tc.kind, v.Failure)
				default:
					t.Logf("caught %s: %s: %s", tc.name, c.ID(), v.Failure)
				}
			}
		})
	}
}

// replaceTarget puts target in place of the "t=T" field of id.
func replaceTarget(id, target string) string {
	for i := 0; i+4 <= len(id); i++ {
		if id[i:i+4] == ":t=T" && (i+4 == len(id) || id[i+4] == ':') {
			return id[:i] + ":t=" + target + id[i+4:]
		}
	}
	return id
}
