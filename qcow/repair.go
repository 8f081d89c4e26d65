package qcow

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// RepairMode selects what Repair may change, as `qemu-img check -r`.
type RepairMode int

const (
	// RepairLeaks lowers refcounts that are higher than the references
	// to their cluster (leaked clusters); then, if the COPIED flags of
	// the active tables are the image's only remaining problem, it fixes
	// them too (qemu-img check -r leaks does the same).
	RepairLeaks RepairMode = iota + 1
	// RepairAll also raises refcounts that are lower than the references
	// (where the refcount block covering them exists and is sound), fixes
	// the COPIED flags of the active L1 and L2 tables, and clears the
	// corrupt bit when the image then checks clean.
	RepairAll
)

// String returns "leaks" or "all", the argument of `check -r`.
func (m RepairMode) String() string {
	switch m {
	case RepairLeaks:
		return "leaks"
	case RepairAll:
		return "all"
	}
	return fmt.Sprintf("RepairMode(%d)", int(m))
}

// ParseRepairMode parses "leaks" or "all".
func ParseRepairMode(s string) (RepairMode, error) {
	switch s {
	case "leaks":
		return RepairLeaks, nil
	case "all":
		return RepairAll, nil
	}
	return 0, fmt.Errorf("qcow: unknown repair mode %q (want leaks or all)", s)
}

// RepairResult is the outcome of Repair.
type RepairResult struct {
	// Before is the check of the image as Repair found it; After is the
	// check after the repairs (the same as Before when nothing was
	// written).
	Before, After *CheckResult
	// Repairs lists each change made, in qemu-img check's words
	// ("Repairing cluster N refcount=a reference=b"); Offset is that of
	// the finding of Before the change repairs.
	Repairs []Finding
	// Unrepaired lists the findings Repair left alone on purpose because
	// changing them was not safe (Kind CheckError).
	Unrepaired []Finding
	// LeaksFixed and CorruptionsFixed count the repairs, as qemu-img
	// check's leaks-fixed and corruptions-fixed.
	LeaksFixed, CorruptionsFixed int
}

// repairSector is the unit of every refcount block write: a refcount block
// is changed one 512-byte sector at a time, the write size a disk performs
// atomically.
const repairSector = 512

// Repair checks the image file called name (never its backing chain) and
// repairs what mode allows, like `qemu-img check -r leaks|all`, then checks
// it again. It opens the file read-write itself, which takes the writer
// lock: it fails (wrapping vfs.ErrLocked) while another writer has the
// image open. Raw and QCOW version 1 images have no refcounts: they are
// checked and returned unchanged. An error is returned only when the
// repair could not run (open, I/O); what it could not fix shows in
// RepairResult.Unrepaired and in After.
//
// Every change keeps the image safe to use if the process or the machine
// crashes at any point:
//
//  1. Refcounts are only ever moved towards the references the check
//     computed: a refcount lower than its references is raised to them
//     (RepairAll), and one higher is lowered to them, never below. A
//     refcount too low is what lets a writer reuse a cluster still in
//     use, so raises go first, each 512-byte sector of a refcount block
//     written whole, then a Datasync; then the lowerings, then a
//     Datasync. A torn state holds each refcount at its old value or at
//     the computed one. Nothing is lowered when the check could not walk
//     every structure (a table overlapping another, beyond the end of the
//     file, a snapshot or bitmap entry it had to skip): references it did
//     not see may exist. Refcounts are only changed in refcount blocks
//     that the refcount table names correctly and nothing else uses; a
//     refcount whose block is missing or broken is reported as
//     unrepaired, not rebuilt.
//  2. Repair then checks again and sets the COPIED flag of each active
//     L1 and L2 entry exactly when the (now durable, correct) refcount of
//     the cluster it points at is 1, with one 8-byte write per entry,
//     then a Datasync. A COPIED flag is never set for a cluster whose
//     refcount is still wrong; RepairLeaks fixes the flags only when
//     they are the only problem the check finds.
//  3. Last, when the final check is clean, the dirty bit (lazy refcounts
//     are now exact, so it may go, as qemu-img check -r clears it for
//     either mode) and, with RepairAll only, the corrupt bit are cleared
//     in one 8-byte header write followed by a Datasync.
func Repair(fsys vfs.FS, name string, format Format, mode RepairMode) (*RepairResult, error) {
	return repairEvents(fsys, name, format, mode, nil, EventRepair)
}

