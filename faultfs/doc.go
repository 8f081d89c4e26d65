// Package faultfs is a vfs.FS wrapper that records every operation, knows
// what of each file is durable, injects faults, and produces the states a
// crash could leave behind, so that a writer's crash consistency can be
// tested exhaustively. It depends only on vfs and the standard library.
//
// # Recording and durability
//
// New(inner) wraps any vfs.FS. Each call (create, open, read, write with a
// copy of its bytes, truncate, allocate, sync, datasync, sync-range,
// directory sync, remove, close, stat, size) is appended to an op log
// (FS.Log) with its result, and applied to a model of durability:
//
//	call                     becomes durable
//	fsync (Sync)             all of the file's data and its size
//	fdatasync (Datasync)     all of the file's data and its size
//	sync_file_range          the data in the (4 KiB) pages of the range; not the size
//	SyncDir(dir)             creations and removals of names in dir
//
// Everything else is pending: writes, truncates (a shrink's discarded range
// may come back), allocates, creates (a file whose directory was never
// synced does not exist after a crash) and removes (a removed file whose
// directory was not synced is back, with its durable contents).
//
// # Crash states
//
// A crash point (Point) is the world right after some operation: FS.Point
// for now, or Recording.Points for every point of a recorded workload
// (replayed from the log: see FS.Recording). A persistence model (Model:
// process, lose-unsynced, reorder, torn, prefix, garbage; see its
// documentation for what each stands for) decides which pending changes
// survive; Point.States enumerates every distinct resulting State when
// there are at most limit candidates (DefaultLimit, 4096), else a seeded
// sample of limit distinct ones; FS.CrashState and Point.Sample draw one.
//
// Under reorder, torn and garbage, each unit (page or sector) independently
// holds its durable value or its value after any one of the pending writes
// that touched it; each file's size is independently its durable size or
// any size it had since; each pending name change independently happened
// up to any point. Units whose possible values are all equal are not
// choices, so a state count is the number of real alternatives: two
// unsynced writes to two sectors give exactly 4 torn states.
//
// A State is a vfs.FS. It is cheap: its files read through to the point's
// immutable, shared pages (durable contents are a persistent copy-on-write
// page tree; unit versions are computed once per point) and materializing a
// state costs time proportional to the number of pending units, not to the
// file sizes. Writes to a state go to a private overlay: a restarted
// writer can recover in it, and no two worlds share mutable state. Wrapping
// a State in New models a crash during recovery; its files are adopted
// without being copied.
//
// # Injected faults
//
// An Injector decides for each operation, before it runs, whether to fail
// it: Rule(predicate, action) with predicates OnIndex, Kinds, PathMatch,
// OffsetRange, Randomly (seeded by op index), And, Or, Not and Always, and
// actions EIO, ENOSPC, ShortWrite (a seeded prefix, then ENOSPC),
// TearThenFail (a seeded subset of sectors, then EIO), FsyncDrop (the sync
// fails and the dirty data it covered is dropped for good, live contents
// included) and Crash (this and every later operation fail with
// ErrCrashed); Any combines injectors. Injected errors are *fs.PathError
// wrapping an *InjectedError, which wraps ErrInjected and the errno (and
// ErrCrashed after a crash). Every injector's String is a small
// s-expression that ParseInjector reads back (grammar in dsl.go), so a
// failing fault configuration can be pasted into a test.
//
// # Determinism
//
// Everything random derives from caller-supplied uint64 seeds: sampling
// uses math/rand/v2's PCG seeded by SubSeed (FNV-1a of a name mixed with
// SplitMix64) of the seed, the model and the point; Randomly, ShortWrite
// and TearThenFail hash their seed with the op index. The same workload,
// model, seed and limit give the same states in the same order in every
// process.
package faultfs
