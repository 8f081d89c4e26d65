package qcow

// Shared machinery of the Crash tests (`go test -run Crash ./...`): the
// configurations, the image setup over faultfs, the verdicts of DESIGN.md,
// one-line case IDs and the count of crash states checked.
//
//	crash_rapid_test.go       rapid state machines (TestCrashStateMachine)
//	crash_exhaustive_test.go  every torn state of small fixed workloads
//	crash_broken_test.go      deliberately broken writers must be caught
//	crash_units_test.go       unitVerifier and exDriver: judging states by
//	                          their pending units (TestCrashUnitVerifierAgrees)
//	crash_bench_test.go       BenchmarkCrashCheck

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// crashStates counts the crash states checked (opened, checked and compared
// with the model) by the Crash tests of this run; TestMain prints it.
var crashStates atomic.Int64

// crashRapidChecks is the number of rapid cases TestCrashStateMachine runs
// per configuration, with or without -short and the race detector, unless
// -rapid.checks=N (or RAPID_CHECKS=N) asks for N.
const crashRapidChecks = 20

func TestMain(m *testing.M) {
	flag.Parse()
	if f := flag.Lookup("rapid.checks"); f != nil {
		n := crashRapidChecks
		set := os.Getenv("RAPID_CHECKS") != ""
		flag.Visit(func(v *flag.Flag) { set = set || v == f })
		if set {
			n, _ = strconv.Atoi(f.Value.String())
		}
		// rapid.Check runs a fifth of -rapid.checks under -short: ask for
		// five times as many, so that -short runs as many cases as a full
		// run and the mutation score (scripts/mutation.sh, which runs the
		// -short suite) rests on them all.
		if testing.Short() {
			n *= 5
		}
		f.Value.Set(strconv.Itoa(n))
	}
	code := m.Run()
	if n := crashStates.Load(); n > 0 {
		fmt.Printf("qcow: crash states checked: %d\n", n)
	}
	os.Exit(code)
}

// lightTests reports whether the heaviest tests should run their reduced
// amount: under -short, and under the race detector.
func lightTests() bool { return testing.Short() || raceEnabled }

// crashLimitEnv names the environment variable that overrides the bound on
// the states visited per crash point by the exhaustive tests (default
// faultfs.DefaultLimit; under -short, 64).
const crashLimitEnv = "QCOWCRASH_EXHAUSTIVE_LIMIT"

// crashLimit returns the per-point state bound for exhaustive enumeration.
func crashLimit(t testing.TB) int {
	if s := os.Getenv(crashLimitEnv); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("%s=%q: want a positive integer", crashLimitEnv, s)
		}
		return n
	}
	if lightTests() {
		return 64
	}
	return faultfs.DefaultLimit
}

// crashConfig is an image configuration under test.
type crashConfig struct {
	version int   // 1 (QCOW), 2 or 3 (QCOW2)
	cs      int64 // cluster size
	backing bool  // the image has a raw backing file "base" with random contents
	rcBits  int   // refcount width (0: default)
}

// String is the configuration part of a case ID: "v3:cs=512:backing=0".
func (c crashConfig) String() string {
	s := fmt.Sprintf("v%d:cs=%d:backing=%d", c.version, c.cs, crashB2i(c.backing))
	if c.rcBits != 0 {
		s += fmt.Sprintf(":refbits=%d", c.rcBits)
	}
	return s
}

func crashB2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// crashConfigs are the configurations the state machines run: every
// version, small and large clusters, with and without a backing file.
func crashConfigs() []crashConfig {
	var cs []crashConfig
	for _, v := range []int{1, 2, 3} {
		for _, size := range []int64{512, 64 << 10} {
			for _, b := range []bool{false, true} {
				cs = append(cs, crashConfig{version: v, cs: size, backing: b})
			}
		}
	}
	return cs
}

