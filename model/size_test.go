package model

import (
	"bytes"
	"errors"
	"slices"
	"testing"
)

// TestSizeAfterResize walks the size's candidates through grows, failed
// grows, flushes and crashes.
func TestSizeAfterResize(t *testing.T) {
	tests := []struct {
		name string
		do   func(d *Disk) error
		want []int64 // Sizes after the crash
	}{
		{"durable grow", func(d *Disk) error { return d.Resize(2048, true) }, []int64{2048}},
		{"grow not yet flushed", func(d *Disk) error { return d.Resize(2048, false) }, []int64{1024, 2048}},
		{"grow then flush", func(d *Disk) error {
			if err := d.Resize(2048, false); err != nil {
				return err
			}
			d.Flush()
			return nil
		}, []int64{2048}},
		{"failed grow", func(d *Disk) error { return d.FailedResize(4096) }, []int64{1024, 4096}},
		{"two grows, the second failed", func(d *Disk) error {
			if err := d.Resize(2048, true); err != nil {
				return err
			}
			return d.FailedResize(4096)
		}, []int64{2048, 4096}},
		{"nothing", func(d *Disk) error { return nil }, []int64{1024}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := New(1024, nil)
			if err := tc.do(d); err != nil {
				t.Fatal(err)
			}
			d.Crash()
			if got := d.Sizes(); !slices.Equal(got, tc.want) {
				t.Fatalf("Sizes() = %v, want %v", got, tc.want)
			}
			var se *SizeError
			if err := d.CheckSize(3072); !errors.As(err, &se) || !errors.Is(err, ErrSize) {
				t.Fatalf("CheckSize(3072) = %v, want a *SizeError", err)
			}
			last := tc.want[len(tc.want)-1]
			if err := d.CheckSize(last); err != nil {
				t.Fatal(err)
			}
			if got := d.Sizes(); !slices.Equal(got, []int64{last}) {
				t.Fatalf("after adopting %d: Sizes() = %v", last, got)
			}
		})
	}
}

// TestResizeZeroesGrownRange: the range past the old size reads zeros,
// even where the initial contents go on and where a write landed while a
// failed grow made the disk bigger; a shrink is refused.
func TestResizeZeroesGrownRange(t *testing.T) {
	d := New(1024, img(fill(4096, 0x11))) // base longer than the disk
	if err := d.Write(fill(512, 2), 512); err != nil {
		t.Fatal(err)
	}
	if err := d.FailedResize(2048); err != nil {
		t.Fatal(err)
	}
	if err := d.FailedWrite(fill(512, 3), 1536); err != nil { // past the old size
		t.Fatal(err)
	}
	if err := d.Resize(3072, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 3072)
	if err := d.Read(got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(append(fill(512, 0x11), fill(512, 2)...), fill(2048, 0)...)
	if !bytes.Equal(got, want) {
		t.Fatalf("read after grow: got %x... want %x...", got[1024:1040], want[1024:1040])
	}
	d.Crash()
	if err := d.CheckSize(3072); err != nil {
		t.Fatal(err)
	}
	if err := d.Check(img(want)); err != nil {
		t.Fatalf("durable grow: %v", err)
	}
	if err := d.Resize(2048, true); !errors.Is(err, ErrRange) {
		t.Fatalf("shrink: got %v, want ErrRange", err)
	}
}

// TestCheckSizeForgetsPastSize: a crash that kept the old size drops what
// was written past it, and a later grow reads zeros there.
func TestCheckSizeForgetsPastSize(t *testing.T) {
	d := New(1024, nil)
	if err := d.Resize(2048, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Write(fill(512, 7), 1536); err != nil {
		t.Fatal(err)
	}
	d.Crash()
	if err := d.CheckSize(1024); err != nil {
		t.Fatal(err)
	}
	if err := d.Check(img(make([]byte, 1024))); err != nil {
		t.Fatal(err)
	}
	if err := d.Resize(2048, true); err != nil {
		t.Fatal(err)
	}
	if err := d.Check(img(make([]byte, 2048))); err != nil {
		t.Fatalf("grown range after a crash that lost it: %v", err)
	}
}

// view is a View over bytes.
type view []byte

func (v view) ReadAt(p []byte, off int64) (int, error) { return copy(p, v[off:]), nil }
func (v view) Size() int64                             { return int64(len(v)) }

func TestSnapshotsCheck(t *testing.T) {
	var s Snapshots
	if err := s.Add("a", fill(2048, 1)); err != nil {
		t.Fatal(err)
	}
	if err := s.Add("b", fill(1024, 2)); err != nil {
		t.Fatal(err)
	}
	if err := s.Add("a", nil); err == nil {
		t.Fatal("duplicate name accepted")
	}
	changed := fill(2048, 1)
	changed[1500] = 9
	tests := []struct {
		name   string
		views  map[string]View
		offset int64 // -2: no error
	}{
		{"same", map[string]View{"a": view(fill(2048, 1)), "b": view(fill(1024, 2))}, -2},
		{"changed byte", map[string]View{"a": view(changed), "b": view(fill(1024, 2))}, 1500},
		{"missing", map[string]View{"a": view(fill(2048, 1))}, -1},
		{"extra", map[string]View{"a": view(fill(2048, 1)), "b": view(fill(1024, 2)), "c": view(nil)}, -1},
		{"resized", map[string]View{"a": view(fill(2048, 1)), "b": view(fill(1536, 2))}, -1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := s.Check(tc.views)
			var se *SnapshotError
			switch {
			case tc.offset == -2 && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tc.offset == -2:
			case !errors.As(err, &se) || !errors.Is(err, ErrSnapshot) || se.Offset != tc.offset:
				t.Fatalf("got %v, want a *SnapshotError at offset %d", err, tc.offset)
			}
		})
	}
}
