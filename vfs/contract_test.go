package vfs_test

import (
	"testing"

	"github.com/spf13/afero"

	"github.com/qcowcrash/qcowcrash/vfs"
	"github.com/qcowcrash/qcowcrash/vfs/vfstest"
)

// backend is one FS under the contract suite.
type backend struct {
	name  string
	newFS vfstest.NewFS
}

// backends lists every backend; os_linux_test.go adds vfs.OS.
var backends = []backend{
	{"mem", func(t *testing.T) (vfs.FS, string) { return vfs.NewMem(), "" }},
	{"mem-subdir", func(t *testing.T) (vfs.FS, string) { return vfs.NewMem(), "/images/a" }},
	{"afero-memmap", func(t *testing.T) (vfs.FS, string) {
		afs := afero.NewMemMapFs()
		if err := afs.MkdirAll("/img", 0o755); err != nil {
			t.Fatal(err)
		}
		return vfs.FromAfero(afs), "/img"
	}},
	{"afero-os", func(t *testing.T) (vfs.FS, string) {
		return vfs.FromAfero(afero.NewOsFs()), t.TempDir()
	}},
}

func TestContract(t *testing.T) {
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { vfstest.RunContract(t, b.newFS) })
	}
}
