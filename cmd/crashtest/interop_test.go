package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
)

const (
	interopKiB = int64(1) << 10
	interopMiB = int64(1) << 20
	interopGiB = int64(1) << 30
)

// interopCLI runs crashtest in-process and returns its exit code and
// combined output.
func interopCLI(args ...string) (int, string) {
	var out bytes.Buffer
	code := run(args, &out, &out)
	return code, out.String()
}

// interopImage builds an image with qemu in dir and returns its path.
type interopImage struct {
	name  string
	build func(t *testing.T, dir string) string
}

func interopRandom(t *testing.T, path string, size int64) string {
	t.Helper()
	qemutest.WriteRandomRaw(t, path, size, qemutest.Seed(t, t.Name()))
	return path
}

// interopImages is a representative subset of the reader's interop matrix
// (qcow/interop_test.go).
func interopImages() []interopImage {
	empty := func(format, opts string, cs, size int64) func(*testing.T, string) string {
		return func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img"), format, opts, size)
			qemutest.Script(t, format, img, qemutest.Pattern(cs, size, 0)...)
			return img
		}
	}
	converted := func(format, opts string, compress bool) func(*testing.T, string) string {
		return func(t *testing.T, dir string) string {
			src := interopRandom(t, filepath.Join(dir, "src.raw"), 3*interopMiB+4096)
			args := []string{"convert"}
			if compress {
				args = append(args, "-c")
			}
			args = append(args, "-O", format)
			if opts != "" {
				args = append(args, "-o", opts)
			}
			img := filepath.Join(dir, "img")
			qemutest.Img(t, append(args, src, img)...)
			return img
		}
	}
	return []interopImage{
		{"v1", empty("qcow", "", 4*interopKiB, 4*interopMiB)},
		{"v1-odd-size", empty("qcow", "", 4*interopKiB, 1000448)},
		{"v1-compressed", func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img"), "qcow", "", 2*interopMiB)
			qemutest.Script(t, "qcow", img, "write -c -P 0x41 64k 4k", "write -c -P 0x42 128k 4k", "write -P 0x43 130k 1k")
			return img
		}},
		{"v1-backing-raw", func(t *testing.T, dir string) string {
			interopRandom(t, filepath.Join(dir, "base.raw"), 3*interopMiB)
			img := qemutest.Create(t, filepath.Join(dir, "img"), "qcow", "", 0, "-b", "base.raw", "-F", "raw")
			qemutest.Script(t, "qcow", img, qemutest.Pattern(4*interopKiB, 3*interopMiB, 1)...)
			return img
		}},
		{"v2-512", empty("qcow2", "compat=0.10,cluster_size=512", 512, 2*interopMiB)},
		{"v2-zlib", converted("qcow2", "compat=0.10", true)},
		{"v3-4k", empty("qcow2", "cluster_size=4096", 4*interopKiB, 4*interopMiB)},
		{"v3-2M", empty("qcow2", "cluster_size=2M", 2*interopMiB, 16*interopMiB)},
		{"v3-zstd", func(t *testing.T, dir string) string {
			img := converted("qcow2", "compression_type=zstd,cluster_size=4096", true)(t, dir)
			qemutest.Script(t, "qcow2", img, "write -P 0x51 6000 3000", "write -z 16k 4k")
			return img
		}},
		{"v3-zstd-write-c", func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img"), "qcow2", "compression_type=zstd", 2*interopMiB)
			qemutest.Script(t, "qcow2", img, "write -c -P 0x61 0 64k", "write -c -P 0x62 128k 64k", "write -P 0x63 130k 1k")
			return img
		}},
		{"v3-odd-size-extl2", empty("qcow2", "extended_l2=on", 64*interopKiB, 1000448)},
		{"v3-extl2-backing", func(t *testing.T, dir string) string {
			interopRandom(t, filepath.Join(dir, "base.raw"), 4*interopMiB)
			img := qemutest.Create(t, filepath.Join(dir, "img"), "qcow2", "extended_l2=on", 0, "-b", "base.raw", "-F", "raw")
			qemutest.Script(t, "qcow2", img, "write -P 0xb1 3000 1000", "write -z 8k 2k", "write -P 0xb2 70k 5000", "discard 1M 64k")
			return img
		}},
		{"chain-raw-qcow2-qcow2", func(t *testing.T, dir string) string {
			interopRandom(t, filepath.Join(dir, "base.raw"), 4*interopMiB)
			mid := qemutest.Create(t, filepath.Join(dir, "mid.qcow2"), "qcow2", "compat=0.10", 0, "-b", "base.raw", "-F", "raw")
			qemutest.Script(t, "qcow2", mid, qemutest.Pattern(64*interopKiB, 4*interopMiB, 1)...)
			top := qemutest.Create(t, filepath.Join(dir, "top.qcow2"), "qcow2", "cluster_size=4096", 0, "-b", "mid.qcow2", "-F", "qcow2")
			qemutest.Script(t, "qcow2", top, qemutest.Pattern(4*interopKiB, 4*interopMiB, 2)...)
			return top
		}},
		{"snapshots", func(t *testing.T, dir string) string {
			img := converted("qcow2", "cluster_size=4096", false)(t, dir)
			qemutest.Img(t, "snapshot", "-c", "s1", img)
			qemutest.Script(t, "qcow2", img, qemutest.Pattern(4*interopKiB, 3*interopMiB, 1)...)
			qemutest.Img(t, "snapshot", "-c", "s2", img)
			qemutest.Script(t, "qcow2", img, qemutest.Pattern(4*interopKiB, 3*interopMiB, 2)...)
			return img
		}},
		{"prealloc-metadata", empty("qcow2", "preallocation=metadata", 64*interopKiB, 4*interopMiB)},
		{"prealloc-falloc", empty("qcow2", "preallocation=falloc,cluster_size=4096", 4*interopKiB, 2*interopMiB)},
		{"refcount-bits-1", empty("qcow2", "refcount_bits=1,cluster_size=4096", 4*interopKiB, 4*interopMiB)},
		{"refcount-bits-64", empty("qcow2", "refcount_bits=64,cluster_size=4096", 4*interopKiB, 4*interopMiB)},
		{"lazy-refcounts-dirty", func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img"), "qcow2", "lazy_refcounts=on,cluster_size=4096", 4*interopMiB)
			args := []string{"-f", "qcow2"}
			for _, c := range append(qemutest.Pattern(4*interopKiB, 4*interopMiB, 0), "flush", "write -P 0x99 1M 64k", "sigraise 9") {
				args = append(args, "-c", c)
			}
			if code, out := qemutest.RunIO(t, append(args, img)...); code == 0 {
				t.Fatalf("qemu-io was not killed:\n%s", out)
			}
			if !qemutest.Info(t, img).DirtyFlag {
				t.Fatal("qemu left no dirty flag: the case tests nothing")
			}
			return img
		}},
		{"data-file", func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img"), "qcow2", "data_file="+filepath.Join(dir, "img.data"), 4*interopMiB)
			qemutest.Script(t, "qcow2", img, qemutest.Pattern(64*interopKiB, 4*interopMiB, 0)...)
			return img
		}},
		{"sparse-64G", func(t *testing.T, dir string) string {
			size := 64 * interopGiB
			img := qemutest.Create(t, filepath.Join(dir, "img"), "qcow2", "", size)
			qemutest.Script(t, "qcow2", img, qemutest.Pattern(64*interopKiB, size, 1)...)
			return img
		}},
	}
}

