package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/qcowcrash/qcowcrash/harness"
)

func init() {
	register(&command{
		name:    "repro",
		args:    "[-v] [--json] [--shrink] [--save DIR] [--export DIR] [--max-states N] [--fs mem|os:DIR] CASE-ID|FILE",
		summary: "Rerun one crash-consistency case (an ID printed by soak, or a corpus entry or case JSON file) bit for bit and print its verdict; exit 0 if it passes, 1 if it fails.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			var o reproOptions
			fs.BoolVar(&o.verbose, "v", false, "also print the workload ops with the file operations each made, the file operations around the crash point, which pending writes the crash state kept, the checker's findings and the first differing sectors")
			fs.BoolVar(&o.shrink, "shrink", false, "shrink a failing case to a small trace case that fails the same way, and report that one")
			fs.StringVar(&o.save, "save", "", "write the (shrunk) case, as a trace case, as a corpus entry `DIR`/NAME.json expecting its verdict (e.g. --save corpora/qcow)")
			fs.StringVar(&o.name, "name", "", "corpus entry `NAME` for --save (default: from the file, or TARGET-KIND-SEED)")
			fs.StringVar(&o.export, "export", "", "write every checked crash state (up to the failure) as image files into `DIR`, with the model's expected raw image")
			fs.Var(&o.fs, "fs", "run over `mem` (default) or real files in a temporary directory under DIR (os:DIR)")
			fs.IntVar(&o.maxStates, "max-states", -1, maxStatesUsage)
			asJSON := jsonFlags(fs)
			return func(c *cli, args []string) int {
				if len(args) != 1 {
					return c.usageError(commands["repro"], "want exactly one CASE-ID or FILE, got %d arguments", len(args))
				}
				if o.maxStates < -1 {
					return c.usageError(commands["repro"], "--max-states %d: want -1 (no limit), 0 (ordering rules only) or a positive limit", o.maxStates)
				}
				e, err := loadCaseArg(args[0])
				if err != nil {
					return c.fail("repro: %v", err)
				}
				o.json = *asJSON
				return c.repro(e, o)
			}
		},
	})
}

// reproOptions are the flags of repro.
type reproOptions struct {
	verbose, shrink, json bool
	save, name, export    string
	fs                    fsFlag
	maxStates             int // --max-states: -1 no limit, 0 no crash states
}

// loadCaseArg reads a case from a case ID, or from a file holding a corpus
// entry or a case in JSON. The entry's name and expectation are kept
// (Expect is empty for an ID or a bare case).
func loadCaseArg(arg string) (harness.Entry, error) {
	if strings.HasPrefix(arg, harness.IDVersion+":") || strings.HasPrefix(arg, harness.TraceIDVersion+":") {
		cs, err := harness.ParseID(arg)
		return harness.Entry{Case: cs}, err
	}
	b, err := os.ReadFile(arg)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && !strings.ContainsAny(arg, "/.") {
			return harness.Entry{}, fmt.Errorf("%q is neither a case ID (c1:... or c2:...) nor a file", arg)
		}
		return harness.Entry{}, err
	}
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(b, &probe); err != nil {
		return harness.Entry{}, fmt.Errorf("%s: %w", arg, err)
	}
	if _, ok := probe["case"]; ok {
		return harness.LoadEntry(arg)
	}
	var cs harness.Case
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&cs); err != nil {
		return harness.Entry{}, fmt.Errorf("%s: %w", arg, err)
	}
	return harness.Entry{Case: cs}, nil
}

// reproOutput is repro's --json output.
type reproOutput struct {
	harness.Verdict
	// Shrunk is set with --shrink: the original case's ID and op count.
	Shrunk *shrinkInfo `json:"shrunk,omitempty"`
	// Expect is the corpus entry's expectation (a FILE holding an entry);
	// ExpectMet says whether the verdict meets it.
	Expect    string `json:"expect,omitempty"`
	ExpectMet *bool  `json:"expect_met,omitempty"`
	// Explanation is the corpus entry's explanation of its expectation.
	Explanation string `json:"explanation,omitempty"`
	// Saved is the corpus entry written by --save.
	Saved string `json:"saved,omitempty"`
	// Exported counts the crash-state images written by --export.
	Exported int `json:"exported,omitempty"`
}

// shrinkInfo describes a shrink.
type shrinkInfo struct {
	FromID  string `json:"from_id"`
	FromOps int    `json:"from_ops"`
	ToOps   int    `json:"to_ops"`
	Runs    int    `json:"runs"`
}

