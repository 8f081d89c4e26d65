package qcow

// FindingKind classifies a check finding with qemu-img check's meaning.
type FindingKind int

const (
	// Corruption is a structural error: data may be lost or misread.
	Corruption FindingKind = iota
	// Leak is a cluster whose refcount is higher than its references:
	// harmless space loss, repairable.
	Leak
	// CheckError is a part of the image that could not be checked (qemu's
	// "check errors", e.g. a refcount that cannot be read because its
	// refcount block is unaligned). qemu-img check exits 1 when any occur.
	CheckError
)

// String returns "corruption", "leak" or "check-error".
func (k FindingKind) String() string {
	switch k {
	case Leak:
		return "leak"
	case CheckError:
		return "check-error"
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
// first. The counts follow qemu-img check: Corruptions, Leaks and
// CheckErrors count every occurrence (a structure referenced n times counts
// n times), while Findings is capped at MaxCheckFindings entries. The exit
// status of `qemu-img check` is 1 if CheckErrors > 0, else 2 if
// Corruptions > 0, else 3 if Leaks > 0, else 0.
type CheckResult struct {
	Format             Format    `json:"format"`
	Findings           []Finding `json:"findings"`
	Corruptions        int       `json:"corruptions"`
	Leaks              int       `json:"leaks"`
	CheckErrors        int       `json:"check-errors"`
	AllocatedClusters  int64     `json:"allocated-clusters"`
	TotalClusters      int64     `json:"total-clusters"`
	FragmentedClusters int64     `json:"fragmented-clusters"`
	CompressedClusters int64     `json:"compressed-clusters"`
	ImageEndOffset     int64     `json:"image-end-offset"`
}

// Check verifies the image's structure read-only (not its backing chain) with
// the meaning of `qemu-img check`: overlapping metadata, offsets beyond the
// end of the file or unaligned, reserved bits, refcount mismatches (QCOW2),
// leaked clusters, bad compressed descriptors. It returns an error only when
// the check cannot complete (for example an I/O error).
func (im *Image) Check() (*CheckResult, error) {
	res, err := im.check()
	if res != nil {
		res.Format = im.format
	}
	return res, err
}
