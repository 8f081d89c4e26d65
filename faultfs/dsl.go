package faultfs

import (
	"fmt"
	"math"
	"strconv"
	"strings"
)

// The injector DSL: s-expressions, so that any injector's String() can be
// pasted into a test, a corpus entry or `crashtest repro`. Grammar:
//
//	injector  = action
//	          | short
//	          | "(" "rule" predicate action ")"
//	          | "(" "any" injector { injector } ")"
//	short     = SHORTACT "@" [ "after:" ] EVENT [ "#" N | "*" ]
//	predicate = "true"
//	          | "(" "index" INT ")"
//	          | "(" "event" STRING [ N ] ")"
//	          | "(" "after" STRING [ N ] ")"
//	          | "(" "kind" KIND { KIND } ")"
//	          | "(" "path" STRING ")"
//	          | "(" "offset" INT INT ")"
//	          | "(" "randomly" FLOAT UINT ")"
//	          | "(" "and" { predicate } ")"
//	          | "(" "or" { predicate } ")"
//	          | "(" "not" predicate ")"
//	action    = "eio" | "enospc" | "fsync-drop" | "crash"
//	          | "(" "short-write" UINT ")"
//	          | "(" "tear" UINT ")"
//	KIND      = "create" | "open" | "read" | "write" | "truncate" | "allocate"
//	          | "sync" | "datasync" | "sync-range" | "sync-dir" | "remove"
//	          | "close" | "stat" | "size"
//	SHORTACT  = "eio" | "enospc" | "crash" | "fsync-drop" | "short" | "tear"
//
// STRING is a Go double-quoted string literal; INT a decimal int64; UINT a
// decimal uint64 (a seed); N a decimal int >= 1; FLOAT a Go float literal
// in [0, 1]. Tokens are separated by white space or parentheses. Example:
//
//	(any (rule (and (kind write) (path "*.qcow2") (index 12)) (short-write 7))
//	     (rule (kind sync datasync) fsync-drop))
//
// Events. The event and after predicates match operations by their label
// (Op.Label: what the writer said an operation is for, an opaque string to
// faultfs): (event "l2_update") every operation labelled l2_update,
// (event "l2_update" 2) only the second, (after "l1_update" 1) the
// operation right after the first one labelled l1_update (with crash: a
// crash just after it completed). The short form is one token for a rule
// with such a predicate, in the words of qemu's blkdebug rules (once=on
// is the default, "*" is once=off):
//
//	eio@l2_update#2            (rule (event "l2_update" 2) eio)
//	enospc@refblock_alloc_write (rule (event "refblock_alloc_write" 1) enospc): once, the first
//	crash@after:l1_update      (rule (after "l1_update" 1) crash)
//	short@cow_write*           (rule (event "cow_write") (short-write 0)): always, every one
//
// short and tear are short-write and tear with seed 0. A rule that has a
// short form prints as it; one whose label holds white space, a
// parenthesis, a quote, "@", "#" or "*" (or starts with "after:"), or
// whose action is seeded otherwise, prints in the long form. Unlike
// blkdebug's once=off, which fails every request after the event, "*"
// fails every operation labelled with it (and only those).

// ParseInjector parses an injector written in the DSL above. For every
// injector inj built by this package, ParseInjector(inj.String()) returns an
// equivalent injector with the same String.
func ParseInjector(s string) (Injector, error) {
	p := &parser{toks: tokenize(s)}
	inj, err := p.injector()
	if err != nil {
		return nil, err
	}
	if p.pos < len(p.toks) {
		return nil, p.errorf("unexpected %q after the injector", p.toks[p.pos])
	}
	return inj, nil
}

// ParsePredicate parses a predicate written in the DSL.
func ParsePredicate(s string) (Predicate, error) {
	p := &parser{toks: tokenize(s)}
	pred, err := p.predicate()
	if err != nil {
		return nil, err
	}
	if p.pos < len(p.toks) {
		return nil, p.errorf("unexpected %q after the predicate", p.toks[p.pos])
	}
	return pred, nil
}

