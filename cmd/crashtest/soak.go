package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/harness"
	"golang.org/x/sys/unix"
)

func init() {
	register(&command{
		name:    "soak",
		args:    "[--duration D] [--cases N] [--workers N] [--seed S] [--shard i/n] [--formats v1,v2,v3] [--models M,...] [--target T] [--errors] [--steer] [--max-states N] [--fs mem|os:DIR] [--out DIR] [--summary FILE] [--json] [-v]",
		summary: "Run random crash-consistency cases until the duration ends, N cases ran or Ctrl-C; shrink every failure, print a summary, the coverage table (event × fault × outcome) and a repro command per failure; exit 1 if any case failed.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			var o soakOptions
			fs.DurationVar(&o.duration, "duration", 30*time.Second, "stop starting new cases after `D` (0: no time limit; then stop with --cases or Ctrl-C)")
			fs.IntVar(&o.cases, "cases", 0, "stop after `N` cases (0: no limit)")
			fs.IntVar(&o.workers, "workers", runtime.GOMAXPROCS(0), "run `N` cases in parallel")
			fs.Var(seedFlag{&o.seed}, "seed", "root `SEED` (decimal or 0x hex); 0 picks one and prints it")
			fs.Var(&o.shard, "shard", "run shard `i/n` of the seed space: case k runs when k mod n = i")
			fs.Var(listFlag{&o.formats, harness.Formats}, "formats", "comma-separated `FORMATS` to draw from: v1, v2, v3")
			fs.Var(modelsFlag{&o.models}, "models", "comma-separated persistence `MODELS`: process, lose-unsynced, reorder, torn, prefix, garbage (default all but garbage)")
			fs.Var(listFlag{&o.target, harness.Targets}, "target", "writer under `TARGET`: qcow (default), qcow-nobarrier (deliberately broken: drops every sync) or another registered target ("+strings.Join(harness.Targets, ", ")+")")
			fs.BoolVar(&o.errors, "errors", false, "give every case a seeded fault plan (EIO, ENOSPC, short and torn writes, fsync-drop, crash) and judge the errors verdict too")
			fs.Var(&o.fs, "fs", "run the cases over `mem` (default) or real files through vfs.OS in temporary directories under DIR (os:DIR)")
			fs.BoolVar(&o.steer, "steer", false, "bias case generation toward coverage cells (event × fault × outcome) not yet covered: each case is the most promising of several drawn from its seed, judged by the coverage of the cases before it (deterministic from --seed and --shard whatever --workers; every case still reproduces by its ID)")
			fs.StringVar(&o.summary, "summary", "", "also write the summary as JSON (as --json prints it, with the coverage) to `FILE`, for crashtest merge")
			fs.IntVar(&o.maxStates, "max-states", -1, maxStatesUsage)
			fs.StringVar(&o.out, "out", "", "write every failure, shrunk, as a corpus entry (NAME.json) and a short report (NAME.txt) into `DIR`")
			fs.IntVar(&o.shrinkRuns, "shrink-runs", 200, "shrink each failure with at most `N` candidate runs (0: do not shrink)")
			fs.DurationVar(&o.progress, "progress", 5*time.Second, "on a terminal, a live progress line; otherwise print a progress line to stderr every `D` (0: never)")
			asJSON := jsonFlags(fs)
			fs.BoolVar(&o.verbose, "v", false, "print every finished case to stderr")
			return func(c *cli, args []string) int {
				if len(args) > 0 {
					return c.usageError(commands["soak"], "unexpected argument %q", args[0])
				}
				if o.workers < 1 {
					return c.usageError(commands["soak"], "--workers %d: want at least 1", o.workers)
				}
				if o.cases < 0 || o.duration < 0 {
					return c.usageError(commands["soak"], "--cases and --duration must not be negative")
				}
				if o.maxStates < -1 {
					return c.usageError(commands["soak"], "--max-states %d: want -1 (no limit), 0 (ordering rules only) or a positive limit", o.maxStates)
				}
				if len(o.target) > 1 {
					return c.usageError(commands["soak"], "--target takes one target")
				}
				o.json = *asJSON
				ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
				defer stop()
				return c.soak(ctx, o)
			}
		},
	})
}

