package harness

import (
	"fmt"
	"math/bits"
	"regexp"
	"slices"
	"strings"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

// SteerCandidates is the number of cases Steer.Generate draws for each
// case it returns.
const SteerCandidates = 16

// Steer draws cases biased toward coverage cells (see Coverage) that the
// cases before them have not covered, or covered in few cases: soak
// --steer. For each case it draws SteerCandidates candidates and picks
// the one that promises most, by two estimates:
//
//   - the fault columns the candidate can cover (its model's crash states,
//     its fault plan's fault): each scores the events already covered in
//     some other column of its kind but not in this one, divided by one
//     plus the cases that tried the column, so an untried model or fault
//     kind is tried soon and one that keeps missing fades;
//   - its features (format, model, cluster size, backing file, cache
//     mode, fault plan shape, workload length, disk size, growing the
//     disk, the image recipe): how much
//     rare coverage the cases with each feature found per case (see
//     Generate), which finds the shapes that reach rare events.
//
// Steer is deterministic: the same calls in the same order (Generate for
// a case, Observe for a finished one) give the same cases. A steered case
// is an ordinary Case (its Seed is the candidate's own), so its ID
// reproduces it without the Steer. A Steer is not safe for concurrent use.
type Steer struct {
	sp Space
	// hits counts, per cell, the observed cases that covered it.
	hits map[cellKey]int
	// feats holds, per feature, the observed cases with it and the sum of
	// their gains.
	feats map[string]*featStat
	cov   Coverage
	cases int
	gain  float64 // of every observed case
	// cols maps a fault column ("crash:torn", "eio") to the events
	// covered in it; tries counts the observed cases that could cover it
	// (by their model or fault plan); crashEvents and faultEvents are the
	// events covered in any crash or injected-fault column.
	cols                     map[string]map[string]bool
	tries                    map[string]int
	crashEvents, faultEvents map[string]bool
	// events lists crashEvents sorted; evCases counts, per event, the
	// observed cases whose crash states covered it, and evHits the same
	// per feature.
	events  []string
	evCases map[string]int
	evHits  map[string]map[string]int
}

type featStat struct {
	cases int
	gain  float64
}

// NewSteer returns a Steer drawing from sp.
func NewSteer(sp Space) *Steer {
	return &Steer{sp: sp, hits: map[cellKey]int{}, feats: map[string]*featStat{},
		cols: map[string]map[string]bool{}, tries: map[string]int{},
		crashEvents: map[string]bool{}, faultEvents: map[string]bool{},
		evCases: map[string]int{}, evHits: map[string]map[string]int{}}
}

// Generate returns the case for seed: of SteerCandidates cases drawn by
// Generate, the first from seed itself and the others from its sub-seeds
// "steer/1", "steer/2", ..., the one with the highest score: the sum of
// its columns' scores (see Steer) and the mean of its features' scores.
// A feature's score is (G + P) / (n + 1): G the
// gain of the n observed cases with it (see Observe), P twice the mean
// gain of every observed case, an optimistic prior that makes a feature
// not yet tried score twice the mean and fades as the feature is tried.
// Ties go to the earlier candidate, so before any Observe Generate returns
// Generate(seed, sp).
func (s *Steer) Generate(seed uint64) Case {
	var best Case
	bestScore := -1.0
	prior := 1.0
	if s.cases > 0 {
		prior = 2 * s.gain / float64(s.cases)
	}
	for i := range SteerCandidates {
		cs := seed
		if i > 0 {
			cs = faultfs.SubSeed(seed, fmt.Sprintf("steer/%d", i))
		}
		c := Generate(cs, s.sp)
		feats := caseFeatures(c)
		score := 0.0
		for _, f := range feats {
			if st := s.feats[f]; st != nil {
				score += (st.gain + prior) / float64(st.cases+1)
			} else {
				score += prior
			}
		}
		score /= float64(len(feats))
		crash, fault := caseColumns(c)
		score += s.expected(crash, feats)
		if fault != "" {
			score += s.missing(fault, s.faultEvents)
		}
		if score > bestScore {
			best, bestScore = c, score
		}
	}
	return best
}

// Observe takes in a finished case's coverage (its Verdict.Coverage). The
// case's gain is the sum over its cells of 1/(1+k), k the observed cases
// that covered the cell before it: 1 for every new cell.
func (s *Steer) Observe(c Case, cov *Coverage) {
	gain := 0.0
	// Sorted cells: the float sum is the same in every process.
	for _, cell := range cov.Cells() {
		k := cellKey{cell.Event, cell.Fault, cell.Outcome}
		gain += 1 / float64(1+s.hits[k])
		s.hits[k]++
	}
	for _, f := range caseFeatures(c) {
		st := s.feats[f]
		if st == nil {
			st = &featStat{}
			s.feats[f] = st
		}
		st.cases++
		st.gain += gain
	}
	s.cov.Merge(cov)
	s.cases++
	s.gain += gain
	crash, fault := caseColumns(c)
	s.tries[crash]++
	if fault != "" {
		s.tries[fault]++
	}
	seen := map[string]bool{}
	for _, cell := range cov.Cells() {
		if strings.HasPrefix(cell.Fault, "crash:") && !seen[cell.Event] {
			seen[cell.Event] = true
			s.evCases[cell.Event]++
			for _, f := range caseFeatures(c) {
				h := s.evHits[f]
				if h == nil {
					h = map[string]int{}
					s.evHits[f] = h
				}
				h[cell.Event]++
			}
			if !s.crashEvents[cell.Event] {
				i, _ := slices.BinarySearch(s.events, cell.Event)
				s.events = slices.Insert(s.events, i, cell.Event)
			}
		}
		col := s.cols[cell.Fault]
		if col == nil {
			col = map[string]bool{}
			s.cols[cell.Fault] = col
		}
		col[cell.Event] = true
		if strings.HasPrefix(cell.Fault, "crash:") {
			s.crashEvents[cell.Event] = true
		} else {
			s.faultEvents[cell.Event] = true
		}
	}
}

// expected estimates the new cells a case with features feats adds in
// crash column col: the sum, over the events covered in some crash column
// but not in col, of the chance that the case's crash states cover the
// event: the mean over its features f of (h + p) / (n + 1), h of the n
// observed cases with f covered it, p the share of all observed cases
// that did (so an untried feature counts as average).
func (s *Steer) expected(col string, feats []string) float64 {
	sum := 0.0
	for _, e := range s.events {
		if s.cols[col][e] {
			continue
		}
		prior := float64(s.evCases[e]) / float64(max(s.cases, 1))
		p := 0.0
		for _, f := range feats {
			n := 0
			if st := s.feats[f]; st != nil {
				n = st.cases
			}
			p += (float64(s.evHits[f][e]) + prior) / float64(n+1)
		}
		sum += p / float64(len(feats))
	}
	return sum
}

// missing estimates the new cells a case adds in fault column col: the
// events of all (covered in a column like it) not yet covered in col,
// divided by 1 + the cases that tried col.
func (s *Steer) missing(col string, all map[string]bool) float64 {
	n := len(all)
	for e := range s.cols[col] {
		if all[e] {
			n--
		}
	}
	return float64(n) / float64(1+s.tries[col])
}

// faultNames matches the fault of a fault plan's action.
var faultNames = regexp.MustCompile(`\b(eio|enospc|short-write|tear|fsync-drop|crash)\b`)

// caseColumns returns the fault columns a case can cover: its crash
// states' and, with a fault plan, its plan's fault ("" without one).
func caseColumns(c Case) (crash, fault string) {
	if c.Faults != "" {
		if m := faultNames.FindAllString(c.Faults, -1); len(m) > 0 {
			fault = m[len(m)-1]
		}
	}
	return CrashFault(c.Model), fault
}

// Coverage returns the coverage of every case observed (the Steer's own:
// do not modify it).
func (s *Steer) Coverage() *Coverage { return &s.cov }

// numbers matches the numbers of a fault plan (probabilities, seeds).
var numbers = regexp.MustCompile(`[0-9][0-9.e+-]*`)

// caseFeatures returns what Steer learns about: one name per dimension of
// the case.
func caseFeatures(c Case) []string {
	plan := "none"
	if c.Faults != "" {
		plan = numbers.ReplaceAllString(c.Faults, "#")
	}
	return []string{
		"format=" + c.Format,
		"model=" + c.Model.String(),
		fmt.Sprintf("cs=%d", c.ClusterSize),
		fmt.Sprintf("backing=%v", c.Backing),
		fmt.Sprintf("wt=%v", c.WriteThrough),
		"plan=" + plan,
		fmt.Sprintf("ops~%d", bits.Len(uint(c.Ops))),
		fmt.Sprintf("size~%d", bits.Len64(uint64(c.Size))),
		fmt.Sprintf("grow=%v", c.Grow),
		"image=" + c.Image,
	}
}
