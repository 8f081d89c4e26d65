package qcow

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// wtDiffCase is one configuration of the differential test.
type wtDiffCase struct {
	format   Format // FormatQCOW or FormatQCOW2
	version  int    // 2 or 3 for QCOW2
	cs       int64
	backing  bool
	chain    bool // the backing file is itself a qcow2 over a raw file
	compress bool // start from a qemu-compressed image
	snapshot bool // with an internal snapshot taken by qemu
	through  bool // our writer in write-through mode
}

func (c wtDiffCase) String() string {
	s := fmt.Sprintf("%s-v%d-%d", c.format, c.version, c.cs)
	if c.backing {
		s += "-backing"
	}
	if c.chain {
		s += "-chain"
	}
	if c.compress {
		s += "-compressed"
	}
	if c.snapshot {
		s += "-snapshot"
	}
	if c.through {
		s += "-writethrough"
	}
	return s
}

// wtDiffCases covers every version with cluster sizes 512, 4k, 64k and 2M
// (QCOW version 1 stops at 64k), with and without a backing file, and
// QCOW2 images holding compressed clusters and internal snapshots.
func wtDiffCases() []wtDiffCase {
	var cs []wtDiffCase
	i := 0
	for _, f := range []struct {
		format  Format
		version int
	}{{FormatQCOW2, 3}, {FormatQCOW2, 2}, {FormatQCOW, 1}} {
		for _, size := range []int64{512, 4096, 65536, 2 << 20} {
			if f.format == FormatQCOW && size > 65536 {
				continue
			}
			for _, backing := range []bool{false, true} {
				if f.format == FormatQCOW && backing && size > 512 {
					// qemu's QCOW writer does not copy the backing file
					// into the rest of a new cluster (only the sectors
					// its read-modify-write touches), so qemu-io is no
					// reference there; qemu itself makes such images with
					// 512-byte clusters. Our writer copies the backing
					// file (TestWriteBackingCOW checks it).
					continue
				}
				c := wtDiffCase{format: f.format, version: f.version, cs: size, backing: backing, through: i%3 == 1}
				if f.format == FormatQCOW2 {
					// raw <- qcow2 <- image chains at 4k and 64k clusters.
					c.chain = backing && (size == 4096 || size == 65536)
					c.compress = i%2 == 0
					c.snapshot = i%4 < 2
				}
				cs = append(cs, c)
				i++
			}
		}
	}
	return cs
}

// TestDiffQemuIO applies one seeded random qemu-io script of writes, zero
// writes and flushes to two copies of an image made by qemu: qemu-io writes
// one, our writer (parsing the same script) the other. qemu-img compare must
// find them identical and qemu-img check must find ours clean. A failure
// prints the seed; QEMUTEST_SEED=<root> replays it.
//
// Each configuration runs wtDiffScripts() scripts (10 by default, so 220 in
// all; 1 under -short or -race; QCOWCRASH_DIFF_SCRIPTS=N for more).
func TestDiffQemuIO(t *testing.T) {
	qemutest.Require(t)
	n := wtDiffScripts()
	for _, c := range wtDiffCases() {
		t.Run(c.String(), func(t *testing.T) {
			t.Parallel()
			// One starting image (and backing file) per configuration;
			// each script runs on fresh copies of it.
			dir := t.TempDir()
			start := filepath.Join(dir, "start")
			wtBuildStart(t, c, dir, start, wtDiskSize(c.cs), qemutest.Seed(t, "diff/"+c.String()))
			for k := range n {
				t.Run(fmt.Sprintf("script%d", k), func(t *testing.T) {
					seed := qemutest.Seed(t, fmt.Sprintf("diff/%s/%d", c, k))
					wtRunDiffFrom(t, c, dir, start, fmt.Sprint(k), seed, 40)
				})
			}
		})
	}
	t.Logf("%d configurations x %d seeded qemu-io scripts", len(wtDiffCases()), n)
}

// wtDiffScripts is the number of scripts per configuration.
func wtDiffScripts() int {
	if v, err := strconv.Atoi(os.Getenv("QCOWCRASH_DIFF_SCRIPTS")); err == nil && v > 0 {
		return v
	}
	if lightTests() {
		return 1
	}
	return 10
}

