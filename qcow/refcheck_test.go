package qcow

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// checkTNeedQemu skips the test when qemu-img or qemu-io is missing, and
// fails it instead when CI=true.
func checkTNeedQemu(t *testing.T) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s is required when CI=true: %v", tool, err)
			}
			t.Skipf("%s not found; skipping qemu interop test", tool)
		}
	}
}

// checkTRun runs a command and fails the test if it fails.
func checkTRun(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// checkTQemuResult is what `qemu-img check --output=json` reports.
type checkTQemuResult struct {
	Exit               int
	Corruptions        int   `json:"corruptions"`
	Leaks              int   `json:"leaks"`
	CheckErrors        int   `json:"check-errors"`
	AllocatedClusters  int64 `json:"allocated-clusters"`
	TotalClusters      int64 `json:"total-clusters"`
	FragmentedClusters int64 `json:"fragmented-clusters"`
	CompressedClusters int64 `json:"compressed-clusters"`
	ImageEndOffset     int64 `json:"image-end-offset"`
	Stderr             string
}

// checkTQemuCheck runs qemu-img check on a qcow2 image.
func checkTQemuCheck(t *testing.T, path string) checkTQemuResult {
	t.Helper()
	cmd := exec.Command("qemu-img", "check", "--output=json", "-f", "qcow2", path)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := checkTQemuResult{Stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.Exit = ee.ExitCode()
	default:
		t.Fatalf("qemu-img check %s: %v", path, err)
	}
	if s := stdout.String(); strings.TrimSpace(s) != "" {
		if err := json.Unmarshal([]byte(s), &r); err != nil {
			t.Fatalf("qemu-img check %s: bad JSON %q: %v", path, s, err)
		}
	}
	return r
}

// checkTOurs checks the image file (not its backing chain) with CheckFile.
func checkTOurs(t *testing.T, path string) *CheckResult {
	t.Helper()
	res, err := CheckFile(vfs.OS, path, "")
	if err != nil {
		t.Fatalf("CheckFile %s: %v", path, err)
	}
	return res
}

// checkTExit maps a result to qemu-img check's exit status.
func checkTExit(r *CheckResult) int {
	switch {
	case r.CheckErrors > 0:
		return 1
	case r.Corruptions > 0:
		return 2
	case r.Leaks > 0:
		return 3
	}
	return 0
}

func checkTDump(r *CheckResult) string {
	var b strings.Builder
	fmt.Fprintf(&b, "corruptions=%d leaks=%d check-errors=%d allocated=%d total=%d fragmented=%d compressed=%d end=%d\n",
		r.Corruptions, r.Leaks, r.CheckErrors, r.AllocatedClusters, r.TotalClusters, r.FragmentedClusters, r.CompressedClusters, r.ImageEndOffset)
	for i, f := range r.Findings {
		if i == 20 {
			fmt.Fprintf(&b, "... %d more\n", len(r.Findings)-i)
			break
		}
		fmt.Fprintf(&b, "  %s at %#x: %s\n", f.Kind, f.Offset, f.Msg)
	}
	return b.String()
}

// checkTImage is a small view of a qcow2 file for poking fields in tests.
type checkTImage struct {
	t    *testing.T
	path string
	b    []byte
}

func checkTLoad(t *testing.T, path string) *checkTImage {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return &checkTImage{t: t, path: path, b: b}
}

func (m *checkTImage) u64(off uint64) uint64 { return binary.BigEndian.Uint64(m.b[off:]) }
func (m *checkTImage) u32(off uint64) uint32 { return binary.BigEndian.Uint32(m.b[off:]) }
func (m *checkTImage) put64(off, v uint64)   { binary.BigEndian.PutUint64(m.b[off:], v) }
func (m *checkTImage) cs() uint64            { return 1 << m.u32(20) }
func (m *checkTImage) l1Off() uint64         { return m.u64(40) }
func (m *checkTImage) rtOff() uint64         { return m.u64(48) }
func (m *checkTImage) extL2() bool           { return m.u32(4) >= 3 && m.u64(72)&IncompatExtendedL2 != 0 }
func (m *checkTImage) order() uint32 {
	if m.u32(4) < 3 {
		return 4
	}
	return m.u32(96)
}

// l2Entry returns the file offset of L2 entry i of the table L1[l1i] points at.
func (m *checkTImage) l2Entry(l1i, i uint64) uint64 {
	l2 := m.u64(m.l1Off()+8*l1i) & l1OffsetMask
	if l2 == 0 {
		m.t.Fatalf("L1 entry %d is empty", l1i)
	}
	stride := uint64(8)
	if m.extL2() {
		stride = 16
	}
	return l2 + stride*i
}

// setRefcount stores v as the refcount of host cluster k.
func (m *checkTImage) setRefcount(k, v uint64) {
	order := m.order()
	perBlock := m.cs() * 8 >> order
	blk := m.u64(m.rtOff()+8*(k/perBlock)) & rtOffsetMask
	if blk == 0 {
		m.t.Fatalf("cluster %d has no refcount block", k)
	}
	j := k % perBlock
	switch order {
	case 0, 1, 2:
		bits := uint64(1) << order
		p := blk + j*bits/8
		sh := (j * bits) % 8
		mask := byte(1<<bits-1) << sh
		m.b[p] = m.b[p]&^mask | byte(v<<sh)&mask
	case 3:
		m.b[blk+j] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(m.b[blk+2*j:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(m.b[blk+4*j:], uint32(v))
	default:
		binary.BigEndian.PutUint64(m.b[blk+8*j:], v)
	}
}

func (m *checkTImage) save() {
	if err := os.WriteFile(m.path, m.b, 0o644); err != nil {
		m.t.Fatal(err)
	}
}

// checkTIO runs qemu-io commands on an image in one process.
func checkTIO(t *testing.T, format, path string, cmds ...string) {
	t.Helper()
	if len(cmds) == 0 {
		return
	}
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	checkTRun(t, "qemu-io", append(args, path)...)
}

// checkTCase builds an image with qemu tools in dir and returns its path.
type checkTCase struct {
	name  string
	build func(t *testing.T, dir string) string
}

// checkTMake returns a builder that creates a qcow2 image with the given
// -o options and size, then runs each qemu-io command on it.
func checkTMake(opts, size string, ios ...string) func(*testing.T, string) string {
	return func(t *testing.T, dir string) string {
		p := filepath.Join(dir, "img.qcow2")
		args := []string{"create", "-q", "-f", "qcow2"}
		if opts != "" {
			args = append(args, "-o", opts)
		}
		checkTRun(t, "qemu-img", append(args, p, size)...)
		checkTIO(t, "qcow2", p, ios...)
		return p
	}
}

// checkTConvert returns a builder that writes a raw image with the qemu-io
// commands and converts it to a compressed qcow2 with the given options.
func checkTConvert(opts string, ios ...string) func(*testing.T, string) string {
	return func(t *testing.T, dir string) string {
		raw := filepath.Join(dir, "src.raw")
		checkTRun(t, "qemu-img", "create", "-q", "-f", "raw", raw, "4M")
		checkTIO(t, "raw", raw, ios...)
		p := filepath.Join(dir, "img.qcow2")
		checkTRun(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, raw, p)
		return p
	}
}

// checkTSnapshots builds an image with two internal snapshots and
// copy-on-write after each.
func checkTSnapshots(opts string) func(*testing.T, string) string {
	return func(t *testing.T, dir string) string {
		p := checkTMake(opts, "4M", "write -P 1 0 1M", "write -c -P 5 2M 128k")(t, dir)
		checkTRun(t, "qemu-img", "snapshot", "-c", "s1", p)
		checkTIO(t, "qcow2", p, "write -P 2 64k 128k")
		checkTRun(t, "qemu-img", "snapshot", "-c", "second-snapshot", p)
		checkTIO(t, "qcow2", p, "write -P 3 512k 64k", "write -z 1M 64k")
		return p
	}
}

var checkTCleanCases = []checkTCase{
	{"v2", checkTMake("compat=0.10", "8M", "write -P 1 0 1M", "write -P 2 5M 4k")},
	{"v3", checkTMake("compat=1.1", "8M", "write -P 1 0 1M", "write -z 2M 1M", "write -P 2 7M 4k")},
	{"v3-discard", checkTMake("", "8M", "write -P 1 0 2M", "discard 64k 128k")},
	{"empty", checkTMake("", "64G")},
	{"refcount1", checkTMake("refcount_bits=1", "4M", "write -P 1 0 1M")},
	{"refcount2", checkTMake("refcount_bits=2", "4M", "write -P 1 0 1M")},
	{"refcount4", checkTMake("refcount_bits=4", "4M", "write -P 1 0 1M")},
	{"refcount8", checkTMake("refcount_bits=8", "4M", "write -P 1 0 1M")},
	{"refcount32", checkTMake("refcount_bits=32", "4M", "write -P 1 0 1M")},
	{"refcount64", checkTMake("refcount_bits=64", "4M", "write -P 1 0 1M")},
	{"cluster512", checkTMake("cluster_size=512", "2M", "write -P 1 0 300k", "write -P 2 1M 1k")},
	{"cluster4k", checkTMake("cluster_size=4k", "8M", "write -P 1 0 3M")},
	{"cluster2M", checkTMake("cluster_size=2M", "16M", "write -P 1 0 3M", "write -P 2 9M 4k")},
	{"odd-size", checkTMake("cluster_size=4k", "1000007", "write -P 1 0 900k")},
	{"zlib", checkTConvert("compression_type=zlib", "write -P 1 0 1M", "write -P 2 2M 100k")},
	{"zstd", checkTConvert("compression_type=zstd", "write -P 1 0 1M", "write -P 2 2M 100k")},
	{"compressed-512", checkTConvert("cluster_size=512", "write -P 1 0 100k")},
	{"compressed-v2", checkTConvert("compat=0.10", "write -P 1 0 1M")},
	{"qemu-io-compressed", checkTMake("", "4M", "write -c -P 7 0 64k", "write -c -P 8 64k 64k", "write -P 9 128k 4k")},
	{"snapshots", checkTSnapshots("")},
	{"snapshots-v2", checkTSnapshots("compat=0.10")},
	{"snapshots-refcount4", checkTSnapshots("refcount_bits=4")},
	{"extended-l2", checkTMake("extended_l2=on", "8M", "write -P 1 0 4k", "write -P 2 100k 70k", "write -z 1M 8k", "write -P 3 2M 1M")},
	{"extended-l2-snapshots", checkTSnapshots("extended_l2=on,cluster_size=128k")},
	{"prealloc-metadata", checkTMake("preallocation=metadata", "8M", "write -P 1 0 64k")},
	{"prealloc-metadata-v2", checkTMake("preallocation=metadata,compat=0.10", "4M")},
	{"lazy-refcounts", checkTMake("lazy_refcounts=on", "4M", "write -P 1 0 1M")},
	{"bitmap", func(t *testing.T, dir string) string {
		p := checkTMake("", "4M")(t, dir)
		checkTRun(t, "qemu-img", "bitmap", "--add", p, "b0")
		checkTRun(t, "qemu-img", "bitmap", "--add", "-g", "4k", p, "b1")
		checkTIO(t, "qcow2", p, "write -P 1 0 1M", "write 3M 4k")
		return p
	}},
	{"data-file", func(t *testing.T, dir string) string {
		return checkTMake("data_file="+filepath.Join(dir, "img.data"), "4M", "write -P 1 0 1M")(t, dir)
	}},
}

// TestCheckCleanAgainstQemu checks that images qemu-img check finds clean
// are clean for us too, with the same statistics.
func TestCheckCleanAgainstQemu(t *testing.T) {
	checkTNeedQemu(t)
	for _, tc := range checkTCleanCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := tc.build(t, t.TempDir())
			q := checkTQemuCheck(t, p)
			if q.Exit != 0 {
				t.Fatalf("qemu-img check exit %d for a fresh image:\n%s", q.Exit, q.Stderr)
			}
			r := checkTOurs(t, p)
			if checkTExit(r) != 0 || len(r.Findings) != 0 {
				t.Fatalf("our check is not clean:\n%s", checkTDump(r))
			}
			got := checkTQemuResult{
				AllocatedClusters: r.AllocatedClusters, TotalClusters: r.TotalClusters,
				FragmentedClusters: r.FragmentedClusters, CompressedClusters: r.CompressedClusters,
				ImageEndOffset: r.ImageEndOffset,
			}
			want := q
			want.Exit, want.Stderr = 0, ""
			if got != want {
				t.Errorf("statistics differ from qemu-img check:\n got %+v\nwant %+v", got, want)
			}
		})
	}
}

