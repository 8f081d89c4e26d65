package qcow

import "fmt"

// Allocation. The writer never reuses space: every new cluster (guest data,
// L2 table, refcount block, refcount table, L1 table) is appended at w.end,
// the first cluster boundary at or after the end of the file, as the kvmtool
// writer does. Freed clusters get refcount 0 and stay where they are (qemu
// may reuse them later; we do not), so a cluster we allocate has never been
// pointed to by anything that could still be on disk, and a crash at any
// point can at worst leak clusters, never alias them.

// alloc reserves n contiguous clusters at the end of the file and returns
// the host offset of the first. For QCOW2 their refcounts become 1 (in
// memory, written by the next flush before anything points at them), and
// refcount blocks and table are extended to cover them.
func (w *writer) alloc(n int64) (int64, error) {
	cs := w.cs
	start := w.end
	if n <= 0 || start > MaxHostOffset-n*cs {
		return 0, fmt.Errorf("%w: the image file would exceed the largest host offset %#x", ErrLimit, int64(MaxHostOffset))
	}
	w.im.event(EventClusterAlloc)
	oldEnd := w.end
	w.end += n * cs
	w.remember(func() { w.end = oldEnd })
	if rc := w.rc; rc != nil {
		if err := rc.cover(start/cs, start/cs+n); err != nil {
			return 0, err
		}
		for c := start / cs; c < start/cs+n; c++ {
			if err := rc.set(c, 1); err != nil {
				return 0, err
			}
		}
	}
	w.setLogicalEnd()
	return start, nil
}

// setLogicalEnd tells the reader how far the file (including clusters
// reserved but not yet written) extends, so that its bounds checks accept
// the new clusters.
func (w *writer) setLogicalEnd() {
	im := w.im
	oldF, oldD := im.fileSize, im.dataSize
	im.fileSize, im.dataSize = w.end, w.end
	w.remember(func() { im.fileSize, im.dataSize = oldF, oldD })
}

// freeRange is a deferred refcount decrement: one for every cluster that
// [off, off+n) touches.
type freeRange struct {
	off, n int64
}

// deferFree queues a decrement for the clusters of [off, off+n). It is
// applied only after the pointer change that dropped the reference is
// durable (Flush stage 4), so a refcount never drops while a pointer to the
// cluster may still be on disk: a crash leaks, never dangles. QCOW version 1
// has no refcounts and ignores it.
func (w *writer) deferFree(off, n int64) {
	if w.rc == nil || n <= 0 || off <= 0 {
		return
	}
	old := len(w.frees)
	w.frees = append(w.frees, freeRange{off, n})
	w.remember(func() { w.frees = w.frees[:old] })
}

// applyFrees decrements the refcounts queued by deferFree. A refcount that
// is already 0 is left alone (the image was inconsistent before; lowering
// it further is impossible).
func (w *writer) applyFrees() error {
	frees := w.frees
	w.frees = nil
	for k, f := range frees {
		for c := f.off / w.cs; c <= (f.off+f.n-1)/w.cs; c++ {
			v, err := w.rc.get(c)
			if err == nil && v > 0 {
				err = w.rc.set(c, v-1)
			}
			if err != nil {
				w.frees = append(w.frees, frees[k:]...) // retry the rest later
				// The part of f before c is done; keep the rest.
				w.frees[0] = freeRange{c * w.cs, f.off + f.n - c*w.cs}
				return err
			}
		}
	}
	return nil
}
