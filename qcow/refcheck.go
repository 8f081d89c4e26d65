package qcow

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"

	"github.com/qcowcrash/qcowcrash/vfs"
)

// Limits of the checker. Every allocation and every loop of Check is bounded
// by the size of the image file and by these constants, so a hostile image
// gets an answer in time proportional to its real size.
const (
	// MaxCheckFindings caps CheckResult.Findings; the counts go on.
	MaxCheckFindings = 10000
	// maxCheckClusters bounds the number of host clusters of a QCOW2 file
	// that Check accounts for (qemu refuses more than INT_MAX). The
	// in-memory reference counts take two bytes per cluster that is
	// referenced at all, allocated in chunks of refChunkLen clusters.
	maxCheckClusters = 1 << 28
	// maxCheckL2Tables bounds the number of distinct L2 table offsets
	// (active and snapshots) that Check tracks: 24 bytes each, 48 MiB at
	// most (twice that while merging). That is 64 GiB of guest data with
	// 512-byte clusters, 4 TiB with 4 KiB clusters.
	maxCheckL2Tables = 1 << 21
	// l2PendingMax is how many L2 references are collected before they are
	// merged into the sorted list of distinct tables.
	l2PendingMax = 1 << 18
	// maxCheckV1Extents bounds the host extents (tables and clusters) of a
	// QCOW version 1 image that Check sorts to find overlaps: 24 bytes each.
	maxCheckV1Extents = 1 << 22
	// refBlockCacheLen is the number of refcount blocks kept for the
	// random look-ups of the COPIED check.
	refBlockCacheLen = 16
)

