# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Native block engine: per-block hashing, exact comparison and zero detection.

Buffers and ints in; numpy arrays out of the public array API (``hash_blocks``,
``diff_blocks``, ``zero_blocks``, ``digest_blocks``), plain buffers and lists of runs out of
the functions the sync layer runs on (``digest_into``, ``diff_runs``, ``digest_runs``,
``checksum64``). numpy is imported on the first call of an array-returning function, not
with this module: a command that only syncs never loads it (its import alone is 0.1-0.2 s of
every run). The per-byte work runs without the GIL
over memory that only this call touches, so threads working on different
buffers use different cores. No Python object is created per block.
Only ValueError, TypeError and MemoryError leave this module.
"""

from libc.stdint cimport uint64_t, int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp

cdef extern from "xxhash.h":          # the system's libxxhash, found through pkg-config
    ctypedef struct XXH128_hash_t:
        uint64_t low64
        uint64_t high64
    uint64_t XXH3_64bits_withSeed(const void* data, size_t length, uint64_t seed) nogil
    XXH128_hash_t XXH3_128bits_withSeed(const void* data, size_t length, uint64_t seed) nogil

cdef extern from *:
    """
    /* libxxhash built with DISPATCH=1 (Debian's is) exports XXH3 with the vector code chosen at
       run time for this CPU: SSE2, AVX2 or AVX-512. On an AVX2 machine that is twice the speed of
       the SSE2 code the inlined header gives a portable (-march-less) build. Weak references: a
       libxxhash without them leaves them NULL, and the inlined code is used. Same digests either way. */
    extern XXH128_hash_t XXH3_128bits_withSeed_dispatch(const void*, size_t, XXH64_hash_t) __attribute__((weak));
    extern XXH64_hash_t XXH3_64bits_withSeed_dispatch(const void*, size_t, XXH64_hash_t) __attribute__((weak));
    /* The AVX2/AVX-512 code returns with the upper halves of the vector registers dirty; every
       SSE instruction after it then pays a transition penalty (this SSE2-compiled module's own
       loop halved its speed). vzeroupper clears them: an AVX instruction, run only where the CPU
       has AVX (the dispatcher picks AVX2 only there). */
    static int vimg_has_avx = -1;
    static inline void vimg_clean_upper(void) {
    #if defined(__x86_64__) || defined(__i386__)
        if (vimg_has_avx < 0) { __builtin_cpu_init(); vimg_has_avx = __builtin_cpu_supports("avx"); }
        if (vimg_has_avx) __asm__ volatile("vzeroupper" ::: "memory");
    #endif
    }
    static inline XXH128_hash_t vimg_xxh128(const void* p, size_t n, XXH64_hash_t seed) {
        XXH128_hash_t h;
        if (!XXH3_128bits_withSeed_dispatch) return XXH3_128bits_withSeed(p, n, seed);
        h = XXH3_128bits_withSeed_dispatch(p, n, seed);
        vimg_clean_upper();
        return h;
    }
    static inline XXH64_hash_t vimg_xxh64(const void* p, size_t n, XXH64_hash_t seed) {
        XXH64_hash_t h;
        if (!XXH3_64bits_withSeed_dispatch) return XXH3_64bits_withSeed(p, n, seed);
        h = XXH3_64bits_withSeed_dispatch(p, n, seed);
        vimg_clean_upper();
        return h;
    }
    /* A strong reference to the library itself (the inlined header renames XXH_versionNumber):
       without one the linker may drop libxxhash, and the weak references would stay NULL. */
    extern unsigned vimg_libxxhash_version(void) __asm__("XXH_versionNumber");
    static int vimg_dispatch(void) {
        return vimg_libxxhash_version() > 0
            && XXH3_128bits_withSeed_dispatch != 0 && XXH3_64bits_withSeed_dispatch != 0;
    }
    """
    XXH128_hash_t vimg_xxh128(const void* data, size_t length, uint64_t seed) nogil
    uint64_t vimg_xxh64(const void* data, size_t length, uint64_t seed) nogil
    int vimg_dispatch()

cdef object _np_module = None


cdef object _numpy():
    # The array API's numpy, loaded on its first use (see the module docstring).
    global _np_module
    if _np_module is None:
        import numpy
        _np_module = numpy
    return _np_module


MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 16 * 1024 * 1024
ALGORITHMS = ("xxh128", "xxh64")
XXH3_DISPATCH = bool(vimg_dispatch())  # the system libxxhash's run-time SIMD choice is used


cdef Py_ssize_t _check_block_size(block_size) except -1:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, not {type(block_size).__name__}")
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
        raise ValueError(
            f"block_size {block_size} is not allowed: use a power of two "
            f"from 4096 (4 KiB) to 16777216 (16 MiB)"
        )
    return block_size


cdef const unsigned char[::1] _bytes_view(buf):
    # Any C-contiguous buffer, whatever its item format (numpy arrays included).
    cdef memoryview m = memoryview(buf)
    if not m.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    if m.nbytes == 0:
        return b""  # memoryview.cast refuses shapes with a zero in them, e.g. numpy (0, 5)
    if m.format != "B" or m.ndim != 1:
        m = m.cast("B")
    return m


cdef inline bint _is_zero(const unsigned char* p, size_t n) noexcept nogil:
    # memcmp against itself shifted by one byte: glibc's vectorised memcmp,
    # no zero page to keep around, stops at the first non-zero byte.
    if n == 0:
        return True
    return p[0] == 0 and memcmp(p, p + 1, n - 1) == 0


cdef uint64_t _check_seed(seed) except? 0:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, not {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed {seed} is out of range: use 0 <= seed < 2**64")
    return seed


def hash_blocks(buf, block_size, algorithm="xxh128", seed=0):
    """Hash ``buf`` block by block with XXH3.

    Args:
        buf: any C-contiguous buffer (bytes, bytearray, memoryview, mmap, numpy array).
        block_size: power of two from 4 KiB to 16 MiB; the last block may be short.
        algorithm: ``"xxh128"`` (default) or ``"xxh64"``.
        seed: XXH3 seed, an int from 0 to 2**64 - 1 (TypeError, ValueError otherwise).

    Returns:
        For ``"xxh128"`` a uint64 array of shape (n, 2) holding [low64, high64];
        for ``"xxh64"`` a uint64 array of shape (n,).

    Raises:
        ValueError: bad block size or unknown algorithm.
    """
    np = _numpy()
    cdef uint64_t s = _check_seed(seed)
    cdef Py_ssize_t bs = _check_block_size(block_size)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}: known are {', '.join(ALGORITHMS)}")
    cdef const unsigned char[::1] data = _bytes_view(buf)
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t count = (n + bs - 1) // bs
    cdef Py_ssize_t i, off
    cdef const unsigned char* base = &data[0] if n else NULL
    cdef uint64_t[:, ::1] out128
    cdef uint64_t[::1] out64
    cdef XXH128_hash_t h
    if algorithm == "xxh128":
        out = np.empty((count, 2), dtype=np.uint64)
        out128 = out
        with nogil:
            for i in range(count):
                off = i * bs
                h = vimg_xxh128(base + off, <size_t>min(bs, n - off), s)
                out128[i, 0] = h.low64
                out128[i, 1] = h.high64
    else:
        out = np.empty(count, dtype=np.uint64)
        out64 = out
        with nogil:
            for i in range(count):
                off = i * bs
                out64[i] = vimg_xxh64(base + off, <size_t>min(bs, n - off), s)
    return out


def diff_blocks(a, b, block_size):
    """Indices of the blocks whose bytes differ between ``a`` and ``b``.

    Exact comparison (memcmp), no hashing. Both buffers must be the same length.

    Returns:
        int64 array of block indices, ascending.

    Raises:
        ValueError: bad block size or buffers of different lengths.
    """
    np = _numpy()
    cdef Py_ssize_t bs = _check_block_size(block_size)
    cdef const unsigned char[::1] x = _bytes_view(a)
    cdef const unsigned char[::1] y = _bytes_view(b)
    cdef Py_ssize_t n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"buffers differ in length: {n} and {y.shape[0]} bytes")
    cdef Py_ssize_t count = (n + bs - 1) // bs
    cdef Py_ssize_t i, off, found = 0
    cdef const unsigned char* px = &x[0] if n else NULL
    cdef const unsigned char* py = &y[0] if n else NULL
    out = np.empty(count, dtype=np.int64)
    cdef int64_t[::1] idx = out
    with nogil:
        for i in range(count):
            off = i * bs
            if memcmp(px + off, py + off, <size_t>min(bs, n - off)) != 0:
                idx[found] = i
                found += 1
    return out[:found].copy()


def zero_blocks(buf, block_size):
    """Which blocks of ``buf`` are all zero bytes.

    Returns:
        bool array with one entry per block (the last block may be short).

    Raises:
        ValueError: bad block size.
    """
    np = _numpy()
    cdef Py_ssize_t bs = _check_block_size(block_size)
    cdef const unsigned char[::1] data = _bytes_view(buf)
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t count = (n + bs - 1) // bs
    cdef Py_ssize_t i, off
    cdef const unsigned char* base = &data[0] if n else NULL
    out = np.empty(count, dtype=np.bool_)
    cdef unsigned char[::1] flags = out.view(np.uint8)
    with nogil:
        for i in range(count):
            off = i * bs
            flags[i] = _is_zero(base + off, <size_t>min(bs, n - off))
    return out


def digest_blocks(buf, block_size, seed, digests, zero, against=None):
    """XXH3-128 digest and zero flag of each block of ``buf``, written into arrays the caller has.

    For hashing an image a piece at a time while the piece is in the CPU cache: one call
    per piece (hash, zero test and comparison), nothing allocated but the result.

    Args:
        buf: any C-contiguous buffer; the last block may be short.
        block_size: power of two from 4 KiB to 16 MiB.
        seed: XXH3 seed, 0 <= seed < 2**64.
        digests: writable C-contiguous uint64 array of shape (n, 2), n the number of blocks.
        zero: writable C-contiguous bool array of shape (n,).
        against: None, or a uint64 array of shape (n, 2): the other side's digests.

    Returns:
        int64 array of the blocks that are not all zero and whose digest differs from
        ``against``'s, ascending (empty when ``against`` is None).

    Raises:
        ValueError, TypeError: bad block size, seed, dtype or shape.
    """
    np = _numpy()
    cdef uint64_t s = _check_seed(seed)
    cdef Py_ssize_t bs = _check_block_size(block_size)
    cdef const unsigned char[::1] data = _bytes_view(buf)
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t count = (n + bs - 1) // bs
    if not isinstance(digests, np.ndarray) or digests.dtype != np.uint64 or digests.shape != (count, 2):
        raise ValueError(f"digests must be a uint64 array of shape ({count}, 2)")
    if not isinstance(zero, np.ndarray) or zero.dtype != np.bool_ or zero.shape != (count,):
        raise ValueError(f"zero must be a bool array of shape ({count},)")
    cdef uint64_t[:, ::1] out = digests
    cdef unsigned char[::1] flags = zero.view(np.uint8)
    cdef const uint64_t[:, ::1] other
    cdef bint compare = against is not None
    if compare:
        if not isinstance(against, np.ndarray) or against.dtype != np.uint64 or against.shape != (count, 2):
            raise ValueError(f"against must be a uint64 array of shape ({count}, 2)")
        other = np.ascontiguousarray(against)
    result = np.empty(count if compare else 0, dtype=np.int64)
    cdef int64_t[::1] idx = result
    cdef Py_ssize_t i, off, m, found = 0
    cdef const unsigned char* base = &data[0] if n else NULL
    cdef XXH128_hash_t h
    with nogil:
        for i in range(count):
            off = i * bs
            m = min(bs, n - off)
            h = vimg_xxh128(base + off, <size_t>m, s)
            out[i, 0] = h.low64
            out[i, 1] = h.high64
            flags[i] = _is_zero(base + off, <size_t>m)
            if compare and not flags[i] and (h.low64 != other[i, 0] or h.high64 != other[i, 1]):
                idx[found] = i
                found += 1
    return result[:found]


# ---- The sync layer's functions: buffers in and out, lists of runs; no numpy. ----
# A digest is 16 bytes: XXH3-128's low64 then high64, little-endian (what hash_blocks' rows
# hold in memory on a little-endian host, and what signatures and the wire carry).

cdef unsigned char[::1] _out_view(buf, Py_ssize_t need, str name):
    # A writable C-contiguous buffer of at least ``need`` bytes.
    cdef memoryview m = memoryview(buf)
    if m.readonly:
        raise TypeError(f"{name} must be a writable buffer")
    if not m.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if m.nbytes < need:
        raise ValueError(f"{name} holds {m.nbytes} bytes, {need} needed")
    if m.nbytes == 0:
        return bytearray(1)
    if m.format != "B" or m.ndim != 1:
        m = m.cast("B")
    return m


cdef const unsigned char[::1] _in_view(buf, Py_ssize_t need, str name):
    cdef const unsigned char[::1] v = _bytes_view(buf)
    if v.shape[0] < need:
        raise ValueError(f"{name} holds {v.shape[0]} bytes, {need} needed")
    return v


cdef list _runs_of(const unsigned char* marks, Py_ssize_t count, bint kinds):
    # Runs of equal non-zero marks: (first, end) or, with ``kinds``, (first, end, mark == 2).
    cdef list out = []
    cdef Py_ssize_t i = 0, j
    cdef unsigned char m
    while i < count:
        m = marks[i]
        if not m:
            i += 1
            continue
        j = i + 1
        while j < count and marks[j] == m:
            j += 1
        if kinds:
            out.append((i, j, m == 2))
        else:
            out.append((i, j))
        i = j
    return out


def checksum64(buf):
    """XXH3-64 (seed 0) of a whole buffer, as an int: the checksum of the records and headers
    of vimgtools' files. The GIL is released over buffers of 64 KiB and more."""
    cdef const unsigned char[::1] data = _bytes_view(buf)
    cdef Py_ssize_t n = data.shape[0]
    cdef uint64_t h
    if n == 0:
        return vimg_xxh64(NULL, 0, 0)
    if n < 65536:
        return vimg_xxh64(&data[0], <size_t>n, 0)
    with nogil:
        h = vimg_xxh64(&data[0], <size_t>n, 0)
    return h


