package qemutest

import (
	"bytes"
	"compress/flate"
	"fmt"
	"strings"
	"testing"
)

func TestRandomData(t *testing.T) {
	for _, size := range []int64{0, 1, 4095, 4097, 1000005} {
		a, b := RandomData(size, 7), RandomData(size, 7)
		if int64(len(a)) != size || !bytes.Equal(a, b) {
			t.Fatalf("RandomData(%d, 7): len %d, deterministic %v", size, len(a), bytes.Equal(a, b))
		}
	}
	a, b := RandomData(1<<20, 1), RandomData(1<<20, 2)
	if bytes.Equal(a, b) {
		t.Fatal("seeds 1 and 2 give the same data")
	}
	// Mixed content: some all-zero blocks, some compressible, not all.
	zero := 0
	for off := 0; off < len(a); off += 4096 {
		if bytes.Count(a[off:off+4096], []byte{0}) == 4096 {
			zero++
		}
	}
	var z bytes.Buffer
	w, _ := flate.NewWriter(&z, flate.BestSpeed)
	w.Write(a)
	w.Close()
	if zero == 0 || zero == len(a)/4096 || z.Len() > len(a)*3/4 || z.Len() < len(a)/8 {
		t.Errorf("RandomData: %d of %d blocks zero, compresses to %d of %d bytes", zero, len(a)/4096, z.Len(), len(a))
	}
}

func TestFill(t *testing.T) {
	for _, n := range []int{0, 1, 2, 3, 511, 512, 513} {
		p := make([]byte, n+1)
		fill(p[:n], 0xab)
		if bytes.Count(p[:n], []byte{0xab}) != n || p[n] != 0 {
			t.Fatalf("fill(%d) = %x", n, p)
		}
	}
}

// TestPattern: every command fits in the disk, and the kinds of write the
// interop tests rely on are all there on a roomy disk.
func TestPattern(t *testing.T) {
	for _, cs := range []int64{512, 4096, 65536, 2 << 20} {
		for _, size := range []int64{1000448, 4 << 20, 64 << 30} {
			for layer := range int64(3) {
				cmds := Pattern(cs, size, layer)
				for _, c := range cmds {
					f := strings.Fields(c)
					var off, n int64
					if _, err := fmt.Sscan(f[len(f)-2]+" "+f[len(f)-1], &off, &n); err != nil {
						t.Fatalf("%q: %v", c, err)
					}
					if off < 0 || n <= 0 || off+n > size {
						t.Errorf("Pattern(%d, %d, %d): %q does not fit", cs, size, layer, c)
					}
				}
				if size >= 16*cs {
					all := strings.Join(cmds, "\n")
					for _, want := range []string{"write -P", "write -z ", "write -z -u", "discard"} {
						if !strings.Contains(all, want) {
							t.Errorf("Pattern(%d, %d, %d) has no %q", cs, size, layer, want)
						}
					}
				}
			}
		}
	}
}
