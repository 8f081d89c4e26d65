package faultfs_test

import (
	"testing"

	"github.com/spf13/afero"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
	"github.com/qcowcrash/qcowcrash/vfs/vfstest"
)

// TestContract runs the vfs contract against faultfs over every backend,
// against a crash state, and against faultfs over a crash state.
func TestContract(t *testing.T) {
	// never fires, but makes every op consult an injector
	idle := faultfs.Rule(faultfs.OnIndex(-1), faultfs.EIO)
	backends := []struct {
		name  string
		newFS vfstest.NewFS
	}{
		{"mem", func(t *testing.T) (vfs.FS, string) { return faultfs.New(vfs.NewMem()), "" }},
		{"mem-subdir-injector", func(t *testing.T) (vfs.FS, string) {
			return faultfs.New(vfs.NewMem(), faultfs.WithInjector(idle)), "/images/a"
		}},
		{"os", func(t *testing.T) (vfs.FS, string) { return faultfs.New(vfs.OS), t.TempDir() }},
		{"afero-memmap", func(t *testing.T) (vfs.FS, string) {
			afs := afero.NewMemMapFs()
			if err := afs.MkdirAll("/img", 0o755); err != nil {
				t.Fatal(err)
			}
			return faultfs.New(vfs.FromAfero(afs)), "/img"
		}},
		{"afero-os", func(t *testing.T) (vfs.FS, string) {
			return faultfs.New(vfs.FromAfero(afero.NewOsFs())), t.TempDir()
		}},
		{"state", func(t *testing.T) (vfs.FS, string) { return emptyState(t), "" }},
		{"faultfs-over-state", func(t *testing.T) (vfs.FS, string) { return faultfs.New(emptyState(t)), "/d" }},
	}
	for _, b := range backends {
		t.Run(b.name, func(t *testing.T) { vfstest.RunContract(t, b.newFS) })
	}
}

// emptyState returns the crash state of an FS on which nothing happened.
func emptyState(t *testing.T) *faultfs.State {
	t.Helper()
	s, err := faultfs.New(vfs.NewMem()).CrashState(faultfs.Torn, 1)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Files implement vfs.Allocator exactly when the inner files do.
func TestAllocatorPassThrough(t *testing.T) {
	for _, c := range []struct {
		name  string
		inner vfs.FS
		want  bool
	}{
		{"mem", vfs.NewMem(), true},
		{"afero", vfs.FromAfero(afero.NewMemMapFs()), false},
	} {
		fsys := faultfs.New(c.inner)
		f, err := fsys.Create("f")
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := f.(vfs.Allocator); ok != c.want {
			t.Errorf("%s: file implements vfs.Allocator = %v, want %v", c.name, ok, c.want)
		}
		f.Close()
		if vfs.Root(fsys) != c.inner {
			t.Errorf("%s: vfs.Root does not unwrap to the inner FS", c.name)
		}
	}
}
