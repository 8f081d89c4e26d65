package vfs

import (
	"io"
	"io/fs"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// OS is the operating system's file system, used through raw Linux system
// calls so that every barrier in the durability contract maps onto exactly
// one of them:
//
//   - ReadAt and WriteAt are pread(2) and pwrite(2), looped over short counts
//     and retried on EINTR.
//   - Sync is fsync(2), Datasync is fdatasync(2), SyncRange is
//     sync_file_range(2) with SYNC_FILE_RANGE_WAIT_BEFORE|WRITE|WAIT_AFTER
//     (a write-back request that waits for the I/O, with no promise about
//     the disk's volatile cache or the file's metadata), Truncate is
//     ftruncate(2) and Allocate is fallocate(2) with mode 0.
//   - Open with ReadWrite and Create take an open file description (OFD)
//     write lock on the whole file (fcntl F_OFD_SETLK), released on Close.
//     OFD locks conflict between two opens even in one process, and with
//     qemu's own image locks. ReadOnly opens take no lock, so an image in use
//     can still be inspected.
//   - SyncDir is fsync(2) on the directory opened O_RDONLY|O_DIRECTORY.
//
// Errors are *fs.PathError values naming the operation and the file, so
// errors.Is(err, fs.ErrNotExist) and errors.Is(err, syscall.ENOSPC) work.
var OS FS = osFS{}

type osFS struct{}

var (
	_ FS      = osFS{}
	_ Renamer = osFS{}
)

// osFile is an open file descriptor. mu guards fd against Close: every
// operation holds a read lock for the duration of its system calls, so a
// concurrent Close cannot let the descriptor number be reused under it.
type osFile struct {
	name     string
	readOnly bool

	mu sync.RWMutex
	fd int // -1 once closed
}

var (
	_ File      = (*osFile)(nil)
	_ Allocator = (*osFile)(nil)
)

// retryEINTR calls fn until it fails with something other than EINTR.
func retryEINTR(fn func() error) error {
	for {
		err := fn()
		if err != unix.EINTR {
			return err
		}
	}
}

func openFD(name string, flags int, perm uint32) (int, error) {
	var fd int
	err := retryEINTR(func() error {
		var err error
		fd, err = unix.Open(name, flags|unix.O_CLOEXEC, perm)
		return err
	})
	return fd, err
}

// lockFD takes an OFD write lock on the whole file without waiting.
func lockFD(fd int, name string) error {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: 0, Len: 0}
	err := retryEINTR(func() error { return unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk) })
	switch err {
	case nil:
		return nil
	case unix.EAGAIN, unix.EACCES:
		return &fs.PathError{Op: "lock", Path: name, Err: ErrLocked}
	default:
		return &fs.PathError{Op: "lock", Path: name, Err: err}
	}
}

func (osFS) Open(name string, flag OpenFlag) (File, error) {
	flags := unix.O_RDONLY
	if flag == ReadWrite {
		flags = unix.O_RDWR
	}
	fd, err := openFD(name, flags, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: name, Err: err}
	}
	if flag == ReadWrite {
		if err := lockFD(fd, name); err != nil {
			unix.Close(fd)
			return nil, err
		}
	}
	return &osFile{name: name, readOnly: flag != ReadWrite, fd: fd}, nil
}

func (osFS) Create(name string) (File, error) {
	fd, err := openFD(name, unix.O_CREAT|unix.O_EXCL|unix.O_RDWR, 0o644)
	if err != nil {
		return nil, &fs.PathError{Op: "create", Path: name, Err: err}
	}
	if err := lockFD(fd, name); err != nil {
		// Someone opened the new file between our create and our lock. The
		// file is theirs now as much as ours: leave it in place.
		unix.Close(fd)
		return nil, err
	}
	return &osFile{name: name, fd: fd}, nil
}

func (osFS) Remove(name string) error {
	if err := unix.Unlink(name); err != nil {
		return &fs.PathError{Op: "remove", Path: name, Err: err}
	}
	return nil
}

// Rename renames oldname to newname with rename(2), replacing newname
// atomically if it exists.
func (osFS) Rename(oldname, newname string) error {
	err := retryEINTR(func() error { return unix.Renameat(unix.AT_FDCWD, oldname, unix.AT_FDCWD, newname) })
	if err != nil {
		return &os.LinkError{Op: "rename", Old: oldname, New: newname, Err: err}
	}
	return nil
}

