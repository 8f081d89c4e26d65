package model

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// Snapshots is the frozen part of the reference: the views of a disk's
// internal snapshots, taken before the workload, which no write, flush,
// resize, failure or crash of the disk may change. The zero value holds
// no snapshots.
type Snapshots struct {
	names []string
	views map[string][]byte
}

// ErrSnapshot is wrapped by a *SnapshotError.
var ErrSnapshot = errors.New("model: internal snapshot changed")

// SnapshotError names the first difference between an image's snapshots
// and the frozen views.
type SnapshotError struct {
	Name   string // the snapshot
	Offset int64  // first differing byte of its view; -1 for a missing, extra or resized snapshot
	Got    []byte // up to 16 bytes of the image's view from Offset
	Want   []byte // the same bytes of the frozen view
	Detail string // what differs, in words
}

// Error describes the difference in one line.
func (e *SnapshotError) Error() string {
	if e.Offset < 0 {
		return fmt.Sprintf("model: snapshot %q: %s", e.Name, e.Detail)
	}
	return fmt.Sprintf("model: snapshot %q: %s at byte %d: got %x want %x", e.Name, e.Detail, e.Offset, e.Got, e.Want)
}

// Unwrap returns ErrSnapshot.
func (e *SnapshotError) Unwrap() error { return ErrSnapshot }

// Add freezes the view of snapshot name (its whole virtual disk; data is
// kept, not copied). Names are unique.
func (s *Snapshots) Add(name string, data []byte) error {
	if _, dup := s.views[name]; dup {
		return fmt.Errorf("model: snapshot %q added twice", name)
	}
	if s.views == nil {
		s.views = map[string][]byte{}
	}
	s.names = append(s.names, name)
	s.views[name] = data
	return nil
}

// Names returns the frozen snapshots' names in the order they were added.
func (s *Snapshots) Names() []string { return slices.Clone(s.names) }

// Frozen returns the frozen view of snapshot name (shared: never modify
// it), and whether there is one.
func (s *Snapshots) Frozen(name string) ([]byte, bool) {
	b, ok := s.views[name]
	return b, ok
}

// Len returns the number of frozen snapshots.
func (s *Snapshots) Len() int { return len(s.names) }

// View is a snapshot's view as the image under test shows it.
type View interface {
	io.ReaderAt
	// Size is the snapshot's virtual size in bytes.
	Size() int64
}

// Check verifies that views holds exactly the frozen snapshots (by name)
// and that each reads, byte for byte, as it was frozen. It returns a
// *SnapshotError for the first difference, in the order of Names.
func (s *Snapshots) Check(views map[string]View) error {
	for name := range views {
		if _, ok := s.views[name]; !ok {
			return &SnapshotError{Name: name, Offset: -1, Detail: fmt.Sprintf("not one of the %d snapshots the image had (%s)", len(s.names), strings.Join(s.names, ", "))}
		}
	}
	const chunk = 1 << 20
	var buf []byte
	for _, name := range s.names {
		want := s.views[name]
		v, ok := views[name]
		if !ok {
			return &SnapshotError{Name: name, Offset: -1, Detail: "missing"}
		}
		if n := v.Size(); n != int64(len(want)) {
			return &SnapshotError{Name: name, Offset: -1, Detail: fmt.Sprintf("virtual size %d, was %d", n, len(want))}
		}
		for off := 0; off < len(want); off += chunk {
			w := want[off:min(off+chunk, len(want))]
			if cap(buf) < len(w) {
				buf = make([]byte, len(w))
			}
			got := buf[:len(w)]
			n, err := v.ReadAt(got, int64(off))
			if n < len(got) {
				if err == nil {
					err = io.ErrUnexpectedEOF
				}
				return &SnapshotError{Name: name, Offset: -1, Detail: fmt.Sprintf("read %d bytes at %d: %v", len(got), off+n, err)}
			}
			if bytes.Equal(got, w) {
				continue
			}
			i := 0
			for got[i] == w[i] {
				i++
			}
			end := min(i+16, len(w))
			return &SnapshotError{Name: name, Offset: int64(off + i), Got: bytes.Clone(got[i:end]), Want: bytes.Clone(w[i:end]), Detail: "view differs"}
		}
	}
	return nil
}
