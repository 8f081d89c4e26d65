package model

import (
	"bytes"
	"errors"
	"testing"
)

// img is a flat in-memory image for Check.
type img []byte

func (m img) ReadAt(p []byte, off int64) (int, error) { return copy(p, m[off:]), nil }

func fill(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

func TestReadExact(t *testing.T) {
	base := img(fill(4096, 0x11))
	d := New(4096+100, base) // partial last sector; base shorter than disk
	if err := d.Write(fill(10, 0xaa), 510); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteZeroes(1024, 512); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, d.Size())
	if err := d.Read(got, 0); err != nil {
		t.Fatal(err)
	}
	want := append(fill(4096, 0x11), fill(100, 0)...)
	copy(want[510:], fill(10, 0xaa))
	copy(want[1024:], fill(512, 0))
	if !bytes.Equal(got, want) {
		t.Fatalf("read differs from expected")
	}
	if err := d.Check(img(want)); err != nil {
		t.Fatalf("exact image rejected: %v", err)
	}
	bad := bytes.Clone(want)
	bad[4096+99] = 1
	var me *MismatchError
	if err := d.Check(img(bad)); !errors.As(err, &me) || me.Sector != 8 {
		t.Fatalf("want mismatch at sector 8, got %v", err)
	}
}

func TestCrashAllowsFlushedOrLater(t *testing.T) {
	tests := []struct {
		name    string
		sector0 []byte // what the crashed image holds in sector 0
		ok      bool
	}{
		{"flushed value", fill(512, 1), true},
		{"first unflushed write", fill(512, 2), true},
		{"second unflushed write", fill(512, 3), true},
		{"initial zeros (older than flush)", fill(512, 0), false},
		{"never written value", fill(512, 9), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := New(1024, nil)
			d.Write(fill(512, 1), 0)
			d.Flush()
			d.Write(fill(512, 2), 0)
			d.Write(fill(512, 3), 0)
			d.Crash()
			if _, err := d.allowed(0); err != nil {
				t.Fatal(err)
			}
			image := img(append(tc.sector0, fill(512, 0)...))
			err := d.Check(image)
			if (err == nil) != tc.ok {
				t.Fatalf("Check = %v, want ok=%v", err, tc.ok)
			}
			if tc.ok {
				// The model adopted what it saw: only that value is allowed now.
				got := make([]byte, 512)
				if err := d.Read(got, 0); err != nil || !bytes.Equal(got, tc.sector0) {
					t.Fatalf("after adopt, Read = %x, %v", got[:4], err)
				}
				d.Crash()
				other := fill(512, 1)
				if bytes.Equal(tc.sector0, other) {
					other = fill(512, 3)
				}
				if err := d.Check(img(append(other, fill(512, 0)...))); err == nil {
					t.Fatal("after adopt, a crash must not bring back older values")
				}
			}
		})
	}
}

func TestDurabilityAfterFlush(t *testing.T) {
	d := New(512, nil)
	d.Write(fill(512, 5), 0)
	d.Flush()
	d.Crash()
	if err := d.Check(img(fill(512, 0))); err == nil {
		t.Fatal("a flushed write was lost but Check passed")
	}
	if err := d.Check(img(fill(512, 5))); err != nil {
		t.Fatal(err)
	}
}

func TestFailedWrite(t *testing.T) {
	d := New(1024, nil)
	d.Write(fill(1024, 1), 0)
	d.FailedWrite(fill(1024, 2), 0)
	if err := d.Read(make([]byte, 512), 0); !errors.Is(err, ErrAmbiguous) {
		t.Fatalf("Read after failed write: %v, want ErrAmbiguous", err)
	}
	// Old in one sector, new in the other: allowed.
	mixed := append(fill(512, 1), fill(512, 2)...)
	if err := d.Check(img(mixed)); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1024)
	if err := d.Read(got, 0); err != nil || !bytes.Equal(got, mixed) {
		t.Fatalf("after Check the model must adopt the observed values: %v", err)
	}
	// A partial write after a failed write applies to every candidate.
	d2 := New(512, nil)
	d2.FailedWrite(fill(512, 7), 0)
	d2.Write(fill(8, 9), 0)
	for _, b := range []byte{0, 7} {
		v := fill(512, b)
		copy(v, fill(8, 9))
		if err := d2.Check(img(v)); err != nil {
			t.Fatalf("candidate %d rejected: %v", b, err)
		}
		d2.FailedWrite(fill(512, 7), 0) // make it ambiguous again
		d2.Write(fill(8, 9), 0)
	}
}

