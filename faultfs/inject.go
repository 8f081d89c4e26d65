package faultfs

import (
	"errors"
	"fmt"
	"path"
	"strconv"
	"strings"
	"syscall"
)

// ErrInjected is wrapped by every error faultfs injects, including the
// errors of a crashed FS.
var ErrInjected = errors.New("faultfs: injected error")

// ErrCrashed is wrapped by the error of the operation a Crash action fired
// on and of every later operation on the FS and its files.
var ErrCrashed = errors.New("faultfs: file system has crashed")

// InjectedError is the error of an operation that an injector failed. It
// wraps ErrInjected and Errno (syscall.EIO or syscall.ENOSPC), and
// ErrCrashed too when Action is Crash or the FS had crashed already.
type InjectedError struct {
	Op     Op // the operation, without Data, Written and Err
	Action Action
	Errno  syscall.Errno
}

// Error describes the fault.
func (e *InjectedError) Error() string {
	if e.Action.Fault == FaultCrash {
		return fmt.Sprintf("faultfs: %s: crashed (op #%d): %v", e.Op.Kind, e.Op.Index, e.Errno)
	}
	return fmt.Sprintf("faultfs: %s: injected %s (op #%d): %v", e.Op.Kind, e.Action, e.Op.Index, e.Errno)
}

// Unwrap returns ErrInjected, ErrCrashed for a crash, and the errno.
func (e *InjectedError) Unwrap() []error {
	if e.Action.Fault == FaultCrash {
		return []error{ErrInjected, ErrCrashed, e.Errno}
	}
	return []error{ErrInjected, e.Errno}
}

// Fault is the kind of an injected fault.
type Fault uint8

// The faults. A fault that does not fit the operation it fires on (a short
// write on a sync, an fsync-drop on a read) acts as FaultEIO.
const (
	// NoFault: the operation runs normally.
	NoFault Fault = iota
	// FaultEIO: the operation fails with EIO and has no effect.
	FaultEIO
	// FaultENOSPC: the operation fails with ENOSPC and has no effect.
	FaultENOSPC
	// FaultShortWrite: a write writes a seeded prefix (shorter than asked,
	// possibly empty) and fails with ENOSPC, as a write into a full disk does.
	FaultShortWrite
	// FaultTear: a write writes a seeded subset of its sectors (sector size
	// of the FS, aligned to file offsets) and fails with EIO.
	FaultTear
	// FaultFsyncDrop: a sync, datasync or sync-range fails with EIO and the
	// dirty data it covered is dropped: those pending writes will never be
	// durable, and the live contents revert to the durable contents for
	// them, as Linux does after a writeback error (the behaviour that broke
	// PostgreSQL's retry-the-fsync logic). Pending size changes stay
	// pending.
	FaultFsyncDrop
	// FaultCrash: the operation and every later one fail with ErrCrashed and
	// have no effect; the FS's crash states are those after the previous
	// operation.
	FaultCrash
	numFaults
)

var faultNames = [numFaults]string{
	NoFault:         "none",
	FaultEIO:        "eio",
	FaultENOSPC:     "enospc",
	FaultShortWrite: "short-write",
	FaultTear:       "tear",
	FaultFsyncDrop:  "fsync-drop",
	FaultCrash:      "crash",
}

// String returns the fault's DSL name.
func (f Fault) String() string {
	if f < numFaults {
		return faultNames[f]
	}
	return fmt.Sprintf("fault(%d)", uint8(f))
}

// Action is what an injector does to an operation: a fault and, for the
// seeded faults (short-write, tear), the seed that picks how much is
// written. The zero Action injects nothing.
//
// An Action is itself an Injector that fires on every operation.
type Action struct {
	Fault Fault
	Seed  uint64
}

// The unparameterised actions.
var (
	EIO       = Action{Fault: FaultEIO}
	ENOSPC    = Action{Fault: FaultENOSPC}
	FsyncDrop = Action{Fault: FaultFsyncDrop}
	Crash     = Action{Fault: FaultCrash}
)

// ShortWrite returns the action that makes a write write a seeded prefix and
// fail with ENOSPC.
func ShortWrite(seed uint64) Action { return Action{Fault: FaultShortWrite, Seed: seed} }

// TearThenFail returns the action that makes a write write a seeded subset
// of its sectors and fail with EIO.
func TearThenFail(seed uint64) Action { return Action{Fault: FaultTear, Seed: seed} }

// String returns the action in the DSL: "eio", "(short-write 7)", ...
func (a Action) String() string {
	switch a.Fault {
	case FaultShortWrite, FaultTear:
		return fmt.Sprintf("(%s %d)", a.Fault, a.Seed)
	}
	return a.Fault.String()
}

