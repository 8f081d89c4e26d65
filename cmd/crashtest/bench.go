package main

import (
	"flag"
	"fmt"
	"math"
	"time"

	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

func init() {
	register(&command{
		name: "bench",
		args: "[-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval=N] [-o OFFSET] [--pattern=N] [-s BUFFER_SIZE] [-S STEP_SIZE] [-t CACHE] [-w] IMAGE",
		summary: "Run a sequential I/O benchmark like qemu-img bench: COUNT requests of BUFFER_SIZE bytes, the first at OFFSET, " +
			"each next one STEP_SIZE further (wrapping at the end of the disk); reads unless -w.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			o := benchOptions{count: 75000, depth: 64, bufSize: 4096}
			var format formatFlag
			var cache cacheFlag // writeback, as qemu-img bench's default
			fs.Var(cNumFlag{&o.count, "request count", math.MaxInt32}, "c", "`COUNT` of requests (default 75000)")
			fs.Var(cNumFlag{&o.depth, "queue depth", math.MaxInt32}, "d", "queue `DEPTH` (accepted for compatibility; requests are issued one at a time)")
			fs.Var(&format, "f", "image `FORMAT` (raw, qcow, qcow2); probed from the magic by default")
			fs.Var(cNumFlag{&o.flushInterval, "flush interval", math.MaxInt32}, "flush-interval", "write tests: flush whenever the number of remaining requests is a multiple of `N`")
			fs.Var(sizeFlag{&o.offset, "offset", math.MaxInt64}, "o", "`OFFSET` of the first request (k, M, G... suffixes)")
			fs.Var(cNumFlag{&o.pattern, "pattern byte", 0xff}, "pattern", "write tests: fill the buffer with byte `N` (default 0)")
			fs.Var(sizeFlag{&o.bufSize, "buffer size", math.MaxInt32}, "s", "`BUFFER_SIZE` of each request (default 4K)")
			fs.Var(sizeFlag{&o.step, "step_size", math.MaxInt32}, "S", "`STEP_SIZE` between requests (default: the buffer size)")
			fs.Var(&cache, "t", "cache `MODE`: writeback (the default) or writethrough")
			fs.BoolVar(&o.write, "w", false, "write instead of read")
			return func(c *cli, args []string) int {
				o.format, o.writeThrough = format.f, cache.writeThrough
				return c.bench(args, o)
			}
		},
	})
}

// benchOptions are bench's settings.
type benchOptions struct {
	count, depth, flushInterval, pattern int64
	offset, bufSize, step                int64
	write, writeThrough                  bool
	format                               qcow.Format
}

// cNumFlag is an integer flag in C syntax (decimal, 0x hex, 0 octal) in
// [0, max], as qemu-img parses -c, -d, --pattern and --flush-interval.
type cNumFlag struct {
	v    *int64
	what string
	max  int64
}

func (f cNumFlag) String() string {
	if f.v == nil {
		return ""
	}
	return fmt.Sprint(*f.v)
}

func (f cNumFlag) Set(s string) error {
	v, ok := parseCInt(s)
	if !ok || v < 0 || v > f.max {
		return fmt.Errorf("invalid %s specified: %q", f.what, s)
	}
	*f.v = v
	return nil
}

// sizeFlag is a byte count with qemu's suffixes (see parseSize) in
// [0, max].
type sizeFlag struct {
	v    *int64
	what string
	max  int64
}

func (f sizeFlag) String() string {
	if f.v == nil {
		return ""
	}
	return fmt.Sprint(*f.v)
}

func (f sizeFlag) Set(s string) error {
	v, err := parseSize(s)
	if err == nil && v > f.max {
		return fmt.Errorf("invalid %s specified: %q must be between 0 and %d", f.what, s, f.max)
	}
	if err != nil {
		return fmt.Errorf("invalid %s specified: %q: you may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes", f.what, s)
	}
	*f.v = v
	return nil
}

// bench runs the requests of qemu-img bench one after the other. Like
// qemu-img, it times only the requests (and the flushes of
// --flush-interval): opening the image and closing it (which, in write-back
// mode, writes the cached metadata) are outside the measured time.
func (c *cli) bench(args []string, o benchOptions) int {
	cmd := commands["bench"]
	if len(args) != 1 {
		return c.usageError(cmd, "expected one IMAGE argument, got %d", len(args))
	}
	switch {
	case o.depth == 0:
		return c.usageError(cmd, "invalid queue depth specified: 0")
	case !o.write && o.flushInterval > 0:
		return c.usageError(cmd, "--flush-interval is only available in write tests")
	case o.flushInterval > 0 && o.flushInterval < o.depth:
		// qemu-img's rule, kept so that a command line works with both.
		return c.usageError(cmd, "flush interval can't be smaller than depth")
	}
	if o.step == 0 {
		o.step = o.bufSize
	}
	name := args[0]
	im, err := qcow.Open(vfs.OS, name, &qcow.Options{Format: o.format, ReadWrite: o.write, WriteThrough: o.writeThrough})
	if err != nil {
		return c.fail("could not open '%s': %v", name, err)
	}
	code := c.benchRun(im, o)
	if err := im.Close(); err != nil && code == 0 {
		code = c.fail("bench: close '%s': %v", name, err)
	}
	return code
}

// benchRun issues the requests on im and prints qemu-img bench's lines.
func (c *cli) benchRun(im *qcow.Image, o benchOptions) int {
	op := "read"
	if o.write {
		op = "write"
	}
	fmt.Fprintf(c.stdout, "Sending %d %s requests, %d bytes each, 1 in parallel (starting at offset %d, step size %d)\n",
		o.count, op, o.bufSize, o.offset, o.step)
	if o.flushInterval > 0 {
		fmt.Fprintf(c.stdout, "Sending flush every %d requests\n", o.flushInterval)
	}
	size := im.Size()
	buf := make([]byte, o.bufSize)
	fillByte(buf, byte(o.pattern))
	off := o.offset
	start := time.Now()
	for i := int64(0); i < o.count; i++ {
		if off > size || o.bufSize > size-off {
			return c.fail("bench: failed request: %d bytes at offset %d are beyond the end of the disk (%d bytes)", o.bufSize, off, size)
		}
		var err error
		if o.write {
			_, err = im.WriteAt(buf, off)
		} else {
			var n int
			n, err = im.ReadAt(buf, off)
			if n == len(buf) {
				err = nil
			}
		}
		if err != nil {
			return c.fail("bench: failed request at offset %d: %v", off, err)
		}
		// As qemu-img: the next offset wraps around at the end of the disk.
		if size > 0 {
			off = (off + o.step) % size
		}
		if o.flushInterval > 0 && (o.count-1-i)%o.flushInterval == 0 {
			if err := im.Flush(); err != nil {
				return c.fail("bench: flush: %v", err)
			}
		}
	}
	elapsed := time.Since(start)
	fmt.Fprintf(c.stdout, "Run completed in %.3f seconds.\n", elapsed.Seconds())
	return 0
}