func TestRange(t *testing.T) {
	d := New(1000, nil)
	for _, tc := range []struct{ off, n int64 }{{-1, 1}, {999, 2}, {1001, 0}} {
		if err := d.Write(make([]byte, tc.n), tc.off); !errors.Is(err, ErrRange) {
			t.Errorf("Write(%d,%d) = %v, want ErrRange", tc.off, tc.n, err)
		}
	}
	if err := d.Check(img(make([]byte, 10))); err == nil {
		t.Error("Check of a short image must fail")
	}
}

// zeroImg is an image that reports the ranges in zeros as reading zeros
// (whatever its bytes hold, so a test can tell whether they were read).
type zeroImg struct {
	img
	zeros [][2]int64 // [off, end) ranges reported as zeros
}

func (z zeroImg) BlockStatus(off, n int64) (int64, bool, error) {
	for _, r := range z.zeros {
		if off >= r[0] && off < r[1] {
			return min(n, r[1]-off), true, nil
		}
	}
	next := off + n
	for _, r := range z.zeros {
		if r[0] > off && r[0] < next {
			next = r[0]
		}
	}
	return next - off, false, nil
}

// TestVerifyAndZeroRanges: Verify judges like Check but adopts nothing, and
// ranges an image reports as zeros are judged as zeros without being read.
func TestVerifyAndZeroRanges(t *testing.T) {
	base := img(fill(4096, 0x11))
	tests := []struct {
		name  string
		base  img
		zeros [][2]int64
		ok    bool
	}{
		{"zero range over written zeros", nil, [][2]int64{{1024, 2048}}, true},
		{"zero range over untouched zeros", nil, [][2]int64{{2048, 4096}}, true},
		{"zero range over the flushed write", nil, [][2]int64{{0, 512}}, false},
		{"zero range over backing data", base, [][2]int64{{2048, 4096}}, false},
		{"zero range over the failed write (old value zero)", nil, [][2]int64{{512, 1024}}, true},
		{"no zero ranges", base, nil, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var b img
			if tc.base != nil {
				b = tc.base
			}
			var d *Disk
			if b != nil {
				d = New(4096, b)
			} else {
				d = New(4096, nil)
			}
			d.Write(fill(512, 1), 0)
			d.Flush()
			d.FailedWrite(fill(512, 2), 512)
			d.WriteZeroes(1024, 1024)
			d.Crash()
			// The image's bytes: what the model expects, except that the
			// zero ranges hold 0xee, which must never be read.
			want := make([]byte, 4096)
			if b != nil {
				copy(want, b)
			}
			copy(want, fill(512, 1))
			copy(want[512:], fill(512, 2))
			clear(want[1024:2048])
			for _, r := range tc.zeros {
				copy(want[r[0]:r[1]], fill(int(r[1]-r[0]), 0xee))
			}
			im := zeroImg{img(want), tc.zeros}
			err := d.Verify(im)
			if (err == nil) != tc.ok {
				t.Fatalf("Verify = %v, want ok=%v", err, tc.ok)
			}
			if !d.Crashed() {
				t.Fatal("Verify adopted the image: the crash is resolved")
			}
			if err2 := d.Check(im); (err2 == nil) != tc.ok {
				t.Fatalf("Check = %v, Verify = %v", err2, err)
			}
			if tc.ok && d.Crashed() {
				t.Fatal("a successful Check left the crash unresolved")
			}
		})
	}
}