// checkTBases builds each base image once per test run and hands out
// copies, so that many pokes share one set of qemu invocations.
type checkTBases struct {
	dir   string
	mu    sync.Mutex
	built map[string]*checkTBuilt
}

type checkTBuilt struct {
	once sync.Once
	path string
	err  string
}

// copy returns a fresh copy of base key (built by build) in dir.
func (b *checkTBases) copy(t *testing.T, key string, build func(*testing.T, string) string, dir string) string {
	t.Helper()
	b.mu.Lock()
	e := b.built[key]
	if e == nil {
		e = &checkTBuilt{}
		b.built[key] = e
	}
	b.mu.Unlock()
	e.once.Do(func() {
		bd := filepath.Join(b.dir, strings.NewReplacer("=", "_", ",", "_", "/", "_").Replace(key))
		if err := os.MkdirAll(bd, 0o755); err != nil {
			e.err = err.Error()
			return
		}
		e.path = build(t, bd)
		if q := checkTQemuCheck(t, e.path); q.Exit != 0 {
			e.err = fmt.Sprintf("qemu-img check exit %d on base %s:\n%s", q.Exit, key, q.Stderr)
		}
	})
	if e.err != "" || e.path == "" {
		t.Fatalf("base %s: %s", key, e.err)
	}
	data, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, filepath.Base(e.path))
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// checkTPoke corrupts an image in a known way.
type checkTPoke struct {
	name  string
	base  string // key of the base image: pokes with the same key share it
	build func(t *testing.T, dir string) string
	poke  func(m *checkTImage)
	want  int    // qemu-img check exit status expected from both
	msg   string // a substring one of our findings must contain
}

