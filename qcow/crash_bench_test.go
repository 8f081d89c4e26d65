package qcow

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

// BenchmarkCrashCheck measures crash states checked per second, after a
// 1,000-operation workload (largeWorkload) on a 64 MiB v3 image with 64 KiB
// clusters. Each state of the torn model is drawn, gets the verdict of
// Check on its image (no corruption allowed; the verdict is remembered for
// states that read the same metadata bytes, see unitVerifier.verify) and
// has its content judged against the flat model of its point, as exRun
// judges states. The recording is replayed pass after pass, and everything
// after the workload is timed: walking the points, drawing the states,
// advancing the model (exDriver) and judging (unitVerifier). Two samplings:
//
//   - per-point=8: up to 8 states at every 16th of the 1,226 crash points
//     (573 states a pass), the sampling of crashtest soak
//     (harness.DefaultStatesPerPoint), where the per-point work (the
//     model, the point's layout, sorting the clusters) weighs as much as
//     the states;
//   - per-point=4096: faultfs.DefaultLimit states, the bound of the
//     exhaustive Crash tests, at every 256th point (4 points, 16,384
//     states a pass; run it with -benchtime 33000x or more to time whole
//     passes).
func BenchmarkCrashCheck(b *testing.B) {
	bw := benchWorkload(b)
	for _, c := range []struct{ perPoint, stride int }{{8, 16}, {faultfs.DefaultLimit, 256}} {
		b.Run(fmt.Sprintf("per-point=%d", c.perPoint), func(b *testing.B) {
			benchCrashCheck(b, bw, c.perPoint, c.stride)
		})
	}
}

func benchCrashCheck(b *testing.B, bw benchCase, perPoint, stride int) {
	data := exData(bw.w)
	log := bw.rec.Ops()
	var v *unitVerifier
	var whole, byUnits, remembered int
	b.ResetTimer()
	states := 0
	for states < b.N {
		d := newExDriver(bw.w, data, bw.base, bw.ends)
		v = newUnitVerifier(faultfs.Torn, d.m, bw.w.cfg.cs)
		d.v = v
		i := 0
	points:
		for p := range bw.rec.Points() {
			if i++; i%stride != 0 {
				continue
			}
			d.advance(p.Ops())
			v.begin(p, log[:p.Ops()])
			for st := range p.States(faultfs.Torn, 1, perPoint) {
				if err := v.verify(st, -1); err != nil {
					b.Fatalf("point %d state %d: %v", p.Ops(), st.Index(), err)
				}
				if states++; states == b.N {
					break points
				}
			}
		}
		whole, byUnits, remembered = whole+v.wholeN, byUnits+v.unitN, remembered+v.memoHits
	}
	b.StopTimer()
	crashStates.Add(int64(b.N))
	b.ReportMetric(float64(byUnits)/float64(max(1, whole+byUnits)), "by-units")
	b.ReportMetric(float64(remembered)/float64(b.N), "checks-remembered")
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "states/s")
}

// benchCase is the recorded workload of BenchmarkCrashCheck.
type benchCase struct {
	w    exWorkload
	base []byte
	ends []int // ends[i]: file operations done when workload op i returned
	rec  *faultfs.Recording
}

// largeWorkload is the benchmark's workload (on a v3 image with 64 KiB
// clusters), also checked by TestCrashLargeWorkload in other
// configurations: 1,000 operations on a 64 MiB image, writes of 1 byte to
// 64 KiB at random offsets, a zero write of up to 64 KiB every 10 ops, a
// flush every 50.
func largeWorkload(cfg crashConfig) exWorkload {
	const size = 64 << 20
	r := rand.New(rand.NewPCG(1, 2))
	w := exWorkload{name: "large", cfg: cfg, size: size}
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
	return w
}

// benchWorkload records the benchmark's workload.
func benchWorkload(b testing.TB) benchCase {
	w := largeWorkload(crashConfig{version: 3, cs: 64 << 10})
	ffs, base, ends := exRecord(b, w, 0, nil)
	return benchCase{w, base, ends, ffs.Recording()}
}
