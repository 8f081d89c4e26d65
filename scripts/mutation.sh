#!/usr/bin/env bash
# mutation.sh: mutation testing of the QCOW writer under the fast Crash suite.
#
# It runs gremlins (github.com/go-gremlins/gremlins, pinned in
# scripts/tools/go.mod, outside the main go.mod) as a Go tool on the writer's
# files of package qcow. Each mutant is one small change to the source (a
# flipped comparison, + for -, < for <=, ...); the killing test set is
#
#	go test -count=1 -short -run Crash ./qcow
#
# (the Crash tests in their -short amount, a few seconds per run; the rapid
# state machines run as many cases as without -short), restricted
# through GOFLAGS, which gremlins passes on to every `go test` it runs. A
# mutant is killed when the suite fails or times out; it survives when the
# suite passes (LIVED) or never executes the mutated line (NOT COVERED).
# Both kinds of survivor count against the score:
#
#	score = (killed + timed out) / (killed + timed out + lived + not covered)
#
# Mutants that do not compile (NOT VIABLE) are left out. Survivors are listed
# as file:line:column MUTATOR status. It is not part of CI: the full run
# takes about half an hour on 2 cores.
#
# Usage: scripts/mutation.sh [-v] [FILE.go ...]   (from anywhere in the repository)
#   FILE.go   mutate only these files of qcow (default: all the writer's files)
#   -v        stream gremlins' per-mutant lines as they finish
# Environment:
#   WORKERS        parallel mutants (default 2; each runs `go test`)
#   TIMEOUT_COEFF  per-mutant timeout, as a multiple of one unmutated run of
#                  the suite (default 15; gremlins' own default is 3, too
#                  tight on a shared machine)
#   LOG            where to keep gremlins' full output (default: a temp file)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The writer's files: everything that decides what is written where and in
# which order. Left out, with their reason:
#   image.go           opening and validating (the reader's; openWriter is in write.go)
#   header.go          header decoding and limits (reader)
#   read.go            the read path
#   check.go, refcheck.go  the checker: the Crash suite's oracle, not the writer
#   snapshot.go, info.go   read-only reporting
#   convert.go         CopyRaw, writing raw files (not QCOW) for crashtest convert
#   errors.go          error types and constructors
#   repair.go          Repair (`check -r`), the checker's repair tool: it writes
#                      the image but outside the writer's contract, and its
#                      own tests (repair_test.go) are not Crash tests; mutate
#                      it on request with `scripts/mutation.sh repair.go`
WRITER_FILES=(write.go alloc.go refcount.go l2cache.go create.go)

verbose=0
if [ "${1:-}" = "-v" ]; then
	verbose=1
	shift
