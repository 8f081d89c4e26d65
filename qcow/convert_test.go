package qcow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// convertTestImage builds a small QCOW2 version 2 image by hand (64 KiB
// clusters): cluster 0 header (+ backing name), 1 L1 table, 2 refcount
// table, 3 refcount block, 4 L2 table, then one data cluster per entry of
// data, mapped at the guest cluster given by its key.
func convertTestImage(t *testing.T, fsys vfs.FS, name string, size uint64, backing string, data map[uint64][]byte) {
	t.Helper()
	const cb = 16
	const cs = 1 << cb
	nData := len(data)
	file := make([]byte, (5+nData)*cs)
	h := file[:cs]
	binary.BigEndian.PutUint32(h[0:], Magic)
	binary.BigEndian.PutUint32(h[4:], 2)
	if backing != "" {
		// Header extensions end at 72 (8 zero bytes); the name follows.
		binary.BigEndian.PutUint64(h[8:], 80)
		binary.BigEndian.PutUint32(h[16:], uint32(len(backing)))
		copy(h[80:], backing)
	}
	binary.BigEndian.PutUint32(h[20:], cb)
	binary.BigEndian.PutUint64(h[24:], size)
	l1Size := (size + cs*(cs/8) - 1) / (cs * (cs / 8))
	binary.BigEndian.PutUint32(h[36:], uint32(l1Size))
	binary.BigEndian.PutUint64(h[40:], 1*cs)
	binary.BigEndian.PutUint64(h[48:], 2*cs)
	binary.BigEndian.PutUint32(h[56:], 1)
	const copied = 1 << 63
	binary.BigEndian.PutUint64(file[1*cs:], 4*cs|copied) // L1[0] -> L2
	binary.BigEndian.PutUint64(file[2*cs:], 3*cs)        // refcount table -> block
	for c := 0; c < 5+nData; c++ {                       // every cluster used once
		binary.BigEndian.PutUint16(file[3*cs+2*c:], 1)
	}
	host := uint64(5)
	for guest := uint64(0); guest < cs/8; guest++ {
		d, ok := data[guest]
		if !ok {
			continue
		}
		binary.BigEndian.PutUint64(file[4*cs+8*guest:], host*cs|copied)
		copy(file[host*cs:], d)
		host++
	}
	writeMemFile(t, fsys, name, file)
}

func writeMemFile(t *testing.T, fsys vfs.FS, name string, b []byte) {
	t.Helper()
	f, err := fsys.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// writeRecorder wraps a file and fails the test on any write that holds an
// all-zero SparseBlock-aligned block.
type writeRecorder struct {
	vfs.File
	t      *testing.T
	writes int
}

func (w *writeRecorder) WriteAt(p []byte, off int64) (int, error) {
	w.writes++
	for i := 0; i < len(p); {
		j := min(len(p), i+SparseBlock-int((off+int64(i))%SparseBlock))
		if (off+int64(i))%SparseBlock == 0 && j-i == SparseBlock && bytes.Equal(p[i:j], zeroBlock[:]) {
			w.t.Errorf("CopyRaw wrote an all-zero block at %d", off+int64(i))
		}
		i = j
	}
	return w.File.WriteAt(p, off)
}

func filled(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, 0))
	for i := range b {
		b[i] = byte(r.Uint32() | 1) // never zero
	}
	return b
}

func TestCopyRaw(t *testing.T) {
	const cs = 64 << 10
	partial := make([]byte, cs) // data, 56 KiB of zeros, data
	copy(partial, filled(4096, 1))
	copy(partial[cs-4096:], filled(4096, 2))
	unaligned := make([]byte, cs) // non-zero bytes straddling 4 KiB boundaries
	copy(unaligned[4090:], filled(12, 3))
	copy(unaligned[cs-1:], []byte{7})

	baseData := filled(3*cs, 4)
	clear(baseData[cs : cs+8192]) // zeros inside the backing file too

	tests := []struct {
		name    string
		size    uint64
		backing bool
		data    map[uint64][]byte
	}{
		{"empty", 8 << 20, false, nil},
		{"full cluster", 8 << 20, false, map[uint64][]byte{0: filled(cs, 5)}},
		{"zeros inside clusters", 8 << 20, false, map[uint64][]byte{1: partial, 2: make([]byte, cs), 5: unaligned}},
		{"last cluster of a 1 GiB disk", 1 << 30, false, map[uint64][]byte{8191: filled(cs, 6)}},
		{"odd virtual size", 3*cs + 1000, false, map[uint64][]byte{3: filled(cs, 7)}},
		{"backing file", 8 << 20, true, map[uint64][]byte{1: filled(cs, 8)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fsys := vfs.NewMem()
			backing := ""
			if tc.backing {
				backing = "base.raw"
				writeMemFile(t, fsys, backing, baseData)
			}
			convertTestImage(t, fsys, "img.qcow2", tc.size, backing, tc.data)
			im, err := Open(fsys, "img.qcow2", nil)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()

			out, err := fsys.Create("out.raw")
			if err != nil {
				t.Fatal(err)
			}
			// Old contents of the output must not survive in the holes.
			if _, err := out.WriteAt(bytes.Repeat([]byte{0xEE}, 1<<20), 0); err != nil {
				t.Fatal(err)
			}
			rec := &writeRecorder{File: out, t: t}
			before := fsys.AllocatedBytes()
			if err := CopyRaw(rec, im); err != nil {
				t.Fatal(err)
			}
			// A size that is not a multiple of 512 is rounded down, as
			// qemu 7.2 reads it (TestSizeRoundedDown).
			if got, err := out.Size(); err != nil || got != int64(tc.size)&^511 {
				t.Fatalf("output size %d (%v), want %d", got, err, int64(tc.size)&^511)
			}
			compareImage(t, im, out)

			// Only non-zero 4 KiB blocks may take space.
			var want int64
			for _, d := range tc.data {
				want += nonZeroBlocks(d) * SparseBlock
			}
			if tc.backing {
				want += nonZeroBlocks(baseData) * SparseBlock
			}
			got := fsys.AllocatedBytes() - before + 1<<20 // the junk was freed
			if got > want+SparseBlock*4 {
				t.Errorf("output allocates %d bytes, want about %d", got, want)
			}
		})
	}
}