func (c *cli) repro(e harness.Entry, o reproOptions) int {
	cs := e.Case
	opts := statesOptions(harness.Options{Dir: o.fs.dir}, o.maxStates)
	runCase := func(cs harness.Case) harness.Verdict { return harness.RunWith(cs, opts) }
	var b strings.Builder
	out := reproOutput{Expect: e.Expect, Explanation: e.Explanation}
	v := runCase(cs)
	if o.shrink {
		if v.OK {
			fmt.Fprintf(&b, "case %s passes: nothing to shrink\n", cs.ID())
		} else {
			res, err := harness.Shrink(cs, harness.ShrinkOptions{Run: runCase})
			if err != nil {
				return c.fail("repro: %v", err)
			}
			out.Shrunk = &shrinkInfo{FromID: cs.ID(), FromOps: res.Before, ToOps: res.After, Runs: res.Runs}
			fmt.Fprintf(&b, "shrunk %s\n  from %d ops to %d ops (%d runs); it fails the same way:\n  crashtest repro %s\n",
				cs.ID(), res.Before, res.After, res.Runs, res.Case.ID())
			cs, v = res.Case, res.Verdict
		}
	}
	out.Verdict = v
	if out.Explanation == "" {
		out.Explanation = harness.Explain(v)
	}
	code := 0
	if !v.OK {
		code = 1
	}
	// An entry's expectation is about a full run: with --max-states it
	// is not checked.
	expect := e.Expect != "" && o.maxStates < 0
	if expect {
		met := e.Check(v) == nil
		out.ExpectMet = &met
		code = 0
		if !met {
			code = 1
		}
	}
	if o.export != "" {
		ex, err := harness.Explore(cs, harness.ExploreOptions{Options: opts, StopAtFailure: true, Export: o.export})
		if err != nil {
			return c.fail("repro: %v", err)
		}
		out.Exported = ex.Exported
	}
	if o.save != "" {
		// Corpus entries are traces: they keep their meaning when
		// workload generation changes.
		ne := harness.Entry{Name: o.name, Case: cs.AsTrace(), Expect: harness.ExpectPass, Explanation: e.Explanation}
		if !v.OK {
			ne.Expect = v.Failure.Kind
		}
		if ne.Name == "" {
			ne.Name = e.Name
		}
		if ne.Name == "" {
			ne.Name = entryName(cs, v)
		}
		if ne.Explanation == "" {
			ne.Explanation = "Saved by crashtest repro: " + verdictLine(v) + "."
			if why := harness.Explain(v); why != "" {
				ne.Explanation += " Why: " + why
			}
		}
		path, err := harness.SaveEntry(o.save, ne)
		if err != nil {
			return c.fail("repro: %v", err)
		}
		out.Saved = path
	}
	if o.json {
		js, err := json.MarshalIndent(out, "", "  ")
		if err != nil {
			return c.fail("repro: %v", err)
		}
		c.stdout.Write(append(js, '\n'))
		return code
	}
	fmt.Fprintf(&b, "case: %s\n", cs.ID())
	if cs.Faults != "" {
		fmt.Fprintf(&b, "fault plan: %s\n", printable(cs.Faults))
	}
	fmt.Fprintf(&b, "workload: %d ops, %d file operations; checked %d crash points, %d states (model %s, up to %d per point), %d file operations by the ordering rules\n",
		cs.Ops+1, v.FileOps, v.Points, v.States, cs.Model, cs.StatesPerPoint, v.OrderingOps)
	if o.verbose {
		if err := writeTrace(&b, cs, v.Failure); err != nil {
			fmt.Fprintf(&b, "trace: %s\n", printable(err.Error()))
		}
	}
	if v.OK {
		b.WriteString("PASS\n")
	} else {
		fmt.Fprintf(&b, "FAIL %s\n", printable(v.Failure.String()))
		if v.Failure.State != "" {
			fmt.Fprintf(&b, "  crash state: %s\n", printable(v.Failure.State))
		}
		if v.Failure.Mismatch != "" {
			fmt.Fprintf(&b, "  sector %d (offset %d): %s\n", v.Failure.Sector, v.Failure.Sector*512, v.Failure.Mismatch)
		}
		if o.verbose && v.Failure.Point >= 0 && v.Failure.StateKey != "" {
			writeInspection(&b, cs, v.Failure)
		}
		if e.Explanation == "" && out.Explanation != "" {
			fmt.Fprintf(&b, "  why: %s\n", printable(out.Explanation))
		}
	}
	if e.Expect != "" && !expect {
		fmt.Fprintf(&b, "corpus entry %s: expect %s: not checked with --max-states\n", e.Name, e.Expect)
	}
	if expect {
		if err := e.Check(v); err != nil {
			fmt.Fprintf(&b, "corpus entry %s: expect %s: NOT MET\n", e.Name, e.Expect)
		} else {
			fmt.Fprintf(&b, "corpus entry %s: expect %s: met\n", e.Name, e.Expect)
		}
		if e.Explanation != "" {
			fmt.Fprintf(&b, "  why: %s\n", printable(e.Explanation))
		}
	}
	if o.export != "" {
		fmt.Fprintf(&b, "exported %d crash-state images to %s (p<point>-s<state>%s, p<point>.expected.raw)\n", out.Exported, o.export, imageExt(cs))
	}
	if out.Saved != "" {
		fmt.Fprintf(&b, "saved corpus entry %s (expect %s)\n", out.Saved, map[bool]string{true: harness.ExpectPass, false: kindOf(v)}[v.OK])
	}
	c.stdout.Write([]byte(b.String()))
	return code
}

