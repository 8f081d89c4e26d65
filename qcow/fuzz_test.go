package qcow_test

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/qcowcrash/qcowcrash/internal/hostile"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// fuzzDir and fuzzName place the fuzz input in the in-memory file system:
// backing file names resolve next to it, so "img" names the input itself.
const (
	fuzzDir  = "/fuzz"
	fuzzName = "img"
	// fuzzHang is when a running input is declared hung.
	fuzzHang = 20 * time.Second
	// fuzzCorpusMax bounds the size of a stored corpus file.
	fuzzCorpusMax = 8 << 10
)

// FuzzOpen opens arbitrary bytes as an image and exercises everything a
// reader does with it: Info (snapshots included), reading the whole disk
// (or samples of a large one), a BlockStatus walk and Check. Nothing may
// panic, and each input must be done within two seconds.
//
// Seeds: every base and hostile variant of internal/hostile (added below)
// and the files in testdata/fuzz/FuzzOpen (small images written by
// TestFuzzCorpus, plus crashers kept as regressions).
func FuzzOpen(f *testing.F) {
	for _, b := range hostile.Bases() {
		f.Add(b.Files[b.Main])
	}
	for _, v := range hostile.Variants() {
		f.Add(v.Files[v.Main])
	}
	for _, s := range hostile.TinySeeds() {
		f.Add(s.Data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		start := time.Now()
		// A hung input would stall the fuzzer silently: crash the worker
		// with every goroutine's stack instead, so the input is saved.
		watchdog := time.AfterFunc(fuzzHang, func() {
			buf := make([]byte, 1<<20)
			panic(fmt.Sprintf("FuzzOpen: input still running after %v:\n%s", fuzzHang, buf[:runtime.Stack(buf, true)]))
		})
		defer watchdog.Stop()
		fsys := vfs.NewMem()
		fl, err := fsys.Create(filepath.Join(fuzzDir, fuzzName))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := fl.WriteAt(data, 0); err != nil {
			t.Fatal(err)
		}
		fl.Close()
		fuzzOne(t, fsys)
		if d := time.Since(start); d > hostileTimeout {
			t.Errorf("input took %v, limit %v", d, hostileTimeout)
		}
	})
}

func fuzzOne(t *testing.T, fsys vfs.FS) {
	im, err := qcow.Open(fsys, filepath.Join(fuzzDir, fuzzName), nil)
	if err != nil {
		fuzzCheckErr(t, "open", err)
		return
	}
	defer im.Close()
	if _, err := im.Info(); err != nil {
		fuzzCheckErr(t, "info", err)
	}
	if _, err := im.Snapshots(); err != nil {
		fuzzCheckErr(t, "snapshots", err)
	}
	size := im.Size()
	if size < 0 {
		t.Fatalf("negative size %d", size)
	}
	buf := make([]byte, hostileChunk)
	readAt := func(off int64) bool {
		n := min(int64(len(buf)), size-off)
		got, err := im.ReadAt(buf[:n], off)
		if got < 0 || int64(got) > n {
			t.Fatalf("ReadAt(%d bytes at %d) returned %d", n, off, got)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			fuzzCheckErr(t, "read", err)
			return false
		}
		if int64(got) != n {
			t.Fatalf("ReadAt(%d bytes at %d) returned %d bytes and %v", n, off, got, err)
		}
		return true
	}
	if size <= hostileReadAll {
		for off := int64(0); off < size; off += hostileChunk {
			if !readAt(off) {
				break
			}
		}
	} else {
		for _, off := range []int64{0, size / 2 &^ 511, size - hostileChunk} {
			if !readAt(off) {
				break
			}
		}
	}
	off := int64(0)
	for i := 0; i < hostileMaxStatus && off < size; i++ {
		n, _, err := im.BlockStatus(off, size-off)
		if err != nil {
			fuzzCheckErr(t, "block status", err)
			break
		}
		if n <= 0 || n > size-off {
			t.Fatalf("BlockStatus(%d, %d) returned length %d", off, size-off, n)
		}
		off += n
	}
	res, err := im.Check()
	if err != nil {
		if !strings.Contains(err.Error(), "not implemented") {
			fuzzCheckErr(t, "check", err)
		}
		return
	}
	if res.Corruptions < 0 || res.Leaks < 0 || res.CheckErrors < 0 || len(res.Findings) > res.Corruptions+res.Leaks+res.CheckErrors {
		t.Fatalf("check result inconsistent: %d corruptions, %d leaks, %d check errors, %d findings",
			res.Corruptions, res.Leaks, res.CheckErrors, len(res.Findings))
	}
}