func checkTBase(opts string) func(*testing.T, string) string {
	return checkTMake(opts, "4M", "write -P 1 0 256k", "write -P 2 1M 64k")
}

// checkTDataCluster returns the host cluster index of L2 entry i of L1[0].
func (m *checkTImage) dataCluster(i uint64) uint64 {
	e := m.u64(m.l2Entry(0, i)) & l2OffsetMask
	if e == 0 {
		m.t.Fatalf("L2 entry %d is unallocated", i)
	}
	return e / m.cs()
}

var checkTCompressedBase = checkTMake("", "4M", "write -c -P 7 0 64k", "write -P 1 64k 64k")

var checkTPokes = []checkTPoke{
	{"refcount-zero", "base:", checkTBase(""), func(m *checkTImage) { m.setRefcount(m.dataCluster(1), 0) }, 2, "refcount=0 reference=1"},
	{"refcount-zero-r1", "base:refcount_bits=1", checkTBase("refcount_bits=1"), func(m *checkTImage) { m.setRefcount(m.dataCluster(1), 0) }, 2, "refcount=0 reference=1"},
	{"refcount-zero-r4", "base:refcount_bits=4", checkTBase("refcount_bits=4"), func(m *checkTImage) { m.setRefcount(m.dataCluster(2), 0) }, 2, "refcount=0 reference=1"},
	{"refcount-zero-r64", "base:refcount_bits=64", checkTBase("refcount_bits=64"), func(m *checkTImage) { m.setRefcount(m.dataCluster(2), 0) }, 2, "refcount=0 reference=1"},
	{"refcount-high", "base:", checkTBase(""), func(m *checkTImage) { m.setRefcount(m.dataCluster(1), 2) }, 2, "OFLAG_COPIED data cluster"},
	{"leak", "base:", checkTBase(""), func(m *checkTImage) {
		// Mark the cluster just past the end of the file's used space as
		// in use: the file ends there, so count a cluster inside the file
		// that nothing references by freeing its L2 entry instead.
		m.put64(m.l2Entry(0, 3), 0)
	}, 3, "Leaked cluster"},
	{"leak-r2", "base:refcount_bits=2", checkTBase("refcount_bits=2"), func(m *checkTImage) { m.put64(m.l2Entry(0, 3), 0) }, 3, "Leaked cluster"},
	{"copied-on-compressed", "compressed", checkTCompressedBase, func(m *checkTImage) {
		p := m.l2Entry(0, 0)
		m.put64(p, m.u64(p)|flagCopied)
	}, 2, "COPIED flag set on a compressed cluster"},
	{"copied-cleared", "base:", checkTBase(""), func(m *checkTImage) {
		p := m.l2Entry(0, 2)
		m.put64(p, m.u64(p)&^flagCopied)
	}, 2, "OFLAG_COPIED data cluster"},
	{"l1-copied-cleared", "base:", checkTBase(""), func(m *checkTImage) {
		p := m.l1Off()
		m.put64(p, m.u64(p)&^flagCopied)
	}, 2, "OFLAG_COPIED L2 cluster"},
	{"l2-beyond-eof", "base:", checkTBase(""), func(m *checkTImage) {
		p := m.l2Entry(0, 5)
		m.put64(p, flagCopied|(uint64(len(m.b))+16*m.cs())&^(m.cs()-1))
	}, 2, "beyond the end of the file"},
	{"l2-reserved", "base:", checkTBase(""), func(m *checkTImage) {
		p := m.l2Entry(0, 1)
		m.put64(p, m.u64(p)|1<<56)
	}, 2, "reserved bits"},
	{"l2-unaligned", "base:", checkTBase(""), func(m *checkTImage) {
		p := m.l2Entry(0, 1)
		m.put64(p, m.u64(p)+512)
	}, 2, "not cluster aligned"},
	{"duplicate-l2-pointer", "c4k", checkTMake("cluster_size=4k", "8M", "write -P 1 0 4k"), func(m *checkTImage) {
		m.put64(m.l1Off()+8, m.u64(m.l1Off()))
	}, 2, "refcount=1 reference=2"},
	{"data-is-l1", "base:", checkTBase(""), func(m *checkTImage) {
		p := m.l2Entry(0, 7)
		m.put64(p, m.l1Off()) // COPIED clear: the L1 cluster then has refcount 1 but 2 references
	}, 2, "overlapping metadata"},
	{"data-is-refblock", "base:", checkTBase(""), func(m *checkTImage) {
		m.put64(m.l2Entry(0, 7), m.u64(m.rtOff())&rtOffsetMask)
	}, 2, "overlapping metadata"},
	{"reftable-reserved", "base:", checkTBase(""), func(m *checkTImage) {
		m.put64(m.rtOff(), m.u64(m.rtOff())|1)
	}, 2, "reserved bits"},
	{"reftable-beyond-eof", "base:", checkTBase(""), func(m *checkTImage) {
		m.put64(m.rtOff()+8, uint64(len(m.b))+64*m.cs())
	}, 2, "outside the image"},
	{"refblock-shared", "base:", checkTBase(""), func(m *checkTImage) {
		m.put64(m.rtOff()+8, m.u64(m.rtOff()))
	}, 2, "referenced 2 times"},
	{"compressed-beyond-eof", "compressed", checkTCompressedBase, func(m *checkTImage) {
		p := m.l2Entry(0, 0)
		m.put64(p, flagCompressed|uint64(len(m.b))+8*m.cs())
	}, 2, "beyond the end of the file"},
	{"compressed-in-header", "compressed", checkTCompressedBase, func(m *checkTImage) {
		p := m.l2Entry(0, 0)
		m.put64(p, flagCompressed|100)
	}, 2, "cluster 0"},
	{"extl2-both-bits", "extl2", checkTMake("extended_l2=on", "4M", "write -P 1 0 64k"), func(m *checkTImage) {
		p := m.l2Entry(0, 0) + 8
		m.put64(p, m.u64(p)|1<<63) // subcluster 31 allocated and zero
	}, 2, "both allocated and zero"},
	{"extl2-unallocated-bits", "extl2", checkTMake("extended_l2=on", "4M", "write -P 1 0 64k"), func(m *checkTImage) {
		m.put64(m.l2Entry(0, 5)+8, 1)
	}, 2, "marked allocated"},
	{"l1-reserved", "base:", checkTBase(""), func(m *checkTImage) {
		m.put64(m.l1Off(), m.u64(m.l1Off())|1<<56)
	}, 2, "reserved bits"},
	{"l1-unaligned", "base:", checkTBase(""), func(m *checkTImage) {
		m.put64(m.l1Off(), m.u64(m.l1Off())+512)
	}, 2, "not cluster aligned"},
	{"l1-beyond-eof", "base:", checkTBase(""), func(m *checkTImage) {
		m.put64(m.l1Off(), flagCopied|(uint64(len(m.b))+64*m.cs())&^(m.cs()-1))
	}, 2, "beyond the end of the file"},
	{"reftable-offset-beyond-eof", "base:", checkTBase(""), func(m *checkTImage) {
		m.put64(48, (uint64(len(m.b))+64*m.cs())&^(m.cs()-1))
	}, 2, "beyond the end of the file"},
	{"snapshot-l1-entry-beyond-eof", "snapshots", checkTSnapshots(""), func(m *checkTImage) {
		snap := m.u64(64)
		l1 := m.u64(snap)
		m.put64(l1, 1<<40)
	}, 2, "beyond the end of the file"},
	{"snapshot-l1-unaligned", "snapshots", checkTSnapshots(""), func(m *checkTImage) {
		snap := m.u64(64)
		m.put64(snap, m.u64(snap)+512)
	}, 2, "not cluster aligned"},
	{"refblock-unaligned", "base:", checkTBase(""), func(m *checkTImage) {
		m.put64(m.rtOff(), m.u64(m.rtOff())+512) // qemu: corruption, and check errors for every refcount it covers
	}, 1, "not cluster aligned"},
	{"snapshot-refcount-low", "snapshots", checkTSnapshots(""), func(m *checkTImage) {
		// Cluster 2M is compressed and shared by both snapshots and the
		// active table: drop its refcount to 1.
		e := m.u64(m.l2Entry(0, 32))
		if e&flagCompressed == 0 {
			m.t.Fatalf("L2 entry 32 (%#x) is not compressed", e)
		}
		off := e & (1<<(70-m.u32(20)) - 1)
		m.setRefcount(off/m.cs(), 1)
	}, 2, "refcount=1 reference="},
}

