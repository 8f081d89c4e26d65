package qcow_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

const (
	iKiB = int64(1) << 10
	iMiB = int64(1) << 20
	iGiB = int64(1) << 30
)

// interopCase builds an image (and its backing files) with qemu-img and
// qemu-io in dir and returns the path of the image to read.
type interopCase struct {
	name  string
	build func(t *testing.T, dir string) string
}

// TestInteropRead reads every image of the matrix through qcow.Open and
// compares it with qemu's own view: the whole virtual disk against
// `qemu-img convert -O raw`, Info against `qemu-img info`, BlockStatus
// against the raw output and `qemu-img map`.
func TestInteropRead(t *testing.T) {
	qemutest.Require(t)
	for _, tc := range interopCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			img := tc.build(t, t.TempDir())
			verifyAgainstQemu(t, img)
		})
	}
}

// qemuConvert runs `qemu-img convert [-c] -O format [-o opts] src dst`.
func qemuConvert(t *testing.T, src, dst, format, opts string, compress bool) string {
	t.Helper()
	args := []string{"convert"}
	if compress {
		args = append(args, "-c")
	}
	args = append(args, "-O", format)
	if opts != "" {
		args = append(args, "-o", opts)
	}
	qemutest.Img(t, append(args, src, dst)...)
	return dst
}

// interopRaw writes a raw file of seeded pseudo-random, partly compressible
// data; the seed is logged.
func interopRaw(t *testing.T, path string, size int64) string {
	t.Helper()
	qemutest.WriteRandomRaw(t, path, size, qemutest.Seed(t, t.Name()+"/"+filepath.Base(path)))
	return path
}

// qemuIO runs the qemu-io commands cmds on img in one qemu-io process.
func qemuIO(t *testing.T, format, img string, cmds ...string) {
	t.Helper()
	qemutest.Script(t, format, img, cmds...)
}

// interopCompressedWrites returns qemu-io commands writing compressed clusters
// (cluster-aligned, whole clusters) and then partial writes over some of
// them, which makes qemu decompress and rewrite them.
func interopCompressedWrites(cs, size int64) []string {
	var cmds []string
	for i, c := range []int64{2, 4, 8, 14, 15, 16} {
		if (c+1)*cs <= size {
			cmds = append(cmds, fmt.Sprintf("write -c -P 0x%02x %d %d", 0x40+i, c*cs, cs))
		}
	}
	if 5*cs <= size {
		cmds = append(cmds, fmt.Sprintf("write -P 0xe1 %d %d", 4*cs+100, 200))
	}
	if 16*cs <= size {
		cmds = append(cmds, fmt.Sprintf("write -z %d %d", 15*cs, cs))
	}
	return cmds
}

// interopSubclusterWrites returns qemu-io commands that touch parts of the 32
// subclusters of an extended-L2 cluster: partial subcluster writes (which
// copy the rest of the subcluster from the backing file), zero and
// discarded subclusters.
func interopSubclusterWrites(cs, size int64) []string {
	sc := cs / 32
	var cmds []string
	add := func(cmd string, off, n int64) {
		if off+n <= size {
			cmds = append(cmds, fmt.Sprintf("%s %d %d", cmd, off, n))
		}
	}
	add("write -P 0xb1", sc+sc/3, sc/4)             // inside subcluster 1
	add("write -P 0xb2", 3*sc-100, 300)             // straddles subclusters 2/3
	add("write -z", 5*sc, 2*sc)                     // zero subclusters 5, 6
	add("write -P 0xb3", 10*sc, 3*sc)               // whole subclusters
	add("write -z -u", 11*sc, sc)                   // unmap one of them
	add("discard", 12*sc, sc)                       // discard one subcluster
	add("write -P 0xb4", cs+31*sc+10, sc)           // straddles into the next cluster
	add("write -z", 2*cs+7*sc+1, sc)                // unaligned zero write
	add("write -P 0xb5", 4*cs, cs)                  // whole cluster
	add("write -P 0xb6", 6*cs+sc/2, 30*sc)          // most of a cluster
	add("write -P 0xb7", size-sc-sc/2, sc+sc/2)     // end of the disk
	add("write -z", size/2+sc/2, cs)                // zero write over two clusters
	add("write -P 0xb8", size/2+cs+5*sc+17, 2*sc+1) // partial subclusters
	return cmds
}

