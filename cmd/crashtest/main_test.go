package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
)

// cliResult is what one in-process invocation of crashtest produced.
type cliResult struct {
	code           int
	stdout, stderr string
}

// execCLI runs crashtest in-process with args.
func execCLI(args ...string) cliResult {
	var out, errOut bytes.Buffer
	code := run(args, &out, &errOut)
	return cliResult{code, out.String(), errOut.String()}
}

func (r cliResult) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", r.code, r.stdout, r.stderr)
}

// wantOneLineError fails unless r is exit 1 with nothing on stdout and
// exactly one line on stderr that starts with "crashtest: " and contains
// every string in want.
func wantOneLineError(t *testing.T, r cliResult, want ...string) {
	t.Helper()
	if r.code != 1 {
		t.Errorf("exit %d, want 1\n%v", r.code, r)
	}
	if r.stdout != "" {
		t.Errorf("stdout not empty: %q", r.stdout)
	}
	if !strings.HasPrefix(r.stderr, "crashtest: ") || !strings.HasSuffix(r.stderr, "\n") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("stderr is not one line starting with \"crashtest: \": %q", r.stderr)
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("stderr %q does not contain %q", r.stderr, w)
		}
	}
}

func TestUsage(t *testing.T) {
	tests := []struct {
		args    []string
		want    string // in stderr
		oneLine bool   // an error line rather than a usage text
	}{
		{nil, "usage: crashtest COMMAND", false},
		{[]string{"help"}, "usage: crashtest COMMAND", false},
		{[]string{"-h"}, "usage: crashtest COMMAND", false},
		{[]string{"--help"}, "usage: crashtest COMMAND", false},
		{[]string{"help", "convert"}, "usage: crashtest convert", false},
		{[]string{"help", "nope"}, `unknown command "nope"`, false},
		{[]string{"nope"}, `unknown command "nope"`, false},
		{[]string{"info", "-h"}, "usage: crashtest info", false},
		{[]string{"check", "x.qcow2", "--help"}, "usage: crashtest check", false},
		{[]string{"info"}, "expected one IMAGE argument, got 0", true},
		{[]string{"info", "a", "b"}, "expected one IMAGE argument, got 2", true},
		{[]string{"info", "-x", "a"}, "flag provided but not defined: -x", true},
		{[]string{"info", "-f", "vmdk", "a"}, `unknown format "vmdk"`, true},
		{[]string{"info", "--output=yaml", "a"}, `unknown output "yaml"`, true},
		{[]string{"check"}, "expected one IMAGE argument", true},
		{[]string{"check", "-f"}, "flag needs an argument: -f", true},
		{[]string{"convert", "a"}, "expected SRC and DST arguments", true},
		{[]string{"convert", "-O", "vmdk", "a", "b"}, `unknown format "vmdk"`, true},
		{[]string{"convert", "-O", "qcow2", "a", "b"}, "could not open 'a'", true},
		{[]string{"convert", "a", "b", "-O", "qcow"}, "could not open 'a'", true},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			r := execCLI(tc.args...)
			if tc.oneLine {
				wantOneLineError(t, r, tc.want)
				return
			}
			if r.code != 1 || r.stdout != "" || !strings.Contains(r.stderr, tc.want) {
				t.Errorf("want exit 1 and %q on stderr only, got %v", tc.want, r)
			}
			if tc.want == "usage: crashtest COMMAND" && !strings.Contains(r.stderr, "crashtest convert") {
				t.Errorf("usage does not list the commands: %q", r.stderr)
			}
		})
	}
}

func TestParseInterspersed(t *testing.T) {
	tests := []struct {
		args     []string
		wantPos  []string
		wantJSON bool
		wantF    string
	}{
		{[]string{"a"}, []string{"a"}, false, ""},
		{[]string{"--json", "a"}, []string{"a"}, true, ""},
		{[]string{"a", "--json"}, []string{"a"}, true, ""},
		{[]string{"a", "-f", "qcow", "b"}, []string{"a", "b"}, false, "qcow"},
		{[]string{"-f=raw", "a", "b", "-json"}, []string{"a", "b"}, true, "raw"},
		{[]string{"--", "-a", "--json"}, []string{"-a", "--json"}, false, ""},
		{[]string{"a", "--", "-b"}, []string{"a", "-b"}, false, ""},
		{[]string{"-", "--json"}, []string{"-"}, true, ""},
		{nil, nil, false, ""},
	}
	for _, tc := range tests {
		fs := newFlagSet(commands["info"])
		asJSON := fs.Bool("json", false, "")
		f := fs.String("f", "", "")
		pos, err := parseInterspersed(fs, tc.args)
		if err != nil {
			t.Errorf("%q: %v", tc.args, err)
			continue
		}
		if !reflect.DeepEqual(pos, tc.wantPos) || *asJSON != tc.wantJSON || *f != tc.wantF {
			t.Errorf("%q: positional %q json %v f %q, want %q %v %q", tc.args, pos, *asJSON, *f, tc.wantPos, tc.wantJSON, tc.wantF)
		}
	}
}

