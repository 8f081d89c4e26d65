// Package vfstest holds the contract test suite that every vfs.FS must pass:
// the OS, memory and afero backends, and wrappers such as faultfs over each.
package vfstest

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// NewFS returns a fresh, empty file system for one test, and the directory
// in it where the test may create files ("" for the root). It may register
// cleanups with t.
type NewFS func(t *testing.T) (fsys vfs.FS, dir string)

// RunContract runs the vfs contract against the file systems newFS returns,
// one subtest per clause, each on a fresh file system. Run it under -race:
// one clause drives ReadAt and WriteAt from several goroutines.
func RunContract(t *testing.T, newFS NewFS) {
	t.Helper()
	for _, c := range contract {
		t.Run(c.name, func(t *testing.T) {
			fsys, dir := newFS(t)
			c.run(t, &env{t: t, fs: fsys, dir: dir})
		})
	}
}

// env is one clause's file system with helpers that fail the test on error.
type env struct {
	t   *testing.T
	fs  vfs.FS
	dir string
}

// path returns name inside the test directory.
func (e *env) path(name string) string { return filepath.Join(e.dir, name) }

// track closes f at the end of the test, ignoring the error (it may have
// been closed already).
func (e *env) track(f vfs.File) vfs.File {
	e.t.Cleanup(func() { f.Close() })
	return f
}

func (e *env) create(name string) vfs.File {
	e.t.Helper()
	f, err := e.fs.Create(e.path(name))
	if err != nil {
		e.t.Fatalf("Create(%q): %v", name, err)
	}
	return e.track(f)
}

func (e *env) open(name string, flag vfs.OpenFlag) vfs.File {
	e.t.Helper()
	f, err := e.fs.Open(e.path(name), flag)
	if err != nil {
		e.t.Fatalf("Open(%q, %v): %v", name, flag, err)
	}
	return e.track(f)
}

func (e *env) close(f vfs.File) {
	e.t.Helper()
	if err := f.Close(); err != nil {
		e.t.Fatalf("Close: %v", err)
	}
}

func (e *env) write(f vfs.File, p []byte, off int64) {
	e.t.Helper()
	n, err := f.WriteAt(p, off)
	if err != nil || n != len(p) {
		e.t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(p), off, n, err)
	}
}

// want checks that [off, off+len(data)) reads as data, with a nil error.
func (e *env) want(f vfs.File, off int64, data []byte) {
	e.t.Helper()
	got := make([]byte, len(data))
	n, err := f.ReadAt(got, off)
	if err != nil || n != len(data) {
		e.t.Fatalf("ReadAt(%d bytes, %d) = %d, %v; want %d, nil", len(data), off, n, err, len(data))
	}
	if !bytes.Equal(got, data) {
		e.t.Fatalf("ReadAt(%d bytes, %d): contents differ at byte %d", len(data), off, firstDiff(got, data))
	}
}

func (e *env) wantSize(f vfs.File, want int64) {
	e.t.Helper()
	got, err := f.Size()
	if err != nil || got != want {
		e.t.Fatalf("Size() = %d, %v; want %d", got, err, want)
	}
}

// wantErr fails unless errors.Is(err, target).
func (e *env) wantErr(what string, err, target error) {
	e.t.Helper()
	if !errors.Is(err, target) {
		e.t.Fatalf("%s: err = %v; want errors.Is(err, %v)", what, err, target)
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// pattern returns n bytes that differ from each other and from zero, seeded
// by seed, so misplaced data cannot read back as expected.
func pattern(n int, seed byte) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = byte(i*7+int(seed)*31)%251 + 1
	}
	return p
}

func zeros(n int) []byte { return make([]byte, n) }