// soakOptions are the flags of soak.
type soakOptions struct {
	duration, progress time.Duration
	cases, workers     int
	maxStates          int // --max-states: -1 no limit, 0 no crash states
	seed               uint64
	shard              shardFlag
	formats, target    []string
	models             []faultfs.Model
	json, verbose      bool
	errors, steer      bool
	fs                 fsFlag
	out, summary       string
	shrinkRuns         int
}

// soakFailure is one failing case in the summary.
type soakFailure struct {
	Index   uint64           `json:"index"`
	ID      string           `json:"id"`
	Repro   string           `json:"repro"`
	Failure *harness.Failure `json:"failure"`
	// Ops is the failing case's op count; ShrunkID, ShrunkOps and
	// ShrunkRepro describe the shrunk case (empty when shrinking was off
	// or found nothing smaller that fails the same way).
	Ops         int    `json:"ops"`
	ShrunkID    string `json:"shrunk_id,omitempty"`
	ShrunkOps   int    `json:"shrunk_ops,omitempty"`
	ShrunkRepro string `json:"shrunk_repro,omitempty"`
	// Entry is the corpus entry written to --out.
	Entry string `json:"entry,omitempty"`
	// Why is the target's explanation of the failure (harness.Explain),
	// empty when it has none.
	Why string `json:"why,omitempty"`
}

// soakSummary is what soak prints at the end (--json: as JSON).
type soakSummary struct {
	Seed           string        `json:"seed"`
	Shard          string        `json:"shard"`
	Target         string        `json:"target"`
	Errors         bool          `json:"errors"`
	FS             string        `json:"fs"`
	Cases          int64         `json:"cases"`
	Points         int64         `json:"points"`
	States         int64         `json:"states"`
	ElapsedSeconds float64       `json:"elapsed_seconds"`
	StatesPerSec   float64       `json:"states_per_second"`
	Interrupted    bool          `json:"interrupted"`
	Failures       []soakFailure `json:"failures"`
	// The settings and coverage of the run, for crashtest merge (see
	// merge.go).
	summaryExtra
}

