package qcow

import (
	"math/rand/v2"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

// BenchmarkCrashCheck measures crash states checked per second: open,
// structural check and model verification (the flat model rebuilt for the
// state's crash point, then compared sector by sector with the whole
// disk) of torn-model states of a 64 MiB v3 image after a 1,000-operation
// workload (writes of 512 B to 64 KiB, zero writes, a flush every 50).
func BenchmarkCrashCheck(b *testing.B) {
	bw := benchWorkload(b)
	w, base, ends, pool, points := bw.w, bw.base, bw.ends, bw.pool, bw.points
	// One model per crash point, as the harness builds it: the ops'
	// data made once, the model for a point built when its first state
	// is checked and shared (Verify does not change it) by the others.
	data := exData(w)
	var v *diffVerifier
	mPoint := -1
	whole, partial := 0, 0
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		k := n % len(pool)
		if points[k] != mPoint || k == 0 {
			if v != nil {
				whole, partial = whole+v.wholeN, partial+v.partialN
			}
			m := exModelData(w, data, base, ends, points[k])
			v, mPoint = newDiffVerifier(bw.pts[k], faultfs.Torn, m, pool[k].Names()), points[k]
		}
		if err := crashVerifyContent(pool[k], -1, v.content); err != nil {
			b.Fatalf("point %d: %v", points[k], err)
		}
	}
	b.StopTimer()
	whole, partial = whole+v.wholeN, partial+v.partialN
	b.ReportMetric(float64(partial)/float64(whole+partial), "diff-fraction")
	crashStates.Add(int64(b.N))
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "states/s")
}

// benchCase is the recorded workload of BenchmarkCrashCheck and its pool
// of crash states.
type benchCase struct {
	w      exWorkload
	base   []byte
	ends   []int
	pool   []*faultfs.State
	points []int
	pts    []*faultfs.Point // pts[k] is the point of pool[k]
}

// benchWorkload records the benchmark's workload and draws its states.
func benchWorkload(b testing.TB) benchCase {
	const size = 64 << 20
	r := rand.New(rand.NewPCG(1, 2))
	w := exWorkload{name: "bench", cfg: crashConfig{version: 3, cs: 64 << 10}, size: size}
	for i := range 1000 {
		switch {
		case i%50 == 49:
			w.ops = append(w.ops, exOp{kind: "flush"})
		case i%10 == 3:
			n := int64(r.IntN(128)+1) * 512
			w.ops = append(w.ops, exOp{kind: "zero", off: r.Int64N(size-n) &^ 511, n: n})
		default:
			n := int64(r.IntN(64<<10) + 1)
			w.ops = append(w.ops, exOp{kind: "write", off: r.Int64N(size - n), n: n, seed: uint64(i)})
		}
	}
	mem, base := crashSetup(b, w.cfg, size, 1)
	ffs := faultfs.New(mem)
	im, err := Open(ffs, "img", &Options{ReadWrite: true})
	if err != nil {
		b.Fatal(err)
	}
	ends := make([]int, len(w.ops))
	for i, op := range w.ops {
		if err := exApply(im, op); err != nil {
			b.Fatal(err)
		}
		ends[i] = len(ffs.Log())
	}
	if err := im.Close(); err != nil {
		b.Fatal(err)
	}
	// A pool of states from every 16th crash point, 8 each.
	var pool []*faultfs.State
	var points []int
	var pts []*faultfs.Point
	i := 0
	for p := range ffs.Recording().Points() {
		if i++; i%16 != 0 {
			continue
		}
		for st := range p.States(faultfs.Torn, 1, 8) {
			pool = append(pool, st)
			points = append(points, p.Ops())
			pts = append(pts, p)
		}
	}
	return benchCase{w, base, ends, pool, points, pts}
}