func interopCases() []interopCase {
	var cases []interopCase
	add := func(name string, build func(t *testing.T, dir string) string) {
		cases = append(cases, interopCase{name, build})
	}
	// Versions x cluster sizes, patterns on an empty image.
	for _, v := range []struct{ name, opts string }{{"v2", "compat=0.10"}, {"v3", "compat=1.1"}} {
		for _, cs := range []int64{512, 4 * iKiB, 64 * iKiB, 2 * iMiB} {
			size := 4 * iMiB
			if cs == 2*iMiB {
				size = 24 * iMiB
			}
			add(fmt.Sprintf("%s/cluster-%d", v.name, cs), func(t *testing.T, dir string) string {
				img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", fmt.Sprintf("%s,cluster_size=%d", v.opts, cs), size)
				qemuIO(t, "qcow2", img, qemutest.Pattern(cs, size, 0)...)
				return img
			})
		}
	}
	add("v1/patterns", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow"), "qcow", "", 4*iMiB)
		qemuIO(t, "qcow", img, qemutest.Pattern(4*iKiB, 4*iMiB, 0)...)
		return img
	})

	// Rich data: a seeded random raw file converted into each format, then
	// patterns written over it.
	for _, f := range []struct {
		name, format, opts string
		cs                 int64
	}{
		{"v1", "qcow", "", 4 * iKiB},
		{"v2-4k", "qcow2", "compat=0.10,cluster_size=4096", 4 * iKiB},
		{"v3-512", "qcow2", "compat=1.1,cluster_size=512", 512},
		{"v3-64k", "qcow2", "compat=1.1", 64 * iKiB},
		{"v3-2M", "qcow2", "compat=1.1,cluster_size=2M", 2 * iMiB},
		{"v3-extl2-64k", "qcow2", "compat=1.1,extended_l2=on", 64 * iKiB},
	} {
		add("random/"+f.name, func(t *testing.T, dir string) string {
			size := 6 * iMiB
			if f.cs == 2*iMiB {
				size = 24 * iMiB
			}
			src := interopRaw(t, filepath.Join(dir, "src.raw"), size)
			img := qemuConvert(t, src, filepath.Join(dir, "img"), f.format, f.opts, false)
			qemuIO(t, f.format, img, qemutest.Pattern(f.cs, size, 1)...)
			return img
		})
	}

	// Compressed clusters: qemu-img convert -c, and qemu-io write -c.
	for _, c := range []struct {
		name, format, opts string
		cs                 int64
	}{
		{"v1", "qcow", "", 4 * iKiB},
		{"v2-zlib", "qcow2", "compat=0.10", 64 * iKiB},
		{"v3-zlib-4k", "qcow2", "compat=1.1,cluster_size=4096", 4 * iKiB},
		{"v3-zlib-512", "qcow2", "compat=1.1,cluster_size=512", 512},
		{"v3-zstd", "qcow2", "compat=1.1,compression_type=zstd", 64 * iKiB},
		{"v3-zstd-512", "qcow2", "compat=1.1,compression_type=zstd,cluster_size=512", 512},
		{"v3-zstd-2M", "qcow2", "compat=1.1,compression_type=zstd,cluster_size=2M", 2 * iMiB},
	} {
		add("compressed-convert/"+c.name, func(t *testing.T, dir string) string {
			size := 3*iMiB + 512
			switch c.cs {
			case 512: // qemu compresses 512-byte clusters slowly
				size = iMiB + 512
			case 2 * iMiB:
				size = 8 * iMiB
			}
			src := interopRaw(t, filepath.Join(dir, "src.raw"), size)
			img := qemuConvertCompressed(t, src, filepath.Join(dir, "img"), c.format, c.opts)
			interopHasCompressed(t, img)
			// Partial overwrites of compressed clusters.
			qemuIO(t, c.format, img, fmt.Sprintf("write -P 0x3e %d %d", c.cs/2, c.cs), fmt.Sprintf("write -z %d %d", 3*c.cs+7, 99))
			return img
		})
		if c.format == "qcow" {
			continue
		}
		add("compressed-write/"+c.name, func(t *testing.T, dir string) string {
			size := 4 * iMiB
			if c.cs == 2*iMiB {
				size = 40 * iMiB
			}
			img := qemutest.Create(t, filepath.Join(dir, "img"), c.format, c.opts, size)
			qemuIO(t, c.format, img, interopCompressedWrites(c.cs, size)...)
			interopHasCompressed(t, img)
			return img
		})
	}
	add("compressed-write/v1", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, filepath.Join(dir, "img"), "qcow", "", 4*iMiB)
		qemuIO(t, "qcow", img, interopCompressedWrites(4*iKiB, 4*iMiB)...)
		interopHasCompressed(t, img)
		return img
	})
	add("compressed-convert/v3-zstd-from-qcow2", func(t *testing.T, dir string) string {
		src := interopRaw(t, filepath.Join(dir, "src.raw"), 2*iMiB)
		mid := qemuConvert(t, src, filepath.Join(dir, "mid.qcow2"), "qcow2", "compat=0.10,cluster_size=4096", false)
		qemuIO(t, "qcow2", mid, qemutest.Pattern(4*iKiB, 2*iMiB, 2)...)
		img := qemuConvert(t, mid, filepath.Join(dir, "img.qcow2"), "qcow2", "compression_type=zstd,cluster_size=8192", true)
		interopHasCompressed(t, img)
		return img
	})

	// Zero clusters and discard in v3, with and without a backing file.
	add("zero/v3-plain-and-allocated", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "compat=1.1", 4*iMiB)
		qemuIO(t, "qcow2", img,
			"write -P 0x61 0 256k", "write -z 0 64k", // zero-allocated
			"write -z -u 64k 64k",                    // zero-plain from data
			"write -z 1M 128k",                       // zero-plain on unallocated
			"discard 128k 64k",                       // discard
			"write -P 0x62 2M 64k", "write -z 2M 4k") // partial zero: data
		interopMapHas(t, img, 0, true, true)        // zero-allocated: a zero cluster with an offset
		interopMapHas(t, img, 1*iMiB, true, false)  // zero-plain
		interopMapHas(t, img, 64*iKiB, true, false) // zero-plain, from data
		return img
	})
	add("zero/v3-over-backing", func(t *testing.T, dir string) string {
		base := interopRaw(t, filepath.Join(dir, "base.raw"), 4*iMiB)
		qemuConvert(t, base, filepath.Join(dir, "base.qcow2"), "qcow2", "", false)
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "compat=1.1", 0, "-b", "base.qcow2", "-F", "qcow2")
		qemuIO(t, "qcow2", img, "write -z 0 128k", "write -P 0x71 1M 64k", "write -z 1M 64k", "discard 2M 64k", "write -z -u 3M 64k")
		return img
	})
	add("zero/v2-over-backing", func(t *testing.T, dir string) string {
		interopRaw(t, filepath.Join(dir, "base.raw"), 4*iMiB)
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "compat=0.10", 0, "-b", "base.raw", "-F", "raw")
		qemuIO(t, "qcow2", img, "write -z 0 128k", "write -P 0x71 1M 64k", "write -z 1M 64k", "discard 1M 64k", "discard 2M 64k")
		return img
	})

	// Backing chains.
	add("backing/raw-qcow2-qcow2", func(t *testing.T, dir string) string {
		size := 4 * iMiB
		interopRaw(t, filepath.Join(dir, "base.raw"), size)
		mid := qemutest.Create(t, filepath.Join(dir, "mid.qcow2"), "qcow2", "compat=0.10", 0, "-b", "base.raw", "-F", "raw")
		qemuIO(t, "qcow2", mid, qemutest.Pattern(64*iKiB, size, 1)...)
		top := qemutest.Create(t, filepath.Join(dir, "top.qcow2"), "qcow2", "cluster_size=4096", 0, "-b", "mid.qcow2", "-F", "qcow2")
		qemuIO(t, "qcow2", top, qemutest.Pattern(4*iKiB, size, 2)...)
		return top
	})
	add("backing/raw-qcow", func(t *testing.T, dir string) string {
		size := 4 * iMiB
		interopRaw(t, filepath.Join(dir, "base.raw"), size)
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow"), "qcow", "", 0, "-b", "base.raw", "-F", "raw")
		qemuIO(t, "qcow", img, qemutest.Pattern(4*iKiB, size, 1)...)
		return img
	})
	add("backing/qcow-qcow2-qcow", func(t *testing.T, dir string) string {
		size := 2 * iMiB
		src := interopRaw(t, filepath.Join(dir, "src.raw"), size)
		base := qemuConvert(t, src, filepath.Join(dir, "base.qcow"), "qcow", "", false)
		qemuIO(t, "qcow", base, qemutest.Pattern(4*iKiB, size, 0)...)
		mid := qemutest.Create(t, filepath.Join(dir, "mid.qcow2"), "qcow2", "cluster_size=512", 0, "-b", "base.qcow", "-F", "qcow")
		qemuIO(t, "qcow2", mid, qemutest.Pattern(512, size, 1)...)
		top := qemutest.Create(t, filepath.Join(dir, "top.qcow"), "qcow", "", 0, "-b", "mid.qcow2", "-F", "qcow2")
		qemuIO(t, "qcow", top, qemutest.Pattern(4*iKiB, size, 2)...)
		return top
	})
	add("backing/relative-subdirs", func(t *testing.T, dir string) string {
		for _, d := range []string{"base", "over"} {
			if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		src := interopRaw(t, filepath.Join(dir, "src.raw"), 3*iMiB)
		qemuConvert(t, src, filepath.Join(dir, "base", "base.qcow2"), "qcow2", "", false)
		img := qemutest.Create(t, filepath.Join(dir, "over", "over.qcow2"), "qcow2", "", 0, "-b", "../base/base.qcow2", "-F", "qcow2")
		qemuIO(t, "qcow2", img, qemutest.Pattern(64*iKiB, 3*iMiB, 1)...)
		return img
	})
	add("backing/absolute-no-format", func(t *testing.T, dir string) string {
		src := interopRaw(t, filepath.Join(dir, "src.raw"), 3*iMiB)
		base := qemuConvert(t, src, filepath.Join(dir, "base.qcow2"), "qcow2", "", false)
		img := qemutest.Create(t, filepath.Join(dir, "over.qcow2"), "qcow2", "", 0, "-b", base, "-F", "qcow2")
		// Drop the backing format extension: the reader must probe.
		interopDropBackingFormat(t, img)
		if f := qemutest.Info(t, img).BackingFormat; f != "" {
			t.Fatalf("backing format still %q", f)
		}
		qemuIO(t, "qcow2", img, qemutest.Pattern(64*iKiB, 3*iMiB, 1)...)
		return img
	})
	add("backing/smaller-raw-odd-size", func(t *testing.T, dir string) string {
		interopRaw(t, filepath.Join(dir, "base.raw"), 1000005)
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "", 3*iMiB, "-b", "base.raw", "-F", "raw")
		qemuIO(t, "qcow2", img, "write -P 0x21 960k 64k", "write -P 0x22 2M 100")
		return img
	})
	add("backing/smaller-qcow2", func(t *testing.T, dir string) string {
		src := interopRaw(t, filepath.Join(dir, "src.raw"), iMiB+512)
		qemuConvert(t, src, filepath.Join(dir, "base.qcow2"), "qcow2", "cluster_size=4096", false)
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "extended_l2=on", 4*iMiB, "-b", "base.qcow2", "-F", "qcow2")
		qemuIO(t, "qcow2", img, interopSubclusterWrites(64*iKiB, 4*iMiB)...)
		return img
	})

	// Internal snapshots: the active L1 is read, clusters are shared.
	for _, v := range []string{"0.10", "1.1"} {
		add("snapshots/compat-"+v, func(t *testing.T, dir string) string {
			size := 4 * iMiB
			src := interopRaw(t, filepath.Join(dir, "src.raw"), size)
			img := qemuConvert(t, src, filepath.Join(dir, "img.qcow2"), "qcow2", "compat="+v+",cluster_size=4096", false)
			qemutest.Img(t, "snapshot", "-c", "s1", img)
			qemuIO(t, "qcow2", img, qemutest.Pattern(4*iKiB, size, 1)...)
			qemutest.Img(t, "snapshot", "-c", "s2", img)
			qemuIO(t, "qcow2", img, qemutest.Pattern(4*iKiB, size, 2)...)
			qemutest.Img(t, "snapshot", "-c", "s3", img)
			qemutest.Img(t, "snapshot", "-d", "s2", img)
			return img
		})
	}
	add("snapshots/applied", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "", 4*iMiB)
		qemuIO(t, "qcow2", img, qemutest.Pattern(64*iKiB, 4*iMiB, 0)...)
		qemutest.Img(t, "snapshot", "-c", "s1", img)
		qemuIO(t, "qcow2", img, qemutest.Pattern(64*iKiB, 4*iMiB, 3)...)
		qemutest.Img(t, "snapshot", "-a", "s1", img)
		qemuIO(t, "qcow2", img, "write -P 0x5f 100k 10k")
		return img
	})

	// Preallocation.
	for _, p := range []string{"metadata", "falloc", "full"} {
		add("prealloc/"+p, func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "cluster_size=4096,preallocation="+p, 4*iMiB)
			qemuIO(t, "qcow2", img, qemutest.Pattern(4*iKiB, 4*iMiB, 0)...)
			return img
		})
	}
	add("prealloc/metadata-v2", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "compat=0.10,preallocation=metadata", 4*iMiB)
		qemuIO(t, "qcow2", img, qemutest.Pattern(64*iKiB, 4*iMiB, 1)...)
		return img
	})

	// Extended L2 entries (subclusters), alone and over a backing file.
	for _, cs := range []int64{64 * iKiB, 2 * iMiB} {
		size := 4 * iMiB
		if cs == 2*iMiB {
			size = 16 * iMiB
		}
		add(fmt.Sprintf("extl2/cluster-%d", cs), func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", fmt.Sprintf("extended_l2=on,cluster_size=%d", cs), size)
			qemuIO(t, "qcow2", img, interopSubclusterWrites(cs, size)...)
			qemuIO(t, "qcow2", img, qemutest.Pattern(cs, size, 1)...)
			return img
		})
		add(fmt.Sprintf("extl2/cluster-%d-backing", cs), func(t *testing.T, dir string) string {
			src := interopRaw(t, filepath.Join(dir, "src.raw"), size)
			qemuConvert(t, src, filepath.Join(dir, "base.qcow2"), "qcow2", "", false)
			img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", fmt.Sprintf("extended_l2=on,cluster_size=%d", cs), 0, "-b", "base.qcow2", "-F", "qcow2")
			qemuIO(t, "qcow2", img, interopSubclusterWrites(cs, size)...)
			return img
		})
	}

	// Refcount widths.
	for _, bits := range []int{1, 2, 4, 8, 16, 32, 64} {
		add(fmt.Sprintf("refcount-bits/%d", bits), func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", fmt.Sprintf("refcount_bits=%d,cluster_size=4096", bits), 4*iMiB)
			qemuIO(t, "qcow2", img, qemutest.Pattern(4*iKiB, 4*iMiB, 0)...)
			if bits > 1 {
				qemutest.Img(t, "snapshot", "-c", "s1", img) // refcounts of 2
			}
			qemuIO(t, "qcow2", img, qemutest.Pattern(4*iKiB, 4*iMiB, 1)...)
			return img
		})
	}

	// Lazy refcounts, clean and dirty.
	add("lazy-refcounts/clean", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "lazy_refcounts=on", 4*iMiB)
		qemuIO(t, "qcow2", img, qemutest.Pattern(64*iKiB, 4*iMiB, 0)...)
		return img
	})
	add("lazy-refcounts/dirty", func(t *testing.T, dir string) string {
		img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "lazy_refcounts=on,cluster_size=4096", 4*iMiB)
		cmds := append(qemutest.Pattern(4*iKiB, 4*iMiB, 0), "flush")
		cmds = append(cmds, qemutest.Pattern(4*iKiB, 4*iMiB, 1)...)
		cmds = append(cmds, "sigraise 9")
		args := []string{"-f", "qcow2"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		if code, out := qemutest.RunIO(t, append(args, img)...); code == 0 {
			t.Fatalf("qemu-io was not killed by sigraise 9:\n%s", out)
		}
		if !qemutest.Info(t, img).DirtyFlag {
			t.Fatal("qemu left no dirty flag after being killed; the case tests nothing")
		}
		return img
	})

	// Virtual sizes that are not a multiple of the cluster size.
	for _, f := range []struct{ name, format, opts string }{
		{"v1", "qcow", ""},
		{"v2-4k", "qcow2", "compat=0.10,cluster_size=4096"},
		{"v3-64k", "qcow2", "compat=1.1"},
		{"v3-2M", "qcow2", "cluster_size=2M"},
		{"v3-extl2", "qcow2", "extended_l2=on"},
	} {
		add("odd-size/"+f.name, func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img"), f.format, f.opts, 1000005)
			size := qemutest.Info(t, img).VirtualSize
			cs := qemutest.Info(t, img).ClusterSize
			qemuIO(t, f.format, img, qemutest.Pattern(cs, size, 0)...)
			return img
		})
		add("odd-size-random/"+f.name, func(t *testing.T, dir string) string {
			src := interopRaw(t, filepath.Join(dir, "src.raw"), 1000005)
			return qemuConvert(t, src, filepath.Join(dir, "img"), f.format, f.opts, f.format == "qcow2")
		})
	}

	// External data file.
	for _, raw := range []string{"off", "on"} {
		add("data-file/raw-"+raw, func(t *testing.T, dir string) string {
			// qemu-img creates a relative data file name relative to its
			// working directory: give it an absolute one.
			img := qemutest.Create(t, filepath.Join(dir, "img.qcow2"), "qcow2", "data_file="+filepath.Join(dir, "img.data")+",data_file_raw="+raw, 4*iMiB)
			qemuIO(t, "qcow2", img, qemutest.Pattern(64*iKiB, 4*iMiB, 0)...)
			return img
		})
	}

	// 64 GiB sparse images: compared around the written areas only.
	for _, f := range []struct{ name, format, opts string }{
		{"v3-64k", "qcow2", ""},
		{"v3-2M-extl2", "qcow2", "cluster_size=2M,extended_l2=on"},
		{"v1", "qcow", ""},
	} {
		// qemu walks a version 1 image cluster by cluster (4 s for 64 GiB
		// in qemu-img map alone): 8 GiB is enough there.
		size := 64 * iGiB
		if f.format == "qcow" {
			size = 8 * iGiB
		}
		add(fmt.Sprintf("sparse-%dG/%s", size/iGiB, f.name), func(t *testing.T, dir string) string {
			img := qemutest.Create(t, filepath.Join(dir, "img"), f.format, f.opts, size)
			cs := qemutest.Info(t, img).ClusterSize
			cmds := append(qemutest.Pattern(cs, 16*iMiB, 0), qemutest.Pattern(cs, size, 1)...)
			for _, off := range []int64{512*iMiB - 3000, iGiB + 4095, size/2 - 10, size*3/4 + 64*iKiB} {
				cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d %d", byte(off>>20)|1, off, 9000))
			}
			qemuIO(t, f.format, img, cmds...)
			return img
		})
	}
	return cases
}

