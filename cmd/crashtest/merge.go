package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"github.com/qcowcrash/qcowcrash/harness"
)

func init() {
	register(&command{
		name:    "merge",
		args:    "[--json] [--summary FILE] SUMMARY...",
		summary: "Merge the JSON summaries of soak shards (soak --summary FILE, or soak --json) into one report: counts, failures, the case indexes covered and the coverage table added up, as one soak over all their cases prints it; refuse summaries of different settings (seed, target, errors, fs, formats, models, steer, max-states, qemu images) or of overlapping shards; exit 1 if any case failed.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			var out string
			fs.StringVar(&out, "summary", "", "also write the merged summary as JSON to `FILE` (it can be merged again)")
			asJSON := jsonFlags(fs)
			return func(c *cli, args []string) int {
				if len(args) == 0 {
					return c.usageError(commands["merge"], "no SUMMARY files")
				}
				return c.merge(args, out, *asJSON)
			}
		},
	})
}

// summaryExtra is the part of a soak summary that crashtest merge needs
// beyond the counts: the settings every merged summary must share, the
// shards it ran and its coverage.
type summaryExtra struct {
	// Formats and Models are what cases were drawn from (--formats,
	// --models, or the defaults); Steer is --steer.
	Formats []string `json:"formats"`
	Models  []string `json:"models"`
	Steer   bool     `json:"steer"`
	// MaxStates is --max-states (-1: no limit); Qemu is whether cases on
	// qemu-made snapshot images were drawn (qemu-img and qemu-io found).
	MaxStates int  `json:"max_states"`
	Qemu      bool `json:"qemu"`
	// Runs lists the shards run and how many cases each ran: shard i/n
	// with c cases ran case indexes i, i+n, ..., i+(c-1)n of the seed.
	Runs []summaryRun `json:"runs"`
	// Covered describes the case indexes run: "0..K-1" when they are the
	// first K, else each shard with its case count ("0/4:10,2/4:9").
	Covered string `json:"covered"`
	// Coverage is event × fault × outcome over every case run.
	Coverage *harness.Coverage `json:"coverage"`
}

// summaryRun is one shard of a summary.
type summaryRun struct {
	Shard string `json:"shard"`
	Cases int64  `json:"cases"`
}

// soakExtra returns the merge part of a soak run's summary.
func soakExtra(o soakOptions, sp harness.Space, cases int64, cov *harness.Coverage) summaryExtra {
	e := summaryExtra{Formats: slices.Clone(o.formats), Steer: o.steer, MaxStates: o.maxStates, Qemu: sp.Qemu, Coverage: cov}
	var tmp soakSummary
	tmp.setRuns([]summaryRun{{o.shard.String(), cases}})
	e.Runs, e.Covered = tmp.Runs, tmp.Covered
	if len(e.Formats) == 0 {
		e.Formats = slices.Clone(harness.Formats)
	}
	models := o.models
	if len(models) == 0 {
		models = harness.DefaultModels()
	}
	for _, m := range models {
		e.Models = append(e.Models, m.String())
	}
	return e
}

// setRuns sets the summary's runs, shard and covered fields from runs
// (all shards of one split, none twice): the shard is "0/1" when the runs
// cover exactly the first K case indexes.
func (s *soakSummary) setRuns(runs []summaryRun) {
	s.Runs = runs
	var n uint64
	count := map[uint64]int64{}
	var parts, shards []string
	var k int64
	for _, r := range runs {
		var sh shardFlag
		sh.Set(r.Shard) // validated by the caller
		n = sh.n
		count[sh.i] += r.Cases
		k += r.Cases
		parts = append(parts, fmt.Sprintf("%s:%d", r.Shard, r.Cases))
		shards = append(shards, r.Shard)
	}
	// The first K indexes hold, for each residue i, the k < K with
	// k mod n = i: ceil((K-i)/n) of them.
	prefix := n > 0
	for i := uint64(0); i < n && prefix; i++ {
		want := int64(0)
		if int64(i) < k {
			want = (k - int64(i) + int64(n) - 1) / int64(n)
		}
		prefix = count[i] == want
	}
	switch {
	case prefix && k == 0:
		s.Shard, s.Covered = "0/1", "none"
	case prefix:
		s.Shard, s.Covered = "0/1", fmt.Sprintf("0..%d", k-1)
	default:
		s.Shard, s.Covered = strings.Join(shards, ","), strings.Join(parts, ",")
	}
}