// MaybeInject returns a: an Action fires on every operation.
func (a Action) MaybeInject(Op) Action { return a }

// errno is the error number the action reports.
func (a Action) errno() syscall.Errno {
	switch a.Fault {
	case FaultENOSPC, FaultShortWrite:
		return syscall.ENOSPC
	}
	return syscall.EIO
}

// Injector decides, for each operation before it runs, whether to inject a
// fault. MaybeInject sees the op's Index, Kind, File, Path, Offset and
// Length (not its data) and returns the zero Action for no fault. It must be
// deterministic: the same op must get the same answer. String returns the
// injector in the DSL that ParseInjector reads.
type Injector interface {
	fmt.Stringer
	MaybeInject(op Op) Action
}

// Predicate selects operations for a Rule. String returns it in the DSL.
type Predicate interface {
	fmt.Stringer
	Match(op Op) bool
}

// Rule returns the injector that applies act to the operations pred
// matches: "(rule PRED ACTION)".
func Rule(pred Predicate, act Action) Injector { return rule{pred, act} }

type rule struct {
	pred Predicate
	act  Action
}

func (r rule) String() string {
	if sh, ok := r.short(); ok {
		return sh
	}
	return fmt.Sprintf("(rule %s %s)", r.pred, r.act)
}

func (r rule) MaybeInject(op Op) Action {
	if r.pred.Match(op) {
		return r.act
	}
	return Action{}
}

// Event returns the predicate that matches the operations labelled label
// (Op.Label, see FS.Label): every one when nth is 0, else only the nth
// (from 1). "(event STRING)", "(event STRING N)". faultfs gives labels no
// meaning; a writer names with them what each operation is for.
func Event(label string, nth int) Predicate { return eventPred{label: label, nth: max(nth, 0)} }

// After returns the predicate that matches the operation right after an
// operation labelled label (every one when nth is 0, else only the nth,
// from 1): with Crash, a crash just after that operation completed.
// "(after STRING)", "(after STRING N)".
func After(label string, nth int) Predicate {
	return eventPred{label: label, nth: max(nth, 0), after: true}
}

type eventPred struct {
	label string
	nth   int // 0: every matching operation
	after bool
}

func (e eventPred) String() string {
	name := "event"
	if e.after {
		name = "after"
	}
	if e.nth == 0 {
		return fmt.Sprintf("(%s %s)", name, strconv.Quote(e.label))
	}
	return fmt.Sprintf("(%s %s %d)", name, strconv.Quote(e.label), e.nth)
}

func (e eventPred) Match(op Op) bool {
	label, seq := op.Label, op.LabelSeq
	if e.after {
		if op.Index == 0 {
			return false
		}
		label, seq = op.PrevLabel, op.PrevLabelSeq
	}
	return label == e.label && (e.nth == 0 || seq == e.nth-1)
}

// short returns the rule in the DSL's short form, ACTION@[after:]EVENT
// with "#N" for the nth matching operation (none for the first) or "*"
// for every one, when it has one: an event or after predicate, an action
// with a short name, a label that is a plain atom.
func (r rule) short() (string, bool) {
	e, ok := r.pred.(eventPred)
	if !ok || e.label == "" || strings.ContainsAny(e.label, shortSpecials) || strings.HasPrefix(e.label, "after:") {
		return "", false
	}
	act, ok := shortActionName(r.act)
	if !ok {
		return "", false
	}
	s := act + "@"
	if e.after {
		s += "after:"
	}
	s += e.label
	switch e.nth {
	case 0:
		s += "*"
	case 1:
	default:
		s += fmt.Sprintf("#%d", e.nth)
	}
	return s, true
}

// shortSpecials are the characters a label of a short form may not hold.
const shortSpecials = " \t\n\r()\"@#*"

// shortActions are the actions of the short form by name (the seeded ones
// with seed 0).
var shortActions = map[string]Action{
	"eio": EIO, "enospc": ENOSPC, "crash": Crash, "fsync-drop": FsyncDrop,
	"short": ShortWrite(0), "tear": TearThenFail(0),
}

func shortActionName(a Action) (string, bool) {
	for name, b := range shortActions {
		if a == b {
			return name, true
		}
	}
	return "", false
}

// Any returns the injector that asks each of injs in turn and applies the
// first fault: "(any INJ...)".
func Any(injs ...Injector) Injector { return anyInj(injs) }

type anyInj []Injector

func (a anyInj) String() string {
	parts := make([]string, len(a))
	for i, inj := range a {
		parts[i] = inj.String()
	}
	return "(any " + strings.Join(parts, " ") + ")"
}

