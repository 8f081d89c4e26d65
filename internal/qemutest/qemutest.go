// Package qemutest runs qemu-img and qemu-io for interop tests: images are
// made by qemu at test time (never checked in) and qemu's view of them is
// the reference the project's reader, writer and checker are compared to.
//
// Every helper takes a testing.TB and fails the test with qemu's output when
// a command fails. Require skips the test when qemu-img or qemu-io is not
// installed, except under CI=true, where it fails instead: CI must run the
// interop tests.
package qemutest

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
)

var (
	lookOnce sync.Once
	imgPath  string
	ioPath   string
	lookErr  error
)

// Require returns the paths of qemu-img and qemu-io. When either is missing
// it skips the test with a message, or fails it when the environment
// variable CI is "true".
func Require(t testing.TB) (qemuImg, qemuIO string) {
	t.Helper()
	lookOnce.Do(func() {
		var e1, e2 error
		imgPath, e1 = exec.LookPath("qemu-img")
		ioPath, e2 = exec.LookPath("qemu-io")
		lookErr = errors.Join(e1, e2)
	})
	if lookErr != nil {
		msg := fmt.Sprintf("qemutest: qemu-img and qemu-io are needed for interop tests (apt-get install qemu-utils): %v", lookErr)
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return imgPath, ioPath
}

// RunImg runs qemu-img with args and returns its exit code (-1 when it was
// killed by a signal) and combined output, whatever the exit code; it fails
// the test only when qemu-img cannot be run.
func RunImg(t testing.TB, args ...string) (exitCode int, out string) {
	t.Helper()
	qimg, _ := Require(t)
	return run(t, qimg, args...)
}

// RunIO runs qemu-io with args like RunImg: a failing or killed qemu-io (for
// instance one ended by "sigraise 9" to leave an image dirty) does not fail
// the test.
func RunIO(t testing.TB, args ...string) (exitCode int, out string) {
	t.Helper()
	_, qio := Require(t)
	return run(t, qio, args...)
}

// run runs a command and returns its combined output and exit code (-1 when
// killed by a signal); it fails the test only when the command could not be
// started.
func run(t testing.TB, prog string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(prog, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, out.String()
	case errors.As(err, &ee):
		return ee.ExitCode(), out.String()
	}
	t.Fatalf("qemutest: %s %s: %v\n%s", prog, strings.Join(args, " "), err, out.String())
	return -1, ""
}

// Img runs qemu-img with args and returns its combined output. A non-zero
// exit fails the test with the output.
func Img(t testing.TB, args ...string) string {
	t.Helper()
	qimg, _ := Require(t)
	code, out := run(t, qimg, args...)
	if code != 0 {
		t.Fatalf("qemutest: qemu-img %s: exit %d\n%s", strings.Join(args, " "), code, out)
	}
	return out
}

// IO runs qemu-io with args and returns its combined output. A non-zero exit
// fails the test with the output.
func IO(t testing.TB, args ...string) string {
	t.Helper()
	_, qio := Require(t)
	code, out := run(t, qio, args...)
	if code != 0 {
		t.Fatalf("qemutest: qemu-io %s: exit %d\n%s", strings.Join(args, " "), code, out)
	}
	// qemu-io reports a failed command on stdout and may still exit 0.
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, " failed: ") {
			t.Fatalf("qemutest: qemu-io %s: %s\n%s", strings.Join(args, " "), l, out)
		}
	}
	return out
}

// Script runs the qemu-io commands cmds (e.g. "write -P 0xab 0 64k",
// "write -z 1M 64k", "discard 2M 64k") in order on image, opened with the
// given format, in one qemu-io process.
func Script(t testing.TB, format, image string, cmds ...string) string {
	t.Helper()
	if len(cmds) == 0 {
		return ""
	}
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return IO(t, append(args, image)...)
}

// Check runs `qemu-img check` on image and returns its exit code (0 clean,
// 1 check not completed, 2 corruptions, 3 leaks only, 63 format without
// checks) and its output. It fails the test only if qemu-img cannot run.
func Check(t testing.TB, image string) (exitCode int, out string) {
	t.Helper()
	return RunImg(t, "check", image)
}