// RepairWithEvents is Repair telling events what each of its file
// operations is for (see Event): repair for its reads and its refcount and
// COPIED writes, flush_to_disk for its barriers, dirty_clear for the
// header write that clears the dirty bit, open and close. Pass
// LabelEvents(fsys) to label a faultfs log.
func RepairWithEvents(fsys vfs.FS, name string, format Format, mode RepairMode, events func(Event)) (*RepairResult, error) {
	return repairEvents(fsys, name, format, mode, events, EventRepair)
}

// repairEvents is Repair reporting its file operations to events: ev
// (repair, or dirty_rebuild) for its reads and refcount and COPIED
// writes, flush_to_disk for its barriers, dirty_clear for the header
// write that clears the dirty bit, close for the file's close.
func repairEvents(fsys vfs.FS, name string, format Format, mode RepairMode, events func(Event), ev Event) (*RepairResult, error) {
	if mode != RepairLeaks && mode != RepairAll {
		return nil, fmt.Errorf("qcow: %s: repair: invalid mode %d", name, int(mode))
	}
	if events != nil {
		events(ev)
	}
	f, err := fsys.Open(name, vfs.ReadWrite)
	if err != nil {
		return nil, fmt.Errorf("qcow: %s: repair: %w", name, err)
	}
	im, err := openRepair(fsys, name, f, format)
	if err != nil {
		if events != nil {
			events(EventClose)
		}
		f.Close()
		return nil, err
	}
	im.events, im.repairEv = events, ev
	res, err := im.repair(mode)
	if cerr := im.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("qcow: %s: repair: close: %w", name, cerr)
	}
	if err != nil {
		return nil, err
	}
	return res, nil
}

// openRepair opens the already opened file f for checking, with CheckFile's
// tolerance for tables that qemu-img check reports as corruption.
func openRepair(fsys vfs.FS, name string, f vfs.File, format Format) (*Image, error) {
	im, err := openFile(fsys, name, f, Options{Format: format, NoBacking: true}, format, 0, map[string]bool{})
	if err == nil {
		return im, nil
	}
	var fe *FormatError
	if !errors.As(err, &fe) || fe.Err != ErrFormat {
		return nil, err
	}
	switch fe.Field {
	case "l1_entry", "l1_table_offset", "refcount_table_offset", "snapshots_offset":
	default:
		return nil, err
	}
	im2 := &Image{fsys: fsys, name: name, f: f, dataFile: f, format: FormatQCOW2}
	if err2 := im2.openForCheck(); err2 != nil {
		return nil, err
	}
	return im2, nil
}

// runCheck runs one full check of im and returns the checker with its
// computed references.
func (im *Image) runCheck() (*checker, *CheckResult, error) {
	im.event(im.repairEv)
	if im.format != FormatQCOW2 {
		res, err := im.Check()
		return nil, res, err
	}
	c := newChecker(im)
	c.wantCopied = true
	res, err := c.run()
	if res != nil {
		res.Format = im.format
	}
	return c, res, err
}

// refChange is one planned refcount change: cluster k from old to v.
type refChange struct {
	k      int64
	old, v uint64
	block  int64 // offset of the refcount block holding it
}