// qemuConvertCompressed is qemuConvert with -c. qemu-img 7.2 ends `convert -c -O qcow`
// with a zero-length compressed write that the qcow driver rejects: it
// exits 1 without a message after writing a complete image. That exit is
// tolerated (the image is still compared with qemu's reading of it).
func qemuConvertCompressed(t *testing.T, src, dst, format, opts string) string {
	t.Helper()
	if format != "qcow" {
		return qemuConvert(t, src, dst, format, opts, true)
	}
	code, out := qemutest.RunImg(t, "convert", "-c", "-O", format, src, dst)
	if code != 0 && (code != 1 || strings.TrimSpace(out) != "") {
		t.Fatalf("qemu-img convert -c -O qcow: exit %d\n%s", code, out)
	}
	return dst
}

// interopHasCompressed fails unless qemu-img map shows compressed data (data
// without a host offset) in img.
func interopHasCompressed(t *testing.T, img string) {
	t.Helper()
	for _, e := range qemutest.Map(t, img) {
		if e.Data && e.Depth == 0 && e.Offset == nil {
			return
		}
	}
	t.Fatalf("qemu-img map shows no compressed cluster in %s", img)
}

// interopDropBackingFormat turns the backing format header extension of a QCOW2
// image into an unknown extension, so the backing file's format must be
// probed.
func interopDropBackingFormat(t *testing.T, img string) {
	t.Helper()
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 4096)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	off := uint32(72)
	if binary.BigEndian.Uint32(b[4:]) >= 3 {
		off = binary.BigEndian.Uint32(b[100:])
	}
	for off+8 <= uint32(len(b)) {
		typ, n := binary.BigEndian.Uint32(b[off:]), binary.BigEndian.Uint32(b[off+4:])
		if typ == 0 {
			break
		}
		if typ == 0xE2792ACA {
			var x [4]byte
			binary.BigEndian.PutUint32(x[:], 0x0badf00d)
			if _, err := f.WriteAt(x[:], int64(off)); err != nil {
				t.Fatal(err)
			}
			return
		}
		off += 8 + (n+7)&^7
	}
	t.Fatalf("%s has no backing format extension", img)
}

