// Command crashtest reads QCOW disk images (versions 1, 2 and 3) and, as the
// project grows, proves the qcow writer crash consistent.
//
// Its subcommands are shaped like qemu-img's:
//
//	crashtest info [--json] [-f FMT] [--backing-chain] IMAGE
//	crashtest convert [-f FMT] [-O raw|qcow|qcow2] [-o OPTIONS] SRC DST
//	crashtest io [-f FMT] [-t CACHE] -c CMD [-c CMD]... IMAGE   (like qemu-io)
//	crashtest bench [-c COUNT] [-s SIZE] [-S STEP] [-o OFFSET] [-w] [-t CACHE] IMAGE
//	crashtest check [--json] [-f FMT] IMAGE
//
// and, for crash consistency (package harness):
//
//	crashtest soak [--duration D] [--cases N] [--workers N] [--seed S] [--shard i/n] [--formats v1,v2,v3] [--models M,...] [--target T] [--errors] [--steer] [--fs mem|os:DIR] [--out DIR] [--summary FILE] [--json] [-v]
//	crashtest merge [--json] [--summary FILE] SUMMARY...
//	crashtest repro [-v] [--json] [--shrink] [--save DIR] [--export DIR] [--fs mem|os:DIR] CASE-ID|FILE
//	crashtest explore [--format v3] [--workload FILE|--seed S] [--model torn] [--max-states N] [--export DIR] [--json]
//
// Errors are printed to stderr as one line starting with "crashtest: "
// (io also prints qemu-io's messages for failed commands on stdout).
// Exit status: 0 success; 1 failure or usage error; check also exits 2 when
// it found corruptions and 3 when it found only leaked clusters, like
// `qemu-img check`.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/qcowcrash/qcowcrash/qcow"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// command is one subcommand of crashtest.
type command struct {
	name    string
	args    string // synopsis after the name, e.g. "[--json] IMAGE"
	summary string // one line
	// flags declares the command's flags on fs and returns the function
	// that runs it with the positional arguments.
	flags func(fs *flag.FlagSet) func(c *cli, args []string) int
}

// commands is every subcommand, by name. Only working commands are listed.
var commands = map[string]*command{}

func register(c *command) { commands[c.name] = c }

// cli carries the output streams of one invocation.
type cli struct {
	stdout, stderr io.Writer
}

// run runs crashtest with args (without the program name) and returns the
// exit status. A panic anywhere below is reported as one line and exit 1;
// it is a last resort, since the packages underneath must not panic.
func run(args []string, stdout, stderr io.Writer) (code int) {
	c := &cli{stdout: stdout, stderr: stderr}
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(stderr, "crashtest: internal error: %s\n", oneLine(fmt.Sprint(r)))
			code = 1
		}
	}()
	if len(args) == 0 {
		c.usage()
		return 1
	}
	name := args[0]
	switch name {
	case "help", "-h", "-help", "--help":
		if len(args) > 1 {
			if cmd, ok := commands[args[1]]; ok {
				c.commandUsage(cmd)
				return 1
			}
			fmt.Fprintf(stderr, "crashtest: help: unknown command %q\n\n", args[1])
		}
		c.usage()
		return 1
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "crashtest: unknown command %q\n\n", name)
		c.usage()
		return 1
	}
	fs := newFlagSet(cmd)
	runCmd := cmd.flags(fs)
	pos, err := parseInterspersed(fs, args[1:])
	if errors.Is(err, flag.ErrHelp) {
		c.commandUsage(cmd)
		return 1
	}
	if err != nil {
		return c.usageError(cmd, "%v", err)
	}
	return runCmd(c, pos)
}

