package qcow

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
	"github.com/qcowcrash/qcowcrash/vfs"
)

// TestSizeRoundedDown: a header size that is not a multiple of 512 (qemu
// iotest 080's 65535) is read as qemu 7.2 reads it: rounded down to 65024
// by Size, reads and writes (the last 511 bytes are out of range), for
// QCOW2 and QCOW, and qemu-img info says the same.
func TestSizeRoundedDown(t *testing.T) {
	qemutest.Require(t)
	for _, format := range []string{"qcow2", "qcow"} {
		t.Run(format, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "img")
			qemutest.Create(t, path, format, "", 64<<10)
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			binary.BigEndian.PutUint64(b[24:], 65535)
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			if got := qemutest.Info(t, path).VirtualSize; got != 65024 {
				t.Fatalf("qemu-img info: virtual size %d, want 65024", got)
			}
			im, err := Open(vfs.OS, path, &Options{ReadWrite: true})
			if err != nil {
				t.Fatal(err)
			}
			defer im.Close()
			if got := im.Size(); got != 65024 {
				t.Fatalf("Size() = %d, want 65024", got)
			}
			if n, err := im.ReadAt(make([]byte, 512), 65024); n != 0 || err == nil {
				t.Fatalf("read past the rounded size: %d bytes, %v; want none and an error", n, err)
			}
			if _, err := im.WriteAt(make([]byte, 24), 65024); !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("write past the rounded size: %v, want ErrOutOfRange", err)
			}
			if _, err := im.WriteAt([]byte("the last bytes of the disk"), 65024-26); err != nil {
				t.Fatalf("write at the end of the rounded size: %v", err)
			}
			if err := im.Close(); err != nil {
				t.Fatal(err)
			}
			if code, out := qemutest.Check(t, path); format == "qcow2" && code != 0 {
				t.Fatalf("qemu-img check after our write: exit %d\n%s", code, out)
			}
		})
	}
}
