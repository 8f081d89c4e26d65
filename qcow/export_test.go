package qcow

// The deliberate bugs the external tests of crash_harness_test.go run the
// writer with (WriterBugs and SetWriterBugs: export_ordering_test.go).
const (
	BugSnapshotInPlace  = bugSnapshotInPlace
	BugResizeNotDurable = bugResizeNotDurable
)