// CheckFile checks the structure of the image file called name (never its
// backing chain) the way `qemu-img check` does. It opens the file like Open
// with NoBacking; when Open refuses a QCOW2 image for a table that qemu-img
// check reports as corruption instead (an active L1 entry with reserved
// bits, unaligned or beyond the end of the file; an L1, refcount or
// snapshot table reaching beyond the end of the file), it checks the file
// without loading those tables at open, reading bytes beyond the end of the
// file as zeros as qemu does, so that the verdict is qemu's: corruption,
// not "could not check". Any other error from Open is returned.
func CheckFile(fsys vfs.FS, name string, format Format) (*CheckResult, error) {
	im, err := Open(fsys, name, &Options{Format: format, NoBacking: true})
	if err == nil {
		defer im.Close()
		return im.Check()
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
	im2, err2 := openForCheck(fsys, name)
	if err2 != nil {
		return nil, err // the original, more telling error
	}
	defer im2.Close()
	return im2.Check()
}

// openForCheck opens a QCOW2 file with its header validated except against
// the size of the file, and without loading the L1 table: the checker reads
// every table itself and reports what lies beyond the end of the file.
func openForCheck(fsys vfs.FS, name string) (*Image, error) {
	f, err := fsys.Open(name, vfs.ReadOnly)
	if err != nil {
		return nil, err
	}
	im := &Image{fsys: fsys, name: name, f: f, dataFile: f, format: FormatQCOW2}
	if err := im.openForCheck(); err != nil {
		f.Close()
		return nil, err
	}
	return im, nil
}

func (im *Image) openForCheck() error {
	size, err := im.f.Size()
	if err != nil {
		return err
	}
	im.fileSize, im.dataSize = size, size
	var hb [24]byte
	n, err := im.readHead(hb[:])
	if err != nil {
		return err
	}
	if n < len(hb) || binary.BigEndian.Uint32(hb[:]) != Magic {
		return formatErr("header", 0, uint64(n), "bytes: not a QCOW2 header")
	}
	if v := binary.BigEndian.Uint32(hb[4:]); v != 2 && v != 3 {
		return unsupportedErr("version", 4, uint64(v), "is not a QCOW2 version (2 or 3)")
	}
	cb := binary.BigEndian.Uint32(hb[20:])
	if cb < 9 || cb > 21 {
		return formatErr("cluster_bits", 20, uint64(cb), "out of range 9..21")
	}
	buf := make([]byte, min(int64(1)<<cb, size))
	if err := im.readFull(buf, 0); err != nil {
		return err
	}
	h, err := parseV2Header(buf, math.MaxInt64)
	if err != nil {
		return err
	}
	im.setQCOW2Header(h)
	return nil
}

// check verifies the structure of the image file (never its backing chain).
func (im *Image) check() (*CheckResult, error) {
	im.mu.Lock()
	closed := im.closed
	im.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	switch im.format {
	case FormatQCOW2:
		c := newChecker(im)
		defer c.release()
		return c.run()
	case FormatQCOW:
		return newChecker(im).runV1()
	}
	return &CheckResult{}, nil
}

// checker is the state of one Check of a QCOW2 or QCOW image.
type checker struct {
	im       *Image
	h        *header
	res      *CheckResult
	err      error // first I/O error: the check cannot complete
	cs       int64
	cb       uint32
	fileSize int64
	nb       int64 // clusters compared: qemu's nb_clusters
	refs     refArray
	refMax   uint64

	rt       []uint64 // refcount table up to its last non-zero entry
	rbBits   uint32   // log2 of refcount entries per refcount block
	rbCache  [refBlockCacheLen]rbEntry
	rbNext   int
	rbLast   int // the entry of rbCache that answered last
	extL2    bool
	dataFile bool

	l2        []l2Use // distinct L2 tables, sorted by offset (after flush)
	l2Pending []l2Use // not yet merged into l2

	// For Repair: incomplete is set when some structure could not be
	// walked or counted (so computed references may be too low and no
	// refcount may be lowered); copied lists the active L1 and L2 entries
	// whose COPIED flag disagrees with the stored refcount, when
	// wantCopied is set, up to maxRepairCopied of them.
	incomplete bool
	wantCopied bool
	copied     []copiedFix
}

// maxRepairCopied bounds the COPIED fixes one Repair collects (48 bytes
// each); the rest stay corruptions for the next repair.
const maxRepairCopied = 1 << 20

// noteCopied records a COPIED fix for Repair.
func (c *checker) noteCopied(fx copiedFix) {
	if c.wantCopied && len(c.copied) < maxRepairCopied {
		c.copied = append(c.copied, fx)
	}
}

// copiedFix is an active L1 or L2 entry whose COPIED flag disagrees with the
// stored refcount rc of the cluster it points at (host cluster index k).
type copiedFix struct {
	at    int64  // file offset of the entry
	entry uint64 // the entry as read
	k     int64  // host cluster index it points at
	rc    uint64 // stored refcount of that cluster
	n     uint64 // corruptions counted for it
	l1    bool   // an L1 entry (else an L2 entry)
}

type rbEntry struct {
	off uint64
	buf []byte
}

// l2Use is one L2 table and how often it is referenced.
type l2Use struct {
	off    uint64
	refs   uint64 // from every L1 table (active and snapshots)
	active uint64 // from the active L1 table
}

func newChecker(im *Image) *checker {
	c := &checker{im: im, h: im.h, res: &CheckResult{}, cs: im.clusterSize, cb: im.clusterBits}
	c.extL2 = im.extL2
	c.dataFile = im.h.incompat&IncompatDataFile != 0
	return c
}

// finding records a finding of kind k counted n times at host offset off.
func (c *checker) finding(k FindingKind, n uint64, off int64, format string, args ...any) {
	if n == 0 {
		return
	}
	cnt := int(min(n, math.MaxInt32))
	switch k {
	case Corruption:
		c.res.Corruptions += cnt
	case Leak:
		c.res.Leaks += cnt
	default:
		c.res.CheckErrors += cnt
	}
	if len(c.res.Findings) < MaxCheckFindings {
		msg := fmt.Sprintf(format, args...)
		if n > 1 {
			msg += fmt.Sprintf(" (counted %d times: the structure is referenced %d times)", n, n)
		}
		c.res.Findings = append(c.res.Findings, Finding{Kind: k, Offset: off, Msg: msg})
	}
}

func (c *checker) corrupt(n uint64, off int64, format string, args ...any) {
	c.finding(Corruption, n, off, format, args...)
}

// readPadded reads n bytes at off; bytes beyond the end of the file read as
// zeros, as they do in qemu. Other read errors stop the check.
func (c *checker) readPadded(off int64, n int64) []byte {
	buf := getBuf(int(n))
	// A negative offset (a hostile 64-bit offset cast to int64) lies
	// outside the file like one beyond its end: callers report the range.
	if c.err != nil || off < 0 || off >= c.fileSize {
		clear(buf)
		return buf
	}
	want := min(n, c.fileSize-off)
	got, err := c.im.f.ReadAt(buf[:want], off)
	clear(buf[max(got, 0):])
	if int64(got) < want && (err == nil || errors.Is(err, io.EOF)) {
		// The file shrank under us: treat the rest as zeros.
		err = nil
	}
	if err != nil && !errors.Is(err, io.EOF) {
		c.err = fmt.Errorf("qcow: %s: check: read %d bytes at %#x: %w", c.im.name, want, off, err)
	}
	return buf
}

// zeroBlockLen is the block size in which tables are scanned for zeros:
// the smallest cluster size.
const zeroBlockLen = 512

// isZero reports whether b (at most SparseBlock bytes) is all zeros.
func isZero(b []byte) bool { return bytes.Equal(b, zeroBlock[:len(b)]) }

// release returns the checker's cached refcount blocks to the buffer pool;
// the checker must not be used after.
func (c *checker) release() {
	for i, e := range c.rbCache {
		if e.buf != nil {
			putBuf(e.buf)
		}
		c.rbCache[i] = rbEntry{}
	}
}

// ref counts m references of kind k to the host range [off, off+size),
// referenced from host offset at. Like qemu, a range that ends a cluster or
// more beyond the end of the file is a corruption and is not counted; it
// returns false then.
func (c *checker) ref(off, size int64, k refKind, m uint64, at int64) bool {
	if size <= 0 || m == 0 {
		return true
	}
	if off < 0 || off > MaxHostOffset || off+size-c.fileSize >= c.cs {
		c.corrupt(m, at, "%s at %#x (%d bytes) lies a cluster or more beyond the end of the file (%d bytes)", k, off, size, c.fileSize)
		c.incomplete = true
		return false
	}
	first, last := off>>c.cb, (off+size-1)>>c.cb
	for i := first; i <= last; i++ {
		prev, lost := c.refs.add(i, m, c.refMax, k)
		if i >= c.nb {
			c.nb = i + 1
		}
		if lost > 0 {
			c.corrupt(lost, i<<c.cb, "reference count overflow on cluster %d (%s): more references than %d-bit refcounts can hold", i, k, 1<<c.h.refcountOrder)
		}
		if prev != kindNone && prev != k {
			c.corrupt(1, i<<c.cb, "overlapping metadata: cluster %d (%#x) is used by %s and by %s (referenced at %#x)", i, i<<c.cb, prev, k, at)
		}
	}
	return true
}

// onDisk returns the refcount stored in the image for cluster i; ok is false
// when it cannot be read (unaligned refcount block), as qemu's
// qcow2_get_refcount fails then.
func (c *checker) onDisk(i int64) (v uint64, ok bool) {
	rti := uint64(i) >> c.rbBits
	if rti >= uint64(len(c.rt)) {
		return 0, true
	}
	off := c.rt[rti] & rtOffsetMask
	if off == 0 {
		return 0, true
	}
	if off%uint64(c.cs) != 0 || off > MaxHostOffset {
		return 0, false
	}
	blk := c.refBlock(off)
	return storedRefcount(blk, uint64(i)&(1<<c.rbBits-1), c.h.refcountOrder), true
}

// refBlock returns the refcount block at off through a small cache.
func (c *checker) refBlock(off uint64) []byte {
	if e := c.rbCache[c.rbLast]; e.buf != nil && e.off == off {
		return e.buf // the common case: the block of the last lookup
	}
	for i, e := range c.rbCache {
		if e.buf != nil && e.off == off {
			c.rbLast = i
			return e.buf
		}
	}
	buf := c.readPadded(int64(off), c.cs)
	if old := c.rbCache[c.rbNext].buf; old != nil {
		putBuf(old)
	}
	c.rbCache[c.rbNext] = rbEntry{off: off, buf: buf}
	c.rbLast = c.rbNext
	c.rbNext = (c.rbNext + 1) % refBlockCacheLen
	return buf
}

// storedRefcount decodes entry j of a refcount block of 2^order-bit entries:
// 1, 2 and 4-bit entries are packed LSB first, wider ones are big-endian.
func storedRefcount(blk []byte, j uint64, order uint32) uint64 {
	switch order {
	case 0, 1, 2:
		bits := uint64(1) << order
		bit := j * bits
		return uint64(blk[bit/8]>>(bit%8)) & (1<<bits - 1)
	case 3:
		return uint64(blk[j])
	case 4:
		return uint64(binary.BigEndian.Uint16(blk[2*j:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(blk[4*j:]))
	default:
		return binary.BigEndian.Uint64(blk[8*j:])
	}
}

// run checks a QCOW2 image the way qemu's qcow2_check_refcounts does:
// compute every cluster's reference count from the structures, check each
// entry on the way, compare with the stored refcounts, then check the
// COPIED flags of the active tables.
func (c *checker) run() (*CheckResult, error) {
	h := c.h
	size, err := c.im.f.Size()
	if err != nil {
		return nil, fmt.Errorf("qcow: %s: check: %w", c.im.name, err)
	}
	c.fileSize = size
	c.nb = (size + c.cs - 1) >> c.cb
	if c.nb > maxCheckClusters {
		return nil, limitErr("file_size", -1, uint64(size), "bytes is %d clusters: more than the %d a check accounts for", c.nb, int64(maxCheckClusters))
	}
	c.refs = newRefArray(c.nb + 1) // references may reach one cluster past EOF
	c.refMax = math.MaxUint64
	if h.refcountOrder < 6 {
		c.refMax = 1<<(1<<h.refcountOrder) - 1
	}
	c.rbBits = c.cb + 3 - h.refcountOrder
	vsize := (h.size + 511) &^ 511
	c.res.TotalClusters = int64((vsize + uint64(c.cs) - 1) >> c.cb)

	// The refcount table (validated at open: inside the file, <= 8 MiB).
	rtBuf := c.readPadded(int64(h.rtOff), int64(h.rtClusters)*c.cs)
	// Only the entries up to the last non-zero one are kept: an index
	// past the end of c.rt reads as a zero entry (no refcount block).
	end := 0
	for k := 0; k < len(rtBuf); k += zeroBlockLen {
		if !isZero(rtBuf[k:min(k+zeroBlockLen, len(rtBuf))]) {
			end = min(k+zeroBlockLen, len(rtBuf)) / 8
		}
	}
	c.rt = make([]uint64, end)
	for i := range c.rt {
		c.rt[i] = binary.BigEndian.Uint64(rtBuf[8*i:])
	}
	putBuf(rtBuf)
	if c.err != nil {
		return nil, c.err
	}

	c.ref(0, c.cs, kindHeader, 1, 0)
	c.walkL1(int64(h.l1Off), int64(h.l1Size), 1, true, kindL1, "active L1")
	c.checkSnapshots()
	c.ref(int64(h.rtOff), int64(h.rtClusters)*c.cs, kindRefTable, 1, 48)
	c.checkBitmaps()
	if err := c.walkL2Tables(); err != nil {
		return nil, err
	}
	c.checkRefBlocks()
	if c.err != nil {
		return nil, c.err
	}
	c.compare()
	if c.err != nil {
		return nil, c.err
	}
	return c.res, nil
}

// walkL1 counts the L1 table of n entries at off (m references to it) and
// queues its L2 tables. For the active table it also checks the COPIED flag
// of each entry against the stored refcount of its L2 table.
func (c *checker) walkL1(off, n int64, m uint64, active bool, k refKind, what string) {
	if n <= 0 {
		return
	}
	c.ref(off, n*8, k, m, off)
	const chunk = 1 << 17 // entries per read
	for base := int64(0); base < n && c.err == nil; base += chunk {
		cnt := min(chunk, n-base)
		buf := c.readPadded(off+base*8, cnt*8)
		for j := int64(0); j < cnt; j++ {
			e := binary.BigEndian.Uint64(buf[8*j:])
			if e == 0 {
				continue
			}
			c.l1Entry(e, base+j, off+(base+j)*8, m, active, what)
		}
		putBuf(buf)
	}
}

func (c *checker) l1Entry(e uint64, i, at int64, m uint64, active bool, what string) {
	if e&l1ReservedMask != 0 {
		c.corrupt(m, at, "%s entry %d (%#x) has reserved bits set", what, i, e)
	}
	l2 := e & l1OffsetMask
	if l2 == 0 {
		// qemu would take the header for an L2 table here.
		c.corrupt(m, at, "%s entry %d (%#x) has flags set but no L2 table offset", what, i, e)
		return
	}
	if active {
		if rc, ok := c.onDisk(int64(l2 >> c.cb)); ok && (rc == 1) != (e&flagCopied != 0) {
			c.noteCopied(copiedFix{at: at, entry: e, k: int64(l2 >> c.cb), rc: rc, n: 1, l1: true})
			c.corrupt(1, at, "OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%#x refcount=%d (COPIED must be set exactly when the refcount is 1)", i, e, rc)
		}
	}
	if l2%uint64(c.cs) != 0 {
		c.corrupt(m, at, "%s entry %d: L2 table offset %#x is not cluster aligned", what, i, l2)
	}
	if !c.ref(int64(l2), c.cs, kindL2, m, at) {
		return
	}
	u := l2Use{off: l2, refs: m}
	if active {
		u.active = m
	}
	c.l2Pending = append(c.l2Pending, u)
	if len(c.l2Pending) >= l2PendingMax {
		c.flushL2()
	}
}

// flushL2 merges the pending L2 references into the sorted distinct list.
func (c *checker) flushL2() {
	if len(c.l2Pending) == 0 {
		return
	}
	all := append(c.l2, c.l2Pending...)
	c.l2Pending = c.l2Pending[:0]
	slices.SortFunc(all, func(a, b l2Use) int {
		switch {
		case a.off < b.off:
			return -1
		case a.off > b.off:
			return 1
		}
		return 0
	})
	out := all[:0]
	for _, u := range all {
		if n := len(out); n > 0 && out[n-1].off == u.off {
			out[n-1].refs += u.refs
			out[n-1].active += u.active
			continue
		}
		out = append(out, u)
	}
	c.l2 = out
	if len(c.l2) > maxCheckL2Tables && c.err == nil {
		c.err = limitErr("l2_tables", -1, uint64(len(c.l2)), "distinct L2 tables exceed the %d a check tracks", maxCheckL2Tables)
	}
}

// walkL2Tables checks each distinct L2 table once, counting its references
// as often as L1 entries point at it. A table that overlaps one already
// walked (only possible for unaligned offsets) is reported and not walked,
// so the bytes read stay bounded by the file size.
func (c *checker) walkL2Tables() error {
	c.flushL2()
	if c.err != nil {
		return c.err
	}
	var end uint64
	for _, u := range c.l2 {
		if end > 0 && u.off < end {
			c.corrupt(u.refs, int64(u.off), "L2 table at %#x overlaps the L2 table before it; not walked", u.off)
			c.incomplete = true
			continue
		}
		end = u.off + uint64(c.cs)
		c.walkL2(u)
		if c.err != nil {
			return c.err
		}
	}
	c.l2 = nil
	return nil
}

func (c *checker) walkL2(u l2Use) {
	if int64(u.off) >= c.fileSize {
		return // reported by ref; qemu reads zeros
	}
	buf := c.readPadded(int64(u.off), c.cs)
	defer putBuf(buf)
	stride := int64(8)
	if c.extL2 {
		stride = 16
	}
	var next uint64 // qemu's next_contiguous_offset, for fragmentation
	for k := int64(0); k < c.cs; k += zeroBlockLen {
		// Tables are mostly zero (unallocated): skip zero blocks whole.
		// The cluster size is a multiple of zeroBlockLen, itself a
		// multiple of the entry size.
		if isZero(buf[k : k+zeroBlockLen]) {
			continue
		}
		for j := k; j < k+zeroBlockLen; j += stride {
			e := binary.BigEndian.Uint64(buf[j:])
			var bm uint64
			if c.extL2 {
				bm = binary.BigEndian.Uint64(buf[j+8:])
			}
			if e == 0 && bm == 0 {
				continue
			}
			c.l2Entry(e, bm, int64(u.off)+j, u, &next)
		}
	}
}

// l2Entry checks one L2 entry (and its subcluster bitmap) of a table
// referenced u.refs times, u.active of them from the active L1 table.
func (c *checker) l2Entry(e, bm uint64, at int64, u l2Use, next *uint64) {
	m, act := u.refs, u.active
	if e&flagCompressed != 0 {
		if e&flagCopied != 0 {
			c.corrupt(m, at, "L2 entry %#x: COPIED flag set on a compressed cluster", e)
		}
		if c.dataFile {
			c.corrupt(m, at, "L2 entry %#x: compressed cluster in an image with an external data file", e)
			return
		}
		if bm != 0 {
			c.corrupt(m, at, "L2 entry %#x: compressed cluster with a non-zero subcluster bitmap %#x", e, bm)
			return
		}
		off, size := c.im.compressedRange(e)
		if off < uint64(c.cs) {
			c.corrupt(m, at, "L2 entry %#x: compressed data at %#x lies in cluster 0 (the header)", e, off)
		} else {
			c.ref(int64(off), int64(size), kindCompressed, m, at)
		}
		c.res.AllocatedClusters += int64(act)
		c.res.CompressedClusters += int64(act)
		c.res.FragmentedClusters += int64(act)
		return
	}
	if e&l2ReservedMask != 0 {
		c.corrupt(m, at, "L2 entry %#x has reserved bits set", e)
	}
	host := e & l2OffsetMask
	if c.extL2 && e&flagZero != 0 {
		c.corrupt(m, at, "L2 entry %#x sets bit 0, which is reserved with extended L2 entries", e)
	}
	zero := !c.extL2 && e&flagZero != 0
	if zero && c.h.version < 3 {
		c.corrupt(m, at, "L2 entry %#x has the zero flag set in a version 2 image", e)
	}
	if host == 0 && !(c.dataFile && e&flagCopied != 0) {
		// Unallocated, or zero without a preallocated cluster.
		if c.extL2 && uint32(bm) != 0 {
			c.corrupt(m, at, "L2 entry %#x: unallocated cluster has subclusters %#x marked allocated", e, uint32(bm))
		}
		return
	}
	if c.extL2 && uint32(bm)&uint32(bm>>32) != 0 {
		c.corrupt(m, at, "L2 entry %#x: subcluster bitmap %#x marks subclusters %#x both allocated and zero", e, bm, uint32(bm)&uint32(bm>>32))
	}
	if host%uint64(c.cs) != 0 {
		c.corrupt(m, at, "L2 entry %#x: data cluster %#x is not cluster aligned", e, host)
	}
	if act > 0 {
		c.res.AllocatedClusters += int64(act)
		if *next != 0 && host != *next {
			c.res.FragmentedClusters += int64(act)
		}
		*next = host + uint64(c.cs)
	}
	if !c.dataFile {
		c.ref(int64(host), c.cs, kindData, m, at)
	}
	if act > 0 {
		rc, ok := uint64(1), true
		if !c.dataFile {
			rc, ok = c.onDisk(int64(host >> c.cb))
		}
		if ok && (rc == 1) != (e&flagCopied != 0) {
			if !c.dataFile {
				c.noteCopied(copiedFix{at: at, entry: e, k: int64(host >> c.cb), rc: rc, n: act})
			}
			c.corrupt(act, at, "OFLAG_COPIED data cluster: l2_entry=%#x refcount=%d (COPIED must be set exactly when the refcount is 1)", e, rc)
		}
	}
}

// checkRefBlocks validates the refcount table entries and counts each
// refcount block, which must then be referenced exactly once (qemu's
// check_refblocks, run after everything else was counted).
func (c *checker) checkRefBlocks() {
	n := len(c.rt)
	if c.nb == 0 {
		n = int(c.h.rtClusters) * int(c.cs) / 8 // every zero entry lies outside an empty file
	}
	for i := range n {
		var e uint64
		if i < len(c.rt) {
			e = c.rt[i]
		}
		if e == 0 && c.nb > 0 {
			continue // no refcount block: nothing to check
		}
		at := int64(c.h.rtOff) + int64(i)*8
		if e&rtReservedMask != 0 {
			c.corrupt(1, at, "refcount table entry %d (%#x) has reserved bits set", i, e)
			c.incomplete = true
			continue
		}
		off := e & rtOffsetMask
		if off%uint64(c.cs) != 0 {
			c.corrupt(1, at, "refcount block %d at %#x is not cluster aligned; refcount table entry corrupted", i, off)
			c.incomplete = true
			continue
		}
		if off>>c.cb >= uint64(c.nb) {
			c.corrupt(1, at, "refcount block %d at %#x is outside the image (file size %d)", i, off, c.fileSize)
			c.incomplete = true
			continue
		}
		if off == 0 {
			continue
		}
		c.ref(int64(off), c.cs, kindRefBlock, 1, at)
		if rc := c.refs.get(int64(off >> c.cb)); rc != 1 {
			c.corrupt(1, int64(off), "refcount block %d at %#x is referenced %d times (must be exactly once)", i, off, rc)
		}
	}
}

// compare compares the computed reference counts with the stored refcounts
// of every cluster of the file (qemu's compare_refcounts) and sets the
// image end offset.
func (c *checker) compare() {
	var highest int64
	perBlock := int64(1) << c.rbBits
	for i := int64(0); i < c.nb && c.err == nil; {
		rti := uint64(i) >> c.rbBits
		noBlock := rti >= uint64(len(c.rt)) || c.rt[rti]&rtOffsetMask == 0
		if noBlock && c.refs.empty(i) {
			// Nothing stored, nothing referenced: skip to the next chunk
			// or refcount block boundary.
			i = min((i|(refChunkLen-1))+1, (i|(perBlock-1))+1)
			continue
		}
		computed := c.refs.get(i)
		stored, ok := c.onDisk(i)
		if !ok {
			c.finding(CheckError, 1, i<<c.cb, "can't get refcount for cluster %d: refcount block %#x is not cluster aligned", i, c.rt[rti]&rtOffsetMask)
			i++
			continue
		}
		if stored > 0 || computed > 0 {
			highest = i
		}
		switch {
		case stored < computed:
			c.corrupt(1, i<<c.cb, "ERROR cluster %d (%#x) refcount=%d reference=%d (%s)", i, i<<c.cb, stored, computed, c.refs.kind(i))
		case stored > computed:
			c.finding(Leak, 1, i<<c.cb, "Leaked cluster %d (%#x) refcount=%d reference=%d", i, i<<c.cb, stored, computed)
		}
		i++
	}
	c.res.ImageEndOffset = (highest + 1) * c.cs
}
