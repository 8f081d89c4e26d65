package harness

import (
	"github.com/qcowcrash/qcowcrash/harness/targets/kvmtool2011"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// TargetKvmtool2011 is the name of the kvmtool2011 target: a faithful
// port of the 2011 kvmtool QCOW write path (package kvmtool2011), a
// known-unsafe writer the harness must catch.
const TargetKvmtool2011 = "kvmtool2011"

func init() { register(kvmtoolTarget{}) }

// kvmtoolTarget is TargetKvmtool2011. It writes QCOW version 1 and 2
// only: kvmtool of 2011 did not recognise version 3.
type kvmtoolTarget struct{}

func (kvmtoolTarget) Name() string      { return TargetKvmtool2011 }
func (kvmtoolTarget) Formats() []string { return []string{"v1", "v2"} }

// Open opens the image with kvmtool2011.Open. kvmtool of 2011 never opened
// a backing file, but crash states hold only the files the fault layer
// has seen, and this project's reader, which judges them, needs the
// backing file. So when the case has one, Open first opens it read-only
// through fsys and closes it (two harness-only file operations, before
// any write): the fault layer adopts it as durable, as it does when the
// qcow target opens it.
func (kvmtoolTarget) Open(fsys vfs.FS, name string, wt bool) (Writer, error) {
	if _, err := fsys.Stat(backingName); err == nil {
		if f, err := fsys.Open(backingName, vfs.ReadOnly); err == nil {
			f.Close()
		}
	}
	return kvmtool2011.Open(fsys, name, kvmtool2011.Options{WriteThrough: wt})
}