// fuzzCheckErr asserts the error contract: one line, wrapping one of the
// package's sentinels (or fs.ErrNotExist for a missing file the image
// names).
func fuzzCheckErr(t *testing.T, step string, err error) {
	t.Helper()
	msg := err.Error()
	if strings.ContainsAny(msg, "\n\r") {
		t.Errorf("%s: error is not one line: %q", step, msg)
	}
	for _, s := range hostileSentinels {
		if errors.Is(err, s) {
			return
		}
	}
	t.Errorf("%s: error %q wraps none of the package's sentinels", step, msg)
}

// fuzzCorpusFile encodes data as a Go fuzz corpus file.
func fuzzCorpusFile(data []byte) []byte {
	return fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", data)
}

// TestFuzzCorpus keeps testdata/fuzz/FuzzOpen in step with the builder:
// every tiny seed (and every hostile variant that encodes in under 8 KiB,
// apart from the truncations, which are prefixes of the bases) has a
// corpus file with exactly the builder's bytes. Run with
// QCOW_WRITE_FUZZ_CORPUS=1 to (re)write them; other files in the directory
// (crashers kept as regressions) are left alone.
func TestFuzzCorpus(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzOpen")
	want := map[string][]byte{}
	for _, s := range hostile.TinySeeds() {
		enc := fuzzCorpusFile(s.Data)
		if len(enc) >= fuzzCorpusMax {
			t.Errorf("tiny seed %s encodes to %d bytes, limit %d", s.Name, len(enc), fuzzCorpusMax)
		}
		want["seed-"+s.Name] = enc
	}
	for _, v := range hostile.Variants() {
		if strings.Contains(v.Name, "truncated") {
			continue
		}
		if enc := fuzzCorpusFile(v.Files[v.Main]); len(enc) < fuzzCorpusMax {
			want["variant-"+strings.ReplaceAll(v.Name, "/", "-")] = enc
		}
	}
	if os.Getenv("QCOW_WRITE_FUZZ_CORPUS") == "1" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, enc := range want {
			if err := os.WriteFile(filepath.Join(dir, name), enc, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	for name, enc := range want {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Errorf("corpus file missing (run with QCOW_WRITE_FUZZ_CORPUS=1): %v", err)
			continue
		}
		if string(got) != string(enc) {
			t.Errorf("corpus file %s differs from the builder's image (run with QCOW_WRITE_FUZZ_CORPUS=1)", name)
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if info, err := e.Info(); err == nil && info.Size() >= fuzzCorpusMax {
			t.Errorf("corpus file %s is %d bytes, limit %d", e.Name(), info.Size(), fuzzCorpusMax)
		}
	}
}

// TestFuzzTinySeeds checks that the tiny corpus seeds are valid images
// (except the self-backed ones, which must be refused as loops).
func TestFuzzTinySeeds(t *testing.T) {
	for _, s := range hostile.TinySeeds() {
		t.Run(s.Name, func(t *testing.T) {
			fsys := hostileMemFS(t, fuzzDir, map[string][]byte{fuzzName: s.Data})
			im, err := qcow.Open(fsys, filepath.Join(fuzzDir, fuzzName), nil)
			if strings.Contains(s.Name, "self") {
				if !errors.Is(err, qcow.ErrBacking) {
					t.Fatalf("open: %v, want a backing loop", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("open: %v", err)
			}
			defer im.Close()
			buf := make([]byte, im.Size())
			if _, err := im.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
				t.Fatalf("read: %v", err)
			}
			res, err := im.Check()
			switch {
			case err != nil && strings.Contains(err.Error(), "not implemented"):
				t.Logf("check: %v", err)
			case err != nil:
				t.Fatalf("check: %v", err)
			case res.Corruptions != 0 || res.Leaks != 0 || res.CheckErrors != 0:
				t.Errorf("check: %+v", res.Findings)
			}
		})
	}
}
