package kvmtool2011_test

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/harness/targets/kvmtool2011"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

const img = "disk.img"

// create makes a new image in fsys as the harness does: v1 is QCOW
// version 1, v2 is QCOW2 version 2, v3 QCOW2 version 3.
func create(t testing.TB, fsys vfs.FS, format string, cs, size int64) {
	t.Helper()
	o := qcow.CreateOptions{Format: qcow.FormatQCOW2, Size: size, ClusterSize: cs}
	switch format {
	case "v1":
		o.Format = qcow.FormatQCOW
	case "v2":
		o.Version = 2
	case "v3":
		o.Version = 3
	default:
		t.Fatalf("unknown format %q", format)
	}
	if err := qcow.Create(fsys, img, o); err != nil {
		t.Fatal(err)
	}
}

// pattern returns n bytes that differ from every other seed's.
func pattern(seed byte, n int) []byte {
	p := make([]byte, n)
	for i := range p {
		p[i] = seed ^ byte(i*7+i>>8) | 1
	}
	return p
}

type write struct {
	off  int64
	n    int
	zero bool
}

// The port writes what our reader reads back, for both versions and a
// range of cluster sizes, with writes that are sub-sector, unaligned,
// straddle clusters and L1 ranges, overwrite allocated clusters, and
// zero.
func TestWriteReadBack(t *testing.T) {
	tests := []struct {
		format string
		cs     int64
		size   int64 // a multiple of one L1 range for v1 (see ErrL1Index)
		writes []write
	}{
		{"v1", 512, 128 << 10, []write{{100, 7, false}, {510, 4, false}, {32<<10 - 300, 1000, false}, {0, 4096, false}, {200, 50, true}, {128<<10 - 512, 512, false}}},
		{"v1", 4096, 4 << 20, []write{{5, 1, false}, {2<<20 - 10, 20, false}, {4096, 3 * 4096, false}, {8000, 500, true}, {4<<20 - 1, 1, false}}},
		{"v2", 512, 256 << 10, []write{{0, 512, false}, {1000, 3000, false}, {64<<10 - 3, 6, false}, {700, 100, true}, {256<<10 - 1000, 1000, false}}},
		{"v2", 4096, 1 << 20, []write{{12345, 70000, false}, {20000, 10, false}, {2<<20 - 2<<20, 4096, true}, {1<<20 - 4096, 4096, false}}},
		{"v2", 65536, 3 << 20, []write{{1, 200000, false}, {65536, 1, false}, {3<<20 - 100, 100, false}, {70000, 65536, true}}},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s/cs=%d", tc.format, tc.cs), func(t *testing.T) {
			mem := vfs.NewMem()
			create(t, mem, tc.format, tc.cs, tc.size)
			im, err := kvmtool2011.Open(mem, img, kvmtool2011.Options{})
			if err != nil {
				t.Fatal(err)
			}
			want := make([]byte, tc.size)
			for i, w := range tc.writes {
				if w.zero {
					if err := im.WriteZeroes(w.off, int64(w.n)); err != nil {
						t.Fatalf("write %d: %v", i, err)
					}
					clear(want[w.off : w.off+int64(w.n)])
					continue
				}
				p := pattern(byte(i+1), w.n)
				n, err := im.WriteAt(p, w.off)
				if err != nil || n != w.n {
					t.Fatalf("write %d: n=%d err=%v, want %d, nil", i, n, err, w.n)
				}
				copy(want[w.off:], p)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			q, err := qcow.Open(mem, img, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			got := make([]byte, tc.size)
			if _, err := q.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(got, want); i >= 0 {
				t.Fatalf("byte %d reads %#x, want %#x", i, got[i], want[i])
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// A version 1 image the port wrote passes our checker (version 1 has no
// refcounts); a version 2 image fails it with refcount errors, because
// kvmtool never updated refcounts.
func TestCheckAfterWrite(t *testing.T) {
	tests := []struct {
		format      string
		cs, size    int64 // size: one L1 range for v1
		corrupt     bool
		wantInFirst string
	}{
		{"v1", 512, 32 << 10, false, ""},
		{"v1", 4096, 2 << 20, false, ""},
		{"v2", 512, 64 << 10, true, "refcount=0 reference=1"},
		{"v2", 65536, 1 << 20, true, "refcount=0 reference=1"},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprintf("%s/cs=%d", tc.format, tc.cs), func(t *testing.T) {
			mem := vfs.NewMem()
			create(t, mem, tc.format, tc.cs, tc.size)
			im, err := kvmtool2011.Open(mem, img, kvmtool2011.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := im.WriteAt(pattern(3, 3000), 1000); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			res, err := qcow.CheckFile(mem, img, "")
			if err != nil {
				t.Fatal(err)
			}
			if got := res.Corruptions > 0; got != tc.corrupt {
				t.Fatalf("corruptions = %d (findings %v), want corrupt=%v", res.Corruptions, res.Findings, tc.corrupt)
			}
			if tc.corrupt {
				var msgs []string
				for _, f := range res.Findings {
					msgs = append(msgs, f.Msg)
				}
				if all := strings.Join(msgs, "\n"); !strings.Contains(all, tc.wantInFirst) {
					t.Fatalf("findings %q do not mention %q", all, tc.wantInFirst)
				}
			}
		})
	}
}

// Writes the port refuses: past the virtual size, at negative offsets,
// in the L1 range kvmtool's rounded-down L1 size leaves out, and after
// Close.
func TestWriteErrors(t *testing.T) {
	tests := []struct {
		name    string
		format  string
		cs      int64
		size    int64
		off     int64
		n       int
		close   bool
		wantN   int
		wantErr error
	}{
		{"at the end", "v2", 512, 64 << 10, 64 << 10, 1, false, 0, kvmtool2011.ErrPastEnd},
		{"across the end", "v2", 512, 64 << 10, 64<<10 - 512, 1024, false, 512, kvmtool2011.ErrPastEnd},
		{"negative", "v2", 512, 64 << 10, -1, 1, false, 0, kvmtool2011.ErrPastEnd},
		{"v1 partial last L1 range", "v1", 512, 40 << 10, 33 << 10, 1, false, 0, kvmtool2011.ErrL1Index},
		{"v1 smaller than one L1 range", "v1", 4096, 1 << 20, 0, 1, false, 0, kvmtool2011.ErrL1Index},
		{"closed", "v2", 512, 64 << 10, 0, 1, true, 0, kvmtool2011.ErrClosed},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfs.NewMem()
			create(t, mem, tc.format, tc.cs, tc.size)
			im, err := kvmtool2011.Open(mem, img, kvmtool2011.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if tc.close {
				if err := im.Close(); err != nil {
					t.Fatal(err)
				}
			} else {
				defer im.Close()
			}
			n, err := im.WriteAt(make([]byte, tc.n), tc.off)
			if n != tc.wantN || !errors.Is(err, tc.wantErr) {
				t.Fatalf("WriteAt = %d, %v; want %d, %v", n, err, tc.wantN, tc.wantErr)
			}
			if err := im.WriteZeroes(tc.off, int64(tc.n)); !errors.Is(err, tc.wantErr) {
				t.Fatalf("WriteZeroes = %v; want %v", err, tc.wantErr)
			}
		})
	}
}

// Open refuses what kvmtool would not have probed as QCOW 1 or 2, and
// header fields out of the bounds this port adds.
func TestOpenRefuses(t *testing.T) {
	put32 := func(b []byte, at int, v uint32) {
		b[at], b[at+1], b[at+2], b[at+3] = byte(v>>24), byte(v>>16), byte(v>>8), byte(v)
	}
	put64 := func(b []byte, at int, v uint64) { put32(b, at, uint32(v>>32)); put32(b, at+4, uint32(v)) }
	tests := []struct {
		name   string
		format string
		edit   func([]byte) []byte
		want   error
	}{
		{"version 3", "v3", nil, kvmtool2011.ErrNotQCOW},
		{"bad magic", "v2", func(b []byte) []byte { b[0] = 'X'; return b }, kvmtool2011.ErrNotQCOW},
		{"version 4", "v2", func(b []byte) []byte { put32(b, 4, 4); return b }, kvmtool2011.ErrNotQCOW},
		{"empty", "v2", func(b []byte) []byte { return b[:0] }, kvmtool2011.ErrNotQCOW},
		{"v1 short header", "v1", func(b []byte) []byte { return b[:40] }, kvmtool2011.ErrHeader},
		{"v2 short header", "v2", func(b []byte) []byte { return b[:60] }, kvmtool2011.ErrHeader},
		{"v1 cluster_bits 8", "v1", func(b []byte) []byte { b[32] = 8; return b }, kvmtool2011.ErrHeader},
		{"v1 cluster_bits 17", "v1", func(b []byte) []byte { b[32] = 17; return b }, kvmtool2011.ErrHeader},
		{"v1 l2_bits 5", "v1", func(b []byte) []byte { b[33] = 5; return b }, kvmtool2011.ErrHeader},
		{"v1 l2_bits 14", "v1", func(b []byte) []byte { b[33] = 14; return b }, kvmtool2011.ErrHeader},
		{"v1 huge size", "v1", func(b []byte) []byte { put64(b, 24, 1<<62); return b }, kvmtool2011.ErrHeader},
		{"v1 L1 past the end", "v1", func(b []byte) []byte { put64(b, 40, 1<<40); return b }, kvmtool2011.ErrHeader},
		{"v2 cluster_bits 8", "v2", func(b []byte) []byte { put32(b, 20, 8); return b }, kvmtool2011.ErrHeader},
		{"v2 cluster_bits 22", "v2", func(b []byte) []byte { put32(b, 20, 22); return b }, kvmtool2011.ErrHeader},
		{"v2 l1_size huge", "v2", func(b []byte) []byte { put32(b, 36, 1<<31); return b }, kvmtool2011.ErrHeader},
		{"v2 L1 past the end", "v2", func(b []byte) []byte { put64(b, 40, uint64(len(b))-4); return b }, kvmtool2011.ErrHeader},
		{"v2 L1 offset overflow", "v2", func(b []byte) []byte { put64(b, 40, ^uint64(0)-3); return b }, kvmtool2011.ErrHeader},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfs.NewMem()
			create(t, mem, tc.format, 4096, 4<<20)
			if tc.edit != nil {
				b := readAll(t, mem, img)
				if err := mem.Remove(img); err != nil {
					t.Fatal(err)
				}
				writeAll(t, mem, img, tc.edit(b))
			}
			im, err := kvmtool2011.Open(mem, img, kvmtool2011.Options{})
			if !errors.Is(err, tc.want) {
				if im != nil {
					im.Close()
				}
				t.Fatalf("Open = %v, want %v", err, tc.want)
			}
			// The handle was released: the writer lock is free.
			f, err := mem.Open(img, vfs.ReadWrite)
			if err != nil {
				t.Fatalf("reopen after a refused open: %v", err)
			}
			f.Close()
		})
	}
}

func readAll(t testing.TB, fsys vfs.FS, name string) []byte {
	t.Helper()
	f, err := fsys.Open(name, vfs.ReadOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := f.Size()
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, n)
	if _, err := f.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

func writeAll(t testing.TB, fsys vfs.FS, name string, b []byte) {
	t.Helper()
	f, err := fsys.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// opLine is a file operation in the terms of the patch: kind, offset,
// length (-1: any).
type opLine struct {
	kind    faultfs.OpKind
	off, n  int64
	comment string
}

// The port makes exactly the file operations of the patch, in its order:
// for a write to an unallocated cluster under an unallocated L1 entry,
// file_size, the L2 table at the aligned end of the file with pwrite +
// sync_file_range, the L1 entry with pwrite + sync_file_range, file_size,
// the data with a plain pwrite at the aligned end, the L2 entry with
// pwrite + sync_file_range; for a write to an allocated cluster, the L2
// table read and the data pwrite alone. Flush is one fsync, Close no sync.
func TestFileOpSequence(t *testing.T) {
	for _, format := range []string{"v1", "v2"} {
		t.Run(format, func(t *testing.T) {
			const cs = 4096
			mem := vfs.NewMem()
			create(t, mem, format, cs, 4<<20)
			raw := readAll(t, mem, img)
			end := int64(len(raw))
			l1Off := int64(0)
			for i := 0; i < 8; i++ {
				l1Off = l1Off<<8 | int64(raw[40+i])
			}
			ffs := faultfs.New(mem)
			im, err := kvmtool2011.Open(ffs, img, kvmtool2011.Options{})
			if err != nil {
				t.Fatal(err)
			}
			start := len(ffs.Log())
			// Write 10 bytes at 2 MiB + 5000: L1 entry 1 (v1 and v2 with 4 KiB
			// clusters map 2 MiB per L1 entry), L2 entry 1, offset 904.
			if _, err := im.WriteAt(pattern(1, 10), 2<<20+5000); err != nil {
				t.Fatal(err)
			}
			mid := len(ffs.Log())
			if _, err := im.WriteAt(pattern(2, 10), 2<<20+4096); err != nil {
				t.Fatal(err)
			}
			if err := im.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			l2 := align(end, cs)
			data := l2 + cs
			want := []opLine{
				{faultfs.OpSize, 0, 0, "file_size (line 127)"},
				{faultfs.OpSize, 0, 0, "file_size in qcow1_write_l2_table (line 57)"},
				{faultfs.OpWrite, l2, cs, "L2 table at the aligned end (line 65)"},
				{faultfs.OpSyncRange, l2, cs, "its sync_file_range"},
				{faultfs.OpWrite, l1Off + 8, 8, "L1 entry 1 (line 138)"},
				{faultfs.OpSyncRange, l1Off + 8, 8, "its sync_file_range"},
				{faultfs.OpSize, 0, 0, "file_size (line 151)"},
				{faultfs.OpWrite, data + 904, 10, "data, plain pwrite (line 163)"},
				{faultfs.OpWrite, l2 + 8, 8, "L2 entry 1 (line 168)"},
				{faultfs.OpSyncRange, l2 + 8, 8, "its sync_file_range"},
				// Second write: the cluster is allocated.
				{faultfs.OpRead, l2, cs, "L2 table (line 123)"},
				{faultfs.OpSize, 0, 0, "file_size (line 151)"},
				{faultfs.OpWrite, data, 10, "data, plain pwrite (line 163)"},
				{faultfs.OpSync, 0, 0, "Flush: fsync"},
				{faultfs.OpClose, 0, 0, "Close: no sync"},
			}
			log := ffs.Log()[start:]
			if len(log) != len(want) || mid-start != 10 {
				var b strings.Builder
				for _, op := range log {
					fmt.Fprintln(&b, op)
				}
				t.Fatalf("%d file ops (%d for the first write), want %d (10):\n%s", len(log), mid-start, len(want), &b)
			}
			for i, w := range want {
				op := log[i]
				if op.Kind != w.kind || (w.n != 0 && (op.Offset != w.off || op.Length != w.n)) {
					t.Errorf("op %d = %v, want %s off=%d len=%d (%s)", i, op, w.kind, w.off, w.n, w.comment)
				}
			}
			// The entries are bare offsets: no QCOW_OFLAG_COPIED.
			if got := be64(log[4].Data); got != uint64(l2) {
				t.Errorf("L1 entry written %#x, want the bare offset %#x", got, l2)
			}
			if got := be64(log[8].Data); got != uint64(data) {
				t.Errorf("L2 entry written %#x, want the bare offset %#x", got, data)
			}
		})
	}
}

func align(x, a int64) int64 { return (x + a - 1) &^ (a - 1) }

func be64(b []byte) uint64 {
	var v uint64
	for _, c := range b {
		v = v<<8 | uint64(c)
	}
	return v
}

// A failed metadata write truncates the file back to the size captured
// before it (lines 141 and 171) and fails the write; a failed L2 table
// write does not (line 133).
func TestRollbackOnMetadataFailure(t *testing.T) {
	tests := []struct {
		name     string
		failOp   int // index (from the write's first op) of the op to fail
		wantSize func(end int64) int64
	}{
		{"L1 entry sync_file_range", 5, func(end int64) int64 { return end }},
		{"L1 entry pwrite", 4, func(end int64) int64 { return end }},
		{"L2 entry sync_file_range", 9, func(end int64) int64 { return align(end, 512) + 512 }},
		{"L2 table pwrite", 2, func(end int64) int64 { return end }},
		{"L2 table sync_file_range", 3, func(end int64) int64 { return align(end, 512) + 512 }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			mem := vfs.NewMem()
			create(t, mem, "v1", 512, 64<<10)
			end := int64(len(readAll(t, mem, img)))
			ffs := faultfs.New(mem)
			im, err := kvmtool2011.Open(ffs, img, kvmtool2011.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			start := len(ffs.Log())
			ffs.SetInjector(faultfs.Rule(faultfs.OnIndex(start+tc.failOp), faultfs.EIO))
			_, err = im.WriteAt(pattern(1, 100), 600)
			if !errors.Is(err, kvmtool2011.ErrIO) || !errors.Is(err, faultfs.ErrInjected) {
				t.Fatalf("WriteAt = %v, want an injected I/O error", err)
			}
			fi, err := mem.Stat(img)
			if err != nil {
				t.Fatal(err)
			}
			if want := tc.wantSize(end); fi.Size() != want {
				t.Fatalf("file size after the failure = %d, want %d (was %d)", fi.Size(), want, end)
			}
		})
	}
}

// WriteThrough ends every WriteAt and WriteZeroes with an fsync; without
// it, neither syncs the whole file.
func TestWriteThrough(t *testing.T) {
	for _, wt := range []bool{false, true} {
		t.Run(fmt.Sprint(wt), func(t *testing.T) {
			mem := vfs.NewMem()
			create(t, mem, "v2", 512, 64<<10)
			ffs := faultfs.New(mem)
			im, err := kvmtool2011.Open(ffs, img, kvmtool2011.Options{WriteThrough: wt})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := im.WriteAt(pattern(1, 100), 0); err != nil {
				t.Fatal(err)
			}
			if err := im.WriteZeroes(1000, 2000); err != nil {
				t.Fatal(err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			syncs := 0
			for _, op := range ffs.Log() {
				if op.Kind == faultfs.OpSync {
					syncs++
				}
			}
			if want := map[bool]int{false: 0, true: 2}[wt]; syncs != want {
				t.Fatalf("%d fsyncs, want %d", syncs, want)
			}
		})
	}
}

// Crashing right after one completed write, with only what was synced
// surviving, leaves the L1 entry pointing past the end of the file: the
// sync_file_range of the new L2 table made its pages durable but not the
// file size. Our reader refuses the image.
func TestCrashLeavesL1PastEnd(t *testing.T) {
	for _, format := range []string{"v1", "v2"} {
		t.Run(format, func(t *testing.T) {
			mem := vfs.NewMem()
			create(t, mem, format, 512, 64<<10)
			ffs := faultfs.New(mem)
			im, err := kvmtool2011.Open(ffs, img, kvmtool2011.Options{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := im.WriteAt(pattern(1, 512), 0); err != nil {
				t.Fatal(err)
			}
			st, err := ffs.CrashState(faultfs.LoseUnsynced, 1)
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			// Our reader refuses the image at open (v2) or the checker
			// reports the L2 table past the end (v1, whose L1 table is
			// checked lazily).
			var msg string
			q, err := qcow.Open(st, img, nil)
			if err != nil {
				msg = err.Error()
			} else {
				q.Close()
				res, err := qcow.CheckFile(st, img, "")
				if err != nil {
					t.Fatal(err)
				}
				for _, f := range res.Findings {
					if f.Kind == qcow.Corruption {
						msg += f.Msg + "\n"
					}
				}
			}
			if !strings.Contains(msg, "beyond the end of the file") {
				t.Fatalf("crash state: %q; want an L2 table beyond the end of the file", msg)
			}
		})
	}
}

// Open never panics and returns either an image or an error; a write to
// an image it opened never panics either.
func FuzzOpen(f *testing.F) {
	for _, format := range []string{"v1", "v2", "v3"} {
		mem := vfs.NewMem()
		create(f, mem, format, 512, 64<<10)
		b := readAll(f, mem, img)
		f.Add(b, int64(0))
		bad := bytes.Clone(b)
		bad[33], bad[20] = 30, 40
		f.Add(bad, int64(1000))
	}
	f.Add([]byte("QFI\xfb\x00\x00\x00\x01"), int64(5))
	f.Fuzz(func(t *testing.T, b []byte, off int64) {
		if len(b) > 1<<20 {
			return
		}
		mem := vfs.NewMem()
		writeAll(t, mem, img, b)
		im, err := kvmtool2011.Open(mem, img, kvmtool2011.Options{})
		if err != nil {
			return
		}
		defer im.Close()
		im.WriteAt([]byte("hello"), off%(1<<30))
	})
}
