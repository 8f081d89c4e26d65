package qcow

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// The events tests record workloads through faultfs with the writer's
// events labelling every file operation, and check each operation's label
// against what the operation is: its kind, and for reads and writes of the
// image file the structure its bytes belong to, tracked from the image as
// it was before the workload and from the labelled writes themselves.

// evImage is the structure of the image file as the label checker knows
// it: where each kind of metadata lives. Tables move only through their
// labelled writes (a new table is written, then the header switched).
type evImage struct {
	v1, raw     bool
	cs, l2Bytes int64
	start       int64                    // the file's length before the workload, cluster aligned
	l1Off, l1N  int64                    // the L1 table (bytes)
	l2          map[int64]bool           // L2 tables by host offset
	refblocks   map[int64]bool           // refcount blocks by host offset
	rtOff, rtN  int64                    // the refcount table (bytes)
	pendL1      [2]int64                 // a new L1 table written, not yet switched to
	pendRT      [2]int64                 // a new refcount table written, not yet switched to
	written     map[int64]map[int64]bool // sectors written during the workload, by file id
}

// evStructure reads the structure of the image called name in mem.
func evStructure(t *testing.T, mem vfs.FS, name string, format Format) *evImage {
	t.Helper()
	im, err := Open(mem, name, &Options{Format: format, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	defer im.Close()
	s := &evImage{l2: map[int64]bool{}, refblocks: map[int64]bool{}, written: map[int64]map[int64]bool{}}
	if im.format == FormatRaw {
		s.raw = true
		return s
	}
	s.v1, s.cs, s.l2Bytes = im.format == FormatQCOW, im.clusterSize, im.l2Bytes()
	s.start = (im.fileSize + s.cs - 1) &^ (s.cs - 1)
	s.l1Off, s.l1N = int64(im.h.l1Off), int64(im.h.l1Size)*8
	for i := range im.l1 {
		off, err := im.l1Entry(i)
		if err != nil {
			t.Fatal(err)
		}
		if off != 0 {
			s.l2[int64(off)] = true
		}
	}
	if !s.v1 {
		s.rtOff, s.rtN = int64(im.h.rtOff), int64(im.h.rtClusters)*s.cs
		rt, err := im.readTable(s.rtOff, int(s.rtN/8))
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range rt {
			if off := int64(e & rtOffsetMask); off != 0 {
				s.refblocks[off] = true
			}
		}
	}
	return s
}

func evWithin(off, n, lo, size int64) bool { return off >= lo && off+n <= lo+size }

// inL2 reports whether [off, off+n) lies in one known L2 table.
func (s *evImage) inL2(off, n int64) bool {
	for t := range s.l2 {
		if evWithin(off, n, t, s.l2Bytes) {
			return true
		}
	}
	return false
}

// inRefblock reports whether [off, off+n) lies in one known refcount block.
func (s *evImage) inRefblock(off, n int64) bool {
	b := off &^ (s.cs - 1)
	return s.refblocks[b] && evWithin(off, n, b, s.cs)
}

// isMeta reports whether [off, off+n) touches a known metadata structure.
func (s *evImage) isMeta(off, n int64) bool {
	overlaps := func(lo, size int64) bool { return size > 0 && off < lo+size && lo < off+n }
	if overlaps(0, s.cs) || overlaps(s.l1Off, s.l1N) || overlaps(s.rtOff, s.rtN) {
		return true
	}
	for t := range s.l2 {
		if overlaps(t, s.l2Bytes) {
			return true
		}
	}
	for b := range s.refblocks {
		if overlaps(b, s.cs) {
			return true
		}
	}
	return false
}

// fresh reports whether [off, off+n) of file lies in space nothing wrote
// before during the workload, past the file's original end: where the
// writer puts new clusters.
func (s *evImage) fresh(file int, off, n int64) bool {
	if off < s.start {
		return false
	}
	for sec := off &^ 511; sec < off+n; sec += 512 {
		if s.written[int64(file)][sec] {
			return false
		}
	}
	return true
}

// note records a write of [off, off+n) of file.
func (s *evImage) note(file int, off, n int64) {
	m := s.written[int64(file)]
	if m == nil {
		m = map[int64]bool{}
		s.written[int64(file)] = m
	}
	for sec := off &^ 511; sec < off+n; sec += 512 {
		m[sec] = true
	}
}

// forget drops what was written past size (a truncate).
func (s *evImage) forget(file int, size int64) {
	for sec := range s.written[int64(file)] {
		if sec+512 > size {
			delete(s.written[int64(file)], sec)
		}
	}
}

// evCheck checks every operation of log against its label and returns the
// labels seen. image is the path of the image file; s its structure
// before the workload.
func evCheck(t *testing.T, log []faultfs.Op, image string, s *evImage) map[string]bool {
	t.Helper()
	seen := map[string]bool{}
	valid := map[string]bool{}
	for _, e := range Events {
		valid[string(e)] = true
	}
	markers := map[string]bool{}
	for _, e := range Markers {
		markers[string(e)] = true
	}
	for _, op := range log {
		ev := op.Label
		seen[ev] = true
		if err := s.judge(op, image, valid, markers); err != nil {
			t.Errorf("%s: %v", op, err)
		}
		if op.Kind == OpWriteKind && op.Path == image {
			s.note(op.File, op.Offset, op.Length)
		}
		if op.Kind == faultfs.OpTruncate && op.Path == image {
			s.forget(op.File, op.Offset)
		}
	}
	return seen
}

// OpWriteKind is faultfs.OpWrite, named short for the checks below.
const OpWriteKind = faultfs.OpWrite

// judge says what is wrong with op's label, if anything, and moves the
// tracked tables when op switches them.
func (s *evImage) judge(op faultfs.Op, image string, valid, markers map[string]bool) error {
	ev := Event(op.Label)
	is := func(evs ...Event) error {
		if slices.Contains(evs, ev) {
			return nil
		}
		return fmt.Errorf("labelled %q, want one of %v", ev, evs)
	}
	switch {
	case ev == "":
		return fmt.Errorf("no event")
	case !valid[string(ev)]:
		return fmt.Errorf("event %q is not in Events", ev)
	case markers[string(ev)]:
		return fmt.Errorf("event %q is a marker: no file operation may carry it", ev)
	}
	repairs := []Event{EventRepair, EventDirtyRebuild}
	switch op.Kind {
	case faultfs.OpDatasync:
		return is(EventFlushToDisk)
	case faultfs.OpOpen, faultfs.OpSize:
		return is(append(repairs, EventOpen)...)
	case faultfs.OpClose:
		return is(EventClose)
	case faultfs.OpTruncate:
		if s.raw {
			return is(EventHeaderUpdate, EventRollbackTruncate)
		}
		return is(EventRollbackTruncate)
	case faultfs.OpRead:
		return s.judgeRead(op, ev, op.Path == image)
	case faultfs.OpWrite:
		if op.Path != image {
			return fmt.Errorf("a write to %q, not the image", op.Path)
		}
		return s.judgeWrite(op, ev)
	}
	return fmt.Errorf("unexpected %s operation", op.Kind)
}

func (s *evImage) judgeRead(op faultfs.Op, ev Event, image bool) error {
	off, n := op.Offset, op.Length
	if !image || s.raw {
		// The backing file, or a raw image: guest data, or its header
		// when opened.
		switch ev {
		case EventOpen, EventReadAIO, EventCOWRead, EventL2Load, EventReadCompressed:
			return nil
		}
		return fmt.Errorf("a read of a backing or raw file labelled %q", ev)
	}
	switch ev {
	case EventOpen, EventRepair, EventDirtyRebuild, EventDirtyClear:
		return nil // header, tables, the checker's reads
	case EventL2Load, EventL2AllocCOWRead:
		if n != s.l2Bytes || !s.l2[off] {
			return fmt.Errorf("%s of [%d,+%d) is not one known L2 table", ev, off, n)
		}
	case EventRefblockLoad:
		if n != s.cs || !s.refblocks[off] {
			return fmt.Errorf("%s of [%d,+%d) is not one known refcount block", ev, off, n)
		}
	case EventReftableLoad:
		if off != s.rtOff || n != s.rtN {
			return fmt.Errorf("%s of [%d,+%d) is not the refcount table [%d,+%d)", ev, off, n, s.rtOff, s.rtN)
		}
	case EventReadAIO, EventCOWRead, EventReadCompressed:
		if s.isMeta(off, n) {
			return fmt.Errorf("%s of [%d,+%d) reads metadata", ev, off, n)
		}
	default:
		return fmt.Errorf("a read labelled %q", ev)
	}
	return nil
}

func (s *evImage) judgeWrite(op faultfs.Op, ev Event) error {
	off, n := op.Offset, op.Length
	file := op.File
	if s.raw {
		return (func() error {
			if ev != EventWriteAIO {
				return fmt.Errorf("a raw image write labelled %q", ev)
			}
			return nil
		})()
	}
	freshAligned := func(unit int64) error {
		if off%s.cs != 0 || n%unit != 0 && n/512 != (n+511)/512 || !s.fresh(file, off, n) {
			return fmt.Errorf("%s of [%d,+%d) is not a new, cluster aligned structure", ev, off, n)
		}
		return nil
	}
	switch ev {
	case EventWriteAIO:
		if s.isMeta(off, n) {
			return fmt.Errorf("guest data write [%d,+%d) over metadata", off, n)
		}
	case EventCOWWrite:
		if off%s.cs != 0 || n != s.cs || !s.fresh(file, off, n) || s.isMeta(off, n) {
			return fmt.Errorf("%s of [%d,+%d) is not one new data cluster", ev, off, n)
		}
	case EventL2AllocWrite:
		if err := freshAligned(s.l2Bytes); err != nil {
			return err
		}
		for t := off; t+s.l2Bytes <= off+n; t += s.l2Bytes {
			s.l2[t] = true
		}
	case EventRefblockAllocWrite, EventRefblockAllocWriteBlks:
		if err := freshAligned(s.cs); err != nil {
			return err
		}
		for b := off; b < off+n; b += s.cs {
			s.refblocks[b] = true
		}
	case EventRefblockAllocWriteTbl:
		if err := freshAligned(s.cs); err != nil {
			return err
		}
		s.pendRT = [2]int64{off, n}
	case EventL1GrowWriteTable:
		if err := freshAligned(8); err != nil {
			return err
		}
		s.pendL1 = [2]int64{off, n}
	case EventL1Update:
		if off%8 != 0 || !evWithin(off, n, s.l1Off, s.l1N) {
			return fmt.Errorf("l1_update [%d,+%d) outside the L1 table [%d,+%d)", off, n, s.l1Off, s.l1N)
		}
	case EventL2Update:
		if off%8 != 0 || !s.inL2(off, n) {
			return fmt.Errorf("l2_update [%d,+%d) outside every known L2 table", off, n)
		}
	case EventRefblockUpdatePart, EventClusterFree:
		if !s.inRefblock(off, n) {
			return fmt.Errorf("%s [%d,+%d) outside every known refcount block", ev, off, n)
		}
	case EventRefblockAllocHookup:
		if off%8 != 0 || !evWithin(off, n, s.rtOff, s.rtN) {
			return fmt.Errorf("hookup [%d,+%d) outside the refcount table [%d,+%d)", off, n, s.rtOff, s.rtN)
		}
	case EventRefblockAllocSwitch:
		if off != 48 || n != 12 {
			return fmt.Errorf("switch_table writes [%d,+%d), not the header's refcount table fields", off, n)
		}
		rt := int64(binary.BigEndian.Uint64(op.Data))
		if rt != s.pendRT[0] {
			return fmt.Errorf("switch_table to %#x, but the new table was written at %#x", rt, s.pendRT[0])
		}
		s.rtOff, s.rtN = rt, int64(binary.BigEndian.Uint32(op.Data[8:]))*s.cs
	case EventL1GrowActivateTable:
		if off != 24 || n != 24 {
			return fmt.Errorf("activate_table writes [%d,+%d), not the header's size and L1 fields", off, n)
		}
		l1 := int64(binary.BigEndian.Uint64(op.Data[16:]))
		if l1 != s.pendL1[0] {
			return fmt.Errorf("activate_table to %#x, but the new L1 table was written at %#x", l1, s.pendL1[0])
		}
		s.l1Off, s.l1N = l1, s.pendL1[1]
		if !s.v1 {
			s.l1N = int64(binary.BigEndian.Uint32(op.Data[12:])) * 8
		}
	case EventHeaderUpdate:
		if !(off == 24 && n == 24) && !(off == 88 && n == 8) {
			return fmt.Errorf("header_update writes [%d,+%d)", off, n)
		}
		if off == 24 && int64(binary.BigEndian.Uint64(op.Data[16:])) != s.l1Off {
			return fmt.Errorf("header_update moves the L1 table")
		}
	case EventRollbackPointers:
		if !evWithin(off, n, s.l1Off, s.l1N) && !s.inL2(off, n) && !(off == 24 && n == 24) {
			return fmt.Errorf("rollback_pointers [%d,+%d) outside the L1 table, the L2 tables and the header", off, n)
		}
	case EventRollbackRefTable:
		if !evWithin(off, n, s.rtOff, s.rtN) && !(off == 48 && n == 12) {
			return fmt.Errorf("rollback_reftable [%d,+%d) outside the refcount table and the header", off, n)
		}
	case EventRollbackRefcount:
		if !s.inRefblock(off, n) {
			return fmt.Errorf("rollback_refcounts [%d,+%d) outside the refcount blocks", off, n)
		}
	case EventRepair, EventDirtyRebuild:
		if !(n == 512 && s.inRefblock(off, n)) && !(n == 8 && (evWithin(off, n, s.l1Off, s.l1N) || s.inL2(off, n))) {
			return fmt.Errorf("%s writes [%d,+%d), neither a refcount sector nor an L1/L2 entry", ev, off, n)
		}
	case EventDirtyClear:
		if off != 72 || n != 8 {
			return fmt.Errorf("dirty_clear writes [%d,+%d), not the incompatible features", off, n)
		}
	default:
		return fmt.Errorf("a write labelled %q", ev)
	}
	return nil
}

// evRun opens name in a faultfs over mem with events labelling its
// operations, runs fn on the image and closes it, then reads the whole
// disk back through a second labelled open, and checks the log.
func evRun(t *testing.T, mem vfs.FS, name string, o Options, inj faultfs.Injector, fn func(im *Image) error) map[string]bool {
	t.Helper()
	s := evStructure(t, mem, name, o.Format)
	ffs := faultfs.New(mem)
	if inj != nil {
		ffs.SetInjector(inj)
	}
	o.ReadWrite = true
	o.Events = LabelEvents(ffs)
	im, err := Open(ffs, name, &o)
	if err != nil {
		t.Fatal(err)
	}
	ferr := fn(im)
	if err := im.Close(); err != nil && ferr == nil && inj == nil {
		t.Fatal(err)
	}
	if ferr != nil && inj == nil {
		t.Fatal(ferr)
	}
	ffs.SetInjector(nil)
	ro, err := Open(ffs, name, &Options{Format: o.Format, Events: o.Events})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, ro.Size())
	if _, err := ro.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	ro.Close()
	log := ffs.Log()
	if testing.Verbose() {
		for _, op := range log {
			t.Log(op)
		}
	}
	return evCheck(t, log, name, s)
}

// evFailAfter fails (EIO) the first barrier after the nth operation
// labelled after (from 1), so that a write-through write rolls back what
// it wrote in place.
type evFailAfter struct {
	after string
	nth   int
	armed bool
	fired bool
}

func (f *evFailAfter) String() string { return "evFailAfter(" + f.after + ")" }

func (f *evFailAfter) MaybeInject(op faultfs.Op) faultfs.Action {
	if op.Label == f.after {
		f.nth--
		f.armed = f.nth <= 0
	}
	if f.armed && !f.fired && op.Kind == faultfs.OpDatasync {
		f.fired = true
		return faultfs.Action{Fault: faultfs.FaultEIO}
	}
	return faultfs.Action{}
}

// evPatchShared makes guest cluster 0 of the closed image name look shared
// with a snapshot: its L1 and L2 entries lose COPIED and the refcounts of
// its L2 table and data cluster become 2, as `qemu-img snapshot -c` leaves
// them, so that the next write copies both.
func evPatchShared(t *testing.T, mem vfs.FS, name string) {
	t.Helper()
	im, err := Open(mem, name, nil)
	if err != nil {
		t.Fatal(err)
	}
	l1e, l2off := im.l1[0], int64(im.l1[0]&l1OffsetMask)
	tab, err := im.l2Table(uint64(l2off))
	if err != nil {
		t.Fatal(err)
	}
	l2e := tab[0]
	rt, err := im.readTable(int64(im.h.rtOff), 1)
	if err != nil {
		t.Fatal(err)
	}
	cs, rb, order := im.clusterSize, int64(rt[0]&rtOffsetMask), im.h.refcountOrder
	im.Close()
	if order != 4 || l2e&l2OffsetMask == 0 {
		t.Fatalf("evPatchShared wants 16-bit refcounts and an allocated cluster 0 (order %d, entry %#x)", order, l2e)
	}
	put := func(off int64, v uint64) {
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], v)
		wtPatch(t, mem, name, off, b[:])
	}
	put(int64(im.h.l1Off), l1e&^flagCopied)
	put(l2off, l2e&^flagCopied)
	for _, c := range []int64{l2off / cs, int64(l2e&l2OffsetMask) / cs} {
		wtPatch(t, mem, name, rb+2*c, []byte{0, 2})
	}
}