def digest_into(buf, block_size, seed, digests, zero, against=None):
    """XXH3-128 digest and zero flag of each block of ``buf``, written into the caller's buffers.

    Args:
        buf: any C-contiguous buffer; the last block may be short.
        block_size: power of two from 4 KiB to 16 MiB.
        seed: XXH3 seed, 0 <= seed < 2**64.
        digests: writable buffer of at least 16 bytes per block (low64, high64 little-endian).
        zero: writable buffer of at least 1 byte per block: 1 where the block is all zeros, else 0.
        against: None, or a buffer of the other side's digests, 16 bytes per block.

    Returns:
        The runs (first, end) of blocks, relative to ``buf``, that are not all zeros and whose
        digest differs from ``against``'s (empty without ``against``). One tuple per run.

    Raises:
        ValueError, TypeError: bad block size or seed, buffers too small or not writable.
    """
    cdef uint64_t s = _check_seed(seed)
    cdef Py_ssize_t bs = _check_block_size(block_size)
    cdef const unsigned char[::1] data = _bytes_view(buf)
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t count = (n + bs - 1) // bs
    cdef unsigned char[::1] out = _out_view(digests, 16 * count, "digests")
    cdef unsigned char[::1] flags = _out_view(zero, count, "zero")
    cdef const unsigned char[::1] other
    cdef bint compare = against is not None
    if compare:
        other = _in_view(against, 16 * count, "against")
    if count == 0:
        return []
    cdef unsigned char* marks = <unsigned char*>malloc(count) if compare else NULL
    if compare and marks == NULL:
        raise MemoryError()
    cdef const unsigned char* base = &data[0]
    cdef uint64_t* d = <uint64_t*>&out[0]
    cdef const uint64_t* o = <const uint64_t*>&other[0] if compare else NULL
    cdef Py_ssize_t i, off, m
    cdef XXH128_hash_t h
    cdef unsigned char z
    try:
        with nogil:
            for i in range(count):
                off = i * bs
                m = min(bs, n - off)
                h = vimg_xxh128(base + off, <size_t>m, s)
                d[2 * i] = h.low64
                d[2 * i + 1] = h.high64
                z = _is_zero(base + off, <size_t>m)
                flags[i] = z
                if compare:
                    marks[i] = not z and (h.low64 != o[2 * i] or h.high64 != o[2 * i + 1])
        return _runs_of(marks, count, False) if compare else []
    finally:
        free(marks)


