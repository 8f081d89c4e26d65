package harness

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// ImageQemuSnapshot is the image recipe of a case that starts from a QCOW2
// image (version 2 or 3 as the case's format says, the case's cluster
// size and size, no backing file) with two internal snapshots, all made by
// qemu: `qemu-img create`, qemu-io writes of distinct patterns over half
// the disk and at seeded places (a zero write and, when the disk holds
// four clusters of 1 KiB or more, a compressed cluster among them; qemu
// compresses no smaller ones), `qemu-img snapshot -c s1`, more writes,
// `qemu-img snapshot -c s2`, more writes. So the
// workload starts with clusters shared with one or both snapshots
// (refcount 2 or 3, no COPIED flag). The model's starting disk is the
// active layer and each snapshot's frozen view is what
// `qemu-img convert -l snapshot.name=...` reads, not what this project's
// reader says. Every verdict then reads every snapshot through
// qcow.Image.SnapshotView and requires it unchanged. Like
// ImageQemuCompressed it needs qemu-img (and qemu-io) on the PATH.
const ImageQemuSnapshot = "qemu-snapshot"

// snapshotNames are the snapshots ImageQemuSnapshot takes, in order.
var snapshotNames = []string{"s1", "s2"}

// snapshotScript returns the qemu-io commands of the three write phases of
// ImageQemuSnapshot (before s1, between s1 and s2, after s2), drawn from
// the case's "image" sub-seed.
func (c Case) snapshotScript() [3][]string {
	s := faultfs.SubSeed(c.Seed, "image")
	r := rand.New(rand.NewPCG(s, faultfs.SubSeed(s, "pcg")))
	sectors := c.Size / 512
	pat := 0
	write := func() string {
		pat++
		off := r.Int64N(sectors)
		n := 1 + r.Int64N(min(sectors-off, 2*c.ClusterSize/512))
		return fmt.Sprintf("write -P 0x%02x %d %d", 1+(pat*37)%255, off*512, n*512)
	}
	var ph [3][]string
	if nc := c.Size / c.ClusterSize; nc >= 4 && c.ClusterSize >= 1024 {
		// First (qemu compresses only into unallocated clusters), in the
		// upper half, which the next write mostly leaves alone.
		pat++
		ph[0] = append(ph[0], fmt.Sprintf("write -c -P 0x%02x %d %d", 1+(pat*37)%255, (nc-1-r.Int64N(nc/2))*c.ClusterSize, c.ClusterSize))
	}
	pat++
	ph[0] = append(ph[0], fmt.Sprintf("write -P 0x%02x 0 %d", 1+(pat*37)%255, max(512, c.Size/2&^511)))
	for range 3 {
		ph[0] = append(ph[0], write())
	}
	off := r.Int64N(sectors)
	ph[0] = append(ph[0], fmt.Sprintf("write -z %d %d", off*512, (1+r.Int64N(min(sectors-off, c.ClusterSize/512+1)))*512))
	for range 4 {
		ph[1] = append(ph[1], write())
	}
	for range 3 {
		ph[2] = append(ph[2], write())
	}
	return ph
}

