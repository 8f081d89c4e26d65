package harness

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

// OpKind is the kind of a workload operation.
type OpKind string

// The workload operation kinds.
const (
	OpWrite OpKind = "write" // Image.WriteAt of pattern bytes
	OpZero  OpKind = "zero"  // Image.WriteZeroes
	OpFlush OpKind = "flush" // Image.Flush
	// OpResize grows the virtual disk to Op.Size bytes (Image.Resize;
	// durable on return). Only targets whose writers resize (see
	// Resizer) get resize ops.
	OpResize OpKind = "resize"
	OpClose  OpKind = "close" // Image.Close; always the last op, not counted in Case.Ops
)

// Op is one workload operation on the virtual disk.
type Op struct {
	Kind OpKind `json:"kind"`
	// Shape says how the range was drawn (sub-sector, unaligned,
	// straddle, aligned, large, cluster), for reports.
	Shape string `json:"shape,omitempty"`
	Off   int64  `json:"off,omitempty"`
	Len   int64  `json:"len,omitempty"`
	// Pattern seeds the bytes of a write (see Pattern).
	Pattern uint64 `json:"pattern,omitempty"`
	// Size is the new virtual size of a resize.
	Size int64 `json:"size,omitempty"`
}

// String describes the op on one line.
func (o Op) String() string {
	shape := ""
	if o.Shape != "" {
		shape = " shape=" + o.Shape
	}
	switch o.Kind {
	case OpWrite:
		return fmt.Sprintf("write off=%d len=%d%s pattern=%#x", o.Off, o.Len, shape, o.Pattern)
	case OpZero:
		return fmt.Sprintf("zero off=%d len=%d%s", o.Off, o.Len, shape)
	case OpResize:
		return fmt.Sprintf("resize size=%d", o.Size)
	}
	return string(o.Kind)
}

// Data returns the bytes a write op writes (nil for other kinds).
func (o Op) Data() []byte {
	if o.Kind != OpWrite {
		return nil
	}
	return Pattern(o.Pattern, o.Len)
}

// splitmix64 is one step of SplitMix64.
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// Pattern returns n deterministic pseudo-random bytes derived from seed:
// two different seeds give different bytes in every 8-byte word (with
// overwhelming probability), so old and new data are told apart.
func Pattern(seed uint64, n int64) []byte {
	b := make([]byte, (n+7)&^7)
	for i := int64(0); i < int64(len(b)); i += 8 {
		binary.LittleEndian.PutUint64(b[i:], splitmix64(seed^uint64(i)*0x2545f4914f6cdd1d))
	}
	return b[:n]
}

// Workload returns the case's operations, then a close: those of Trace
// for a trace case, else Case.Ops writes, zero writes and flushes drawn
// deterministically from Case.Seed (and, with Case.Grow, resizes drawn
// from its own sub-seed, after which ops are drawn within the new size).
// An invalid trace gives just the close (Validate reports it).
func (c Case) Workload() []Op {
	if c.Explicit {
		ops, _ := DecodeOps(c.Trace)
		return append(ops, Op{Kind: OpClose})
	}
	s := faultfs.SubSeed(c.Seed, "workload")
	r := rand.New(rand.NewPCG(s, faultfs.SubSeed(s, "pcg")))
	var rz *rand.Rand
	if c.Grow {
		s := faultfs.SubSeed(c.Seed, "resize")
		rz = rand.New(rand.NewPCG(s, faultfs.SubSeed(s, "pcg")))
	}
	ops := make([]Op, 0, c.Ops+1)
	size := c.Size
	for range c.Ops {
		if rz != nil && rz.IntN(8) == 0 && size < min(MaxSize, 4*c.Size) {
			// Grow by up to half the disk (at least a sector), to at most
			// four times the case's size and MaxSize.
			size = min(MaxSize, 4*c.Size, size+512*(1+rz.Int64N(max(1, size/1024))))
			ops = append(ops, Op{Kind: OpResize, Size: size})
			continue
		}
		ops = append(ops, c.drawOp(r, size))
	}
	return append(ops, Op{Kind: OpClose})
}