// contract is the suite: one entry per clause of the vfs contract.
var contract = []struct {
	name string
	run  func(t *testing.T, e *env)
}{
	{"CreateNew", func(t *testing.T, e *env) {
		f := e.create("img")
		e.wantSize(f, 0)
		fi, err := e.fs.Stat(e.path("img"))
		if err != nil || fi.Size() != 0 || fi.Name() != "img" || fi.IsDir() {
			t.Fatalf("Stat = %v, %v; want a 0-byte file named img", fi, err)
		}
	}},
	{"CreateExisting", func(t *testing.T, e *env) {
		e.close(e.create("img"))
		_, err := e.fs.Create(e.path("img"))
		e.wantErr("second Create", err, fs.ErrExist)
	}},
	{"RenameReplaces", func(t *testing.T, e *env) {
		r, ok := e.fs.(vfs.Renamer)
		if !ok {
			t.Skip("FS does not implement vfs.Renamer")
		}
		a, b := pattern(3000, 7), pattern(100, 8)
		f := e.create("tmp")
		e.write(f, a, 0)
		e.close(f)
		g := e.create("img")
		e.write(g, b, 0)
		e.close(g)
		if err := r.Rename(e.path("tmp"), e.path("img")); err != nil {
			t.Fatalf("Rename(tmp, img): %v", err)
		}
		if _, err := e.fs.Stat(e.path("tmp")); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("Stat(tmp) after Rename = %v; want fs.ErrNotExist", err)
		}
		e.want(e.open("img", vfs.ReadOnly), 0, a)
		e.wantSize(e.open("img", vfs.ReadWrite), 3000)
		e.wantErr("Rename of a missing file", r.Rename(e.path("nope"), e.path("img2")), fs.ErrNotExist)
	}},
	{"RoundTrip", func(t *testing.T, e *env) {
		f := e.create("img")
		a, b := pattern(10000, 1), pattern(777, 2)
		e.write(f, a, 0)
		e.write(f, b, 5000)
		copy(a[5000:], b)
		e.wantSize(f, 10000)
		e.want(f, 0, a)
		e.want(f, 4999, a[4999:5778])
		fi, err := e.fs.Stat(e.path("img"))
		if err != nil || fi.Size() != 10000 {
			t.Fatalf("Stat = %v, %v; want size 10000", fi, err)
		}
		e.close(f)
		e.want(e.open("img", vfs.ReadOnly), 0, a)
	}},
	{"PwriteMovesNoOffset", func(t *testing.T, e *env) {
		f := e.create("img")
		e.write(f, []byte("abc"), 0)
		e.write(f, []byte("xy"), 0)
		e.wantSize(f, 3)
		e.want(f, 0, []byte("xyc"))
		e.want(f, 0, []byte("xyc")) // a read moves nothing either
		e.want(f, 1, []byte("yc"))
	}},
	{"EmptyWriteDoesNotExtend", func(t *testing.T, e *env) {
		f := e.create("img")
		if n, err := f.WriteAt(nil, 1000); n != 0 || err != nil {
			t.Fatalf("WriteAt(nil, 1000) = %d, %v; want 0, nil", n, err)
		}
		e.wantSize(f, 0)
	}},
	{"SparseWriteBeyondEOF", func(t *testing.T, e *env) {
		f := e.create("img")
		e.write(f, []byte("head"), 0)
		const off = 1<<20 + 3
		data := pattern(5000, 3)
		e.write(f, data, off)
		e.wantSize(f, off+5000)
		e.want(f, 4, zeros(off-4))
		e.want(f, off, data)
		e.want(f, 0, []byte("head"))
	}},
	{"ReadPastEOF", func(t *testing.T, e *env) {
		f := e.create("img")
		data := pattern(10, 4)
		e.write(f, data, 0)
		buf := make([]byte, 20)
		n, err := f.ReadAt(buf, 5)
		if n != 5 || err != io.EOF || !bytes.Equal(buf[:5], data[5:]) {
			t.Fatalf("ReadAt(20 bytes, 5) = %d, %v; want 5 bytes and io.EOF", n, err)
		}
		for _, off := range []int64{10, 11, 1 << 40} {
			if n, err := f.ReadAt(buf, off); n != 0 || err != io.EOF {
				t.Fatalf("ReadAt(20 bytes, %d) = %d, %v; want 0, io.EOF", off, n, err)
			}
		}
		for _, off := range []int64{0, 10, 1000} {
			if n, err := f.ReadAt(nil, off); n != 0 || err != nil {
				t.Fatalf("ReadAt(nil, %d) = %d, %v; want 0, nil", off, n, err)
			}
		}
	}},
	{"ReadExactlyToEOF", func(t *testing.T, e *env) {
		f := e.create("img")
		data := pattern(8192, 5)
		e.write(f, data, 0)
		e.want(f, 0, data)           // whole file: n == len(p) and err == nil
		e.want(f, 8000, data[8000:]) // the tail
	}},
	{"TruncateShrinkThenGrow", func(t *testing.T, e *env) {
		f := e.create("img")
		data := bytes.Repeat([]byte{0xAA}, 10000)
		e.write(f, data, 0)
		for _, step := range []struct{ cut, grow int64 }{{5000, 12000}, {4096, 9000}, {0, 5000}} {
			if err := f.Truncate(step.cut); err != nil {
				t.Fatalf("Truncate(%d): %v", step.cut, err)
			}
			e.wantSize(f, step.cut)
			if err := f.Truncate(step.grow); err != nil {
				t.Fatalf("Truncate(%d): %v", step.grow, err)
			}
			e.wantSize(f, step.grow)
			e.want(f, 0, data[:step.cut])
			e.want(f, step.cut, zeros(int(step.grow-step.cut)))
			e.write(f, data, 0) // restore for the next step
		}
	}},
	{"NegativeOffsets", func(t *testing.T, e *env) {
		f := e.create("img")
		e.write(f, []byte("data"), 0)
		_, err := f.ReadAt(make([]byte, 4), -1)
		e.wantErr("ReadAt(-1)", err, vfs.ErrNegativeOffset)
		_, err = f.WriteAt([]byte("x"), -1)
		e.wantErr("WriteAt(-1)", err, vfs.ErrNegativeOffset)
		e.wantErr("Truncate(-1)", f.Truncate(-1), vfs.ErrNegativeOffset)
		e.wantErr("SyncRange(-1, 1)", f.SyncRange(-1, 1), vfs.ErrNegativeOffset)
		e.wantErr("SyncRange(0, -1)", f.SyncRange(0, -1), vfs.ErrNegativeOffset)
		if a, ok := f.(vfs.Allocator); ok {
			e.wantErr("Allocate(-1, 1)", a.Allocate(-1, 1), vfs.ErrNegativeOffset)
			e.wantErr("Allocate(0, -1)", a.Allocate(0, -1), vfs.ErrNegativeOffset)
		}
		e.wantSize(f, 4)
		e.want(f, 0, []byte("data"))
	}},
	{"Syncs", func(t *testing.T, e *env) {
		f := e.create("img")
		e.write(f, pattern(9000, 6), 0)
		for _, c := range []struct {
			name string
			err  error
		}{
			{"Sync", f.Sync()},
			{"Datasync", f.Datasync()},
			{"SyncRange(0, 9000)", f.SyncRange(0, 9000)},
			{"SyncRange(4096, 4096)", f.SyncRange(4096, 4096)},
			{"SyncRange(0, 0)", f.SyncRange(0, 0)},
			{"SyncRange past EOF", f.SyncRange(1<<30, 4096)},
			{"SyncDir", e.fs.SyncDir(e.dirOrDot())},
		} {
			if c.err != nil {
				t.Errorf("%s: %v", c.name, c.err)
			}
		}
		e.close(f)
		r := e.open("img", vfs.ReadOnly)
		if err := r.Sync(); err != nil {
			t.Errorf("Sync on a ReadOnly handle: %v", err)
		}
	}},
	{"ReadOnlyRefusesWrites", func(t *testing.T, e *env) {
		w := e.create("img")
		data := pattern(100, 7)
		e.write(w, data, 0)
		e.close(w)
		r := e.open("img", vfs.ReadOnly)
		_, err := r.WriteAt([]byte("x"), 0)
		e.wantErr("WriteAt on ReadOnly", err, vfs.ErrReadOnly)
		_, err = r.WriteAt([]byte("x"), 1000)
		e.wantErr("WriteAt past EOF on ReadOnly", err, vfs.ErrReadOnly)
		e.wantErr("Truncate on ReadOnly", r.Truncate(0), vfs.ErrReadOnly)
		if a, ok := r.(vfs.Allocator); ok {
			e.wantErr("Allocate on ReadOnly", a.Allocate(0, 8192), vfs.ErrReadOnly)
		}
		e.wantSize(r, 100)
		e.want(r, 0, data)
	}},
	{"WriterLock", func(t *testing.T, e *env) {
		w := e.create("img") // Create holds the lock
		_, err := e.fs.Open(e.path("img"), vfs.ReadWrite)
		e.wantErr("Open(ReadWrite) while Create's handle is open", err, vfs.ErrLocked)
		if err != nil && !strings.Contains(err.Error(), "img") {
			t.Errorf("lock error %q does not name the file", err)
		}
		r := e.open("img", vfs.ReadOnly) // readers take no lock
		e.close(w)

		w2 := e.open("img", vfs.ReadWrite)
		_, err = e.fs.Open(e.path("img"), vfs.ReadWrite)
		e.wantErr("second Open(ReadWrite)", err, vfs.ErrLocked)
		// Closing another handle to the file (as a POSIX record lock would
		// let it) must not release the writer's lock.
		e.close(e.open("img", vfs.ReadOnly))
		_, err = e.fs.Open(e.path("img"), vfs.ReadWrite)
		e.wantErr("Open(ReadWrite) after a reader closed", err, vfs.ErrLocked)
		e.write(w2, []byte("ok"), 0)
		e.close(w2)
		e.close(e.open("img", vfs.ReadWrite)) // released by Close
		e.close(r)
	}},
	{"HandlesShareData", func(t *testing.T, e *env) {
		w := e.create("img")
		r := e.open("img", vfs.ReadOnly)
		data := pattern(6000, 8)
		e.write(w, data, 100)
		e.wantSize(r, 6100)
		e.want(r, 100, data)
		if err := w.Truncate(50); err != nil {
			t.Fatal(err)
		}
		e.wantSize(r, 50)
	}},
	{"OpenMissing", func(t *testing.T, e *env) {
		for _, flag := range []vfs.OpenFlag{vfs.ReadOnly, vfs.ReadWrite} {
			_, err := e.fs.Open(e.path("missing"), flag)
			e.wantErr("Open(missing)", err, fs.ErrNotExist)
		}
		_, err := e.fs.Stat(e.path("missing"))
		e.wantErr("Stat(missing)", err, fs.ErrNotExist)
	}},
	{"Remove", func(t *testing.T, e *env) {
		e.close(e.create("img"))
		if err := e.fs.Remove(e.path("img")); err != nil {
			t.Fatalf("Remove: %v", err)
		}
		_, err := e.fs.Stat(e.path("img"))
		e.wantErr("Stat after Remove", err, fs.ErrNotExist)
		_, err = e.fs.Open(e.path("img"), vfs.ReadOnly)
		e.wantErr("Open after Remove", err, fs.ErrNotExist)
		e.wantErr("Remove(missing)", e.fs.Remove(e.path("img")), fs.ErrNotExist)
		if err := e.fs.SyncDir(e.dirOrDot()); err != nil {
			t.Fatalf("SyncDir: %v", err)
		}
		e.wantSize(e.create("img"), 0)
	}},
	{"RemoveWhileOpen", func(t *testing.T, e *env) {
		w := e.create("img")
		data := pattern(3000, 9)
		e.write(w, data, 0)
		if err := e.fs.Remove(e.path("img")); err != nil {
			t.Fatalf("Remove of an open file: %v", err)
		}
		e.want(w, 0, data) // the handle keeps the removed file
		n := e.create("img")
		e.wantSize(n, 0) // a new, unlocked file
		e.close(n)
		e.close(e.open("img", vfs.ReadWrite))
	}},
	{"UseAfterClose", func(t *testing.T, e *env) {
		f := e.create("img")
		e.close(f)
		_, err := f.ReadAt(make([]byte, 1), 0)
		e.wantErr("ReadAt after Close", err, fs.ErrClosed)
		_, err = f.WriteAt([]byte("x"), 0)
		e.wantErr("WriteAt after Close", err, fs.ErrClosed)
		e.wantErr("Truncate after Close", f.Truncate(0), fs.ErrClosed)
		e.wantErr("Sync after Close", f.Sync(), fs.ErrClosed)
		e.wantErr("Datasync after Close", f.Datasync(), fs.ErrClosed)
		e.wantErr("SyncRange after Close", f.SyncRange(0, 1), fs.ErrClosed)
		_, err = f.Size()
		e.wantErr("Size after Close", err, fs.ErrClosed)
		e.wantErr("second Close", f.Close(), fs.ErrClosed)
	}},
	{"ConcurrentDisjoint", func(t *testing.T, e *env) {
		f := e.create("img")
		// Chunks of 3000 bytes, so neighbouring writers share 4 KiB pages.
		const workers, chunks, chunk = 8, 24, 3000
		var wg sync.WaitGroup
		for g := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				buf := make([]byte, chunk)
				for i := range chunks {
					off := int64((i*workers + g) * chunk)
					data := pattern(chunk, byte(g*chunks+i))
					if n, err := f.WriteAt(data, off); n != chunk || err != nil {
						t.Errorf("worker %d: WriteAt(%d) = %d, %v", g, off, n, err)
						return
					}
					if n, err := f.ReadAt(buf, off); n != chunk || err != nil || !bytes.Equal(buf, data) {
						t.Errorf("worker %d: ReadAt(%d) = %d, %v, equal=%v", g, off, n, err, bytes.Equal(buf, data))
						return
					}
				}
			}()
		}
		wg.Add(1)
		go func() { // size and sync calls racing the writers
			defer wg.Done()
			for range 20 {
				if _, err := f.Size(); err != nil {
					t.Errorf("Size: %v", err)
				}
				if err := f.SyncRange(0, 4096); err != nil {
					t.Errorf("SyncRange: %v", err)
				}
			}
		}()
		wg.Wait()
		if t.Failed() {
			return
		}
		e.wantSize(f, workers*chunks*chunk)
		for g := range workers {
			for i := range chunks {
				e.want(f, int64((i*workers+g)*chunk), pattern(chunk, byte(g*chunks+i)))
			}
		}
	}},
	{"Allocate", func(t *testing.T, e *env) {
		f := e.create("img")
		a, ok := f.(vfs.Allocator)
		if !ok {
			t.Skip("backend's files do not implement vfs.Allocator")
		}
		e.write(f, []byte("abc"), 0)
		if err := a.Allocate(0, 64<<10); err != nil {
			t.Fatalf("Allocate(0, 64 KiB): %v", err)
		}
		e.wantSize(f, 64<<10)
		e.want(f, 0, []byte("abc"))
		e.want(f, 3, zeros(64<<10-3))
		if err := a.Allocate(0, 10); err != nil {
			t.Fatalf("Allocate inside the file: %v", err)
		}
		if err := a.Allocate(100, 0); err != nil {
			t.Fatalf("Allocate(100, 0): %v", err)
		}
		e.wantSize(f, 64<<10)
		if err := a.Allocate(1<<20, 4096); err != nil {
			t.Fatalf("Allocate past EOF: %v", err)
		}
		e.wantSize(f, 1<<20+4096)
		e.want(f, 64<<10, zeros(1<<20+4096-64<<10))
	}},
}

// dirOrDot is the directory to pass to SyncDir.
func (e *env) dirOrDot() string {
	if e.dir == "" {
		return "."
	}
	return e.dir
}
