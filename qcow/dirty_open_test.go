package qcow

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// TestOpenDirtyRebuilds opens, for writing, an image left dirty by a qemu-io
// killed with lazy refcounts on: the refcounts are rebuilt on open, the
// dirty bit is cleared, and the image takes writes and passes qemu-img check.
func TestOpenDirtyRebuilds(t *testing.T) {
	qemutest.Require(t)
	img := filepath.Join(t.TempDir(), "dirty.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", img, "4M")
	// sigraise 9 kills qemu-io itself, so its exit status is not 0.
	qemutest.RunIO(t, "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "sigraise 9", img)
	ro, err := Open(vfs.OS, img, nil)
	if err != nil {
		t.Fatal(err)
	}
	in, _ := ro.Info()
	ro.Close()
	if !in.Dirty {
		t.Fatal("qemu-io left no dirty bit: the test would prove nothing")
	}
	if code, _ := qemutest.Check(t, img); code == 0 {
		t.Fatal("qemu-img check finds the dirty image clean: the test would prove nothing")
	}

	im, err := Open(vfs.OS, img, &Options{ReadWrite: true})
	if err != nil {
		t.Fatalf("writable open of a dirty image: %v", err)
	}
	if im.h.incompat&IncompatDirty != 0 {
		t.Errorf("dirty bit still set after the writable open")
	}
	if _, err := im.WriteAt(bytes.Repeat([]byte{0xa5}, 8192), 2<<20); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	if code, out := qemutest.Check(t, img); code != 0 {
		t.Fatalf("qemu-img check after rebuild and write: exit %d\n%s", code, out)
	}
	raw := img + ".raw"
	qemutest.ConvertRaw(t, img, raw)
	got, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 4<<20)
	copy(want, bytes.Repeat([]byte{0x5a}, 1<<20))
	copy(want[2<<20:], bytes.Repeat([]byte{0xa5}, 8192))
	if !bytes.Equal(got, want) {
		t.Fatal("data differs after rebuild and write")
	}
}

// TestOpenDirtyClearsBit: a dirty image whose refcounts happen to be right
// opens for writing, and the writable open leaves it clean and not dirty.
func TestOpenDirtyClearsBit(t *testing.T) {
	mem := vfs.NewMem()
	if err := Create(mem, "img", CreateOptions{Size: 1 << 20, LazyRefcounts: true}); err != nil {
		t.Fatal(err)
	}
	f, err := mem.Open("img", vfs.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0, 0, 0, 0, 0, 0, 0, IncompatDirty}, 72); err != nil {
		t.Fatal(err)
	}
	f.Close()
	im, err := Open(mem, "img", &Options{ReadWrite: true})
	if err != nil {
		t.Fatalf("writable open of a dirty image: %v", err)
	}
	if im.h.incompat&IncompatDirty != 0 {
		t.Error("dirty bit still set after the writable open")
	}
	if _, err := im.WriteAt([]byte("hello"), 4096); err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	res, err := CheckFile(mem, "img", "")
	if err != nil || res.Corruptions+res.Leaks+res.CheckErrors != 0 {
		t.Fatalf("check after the dirty open and a write: %+v, %v", res, err)
	}
}