// tokenize splits s into "(", ")", quoted strings and atoms.
func tokenize(s string) []string {
	var toks []string
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			i++
		case c == '(' || c == ')':
			toks = append(toks, s[i:i+1])
			i++
		case c == '"':
			j := i + 1
			for j < len(s) && s[j] != '"' {
				if s[j] == '\\' {
					j++
				}
				j++
			}
			j = min(j+1, len(s))
			toks = append(toks, s[i:j])
			i = j
		default:
			j := i
			for j < len(s) && !strings.ContainsRune(" \t\n\r()\"", rune(s[j])) {
				j++
			}
			toks = append(toks, s[i:j])
			i = j
		}
	}
	return toks
}

type parser struct {
	toks []string
	pos  int
}

func (p *parser) errorf(format string, args ...any) error {
	return fmt.Errorf("faultfs: parsing injector at token %d: %s", p.pos, fmt.Sprintf(format, args...))
}

func (p *parser) peek() string {
	if p.pos < len(p.toks) {
		return p.toks[p.pos]
	}
	return ""
}

func (p *parser) next() (string, error) {
	if p.pos >= len(p.toks) {
		return "", p.errorf("unexpected end of input")
	}
	t := p.toks[p.pos]
	p.pos++
	return t, nil
}

func (p *parser) expect(tok string) error {
	t, err := p.next()
	if err != nil {
		return err
	}
	if t != tok {
		return p.errorf("got %q, want %q", t, tok)
	}
	return nil
}

// head consumes "(" and the form's name.
func (p *parser) head() (string, error) {
	if err := p.expect("("); err != nil {
		return "", err
	}
	return p.next()
}

func (p *parser) int64() (int64, error) {
	t, err := p.next()
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil {
		return 0, p.errorf("bad integer %q", t)
	}
	return v, nil
}

func (p *parser) uint64() (uint64, error) {
	t, err := p.next()
	if err != nil {
		return 0, err
	}
	v, err := strconv.ParseUint(t, 10, 64)
	if err != nil {
		return 0, p.errorf("bad seed %q", t)
	}
	return v, nil
}

func (p *parser) injector() (Injector, error) {
	if t := p.peek(); t != "(" && strings.Contains(t, "@") {
		p.pos++
		return p.short(t)
	}
	if p.peek() != "(" {
		return p.action()
	}
	save := p.pos
	name, err := p.head()
	if err != nil {
		return nil, err
	}
	switch name {
	case "rule":
		pred, err := p.predicate()
		if err != nil {
			return nil, err
		}
		act, err := p.action()
		if err != nil {
			return nil, err
		}
		return Rule(pred, act), p.expect(")")
	case "any":
		var injs []Injector
		for p.peek() != ")" {
			inj, err := p.injector()
			if err != nil {
				return nil, err
			}
			injs = append(injs, inj)
		}
		if len(injs) == 0 {
			return nil, p.errorf("any needs at least one injector")
		}
		return Any(injs...), p.expect(")")
	}
	p.pos = save
	return p.action()
}

// short parses the short form of an event rule (see the grammar).
func (p *parser) short(t string) (Injector, error) {
	name, target, _ := strings.Cut(t, "@")
	act, ok := shortActions[name]
	if !ok {
		return nil, p.errorf("unknown action %q in %q (want one of eio enospc crash fsync-drop short tear)", name, t)
	}
	after := strings.HasPrefix(target, "after:")
	target = strings.TrimPrefix(target, "after:")
	nth := 1
	switch {
	case strings.HasSuffix(target, "*"):
		target, nth = strings.TrimSuffix(target, "*"), 0
	case strings.Contains(target, "#"):
		var n string
		target, n, _ = strings.Cut(target, "#")
		v, err := strconv.Atoi(n)
		if err != nil || v < 1 {
			return nil, p.errorf("bad count %q in %q (want #N, N >= 1)", n, t)
		}
		nth = v
	}
	if target == "" || strings.ContainsAny(target, shortSpecials) || strings.HasPrefix(target, "after:") {
		return nil, p.errorf("bad event %q in %q", target, t)
	}
	if after {
		return Rule(After(target, nth), act), nil
	}
	return Rule(Event(target, nth), act), nil
}

