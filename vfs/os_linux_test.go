package vfs_test

import (
	"testing"

	"github.com/qcowcrash/qcowcrash/vfs"
)

func init() {
	backends = append([]backend{
		{"os", func(t *testing.T) (vfs.FS, string) { return vfs.OS, t.TempDir() }},
	}, backends...)
}
