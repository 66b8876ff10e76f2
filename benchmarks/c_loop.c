/* The figure a C program would get: XXH3_128bits_withSeed over a buffer in fixed
 * blocks, with the system's xxhash.h inlined (XXH_INLINE_ALL). engine_vs_c.py
 * builds it twice, with the same flags apart from -shared:
 *
 *     gcc -O3 -DXXH_INLINE_ALL -shared -fPIC c_loop.c -o c_loop.so   (called through ctypes
 *         on the very buffers the engine hashes, interleaved with it)
 *     gcc -O3 -DXXH_INLINE_ALL c_loop.c -o c_loop -lpthread          (a standalone cross-check:
 *         ./c_loop SIZE_BYTES BLOCK_BYTES REPEATS THREADS prints the median GB/s)
 *
 * No -march: the same instruction set as the engine's build (baseline x86-64, SSE2).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <xxhash.h>

/* Hash SIZE bytes in BLOCK-byte blocks (the last may be short), PASSES times over.
 * Returns the xor of all digests so the compiler cannot drop the work. */
uint64_t c_loop_xxh128(const unsigned char *buf, size_t size, size_t block, uint64_t seed, unsigned passes)
{
    uint64_t acc = 0;
    for (unsigned p = 0; p < passes; p++) {
        for (size_t off = 0; off < size; off += block) {
            size_t n = size - off < block ? size - off : block;
            XXH128_hash_t h = XXH3_128bits_withSeed(buf + off, n, seed);
            acc ^= h.low64 ^ h.high64;
        }
    }
    return acc;
}

struct job {
    const unsigned char *buf;
    size_t size, block;
    uint64_t sink;
};

static void *run_job(void *arg)
{
    struct job *j = arg;
    j->sink = c_loop_xxh128(j->buf, j->size, j->block, 0, 1);
    return NULL;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s SIZE_BYTES BLOCK_BYTES REPEATS THREADS\n", argv[0]);
        return 2;
    }
    size_t size = strtoull(argv[1], NULL, 10), block = strtoull(argv[2], NULL, 10);
    int repeats = atoi(argv[3]), threads = atoi(argv[4]);
    if (size == 0 || block == 0 || repeats < 1 || threads < 1 || threads > 64) {
        fprintf(stderr, "c_loop: bad arguments\n");
        return 2;
    }
    struct job jobs[64];
    pthread_t tids[64];
    for (int t = 0; t < threads; t++) { /* each thread its own buffer, as in the Python benchmark */
        unsigned char *buf = malloc(size);
        if (!buf) {
            perror("malloc");
            return 1;
        }
        uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(t + 1); /* xorshift: pseudo-random, every page touched */
        for (size_t i = 0; i < size; i += 8) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            memcpy(buf + i, &x, size - i < 8 ? size - i : 8);
        }
        jobs[t] = (struct job){buf, size, block, 0};
    }
    double *rates = malloc(sizeof(double) * (size_t)repeats);
    uint64_t sink = 0;
    for (int r = 0; r < repeats; r++) {
        double t0 = now();
        for (int t = 0; t < threads; t++)
            pthread_create(&tids[t], NULL, run_job, &jobs[t]);
        for (int t = 0; t < threads; t++) {
            pthread_join(tids[t], NULL);
            sink ^= jobs[t].sink;
        }
        rates[r] = (double)size * threads / (now() - t0) / 1e9;
    }
    qsort(rates, (size_t)repeats, sizeof(double), cmp);
    printf("%.3f %016llx\n", rates[repeats / 2], (unsigned long long)sink);
    return 0;
}