func (im *Image) repair(mode RepairMode) (*RepairResult, error) {
	c, before, err := im.runCheck()
	if err != nil {
		return nil, err
	}
	r := &RepairResult{Before: before, After: before}
	if c == nil {
		return r, nil // raw or QCOW v1: no refcounts, nothing to repair
	}
	raises, lowers := c.planRefcounts(mode, r)
	wrote := false
	if len(raises) > 0 || len(lowers) > 0 {
		if err := im.writeRefcounts(c, raises, lowers); err != nil {
			return nil, err
		}
		wrote = true
		for _, ch := range raises {
			r.CorruptionsFixed++
			r.Repairs = append(r.Repairs, Finding{Kind: Corruption, Offset: ch.k << c.cb,
				Msg: fmt.Sprintf("Repairing cluster %d refcount=%d reference=%d", ch.k, ch.old, ch.v)})
		}
		for _, ch := range lowers {
			r.LeaksFixed++
			r.Repairs = append(r.Repairs, Finding{Kind: Leak, Offset: ch.k << c.cb,
				Msg: fmt.Sprintf("Repairing cluster %d refcount=%d reference=%d", ch.k, ch.old, ch.v)})
		}
	}
	{
		// The flags are judged against the refcounts as they are now
		// (a lowered refcount of 1 may now want COPIED).
		c2 := c
		if wrote {
			var err error
			if c2, _, err = im.runCheck(); err != nil {
				return nil, err
			}
		}
		if len(c2.copied) > 0 && (mode == RepairAll || c2.onlyCopied()) {
			n, err := im.fixCopied(c2, r)
			if err != nil {
				return nil, err
			}
			wrote = wrote || n > 0
		}
	}
	after := before
	if wrote {
		if _, after, err = im.runCheck(); err != nil {
			return nil, err
		}
	}
	if err := im.clearFlags(mode, after); err != nil {
		return nil, err
	}
	r.After = after
	return r, nil
}

// onlyCopied reports whether the only findings of the check are COPIED
// flags that disagree with the stored refcounts: then the refcounts are
// right, and RepairLeaks fixes the flags too, as qemu-img check -r leaks.
func (c *checker) onlyCopied() bool {
	var n uint64
	for _, fx := range c.copied {
		n += fx.n
	}
	return len(c.copied) < maxRepairCopied && c.res.CheckErrors == 0 && c.res.Leaks == 0 && uint64(c.res.Corruptions) == n
}

// computed returns the references the check counted for host cluster k;
// ok is false for a cluster outside the range the check accounted for.
func (c *checker) computed(k int64) (n uint64, ok bool) {
	if k < 0 || k >= c.nb || k>>refChunkBits >= int64(len(c.refs.chunks)) {
		return 0, false
	}
	return c.refs.get(k), true
}

// soundBlock returns the offset of the refcount block covering cluster k
// when it can be written in place: the refcount table names it without
// reserved bits, it is cluster aligned and lies inside the file, and
// nothing but the refcount table references its cluster.
func (c *checker) soundBlock(k int64) (int64, bool) {
	rti := uint64(k) >> c.rbBits
	if rti >= uint64(len(c.rt)) {
		return 0, false
	}
	e := c.rt[rti]
	off := e & rtOffsetMask
	if e&rtReservedMask != 0 || off == 0 || off%uint64(c.cs) != 0 || off > MaxHostOffset || int64(off)+c.cs > c.fileSize {
		return 0, false
	}
	bk := int64(off >> c.cb)
	if n, ok := c.computed(bk); !ok || n != 1 || c.refs.kind(bk) != kindRefBlock {
		return 0, false
	}
	return int64(off), true
}