fi
if [ $# -gt 0 ]; then
	WRITER_FILES=("$@")
fi
for f in "${WRITER_FILES[@]}"; do
	if [ ! -f "qcow/$f" ]; then
		echo "mutation: qcow/$f: no such file" >&2
		exit 2
	fi
done

WORKERS=${WORKERS:-2}
TIMEOUT_COEFF=${TIMEOUT_COEFF:-15}
# -vet=off and -ldflags=-w (no DWARF) only make each mutant's build cheaper.
SUITE=(-count=1 -short -run=Crash -vet=off -ldflags=-w)

# gremlins mutates every non-test file of the package it is given unless
# excluded: exclude all but the chosen ones.
exclude=()
for path in qcow/*.go; do
	b=$(basename "$path")
	case $b in *_test.go) continue ;; esac
	keep=0
	for f in "${WRITER_FILES[@]}"; do
		if [ "$f" = "$b" ]; then
			keep=1
		fi
	done
	if [ $keep -eq 0 ]; then
		exclude+=(-E "^${b//./\\.}\$")
	fi
done

log=${LOG:-$(mktemp "${TMPDIR:-/tmp}/mutation.XXXXXX")}
echo "mutation: files: ${WRITER_FILES[*]}"
echo "mutation: suite: go test ${SUITE[*]} ./qcow"

# The unmutated suite must pass, or every mutant would look killed. This run
# also warms the build cache, so that gremlins' coverage run, whose duration
# sets the per-mutant timeout, times the tests rather than the compiler.
start=$(date +%s)
t0=$(date +%s.%N)
if ! nice -n 10 go test "${SUITE[@]}" ./qcow >"$log" 2>&1; then
	cat "$log"
	echo "mutation: the unmutated suite fails; fix it first" >&2
	exit 1
fi
nice -n 10 go test "${SUITE[@]}" -cover ./qcow >>"$log" 2>&1 || true
t1=$(date +%s.%N)
echo "mutation: unmutated suite: $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f s (twice: plain and -cover)", b - a }')"

# Build gremlins first, so that its build time is not billed to the first
# mutants and a build failure is reported as such.
go build -modfile=scripts/tools/go.mod -o /dev/null github.com/go-gremlins/gremlins/cmd/gremlins

run=(nice -n 10 go tool -modfile=scripts/tools/go.mod gremlins unleash
	--workers "$WORKERS" --timeout-coefficient "$TIMEOUT_COEFF"
	"${exclude[@]}" ./qcow)
echo "mutation: GOFLAGS='${SUITE[*]}' ${run[*]}"
echo "mutation: log: $log"
status=0
if [ $verbose -eq 1 ]; then
	GOFLAGS="${SUITE[*]}" "${run[@]}" 2>&1 | tee -a "$log" || status=$?
else
	GOFLAGS="${SUITE[*]}" "${run[@]}" >>"$log" 2>&1 || status=$?
fi
end=$(date +%s)
if [ $status -ne 0 ]; then
	tail -20 "$log"
	echo "mutation: gremlins failed (exit status $status)" >&2
	exit 1
fi

# gremlins prints one line per mutant: "<STATUS> <MUTATOR> at <file>:<line>:<col>".
awk -v secs=$((end - start)) '
/ at [^ ]+\.go:[0-9]+:[0-9]+$/ {
	pos = $NF
	mut = $(NF - 2)
	st = $0
	sub(/^ +/, "", st)
	sub(" " mut " at .*$", "", st)
	file = pos
	sub(/:.*/, "", file)
	n[st]++
	nf[file, st]++
	files[file] = 1
}
END {
	killed = n["KILLED"] + n["TIMED OUT"]
	total = killed + n["LIVED"] + n["NOT COVERED"]
	if (total == 0) {
		print "mutation: no mutant was run"
		exit 1
	}
	printf "mutation: per file (killed/total):"
	for (f in files) {
		k = nf[f, "KILLED"] + nf[f, "TIMED OUT"]
		printf " %s %d/%d", f, k, k + nf[f, "LIVED"] + nf[f, "NOT COVERED"]
	}
	printf "\n"
	printf "mutation: killed %d/%d (%d failed the suite, %d timed out); lived %d, not covered %d; not viable %d (left out)\n",
		killed, total, n["KILLED"], n["TIMED OUT"], n["LIVED"], n["NOT COVERED"], n["NOT VIABLE"]
	printf "mutation: score %.1f%%\n", 100 * killed / total
	printf "mutation: took %dm%02ds\n", secs / 60, secs % 60
	printf "mutation: survivors (%d):\n", n["LIVED"] + n["NOT COVERED"]
}' "$log"
# Go's coverage profile has no block for the case expressions of a switch,
# so gremlins reports every mutant in them as NOT COVERED whatever the tests
# do: mark those survivors, and give the score without them as well.
unseen=0
while read -r pos mut st; do
	line=$(sed -n "$(echo "$pos" | cut -d: -f2)p" "qcow/${pos%%:*}")
	note=""
	if [ "$st" = "NOT_COVERED" ] && [[ $line =~ ^[[:space:]]*case[[:space:]] ]]; then
		note=" (in a case expression: never covered for gremlins)"
		unseen=$((unseen + 1))
	fi
	st=${st/NOT_COVERED/not covered}
	echo "  $pos $mut ${st,,}$note"
done < <(grep -E '^ *(LIVED|NOT COVERED) ' "$log" |
	sed -E 's/^ *(LIVED|NOT COVERED) ([A-Z_]+) at (.*)$/\3 \2 \1/; s/ NOT COVERED$/ NOT_COVERED/' |
	sort -t: -k1,1 -k2,2n -k3,3n)
if [ $unseen -gt 0 ]; then
	awk -v u="$unseen" '
	/ at [^ ]+\.go:[0-9]+:[0-9]+$/ {
		st = $0
		sub(/^ +/, "", st)
		sub(" [A-Z_]+ at .*$", "", st)
		n[st]++
	}
	END {
		killed = n["KILLED"] + n["TIMED OUT"]
		total = killed + n["LIVED"] + n["NOT COVERED"] - u
		printf "mutation: score without the %d mutants in case expressions: %d/%d, %.1f%%\n", u, killed, total, 100 * killed / total
	}' "$log"
fi
