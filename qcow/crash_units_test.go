package qcow

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/model"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// unitVerifier judges the content of the crash states of a recording,
// point after point in ascending order, without reading each state whole.
//
// A crash state differs from the other states of its point only in the
// version each pending unit of the image file holds (faultfs PendingUnits
// and State.Choices). So, once per point, every guest cluster is mapped
// through the reader's own classification of its L2 entry
// (Image.classifyEntry) and sorted into:
//
//   - static: its L1 and L2 entries and the bytes it reads lie outside
//     every pending unit and outside the range where the file size varies.
//     It reads the same in every state of the point and is verified once,
//     through the first state's reader. It is not verified again at later
//     points while its L2 entry holds the same value and no file operation
//     has written cluster 0, another file or the host clusters it reads,
//     and the model has not changed it (generation counters, staticKey).
//   - by units: its entries are fixed (or lie in one pending unit: then per
//     version of that unit, the entry value it gives) and it reads plain
//     data clusters. Every sector it reads from a pending unit is judged
//     once per version of that unit with model.Allows; the others are read
//     from the first state. A state then passes if each such unit holds a
//     version allowed for every sector it feeds: a few bit tests.
//   - direct: anything else (compressed data over pending bytes, entries
//     that are not plain, an L1 entry in a pending unit, bytes where the
//     file size varies): read through each state's reader and verified.
//
// When the header, the L1 table or another file may differ between the
// states, when the unit is smaller than a sector, under Garbage, and for an
// external data file, every state is verified whole.
//
// A unit check that fails is confirmed by verifying the cluster through the
// state's reader; if that passes, the verifier reports its own error. The
// check verdict is remembered per point (see verify). The verdicts agree
// with whole verification (TestCrashUnitVerifierAgrees).
type unitVerifier struct {
	mdl faultfs.Model
	m   *model.Disk

	// Generations: counters bumped by file writes (per host cluster) and
	// by model changes (per guest cluster), to tell when a static
	// cluster's verdict still holds.
	cs, cb   int64
	clGen    gens    // per host cluster
	guestGen gens    // per guest cluster
	flushed  []int64 // guest clusters written since the model's last flush
	gen      uint64
	logDone  int         // file operations already accounted for
	fileEnd  int64       // largest end offset the image file has had
	static   []staticKey // per guest cluster, the key of its last static verification
	otherGen uint64      // bumped by writes to files other than the image

	// Per point.
	point    *faultfs.Point
	whole    bool
	pf       faultfs.PendingFile
	pfOK     bool  // the image's binding is not pending
	fail     error // a failure every state of the point shares
	cons     []unitCons
	direct   []int64
	vars     []varCluster
	prepared bool
	memo     []*checkEntry // check verdicts of this point
	chBuf    []uint32      // scratch for memoLookup
	only     int8          // onlyImage: 0 not yet known, 1 yes, -1 no

	// Counters: states verified whole, by units; clusters verified
	// static (fresh), static reused, by units, direct per state.
	wholeN, unitN, memoHits, varN      int
	staticN, reusedN, byUnitN, directN int
	buf                                []byte
}

// unitCons requires pending unit slot to hold one of the versions in mask
// (bit j: version j) for guest cluster c to read allowed bytes.
type unitCons struct {
	slot int32
	mask uint64
	c    int64
}

// variant is what one value of a cluster's L2 entry makes of the cluster.
type variant struct {
	fail   bool // some sector reads a value the model does not allow
	direct bool // judged by reading each state
	cons   []unitCons
}

// varCluster is a guest cluster whose L2 entry lies in pending unit slot:
// version j of that unit gives the entry of vs[of[j]].
type varCluster struct {
	c    int64
	slot int32
	of   []int
	vs   []variant
}

// gens holds generation counters by index; missing ones are 0.
type gens []uint64

func (g gens) get(i int64) uint64 {
	if i >= 0 && i < int64(len(g)) {
		return g[i]
	}
	return 0
}

// latest returns the largest counter of indexes lo..hi: generations are
// drawn from one increasing counter, so it changes whenever one of them does.
func (g gens) latest(lo, hi int64) uint64 {
	var m uint64
	for i := lo; i <= hi; i++ {
		m = max(m, g.get(i))
	}
	return m
}