func (c *cli) soak(ctx context.Context, o soakOptions) int {
	if o.seed == 0 {
		o.seed = rand.Uint64() | 1
	}
	if o.shard.n == 0 {
		o.shard = shardFlag{0, 1}
	}
	sp := harness.Space{Formats: o.formats, Models: o.models, Errors: o.errors}
	// Cases on qemu-made snapshot images only where qemu can make them
	// (their IDs say so, so a repro elsewhere reports the missing qemu).
	_, errImg := exec.LookPath("qemu-img")
	_, errIO := exec.LookPath("qemu-io")
	sp.Qemu = errImg == nil && errIO == nil
	if len(o.target) == 1 {
		sp.Target = o.target[0]
	}
	if sp.Target == "" {
		sp.Target = harness.TargetQCOW
	}
	seedStr := fmt.Sprintf("%#x", o.seed)
	if !o.json {
		fmt.Fprintf(c.stdout, "soak: seed=%s shard=%s workers=%d duration=%v target=%s errors=%v fs=%s\n", seedStr, &o.shard, o.workers, o.duration, sp.Target, o.errors, &o.fs)
	}
	if o.out != "" {
		if err := os.MkdirAll(o.out, 0o755); err != nil {
			return c.fail("soak: --out: %v", err)
		}
	}
	runOpts := statesOptions(harness.Options{Dir: o.fs.dir}, o.maxStates)
	runCtx := ctx
	if o.duration > 0 {
		var cancel context.CancelFunc
		runCtx, cancel = context.WithTimeout(ctx, o.duration)
		defer cancel()
	}
	start := time.Now()
	// Shrinking goes on after the duration for a grace period (a tenth of
	// the duration, at least 5 s) so failures found late are shrunk too;
	// Ctrl-C stops it at once.
	shrinkStop := func() bool { return ctx.Err() != nil }
	if o.duration > 0 {
		end := start.Add(o.duration + max(o.duration/10, 5*time.Second))
		shrinkStop = func() bool { return ctx.Err() != nil || time.Now().After(end) }
	}
	var next, cases, points, states, nfail atomic.Int64
	var mu sync.Mutex // guards failures and stderr
	var failures []soakFailure
	cov := &harness.Coverage{}
	src := newCaseSource(o, sp)
	var wg sync.WaitGroup
	for range o.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for runCtx.Err() == nil {
				j := next.Add(1) - 1
				if o.cases > 0 && j >= int64(o.cases) {
					return
				}
				k := o.shard.i + uint64(j)*o.shard.n
				cs := src.caseAt(j, k)
				v := harness.RunWith(cs, runOpts)
				src.done(j, v.Coverage)
				cases.Add(1)
				points.Add(int64(v.Points))
				states.Add(int64(v.States))
				var sf soakFailure
				if !v.OK {
					nfail.Add(1)
					sf = c.soakFailed(k, cs, v, o, runOpts, shrinkStop)
				}
				mu.Lock()
				cov.Merge(v.Coverage)
				if !v.OK {
					failures = append(failures, sf)
				}
				if o.verbose {
					res := "ok"
					if !v.OK {
						res = "FAIL " + v.Failure.Kind
					}
					fmt.Fprintf(c.stderr, "case %d: %s %s points=%d states=%d\n", k, cs.ID(), res, v.Points, v.States)
				}
				mu.Unlock()
			}
		}()
	}
	done := make(chan struct{})
	var pwg sync.WaitGroup
	live := isTerminal(c.stderr)
	if o.progress > 0 {
		every := o.progress
		if live {
			every = 500 * time.Millisecond
		}
		pwg.Add(1)
		go func() {
			defer pwg.Done()
			t := time.NewTicker(every)
			defer t.Stop()
			for {
				select {
				case <-done:
					if live {
						mu.Lock()
						io.WriteString(c.stderr, "\r\033[K")
						mu.Unlock()
					}
					return
				case <-t.C:
				}
				el := time.Since(start)
				left := "no time limit"
				if o.duration > 0 {
					left = fmt.Sprintf("%v left", max(0, o.duration-el).Round(time.Second))
				}
				line := fmt.Sprintf("soak: %d cases, %d states, %.0f states/s, %d failures, %s",
					cases.Load(), states.Load(), float64(states.Load())/el.Seconds(), nfail.Load(), left)
				mu.Lock()
				if live {
					fmt.Fprintf(c.stderr, "\r\033[K%s", line)
				} else {
					fmt.Fprintln(c.stderr, line)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	close(done)
	pwg.Wait()
	el := time.Since(start)
	slices.SortFunc(failures, byIndex)
	sum := soakSummary{
		Seed: seedStr, Shard: o.shard.String(), Target: sp.Target, Errors: o.errors, FS: o.fs.String(),
		Cases: cases.Load(), Points: points.Load(), States: states.Load(),
		ElapsedSeconds: el.Seconds(), StatesPerSec: float64(states.Load()) / el.Seconds(),
		Interrupted: ctx.Err() != nil, Failures: failures,
	}
	if sum.Failures == nil {
		sum.Failures = []soakFailure{}
	}
	sum.summaryExtra = soakExtra(o, sp, sum.Cases, cov)
	if o.summary != "" {
		if err := writeSummary(o.summary, sum); err != nil {
			return c.fail("soak: --summary: %v", err)
		}
	}
	if o.json {
		b, err := json.MarshalIndent(sum, "", "  ")
		if err != nil {
			return c.fail("soak: %v", err)
		}
		c.stdout.Write(append(b, '\n'))
	} else {
		printSoakSummary(c.stdout, "soak", sum)
	}
	if len(failures) > 0 {
		return 1
	}
	return 0
}

// printSoakSummary prints the summary of a soak run (or, with cmd
// "merged", of crashtest merge) with its coverage table.
func printSoakSummary(w io.Writer, cmd string, s soakSummary) {
	var b strings.Builder
	if s.Interrupted {
		fmt.Fprintf(&b, "%s: interrupted; finished the cases in flight\n", cmd)
	}
	fmt.Fprintf(&b, "%s summary: seed=%s shard=%s target=%s cases=%d points=%d states=%d elapsed=%.1fs states/s=%.0f failures=%d\n",
		cmd, s.Seed, s.Shard, s.Target, s.Cases, s.Points, s.States, s.ElapsedSeconds, s.StatesPerSec, len(s.Failures))
	for _, f := range s.Failures {
		fmt.Fprintf(&b, "FAIL case %d: %s\n  %s\n  repro: %s\n", f.Index, f.ID, printable(f.Failure.String()), f.Repro)
		if f.ShrunkID != "" {
			fmt.Fprintf(&b, "  shrunk from %d to %d ops: %s\n", f.Ops, f.ShrunkOps, f.ShrunkRepro)
		}
		if f.Entry != "" {
			fmt.Fprintf(&b, "  corpus entry: %s\n", f.Entry)
		}
		if f.Why != "" {
			fmt.Fprintf(&b, "  why: %s\n", printable(f.Why))
		}
	}
	printCoverage(&b, s.Coverage)
	io.WriteString(w, b.String())
}

// seedFlag is a uint64 in decimal or 0x hex.
type seedFlag struct{ p *uint64 }

func (s seedFlag) String() string {
	if s.p == nil || *s.p == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", *s.p)
}

func (s seedFlag) Set(v string) error {
	n, err := strconv.ParseUint(v, 0, 64)
	if err != nil {
		return fmt.Errorf("seed %q: want a decimal or 0x hex integer", v)
	}
	*s.p = n
	return nil
}

// shardFlag is i/n with 0 <= i < n.
type shardFlag struct{ i, n uint64 }

func (s *shardFlag) String() string {
	if s.n == 0 {
		return "0/1"
	}
	return fmt.Sprintf("%d/%d", s.i, s.n)
}

func (s *shardFlag) Set(v string) error {
	a, b, ok := strings.Cut(v, "/")
	i, err1 := strconv.ParseUint(a, 10, 64)
	n, err2 := strconv.ParseUint(b, 10, 64)
	if !ok || err1 != nil || err2 != nil || n == 0 || i >= n {
		return fmt.Errorf("shard %q: want i/n with 0 <= i < n", v)
	}
	s.i, s.n = i, n
	return nil
}

// listFlag is a comma-separated list of names from allowed.
type listFlag struct {
	p       *[]string
	allowed []string
}

func (l listFlag) String() string {
	if l.p == nil {
		return ""
	}
	return strings.Join(*l.p, ",")
}

func (l listFlag) Set(v string) error {
	var out []string
	for _, s := range strings.Split(v, ",") {
		if !slices.Contains(l.allowed, s) {
			return fmt.Errorf("unknown %q (want %s)", s, strings.Join(l.allowed, ", "))
		}
		if !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	*l.p = out
	return nil
}

// modelsFlag is a comma-separated list of persistence models.
type modelsFlag struct{ p *[]faultfs.Model }

func (m modelsFlag) String() string {
	if m.p == nil {
		return ""
	}
	var s []string
	for _, x := range *m.p {
		s = append(s, x.String())
	}
	return strings.Join(s, ",")
}

func (m modelsFlag) Set(v string) error {
	var out []faultfs.Model
	for _, s := range strings.Split(v, ",") {
		x, err := faultfs.ParseModel(s)
		if err != nil {
			return err
		}
		if !slices.Contains(out, x) {
			out = append(out, x)
		}
	}
	*m.p = out
	return nil
}

// soakFailed shrinks a failing case (unless --shrink-runs 0), writes it to
// --out as a corpus entry with a short text report, and returns its
// summary line.
func (c *cli) soakFailed(k uint64, cs harness.Case, v harness.Verdict, o soakOptions, opts harness.Options, stop func() bool) soakFailure {
	sf := soakFailure{Index: k, ID: cs.ID(), Repro: "crashtest repro " + cs.ID(), Failure: v.Failure, Ops: cs.Ops, Why: harness.Explain(v)}
	if o.fs.dir != "" {
		sf.Repro += " --fs " + o.fs.String()
	}
	if o.maxStates >= 0 {
		sf.Repro += fmt.Sprintf(" --max-states %d", o.maxStates)
	}
	best, bv := cs, v
	if o.shrinkRuns > 0 {
		res, err := harness.Shrink(cs, harness.ShrinkOptions{
			MaxRuns: o.shrinkRuns,
			Run:     func(x harness.Case) harness.Verdict { return harness.RunWith(x, opts) },
			Stop:    stop,
		})
		if err == nil && res.After < res.Before {
			best, bv = res.Case, res.Verdict
			sf.ShrunkID, sf.ShrunkOps = best.ID(), res.After
			sf.ShrunkRepro = "crashtest repro " + best.ID()
			if o.maxStates >= 0 {
				sf.ShrunkRepro += fmt.Sprintf(" --max-states %d", o.maxStates)
			}
		}
	}
	if o.out == "" {
		return sf
	}
	// Corpus entries are traces, whether or not shrinking got anywhere.
	best = best.AsTrace()
	why := harness.Explain(bv)
	e := harness.Entry{
		Name:   entryName(cs, v),
		Case:   best,
		Expect: bv.Failure.Kind,
		Explanation: fmt.Sprintf("Found by crashtest soak (case %d, %s; %d ops, shrunk to %d): %s. Expected to fail until the target is fixed; then set expect to \"pass\".",
			k, cs.ID(), cs.Ops, best.Ops, verdictLine(bv)),
	}
	if why != "" {
		e.Explanation += " Why: " + why
	}
	path, err := harness.SaveEntry(o.out, e)
	if err != nil {
		fmt.Fprintf(c.stderr, "crashtest: soak: --out: %s\n", oneLine(err.Error()))
		return sf
	}
	sf.Entry = path
	var rep strings.Builder
	fmt.Fprintf(&rep, "case %d of the soak: %s\nfailure: %s\n", k, cs.ID(), verdictLine(v))
	if bv.Failure.Mismatch != "" {
		fmt.Fprintf(&rep, "sector %d (offset %d): %s\n", bv.Failure.Sector, bv.Failure.Sector*512, bv.Failure.Mismatch)
	}
	fmt.Fprintf(&rep, "repro: %s\n", sf.Repro)
	if sf.ShrunkID != "" {
		fmt.Fprintf(&rep, "shrunk from %d to %d ops: %s\n", cs.Ops, best.Ops, sf.ShrunkRepro)
	}
	fmt.Fprintf(&rep, "corpus entry: %s (crashtest repro -v %s)\n", path, path)
	if why != "" {
		fmt.Fprintf(&rep, "why: %s\n", why)
	}
	if err := os.WriteFile(strings.TrimSuffix(path, ".json")+".txt", []byte(rep.String()), 0o644); err != nil {
		fmt.Fprintf(c.stderr, "crashtest: soak: --out: %s\n", oneLine(err.Error()))
	}
	return sf
}

// fsFlag is --fs: "mem" or "os:DIR".
type fsFlag struct{ dir string }

func (f *fsFlag) String() string {
	if f.dir == "" {
		return "mem"
	}
	return "os:" + f.dir
}

func (f *fsFlag) Set(v string) error {
	switch {
	case v == "mem":
		f.dir = ""
	case strings.HasPrefix(v, "os:") && len(v) > 3:
		st, err := os.Stat(v[3:])
		if err != nil {
			return err
		}
		if !st.IsDir() {
			return fmt.Errorf("%s is not a directory", v[3:])
		}
		f.dir = v[3:]
	default:
		return fmt.Errorf("fs %q: want mem or os:DIR", v)
	}
	return nil
}

// isTerminal reports whether w is a terminal (a live progress line can
// be redrawn on it).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// maxStatesUsage is the help of soak's and repro's --max-states.
const maxStatesUsage = "check at most `N` crash states per case (-1: no limit; 0: none, only the ordering rules, which judge the op log itself)"

// statesOptions sets o's crash-state limit from --max-states n.
func statesOptions(o harness.Options, n int) harness.Options {
	switch {
	case n == 0:
		o.NoStates = true
	case n > 0:
		o.MaxStates = n
	}
	return o
}

// byIndex orders failures by their case index.
func byIndex(a, b soakFailure) int { return cmp.Compare(a.Index, b.Index) }