// planRefcounts compares the computed references with the stored refcounts
// and returns the changes mode allows: raises (RepairAll) and lowerings.
// What cannot be changed safely goes to r.Unrepaired.
func (c *checker) planRefcounts(mode RepairMode, r *RepairResult) (raises, lowers []refChange) {
	unrepaired := func(k int64, format string, args ...any) {
		if len(r.Unrepaired) < MaxCheckFindings {
			r.Unrepaired = append(r.Unrepaired, Finding{Kind: CheckError, Offset: k << c.cb, Msg: fmt.Sprintf(format, args...)})
		}
	}
	perBlock := int64(1) << c.rbBits
	leaksSkipped := false
	for i := int64(0); i < c.nb; {
		rti := uint64(i) >> c.rbBits
		noBlock := rti >= uint64(len(c.rt)) || c.rt[rti]&rtOffsetMask == 0
		if noBlock && c.refs.empty(i) {
			i = min((i|(refChunkLen-1))+1, (i|(perBlock-1))+1)
			continue
		}
		computed := c.refs.get(i)
		stored, ok := c.onDisk(i)
		k := i
		i++
		if ok && stored == computed {
			continue
		}
		if !ok {
			if mode == RepairAll {
				unrepaired(k, "could not repair cluster %d: its refcount block is not cluster aligned", k)
			}
			continue
		}
		blk, sound := c.soundBlock(k)
		switch {
		case stored > computed:
			switch {
			case c.incomplete:
				if !leaksSkipped {
					leaksSkipped = true
					unrepaired(k, "could not repair leaks: the check could not walk every structure, so a cluster that looks leaked (cluster %d refcount=%d reference=%d and others) may still be in use", k, stored, computed)
				}
			case !sound:
				unrepaired(k, "could not repair leaked cluster %d refcount=%d reference=%d: its refcount block is missing or unsound", k, stored, computed)
			default:
				lowers = append(lowers, refChange{k: k, old: stored, v: computed, block: blk})
			}
		case stored < computed && mode == RepairAll:
			if !sound {
				unrepaired(k, "could not repair cluster %d refcount=%d reference=%d: its refcount block is missing or unsound", k, stored, computed)
				continue
			}
			raises = append(raises, refChange{k: k, old: stored, v: min(computed, c.refMax), block: blk})
		}
	}
	return raises, lowers
}

// writeRefcounts applies the raises, then a Datasync, then the lowerings,
// then a Datasync, each refcount block changed in place one 512-byte sector
// at a time.
func (im *Image) writeRefcounts(c *checker, raises, lowers []refChange) error {
	blocks := map[int64][]byte{} // current contents, as on disk
	load := func(off int64) ([]byte, error) {
		if b, ok := blocks[off]; ok {
			return b, nil
		}
		b := make([]byte, c.cs)
		if err := im.readFull(b, off); err != nil {
			return nil, fmt.Errorf("qcow: %s: repair: %w", im.name, err)
		}
		blocks[off] = b
		return b, nil
	}
	apply := func(chs []refChange) error {
		if len(chs) == 0 {
			return nil
		}
		im.event(im.repairEv)
		dirty := map[int64]bool{} // sector offsets in the file
		for _, ch := range chs {
			b, err := load(ch.block)
			if err != nil {
				return err
			}
			j := ch.k & (int64(1)<<c.rbBits - 1)
			// Never trust the plan over the disk: the entry must still
			// hold the refcount the check read.
			if got := storedRefcount(b, uint64(j), c.h.refcountOrder); got != ch.old {
				return fmt.Errorf("qcow: %s: repair: refcount of cluster %d changed during repair (%d, expected %d)", im.name, ch.k, got, ch.old)
			}
			lo, _ := setRefcountAt(b, c.h.refcountOrder, j, ch.v)
			dirty[ch.block+int64(lo)&^(repairSector-1)] = true
		}
		secs := make([]int64, 0, len(dirty))
		for s := range dirty {
			secs = append(secs, s)
		}
		slices.Sort(secs)
		for _, s := range secs {
			blk := s &^ (c.cs - 1)
			in := s - blk
			if _, err := im.f.WriteAt(blocks[blk][in:in+repairSector], s); err != nil {
				return fmt.Errorf("qcow: %s: repair: write refcounts at %#x: %w", im.name, s, err)
			}
		}
		im.event(EventFlushToDisk)
		if err := im.f.Datasync(); err != nil {
			return fmt.Errorf("qcow: %s: repair: datasync: %w", im.name, err)
		}
		return nil
	}
	if err := apply(raises); err != nil {
		return err
	}
	return apply(lowers)
}

