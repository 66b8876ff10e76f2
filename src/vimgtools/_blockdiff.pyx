# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, embedsignature=True
"""Native block engine: per-block hashing, exact comparison and zero detection.

Buffers and ints in, numpy arrays out. The per-byte work runs without the GIL
over memory that only this call touches, so threads working on different
buffers use different cores. No Python object is created per block.
Only ValueError, TypeError and MemoryError leave this module.
"""

from libc.stdint cimport uint64_t, int64_t
from libc.string cimport memcmp

import numpy as np

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