def diff_runs(a, b, block_size):
    """The runs of blocks whose bytes differ between ``a`` and ``b``, by what ``a`` holds there.

    Exact comparison (memcmp), then a zero test of each differing block of ``a``; both buffers
    the same length. One pass over both, no hashing.

    Returns:
        [(first block, end block, all zeros in ``a``)], ascending, runs of one kind coalesced.

    Raises:
        ValueError: bad block size or buffers of different lengths.
    """
    cdef Py_ssize_t bs = _check_block_size(block_size)
    cdef const unsigned char[::1] x = _bytes_view(a)
    cdef const unsigned char[::1] y = _bytes_view(b)
    cdef Py_ssize_t n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"buffers differ in length: {n} and {y.shape[0]} bytes")
    cdef Py_ssize_t count = (n + bs - 1) // bs
    if count == 0:
        return []
    cdef unsigned char* marks = <unsigned char*>malloc(count)
    if marks == NULL:
        raise MemoryError()
    cdef const unsigned char* px = &x[0]
    cdef const unsigned char* py = &y[0]
    cdef Py_ssize_t i, off, m, found = 0
    try:
        with nogil:
            for i in range(count):
                off = i * bs
                m = min(bs, n - off)
                if memcmp(px + off, py + off, <size_t>m) != 0:
                    marks[i] = 2 if _is_zero(px + off, <size_t>m) else 1
                    found += 1
                else:
                    marks[i] = 0
        return _runs_of(marks, count, True) if found else []
    finally:
        free(marks)


