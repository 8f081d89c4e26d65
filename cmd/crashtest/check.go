package main

import (
	"flag"
	"fmt"
	"strings"

	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// Exit statuses of check, as qemu-img check's.
const (
	checkClean       = 0
	checkFailed      = 1 // the check could not complete (or the image not open), or check errors
	checkCorruptions = 2
	checkLeaks       = 3 // leaked clusters, and no corruption
)

func init() {
	register(&command{
		name:    "check",
		args:    "[--json] [-f FMT] [-r leaks|all] IMAGE",
		summary: "Check an image's structure like qemu-img check (read-only unless -r repairs it); exit 0 clean, 2 corruptions, 3 leaks only, 1 check could not complete.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			asJSON := jsonFlags(fs)
			var format formatFlag
			fs.Var(&format, "f", "image `FORMAT` (raw, qcow, qcow2); probed from the magic by default")
			var repair repairFlag
			fs.Var(&repair, "r", "repair `MODE`: leaks (leaked clusters only) or all (also refcounts too low, COPIED flags, the dirty and corrupt bits); the exit status is that of the check after the repair")
			return func(c *cli, args []string) int {
				if repair.mode != 0 {
					return c.repair(args, format.f, repair.mode, *asJSON)
				}
				return c.check(args, format.f, *asJSON)
			}
		},
	})
}

// checkJSON is check's --json output: qemu-img check's keys, plus the
// findings.
type checkJSON struct {
	Filename           string        `json:"filename"`
	Format             qcow.Format   `json:"format"`
	CheckErrors        int           `json:"check-errors"`
	Corruptions        int           `json:"corruptions,omitempty"`
	Leaks              int           `json:"leaks,omitempty"`
	ImageEndOffset     int64         `json:"image-end-offset,omitempty"`
	TotalClusters      int64         `json:"total-clusters,omitempty"`
	AllocatedClusters  int64         `json:"allocated-clusters,omitempty"`
	FragmentedClusters int64         `json:"fragmented-clusters,omitempty"`
	CompressedClusters int64         `json:"compressed-clusters,omitempty"`
	Findings           []findingJSON `json:"findings,omitempty"`
	// With -r: what was repaired, as qemu-img check's keys.
	LeaksFixed       *int `json:"leaks-fixed,omitempty"`
	CorruptionsFixed *int `json:"corruptions-fixed,omitempty"`
}

// repairFlag is the -r flag of check.
type repairFlag struct{ mode qcow.RepairMode }

func (f *repairFlag) String() string {
	if f == nil || f.mode == 0 {
		return ""
	}
	return f.mode.String()
}

func (f *repairFlag) Set(s string) error {
	m, err := qcow.ParseRepairMode(s)
	if err != nil {
		return fmt.Errorf("expected leaks or all, got %q", s)
	}
	f.mode = m
	return nil
}

type findingJSON struct {
	Kind    string `json:"kind"` // "corruption", "leak" or "check-error"
	Offset  int64  `json:"offset"`
	Message string `json:"message"`
}

func (c *cli) check(args []string, format qcow.Format, asJSON bool) int {
	cmd := commands["check"]
	if len(args) != 1 {
		return c.usageError(cmd, "expected one IMAGE argument, got %d", len(args))
	}
	name := args[0]
	// The structure of this file alone is checked: a missing or broken
	// backing file must not stop it.
	res, err := qcow.CheckFile(vfs.OS, name, format)
	if err != nil {
		return c.fail("could not open '%s': %v", name, err)
	}
	if res == nil {
		return c.fail("check '%s' could not complete: no result", name)
	}
	code := checkCode(res)
	if asJSON {
		if c.printJSON(checkOutJSON(name, res)) != 0 {
			return checkFailed
		}
		return code
	}
	c.writeCheck(res)
	return code
}

// checkCode is qemu-img check's exit status for res.
func checkCode(res *qcow.CheckResult) int {
	switch {
	case res.CheckErrors > 0:
		return checkFailed
	case res.Corruptions > 0:
		return checkCorruptions
	case res.Leaks > 0:
		return checkLeaks
	}
	return checkClean
}

