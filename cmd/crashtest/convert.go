package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

func init() {
	register(&command{
		name:    "convert",
		args:    "[-f FMT] [-O raw|qcow|qcow2] [-o OPTIONS] SRC DST",
		summary: "Write the virtual disk of SRC (read through its backing chain) to DST: a sparse raw image, or a new qcow/qcow2 image in which holes and zeros stay unallocated; an existing DST is overwritten.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			var in formatFlag
			out := formatFlag{qcow.FormatRaw}
			var opts stringsFlag
			fs.Var(&in, "f", "source `FORMAT` (raw, qcow, qcow2); probed from the magic by default")
			fs.Var(&out, "O", "output `FORMAT`: raw (the default), qcow (version 1) or qcow2")
			fs.Var(&opts, "o", "qcow2 creation `OPTIONS`, comma separated: compat=0.10|1.1, cluster_size=N, refcount_bits=N, lazy_refcounts=on|off (repeatable)")
			return func(c *cli, args []string) int {
				return c.convert(args, in.f, out.f, opts)
			}
		},
	})
}

func (c *cli) convert(args []string, inFormat, outFormat qcow.Format, opts []string) int {
	cmd := commands["convert"]
	if len(args) != 2 {
		return c.usageError(cmd, "expected SRC and DST arguments, got %d argument(s)", len(args))
	}
	create, err := parseCreateOptions(outFormat, opts)
	if err != nil {
		return c.usageError(cmd, "%v", err)
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
	if outFormat == qcow.FormatRaw {
		err = convertRaw(src, dstName)
	} else {
		err = convertQCOW(src, dstName, create)
	}
	if err != nil {
		return c.fail("convert '%s' to '%s': %v", srcName, dstName, err)
	}
	return 0
}

// convertRaw writes src to dstName as a sparse raw file.
func convertRaw(src *qcow.Image, dstName string) error {
	// Overwrite an existing DST in place, as qemu-img does (it keeps the
	// inode, so links and permissions survive); CopyRaw truncates it.
	dst, err := vfs.OS.Open(dstName, vfs.ReadWrite)
	if errors.Is(err, fs.ErrNotExist) {
		dst, err = vfs.OS.Create(dstName)
	}
	if err != nil {
		return fmt.Errorf("could not create '%s': %w", dstName, err)
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
	return err
}

// parseCreateOptions turns -o values (qemu-img's comma-separated
// key=value lists) into options for a new image of format f. Unknown keys,
// and any key for formats other than qcow2, are errors, as in qemu-img.
func parseCreateOptions(f qcow.Format, opts []string) (qcow.CreateOptions, error) {
	o := qcow.CreateOptions{Format: f}
	for _, list := range opts {
		for _, kv := range strings.Split(list, ",") {
			if kv == "" {
				continue
			}
			key, val, hasVal := strings.Cut(kv, "=")
			if f != qcow.FormatQCOW2 {
				return o, fmt.Errorf("invalid parameter '%s' for output format %s", key, f)
			}
			if !hasVal {
				return o, fmt.Errorf("option '%s' needs a value (%s=...)", key, key)
			}
			switch key {
			case "compat":
				switch val {
				case "0.10", "v2":
					o.Version = 2
				case "1.1", "v3":
					o.Version = 3
				default:
					return o, fmt.Errorf("compat does not accept value '%s' (want 0.10 or 1.1)", val)
				}
			case "cluster_size":
				v, err := parseSize(val)
				if err != nil {
					return o, fmt.Errorf("cluster_size '%s': %w", val, err)
				}
				o.ClusterSize = v
			case "refcount_bits":
				v, err := strconv.ParseUint(val, 10, 7)
				if err != nil {
					return o, fmt.Errorf("refcount_bits '%s' is not a number up to 64", val)
				}
				o.RefcountBits = int(v)
			case "lazy_refcounts":
				switch val {
				case "on", "yes", "true":
					o.LazyRefcounts = true
				case "off", "no", "false":
					o.LazyRefcounts = false
				default:
					return o, fmt.Errorf("lazy_refcounts does not accept value '%s' (want on or off)", val)
				}
			default:
				return o, fmt.Errorf("invalid parameter '%s' (qcow2 takes compat, cluster_size, refcount_bits, lazy_refcounts)", key)
			}
		}
	}
	// Like qemu-img, check the combinations before anything is created.
	switch {
	case o.Version == 2 && o.LazyRefcounts:
		return o, errors.New("lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1)")
	case o.Version == 2 && o.RefcountBits != 0 && o.RefcountBits != 16:
		return o, errors.New("different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1)")
	case o.ClusterSize != 0 && (o.ClusterSize < 512 || o.ClusterSize > 2<<20 || o.ClusterSize&(o.ClusterSize-1) != 0):
		return o, fmt.Errorf("cluster size %d is not a power of two between 512 and 2048k", o.ClusterSize)
	case o.RefcountBits != 0 && (o.RefcountBits > 64 || o.RefcountBits&(o.RefcountBits-1) != 0):
		return o, fmt.Errorf("refcount width %d is not a power of two up to 64 bits", o.RefcountBits)
	}
	return o, nil
}

// convertQCOW creates dstName as a new image (an existing file is
// replaced) the size of src and copies the data of src into it. Ranges that
// BlockStatus reports as zero are skipped, and so are blocks of zeros
// inside data (blocks of 4 KiB, or of one cluster when clusters are
// smaller): the new image has no backing file, so what is never written
// stays unallocated and reads as zeros. The result is flushed and closed.
func convertQCOW(src *qcow.Image, dstName string, o qcow.CreateOptions) error {
	if fi, err := os.Lstat(dstName); err == nil {
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("destination '%s' exists and is not a regular file", dstName)
		}
		if err := os.Remove(dstName); err != nil {
			return fmt.Errorf("replace '%s': %w", dstName, err)
		}
	}
	o.Size = src.Size()
	if err := qcow.Create(vfs.OS, dstName, o); err != nil {
		return err
	}
	dst, err := qcow.Open(vfs.OS, dstName, &qcow.Options{Format: o.Format, ReadWrite: true})
	if err != nil {
		return err
	}
	err = copyImage(dst, src)
	if err == nil {
		err = dst.Flush()
	}
	if cerr := dst.Close(); err == nil {
		err = cerr
	}
	return err
}

// convertChunk is the most data read from the source and written to the
// destination at once.
const convertChunk = 2 << 20

// copyImage copies the non-zero data of src into dst, which reads as zeros
// everywhere.
func copyImage(dst, src *qcow.Image) error {
	size := src.Size()
	block := min(int64(qcow.SparseBlock), dst.ClusterSize())
	var buf []byte
	for off := int64(0); off < size; {
		n, zero, err := src.BlockStatus(off, size-off)
		if err != nil {
			return fmt.Errorf("block status at %d: %w", off, err)
		}
		if n <= 0 || n > size-off {
			return fmt.Errorf("block status at %d returned bad length %d", off, n)
		}
		if zero {
			off += n
			continue
		}
		if buf == nil {
			buf = make([]byte, convertChunk)
		}
		for end := off + n; off < end; {
			// Chunks end at multiples of convertChunk, so whole clusters of
			// the destination are written at once.
			k := min(end, (off/convertChunk+1)*convertChunk) - off
			p := buf[:k]
			m, err := src.ReadAt(p, off)
			if m < len(p) {
				if err == nil || errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				return fmt.Errorf("read %d bytes at %d: %w", len(p), off, err)
			}
			if err := qcow.WriteNonZeroAt(dst, p, off, block); err != nil {
				return err
			}
			off += k
		}
	}
	return nil
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
