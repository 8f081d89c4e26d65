package qcow

import (
	"fmt"
	"io"
	"slices"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/model"
)

// diffVerifier judges the content of the crash states of one crash point
// by difference. The first state it sees is verified whole against the
// point's model. Every later state differs from it only inside the point's
// changeable ranges (faultfs.Point.Changeable), so only its guest clusters
// that may read differently are verified: those whose mapping (the extents
// the reader resolves from the L2 entries) differs from the first state's,
// and those whose mapped bytes (a data cluster, a compressed range) overlap
// a changeable range. Every other guest cluster reads through the same
// metadata the same bytes as in the first state, which passed.
//
// Where that reasoning needs more than the image's mapping, every state is
// verified whole: when a changeable range touches cluster 0 (the header,
// its extensions, the backing file's name) or the L1 table, when another
// file (the backing file) or the image's name binding may change, and for
// an external data file.
type diffVerifier struct {
	m     *model.Disk
	dirty []faultfs.Extent // changeable ranges of the image file, sorted
	whole bool             // verify every state whole
	ref   [][]extent       // per guest cluster, the first state's extents
	// Whole and partial count the states verified each way.
	wholeN, partialN int
}

// newDiffVerifier returns the verifier of the states of model mdl at point
// p, whose files are named in names (the image is "img").
func newDiffVerifier(p *faultfs.Point, mdl faultfs.Model, m *model.Disk, names []string) *diffVerifier {
	v := &diffVerifier{m: m}
	for _, name := range names {
		rs, ok := p.Changeable(mdl, name)
		switch {
		case !ok:
			v.whole = true
		case name == "img":
			v.dirty = rs
		case len(rs) > 0:
			v.whole = true
		}
	}
	return v
}

// content is the content verdict for crashVerifyContent: r is the
// wtSizedReader of the state's image.
func (v *diffVerifier) content(r io.ReaderAt) error {
	im := r.(wtSizedReader).im
	if v.whole {
		v.wholeN++
		return v.m.Verify(r)
	}
	exts, err := guestExtents(im)
	if err != nil {
		return fmt.Errorf("map the image: %w", err)
	}
	if v.ref == nil {
		cs := im.clusterSize
		l1 := faultfs.Extent{Off: int64(im.h.l1Off), Len: int64(im.h.l1Size) * 8}
		if v.overlaps(0, cs) || v.overlaps(l1.Off, l1.Len) || v.overlaps(int64(im.h.backingOff), int64(im.h.backingLen)) || im.dataFile != im.f {
			v.whole = true
		}
		v.wholeN++
		if err := v.m.Verify(r); err != nil {
			return err
		}
		if !v.whole {
			v.ref = exts
		}
		return nil
	}
	v.partialN++
	cs := im.clusterSize
	if len(exts) != len(v.ref) {
		return v.m.Verify(r)
	}
	for c, es := range exts {
		if slices.Equal(es, v.ref[c]) && !v.touched(im, es) {
			continue
		}
		off := int64(c) * cs
		if err := v.m.VerifyRange(r, off, min(cs, v.m.Size()-off)); err != nil {
			return err
		}
	}
	// Beyond the image's end (a model sized for a larger disk) the reader
	// returns zeros in every state.
	if size := im.Size(); size < v.m.Size() {
		return v.m.VerifyRange(r, size, v.m.Size()-size)
	}
	return nil
}

// touched reports whether the bytes the extents es read overlap a
// changeable range.
func (v *diffVerifier) touched(im *Image, es []extent) bool {
	for _, e := range es {
		switch e.kind {
		case extentData:
			if v.overlaps(e.host, e.length) {
				return true
			}
		case extentCompressed:
			off, size := im.compressedRange(e.entry)
			// Generously: the reader may round the range up.
			if v.overlaps(int64(off), int64(max(size, uint64(im.clusterSize)))+512) {
				return true
			}
		}
	}
	return false
}

// overlaps reports whether [off, off+n) overlaps a changeable range.
func (v *diffVerifier) overlaps(off, n int64) bool {
	i, _ := slices.BinarySearchFunc(v.dirty, off, func(r faultfs.Extent, off int64) int {
		if r.Off+r.Len <= off {
			return -1
		}
		return 1
	})
	return i < len(v.dirty) && v.dirty[i].Off < off+n
}

// guestExtents maps every guest cluster of im to the extents the reader
// resolves it to.
func guestExtents(im *Image) ([][]extent, error) {
	size, cs := im.Size(), im.clusterSize
	out := make([][]extent, 0, (size+cs-1)/cs)
	for off := int64(0); off < size; off += cs {
		end := min(off+cs, size)
		var es []extent
		for at := off; at < end; {
			e, err := im.lookup(at, end-at)
			if err != nil {
				return nil, err
			}
			if e.length <= 0 {
				return nil, fmt.Errorf("empty extent at guest offset %d", at)
			}
			es = append(es, e)
			at += e.length
		}
		out = append(out, es)
	}
	return out, nil
}
