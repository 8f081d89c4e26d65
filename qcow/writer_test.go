package qcow

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/vfs"
)

const (
	wtKiB = int64(1) << 10
	wtMiB = int64(1) << 20
	wtGiB = int64(1) << 30
)

// wtCheckClean fails unless `qemu-img check` finds img clean (no
// corruption, no leaks).
func wtCheckClean(t testing.TB, img string) {
	t.Helper()
	code, out := qemutest.Check(t, img)
	if code != 0 {
		t.Fatalf("qemu-img check %s: exit %d (want 0: clean)\n%s", filepath.Base(img), code, out)
	}
}

// wtFirstDiff returns the first index where a and b differ, or -1.
func wtFirstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// TestCreateMatchesQemu creates images with Create and with qemu-img
// create and compares them byte for byte: same header, extensions, table
// layout and refcounts, for the layouts where qemu needs no table growth.
func TestCreateMatchesQemu(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	qemutest.Img(t, "create", "-f", "qcow2", filepath.Join(dir, "base.qcow2"), "64M")
	cases := []struct {
		name string
		qemu []string // qemu-img create arguments before the file name
		size string
		o    CreateOptions
	}{
		{"v3-64k-1G", []string{"-f", "qcow2"}, "1G", CreateOptions{Size: wtGiB}},
		{"v3-64k-empty", []string{"-f", "qcow2"}, "0", CreateOptions{}},
		{"v3-64k-odd-size", []string{"-f", "qcow2"}, "1000001", CreateOptions{Size: 1000001}},
		{"v2-64k", []string{"-f", "qcow2", "-o", "compat=0.10"}, "10G", CreateOptions{Version: 2, Size: 10 * wtGiB}},
		{"v3-512-backing", []string{"-f", "qcow2", "-o", "cluster_size=512", "-b", "base.qcow2", "-F", "qcow2"}, "64M",
			CreateOptions{ClusterSize: 512, Size: 64 * wtMiB, BackingFile: "base.qcow2", BackingFormat: "qcow2"}},
		{"v2-4k-backing-nofmt-size-from-backing", []string{"-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2"}, "",
			CreateOptions{Version: 2, ClusterSize: 4096, BackingFile: "base.qcow2", BackingFormat: "qcow2"}},
		{"v3-8k-lazy-rc64", []string{"-f", "qcow2", "-o", "cluster_size=8192,lazy_refcounts=on,refcount_bits=64"}, "3G",
			CreateOptions{ClusterSize: 8192, LazyRefcounts: true, RefcountBits: 64, Size: 3 * wtGiB}},
		{"v3-2M-rc1", []string{"-f", "qcow2", "-o", "cluster_size=2M,refcount_bits=1"}, "20G",
			CreateOptions{ClusterSize: 2 * wtMiB, RefcountBits: 1, Size: 20 * wtGiB}},
		{"v3-1k-rc4", []string{"-f", "qcow2", "-o", "cluster_size=1024,refcount_bits=4"}, "4M",
			CreateOptions{ClusterSize: 1024, RefcountBits: 4, Size: 4 * wtMiB}},
		{"v1-default", []string{"-f", "qcow"}, "1G", CreateOptions{Format: FormatQCOW, Size: wtGiB}},
		{"v1-odd", []string{"-f", "qcow"}, "12345", CreateOptions{Format: FormatQCOW, Size: 12345}},
		{"v1-backing", []string{"-f", "qcow", "-b", "base.qcow2", "-F", "qcow2"}, "",
			CreateOptions{Format: FormatQCOW, BackingFile: "base.qcow2"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			theirs := filepath.Join(dir, c.name+".qemu")
			ours := filepath.Join(dir, c.name+".ours")
			args := append([]string{"create"}, c.qemu...)
			args = append(args, theirs)
			if c.size != "" {
				args = append(args, c.size)
			}
			qemutest.Img(t, args...)
			if err := Create(vfs.OS, ours, c.o); err != nil {
				t.Fatalf("Create: %v", err)
			}
			a, err := os.ReadFile(theirs)
			if err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(ours)
			if err != nil {
				t.Fatal(err)
			}
			if i := wtFirstDiff(a, b); i >= 0 {
				t.Fatalf("images differ first at byte %#x (qemu %d bytes, ours %d bytes)", i, len(a), len(b))
			}
			if c.o.Format != FormatQCOW {
				wtCheckClean(t, ours)
			}
		})
	}
}