// wtDiskSize is the virtual size used for a cluster size: big enough for a
// few L2 tables with small clusters, small enough to stay fast.
func wtDiskSize(cs int64) int64 {
	switch {
	case cs <= 4096:
		return 4*wtMiB + 3*512
	case cs <= 65536:
		return 8*wtMiB + 512
	}
	return 12*wtMiB + 512
}

// wtBuildStart makes the starting image at path (and its backing file).
func wtBuildStart(t *testing.T, c wtDiffCase, dir, path string, size int64, seed uint64) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 1))
	var bopt []string
	if c.backing {
		base := filepath.Join(dir, "base.raw")
		if err := os.WriteFile(base, qemutest.RandomData(size-3*512, seed), 0o644); err != nil {
			t.Fatal(err)
		}
		bopt = []string{"-b", "base.raw", "-F", "raw"}
		if c.chain {
			// A middle qcow2 layer with data of its own and zero clusters.
			mid := filepath.Join(dir, "mid.qcow2")
			qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", fmt.Sprintf("compat=%s,cluster_size=%d", map[int]string{2: "0.10", 3: "1.1"}[c.version], c.cs),
				"-b", "base.raw", "-F", "raw", mid, strconv.FormatInt(size, 10))
			var mcmds []string
			for range 8 {
				off, n := wtRandWrite(r, size, c.cs)
				if c.version == 3 && r.IntN(3) == 0 {
					mcmds = append(mcmds, fmt.Sprintf("write -z %d %d", off, n))
				} else {
					mcmds = append(mcmds, fmt.Sprintf("write -P %#x %d %d", 1+r.IntN(250), off, n))
				}
			}
			qemutest.Script(t, "qcow2", mid, mcmds...)
			bopt = []string{"-b", "mid.qcow2", "-F", "qcow2"}
		}
	}
	fmtName := string(c.format)
	tmp := path
	if c.compress {
		tmp = path + ".pre"
	}
	if c.format == FormatQCOW {
		o := CreateOptions{Format: FormatQCOW, Size: size, ClusterSize: c.cs}
		if c.backing {
			o.BackingFile = "base.raw"
		}
		if err := Create(vfs.OS, tmp, o); err != nil {
			t.Fatal(err)
		}
	} else {
		opts := fmt.Sprintf("compat=%s,cluster_size=%d", map[int]string{2: "0.10", 3: "1.1"}[c.version], c.cs)
		args := append([]string{"create", "-f", "qcow2", "-o", opts}, bopt...)
		qemutest.Img(t, append(args, tmp, strconv.FormatInt(size, 10))...)
	}
	// Prefill: data in some clusters, zeros in others (v3: zero clusters).
	var cmds []string
	for range 12 {
		off, n := wtRandWrite(r, size, c.cs)
		if r.IntN(4) == 0 {
			cmds = append(cmds, fmt.Sprintf("write -z %d %d", off, n))
		} else {
			cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", 1+r.IntN(250), off, n))
		}
	}
	qemutest.Script(t, fmtName, tmp, cmds...)
	if c.compress {
		opts := fmt.Sprintf("compat=%s,cluster_size=%d", map[int]string{2: "0.10", 3: "1.1"}[c.version], c.cs)
		args := []string{"convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", opts}
		if c.backing {
			// Keep the backing file: convert only this layer.
			args = append(args, "-B", bopt[1], "-F", bopt[3])
		}
		// qemu-img resolves the backing name relative to the output.
		qemutest.Img(t, append(args, tmp, path)...)
		os.Remove(tmp)
	}
	if c.snapshot {
		qemutest.Img(t, "snapshot", "-c", "snap1", path)
		// Diverge from the snapshot a little, so the active tables are
		// partly shared and partly not.
		off, n := wtRandWrite(r, size, c.cs)
		qemutest.Script(t, fmtName, path, fmt.Sprintf("write -P 0x77 %d %d", off, n))
	}
}