func (g *gens) set(i int64, v uint64) {
	if i < 0 {
		return
	}
	for int64(len(*g)) <= i {
		*g = append(*g, 0)
	}
	(*g)[i] = v
}

// staticKey is what a static cluster's verdict depends on.
// The entry's value stands for the L1 and L2 tables: the cluster reads
// through that value whatever else the tables hold.
type staticKey struct {
	valid      bool   // false for the zero key: never verified
	hdr, other uint64 // generations of cluster 0 and of the other files
	entry, bm  uint64 // the L2 entry (all ones: no L2 table)
	data       uint64 // the latest generation of the host clusters it reads
	model      uint64 // generation of the model's cluster
}

func newUnitVerifier(mdl faultfs.Model, m *model.Disk, cs int64) *unitVerifier {
	cb := int64(0)
	for int64(1)<<cb < cs {
		cb++
	}
	return &unitVerifier{
		mdl: mdl, m: m, cs: cs, cb: cb,
	}
}

// modelWrite notes that the model changed guest bytes [off, off+n).
func (v *unitVerifier) modelWrite(off, n int64) {
	if n <= 0 {
		return
	}
	v.gen++
	for c := off >> v.cb; c <= (off+n-1)>>v.cb; c++ {
		v.guestGen.set(c, v.gen)
		v.flushed = append(v.flushed, c)
	}
}

// modelFlush notes a flush of the model: every cluster written since the
// last one changes its allowed values.
func (v *unitVerifier) modelFlush() {
	v.gen++
	for _, c := range v.flushed {
		v.guestGen.set(c, v.gen)
	}
	v.flushed = v.flushed[:0]
}

// fileOps accounts for the file operations of the log up to the point.
func (v *unitVerifier) fileOps(log []faultfs.Op) {
	for _, op := range log[v.logDone:] {
		if op.Path != "img" {
			if faultfs.MutatingKinds.Has(op.Kind) {
				v.gen++
				v.otherGen = v.gen
			}
			continue
		}
		switch op.Kind {
		case faultfs.OpWrite, faultfs.OpAllocate:
			v.fileWrite(op.Offset, op.Length)
		case faultfs.OpTruncate:
			if op.Offset < v.fileEnd {
				v.fileWrite(op.Offset, v.fileEnd-op.Offset)
			}
			v.fileWrite(op.Offset, 1) // the size itself
		}
	}
	v.logDone = len(log)
}

// fileWrite bumps the generations of the host bytes [off, off+n).
func (v *unitVerifier) fileWrite(off, n int64) {
	if n <= 0 {
		return
	}
	v.gen++
	v.fileEnd = max(v.fileEnd, off+n)
	for c := off >> v.cb; c <= (off+n-1)>>v.cb; c++ {
		v.clGen.set(c, v.gen)
	}
}

// begin starts judging the states of point p: call it before the first
// state of each point, with the log up to the point.
func (v *unitVerifier) begin(p *faultfs.Point, log []faultfs.Op) {
	if p == v.point {
		return
	}
	v.fileOps(log)
	v.point, v.prepared, v.whole, v.fail = p, false, false, nil
	v.cons, v.direct, v.vars, v.memo = v.cons[:0], v.direct[:0], v.vars[:0], v.memo[:0]
	v.pf, v.pfOK = v.point.PendingUnits(v.mdl, "img")
	v.only = 0
}

// onlyImage reports whether the states of the point differ only in the
// units and size of the image file (its binding and every other file are
// the same in all of them); st is one of the states.
func (v *unitVerifier) onlyImage(st *faultfs.State) bool {
	if v.only == 0 {
		v.only = 1
		for _, name := range st.Names() {
			if rs, ok := v.point.Changeable(v.mdl, name); !v.pfOK || name != "img" && (!ok || len(rs) > 0) {
				v.only = -1
			}
		}
	}
	return v.only == 1
}

// memoOK reports whether check verdicts can be remembered at this point:
// Open and Check read only the image file, whose states differ only in
// their units and size (and not by garbage).
func (v *unitVerifier) memoOK(st *faultfs.State) bool {
	return v.mdl != faultfs.Garbage && v.onlyImage(st)
}