// TestCreateInterop creates images qemu would lay out differently (huge L1
// tables with small clusters need several refcount blocks) and checks that
// qemu finds them clean, agrees on their parameters, and can write to them.
func TestCreateInterop(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "base.raw"), qemutest.RandomData(3*wtMiB, 7), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		o    CreateOptions
	}{
		{"v3-512-10G-rc64", CreateOptions{ClusterSize: 512, RefcountBits: 64, Size: 10 * wtGiB}},
		{"v3-512-4G-rc1", CreateOptions{ClusterSize: 512, RefcountBits: 1, Size: 4 * wtGiB}},
		{"v2-512-2G", CreateOptions{Version: 2, ClusterSize: 512, Size: 2 * wtGiB}},
		{"v3-4k-raw-backing", CreateOptions{ClusterSize: 4096, BackingFile: "base.raw", BackingFormat: "raw"}},
		{"v3-2M", CreateOptions{ClusterSize: 2 * wtMiB, Size: 5 * wtGiB}},
		{"v1-64k", CreateOptions{Format: FormatQCOW, ClusterSize: 65536, Size: 5 * wtGiB}},
		{"v1-512-backing", CreateOptions{Format: FormatQCOW, ClusterSize: 512, BackingFile: "base.raw"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			img := filepath.Join(dir, c.name)
			if err := Create(vfs.OS, img, c.o); err != nil {
				t.Fatalf("Create: %v", err)
			}
			if c.o.Format != FormatQCOW {
				wtCheckClean(t, img)
			}
			info := qemutest.Info(t, img)
			im, err := Open(vfs.OS, img, nil)
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			defer im.Close()
			if info.VirtualSize != im.Size() || info.ClusterSize != im.ClusterSize() {
				t.Errorf("qemu: size %d cluster %d; ours: size %d cluster %d", info.VirtualSize, info.ClusterSize, im.Size(), im.ClusterSize())
			}
			wantVersion := c.o.Version
			switch {
			case c.o.Format == FormatQCOW:
				wantVersion = 1
			case wantVersion == 0:
				wantVersion = 3
			}
			if info.Version() != wantVersion {
				t.Errorf("qemu says version %d, want %d", info.Version(), wantVersion)
			}
			if c.o.Format != FormatQCOW {
				want := c.o.RefcountBits
				if want == 0 {
					want = 16
				}
				if info.FormatSpecific.Data.RefcountBits != want {
					t.Errorf("qemu says refcount bits %d, want %d", info.FormatSpecific.Data.RefcountBits, want)
				}
			}
			if info.BackingFilename != c.o.BackingFile || info.BackingFormat != c.o.BackingFormat {
				t.Errorf("qemu says backing %q (%q), want %q (%q)", info.BackingFilename, info.BackingFormat, c.o.BackingFile, c.o.BackingFormat)
			}
			// qemu can write to it, and it stays clean.
			f := "qcow2"
			if c.o.Format == FormatQCOW {
				f = "qcow"
			}
			qemutest.Script(t, f, img, "write -P 0x5a 1000 300k", "write -P 0xa5 2M 64k")
			if f == "qcow2" {
				wtCheckClean(t, img)
			}
		})
	}
}

// wtNoRename hides the vfs.Renamer of the FS it wraps.
type wtNoRename struct{ vfs.FS }

