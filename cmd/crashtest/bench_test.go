package main

import (
	"bytes"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/qcow"
)

var benchDone = regexp.MustCompile(`(?m)^Run completed in [0-9]+\.[0-9]{3} seconds\.$`)

// TestBench is a smoke test: 100 writes, each into a new cluster, with a
// pattern and periodic flushes, then 100 reads, in both cache modes; the
// image holds the pattern exactly where the requests went.
func TestBench(t *testing.T) {
	for _, mode := range []string{"writeback", "writethrough"} {
		t.Run(mode, func(t *testing.T) {
			p := newImage(t, filepath.Join(t.TempDir(), "img"), qcow.CreateOptions{Size: 16 << 20})
			r := execCLI("bench", "-w", "-c", "100", "-s", "4k", "-S", "64k", "-o", "1M", "--pattern", "0x5a",
				"--flush-interval", "64", "-t", mode, p)
			if r.code != 0 || r.stderr != "" {
				t.Fatalf("bench -w: %v", r)
			}
			want := "Sending 100 write requests, 4096 bytes each, 1 in parallel (starting at offset 1048576, step size 65536)\n" +
				"Sending flush every 64 requests\n"
			if !strings.HasPrefix(r.stdout, want) || !benchDone.MatchString(r.stdout) || strings.Count(r.stdout, "\n") != 3 {
				t.Errorf("bench -w output:\n%s\nwant it to start with:\n%s", r.stdout, want)
			}
			got := readImage(t, p, 0, 16<<20)
			for c := int64(0); c < 256; c++ {
				want := make([]byte, 65536)
				if c >= 16 && c < 116 {
					fillByte(want[:4096], 0x5a)
				}
				if !bytes.Equal(got[c<<16:(c+1)<<16], want) {
					t.Fatalf("cluster %d does not hold what the requests wrote", c)
				}
			}
			r = execCLI("bench", "-c", "100", p, "-s", "64k")
			if r.code != 0 || r.stderr != "" || !benchDone.MatchString(r.stdout) ||
				!strings.HasPrefix(r.stdout, "Sending 100 read requests, 65536 bytes each, 1 in parallel (starting at offset 0, step size 65536)\n") {
				t.Errorf("bench (read): %v", r)
			}
		})
	}
}

// TestBenchWrap: requests wrap around at the end of the disk as in
// qemu-img bench (the next offset is taken modulo the disk size).
func TestBenchWrap(t *testing.T) {
	p := newImage(t, filepath.Join(t.TempDir(), "img"), qcow.CreateOptions{Size: 64 << 10, ClusterSize: 4096})
	// Offsets 0, 24k, 48k, 72k mod 64k = 8k, 32k.
	r := execCLI("bench", "-w", "-c", "5", "-s", "1k", "-S", "24k", "--pattern", "7", p)
	if r.code != 0 {
		t.Fatalf("bench: %v", r)
	}
	got := readImage(t, p, 0, 64<<10)
	for _, off := range []int{0, 24 << 10, 48 << 10, 8 << 10, 32 << 10} {
		if !bytes.Equal(got[off:off+1024], bytes.Repeat([]byte{7}, 1024)) {
			t.Errorf("no request at offset %d", off)
		}
		clear(got[off : off+1024])
	}
	if !bytes.Equal(got, make([]byte, len(got))) {
		t.Errorf("data outside the requests at offset %d", firstDiff(got, make([]byte, len(got))))
	}
}

func TestBenchErrors(t *testing.T) {
	dir := t.TempDir()
	p := newImage(t, filepath.Join(dir, "img"), qcow.CreateOptions{Size: 1 << 20})
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"bench"}, "expected one IMAGE argument, got 0"},
		{[]string{"bench", "-c", "x", p}, "invalid request count"},
		{[]string{"bench", "-c", "-1", p}, "invalid request count"},
		{[]string{"bench", "-c", "4294967296", p}, "invalid request count"},
		{[]string{"bench", "-d", "0", p}, "invalid queue depth"},
		{[]string{"bench", "-s", "1x", p}, "invalid buffer size"},
		{[]string{"bench", "-s", "3G", p}, "must be between 0 and 2147483647"},
		{[]string{"bench", "-S", "-1", p}, "invalid step_size"},
		{[]string{"bench", "-o", "1q", p}, "invalid offset"},
		{[]string{"bench", "--pattern", "256", "-w", p}, "invalid pattern byte"},
		{[]string{"bench", "-t", "none", p}, `invalid cache mode "none"`},
		{[]string{"bench", "--flush-interval", "100", p}, "only available in write tests"},
		{[]string{"bench", "-w", "--flush-interval", "10", p}, "can't be smaller than depth"},
		{[]string{"bench", filepath.Join(dir, "missing")}, "could not open"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			wantOneLineError(t, execCLI(tc.args...), tc.want)
		})
	}
	// A request beyond the end of the disk fails the run.
	r := execCLI("bench", "-w", "-c", "3", "-o", "1020k", "-s", "8k", p)
	if r.code != 1 || !strings.Contains(r.stderr, "beyond the end of the disk") || benchDone.MatchString(r.stdout) {
		t.Errorf("bench beyond the end: %v", r)
	}
}

// TestBenchQemuCheck: an image written by bench (many allocations, in
// write-back mode) passes qemu-img check and reads like qemu-img bench's.
func TestBenchQemuCheck(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	ours, theirs := filepath.Join(dir, "ours"), filepath.Join(dir, "theirs")
	for _, p := range []string{ours, theirs} {
		qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p, "8M")
	}
	args := []string{"-w", "-c", "300", "-s", "3000", "-S", "7000", "--pattern", "0xa5", "-t", "writeback"}
	if r := execCLI(append(append([]string{"bench"}, args...), ours)...); r.code != 0 {
		t.Fatalf("crashtest bench: %v", r)
	}
	out := qemutest.Img(t, append(append([]string{"bench"}, args...), theirs)...)
	if !benchDone.MatchString(out) {
		t.Errorf("qemu-img bench output has no closing line like ours:\n%s", out)
	}
	if code, out := qemutest.Check(t, ours); code != 0 {
		t.Errorf("qemu-img check: exit %d\n%s", code, out)
	}
	if code, out := qemutest.RunImg(t, "compare", ours, theirs); code != 0 {
		t.Errorf("qemu-img compare: exit %d: %s", code, out)
	}
}
