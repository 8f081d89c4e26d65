package harness

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"github.com/qcowcrash/qcowcrash/model"
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
	key := fmt.Sprintf("%s/%s/%d/%d/%#x", r.c.Image, r.c.Format, r.c.ClusterSize, r.c.Size, r.c.Seed)
	if b, ok := recipes.get(key); ok {
		r.base, r.snaps = b.base, b.snaps
		return installImage(mem, b.img)
	}
	if err := r.buildImageQemu(mem); err != nil {
		return err
	}
	img, err := readAll(mem, imageName)
	if err != nil {
		return fmt.Errorf("image recipe: %w", err)
	}
	recipes.put(key, recipe{img: img, base: r.base, snaps: r.snaps})
	return nil
}

// buildImageQemu runs the case's image recipe with qemu-img and qemu-io.
func (r *run) buildImageQemu(mem vfs.FS) error {
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

// recipe is what an image recipe made: the image file, the disk it holds
// and its snapshots' frozen views. None of it is modified once built.
type recipe struct {
	img, base []byte
	snaps     *model.Snapshots
}

// recipeCache remembers the last images built by qemu, so that shrinking
// and repeated runs of one case (soak, repro, explore) spawn qemu-img and
// qemu-io once per image instead of once per run. It holds at most
// recipeCacheEntries images, and at most recipeCacheBytes bytes of images,
// disks and views in all (the oldest are dropped first).
type recipeCache struct {
	mu    sync.Mutex
	order []string
	m     map[string]recipe
	bytes int64
}

const (
	recipeCacheEntries = 8
	recipeCacheBytes   = 256 << 20
)

// size returns the bytes b holds.
func (b recipe) size() int64 {
	n := int64(len(b.img) + len(b.base))
	if b.snaps != nil {
		for _, name := range b.snaps.Names() {
			v, _ := b.snaps.Frozen(name)
			n += int64(len(v))
		}
	}
	return n
}

var recipes = &recipeCache{m: map[string]recipe{}}

func (c *recipeCache) get(key string) (recipe, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, ok := c.m[key]
	return b, ok
}

func (c *recipeCache) put(key string, b recipe) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.m[key]; ok {
		return
	}
	if b.size() > recipeCacheBytes {
		return
	}
	for len(c.order) > 0 && (len(c.order) == recipeCacheEntries || c.bytes+b.size() > recipeCacheBytes) {
		c.bytes -= c.m[c.order[0]].size()
		delete(c.m, c.order[0])
		c.order = c.order[1:]
	}
	c.order = append(c.order, key)
	c.m[key] = b
	c.bytes += b.size()
}

// readAll returns the contents of the file name of fsys.
func readAll(fsys vfs.FS, name string) ([]byte, error) {
	f, err := fsys.Open(name, vfs.ReadOnly)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	n, err := f.Size()
	if err != nil {
		return nil, err
	}
	b := make([]byte, n)
	if _, err := f.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	return b, nil
}