// TestVerifyRange judges only the sectors that overlap the range.
func TestVerifyRange(t *testing.T) {
	d := New(4096+100, nil)
	d.Write(fill(512, 1), 1024)
	image := make([]byte, 4096+100)
	copy(image[1024:], fill(512, 1))
	image[100] = 7      // sector 0: wrong
	image[4096+50] = 7  // sector 8 (partial): wrong
	image[1024+511] = 9 // sector 2: wrong
	tests := []struct {
		off, n int64
		bad    int64 // first bad sector, -1 for none
	}{
		{512, 512, -1},
		{1024, 0, -1},
		{1023, 2, 2},
		{600, 3000, 2},
		{1536, 2560, -1},
		{4096, 100, 8},
		{0, 1, 0},
	}
	for _, tc := range tests {
		err := d.VerifyRange(img(image), tc.off, tc.n)
		var me *MismatchError
		switch {
		case tc.bad < 0 && err != nil:
			t.Errorf("VerifyRange(%d, %d) = %v, want nil", tc.off, tc.n, err)
		case tc.bad >= 0 && (!errors.As(err, &me) || me.Sector != tc.bad):
			t.Errorf("VerifyRange(%d, %d) = %v, want a mismatch at sector %d", tc.off, tc.n, err, tc.bad)
		}
	}
	if err := d.VerifyRange(img(image), 4000, 200); !errors.Is(err, ErrRange) {
		t.Errorf("VerifyRange past the end = %v, want ErrRange", err)
	}
}

// TestAllows checks Allows against the sector rules Verify applies:
// before a crash only current values, after one the flushed value or any
// written since, untouched sectors their initial value (base or zeros).
func TestAllows(t *testing.T) {
	base := img(fill(2048, 0x11))
	d := New(2048+100, base)
	a, b, c := fill(SectorSize, 0xaa), fill(SectorSize, 0xbb), fill(SectorSize, 0xcc)
	if err := d.Write(a, 0); err != nil {
		t.Fatal(err)
	}
	d.Flush()
	if err := d.Write(b, 0); err != nil {
		t.Fatal(err)
	}
	if err := d.FailedWrite(c, 512); err != nil {
		t.Fatal(err)
	}
	check := func(when string, off int64, v []byte, want bool) {
		t.Helper()
		got, err := d.Allows(off, v)
		if err != nil {
			t.Fatalf("%s: Allows(%d): %v", when, off, err)
		}
		if got != want {
			t.Errorf("%s: Allows(%d, %x…) = %v, want %v", when, off, v[:2], got, want)
		}
	}
	for _, tc := range []struct {
		when string
		off  int64
		v    []byte
		pre  bool // before the crash
		post bool // after it
	}{
		{"flushed value", 0, a, false, true},
		{"written since", 0, b, true, true},
		{"never written", 0, c, false, false},
		{"failed write: new", 512, c, true, true},
		{"failed write: old", 512, fill(SectorSize, 0x11), true, true},
		{"untouched: base", 1024, fill(SectorSize, 0x11), true, true},
		{"untouched: other", 1024, a, false, false},
		{"untouched past base: zeros", 2048, make([]byte, 100), true, true},
	} {
		check("before crash: "+tc.when, tc.off, tc.v, tc.pre)
		d.Crash()
		check("after crash: "+tc.when, tc.off, tc.v, tc.post)
		d.crashed = false
	}
	for _, bad := range []struct {
		off int64
		n   int
	}{{1, SectorSize}, {0, 100}, {2048, SectorSize}, {4096, SectorSize}} {
		if _, err := d.Allows(bad.off, make([]byte, bad.n)); !errors.Is(err, ErrRange) {
			t.Errorf("Allows(%d, %d bytes): err %v, want ErrRange", bad.off, bad.n, err)
		}
	}
}
