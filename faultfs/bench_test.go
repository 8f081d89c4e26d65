package faultfs_test

import (
	"math/rand/v2"
	"syscall"
	"testing"
	"time"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// benchRecording records the benchmark workload: a 64 MiB file written in
// full and made durable, then 1,000 operations: writes of 4 KiB to 64 KiB at
// random sector-aligned offsets, with an fdatasync after about one in 20.
// It returns the recording and the op count where the workload starts.
func benchRecording(b *testing.B) (*faultfs.Recording, int) {
	b.Helper()
	const size = 64 << 20
	fsys := faultfs.New(vfs.NewMem())
	f, err := fsys.Create("img")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	r := rand.New(rand.NewPCG(1, 2))
	chunk := make([]byte, 1<<20)
	for off := 0; off < size; off += len(chunk) {
		for i := range chunk {
			chunk[i] = byte(r.Uint32())
		}
		if _, err := f.WriteAt(chunk, int64(off)); err != nil {
			b.Fatal(err)
		}
	}
	if err := f.Datasync(); err != nil {
		b.Fatal(err)
	}
	if err := fsys.SyncDir("."); err != nil {
		b.Fatal(err)
	}
	start := len(fsys.Log())
	buf := make([]byte, 64<<10)
	for range 1000 {
		if r.IntN(20) == 0 {
			if err := f.Datasync(); err != nil {
				b.Fatal(err)
			}
			continue
		}
		n := 4<<10 + r.IntN(60<<10+1)
		off := r.Int64N(size-int64(n)) &^ 511
		for i := range buf[:n] {
			buf[i] = byte(r.Uint32())
		}
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			b.Fatal(err)
		}
	}
	return fsys.Recording(), start
}

// BenchmarkCrashStates measures crash states per second over the crash
// points of a 1,000-operation workload on a 64 MiB file: replaying the
// log, building each point, materializing states and opening each to read
// 4 KiB at its start and 4 KiB at a pending write. Each point contributes
// up to 256 states, so the run spreads over many points. The replay of the
// initial 64 MiB fill, once per round, is setup and not timed. Besides
// states/s (wall clock) it reports states/cpu-s, states per CPU-second of
// the process, which a loaded machine does not distort.
func BenchmarkCrashStates(b *testing.B) {
	rec, start := benchRecording(b)
	ops := rec.Ops()
	for _, m := range []faultfs.Model{faultfs.Torn, faultfs.Reorder, faultfs.Garbage, faultfs.Prefix} {
		b.Run(m.String(), func(b *testing.B) {
			buf := make([]byte, 4096)
			n := 0
			t0, c0 := time.Now(), cpuTime()
			timing := false
			for n < b.N {
				for p := range rec.Points() {
					if p.Ops() <= start {
						continue // replaying the initial fill: setup
					}
					if !timing {
						// Time from the first workload point on.
						timing = true
						b.ResetTimer()
						t0, c0 = time.Now(), cpuTime()
					}
					last := ops[p.Ops()-1]
					for s := range p.States(m, uint64(p.Ops()), 256) {
						f, err := s.Open("img", vfs.ReadOnly)
						if err != nil {
							b.Fatal(err)
						}
						if _, err := f.ReadAt(buf, 0); err != nil {
							b.Fatal(err)
						}
						if _, err := f.ReadAt(buf, last.Offset); err != nil {
							b.Fatal(err)
						}
						f.Close()
						if n++; n >= b.N {
							break
						}
					}
					if n >= b.N {
						break
					}
				}
			}
			b.ReportMetric(float64(n)/time.Since(t0).Seconds(), "states/s")
			if cpu := cpuTime() - c0; cpu > 0 {
				// Robust on a shared machine: states per CPU-second used.
				b.ReportMetric(float64(n)/cpu.Seconds(), "states/cpu-s")
			}
		})
	}
}

// cpuTime returns the user and system CPU time this process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