// ConvertRaw writes the whole virtual disk of src, as qemu reads it through
// its backing chain, to the raw file dst (sparse: zero ranges are holes).
func ConvertRaw(t testing.TB, src, dst string) {
	t.Helper()
	Img(t, "convert", "-O", "raw", src, dst)
}

// ImageInfo is the part of `qemu-img info --output=json` the tests use.
type ImageInfo struct {
	VirtualSize     int64  `json:"virtual-size"`
	Filename        string `json:"filename"`
	ClusterSize     int64  `json:"cluster-size"`
	Format          string `json:"format"`
	ActualSize      int64  `json:"actual-size"`
	DirtyFlag       bool   `json:"dirty-flag"`
	BackingFilename string `json:"backing-filename"`
	FullBacking     string `json:"full-backing-filename"`
	BackingFormat   string `json:"backing-filename-format"`
	Snapshots       []struct {
		ID   string `json:"id"`
		Name string `json:"name"`
	} `json:"snapshots"`
	FormatSpecific struct {
		Type string `json:"type"`
		Data struct {
			Compat          string `json:"compat"`
			CompressionType string `json:"compression-type"`
			LazyRefcounts   bool   `json:"lazy-refcounts"`
			RefcountBits    int    `json:"refcount-bits"`
			Corrupt         bool   `json:"corrupt"`
			ExtendedL2      bool   `json:"extended-l2"`
			DataFile        string `json:"data-file"`
			DataFileRaw     bool   `json:"data-file-raw"`
		} `json:"data"`
	} `json:"format-specific"`
}

// Version returns the QCOW version qemu reports: 1 for format qcow, 2 for
// compat 0.10, 3 for compat 1.1, and 0 otherwise.
func (in *ImageInfo) Version() int {
	switch {
	case in.Format == "qcow":
		return 1
	case in.Format != "qcow2":
		return 0
	case in.FormatSpecific.Data.Compat == "0.10":
		return 2
	case in.FormatSpecific.Data.Compat == "1.1":
		return 3
	}
	return 0
}

// Info runs `qemu-img info --output=json` on image (without its backing
// chain) and decodes the result.
func Info(t testing.TB, image string) *ImageInfo {
	t.Helper()
	out := Img(t, "info", "--output=json", image)
	var in ImageInfo
	if err := json.Unmarshal([]byte(jsonPart(out)), &in); err != nil {
		t.Fatalf("qemutest: decode qemu-img info of %s: %v\n%s", image, err, out)
	}
	return &in
}

// MapEntry is one range of `qemu-img map --output=json`.
type MapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset"`
}

// Map runs `qemu-img map --output=json` on image and returns its ranges,
// which cover the virtual disk in order.
func Map(t testing.TB, image string) []MapEntry {
	t.Helper()
	out := Img(t, "map", "--output=json", image)
	var m []MapEntry
	if err := json.Unmarshal([]byte(jsonPart(out)), &m); err != nil {
		t.Fatalf("qemutest: decode qemu-img map of %s: %v\n%s", image, err, out)
	}
	return m
}

// jsonPart drops any warning lines qemu prints before its JSON.
func jsonPart(out string) string {
	if i := strings.IndexAny(out, "[{"); i > 0 {
		return out[i:]
	}
	return out
}