// TestInteropCLIConvertCheck: on images made by qemu, `crashtest convert -O
// raw` writes exactly what `qemu-img convert -O raw` writes, and `crashtest
// check` exits like `qemu-img check` (which cannot check version 1 images:
// there ours must find them clean).
func TestInteropCLIConvertCheck(t *testing.T) {
	qemutest.Require(t)
	for _, tc := range interopImages() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img := tc.build(t, dir)

			ours, theirs := filepath.Join(dir, "ours.raw"), filepath.Join(dir, "theirs.raw")
			if code, out := interopCLI("convert", "-O", "raw", img, ours); code != 0 {
				t.Fatalf("crashtest convert: exit %d\n%s", code, out)
			}
			qemutest.ConvertRaw(t, img, theirs)
			interopSameRaw(t, ours, theirs)

			want, qout := qemutest.Check(t, img)
			if want == 63 {
				want = 0 // qemu-img: "This image format does not support checks"
			}
			if code, out := interopCLI("check", img); code != want {
				t.Errorf("crashtest check: exit %d, qemu-img check: exit %d\ncrashtest:\n%s\nqemu-img:\n%s", code, want, out, qout)
			}
		})
	}
}

// interopSameRaw fails unless the raw files a and b have the same size and
// bytes. Files larger than 256 MiB are compared on the union of their data
// extents (SEEK_DATA); elsewhere both are holes.
func interopSameRaw(t *testing.T, a, b string) {
	t.Helper()
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	sa, err := fa.Stat()
	if err != nil {
		t.Fatal(err)
	}
	sb, err := fb.Stat()
	if err != nil {
		t.Fatal(err)
	}
	size := sa.Size()
	if size != sb.Size() {
		t.Fatalf("crashtest convert wrote %d bytes, qemu-img convert %d", size, sb.Size())
	}
	ranges := [][2]int64{{0, size}}
	if size > 256*interopMiB {
		ranges = append(interopDataExtents(t, fa, size), interopDataExtents(t, fb, size)...)
		sort.Slice(ranges, func(i, j int) bool { return ranges[i][0] < ranges[j][0] })
		var total int64
		for _, r := range ranges {
			total += r[1]
		}
		if total > 256*interopMiB {
			t.Fatalf("sparse outputs hold %d bytes of data", total)
		}
	}
	const chunk = 4 * interopMiB
	x, y := make([]byte, chunk), make([]byte, chunk)
	for _, r := range ranges {
		for off := r[0]; off < r[0]+r[1]; off += chunk {
			n := min(chunk, r[0]+r[1]-off)
			if _, err := fa.ReadAt(x[:n], off); err != nil && !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			if _, err := fb.ReadAt(y[:n], off); err != nil && !errors.Is(err, io.EOF) {
				t.Fatal(err)
			}
			if !bytes.Equal(x[:n], y[:n]) {
				i := 0
				for x[i] == y[i] {
					i++
				}
				t.Fatalf("crashtest convert output differs from qemu-img convert at offset %d (%#x): %#02x, qemu %#02x",
					off+int64(i), off+int64(i), x[i], y[i])
			}
		}
	}
}

