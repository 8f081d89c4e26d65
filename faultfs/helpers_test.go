package faultfs_test

import (
	"bytes"
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/faultfs"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// fx is a test fixture: a faultfs over a MemFS, with helpers that fail the
// test on unexpected errors.
type fx struct {
	t   *testing.T
	fs  *faultfs.FS
	mem *vfs.MemFS
}

func newFx(t *testing.T, opts ...faultfs.Option) *fx {
	mem := vfs.NewMem()
	return &fx{t: t, fs: faultfs.New(mem, opts...), mem: mem}
}

// durableFile creates name with contents data, fully durable (file synced,
// directory synced), and returns its open handle.
func (x *fx) durableFile(name string, data []byte) vfs.File {
	x.t.Helper()
	f, err := x.fs.Create(name)
	if err != nil {
		x.t.Fatal(err)
	}
	x.t.Cleanup(func() { f.Close() })
	if len(data) > 0 {
		x.write(f, data, 0)
	}
	if err := f.Sync(); err != nil {
		x.t.Fatal(err)
	}
	if err := x.fs.SyncDir("."); err != nil {
		x.t.Fatal(err)
	}
	return f
}

func (x *fx) write(f vfs.File, data []byte, off int64) {
	x.t.Helper()
	if n, err := f.WriteAt(data, off); n != len(data) || err != nil {
		x.t.Fatalf("WriteAt(%d bytes, %d) = %d, %v", len(data), off, n, err)
	}
}

func (x *fx) ok(what string, err error) {
	x.t.Helper()
	if err != nil {
		x.t.Fatalf("%s: %v", what, err)
	}
}

// fill returns n copies of c.
func fill(c byte, n int) []byte { return bytes.Repeat([]byte{c}, n) }

// cat concatenates byte slices.
func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// image renders a state's files as one string: "name=contents;..." with
// contents shown as runs ("a*512 b*512"), so sets of states compare and
// print readably.
func image(t *testing.T, s *faultfs.State) string {
	t.Helper()
	var parts []string
	for _, name := range s.Names() {
		b, err := s.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		parts = append(parts, name+"="+runs(b))
	}
	return strings.Join(parts, ";")
}

// runs describes b as runs of equal bytes: printable bytes as themselves,
// others in hex.
func runs(b []byte) string {
	var out []string
	for i := 0; i < len(b); {
		j := i
		for j < len(b) && b[j] == b[i] {
			j++
		}
		c := fmt.Sprintf("%02x", b[i])
		if b[i] >= 'a' && b[i] <= 'z' {
			c = string(b[i])
		}
		out = append(out, fmt.Sprintf("%s*%d", c, j-i))
		i = j
	}
	return strings.Join(out, " ")
}

// states enumerates every state of m at p (limit large enough to be
// exhaustive in these tests), failing on a duplicate, and returns their
// images in order.
func states(t *testing.T, p *faultfs.Point, m faultfs.Model) []string {
	t.Helper()
	var imgs []string
	seen := map[string]bool{}
	for s := range p.States(m, 1, 1<<16) {
		img := image(t, s)
		if seen[img] {
			t.Fatalf("%s: state %q yielded twice", m, img)
		}
		seen[img] = true
		imgs = append(imgs, img)
	}
	return imgs
}

// sameSet fails unless got and want hold the same strings.
func sameSet(t *testing.T, what string, got, want []string) {
	t.Helper()
	g, w := append([]string(nil), got...), append([]string(nil), want...)
	sort.Strings(g)
	sort.Strings(w)
	if strings.Join(g, "\n") != strings.Join(w, "\n") {
		t.Fatalf("%s: got %d states:\n  %s\nwant %d:\n  %s", what, len(g), strings.Join(g, "\n  "), len(w), strings.Join(w, "\n  "))
	}
}
