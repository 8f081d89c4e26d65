package main

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// statsLine matches qemu-io's second report line, e.g.
// "4 KiB, 1 ops; 00.00 sec (878.747 KiB/sec and 219.6868 ops/sec)".
var statsLine = regexp.MustCompile(`^[0-9.]+ (bytes|KiB|MiB|GiB|TiB|PiB|EiB), 1 ops; ([0-9]{2}\.[0-9]{2} sec|[0-9]+:[0-9]{2}:[0-9]{2}\.[0-9]{2}) \([0-9.]+ (bytes|KiB|MiB|GiB|TiB|PiB|EiB)/sec and ([0-9]+\.[0-9]{4}|inf) ops/sec\)$`)

// ioLines returns the lines of qemu-io output without the timing lines,
// which differ from run to run.
func ioLines(out string) []string {
	var lines []string
	for _, l := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
		if l != "" && !statsLine.MatchString(l) {
			lines = append(lines, l)
		}
	}
	return lines
}

// newImage creates an empty image with this package's writer.
func newImage(t *testing.T, path string, o qcow.CreateOptions) string {
	t.Helper()
	if err := qcow.Create(vfs.OS, path, o); err != nil {
		t.Fatal(err)
	}
	return path
}

// readImage returns n bytes at off of the virtual disk of path.
func readImage(t *testing.T, path string, off, n int64) []byte {
	t.Helper()
	im, err := qcow.Open(vfs.OS, path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	buf := make([]byte, n)
	if m, err := im.ReadAt(buf, off); m != len(buf) {
		t.Fatalf("read %d bytes at %d: %d, %v", n, off, m, err)
	}
	return buf
}

func TestIOCommands(t *testing.T) {
	type region struct {
		off  int64
		b    byte
		n    int64
		zero bool // b is ignored: zeros
	}
	tests := []struct {
		name       string
		cmds       []string
		wantCode   int
		wantLines  []string // stdout without the timing lines
		wantStderr []string // substrings of stderr; none means empty
		want       []region // contents afterwards
	}{
		{
			name:      "write and verify",
			cmds:      []string{"write -P 0xab 0 4k", "read -P 0xab 0 4k", "read -P 171 1k 1k"},
			wantLines: []string{"wrote 4096/4096 bytes at offset 0", "read 4096/4096 bytes at offset 0", "read 1024/1024 bytes at offset 1024"},
			want:      []region{{0, 0xab, 4096, false}, {4096, 0, 4096, true}},
		},
		{
			name:      "default pattern 0xcd, unaligned",
			cmds:      []string{"write 1000 3333", "read -P 0xcd 1000 3333", "read -P 0 0 1000", "w 0x10000 1"},
			wantLines: []string{"wrote 3333/3333 bytes at offset 1000", "read 3333/3333 bytes at offset 1000", "read 1000/1000 bytes at offset 0", "wrote 1/1 bytes at offset 65536"},
			want:      []region{{0, 0, 1000, true}, {1000, 0xcd, 3333, false}, {4333, 0, 100, true}, {65536, 0xcd, 1, false}},
		},
		{
			name:      "zero write and flush",
			cmds:      []string{"write -P 0x11 0 128k", "write -z 4k 64k", "flush", "r -P 0 4k 64k", "read -P 0x11 68k 60k"},
			wantLines: []string{"wrote 131072/131072 bytes at offset 0", "wrote 65536/65536 bytes at offset 4096", "read 65536/65536 bytes at offset 4096", "read 61440/61440 bytes at offset 69632"},
			want:      []region{{0, 0x11, 4096, false}, {4096, 0, 65536, true}, {69632, 0x11, 61440, false}},
		},
		{
			name:      "options after operands, attached, grouped, quiet",
			cmds:      []string{"write 0 8k -P0x22", "write -qP 0x33 8k 1k", "read -q -P 0x33 8k 1k", "read 0 1k -P 34"},
			wantLines: []string{"wrote 8192/8192 bytes at offset 0", "read 1024/1024 bytes at offset 0"},
			want:      []region{{0, 0x22, 8192, false}, {8192, 0x33, 1024, false}},
		},
		{
			name:      "pattern mismatch fails at the end, other commands still run",
			cmds:      []string{"write -P 1 0 4k", "read -P 2 0 4k", "write -P 3 4k 4k"},
			wantCode:  1,
			wantLines: []string{"wrote 4096/4096 bytes at offset 0", "Pattern verification failed at offset 0, 4096 bytes", "read 4096/4096 bytes at offset 0", "wrote 4096/4096 bytes at offset 4096"},
			want:      []region{{0, 1, 4096, false}, {4096, 3, 4096, false}},
		},
		{
			name:       "unknown command",
			cmds:       []string{"frobnicate 0 1", "write -P 5 0 1"},
			wantCode:   1,
			wantLines:  []string{"wrote 1/1 bytes at offset 0"},
			wantStderr: []string{`crashtest: io: command "frobnicate" not found`},
			want:       []region{{0, 5, 1, false}},
		},
		{
			name:     "bad arguments",
			cmds:     []string{"write 0 1x", "write -P 0x100 0 1", "write -P 1 -z 0 1", "write 1k", "read 0 1 2", "write -x 0 1", "flush now", "read -P", "write 0 3G"},
			wantCode: 1,
			wantLines: []string{
				"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1x",
				"0x100 is not a valid pattern byte",
				"Only one of -z, -P, and -s can be specified at the same time",
				"read [-q] [-P pattern] off len -- reads a number of bytes at a specified offset",
				"write [-qz] [-P pattern] off len -- writes a number of bytes at a specified offset",
				"length cannot exceed 2147483136, given 3G",
			},
			wantStderr: []string{
				"bad argument count 1 to write, expected at least 2 arguments",
				"write: invalid option -- 'x'",
				"bad argument count 1 to flush, expected 0 arguments",
				"bad argument count 1 to read, expected at least 2 arguments",
			},
			want: []region{{0, 0, 4096, true}},
		},
		{
			name:      "beyond the end of the disk",
			cmds:      []string{"write -P 7 1M 1", "read 1020k 8k", "write 1M-1 1", "write -P 8 1048575 1"},
			wantCode:  1,
			wantLines: []string{"write failed: request of 1 bytes at offset 1048576 is beyond the end of the disk (1048576 bytes)", "read failed: request of 8192 bytes at offset 1044480 is beyond the end of the disk (1048576 bytes)", "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- 1M-1", "wrote 1/1 bytes at offset 1048575"},
			want:      []region{{1048575, 8, 1, false}},
		},
	}
	for _, version := range []int{1, 2, 3} {
		for _, tc := range tests {
			t.Run(fmt.Sprintf("v%d/%s", version, tc.name), func(t *testing.T) {
				o := qcow.CreateOptions{Format: qcow.FormatQCOW2, Version: version, Size: 1 << 20}
				if version == 1 {
					o = qcow.CreateOptions{Format: qcow.FormatQCOW, Size: 1 << 20}
				}
				p := newImage(t, filepath.Join(t.TempDir(), "img"), o)
				args := []string{"io"}
				for _, c := range tc.cmds {
					args = append(args, "-c", c)
				}
				r := execCLI(append(args, p)...)
				if r.code != tc.wantCode {
					t.Errorf("exit %d, want %d\n%v", r.code, tc.wantCode, r)
				}
				got := ioLines(r.stdout)
				if strings.Join(got, "\n") != strings.Join(tc.wantLines, "\n") {
					t.Errorf("stdout lines:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.wantLines, "\n"))
				}
				for _, l := range strings.Split(r.stdout, "\n") {
					if strings.Contains(l, " ops; ") && !statsLine.MatchString(l) {
						t.Errorf("bad timing line %q", l)
					}
				}
				if len(tc.wantStderr) == 0 && r.stderr != "" {
					t.Errorf("stderr: %q", r.stderr)
				}
				for _, w := range tc.wantStderr {
					if !strings.Contains(r.stderr, w) {
						t.Errorf("stderr %q does not contain %q", r.stderr, w)
					}
				}
				for _, reg := range tc.want {
					want := bytes.Repeat([]byte{reg.b}, int(reg.n))
					if reg.zero {
						want = make([]byte, reg.n)
					}
					if got := readImage(t, p, reg.off, reg.n); !bytes.Equal(got, want) {
						t.Errorf("%d bytes at %d: got %x..., want %x...", reg.n, reg.off, got[:min(16, len(got))], want[:min(16, len(want))])
					}
				}
			})
		}
	}
}

func TestIOUsage(t *testing.T) {
	dir := t.TempDir()
	p := newImage(t, filepath.Join(dir, "img"), qcow.CreateOptions{Size: 1 << 20})
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"io", p}, "no commands"},
		{[]string{"io", "-c", "flush"}, "expected one IMAGE argument, got 0"},
		{[]string{"io", "-t", "none", "-c", "flush", p}, `invalid cache mode "none"`},
		{[]string{"io", "-f", "vmdk", "-c", "flush", p}, `unknown format "vmdk"`},
		{[]string{"io", "-c", "read 0 1", filepath.Join(dir, "missing")}, "could not open"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			wantOneLineError(t, execCLI(tc.args...), tc.want)
		})
	}
}