// verify judges state st of the point given to begin by the verdicts of
// crashVerifyContent (no leaks allowed when leaksFrom is 0, leaks beyond it
// when positive, any when negative).
//
// The check verdict is remembered per point: Open and Check read only the
// image file, so a state whose size and whose choices for the pending
// units inside the ranges they read equal those of a state already checked
// reads the same bytes and gets the same verdict. The image is opened only
// when the check or the content needs it.
func (v *unitVerifier) verify(st *faultfs.State, leaksFrom int64) error {
	var im *Image
	var openErr error
	opened := false
	open := func() (*Image, error) {
		if !opened {
			opened = true
			im, openErr = Open(st, "img", nil)
		}
		return im, openErr
	}
	defer func() {
		if im != nil {
			im.Close()
		}
	}()
	size, err := stateSize(st)
	memo := err == nil && v.memoOK(st)
	ch := st.Choices("img")
	var ce *checkEntry
	if memo {
		ce = v.memoLookup(size, ch)
	}
	if ce == nil {
		rec := &readRecorder{FS: st}
		opened = true
		ce = &checkEntry{}
		im, ce.res, ce.err, ce.openErr = crashOpenCheck(rec)
		openErr = ce.openErr
		rec.stop = true
		if memo {
			v.memoAdd(ce, size, ch, rec.reads)
		}
	} else {
		v.memoHits++
	}
	if err := crashCheckVerdict(ce.res, ce.err, leaksFrom); err != nil {
		return err
	}
	if ce.openErr != nil {
		return &crashVerdict{"open", ce.openErr}
	}
	reader := func() (io.ReaderAt, error) {
		im, err := open()
		if err != nil {
			return nil, err
		}
		return wtSizedReader{im}, nil
	}
	if err := v.content(st, reader); err != nil {
		return &crashVerdict{"content", err}
	}
	return nil
}

// content is the content verdict of state st, read through reader (which
// opens the image on first use).
func (v *unitVerifier) content(st *faultfs.State, reader func() (io.ReaderAt, error)) error {
	if !v.prepared {
		v.prepared = true
		r, err := reader()
		if err != nil {
			return err
		}
		if err := v.prepare(st, r.(wtSizedReader).im); err != nil {
			if err != v.fail {
				// Sorting stopped half way: judge the others whole.
				v.whole, v.fail = true, nil
			}
			return err
		}
	}
	if v.fail != nil {
		return v.fail
	}
	if v.whole {
		v.wholeN++
		r, err := reader()
		if err != nil {
			return err
		}
		return v.m.Verify(r)
	}
	v.unitN++
	ch := st.Choices("img")
	cluster := func(c int64, expectFail bool) error {
		r, err := reader()
		if err != nil {
			return err
		}
		if expectFail {
			return v.confirm(r, c)
		}
		v.directN++
		return v.verifyCluster(r, c)
	}
	for _, k := range v.cons {
		if ch[k.slot] >= 64 || k.mask>>ch[k.slot]&1 == 0 {
			return cluster(k.c, true)
		}
	}
	for _, c := range v.direct {
		if err := cluster(c, false); err != nil {
			return err
		}
	}
	for _, vc := range v.vars {
		v.varN++
		j := int(ch[vc.slot])
		if j >= len(vc.of) {
			if err := cluster(vc.c, false); err != nil {
				return err
			}
			continue
		}
		x := vc.vs[vc.of[j]]
		switch {
		case x.fail:
			return cluster(vc.c, true)
		case x.direct:
			if err := cluster(vc.c, false); err != nil {
				return err
			}
			continue
		}
		for _, k := range x.cons {
			if ch[k.slot] >= 64 || k.mask>>ch[k.slot]&1 == 0 {
				return cluster(k.c, true)
			}
		}
	}
	return nil
}

// checkEntry is a remembered check verdict: what Open, Check (or
// CheckFile) returned for states that read the same bytes.
type checkEntry struct {
	size    int64
	reads   []faultfs.Extent // merged ranges Open and Check read
	choices []uint32         // the choices of the pending units in reads
	res     *CheckResult
	err     error
	openErr error
}

// maxCheckEntries bounds the check verdicts remembered per point.
const maxCheckEntries = 64

// memoLookup returns the remembered check verdict for a state of the
// given size and choices, or nil.
func (v *unitVerifier) memoLookup(size int64, ch []uint32) *checkEntry {
	for _, e := range v.memo {
		if e.size != size {
			continue
		}
		v.chBuf = v.choicesIn(e.reads, ch, v.chBuf[:0])
		if slices.Equal(v.chBuf, e.choices) {
			return e
		}
	}
	return nil
}

