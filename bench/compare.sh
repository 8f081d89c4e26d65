#!/usr/bin/env bash
# compare.sh: time `crashtest bench` against `qemu-img bench` on the same
# fresh QCOW2 images (v3, 64 KiB clusters, made by qemu-img create), in
# write-back mode (-t writeback for both), for the four workloads of issue 3:
#
#   seq-write-64k    64 KiB sequential writes into a new image
#   alloc-write-4k   4 KiB writes, each allocating a new cluster (step 64 KiB)
#   rewrite-4k       4 KiB rewrites of allocated clusters (image written first)
#   read-4k          4 KiB reads of allocated clusters
#
# Each pair runs N times, alternating which tool goes first; the table shows
# the median of the times each tool reports ("Run completed in X seconds.",
# which covers the requests only, not opening or closing the image) and the
# ratio ours/qemu (below 1.0: we are faster).
#
# Usage: bench/compare.sh            (from anywhere inside the repository)
# Environment:
#   COUNT   requests of the 4 KiB workloads (default 10000); the 64 KiB
#           workload sends COUNT/8 and the allocating one COUNT/4
#   N       runs per tool and workload (default 5)
#   TMPDIR  where the images go (default /tmp); needs about COUNT*4 KiB*2
#           plus COUNT*8 KiB of space
#   QEMU_IMG  qemu-img to use (default: qemu-img from PATH)
set -euo pipefail

COUNT=${COUNT:-10000}
N=${N:-5}
QEMU_IMG=${QEMU_IMG:-qemu-img}

die() { echo "compare.sh: $*" >&2; exit 1; }
command -v "$QEMU_IMG" >/dev/null || die "$QEMU_IMG not found (apt-get install qemu-utils)"
command -v qemu-io >/dev/null || die "qemu-io not found (apt-get install qemu-utils)"
[[ $COUNT =~ ^[0-9]+$ && $COUNT -ge 8 ]] || die "COUNT must be a number >= 8"
[[ $N =~ ^[0-9]+$ && $N -ge 1 ]] || die "N must be a positive number"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/qcowcrash-bench.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "building crashtest..." >&2
(cd "$root" && go build -o "$tmp/crashtest" ./cmd/crashtest)
OURS="$tmp/crashtest"

# bench_time TOOL ARGS...: run one bench, print the seconds it reports.
bench_time() {
	local tool=$1 out
	shift
	if [[ $tool == qemu ]]; then
		out=$("$QEMU_IMG" bench "$@" 2>&1) || die "qemu-img bench $*: $out"
	else
		out=$("$OURS" bench "$@" 2>&1) || die "crashtest bench $*: $out"
	fi
	sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' <<<"$out" | grep . || die "no time in output of $tool bench $*: $out"
}

# median: the median of the numbers on stdin.
median() {
	sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# check IMAGE: qemu-img check must find the image clean.
check() {
	local out
	out=$("$QEMU_IMG" check "$1" 2>&1) || die "qemu-img check $1 failed after our writes:
$out"
}

new_image() { "$QEMU_IMG" create -q -f qcow2 -o cluster_size=64k "$1" "$2"; }

seqN=$((COUNT / 8))
allocN=$((COUNT / 4))
rwN=$COUNT
seqSize=$((seqN * 64))K
allocSize=$((allocN * 64))K
rwSize=$((rwN * 4))K

# The rewrite and read workloads use images written in full first (one per
# tool, so neither sees the other's cache state in the file; rewrites do not
# change the allocation, so the images are reused across runs).
echo "preallocating $rwSize images..." >&2
for t in qemu ours; do
	new_image "$tmp/pre-$t.qcow2" "$rwSize"
	qemu-io -f qcow2 -t writeback -c "write -P 0x3c 0 $rwSize" "$tmp/pre-$t.qcow2" >/dev/null
done

declare -A times
run_workload() { # NAME RUN TOOL
	local name=$1 run=$2 tool=$3 img="$tmp/$1-$3.qcow2" s
	case $name in
	seq-write-64k)
		rm -f "$img"
		new_image "$img" "$seqSize"
		s=$(bench_time "$tool" -t writeback -w -c "$seqN" -s 64k "$img")
		;;
	alloc-write-4k)
		rm -f "$img"
		new_image "$img" "$allocSize"
		s=$(bench_time "$tool" -t writeback -w -c "$allocN" -s 4k -S 64k "$img")
		;;
	rewrite-4k)
		img="$tmp/pre-$tool.qcow2"
		s=$(bench_time "$tool" -t writeback -w -c "$rwN" -s 4k --pattern 0x5a "$img")
		;;
	read-4k)
		img="$tmp/pre-$tool.qcow2"
		s=$(bench_time "$tool" -t writeback -c "$rwN" -s 4k "$img")
		;;
	esac
	if [[ $tool == ours && $run == 1 ]]; then
		check "$img"
	fi
	times[$name,$tool]+="$s "
}

workloads=(seq-write-64k alloc-write-4k rewrite-4k read-4k)
for w in "${workloads[@]}"; do
	echo "running $w ($N runs per tool)..." >&2
	for ((run = 1; run <= N; run++)); do
		if ((run % 2)); then order=(qemu ours); else order=(ours qemu); fi
		for tool in "${order[@]}"; do
			run_workload "$w" "$run" "$tool"
		done
	done
done

echo
echo "qemu-img bench vs crashtest bench, -t writeback, qcow2 v3, 64 KiB clusters, median of $N runs"
echo "($("$QEMU_IMG" --version | head -1); requests: seq $seqN x 64 KiB, alloc $allocN x 4 KiB, rewrite/read $rwN x 4 KiB)"
echo
printf '%-16s %10s %10s %12s\n' workload "qemu (s)" "ours (s)" "ours/qemu"
for w in "${workloads[@]}"; do
	q=$(tr ' ' '\n' <<<"${times[$w,qemu]}" | grep . | median)
	o=$(tr ' ' '\n' <<<"${times[$w,ours]}" | grep . | median)
	ratio=$(awk -v o="$o" -v q="$q" 'BEGIN { if (q > 0) printf "%.2f", o / q; else print "n/a" }')
	printf '%-16s %10s %10s %12s\n' "$w" "$q" "$o" "$ratio"
done
