package harness

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

// IDVersion is the version prefix of the case IDs this package writes.
// ParseID refuses any other, so an ID never silently means a different
// case after the format changes.
const IDVersion = "c1"

// Limits of a valid Case: the harness keeps everything in memory.
const (
	MaxSize           = 64 << 20
	MaxOps            = 10000
	MaxStatesPerPoint = 4096
)

// Case is one deterministic crash-consistency run. See the package
// documentation.
type Case struct {
	// Format is "v1" (QCOW), "v2" or "v3" (QCOW2 compat 0.10 or 1.1).
	Format string `json:"format"`
	// ClusterSize in bytes: a power of two, 512..65536 for v1 and
	// 512..2 MiB for v2 and v3.
	ClusterSize int64 `json:"cluster_size"`
	// Size is the virtual disk size in bytes, a multiple of 512.
	Size int64 `json:"size"`
	// Backing gives the image a raw backing file of seeded random content.
	Backing bool `json:"backing"`
	// Model is the persistence model of the crash states.
	Model faultfs.Model `json:"-"`
	// WriteThrough opens the image in write-through mode.
	WriteThrough bool `json:"write_through"`
	// Ops is the number of workload operations.
	Ops int `json:"ops"`
	// StatesPerPoint bounds the crash states checked per crash point.
	StatesPerPoint int `json:"states_per_point"`
	// Target is the writer under test: TargetQCOW or TargetNoBarrier.
	Target string `json:"target"`
	// Seed is the root of every random choice of the case.
	Seed uint64 `json:"seed"`
}

// caseJSON is Case's JSON form, with the model by name.
type caseJSON struct {
	Version string `json:"version"`
	Model   string `json:"model"`
	caseAlias
}

type caseAlias Case

// MarshalJSON writes the case with its ID version and its model by name.
func (c Case) MarshalJSON() ([]byte, error) {
	return json.Marshal(caseJSON{Version: IDVersion, Model: c.Model.String(), caseAlias: caseAlias(c)})
}

// UnmarshalJSON reads what MarshalJSON writes and validates it.
func (c *Case) UnmarshalJSON(b []byte) error {
	var j caseJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	if j.Version != IDVersion {
		return fmt.Errorf("harness: case version %q, want %q", j.Version, IDVersion)
	}
	m, err := faultfs.ParseModel(j.Model)
	if err != nil {
		return fmt.Errorf("harness: case: %w", err)
	}
	nc := Case(j.caseAlias)
	nc.Model = m
	if err := nc.Validate(); err != nil {
		return err
	}
	*c = nc
	return nil
}

// ID returns the case's one-line ID, which ParseID reads back:
//
//	c1:FORMAT:cs=N:sz=N:b=0|1:m=MODEL:wt=0|1:ops=N:spp=N:t=TARGET:seed=0xHEX
//
// It holds no spaces or shell metacharacters, so it can be pasted after
// `crashtest repro`.
func (c Case) ID() string {
	return fmt.Sprintf("%s:%s:cs=%d:sz=%d:b=%d:m=%s:wt=%d:ops=%d:spp=%d:t=%s:seed=%#x",
		IDVersion, c.Format, c.ClusterSize, c.Size, b2i(c.Backing), c.Model, b2i(c.WriteThrough),
		c.Ops, c.StatesPerPoint, c.Target, c.Seed)
}

// String returns the ID.
func (c Case) String() string { return c.ID() }

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// ParseID parses a case ID written by Case.ID and validates the case.
func ParseID(id string) (Case, error) {
	var c Case
	parts := strings.Split(strings.TrimSpace(id), ":")
	if len(parts) < 2 || parts[0] != IDVersion {
		return c, fmt.Errorf("harness: case ID %q: want prefix %q", id, IDVersion+":")
	}
	c.Format = parts[1]
	seen := map[string]bool{}
	for _, kv := range parts[2:] {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return c, fmt.Errorf("harness: case ID %q: field %q is not key=value", id, kv)
		}
		if seen[k] {
			return c, fmt.Errorf("harness: case ID %q: field %q repeated", id, k)
		}
		seen[k] = true
		var err error
		switch k {
		case "cs":
			c.ClusterSize, err = strconv.ParseInt(v, 10, 64)
		case "sz":
			c.Size, err = strconv.ParseInt(v, 10, 64)
		case "b":
			c.Backing, err = parseBit(v)
		case "m":
			c.Model, err = faultfs.ParseModel(v)
		case "wt":
			c.WriteThrough, err = parseBit(v)
		case "ops":
			c.Ops, err = strconv.Atoi(v)
		case "spp":
			c.StatesPerPoint, err = strconv.Atoi(v)
		case "t":
			c.Target = v
		case "seed":
			c.Seed, err = strconv.ParseUint(v, 0, 64)
		default:
			return c, fmt.Errorf("harness: case ID %q: unknown field %q", id, k)
		}
		if err != nil {
			return c, fmt.Errorf("harness: case ID %q: field %q: %w", id, k, err)
		}
	}
	for _, k := range []string{"cs", "sz", "b", "m", "wt", "ops", "spp", "t", "seed"} {
		if !seen[k] {
			return c, fmt.Errorf("harness: case ID %q: missing field %q", id, k)
		}
	}
	if err := c.Validate(); err != nil {
		return c, err
	}
	return c, nil
}

func parseBit(s string) (bool, error) {
	switch s {
	case "0":
		return false, nil
	case "1":
		return true, nil
	}
	return false, errors.New("want 0 or 1")
}

// Validate reports whether the case can run.
func (c Case) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("harness: invalid case: "+format, args...)
	}
	if !validFormat(c.Format) {
		return bad("format %q (want v1, v2 or v3)", c.Format)
	}
	maxCS := int64(2 << 20)
	if c.Format == "v1" {
		maxCS = 64 << 10
	}
	if c.ClusterSize < 512 || c.ClusterSize > maxCS || c.ClusterSize&(c.ClusterSize-1) != 0 {
		return bad("cluster size %d (want a power of two in [512, %d])", c.ClusterSize, maxCS)
	}
	if c.Size < 512 || c.Size > MaxSize || c.Size%512 != 0 {
		return bad("size %d (want a multiple of 512 in [512, %d])", c.Size, MaxSize)
	}
	if _, err := faultfs.ParseModel(c.Model.String()); err != nil {
		return bad("%v", err)
	}
	if c.Ops < 0 || c.Ops > MaxOps {
		return bad("ops %d (want 0..%d)", c.Ops, MaxOps)
	}
	if c.StatesPerPoint < 1 || c.StatesPerPoint > MaxStatesPerPoint {
		return bad("states per point %d (want 1..%d)", c.StatesPerPoint, MaxStatesPerPoint)
	}
	if !validTarget(c.Target) {
		return bad("target %q (want one of %s)", c.Target, strings.Join(Targets, ", "))
	}
	if fs := targets[c.Target].Formats(); !slices.Contains(fs, c.Format) {
		return bad("format %q for target %q (it writes %s)", c.Format, c.Target, strings.Join(fs, ", "))
	}
	return nil
}