// interopMapHas fails unless qemu-img map reports the range at off with the
// given zero flag and with (or without) a host offset: used to make sure a
// case really produces the structure it claims to test.
func interopMapHas(t *testing.T, img string, off int64, zero, hasOffset bool) {
	t.Helper()
	for _, e := range qemutest.Map(t, img) {
		if off >= e.Start && off < e.Start+e.Length {
			if !e.Present || e.Zero != zero || (e.Offset != nil) != hasOffset {
				t.Fatalf("qemu-img map of %s at %d: %+v, want present, zero=%v with offset=%v", img, off, e, zero, hasOffset)
			}
			return
		}
	}
	t.Fatalf("qemu-img map of %s does not cover %d", img, off)
}

// bsRange is one range reported by BlockStatus.
type bsRange struct {
	off, n int64
	zero   bool
}

// interopSparseLimit is the virtual size above which only the data areas (and
// samples of the zero areas) are compared.
const interopSparseLimit = 256 * iMiB

// verifyAgainstQemu compares the image read through qcow.Open with qemu's
// view of it.
func verifyAgainstQemu(t *testing.T, img string) {
	t.Helper()
	qi := qemutest.Info(t, img)
	im, err := qcow.Open(vfs.OS, img, nil)
	if err != nil {
		t.Fatalf("qcow.Open(%s): %v", img, err)
	}
	defer im.Close()
	interopCheckInfo(t, im, qi)
	if im.Size() != qi.VirtualSize {
		t.Fatalf("Size() = %d, qemu-img info says %d", im.Size(), qi.VirtualSize)
	}

	rawPath := img + ".qemu.raw"
	qemutest.ConvertRaw(t, img, rawPath)
	raw, err := os.Open(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if st, err := raw.Stat(); err != nil || st.Size() != qi.VirtualSize {
		t.Fatalf("qemu-img convert output: %v, %v bytes; want %d", err, st.Size(), qi.VirtualSize)
	}

	sts := interopBlockStatus(t, im)
	var ranges [][2]int64
	if im.Size() <= interopSparseLimit {
		ranges = [][2]int64{{0, im.Size()}}
	} else {
		ranges = interopSparseRanges(t, raw, sts, im.Size())
	}
	for _, r := range ranges {
		interopCompareRange(t, im, raw, r[0], r[1], sts)
	}
	interopCompareMap(t, im, qemutest.Map(t, img), sts)
	interopRandomReads(t, im, raw, qemutest.Seed(t, t.Name()))
}

// interopCheckInfo compares Info with `qemu-img info`.
func interopCheckInfo(t *testing.T, im *qcow.Image, qi *qemutest.ImageInfo) {
	t.Helper()
	in, err := im.Info()
	if err != nil {
		t.Fatalf("Info: %v", err)
	}
	type field struct {
		name      string
		got, want any
	}
	fields := []field{
		{"format", string(in.Format), qi.Format},
		{"version", in.Version, qi.Version()},
		{"virtual size", in.VirtualSize, qi.VirtualSize},
		{"cluster size", in.ClusterSize, qi.ClusterSize},
		{"backing file", in.BackingFile, qi.BackingFilename},
		{"backing format", in.BackingFormat, qi.BackingFormat},
		{"dirty", in.Dirty, qi.DirtyFlag},
		{"snapshots", len(in.Snapshots), len(qi.Snapshots)},
		{"ClusterSize()", im.ClusterSize(), qi.ClusterSize},
		{"Format()", string(im.Format()), qi.Format},
	}
	if qi.Format == "qcow2" {
		d := qi.FormatSpecific.Data
		fields = append(fields,
			field{"compression type", in.CompressionType, d.CompressionType},
			field{"refcount bits", in.RefcountBits, d.RefcountBits},
			field{"extended L2", in.ExtendedL2, d.ExtendedL2},
			field{"lazy refcounts", in.LazyRefcounts, d.LazyRefcounts},
			field{"corrupt", in.Corrupt, d.Corrupt},
			field{"data file", in.DataFile, d.DataFile},
		)
		for i := range min(len(in.Snapshots), len(qi.Snapshots)) {
			fields = append(fields,
				field{fmt.Sprintf("snapshot %d name", i), in.Snapshots[i].Name, qi.Snapshots[i].Name},
				field{fmt.Sprintf("snapshot %d id", i), in.Snapshots[i].ID, qi.Snapshots[i].ID})
		}
	}
	for _, f := range fields {
		if f.got != f.want {
			t.Errorf("Info %s = %v, qemu-img info says %v", f.name, f.got, f.want)
		}
	}
	if qi.BackingFilename != "" && (im.Backing() == nil || in.Backing == nil) {
		t.Errorf("image has backing file %q but no backing image was opened", qi.BackingFilename)
	}
}

// interopBlockStatus walks BlockStatus over the whole disk and checks that the
// ranges are non-empty, bounded and contiguous.
func interopBlockStatus(t *testing.T, im *qcow.Image) []bsRange {
	t.Helper()
	var sts []bsRange
	size := im.Size()
	for off := int64(0); off < size; {
		n, zero, err := im.BlockStatus(off, size-off)
		if err != nil {
			t.Fatalf("BlockStatus(%d, %d): %v", off, size-off, err)
		}
		if n <= 0 || n > size-off {
			t.Fatalf("BlockStatus(%d, %d) = length %d", off, size-off, n)
		}
		if k := len(sts); k > 0 && sts[k-1].zero == zero {
			sts[k-1].n += n
		} else {
			sts = append(sts, bsRange{off, n, zero})
		}
		off += n
	}
	if _, _, err := im.BlockStatus(size, 1); err == nil {
		t.Errorf("BlockStatus at the end of the disk (%d) did not fail", size)
	}
	return sts
}

// interopSparseRanges returns the ranges to compare on a big disk: every data area
// of qemu's raw output (SEEK_DATA), every non-zero range of BlockStatus and
// the first and last 64 KiB of every zero range, merged and sorted.
func interopSparseRanges(t *testing.T, raw *os.File, sts []bsRange, size int64) [][2]int64 {
	t.Helper()
	var rs [][2]int64
	fd := int(raw.Fd())
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: no data after off
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("SEEK_HOLE: %v", err)
		}
		rs = append(rs, [2]int64{d, h - d})
		off = h
	}
	const sample = 64 * iKiB
	var data int64
	for _, s := range sts {
		if !s.zero {
			rs = append(rs, [2]int64{s.off, s.n})
			data += s.n
			continue
		}
		rs = append(rs, [2]int64{s.off, min(s.n, sample)}, [2]int64{s.off + s.n - min(s.n, sample), min(s.n, sample)})
	}
	if data > interopSparseLimit {
		t.Fatalf("BlockStatus reports %d non-zero bytes in a sparse test image", data)
	}
	sort.Slice(rs, func(i, j int) bool { return rs[i][0] < rs[j][0] })
	var out [][2]int64
	for _, r := range rs {
		if k := len(out); k > 0 && r[0] <= out[k-1][0]+out[k-1][1] {
			out[k-1][1] = max(out[k-1][1], r[0]+r[1]-out[k-1][0])
			continue
		}
		out = append(out, r)
	}
	return out
}