func TestSizeString(t *testing.T) {
	// Expected values follow qemu's size_to_str (and match qemu-img info).
	tests := []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{512, "512 B"},
		{999, "999 B"},
		{1000, "0.977 KiB"},
		{1024, "1 KiB"},
		{4096, "4 KiB"},
		{1585152, "1.51 MiB"},
		{100 << 20, "100 MiB"},
		{1 << 30, "1 GiB"},
		{64 << 30, "64 GiB"},
		{1<<40 + 1<<39, "1.5 TiB"},
		{1 << 62, "4 EiB"},
	}
	for _, tc := range tests {
		if got := sizeString(tc.n); got != tc.want {
			t.Errorf("sizeString(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}

func TestOneLine(t *testing.T) {
	tests := []struct{ in, want string }{
		{"plain", "plain"},
		{"a\nb\r\nc\n", "a; b; c"},
		{"esc\x1b[2Jx\x00y", "esc?[2Jx?y"},
		{"bad \xff utf8", "bad ? utf8"},
	}
	for _, tc := range tests {
		if got := oneLine(tc.in); got != tc.want {
			t.Errorf("oneLine(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// TestPanicIsOneLine checks the last-resort recover: a panic in a command
// becomes one "internal error" line and exit 1.
func TestPanicIsOneLine(t *testing.T) {
	commands["test-panic"] = &command{
		name: "test-panic",
		flags: func(*flag.FlagSet) func(*cli, []string) int {
			return func(*cli, []string) int { panic("boom\nsecond line") }
		},
	}
	defer delete(commands, "test-panic")
	r := execCLI("test-panic")
	wantOneLineError(t, r, "crashtest: internal error: boom; second line")
}

// TestBadFiles: files that are not images, or not the format asked for,
// give exit 1 and one line naming the problem, from every command.
func TestBadFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	garbage := make([]byte, 4096)
	for i := range garbage {
		garbage[i] = byte(i*7 + 3)
	}
	hugeL1 := make([]byte, 512)
	binary.BigEndian.PutUint32(hugeL1[0:], 0x514649FB)
	binary.BigEndian.PutUint32(hugeL1[4:], 2)
	binary.BigEndian.PutUint32(hugeL1[20:], 16)      // cluster_bits
	binary.BigEndian.PutUint64(hugeL1[24:], 1<<50)   // size
	binary.BigEndian.PutUint32(hugeL1[36:], 1<<31-1) // l1_size
	binary.BigEndian.PutUint64(hugeL1[40:], 1<<16)   // l1_table_offset

	files := []struct {
		name   string
		path   string
		format string // -f, if any
		want   string // in the error line
	}{
		{"missing", filepath.Join(dir, "missing.qcow2"), "", "no such file"},
		{"directory", dir, "", "could not open"},
		{"garbage as qcow2", write("garbage", garbage), "qcow2", "not a QCOW image"},
		{"empty as qcow", write("empty", nil), "qcow", "could not open"},
		{"magic only (probes as raw)", write("magic", []byte("QFI\xfb")), "qcow2", "could not open"},
		{"version 9", write("v9", append([]byte("QFI\xfb\x00\x00\x00\x09"), garbage[:100]...)), "", "version"},
		{"truncated v3 header", write("v3short", append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 64)...)), "", "could not open"},
		{"huge l1_size", write("hugel1", hugeL1), "", "l1_size"},
	}
	for _, f := range files {
		for _, cmd := range []string{"info", "check", "convert"} {
			t.Run(f.name+"/"+cmd, func(t *testing.T) {
				args := []string{cmd}
				if f.format != "" {
					args = append(args, "-f", f.format)
				}
				args = append(args, f.path)
				if cmd == "convert" {
					args = append(args, filepath.Join(t.TempDir(), "out.raw"))
				}
				wantOneLineError(t, execCLI(args...), f.want)
			})
		}
	}
}

// qemuImage describes an image made by qemu-img at test time.
type qemuImage struct {
	name string
	// make creates the image in dir and returns its path.
	make func(t *testing.T, dir string) string
}

func qemuImages() []qemuImage {
	create := func(format, opts, size string) func(t *testing.T, dir string) string {
		return func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "img."+format)
			args := []string{"create", "-q", "-f", format}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			qemutest.Img(t, append(args, p, size)...)
			qemutest.Script(t, format, p,
				"write -P 0x11 0 64k", "write -P 0x22 1M 3k", "write -P 0x33 5000 1000",
				"write -P 0x44 20M 1M")
			return p
		}
	}
	return []qemuImage{
		{"v1", create("qcow", "", "33M")},
		{"v1 odd size", create("qcow", "", "33554943")},
		{"v2 4k clusters", create("qcow2", "compat=0.10,cluster_size=4k", "24M")},
		{"v3 512-byte clusters", create("qcow2", "compat=1.1,cluster_size=512", "22M")},
		{"v3 2M clusters lazy refcounts", create("qcow2", "compat=1.1,cluster_size=2M,lazy_refcounts=on", "30M")},
		{"v3 extended l2 refcount_bits=1", create("qcow2", "compat=1.1,extended_l2=on,refcount_bits=1", "22032345")},
		{"v3 zero clusters and discard", func(t *testing.T, dir string) string {
			p := create("qcow2", "compat=1.1", "32M")(t, dir)
			qemutest.Script(t, "qcow2", p, "write -z 0 32k", "discard 1M 64k", "write -z -u 20M 512k")
			return p
		}},
		{"v3 zstd compressed", func(t *testing.T, dir string) string {
			raw := filepath.Join(dir, "data.raw")
			qemutest.WriteRandomRaw(t, raw, 3<<20, 42)
			p := filepath.Join(dir, "img.qcow2")
			qemutest.Img(t, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, p)
			return p
		}},
		{"v2 zlib compressed", func(t *testing.T, dir string) string {
			raw := filepath.Join(dir, "data.raw")
			qemutest.WriteRandomRaw(t, raw, 2<<20+4096, 43)
			p := filepath.Join(dir, "img.qcow2")
			qemutest.Img(t, "convert", "-c", "-O", "qcow2", "-o", "compat=0.10", raw, p)
			return p
		}},
		{"backing chain raw <- qcow2 <- qcow2", func(t *testing.T, dir string) string {
			base := filepath.Join(dir, "base.raw")
			qemutest.WriteRandomRaw(t, base, 4<<20, 44)
			mid := filepath.Join(dir, "mid.qcow2")
			top := filepath.Join(dir, "top.qcow2")
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "6M")
			qemutest.Script(t, "qcow2", mid, "write -P 0x55 64k 128k", "write -z 1M 64k")
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
			qemutest.Script(t, "qcow2", top, "write -P 0x66 100k 8k", "write -P 0 5M 64k")
			return top
		}},
		{"backing chain raw <- qcow", func(t *testing.T, dir string) string {
			base := filepath.Join(dir, "base.raw")
			qemutest.WriteRandomRaw(t, base, 3<<20, 45)
			top := filepath.Join(dir, "top.qcow")
			qemutest.Img(t, "create", "-q", "-f", "qcow", "-b", "base.raw", "-F", "raw", top, "5M")
			qemutest.Script(t, "qcow", top, "write -P 0x77 4k 12k")
			return top
		}},
		{"internal snapshots", func(t *testing.T, dir string) string {
			p := create("qcow2", "compat=1.1", "24M")(t, dir)
			qemutest.Img(t, "snapshot", "-c", "first", p)
			qemutest.Script(t, "qcow2", p, "write -P 0x99 0 128k")
			qemutest.Img(t, "snapshot", "-c", "second snapshot", p)
			qemutest.Script(t, "qcow2", p, "write -P 0xaa 64k 4k")
			return p
		}},
		{"preallocation=metadata", create("qcow2", "preallocation=metadata", "24M")},
	}
}

// TestQemuImages runs info, convert and check on images made by qemu-img
// and compares each with qemu-img's own answer.
func TestQemuImages(t *testing.T) {
	qemutest.Require(t)
	for _, img := range qemuImages() {
		t.Run(img.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			p := img.make(t, dir)

			t.Run("info", func(t *testing.T) {
				r := execCLI("info", p)
				if r.code != 0 || r.stderr != "" {
					t.Fatalf("info: %v", r)
				}
				compareInfoText(t, r.stdout, qemutest.Img(t, "info", p))
			})

			t.Run("info --json", func(t *testing.T) {
				r := execCLI("info", p, "--json")
				if r.code != 0 {
					t.Fatalf("info --json: %v", r)
				}
				var got struct {
					Format      string `json:"format"`
					VirtualSize int64  `json:"virtual-size"`
					ClusterSize int64  `json:"cluster-size"`
					Backing     string `json:"backing-filename"`
					Snapshots   []struct {
						Name string `json:"name"`
					} `json:"snapshots"`
				}
				if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
					t.Fatalf("info --json output is not JSON: %v\n%s", err, r.stdout)
				}
				want := qemutest.Info(t, p)
				if got.Format != want.Format || got.VirtualSize != want.VirtualSize ||
					got.ClusterSize != want.ClusterSize || got.Backing != want.BackingFilename ||
					len(got.Snapshots) != len(want.Snapshots) {
					t.Errorf("info --json = %+v, qemu-img says %+v", got, want)
				}
			})

			t.Run("convert", func(t *testing.T) {
				ours := filepath.Join(dir, "ours.raw")
				theirs := filepath.Join(dir, "theirs.raw")
				if r := execCLI("convert", "-O", "raw", p, ours); r.code != 0 || r.stdout != "" || r.stderr != "" {
					t.Fatalf("convert: %v", r)
				}
				qemutest.ConvertRaw(t, p, theirs)
				sameFile(t, ours, theirs)
			})

			t.Run("check", func(t *testing.T) {
				r := execCLI("check", p)
				want, qout := qemutest.Check(t, p)
				if want == 63 { // qemu-img cannot check QCOW v1; we can
					want = 0
				}
				if r.code != want {
					t.Errorf("check exit %d, qemu-img check exit %d\nours: %v\nqemu-img:\n%s", r.code, want, r, qout)
				}
				if want == 0 && !strings.Contains(r.stdout, "No errors were found on the image.") {
					t.Errorf("clean image, but check says:\n%v", r)
				}
			})
		})
	}
}