// TestIOReadOnly: an image is opened for writing only when a command
// writes, so reads work on a file without write permission.
func TestIOReadOnly(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root ignores file permissions")
	}
	p := newImage(t, filepath.Join(t.TempDir(), "img"), qcow.CreateOptions{Size: 1 << 20})
	if r := execCLI("io", "-c", "write -P 9 0 512", p); r.code != 0 {
		t.Fatal(r)
	}
	if err := os.Chmod(p, 0o444); err != nil {
		t.Fatal(err)
	}
	if r := execCLI("io", "-c", "read -P 9 0 512", "-c", "flush", p); r.code != 0 {
		t.Errorf("read of a read-only file: %v", r)
	}
	if r := execCLI("io", "-c", "write 0 512", p); r.code != 1 || !strings.Contains(r.stderr, "could not open") {
		t.Errorf("write to a read-only file: %v", r)
	}
}

// TestIOCacheModes: both modes leave the data in the image once io exits.
func TestIOCacheModes(t *testing.T) {
	for _, mode := range []string{"writeback", "writethrough"} {
		t.Run(mode, func(t *testing.T) {
			p := newImage(t, filepath.Join(t.TempDir(), "img"), qcow.CreateOptions{Size: 4 << 20, ClusterSize: 4096})
			r := execCLI("io", "-t", mode, "-c", "write -P 0x77 5000 300000", "-c", "write -z 8k 4k", p)
			if r.code != 0 {
				t.Fatal(r)
			}
			got := readImage(t, p, 0, 400000)
			for i, b := range got {
				want := byte(0)
				if i >= 5000 && i < 305000 && (i < 8192 || i >= 12288) {
					want = 0x77
				}
				if b != want {
					t.Fatalf("byte %d is %#x, want %#x", i, b, want)
				}
			}
		})
	}
}

func TestIOParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		err  error
	}{
		{"0", 0, nil},
		{"4096", 4096, nil},
		{"4k", 4096, nil},
		{"4K", 4096, nil},
		{"1M", 1 << 20, nil},
		{"2g", 2 << 30, nil},
		{"1T", 1 << 40, nil},
		{"1P", 1 << 50, nil},
		{"1E", 1 << 60, nil},
		{"7E", 7 << 60, nil},
		{"10b", 10, nil},
		{"10B", 10, nil},
		{"1.5k", 1536, nil},
		{"1.k", 1024, nil},
		{"0.5", 0, errSizeSyntax}, // a fraction needs a scale
		{"1.0", 1, nil},
		{"1.0001k", 1024, nil}, // 1024.1024 rounds down
		{"0.0005k", 1, nil},    // 0.512 rounds up
		{"0x200", 512, nil},
		{"0X1f", 31, nil},
		{"0x", 0, errSizeSyntax},
		{"0x1k", 0, errSizeSyntax},
		{"00x10", 0, errSizeSyntax},
		{"0x7fffffffffffffff", 1<<63 - 1, nil},
		{"0x8000000000000000", 0, errSizeRange},
		{"8E", 0, errSizeRange},
		{"9223372036854775807", 1<<63 - 1, nil},
		{"9223372036854775808", 0, errSizeRange},
		{"", 0, errSizeSyntax},
		{"k", 0, errSizeSyntax},
		{"-1", 0, errSizeSyntax},
		{"+1", 0, errSizeSyntax},
		{"1x", 0, errSizeSyntax},
		{"1kk", 0, errSizeSyntax},
		{"1e3", 0, errSizeSyntax},
		{"1 k", 0, errSizeSyntax},
		{"1_000", 0, errSizeSyntax},
	}
	for _, tc := range tests {
		got, err := parseSize(tc.in)
		if !errors.Is(err, tc.err) || (err == nil && got != tc.want) {
			t.Errorf("parseSize(%q) = %d, %v; want %d, %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestIOParsePattern(t *testing.T) {
	tests := []struct {
		in   string
		want int
		ok   bool
	}{
		{"0", 0, true},
		{"171", 171, true},
		{"0xab", 0xab, true},
		{"0XFF", 255, true},
		{"017", 15, true}, // octal, as strtol
		{"+5", 5, true},
		{"255", 255, true},
		{"256", 0, false},
		{"0x100", 0, false},
		{"-1", 0, false},
		{"08", 0, false},
		{"0x", 0, false},
		{"", 0, false},
		{"ab", 0, false},
		{"1_0", 0, false},
		{"0b1", 0, false},
	}
	for _, tc := range tests {
		got, ok := parsePattern(tc.in)
		if ok != tc.ok || got != tc.want {
			t.Errorf("parsePattern(%q) = %d, %v; want %d, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestIOGetopt(t *testing.T) {
	tests := []struct {
		args     []string
		wantOpts string // "P=x q= " sorted by letter
		wantPos  []string
		wantErr  string
	}{
		{[]string{"0", "4k"}, "", []string{"0", "4k"}, ""},
		{[]string{"-P", "0xab", "0", "4k"}, "P=0xab", []string{"0", "4k"}, ""},
		{[]string{"-P0xab", "0", "4k"}, "P=0xab", []string{"0", "4k"}, ""},
		{[]string{"0", "-q", "4k", "-z"}, "q= z=", []string{"0", "4k"}, ""},
		{[]string{"-qzP", "5", "0", "1"}, "P=5 q= z=", []string{"0", "1"}, ""},
		{[]string{"--", "-1", "2"}, "", []string{"-1", "2"}, ""},
		{[]string{"-", "2"}, "", []string{"-", "2"}, ""},
		{[]string{"-x", "0", "1"}, "", nil, "invalid option -- 'x'"},
		{[]string{"-1", "1"}, "", nil, "invalid option -- '1'"},
		{[]string{"0", "1", "-P"}, "", nil, "option requires an argument -- 'P'"},
	}
	for _, tc := range tests {
		opts, pos, err := getopt(tc.args, "P:qz")
		if tc.wantErr != "" {
			if err == nil || err.Error() != tc.wantErr {
				t.Errorf("getopt(%q): error %v, want %q", tc.args, err, tc.wantErr)
			}
			continue
		}
		if err != nil {
			t.Errorf("getopt(%q): %v", tc.args, err)
			continue
		}
		var got []string
		for _, c := range "Pqz" {
			if v, ok := opts[byte(c)]; ok {
				got = append(got, string(c)+"="+v)
			}
		}
		if strings.Join(got, " ") != tc.wantOpts || strings.Join(pos, " ") != strings.Join(tc.wantPos, " ") {
			t.Errorf("getopt(%q) = %q, %q; want %q, %q", tc.args, got, pos, tc.wantOpts, tc.wantPos)
		}
	}
}

// TestIOReport: the report lines have qemu-io's format (cvtstr and
// timestr in qemu's cutils.c and qemu-io-cmds.c).
func TestIOReport(t *testing.T) {
	cvt := []struct {
		v    float64
		want string
	}{
		{0, "0 bytes"},
		{1, "1 bytes"},
		{387.51474, "387.514740 bytes"},
		{1023, "1023 bytes"},
		{1024, "1 KiB"},
		{3333, "3.255 KiB"},
		{878.747 * 1024, "878.747 KiB"},
		{1 << 20, "1 MiB"},
		{1.5 * (1 << 30), "1.500 GiB"},
		{1 << 40, "1 TiB"},
		{1 << 50, "1 PiB"},
		{1 << 60, "1 EiB"},
	}
	for _, tc := range cvt {
		if got := cvtstr(tc.v); got != tc.want {
			t.Errorf("cvtstr(%v) = %q, want %q", tc.v, got, tc.want)
		}
	}
	ts := []struct {
		d    time.Duration
		want string
	}{
		{0, "00.00 sec"},
		{4 * time.Millisecond, "00.00 sec"},
		{123 * time.Millisecond, "00.12 sec"},
		{time.Second + 500*time.Millisecond, "0:00:01.50"},
		{3723 * time.Second, "1:02:03.00"},
	}
	for _, tc := range ts {
		if got := timestr(tc.d); got != tc.want {
			t.Errorf("timestr(%v) = %q, want %q", tc.d, got, tc.want)
		}
	}
	got := ioReport("wrote", 0, 4096, 4*time.Millisecond)
	want := "wrote 4096/4096 bytes at offset 0\n4 KiB, 1 ops; 00.00 sec (1000 KiB/sec and 250.0000 ops/sec)\n"
	if got != want {
		t.Errorf("ioReport = %q, want %q", got, want)
	}
	if got := ioReport("read", 512, 1024, 0); !strings.HasSuffix(got, "(inf EiB/sec and inf ops/sec)\n") {
		t.Errorf("ioReport with no elapsed time = %q", got)
	}
}

// ioScript is a random qemu-io script and the disk it leaves.
type ioScript struct {
	cmds  []string
	model []byte
}

// randomIOScript returns n random commands for a disk of cluster size cs
// whose current contents are model (updated in place): patterned writes
// (some without -P, which writes 0xcd) of every size and alignment, zero
// writes, flushes, and reads, which verify a pattern where the disk holds
// one.
func randomIOScript(r *rand.Rand, model []byte, cs int64, n int) []string {
	size := int64(len(model))
	l2span := cs * (cs / 8) // guest bytes one QCOW2 L2 table maps
	pickOff := func() int64 {
		switch r.IntN(6) {
		case 0:
			return r.Int64N(size/cs) * cs // cluster aligned
		case 1:
			return r.Int64N(size/512) * 512
		case 2: // near an L2 table boundary
			if b := (r.Int64N(size/l2span + 1)) * l2span; b < size {
				return max(0, b-r.Int64N(2*cs)+cs)
			}
			return r.Int64N(size)
		case 3: // near the end
			return size - 1 - r.Int64N(min(size, 3*cs))
		}
		return r.Int64N(size)
	}
	pickOffset := func() int64 { return min(pickOff(), size-1) }
	pickLen := func(off int64) int64 {
		var l int64
		switch r.IntN(6) {
		case 0:
			l = 1 + r.Int64N(2000)
		case 1:
			l = cs + r.Int64N(3) - 1
		case 2:
			l = r.Int64N(4)*cs + r.Int64N(cs)
		case 3: // large (less with small clusters: qemu's QCOW v1 is slow there)
			l = r.Int64N(min(256<<10, 128*cs))
		case 4:
			l = 512 * (1 + r.Int64N(64))
		default:
			l = r.Int64N(8 * cs)
		}
		return min(l, size-off)
	}
	var writes [][2]int64
	var cmds []string
	for len(cmds) < n {
		switch k := r.IntN(20); {
		case k < 9: // patterned write
			off := pickOffset()
			l := pickLen(off)
			p := byte(r.IntN(256))
			cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", p, off, l))
			fillByte(model[off:off+l], p)
			writes = append(writes, [2]int64{off, l})
		case k < 11: // qemu-io's default pattern, sizes with suffixes
			off := r.Int64N(size/1024) * 1024
			l := min(r.Int64N(64), (size-off)/1024) * 1024
			cmds = append(cmds, fmt.Sprintf("write %dk %dk", off/1024, l/1024))
			fillByte(model[off:off+l], qemuWritePattern)
		case k < 14: // zero write
			off := pickOffset()
			l := pickLen(off)
			cmds = append(cmds, fmt.Sprintf("write -z %d %d", off, l))
			clear(model[off : off+l])
		case k < 16:
			cmds = append(cmds, "flush")
		default: // read back a written range, or any range
			var off, l int64
			if len(writes) > 0 && r.IntN(3) > 0 {
				w := writes[r.IntN(len(writes))]
				off, l = w[0], w[1]
			} else {
				off = pickOffset()
				l = pickLen(off)
			}
			uniform := l > 0 && bytes.Count(model[off:off+l], model[off:off+1]) == int(l)
			if uniform {
				cmds = append(cmds, fmt.Sprintf("read -P %d %d %d", model[off], off, l))
			} else {
				cmds = append(cmds, fmt.Sprintf("read %d %d", off, l))
			}
		}
	}
	return cmds
}

// TestIODifferential applies the same random qemu-io script with qemu-io
// to one copy of a fresh image and with crashtest io to another, for QCOW
// v1, v2 and v3, several cluster sizes, with and without a raw backing
// file, in both cache modes: the output (without timings) must be the
// same, qemu-img compare must find the images identical, and qemu-img
// check (and crashtest check) must find ours clean. Replay a failure with
// the QEMUTEST_SEED printed in the log.
func TestIODifferential(t *testing.T) {
	qemutest.Require(t)
	type config struct {
		name    string
		format  string
		opts    string // -o for qemu-img create
		cs      int64
		backing bool
	}
	var configs []config
	for _, b := range []bool{false, true} {
		cs := int64(4096) // qemu's QCOW v1 default
		if b {
			cs = 512 // with a backing file
		}
		configs = append(configs, config{"v1", "qcow", "", cs, b})
		for _, v := range []struct{ name, compat string }{{"v2", "0.10"}, {"v3", "1.1"}} {
			for _, cs := range []int64{512, 4096, 65536} {
				configs = append(configs, config{v.name, "qcow2", fmt.Sprintf("compat=%s,cluster_size=%d", v.compat, cs), cs, b})
			}
		}
	}
	for _, cfg := range configs {
		name := fmt.Sprintf("%s/cs%d", cfg.name, cfg.cs)
		if cfg.format == "qcow" {
			name = cfg.name
		}
		if cfg.backing {
			name += "/backing"
		}
		for i, cache := range []string{"writethrough", "writeback"} {
			// Not parallel: the image locks of vfs.OS are OFD locks, and a
			// qemu child that a parallel subtest forks holds a copy of our
			// descriptors (and so our lock) until it execs, which makes
			// qemu-img fail with "Failed to lock byte 100" at random.
			t.Run(name+"/"+cache, func(t *testing.T) {
				r := rand.New(rand.NewPCG(qemutest.Seed(t, t.Name()), uint64(i)))
				dir := t.TempDir()
				size := 2<<20 + 512*r.Int64N(4096)
				model := make([]byte, size)
				args := []string{"create", "-q", "-f", cfg.format}
				if cfg.opts != "" {
					args = append(args, "-o", cfg.opts)
				}
				if cfg.backing {
					// Shorter than the disk and not sector aligned: the
					// disk reads zeros after its end.
					bsize := size/2 + 1000 + r.Int64N(cfg.cs)
					data := qemutest.RandomData(bsize, r.Uint64())
					if err := os.WriteFile(filepath.Join(dir, "base.raw"), data, 0o644); err != nil {
						t.Fatal(err)
					}
					copy(model, data)
					args = append(args, "-b", "base.raw", "-F", "raw")
				}
				theirs := filepath.Join(dir, "theirs")
				ours := filepath.Join(dir, "ours")
				qemutest.Img(t, append(args, theirs, fmt.Sprint(size))...)
				fresh, err := os.ReadFile(theirs)
				if err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(ours, fresh, 0o644); err != nil {
					t.Fatal(err)
				}
				cmds := randomIOScript(r, model, cfg.cs, 40)
				script := "  -c '" + strings.Join(cmds, "' -c '") + "'"
				ioArgs := []string{"-f", cfg.format, "-t", cache}
				for _, c := range cmds {
					ioArgs = append(ioArgs, "-c", c)
				}
				start := time.Now()
				qcode, qout := qemutest.RunIO(t, append(ioArgs, theirs)...)
				mid := time.Now()
				res := execCLI(append(append([]string{"io"}, ioArgs...), ours)...)
				t.Logf("qemu-io took %v, crashtest io %v", mid.Sub(start), time.Since(mid))
				if qcode != 0 || res.code != 0 {
					t.Fatalf("qemu-io exit %d, crashtest io exit %d\nscript:%s\nqemu-io:\n%s\ncrashtest io: %v", qcode, res.code, script, qout, res)
				}
				if q, o := strings.Join(ioLines(qout), "\n"), strings.Join(ioLines(res.stdout), "\n"); q != o {
					t.Fatalf("output differs\nscript:%s\nqemu-io:\n%s\ncrashtest io:\n%s", script, q, o)
				}
				if code, out := qemutest.RunImg(t, "compare", "-f", cfg.format, "-F", cfg.format, theirs, ours); code != 0 {
					t.Fatalf("qemu-img compare: exit %d: %s\nscript:%s", code, out, script)
				}
				if cfg.format == "qcow2" {
					if code, out := qemutest.Check(t, ours); code != 0 {
						t.Fatalf("qemu-img check of ours: exit %d\n%s\nscript:%s", code, out, script)
					}
				}
				if res := execCLI("check", ours); res.code != 0 {
					t.Fatalf("crashtest check of ours: %v\nscript:%s", res, script)
				}
				if got := readImage(t, ours, 0, size); !bytes.Equal(got, model) {
					t.Fatalf("ours differs from the test's model at offset %d\nscript:%s", firstDiff(got, model), script)
				}
			})
		}
	}
}

func TestConvertOptions(t *testing.T) {
	tests := []struct {
		format  qcow.Format
		opts    []string
		want    qcow.CreateOptions
		wantErr string
	}{
		{qcow.FormatQCOW2, nil, qcow.CreateOptions{Format: qcow.FormatQCOW2}, ""},
		{qcow.FormatQCOW2, []string{"compat=0.10"}, qcow.CreateOptions{Format: qcow.FormatQCOW2, Version: 2}, ""},
		{qcow.FormatQCOW2, []string{"compat=v3,cluster_size=4k"}, qcow.CreateOptions{Format: qcow.FormatQCOW2, Version: 3, ClusterSize: 4096}, ""},
		{qcow.FormatQCOW2, []string{"cluster_size=512", "refcount_bits=1,lazy_refcounts=on"}, qcow.CreateOptions{Format: qcow.FormatQCOW2, ClusterSize: 512, RefcountBits: 1, LazyRefcounts: true}, ""},
		{qcow.FormatQCOW2, []string{"cluster_size=2M,lazy_refcounts=off,"}, qcow.CreateOptions{Format: qcow.FormatQCOW2, ClusterSize: 2 << 20}, ""},
		{qcow.FormatQCOW, nil, qcow.CreateOptions{Format: qcow.FormatQCOW}, ""},
		{qcow.FormatQCOW, []string{"cluster_size=4k"}, qcow.CreateOptions{}, "invalid parameter 'cluster_size'"},
		{qcow.FormatRaw, []string{"compat=1.1"}, qcow.CreateOptions{}, "invalid parameter 'compat'"},
		{qcow.FormatQCOW2, []string{"foo=1"}, qcow.CreateOptions{}, "invalid parameter 'foo'"},
		{qcow.FormatQCOW2, []string{"compat"}, qcow.CreateOptions{}, "needs a value"},
		{qcow.FormatQCOW2, []string{"compat=0.9"}, qcow.CreateOptions{}, "compat does not accept value '0.9'"},
		{qcow.FormatQCOW2, []string{"cluster_size=3k"}, qcow.CreateOptions{}, "not a power of two"},
		{qcow.FormatQCOW2, []string{"cluster_size=4M"}, qcow.CreateOptions{}, "not a power of two"},
		{qcow.FormatQCOW2, []string{"cluster_size=x"}, qcow.CreateOptions{}, "cluster_size 'x'"},
		{qcow.FormatQCOW2, []string{"refcount_bits=3"}, qcow.CreateOptions{}, "refcount width 3"},
		{qcow.FormatQCOW2, []string{"refcount_bits=128"}, qcow.CreateOptions{}, "refcount_bits '128'"},
		{qcow.FormatQCOW2, []string{"compat=0.10,refcount_bits=8"}, qcow.CreateOptions{}, "compatibility level 1.1"},
		{qcow.FormatQCOW2, []string{"compat=0.10,lazy_refcounts=on"}, qcow.CreateOptions{}, "compatibility level 1.1"},
		{qcow.FormatQCOW2, []string{"lazy_refcounts=maybe"}, qcow.CreateOptions{}, "lazy_refcounts does not accept"},
	}
	for _, tc := range tests {
		got, err := parseCreateOptions(tc.format, tc.opts)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s %q: error %v, want %q", tc.format, tc.opts, err, tc.wantErr)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s %q = %+v, %v; want %+v", tc.format, tc.opts, got, err, tc.want)
		}
	}
	// A bad -o is a usage error before anything is opened or created.
	dir := t.TempDir()
	dst := filepath.Join(dir, "out")
	wantOneLineError(t, execCLI("convert", "-O", "qcow2", "-o", "foo=1", filepath.Join(dir, "missing"), dst), "invalid parameter 'foo'")
	if _, err := os.Stat(dst); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused convert created the destination (%v)", err)
	}
}

// TestConvertQCOW converts images made by qemu (raw with holes, compressed
// v2 and v3, zero clusters over a backing chain, QCOW v1, small clusters)
// to qcow2 v3 and v2, and qcow, with crashtest convert: qemu-img compare
// finds each result identical to its source, qemu-img check finds it
// clean, and qemu-img map shows no data in any block of the result that
// reads as zeros in the source.
func TestConvertQCOW(t *testing.T) {
	qemutest.Require(t)
	sources := []struct {
		name string
		make func(t *testing.T, dir string) string
	}{
		{"raw-with-holes", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "src.raw")
			qemutest.WriteRandomRaw(t, p, 3<<20+4096, 11)
			if err := os.Truncate(p, 6<<20+512); err != nil { // a hole at the end
				t.Fatal(err)
			}
			return p
		}},
		{"v3-compressed", func(t *testing.T, dir string) string {
			raw := filepath.Join(dir, "data.raw")
			qemutest.WriteRandomRaw(t, raw, 2<<20, 12)
			p := filepath.Join(dir, "src.qcow2")
			qemutest.Img(t, "convert", "-c", "-O", "qcow2", raw, p)
			return p
		}},
		{"v2-compressed-4k", func(t *testing.T, dir string) string {
			raw := filepath.Join(dir, "data.raw")
			qemutest.WriteRandomRaw(t, raw, 2<<20, 13)
			p := filepath.Join(dir, "src.qcow2")
			qemutest.Img(t, "convert", "-c", "-O", "qcow2", "-o", "compat=0.10,cluster_size=4k", raw, p)
			return p
		}},
		{"chain-with-zero-clusters", func(t *testing.T, dir string) string {
			base := filepath.Join(dir, "base.qcow2")
			raw := filepath.Join(dir, "data.raw")
			qemutest.WriteRandomRaw(t, raw, 3<<20, 14)
			qemutest.Img(t, "convert", "-O", "qcow2", "-o", "cluster_size=4k", raw, base)
			mid := filepath.Join(dir, "mid.qcow2")
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "cluster_size=16k", mid, "4M")
			qemutest.Script(t, "qcow2", mid, qemutest.Pattern(16<<10, 4<<20, 1)...)
			top := filepath.Join(dir, "top.qcow2")
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
			qemutest.Script(t, "qcow2", top, "write -z 0 1M", "write -P 0x44 1100k 5000", "write -z 2M 100k", "write -z 3M 3000")
			return top
		}},
		{"v1-with-backing", func(t *testing.T, dir string) string {
			qemutest.WriteRandomRaw(t, filepath.Join(dir, "base.raw"), 1<<20, 15)
			p := filepath.Join(dir, "src.qcow")
			qemutest.Img(t, "create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", p, "2M")
			qemutest.Script(t, "qcow", p, qemutest.Pattern(512, 2<<20, 0)...)
			return p
		}},
		{"v3-512-unaligned-size", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "src.qcow2")
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p, "1000448")
			qemutest.Script(t, "qcow2", p, qemutest.Pattern(512, 1000448, 2)...)
			return p
		}},
	}
	outputs := []struct {
		name   string
		args   []string
		format string
		cs     int64 // cluster size of the output
	}{
		{"qcow2", []string{"-O", "qcow2"}, "qcow2", 65536},
		{"qcow2-v2-4k", []string{"-O", "qcow2", "-o", "compat=0.10,cluster_size=4k"}, "qcow2", 4096},
		{"qcow2-512-refcount1", []string{"-O", "qcow2", "-o", "cluster_size=512", "-o", "refcount_bits=1,lazy_refcounts=on"}, "qcow2", 512},
		{"qcow", []string{"-O", "qcow"}, "qcow", 4096},
	}
	for _, src := range sources {
		t.Run(src.name, func(t *testing.T) { // not parallel: see TestIODifferential
			dir := t.TempDir()
			sp := src.make(t, dir)
			flat := filepath.Join(dir, "flat.raw")
			qemutest.ConvertRaw(t, sp, flat)
			content, err := os.ReadFile(flat)
			if err != nil {
				t.Fatal(err)
			}
			for _, out := range outputs {
				t.Run(out.name, func(t *testing.T) {
					dst := filepath.Join(dir, "out-"+out.name)
					args := append(append([]string{"convert"}, out.args...), sp, dst)
					if r := execCLI(args...); r.code != 0 || r.stdout != "" || r.stderr != "" {
						t.Fatalf("crashtest %s: %v", strings.Join(args, " "), r)
					}
					if info := qemutest.Info(t, dst); info.Format != out.format || info.BackingFilename != "" || info.ClusterSize != out.cs {
						t.Errorf("output: format %s, cluster size %d, backing %q; want %s, %d, none", info.Format, info.ClusterSize, info.BackingFilename, out.format, out.cs)
					}
					if code, msg := qemutest.RunImg(t, "compare", sp, dst); code != 0 {
						t.Fatalf("qemu-img compare: exit %d: %s", code, msg)
					}
					if out.format == "qcow2" {
						if code, msg := qemutest.Check(t, dst); code != 0 {
							t.Fatalf("qemu-img check: exit %d\n%s", code, msg)
						}
					}
					if r := execCLI("check", dst); r.code != 0 {
						t.Fatalf("crashtest check: %v", r)
					}
					// Holes stay holes: every block (4 KiB, or a cluster
					// when smaller) that has data in the output holds
					// non-zero bytes in the source. (Data that qemu calls
					// zero lies in a hole of the file: the part of an
					// allocated cluster that was never written.)
					block := min(4096, out.cs)
					zero := make([]byte, block)
					for _, e := range qemutest.Map(t, dst) {
						if !e.Data || e.Zero {
							continue
						}
						for b := e.Start / block * block; b < e.Start+e.Length; b += block {
							end := min(b+block, int64(len(content)))
							if b < end && bytes.Equal(content[b:end], zero[:end-b]) {
								t.Fatalf("output has data in block [%d, %d), which reads as zeros in the source (map entry %+v)", b, end, e)
							}
						}
					}
				})
			}
			// Converting again over an existing output replaces it.
			dst := filepath.Join(dir, "out-qcow2")
			if r := execCLI("convert", "-O", "qcow2", "-o", "compat=0.10", sp, dst); r.code != 0 {
				t.Fatalf("convert over an existing output: %v", r)
			}
			if info := qemutest.Info(t, dst); info.Version() != 2 {
				t.Errorf("convert over an existing output: version %d, want 2", info.Version())
			}
			if code, msg := qemutest.RunImg(t, "compare", sp, dst); code != 0 {
				t.Fatalf("qemu-img compare after overwriting: exit %d: %s", code, msg)
			}
		})
	}
}
