package qcow

import (
	"container/list"
	"encoding/binary"
	"sync"
)

// l2Cache is a bounded LRU cache of decoded L2 tables keyed by their host
// offset. Safe for concurrent use.
type l2Cache struct {
	mu    sync.Mutex
	max   int
	ll    *list.List
	items map[uint64]*list.Element
}

type l2Item struct {
	off   uint64
	table []uint64
}

func newL2Cache(bytes, tableBytes int64) *l2Cache {
	n := int(bytes / max(tableBytes, 1))
	return &l2Cache{max: max(n, 4), ll: list.New(), items: map[uint64]*list.Element{}}
}

func (c *l2Cache) get(off uint64) []uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[off]; ok {
		c.ll.MoveToFront(el)
		return el.Value.(*l2Item).table
	}
	return nil
}

func (c *l2Cache) put(off uint64, t []uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[off]; ok {
		el.Value.(*l2Item).table = t
		c.ll.MoveToFront(el)
		return
	}
	c.items[off] = c.ll.PushFront(&l2Item{off: off, table: t})
	for c.ll.Len() > c.max {
		el := c.ll.Back()
		c.ll.Remove(el)
		delete(c.items, el.Value.(*l2Item).off)
	}
}

// l2Table returns the L2 table at host offset off (validated by the
// caller), reading it through the cache.
func (im *Image) l2Table(off uint64) ([]uint64, error) {
	return im.l2TableEvent(off, EventL2Load)
}

// l2TableEvent is l2Table reporting ev for a read from the file.
func (im *Image) l2TableEvent(off uint64, ev Event) ([]uint64, error) {
	if w := im.w; w != nil {
		if d := w.l2[off]; d != nil {
			return d.t, nil // dirty (or new) table of a writable image
		}
	}
	if t := im.l2c.get(off); t != nil {
		return t, nil
	}
	n := im.l2Bytes()
	buf := getBuf(int(n))
	defer putBuf(buf)
	im.event(ev)
	if err := im.readFull(buf, int64(off)); err != nil {
		return nil, err
	}
	t := make([]uint64, n/8)
	for i := range t {
		t[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	im.l2c.put(off, t)
	return t, nil
}
