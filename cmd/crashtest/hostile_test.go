package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qcowcrash/qcowcrash/internal/hostile"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
)

// Bounds every command must meet on every hostile image.
const (
	hostileTimeout  = 2 * time.Second
	hostileMaxRSSKB = 256 << 10 // Maxrss is in KiB
)

// hostileBinary builds crashtest into a temporary directory of t.
func hostileBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "crashtest")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// hostileResult is one run of the binary.
type hostileResult struct {
	args           []string
	code           int
	stdout, stderr string
	rssKB          int64
	elapsed        time.Duration
}

func (r hostileResult) String() string {
	return fmt.Sprintf("crashtest %s: exit %d after %v, max RSS %d KiB\nstdout: %.600q\nstderr: %q",
		strings.Join(r.args, " "), r.code, r.elapsed.Round(time.Millisecond), r.rssKB, r.stdout, r.stderr)
}

// hostileExec runs the binary with a deadline and checks the bounds every
// command shares: it exits by itself within the deadline, without a panic,
// under the memory limit.
func hostileExec(t *testing.T, bin string, args ...string) hostileResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), hostileTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	start := time.Now()
	err := cmd.Run()
	r := hostileResult{args: args, stdout: out.String(), stderr: errOut.String(), elapsed: time.Since(start)}
	if ctx.Err() != nil {
		t.Fatalf("did not finish within %v: %v", hostileTimeout, r)
	}
	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr):
		r.code = exitErr.ExitCode()
	default:
		t.Fatalf("run: %v", err)
	}
	// Linux carries the parent's RSS high-water mark into a child started
	// with vfork+exec, so Maxrss is an upper bound: the larger of this
	// test process's peak (kept small: about 20 MiB) and the child's own.
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		r.rssKB = int64(ru.Maxrss)
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		t.Fatalf("killed by signal %v: %v", ws.Signal(), r)
	}
	if strings.Contains(r.stderr, "panic:") || strings.Contains(r.stderr, "goroutine ") {
		t.Fatalf("panic: %v", r)
	}
	if r.rssKB > hostileMaxRSSKB {
		// The child's figure is max(this process's RSS at fork, its own
		// peak). Only when it exceeds this process's own peak is it the
		// child's (e.g. under -race this process alone can exceed the cap).
		var self syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &self); err == nil && int64(self.Maxrss) >= r.rssKB {
			t.Logf("max RSS %d MiB not attributable to the child (this test process peaked at %d MiB)", r.rssKB>>10, self.Maxrss>>10)
		} else {
			t.Errorf("max RSS %d MiB exceeds %d MiB: %v", r.rssKB>>10, hostileMaxRSSKB>>10, r)
		}
	}
	return r
}

// hostileOneLine checks the error contract of a failed info or convert: exit
// 1 with exactly one stderr line starting with "crashtest: ".
func hostileOneLine(t *testing.T, r hostileResult) {
	t.Helper()
	if !strings.HasPrefix(r.stderr, "crashtest: ") || !strings.HasSuffix(r.stderr, "\n") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("stderr is not one line starting with \"crashtest: \": %v", r)
	}
}

// hostileWrite writes v's files into a new directory and returns the path
// of its main image.
func hostileWrite(t *testing.T, v hostile.Variant) string {
	t.Helper()
	dir := t.TempDir()
	for name, data := range v.Files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, v.Main)
}

// TestHostileCLI runs info, convert -O raw and check on every hostile
// variant (every fourth of the in-header truncations) through the real
// binary: each exits by itself within 2 s and 256 MiB without a panic;
// info and convert exit 0 or 1 (1 with a one-line error naming the field),
// check exits 1, 2 or 3 (0 only when info or convert flagged the image);
// and every variant but the benign ones is flagged by one of them.
//
// A last subtest compares check with qemu-img check (hostileQemu).
func TestHostileCLI(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the binary three times per hostile variant")
	}
	bin := hostileBinary(t)
	t.Run("variants", func(t *testing.T) { hostileVariantsCLI(t, bin) })
	t.Run("qemu", func(t *testing.T) { hostileQemu(t, bin) })
}