// interopCompareRange reads [off, off+n) through the reader and from qemu's raw
// output in odd-sized chunks, reports the first differing offset, and checks
// that every part BlockStatus calls zero reads as zeros in qemu's output.
func interopCompareRange(t *testing.T, im *qcow.Image, raw *os.File, off, n int64, sts []bsRange) {
	t.Helper()
	const chunk = iMiB + 4099
	got := make([]byte, chunk)
	want := make([]byte, chunk)
	for pos := off; pos < off+n; pos += chunk {
		m := min(chunk, off+n-pos)
		g, w := got[:m], want[:m]
		if k, err := im.ReadAt(g, pos); k != len(g) || (err != nil && !(errors.Is(err, io.EOF) && pos+m == im.Size())) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", m, pos, k, err)
		}
		if _, err := raw.ReadAt(w, pos); err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		if !bytes.Equal(g, w) {
			i := interopFirstDiff(g, w)
			t.Fatalf("virtual disk differs from qemu-img convert at offset %d (%#x): reader %#02x, qemu %#02x; block status there: %s",
				pos+int64(i), pos+int64(i), g[i], w[i], bsRangeAt(sts, pos+int64(i)))
		}
		// Zero ranges must read as zeros.
		i := sort.Search(len(sts), func(i int) bool { return sts[i].off+sts[i].n > pos })
		for ; i < len(sts) && sts[i].off < pos+m; i++ {
			if !sts[i].zero {
				continue
			}
			a, b := max(sts[i].off, pos)-pos, min(sts[i].off+sts[i].n, pos+m)-pos
			if j := interopFirstNonZero(w[a:b]); j >= 0 {
				t.Fatalf("BlockStatus says [%d, %d) is zero, but qemu reads non-zero data at %d",
					sts[i].off, sts[i].off+sts[i].n, pos+a+int64(j))
			}
		}
	}
}

