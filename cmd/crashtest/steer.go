package main

import (
	"sync"

	"github.com/qcowcrash/qcowcrash/harness"
)

// steerLag is how many cases soak --steer generates ahead of the cases it
// has learnt from: case j is drawn once cases 0..j-steerLag-1 have run
// and been observed, in order, so the steered cases depend on the seed
// and shard only, not on --workers or timing.
const steerLag = 8

// steerSource draws soak --steer's cases with a harness.Steer.
type steerSource struct {
	mu       sync.Mutex
	cond     *sync.Cond
	st       *harness.Steer
	seed     uint64
	shard    shardFlag
	cases    map[int64]harness.Case      // drawn, not yet observed
	finished map[int64]*harness.Coverage // run, not yet observed
	drawn    int64                       // cases 0..drawn-1 are drawn
	observed int64                       // cases 0..observed-1 are observed
}

func newSteerSource(seed uint64, shard shardFlag, sp harness.Space) *steerSource {
	s := &steerSource{st: harness.NewSteer(sp), seed: seed, shard: shard,
		cases: map[int64]harness.Case{}, finished: map[int64]*harness.Coverage{}}
	s.cond = sync.NewCond(&s.mu)
	for range steerLag {
		s.draw()
	}
	return s
}

// draw draws the next case; s.mu is held.
func (s *steerSource) draw() {
	j := s.drawn
	k := s.shard.i + uint64(j)*s.shard.n
	s.cases[j] = s.st.Generate(harness.CaseSeed(s.seed, k))
	s.drawn++
}

// caseAt waits until case j is drawn and returns it.
func (s *steerSource) caseAt(j int64, _ uint64) harness.Case {
	s.mu.Lock()
	defer s.mu.Unlock()
	for j >= s.drawn {
		s.cond.Wait()
	}
	return s.cases[j]
}

// done takes in case j's coverage; once every case before it is in too,
// the Steer observes them in order and draws as many new cases.
func (s *steerSource) done(j int64, cov *harness.Coverage) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.finished[j] = cov
	for {
		c, ok := s.finished[s.observed]
		if !ok {
			break
		}
		delete(s.finished, s.observed)
		s.st.Observe(s.cases[s.observed], c)
		delete(s.cases, s.observed)
		s.observed++
		s.draw()
	}
	s.cond.Broadcast()
}