// buildSnapshotImage makes ImageQemuSnapshot's image in mem, durably, and
// records the model's start: the active disk as base and the snapshots'
// views as r.snaps.
func (r *run) buildSnapshotImage(mem vfs.FS, qimg string) error {
	qio, err := exec.LookPath("qemu-io")
	if err != nil {
		return fmt.Errorf("%w: qemu-io: %v", ErrNoQemuImg, err)
	}
	dir, err := os.MkdirTemp("", "qcowcrash-image-")
	if err != nil {
		return fmt.Errorf("image recipe: %w", err)
	}
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "img")
	run := func(prog string, args ...string) error {
		out, err := exec.Command(prog, args...).CombinedOutput()
		if err == nil && strings.Contains(string(out), " failed: ") { // qemu-io may exit 0
			err = errors.New("a command failed")
		}
		if err != nil {
			return fmt.Errorf("image recipe: %s %s: %w: %s", filepath.Base(prog), strings.Join(args, " "), err, shorten(string(out), 300))
		}
		return nil
	}
	compat := "1.1"
	if r.c.Format == "v2" {
		compat = "0.10"
	}
	if err := run(qimg, "create", "-q", "-f", "qcow2", "-o", fmt.Sprintf("cluster_size=%d,compat=%s", r.c.ClusterSize, compat), img, fmt.Sprint(r.c.Size)); err != nil {
		return err
	}
	for i, cmds := range r.c.snapshotScript() {
		args := []string{"-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		if err := run(qio, append(args, img)...); err != nil {
			return err
		}
		if i < len(snapshotNames) {
			if err := run(qimg, "snapshot", "-c", snapshotNames[i], img); err != nil {
				return err
			}
		}
	}
	raw := func(snap string) ([]byte, error) {
		out := filepath.Join(dir, "raw-"+snap)
		args := []string{"convert", "-O", "raw", img, out}
		if snap != "" {
			args = []string{"convert", "-l", "snapshot.name=" + snap, "-O", "raw", img, out}
		}
		if err := run(qimg, args...); err != nil {
			return nil, err
		}
		b, err := os.ReadFile(out)
		if err == nil && int64(len(b)) != r.c.Size {
			err = fmt.Errorf("%d bytes, want %d", len(b), r.c.Size)
		}
		if err != nil {
			return nil, fmt.Errorf("image recipe: raw view of %q: %w", snap, err)
		}
		return b, nil
	}
	base, err := raw("")
	if err != nil {
		return err
	}
	r.snaps = &model.Snapshots{}
	for _, name := range snapshotNames {
		b, err := raw(name)
		if err != nil {
			return err
		}
		if err := r.snaps.Add(name, b); err != nil {
			return err
		}
	}
	b, err := os.ReadFile(img)
	if err != nil {
		return fmt.Errorf("image recipe: %w", err)
	}
	if err := installImage(mem, b); err != nil {
		return err
	}
	r.base = base
	return nil
}

// checkSnapshots reads every internal snapshot of im through its
// qcow.SnapshotView and requires the frozen views of the case's image,
// byte for byte (model.Snapshots.Check); nil when the case has none.
func (r *run) checkSnapshots(im *qcow.Image) error {
	if r.snaps == nil {
		return nil
	}
	snaps, err := im.Snapshots()
	if err != nil {
		return fmt.Errorf("%w: read the snapshot table: %v", model.ErrSnapshot, err)
	}
	views := map[string]model.View{}
	for _, s := range snaps {
		if _, dup := views[s.Name]; dup {
			return fmt.Errorf("%w: two snapshots named %q", model.ErrSnapshot, s.Name)
		}
		v, err := im.SnapshotView(s)
		if err != nil {
			return fmt.Errorf("%w: snapshot %q: %v", model.ErrSnapshot, s.Name, err)
		}
		views[s.Name] = v
	}
	return r.snaps.Check(views)
}

// resize grows the disk of w, which must be a Resizer (Validate gives
// resize ops only to targets that resize).
func resize(w Writer, size int64) error {
	rz, ok := w.(Resizer)
	if !ok {
		return fmt.Errorf("harness: the target's writer %T cannot resize", w)
	}
	return rz.Resize(size)
}

// checkSize judges the recovered image's virtual size against the model
// at point n, which then adopts it: old or new while a resize is not
// durable, new once it is.
func (r *run) checkSize(n int, m *model.Disk, im *qcow.Image) *Failure {
	err := m.CheckSize(im.Size())
	if err == nil {
		return nil
	}
	d := err.Error()
	if r.modelAt(n, true).AllowsSize(im.Size()) {
		d += " (a resize that returned was not durable)"
	}
	return &Failure{Kind: KindSize, Sector: -1, Detail: d}
}
