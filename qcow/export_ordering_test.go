package qcow

// Test-only access for the external tests of ordering_test.go, which use
// the harness (importing it from package qcow's own tests would be a
// cycle).

// WriterBugs are the deliberate writer bugs (writerBugs) by value.
type WriterBugs = writerBugs

// The deliberate bugs the ordering tests break the writer with.
const (
	BugNoDataBarrier    = bugNoDataBarrier
	BugNoRefcountUpdate = bugNoRefcountUpdate
)

// SetWriterBugs gives a writable image's writer deliberate bugs.
func SetWriterBugs(im *Image, bugs WriterBugs) {
	if im.w != nil {
		im.w.bugs = bugs
	}
}