var interopZeros = make([]byte, 64*iKiB)

// interopFirstNonZero returns the index of the first non-zero byte of p, or -1.
func interopFirstNonZero(p []byte) int {
	for base := 0; base < len(p); base += len(interopZeros) {
		q := p[base:min(base+len(interopZeros), len(p))]
		if !bytes.Equal(q, interopZeros[:len(q)]) {
			for i, c := range q {
				if c != 0 {
					return base + i
				}
			}
		}
	}
	return -1
}

func interopFirstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return len(a)
}

func bsRangeAt(sts []bsRange, off int64) string {
	for _, s := range sts {
		if off >= s.off && off < s.off+s.n {
			return fmt.Sprintf("[%d, %d) zero=%v", s.off, s.off+s.n, s.zero)
		}
	}
	return "none"
}

// interopCompareMap cross-checks BlockStatus with `qemu-img map`: a range we call
// zero must be zero for qemu too; and, when no raw file is in the chain
// (qemu sees holes in raw files, we do not look), a range qemu calls zero
// without data must be zero for us.
func interopCompareMap(t *testing.T, im *qcow.Image, m []qemutest.MapEntry, sts []bsRange) {
	t.Helper()
	hasRaw := false
	for b := im; b != nil; b = b.Backing() {
		hasRaw = hasRaw || b.Format() == qcow.FormatRaw
	}
	j := 0
	for _, e := range m {
		for j < len(sts) && sts[j].off+sts[j].n <= e.Start {
			j++
		}
		for k := j; k < len(sts) && sts[k].off < e.Start+e.Length; k++ {
			s := sts[k]
			a, b := max(s.off, e.Start), min(s.off+s.n, e.Start+e.Length)
			if s.zero && !e.Zero {
				t.Errorf("BlockStatus says [%d, %d) is zero, qemu-img map says %+v", a, b, e)
			}
			if !hasRaw && e.Zero && !e.Data && !s.zero {
				t.Errorf("qemu-img map says [%d, %d) is zero without data (%+v), BlockStatus says not zero", a, b, e)
			}
		}
	}
}

