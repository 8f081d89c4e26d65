//go:build race

package qcow

// raceEnabled is true when the tests run under the race detector, which
// makes them 5-10 times slower: the heaviest ones then run their -short
// amount, so that `go test -race ./...` stays within go test's default
// 10-minute timeout.
const raceEnabled = true
