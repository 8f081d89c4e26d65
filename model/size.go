package model

import (
	"errors"
	"fmt"
	"slices"
)

// The virtual size.
//
// The disk's size changes only by Resize and FailedResize (grows; a
// shrink is refused), and like a sector it has candidate values: the
// sizes a read may see now, the size at the last completed flush, and
// every size it has had since. A resize the writer makes durable on
// return (durable set) is durable at once; any other at the next Flush.
// After a crash the image may have the durable size or any size since;
// CheckSize judges the size an image shows and adopts it. Sectors past
// the old size read as zeros after a grow: the initial contents given to
// New end at the initial size.

// ErrSize is wrapped by a *SizeError: the image's virtual size is one the
// model does not allow.
var ErrSize = errors.New("model: virtual size not allowed")

// SizeError names a virtual size the disk could not have.
type SizeError struct {
	Got     int64   // the image's size
	Allowed []int64 // the sizes the model allows, ascending
}

// Error describes the size mismatch in one line.
func (e *SizeError) Error() string {
	return fmt.Sprintf("model: virtual size %d, the disk could have only %v", e.Got, e.Allowed)
}

// Unwrap returns ErrSize.
func (e *SizeError) Unwrap() error { return ErrSize }

// sizeState holds the candidate sizes (see the comment above).
type sizeState struct {
	cur, dur, hist []int64
}

func addSize(set []int64, n int64) []int64 {
	if slices.Contains(set, n) {
		return set
	}
	return append(set, n)
}

// Resize records an acknowledged grow of the disk to n bytes (both the old
// and the new size multiples of SectorSize). Every sector between the old
// and the new size reads as zeros. When durable is set the new size and
// those zeros are durable at once (a writer that promises a resize durable
// on return); otherwise they become durable at the next Flush.
func (d *Disk) Resize(n int64, durable bool) error { return d.resize(n, durable, false) }

// FailedResize records a grow to n bytes that returned an error (or was in
// flight at a crash): the disk now has its old size or n, and the sectors
// between them hold their old values or zeros.
func (d *Disk) FailedResize(n int64) error { return d.resize(n, false, true) }

func (d *Disk) resize(n int64, durable, failed bool) error {
	hi := slices.Max(d.sz.cur)
	lo := slices.Min(d.sz.cur)
	if n%SectorSize != 0 || d.size%SectorSize != 0 || n < hi {
		return fmt.Errorf("%w: resize to %d bytes from %d (want a grow, in whole sectors)", ErrRange, n, hi)
	}
	d.size = max(d.size, n)
	// Sectors in [lo, n) written while the disk was bigger (before a
	// failed grow resolved): zeros now. Untouched ones read zeros anyway.
	for idx, pg := range d.pages {
		for i, st := range pg {
			s := idx*pageSectors + int64(i)
			if st == nil || s*SectorSize < lo || s*SectorSize >= n {
				continue
			}
			if err := d.apply(s*SectorSize, SectorSize, func(dst []byte, _ int64) { clear(dst) }, wholeZero, failed); err != nil {
				return err
			}
			if durable {
				st.durable, st.history = st.current, nil
			}
		}
	}
	switch {
	case failed:
		d.sz.cur = addSize(d.sz.cur, n)
		d.sz.hist = addSize(d.sz.hist, n)
	case durable:
		d.sz = sizeState{cur: []int64{n}, dur: []int64{n}}
	default:
		d.sz.cur = []int64{n}
		d.sz.hist = addSize(d.sz.hist, n)
	}
	return nil
}

// Sizes returns the virtual sizes the disk may have now, ascending: after
// a crash its size at the last completed flush (or durable resize) and
// every size since; otherwise the current one (or ones, after a failed
// resize).
func (d *Disk) Sizes() []int64 {
	set := slices.Clone(d.sz.cur)
	if d.crashed {
		for _, n := range append(slices.Clone(d.sz.dur), d.sz.hist...) {
			set = addSize(set, n)
		}
	}
	slices.Sort(set)
	return set
}

// AllowsSize reports whether the disk may have size n now (see Sizes).
func (d *Disk) AllowsSize(n int64) bool { return slices.Contains(d.Sizes(), n) }

// CheckSize verifies that an image of the virtual size n may be this disk
// now, and returns a *SizeError if not. On success the model adopts n: it
// becomes the only size (durable, after a crash), and sectors past it are
// forgotten. Call it before Check whenever the size may have changed:
// Check reads the disk up to the largest size it may have.
func (d *Disk) CheckSize(n int64) error {
	allowed := d.Sizes()
	if !slices.Contains(allowed, n) {
		return &SizeError{Got: n, Allowed: allowed}
	}
	d.sz.cur = []int64{n}
	if d.crashed {
		d.sz.dur, d.sz.hist = []int64{n}, nil
	}
	if n < d.size {
		for idx, pg := range d.pages {
			for i, st := range pg {
				if st != nil && (idx*pageSectors+int64(i))*SectorSize >= n {
					pg[i] = nil
					d.count--
				}
			}
		}
		d.lastPage = nil
		d.size = n
	}
	return nil
}