// interopDataExtents lists the data extents of f (SEEK_DATA/SEEK_HOLE).
func interopDataExtents(t *testing.T, f *os.File, size int64) [][2]int64 {
	t.Helper()
	var out [][2]int64
	fd := int(f.Fd())
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: no more data
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("SEEK_HOLE: %v", err)
		}
		out = append(out, [2]int64{d, h - d})
		off = h
	}
	return out
}

// q2file gives raw access to the tables of a QCOW2 image so a test can
// damage one field.
type q2file struct {
	t          *testing.T
	f          *os.File
	cs         int64
	order      uint32 // refcount_order
	rtOff      int64
	l1Off      int64
	entryBytes int64 // 8, or 16 with extended L2 entries
}

func openQ2(t *testing.T, path string) *q2file {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	var h [112]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		t.Fatal(err)
	}
	be := binary.BigEndian
	q := &q2file{t: t, f: f, cs: 1 << be.Uint32(h[20:]), order: 4,
		rtOff: int64(be.Uint64(h[48:])), l1Off: int64(be.Uint64(h[40:])), entryBytes: 8}
	if be.Uint32(h[4:]) >= 3 {
		q.order = be.Uint32(h[96:])
		if be.Uint64(h[72:])&(1<<4) != 0 {
			q.entryBytes = 16
		}
	}
	return q
}

func (q *q2file) u64(off int64) uint64 {
	var b [8]byte
	if _, err := q.f.ReadAt(b[:], off); err != nil {
		q.t.Fatalf("read at %d: %v", off, err)
	}
	return binary.BigEndian.Uint64(b[:])
}

func (q *q2file) put64(off int64, v uint64) {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := q.f.WriteAt(b[:], off); err != nil {
		q.t.Fatalf("write at %d: %v", off, err)
	}
}

// firstData returns the file offset of the first L2 entry (under L1 entry
// 0) that maps a normal data cluster, and the entry.
func (q *q2file) firstData() (at int64, entry uint64) {
	l2 := int64(q.u64(q.l1Off) & 0x00fffffffffffe00)
	if l2 == 0 {
		q.t.Fatal("L1 entry 0 is empty")
	}
	for i := int64(0); i < q.cs/q.entryBytes; i++ {
		e := q.u64(l2 + i*q.entryBytes)
		if e&(1<<62) == 0 && e&0x00fffffffffffe00 != 0 {
			return l2 + i*q.entryBytes, e
		}
	}
	q.t.Fatal("no data cluster under L1 entry 0")
	return 0, 0
}

// refcountAt returns the file offset of the (first) byte holding cluster
// c's refcount, and false if no refcount block covers c.
func (q *q2file) refcountAt(c int64) (off int64, ok bool) {
	bits := int64(1) << q.order
	perBlock := q.cs * 8 / bits
	rte := q.u64(q.rtOff+8*(c/perBlock)) &^ 0x1ff
	if rte == 0 {
		return 0, false
	}
	return int64(rte) + (c%perBlock)*bits/8, true
}

// setRefcount sets cluster c's refcount to v.
func (q *q2file) setRefcount(c int64, v uint64) {
	off, ok := q.refcountAt(c)
	if !ok {
		q.t.Fatalf("no refcount block covers cluster %d", c)
	}
	bits := int64(1) << q.order
	if bits >= 8 {
		b := make([]byte, 8)
		binary.BigEndian.PutUint64(b, v)
		if _, err := q.f.WriteAt(b[8-bits/8:], off); err != nil {
			q.t.Fatal(err)
		}
		return
	}
	var b [1]byte
	if _, err := q.f.ReadAt(b[:], off); err != nil {
		q.t.Fatal(err)
	}
	// Sub-byte refcounts are packed from the least significant bit.
	shift := uint((c * bits) % 8)
	mask := byte(1<<bits-1) << shift
	b[0] = b[0]&^mask | byte(v)<<shift&mask
	if _, err := q.f.WriteAt(b[:], off); err != nil {
		q.t.Fatal(err)
	}
}

