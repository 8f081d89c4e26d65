// Package model is the flat reference disk that the crash harness checks
// images against. It knows nothing of files or formats: it is a virtual disk
// of fixed-size sectors with a volatile write cache.
//
// Acknowledged writes are readable at once and durable only after a
// completed flush. After a crash, each sector may hold its value at the last
// completed flush or any value written to it since. A write that returned an
// error leaves its sectors holding either their old or their new data. Every
// other sector must be exact.
//
// The model keeps, for every sector that was ever written, three small sets
// of candidate values:
//
//   - durable: what the sector may hold at the last completed flush,
//   - current: what a read may return now (one value unless a write failed),
//   - history: every value the sector may have held since that flush.
//
// A crash allows durable ∪ history. Untouched sectors hold their initial
// value (zeros, or the backing contents given to New).
//
// The virtual size has candidates the same way (see Resize and
// CheckSize), and Snapshots holds the frozen views of a disk's internal
// snapshots, which must never change.
package model

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"sort"
)

// SectorSize is the granularity of the model, in bytes.
const SectorSize = 512

// ErrAmbiguous is returned by Read when a sector in the range may hold more
// than one value (after a failed write), so no exact expectation exists.
var ErrAmbiguous = errors.New("model: sector value is ambiguous after a failed write")

// ErrRange is returned for an access outside the disk.
var ErrRange = errors.New("model: access outside the disk")

// Disk is the reference disk. It is not safe for concurrent use.
type Disk struct {
	size    int64
	base    io.ReaderAt // initial contents; nil means zeros
	pages   map[int64]*sectorPage
	count   int  // sectors ever written
	crashed bool // a crash happened and Check has not yet adopted the result
	sz      sizeState

	// The page of the last lookup: accesses are mostly sequential.
	lastIdx  int64
	lastPage *sectorPage
	// dirty lists the sectors whose current values may differ from their
	// durable ones or that have a history: the only ones Flush changes.
	dirty []*sector
	// scratch holds the buffers of a scan (a Disk is not safe for
	// concurrent use).
	scratch []byte
}

// pageSectors is the number of sectors a page of the sector index covers.
const pageSectors = 256

// sectorPage indexes the written sectors of pageSectors consecutive ones.
type sectorPage [pageSectors]*sector

type sector struct {
	durable [][]byte
	current [][]byte
	history [][]byte
	dirty   bool // listed in Disk.dirty
}

// lookup returns the state of sector s, nil if it was never written.
func (d *Disk) lookup(s int64) *sector {
	idx := s / pageSectors
	if d.lastPage == nil || d.lastIdx != idx {
		pg := d.pages[idx]
		if pg == nil {
			return nil
		}
		d.lastIdx, d.lastPage = idx, pg
	}
	return d.lastPage[s%pageSectors]
}

// markDirty lists st for the next Flush.
func (d *Disk) markDirty(st *sector) {
	if !st.dirty {
		st.dirty = true
		d.dirty = append(d.dirty, st)
	}
}

// New returns a disk of size bytes whose initial contents are read from
// base (or are zeros when base is nil). Reads of base beyond its end give
// zeros, and so do reads past size: a grow (Resize) shows zeros). size
// need not be a multiple of SectorSize: the last sector is partial (and
// the disk cannot be resized).
func New(size int64, base io.ReaderAt) *Disk {
	if base != nil {
		base = io.NewSectionReader(base, 0, size)
	}
	return &Disk{size: size, base: base, pages: map[int64]*sectorPage{}, sz: sizeState{cur: []int64{size}, dur: []int64{size}}}
}

// Size returns the size of the disk in bytes: the largest it may have now
// (see Sizes).
func (d *Disk) Size() int64 { return d.size }

// Crashed reports whether a crash was recorded and not yet resolved by a
// successful Check.
func (d *Disk) Crashed() bool { return d.crashed }

// sectorLen is the length of sector s (the last one may be partial).
func (d *Disk) sectorLen(s int64) int {
	return int(min(SectorSize, d.size-s*SectorSize))
}