// wtScript draws a random qemu-io script.
func wtScript(r *rand.Rand, size, cs int64, n int) []string {
	var cmds []string
	for range n {
		switch k := r.IntN(10); {
		case k == 0:
			cmds = append(cmds, "flush")
		case k <= 2:
			off, n := wtRandWrite(r, size, cs)
			cmds = append(cmds, fmt.Sprintf("write -z %d %d", off, n))
		default:
			off, n := wtRandWrite(r, size, cs)
			cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", 1+r.IntN(254), off, n))
		}
	}
	return cmds
}

// wtApply applies qemu-io style commands to im.
func wtApply(t *testing.T, im *Image, cmds []string) {
	t.Helper()
	for i, cmd := range cmds {
		f := strings.Fields(cmd)
		var err error
		switch {
		case len(f) == 1 && f[0] == "flush":
			err = im.Flush()
		case len(f) == 4 && f[0] == "write" && f[1] == "-z":
			off, _ := strconv.ParseInt(f[2], 0, 64)
			n, _ := strconv.ParseInt(f[3], 0, 64)
			err = im.WriteZeroes(off, n)
		case len(f) == 5 && f[0] == "write" && f[1] == "-P":
			pat, _ := strconv.ParseUint(f[2], 0, 8)
			off, _ := strconv.ParseInt(f[3], 0, 64)
			n, _ := strconv.ParseInt(f[4], 0, 64)
			_, err = im.WriteAt(bytes.Repeat([]byte{byte(pat)}, int(n)), off)
		default:
			t.Fatalf("bad command %q", cmd)
		}
		if err != nil {
			t.Fatalf("command %d %q: %v", i, cmd, err)
		}
	}
}

// wtRunDiffFrom runs one script on two fresh copies (named by tag) of the
// starting image in dir.
func wtRunDiffFrom(t *testing.T, c wtDiffCase, dir, start, tag string, seed uint64, nops int) {
	size := wtDiskSize(c.cs)
	theirs, ours := filepath.Join(dir, "theirs"+tag), filepath.Join(dir, "ours"+tag)
	defer os.Remove(theirs)
	defer os.Remove(ours)
	for _, p := range []string{theirs, ours} {
		b, err := os.ReadFile(start)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	r := rand.New(rand.NewPCG(seed, 2))
	cmds := wtScript(r, size, c.cs, nops)
	qemutest.Script(t, string(c.format), theirs, cmds...)

	im, err := Open(vfs.OS, ours, &Options{ReadWrite: true, WriteThrough: c.through, Format: c.format})
	if err != nil {
		t.Fatalf("seed %#x: Open: %v", seed, err)
	}
	wtApply(t, im, cmds)
	if err := im.Close(); err != nil {
		t.Fatalf("seed %#x: Close: %v", seed, err)
	}
	if keep := os.Getenv("QCOW_KEEP"); keep != "" {
		// Debugging aid: keep the images of the last run.
		os.RemoveAll(keep)
		os.CopyFS(keep, os.DirFS(dir))
	}
	if code, out := qemutest.RunImg(t, "compare", "-f", string(c.format), "-F", string(c.format), theirs, ours); code != 0 {
		t.Fatalf("seed %#x: qemu-img compare: exit %d\n%s\nscript:\n%s", seed, code, out, strings.Join(cmds, "\n"))
	}
	if c.snapshot {
		// Writes to the active layer must leave the snapshot alone.
		snap := func(img string) []byte {
			raw := img + ".snap"
			qemutest.Img(t, "convert", "-f", "qcow2", "-l", "snapshot.name=snap1", "-O", "raw", img, raw)
			b, err := os.ReadFile(raw)
			if err != nil {
				t.Fatal(err)
			}
			return b
		}
		want, got := snap(start), snap(ours)
		if i := wtFirstDiff(want, got); i >= 0 {
			t.Fatalf("seed %#x: snapshot snap1 changed at byte %d", seed, i)
		}
	}
	if c.format == FormatQCOW2 {
		if code, out := qemutest.Check(t, ours); code != 0 {
			t.Fatalf("seed %#x: qemu-img check ours: exit %d\n%s\nscript:\n%s", seed, code, out, strings.Join(cmds, "\n"))
		}
	}
}