// TestCheckPokedAgainstQemu corrupts fresh images field by field and checks
// that we and qemu-img check agree on the verdict.
func TestCheckPokedAgainstQemu(t *testing.T) {
	checkTNeedQemu(t)
	bases := &checkTBases{dir: t.TempDir(), built: map[string]*checkTBuilt{}}
	for _, tc := range checkTPokes {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := bases.copy(t, tc.base, tc.build, t.TempDir())
			m := checkTLoad(t, p)
			tc.poke(m)
			m.save()
			q := checkTQemuCheck(t, p)
			if q.Exit != tc.want {
				t.Fatalf("qemu-img check exit %d, want %d:\n%s", q.Exit, tc.want, q.Stderr)
			}
			r := checkTOurs(t, p)
			if got := checkTExit(r); got != tc.want {
				t.Fatalf("our verdict %d, qemu-img check %d\nours: %s\nqemu: %s", got, tc.want, checkTDump(r), q.Stderr)
			}
			found := false
			for _, f := range r.Findings {
				found = found || strings.Contains(f.Msg, tc.msg)
			}
			if !found {
				t.Errorf("no finding mentions %q:\n%s", tc.msg, checkTDump(r))
			}
			if r.Corruptions != q.Corruptions || r.Leaks != q.Leaks {
				t.Logf("counts differ (verdict agrees): ours corruptions=%d leaks=%d, qemu corruptions=%d leaks=%d\nours: %s\nqemu: %s",
					r.Corruptions, r.Leaks, q.Corruptions, q.Leaks, checkTDump(r), q.Stderr)
			}
		})
	}
}

