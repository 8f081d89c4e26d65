package qcow

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every error returned by this package for a bad or
// unsupported image wraps exactly one of them, so callers can branch with
// errors.Is.
var (
	// ErrNotQCOW is returned when the file does not start with the QCOW magic.
	ErrNotQCOW = errors.New("qcow: not a QCOW image")
	// ErrFormat is returned when a field of the image is invalid: out of
	// range, misaligned, beyond the end of the file, overlapping, or
	// otherwise inconsistent with the specification.
	ErrFormat = errors.New("qcow: invalid image")
	// ErrUnsupported is returned for valid images that use a feature this
	// package does not implement (encryption, unknown incompatible features).
	ErrUnsupported = errors.New("qcow: unsupported feature")
	// ErrLimit is returned when a field exceeds a limit this package (like
	// qemu) applies to untrusted images, so that no allocation is sized by
	// the file beyond a documented bound.
	ErrLimit = errors.New("qcow: limit exceeded")
	// ErrReadOnly is returned when a write is attempted on an image opened
	// read-only, or opening for writing is refused (corrupt bit set).
	ErrReadOnly = errors.New("qcow: image is read-only")
	// ErrBacking is returned for a backing chain that cannot be followed:
	// a protocol or json: name, a loop, or a chain deeper than the limit.
	ErrBacking = errors.New("qcow: bad backing chain")
	// ErrClosed is returned by methods of an Image after Close.
	ErrClosed = errors.New("qcow: image is closed")
)

// FormatError describes a field of an image that failed validation. It names
// the field, the byte offset in the file where it was found (or -1 when the
// field has no single location), and the offending value. It unwraps to one
// of the sentinel errors above.
type FormatError struct {
	Field  string // name of the field as in the specification, e.g. "l1_size"
	Offset int64  // byte offset in the file, -1 if unknown
	Value  uint64 // the offending value
	Msg    string // what is wrong, e.g. "exceeds limit 4194304"
	Err    error  // sentinel: ErrFormat, ErrUnsupported, ErrLimit, ...
}

// Error formats the error as "qcow: FIELD VALUE MSG", for example
// "qcow: l1_size 2147483647 entries exceeds limit 4194304".
func (e *FormatError) Error() string {
	s := fmt.Sprintf("qcow: %s %d %s", e.Field, e.Value, e.Msg)
	if e.Offset >= 0 {
		s += fmt.Sprintf(" (at offset %#x)", e.Offset)
	}
	return s
}

// Unwrap returns the sentinel the error belongs to.
func (e *FormatError) Unwrap() error { return e.Err }

func formatErr(field string, off int64, val uint64, msg string, args ...any) error {
	return &FormatError{Field: field, Offset: off, Value: val, Msg: fmt.Sprintf(msg, args...), Err: ErrFormat}
}

func limitErr(field string, off int64, val uint64, msg string, args ...any) error {
	return &FormatError{Field: field, Offset: off, Value: val, Msg: fmt.Sprintf(msg, args...), Err: ErrLimit}
}

func unsupportedErr(field string, off int64, val uint64, msg string, args ...any) error {
	return &FormatError{Field: field, Offset: off, Value: val, Msg: fmt.Sprintf(msg, args...), Err: ErrUnsupported}
}
