package main

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// repairTImage makes a qcow2 image with qemu (4 MiB, 64 KiB clusters, the
// first 256 KiB written) and lets poke change its bytes; it returns the
// path.
func repairTImage(t *testing.T, opts string, poke func(b []byte)) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "img.qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	qemutest.Img(t, append(args, p, "4M")...)
	qemutest.Script(t, "qcow2", p, "write -P 1 0 256k")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	poke(b)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// repairTL2 returns the file offset of entry i of the first L2 table.
func repairTL2(b []byte, i int) int {
	be := binary.BigEndian
	l1 := be.Uint64(b[40:])
	l2 := be.Uint64(b[l1:]) & 0x00fffffffffffe00
	return int(l2) + 8*i
}

// repairTSetRefcount16 stores v as the 16-bit refcount of cluster k (the
// first refcount block covers it).
func repairTSetRefcount16(b []byte, k int, v uint16) {
	be := binary.BigEndian
	rb := be.Uint64(b[be.Uint64(b[48:]):])
	be.PutUint16(b[int(rb)+2*k:], v)
}

var (
	// A leak (L2 entry 3 freed) and a cleared COPIED flag (entry 1).
	repairTLeakCopied = func(b []byte) {
		binary.BigEndian.PutUint64(b[repairTL2(b, 3):], 0)
		e := repairTL2(b, 1)
		binary.BigEndian.PutUint64(b[e:], binary.BigEndian.Uint64(b[e:])&^(1<<63))
	}
	// The refcount of the data cluster of L2 entry 2 set to 0.
	repairTZeroRefcount = func(b []byte) {
		host := binary.BigEndian.Uint64(b[repairTL2(b, 2):]) & 0x00fffffffffffe00
		repairTSetRefcount16(b, int(host>>16), 0)
	}
)

func TestCheckRepairCLI(t *testing.T) {
	qemutest.Require(t)
	cases := []struct {
		name     string
		poke     func([]byte)
		args     []string
		exit     int
		want     []string
		notWant  []string
		qemuExit int // qemu-img check afterwards
	}{
		{"leaks", repairTLeakCopied, []string{"-r", "leaks"}, 0, []string{
			"refcount=1 reference=0\nRepairing cluster ", "Leaked cluster ",
			"Repairing OFLAG_COPIED data cluster",
			"The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n",
		}, nil, 0},
		{"all", repairTLeakCopied, []string{"-r", "all"}, 0, []string{
			"refcount=1 reference=0\nRepairing cluster ",
			"    1 leaked clusters\n    1 corruptions\n",
			"Double checking the fixed image now...\nNo errors were found on the image.\n",
		}, nil, 0},
		{"leaks-on-corruption", repairTZeroRefcount, []string{"-r", "leaks"}, 2, []string{
			"refcount=0 reference=1", "errors were found on the image",
		}, []string{"Repairing", "The following inconsistencies"}, 2},
		{"all-on-corruption", repairTZeroRefcount, []string{"-r", "all"}, 0, []string{
			"refcount=0 reference=1 (a data cluster)\nRepairing cluster ",
			" refcount=0 reference=1\nThe following inconsistencies",
			"    0 leaked clusters\n",
			"No errors were found on the image.\n",
		}, nil, 0},
		{"clean", func([]byte) {}, []string{"-r", "all"}, 0, []string{"No errors were found on the image.\n"},
			[]string{"Repairing", "The following inconsistencies"}, 0},
		{"no-refblock", func(b []byte) {
			be := binary.BigEndian
			be.PutUint64(b[be.Uint64(b[48:]):], 0)
		}, []string{"-r", "all"}, 2, []string{"ERROR could not repair cluster", "missing or unsound"}, []string{"Repairing"}, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := repairTImage(t, "", tc.poke)
			r := execCLI(append(append([]string{"check"}, tc.args...), p)...)
			if r.code != tc.exit {
				t.Errorf("exit %d, want %d\n%v", r.code, tc.exit, r)
			}
			if r.stderr != "" {
				t.Errorf("stderr: %q", r.stderr)
			}
			for _, w := range tc.want {
				if !strings.Contains(r.stdout, w) {
					t.Errorf("stdout does not contain %q:\n%s", w, r.stdout)
				}
			}
			for _, w := range tc.notWant {
				if strings.Contains(r.stdout, w) {
					t.Errorf("stdout contains %q:\n%s", w, r.stdout)
				}
			}
			if code, out := qemutest.Check(t, p); code != tc.qemuExit {
				t.Errorf("qemu-img check afterwards: exit %d, want %d\n%s", code, tc.qemuExit, out)
			}
			// A second plain check agrees with the exit status.
			if r2 := execCLI("check", p); r2.code != tc.exit {
				t.Errorf("check after repair: exit %d, want %d\n%v", r2.code, tc.exit, r2)
			}
		})
	}
}

func TestCheckRepairCLIJSON(t *testing.T) {
	qemutest.Require(t)
	p := repairTImage(t, "", repairTLeakCopied)
	r := execCLI("check", "--json", "-r", "all", p)
	if r.code != 0 {
		t.Fatalf("%v", r)
	}
	var out struct {
		Leaks            *int `json:"leaks"`
		Corruptions      *int `json:"corruptions"`
		LeaksFixed       int  `json:"leaks-fixed"`
		CorruptionsFixed int  `json:"corruptions-fixed"`
		Filename         string
	}
	if err := json.Unmarshal([]byte(r.stdout), &out); err != nil {
		t.Fatalf("bad JSON: %v\n%s", err, r.stdout)
	}
	if out.LeaksFixed != 1 || out.CorruptionsFixed != 1 || out.Leaks != nil || out.Corruptions != nil || out.Filename != p {
		t.Fatalf("JSON %+v\n%s", out, r.stdout)
	}
	// qemu-img check -r all --output=json reports the same repairs.
	q := repairTImage(t, "", repairTLeakCopied)
	code, qout := qemutest.RunImg(t, "check", "--output=json", "-r", "all", q)
	if code != 0 || !strings.Contains(qout, `"leaks-fixed": 1`) || !strings.Contains(qout, `"corruptions-fixed": 1`) {
		t.Errorf("qemu-img check -r all: exit %d\n%s", code, qout)
	}
}

func TestCheckRepairCLIErrors(t *testing.T) {
	qemutest.Require(t)
	p := repairTImage(t, "", repairTLeakCopied)
	orig, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	r := execCLI("check", "-r", "errors", p)
	wantOneLineError(t, r, "leaks or all")

	// Another writer holds the lock: the repair is refused, the file
	// unchanged.
	f, err := vfs.OS.Open(p, vfs.ReadWrite)
	if err != nil {
		t.Fatal(err)
	}
	r = execCLI("check", "-r", "leaks", p)
	f.Close()
	wantOneLineError(t, r, "could not repair", "locked")
	if now, _ := os.ReadFile(p); string(now) != string(orig) {
		t.Fatal("a refused repair changed the file")
	}
	r = execCLI("check", "-r", "all", filepath.Join(t.TempDir(), "missing.qcow2"))
	wantOneLineError(t, r, "could not repair")

	// Raw images have nothing to repair.
	raw := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(raw, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := execCLI("check", "-r", "all", raw); r.code != 0 || strings.Contains(r.stdout, "Repairing") {
		t.Errorf("raw: %v", r)
	}
}
