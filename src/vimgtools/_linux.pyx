# cython: language_level=3, embedsignature=True
"""The few Linux calls Python's os and mmap modules lack, made natively.

Through ctypes they cost every run ``import ctypes``, ``CDLL(None)`` and the argtypes set-up
(5-6 ms of a CLI start, issue 14). File descriptors and ints in; bytes or ints out. Each
call runs without the GIL and fails as the os module does: ``OSError(errno, strerror)``.
What a failure means (a fallback, a hint that did not take) is the caller's business.

References: fallocate(2) FALLOC_FL_PUNCH_HOLE, sync_file_range(2), cachestat(2) (Linux 6.5),
mincore(2), prctl(2) PR_SET_PDEATHSIG.
"""

from libc.errno cimport errno, EINTR
from libc.stdint cimport uint64_t
from libc.string cimport strerror
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, mincore as c_mincore, mmap, munmap
from posix.types cimport off_t
from posix.unistd cimport sysconf

cdef extern from "<fcntl.h>" nogil:  # Python.h defines _GNU_SOURCE and 64-bit off_t first
    enum: FALLOC_FL_KEEP_SIZE
    enum: FALLOC_FL_PUNCH_HOLE
    enum: SYNC_FILE_RANGE_WRITE
    int fallocate(int fd, int mode, off_t offset, off_t length)
    int sync_file_range(int fd, off_t offset, off_t nbytes, unsigned int flags)

cdef extern from "<sys/prctl.h>" nogil:
    enum: PR_SET_PDEATHSIG
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5)

cdef extern from "<unistd.h>" nogil:
    enum: _SC_PAGESIZE
    long syscall(long number, ...)

cdef extern from *:
    """
    /* Linux 6.5's uapi structs (include/uapi/linux/mman.h), not in older kernel headers. */
    struct vimg_cachestat_range { uint64_t off; uint64_t len; };
    struct vimg_cachestat {
        uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
    };
    """
    struct vimg_cachestat_range:
        uint64_t off
        uint64_t len
    struct vimg_cachestat:
        uint64_t nr_cache

# 451 on every architecture: cachestat came after the syscall tables were unified.
cdef enum:
    SYS_CACHESTAT = 451

cdef size_t PAGE = <size_t>sysconf(_SC_PAGESIZE)


cdef object _os_error(int err):
    return OSError(err, strerror(err).decode())


def punch_hole(int fd, off_t offset, off_t length):
    """Deallocate [offset, offset+length) of the file; its size stays (PUNCH_HOLE | KEEP_SIZE)."""
    cdef int r, err = 0
    while True:
        with nogil:
            r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            if r != 0:
                err = errno
        if r == 0:
            return
        if err != EINTR:
            raise _os_error(err)
        PyErr_CheckSignals()  # as the os module retries (PEP 475): a handler's exception first


def start_writeback(int fd, off_t offset, off_t length):
    """Start writing the dirty pages of a range to disk, not waiting (SYNC_FILE_RANGE_WRITE; 0: to the end)."""
    cdef int r, err = 0
    with nogil:
        r = sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
        if r != 0:
            err = errno
    if r != 0:
        raise _os_error(err)


def cachestat(int fd, uint64_t offset, uint64_t length):
    """How many pages of [offset, offset+length) are in the page cache (cachestat(2))."""
    cdef vimg_cachestat_range rng
    cdef vimg_cachestat cs
    cdef long r
    cdef int err = 0
    rng.off = offset
    rng.len = length
    with nogil:
        r = syscall(SYS_CACHESTAT, <unsigned int>fd, &rng, &cs, <unsigned int>0)
        if r != 0:
            err = errno
    if r != 0:
        raise _os_error(err)
    return cs.nr_cache


def mincore(int fd, off_t offset, size_t length):
    """One byte per page of [offset, offset+length) (``offset`` page-aligned): bit 0 set where cached.

    The range is mapped shared and read-only for the call, and unmapped before it returns.
    """
    if length == 0:
        return b""
    vec = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>((length + PAGE - 1) // PAGE))
    cdef unsigned char* out = <unsigned char*>PyBytes_AS_STRING(vec)  # new, ours alone until returned
    cdef void* addr
    cdef int r = -1, err = 0
    with nogil:
        addr = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, offset)
        if addr == MAP_FAILED:
            err = errno
        else:
            r = c_mincore(addr, length, out)
            if r != 0:
                err = errno
            munmap(addr, length)
    if r != 0:
        raise _os_error(err)
    return vec


def set_parent_death_signal(int signum):
    """Have the kernel send this process ``signum`` when the thread that forked it dies (PR_SET_PDEATHSIG)."""
    cdef int r, err = 0
    with nogil:
        r = prctl(PR_SET_PDEATHSIG, <unsigned long>signum, 0, 0, 0)
        if r != 0:
            err = errno
    if r != 0:
        raise _os_error(err)
