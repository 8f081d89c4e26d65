package harness

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/qcowcrash/qcowcrash/faultfs"
)

// IDVersion is the version prefix of the IDs of seed-generated cases
// (whose workload is drawn from Case.Seed). ParseID refuses unknown
// versions and unknown fields, so an ID never silently means a different
// case after the format changes.
const IDVersion = "c1"

// TraceIDVersion is the version prefix of the IDs of trace cases (whose
// workload is the explicit op list Case.Trace): shrunk cases and corpus
// entries.
const TraceIDVersion = "c2"

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
	// Explicit makes the case a trace case: its workload is Trace, not
	// drawn from Seed (which still seeds the backing file's contents, the
	// crash-state sampling and the usability check). Ops is then the
	// number of ops of Trace.
	Explicit bool `json:"-"`
	// Trace is the workload of a trace case in the compact op encoding of
	// EncodeOps ("w0+512.1f,f,z300+100"); the JSON form lists the ops.
	// Use WithTrace to set it.
	Trace string `json:"-"`
	// Setup is a workload in the same encoding that this project's qcow
	// writer applies and closes, durably, before the recorded workload
	// starts: it shapes the image (fills it, grows its tables) and is not
	// crash-checked. Trace cases only.
	Setup string `json:"-"`
	// Image names a recipe for the image the workload starts from instead
	// of a fresh qcow.Create: ImageQemuCompressed (trace cases only) or
	// ImageQemuSnapshot. Empty: a fresh image.
	Image string `json:"image,omitempty"`
	// Grow lets a seed-generated case's workload resize (grow) the disk
	// (see Workload); only for targets that resize (see Resizer). Trace
	// cases hold their resize ops in Trace.
	Grow bool `json:"grow,omitempty"`
	// Faults is the fault plan: a faultfs injector in its DSL (see
	// faultfs.ParseInjector), consulted before every file operation of the
	// recorded workload. Empty: no faults.
	Faults string `json:"faults,omitempty"`
}

// caseJSON is Case's JSON form, with the model by name and a trace
// case's ops listed.
type caseJSON struct {
	Version string `json:"version"`
	Model   string `json:"model"`
	caseAlias
	Setup []Op `json:"setup,omitempty"`
	Trace []Op `json:"trace,omitempty"`
}

type caseAlias Case

// version returns the ID version of the case.
func (c Case) version() string {
	if c.Explicit {
		return TraceIDVersion
	}
	return IDVersion
}

// MarshalJSON writes the case with its ID version, its model by name and,
// for a trace case, its ops.
func (c Case) MarshalJSON() ([]byte, error) {
	j := caseJSON{Version: c.version(), Model: c.Model.String(), caseAlias: caseAlias(c)}
	if c.Explicit {
		var err error
		if j.Trace, err = DecodeOps(c.Trace); err != nil {
			return nil, fmt.Errorf("harness: case trace: %w", err)
		}
		if j.Setup, err = DecodeOps(c.Setup); err != nil {
			return nil, fmt.Errorf("harness: case setup: %w", err)
		}
		if j.Trace == nil {
			j.Trace = []Op{} // an empty trace case still says it is one
		}
	}
	return json.Marshal(j)
}

// UnmarshalJSON reads what MarshalJSON writes and validates it.
func (c *Case) UnmarshalJSON(b []byte) error {
	var j caseJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return err
	}
	if j.Version != IDVersion && j.Version != TraceIDVersion {
		return fmt.Errorf("harness: case version %q, want %q or %q", j.Version, IDVersion, TraceIDVersion)
	}
	m, err := faultfs.ParseModel(j.Model)
	if err != nil {
		return fmt.Errorf("harness: case: %w", err)
	}
	nc := Case(j.caseAlias)
	nc.Model = m
	nc.Explicit, nc.Trace, nc.Setup = false, "", ""
	if j.Version == TraceIDVersion {
		nc = nc.WithTrace(j.Trace)
		if nc.Setup, err = EncodeOps(j.Setup); err != nil {
			return fmt.Errorf("harness: case setup: %w", err)
		}
		if _, err := EncodeOps(j.Trace); err != nil {
			return fmt.Errorf("harness: case trace: %w", err)
		}
	} else if j.Trace != nil || j.Setup != nil {
		return fmt.Errorf("harness: case version %q has no trace or setup (want %q)", j.Version, TraceIDVersion)
	}
	if err := nc.Validate(); err != nil {
		return err
	}
	*c = nc
	return nil
}

// WithTrace returns c as a trace case whose workload is ops (then a
// close, which ops must not hold). Kinds other than write, zero, flush and
// resize are reported by Validate.
func (c Case) WithTrace(ops []Op) Case {
	enc, err := EncodeOps(ops)
	if err != nil {
		enc = "!" + err.Error() // Validate reports it
	}
	c.Explicit, c.Trace, c.Ops, c.Grow = true, enc, len(ops), false
	return c
}

// AsTrace returns c as a trace case with the same workload (and so the
// same verdict): the form a case is shrunk and stored in.
func (c Case) AsTrace() Case {
	if c.Explicit {
		return c
	}
	w := c.Workload()
	return c.WithTrace(w[:len(w)-1])
}