// TestCheckDirtyLazyRefcounts: a crash with lazy refcounts leaves stale
// refcounts; qemu-img check reports them and so must we.
func TestCheckDirtyLazyRefcounts(t *testing.T) {
	checkTNeedQemu(t)
	p := checkTMake("lazy_refcounts=on", "4M")(t, t.TempDir())
	// qemu-io kills itself before closing: the dirty bit stays set.
	_ = exec.Command("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k", "-c", "sigraise 9", p).Run()
	if m := checkTLoad(t, p); m.u64(72)&IncompatDirty == 0 {
		t.Fatal("test setup: the dirty bit is not set")
	}
	q := checkTQemuCheck(t, p)
	r := checkTOurs(t, p)
	if got := checkTExit(r); got != q.Exit || q.Exit == 0 {
		t.Fatalf("our verdict %d, qemu-img check %d\nours: %s\nqemu: %s", got, q.Exit, checkTDump(r), q.Stderr)
	}
	if r.Corruptions != q.Corruptions || r.Leaks != q.Leaks {
		t.Errorf("ours corruptions=%d leaks=%d, qemu corruptions=%d leaks=%d\nours: %s\nqemu: %s",
			r.Corruptions, r.Leaks, q.Corruptions, q.Leaks, checkTDump(r), q.Stderr)
	}
}

