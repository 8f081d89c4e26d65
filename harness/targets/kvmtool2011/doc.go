// Package kvmtool2011 is a faithful Go port of the QCOW write path of the
// 2011 kvmtool patch "kvm tools: Add QCOW write support" (Prasad Joshi,
// /work/shared/seed-kvmtool-qcow-write.patch; line numbers below are lines
// of that patch file), kept as a crash-consistency test target: the
// harness registers it as target "kvmtool2011". It is known to be unsafe
// (kvmtool switched QCOW writes off as "not stable enough" two months
// later) and must never be used to write real images.
//
// It depends only on vfs and the standard library: it parses the QCOW
// version 1 and QCOW2 headers itself and shares no code with package
// qcow. The parsing follows kvmtool's qcow.c as the patch found it
// (qcow1_read_header, qcow2_read_header, qcow_read_l1_table, qcow_probe:
// context, not lines of the patch). Its tests use package qcow only to
// judge what it wrote.
//
// # The write path, as in the patch
//
// WriteAt is qcow1_write_sector (lines 183-209): one cluster at a time,
// failing with ErrPastEnd as soon as the next cluster's offset is at or
// past the virtual size (line 195). Each cluster is qcow1_write_cluster
// (lines 80-181):
//
//  1. The L1 index must be below the in-core table size, else ErrL1Index
//     (line 102); the checks of the L2 index (line 106) and of the offset
//     in the cluster (line 110) cannot fail and are kept as masks.
//  2. The L2 table is read whole with pread_in_full (line 123) when the
//     L1 entry (flags masked, line 121) is non-zero. pread_in_full treats
//     a read that hits the end of the file after at least one byte as
//     success (the rest stays zero from calloc) and one that starts at or
//     past the end as an error; preadInFull does the same.
//  3. Otherwise the file size is captured (line 127); a table of zeros is
//     written at the end of the file aligned up to a cluster
//     (qcow1_write_l2_table, lines 48-68) with pwrite + sync_file_range
//     (pwrite_sync, lines 37-45); then the L1 entry is written in place
//     with pwrite + sync_file_range (line 138). If that write fails the
//     file is truncated back to the captured size (line 141) and the
//     write fails; a failed L2 table write is not rolled back (line 133),
//     as in the patch. The in-core L1 entry is set only after success
//     (line 147).
//  4. The file size is captured again (line 151). If the L2 entry is zero
//     the data cluster goes at the end of the file aligned up to a
//     cluster (line 158).
//  5. The data is written with a plain pwrite, no sync (line 163). A
//     failed data write is not rolled back (line 164).
//  6. For a new cluster the L2 entry is written with pwrite +
//     sync_file_range (line 168); if that fails the file is truncated
//     back to the size captured in step 4 (line 171).
//
// sync_file_range is vfs.File.SyncRange, which makes the data pages of
// the range durable and nothing else: not the file size, not other pages.
// kvmtool passed SYNC_FILE_RANGE_WAIT_BEFORE|SYNC_FILE_RANGE_WRITE without
// WAIT_AFTER, so in reality its write-back need not even have finished
// when the call returned; vfs's SyncRange waits, so it is a stronger
// barrier than kvmtool's and every failure found with it holds for the
// original too. file_size (lines 29-35) is vfs.File.Size, where an error
// or a size of 0 fails the write as fstat's 0 did. ftruncate is
// vfs.File.Truncate; its error is joined to the returned error (kvmtool
// ignored it). Offsets are bytes: kvmtool's entry point took a sector and
// shifted it (line 193), but the cluster code is byte-granular, so byte
// offsets and lengths go through it unchanged and no read-modify-write is
// added. A write that fails part-way returns the bytes of the clusters
// written before the failure (kvmtool returned -1).
//
// # QCOW2 (version 2)
//
// In 2011 kvmtool's qcow2_probe used the same disk operations as version
// 1 (qcow1_disk_ops), so the patch's write path is its QCOW2 write path
// too. This port does the same, with the QCOW2 layout as kvmtool's
// qcow2_read_header read it: cluster_bits from the header, l2_bits =
// cluster_bits - 3, l1_size and l1_table_offset from the header, and the
// oflag mask QCOW_OFLAG_COPIED|QCOW_OFLAG_COMPRESSED (bits 63 and 62),
// which is cleared from L1 and L2 entries before use (lines 121, 155).
// The new L1 and L2 entries are written as bare offsets (lines 137 and
// 167): QCOW_OFLAG_COPIED is never set, although the clusters are used
// once. No refcount is ever updated: new L2 tables and data clusters have
// refcount 0, so every QCOW2 image this writes fails `qemu-img check` (and
// qcow.CheckFile) with refcount errors, and a later writer that trusts
// the refcounts may hand the same clusters out again.
//
// # Version 3 and other choices
//
// kvmtool's qcow2_check_image accepted exactly version 2; a version 3
// image was not recognised as QCOW at all (disk_image__open would have
// used it as a raw disk). So the target's formats are v1 and v2, and Open
// refuses version 3 with ErrNotQCOW.
//
// For version 1, kvmtool computed the L1 size as size / (2^l2_bits *
// 2^cluster_bits), rounded down (qcow1_read_header), and this port does
// the same: the last, partial L1 range of an image whose size is not a
// multiple of 2^(l2_bits+cluster_bits) is unwritable (ErrL1Index), and an
// image smaller than one L1 range (e.g. under 2 MiB with 4 KiB clusters
// and 512-entry L2 tables) cannot be written at all.
//
// kvmtool of 2011 ignored backing files (it read unallocated clusters as
// zeros), the crypt_method field and compressed clusters; so does this
// port: a write to a new cluster leaves the rest of the cluster zero, not
// a copy of the backing file, and a compressed L2 entry is used, masked,
// as a cluster offset.
//
// # What is not in the patch
//
//   - Flush is fsync (vfs.File.Sync): the patch predates kvmtool's flush
//     support, and disk_image__flush, when it came, called fsync for a
//     format without its own flush operation.
//   - WriteZeroes writes a buffer of zeros (64 KiB at a time) through the
//     same path as WriteAt: kvmtool had no zero write, so a guest zeroing
//     blocks wrote zeros.
//   - Close closes the file without any sync, as qcow1_disk_close and
//     disk_image__close did (they freed memory and closed the fd). The
//     harness cannot see this: it takes no crash point after a close,
//     which changes nothing on disk, so writes left unsynced by Close are
//     never judged against the flush a close stands for.
//   - WriteThrough (Options) fsyncs after every WriteAt and WriteZeroes
//     call: kvmtool had no write-through mode, and this is what a guest
//     with a write-through cache would get by flushing after each write.
//   - Calls are serialized by a mutex. The patch's code had no locking of
//     its own (two concurrent writes could both allocate an L2 table for
//     one L1 entry); that race is not modelled.
//   - Header checks, additions that only refuse images kvmtool would have
//     misread or crashed on: the magic and version (1 or 2); the whole
//     header present; cluster_bits in 9..16 and l2_bits in 6..13 for
//     version 1, cluster_bits in 9..21 for version 2 (qemu's bounds); an
//     L1 table of at most 32 MiB (qemu's limit) lying inside the file; and
//     no offset that overflows int64 when a data or table offset from the
//     image is used.
package kvmtool2011
