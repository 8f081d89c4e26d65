package qcow_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// TestSnapshotViewMatchesQemu builds images with internal snapshots with
// qemu-img and qemu-io (snapshots taken between patterned writes, zero
// writes, compressed clusters and a grow) and compares every snapshot's
// view with `qemu-img convert -l snapshot.name=NAME`, which qemu reads at
// the image's current size (zeros past the snapshot's own disk size).
func TestSnapshotViewMatchesQemu(t *testing.T) {
	qemutest.Require(t)
	for _, c := range []struct {
		compat string
		cs     int64
		grow   bool
	}{
		{"0.10", 512, false},
		{"1.1", 4096, true},
		{"1.1", 65536, false},
		{"0.10", 65536, false},
		{"1.1", 512, true},
	} {
		t.Run(fmt.Sprintf("compat=%s/cs=%d/grow=%v", c.compat, c.cs, c.grow), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			size := 64 * c.cs
			img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", fmt.Sprintf("compat=%s,cluster_size=%d", c.compat, c.cs), size)
			qemuIO(t, "qcow2", img, qemutest.Pattern(c.cs, size, 0)...)
			qemuIO(t, "qcow2", img, fmt.Sprintf("write -c -P 0x3c %d %d", 20*c.cs, c.cs))
			qemutest.Img(t, "snapshot", "-c", "s1", img)
			qemuIO(t, "qcow2", img, qemutest.Pattern(c.cs, size, 1)...)
			if c.grow {
				qemutest.Img(t, "resize", "-q", img, fmt.Sprint(2*size))
				qemuIO(t, "qcow2", img, fmt.Sprintf("write -P 0x7e %d %d", size+100, c.cs))
			}
			qemutest.Img(t, "snapshot", "-c", "s2", img)
			qemuIO(t, "qcow2", img, qemutest.Pattern(c.cs, size, 2)...)

			im, err := qcow.Open(vfs.OS, img, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			snaps, err := im.Snapshots()
			if err != nil {
				t.Fatal(err)
			}
			if len(snaps) != 2 {
				t.Fatalf("%d snapshots, want 2", len(snaps))
			}
			for _, s := range snaps {
				v, err := im.SnapshotView(s)
				if err != nil {
					t.Fatalf("snapshot %s: %v", s.Name, err)
				}
				wantSize := size
				if c.grow && s.Name == "s2" {
					wantSize = 2 * size
				}
				if v.Size() != wantSize {
					t.Fatalf("snapshot %s: size %d, want %d", s.Name, v.Size(), wantSize)
				}
				raw := filepath.Join(dir, s.Name+".raw")
				qemutest.Img(t, "convert", "-l", "snapshot.name="+s.Name, "-O", "raw", img, raw)
				want, err := os.ReadFile(raw)
				if err != nil {
					t.Fatal(err)
				}
				if int64(len(want)) < v.Size() || !bytes.Equal(want[v.Size():], make([]byte, int64(len(want))-v.Size())) {
					t.Fatalf("snapshot %s: qemu's view is %d bytes, not zeros past %d", s.Name, len(want), v.Size())
				}
				got := make([]byte, v.Size())
				if n, err := v.ReadAt(got, 0); n != len(got) {
					t.Fatalf("snapshot %s: read %d bytes: %v", s.Name, n, err)
				}
				if i := firstDiff(got, want); i >= 0 {
					t.Fatalf("snapshot %s differs from qemu-img convert -l at byte %d: got %x want %x", s.Name, i, got[i:min(i+16, len(got))], want[i:min(i+16, len(got))])
				}
				active := make([]byte, v.Size())
				im.ReadAt(active, 0)
				if bytes.Equal(active, got) {
					t.Fatalf("snapshot %s reads like the active disk: the workload proves nothing", s.Name)
				}
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if i >= len(b) || a[i] != b[i] {
			return i
		}
	}
	return -1
}

// TestSnapshotViewHostile: a snapshot whose L1 table is misplaced, too big
// or holds invalid entries gives an error naming the field, never a panic
// or a huge allocation.
func TestSnapshotViewHostile(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	const cs = 4096
	img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", fmt.Sprintf("cluster_size=%d", cs), 1<<20)
	qemuIO(t, "qcow2", img, "write -P 0xff 0 64k")
	qemutest.Img(t, "snapshot", "-c", "s1", img)
	im, err := qcow.Open(vfs.OS, img, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	snaps, err := im.Snapshots()
	if err != nil || len(snaps) != 1 {
		t.Fatalf("snapshots: %v %v", snaps, err)
	}
	good := snaps[0]
	// The first data cluster: all 0xff, so every entry has reserved bits.
	var dataHost uint64
	for off := int64(cs); off < 1<<20; off += cs {
		b := make([]byte, 8)
		f, _ := os.Open(img)
		f.ReadAt(b, off)
		f.Close()
		if bytes.Equal(b, bytes.Repeat([]byte{0xff}, 8)) {
			dataHost = uint64(off)
			break
		}
	}
	if dataHost == 0 {
		t.Fatal("no data cluster of 0xff found")
	}
	for _, tc := range []struct {
		name  string
		edit  func(s *qcow.Snapshot)
		field string
		err   error
	}{
		{"unaligned L1", func(s *qcow.Snapshot) { s.L1Offset += 8 }, "snapshot_l1_table_offset", qcow.ErrFormat},
		{"L1 at the header", func(s *qcow.Snapshot) { s.L1Offset = 0 }, "snapshot_l1_table_offset", qcow.ErrFormat},
		{"L1 past the file", func(s *qcow.Snapshot) { s.L1Offset = 1 << 40 }, "snapshot_l1_table_offset", qcow.ErrFormat},
		{"L1 too big", func(s *qcow.Snapshot) { s.L1Size = 1 << 31 }, "snapshot_l1_size", qcow.ErrLimit},
		{"L1 entries with reserved bits", func(s *qcow.Snapshot) { s.L1Offset = dataHost }, "snapshot_l1_entry", qcow.ErrFormat},
		{"disk size too large", func(s *qcow.Snapshot) { s.DiskSize = 1 << 63 }, "snapshot_disk_size", qcow.ErrFormat},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := good
			tc.edit(&s)
			_, err := im.SnapshotView(s)
			var fe *qcow.FormatError
			if !errors.As(err, &fe) || fe.Field != tc.field || !errors.Is(err, tc.err) {
				t.Fatalf("got %v, want a %v naming %s", err, tc.err, tc.field)
			}
		})
	}
	if _, err := im.SnapshotView(good); err != nil {
		t.Fatalf("the unedited snapshot: %v", err)
	}
}

// errRead is the error failReadFS injects.
var errRead = errors.New("injected read error")

// failReadFS fails every read at or after from, once armed.
type failReadFS struct {
	vfs.FS
	from  int64
	armed *bool
}

func (f failReadFS) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	h, err := f.FS.Open(name, flag)
	if err != nil {
		return nil, err
	}
	return failReadFile{h, f}, nil
}

type failReadFile struct {
	vfs.File
	fs failReadFS
}

func (f failReadFile) ReadAt(p []byte, off int64) (int, error) {
	if *f.fs.armed && off+int64(len(p)) > f.fs.from {
		return 0, errRead
	}
	return f.File.ReadAt(p, off)
}

// TestSnapshotsReadErrorWrapped: an I/O error reading the snapshot table
// is returned wrapped (errors.Is finds it), not flattened into a format
// error: the harness's errors verdict requires an injected fault to reach
// the caller (found by a soak case on a qemu-made snapshot image).
func TestSnapshotsReadErrorWrapped(t *testing.T) {
	qemutest.Require(t)
	img := qemutest.Create(t, filepath.Join(t.TempDir(), "img.qcow2"), "qcow2", "cluster_size=4096", 1<<20)
	qemuIO(t, "qcow2", img, "write -P 0x11 0 64k")
	qemutest.Img(t, "snapshot", "-c", "s1", img)
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	mem := vfs.NewMem()
	f, _ := mem.Create("img")
	f.WriteAt(b, 0)
	f.Close()
	armed := false
	snapOff := int64(binary.BigEndian.Uint64(b[64:72]))
	im, err := qcow.Open(failReadFS{mem, snapOff, &armed}, "img", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	armed = true
	if _, err := im.Snapshots(); !errors.Is(err, errRead) {
		t.Fatalf("Snapshots() = %v, want an error wrapping the read error", err)
	}
}