// Pattern returns qemu-io commands for a disk of size bytes and cluster
// size cs: patterned writes of whole clusters, unaligned runs, runs
// straddling cluster and L2-table boundaries, the end of the disk; zero
// writes over data (zero-allocated in v3), over nothing (zero-plain) and
// with unmap; discards. layer shifts the offsets and patterns so images of
// a backing chain overlap partly. Commands that do not fit are left out.
func Pattern(cs, size, layer int64) []string {
	var cmds []string
	add := func(cmd string, off, n int64) {
		if off < 0 || n <= 0 || off+n > size {
			return
		}
		cmds = append(cmds, fmt.Sprintf("%s %d %d", cmd, off, n))
	}
	pat := func(i int64) string {
		b := byte(0x11*(i+1)) ^ byte(layer*0x5c)
		if b == 0 {
			b = 0xff
		}
		return fmt.Sprintf("write -P 0x%02x", b)
	}
	sh := layer * (cs/2 + 37) // unaligned shift
	al := layer * 2 * cs      // aligned shift
	h := min(700, cs/2-1)
	add(pat(0), sh, cs)                     // a whole cluster (two halves when shifted)
	add(pat(1), sh+cs-h, 2*h)               // straddles a cluster boundary
	add(pat(2), sh+3*cs+123, 77)            // tiny, unaligned
	add(pat(3), sh+5*cs, 3*cs)              // several clusters
	add("write -z", al+6*cs, cs)            // zero over data: zero-allocated
	add("discard", al+7*cs, cs)             // discard over data
	add("write -z", al+9*cs, 2*cs)          // zero over nothing: zero-plain
	add(pat(4), al+12*cs, cs)               // data, then unmapped:
	add("write -z -u", al+12*cs, cs)        // zero with unmap over data
	add(pat(5), size/2+333+sh, 2*cs+1)      // middle of the disk, unaligned
	add("write -z", size/2+3*cs+100+sh, cs) // unaligned zero write over two clusters
	add(pat(6), cs*cs/8-300-sh, 600)        // straddles an L2 table boundary
	add(pat(7), cs*cs/16-300+sh, 600)       // same, extended L2
	add(pat(8), size-1000-layer*1777, 1000) // the end of the disk
	return cmds
}

// Seed returns a deterministic seed for the named use: the root seed
// (QEMUTEST_SEED from the environment, default 1) mixed with an FNV hash of
// name. It logs both so a failure can be replayed with
// QEMUTEST_SEED=<root>.
func Seed(t testing.TB, name string) uint64 {
	t.Helper()
	root := uint64(1)
	if s := os.Getenv("QEMUTEST_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			t.Fatalf("qemutest: QEMUTEST_SEED=%q: %v", s, err)
		}
		root = v
	}
	h := fnv.New64a()
	h.Write([]byte(name))
	seed := root ^ h.Sum64()
	t.Logf("qemutest: seed %#x for %q (QEMUTEST_SEED=%d)", seed, name, root)
	return seed
}

// RandomData returns size deterministic pseudo-random bytes from seed, in
// 4 KiB blocks of mixed kinds: incompressible noise, byte runs, text from a
// small alphabet (compressible, so compressed images really hold compressed
// clusters) and zeros. It fills in bulk (no per-byte work), so it stays
// cheap under the race detector.
func RandomData(size int64, seed uint64) []byte {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[:], seed)
	src := rand.NewChaCha8(key)
	r := rand.New(src)
	const block = 4096
	// A table of text; text blocks copy windows of it.
	const alpha = "abcdefgh qcow\n"
	text := make([]byte, 4*block)
	src.Read(text)
	for i, c := range text {
		text[i] = alpha[int(c)%len(alpha)]
	}
	b := make([]byte, size)
	for off := int64(0); off < size; off += block {
		p := b[off:min(off+block, size)]
		switch r.IntN(4) {
		case 0:
			src.Read(p)
		case 1:
			for i := 0; i < len(p); {
				n := min(1+r.IntN(512), len(p)-i)
				fill(p[i:i+n], byte(r.Uint32()))
				i += n
			}
		case 2:
			copy(p, text[r.IntN(len(text)-block):])
		case 3:
			// zeros
		}
	}
	return b
}

// fill sets every byte of p to c by doubling copies.
func fill(p []byte, c byte) {
	if len(p) == 0 {
		return
	}
	p[0] = c
	for k := 1; k < len(p); k *= 2 {
		copy(p[k:], p[:k])
	}
}

// WriteRandomRaw writes RandomData(size, seed) to a new raw file at path.
func WriteRandomRaw(t testing.TB, path string, size int64, seed uint64) {
	t.Helper()
	if err := os.WriteFile(path, RandomData(size, seed), 0o644); err != nil {
		t.Fatalf("qemutest: %v", err)
	}
}

// Create runs `qemu-img create -q -f format [-o opts] extra... path [size]`
// and returns path; size 0 leaves the size to qemu-img (a backing file's).
func Create(t testing.TB, path, format, opts string, size int64, extra ...string) string {
	t.Helper()
	args := []string{"create", "-q", "-f", format}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	args = append(args, extra...)
	args = append(args, path)
	if size > 0 {
		args = append(args, fmt.Sprint(size))
	}
	Img(t, args...)
	return path
}
