package main

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"math/big"
	"strings"
	"time"

	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

func init() {
	register(&command{
		name:    "io",
		args:    "[-f FMT] [-t writethrough|writeback] -c CMD [-c CMD]... IMAGE",
		summary: "Run qemu-io commands on an image: 'write [-P pattern] [-z] [-q] off len', 'read [-P pattern] [-q] off len', 'flush'.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			var format formatFlag
			var cmds stringsFlag
			cache := cacheFlag{writeThrough: true} // qemu-io's default
			fs.Var(&format, "f", "image `FORMAT` (raw, qcow, qcow2); probed from the magic by default")
			fs.Var(&cmds, "c", "run `CMD` (repeatable; the commands run in order)")
			fs.Var(&cache, "t", "cache `MODE`: writethrough (the default, as qemu-io's) or writeback")
			return func(c *cli, args []string) int {
				return c.io(args, format.f, cache.writeThrough, cmds)
			}
		},
	})
}

// stringsFlag is a repeatable string flag.
type stringsFlag []string

func (s *stringsFlag) String() string { return strings.Join(*s, "; ") }

func (s *stringsFlag) Set(v string) error {
	*s = append(*s, v)
	return nil
}

// cacheFlag is -t: qemu's cache mode, writeback or writethrough.
type cacheFlag struct {
	writeThrough bool
}

func (f *cacheFlag) String() string {
	if f.writeThrough {
		return "writethrough"
	}
	return "writeback"
}

func (f *cacheFlag) Set(s string) error {
	switch s {
	case "writeback":
		f.writeThrough = false
	case "writethrough":
		f.writeThrough = true
	default:
		return fmt.Errorf("invalid cache mode %q (want writeback or writethrough)", s)
	}
	return nil
}

// maxRequestBytes is the longest read or write qemu-io accepts
// (BDRV_REQUEST_MAX_BYTES).
const maxRequestBytes = math.MaxInt32 &^ 511

// qemuWritePattern is the byte qemu-io's write fills its buffer with when
// no -P is given.
const qemuWritePattern = 0xcd

// ioSession runs qemu-io commands on one open image.
type ioSession struct {
	c  *cli
	im *qcow.Image
}

// ioCommand is one command of io: its qemu-io name, alias, option letters
// (getopt syntax), argument count and usage line.
type ioCommand struct {
	name, alias string
	opts        string
	nargs       int
	usage       string
	run         func(s *ioSession, opts map[byte]string, args []string) error
}

var ioCommands = []*ioCommand{
	{
		name: "read", alias: "r", opts: "P:q", nargs: 2,
		usage: "read [-q] [-P pattern] off len -- reads a number of bytes at a specified offset",
		run:   (*ioSession).read,
	},
	{
		name: "write", alias: "w", opts: "P:qz", nargs: 2,
		usage: "write [-qz] [-P pattern] off len -- writes a number of bytes at a specified offset",
		run:   (*ioSession).write,
	},
	{
		name: "flush", nargs: 0,
		usage: "flush -- flush all in-core file state to disk",
		run:   (*ioSession).flush,
	},
}

func findIOCommand(name string) *ioCommand {
	for _, ic := range ioCommands {
		if name == ic.name || (ic.alias != "" && name == ic.alias) {
			return ic
		}
	}
	return nil
}

// errIOFailed marks a command that failed after printing why, as qemu-io
// does, on stdout.
var errIOFailed = errors.New("command failed")

func (c *cli) io(args []string, format qcow.Format, writeThrough bool, cmds []string) int {
	cmd := commands["io"]
	if len(args) != 1 {
		return c.usageError(cmd, "expected one IMAGE argument, got %d", len(args))
	}
	if len(cmds) == 0 {
		return c.usageError(cmd, "no commands: give at least one -c CMD")
	}
	name := args[0]
	// Open for writing only when a command writes, so that reading an image
	// needs no write permission and changes nothing.
	rw := false
	for _, line := range cmds {
		if w := splitIOLine(line); len(w) > 0 {
			if ic := findIOCommand(w[0]); ic != nil && ic.name == "write" {
				rw = true
			}
		}
	}
	im, err := qcow.Open(vfs.OS, name, &qcow.Options{Format: format, ReadWrite: rw, WriteThrough: writeThrough})
	if err != nil {
		return c.fail("could not open '%s': %v", name, err)
	}
	s := &ioSession{c: c, im: im}
	// Like qemu-io, run every command even after one fails, and exit 1 if
	// any failed.
	code := 0
	for _, line := range cmds {
		if s.command(line) != nil {
			code = 1
		}
	}
	if err := im.Close(); err != nil {
		c.fail("io: close '%s': %v", name, err)
		code = 1
	}
	return code
}

