package harness

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// ImageQemuCompressed is the image recipe of a case that starts from an
// image whose every cluster qemu compressed: the disk holds compressible,
// per-cluster distinct bytes (byte i is i/ClusterSize + i%7), and
// `qemu-img convert -c` makes the QCOW2 image (version 2 or 3 as the
// case's format says, the case's cluster size). It needs qemu-img on the
// PATH; without it the case fails with a "setup" failure whose detail is
// ErrNoQemuImg's message (check Case.NeedsQemuImg first). No image made by qemu is checked in: it is made at run
// time, the same bytes on every run of the same qemu.
const ImageQemuCompressed = "qemu-compressed"

// ErrNoQemuImg is the error building a case's image when its recipe needs
// qemu-img and qemu-img is not installed.
var ErrNoQemuImg = errors.New("harness: the image recipe needs qemu-img, which is not on the PATH")

// validImage reports whether the case's image recipe fits the case.
func (c Case) validImage() error {
	switch c.Image {
	case ImageQemuCompressed, ImageQemuSnapshot:
		if c.Format == "v1" || c.Backing {
			return fmt.Errorf("image %s: want format v2 or v3 without a backing file", c.Image)
		}
		return nil
	}
	return fmt.Errorf("image recipe %q (want %s or %s)", c.Image, ImageQemuCompressed, ImageQemuSnapshot)
}

// NeedsQemuImg reports whether running the case needs qemu-img.
func (c Case) NeedsQemuImg() bool {
	return c.Image == ImageQemuCompressed || c.Image == ImageQemuSnapshot
}

// compressedRaw returns the disk contents of ImageQemuCompressed.
func (c Case) compressedRaw() []byte {
	b := make([]byte, c.Size)
	for i := range b {
		b[i] = byte(int64(i)/c.ClusterSize) + byte(i%7)
	}
	return b
}

// buildImage makes the case's start image in mem as imageName, durably,
// and records the disk's contents as the model's base.
func (r *run) buildImage(mem vfs.FS) error {
	qimg, err := exec.LookPath("qemu-img")
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNoQemuImg, err)
	}
	if r.c.Image == ImageQemuSnapshot {
		return r.buildSnapshotImage(mem, qimg)
	}
	dir, err := os.MkdirTemp("", "qcowcrash-image-")
	if err != nil {
		return fmt.Errorf("image recipe: %w", err)
	}
	defer os.RemoveAll(dir)
	raw := r.c.compressedRaw()
	rawPath, imgPath := filepath.Join(dir, "raw"), filepath.Join(dir, "img")
	if err := os.WriteFile(rawPath, raw, 0o644); err != nil {
		return fmt.Errorf("image recipe: %w", err)
	}
	compat := "1.1"
	if r.c.Format == "v2" {
		compat = "0.10"
	}
	cmd := exec.Command(qimg, "convert", "-c", "-f", "raw", "-O", "qcow2",
		"-o", fmt.Sprintf("cluster_size=%d,compat=%s", r.c.ClusterSize, compat), rawPath, imgPath)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("image recipe: qemu-img convert -c: %w: %s", err, strings.TrimSpace(string(out)))
	}
	b, err := os.ReadFile(imgPath)
	if err != nil {
		return fmt.Errorf("image recipe: %w", err)
	}
	if err := installImage(mem, b); err != nil {
		return err
	}
	r.base = raw
	return nil
}

// installImage writes b to mem as imageName, durably.
func installImage(mem vfs.FS, b []byte) error {
	f, err := mem.Create(imageName)
	if err != nil {
		return fmt.Errorf("image recipe: %w", err)
	}
	_, err = f.WriteAt(b, 0)
	if err == nil {
		err = f.Sync()
	}
	if e := f.Close(); err == nil {
		err = e
	}
	if err == nil {
		err = mem.SyncDir(".")
	}
	if err != nil {
		return fmt.Errorf("image recipe: %w", err)
	}
	return nil
}