func (a anyInj) MaybeInject(op Op) Action {
	for _, inj := range a {
		if act := inj.MaybeInject(op); act.Fault != NoFault {
			return act
		}
	}
	return Action{}
}

// Always matches every operation: "true".
func Always() Predicate { return always{} }

type always struct{}

func (always) String() string { return "true" }
func (always) Match(Op) bool  { return true }

// OnIndex matches the operation with log index n: "(index N)".
func OnIndex(n int) Predicate { return onIndex(n) }

type onIndex int

func (o onIndex) String() string { return fmt.Sprintf("(index %d)", int(o)) }

func (o onIndex) Match(op Op) bool { return op.Index == int(o) }

// Kinds matches operations whose kind is in ks: "(kind write sync ...)".
func Kinds(ks OpKinds) Predicate { return kinds(ks & AllKinds) }

type kinds OpKinds

func (k kinds) String() string {
	var b strings.Builder
	b.WriteString("(kind")
	for _, kk := range OpKinds(k).List() {
		b.WriteByte(' ')
		b.WriteString(kk.String())
	}
	b.WriteByte(')')
	return b.String()
}

func (k kinds) Match(op Op) bool { return OpKinds(k).Has(op.Kind) }

// PathMatch matches operations whose path, or the path's last element,
// matches the shell pattern glob (path.Match syntax): "(path "*.qcow2")".
// A malformed pattern matches nothing.
func PathMatch(glob string) Predicate { return pathMatch(glob) }

type pathMatch string

func (p pathMatch) String() string { return "(path " + strconv.Quote(string(p)) + ")" }

func (p pathMatch) Match(op Op) bool {
	if ok, _ := path.Match(string(p), op.Path); ok {
		return true
	}
	ok, _ := path.Match(string(p), path.Base(op.Path))
	return ok
}

// OffsetRange matches reads, writes, allocates and sync-ranges whose byte
// range overlaps [lo, hi), and truncates whose new size lies in it:
// "(offset LO HI)".
func OffsetRange(lo, hi int64) Predicate { return offsetRange{lo, hi} }

type offsetRange struct{ lo, hi int64 }

func (o offsetRange) String() string { return fmt.Sprintf("(offset %d %d)", o.lo, o.hi) }

func (o offsetRange) Match(op Op) bool {
	switch op.Kind {
	case OpRead, OpWrite, OpAllocate, OpSyncRange:
		end := op.Offset + max(op.Length, 1)
		return op.Offset < o.hi && end > o.lo
	case OpTruncate:
		return op.Offset >= o.lo && op.Offset < o.hi
	}
	return false
}

// Randomly matches each operation with probability p, decided by a hash of
// seed and the op's index, so the same op always gets the same answer:
// "(randomly P SEED)". p is clamped to [0, 1].
func Randomly(p float64, seed uint64) Predicate {
	if !(p >= 0) { // also NaN
		p = 0
	}
	return randomly{min(p, 1), seed}
}

type randomly struct {
	p    float64
	seed uint64
}

func (r randomly) String() string {
	return fmt.Sprintf("(randomly %s %d)", strconv.FormatFloat(r.p, 'g', -1, 64), r.seed)
}

func (r randomly) Match(op Op) bool {
	return unitFloat(mix(r.seed, uint64(op.Index))) < r.p
}

// And matches when every one of ps does (and so always, for none):
// "(and P...)".
func And(ps ...Predicate) Predicate { return and(ps) }

type and []Predicate

func (a and) String() string { return joinPreds("and", a) }

func (a and) Match(op Op) bool {
	for _, p := range a {
		if !p.Match(op) {
			return false
		}
	}
	return true
}

// Or matches when any of ps does (and so never, for none): "(or P...)".
func Or(ps ...Predicate) Predicate { return or(ps) }

type or []Predicate

func (o or) String() string { return joinPreds("or", o) }

func (o or) Match(op Op) bool {
	for _, p := range o {
		if p.Match(op) {
			return true
		}
	}
	return false
}

// Not matches when p does not: "(not P)".
func Not(p Predicate) Predicate { return not{p} }

type not struct{ p Predicate }

func (n not) String() string   { return "(not " + n.p.String() + ")" }
func (n not) Match(op Op) bool { return !n.p.Match(op) }

func joinPreds(head string, ps []Predicate) string {
	var b strings.Builder
	b.WriteString("(" + head)
	for _, p := range ps {
		b.WriteByte(' ')
		b.WriteString(p.String())
	}
	b.WriteByte(')')
	return b.String()
}