// splitIOLine splits a command line at spaces as qemu-io does (no quoting;
// runs of spaces count as one).
func splitIOLine(line string) []string {
	var words []string
	for _, w := range strings.Split(line, " ") {
		if w != "" {
			words = append(words, w)
		}
	}
	return words
}

// command runs one command line and reports its failure where qemu-io
// does: an unknown command, a bad argument count or an invalid option on
// stderr; usage lines, parse errors and failed requests on stdout.
func (s *ioSession) command(line string) error {
	words := splitIOLine(line)
	if len(words) == 0 {
		return nil
	}
	ic := findIOCommand(words[0])
	if ic == nil {
		s.c.fail("io: command %q not found", words[0])
		return errIOFailed
	}
	// qemu-io checks the number of words first (options included), then
	// the operands left after the options.
	if n := len(words) - 1; n < ic.nargs || (ic.nargs == 0 && n > 0) {
		want := fmt.Sprintf("at least %d", ic.nargs)
		if ic.nargs == 0 {
			want = "0"
		}
		s.c.fail("io: bad argument count %d to %s, expected %s arguments", n, ic.name, want)
		return errIOFailed
	}
	opts, pos, err := getopt(words[1:], ic.opts)
	if err != nil {
		s.c.fail("io: %s: %v", ic.name, err)
		fmt.Fprintln(s.c.stdout, ic.usage)
		return errIOFailed
	}
	if len(pos) != ic.nargs {
		fmt.Fprintln(s.c.stdout, ic.usage)
		return errIOFailed
	}
	return ic.run(s, opts, pos)
}

// getopt parses args with the option letters in optstring the way GNU
// getopt does for qemu-io's commands: options may be grouped ("-qz"), an
// option's argument may be attached ("-P0xab") or follow, options and
// operands may be mixed, and "--" ends the options. It returns the last
// value of each option ("" for one without an argument) and the operands.
func getopt(args []string, optstring string) (map[byte]string, []string, error) {
	opts := map[byte]string{}
	var pos []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return opts, append(pos, args[i+1:]...), nil
		}
		if len(a) < 2 || a[0] != '-' {
			pos = append(pos, a)
			continue
		}
		for j := 1; j < len(a); j++ {
			ch := a[j]
			k := strings.IndexByte(optstring, ch)
			if ch == ':' || k < 0 {
				return nil, nil, fmt.Errorf("invalid option -- '%c'", ch)
			}
			if k+1 < len(optstring) && optstring[k+1] == ':' {
				switch {
				case j+1 < len(a):
					opts[ch] = a[j+1:]
				case i+1 < len(args):
					i++
					opts[ch] = args[i]
				default:
					return nil, nil, fmt.Errorf("option requires an argument -- '%c'", ch)
				}
				break
			}
			opts[ch] = ""
		}
	}
	return opts, pos, nil
}

// printf writes to stdout.
func (s *ioSession) printf(format string, args ...any) {
	fmt.Fprintf(s.c.stdout, format, args...)
}

// requestArgs parses the offset, length and -P pattern of read and write,
// printing qemu-io's messages for bad values.
func (s *ioSession) requestArgs(opts map[byte]string, args []string) (off, n int64, pattern int, err error) {
	pattern = -1
	if p, ok := opts['P']; ok {
		v, ok := parsePattern(p)
		if !ok {
			s.printf("%s is not a valid pattern byte\n", p)
			return 0, 0, 0, errIOFailed
		}
		pattern = v
	}
	if off, err = parseSize(args[0]); err != nil {
		s.printf("%s\n", cvtnumMessage(err, args[0]))
		return 0, 0, 0, errIOFailed
	}
	if n, err = parseSize(args[1]); err != nil {
		s.printf("%s\n", cvtnumMessage(err, args[1]))
		return 0, 0, 0, errIOFailed
	}
	if n > maxRequestBytes {
		s.printf("length cannot exceed %d, given %s\n", int64(maxRequestBytes), args[1])
		return 0, 0, 0, errIOFailed
	}
	return off, n, pattern, nil
}

// inRange reports whether [off, off+n) lies on the virtual disk, printing
// qemu-io's failure line when it does not.
func (s *ioSession) inRange(op string, off, n int64) bool {
	if size := s.im.Size(); off > size || n > size-off {
		s.printf("%s failed: request of %d bytes at offset %d is beyond the end of the disk (%d bytes)\n", op, n, off, size)
		return false
	}
	return true
}