// checkTV1 builds a QCOW version 1 image (4 KiB clusters, 512-entry L2
// tables) and returns its path.
func checkTV1(t *testing.T, dir string, compressed bool) string {
	t.Helper()
	p := filepath.Join(dir, "img.qcow")
	checkTRun(t, "qemu-img", "create", "-q", "-f", "qcow", p, "4M")
	if compressed {
		// qemu-img 7.2's `convert -c -O qcow` fails; qemu-io writes
		// compressed clusters one at a time.
		checkTIO(t, "qcow", p, "write -c -P 1 0 4k", "write -c -P 2 4k 4k", "write -c -P 3 8k 4k", "write -P 4 3M 4k")
		return p
	}
	checkTIO(t, "qcow", p, "write -P 1 0 100k", "write -P 2 3M 8k")
	return p
}

// TestCheckV1 checks QCOW version 1 images, which qemu-img check does not
// support: clean images are clean, poked ones report what was poked.
func TestCheckV1(t *testing.T) {
	checkTNeedQemu(t)
	type v1poke struct {
		name       string
		compressed bool
		poke       func(m *checkTImage, l2 uint64)
		msg        string // "" for a clean image
	}
	cases := []v1poke{
		{"clean", false, nil, ""},
		{"clean-compressed", true, nil, ""},
		{"data-beyond-eof", false, func(m *checkTImage, l2 uint64) { m.put64(l2+8, uint64(len(m.b))+1<<20) }, "beyond the end of the file"},
		{"data-unaligned", false, func(m *checkTImage, l2 uint64) { m.put64(l2+8, m.u64(l2+8)+8) }, "not 512-byte aligned"},
		{"data-shared", false, func(m *checkTImage, l2 uint64) { m.put64(l2+8, m.u64(l2)) }, "overlap"},
		{"data-on-l2", false, func(m *checkTImage, l2 uint64) { m.put64(l2+8, l2) }, "overlap"},
		{"l2-shared", false, func(m *checkTImage, l2 uint64) { m.put64(m.u64(40)+8, l2) }, "overlap"},
		{"l2-beyond-eof", false, func(m *checkTImage, l2 uint64) { m.put64(m.u64(40)+8, uint64(len(m.b))) }, "beyond the end of the file"},
		{"compressed-beyond-eof", true, func(m *checkTImage, l2 uint64) {
			m.put64(l2, m.u64(l2)&^(1<<51-1)|uint64(len(m.b))-10)
		}, "beyond the end of the file"},
		{"compressed-overlap", true, func(m *checkTImage, l2 uint64) { m.put64(l2+8, m.u64(l2)) }, "overlap"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p := checkTV1(t, t.TempDir(), tc.compressed)
			if tc.poke != nil {
				m := checkTLoad(t, p)
				l2 := m.u64(m.u64(40))
				if l2 == 0 || m.b[32] != 12 || m.b[33] != 9 {
					t.Fatalf("test setup: unexpected layout: L1[0]=%#x cluster_bits %d l2_bits %d", l2, m.b[32], m.b[33])
				}
				tc.poke(m, l2)
				m.save()
			}
			r := checkTOurs(t, p)
			if tc.msg == "" {
				if checkTExit(r) != 0 || len(r.Findings) != 0 {
					t.Fatalf("clean image not clean:\n%s", checkTDump(r))
				}
				if r.AllocatedClusters == 0 || r.TotalClusters != 1024 {
					t.Errorf("allocated %d, total %d clusters; want some of 1024", r.AllocatedClusters, r.TotalClusters)
				}
				return
			}
			if checkTExit(r) != 2 {
				t.Fatalf("want corruption:\n%s", checkTDump(r))
			}
			found := false
			for _, f := range r.Findings {
				found = found || strings.Contains(f.Msg, tc.msg)
			}
			if !found {
				t.Errorf("no finding mentions %q:\n%s", tc.msg, checkTDump(r))
			}
		})
	}
}

