// Package corpora is the crash-consistency regression corpus: each
// <group>/<name>.json file is a harness.Entry, a case (usually a trace of
// explicit ops, so it keeps its meaning when workload generation changes)
// with the verdict it must get: "pass", or the failure kind a deliberately
// broken or historical target must be caught with.
//
// `go test ./corpora/...` (and `go test -run Crash ./...`) replays every
// entry (TestCrashCorpus). `crashtest repro --save corpora/GROUP CASE`
// and `crashtest soak --out DIR` write entries; `crashtest repro FILE`
// replays one.
//
// Groups: qcow holds workloads this project's writer must pass (the
// interesting workloads of the exhaustive crash tests, and shrunk cases of
// bugs found); broken holds cases each broken target must fail; other
// groups hold the entries of other targets.
package corpora