// crashSetup creates, in a new memory FS, the image "img" of the given
// virtual size under configuration c and, with a backing file, the raw
// file "base" (three quarters of the disk, so that the end of the disk
// reads as zeros) filled with random bytes from seed. It returns the FS and
// the backing contents (nil without a backing file), which are the initial
// contents of the model.
func crashSetup(t crashTB, c crashConfig, size int64, seed uint64) (*vfs.MemFS, []byte) {
	t.Helper()
	mem := vfs.NewMem()
	o := CreateOptions{Size: size, ClusterSize: c.cs, RefcountBits: c.rcBits}
	switch c.version {
	case 1:
		o.Format = FormatQCOW
	case 2:
		o.Version = 2
	default:
		o.Version = 3
	}
	var base []byte
	if c.backing {
		base = crashData(size*3/4&^511, seed)
		f, err := mem.Create("base")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(base, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		o.BackingFile = "base"
		if c.version != 1 {
			o.BackingFormat = "raw"
		}
	}
	if err := Create(mem, "img", o); err != nil {
		t.Fatalf("%s: create: %v", c, err)
	}
	return mem, base
}

// crashTB is what the helpers need of a *testing.T, *testing.B or *rapid.T.
type crashTB interface {
	Helper()
	Fatalf(format string, args ...any)
	Fatal(args ...any)
}

// crashModel returns a fresh flat model of the disk.
func crashModel(size int64, base []byte) *model.Disk {
	if base == nil {
		return model.New(size, nil)
	}
	return model.New(size, bytes.NewReader(base))
}

// crashData returns n pseudo-random bytes from seed; no sector of it is
// all zeros, so that a lost write never looks like a zero write.
func crashData(n int64, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i < len(b); i += 8 {
		v := r.Uint64() | 1<<7 // at least one bit set in every 8 bytes
		for j := 0; j < 8 && i+j < len(b); j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// crashVerdict is a failed verdict of DESIGN.md: open, check, content,
// durability, usability or errors.
type crashVerdict struct {
	Verdict string
	Err     error
}

func (v *crashVerdict) Error() string { return v.Verdict + ": " + v.Err.Error() }

func (v *crashVerdict) Unwrap() error { return v.Err }

func verdictf(verdict, format string, args ...any) error {
	return &crashVerdict{verdict, fmt.Errorf(format, args...)}
}

// crashVerify judges the image "img" in fsys (a recovered crash state, or a
// cleanly closed image): it opens (verdict open), CheckFile finds no
// corruption (check) and, unless leaksFrom < 0, no leaked cluster at or
// after host offset leaksFrom (leaks before it are left by earlier crashes,
// which nothing repairs), and every sector holds a value the model allows
// (content; after a crash the model then adopts what it saw). Callers
// count crash states in crashStates.
func crashVerify(fsys vfs.FS, m *model.Disk, leaksFrom int64) error {
	return crashVerifyContent(fsys, leaksFrom, func(r io.ReaderAt) error { return m.Check(r) })
}

// crashVerifyContent is crashVerify with the content verdict given by
// content, which reads the disk through r.
func crashVerifyContent(fsys vfs.FS, leaksFrom int64, content func(r io.ReaderAt) error) error {
	im, res, err, openErr := crashOpenCheck(fsys)
	if im != nil {
		defer im.Close()
	}
	if err := crashCheckVerdict(res, err, leaksFrom); err != nil {
		return err
	}
	if openErr != nil {
		return &crashVerdict{"open", openErr}
	}
	if err := content(wtSizedReader{im}); err != nil {
		return &crashVerdict{"content", err}
	}
	return nil
}

// crashOpenCheck opens the image "img" of fsys and checks it: one open
// serves the check and then the content. When Open fails (openErr, and im
// is nil), CheckFile, which opens what Open refuses but qemu-img check
// reports on, gives the check result.
func crashOpenCheck(fsys vfs.FS) (im *Image, res *CheckResult, err, openErr error) {
	im, openErr = Open(fsys, "img", nil)
	if openErr == nil {
		res, err = im.Check()
	} else {
		res, err = CheckFile(fsys, "img", "")
	}
	return im, res, err, openErr
}

// crashCheckVerdict is the verdict on what Check (or CheckFile) returned:
// nil when it found no corruption, no check error and no leak that
// leaksFrom forbids (0: none; > 0: none at or beyond it; < 0: any allowed).
func crashCheckVerdict(res *CheckResult, err error, leaksFrom int64) error {
	if err != nil {
		var fe *FormatError
		if errors.As(err, &fe) || errors.Is(err, ErrNotQCOW) || errors.Is(err, ErrFormat) {
			return &crashVerdict{"open", err}
		}
		return &crashVerdict{"check", err}
	}
	leaks := 0
	if leaksFrom >= 0 {
		for _, f := range res.Findings {
			if f.Kind == Leak && f.Offset >= leaksFrom {
				leaks++
			}
		}
		if leaksFrom == 0 {
			leaks = res.Leaks
		}
	}
	if res.Corruptions > 0 || res.CheckErrors > 0 || leaks > 0 {
		return verdictf("check", "%d corruptions, %d check errors, %d leaks (%d not allowed): %s",
			res.Corruptions, res.CheckErrors, res.Leaks, leaks, crashFindings(res))
	}
	return nil
}

// crashFindings formats the first few findings.
func crashFindings(res *CheckResult) string {
	var b bytes.Buffer
	for i, f := range res.Findings {
		if i == 3 {
			fmt.Fprintf(&b, " ... (%d findings)", len(res.Findings))
			break
		}
		fmt.Fprintf(&b, "[%s at %#x: %s] ", f.Kind, f.Offset, f.Msg)
	}
	return b.String()
}

// crashUsable checks the usability verdict on a recovered image opened for
// writing: it accepts a new write (recorded in m) that reads back.
func crashUsable(im *Image, m *model.Disk, off int64, seed uint64) error {
	n := min(int64(700), im.Size()-off)
	if n <= 0 {
		return nil
	}
	p := crashData(n, seed)
	if _, err := im.WriteAt(p, off); err != nil {
		return verdictf("usability", "write %d bytes at %d after recovery: %w", n, off, err)
	}
	if err := m.Write(p, off); err != nil {
		return err
	}
	got := make([]byte, n)
	if _, err := im.ReadAt(got, off); err != nil {
		return verdictf("usability", "read back after recovery: %w", err)
	}
	if !bytes.Equal(got, p) {
		return verdictf("usability", "the write at %d after recovery does not read back", off)
	}
	return nil
}

// crashInjected reports whether err wraps an error injected by faultfs.
func crashInjected(err error) bool { return errors.Is(err, faultfs.ErrInjected) }

// crashMemImage returns a memory file system holding b as the file "img".
func crashMemImage(t testing.TB, b []byte) *vfs.MemFS {
	t.Helper()
	mem := vfs.NewMem()
	crashPutFile(t, mem, "img", b)
	return mem
}

// crashPutFile creates the file name in mem holding b.
func crashPutFile(t testing.TB, mem *vfs.MemFS, name string, b []byte) {
	t.Helper()
	f, err := mem.Create(name)
	if err == nil {
		_, err = f.WriteAt(b, 0)
	}
	if err == nil {
		err = f.Close()
	}
	if err != nil {
		t.Fatal(err)
	}
}