// ID returns the case's one-line ID, which ParseID reads back. A
// seed-generated case:
//
//	c1:FORMAT:cs=N:sz=N:b=0|1:m=MODEL:wt=0|1:ops=N:spp=N:t=TARGET:seed=0xHEX[:img=RECIPE][:grow=1][:f=FAULTS]
//
// and a trace case, whose ops field holds the ops themselves (EncodeOps)
// and which may carry setup ops:
//
//	c2:FORMAT:cs=N:sz=N:b=0|1:m=MODEL:wt=0|1:ops=OPS:spp=N:t=TARGET:seed=0xHEX[:pre=OPS][:f=FAULTS]
//
// FAULTS is the fault plan's DSL text in unpadded base64url, present only
// with a fault plan, so the IDs of cases without faults are exactly what
// they were before fault plans existed; likewise img (an image recipe)
// and grow=1 (Case.Grow) appear only when set, so an older ID parses to
// the case it always meant. An ID holds no spaces or shell
// metacharacters, so it can be pasted after `crashtest repro`.
func (c Case) ID() string {
	ops := strconv.Itoa(c.Ops)
	if c.Explicit {
		ops = c.Trace
	}
	id := fmt.Sprintf("%s:%s:cs=%d:sz=%d:b=%d:m=%s:wt=%d:ops=%s:spp=%d:t=%s:seed=%#x",
		c.version(), c.Format, c.ClusterSize, c.Size, b2i(c.Backing), c.Model, b2i(c.WriteThrough),
		ops, c.StatesPerPoint, c.Target, c.Seed)
	if c.Explicit && c.Setup != "" {
		id += ":pre=" + c.Setup
	}
	if c.Image != "" {
		id += ":img=" + c.Image
	}
	if c.Grow && !c.Explicit {
		id += ":grow=1"
	}
	if c.Faults != "" {
		id += ":f=" + base64.RawURLEncoding.EncodeToString([]byte(c.Faults))
	}
	return id
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
	if len(parts) < 2 || (parts[0] != IDVersion && parts[0] != TraceIDVersion) {
		return c, fmt.Errorf("harness: case ID %q: want prefix %q or %q", shorten(id, 200), IDVersion+":", TraceIDVersion+":")
	}
	c.Explicit = parts[0] == TraceIDVersion
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
			if c.Explicit {
				var ops []Op
				if ops, err = DecodeOps(v); err == nil {
					c = c.WithTrace(ops)
				}
			} else {
				c.Ops, err = strconv.Atoi(v)
			}
		case "pre":
			if !c.Explicit {
				err = fmt.Errorf("only %s IDs have setup ops", TraceIDVersion)
				break
			}
			if _, err = DecodeOps(v); err == nil {
				c.Setup = v
			}
		case "img":
			c.Image = v
		case "grow":
			if c.Explicit {
				err = fmt.Errorf("only %s IDs have grow (a trace lists its resizes)", IDVersion)
				break
			}
			if c.Grow, err = parseBit(v); err == nil && !c.Grow {
				err = errors.New("want 1 (omit the field for 0)")
			}
		case "f":
			var b []byte
			if b, err = base64.RawURLEncoding.DecodeString(v); err == nil {
				c.Faults = string(b)
				if c.Faults == "" {
					err = errors.New("empty fault plan")
				}
			}
		case "spp":
			c.StatesPerPoint, err = strconv.Atoi(v)
		case "t":
			c.Target = v
		case "seed":
			c.Seed, err = strconv.ParseUint(v, 0, 64)
		default:
			return c, fmt.Errorf("harness: case ID %q: unknown field %q", shorten(id, 200), k)
		}
		if err != nil {
			return c, fmt.Errorf("harness: case ID %q: field %q: %w", shorten(id, 200), k, err)
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
	if c.Explicit {
		ops, err := DecodeOps(c.Trace)
		if err != nil {
			return bad("trace: %v", err)
		}
		if len(ops) != c.Ops {
			return bad("trace of %d ops, but ops %d", len(ops), c.Ops)
		}
		setup, err := DecodeOps(c.Setup)
		if err != nil {
			return bad("setup: %v", err)
		}
		if len(setup) > MaxOps {
			return bad("%d setup ops (want at most %d)", len(setup), MaxOps)
		}
		size := c.Size
		for i, o := range append(setup, ops...) {
			switch {
			case (o.Kind == OpWrite || o.Kind == OpZero) && o.Off+o.Len > size:
				return bad("op %s ends beyond the %d-byte disk", o, size)
			case o.Kind == OpResize && i < len(setup):
				return bad("op %s: setup ops cannot resize", o)
			case o.Kind == OpResize && (o.Size < size || o.Size%512 != 0):
				return bad("op %s: want a grow from %d bytes to a multiple of 512", o, size)
			case o.Kind == OpResize && !targetResizes(c.Target):
				return bad("op %s: target %q cannot resize", o, c.Target)
			case o.Kind == OpResize:
				size = o.Size
			}
		}
	} else if c.Trace != "" || c.Setup != "" || (c.Image != "" && c.Image != ImageQemuSnapshot) {
		return bad("trace, setup ops or image recipe %q in a seed-generated case", c.Image)
	}
	if c.Grow && !targetResizes(c.Target) {
		return bad("grow: target %q cannot resize", c.Target)
	}
	if c.Image != "" {
		if err := c.validImage(); err != nil {
			return bad("%v", err)
		}
	}
	if c.Faults != "" {
		if _, err := faultfs.ParseInjector(c.Faults); err != nil {
			return bad("fault plan %q: %v", c.Faults, err)
		}
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
