package harness

import (
	"strings"
	"testing"

	"github.com/qcowcrash/qcowcrash/internal/qemutest"
)

// TestRecipeCache: a case whose qemu image was built once runs again
// without qemu (shrinking and soak rebuild the same image many times),
// while a case with another image still needs qemu.
func TestRecipeCache(t *testing.T) {
	qemutest.Require(t)
	for _, id := range []string{
		"c1:v3:cs=4096:sz=65536:b=0:m=torn:wt=0:ops=6:spp=2:t=qcow:seed=0x91:img=qemu-snapshot",
		"c2:v2:cs=4096:sz=65536:b=0:m=torn:wt=0:ops=w100+1000.1,f,z8192+4096:spp=2:t=qcow:seed=0x92:img=qemu-compressed",
	} {
		c, err := ParseID(id)
		if err != nil {
			t.Fatal(err)
		}
		t.Run(c.Image, func(t *testing.T) {
			first := Run(c)
			if !first.OK {
				t.Fatalf("%s: %v", id, first.Failure)
			}
			t.Setenv("PATH", t.TempDir()) // restored when the subtest ends
			again := Run(c)
			if !again.OK || again.States != first.States || again.FileOps != first.FileOps {
				t.Fatalf("%s without qemu: %+v, want the first run's verdict %+v", id, again, first)
			}
			other := c
			other.Seed++
			v := Run(other)
			if v.OK || v.Failure.Kind != KindSetup || !strings.Contains(v.Failure.Detail, ErrNoQemuImg.Error()) {
				t.Fatalf("%s: another image without qemu gave %+v, want a setup failure naming qemu-img", id, v.Failure)
			}
		})
	}
}