func (s *ioSession) read(opts map[byte]string, args []string) error {
	off, n, pattern, err := s.requestArgs(opts, args)
	if err != nil {
		return err
	}
	if !s.inRange("read", off, n) {
		return errIOFailed
	}
	buf := make([]byte, n)
	start := time.Now()
	m, err := s.im.ReadAt(buf, off)
	elapsed := time.Since(start)
	if m < len(buf) {
		if err == nil {
			err = errors.New("short read")
		}
		s.printf("read failed: %s\n", oneLine(err.Error()))
		return errIOFailed
	}
	var failed error
	if pattern >= 0 {
		for _, b := range buf {
			if b != byte(pattern) {
				s.printf("Pattern verification failed at offset %d, %d bytes\n", off, n)
				failed = errIOFailed
				break
			}
		}
	}
	if _, quiet := opts['q']; !quiet {
		s.printf("%s", ioReport("read", off, n, elapsed))
	}
	return failed
}

func (s *ioSession) write(opts map[byte]string, args []string) error {
	_, zero := opts['z']
	if p, ok := opts['P']; ok {
		if _, ok := parsePattern(p); !ok {
			s.printf("%s is not a valid pattern byte\n", p)
			return errIOFailed
		}
		if zero {
			s.printf("Only one of -z, -P, and -s can be specified at the same time\n")
			return errIOFailed
		}
	}
	off, n, pattern, err := s.requestArgs(opts, args)
	if err != nil {
		return err
	}
	if !s.inRange("write", off, n) {
		return errIOFailed
	}
	var elapsed time.Duration
	if zero {
		start := time.Now()
		err = s.im.WriteZeroes(off, n)
		elapsed = time.Since(start)
	} else {
		if pattern < 0 {
			pattern = qemuWritePattern
		}
		buf := make([]byte, n)
		fillByte(buf, byte(pattern))
		start := time.Now()
		_, err = s.im.WriteAt(buf, off)
		elapsed = time.Since(start)
	}
	if err != nil {
		s.printf("write failed: %s\n", oneLine(err.Error()))
		return errIOFailed
	}
	if _, quiet := opts['q']; !quiet {
		s.printf("%s", ioReport("wrote", off, n, elapsed))
	}
	return nil
}

func (s *ioSession) flush(map[byte]string, []string) error {
	if err := s.im.Flush(); err != nil {
		s.printf("flush failed: %s\n", oneLine(err.Error()))
		return errIOFailed
	}
	return nil
}

// fillByte sets every byte of p to b.
func fillByte(p []byte, b byte) {
	if len(p) == 0 {
		return
	}
	p[0] = b
	for k := 1; k < len(p); k *= 2 {
		copy(p[k:], p[:k])
	}
}

// ioReport formats qemu-io's two report lines for one request of n bytes
// at off that took d:
//
//	wrote 4096/4096 bytes at offset 0
//	4 KiB, 1 ops; 00.00 sec (878.747 KiB/sec and 219.6868 ops/sec)
func ioReport(op string, off, n int64, d time.Duration) string {
	secs := d.Seconds()
	return fmt.Sprintf("%s %d/%d bytes at offset %d\n%s, 1 ops; %s (%s/sec and %s ops/sec)\n",
		op, n, n, off, cvtstr(float64(n)), timestr(d), cvtstr(perSecond(float64(n), secs)), cFloat(perSecond(1, secs), 4))
}

// perSecond is v/secs; like qemu's tdiv, dividing by zero gives an
// infinity (or NaN for 0/0), which cFloat prints as C does.
func perSecond(v, secs float64) float64 {
	return v / secs
}

// cFloat formats v with prec decimals as C's printf("%.*f") does,
// including "inf".
func cFloat(v float64, prec int) string {
	switch {
	case math.IsInf(v, 1):
		return "inf"
	case math.IsInf(v, -1):
		return "-inf"
	case math.IsNaN(v):
		return "nan"
	}
	return fmt.Sprintf("%.*f", prec, v)
}

// cvtstr formats a byte count or rate as qemu's cvtstr: three decimals
// and a binary unit, ".000" dropped; below 1 KiB six decimals and
// "bytes".
func cvtstr(v float64) string {
	units := []string{"EiB", "PiB", "TiB", "GiB", "MiB", "KiB"}
	var s, suffix string
	for i, u := range units {
		scale := math.Ldexp(1, 10*(len(units)-i))
		if v >= scale {
			s, suffix = cFloat(v/scale, 3), " "+u
			break
		}
	}
	if suffix == "" {
		s, suffix = cFloat(v, 6), " bytes"
	}
	if i := strings.Index(s, ".000"); i >= 0 {
		return s[:i] + suffix
	}
	return s + suffix
}