// TestCreateMemAndNoRenamer creates images on MemFS with and without
// vfs.Renamer and checks they open, read as zeros and leave no temporary
// files behind; existing names are refused.
func TestCreateMemAndNoRenamer(t *testing.T) {
	for _, rename := range []bool{true, false} {
		t.Run(fmt.Sprintf("rename=%v", rename), func(t *testing.T) {
			mem := vfs.NewMem()
			var fsys vfs.FS = mem
			if !rename {
				fsys = wtNoRename{mem}
			}
			for _, o := range []CreateOptions{
				{Size: 10 * wtMiB},
				{Version: 2, ClusterSize: 512, Size: 10 * wtMiB},
				{Format: FormatQCOW, Size: 10 * wtMiB},
			} {
				name := fmt.Sprintf("d/img-%s-%d-%d", o.Format, o.Version, o.ClusterSize)
				if err := Create(fsys, name, o); err != nil {
					t.Fatalf("Create(%+v): %v", o, err)
				}
				im, err := Open(fsys, name, nil)
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				buf := make([]byte, 1<<20)
				if _, err := im.ReadAt(buf, 3<<20); err != nil || !bytes.Equal(buf, make([]byte, len(buf))) {
					t.Fatalf("new image does not read as zeros: %v", err)
				}
				im.Close()
				if err := Create(fsys, name, o); !errors.Is(err, fs.ErrExist) {
					t.Fatalf("second Create = %v, want fs.ErrExist", err)
				}
			}
			if names := mem.Names(); len(names) != 3 {
				t.Fatalf("files left: %q, want just the 3 images", names)
			}
		})
	}
}

// TestCreateRejects checks option validation.
func TestCreateRejects(t *testing.T) {
	cases := []struct {
		name string
		o    CreateOptions
		want error // a sentinel, or nil for "any error"
	}{
		{"negative size", CreateOptions{Size: -1}, nil},
		{"cluster 256", CreateOptions{Size: wtMiB, ClusterSize: 256}, nil},
		{"cluster 4M", CreateOptions{Size: wtMiB, ClusterSize: 4 * wtMiB}, nil},
		{"cluster not power of 2", CreateOptions{Size: wtMiB, ClusterSize: 3000}, nil},
		{"refcount bits 3", CreateOptions{Size: wtMiB, RefcountBits: 3}, nil},
		{"refcount bits 128", CreateOptions{Size: wtMiB, RefcountBits: 128}, nil},
		{"v2 refcount bits 8", CreateOptions{Version: 2, Size: wtMiB, RefcountBits: 8}, ErrUnsupported},
		{"v2 lazy", CreateOptions{Version: 2, Size: wtMiB, LazyRefcounts: true}, ErrUnsupported},
		{"version 4", CreateOptions{Version: 4, Size: wtMiB}, ErrUnsupported},
		{"backing format vmdk", CreateOptions{Size: wtMiB, BackingFile: "b", BackingFormat: "vmdk"}, ErrUnsupported},
		{"backing format without file", CreateOptions{Size: wtMiB, BackingFormat: "raw"}, nil},
		{"protocol backing", CreateOptions{Size: wtMiB, BackingFile: "nbd://host/x"}, ErrBacking},
		{"json backing", CreateOptions{Size: wtMiB, BackingFile: `json:{"file":"x"}`}, ErrBacking},
		{"long backing", CreateOptions{Size: wtMiB, BackingFile: strings.Repeat("a", 1024)}, ErrLimit},
		{"backing does not fit 512", CreateOptions{Size: wtMiB, ClusterSize: 512, BackingFile: strings.Repeat("a", 500)}, nil},
		{"L1 too big", CreateOptions{Size: 1 << 50, ClusterSize: 512}, ErrLimit},
		{"missing backing for size", CreateOptions{BackingFile: "nope"}, fs.ErrNotExist},
		{"v1 backing format", CreateOptions{Format: FormatQCOW, Size: wtMiB, BackingFile: "b", BackingFormat: "raw"}, ErrUnsupported},
		{"v1 refcount bits", CreateOptions{Format: FormatQCOW, Size: wtMiB, RefcountBits: 16}, ErrUnsupported},
		{"v1 empty", CreateOptions{Format: FormatQCOW}, nil},
		{"v1 cluster 128k", CreateOptions{Format: FormatQCOW, Size: wtMiB, ClusterSize: 128 * wtKiB}, nil},
		{"raw", CreateOptions{Format: FormatRaw, Size: wtMiB}, ErrUnsupported},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mem := vfs.NewMem()
			err := Create(mem, "img", c.o)
			if err == nil {
				t.Fatalf("Create(%+v) succeeded", c.o)
			}
			if c.want != nil && !errors.Is(err, c.want) {
				t.Fatalf("Create: %v; want an error wrapping %v", err, c.want)
			}
			if names := mem.Names(); len(names) != 0 {
				t.Fatalf("files left after a failed Create: %q", names)
			}
		})
	}
}

