package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/harness"
)

func init() {
	register(&command{
		name:    "explore",
		args:    "[--format v3] [--workload FILE|--seed S] [--model torn] [--max-states N] [--states-per-point N] [--target T] [--export DIR] [--fs mem|os:DIR] [--json] [-v] | --events [--target T] [--event-workloads LIST] [--quick] [--json] [-v]",
		summary: "Enumerate the crash states of one workload exhaustively (up to --states-per-point per crash point), with counts per crash point, every failure and the coverage table (event × fault × outcome); exit 1 if any state failed. With --events, run qemu iotest 026's matrix instead: every writer event × {eio, enospc, short, crash} × {once, always} × {write-back, write-through} on 026's workloads and ours, and print the outcome table; exit 1 if any cell is corruption, lost flushed data or a swallowed error.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			var o exploreOptions
			fs.StringVar(&o.format, "format", "v3", "image `FORMAT` for --seed or an ops file: v1, v2 or v3")
			fs.StringVar(&o.workload, "workload", "", "the workload: a corpus entry or case JSON `FILE`, or a text file of ops (one per line: write OFF LEN [PATTERN], zero OFF LEN, flush; # comments)")
			fs.Var(seedFlag{&o.seed}, "seed", "draw the workload from case `SEED` (as soak does) instead of --workload; 0 or neither picks one (printed in the case ID)")
			fs.StringVar(&o.model, "model", "torn", "persistence `MODEL`: process, lose-unsynced, reorder, torn, prefix, garbage")
			fs.IntVar(&o.maxStates, "max-states", 0, "stop after `N` crash states in all (0: no limit)")
			fs.IntVar(&o.spp, "states-per-point", harness.MaxStatesPerPoint, "enumerate every crash state of a point when it has at most `N`, else a seeded sample of N")
			fs.StringVar(&o.target, "target", harness.TargetQCOW, "writer under `TARGET`")
			fs.Int64Var(&o.clusterSize, "cluster-size", 4096, "cluster size in `BYTES` for an ops file")
			fs.Int64Var(&o.size, "size", 256<<10, "virtual disk size in `BYTES` for an ops file")
			fs.StringVar(&o.export, "export", "", "write every checked crash state as an image file into `DIR` (p<point>-s<state>.qcow|.qcow2, the backing file beside them, p<point>.expected.raw)")
			fs.Var(&o.fs, "fs", "run over `mem` (default) or real files in a temporary directory under DIR (os:DIR)")
			fs.BoolVar(&o.verbose, "v", false, "print every crash state checked (with --events: every cell as it is run)")
			fs.BoolVar(&o.events, "events", false, "run the event matrix (qemu iotest 026's error path tests) on the event workloads instead of one workload; see docs/events.md")
			fs.StringVar(&o.eventWorkloads, "event-workloads", "", "with --events: run only these comma-separated `WORKLOADS` (026-write, 026-l2_update, 026-l2_load, 026-refblock, 026-reftable, 026-l1_grow, cow, zero, v2, rollback)")
			fs.BoolVar(&o.quick, "quick", false, "with --events: once only, write-back only (a quarter of the cells)")
			asJSON := jsonFlags(fs)
			return func(c *cli, args []string) int {
				if len(args) > 0 {
					return c.usageError(commands["explore"], "unexpected argument %q", args[0])
				}
				set := map[string]bool{}
				fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
				o.json = *asJSON
				if o.events {
					for _, f := range []string{"workload", "seed", "format", "model", "max-states", "states-per-point", "export", "fs", "cluster-size", "size"} {
						if set[f] {
							return c.usageError(commands["explore"], "--events runs its own workloads: --%s does not apply", f)
						}
					}
					return c.exploreEvents(o)
				}
				if set["event-workloads"] || set["quick"] {
					return c.usageError(commands["explore"], "--event-workloads and --quick go with --events")
				}
				if set["workload"] && set["seed"] {
					return c.usageError(commands["explore"], "give one of --workload FILE and --seed S, not both")
				}
				if !set["workload"] && (!set["seed"] || o.seed == 0) {
					o.seed, set["seed"] = rand.Uint64()|1, true // printed in the case ID
				}
				if o.spp < 1 || o.spp > harness.MaxStatesPerPoint || o.maxStates < 0 {
					return c.usageError(commands["explore"], "--states-per-point wants 1..%d and --max-states at least 0", harness.MaxStatesPerPoint)
				}
				cs, err := o.buildCase(set)
				if err != nil {
					return c.fail("explore: %v", err)
				}
				return c.explore(cs, o)
			}
		},
	})
}