func (p *parser) action() (Action, error) {
	t, err := p.next()
	if err != nil {
		return Action{}, err
	}
	switch t {
	case "eio":
		return EIO, nil
	case "enospc":
		return ENOSPC, nil
	case "fsync-drop":
		return FsyncDrop, nil
	case "crash":
		return Crash, nil
	case "(":
		name, err := p.next()
		if err != nil {
			return Action{}, err
		}
		var f Fault
		switch name {
		case "short-write":
			f = FaultShortWrite
		case "tear":
			f = FaultTear
		default:
			return Action{}, p.errorf("unknown action %q", name)
		}
		seed, err := p.uint64()
		if err != nil {
			return Action{}, err
		}
		return Action{Fault: f, Seed: seed}, p.expect(")")
	}
	return Action{}, p.errorf("unknown action %q", t)
}

func (p *parser) predicate() (Predicate, error) {
	if p.peek() == "true" {
		p.pos++
		return Always(), nil
	}
	name, err := p.head()
	if err != nil {
		return nil, err
	}
	var pred Predicate
	switch name {
	case "index":
		n, err := p.int64()
		if err != nil {
			return nil, err
		}
		pred = OnIndex(int(n))
	case "kind":
		var ks OpKinds
		for p.peek() != ")" && p.peek() != "" {
			t, _ := p.next()
			k, err := ParseOpKind(t)
			if err != nil {
				return nil, p.errorf("%v", err)
			}
			ks |= KindSet(k)
		}
		pred = Kinds(ks)
	case "path":
		t, err := p.next()
		if err != nil {
			return nil, err
		}
		glob, err := strconv.Unquote(t)
		if err != nil || !strings.HasPrefix(t, `"`) {
			return nil, p.errorf("bad string %s", t)
		}
		pred = PathMatch(glob)
	case "event", "after":
		t, err := p.next()
		if err != nil {
			return nil, err
		}
		label, err := strconv.Unquote(t)
		if err != nil || !strings.HasPrefix(t, `"`) {
			return nil, p.errorf("bad string %s", t)
		}
		nth := 0
		if p.peek() != ")" {
			n, err := p.int64()
			if err != nil {
				return nil, err
			}
			if n < 1 || n > math.MaxInt32 {
				return nil, p.errorf("bad count %d (want N >= 1)", n)
			}
			nth = int(n)
		}
		if name == "event" {
			pred = Event(label, nth)
		} else {
			pred = After(label, nth)
		}
	case "offset":
		lo, err := p.int64()
		if err != nil {
			return nil, err
		}
		hi, err := p.int64()
		if err != nil {
			return nil, err
		}
		pred = OffsetRange(lo, hi)
	case "randomly":
		t, err := p.next()
		if err != nil {
			return nil, err
		}
		prob, err := strconv.ParseFloat(t, 64)
		if err != nil || !(prob >= 0 && prob <= 1) {
			return nil, p.errorf("bad probability %q", t)
		}
		seed, err := p.uint64()
		if err != nil {
			return nil, err
		}
		pred = Randomly(prob, seed)
	case "and", "or":
		var ps []Predicate
		for p.peek() != ")" && p.peek() != "" {
			sub, err := p.predicate()
			if err != nil {
				return nil, err
			}
			ps = append(ps, sub)
		}
		if name == "and" {
			pred = And(ps...)
		} else {
			pred = Or(ps...)
		}
	case "not":
		sub, err := p.predicate()
		if err != nil {
			return nil, err
		}
		pred = Not(sub)
	default:
		return nil, p.errorf("unknown predicate %q", name)
	}
	return pred, p.expect(")")
}