// wtFailFS wraps a vfs.FS and fails chosen file operations of the files it
// opens: operation number k (counted from 1 across all files, reads
// excluded) fails with err, or, for a short write, writes about half (whole
// sectors) and fails.
type wtFailFS struct {
	vfs.FS
	mu     sync.Mutex
	n      int   // operations so far
	failAt int   // operation to fail (0: none)
	err    error // what it fails with
	short  bool  // a failing write writes half its bytes first
	hit    bool  // failAt was reached
	ops    []string
}

type wtFailFile struct {
	vfs.File
	fs *wtFailFS
}

func (f *wtFailFS) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	file, err := f.FS.Open(name, flag)
	if err != nil || flag == vfs.ReadOnly {
		return file, err
	}
	return &wtFailFile{file, f}, nil
}

// step counts an operation and reports whether it must fail.
func (f *wtFailFS) step(op string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.n++
	f.ops = append(f.ops, op)
	if f.n == f.failAt {
		f.hit = true
		return true
	}
	return false
}

func (f *wtFailFile) WriteAt(p []byte, off int64) (int, error) {
	if f.fs.step(fmt.Sprintf("pwrite %d@%#x", len(p), off)) {
		if f.fs.short {
			// Tear at a sector boundary: the model (like a disk) keeps
			// sectors whole.
			n, _ := f.File.WriteAt(p[:len(p)/2&^511], off)
			return n, f.fs.err
		}
		return 0, f.fs.err
	}
	return f.File.WriteAt(p, off)
}

func (f *wtFailFile) Truncate(size int64) error {
	if f.fs.step(fmt.Sprintf("truncate %d", size)) {
		return f.fs.err
	}
	return f.File.Truncate(size)
}

func (f *wtFailFile) Datasync() error {
	if f.fs.step("fdatasync") {
		return f.fs.err
	}
	return f.File.Datasync()
}

func (f *wtFailFile) Sync() error {
	if f.fs.step("fsync") {
		return f.fs.err
	}
	return f.File.Sync()
}

// wtModelCheck compares the whole disk of im with the model.
func wtModelCheck(t *testing.T, im *Image, m *model.Disk) {
	t.Helper()
	if err := m.Check(im); err != nil {
		t.Fatalf("content: %v", err)
	}
}

// wtRandWrite draws a write for a disk of size bytes with clusters of cs:
// often cluster-aligned, sometimes crossing clusters, sometimes tiny.
func wtRandWrite(r *rand.Rand, size, cs int64) (off, n int64) {
	switch r.IntN(4) {
	case 0: // whole clusters
		k := 1 + r.Int64N(4)
		off = r.Int64N(size/cs) * cs
		n = min(k*cs, size-off)
	case 1: // sector aligned, crossing clusters
		off = r.Int64N(size/512) * 512
		n = min(512*(1+r.Int64N(3*cs/512+1)), size-off)
	case 2: // tiny and unaligned
		off = r.Int64N(size - 1)
		n = min(1+r.Int64N(700), size-off)
	default: // anywhere, any length
		off = r.Int64N(size - 1)
		n = min(1+r.Int64N(2*cs+5000), size-off)
	}
	return off, n
}

// wtFill returns n bytes of a pattern that depends on seed.
func wtFill(n int64, seed uint64) []byte {
	b := make([]byte, n)
	x := seed*0x9e3779b97f4a7c15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return b
}