// initial returns the initial value of sector s.
func (d *Disk) initial(s int64) ([]byte, error) {
	b := make([]byte, d.sectorLen(s))
	if d.base != nil {
		n, err := d.base.ReadAt(b, s*SectorSize)
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("model: read initial contents of sector %d: %w", s, err)
		}
		clear(b[n:])
	}
	return b, nil
}

// get returns the state of sector s, creating it from the initial value.
func (d *Disk) get(s int64) (*sector, error) {
	if st := d.lookup(s); st != nil {
		return st, nil
	}
	b, err := d.initial(s)
	if err != nil {
		return nil, err
	}
	st := &sector{durable: [][]byte{b}, current: [][]byte{b}}
	idx := s / pageSectors
	pg := d.pages[idx]
	if pg == nil {
		pg = new(sectorPage)
		d.pages[idx] = pg
	}
	pg[s%pageSectors] = st
	d.count++
	return st, nil
}

func (d *Disk) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off > d.size || n > d.size-off {
		return fmt.Errorf("%w: offset %d length %d (disk size %d)", ErrRange, off, n, d.size)
	}
	return nil
}

// addUnique appends v to set unless an equal value is present.
func addUnique(set [][]byte, v []byte) [][]byte {
	for _, x := range set {
		if bytes.Equal(x, v) {
			return set
		}
	}
	return append(set, v)
}

// apply records data written at off. When failed is true the write returned
// an error: each sector may hold its old or its new value. data fills a
// part of a sector; whole, when not nil, returns the value of a sector the
// write covers entirely (shared, never modified), saving a copy per sector.
func (d *Disk) apply(off int64, n int64, data func(dst []byte, off int64), whole func(lo, hi int64) []byte, failed bool) error {
	if err := d.checkRange(off, n); err != nil {
		return err
	}
	for s := off / SectorSize; s*SectorSize < off+n; s++ {
		st, err := d.get(s)
		if err != nil {
			return err
		}
		start := max(off, s*SectorSize)
		end := min(off+n, s*SectorSize+int64(d.sectorLen(s)))
		var next [][]byte
		if whole != nil && start == s*SectorSize && end == s*SectorSize+int64(d.sectorLen(s)) {
			next = [][]byte{whole(start, end)}
		} else {
			for _, cur := range st.current {
				v := bytes.Clone(cur)
				data(v[start-s*SectorSize:end-s*SectorSize], start)
				next = addUnique(next, v)
			}
		}
		for _, v := range next {
			st.history = addUnique(st.history, v)
		}
		d.markDirty(st)
		if failed {
			for _, v := range next {
				st.current = addUnique(st.current, v)
			}
		} else {
			st.current = next
		}
	}
	return nil
}

// wholeOf returns, for a write of p at off, the function giving the value of
// a sector it covers entirely: a slice of one private copy of p.
func wholeOf(p []byte, off int64) func(lo, hi int64) []byte {
	var cp []byte
	return func(lo, hi int64) []byte {
		if cp == nil {
			cp = bytes.Clone(p)
		}
		return cp[lo-off : hi-off : hi-off]
	}
}

// wholeZero gives the value of a sector a zero write covers entirely.
func wholeZero(lo, hi int64) []byte { return zeroSector[: hi-lo : hi-lo] }

// Write records an acknowledged write of p at off.
func (d *Disk) Write(p []byte, off int64) error {
	return d.apply(off, int64(len(p)), func(dst []byte, at int64) { copy(dst, p[at-off:]) }, wholeOf(p, off), false)
}

// WriteZeroes records an acknowledged write of n zero bytes at off.
func (d *Disk) WriteZeroes(off, n int64) error {
	return d.apply(off, n, func(dst []byte, _ int64) { clear(dst) }, wholeZero, false)
}

// FailedWrite records a write of p at off that returned an error: each of
// its sectors may now hold its old or its new value.
func (d *Disk) FailedWrite(p []byte, off int64) error {
	return d.apply(off, int64(len(p)), func(dst []byte, at int64) { copy(dst, p[at-off:]) }, wholeOf(p, off), true)
}