// compareInfoText compares our `info` text with qemu-img's line by line.
// Snapshot rows are compared up to the ICOUNT column, which we leave empty.
func compareInfoText(t *testing.T, ours, qemu string) {
	t.Helper()
	a := strings.Split(strings.TrimRight(ours, "\n"), "\n")
	b := strings.Split(strings.TrimRight(qemu, "\n"), "\n")
	if len(a) != len(b) {
		t.Fatalf("info has %d lines, qemu-img info %d\nours:\n%s\nqemu-img:\n%s", len(a), len(b), ours, qemu)
	}
	inSnapshots := false
	for i := range a {
		x, y := a[i], b[i]
		isRow := y != "" && y[0] >= '0' && y[0] <= '9'
		switch {
		case y == "Snapshot list:":
			inSnapshots = true
		case inSnapshots && isRow:
			x, y = strings.TrimRight(x[:min(len(x), 68)], " "), strings.TrimRight(y[:min(len(y), 68)], " ")
		case !strings.HasPrefix(y, "ID "):
			inSnapshots = false
		}
		if x != y {
			t.Errorf("info line %d: %q, qemu-img info: %q", i+1, x, y)
		}
	}
}

// sameFile fails unless the two files have identical contents.
func sameFile(t *testing.T, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	if err != nil {
		t.Fatal(err)
	}
	y, err := os.ReadFile(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(x) != len(y) {
		t.Fatalf("%s has %d bytes, %s %d", a, len(x), b, len(y))
	}
	if i := firstDiff(x, y); i >= 0 {
		t.Fatalf("%s and %s differ at byte %d: %#x vs %#x", a, b, i, x[i], y[i])
	}
}

func firstDiff(x, y []byte) int {
	if bytes.Equal(x, y) {
		return -1
	}
	for i := range x {
		if x[i] != y[i] {
			return i
		}
	}
	return len(x)
}

// pokeRefcount sets the 16-bit refcount of host cluster c of a QCOW2 image
// with 16-bit refcounts, in the first refcount block.
func pokeRefcount(t *testing.T, path string, c int64, val uint16) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var h [104]byte
	if _, err := f.ReadAt(h[:], 0); err != nil {
		t.Fatal(err)
	}
	var e [8]byte
	if _, err := f.ReadAt(e[:], int64(binary.BigEndian.Uint64(h[48:]))); err != nil {
		t.Fatal(err)
	}
	var v [2]byte
	binary.BigEndian.PutUint16(v[:], val)
	if _, err := f.WriteAt(v[:], int64(binary.BigEndian.Uint64(e[:]))+2*c); err != nil {
		t.Fatal(err)
	}
}