def digest_runs(mine, theirs, zero):
    """The runs of blocks whose 16-byte digests differ between ``mine`` and ``theirs``.

    Args:
        mine, theirs: digests, 16 bytes per block, the same length.
        zero: 1 byte per block of ``mine``'s image, non-zero where the block is all zeros.

    Returns:
        [(first block, end block, all zeros)], ascending, runs of one kind coalesced.

    Raises:
        ValueError: lengths that do not fit.
    """
    cdef const unsigned char[::1] x = _bytes_view(mine)
    cdef const unsigned char[::1] y = _bytes_view(theirs)
    cdef Py_ssize_t n = x.shape[0]
    if y.shape[0] != n or n % 16:
        raise ValueError(f"digests of different or odd lengths: {n} and {y.shape[0]} bytes")
    cdef Py_ssize_t count = n // 16
    cdef const unsigned char[::1] z = _in_view(zero, count, "zero")
    if count == 0:
        return []
    cdef unsigned char* marks = <unsigned char*>malloc(count)
    if marks == NULL:
        raise MemoryError()
    cdef const uint64_t* p = <const uint64_t*>&x[0]
    cdef const uint64_t* q = <const uint64_t*>&y[0]
    cdef const unsigned char* zf = &z[0]
    cdef Py_ssize_t i, found = 0
    try:
        with nogil:
            for i in range(count):
                if p[2 * i] != q[2 * i] or p[2 * i + 1] != q[2 * i + 1]:
                    marks[i] = 2 if zf[i] else 1
                    found += 1
                else:
                    marks[i] = 0
        return _runs_of(marks, count, True) if found else []
    finally:
        free(marks)