// choicesIn appends to dst the choices ch makes for the pending units that
// overlap the sorted ranges rs.
func (v *unitVerifier) choicesIn(rs []faultfs.Extent, ch []uint32, dst []uint32) []uint32 {
	for _, r := range rs {
		for i := v.unitIndex(r.Off); i < len(v.pf.Units) && v.pf.Units[i].Off < r.Off+r.Len; i++ {
			dst = append(dst, ch[i])
		}
	}
	return dst
}

// memoAdd remembers check verdict ce of a state of the given size and
// choices, whose Open and Check read reads.
func (v *unitVerifier) memoAdd(ce *checkEntry, size int64, ch []uint32, reads []faultfs.Extent) {
	if len(v.memo) >= maxCheckEntries {
		return
	}
	slices.SortFunc(reads, func(a, b faultfs.Extent) int { return cmp.Compare(a.Off, b.Off) })
	var merged []faultfs.Extent
	for _, r := range reads {
		if n := len(merged); n > 0 && merged[n-1].Off+merged[n-1].Len >= r.Off {
			merged[n-1].Len = max(merged[n-1].Len, r.Off+r.Len-merged[n-1].Off)
			continue
		}
		merged = append(merged, r)
	}
	ce.size, ce.reads = size, merged
	ce.choices = v.choicesIn(merged, ch, nil)
	v.memo = append(v.memo, ce)
}

// stateSize returns the size of the image file in st.
func stateSize(st *faultfs.State) (int64, error) {
	fi, err := st.Stat("img")
	if err != nil {
		return 0, err
	}
	return fi.Size(), nil
}

// readRecorder is a file system whose files record the ranges read from
// them until stop is set.
type readRecorder struct {
	vfs.FS
	reads []faultfs.Extent
	stop  bool
}

func (r *readRecorder) Open(name string, flag vfs.OpenFlag) (vfs.File, error) {
	f, err := r.FS.Open(name, flag)
	if err != nil || name != "img" {
		return f, err
	}
	return &recordingFile{File: f, r: r}, nil
}

type recordingFile struct {
	vfs.File
	r *readRecorder
}

func (f *recordingFile) ReadAt(p []byte, off int64) (int, error) {
	if !f.r.stop && len(p) > 0 {
		f.r.reads = append(f.r.reads, faultfs.Extent{Off: off, Len: int64(len(p))})
	}
	return f.File.ReadAt(p, off)
}

// verifyCluster verifies guest cluster c through r.
func (v *unitVerifier) verifyCluster(r io.ReaderAt, c int64) error {
	off := c * v.cs
	if off >= v.m.Size() {
		return nil
	}
	return v.m.VerifyRange(r, off, min(v.cs, v.m.Size()-off))
}

// confirm verifies cluster c, which the unit check rejected, through r.
func (v *unitVerifier) confirm(r io.ReaderAt, c int64) error {
	if err := v.verifyCluster(r, c); err != nil {
		return err
	}
	return fmt.Errorf("unit verifier: guest cluster %d rejected by its units but reads allowed bytes (verifier bug)", c)
}

// prepare sorts the guest clusters of point v.point, whose state st has
// been opened as im.
func (v *unitVerifier) prepare(st *faultfs.State, im *Image) error {
	v.whole = true
	if v.mdl == faultfs.Garbage || im.dataFile != im.f || im.format == FormatRaw || im.clusterSize != v.cs {
		return nil
	}
	pf := v.pf
	if pf.Unit%model.SectorSize != 0 || !v.onlyImage(st) {
		return nil
	}
	h := im.h
	if v.pendingIn(0, v.cs) || v.pendingIn(int64(h.backingOff), int64(h.backingLen)) ||
		v.pendingIn(int64(h.l1Off), int64(h.l1Size)*8) || pf.MinSize < v.cs {
		return nil
	}
	v.whole = false
	size := v.m.Size()
	for c := int64(0); c*v.cs < size; c++ {
		if err := v.sortCluster(im, c); err != nil {
			return err
		}
		if v.fail != nil {
			return v.fail
		}
	}
	return nil
}