// kindOf returns the failure kind of a failing verdict, "pass" otherwise.
func kindOf(v harness.Verdict) string {
	if v.OK {
		return harness.ExpectPass
	}
	return v.Failure.Kind
}

// verdictLine describes a verdict on one line.
func verdictLine(v harness.Verdict) string {
	if v.OK {
		return fmt.Sprintf("passes (%d crash states)", v.States)
	}
	return printable(v.Failure.String())
}

// entryName is the default corpus entry name of a case:
// TARGET-KIND-FORMAT-SEED.
func entryName(cs harness.Case, v harness.Verdict) string {
	return fmt.Sprintf("%s-%s-%s-%016x", cs.Target, kindOf(v), cs.Format, cs.Seed)
}

// imageExt is the extension of exported images of the case's format.
func imageExt(cs harness.Case) string {
	if cs.Format == "v1" {
		return ".qcow"
	}
	return ".qcow2"
}

// traceWindow is how many file operations repro -v shows on each side of
// the crash point.
const traceWindow = 6

// opWindow is how many workload ops repro -v shows on each side of the
// op in flight at the crash point (all of them when the case is small).
const opWindow = 10

// writeTrace writes the workload ops (around the crash point) with the
// file operations each made and, when the case failed at a crash point,
// the file operations around it.
func writeTrace(b *strings.Builder, cs harness.Case, f *harness.Failure) error {
	tr, err := harness.Record(cs)
	lo, hi := 0, len(tr.Ops)
	if f != nil && f.Point >= 0 && len(tr.Ops) > 2*opWindow+1 {
		lo, hi = max(0, f.Op-opWindow), min(len(tr.Ops), f.Op+opWindow+1)
	}
	if lo > 0 {
		fmt.Fprintf(b, "  ... %d ops before\n", lo)
	}
	for i := lo; i < hi; i++ {
		m := ""
		if f != nil && f.Point >= 0 && i == f.Op {
			m = "   <- crash point inside or right before this op"
		}
		fmt.Fprintf(b, "  op %3d: file ops [%d,%d) %s%s\n", i, tr.Start[i], tr.End[i], tr.Ops[i], m)
	}
	if hi < len(tr.Ops) {
		fmt.Fprintf(b, "  ... %d ops after\n", len(tr.Ops)-hi)
	}
	if f == nil || f.Point < 0 {
		return err
	}
	fmt.Fprintf(b, "file operations around crash point %d:\n", f.Point)
	for i := max(0, f.Point-traceWindow); i < min(len(tr.FileOps), f.Point+traceWindow); i++ {
		if i == f.Point {
			b.WriteString("  ---- crash ----\n")
		}
		fmt.Fprintf(b, "  %s\n", printable(tr.FileOps[i]))
	}
	if f.Point >= len(tr.FileOps) {
		b.WriteString("  ---- crash ----\n")
	}
	return err
}

// writeInspection writes what the failing crash state kept of the pending
// writes, the checker's findings and the first differing sectors.
func writeInspection(b *strings.Builder, cs harness.Case, f *harness.Failure) {
	in, err := harness.Inspect(cs, f)
	if err != nil {
		fmt.Fprintf(b, "inspect: %s\n", printable(err.Error()))
		return
	}
	fmt.Fprintf(b, "pending (not yet synced) writes of the image at the crash point, and what the crash state kept:\n")
	if len(in.Pending) == 0 {
		b.WriteString("  none\n")
	}
	const maxPending = 40
	for i, p := range in.Pending {
		if i == maxPending {
			fmt.Fprintf(b, "  ... %d more\n", len(in.Pending)-i)
			break
		}
		fmt.Fprintf(b, "  %-60s %s\n", printable(p.Op), p.Kept)
	}
	fmt.Fprintf(b, "checker findings on the crash state (%d):\n", len(in.Findings))
	for i, s := range in.Findings {
		if i == 20 {
			fmt.Fprintf(b, "  ... %d more\n", len(in.Findings)-i)
			break
		}
		fmt.Fprintf(b, "  %s\n", printable(s))
	}
	if len(in.Sectors) > 0 {
		b.WriteString("first differing sectors (expected: the first value the model allows):\n")
	}
	for _, s := range in.Sectors {
		j := 0
		for j < len(s.Got) && j < len(s.Want) && s.Got[j] == s.Want[j] {
			j++
		}
		fmt.Fprintf(b, "  sector %d (offset %d), first difference at byte %d:\n", s.Sector, s.Sector*512, j)
		lo := j / 16 * 16
		hi := min(len(s.Got), len(s.Want), lo+32)
		fmt.Fprintf(b, "    expected %04x: % x\n", lo, s.Want[lo:hi])
		fmt.Fprintf(b, "    got      %04x: % x\n", lo, s.Got[lo:hi])
	}
}