// checkTBuild writes a minimal valid QCOW2 version 3 image with 4 KiB
// clusters and 2^order-bit refcounts into a memory file system: cluster 0
// header, 1 refcount table, 2 refcount block, 3 L1 table, 4 L2 table,
// 5 data (guest cluster 0). poke may change the bytes (and the refcounts,
// through set) before the file is written.
func checkTBuild(t *testing.T, order uint32, clusters int64, poke func(b []byte, set func(k, v uint64))) vfs.FS {
	t.Helper()
	const cs = 4096
	b := make([]byte, 6*cs)
	be := binary.BigEndian
	be.PutUint32(b[0:], Magic)
	be.PutUint32(b[4:], 3)
	be.PutUint32(b[20:], 12)     // cluster_bits
	be.PutUint64(b[24:], 1<<20)  // size
	be.PutUint32(b[36:], 1)      // l1_size
	be.PutUint64(b[40:], 3*cs)   // l1_table_offset
	be.PutUint64(b[48:], 1*cs)   // refcount_table_offset
	be.PutUint32(b[56:], 1)      // refcount_table_clusters
	be.PutUint32(b[96:], order)  // refcount_order
	be.PutUint32(b[100:], 104)   // header_length
	be.PutUint64(b[1*cs:], 2*cs) // refcount table -> block
	be.PutUint64(b[3*cs:], flagCopied|4*cs)
	be.PutUint64(b[4*cs:], flagCopied|5*cs)
	copy(b[5*cs:], "guest data")
	set := func(k, v uint64) {
		blk := b[2*cs : 3*cs]
		bits := uint64(1) << order
		switch {
		case bits < 8:
			bit := k * bits
			mask := byte(1<<bits-1) << (bit % 8)
			blk[bit/8] = blk[bit/8]&^mask | byte(v<<(bit%8))&mask
		case bits == 8:
			blk[k] = byte(v)
		case bits == 16:
			be.PutUint16(blk[2*k:], uint16(v))
		case bits == 32:
			be.PutUint32(blk[4*k:], uint32(v))
		default:
			be.PutUint64(blk[8*k:], v)
		}
	}
	for k := uint64(0); k < 6; k++ {
		set(k, 1)
	}
	if poke != nil {
		poke(b, set)
	}
	fsys := vfs.NewMem()
	f, err := fsys.Create("img.qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if clusters*cs > int64(len(b)) {
		if err := f.Truncate(clusters * cs); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return fsys
}

// TestCheckBuilt runs without qemu on hand-made images.
func TestCheckBuilt(t *testing.T) {
	be := binary.BigEndian
	cases := []struct {
		name        string
		order       uint32
		clusters    int64
		poke        func(b []byte, set func(k, v uint64))
		corruptions int
		leaks       int
		msg         string
	}{
		{"clean-r1", 0, 6, nil, 0, 0, ""},
		{"clean-r2", 1, 6, nil, 0, 0, ""},
		{"clean-r4", 2, 6, nil, 0, 0, ""},
		{"clean-r8", 3, 6, nil, 0, 0, ""},
		{"clean-r16", 4, 6, nil, 0, 0, ""},
		{"clean-r32", 5, 6, nil, 0, 0, ""},
		{"clean-r64", 6, 6, nil, 0, 0, ""},
		{"data-refcount-zero", 4, 6, func(b []byte, set func(k, v uint64)) { set(5, 0) },
			2, 0, "ERROR cluster 5 (0x5000) refcount=0 reference=1"}, // and COPIED with refcount 0
		{"data-refcount-two-r2", 1, 6, func(b []byte, set func(k, v uint64)) { set(5, 2) },
			1, 1, "Leaked cluster 5"},
		{"leak-r64", 6, 8, func(b []byte, set func(k, v uint64)) { set(7, 1<<40) }, 0, 1, "refcount=1099511627776 reference=0"},
		{"l2-on-l1", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[4*4096+8:], 3*4096) },
			3, 0, "used by the active L1 table and by a data cluster"}, // overlap, refcount, COPIED clear with refcount 1
		{"reserved-l2", 4, 6, func(b []byte, set func(k, v uint64)) { b[4*4096] |= 0x01 }, 1, 0, "reserved bits"},
		{"refblock-unaligned", 4, 6, func(b []byte, set func(k, v uint64)) { be.PutUint64(b[4096:], 2*4096+512) },
			1, 0, "not cluster aligned"}, // and a check error for each of the 6 clusters it covers
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fsys := checkTBuild(t, tc.order, tc.clusters, tc.poke)
			res, err := CheckFile(fsys, "img.qcow2", "")
			if err != nil {
				t.Fatal(err)
			}
			wantErrs := 0
			if tc.name == "refblock-unaligned" {
				wantErrs = 6 // qemu cannot read those refcounts either
			}
			if res.CheckErrors != wantErrs {
				t.Errorf("%d check errors, want %d:\n%s", res.CheckErrors, wantErrs, checkTDump(res))
			}
			if res.Corruptions != tc.corruptions || res.Leaks != tc.leaks {
				t.Errorf("corruptions %d leaks %d, want %d and %d:\n%s", res.Corruptions, res.Leaks, tc.corruptions, tc.leaks, checkTDump(res))
			}
			wantAlloc := int64(1)
			if tc.name == "l2-on-l1" {
				wantAlloc = 2
			}
			if res.AllocatedClusters != wantAlloc || res.TotalClusters != 256 {
				t.Errorf("allocated %d of %d clusters, want %d of 256", res.AllocatedClusters, res.TotalClusters, wantAlloc)
			}
			if tc.msg == "" {
				if len(res.Findings) != 0 {
					t.Errorf("findings on a clean image:\n%s", checkTDump(res))
				}
				if res.ImageEndOffset != 6*4096 {
					t.Errorf("image end offset %d, want %d", res.ImageEndOffset, 6*4096)
				}
				return
			}
			found := false
			for _, f := range res.Findings {
				found = found || strings.Contains(f.Msg, tc.msg)
			}
			if !found {
				t.Errorf("no finding mentions %q:\n%s", tc.msg, checkTDump(res))
			}
		})
	}
}

