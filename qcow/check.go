package qcow

// FindingKind classifies a check finding with qemu-img check's meaning.
type FindingKind int

const (
	// Corruption is a structural error: data may be lost or misread.
	Corruption FindingKind = iota
	// Leak is a cluster whose refcount is higher than its references:
	// harmless space loss, repairable.
	Leak
)

// String returns "corruption" or "leak".
func (k FindingKind) String() string {
	if k == Leak {
		return "leak"
	}
	return "corruption"
}

// Finding is one problem found by Check: what it is, where, and why.
type Finding struct {
	Kind   FindingKind `json:"-"`
	Offset int64       `json:"offset"` // host offset of the structure or cluster concerned
	Msg    string      `json:"message"`
}

// CheckResult is the outcome of Check; it lists every finding, not just the
// first.
type CheckResult struct {
	Findings          []Finding `json:"findings"`
	Corruptions       int       `json:"corruptions"`
	Leaks             int       `json:"leaks"`
	AllocatedClusters int64     `json:"allocated-clusters"`
	TotalClusters     int64     `json:"total-clusters"`
	ImageEndOffset    int64     `json:"image-end-offset"`
}

// Check verifies the image's structure read-only (not its backing chain) with
// the meaning of `qemu-img check`: overlapping metadata, offsets beyond the
// end of the file or unaligned, reserved bits, refcount mismatches (QCOW2),
// leaked clusters, bad compressed descriptors. It returns an error only when
// the check cannot complete (for example an I/O error).
func (im *Image) Check() (*CheckResult, error) {
	return im.check()
}