// TestCheckExitCodes: clean, leaking and corrupt images give qemu-img
// check's exit codes and messages, in text and JSON.
func TestCheckExitCodes(t *testing.T) {
	qemutest.Require(t)
	tests := []struct {
		name     string
		poke     func(t *testing.T, p string)
		wantCode int
		wantText string
	}{
		{"clean", func(*testing.T, string) {}, 0, "No errors were found on the image."},
		{"leak", func(t *testing.T, p string) {
			// Grow the file, then count an unused cluster as used.
			if err := os.Truncate(p, 1<<20); err != nil {
				t.Fatal(err)
			}
			pokeRefcount(t, p, 10, 1)
		}, 3, "1 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data."},
		{"corruption", func(t *testing.T, p string) {
			pokeRefcount(t, p, 0, 0) // the header cluster is in use
		}, 2, "errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it."},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", p, "100M")
			qemutest.Script(t, "qcow2", p, "write -P 1 0 64k")
			tc.poke(t, p)
			if code, out := qemutest.Check(t, p); code != tc.wantCode {
				t.Fatalf("test setup: qemu-img check exit %d, want %d\n%s", code, tc.wantCode, out)
			}
			r := execCLI("check", p)
			if r.code != tc.wantCode || !strings.Contains(r.stdout, tc.wantText) {
				t.Errorf("check: want exit %d and %q, got %v", tc.wantCode, tc.wantText, r)
			}
			var got map[string]any
			r = execCLI("check", "--output=json", p)
			if r.code != tc.wantCode {
				t.Errorf("check --output=json: exit %d, want %d", r.code, tc.wantCode)
			}
			if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
				t.Fatalf("check --json output is not JSON: %v\n%v", err, r)
			}
			var want map[string]any
			_, qout := qemutest.RunImg(t, "check", "--output=json", p)
			if err := json.Unmarshal([]byte(qout[strings.Index(qout, "{"):]), &want); err != nil {
				t.Fatalf("qemu-img check JSON: %v\n%s", err, qout)
			}
			// Every key qemu-img prints must have qemu-img's value.
			for k, v := range want {
				if !reflect.DeepEqual(got[k], v) {
					t.Errorf("check --json %q = %v, qemu-img: %v", k, got[k], v)
				}
			}
		})
	}
}