// repair runs check -r: it repairs the image, prints the findings of the
// first check with each repair after the finding it repairs (as qemu-img
// check -r does), the summary of the repairs, and the check of the repaired
// image, whose exit status it returns.
func (c *cli) repair(args []string, format qcow.Format, mode qcow.RepairMode, asJSON bool) int {
	cmd := commands["check"]
	if len(args) != 1 {
		return c.usageError(cmd, "expected one IMAGE argument, got %d", len(args))
	}
	name := args[0]
	rr, err := qcow.Repair(vfs.OS, name, format, mode)
	if err != nil {
		return c.fail("could not repair '%s': %v", name, err)
	}
	if rr == nil || rr.After == nil {
		return c.fail("repair of '%s' could not complete: no result", name)
	}
	code := checkCode(rr.After)
	if asJSON {
		out := checkOutJSON(name, rr.After)
		out.LeaksFixed, out.CorruptionsFixed = &rr.LeaksFixed, &rr.CorruptionsFixed
		for _, f := range rr.Unrepaired {
			out.Findings = append(out.Findings, findingJSON{Kind: f.Kind.String(), Offset: f.Offset, Message: f.Msg})
		}
		if c.printJSON(out) != 0 {
			return checkFailed
		}
		return code
	}
	var b strings.Builder
	used := make([]bool, len(rr.Repairs))
	for _, f := range rr.Before.Findings {
		b.WriteString(findingLine(f))
		b.WriteString("\n")
		for i, r := range rr.Repairs {
			if !used[i] && r.Offset == f.Offset && r.Kind == f.Kind {
				used[i] = true
				b.WriteString(oneLine(r.Msg))
				b.WriteString("\n")
				break
			}
		}
	}
	for i, r := range rr.Repairs {
		if !used[i] {
			b.WriteString(oneLine(r.Msg))
			b.WriteString("\n")
		}
	}
	for _, f := range rr.Unrepaired {
		b.WriteString("ERROR " + oneLine(f.Msg) + "\n")
	}
	if rr.LeaksFixed > 0 || rr.CorruptionsFixed > 0 {
		fmt.Fprintf(&b, "The following inconsistencies were found and repaired:\n\n"+
			"    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
			rr.LeaksFixed, rr.CorruptionsFixed)
	}
	c.stdout.Write([]byte(b.String()))
	if rr.After == rr.Before && len(rr.Before.Findings) > 0 {
		// Nothing was written: the findings were printed above.
		after := *rr.After
		after.Findings = nil
		c.writeCheck(&after)
		return code
	}
	c.writeCheck(rr.After)
	return code
}

// checkOutJSON is the --json form of res.
func checkOutJSON(name string, res *qcow.CheckResult) checkJSON {
	out := checkJSON{
		Filename:           name,
		Format:             res.Format,
		CheckErrors:        res.CheckErrors,
		Corruptions:        res.Corruptions,
		Leaks:              res.Leaks,
		ImageEndOffset:     res.ImageEndOffset,
		TotalClusters:      res.TotalClusters,
		AllocatedClusters:  res.AllocatedClusters,
		FragmentedClusters: res.FragmentedClusters,
		CompressedClusters: res.CompressedClusters,
	}
	for _, f := range res.Findings {
		out.Findings = append(out.Findings, findingJSON{Kind: f.Kind.String(), Offset: f.Offset, Message: f.Msg})
	}
	return out
}

// writeCheck prints res as `qemu-img check` does: one line per finding, then
// the summary.
func (c *cli) writeCheck(res *qcow.CheckResult) {
	var b strings.Builder
	for _, f := range res.Findings {
		b.WriteString(findingLine(f))
		b.WriteString("\n")
	}
	if res.Corruptions == 0 && res.Leaks == 0 && res.CheckErrors == 0 {
		b.WriteString("No errors were found on the image.\n")
	}
	if res.Corruptions > 0 {
		fmt.Fprintf(&b, "\n%d errors were found on the image.\n"+
			"Data may be corrupted, or further writes to the image may corrupt it.\n", res.Corruptions)
	}
	if res.Leaks > 0 {
		fmt.Fprintf(&b, "\n%d leaked clusters were found on the image.\n"+
			"This means waste of disk space, but no harm to data.\n", res.Leaks)
	}
	if res.CheckErrors > 0 {
		fmt.Fprintf(&b, "\n%d internal errors have occurred during the check.\n", res.CheckErrors)
	}
	if res.TotalClusters > 0 && res.AllocatedClusters > 0 {
		alloc := float64(res.AllocatedClusters)
		fmt.Fprintf(&b, "%d/%d = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters\n",
			res.AllocatedClusters, res.TotalClusters, 100*alloc/float64(res.TotalClusters),
			100*float64(res.FragmentedClusters)/alloc, 100*float64(res.CompressedClusters)/alloc)
	}
	if res.ImageEndOffset > 0 {
		fmt.Fprintf(&b, "Image end offset: %d\n", res.ImageEndOffset)
	}
	c.stdout.Write([]byte(b.String()))
}

// findingLine formats a finding like qemu-img check's lines: "Leaked ..."
// for a leak, "ERROR ..." otherwise.
func findingLine(f qcow.Finding) string {
	msg := oneLine(f.Msg)
	prefix := "ERROR"
	if f.Kind == qcow.Leak {
		prefix = "Leaked"
	}
	if strings.HasPrefix(strings.ToLower(msg), strings.ToLower(prefix)) {
		return msg
	}
	return prefix + " " + msg
}