// FailedWriteZeroes records a zero write that returned an error.
func (d *Disk) FailedWriteZeroes(off, n int64) error {
	return d.apply(off, n, func(dst []byte, _ int64) { clear(dst) }, wholeZero, true)
}

// Flush records a completed flush: every current value becomes durable.
// A flush that returned an error must not be recorded.
func (d *Disk) Flush() {
	for _, st := range d.dirty {
		st.durable = st.current
		st.history = nil
		st.dirty = false
	}
	d.dirty = d.dirty[:0]
	d.sz.dur, d.sz.hist = slices.Clone(d.sz.cur), nil
}

// Crash records a crash: from now on each sector may hold its durable value
// or any value written since the last flush, until Check adopts what the
// recovered image holds.
func (d *Disk) Crash() {
	d.crashed = true
}

// Read fills p with the exact bytes a read at off must return now. It
// fails with ErrAmbiguous if a sector may hold several values, and must not
// be used after Crash until Check has succeeded.
func (d *Disk) Read(p []byte, off int64) error {
	if err := d.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	if d.crashed {
		return fmt.Errorf("%w: read after a crash before Check", ErrAmbiguous)
	}
	for s := off / SectorSize; s*SectorSize < off+int64(len(p)); s++ {
		var v []byte
		if st := d.lookup(s); st != nil {
			if len(st.current) != 1 {
				return fmt.Errorf("%w: sector %d has %d possible values", ErrAmbiguous, s, len(st.current))
			}
			v = st.current[0]
		} else {
			var err error
			if v, err = d.initial(s); err != nil {
				return err
			}
		}
		start := max(off, s*SectorSize)
		end := min(off+int64(len(p)), s*SectorSize+int64(len(v)))
		copy(p[start-off:end-off], v[start-s*SectorSize:])
	}
	return nil
}

// MismatchError names the first sector whose value the disk could not hold.
type MismatchError struct {
	Sector  int64    // sector index
	Offset  int64    // byte offset of the sector
	Got     []byte   // what the image holds
	Allowed [][]byte // the values the model allows
}

// Error describes the mismatch in one line.
func (e *MismatchError) Error() string {
	return fmt.Sprintf("model: sector %d (offset %d) holds a value the disk could not hold (%d allowed values; got %s, first allowed %s)",
		e.Sector, e.Offset, len(e.Allowed), preview(e.Got), preview(first(e.Allowed)))
}

func first(v [][]byte) []byte {
	if len(v) == 0 {
		return nil
	}
	return v[0]
}

func preview(b []byte) string {
	if len(b) > 16 {
		return fmt.Sprintf("%x…", b[:16])
	}
	return fmt.Sprintf("%x", b)
}

// allowed returns the values sector s may hold now: after a crash the
// durable values and everything written since the last flush, otherwise
// the current values.
func (d *Disk) allowed(s int64) ([][]byte, error) {
	st := d.lookup(s)
	if st == nil {
		b, err := d.initial(s)
		if err != nil {
			return nil, err
		}
		return [][]byte{b}, nil
	}
	if !d.crashed {
		return st.current, nil
	}
	set := append([][]byte(nil), st.durable...)
	for _, v := range st.history {
		set = addUnique(set, v)
	}
	for _, v := range st.current {
		set = addUnique(set, v)
	}
	return set, nil
}

// ZeroReporter is implemented by images that can tell, without reading
// data, that a range reads as zeros (qcow.Image's BlockStatus). Check and
// Verify use it to skip reading such ranges: there they only verify that
// zeros are allowed.
type ZeroReporter interface {
	// BlockStatus returns the length (at most n, at least 1) of the range
	// at off that is uniformly zero (zero == true) or not known to be.
	BlockStatus(off, n int64) (length int64, zero bool, err error)
}

// zeroSector is a sector of zeros to compare against.
var zeroSector [SectorSize]byte