// writeSummary writes s as indented JSON to path.
func writeSummary(path string, s soakSummary) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// printCoverage prints the coverage table, sorted by event, fault and
// outcome.
func printCoverage(b *strings.Builder, cov *harness.Coverage) {
	fmt.Fprintf(b, "coverage: %d cells (event × fault × outcome), %d counts\n", cov.Len(), cov.Total())
	if cov.Len() == 0 {
		return
	}
	fmt.Fprintf(b, "  %-28s %-20s %-12s %10s\n", "event", "fault", "outcome", "count")
	for _, c := range cov.Cells() {
		fmt.Fprintf(b, "  %-28s %-20s %-12s %10d\n", printable(c.Event), printable(c.Fault), printable(c.Outcome), c.Count)
	}
}

// maxSummarySize bounds a summary file merge reads.
const maxSummarySize = 256 << 20

// readSummary reads and validates one soak summary file.
func readSummary(path string) (soakSummary, error) {
	var s soakSummary
	f, err := os.Open(path)
	if err != nil {
		return s, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxSummarySize+1))
	if err != nil {
		return s, fmt.Errorf("%s: %w", path, err)
	}
	if len(b) > maxSummarySize {
		return s, fmt.Errorf("%s: larger than %d bytes", path, maxSummarySize)
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("%s: not a soak summary: %w", path, err)
	}
	if s.Seed == "" || len(s.Runs) == 0 || s.Target == "" {
		return s, fmt.Errorf("%s: not a soak summary of this crashtest (no seed, target or runs; write one with soak --summary FILE)", path)
	}
	var cases int64
	for _, r := range s.Runs {
		var sh shardFlag
		if err := sh.Set(r.Shard); err != nil {
			return s, fmt.Errorf("%s: runs: %w", path, err)
		}
		if r.Cases < 0 {
			return s, fmt.Errorf("%s: runs: shard %s: cases %d is negative", path, r.Shard, r.Cases)
		}
		cases += r.Cases
	}
	if cases != s.Cases {
		return s, fmt.Errorf("%s: cases %d, but its runs hold %d", path, s.Cases, cases)
	}
	if s.Coverage == nil {
		s.Coverage = &harness.Coverage{}
	}
	return s, nil
}

