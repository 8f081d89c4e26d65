package main

import (
	"errors"
	"flag"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

func init() {
	register(&command{
		name:    "convert",
		args:    "[-f FMT] [-O raw] SRC DST",
		summary: "Write the virtual disk of SRC (read through its backing chain) to DST as a sparse raw image; an existing DST is overwritten.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			var in formatFlag
			out := formatFlag{qcow.FormatRaw}
			fs.Var(&in, "f", "source `FORMAT` (raw, qcow, qcow2); probed from the magic by default")
			fs.Var(&out, "O", "output `FORMAT`: raw (qcow and qcow2 are not supported yet)")
			return func(c *cli, args []string) int {
				return c.convert(args, in.f, out.f)
			}
		},
	})
}

func (c *cli) convert(args []string, inFormat, outFormat qcow.Format) int {
	cmd := commands["convert"]
	if len(args) != 2 {
		return c.usageError(cmd, "expected SRC and DST arguments, got %d argument(s)", len(args))
	}
	if outFormat != qcow.FormatRaw {
		return c.fail("convert: output format %s is not supported yet (only raw)", outFormat)
	}
	srcName, dstName := args[0], args[1]
	src, err := qcow.Open(vfs.OS, srcName, &qcow.Options{Format: inFormat})
	if err != nil {
		return c.fail("could not open '%s': %v", srcName, err)
	}
	defer src.Close()
	if err := notInChain(dstName, src); err != nil {
		return c.fail("convert: %v", err)
	}

	// Overwrite an existing DST in place, as qemu-img does (it keeps the
	// inode, so links and permissions survive); CopyRaw truncates it.
	dst, err := vfs.OS.Open(dstName, vfs.ReadWrite)
	if errors.Is(err, fs.ErrNotExist) {
		dst, err = vfs.OS.Create(dstName)
	}
	if err != nil {
		return c.fail("could not create '%s': %v", dstName, err)
	}
	err = qcow.CopyRaw(dst, src)
	if err == nil {
		err = dst.Sync()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = vfs.OS.SyncDir(filepath.Dir(dstName))
	}
	if err != nil {
		return c.fail("convert '%s' to '%s': %v", srcName, dstName, err)
	}
	return 0
}

// notInChain refuses a destination that is the source image or one of its
// backing files: truncating it would destroy the data being read.
func notInChain(dst string, src *qcow.Image) error {
	dfi, err := os.Stat(dst)
	if err != nil {
		return nil // does not exist (or cannot be seen): not the source
	}
	for im := src; im != nil; im = im.Backing() {
		if fi, err := os.Stat(im.Name()); err == nil && os.SameFile(fi, dfi) {
			if im == src {
				return errors.New("destination '" + dst + "' is the source image")
			}
			return errors.New("destination '" + dst + "' is a backing file of the source image ('" + im.Name() + "')")
		}
	}
	return nil
}