// Check reads the whole disk through r and verifies that every sector holds
// a value the model allows (after a crash: its value at the last completed
// flush or any value written since; otherwise its current value or values).
// It returns a *MismatchError naming the first offending sector. On success
// the model adopts what it observed: those values become the durable and
// current ones, and the crash is resolved. If r is a ZeroReporter, ranges it
// reports as zeros are not read.
func (d *Disk) Check(r io.ReaderAt) error {
	return d.scan(r, true, 0, d.size)
}

// Verify is Check without the adoption: the model is left unchanged, so one
// model can judge many images (the crash states of one crash point).
func (d *Disk) Verify(r io.ReaderAt) error {
	return d.scan(r, false, 0, d.size)
}

// VerifyRange is Verify of the sectors that overlap [off, off+n) only.
func (d *Disk) VerifyRange(r io.ReaderAt, off, n int64) error {
	if err := d.checkRange(off, n); err != nil {
		return err
	}
	lo := off &^ (SectorSize - 1)
	hi := min(d.size, (off+n+SectorSize-1)&^(SectorSize-1))
	return d.scan(r, false, lo, hi)
}

// Allows reports whether the sector at off (a multiple of SectorSize) may
// hold v (the sector's length) now, as Verify judges it: after a crash,
// its value at the last completed flush or any value written since;
// otherwise its current value or values. A checker that knows which of a
// few candidate values each sector of many images holds (the versions of a
// crash state's pending units) can judge the candidates once with Allows
// instead of reading every image whole.
func (d *Disk) Allows(off int64, v []byte) (bool, error) {
	if err := d.checkRange(off, int64(len(v))); err != nil {
		return false, err
	}
	s := off / SectorSize
	if off%SectorSize != 0 || len(v) != d.sectorLen(s) {
		return false, fmt.Errorf("%w: Allows needs one whole sector, got %d bytes at %d", ErrRange, len(v), off)
	}
	if st := d.lookup(s); st != nil {
		return d.match(st, v) != nil, nil
	}
	if d.base == nil {
		return bytes.Equal(v, zeroSector[:len(v)]), nil
	}
	b, err := d.initial(s)
	if err != nil {
		return false, err
	}
	return bytes.Equal(v, b), nil
}

// observation is a value seen in a touched sector, for the adoption.
type observation struct {
	s int64
	v []byte // one of the sector's allowed values (never modified)
}

// scan verifies the sectors of [lo, hi) (lo a sector boundary, hi one or
// the disk's end) against r, adopting the observed values when adopt is set
// and the scan succeeds.
func (d *Disk) scan(r io.ReaderAt, adopt bool, lo, hi int64) error {
	const chunk = 1 << 20
	zr, _ := r.(ZeroReporter)
	n := int(min(chunk, hi-lo))
	if cap(d.scratch) < 2*n {
		d.scratch = make([]byte, 2*n)
	}
	buf := d.scratch[:n]
	var baseBuf []byte
	if d.base != nil {
		baseBuf = d.scratch[n : 2*n]
	}
	var observed []observation
	for off := lo; off < hi; {
		n := min(chunk, hi-off)
		if zr != nil {
			l, zero, err := zr.BlockStatus(off, n)
			if err != nil {
				return fmt.Errorf("model: block status of the image at %d: %w", off, err)
			}
			if l <= 0 || l > n {
				return fmt.Errorf("model: block status of the image at %d: length %d outside (0, %d]", off, l, n)
			}
			if off+l < hi {
				l &^= SectorSize - 1 // whole sectors only; a partial one is read
			}
			if zero && l > 0 {
				if err := d.scanZero(off, l, adopt, &observed); err != nil {
					return err
				}
				off += l
				continue
			}
			if l > 0 {
				n = l
			} else {
				n = min(SectorSize, hi-off)
			}
		}
		got, err := r.ReadAt(buf[:n], off)
		if int64(got) < n {
			if err == nil {
				err = io.ErrUnexpectedEOF
			}
			return fmt.Errorf("model: read image at %d: %w", off+int64(got), err)
		}
		var initial []byte
		if baseBuf != nil {
			m, err := d.base.ReadAt(baseBuf[:n], off)
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("model: read initial contents at %d: %w", off, err)
			}
			clear(baseBuf[m:n])
			initial = baseBuf[:n]
		}
		if err := d.scanData(off, buf[:n], initial, adopt, &observed); err != nil {
			return err
		}
		off += n
	}
	if adopt {
		for _, o := range observed {
			st := d.lookup(o.s)
			d.markDirty(st)
			if d.crashed {
				st.durable = [][]byte{o.v}
				st.history = nil
			}
			st.current = [][]byte{o.v}
		}
		d.crashed = false
	}
	return nil
}