// TestEventsLabelEveryOp records workloads that between them reach every
// event the writer issues, and checks that every file operation carries
// the event that names it (see evCheck), and that every event of Events
// but the markers labels some operation.
func TestEventsLabelEveryOp(t *testing.T) {
	seen := map[string]bool{}
	add := func(m map[string]bool) {
		for k := range m {
			seen[k] = true
		}
	}
	data := func(n int) []byte { return crashData(int64(n), uint64(n)) }
	ran, skipped := 0, map[string]bool{}
	run := func(name string, f func(t *testing.T)) {
		t.Run(name, func(t *testing.T) {
			ran++
			defer func() {
				if t.Skipped() {
					skipped[name] = true
				}
			}()
			f(t)
		})
	}
	const workloads = 9
	for _, wt := range []bool{false, true} {
		run(fmt.Sprintf("growth/wt=%v", wt), func(t *testing.T) {
			// Small clusters and 64-bit refcounts: new L2 tables, new
			// refcount blocks, a new refcount table, a bigger L1 table.
			mem := vfs.NewMem()
			size := int64(64<<20 - 16<<10)
			if err := Create(mem, "img", CreateOptions{Size: size, ClusterSize: 512, RefcountBits: 64}); err != nil {
				t.Fatal(err)
			}
			add(evRun(t, mem, "img", Options{WriteThrough: wt}, nil, func(im *Image) error {
				steps := []func() error{
					func() error { _, err := im.WriteAt(data(512), 0); return err },
					func() error { _, err := im.WriteAt(data(10), 100); return err },        // in place
					func() error { _, err := im.WriteAt(data(300), 1<<20+100); return err }, // fresh, guest bytes only
					im.Flush,
					func() error { _, err := im.WriteAt(data(3<<20), 2<<20); return err }, // refcount table grows
					im.Flush,
					func() error { _, err := im.WriteAt(data(512), 512); return err }, // l2_update
					func() error { return im.Resize(64 << 20) },                       // header only
					func() error { return im.Resize(128 << 20) },                      // L1 grows
					func() error { return im.WriteZeroes(0, 4096) },
				}
				for _, f := range steps {
					if err := f(); err != nil {
						return err
					}
				}
				return nil
			}))
		})
	}
	run("backing", func(t *testing.T) {
		mem, _ := crashSetup(t, crashConfig{version: 3, cs: 4096, rcBits: 16, backing: true}, 1<<20, 3)
		add(evRun(t, mem, "img", Options{}, nil, func(im *Image) error {
			_, err := im.WriteAt(data(100), 5000) // cow_read from the backing file
			return err
		}))
	})
	run("shared", func(t *testing.T) {
		mem, _ := crashSetup(t, crashConfig{version: 3, cs: 4096, rcBits: 16}, 1<<20, 3)
		evRun(t, mem, "img", Options{}, nil, func(im *Image) error {
			_, err := im.WriteAt(data(4096), 0)
			return err
		})
		evPatchShared(t, mem, "img")
		add(evRun(t, mem, "img", Options{}, nil, func(im *Image) error {
			_, err := im.WriteAt(data(100), 50) // l2_alloc_cow_read, cow_read
			return err
		}))
	})
	run("rollback", func(t *testing.T) {
		mem := vfs.NewMem()
		if err := Create(mem, "img", CreateOptions{Size: 8 << 20, ClusterSize: 512}); err != nil {
			t.Fatal(err)
		}
		inj := &evFailAfter{after: string(EventL1Update), nth: 2}
		add(evRun(t, mem, "img", Options{WriteThrough: true}, inj, func(im *Image) error {
			if _, err := im.WriteAt(data(512), 0); err != nil {
				return err
			}
			_, err := im.WriteAt(data(200<<10), 512) // fails at the stage 3 barrier
			if err == nil {
				t.Error("the write did not fail")
			}
			return err
		}))
		if !inj.fired {
			t.Error("no fault fired")
		}
	})
	run("dirty", func(t *testing.T) {
		mem, _ := crashSetup(t, crashConfig{version: 3, cs: 4096, rcBits: 16}, 1<<20, 3)
		evRun(t, mem, "img", Options{}, nil, func(im *Image) error {
			_, err := im.WriteAt(data(4096), 0)
			return err
		})
		evPatchShared(t, mem, "img")          // refcounts too high: leaks, COPIED wrong
		wtPatch(t, mem, "img", 79, []byte{1}) // the dirty bit
		add(evRun(t, mem, "img", Options{}, nil, func(im *Image) error { return nil }))
		evPatchShared(t, mem, "img")
		ffs := faultfs.New(mem)
		s := evStructure(t, mem, "img", "")
		if _, err := RepairWithEvents(ffs, "img", "", RepairAll, LabelEvents(ffs)); err != nil {
			t.Fatal(err)
		}
		add(evCheck(t, ffs.Log(), "img", s))
	})
	run("raw", func(t *testing.T) {
		mem := vfs.NewMem()
		f, _ := mem.Create("raw")
		f.Truncate(1 << 20)
		f.Close()
		add(evRun(t, mem, "raw", Options{Format: FormatRaw}, nil, func(im *Image) error {
			if _, err := im.WriteAt(data(100), 10); err != nil {
				return err
			}
			if err := im.Flush(); err != nil {
				return err
			}
			return im.Resize(2 << 20)
		}))
	})
	run("v1", func(t *testing.T) {
		mem, _ := crashSetup(t, crashConfig{version: 1, cs: 4096, backing: true}, 1<<20, 3)
		add(evRun(t, mem, "img", Options{WriteThrough: true}, nil, func(im *Image) error {
			_, err := im.WriteAt(data(100), 70000)
			return err
		}))
	})
	run("compressed", func(t *testing.T) {
		dir := t.TempDir()
		path := filepath.Join(dir, "c.qcow2")
		qemutest.Img(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "1M")
		qemutest.IO(t, "-f", "qcow2", "-c", "write -c -P 7 0 8k", path)
		mem := vfs.NewMem()
		f, _ := mem.Create("img")
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		f.WriteAt(b, 0)
		f.Close()
		add(evRun(t, mem, "img", Options{}, nil, func(im *Image) error {
			_, err := im.WriteAt(data(100), 4096+50) // cow_read of a compressed cluster
			return err
		}))
	})
	if t.Failed() || ran < workloads {
		return // a failure, or -run chose some workloads only
	}
	var missing []string
	for _, e := range Events {
		if skipped["compressed"] && e == EventReadCompressed {
			continue // qemu-img makes the compressed image
		}
		if !seen[string(e)] && !slices.Contains(Markers, e) {
			missing = append(missing, string(e))
		}
	}
	if len(missing) > 0 {
		t.Errorf("events no workload issued: %s", strings.Join(missing, " "))
	}
}