// interopRandomReads compares reads at random offsets and lengths (within the
// compared areas for small disks; near data for big ones) and a read across
// the end of the disk.
func interopRandomReads(t *testing.T, im *qcow.Image, raw *os.File, seed uint64) {
	t.Helper()
	size := im.Size()
	r := rand.New(rand.NewPCG(seed, 0x1234))
	cs := max(im.ClusterSize(), 4*iKiB)
	span := min(size, 64*iMiB) // big disks: only the start, where data is
	const maxLen = 64 * iKiB
	gotBuf, wantBuf := make([]byte, maxLen), make([]byte, maxLen)
	for range 150 {
		// Lengths up to three clusters (at most 64 KiB), half of the reads
		// placed to cross a cluster boundary.
		n := 1 + r.Int64N(min(3*cs, maxLen))
		off := r.Int64N(span)
		if r.IntN(2) == 0 {
			off = max(0, off-off%cs-r.Int64N(n))
		}
		n = min(n, size-off)
		got, want := gotBuf[:n], wantBuf[:n]
		k, err := im.ReadAt(got, off)
		if k != int(n) || (err != nil && !(errors.Is(err, io.EOF) && off+n == size)) {
			t.Fatalf("ReadAt(%d bytes at %d) = %d, %v", n, off, k, err)
		}
		if _, err := raw.ReadAt(want, off); err != nil && !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			i := interopFirstDiff(got, want)
			t.Fatalf("ReadAt(%d bytes at %d) differs from qemu at offset %d", n, off, off+int64(i))
		}
	}
	// A read across the end returns the rest and io.EOF.
	p := make([]byte, 100)
	k, err := im.ReadAt(p, size-10)
	if k != 10 || !errors.Is(err, io.EOF) {
		t.Errorf("ReadAt(100 bytes at size-10) = %d, %v; want 10, io.EOF", k, err)
	}
	want := make([]byte, 10)
	if _, err := raw.ReadAt(want, size-10); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if !bytes.Equal(p[:10], want) {
		t.Errorf("last 10 bytes differ from qemu")
	}
	if k, err := im.ReadAt(p, size); k != 0 || !errors.Is(err, io.EOF) {
		t.Errorf("ReadAt at the end = %d, %v; want 0, io.EOF", k, err)
	}
}