// TestWriteReadBackMem writes random data and zeros to images of every
// version and several cluster sizes on MemFS, in both cache modes, and
// checks reads against the flat model while writing, after Flush, and
// after reopening.
func TestWriteReadBackMem(t *testing.T) {
	type cfg struct {
		o       CreateOptions
		through bool
	}
	var cfgs []cfg
	for _, through := range []bool{false, true} {
		for _, o := range []CreateOptions{
			{ClusterSize: 512, RefcountBits: 1},
			{ClusterSize: 4096, Version: 2},
			{ClusterSize: 65536},
			{ClusterSize: 1024, RefcountBits: 64},
			{Format: FormatQCOW},
			{Format: FormatQCOW, ClusterSize: 512},
		} {
			cfgs = append(cfgs, cfg{o, through})
		}
	}
	for _, c := range cfgs {
		name := fmt.Sprintf("%s-through=%v", wtName(c.o), c.through)
		t.Run(name, func(t *testing.T) {
			mem := vfs.NewMem()
			c.o.Size = 3*wtMiB + 1536
			if err := Create(mem, "img", c.o); err != nil {
				t.Fatal(err)
			}
			im, err := Open(mem, "img", &Options{ReadWrite: true, WriteThrough: c.through, L2CacheBytes: 8 << 10, RefcountCacheBytes: 4 << 10})
			if err != nil {
				t.Fatal(err)
			}
			size := im.Size()
			cs := im.ClusterSize()
			m := model.New(size, nil)
			r := rand.New(rand.NewPCG(uint64(len(name)), 42))
			for i := range 300 {
				off, n := wtRandWrite(r, size, cs)
				if r.IntN(5) == 0 {
					if err := im.WriteZeroes(off, n); err != nil {
						t.Fatalf("op %d: WriteZeroes(%d, %d): %v", i, off, n, err)
					}
					m.WriteZeroes(off, n)
				} else {
					p := wtFill(n, uint64(i))
					if k, err := im.WriteAt(p, off); err != nil || k != len(p) {
						t.Fatalf("op %d: WriteAt(%d bytes at %d) = %d, %v", i, n, off, k, err)
					}
					m.Write(p, off)
				}
				if r.IntN(40) == 0 {
					if err := im.Flush(); err != nil {
						t.Fatal(err)
					}
				}
				if i%50 == 0 {
					wtModelCheck(t, im, m)
				}
			}
			wtModelCheck(t, im, m)
			if err := im.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			im, err = Open(mem, "img", nil)
			if err != nil {
				t.Fatalf("reopen: %v", err)
			}
			defer im.Close()
			wtModelCheck(t, im, m)
		})
	}
}

// wtRawOf reads the whole disk of the image at path through qemu.
func wtRawOf(t *testing.T, path string) []byte {
	t.Helper()
	raw := path + ".raw"
	qemutest.ConvertRaw(t, path, raw)
	b, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(raw)
	return b
}

// wtReadAll reads the whole disk of im.
func wtReadAll(t *testing.T, im *Image) []byte {
	t.Helper()
	b := make([]byte, im.Size())
	if n, err := im.ReadAt(b, 0); n != len(b) || (err != nil && !errors.Is(err, io.EOF)) {
		t.Fatalf("ReadAt whole disk: %d, %v", n, err)
	}
	return b
}

