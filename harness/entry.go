package harness

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// ExpectPass is the Expect of a corpus entry whose case must pass.
const ExpectPass = "pass"

// FailureKinds lists the failure kinds a Verdict can report, in the order
// they are checked.
var FailureKinds = []string{KindErrors, KindOpen, KindCheck, KindDurability, KindContent, KindUsability, KindOrdering, KindPanic, KindSetup}

// Entry is one regression case of the corpus (the corpora directory): a
// case, what its verdict must be, and why. It is stored as
// <corpus>/<group>/<name>.json (see SaveEntry), and `go test ./corpora/...`
// runs every entry and checks its verdict with Entry.Check.
type Entry struct {
	// Name is the entry's file name without ".json": letters, digits, '-',
	// '_' and '.', starting with a letter or digit.
	Name string `json:"name"`
	// Case is the case to run; usually a trace case (Case.AsTrace), so the
	// entry keeps its meaning when workload generation changes.
	Case Case `json:"case"`
	// Expect is ExpectPass, or the failure kind (one of FailureKinds) the
	// case must fail with: an entry for a deliberately broken target proves
	// the harness still catches it.
	Expect string `json:"expect"`
	// Explanation says, for people, what the entry exercises or which bug
	// it caught, and for a broken or historical target why it must fail.
	Explanation string `json:"explanation,omitempty"`
	// ID is the case's ID, written by SaveEntry for people to copy; it is
	// not read back (Case is authoritative).
	ID string `json:"id,omitempty"`
}

var entryName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// Validate reports whether the entry is well formed: a valid name, a
// valid case and a known expectation.
func (e Entry) Validate() error {
	if !entryName.MatchString(e.Name) || len(e.Name) > 100 {
		return fmt.Errorf("harness: corpus entry name %q: want letters, digits, '.', '_' and '-', at most 100", e.Name)
	}
	if e.Expect != ExpectPass && !slices.Contains(FailureKinds, e.Expect) {
		return fmt.Errorf("harness: corpus entry %s: expect %q (want %q or a failure kind: %s)", e.Name, e.Expect, ExpectPass, strings.Join(FailureKinds, ", "))
	}
	if err := e.Case.Validate(); err != nil {
		return fmt.Errorf("harness: corpus entry %s: %w", e.Name, err)
	}
	return nil
}

// Check compares a verdict of the entry's case with what the entry
// expects: nil when an ExpectPass entry passed or an expected-to-fail
// entry failed with exactly the expected kind.
func (e Entry) Check(v Verdict) error {
	switch {
	case e.Expect == ExpectPass && !v.OK:
		return fmt.Errorf("harness: corpus entry %s: want pass, got %v", e.Name, v.Failure)
	case e.Expect != ExpectPass && v.OK:
		return fmt.Errorf("harness: corpus entry %s: want a %q failure, but the case passed (%d states checked)", e.Name, e.Expect, v.States)
	case e.Expect != ExpectPass && v.Failure.Kind != e.Expect:
		return fmt.Errorf("harness: corpus entry %s: want a %q failure, got %v", e.Name, e.Expect, v.Failure)
	}
	return nil
}

// Run runs the entry's case and checks its verdict.
func (e Entry) Run() (Verdict, error) {
	v := Run(e.Case)
	return v, e.Check(v)
}

// MarshalEntry returns the entry's file contents: indented JSON with the
// case ID filled in, ending in a newline.
func MarshalEntry(e Entry) ([]byte, error) {
	e.ID = e.Case.ID()
	b, err := json.MarshalIndent(e, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("harness: corpus entry %s: %w", e.Name, err)
	}
	return append(b, '\n'), nil
}

// SaveEntry validates e and writes it to dir/<e.Name>.json atomically (a
// temporary file, synced, then renamed over the target), creating dir if
// needed. It returns the path written.
func SaveEntry(dir string, e Entry) (string, error) {
	if err := e.Validate(); err != nil {
		return "", err
	}
	b, err := MarshalEntry(e)
	if err != nil {
		return "", err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("harness: save corpus entry: %w", err)
	}
	path := filepath.Join(dir, e.Name+".json")
	if err := writeFileAtomic(path, b); err != nil {
		return "", fmt.Errorf("harness: save corpus entry: %w", err)
	}
	return path, nil
}

// writeFileAtomic writes b to path through a synced temporary file in the
// same directory and a rename, then syncs the directory.
func writeFileAtomic(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if e := f.Close(); err == nil {
		err = e
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// LoadEntry reads a corpus entry file. Unknown JSON fields are errors, so
// a misspelt field is not silently ignored; the entry's name must match
// the file's.
func LoadEntry(path string) (Entry, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Entry{}, fmt.Errorf("harness: load corpus entry: %w", err)
	}
	var e Entry
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&e); err != nil {
		return Entry{}, fmt.Errorf("harness: load corpus entry %s: %w", path, err)
	}
	if want := strings.TrimSuffix(filepath.Base(path), ".json"); e.Name != want {
		return Entry{}, fmt.Errorf("harness: load corpus entry %s: name %q, want %q (the file name)", path, e.Name, want)
	}
	if err := e.Validate(); err != nil {
		return Entry{}, fmt.Errorf("harness: load corpus entry %s: %w", path, err)
	}
	return e, nil
}

// CorpusFile is one entry of a corpus directory.
type CorpusFile struct {
	// Group is the entry's subdirectory (e.g. "qcow", "broken").
	Group string
	// Path is the entry file's path.
	Path string
	// Entry is the loaded entry (zero when Err is set).
	Entry Entry
	// Err is the error loading it.
	Err error
}

// LoadCorpus loads every <group>/<name>.json under dir, sorted by group
// and name. A file that fails to load is returned with its Err set, so a
// test reports it instead of skipping it; the error is for dir itself.
func LoadCorpus(dir string) ([]CorpusFile, error) {
	groups, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("harness: load corpus: %w", err)
	}
	var out []CorpusFile
	for _, g := range groups {
		if !g.IsDir() || strings.HasPrefix(g.Name(), ".") || g.Name() == "testdata" {
			continue
		}
		files, err := filepath.Glob(filepath.Join(dir, g.Name(), "*.json"))
		if err != nil {
			return nil, fmt.Errorf("harness: load corpus: %w", err)
		}
		slices.Sort(files)
		for _, p := range files {
			e, err := LoadEntry(p)
			out = append(out, CorpusFile{Group: g.Name(), Path: p, Entry: e, Err: err})
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("harness: load corpus %s: %w", dir, fs.ErrNotExist)
	}
	return out, nil
}