func hostileVariantsCLI(t *testing.T, bin string) {
	for _, v := range hostile.Variants() {
		if hostileSkipTruncation(v.Name) {
			continue
		}
		t.Run(v.Name, func(t *testing.T) {
			t.Parallel()
			img := hostileWrite(t, v)
			var fflag []string
			if v.Format != "" {
				fflag = []string{"-f", v.Format}
			}
			info := hostileExec(t, bin, append(append([]string{"info"}, fflag...), img)...)
			dst := filepath.Join(t.TempDir(), "out.raw")
			conv := hostileExec(t, bin, append(append([]string{"convert"}, fflag...), "-O", "raw", img, dst)...)
			check := hostileExec(t, bin, append(append([]string{"check"}, fflag...), img)...)

			t.Logf("info %d, convert %d, check %d; max RSS %d/%d/%d KiB", info.code, conv.code, check.code, info.rssKB, conv.rssKB, check.rssKB)
			for _, r := range []hostileResult{info, conv} {
				switch r.code {
				case 0:
				case 1:
					hostileOneLine(t, r)
				default:
					t.Errorf("exit %d, want 0 or 1: %v", r.code, r)
				}
			}
			if check.code == 1 {
				hostileOneLine(t, check)
			}
			w := v.Want
			saysCorrupt := info.code == 0 && strings.Contains(info.stdout, "corrupt: true")
			flaggedElsewhere := info.code == 1 || conv.code == 1 || saysCorrupt
			switch check.code {
			case 1, 2, 3:
			case 0:
				if !flaggedElsewhere && w.Stage != hostile.Benign {
					t.Errorf("check says clean and neither info nor convert flagged the image:\n%v\n%v\n%v", info, conv, check)
				}
			default:
				t.Errorf("check exit %d, want 0..3: %v", check.code, check)
			}

			if w.Stage == hostile.Benign {
				if info.code != 0 || conv.code != 0 {
					t.Errorf("benign variant refused:\n%v\n%v", info, conv)
				}
				if w.Corrupt && !saysCorrupt {
					t.Errorf("info does not say the image is corrupt: %v", info)
				}
				if !w.Corrupt && check.code != 0 {
					t.Errorf("check flags a benign variant: %v", check)
				}
				return
			}
			if !flaggedElsewhere && check.code == 0 {
				t.Fatalf("not flagged by info, convert or check:\n%v\n%v\n%v", info, conv, check)
			}
			// The stage says which command must fail: Open and read errors
			// stop convert; snapshot table errors stop info.
			switch w.Stage {
			case hostile.AtOpen, hostile.AtRead:
				if conv.code != 1 {
					t.Errorf("convert succeeded on an image that must fail at %v: %v", w.Stage, conv)
				}
			case hostile.AtInfo:
				if info.code != 1 && conv.code != 1 {
					t.Errorf("neither info nor convert failed on an image that must fail at %v:\n%v\n%v", w.Stage, info, conv)
				}
			}
			if w.Field != "" {
				for _, r := range []hostileResult{info, conv} {
					if r.code == 1 && !strings.Contains(r.stderr, w.Field) {
						t.Errorf("error does not name the field %s: %v", w.Field, r)
					}
				}
			}
			if w.Text != "" && conv.code == 1 && !strings.Contains(conv.stderr, w.Text) {
				t.Errorf("error does not contain %q: %v", w.Text, conv)
			}
		})
	}
}

// hostileSkipTruncation thins out the files truncated inside the header
// (one per byte offset; the qcow package's hostile test runs all of them
// in-process): the CLI runs every fourth offset, which still crosses every
// field, to keep the test fast.
func hostileSkipTruncation(name string) bool {
	i := strings.LastIndex(name, "/truncated-")
	if i < 0 {
		return false
	}
	var n int
	if _, err := fmt.Sscanf(name[i:], "/truncated-%d", &n); err != nil {
		return false // truncated-at-TABLE: always run
	}
	return n%4 != 3
}

// hostileQemuExtra are variants compared with qemu-img check besides those
// only a structural check can flag.
var hostileQemuExtra = map[string]bool{
	"v2/l2-entry-reserved-bits": true, "v2/l2-entry-zero-flag-v2": true, "v2/compressed-copied": true,
	"v2/l2-entry-beyond-eof": true, "v3/l1-entry-reserved-bits": true, "v3-extl2/bitmap-alloc-and-zero": true,
	"v3/corrupt-bit": true, "v3-extl2/compressed-bomb": true, "v3/crypt-method-2": true,
	"v3/truncated-at-refcount-block-1024": true,
}

// hostileQemu compares check with qemu-img check on a handful of hostile
// variants (those only a structural check can flag, and a few more; none
// names a backing or data file, which qemu would follow): where qemu finds
// corruption, ours must not say clean.
func hostileQemu(t *testing.T, bin string) {
	qemuImg, _ := qemutest.Require(t)
	var mu sync.Mutex
	compared, corrupt := 0, 0
	t.Cleanup(func() {
		t.Logf("compared %d variants with qemu-img check; qemu found %d corrupt", compared, corrupt)
		if compared > 0 && corrupt == 0 {
			t.Errorf("qemu-img check found no corrupt variant: the comparison tests nothing")
		}
	})
	for _, v := range hostile.Variants() {
		pick := v.Want.Stage == hostile.AtCheck && !strings.Contains(v.Name, "truncated") || hostileQemuExtra[v.Name]
		if !pick || strings.Contains(v.Name, "backing") || strings.Contains(v.Name, "chain/") || strings.Contains(v.Name, "data-file") {
			continue
		}
		t.Run(v.Name, func(t *testing.T) {
			t.Parallel()
			img := hostileWrite(t, v)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, qemuImg, "check", img).CombinedOutput()
			qcode := 0
			var exitErr *exec.ExitError
			switch {
			case err == nil:
			case errors.As(err, &exitErr):
				qcode = exitErr.ExitCode() // -1 when qemu-img crashed (crypt_method 2)
			default:
				t.Fatalf("qemu-img check: %v", err)
			}
			ours := hostileExec(t, bin, "check", img)
			mu.Lock()
			compared++
			if qcode == 2 {
				corrupt++
			}
			mu.Unlock()
			if qcode == 2 {
				if ours.code == 0 {
					t.Errorf("qemu-img check finds corruption, ours says clean:\n%s\n%v", out, ours)
				}
			}
			t.Logf("qemu-img check exit %d, ours %d", qcode, ours.code)
		})
	}
}