func newFlagSet(cmd *command) *flag.FlagSet {
	fs := flag.NewFlagSet("crashtest "+cmd.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported by run, on one line
	return fs
}

// parseInterspersed parses flags that may appear before, between or after
// the positional arguments, and returns the positional arguments. After
// "--" everything is positional.
func parseInterspersed(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if used := len(args) - len(rest); used > 0 && args[used-1] == "--" {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// usage prints the list of commands to stderr.
func (c *cli) usage() {
	var b strings.Builder
	b.WriteString("usage: crashtest COMMAND [flags] ARGS\n\n")
	b.WriteString("Reads and writes QCOW v1/v2/v3 images like qemu-img and qemu-io. Commands:\n\n")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		cmd := commands[n]
		fmt.Fprintf(&b, "  crashtest %s %s\n      %s\n", cmd.name, cmd.args, cmd.summary)
	}
	b.WriteString("\nFormats (-f, -O): raw, qcow (version 1), qcow2 (versions 2 and 3).\n")
	b.WriteString("Run 'crashtest help COMMAND' for a command's flags.\n")
	io.WriteString(c.stderr, b.String())
}

// commandUsage prints one command's synopsis and flags to stderr.
func (c *cli) commandUsage(cmd *command) {
	fs := newFlagSet(cmd)
	cmd.flags(fs)
	var b strings.Builder
	fmt.Fprintf(&b, "usage: crashtest %s %s\n\n%s\n", cmd.name, cmd.args, cmd.summary)
	hasFlags := false
	fs.VisitAll(func(*flag.Flag) { hasFlags = true })
	if hasFlags {
		b.WriteString("\nflags:\n")
		fs.SetOutput(&b)
		fs.PrintDefaults()
	}
	io.WriteString(c.stderr, b.String())
}

// usageError reports a wrong invocation of cmd on one line; exit status 1.
func (c *cli) usageError(cmd *command, format string, args ...any) int {
	msg := fmt.Sprintf(format, args...)
	fmt.Fprintf(c.stderr, "crashtest: %s: %s (run 'crashtest help %s' for usage)\n", cmd.name, oneLine(msg), cmd.name)
	return 1
}

// fail reports an error on one line; exit status 1.
func (c *cli) fail(format string, args ...any) int {
	fmt.Fprintf(c.stderr, "crashtest: %s\n", oneLine(fmt.Sprintf(format, args...)))
	return 1
}

// oneLine folds s onto a single line: line breaks become "; " and other
// control characters (which an image's strings may hold) are made visible.
func oneLine(s string) string {
	s = strings.TrimSpace(s)
	s = strings.Join(strings.FieldsFunc(s, func(r rune) bool { return r == '\n' || r == '\r' }), "; ")
	return printable(s)
}

// printable replaces control characters and invalid UTF-8 in s, which may
// come from an untrusted image, with '?' so they cannot forge output lines
// or terminal escapes.
func printable(s string) string {
	return strings.Map(func(r rune) rune {
		if r == utf8.RuneError || unicode.IsControl(r) {
			return '?'
		}
		return r
	}, strings.ToValidUTF8(s, "?"))
}

// formatFlag is the value of -f or -O: an image format name.
type formatFlag struct {
	f qcow.Format
}

func (f *formatFlag) String() string { return string(f.f) }

func (f *formatFlag) Set(s string) error {
	switch qcow.Format(s) {
	case qcow.FormatRaw, qcow.FormatQCOW, qcow.FormatQCOW2:
		f.f = qcow.Format(s)
		return nil
	}
	return fmt.Errorf("unknown format %q (want raw, qcow or qcow2)", s)
}

// outputFlag is --output=human|json, as qemu-img spells it; --json is the
// short form.
type outputFlag struct {
	json *bool
}

func (o outputFlag) String() string {
	if o.json != nil && *o.json {
		return "json"
	}
	return "human"
}

func (o outputFlag) Set(s string) error {
	switch s {
	case "json":
		*o.json = true
	case "human":
		*o.json = false
	default:
		return fmt.Errorf("unknown output %q (want human or json)", s)
	}
	return nil
}

// jsonFlags declares --json and --output on fs.
func jsonFlags(fs *flag.FlagSet) *bool {
	j := new(bool)
	fs.BoolVar(j, "json", false, "print JSON instead of text")
	fs.Var(outputFlag{j}, "output", "output `FORMAT`: human or json (as qemu-img)")
	return j
}

// sizeString formats a byte count as qemu's size_to_str does: three
// significant digits and a binary unit, e.g. "64 GiB" or "1.51 MiB".
func sizeString(n int64) string {
	if n < 0 {
		return fmt.Sprintf("%d B", n)
	}
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i := 0
	// Switch to the next unit once the value would print as >= 1000.
	for i < len(units)-1 && float64(n) >= 1000.0/1024.0*float64(uint64(1)<<(10*(i+1))) {
		i++
	}
	return fmt.Sprintf("%.3g %s", float64(n)/float64(uint64(1)<<(10*i)), units[i])
}