// pendingIn reports whether [off, off+n) overlaps a pending unit or the
// range where the file size varies.
func (v *unitVerifier) pendingIn(off, n int64) bool {
	if n <= 0 {
		return false
	}
	if v.pf.MinSize < v.pf.MaxSize && off < v.pf.MaxSize && off+n > v.pf.MinSize {
		return true
	}
	i := v.unitIndex(off)
	return i < len(v.pf.Units) && v.pf.Units[i].Off < off+n
}

// unitIndex returns the index of the first pending unit that ends after
// off.
func (v *unitVerifier) unitIndex(off int64) int {
	U := v.pf.Unit
	i, _ := slices.BinarySearchFunc(v.pf.Units, off, func(u faultfs.PendingUnit, off int64) int {
		if u.Off+U <= off {
			return -1
		}
		return 1
	})
	return i
}

// unitAt returns the slot of the pending unit holding byte pos, or -1.
func (v *unitVerifier) unitAt(pos int64) int32 {
	i := v.unitIndex(pos)
	if i < len(v.pf.Units) && v.pf.Units[i].Off <= pos {
		return int32(i)
	}
	return -1
}

// sortCluster sorts guest cluster c (see unitVerifier).
func (v *unitVerifier) sortCluster(im *Image, c int64) error {
	l1i := c / im.l2Entries
	l2i := c % im.l2Entries
	key := staticKey{valid: true, hdr: v.clGen.get(0), other: v.otherGen, entry: ^uint64(0), model: v.guestGen.get(c)}
	if l1i >= int64(len(im.l1)) {
		return v.staticCluster(im, c, key)
	}
	l2off, err := im.l1Entry(int(l1i))
	if err != nil {
		v.direct = append(v.direct, c)
		return nil
	}
	if l2off == 0 {
		return v.staticCluster(im, c, key)
	}
	if v.pf.MinSize < v.pf.MaxSize && int64(l2off)+im.l2Bytes() > v.pf.MinSize {
		v.direct = append(v.direct, c) // the table may lie beyond EOF
		return nil
	}
	table, err := im.l2Table(l2off)
	if err != nil {
		v.direct = append(v.direct, c)
		return nil
	}
	e, bm, at := im.l2EntryAt(table, l2off, l2i)
	if slot := v.unitAt(at); slot >= 0 {
		// The entry lies in a pending unit: one variant per value.
		u := v.pf.Units[slot]
		end := at + 8 // the entry's end
		if im.extL2 {
			end += 8
		}
		if len(u.Versions) > 64 || end > u.Off+v.pf.Unit {
			v.direct = append(v.direct, c)
			return nil
		}
		vc := varCluster{c: c, slot: slot, of: make([]int, len(u.Versions))}
		type ent struct{ e, bm uint64 }
		var seen []ent
		for j, ver := range u.Versions {
			b := ver[at-u.Off:]
			x := ent{e: binary.BigEndian.Uint64(b)}
			if im.extL2 {
				x.bm = binary.BigEndian.Uint64(b[8:])
			}
			k := slices.Index(seen, x)
			if k < 0 {
				seen = append(seen, x)
				k = len(seen) - 1
				vr, err := v.evalEntry(im, c, x.e, x.bm, at)
				if err != nil {
					return err
				}
				vc.vs = append(vc.vs, vr)
			}
			vc.of[j] = k
		}
		v.vars = append(v.vars, vc)
		return nil
	}
	key.entry, key.bm = e, bm
	ext, err := im.classifyEntry(e, bm, at, 0)
	if err != nil || ext.length < v.cs && im.extL2 {
		// The reader fails here, or subclusters differ: read it.
		v.direct = append(v.direct, c)
		return nil
	}
	switch ext.kind {
	case extentData:
		if !v.pendingIn(ext.host, v.cs) {
			key.data = v.clGen.latest(ext.host>>v.cb, (ext.host+v.cs-1)>>v.cb)
			return v.staticCluster(im, c, key)
		}
	case extentCompressed:
		off, n := im.compressedRange(e)
		if v.pendingIn(int64(off), int64(n)) {
			v.direct = append(v.direct, c)
			return nil
		}
		key.data = v.clGen.latest(int64(off)>>v.cb, (int64(off)+max(int64(n), 1)-1)>>v.cb)
		return v.staticCluster(im, c, key)
	default:
		return v.staticCluster(im, c, key)
	}
	vr, err := v.evalEntry(im, c, e, bm, at)
	if err != nil {
		return err
	}
	switch {
	case vr.fail:
		v.fail = v.confirm(wtSizedReader{im}, c)
	case vr.direct:
		v.direct = append(v.direct, c)
	default:
		v.byUnitN++
		v.cons = append(v.cons, vr.cons...)
	}
	return nil
}