// scanData verifies the sectors of data, read from the image at off (a
// sector boundary); initial holds the initial contents of the same range,
// nil for zeros.
func (d *Disk) scanData(off int64, data, initial []byte, adopt bool, observed *[]observation) error {
	first := off / SectorSize
	for s := first; s*SectorSize < off+int64(len(data)); s++ {
		lo := s*SectorSize - off
		v := data[lo : lo+int64(d.sectorLen(s))]
		st := d.lookup(s)
		if st == nil {
			var want []byte
			if initial != nil {
				want = initial[lo : lo+int64(len(v))]
			} else {
				want = zeroSector[:len(v)]
			}
			if !bytes.Equal(v, want) {
				return d.mismatch(s, v)
			}
			continue
		}
		if err := d.judgeTouched(s, st, v, adopt, observed); err != nil {
			return err
		}
	}
	return nil
}

// scanZero verifies that the sectors of [off, off+n), which the image
// reports as zeros, may hold zeros.
func (d *Disk) scanZero(off, n int64, adopt bool, observed *[]observation) error {
	var initial []byte
	for s := off / SectorSize; s*SectorSize < off+n; s++ {
		v := zeroSector[:d.sectorLen(s)]
		st := d.lookup(s)
		if st == nil {
			if d.base == nil {
				continue
			}
			if initial == nil {
				initial = make([]byte, SectorSize)
			}
			m, err := d.base.ReadAt(initial[:len(v)], s*SectorSize)
			if err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("model: read initial contents of sector %d: %w", s, err)
			}
			clear(initial[m:len(v)])
			if !bytes.Equal(initial[:len(v)], v) {
				return d.mismatch(s, v)
			}
			continue
		}
		if err := d.judgeTouched(s, st, v, adopt, observed); err != nil {
			return err
		}
	}
	return nil
}

// judgeTouched verifies that the written sector s (state st) may hold v,
// noting the value for the adoption when adopt is set.
func (d *Disk) judgeTouched(s int64, st *sector, v []byte, adopt bool, observed *[]observation) error {
	a := d.match(st, v)
	if a == nil {
		return d.mismatch(s, v)
	}
	if adopt && (d.crashed || len(st.current) > 1) {
		*observed = append(*observed, observation{s, a})
	}
	return nil
}

// match returns the allowed value of st equal to v, or nil.
func (d *Disk) match(st *sector, v []byte) []byte {
	if d.crashed {
		for _, set := range [][][]byte{st.durable, st.history, st.current} {
			for _, a := range set {
				if bytes.Equal(a, v) {
					return a
				}
			}
		}
		return nil
	}
	for _, a := range st.current {
		if bytes.Equal(a, v) {
			return a
		}
	}
	return nil
}

// mismatch returns the error for sector s holding v.
func (d *Disk) mismatch(s int64, v []byte) error {
	allowed, err := d.allowed(s)
	if err != nil {
		return err
	}
	// Copies: the model's values are shared and must never be modified.
	cp := make([][]byte, len(allowed))
	for i, a := range allowed {
		cp[i] = bytes.Clone(a)
	}
	return &MismatchError{Sector: s, Offset: s * SectorSize, Got: bytes.Clone(v), Allowed: cp}
}

// Touched returns the indexes of the sectors written since New, in order;
// useful for reporting.
func (d *Disk) Touched() []int64 {
	out := make([]int64, 0, d.count)
	for idx, pg := range d.pages {
		for i, st := range pg {
			if st != nil {
				out = append(out, idx*pageSectors+int64(i))
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i] < out[j] })
	return out
}
