package qcow

import (
	"math/bits"
	"sync"
)

// Cluster-sized scratch buffers are reused through per-size pools: opening
// an image reads its whole first cluster, and a check reads every L2 table
// and refcount block once, so a caller that opens and checks thousands of
// images a second (the crash harness) would otherwise allocate, zero and
// collect megabytes per image. Buffers of 512 B to 2 MiB (the cluster size
// range) are pooled by power-of-two class; others are plain allocations.

const (
	poolMinBits = 9
	poolMaxBits = 21
)

var bufPools [poolMaxBits - poolMinBits + 1]sync.Pool

// poolClass returns the pool index for a buffer of n bytes, or -1.
func poolClass(n int) int {
	if n <= 0 || n > 1<<poolMaxBits {
		return -1
	}
	b := bits.Len(uint(n - 1)) // smallest b with 1<<b >= n
	return max(b, poolMinBits) - poolMinBits
}

// getBuf returns a buffer of n bytes with unspecified contents.
func getBuf(n int) []byte {
	c := poolClass(n)
	if c < 0 {
		return make([]byte, n)
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+poolMinBits))
}

// putBuf returns a buffer from getBuf for reuse; b must not be used after.
func putBuf(b []byte) {
	c := poolClass(cap(b))
	if c < 0 || cap(b) != 1<<(c+poolMinBits) {
		return
	}
	b = b[:cap(b)]
	bufPools[c].Put(&b)
}
