package faultfs

// Seeds. Everything random in faultfs derives from a caller's uint64 seed
// through these functions, so a seed means the same thing in every process
// and every run: no maphash, no global math/rand source.

// splitmix64 is the SplitMix64 finalizer: a bijective, well-mixing function
// of x, used to derive sub-seeds and per-operation decisions.
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

// fnv1a returns the 64-bit FNV-1a hash of s.
func fnv1a(s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return h
}

// mix folds vals into one well-mixed value, order-sensitively.
func mix(vals ...uint64) uint64 {
	h := uint64(0x6a09e667f3bcc909)
	for _, v := range vals {
		h = splitmix64(h ^ v)
	}
	return h
}

// SubSeed derives the seed for the part of a run called name from the run's
// root seed. It is stable across processes, platforms and Go versions
// (FNV-1a of the name, mixed with SplitMix64), so adding a new named part
// never changes what an existing name gets.
func SubSeed(root uint64, name string) uint64 {
	return mix(root, fnv1a(name))
}

// unitFloat maps x to [0, 1) using its top 53 bits.
func unitFloat(x uint64) float64 {
	return float64(x>>11) / (1 << 53)
}