func (osFS) SyncDir(dir string) error {
	fd, err := openFD(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: dir, Err: err}
	}
	err = retryEINTR(func() error { return unix.Fsync(fd) })
	if cerr := unix.Close(fd); err == nil && cerr != nil {
		return &fs.PathError{Op: "close", Path: dir, Err: cerr}
	}
	if err != nil {
		return &fs.PathError{Op: "fsync", Path: dir, Err: err}
	}
	return nil
}

func (osFS) Stat(name string) (os.FileInfo, error) {
	return os.Stat(name)
}

// do runs fn with the descriptor held open, wrapping fn's error with op and
// the file name.
func (f *osFile) do(op string, fn func(fd int) error) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.fd < 0 {
		return &fs.PathError{Op: op, Path: f.name, Err: fs.ErrClosed}
	}
	if err := fn(f.fd); err != nil {
		return &fs.PathError{Op: op, Path: f.name, Err: err}
	}
	return nil
}

func (f *osFile) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, &fs.PathError{Op: "pread", Path: f.name, Err: ErrNegativeOffset}
	}
	n := 0
	eof := false
	err := f.do("pread", func(fd int) error {
		for n < len(p) {
			m, err := unix.Pread(fd, p[n:], off+int64(n))
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if m == 0 {
				eof = true
				return nil
			}
			n += m
		}
		return nil
	})
	if err != nil {
		return n, err
	}
	if eof {
		return n, io.EOF
	}
	return n, nil
}

func (f *osFile) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, &fs.PathError{Op: "pwrite", Path: f.name, Err: ErrNegativeOffset}
	}
	if f.readOnly {
		return 0, &fs.PathError{Op: "pwrite", Path: f.name, Err: ErrReadOnly}
	}
	n := 0
	err := f.do("pwrite", func(fd int) error {
		for n < len(p) {
			m, err := unix.Pwrite(fd, p[n:], off+int64(n))
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if m == 0 {
				return io.ErrShortWrite
			}
			n += m
		}
		return nil
	})
	return n, err
}

func (f *osFile) Truncate(size int64) error {
	if size < 0 {
		return &fs.PathError{Op: "ftruncate", Path: f.name, Err: ErrNegativeOffset}
	}
	if f.readOnly {
		return &fs.PathError{Op: "ftruncate", Path: f.name, Err: ErrReadOnly}
	}
	return f.do("ftruncate", func(fd int) error {
		return retryEINTR(func() error { return unix.Ftruncate(fd, size) })
	})
}

func (f *osFile) Sync() error {
	return f.do("fsync", func(fd int) error {
		return retryEINTR(func() error { return unix.Fsync(fd) })
	})
}

func (f *osFile) Datasync() error {
	return f.do("fdatasync", func(fd int) error {
		return retryEINTR(func() error { return unix.Fdatasync(fd) })
	})
}

func (f *osFile) SyncRange(off, n int64) error {
	if off < 0 || n < 0 {
		return &fs.PathError{Op: "sync_file_range", Path: f.name, Err: ErrNegativeOffset}
	}
	return f.do("sync_file_range", func(fd int) error {
		if n == 0 {
			return nil // an empty range; the system call would read 0 as "to the end"
		}
		const flags = unix.SYNC_FILE_RANGE_WAIT_BEFORE | unix.SYNC_FILE_RANGE_WRITE | unix.SYNC_FILE_RANGE_WAIT_AFTER
		return retryEINTR(func() error { return unix.SyncFileRange(fd, off, n, flags) })
	})
}

func (f *osFile) Size() (int64, error) {
	var size int64
	err := f.do("fstat", func(fd int) error {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return err
		}
		size = st.Size
		return nil
	})
	return size, err
}

// Allocate reserves [off, off+n) with fallocate(2) mode 0, growing the file
// to cover it.
func (f *osFile) Allocate(off, n int64) error {
	if off < 0 || n < 0 {
		return &fs.PathError{Op: "fallocate", Path: f.name, Err: ErrNegativeOffset}
	}
	if f.readOnly {
		return &fs.PathError{Op: "fallocate", Path: f.name, Err: ErrReadOnly}
	}
	return f.do("fallocate", func(fd int) error {
		if n == 0 {
			return nil // the system call refuses a zero length with EINVAL
		}
		return retryEINTR(func() error { return unix.Fallocate(fd, 0, off, n) })
	})
}

func (f *osFile) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fd < 0 {
		return &fs.PathError{Op: "close", Path: f.name, Err: fs.ErrClosed}
	}
	// Linux frees the descriptor even when close fails (EINTR included), so
	// it is never retried. Closing the only descriptor of the open file
	// description releases its OFD lock.
	err := unix.Close(f.fd)
	f.fd = -1
	if err != nil {
		return &fs.PathError{Op: "close", Path: f.name, Err: err}
	}
	return nil
}
