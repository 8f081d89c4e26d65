package qcow_test

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

const (
	benchSize    = 256 << 20 // virtual size of the benchmark image
	benchCluster = 64 << 10
	benchBlock   = 4096
	benchSeed    = 42
)

// benchImage makes a fully allocated QCOW2 image of benchSize bytes with
// 64 KiB clusters from seeded random data (qemu-img convert -S 0, so no
// cluster is left out as zero) and opens it through the reader.
func benchImage(b *testing.B) *qcow.Image {
	b.Helper()
	qemutest.Require(b)
	dir := b.TempDir()
	src := filepath.Join(dir, "src.raw")
	f, err := os.Create(src)
	if err != nil {
		b.Fatal(err)
	}
	r := rand.NewChaCha8([32]byte{benchSeed})
	buf := make([]byte, 4<<20)
	for range benchSize / len(buf) {
		r.Read(buf)
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	img := filepath.Join(dir, "bench.qcow2")
	qemutest.Img(b, "convert", "-S", "0", "-O", "qcow2", "-o", "cluster_size=65536", src, img)
	if err := os.Remove(src); err != nil {
		b.Fatal(err)
	}
	im, err := qcow.Open(vfs.OS, img, nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { im.Close() })
	if im.ClusterSize() != benchCluster || im.Size() != benchSize {
		b.Fatalf("bench image: cluster size %d, size %d", im.ClusterSize(), im.Size())
	}
	return im
}

// BenchmarkReadSeq4K reads the image 4 KiB at a time from start to end,
// wrapping around.
func BenchmarkReadSeq4K(b *testing.B) {
	im := benchImage(b)
	p := make([]byte, benchBlock)
	b.SetBytes(benchBlock)
	off := int64(0)
	for b.Loop() {
		if _, err := im.ReadAt(p, off); err != nil {
			b.Fatal(err)
		}
		off = (off + benchBlock) % benchSize
	}
}

// BenchmarkReadRand4K reads 4 KiB blocks at 4 KiB-aligned offsets drawn
// from a seeded PCG.
func BenchmarkReadRand4K(b *testing.B) {
	im := benchImage(b)
	p := make([]byte, benchBlock)
	r := rand.New(rand.NewPCG(benchSeed, 0))
	b.SetBytes(benchBlock)
	for b.Loop() {
		off := r.Int64N(benchSize/benchBlock) * benchBlock
		if _, err := im.ReadAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
}