// TestInteropRefusesEncrypted checks that images qemu encrypts are refused
// with ErrUnsupported, not misread.
func TestInteropRefusesEncrypted(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	for _, c := range []struct{ name, format, opts string }{
		{"v1-aes", "qcow", "encrypt.format=aes,encrypt.key-secret=s0"},
		{"v2-aes", "qcow2", "compat=0.10,encrypt.format=aes,encrypt.key-secret=s0"},
		{"v3-luks", "qcow2", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100"},
	} {
		t.Run(c.name, func(t *testing.T) {
			img := filepath.Join(dir, c.name)
			var code int
			var out string
			// LUKS creation times its key derivation and fails with "Unable
			// to get accurate CPU usage" on a loaded machine: retry.
			for try := 0; try < 5; try++ {
				os.Remove(img)
				code, out = qemutest.RunImg(t, "create", "-q", "--object", "secret,id=s0,data=pw", "-f", c.format, "-o", c.opts, img, "1M")
				if code == 0 || !strings.Contains(out, "accurate CPU usage") {
					break
				}
			}
			if code != 0 {
				if strings.Contains(out, "no longer supported") || strings.Contains(out, "not supported") {
					t.Skipf("this qemu-img cannot create %s: %s", c.name, out)
				}
				t.Fatalf("qemu-img create: exit %d: %s", code, out)
			}
			im, err := qcow.Open(vfs.OS, img, nil)
			if err == nil {
				im.Close()
				t.Fatalf("Open of an encrypted image succeeded")
			}
			if !errors.Is(err, qcow.ErrUnsupported) {
				t.Errorf("Open: %v, want ErrUnsupported", err)
			}
		})
	}
}