// TestInteropCLICheckPoked damages one field of images made by qemu (of
// every refcount width, version 2 and 3, extended L2) and requires that
// `crashtest check` exits like `qemu-img check`: 2 for corruption, 3 for
// leaks only.
func TestInteropCLICheckPoked(t *testing.T) {
	qemutest.Require(t)
	type base struct {
		name, opts string
	}
	bases := []base{
		{"v2", "compat=0.10"},
		{"v3-512", "cluster_size=512"},
		{"v3-extl2", "extended_l2=on"},
	}
	for _, bits := range []int{1, 2, 4, 8, 16, 32, 64} {
		bases = append(bases, base{fmt.Sprintf("refcount-bits-%d", bits), fmt.Sprintf("cluster_size=4096,refcount_bits=%d", bits)})
	}
	pokes := []struct {
		name string
		want int
		// poke damages the image; it returns false if the damage cannot
		// be made in this image.
		poke func(q *q2file) bool
	}{
		{"refcount-zero-data-cluster", 2, func(q *q2file) bool {
			_, e := q.firstData()
			q.setRefcount(int64(e&0x00fffffffffffe00)/q.cs, 0)
			return true
		}},
		{"refcount-raise-header", 3, func(q *q2file) bool {
			if q.order == 0 {
				return false // a 1-bit refcount cannot exceed 1
			}
			q.setRefcount(0, 2)
			return true
		}},
		{"refcount-unused-cluster", 3, func(q *q2file) bool {
			st, err := q.f.Stat()
			if err != nil {
				q.t.Fatal(err)
			}
			c := (st.Size() + q.cs - 1) / q.cs
			if _, ok := q.refcountAt(c); !ok {
				return false
			}
			if err := q.f.Truncate((c + 1) * q.cs); err != nil {
				q.t.Fatal(err)
			}
			q.setRefcount(c, 1)
			return true
		}},
		{"l2-reserved-bit", 2, func(q *q2file) bool {
			at, e := q.firstData()
			q.put64(at, e|1<<1)
			return true
		}},
		{"l2-unaligned", 2, func(q *q2file) bool {
			if q.cs == 512 {
				return false
			}
			at, e := q.firstData()
			q.put64(at, e|512)
			return true
		}},
		{"l2-copied-cleared", 2, func(q *q2file) bool {
			at, e := q.firstData()
			q.put64(at, e&^(1<<63))
			return true
		}},
		{"l1-copied-cleared", 2, func(q *q2file) bool {
			q.put64(q.l1Off, q.u64(q.l1Off)&^(1<<63))
			return true
		}},
		{"l2-beyond-eof", 2, func(q *q2file) bool {
			at, e := q.firstData()
			q.put64(at, e&^0x00fffffffffffe00|uint64(1<<40))
			return true
		}},
		{"leak-and-corruption", 2, func(q *q2file) bool {
			if q.order == 0 {
				return false
			}
			q.setRefcount(0, 2)
			at, e := q.firstData()
			q.put64(at, e|1<<1)
			return true
		}},
	}
	for _, b := range bases {
		for _, p := range pokes {
			t.Run(b.name+"/"+p.name, func(t *testing.T) {
				t.Parallel()
				img := qemutest.Create(t, filepath.Join(t.TempDir(), "img.qcow2"), "qcow2", b.opts, 2*interopMiB)
				qemutest.Script(t, "qcow2", img, "write -P 0x11 0 64k", "write -P 0x22 1M 8k")
				if code, out := qemutest.Check(t, img); code != 0 {
					t.Fatalf("qemu-img check of the undamaged image: exit %d\n%s", code, out)
				}
				if code, out := interopCLI("check", img); code != 0 {
					t.Fatalf("crashtest check of the undamaged image: exit %d\n%s", code, out)
				}
				if !p.poke(openQ2(t, img)) {
					t.Skipf("%s cannot be made in a %s image", p.name, b.name)
				}
				want, qout := qemutest.Check(t, img)
				if want != p.want {
					t.Fatalf("test setup: qemu-img check exit %d, want %d\n%s", want, p.want, qout)
				}
				if code, out := interopCLI("check", img); code != want {
					t.Errorf("crashtest check: exit %d, qemu-img check: exit %d\ncrashtest:\n%s\nqemu-img:\n%s", code, want, out, qout)
				}
			})
		}
	}
}
