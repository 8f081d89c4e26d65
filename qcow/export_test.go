package qcow

// For the external tests (package qcow_test), which run this writer with
// deliberate bugs as a harness target.

// WriterBugs is writerBugs.
type WriterBugs = writerBugs

// The deliberate bugs the external tests use.
const (
	BugSnapshotInPlace  = bugSnapshotInPlace
	BugResizeNotDurable = bugResizeNotDurable
)

// SetWriterBugs gives the writer of im (open for writing) the bugs b.
func SetWriterBugs(im *Image, b WriterBugs) { im.w.bugs = b }
