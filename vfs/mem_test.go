package vfs_test

import (
	"bytes"
	"errors"
	"io/fs"
	"slices"
	"testing"

	"github.com/qcowcrash/qcowcrash/vfs"
)

func memCreate(t *testing.T, m *vfs.MemFS, name string) vfs.File {
	t.Helper()
	f, err := m.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func mustWriteAt(t *testing.T, f vfs.File, p []byte, off int64) {
	t.Helper()
	if n, err := f.WriteAt(p, off); n != len(p) || err != nil {
		t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(p), off, n, err)
	}
}

func allocated(t *testing.T, m *vfs.MemFS, want int64) {
	t.Helper()
	if got := m.AllocatedBytes(); got != want {
		t.Fatalf("AllocatedBytes() = %d; want %d", got, want)
	}
}

// TestMemSparse: a 64 GiB image with 1 MiB written costs about 1 MiB.
func TestMemSparse(t *testing.T) {
	const size = 64 << 30
	m := vfs.NewMem()
	f := memCreate(t, m, "big.qcow2")
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0x5A}, 4096)
	// 1 MiB in total: 128 scattered 4 KiB writes (half unaligned, so each
	// touches two pages) plus a 512 KiB run at the very end.
	for i := range int64(128) {
		off := i * (size / 256)
		if i%2 == 1 {
			off += 1000
		}
		mustWriteAt(t, f, data, off)
	}
	mustWriteAt(t, f, bytes.Repeat([]byte{0xA5}, 512<<10), size-512<<10)
	if got := m.AllocatedBytes(); got > 2<<20 {
		t.Fatalf("AllocatedBytes() = %d after writing 1 MiB into a 64 GiB file; want <= 2 MiB", got)
	}
	if n, err := f.Size(); n != size || err != nil {
		t.Fatalf("Size() = %d, %v; want %d", n, err, int64(size))
	}
	buf := make([]byte, 8192)
	if _, err := f.ReadAt(buf, 60<<30+4096); err != nil || !bytes.Equal(buf, make([]byte, 8192)) {
		t.Fatalf("ReadAt in a hole: err %v, zeros=%v", err, bytes.Equal(buf, make([]byte, 8192)))
	}
	if _, err := f.ReadAt(buf[:4096], (size/256)+1000); err != nil || !bytes.Equal(buf[:4096], data) {
		t.Fatalf("ReadAt of written data: err %v", err)
	}
}

func TestMemZerosStaySparse(t *testing.T) {
	m := vfs.NewMem()
	f := memCreate(t, m, "img")
	mustWriteAt(t, f, make([]byte, 1<<20), 0) // zeros allocate nothing
	allocated(t, m, 0)
	mustWriteAt(t, f, []byte{1}, 5000) // one byte: one page
	allocated(t, m, 4096)
	mustWriteAt(t, f, make([]byte, 8192), 4096) // a whole page of zeros frees it
	allocated(t, m, 0)
	if n, _ := f.Size(); n != 1<<20 {
		t.Fatalf("Size() = %d; want 1 MiB", n)
	}
}

func TestMemTruncateFreesPages(t *testing.T) {
	m := vfs.NewMem()
	f := memCreate(t, m, "img")
	mustWriteAt(t, f, bytes.Repeat([]byte{7}, 10*4096), 0)
	mustWriteAt(t, f, []byte{7}, 1<<40) // a far page: truncation must not walk to it page by page
	allocated(t, m, 11*4096)
	if err := f.Truncate(3*4096 + 10); err != nil {
		t.Fatal(err)
	}
	allocated(t, m, 4*4096)
	if err := f.Truncate(0); err != nil {
		t.Fatal(err)
	}
	allocated(t, m, 0)
}

func TestMemClone(t *testing.T) {
	m := vfs.NewMem()
	f := memCreate(t, m, "a/img")
	mustWriteAt(t, f, []byte("before"), 0)
	c := m.Clone()
	mustWriteAt(t, f, []byte("AFTER!"), 0)

	g, err := c.Open("a/img", vfs.ReadWrite) // the clone carries no lock
	if err != nil {
		t.Fatalf("Open in clone: %v", err)
	}
	defer g.Close()
	buf := make([]byte, 6)
	if _, err := g.ReadAt(buf, 0); err != nil || string(buf) != "before" {
		t.Fatalf("clone reads %q, %v; want %q", buf, err, "before")
	}
	mustWriteAt(t, g, []byte("clone!"), 0)
	if _, err := f.ReadAt(buf, 0); err != nil || string(buf) != "AFTER!" {
		t.Fatalf("original reads %q, %v after the clone was written; want %q", buf, err, "AFTER!")
	}
	if got := c.Names(); !slices.Equal(got, []string{"a/img"}) {
		t.Fatalf("clone Names() = %q", got)
	}
}

func TestMemNamesAreCleaned(t *testing.T) {
	m := vfs.NewMem()
	memCreate(t, m, "./dir//img")
	if _, err := m.Stat("dir/img"); err != nil {
		t.Fatalf("Stat of the cleaned name: %v", err)
	}
	if _, err := m.Open("dir/./img", vfs.ReadWrite); !errors.Is(err, vfs.ErrLocked) {
		t.Fatalf("Open of another spelling while locked: %v; want ErrLocked", err)
	}
	if _, err := m.Stat("/dir/img"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("Stat(/dir/img) = %v; want fs.ErrNotExist (absolute and relative names differ)", err)
	}
}