// drawOp draws one operation within a disk of size bytes.
func (c Case) drawOp(r *rand.Rand, size int64) Op {
	cs := c.ClusterSize
	// rng returns a uniform value in [lo, hi] (lo when hi < lo).
	rng := func(lo, hi int64) int64 {
		if hi <= lo {
			return lo
		}
		return lo + r.Int64N(hi-lo+1)
	}
	clamp := func(o Op) Op {
		o.Off = max(0, min(o.Off, size-1))
		o.Len = max(1, min(o.Len, size-o.Off))
		return o
	}
	x := r.IntN(100)
	switch {
	case x < 12:
		return Op{Kind: OpFlush}
	case x < 24: // zero writes: whole clusters or an unaligned range
		if r.IntN(2) == 0 && size >= cs {
			n := rng(1, min(4, size/cs))
			off := rng(0, size/cs-n) * cs
			return clamp(Op{Kind: OpZero, Shape: "cluster", Off: off, Len: n * cs})
		}
		return clamp(Op{Kind: OpZero, Shape: "unaligned", Off: rng(0, size-1), Len: rng(1, 2*cs)})
	}
	o := Op{Kind: OpWrite, Pattern: r.Uint64()}
	switch y := r.IntN(5); y {
	case 0:
		o.Shape, o.Off, o.Len = "sub-sector", rng(0, size-1), rng(1, 511)
	case 1:
		o.Shape, o.Off, o.Len = "unaligned", rng(0, size-1), rng(1, 2*cs)
	case 2: // across a cluster boundary
		o.Shape = "straddle"
		if size > cs {
			b := rng(1, (size-1)/cs) * cs
			o.Off = b - rng(1, min(b, 4096))
			o.Len = b - o.Off + rng(1, 4096)
		} else {
			o.Off, o.Len = 0, size
		}
	case 3:
		o.Shape = "aligned"
		o.Off = rng(0, size/512-1) * 512
		o.Len = rng(1, 16) * 512
	default:
		o.Shape = "large"
		o.Off = rng(0, size-1)
		o.Len = rng(cs, min(4*cs, 256<<10))
	}
	return clamp(o)
}

// EncodeOps returns the compact one-line form of a trace, which DecodeOps
// reads back: ops separated by commas, each "wOFF+LEN.PATTERN" (a write;
// PATTERN in hex), "zOFF+LEN" (a zero write), "f" (a flush) or "rSIZE" (a
// resize to SIZE bytes); no ops is the empty string. Shapes are not kept.
// Only write, zero, flush and resize ops can be encoded, with OFF >= 0,
// LEN >= 1 and SIZE in [1, MaxSize].
func EncodeOps(ops []Op) (string, error) {
	var b strings.Builder
	for i, o := range ops {
		if i > 0 {
			b.WriteByte(',')
		}
		if (o.Kind == OpWrite || o.Kind == OpZero) && (o.Off < 0 || o.Len < 1 || o.Len > MaxSize) {
			return "", fmt.Errorf("op %d (%s): want offset >= 0 and length in [1, %d]", i, o, MaxSize)
		}
		switch o.Kind {
		case OpWrite:
			fmt.Fprintf(&b, "w%d+%d.%x", o.Off, o.Len, o.Pattern)
		case OpZero:
			fmt.Fprintf(&b, "z%d+%d", o.Off, o.Len)
		case OpFlush:
			b.WriteByte('f')
		case OpResize:
			if o.Size < 1 || o.Size > MaxSize {
				return "", fmt.Errorf("op %d (%s): want a size in [1, %d]", i, o, MaxSize)
			}
			fmt.Fprintf(&b, "r%d", o.Size)
		default:
			return "", fmt.Errorf("op %d: kind %q cannot be in a trace (want write, zero, flush or resize)", i, o.Kind)
		}
	}
	return b.String(), nil
}

// DecodeOps parses what EncodeOps writes.
func DecodeOps(s string) ([]Op, error) {
	if s == "" {
		return nil, nil
	}
	parts := strings.Split(s, ",")
	if len(parts) > MaxOps {
		return nil, fmt.Errorf("%d ops (want at most %d)", len(parts), MaxOps)
	}
	ops := make([]Op, 0, len(parts))
	for i, p := range parts {
		bad := func() ([]Op, error) {
			return nil, fmt.Errorf("op %d %q: want wOFF+LEN.HEX, zOFF+LEN, f or rSIZE", i, shorten(p, 60))
		}
		if p == "f" {
			ops = append(ops, Op{Kind: OpFlush})
			continue
		}
		if len(p) > 1 && p[0] == 'r' {
			n, err := strconv.ParseInt(p[1:], 10, 64)
			if err != nil || n < 1 || n > MaxSize {
				return bad()
			}
			ops = append(ops, Op{Kind: OpResize, Size: n})
			continue
		}
		if len(p) < 4 || (p[0] != 'w' && p[0] != 'z') {
			return bad()
		}
		o := Op{Kind: OpZero}
		rest := p[1:]
		if p[0] == 'w' {
			o.Kind = OpWrite
			var pat string
			var ok bool
			if rest, pat, ok = strings.Cut(rest, "."); !ok {
				return bad()
			}
			var err error
			if o.Pattern, err = strconv.ParseUint(pat, 16, 64); err != nil {
				return bad()
			}
		}
		a, l, ok := strings.Cut(rest, "+")
		if !ok {
			return bad()
		}
		var err1, err2 error
		o.Off, err1 = strconv.ParseInt(a, 10, 64)
		o.Len, err2 = strconv.ParseInt(l, 10, 64)
		if err1 != nil || err2 != nil || o.Off < 0 || o.Len < 1 || o.Len > MaxSize || o.Off > MaxSize {
			return bad()
		}
		ops = append(ops, o)
	}
	return ops, nil
}
