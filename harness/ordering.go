package harness

import (
	"bytes"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// KindOrdering is the failure kind of a broken ordering rule (see
// OrderingRules): a write that lets a crash state break the image's
// structure, found in the op log whether or not a sampled crash state shows
// it.
const KindOrdering = "ordering"

// OrderingRule is one dependency rule that a QCOW writer's file operations
// must keep, whatever the writer.
type OrderingRule struct {
	// Name identifies the rule in failures: "R1-contents", ...
	Name string
	// Doc states the rule in one line.
	Doc string
}

// The rules, by name.
const (
	RuleContents      = "R1-contents"
	RuleRefcount      = "R1-refcount"
	RuleFree          = "R2-free"
	RuleSwitch        = "R3-switch"
	RuleRollbackOrder = "R4-rollback-order"
	RuleTruncate      = "R4-truncate"
)

// OrderingRules are the writer's dependency rules, stated once. They are
// checked on the faultfs op log of every run (Run, RunWith, and so soak and
// repro) for the image file, writer-agnostically: for each write or
// truncate j, D is the image's durable contents before j (what the
// lose-unsynced model keeps) and P is D with op j alone applied (what a
// crash keeps when j alone reaches the disk); the QCOW metadata of both
// (qcow.ReadLayout) is compared and the rules are applied to what j
// changes. QCOW version 1 has no refcounts: the refcount rules do not
// apply to it.
var OrderingRules = []OrderingRule{
	{RuleContents, "nothing points at a cluster (L1 entry to L2 table, L2 entry to data, refcount table to block, snapshot to L1 table) before its contents are durable: when a write makes a new pointer, its target lies inside the durable file (as far as the writer wrote it) and is not written by the same write; a data cluster holds durably the bytes the writer wrote there, a table a version whose own pointers keep the rules"},
	{RuleRefcount, "nothing points at a cluster before its refcount is durable: after a write that adds references to a cluster, its refcount (not written by that write) covers every reference"},
	{RuleFree, "no refcount decrement is durable before the pointer it frees is gone durably: a write that lowers a refcount leaves it at least the number of references that survive it"},
	{RuleSwitch, "the header switches to a new table (L1, refcount, snapshot table) only after the table is durable"},
	{RuleRollbackOrder, "rollback restores pointers before refcounts: a rollback write (event rollback_*) never lowers a refcount below the durable references"},
	{RuleTruncate, "a truncate (a rollback's cut) never cuts the file under a durable pointer"},
}

// orderingFailure builds the failure of rule name at file op j.
func orderingFailure(rule string, j int, op faultfs.Op, format string, args ...any) *Failure {
	return &Failure{Kind: KindOrdering, Rule: rule, Point: j + 1, Sector: -1,
		Detail: fmt.Sprintf("rule %s broken by file op %d (%s): %s", rule, j, op, fmt.Sprintf(format, args...))}
}

// orderingChecker applies OrderingRules to one recording.
type orderingChecker struct {
	name string // the image file
	ops  []faultfs.Op

	// The durable image at the current point, cached until a barrier.
	stale  bool
	dState *faultfs.State
	dFile  vfs.File
	dSize  int64
	dl     *qcow.Layout // nil when D does not parse
	dMeta  [][2]int64
	dPtrs  map[ptrKey]bool
	dRefs  map[int64]int64

	checked int // write and truncate ops judged
}

// ptrKey identifies a pointer: where it is held and what it points at.
type ptrKey struct {
	kind    qcow.PointerKind
	at, off int64
	n       int64
}

func keyOf(p qcow.Pointer) ptrKey { return ptrKey{p.Kind, p.At, p.Off, p.Len} }

// CheckOrdering applies OrderingRules to every write and truncate of the
// file name in rec, the op log of a writer (any writer) of a QCOW image, and
// returns the broken rules (at most one per rule and op, at most max in all;
// max <= 0: all), in op order, with the number of ops judged. Each failure
// has kind "ordering", its rule, Point one past the op that broke it and
// Op -1 (it knows no workload).
func CheckOrdering(rec *faultfs.Recording, name string, max int) (fails []*Failure, judged int) {
	c := &orderingChecker{name: name, ops: rec.Ops(), stale: true}
	defer c.closeD()
	var prev *faultfs.Point
	for p := range rec.Points() {
		if prev != nil && p.Ops() > 0 {
			j := p.Ops() - 1
			op := c.ops[j]
			if op.Path == name && (op.Kind == faultfs.OpWrite || op.Kind == faultfs.OpTruncate) {
				for _, f := range c.check(prev, j, op) {
					f.Op = -1
					fails = append(fails, f)
					if max > 0 && len(fails) >= max {
						return fails, c.checked
					}
				}
			}
			if faultfs.SyncKinds.Has(op.Kind) || op.Kind == faultfs.OpCreate || op.Kind == faultfs.OpRemove {
				c.stale = true
			}
		}
		prev = p
	}
	return fails, c.checked
}

func (c *orderingChecker) closeD() {
	if c.dFile != nil {
		c.dFile.Close()
		c.dFile = nil
	}
}

// loadD reads the durable image at point prev.
func (c *orderingChecker) loadD(prev *faultfs.Point) {
	if !c.stale {
		return
	}
	c.stale = false
	c.closeD()
	c.dl, c.dMeta, c.dPtrs, c.dRefs = nil, nil, nil, nil
	c.dState = prev.Sample(faultfs.LoseUnsynced, 0)
	f, err := c.dState.Open(c.name, vfs.ReadOnly)
	if err != nil {
		return
	}
	c.dFile = f
	if c.dSize, err = f.Size(); err != nil {
		return
	}
	l, err := qcow.ReadLayout(f, c.dSize)
	if err != nil {
		return
	}
	c.dl, c.dMeta = l, l.MetadataRanges()
	c.dPtrs = make(map[ptrKey]bool, len(l.Pointers))
	for _, p := range l.Pointers {
		c.dPtrs[keyOf(p)] = true
	}
	c.dRefs = l.References()
}

// touches reports whether [lo, hi) overlaps one of the sorted ranges rs.
func touches(rs [][2]int64, lo, hi int64) bool {
	i, _ := slices.BinarySearchFunc(rs, lo, func(r [2]int64, x int64) int {
		if r[1] <= x {
			return -1
		}
		return 1
	})
	return i < len(rs) && rs[i][0] < hi
}

// check applies the rules to op j, whose world before is prev, and
// returns the first failure of each rule it breaks.
func (c *orderingChecker) check(prev *faultfs.Point, j int, op faultfs.Op) []*Failure {
	c.loadD(prev)
	if c.dl == nil {
		return nil // no durable image to judge against: the crash states show it
	}
	c.checked++
	if op.Kind == faultfs.OpTruncate {
		if f := c.checkTruncate(j, op); f != nil {
			return []*Failure{f}
		}
		return nil
	}
	hit := false
	for _, w := range op.Written {
		if touches(c.dMeta, w.Off, w.Off+w.Len) {
			hit = true
			break
		}
	}
	if !hit {
		return nil
	}
	pr := &overlay{base: c.dFile, baseSize: c.dSize, op: op, size: c.dSize}
	for _, w := range op.Written {
		pr.size = max(pr.size, w.Off+w.Len)
	}
	pl, err := qcow.ReadLayout(pr, pr.size)
	if err != nil {
		return nil // the crash states judge an image that does not parse
	}
	fails := c.checkPointers(prev, j, op, pl)
	if pl.HasRefcounts() && c.dl.HasRefcounts() {
		fails = append(fails, c.checkRefcounts(j, op, pl)...)
	}
	return fails
}

// written reports whether op wrote any byte of [lo, hi).
func written(op faultfs.Op, lo, hi int64) bool {
	for _, w := range op.Written {
		if w.Off < hi && lo < w.Off+w.Len {
			return true
		}
	}
	return false
}

// checkPointers applies RuleContents and RuleSwitch to the pointers op j
// makes.
func (c *orderingChecker) checkPointers(prev *faultfs.Point, j int, op faultfs.Op, pl *qcow.Layout) (fails []*Failure) {
	seen := map[string]bool{}
	fail := func(rule, format string, args ...any) {
		if !seen[rule] {
			seen[rule] = true
			fails = append(fails, orderingFailure(rule, j, op, format, args...))
		}
	}
	var live vfs.File
	var liveSize int64
	defer func() {
		if live != nil {
			live.Close()
		}
	}()
	for _, p := range pl.Pointers {
		if p.Kind == qcow.PtrHeader || p.Kind == qcow.PtrZero || p.Len <= 0 || c.dPtrs[keyOf(p)] {
			continue
		}
		rule := RuleContents
		if p.Kind == qcow.PtrL1Table || p.Kind == qcow.PtrRefcountTable || p.Kind == qcow.PtrSnapshotTable {
			rule = RuleSwitch
		}
		if seen[rule] {
			continue
		}
		what := fmt.Sprintf("%s at %#x points at %s %#x+%d (cluster %d)", holder(p), p.At, p.Kind, p.Off, p.Len, p.Off/pl.ClusterSize)
		switch {
		case p.Off < 0 || p.Off > qcow.MaxHostOffset || p.Off >= c.dSize:
			fail(rule, "%s, which lies beyond the durable end of the file (%d bytes)", what, c.dSize)
			continue
		case written(op, p.Off, p.Off+p.Len):
			fail(rule, "%s, which the same write writes: not durable before the pointer", what)
			continue
		}
		if live == nil {
			st := prev.Sample(faultfs.Process, 0)
			f, err := st.Open(c.name, vfs.ReadOnly)
			if err != nil {
				return fails
			}
			live = f
			if liveSize, err = f.Size(); err != nil {
				return fails
			}
		}
		// A cluster at the end of the file may be partly beyond it (the
		// rest reads as zeros): what the writer wrote must be durable.
		end := min(p.Off+p.Len, max(liveSize, p.Off))
		if end > c.dSize {
			fail(rule, "%s, whose bytes up to %#x are written but the durable file ends at %d bytes", what, end, c.dSize)
			continue
		}
		// A table's durable version need not be its latest: the
		// pointers it holds in P are judged in their own right (a table
		// that D did not reach is all new pointers), so an older, valid
		// version only loses what was never flushed. Data must be what
		// the writer wrote.
		if p.Kind.Metadata() {
			continue
		}
		if at, ok := differs(c.dFile, live, p.Off, end-p.Off); ok {
			fail(rule, "%s, whose byte %#x is not durable (the durable bytes differ from those written)", what, at)
		}
	}
	return fails
}

// holder names what holds a pointer of kind p.Kind.
func holder(p qcow.Pointer) string {
	switch p.Kind {
	case qcow.PtrL1Table, qcow.PtrRefcountTable, qcow.PtrSnapshotTable:
		return "header field"
	case qcow.PtrSnapshotL1:
		return "snapshot entry"
	case qcow.PtrL2Table:
		return "L1 entry"
	case qcow.PtrRefcountBlock:
		return "refcount table entry"
	}
	return "L2 entry"
}

// differs compares n bytes at off of a and b and returns the first offset
// where they differ.
func differs(a, b io.ReaderAt, off, n int64) (int64, bool) {
	const chunk = 64 << 10
	ba, bb := make([]byte, min(n, chunk)), make([]byte, min(n, chunk))
	for done := int64(0); done < n; {
		k := min(n-done, chunk)
		na, _ := a.ReadAt(ba[:k], off+done)
		nb, _ := b.ReadAt(bb[:k], off+done)
		clear(ba[na:k])
		clear(bb[nb:k])
		if !bytes.Equal(ba[:k], bb[:k]) {
			for i := range k {
				if ba[i] != bb[i] {
					return off + done + i, true
				}
			}
		}
		done += k
	}
	return 0, false
}

// checkRefcounts applies RuleRefcount, RuleFree and RuleRollbackOrder.
func (c *orderingChecker) checkRefcounts(j int, op faultfs.Op, pl *qcow.Layout) (fails []*Failure) {
	seen := map[string]bool{}
	fail := func(rule, format string, args ...any) {
		if !seen[rule] {
			seen[rule] = true
			fails = append(fails, orderingFailure(rule, j, op, format, args...))
		}
	}
	pRefs := pl.References()
	clusters := make([]int64, 0, len(pRefs)+len(c.dRefs))
	for k := range pRefs {
		clusters = append(clusters, k)
	}
	for k := range c.dRefs {
		if _, ok := pRefs[k]; !ok {
			clusters = append(clusters, k)
		}
	}
	slices.Sort(clusters)
	for _, k := range clusters {
		nP, nD := pRefs[k], c.dRefs[k]
		rP, rD := pl.Refcount(k), c.dl.Refcount(k)
		if nP > nD {
			if rP < uint64(nP) {
				fail(RuleRefcount, "cluster %d (%#x) has %d references after it, %d durably before, but refcount %d", k, k*pl.ClusterSize, nP, nD, rP)
				continue
			}
			if off, n, ok := pl.RefcountLocation(k); ok && rP != rD && written(op, off, off+n) {
				fail(RuleRefcount, "cluster %d (%#x) gets %d references and its refcount (%d, at %#x) in the same write", k, k*pl.ClusterSize, nP, rP, off)
			}
			continue
		}
		if rP < rD && rP < uint64(nP) {
			rule := RuleFree
			if strings.HasPrefix(op.Label, "rollback") {
				rule = RuleRollbackOrder
			}
			fail(rule, "cluster %d (%#x) refcount lowered from %d to %d while %d durable references remain", k, k*pl.ClusterSize, rD, rP, nP)
		}
	}
	return fails
}

// checkTruncate applies RuleTruncate.
func (c *orderingChecker) checkTruncate(j int, op faultfs.Op) *Failure {
	s := op.Offset
	if s >= c.dSize {
		return nil
	}
	for _, p := range c.dl.Pointers {
		if p.Kind == qcow.PtrHeader || p.Len <= 0 || p.Off < 0 || p.Off >= c.dSize {
			continue
		}
		if p.Off+p.Len > s {
			return orderingFailure(RuleTruncate, j, op, "the file is cut to %d bytes under %s %#x+%d (cluster %d), still durably pointed at by the %s at %#x", s, p.Kind, p.Off, p.Len, p.Off/c.dl.ClusterSize, holder(p), p.At)
		}
	}
	return nil
}

// overlay reads as base (baseSize bytes, zeros beyond) with the bytes op
// wrote on top: the image as a crash keeps it when op alone reaches the
// disk.
type overlay struct {
	base     io.ReaderAt
	baseSize int64
	op       faultfs.Op
	size     int64
}

func (o *overlay) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	if off >= o.size {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), o.size-off))
	if off < o.baseSize {
		k := int(min(int64(n), o.baseSize-off))
		o.base.ReadAt(p[:k], off)
	}
	for _, w := range o.op.Written {
		lo, hi := max(w.Off, off), min(w.Off+w.Len, off+int64(n))
		if lo < hi {
			copy(p[lo-off:hi-off], o.op.Data[lo-o.op.Offset:hi-o.op.Offset])
		}
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// ordering checks the ordering rules on the recorded workload: RunWith's
// hook, run after the crash states passed.
func (r *run) ordering(rec *faultfs.Recording, v *Verdict) *Failure {
	fails, n := CheckOrdering(rec, imageName, 1)
	v.OrderingOps = n
	if len(fails) == 0 {
		return nil
	}
	f := fails[0]
	f.Op = r.inFlight(f.Point - 1) // the workload op that made file op Point-1
	f.Detail = shorten(f.Detail, 600)
	return f
}