func nonZeroBlocks(b []byte) int64 {
	var n int64
	for i := 0; i < len(b); i += SparseBlock {
		if !bytes.Equal(b[i:min(len(b), i+SparseBlock)], zeroBlock[:min(len(b)-i, SparseBlock)]) {
			n++
		}
	}
	return n
}

// compareImage reads the whole virtual disk from im and from the raw file.
func compareImage(t *testing.T, im *Image, raw vfs.File) {
	t.Helper()
	size := im.Size()
	a := make([]byte, 1<<20)
	b := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(a)) {
		n := int(min(int64(len(a)), size-off))
		if _, err := im.ReadAt(a[:n], off); err != nil {
			t.Fatalf("image read at %d: %v", off, err)
		}
		if _, err := raw.ReadAt(b[:n], off); err != nil {
			t.Fatalf("raw read at %d: %v", off, err)
		}
		if !bytes.Equal(a[:n], b[:n]) {
			i := 0
			for a[i] == b[i] {
				i++
			}
			t.Fatalf("output differs at %d: got %#x, want %#x", off+int64(i), b[i], a[i])
		}
	}
}

// failingWrite fails every WriteAt.
type failingWrite struct{ vfs.File }

var errTestWrite = errors.New("test: write failed")

func (failingWrite) WriteAt([]byte, int64) (int, error) { return 0, errTestWrite }

func TestCopyRawWriteError(t *testing.T) {
	fsys := vfs.NewMem()
	convertTestImage(t, fsys, "img.qcow2", 8<<20, "", map[uint64][]byte{3: filled(64<<10, 9)})
	im, err := Open(fsys, "img.qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	out, err := fsys.Create("out.raw")
	if err != nil {
		t.Fatal(err)
	}
	err = CopyRaw(failingWrite{out}, im)
	if !errors.Is(err, errTestWrite) {
		t.Fatalf("CopyRaw = %v, want an error wrapping %v", err, errTestWrite)
	}
}

// TestCopyRawSparse64G converts a 64 GiB qcow2 image made by qemu-img with
// a few MiB of data at scattered offsets: it must take well under a second
// and leave a sparse output.
func TestCopyRawSparse64G(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "big.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", img, "64G")
	offsets := []int64{0, 1<<30 + 12345*512, 17 << 30, 40<<30 + 4096, 64<<30 - 1<<20}
	var cmds []string
	for i, off := range offsets {
		cmds = append(cmds, fmt.Sprintf("write -P %d %d 1M", 0x41+i, off))
	}
	qemutest.Script(t, "qcow2", img, cmds...)
	im, err := Open(vfs.OS, img, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	out, err := vfs.OS.Create(filepath.Join(dir, "big.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	start := time.Now()
	if err := CopyRaw(out, im); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("CopyRaw of a sparse 64 GiB image took %v, want < 1s", d)
	}
	if size, _ := out.Size(); size != 64<<30 {
		t.Errorf("output size %d, want %d", size, int64(64<<30))
	}
	for i, off := range offsets {
		got := make([]byte, 1<<20)
		if _, err := out.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if want := bytes.Repeat([]byte{byte(0x41 + i)}, 1<<20); !bytes.Equal(got, want) {
			t.Errorf("data at %d does not match the pattern written by qemu-io", off)
		}
	}
	fi, err := os.Stat(filepath.Join(dir, "big.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Blocks*512 > 64<<20 {
		t.Errorf("output takes %d bytes of disk, want < 64 MiB", st.Blocks*512)
	}
}