// timestr formats an elapsed time as qemu's timestr: "00.12 sec" below a
// second, "H:MM:SS.ss" from one second on.
func timestr(d time.Duration) string {
	sec := int64(d / time.Second)
	frac := float64(d%time.Second) / 1e9
	if sec == 0 {
		return fmt.Sprintf("%05.2f sec", frac)
	}
	return fmt.Sprintf("%d:%02d:%05.2f", sec/3600, sec/60%60, float64(sec%60)+frac)
}

// Errors of parseSize, as qemu's cvtnum reports them.
var (
	errSizeSyntax = errors.New("non-numeric argument, or extraneous/unrecognized suffix")
	errSizeRange  = errors.New("argument too large")
)

// cvtnumMessage is qemu-io's message for a size argument that did not
// parse.
func cvtnumMessage(err error, arg string) string {
	return fmt.Sprintf("Parsing error: %v -- %s", err, arg)
}

// parseSize parses a byte count as qemu's cvtnum (qemu_strtosz) does: a
// decimal number with an optional fraction and an optional suffix b, k, m,
// g, t, p or e (any case; powers of 1024; a fraction needs a suffix other
// than b), or a hexadecimal number 0x... without fraction or suffix. The
// result is rounded to the nearest byte, halves up, and must fit in an
// int64.
func parseSize(s string) (int64, error) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	if i == 0 {
		return 0, errSizeSyntax
	}
	intPart := s[:i]
	if (i < len(s) && (s[i] == 'x' || s[i] == 'X')) && strings.Trim(intPart, "0") == "" {
		if intPart != "0" {
			return 0, errSizeSyntax
		}
		hex := s[i+1:]
		if hex == "" {
			return 0, errSizeSyntax
		}
		v := new(big.Int)
		if _, ok := v.SetString(hex, 16); !ok || strings.ContainsAny(hex, "+-_") {
			return 0, errSizeSyntax
		}
		if !v.IsInt64() {
			return 0, errSizeRange
		}
		return v.Int64(), nil
	}
	fracPart := ""
	if i < len(s) && s[i] == '.' {
		j := i + 1
		for j < len(s) && s[j] >= '0' && s[j] <= '9' {
			j++
		}
		fracPart = s[i+1 : j]
		i = j
	}
	mul := int64(1)
	if i < len(s) {
		m, ok := sizeSuffix(s[i])
		if !ok || i+1 != len(s) {
			return 0, errSizeSyntax
		}
		mul = m
	}
	if mul == 1 && strings.Trim(fracPart, "0") != "" {
		return 0, errSizeSyntax // a fraction needs a scale
	}
	v := new(big.Rat)
	if _, ok := v.SetString(intPart + "." + fracPart + "0"); !ok {
		return 0, errSizeSyntax
	}
	v.Mul(v, new(big.Rat).SetInt64(mul))
	// Round halves up.
	v.Add(v, big.NewRat(1, 2))
	r := new(big.Int).Quo(v.Num(), v.Denom())
	if !r.IsInt64() {
		return 0, errSizeRange
	}
	return r.Int64(), nil
}

// sizeSuffix is the multiplier of a size suffix letter.
func sizeSuffix(c byte) (int64, bool) {
	switch c {
	case 'b', 'B':
		return 1, true
	case 'k', 'K':
		return 1 << 10, true
	case 'm', 'M':
		return 1 << 20, true
	case 'g', 'G':
		return 1 << 30, true
	case 't', 'T':
		return 1 << 40, true
	case 'p', 'P':
		return 1 << 50, true
	case 'e', 'E':
		return 1 << 60, true
	}
	return 0, false
}

// parsePattern parses a pattern byte as qemu-io does: a number 0..255 in
// C syntax (decimal, 0x hexadecimal or 0 octal).
func parsePattern(s string) (int, bool) {
	v, ok := parseCInt(s)
	if !ok || v < 0 || v > 0xff {
		return 0, false
	}
	return int(v), true
}

// parseCInt parses an integer as C's strtol with base 0: an optional sign,
// then 0x... hexadecimal, 0... octal or decimal. The whole string must be
// a number.
func parseCInt(s string) (int64, bool) {
	neg := false
	if s != "" && (s[0] == '+' || s[0] == '-') {
		neg = s[0] == '-'
		s = s[1:]
	}
	base := 10
	switch {
	case len(s) > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X'):
		base, s = 16, s[2:]
	case len(s) > 1 && s[0] == '0':
		base, s = 8, s[1:]
	}
	if s == "" {
		return 0, false
	}
	v := new(big.Int)
	if _, ok := v.SetString(s, base); !ok || strings.ContainsAny(s, "+-_") {
		return 0, false
	}
	if neg {
		v.Neg(v)
	}
	if !v.IsInt64() {
		return 0, false
	}
	return v.Int64(), true
}