// TestCheckFindingsCapped: every leak is counted, the list is capped.
func TestCheckFindingsCapped(t *testing.T) {
	const clusters = MaxCheckFindings + 5000
	fsys := checkTBuild(t, 0, clusters, func(b []byte, set func(k, v uint64)) {
		for k := uint64(6); k < clusters; k++ {
			set(k, 1)
		}
	})
	res, err := CheckFile(fsys, "img.qcow2", "")
	if err != nil {
		t.Fatal(err)
	}
	if res.Leaks != clusters-6 || res.Corruptions != 0 {
		t.Errorf("leaks %d corruptions %d, want %d and 0", res.Leaks, res.Corruptions, clusters-6)
	}
	if len(res.Findings) != MaxCheckFindings {
		t.Errorf("%d findings listed, want the cap %d", len(res.Findings), MaxCheckFindings)
	}
	if res.ImageEndOffset != clusters*4096 {
		t.Errorf("image end offset %d, want %d", res.ImageEndOffset, clusters*4096)
	}
}

// TestCheckRawAndClosed: raw images have nothing to check; a closed image
// refuses.
func TestCheckRawAndClosed(t *testing.T) {
	fsys := vfs.NewMem()
	f, err := fsys.Create("disk.raw")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("not a qcow image at all"), 0)
	f.Close()
	res, err := CheckFile(fsys, "disk.raw", "")
	if err != nil || res.Corruptions+res.Leaks+res.CheckErrors != 0 || len(res.Findings) != 0 {
		t.Fatalf("raw: %+v, %v", res, err)
	}
	im, err := Open(checkTBuild(t, 4, 6, nil), "img.qcow2", nil)
	if err != nil {
		t.Fatal(err)
	}
	im.Close()
	if _, err := im.Check(); !errors.Is(err, ErrClosed) {
		t.Fatalf("check after close: %v, want ErrClosed", err)
	}
}

// TestCheckStoredRefcount decodes every refcount width.
func TestCheckStoredRefcount(t *testing.T) {
	blk := []byte{0b1011_0110, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x11}
	cases := []struct {
		order uint32
		j     uint64
		want  uint64
	}{
		{0, 0, 0}, {0, 1, 1}, {0, 2, 1}, {0, 3, 0}, {0, 7, 1},
		{1, 0, 0b10}, {1, 1, 0b01}, {1, 2, 0b11}, {1, 3, 0b10},
		{2, 0, 0b0110}, {2, 1, 0b1011}, {2, 2, 0x2},
		{3, 1, 0x12},
		{4, 1, 0x3456},
		{5, 1, 0x789abcde},
		{6, 0, 0xb6123456789abcde},
	}
	for _, tc := range cases {
		if got := storedRefcount(blk, tc.j, tc.order); got != tc.want {
			t.Errorf("order %d entry %d: %#x, want %#x", tc.order, tc.j, got, tc.want)
		}
	}
}

// TestCheckRefArray: counts beyond a byte, saturation at the width.
func TestCheckRefArray(t *testing.T) {
	a := newRefArray(10000)
	for i := 0; i < 300; i++ {
		a.add(5000, 1, 65535, kindData)
	}
	if got := a.get(5000); got != 300 {
		t.Errorf("count %d, want 300", got)
	}
	if prev, lost := a.add(5000, 65535, 65535, kindL2); prev != kindData || lost != 300 {
		t.Errorf("prev %v lost %d, want %v and 300", prev, lost, kindData)
	}
	if got := a.get(5000); got != 65535 {
		t.Errorf("saturated count %d, want 65535", got)
	}
	if a.get(9999) != 0 || a.kind(9999) != kindNone || !a.empty(9999) {
		t.Error("untouched cluster not empty")
	}
}