// mergeSummaries merges summaries of shards of one soak setting, read
// from names, into one.
func mergeSummaries(names []string, sums []soakSummary) (soakSummary, error) {
	first := sums[0]
	m := soakSummary{
		Seed: first.Seed, Target: first.Target, Errors: first.Errors, FS: first.FS,
		Failures: []soakFailure{},
	}
	m.Formats, m.Models, m.Steer, m.MaxStates, m.Qemu = first.Formats, first.Models, first.Steer, first.MaxStates, first.Qemu
	m.Coverage = &harness.Coverage{}
	settings := func(s soakSummary) []struct{ name, v string } {
		return []struct{ name, v string }{
			{"seed", s.Seed}, {"target", s.Target}, {"errors", fmt.Sprint(s.Errors)}, {"fs", s.FS},
			{"formats", strings.Join(s.Formats, ",")}, {"models", strings.Join(s.Models, ",")}, {"steer", fmt.Sprint(s.Steer)},
			{"max_states", fmt.Sprint(s.MaxStates)}, {"qemu", fmt.Sprint(s.Qemu)},
		}
	}
	want := settings(first)
	shardOf := map[string]string{} // shard -> file that ran it
	var n uint64
	var nFile string
	var runs []summaryRun
	for i, s := range sums {
		for j, f := range settings(s) {
			if f.v != want[j].v {
				return m, fmt.Errorf("%s: %s %q differs from %s's %q: merge only shards of one soak setting", names[i], f.name, f.v, names[0], want[j].v)
			}
		}
		for _, r := range s.Runs {
			var sh shardFlag
			sh.Set(r.Shard)
			if n == 0 {
				n, nFile = sh.n, names[i]
			}
			if sh.n != n {
				return m, fmt.Errorf("%s: shard %s is not of the split into %d shards of %s: merge shards of one split", names[i], r.Shard, n, nFile)
			}
			if prev, dup := shardOf[r.Shard]; dup {
				return m, fmt.Errorf("%s: shard %s also ran in %s: the summaries overlap", names[i], r.Shard, prev)
			}
			shardOf[r.Shard] = names[i]
			runs = append(runs, r)
		}
		m.Cases += s.Cases
		m.Points += s.Points
		m.States += s.States
		m.ElapsedSeconds += s.ElapsedSeconds
		m.Interrupted = m.Interrupted || s.Interrupted
		m.Failures = append(m.Failures, s.Failures...)
		m.Coverage.Merge(s.Coverage)
	}
	slices.SortFunc(runs, func(a, b summaryRun) int {
		var x, y shardFlag
		x.Set(a.Shard)
		y.Set(b.Shard)
		return int(x.i) - int(y.i)
	})
	m.setRuns(runs)
	if m.ElapsedSeconds > 0 {
		m.StatesPerSec = float64(m.States) / m.ElapsedSeconds
	}
	slices.SortStableFunc(m.Failures, byIndex)
	return m, nil
}

func (c *cli) merge(paths []string, out string, asJSON bool) int {
	sums := make([]soakSummary, len(paths))
	for i, p := range paths {
		s, err := readSummary(p)
		if err != nil {
			return c.fail("merge: %v", err)
		}
		sums[i] = s
	}
	m, err := mergeSummaries(paths, sums)
	if err != nil {
		return c.fail("merge: %v", err)
	}
	if out != "" {
		if err := writeSummary(out, m); err != nil {
			return c.fail("merge: --summary: %v", err)
		}
	}
	if asJSON {
		b, err := json.MarshalIndent(m, "", "  ")
		if err != nil {
			return c.fail("merge: %v", err)
		}
		c.stdout.Write(append(b, '\n'))
	} else {
		var b strings.Builder
		fmt.Fprintf(&b, "merge: %d summaries:", len(paths))
		for i, p := range paths {
			fmt.Fprintf(&b, " %s (%s, %d cases)", printable(p), printable(sums[i].Shard), sums[i].Cases)
		}
		fmt.Fprintf(&b, "\nmerged: seed=%s target=%s errors=%v fs=%s formats=%s models=%s steer=%v max-states=%d qemu=%v covered case indexes %s\n",
			m.Seed, m.Target, m.Errors, m.FS, strings.Join(m.Formats, ","), strings.Join(m.Models, ","), m.Steer, m.MaxStates, m.Qemu, m.Covered)
		io.WriteString(c.stdout, b.String())
		printSoakSummary(c.stdout, "merged", m)
	}
	if len(m.Failures) > 0 {
		return 1
	}
	return 0
}

// caseSource gives soak its cases: case j of the shard, with global
// index k. done reports case j's coverage once it has run.
type caseSource interface {
	caseAt(j int64, k uint64) harness.Case
	done(j int64, cov *harness.Coverage)
}

// plainSource draws case k from its seed alone.
type plainSource struct {
	seed uint64
	sp   harness.Space
}

func (p plainSource) caseAt(_ int64, k uint64) harness.Case {
	return harness.Generate(harness.CaseSeed(p.seed, k), p.sp)
}
func (plainSource) done(int64, *harness.Coverage) {}

// newCaseSource returns soak's case source: steered with --steer.
func newCaseSource(o soakOptions, sp harness.Space) caseSource {
	if o.steer {
		return newSteerSource(o.seed, o.shard, sp)
	}
	return plainSource{o.seed, sp}
}
