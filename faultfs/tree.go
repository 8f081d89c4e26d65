package faultfs

import "sync/atomic"

// The page tree: a persistent (copy-on-write) sparse map from page index to
// an immutable 4 KiB page, used for the durable contents of every file.
//
// A tree value is a root and a height; copying it is a snapshot. Mutations
// take an epoch: a node whose epoch equals it was created by the current
// mutator since its last snapshot and is changed in place, any other node is
// copied first (path copying). Whoever hands out a snapshot must switch to a
// fresh epoch (newEpoch) before mutating again, so the snapshot's nodes are
// never touched. Pages themselves are never modified once stored: an update
// stores a fresh copy. Epochs come from one process-wide counter, so two
// mutators (the live FS and a replay) never share one.

const (
	pageShift = 12
	pageBytes = 1 << pageShift // storage page size of the tree
	fanBits   = 6
	fanout    = 1 << fanBits
	maxHeight = 9 // 9*6+12 = 66 bits: covers every int64 offset
)

// page is one stored page of file data; nil stands for zeros.
type page [pageBytes]byte

var zeroPage page

var epochCounter atomic.Uint64

// newEpoch returns an epoch no other mutator uses.
func newEpoch() uint64 { return epochCounter.Add(1) }

// tnode is one tree node: interior nodes use kids, leaves (height 1) pgs.
type tnode struct {
	epoch uint64
	kids  [fanout]*tnode
	pgs   [fanout]*page
}

// tree is a persistent sparse page map. The zero tree is empty.
type tree struct {
	root   *tnode
	height int // levels; pages below fanout^height are addressable
}

// capPages returns how many pages a tree of height h addresses.
func capPages(h int) int64 {
	if h >= maxHeight {
		return 1<<63 - 1
	}
	return 1 << (fanBits * h)
}

func (n *tnode) own(ep uint64) *tnode {
	if n.epoch == ep {
		return n
	}
	c := *n
	c.epoch = ep
	return &c
}

// get returns page idx, nil if it is absent (zeros).
func (t tree) get(idx int64) *page {
	if t.root == nil || idx < 0 || idx >= capPages(t.height) {
		return nil
	}
	n := t.root
	for lvl := t.height; lvl > 1; lvl-- {
		n = n.kids[(idx>>(fanBits*(lvl-1)))&(fanout-1)]
		if n == nil {
			return nil
		}
	}
	return n.pgs[idx&(fanout-1)]
}

// set returns the tree with page idx replaced by pg (nil removes it).
func (t tree) set(idx int64, pg *page, ep uint64) tree {
	if idx < 0 || (pg == nil && t.get(idx) == nil) {
		return t
	}
	for t.root == nil || idx >= capPages(t.height) {
		if t.root == nil {
			t.root, t.height = &tnode{epoch: ep}, 1
			continue
		}
		nr := &tnode{epoch: ep}
		nr.kids[0] = t.root
		t.root, t.height = nr, t.height+1
	}
	t.root = t.root.own(ep)
	n := t.root
	for lvl := t.height; lvl > 1; lvl-- {
		i := (idx >> (fanBits * (lvl - 1))) & (fanout - 1)
		c := n.kids[i]
		if c == nil {
			c = &tnode{epoch: ep}
		} else {
			c = c.own(ep)
		}
		n.kids[i] = c
		n = c
	}
	n.pgs[idx&(fanout-1)] = pg
	return t
}

// ascend calls fn for every stored page with index in [lo, hi), in order,
// until fn returns false.
func (t tree) ascend(lo, hi int64, fn func(idx int64, pg *page) bool) {
	if t.root == nil || lo >= hi {
		return
	}
	ascendNode(t.root, t.height, 0, lo, hi, fn)
}

func ascendNode(n *tnode, lvl int, base, lo, hi int64, fn func(int64, *page) bool) bool {
	if lvl == 1 {
		for i, pg := range n.pgs {
			idx := base + int64(i)
			if pg != nil && idx >= lo && idx < hi {
				if !fn(idx, pg) {
					return false
				}
			}
		}
		return true
	}
	span := capPages(lvl - 1)
	for i, c := range n.kids {
		start := base + int64(i)*span
		if c == nil || start >= hi || start+span <= lo {
			continue
		}
		if !ascendNode(c, lvl-1, start, lo, hi, fn) {
			return false
		}
	}
	return true
}

// readAt fills p with the bytes at off (zeros where no page is stored).
func (t tree) readAt(p []byte, off int64) {
	for done := 0; done < len(p); {
		pos := off + int64(done)
		idx, in := pos>>pageShift, int(pos&(pageBytes-1))
		c := min(pageBytes-in, len(p)-done)
		if pg := t.get(idx); pg != nil {
			copy(p[done:done+c], pg[in:])
		} else {
			clear(p[done : done+c])
		}
		done += c
	}
}

// write returns the tree with [off, off+n) replaced by data, or by zeros
// when data is nil. len(data) must be n when data is not nil.
func (t tree) write(data []byte, off, n int64, ep uint64) tree {
	if n <= 0 {
		return t
	}
	if data == nil && t.root == nil {
		return t
	}
	for done := int64(0); done < n; {
		pos := off + done
		idx, in := pos>>pageShift, pos&(pageBytes-1)
		c := min(pageBytes-in, n-done)
		old := t.get(idx)
		switch {
		case data == nil && old == nil:
			// Already zeros.
		case data == nil && c == pageBytes:
			t = t.set(idx, nil, ep)
		default:
			pg := new(page)
			if old != nil {
				*pg = *old
			}
			if data == nil {
				clear(pg[in : in+c])
			} else {
				copy(pg[in:in+c], data[done:done+c])
			}
			if *pg == zeroPage {
				pg = nil
			}
			t = t.set(idx, pg, ep)
		}
		done += c
	}
	return t
}

// truncate returns the tree with every byte at or beyond size zeroed.
func (t tree) truncate(size int64, ep uint64) tree {
	if t.root == nil {
		return t
	}
	if in := size & (pageBytes - 1); in != 0 {
		t = t.write(nil, size, pageBytes-in, ep)
	}
	first := (size + pageBytes - 1) >> pageShift
	var drop []int64
	t.ascend(first, 1<<62, func(idx int64, _ *page) bool {
		drop = append(drop, idx)
		return true
	})
	for _, idx := range drop {
		t = t.set(idx, nil, ep)
	}
	return t
}