// fixCopied sets the COPIED flag of each active L1 and L2 entry c found
// wrong exactly when the stored refcount is 1, for clusters whose stored
// refcount equals their references, then syncs. It returns how many
// entries it changed.
func (im *Image) fixCopied(c *checker, r *RepairResult) (int, error) {
	im.event(im.repairEv)
	n := 0
	for _, fx := range c.copied {
		what := "data"
		if fx.l1 {
			what = "L2"
		}
		if refs, ok := c.computed(fx.k); !ok || refs != fx.rc || refs == 0 {
			if len(r.Unrepaired) < MaxCheckFindings {
				r.Unrepaired = append(r.Unrepaired, Finding{Kind: CheckError, Offset: fx.at,
					Msg: fmt.Sprintf("could not repair OFLAG_COPIED %s cluster: entry=%#x refcount=%d reference=%d (the refcount is wrong)", what, fx.entry, fx.rc, refs)})
			}
			continue
		}
		var b [8]byte
		if err := im.readFull(b[:], fx.at); err != nil {
			return n, fmt.Errorf("qcow: %s: repair: %w", im.name, err)
		}
		if got := binary.BigEndian.Uint64(b[:]); got != fx.entry {
			return n, fmt.Errorf("qcow: %s: repair: entry at %#x changed during repair (%#x, expected %#x)", im.name, fx.at, got, fx.entry)
		}
		e := fx.entry &^ flagCopied
		if fx.rc == 1 {
			e |= flagCopied
		}
		binary.BigEndian.PutUint64(b[:], e)
		if _, err := im.f.WriteAt(b[:], fx.at); err != nil {
			return n, fmt.Errorf("qcow: %s: repair: write entry at %#x: %w", im.name, fx.at, err)
		}
		n++
		r.CorruptionsFixed++
		r.Repairs = append(r.Repairs, Finding{Kind: Corruption, Offset: fx.at,
			Msg: fmt.Sprintf("Repairing OFLAG_COPIED %s cluster: entry=%#x refcount=%d", what, fx.entry, fx.rc)})
	}
	if n > 0 {
		im.event(EventFlushToDisk)
		if err := im.f.Datasync(); err != nil {
			return n, fmt.Errorf("qcow: %s: repair: datasync: %w", im.name, err)
		}
	}
	return n, nil
}

// clearFlags clears the dirty bit (and, for RepairAll, the corrupt bit) of
// a version 3 image whose final check is clean: one 8-byte write of the
// incompatible features, then a Datasync.
func (im *Image) clearFlags(mode RepairMode, after *CheckResult) error {
	h := im.h
	if h == nil || h.version < 3 || after.Corruptions > 0 || after.Leaks > 0 || after.CheckErrors > 0 {
		return nil
	}
	clear := uint64(IncompatDirty)
	if mode == RepairAll {
		clear |= IncompatCorrupt
	}
	if h.incompat&clear == 0 {
		return nil
	}
	// Re-read the field: only the two bits change.
	im.event(EventDirtyClear)
	var b [8]byte
	if err := im.readFull(b[:], 72); err != nil {
		return fmt.Errorf("qcow: %s: repair: %w", im.name, err)
	}
	v := binary.BigEndian.Uint64(b[:]) &^ clear
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := im.f.WriteAt(b[:], 72); err != nil {
		return fmt.Errorf("qcow: %s: repair: write header: %w", im.name, err)
	}
	im.event(EventFlushToDisk)
	if err := im.f.Datasync(); err != nil {
		return fmt.Errorf("qcow: %s: repair: datasync: %w", im.name, err)
	}
	h.incompat = v
	return nil
}

// rebuildDirty repairs the refcounts of a dirty image before a writable
// open, and fails unless the image is then clean and no longer dirty.
func rebuildDirty(fsys vfs.FS, name string, format Format, events func(Event)) error {
	res, err := repairEvents(fsys, name, format, RepairAll, events, EventDirtyRebuild)
	if err != nil {
		return fmt.Errorf("qcow: %s: rebuilding the refcounts of a dirty image: %w", name, err)
	}
	if a := res.After; a == nil || a.Corruptions > 0 || a.Leaks > 0 || a.CheckErrors > 0 {
		return fmt.Errorf("%w: %s: the dirty bit is set and the refcounts could not be fully rebuilt (qemu-img check -r all)", ErrReadOnly, name)
	}
	return nil
}