// exploreOptions are the flags of explore.
type exploreOptions struct {
	format, workload, model, target, export string
	seed                                    uint64
	maxStates, spp                          int
	clusterSize, size                       int64
	fs                                      fsFlag
	json, verbose                           bool
	events, quick                           bool
	eventWorkloads                          string
}

// buildCase makes the case to explore from the flags; set holds the flags
// given on the command line, which override a case file's values.
func (o exploreOptions) buildCase(set map[string]bool) (harness.Case, error) {
	m, err := faultfs.ParseModel(o.model)
	if err != nil {
		return harness.Case{}, err
	}
	var cs harness.Case
	switch {
	case set["seed"]:
		cs = harness.Generate(o.seed, harness.Space{Formats: []string{o.format}, Models: []faultfs.Model{m}, Target: o.target})
	default:
		b, err := os.ReadFile(o.workload)
		if err != nil {
			return cs, err
		}
		if t := bytes.TrimSpace(b); len(t) > 0 && t[0] == '{' {
			e, err := loadCaseArg(o.workload)
			if err != nil {
				return cs, err
			}
			cs = e.Case
			if set["format"] {
				cs.Format = o.format
			}
		} else {
			ops, err := parseOpsText(string(b))
			if err != nil {
				return cs, fmt.Errorf("%s: %w", o.workload, err)
			}
			cs = harness.Case{Format: o.format, ClusterSize: o.clusterSize, Size: o.size, Target: o.target, Seed: 1}.WithTrace(ops)
		}
		if set["model"] || cs.Model == 0 && !strings.Contains(string(b), `"model"`) {
			cs.Model = m
		}
		if set["target"] {
			cs.Target = o.target
		}
	}
	cs.StatesPerPoint = o.spp
	return cs, cs.Validate()
}

// parseOpsText reads a workload written one op per line: "write OFF LEN
// [PATTERN]", "zero OFF LEN" or "flush"; numbers in decimal or 0x hex;
// blank lines and # comments are ignored. A write's pattern defaults to
// its line number.
func parseOpsText(s string) ([]harness.Op, error) {
	var ops []harness.Op
	sc := bufio.NewScanner(strings.NewReader(s))
	for line := 1; sc.Scan(); line++ {
		text, _, _ := strings.Cut(sc.Text(), "#")
		f := strings.Fields(text)
		if len(f) == 0 {
			continue
		}
		bad := fmt.Errorf("line %d: %q: want write OFF LEN [PATTERN], zero OFF LEN or flush", line, strings.TrimSpace(text))
		var nums []uint64
		for _, x := range f[1:] {
			var n uint64
			if _, err := fmt.Sscan(x, &n); err != nil {
				var err2 error
				if n, err2 = parseUint(x); err2 != nil {
					return nil, bad
				}
			}
			nums = append(nums, n)
		}
		switch {
		case f[0] == "flush" && len(nums) == 0:
			ops = append(ops, harness.Op{Kind: harness.OpFlush})
		case f[0] == "zero" && len(nums) == 2:
			ops = append(ops, harness.Op{Kind: harness.OpZero, Off: int64(nums[0]), Len: int64(nums[1])})
		case f[0] == "write" && (len(nums) == 2 || len(nums) == 3):
			pat := uint64(line)
			if len(nums) == 3 {
				pat = nums[2]
			}
			ops = append(ops, harness.Op{Kind: harness.OpWrite, Off: int64(nums[0]), Len: int64(nums[1]), Pattern: pat})
		default:
			return nil, bad
		}
		if o := ops[len(ops)-1]; o.Kind != harness.OpFlush && (o.Off < 0 || o.Len < 1) {
			return nil, bad
		}
	}
	return ops, sc.Err()
}

// parseUint parses a decimal or 0x hex uint64.
func parseUint(s string) (uint64, error) {
	var v uint64
	var p seedFlag = seedFlag{&v}
	err := p.Set(s)
	return v, err
}

// exploreOutput is explore's --json output.
type exploreOutput struct {
	ID string `json:"id"`
	*harness.Exploration
}