// TestWriteGrowth writes a 256 MiB pattern (32 MiB with -short) into a
// version 3 image with 512-byte clusters that was created at 1 MiB and
// resized: the L1 table grows and the refcount table is moved many times.
// qemu-img check must find it clean and qemu-img compare identical to the
// pattern.
func TestWriteGrowth(t *testing.T) {
	qemutest.Require(t)
	size := 256 * wtMiB
	if testing.Short() {
		size = 32 * wtMiB
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	if err := Create(vfs.OS, img, CreateOptions{ClusterSize: 512, Size: wtMiB}); err != nil {
		t.Fatal(err)
	}
	im, err := Open(vfs.OS, img, &Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	rt0 := im.h.rtOff
	if err := im.Resize(size); err != nil {
		t.Fatalf("Resize: %v", err)
	}
	raw, err := os.Create(filepath.Join(dir, "want.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	moves := 0
	last := im.w.rc.rtOff
	const chunk = 1 << 20
	for off := int64(0); off < size; off += chunk {
		p := wtFill(chunk, uint64(off/chunk))
		if _, err := im.WriteAt(p, off); err != nil {
			t.Fatalf("WriteAt %d: %v", off, err)
		}
		if _, err := raw.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		if im.w.rc.rtOff != last {
			moves++
			last = im.w.rc.rtOff
		}
	}
	if err := im.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if moves < 3 || uint64(last) == rt0 {
		t.Errorf("the refcount table moved %d times; want several", moves)
	}
	wtCheckClean(t, img)
	if code, out := qemutest.RunImg(t, "compare", "-f", "raw", "-F", "qcow2", raw.Name(), img); code != 0 {
		t.Fatalf("qemu-img compare: exit %d\n%s", code, out)
	}
}

// wtPatch overwrites bytes of a file in fsys.
func wtPatch(t *testing.T, fsys vfs.FS, name string, off int64, b []byte) {
	t.Helper()
	f, err := fsys.Open(name, vfs.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestOpenWritableRefuses checks what Open with ReadWrite refuses, and that
// a read-only image refuses writes.
func TestOpenWritableRefuses(t *testing.T) {
	be64 := func(v uint64) []byte {
		b := make([]byte, 8)
		for i := range b {
			b[i] = byte(v >> (56 - 8*i))
		}
		return b
	}
	cases := []struct {
		name  string
		patch func(t *testing.T, mem vfs.FS)
		want  string
	}{
		{"corrupt", func(t *testing.T, mem vfs.FS) { wtPatch(t, mem, "img", 72, be64(IncompatCorrupt)) }, "corrupt bit"},
		{"extended L2", func(t *testing.T, mem vfs.FS) { wtPatch(t, mem, "img", 72, be64(IncompatExtendedL2)) }, "read-only: extended L2 writing unsupported"},
		{"bitmaps", func(t *testing.T, mem vfs.FS) { wtPatch(t, mem, "img", 88, be64(AutoclearBitmaps)) }, "bitmaps"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			mem := vfs.NewMem()
			if err := Create(mem, "img", CreateOptions{Size: wtMiB}); err != nil {
				t.Fatal(err)
			}
			c.patch(t, mem)
			ro, err := Open(mem, "img", nil)
			if err != nil {
				t.Fatalf("read-only Open: %v", err)
			}
			defer ro.Close()
			_, err = Open(mem, "img", &Options{ReadWrite: true})
			if !errors.Is(err, ErrReadOnly) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Open ReadWrite = %v; want ErrReadOnly mentioning %q", err, c.want)
			}
			// The refused open released the file: another writer may open it
			// once the bit is cleared.
			wtPatch(t, mem, "img", 72, make([]byte, 24))
			im, err := Open(mem, "img", &Options{ReadWrite: true})
			if err != nil {
				t.Fatalf("Open ReadWrite after clearing the bit: %v", err)
			}
			im.Close()
		})
	}
	t.Run("read-only image", func(t *testing.T) {
		mem := vfs.NewMem()
		if err := Create(mem, "img", CreateOptions{Size: wtMiB}); err != nil {
			t.Fatal(err)
		}
		im, err := Open(mem, "img", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer im.Close()
		if _, err := im.WriteAt([]byte{1}, 0); !errors.Is(err, ErrReadOnly) {
			t.Fatalf("WriteAt on a read-only image = %v, want ErrReadOnly", err)
		}
		if err := im.WriteZeroes(0, 512); !errors.Is(err, ErrReadOnly) {
			t.Fatalf("WriteZeroes on a read-only image = %v, want ErrReadOnly", err)
		}
		if err := im.Resize(2 * wtMiB); !errors.Is(err, ErrReadOnly) {
			t.Fatalf("Resize on a read-only image = %v, want ErrReadOnly", err)
		}
		if err := im.Flush(); err != nil {
			t.Fatalf("Flush on a read-only image = %v, want nil", err)
		}
	})
	t.Run("external data file", func(t *testing.T) {
		qemutest.Require(t)
		dir := t.TempDir()
		img := filepath.Join(dir, "img")
		qemutest.Img(t, "create", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "data"), img, "1M")
		_, err := Open(vfs.OS, img, &Options{ReadWrite: true})
		if !errors.Is(err, ErrReadOnly) || !strings.Contains(err.Error(), "external data file") {
			t.Fatalf("Open ReadWrite = %v; want ErrReadOnly for the external data file", err)
		}
	})
	t.Run("bounds and closed", func(t *testing.T) {
		mem := vfs.NewMem()
		if err := Create(mem, "img", CreateOptions{Size: wtMiB}); err != nil {
			t.Fatal(err)
		}
		im, err := Open(mem, "img", &Options{ReadWrite: true})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt([]byte{1, 2}, wtMiB-1); !errors.Is(err, ErrOutOfRange) {
			t.Fatalf("WriteAt across the end = %v, want ErrOutOfRange", err)
		}
		if err := im.WriteZeroes(-1, 2); !errors.Is(err, ErrOutOfRange) {
			t.Fatalf("WriteZeroes at -1 = %v, want ErrOutOfRange", err)
		}
		if err := im.Resize(wtMiB / 2); !errors.Is(err, ErrUnsupported) {
			t.Fatalf("shrinking Resize = %v, want ErrUnsupported", err)
		}
		if _, err := Open(mem, "img", &Options{ReadWrite: true}); !errors.Is(err, vfs.ErrLocked) {
			t.Fatalf("second writer = %v, want vfs.ErrLocked", err)
		}
		if err := im.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := im.WriteAt([]byte{1}, 0); !errors.Is(err, ErrClosed) {
			t.Fatalf("WriteAt after Close = %v, want ErrClosed", err)
		}
	})
}

// TestWriteBackingCOW writes partial clusters over a backing file with
// clusters larger than a sector (where qemu's own QCOW writer does not copy
// the backing file) and checks that the rest of each new cluster still
// reads from the backing file, for every version.
func TestWriteBackingCOW(t *testing.T) {
	for _, o := range []CreateOptions{
		{Format: FormatQCOW, ClusterSize: 4096},
		{Format: FormatQCOW, ClusterSize: 65536},
		{Version: 2, ClusterSize: 4096},
		{ClusterSize: 65536},
	} {
		t.Run(fmt.Sprintf("%s-v%d-%d", o.Format, o.Version, o.ClusterSize), func(t *testing.T) {
			mem := vfs.NewMem()
			base := wtFill(2*wtMiB, 99)
			f, err := mem.Create("base.raw")
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt(base, 0)
			f.Close()
			o.BackingFile = "base.raw"
			o.Size = 2 * wtMiB
			if err := Create(mem, "img", o); err != nil {
				t.Fatal(err)
			}
			im, err := Open(mem, "img", &Options{ReadWrite: true})
			if err != nil {
				t.Fatal(err)
			}
			m := model.New(2*wtMiB, bytes.NewReader(base))
			for i, w := range [][2]int64{{100, 1}, {70000, 5000}, {wtMiB - 10, 20}, {wtMiB + 4096, 512}} {
				p := wtFill(w[1], uint64(i))
				if _, err := im.WriteAt(p, w[0]); err != nil {
					t.Fatal(err)
				}
				m.Write(p, w[0])
			}
			if err := im.WriteZeroes(300000, 70000); err != nil {
				t.Fatal(err)
			}
			m.WriteZeroes(300000, 70000)
			wtModelCheck(t, im, m)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			im, err = Open(mem, "img", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			wtModelCheck(t, im, m)
		})
	}
}

// TestWriteConcurrent writes and reads from several goroutines at once
// (run it with -race): writers own disjoint ranges, readers read anywhere,
// and every range reads back as last written.
func TestWriteConcurrent(t *testing.T) {
	for _, through := range []bool{false, true} {
		t.Run(fmt.Sprintf("through=%v", through), func(t *testing.T) {
			mem := vfs.NewMem()
			const size = 8 << 20
			if err := Create(mem, "img", CreateOptions{ClusterSize: 4096, Size: size}); err != nil {
				t.Fatal(err)
			}
			im, err := Open(mem, "img", &Options{ReadWrite: true, WriteThrough: through, L2CacheBytes: 16 << 10})
			if err != nil {
				t.Fatal(err)
			}
			const writers = 4
			var wg sync.WaitGroup
			for g := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(g), 5))
					region := int64(size / writers)
					for i := range 60 {
						off := int64(g)*region + r.Int64N(region-70000)
						p := wtFill(1+r.Int64N(65536), uint64(g*1000+i))
						var err error
						switch i % 7 {
						case 3:
							err = im.WriteZeroes(off, int64(len(p)))
						case 5:
							err = im.Flush()
						default:
							_, err = im.WriteAt(p, off)
						}
						if err != nil {
							t.Error(err)
							return
						}
						// Read back our own range at once.
						q := make([]byte, len(p))
						if _, err := im.ReadAt(q, off); err != nil {
							t.Error(err)
							return
						}
						switch i % 7 {
						case 3:
							clear(p)
						case 5:
							continue
						}
						if !bytes.Equal(p, q) {
							t.Errorf("goroutine %d op %d: read back differs at %d", g, i, wtFirstDiff(p, q))
							return
						}
					}
				}()
			}
			for range 2 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, 100000)
					for i := range 200 {
						if _, err := im.ReadAt(buf, int64(i*37000)%(size-100000)); err != nil {
							t.Error(err)
							return
						}
						if _, _, err := im.BlockStatus(int64(i*4096)%size, 1<<20); err != nil {
							t.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			res, err := CheckFile(mem, "img", "")
			if err != nil || res.Corruptions+res.Leaks > 0 {
				t.Fatalf("check: %v %+v", err, res)
			}
		})
	}
}

// TestResizeOverLongerBacking grows an image whose backing file is longer
// than it: the grown range must read as zeros, not as the backing file, and
// data written before and after the resize must stay.
func TestResizeOverLongerBacking(t *testing.T) {
	for _, o := range []CreateOptions{
		{ClusterSize: 4096},
		{Version: 2, ClusterSize: 512},
		{Format: FormatQCOW, ClusterSize: 4096},
	} {
		t.Run(fmt.Sprintf("%s-v%d-%d", o.Format, o.Version, o.ClusterSize), func(t *testing.T) {
			mem := vfs.NewMem()
			base := wtFill(4*wtMiB, 7)
			f, err := mem.Create("base")
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt(base, 0)
			f.Close()
			o.BackingFile, o.BackingFormat = "base", "raw"
			if o.Format == FormatQCOW {
				o.BackingFormat = ""
			}
			o.Size = wtMiB + 1536 // not a whole number of clusters
			if err := Create(mem, "img", o); err != nil {
				t.Fatal(err)
			}
			im, err := Open(mem, "img", &Options{ReadWrite: true})
			if err != nil {
				t.Fatal(err)
			}
			m := model.New(3*wtMiB, bytes.NewReader(base[:o.Size]))
			p := wtFill(2000, 1)
			if _, err := im.WriteAt(p, wtMiB-1000); err != nil {
				t.Fatal(err)
			}
			m.Write(p, wtMiB-1000)
			if err := im.Resize(3 * wtMiB); err != nil {
				t.Fatalf("Resize: %v", err)
			}
			if im.Size() != 3*wtMiB {
				t.Fatalf("size %d after Resize", im.Size())
			}
			q := wtFill(5000, 2)
			if _, err := im.WriteAt(q, 2*wtMiB); err != nil {
				t.Fatal(err)
			}
			m.Write(q, 2*wtMiB)
			wtModelCheck(t, im, m)
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			im, err = Open(mem, "img", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			wtModelCheck(t, im, m)
		})
	}
}

// wtName names create options for subtests, e.g. "qcow2-v3-c512-rc64".
func wtName(o CreateOptions) string {
	if o.Format == FormatQCOW {
		return fmt.Sprintf("qcow-c%d", o.ClusterSize)
	}
	v := o.Version
	if v == 0 {
		v = 3
	}
	return fmt.Sprintf("qcow2-v%d-c%d-rc%d", v, o.ClusterSize, o.RefcountBits)
}

// TestOpenWritableClearsAutoclear checks that a writable open clears
// autoclear feature bits it does not maintain, as qemu does.
func TestOpenWritableClearsAutoclear(t *testing.T) {
	mem := vfs.NewMem()
	if err := Create(mem, "img", CreateOptions{Size: wtMiB}); err != nil {
		t.Fatal(err)
	}
	wtPatch(t, mem, "img", 88, []byte{0, 0, 0, 0, 0, 0, 0, 1 << 5})
	im, err := Open(mem, "img", &Options{ReadWrite: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := im.Close(); err != nil {
		t.Fatal(err)
	}
	im, err = Open(mem, "img", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	if im.h.autoclear != 0 {
		t.Fatalf("autoclear %#x after a writable open, want 0", im.h.autoclear)
	}
}