// staticCluster verifies static cluster c through im unless it was
// verified with the same key before.
func (v *unitVerifier) staticCluster(im *Image, c int64, key staticKey) error {
	if c < int64(len(v.static)) && v.static[c] == key {
		v.reusedN++
		return nil
	}
	v.staticN++
	if err := v.verifyCluster(wtSizedReader{im}, c); err != nil {
		var me *model.MismatchError
		if errors.As(err, &me) {
			v.fail = err
			return nil
		}
		return err
	}
	for int64(len(v.static)) <= c {
		v.static = append(v.static, staticKey{})
	}
	v.static[c] = key
	return nil
}

// evalEntry judges guest cluster c as L2 entry e (with subcluster bitmap
// bm), stored at host offset at, maps it, the bytes outside pending units
// read from im's file.
func (v *unitVerifier) evalEntry(im *Image, c int64, e, bm uint64, at int64) (variant, error) {
	var out variant
	guest := c * v.cs
	n := min(v.cs, v.m.Size()-guest)
	if len(v.buf) < int(v.cs) {
		v.buf = make([]byte, v.cs)
	}
	for in := int64(0); in < n; {
		ext, err := im.classifyEntry(e, bm, at, in)
		if err != nil {
			return variant{direct: true}, nil
		}
		l := min(ext.length, n-in)
		q := v.buf[in : in+l]
		switch ext.kind {
		case extentZero:
			clear(q)
		case extentUnallocated:
			if err := im.readBacking(q, guest+in, EventReadAIO); err != nil {
				return variant{direct: true}, nil
			}
		case extentData:
			if ext.host+l > v.pf.MinSize {
				// Past the end of the file in some state: the reader
				// decides what that reads as.
				return variant{direct: true}, nil
			}
			got, err := im.dataFile.ReadAt(q, ext.host)
			if err != nil && !errors.Is(err, io.EOF) {
				return variant{direct: true}, nil
			}
			clear(q[got:])
		default:
			return variant{direct: true}, nil
		}
		for s := int64(0); s < l; s += model.SectorSize {
			sl := min(model.SectorSize, l-s)
			g := guest + in + s
			if ext.kind == extentData {
				pos := ext.host + s
				if slot := v.unitAt(pos); slot >= 0 {
					u := v.pf.Units[slot]
					if len(u.Versions) > 64 {
						return variant{direct: true}, nil
					}
					var mask uint64
					for j, ver := range u.Versions {
						ok, err := v.m.Allows(g, ver[pos-u.Off:pos-u.Off+sl])
						if err != nil {
							return out, err
						}
						if ok {
							mask |= 1 << j
						}
					}
					switch {
					case mask == 0:
						out.fail = true
						return out, nil
					case mask != 1<<len(u.Versions)-1:
						out.cons = append(out.cons, unitCons{slot: slot, mask: mask, c: c})
					}
					continue
				}
			}
			ok, err := v.m.Allows(g, q[s:s+sl])
			if err != nil {
				return out, err
			}
			if !ok {
				out.fail = true
				return out, nil
			}
		}
		in += l
	}
	return out, nil
}

// exDriver advances one model through a workload's ops, crash point after
// crash point in ascending order, so that at each point it allows what
// exModelData's model for that point allows: the ops complete by the point
// applied, the one in flight applied too (after a crash, a write that did
// not complete allows the same values as one that did: its old values are
// durable or were written since the last flush), flushes only when
// complete, and the crash recorded from the start. It tells its
// unitVerifier, if any, which guest clusters each change touches.
type exDriver struct {
	w    exWorkload
	data [][]byte
	ends []int
	m    *model.Disk
	v    *unitVerifier
	next int // first op not applied
	open int // an applied op not complete at the last point, or -1
}

func newExDriver(w exWorkload, data [][]byte, base []byte, ends []int) *exDriver {
	m := crashModel(w.size, base)
	m.Crash()
	return &exDriver{w: w, data: data, ends: ends, m: m, open: -1}
}

