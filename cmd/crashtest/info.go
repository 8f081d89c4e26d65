package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/qcowcrash/qcowcrash/qcow"
	"github.com/qcowcrash/qcowcrash/vfs"
)

func init() {
	register(&command{
		name:    "info",
		args:    "[--json] [-f FMT] [--backing-chain] IMAGE",
		summary: "Describe an image like qemu-img info: format, version, sizes, features, backing file, snapshots.",
		flags: func(fs *flag.FlagSet) func(*cli, []string) int {
			asJSON := jsonFlags(fs)
			var format formatFlag
			fs.Var(&format, "f", "image `FORMAT` (raw, qcow, qcow2); probed from the magic by default")
			chain := fs.Bool("backing-chain", false, "describe every image of the backing chain")
			return func(c *cli, args []string) int {
				return c.info(args, format.f, *asJSON, *chain)
			}
		},
	})
}

func (c *cli) info(args []string, format qcow.Format, asJSON, chain bool) int {
	cmd := commands["info"]
	if len(args) != 1 {
		return c.usageError(cmd, "expected one IMAGE argument, got %d", len(args))
	}
	name := args[0]
	// Like qemu-img info, describe the image without opening its backing
	// file unless the chain is asked for: a missing backing file is not an
	// error here.
	im, err := qcow.Open(vfs.OS, name, &qcow.Options{Format: format, NoBacking: !chain})
	if err != nil {
		return c.fail("could not open '%s': %v", name, err)
	}
	defer im.Close()
	in, err := im.Info()
	if err != nil {
		return c.fail("%s: %v", name, err)
	}
	var infos []*qcow.Info
	for i := in; i != nil; i = i.Backing {
		infos = append(infos, i)
	}
	if asJSON {
		var v any = in
		if chain {
			// qemu-img prints the chain as an array, top image first.
			flat := make([]qcow.Info, len(infos))
			for i, x := range infos {
				flat[i] = *x
				flat[i].Backing = nil
			}
			v = flat
		}
		return c.printJSON(v)
	}
	var b strings.Builder
	for i, x := range infos {
		if i > 0 {
			b.WriteString("\n")
		}
		writeInfo(&b, x)
	}
	io.WriteString(c.stdout, b.String())
	return 0
}

// printJSON writes v as indented JSON to stdout.
func (c *cli) printJSON(v any) int {
	out, err := json.MarshalIndent(v, "", "    ")
	if err != nil {
		return c.fail("encode JSON: %v", err)
	}
	fmt.Fprintf(c.stdout, "%s\n", out)
	return 0
}

// writeInfo writes in as `qemu-img info` does.
func writeInfo(b *strings.Builder, in *qcow.Info) {
	fmt.Fprintf(b, "image: %s\n", printable(in.Filename))
	fmt.Fprintf(b, "file format: %s\n", in.Format)
	fmt.Fprintf(b, "virtual size: %s (%d bytes)\n", sizeString(in.VirtualSize), in.VirtualSize)
	fmt.Fprintf(b, "disk size: %s\n", sizeString(diskUsage(in.Filename, in.FileSize)))
	if in.ClusterSize > 0 {
		fmt.Fprintf(b, "cluster_size: %d\n", in.ClusterSize)
	}
	if in.BackingFile != "" {
		fmt.Fprintf(b, "backing file: %s", printable(in.BackingFile))
		if actual := backingPath(in); actual != in.BackingFile {
			fmt.Fprintf(b, " (actual path: %s)", printable(actual))
		}
		b.WriteString("\n")
		if in.BackingFormat != "" {
			fmt.Fprintf(b, "backing file format: %s\n", printable(in.BackingFormat))
		}
	}
	if len(in.Snapshots) > 0 {
		b.WriteString("Snapshot list:\n")
		fmt.Fprintf(b, "%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")
		for _, s := range in.Snapshots {
			secs := s.VMClockNsec / 1e9
			clock := fmt.Sprintf("%02d:%02d:%02d.%03d", secs/3600, secs/60%60, secs%60, s.VMClockNsec/1e6%1000)
			date := s.Date.Local().Format("2006-01-02 15:04:05")
			// ICOUNT stays empty: the reader does not decode it.
			row := fmt.Sprintf("%-9s %-16s %8s%20s%13s", printable(s.ID), printable(s.Name), sizeString(int64(min(s.VMStateSize, 1<<62))), date, clock)
			b.WriteString(strings.TrimRight(row, " ") + "\n")
		}
	}
	if in.Format == qcow.FormatQCOW2 {
		b.WriteString("Format specific information:\n")
		compat := "1.1"
		if in.Version == 2 {
			compat = "0.10"
		}
		fmt.Fprintf(b, "    compat: %s\n", compat)
		fmt.Fprintf(b, "    compression type: %s\n", in.CompressionType)
		if in.Version >= 3 {
			fmt.Fprintf(b, "    lazy refcounts: %t\n", in.LazyRefcounts)
		}
		fmt.Fprintf(b, "    refcount bits: %d\n", in.RefcountBits)
		if in.Version >= 3 {
			fmt.Fprintf(b, "    corrupt: %t\n", in.Corrupt)
			if in.DataFile != "" {
				fmt.Fprintf(b, "    data file: %s\n", printable(in.DataFile))
				fmt.Fprintf(b, "    data file raw: %t\n", in.Autoclear&qcow.AutoclearDataFileRaw != 0)
			}
			fmt.Fprintf(b, "    extended l2: %t\n", in.ExtendedL2)
		}
		if in.Dirty {
			b.WriteString("    dirty: true\n")
		}
	}
}

// backingPath is where the backing file of in is looked for: relative
// names are taken relative to the image's directory.
func backingPath(in *qcow.Info) string {
	if in.Backing != nil {
		return in.Backing.Filename
	}
	if filepath.IsAbs(in.BackingFile) {
		return in.BackingFile
	}
	return filepath.Join(filepath.Dir(in.Filename), in.BackingFile)
}

// diskUsage is the space name takes on disk (allocated blocks), or size
// when the file system cannot tell.
func diskUsage(name string, size int64) int64 {
	fi, err := os.Stat(name)
	if err != nil {
		return size
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
