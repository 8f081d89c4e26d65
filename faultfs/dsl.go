package faultfs

import (
	"fmt"
	"strconv"
	"strings"
)

// The injector DSL: s-expressions, so that any injector's String() can be
// pasted into a test, a corpus entry or `crashtest repro`. Grammar:
//
//	injector  = action
//	          | "(" "rule" predicate action ")"
//	          | "(" "any" injector { injector } ")"
//	predicate = "true"
//	          | "(" "index" INT ")"
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
//
// STRING is a Go double-quoted string literal; INT a decimal int64; UINT a
// decimal uint64 (a seed); FLOAT a Go float literal in [0, 1]. Tokens are
// separated by white space or parentheses. Example:
//
//	(any (rule (and (kind write) (path "*.qcow2") (index 12)) (short-write 7))
//	     (rule (kind sync datasync) fsync-drop))

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
