package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"strings"

	"github.com/qcowcrash/qcowcrash/harness"
)

func init() {
	register(&command{
		name:    "repro",
		args:    "[-v] [--json] CASE-ID",
		summary: "Rerun one crash-consistency case (an ID printed by soak) bit for bit and print its verdict; exit 0 if it passes, 1 if it fails.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			verbose := fs.Bool("v", false, "also print the workload ops with the file operations each made, and the file operations around the failing crash point")
			asJSON := jsonFlags(fs)
			return func(c *cli, args []string) int {
				if len(args) != 1 {
					return c.usageError(commands["repro"], "want exactly one CASE-ID, got %d arguments", len(args))
				}
				cs, err := harness.ParseID(args[0])
				if err != nil {
					return c.fail("repro: %v", err)
				}
				return c.repro(cs, *verbose, *asJSON)
			}
		},
	})
}

func (c *cli) repro(cs harness.Case, verbose, asJSON bool) int {
	v := harness.Run(cs)
	code := 0
	if !v.OK {
		code = 1
	}
	if asJSON {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return c.fail("repro: %v", err)
		}
		c.stdout.Write(append(b, '\n'))
		return code
	}
	var b strings.Builder
	fmt.Fprintf(&b, "case: %s\n", cs.ID())
	fmt.Fprintf(&b, "workload: %d ops, %d file operations; checked %d crash points, %d states (model %s, up to %d per point)\n",
		cs.Ops+1, v.FileOps, v.Points, v.States, cs.Model, cs.StatesPerPoint)
	if verbose {
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
	}
	c.stdout.Write([]byte(b.String()))
	return code
}

// traceWindow is how many file operations repro -v shows on each side of
// the crash point.
const traceWindow = 6

// writeTrace writes the workload ops with the file operations each made
// and, when the case failed at a crash point, the file operations around
// it.
func writeTrace(b *strings.Builder, cs harness.Case, f *harness.Failure) error {
	tr, err := harness.Record(cs)
	for i, op := range tr.Ops {
		m := ""
		if f != nil && f.Point >= 0 && i == f.Op {
			m = "   <- crash point inside or right before this op"
		}
		fmt.Fprintf(b, "  op %3d: file ops [%d,%d) %s%s\n", i, tr.Start[i], tr.End[i], op, m)
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