func (c *cli) explore(cs harness.Case, o exploreOptions) int {
	var b strings.Builder
	eo := harness.ExploreOptions{Options: harness.Options{Dir: o.fs.dir}, MaxStates: o.maxStates, Export: o.export}
	if o.verbose && !o.json {
		eo.Visit = func(r harness.StateResult) {
			res := "ok"
			if r.Failure != nil {
				res = "FAIL " + printable(r.Failure.Kind+": "+r.Failure.Detail)
			}
			fmt.Fprintf(c.stderr, "point %d (op %d) state %d/%016x %s %s\n", r.Point, r.Op, r.Index, r.Key, r.Image, res)
		}
	}
	ex, err := harness.Explore(cs, eo)
	if err != nil {
		return c.fail("explore: %v", err)
	}
	code := 0
	if !ex.Verdict.OK {
		code = 1
	}
	if o.json {
		js, err := json.MarshalIndent(exploreOutput{ID: cs.ID(), Exploration: ex}, "", "  ")
		if err != nil {
			return c.fail("explore: %v", err)
		}
		c.stdout.Write(append(js, '\n'))
		return code
	}
	v := ex.Verdict
	fmt.Fprintf(&b, "case: %s\n", cs.ID())
	fmt.Fprintf(&b, "workload: %d ops, %d file operations; model %s, up to %d states per point\n", cs.Ops+1, v.FileOps, cs.Model, cs.StatesPerPoint)
	fmt.Fprintf(&b, "%8s %6s %8s %8s\n", "point", "op", "states", "failures")
	for _, p := range ex.Points {
		fmt.Fprintf(&b, "%8d %6d %8d %8d\n", p.Point, p.Op, p.States, p.Failures)
	}
	trunc := ""
	if ex.Truncated {
		trunc = fmt.Sprintf(" (stopped at --max-states %d)", o.maxStates)
	}
	fmt.Fprintf(&b, "explore summary: points=%d states=%d failures=%d%s\n", v.Points, v.States, len(ex.Failures), trunc)
	if o.export != "" {
		fmt.Fprintf(&b, "exported %d crash-state images to %s\n", ex.Exported, o.export)
	}
	const maxShown = 20
	for i, f := range ex.Failures {
		if i == maxShown {
			fmt.Fprintf(&b, "... %d more failures (--json lists them all)\n", len(ex.Failures)-i)
			break
		}
		fmt.Fprintf(&b, "FAIL %s\n", printable(f.String()))
		if f.Mismatch != "" {
			fmt.Fprintf(&b, "  sector %d (offset %d): %s\n", f.Sector, f.Sector*512, f.Mismatch)
		}
	}
	if len(ex.Failures) > 0 {
		fmt.Fprintf(&b, "repro: crashtest repro -v %s\n", cs.ID())
	}
	printCoverage(&b, ex.Verdict.Coverage)
	c.stdout.Write([]byte(b.String()))
	return code
}

// eventsOutput is explore --events' JSON output.
type eventsOutput struct {
	Target    string                  `json:"target"`
	Workloads []harness.EventWorkload `json:"workloads"`
	Rows      []harness.EventRow      `json:"rows"`
	Summary   map[string]int          `json:"summary"`
	Bad       int                     `json:"bad"`
}

// exploreEvents runs the event matrix and prints its table.
func (c *cli) exploreEvents(o exploreOptions) int {
	mo := harness.EventMatrixOptions{Target: o.target, OnceOnly: o.quick, WriteBackOnly: o.quick}
	all := harness.EventWorkloads()
	if o.eventWorkloads != "" {
		for _, name := range strings.Split(o.eventWorkloads, ",") {
			if !slices.ContainsFunc(all, func(w harness.EventWorkload) bool { return w.Name == name }) {
				return c.fail("explore: unknown event workload %q", name)
			}
			mo.Workloads = append(mo.Workloads, name)
		}
	}
	if o.verbose {
		mo.Progress = func(r harness.EventRow) {
			if r.Plan != "" {
				fmt.Fprintf(c.stderr, "%s %s %s wt=%v: %s\n", r.Workload, r.Event, r.Plan, r.WriteThrough, r.Outcome)
			}
		}
	}
	rows, err := harness.EventMatrix(mo)
	if err != nil {
		return c.fail("explore: %v", err)
	}
	out := eventsOutput{Target: o.target, Rows: rows, Summary: map[string]int{}}
	for _, w := range all {
		if mo.Workloads == nil || slices.Contains(mo.Workloads, w.Name) {
			out.Workloads = append(out.Workloads, w)
		}
	}
	for _, r := range rows {
		out.Summary[r.Outcome]++
		if harness.EventBad(r.Outcome) {
			out.Bad++
		}
	}
	code := 0
	if out.Bad > 0 {
		code = 1
	}
	if o.json {
		js, err := json.MarshalIndent(out, "", "  ")
		if err != nil {
			return c.fail("explore: %v", err)
		}
		c.stdout.Write(append(js, '\n'))
		return code
	}
	var b strings.Builder
	printEventTable(&b, out, !o.quick)
	c.stdout.Write([]byte(b.String()))
	return code
}