// TestCheckIgnoresBacking: check examines one file, so a missing backing
// file does not stop it; info without --backing-chain does not need it
// either, but convert and info --backing-chain do.
func TestCheckIgnoresBacking(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	qemutest.WriteRandomRaw(t, base, 1<<20, 1)
	p := filepath.Join(dir, "top.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p)
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	if r := execCLI("check", p); r.code != 0 {
		t.Errorf("check with a missing backing file: %v", r)
	}
	if r := execCLI("info", p); r.code != 0 || !strings.Contains(r.stdout, "backing file: base.raw") {
		t.Errorf("info with a missing backing file: %v", r)
	}
	wantOneLineError(t, execCLI("info", "--backing-chain", p), "base.raw")
	wantOneLineError(t, execCLI("convert", p, filepath.Join(dir, "out.raw")), "base.raw")
}

// TestConvertOverwrite: an existing destination is overwritten in place
// (same inode, old bytes gone), and the source or a backing file is never a
// destination.
func TestConvertOverwrite(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	qemutest.WriteRandomRaw(t, base, 2<<20, 7)
	p := filepath.Join(dir, "img.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", p, "3M")
	qemutest.Script(t, "qcow2", p, "write -P 0x5a 512k 64k")

	out := filepath.Join(dir, "out.raw")
	if err := os.WriteFile(out, bytes.Repeat([]byte{0xEE}, 5<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	before, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if r := execCLI("convert", p, out); r.code != 0 {
		t.Fatalf("convert over an existing file: %v", r)
	}
	after, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(before, after) {
		t.Errorf("convert replaced the destination instead of overwriting it")
	}
	want := filepath.Join(dir, "want.raw")
	qemutest.ConvertRaw(t, p, want)
	sameFile(t, out, want)

	for _, dst := range []string{p, base} {
		orig, err := os.ReadFile(dst)
		if err != nil {
			t.Fatal(err)
		}
		wantOneLineError(t, execCLI("convert", p, dst), "destination")
		now, err := os.ReadFile(dst)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(orig, now) {
			t.Errorf("refused convert changed %s", dst)
		}
	}
}

// TestConvertSparse64G: a 64 GiB qcow2 image with a few MiB of data
// converts in well under 2 s to a sparse file that takes little disk.
func TestConvertSparse64G(t *testing.T) {
	qemutest.Require(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "big.qcow2")
	qemutest.Img(t, "create", "-q", "-f", "qcow2", p, "64G")
	offsets := []int64{3 << 20, 5<<30 + 7*65536, 33<<30 + 512, 64<<30 - 2<<20}
	var cmds []string
	for i, off := range offsets {
		cmds = append(cmds, fmt.Sprintf("write -P %d %d 1M", 0xa0+i, off))
	}
	qemutest.Script(t, "qcow2", p, cmds...)

	out := filepath.Join(dir, "big.raw")
	start := time.Now()
	r := execCLI("convert", "-O", "raw", p, out)
	elapsed := time.Since(start)
	if r.code != 0 {
		t.Fatalf("convert: %v", r)
	}
	if elapsed > 2*time.Second {
		t.Errorf("convert of a sparse 64 GiB image took %v, want < 2s", elapsed)
	}
	t.Logf("converted 64 GiB sparse image in %v", elapsed)
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != 64<<30 {
		t.Errorf("output size %d, want %d", fi.Size(), int64(64<<30))
	}
	if used := fi.Sys().(*syscall.Stat_t).Blocks * 512; used >= 64<<20 {
		t.Errorf("output takes %d bytes of disk, want < 64 MiB", used)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20+8192)
	for i, off := range offsets {
		// The written MiB and 4 KiB of zeros on either side.
		start := max(off-4096, 0)
		n, _ := f.ReadAt(buf, start)
		for j := 0; j < n; j++ {
			at := start + int64(j)
			want := byte(0)
			if at >= off && at < off+1<<20 {
				want = byte(0xa0 + i)
			}
			if buf[j] != want {
				t.Fatalf("byte at %d is %#x, want %#x", at, buf[j], want)
			}
		}
	}
}

// crashtestBinary builds the command into a temporary directory.
func crashtestBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "crashtest")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestBinary runs the real executable: exit codes and streams as a user
// sees them.
func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := crashtestBinary(t)
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	data := bytes.Repeat([]byte("crashtest"), 10000)
	if err := os.WriteFile(raw, data, 0o644); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(dir, "garbage")
	if err := os.WriteFile(garbage, []byte("QFI\xfb\x00\x00\x00\x02 this is not a header"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args       []string
		wantCode   int
		wantStdout string
		wantStderr string
	}{
		{[]string{"info", raw}, 0, "file format: raw", ""},
		{[]string{"convert", "-f", "raw", raw, filepath.Join(dir, "copy.raw")}, 0, "", ""},
		{[]string{"info", garbage}, 1, "", "crashtest: could not open"},
		{[]string{"convert", garbage, filepath.Join(dir, "x.raw")}, 1, "", "crashtest: could not open"},
		{[]string{"check", garbage}, 1, "", "crashtest: could not open"},
		{[]string{"frobnicate"}, 1, "", `unknown command "frobnicate"`},
		{nil, 1, "", "usage: crashtest"},
	}
	for _, tc := range tests {
		cmd := exec.Command(bin, tc.args...)
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if code != tc.wantCode || !strings.Contains(stdout.String(), tc.wantStdout) || !strings.Contains(stderr.String(), tc.wantStderr) {
			t.Errorf("crashtest %q: exit %d, stdout %q, stderr %q; want exit %d, %q, %q",
				tc.args, code, stdout.String(), stderr.String(), tc.wantCode, tc.wantStdout, tc.wantStderr)
		}
		if tc.wantCode == 1 && len(tc.args) > 1 && strings.Count(stderr.String(), "\n") != 1 {
			t.Errorf("crashtest %q: stderr is not one line: %q", tc.args, stderr.String())
		}
	}
	got, err := os.ReadFile(filepath.Join(dir, "copy.raw"))
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("convert of a raw file did not copy it (err %v)", err)
	}
}