// advance brings the model to crash point n (no earlier than the last).
func (d *exDriver) advance(n int) {
	if d.open >= 0 {
		if d.ends[d.open] > n {
			return
		}
		if d.w.through {
			d.flush()
		}
		d.open = -1
	}
	for d.next < len(d.w.ops) {
		i := d.next
		op := d.w.ops[i]
		done := d.ends[i] <= n
		switch op.kind {
		case "flush":
			if !done {
				return
			}
			d.flush()
		case "write":
			d.m.Write(d.data[i], op.off)
			d.touch(op.off, op.n)
		case "zero":
			d.m.WriteZeroes(op.off, op.n)
			d.touch(op.off, op.n)
		}
		d.next++
		if !done {
			d.open = i
			return
		}
		if d.w.through {
			d.flush()
		}
	}
}

func (d *exDriver) touch(off, n int64) {
	if d.v != nil {
		d.v.modelWrite(off, n)
	}
}

func (d *exDriver) flush() {
	d.m.Flush()
	if d.v != nil {
		d.v.modelFlush()
	}
}

// TestCrashUnitVerifierAgrees checks the unit verifier against the plain
// verdict (crashVerifyContent with the point's model built from scratch by
// exModel and the whole disk read): on every state of the exhaustive
// workloads and of deliberately broken writers, both must pass or fail
// alike, with the same kind of verdict. The broken writers make sure that
// failing states are compared too.
func TestCrashUnitVerifierAgrees(t *testing.T) {
	limit := 64
	if lightTests() {
		limit = 8
	}
	type run struct {
		w    exWorkload
		bugs writerBugs
		wrap func(vfs.FS) vfs.FS
		name string
	}
	var runs []run
	for _, w := range exWorkloads() {
		runs = append(runs, run{w: w, name: "correct"})
		if w.name == "new-l2" || w.name == "first-cluster" || w.name == "compressed" || w.name == "backing" {
			runs = append(runs,
				run{w: w, bugs: bugNoDataBarrier, name: "no-data-barrier"},
				run{w: w, wrap: func(fsys vfs.FS) vfs.FS { return &syncRangeFS{FS: fsys} }, name: "sync-range"})
		}
	}
	// The large workload (64 MiB), plain and on a v2 image with 4 KiB
	// clusters and a backing file: every 4th point, 4 states, of which
	// every 40th is compared (whole verification reads 64 MiB).
	every := 40
	for _, cfg := range []crashConfig{{version: 3, cs: 64 << 10}, {version: 2, cs: 4096, backing: true}} {
		large := largeWorkload(cfg)
		large.stride = 4
		if lightTests() {
			large.stride, every = 16, 20
		}
		runs = append(runs, run{w: large, name: "correct"})
	}
	var pass, fail int
	for _, r := range runs {
		t.Run(fmt.Sprintf("%s/%s/wt=%d/%s", r.w.name, r.w.cfg, crashB2i(r.w.through), r.name), func(t *testing.T) {
			var p, f, n int
			lim := limit
			if r.w.name == "large" {
				lim = 4
			}
			_, err := exRunJudged(t, r.w, lim, r.bugs, r.wrap, func(st *faultfs.State, base []byte, ends []int, got error) error {
				if n++; r.w.name == "large" && n%every != 0 {
					if got != nil {
						return got
					}
					return nil
				}
				m := exModel(r.w, base, ends, st.Point())
				want := crashVerifyContent(st, -1, m.Verify)
				if (got == nil) != (want == nil) || verdictKind(got) != verdictKind(want) {
					return fmt.Errorf("point %d state %d (%s): unit verifier says %v; whole verification says %v", st.Point(), st.Index(), st, got, want)
				}
				if got == nil {
					p++
				} else {
					f++
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			pass, fail = pass+p, fail+f
			if r.name == "correct" && f > 0 {
				t.Errorf("%d states of a correct writer fail", f)
			}
		})
	}
	t.Logf("%d states agree: %d pass, %d fail", pass+fail, pass, fail)
	if fail == 0 || pass == 0 {
		t.Fatalf("the comparison needs passing and failing states: %d pass, %d fail", pass, fail)
	}
}

// verdictKind returns the kind of a crash verdict ("" for nil or another
// error).
func verdictKind(err error) string {
	var v *crashVerdict
	if errors.As(err, &v) {
		return v.Verdict
	}
	return ""
}