// eventAbbrev is how the table writes each outcome.
var eventAbbrev = map[string]string{
	harness.OutcomeCorruption: "CORRUPT", harness.OutcomeLostFlushed: "LOST", harness.OutcomeErrorSwallowed: "SWALLOWED",
	harness.OutcomeLeaks: "leaks", harness.OutcomeErrorReturned: "error", harness.OutcomeClean: "clean",
	harness.OutcomeNotReached: "-", harness.OutcomeNotApplicable: "n/a",
}

// printEventTable writes the event matrix in the manner of qemu's 026.out,
// one line per workload, event and fault with a column per once/always ×
// write-back/write-through, the events a workload never issues on one
// line, then the counts and the bad cells with their repro IDs.
func printEventTable(b *strings.Builder, out eventsOutput, full bool) {
	fmt.Fprintf(b, "event matrix (qemu iotest 026): target %s, %d workloads, %d cells\n", out.Target, len(out.Workloads), len(out.Rows))
	fmt.Fprintf(b, "outcomes: error = the call returned the injected error, image clean; leaks = leaked clusters only; clean = no error, image clean;\n")
	fmt.Fprintf(b, "  CORRUPT / LOST (flushed data) / SWALLOWED (error) are bugs; - = the workload never issues the event; n/a = a short write inside the file\n")
	cols := []string{"once/wb"}
	if full {
		cols = []string{"once/wb", "once/wt", "always/wb", "always/wt"}
	}
	col := func(r harness.EventRow) string {
		s := "once/"
		if r.Always {
			s = "always/"
		}
		if r.WriteThrough {
			return s + "wt"
		}
		return s + "wb"
	}
	for _, w := range out.Workloads {
		fmt.Fprintf(b, "\nworkload %s: %s\n", w.Name, w.Note)
		fmt.Fprintf(b, "  %-28s %-6s", "event", "fault")
		for _, c := range cols {
			fmt.Fprintf(b, " %-9s", c)
		}
		b.WriteString("\n")
		type key struct{ event, fault string }
		cells := map[key]map[string]string{}
		var keys []key
		reached := map[string]bool{}
		var events []string
		for _, r := range out.Rows {
			if r.Workload != w.Name {
				continue
			}
			if !slices.Contains(events, r.Event) {
				events = append(events, r.Event)
			}
			k := key{r.Event, r.Fault}
			if cells[k] == nil {
				cells[k] = map[string]string{}
				keys = append(keys, k)
			}
			cells[k][col(r)] = eventAbbrev[r.Outcome]
			if r.Outcome != harness.OutcomeNotReached {
				reached[r.Event] = true
			}
		}
		var unreached []string
		for _, e := range events {
			if !reached[e] {
				unreached = append(unreached, e)
			}
		}
		for _, k := range keys {
			if !reached[k.event] {
				continue
			}
			fmt.Fprintf(b, "  %-28s %-6s", k.event, k.fault)
			for _, c := range cols {
				fmt.Fprintf(b, " %-9s", cells[k][c])
			}
			b.WriteString("\n")
		}
		if len(unreached) > 0 {
			fmt.Fprintf(b, "  not reached: %s\n", strings.Join(unreached, " "))
		}
	}
	fmt.Fprintf(b, "\nevents summary:")
	for _, oc := range harness.EventOutcomes {
		fmt.Fprintf(b, " %s=%d", oc, out.Summary[oc])
	}
	fmt.Fprintf(b, " bad=%d\n", out.Bad)
	for _, r := range out.Rows {
		if harness.EventBad(r.Outcome) {
			fmt.Fprintf(b, "%s %s %s %s: %s\n  repro: crashtest repro -v %s\n", strings.ToUpper(r.Outcome), r.Workload, r.Event, col(r), printable(r.Detail), r.ID)
		}
	}
}
