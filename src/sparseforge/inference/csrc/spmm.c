/* sparseforge native CPU kernels: y = x @ W.T for packed sparse W (fp32).
 *
 * Compiled on first use by sparseforge.inference.native with the system C compiler
 * (cc -O3 -march=native -fopenmp -shared -fPIC) and loaded with ctypes. Written for this
 * project; AVX2+FMA paths where the compiler targets them, portable scalar code otherwise.
 *
 * Threading: every entry point takes a row partition `cuts` (nchunks + 1 row offsets, balanced
 * by nonzeros on the Python side) and runs the chunks on `nthreads` threads, which claim chunks
 * from one atomic counter. Two runtimes (sf_set_threading): OpenMP parallel regions, which in a
 * PyTorch process run on PyTorch's own libgomp threads (the default where the compiler supports
 * -fopenmp), or a small pthread pool of this library. A row's sum is never split, and the order
 * of additions inside a row is fixed, so results depend neither on the thread count nor on the
 * runtime.
 *
 * Layouts (all row-major, C-contiguous):
 *   CSR      indptr int64[rows+1], idx uint16 or int32 [nnz], val float[nnz]
 *   bitmask  mask uint64[rows, words] (bit j%64 of word j/64 = column j), rowptr int64[rows+1],
 *            val float[nnz] (row-major order of the set bits)
 *   SpMV     x float[cols] (bitmask: x padded with zeros to words*64), y float[rows],
 *            bias float[rows] or NULL (added to each finished row sum)
 *   SpMM     xt float[cols, ldx] = x transposed, ldx a multiple of 8 (zero padded columns);
 *            out_t float[rows, ldx]
 *   sparse input (one input row with many zeros): see the section "sparse input" at the end
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SF_AVX2 1
#else
#define SF_AVX2 0
#endif
/* AVX-512 (F is enough: masked expand-loads, masked loads of the mask registers) on top of AVX2 */
#if SF_AVX2 && defined(__AVX512F__)
#define SF_AVX512 1
#else
#define SF_AVX512 0
#endif

#define SF_ABI 11

int sf_abi_version(void) { return SF_ABI; }
int sf_has_avx2(void) { return SF_AVX2; }
int sf_has_avx512(void) { return SF_AVX512; }

/* ------------------------------------------------------------------ thread pool
 * A small persistent pthread pool with chunk claiming. The caller's thread works too and claims
 * chunks from the same atomic counter; it only waits for chunks a worker has actually claimed.
 * So a worker that is not scheduled yet (busy machine) costs nothing: the caller does its share.
 * (An OpenMP fork-join region waits at its barrier for every thread of the team instead; see
 * docs/design-notes.md for the measurement.) Workers spin briefly for the next job, then sleep on
 * a condition variable. The claim word packs (generation << 32 | next chunk) so a worker that
 * wakes up late can never claim a chunk of a finished job. */
#include <pthread.h>
#include <stdatomic.h>
#include <sched.h>

typedef void (*sf_chunk_fn)(const void *ctx, int chunk);

#define SF_MAX_WORKERS 63
#define SF_SPIN_ITERS 2000

static pthread_mutex_t sf_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sf_cv = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t sf_submit = PTHREAD_MUTEX_INITIALIZER;
static int sf_nworkers = 0;
static _Atomic uint64_t sf_claim = 0;       /* gen << 32 | next chunk */
static _Atomic uint32_t sf_gen = 0;         /* job generation, bumped under sf_mu */
static _Atomic int sf_done = 0;             /* chunks finished in the current job */
static struct { sf_chunk_fn fn; const void *ctx; int nchunks; int nworkers; uint32_t gen; } sf_job;

static inline void sf_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Claim and run chunks of job `gen`; returns how many this thread ran. */
static int sf_work(uint32_t gen, sf_chunk_fn fn, const void *ctx, int nchunks) {
    int ran = 0;
    for (;;) {
        uint64_t cur = atomic_load_explicit(&sf_claim, memory_order_acquire);
        for (;;) {
            if ((uint32_t)(cur >> 32) != gen || (int)(uint32_t)cur >= nchunks) return ran;
            if (atomic_compare_exchange_weak_explicit(&sf_claim, &cur, cur + 1, memory_order_acq_rel, memory_order_acquire)) break;
        }
        fn(ctx, (int)(uint32_t)cur);
        ++ran;
        atomic_fetch_add_explicit(&sf_done, 1, memory_order_release);
    }
}

static void *sf_worker(void *arg) {
    const int id = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&sf_gen);
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&sf_gen, memory_order_acquire) == seen && spins < SF_SPIN_ITERS) { sf_pause(); ++spins; }
        pthread_mutex_lock(&sf_mu);
        while (atomic_load(&sf_gen) == seen) pthread_cond_wait(&sf_cv, &sf_mu);
        seen = atomic_load(&sf_gen);
        sf_chunk_fn fn = sf_job.fn; const void *ctx = sf_job.ctx;
        int nchunks = sf_job.nchunks, nw = sf_job.nworkers; uint32_t gen = sf_job.gen;
        pthread_mutex_unlock(&sf_mu);
        if (id < nw && gen == seen) sf_work(gen, fn, ctx, nchunks);
    }
    return NULL;
}

/* Threading runtime: SF_POOL (the pthread pool below) or SF_OPENMP (an OpenMP parallel region:
 * in a PyTorch process, libgomp is PyTorch's, so the region runs on the intra-op threads PyTorch
 * keeps spinning after each of its own parallel ops instead of competing with them for cores). */
#define SF_POOL 0
#define SF_OPENMP 1
static _Atomic int sf_threading = SF_POOL;
static int sf_fork_child = 0;          /* set in a child of fork(): OpenMP is never used there */

int sf_openmp_available(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The runtime in effect (SF_POOL or SF_OPENMP). */
int sf_get_threading(void) {
    return sf_fork_child ? SF_POOL : atomic_load(&sf_threading);
}

/* Select the runtime; returns the one in effect (OpenMP only if compiled with it and not in a
 * child of fork(): a libgomp team of the parent, PyTorch's or ours, does not survive fork(), and
 * libgomp would wait for it forever). */
int sf_set_threading(int mode) {
    atomic_store(&sf_threading, mode == SF_OPENMP && sf_openmp_available() ? SF_OPENMP : SF_POOL);
    return sf_get_threading();
}

static void sf_atfork_child(void) {
    /* threads do not survive fork: start over with no workers; libgomp's team is gone too, so
     * the child uses the pool */
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER, s = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t c = PTHREAD_COND_INITIALIZER;
    sf_mu = m; sf_submit = s; sf_cv = c; sf_nworkers = 0;
    sf_fork_child = 1;
}

#ifdef _OPENMP
#include <omp.h>
static void sf_run_openmp(sf_chunk_fn fn, const void *ctx, int nchunks, int nthreads) {
    _Atomic int next = 0;
#pragma omp parallel num_threads(nthreads)
    {
        for (int c = atomic_fetch_add(&next, 1); c < nchunks; c = atomic_fetch_add(&next, 1)) fn(ctx, c);
    }
}
#endif

static void sf_run(sf_chunk_fn fn, const void *ctx, int nchunks, int nthreads) {
    if (nthreads > nchunks) nthreads = nchunks;
#ifdef _OPENMP
    if (nthreads > 1 && atomic_load_explicit(&sf_threading, memory_order_relaxed) == SF_OPENMP && !sf_fork_child) {
        sf_run_openmp(fn, ctx, nchunks, nthreads);
        return;
    }
#endif
    if (nthreads > SF_MAX_WORKERS + 1) nthreads = SF_MAX_WORKERS + 1;
    if (nthreads <= 1 || pthread_mutex_trylock(&sf_submit) != 0) {
        /* single thread, or another caller holds the pool: run everything here */
        for (int c = 0; c < nchunks; ++c) fn(ctx, c);
        return;
    }
    while (sf_nworkers < nthreads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, sf_worker, (void *)(intptr_t)sf_nworkers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        ++sf_nworkers;
    }
    const int nw = nthreads - 1 < sf_nworkers ? nthreads - 1 : sf_nworkers;
    pthread_mutex_lock(&sf_mu);
    const uint32_t gen = atomic_load(&sf_gen) + 1;
    sf_job.fn = fn; sf_job.ctx = ctx; sf_job.nchunks = nchunks; sf_job.nworkers = nw; sf_job.gen = gen;
    atomic_store(&sf_done, 0);
    atomic_store_explicit(&sf_claim, (uint64_t)gen << 32, memory_order_release);
    atomic_store_explicit(&sf_gen, gen, memory_order_release);
    pthread_cond_broadcast(&sf_cv);
    pthread_mutex_unlock(&sf_mu);
    sf_work(gen, fn, ctx, nchunks);
    /* every chunk is claimed now; wait only for the ones workers are still running */
    while (atomic_load_explicit(&sf_done, memory_order_acquire) < nchunks) sf_pause();
    pthread_mutex_unlock(&sf_submit);
}

#if SF_AVX2
static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* Byte -> "expand" permutation, one byte per lane (2 KiB): lane i holds 0x80 | (number of set
 * bits below bit i) if bit i is set, else 0. Sign-extended to int32 lanes, the low 3 bits index
 * vpermps and bit 31 (set lanes) is the blendv selector. The compact table needs 8-byte instead
 * of 32-byte loads: 2.24 vs 2.43 TSC cycles per 8 columns in L2 on the reference Zen 3. */
static uint64_t sf_expand[256];
/* Byte -> "compress": lane j holds the position of the j-th set bit (decodes 8 columns at once). */
static int32_t sf_compress[256][8] __attribute__((aligned(32)));
#endif
static int sf_ready = 0;

void sf_init(void) {
#if SF_AVX2
    for (int b = 0; b < 256; ++b) {
        int n = 0;
        uint64_t e = 0;
        for (int i = 0; i < 8; ++i) {
            if (b >> i & 1) {
                e |= (uint64_t)(0x80u | (unsigned)n) << (8 * i);
                sf_compress[b][n] = i;
                ++n;
            }
        }
        sf_expand[b] = e;
        for (int j = n; j < 8; ++j) sf_compress[b][j] = 0;
    }
#endif
    if (!sf_ready) pthread_atfork(NULL, NULL, sf_atfork_child);
    sf_ready = 1;
}

/* ------------------------------------------------------------------ CSR SpMV (batch 1) */
/* y[r] += bias[r] for r in [r0, r1) (bias may be NULL): the same single fp32 addition, after
 * the row's sum, as adding the bias to the finished output, so results are bitwise unchanged. */
static inline void sf_add_bias(float *y, const float *bias, int64_t r0, int64_t r1) {
    if (bias)
        for (int64_t r = r0; r < r1; ++r) y[r] += bias[r];
}

/* Software prefetch distance in elements (values and indices are streamed once per call). */
#ifndef SF_PF_DIST
#define SF_PF_DIST 256
#endif
/* Locality hint of those prefetches: 3 (prefetcht0, into every cache level) where AVX-512 is
 * compiled in, 0 (prefetchnta) elsewhere (the hint the AVX2 kernels were tuned with on Zen 3;
 * T0 is unmeasured there). On the 2-vCPU AVX-512 Xeon (KVM) the non-temporal hint made the
 * streaming kernels 2-5x slower: one thread, 4096² layers, fastest of 20 calls relative to
 * dense F.linear in the same process (machine under load): CSR at 50 % density 0.31-0.69x with hint 0 vs 0.95-1.42x with 3,
 * at 30 % 0.65-1.07x vs 1.38-3.03x; the AVX-512 bitmask kernel at 50 % 3.8 GB/s vs 25 GB/s (C
 * micro-benchmark); 8x8 blocks unchanged (3.6-4.4x either way). */
#ifndef SF_PF_LOCALITY
#if defined(__AVX512F__)
#define SF_PF_LOCALITY 3
#else
#define SF_PF_LOCALITY 0
#endif
#endif
#define SF_PREFETCH(p) __builtin_prefetch((const void *)(p), 0, SF_PF_LOCALITY)
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define SF_LITTLE_ENDIAN 1
#else
#define SF_LITTLE_ENDIAN 0
#endif
#define DEF_CSR_SPMV(SUFFIX, IDXT, LOAD8)                                                   \
static void csr_spmv_rows_scalar_##SUFFIX(const int64_t *indptr, const IDXT *idx,         \
        const float *val, const float *x, float *y, int64_t r0, int64_t r1) {             \
    for (int64_t r = r0; r < r1; ++r) {                                                   \
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f; \
        int64_t k = indptr[r];                                                            \
        const int64_t e = indptr[r + 1];                                                  \
        if (sizeof(IDXT) == 2 && SF_LITTLE_ENDIAN) {                                      \
            /* uint16 indices: 4 per 64-bit load, split with shifts (fewer loads per weight:  \
             * ~9 % faster in cache on Zen 3 than one 16-bit load per index) */            \
            for (; k + 8 <= e; k += 8) {                                                  \
                SF_PREFETCH(val + k + SF_PF_DIST); SF_PREFETCH(idx + k + SF_PF_DIST);     \
                uint64_t i0, i1;                                                          \
                memcpy(&i0, idx + k, 8); memcpy(&i1, idx + k + 4, 8);                     \
                a0 += val[k] * x[i0 & 0xffff];         a1 += val[k + 1] * x[i0 >> 16 & 0xffff]; \
                a2 += val[k + 2] * x[i0 >> 32 & 0xffff]; a3 += val[k + 3] * x[i0 >> 48];  \
                a4 += val[k + 4] * x[i1 & 0xffff];     a5 += val[k + 5] * x[i1 >> 16 & 0xffff]; \
                a6 += val[k + 6] * x[i1 >> 32 & 0xffff]; a7 += val[k + 7] * x[i1 >> 48];  \
            }                                                                             \
        }                                                                                 \
        for (; k + 8 <= e; k += 8) {                                                      \
            SF_PREFETCH(val + k + SF_PF_DIST); SF_PREFETCH(idx + k + SF_PF_DIST);         \
            a0 += val[k] * x[idx[k]];         a1 += val[k + 1] * x[idx[k + 1]];           \
            a2 += val[k + 2] * x[idx[k + 2]]; a3 += val[k + 3] * x[idx[k + 3]];           \
            a4 += val[k + 4] * x[idx[k + 4]]; a5 += val[k + 5] * x[idx[k + 5]];           \
            a6 += val[k + 6] * x[idx[k + 6]]; a7 += val[k + 7] * x[idx[k + 7]];           \
        }                                                                                 \
        for (; k < e; ++k) a0 += val[k] * x[idx[k]];                                      \
        y[r] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));                         \
    }                                                                                     \
}                                                                                         \
SF_CSR_GATHER(SUFFIX, IDXT, LOAD8)                                                        \
typedef struct { const int64_t *indptr; const IDXT *idx; const float *val; const float *x; \
        float *y; const int64_t *cuts; int variant; const float *bias; } csr_spmv_ctx_##SUFFIX; \
static void csr_spmv_chunk_##SUFFIX(const void *p, int c) {                               \
    const csr_spmv_ctx_##SUFFIX *a = (const csr_spmv_ctx_##SUFFIX *)p;                    \
    if (a->variant == 1 && SF_AVX2)                                                       \
        csr_spmv_rows_gather_##SUFFIX(a->indptr, a->idx, a->val, a->x, a->y, a->cuts[c], a->cuts[c + 1]); \
    else                                                                                  \
        csr_spmv_rows_scalar_##SUFFIX(a->indptr, a->idx, a->val, a->x, a->y, a->cuts[c], a->cuts[c + 1]); \
    sf_add_bias(a->y, a->bias, a->cuts[c], a->cuts[c + 1]);                               \
}                                                                                         \
void sf_csr_spmv_##SUFFIX(const int64_t *indptr, const IDXT *idx, const float *val,       \
        const float *x, float *y, const int64_t *cuts, int nchunks, int nthreads,          \
        int variant, const float *bias) {                                                 \
    csr_spmv_ctx_##SUFFIX a = {indptr, idx, val, x, y, cuts, variant, bias};              \
    sf_run(csr_spmv_chunk_##SUFFIX, &a, nchunks, nthreads);                               \
}

#if SF_AVX2
#define SF_CSR_GATHER(SUFFIX, IDXT, LOAD8)                                                  \
static void csr_spmv_rows_gather_##SUFFIX(const int64_t *indptr, const IDXT *idx,         \
        const float *val, const float *x, float *y, int64_t r0, int64_t r1) {             \
    for (int64_t r = r0; r < r1; ++r) {                                                   \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                    \
        int64_t k = indptr[r];                                                            \
        const int64_t e = indptr[r + 1];                                                  \
        for (; k + 16 <= e; k += 16) {                                                    \
            SF_PREFETCH(val + k + SF_PF_DIST); SF_PREFETCH(idx + k + SF_PF_DIST);         \
            __m256i i0 = LOAD8(idx + k), i1 = LOAD8(idx + k + 8);                         \
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), _mm256_i32gather_ps(x, i0, 4), acc0); \
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), _mm256_i32gather_ps(x, i1, 4), acc1); \
        }                                                                                 \
        if (k + 8 <= e) {                                                                 \
            __m256i i0 = LOAD8(idx + k);                                                  \
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), _mm256_i32gather_ps(x, i0, 4), acc0); \
            k += 8;                                                                       \
        }                                                                                 \
        float t = 0.f;                                                                    \
        for (; k < e; ++k) t += val[k] * x[idx[k]];                                       \
        y[r] = hsum256(_mm256_add_ps(acc0, acc1)) + t;                                    \
    }                                                                                     \
}
#define LOAD8_U16(p) _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD8_I32(p) _mm256_loadu_si256((const __m256i *)(p))
#else
#define SF_CSR_GATHER(SUFFIX, IDXT, LOAD8)                                                  \
static void csr_spmv_rows_gather_##SUFFIX(const int64_t *indptr, const IDXT *idx,         \
        const float *val, const float *x, float *y, int64_t r0, int64_t r1) {             \
    csr_spmv_rows_scalar_##SUFFIX(indptr, idx, val, x, y, r0, r1);                        \
}
#define LOAD8_U16(p) 0
#define LOAD8_I32(p) 0
#endif

DEF_CSR_SPMV(u16, uint16_t, LOAD8_U16)
DEF_CSR_SPMV(i32, int32_t, LOAD8_I32)

/* ------------------------------------------------------------------ SpMM tiles (batch > 1)
 * acc(tile of T = 8*NV batch columns) += val[k] * xt[idx[k], tile] for k in [k0, k1), with NS
 * independent accumulator sets (kept weights alternate between sets) to hide FMA latency. */
#if SF_AVX2
#define DEF_TILE(NAME, IDXT, NV, NS, INIT)                                                  \
static inline void NAME(const IDXT *idx, const float *val, int64_t k0, int64_t k1,       \
        const float *xt, int64_t ldx, float *o) {                                         \
    __m256 acc[NS][NV];                                                                   \
    _Pragma("GCC unroll 8") for (int s = 0; s < NS; ++s)                                  \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v)                              \
            acc[s][v] = (INIT && s == 0) ? _mm256_loadu_ps(o + 8 * v) : _mm256_setzero_ps(); \
    int64_t k = k0;                                                                       \
    for (; k + NS <= k1; k += NS) {                                                       \
        _Pragma("GCC unroll 8") for (int s = 0; s < NS; ++s) {                            \
            const __m256 w = _mm256_broadcast_ss(val + k + s);                            \
            const float *xr = xt + (int64_t)idx[k + s] * ldx;                             \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v)                          \
                acc[s][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * v), acc[s][v]);   \
        }                                                                                 \
    }                                                                                     \
    for (; k < k1; ++k) {                                                                 \
        const __m256 w = _mm256_broadcast_ss(val + k);                                    \
        const float *xr = xt + (int64_t)idx[k] * ldx;                                     \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v)                              \
            acc[0][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * v), acc[0][v]);       \
    }                                                                                     \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {                                \
        __m256 a = acc[0][v];                                                             \
        _Pragma("GCC unroll 8") for (int s = 1; s < NS; ++s) a = _mm256_add_ps(a, acc[s][v]); \
        _mm256_storeu_ps(o + 8 * v, a);                                                   \
    }                                                                                     \
}
#else
#define DEF_TILE(NAME, IDXT, NV, NS, INIT)                                                  \
static inline void NAME(const IDXT *idx, const float *val, int64_t k0, int64_t k1,       \
        const float *xt, int64_t ldx, float *o) {                                         \
    float acc[8 * NV];                                                                    \
    for (int b = 0; b < 8 * NV; ++b) acc[b] = INIT ? o[b] : 0.f;                          \
    for (int64_t k = k0; k < k1; ++k) {                                                   \
        const float w = val[k];                                                           \
        const float *xr = xt + (int64_t)idx[k] * ldx;                                     \
        for (int b = 0; b < 8 * NV; ++b) acc[b] += w * xr[b];                             \
    }                                                                                     \
    for (int b = 0; b < 8 * NV; ++b) o[b] = acc[b];                                       \
}
#endif

#define DEF_TILES1(SUFFIX, IDXT, INIT)                                                      \
DEF_TILE(tile8_##SUFFIX, IDXT, 1, 4, INIT)                                                \
DEF_TILE(tile16_##SUFFIX, IDXT, 2, 4, INIT)                                               \
DEF_TILE(tile32_##SUFFIX, IDXT, 4, 2, INIT)                                               \
DEF_TILE(tile64_##SUFFIX, IDXT, 8, 1, INIT)                                               \
/* one row of out_t: all tiles of the (padded) batch */                                   \
static inline void row_tiles_##SUFFIX(const IDXT *idx, const float *val, int64_t k0,     \
        int64_t k1, const float *xt, int64_t ldx, float *o) {                             \
    int64_t b = 0;                                                                        \
    for (; b + 64 <= ldx; b += 64) tile64_##SUFFIX(idx, val, k0, k1, xt + b, ldx, o + b); \
    if (b + 32 <= ldx) { tile32_##SUFFIX(idx, val, k0, k1, xt + b, ldx, o + b); b += 32; } \
    if (b + 16 <= ldx) { tile16_##SUFFIX(idx, val, k0, k1, xt + b, ldx, o + b); b += 16; } \
    if (b + 8 <= ldx) { tile8_##SUFFIX(idx, val, k0, k1, xt + b, ldx, o + b); b += 8; }  \
}
#define DEF_TILES(SUFFIX, IDXT) DEF_TILES1(SUFFIX, IDXT, 0) DEF_TILES1(SUFFIX##_acc, IDXT, 1)

DEF_TILES(u16, uint16_t)
DEF_TILES(i32, int32_t)

#define DEF_CSR_SPMM(SUFFIX, IDXT)                                                          \
typedef struct { const int64_t *indptr; const IDXT *idx; const float *val; const float *xt; \
        int64_t ldx; float *out_t; const int64_t *cuts; } csr_spmm_ctx_##SUFFIX;           \
static void csr_spmm_chunk_##SUFFIX(const void *p, int c) {                               \
    const csr_spmm_ctx_##SUFFIX *a = (const csr_spmm_ctx_##SUFFIX *)p;                    \
    for (int64_t r = a->cuts[c]; r < a->cuts[c + 1]; ++r)                                 \
        row_tiles_##SUFFIX(a->idx, a->val, a->indptr[r], a->indptr[r + 1], a->xt, a->ldx, a->out_t + r * a->ldx); \
}                                                                                         \
void sf_csr_spmm_##SUFFIX(const int64_t *indptr, const IDXT *idx, const float *val,       \
        const float *xt, int64_t ldx, float *out_t, const int64_t *cuts, int nchunks,      \
        int nthreads) {                                                                   \
    csr_spmm_ctx_##SUFFIX a = {indptr, idx, val, xt, ldx, out_t, cuts};                   \
    sf_run(csr_spmm_chunk_##SUFFIX, &a, nchunks, nthreads);                               \
}

DEF_CSR_SPMM(u16, uint16_t)
DEF_CSR_SPMM(i32, int32_t)

/* Column-blocked SpMM: for a group of up to SF_RB rows, walk the input features in blocks of
 * `cb` columns, so the block xt[c0:c0+cb, :] stays in L2 while every row of the group uses it.
 * A row's kept weights are consumed in index order across blocks (k only advances), each block
 * continuing the row's accumulators from out_t, so every kept weight is used exactly once even
 * if indices were not sorted; the order of additions depends only on cb and the row, never on
 * the thread split. */
#define SF_RB 1024
#define DEF_CSR_SPMM_BLK(SUFFIX, IDXT)                                                      \
typedef struct { const int64_t *indptr; const IDXT *idx; const float *val; const float *xt; \
        int64_t ldx; float *out_t; const int64_t *cuts; int64_t cols, cb, rb; } csr_spmm_blk_ctx_##SUFFIX; \
static void csr_spmm_blk_chunk_##SUFFIX(const void *p, int c) {                           \
    const csr_spmm_blk_ctx_##SUFFIX *a = (const csr_spmm_blk_ctx_##SUFFIX *)p;            \
    const IDXT *idx = a->idx; const int64_t *indptr = a->indptr;                          \
    int64_t kp[SF_RB];                                                                    \
    const int64_t rb = a->rb < 1 ? 1 : a->rb < SF_RB ? a->rb : SF_RB;                     \
    const int64_t cb = a->cb < 1 ? (a->cols > 0 ? a->cols : 1) : a->cb;                   \
    for (int64_t g = a->cuts[c]; g < a->cuts[c + 1]; g += rb) {                           \
        const int64_t ge = g + rb < a->cuts[c + 1] ? g + rb : a->cuts[c + 1];             \
        for (int64_t r = g; r < ge; ++r) kp[r - g] = indptr[r];                           \
        for (int64_t c0 = 0; c0 == 0 || c0 < a->cols; c0 += cb) {                         \
            const int64_t c1 = c0 + cb;                                                   \
            const int last = c1 >= a->cols;                                               \
            for (int64_t r = g; r < ge; ++r) {                                            \
                const int64_t k0 = kp[r - g], e = indptr[r + 1];                          \
                int64_t k1 = e;                                                           \
                if (!last) { k1 = k0; while (k1 < e && (int64_t)idx[k1] < c1) ++k1; }     \
                if (c0 == 0)                                                              \
                    row_tiles_##SUFFIX(idx, a->val, k0, k1, a->xt, a->ldx, a->out_t + r * a->ldx); \
                else if (k1 > k0)                                                         \
                    row_tiles_##SUFFIX##_acc(idx, a->val, k0, k1, a->xt, a->ldx, a->out_t + r * a->ldx); \
                kp[r - g] = k1;                                                           \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
}                                                                                         \
void sf_csr_spmm_blk_##SUFFIX(const int64_t *indptr, const IDXT *idx, const float *val,   \
        const float *xt, int64_t ldx, float *out_t, const int64_t *cuts, int nchunks,      \
        int nthreads, int64_t cols, int64_t cb, int64_t rb) {                             \
    csr_spmm_blk_ctx_##SUFFIX a = {indptr, idx, val, xt, ldx, out_t, cuts, cols, cb, rb};  \
    sf_run(csr_spmm_blk_chunk_##SUFFIX, &a, nchunks, nthreads);                           \
}

DEF_CSR_SPMM_BLK(u16, uint16_t)
DEF_CSR_SPMM_BLK(i32, int32_t)

/* ------------------------------------------------------------------ transpose
 * dst[j * ldd + i] = src[i * lds + j] for i < m, j < n, and dst[j * ldd + i] = 0 for
 * m <= i < mpad (the zero padding of xt). Used for x -> xt and out_t -> out around the SpMM;
 * torch's strided copy of a (128, 4096) fp32 matrix ran at ~1.6 GB/s here. Pure copies, so the
 * result is exact. Chunks are ranges of j (multiples of 8). */
typedef struct { const float *src; int64_t m, n, lds; float *dst; int64_t ldd, mpad, jstep; } tr_ctx;

#if SF_AVX2
static inline void tr8x8(const float *s, int64_t lds, float *d, int64_t ldd) {
    const __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + lds);
    const __m256 r2 = _mm256_loadu_ps(s + 2 * lds), r3 = _mm256_loadu_ps(s + 3 * lds);
    const __m256 r4 = _mm256_loadu_ps(s + 4 * lds), r5 = _mm256_loadu_ps(s + 5 * lds);
    const __m256 r6 = _mm256_loadu_ps(s + 6 * lds), r7 = _mm256_loadu_ps(s + 7 * lds);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
    const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

/* Source tiles of SF_TR_ROWS x SF_TR_COLS: a tile's rows are read whole (two cache lines each)
 * and its page translations stay in the TLB. Walking all m rows per strip of 8 columns instead,
 * as this did before, touched one page per row: a (1024, 1536) matrix transposed at 15 GB/s, a
 * third of a plain copy's speed. */
#define SF_TR_ROWS 32
#define SF_TR_COLS 32

static void tr_chunk(const void *p, int c) {
    const tr_ctx *a = (const tr_ctx *)p;
    const int64_t j0 = (int64_t)c * a->jstep, j1 = j0 + a->jstep < a->n ? j0 + a->jstep : a->n;
    int64_t jv = j0, m8 = 0; /* columns [j0, jv) and rows [0, m8) done by 8 x 8 blocks */
#if SF_AVX2
    jv = j0 + (j1 - j0) / 8 * 8;
    m8 = a->m / 8 * 8;
    for (int64_t jb = j0; jb < jv; jb += SF_TR_COLS) {
        const int64_t je = jb + SF_TR_COLS < jv ? jb + SF_TR_COLS : jv;
        for (int64_t ib = 0; ib < m8; ib += SF_TR_ROWS) {
            const int64_t ie = ib + SF_TR_ROWS < m8 ? ib + SF_TR_ROWS : m8;
            for (int64_t i = ib; i < ie; i += 8)
                for (int64_t j = jb; j < je; j += 8)
                    tr8x8(a->src + i * a->lds + j, a->lds, a->dst + j * a->ldd + i, a->ldd);
        }
    }
#endif
    for (int64_t j = j0; j < j1; ++j) {
        float *d = a->dst + j * a->ldd;
        for (int64_t i = j < jv ? m8 : 0; i < a->m; ++i) d[i] = a->src[i * a->lds + j];
        for (int64_t i = a->m; i < a->mpad; ++i) d[i] = 0.f;
    }
}

/* The transpose's chunks: ranges of `*jstep` (a multiple of 8) of the n source columns,
 * 4 per thread; returns their number */
static int tr_chunks(int64_t n, int nthreads, int64_t *jstep) {
    const int nchunks = nthreads > 1 ? 4 * nthreads : 1;
    int64_t step = ((n + nchunks - 1) / nchunks + 7) / 8 * 8;
    if (step < 8) step = 8;
    *jstep = step;
    return (int)((n + step - 1) / step);
}

void sf_transpose(const float *src, int64_t m, int64_t n, int64_t lds, float *dst, int64_t ldd,
                  int64_t mpad, int nthreads) {
    int64_t jstep;
    const int nchunks = tr_chunks(n, nthreads, &jstep);
    if (nchunks < 1) return;
    tr_ctx a = {src, m, n, lds, dst, ldd, mpad < m ? m : mpad, jstep};
    sf_run(tr_chunk, &a, nchunks, nthreads);
}

/* ------------------------------------------------------------------ bitmask */
static inline float bitmask_row_scalar(const uint64_t *m, int64_t words, const float *v,
                                       const float *x) {
    float a0 = 0.f, a1 = 0.f;
    for (int64_t w = 0; w < words; ++w) {
        uint64_t bits = m[w];
        const float *xw = x + 64 * w;
        while (bits) {
            a0 += *v++ * xw[__builtin_ctzll(bits)];
            bits &= bits - 1;
            if (!bits) break;
            a1 += *v++ * xw[__builtin_ctzll(bits)];
            bits &= bits - 1;
        }
    }
    return a0 + a1;
}

#if SF_AVX2
/* Expand 8 columns per mask byte: load 8 values, permute them into the set lanes, zero the
 * others (blendv on bit 31 of the table entry), FMA with 8 contiguous x. Reads up to 7 values
 * past the row end, so the caller uses it only when that stays inside the values array. */
#define SF_EXPAND_STEP(ACC, BYTE, XP)                                                       \
    do {                                                                                  \
        const unsigned b_ = (unsigned)(BYTE);                                             \
        const __m256i p_ = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)&sf_expand[b_])); \
        const __m256 e_ = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v), p_);               \
        const __m256 w_ = _mm256_blendv_ps(_mm256_setzero_ps(), e_, _mm256_castsi256_ps(p_)); \
        ACC = _mm256_fmadd_ps(w_, _mm256_loadu_ps(XP), ACC);                              \
        v += __builtin_popcount(b_);                                                      \
    } while (0)

#ifndef SF_BM_PF_DIST
#define SF_BM_PF_DIST 512
#endif
static inline float bitmask_row_expand(const uint64_t *m, int64_t words, const float *v,
                                       const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
        const uint64_t bits = m[w];
        const float *xw = x + 64 * w;
        if (!bits) continue;
        /* up to 64 values per word: keep the value stream SF_BM_PF_DIST floats ahead in cache
         * (prefetching past the array end is harmless); measured 6.7 -> 5.3-6.0 ms for 4
         * 4096² layers at 50 % density on 2 threads, caches flushed */
        SF_PREFETCH(v + SF_BM_PF_DIST);
        SF_PREFETCH(v + SF_BM_PF_DIST + 16);
#if SF_LITTLE_ENDIAN
        /* the word's bytes straight from memory (byte j = columns 8j..8j+7): no shifts */
        const uint8_t *mb = (const uint8_t *)(m + w);
        SF_EXPAND_STEP(a0, mb[0], xw);
        SF_EXPAND_STEP(a1, mb[1], xw + 8);
        SF_EXPAND_STEP(a2, mb[2], xw + 16);
        SF_EXPAND_STEP(a3, mb[3], xw + 24);
        SF_EXPAND_STEP(a0, mb[4], xw + 32);
        SF_EXPAND_STEP(a1, mb[5], xw + 40);
        SF_EXPAND_STEP(a2, mb[6], xw + 48);
        SF_EXPAND_STEP(a3, mb[7], xw + 56);
#else
        SF_EXPAND_STEP(a0, bits & 0xff, xw);
        SF_EXPAND_STEP(a1, bits >> 8 & 0xff, xw + 8);
        SF_EXPAND_STEP(a2, bits >> 16 & 0xff, xw + 16);
        SF_EXPAND_STEP(a3, bits >> 24 & 0xff, xw + 24);
        SF_EXPAND_STEP(a0, bits >> 32 & 0xff, xw + 32);
        SF_EXPAND_STEP(a1, bits >> 40 & 0xff, xw + 40);
        SF_EXPAND_STEP(a2, bits >> 48 & 0xff, xw + 48);
        SF_EXPAND_STEP(a3, bits >> 56, xw + 56);
#endif
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}
#endif

#if SF_AVX512
/* 16 columns per step: the mask's 16 bits go straight from memory into a mask register, the
 * row's next values are expand-loaded into the set lanes (zeros elsewhere), FMA with 16
 * contiguous x. Masked-off lanes are never read, so nothing past the row's values is touched.
 * Every lane is multiplied (no step or word is skipped), so a NaN or infinity in x gives the
 * same NaN as dense F.linear (0 * NaN), whatever the row keeps. The 4 steps of a 64-column word
 * take their value offsets from popcounts of the word's low 16 / 32 / 48 bits, so they do not
 * wait for each other; 8 accumulators (2 words) hide the FMA latency. */
/* floats ahead of the value stream (4 lines per 2 words: the stream at 50 % density) */
#ifndef SF_BM512_PF_DIST
#define SF_BM512_PF_DIST 1024
#endif
#define SF_EXPAND16(ACC, K, VP, XP) \
    ACC = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((K), (VP)), _mm512_loadu_ps(XP), ACC)
static inline void sf_expand_word512(const uint64_t *mw, const float *v, const float *xw,
                                     __m512 *a0, __m512 *a1, __m512 *a2, __m512 *a3) {
    const uint64_t bits = *mw;
    const __mmask16 *k = (const __mmask16 *)mw;
    const int o1 = __builtin_popcountll(bits & 0xffffu);
    const int o2 = __builtin_popcountll(bits & 0xffffffffu);
    const int o3 = __builtin_popcountll(bits & 0xffffffffffffull);
    SF_EXPAND16(*a0, _load_mask16((__mmask16 *)k), v, xw);
    SF_EXPAND16(*a1, _load_mask16((__mmask16 *)(k + 1)), v + o1, xw + 16);
    SF_EXPAND16(*a2, _load_mask16((__mmask16 *)(k + 2)), v + o2, xw + 32);
    SF_EXPAND16(*a3, _load_mask16((__mmask16 *)(k + 3)), v + o3, xw + 48);
}
static inline float bitmask_row_expand512(const uint64_t *m, int64_t words, const float *v,
                                          const float *x) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
    int64_t w = 0;
    for (; w + 2 <= words; w += 2) {
        SF_PREFETCH(v + SF_BM512_PF_DIST);
        SF_PREFETCH(v + SF_BM512_PF_DIST + 16);
        SF_PREFETCH(v + SF_BM512_PF_DIST + 32);
        SF_PREFETCH(v + SF_BM512_PF_DIST + 48);
        const int n0 = __builtin_popcountll(m[w]);
        sf_expand_word512(m + w, v, x + 64 * w, &a0, &a1, &a2, &a3);
        sf_expand_word512(m + w + 1, v + n0, x + 64 * w + 64, &b0, &b1, &b2, &b3);
        v += n0 + __builtin_popcountll(m[w + 1]);
    }
    if (w < words) sf_expand_word512(m + w, v, x + 64 * w, &a0, &a1, &a2, &a3);
    a0 = _mm512_add_ps(_mm512_add_ps(a0, b0), _mm512_add_ps(a1, b1));
    a2 = _mm512_add_ps(_mm512_add_ps(a2, b2), _mm512_add_ps(a3, b3));
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a2));
}
#endif

typedef struct { const uint64_t *mask; int64_t words; const int64_t *rowptr; const float *val;
                 int64_t nnz; const float *x; float *y; const int64_t *cuts; int variant;
                 const float *xt; int64_t ldx; float *out_t; _Atomic int failed; const float *bias; } bitmask_ctx;

static void bitmask_spmv_chunk(const void *p, int c) {
    const bitmask_ctx *a = (const bitmask_ctx *)p;
    for (int64_t r = a->cuts[c]; r < a->cuts[c + 1]; ++r) {
        const uint64_t *m = a->mask + r * a->words;
        const float *v = a->val + a->rowptr[r];
#if SF_AVX512
        if (a->variant == 2) {  /* no over-read: masked-off lanes are not loaded */
            a->y[r] = bitmask_row_expand512(m, a->words, v, a->x);
            continue;
        }
#endif
#if SF_AVX2
        if (a->variant >= 1 && a->rowptr[r + 1] + 8 <= a->nnz) {
            a->y[r] = bitmask_row_expand(m, a->words, v, a->x);
            continue;
        }
#endif
        a->y[r] = bitmask_row_scalar(m, a->words, v, a->x);
    }
    sf_add_bias(a->y, a->bias, a->cuts[c], a->cuts[c + 1]);
}

/* variant 0: bit iteration (tzcnt), 1: byte expand (AVX2 only; falls back to 0), 2: 16-column
 * expand-load (AVX-512 only; falls back to 1). */
void sf_bitmask_spmv(const uint64_t *mask, int64_t words, const int64_t *rowptr,
                     const float *val, int64_t nnz, const float *x, float *y,
                     const int64_t *cuts, int nchunks, int nthreads, int variant, const float *bias) {
    bitmask_ctx a = {mask, words, rowptr, val, nnz, x, y, cuts, variant, NULL, 0, NULL, 0, bias};
    sf_run(bitmask_spmv_chunk, &a, nchunks, nthreads);
}

/* Batch > 1: decode the row's set bits into column indices (a buffer per chunk), then run the
 * same tiles as CSR. */
static void bitmask_spmm_chunk(const void *p, int c) {
    bitmask_ctx *a = (bitmask_ctx *)p;
    int32_t *cols = (int32_t *)malloc(sizeof(int32_t) * (size_t)(a->words * 64 + 8));
    if (!cols) { atomic_store(&a->failed, 1); return; }
    for (int64_t r = a->cuts[c]; r < a->cuts[c + 1]; ++r) {
        const uint64_t *m = a->mask + r * a->words;
        int64_t n = 0;
        for (int64_t w = 0; w < a->words; ++w) {
            uint64_t bits = m[w];
#if SF_AVX2
            /* 8 columns per byte, branch-free: cols has 8 spare slots for the overhanging store */
            for (int j = 0; j < 8; ++j, bits >>= 8) {
                const unsigned b = (unsigned)(bits & 0xff);
                const __m256i pos = _mm256_add_epi32(_mm256_load_si256((const __m256i *)sf_compress[b]),
                                                     _mm256_set1_epi32((int)(64 * w + 8 * j)));
                _mm256_storeu_si256((__m256i *)(cols + n), pos);
                n += __builtin_popcount(b);
            }
#else
            while (bits) {
                cols[n++] = (int32_t)(64 * w + __builtin_ctzll(bits));
                bits &= bits - 1;
            }
#endif
        }
        row_tiles_i32(cols, a->val + a->rowptr[r], 0, n, a->xt, a->ldx, a->out_t + r * a->ldx);
    }
    free(cols);
}

/* Returns 0, or -1 if a buffer could not be allocated. */
int sf_bitmask_spmm(const uint64_t *mask, int64_t words, const int64_t *rowptr,
                    const float *val, const float *xt, int64_t ldx, float *out_t,
                    const int64_t *cuts, int nchunks, int nthreads) {
    bitmask_ctx a = {mask, words, rowptr, val, 0, NULL, NULL, cuts, 0, xt, ldx, out_t, 0, NULL};
    sf_run(bitmask_spmm_chunk, &a, nchunks, nthreads);
    return atomic_load(&a.failed) ? -1 : 0;
}

/* ------------------------------------------------------------------ block sparse (BSR)
 * Layout: brow int64[nbr + 1] (block-row pointer), bcol int32[nblocks] (block-column index),
 * blocks float[nblocks, bh, bw] (row-major inside a block); block-row br covers output rows
 * br*bh .. br*bh + bh - 1 and block k of it input columns bcol[k]*bw .. + bw - 1.
 * No index is stored per weight, so a kept weight costs 4 bytes and one FMA lane.
 * Chunks (`cuts`) are ranges of block-rows. Rows are handled in groups of up to 8 (GH): the
 * group's accumulators stay in registers while the block-row's blocks stream past. For every
 * output row the order of additions depends only on (bh, bw) and the block order, never on the
 * thread split. */
typedef struct { const int64_t *brow; const int32_t *bcol; const float *blk; int64_t bh, bw;
                 const float *x; float *y; const float *xt; int64_t ldx; float *out_t;
                 const int64_t *cuts; const float *bias; int64_t nbc, cb, rb; } block_ctx;

#if SF_AVX2
static inline float hsum128(__m128 v) {
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}
/* SpMV for rows i0 .. i0+GH-1 of block-row br with W-lane vectors (W = 8: bw % 8 == 0, AVX;
 * W = 4: bw % 4 == 0, SSE); lane l of acc[i] sums the row's columns = l mod W. */
/* Blocks are one sequential stream per thread; prefetching 256 bytes ahead measured best: 4
 * 4096² layers of 8x8 blocks, 2 threads, 128 MB read before each call, kernel time / time of
 * torch's sum over the same blocks: 1.07-1.11 at 256 bytes, 1.10-1.17 at 0, 1.19-1.35 at 512,
 * 1.25-1.35 at 1024 (70 % and 90 % sparsity, two runs each). */
#ifndef SF_BLK_PF_BYTES
#define SF_BLK_PF_BYTES 256
#endif
#define DEF_BLOCK_SPMV(W, VT, SETZERO, LOADU, FMADD, HSUM, GH)                              \
static inline void block_spmv##W##_g##GH(const block_ctx *a, int64_t br, int64_t i0) {    \
    VT acc[GH];                                                                           \
    _Pragma("GCC unroll 8") for (int i = 0; i < GH; ++i) acc[i] = SETZERO();              \
    const int64_t bw = a->bw, bsz = a->bh * a->bw;                                         \
    for (int64_t k = a->brow[br]; k < a->brow[br + 1]; ++k) {                             \
        const float *xs = a->x + (int64_t)a->bcol[k] * bw;                                \
        const float *b = a->blk + k * bsz + i0 * bw;                                      \
        SF_PREFETCH((const char *)b + SF_BLK_PF_BYTES);                                   \
        SF_PREFETCH((const char *)b + SF_BLK_PF_BYTES + 64 * (bsz >= 32));                \
        for (int64_t s = 0; s < bw; s += (W)) {                                           \
            const VT xv = LOADU(xs + s);                                                  \
            _Pragma("GCC unroll 8") for (int i = 0; i < GH; ++i)                          \
                acc[i] = FMADD(LOADU(b + i * bw + s), xv, acc[i]);                        \
        }                                                                                 \
    }                                                                                     \
    _Pragma("GCC unroll 8") for (int i = 0; i < GH; ++i) a->y[br * a->bh + i0 + i] = HSUM(acc[i]); \
}
#define DEF_BLOCK_SPMV_W(W, VT, SETZERO, LOADU, FMADD, HSUM)                                \
    DEF_BLOCK_SPMV(W, VT, SETZERO, LOADU, FMADD, HSUM, 8)                                 \
    DEF_BLOCK_SPMV(W, VT, SETZERO, LOADU, FMADD, HSUM, 4)                                 \
    DEF_BLOCK_SPMV(W, VT, SETZERO, LOADU, FMADD, HSUM, 2)                                 \
    DEF_BLOCK_SPMV(W, VT, SETZERO, LOADU, FMADD, HSUM, 1)
DEF_BLOCK_SPMV_W(8, __m256, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, hsum256)
DEF_BLOCK_SPMV_W(4, __m128, _mm_setzero_ps, _mm_loadu_ps, _mm_fmadd_ps, hsum128)
#endif

/* Any (bh, bw): one row at a time, scalar. */
static inline void block_spmv_row_scalar(const block_ctx *a, int64_t br, int64_t i) {
    const int64_t bw = a->bw, bsz = a->bh * a->bw;
    float acc = 0.f;
    for (int64_t k = a->brow[br]; k < a->brow[br + 1]; ++k) {
        const float *xs = a->x + (int64_t)a->bcol[k] * bw;
        const float *b = a->blk + k * bsz + i * bw;
        for (int64_t j = 0; j < bw; ++j) acc += b[j] * xs[j];
    }
    a->y[br * a->bh + i] = acc;
}

static void block_spmv_chunk(const void *p, int c) {
    const block_ctx *a = (const block_ctx *)p;
    for (int64_t br = a->cuts[c]; br < a->cuts[c + 1]; ++br) {
        int64_t i = 0;
#if SF_AVX2
#define BLOCK_SPMV_ROWS(W)                                                                  \
        do {                                                                              \
            for (; i + 8 <= a->bh; i += 8) block_spmv##W##_g8(a, br, i);                  \
            if (i + 4 <= a->bh) { block_spmv##W##_g4(a, br, i); i += 4; }                 \
            if (i + 2 <= a->bh) { block_spmv##W##_g2(a, br, i); i += 2; }                 \
            if (i < a->bh) { block_spmv##W##_g1(a, br, i); ++i; }                         \
        } while (0)
        if (a->bw % 8 == 0) BLOCK_SPMV_ROWS(8);
        else if (a->bw % 4 == 0) BLOCK_SPMV_ROWS(4);
#endif
        for (; i < a->bh; ++i) block_spmv_row_scalar(a, br, i);
        sf_add_bias(a->y, a->bias, br * a->bh, br * a->bh + a->bh);
    }
}

void sf_block_spmv(const int64_t *brow, const int32_t *bcol, const float *blk, int64_t bh, int64_t bw,
                   const float *x, float *y, const int64_t *cuts, int nchunks, int nthreads, const float *bias) {
    block_ctx a = {brow, bcol, blk, bh, bw, x, y, NULL, 0, NULL, cuts, bias, 0, 0, 0};
    sf_run(block_spmv_chunk, &a, nchunks, nthreads);
}

/* SpMM on xt (cols, ldx), ldx % 8 == 0: for a group of GH rows and NT 8-column batch tiles,
 * out_t[row, tiles] = sum over the block-row's weights w[i, j] of w * xt[col j, tiles]: a
 * broadcast and NT FMAs per weight, GH * NT independent accumulators (8 when possible, so the
 * FMA latency is hidden even for one-row blocks). */
#if SF_AVX2
#define DEF_BLOCK_SPMM(GH, NT, NS)                                                          \
static inline void block_spmm_g##GH##_t##NT(const block_ctx *a, int64_t br, int64_t i0, int64_t t, \
                                             int64_t k0, int64_t k1, int init) {          \
    __m256 acc[NS][GH][NT];                                                               \
    const int64_t bw = a->bw, bsz = a->bh * a->bw, ldx = a->ldx;                           \
    _Pragma("GCC unroll 8") for (int s = 0; s < NS; ++s)                                  \
        _Pragma("GCC unroll 8") for (int i = 0; i < GH; ++i)                              \
            _Pragma("GCC unroll 8") for (int v = 0; v < NT; ++v)                          \
                acc[s][i][v] = (init && s == 0) ? _mm256_loadu_ps(a->out_t + (br * a->bh + i0 + i) * ldx + t + 8 * v) \
                                                : _mm256_setzero_ps();                    \
    for (int64_t k = k0; k < k1; ++k) {                                                   \
        const float *xr = a->xt + (int64_t)a->bcol[k] * bw * ldx + t;                     \
        const float *b = a->blk + k * bsz + i0 * bw;                                      \
        int64_t j = 0;                                                                    \
        for (; j + NS <= bw; j += NS)                                                     \
            _Pragma("GCC unroll 8") for (int s = 0; s < NS; ++s)                          \
                _Pragma("GCC unroll 8") for (int i = 0; i < GH; ++i) {                    \
                    const __m256 w = _mm256_broadcast_ss(b + i * bw + j + s);             \
                    _Pragma("GCC unroll 8") for (int v = 0; v < NT; ++v)                  \
                        acc[s][i][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + (j + s) * ldx + 8 * v), acc[s][i][v]); \
                }                                                                         \
        for (; j < bw; ++j)                                                               \
            _Pragma("GCC unroll 8") for (int i = 0; i < GH; ++i) {                        \
                const __m256 w = _mm256_broadcast_ss(b + i * bw + j);                     \
                _Pragma("GCC unroll 8") for (int v = 0; v < NT; ++v)                      \
                    acc[0][i][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + j * ldx + 8 * v), acc[0][i][v]); \
            }                                                                             \
    }                                                                                     \
    _Pragma("GCC unroll 8") for (int i = 0; i < GH; ++i)                                  \
        _Pragma("GCC unroll 8") for (int v = 0; v < NT; ++v) {                            \
            __m256 r = acc[0][i][v];                                                      \
            _Pragma("GCC unroll 8") for (int s = 1; s < NS; ++s) r = _mm256_add_ps(r, acc[s][i][v]); \
            _mm256_storeu_ps(a->out_t + (br * a->bh + i0 + i) * ldx + t + 8 * v, r);     \
        }                                                                                 \
}
/* (rows, tiles, accumulator sets): 8 accumulators each. The variant with the most tiles that
 * fit the batch runs first, so a group reads each xt cache line for all its tiles at once
 * (batch 16 with one-row blocks: 6.1 -> see docs; two one-tile passes re-read xt from L2). */
DEF_BLOCK_SPMM(8, 1, 1)
DEF_BLOCK_SPMM(4, 2, 1)
DEF_BLOCK_SPMM(4, 1, 2)
DEF_BLOCK_SPMM(2, 4, 1)
DEF_BLOCK_SPMM(2, 2, 2)
DEF_BLOCK_SPMM(2, 1, 4)
DEF_BLOCK_SPMM(1, 8, 1)
DEF_BLOCK_SPMM(1, 4, 2)
DEF_BLOCK_SPMM(1, 2, 4)
DEF_BLOCK_SPMM(1, 1, 8)
/* rows i .. i+GH-1 of block-row br over every tile t: NT tiles at a time while they fit */
#define BLOCK_SPMM_STEP(GH, NT)                                                             \
    for (; t + 8 * (NT) <= a->ldx; t += 8 * (NT)) block_spmm_g##GH##_t##NT(a, br, i, t, k0, k1, init)
#else
static inline void block_spmm_scalar_row(const block_ctx *a, int64_t br, int64_t i0, int64_t t,
                                         int64_t k0, int64_t k1, int init) {
    float acc[8];
    const int64_t bw = a->bw, bsz = a->bh * a->bw, ldx = a->ldx;
    float *o = a->out_t + (br * a->bh + i0) * ldx + t;
    for (int l = 0; l < 8; ++l) acc[l] = init ? o[l] : 0.f;
    for (int64_t k = k0; k < k1; ++k) {
        const float *xr = a->xt + (int64_t)a->bcol[k] * bw * ldx + t;
        const float *b = a->blk + k * bsz + i0 * bw;
        for (int64_t j = 0; j < bw; ++j)
            for (int l = 0; l < 8; ++l) acc[l] += b[j] * xr[j * ldx + l];
    }
    for (int l = 0; l < 8; ++l) o[l] = acc[l];
}
#endif

/* all rows of block-row br, blocks k0 .. k1-1, every tile; init: add to out_t (later column ranges) */
static inline void block_spmm_rows(const block_ctx *a, int64_t br, int64_t k0, int64_t k1, int init) {
    int64_t i = 0;
#if SF_AVX2
    for (; i + 8 <= a->bh; i += 8) { int64_t t = 0; BLOCK_SPMM_STEP(8, 1); }
    if (i + 4 <= a->bh) { int64_t t = 0; BLOCK_SPMM_STEP(4, 2); BLOCK_SPMM_STEP(4, 1); i += 4; }
    if (i + 2 <= a->bh) { int64_t t = 0; BLOCK_SPMM_STEP(2, 4); BLOCK_SPMM_STEP(2, 2); BLOCK_SPMM_STEP(2, 1); i += 2; }
    if (i < a->bh) { int64_t t = 0; BLOCK_SPMM_STEP(1, 8); BLOCK_SPMM_STEP(1, 4); BLOCK_SPMM_STEP(1, 2); BLOCK_SPMM_STEP(1, 1); ++i; }
#else
    for (; i < a->bh; ++i)
        for (int64_t t = 0; t < a->ldx; t += 8) block_spmm_scalar_row(a, br, i, t, k0, k1, init);
#endif
}

/* Column blocking as for CSR (sf_csr_spmm_blk): a group of rb block-rows walks the block-columns
 * in ranges of cb, so the xt rows of one range (cb * bw inputs) stay in L2 while every block-row
 * of the group uses them; each block-row continues its sums in out_t from range to range. Blocks
 * of a block-row must be sorted by column (BlockSparse.from_dense makes them so). cb <= 0: one
 * range. The ranges depend only on the layer and batch, so results do not depend on threads. */
static void block_spmm_chunk(const void *p, int c) {
    const block_ctx *a = (const block_ctx *)p;
    int64_t kp[SF_RB];
    const int64_t rb = a->rb < 1 ? 1 : a->rb < SF_RB ? a->rb : SF_RB;
    const int64_t cb = a->cb < 1 || a->cb > a->nbc ? (a->nbc > 0 ? a->nbc : 1) : a->cb;
    for (int64_t g = a->cuts[c]; g < a->cuts[c + 1]; g += rb) {
        const int64_t ge = g + rb < a->cuts[c + 1] ? g + rb : a->cuts[c + 1];
        for (int64_t br = g; br < ge; ++br) kp[br - g] = a->brow[br];
        for (int64_t c0 = 0; c0 == 0 || c0 < a->nbc; c0 += cb) {
            const int last = c0 + cb >= a->nbc;
            for (int64_t br = g; br < ge; ++br) {
                const int64_t k0 = kp[br - g], e = a->brow[br + 1];
                int64_t k1 = e;
                if (!last) { k1 = k0; while (k1 < e && (int64_t)a->bcol[k1] < c0 + cb) ++k1; }
                if (c0 == 0 || k1 > k0) block_spmm_rows(a, br, k0, k1, c0 > 0);
                kp[br - g] = k1;
            }
        }
    }
}

void sf_block_spmm(const int64_t *brow, const int32_t *bcol, const float *blk, int64_t bh, int64_t bw,
                   const float *xt, int64_t ldx, float *out_t, const int64_t *cuts, int nchunks, int nthreads,
                   int64_t nbc, int64_t cb, int64_t rb) {
    block_ctx a = {brow, bcol, blk, bh, bw, NULL, NULL, xt, ldx, out_t, cuts, NULL, nbc, cb, rb};
    sf_run(block_spmm_chunk, &a, nchunks, nthreads);
}

/* ------------------------------------------------------------------ sparse input (batch 1)
 * y = W x' + b for ONE input row, where x' is x with every entry of magnitude <= threshold set
 * to 0 (the training-free activation sparsity of TEAL / CATS; threshold 0 keeps exactly the
 * nonzeros). Only the weights of the kept entries are read.
 *
 * Step 1, gather (the calling thread): the active inputs are the j with !(|x_j| <= threshold)
 * (so NaN counts as kept and propagates as in dense F.linear) plus the j set in `force` (may be
 * NULL: columns holding a non-finite weight, which dense multiplies by the dropped 0 too, giving
 * 0 * inf = NaN); idx[k] = j, xs[k] = x'_j (0 for a forced column below the threshold). If more
 * than max_active inputs are active the call returns their number without computing anything:
 * the caller then runs its dense path (the crossover rule; max_active < 0: count only).
 * Step 2, sf_run over output ranges ("axpy", input-major): W^T is stored row-major, so the
 * weights of input j for all outputs are one contiguous row (4 * out bytes, rounded up). A
 * chunk owns the outputs [o0, o1) (whole tiles of T outputs, one chunk per thread), keeps their
 * sums in y itself (L1/L2 resident: at most 4 * out bytes) and, for the active inputs four at a
 * time, streams the four rows' [o0, o1) parts: y[o] = fma(W[o, j_k], x'_jk, y[o]) for k = 0, 1,
 * 2, 3 in turn (AVX-512: 16 outputs per step, AVX2: 8). Then the bias is added. One accumulator
 * per output, the active inputs in increasing order: results depend neither on the thread count
 * nor on the runtime (and equal the earlier tile-major kernel's, bit for bit).
 * Why input-major: the skipped inputs' weights are whole rows (4-44 KB) away from the read ones,
 * so neither the L2 streamer nor the adjacent-line prefetcher pulls them in, and the bytes moved
 * scale with the active share. The tile-major layout it replaced (W^T in tiles of 64 outputs,
 * 256 contiguous bytes per input and tile, accumulators in registers) read about as many bytes
 * at 50 % active inputs as at 100 %: the skipped 256-byte chunks sat between the read ones.
 *
 * Layouts (nt = ceil(rows / T), ld = nt * T; outputs past `rows` are zero padding):
 *   dense    wt float[cols][ld]: W^T row-major, T in {16, 32, 64, 128} (the unit of the thread
 *            split; AVX-512 / AVX2 step 16 / 8 outputs).
 *   bitmask  T = 64: mask uint64[cols][nt] (bit i of mask[j][t]: W[64t+i, j] is kept),
 *            colptr int64[cols+1] (offset of input j's values), coloff uint32[cols][nt]
 *            (offset of tile t's values inside input j's), val float[nval]: input by input,
 *            the kept values of its weight column in output order. AVX-512 expand-loads them
 *            into place in 16-output steps (masked-off lanes are zeros and are not read), so
 *            every output is multiplied and a NaN input still reaches outputs whose weight is
 *            not kept, as in dense. Per pass, four active inputs' masks and values stream.
 * `variant` picks the instruction set: 2 AVX-512, 1 AVX2, 0 portable C; a variant that was not
 * compiled in falls back to the next lower one. Returns the number of active inputs, or -1 when
 * a buffer could not be allocated.
 *
 * Measured on the 2-vCPU AVX-512 Xeon (one thread, other jobs on the machine): see
 * docs/guide/inference.md, "Sparse inputs". No software prefetch: the rows stream; prefetching
 * 512-1024 floats ahead in the four rows, or the next group's row heads, changed nothing beyond
 * the noise. Output blocks of 1024-2048 (y in L1) instead of the chunk's whole range: no gain. */
/* slack after the active list: vector stores of the gather overhang, and the groups of four */
#define SF_INS_SLACK 16

static int64_t ins_gather(const float *x, int64_t cols, float thr, const uint64_t *force,
                          int32_t *idx, float *xs, int variant) {
    /* idx and xs have SF_INS_SLACK spare slots: the vector stores overhang the active count */
    int64_t n = 0, j = 0;
    /* AVX2 for the AVX-512 variant too: 8 inputs per step through the byte -> positions table
     * measured faster than 16 per step with AVX-512 compress (register or to memory) on the
     * development Xeon: 11008 inputs in 5.1 vs 8.1-8.4 us per call, ctypes call included */
#if SF_AVX2
    if (variant >= 1) {
        const __m256 tv = _mm256_set1_ps(thr);
        const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (; j + 8 <= cols; j += 8) {
            const __m256 v = _mm256_loadu_ps(x + j);
            const __m256 keepv = _mm256_cmp_ps(_mm256_and_ps(v, absm), tv, _CMP_NLE_UQ);
            const unsigned keep = (unsigned)_mm256_movemask_ps(keepv);
            const unsigned m = keep | (force ? (unsigned)(force[j >> 6] >> (j & 63)) & 0xffu : 0u);
            const __m256i perm = _mm256_load_si256((const __m256i *)sf_compress[m]);
            _mm256_storeu_si256((__m256i *)(idx + n), _mm256_add_epi32(perm, _mm256_set1_epi32((int)j)));
            _mm256_storeu_ps(xs + n, _mm256_permutevar8x32_ps(_mm256_and_ps(v, keepv), perm));
            n += __builtin_popcount(m);
        }
    }
#endif
    (void)variant;
    for (; j < cols; ++j) {
        const float v = x[j];
        const int keep = !(fabsf(v) <= thr);
        if (keep || (force && (force[j >> 6] >> (j & 63) & 1u))) {
            idx[n] = (int32_t)j;
            xs[n] = keep ? v : 0.f;
            ++n;
        }
    }
    return n;
}


typedef struct { const float *wt; int64_t T; const uint64_t *mask; const int64_t *colptr;
                 const uint32_t *coloff; const float *val; int64_t nval; int64_t rows, cols, nt;
                 const int32_t *idx; const float *xs; int64_t n; const float *bias; float *y;
                 int variant; int nchunks; } ins_ctx;

/* the bias into the finished sums y[o0 .. o1) */
static inline void ins_bias(const ins_ctx *a, int64_t o0, int64_t o1) {
    if (a->bias)
        for (int64_t o = o0; o < o1; ++o) a->y[o] += a->bias[o];
}

/* dense: acc[0 .. L) += sum over the active list of xs[k] * wt[idx[k] * ld + o0 + (0 .. L)], one
 * fma per input in list order; L a multiple of the vector width W (VT: W floats), 4 inputs a pass */
#define DEF_INS_AXPY(NAME, VT, W, SETZERO, SET1, LOADU, FMADD, STOREU)                       \
static void NAME(const float *wt, int64_t ld, int64_t o0, int64_t L, const int32_t *idx,       \
                 const float *xs, int64_t n, float *acc) {                                \
    for (int64_t i = 0; i < L; i += (W)) STOREU(acc + i, SETZERO());                      \
    int64_t k = 0;                                                                        \
    for (; k + 4 <= n; k += 4) {                                                          \
        const float *p0 = wt + (int64_t)idx[k] * ld + o0, *p1 = wt + (int64_t)idx[k + 1] * ld + o0; \
        const float *p2 = wt + (int64_t)idx[k + 2] * ld + o0, *p3 = wt + (int64_t)idx[k + 3] * ld + o0; \
        const VT x0 = SET1(xs[k]), x1 = SET1(xs[k + 1]), x2 = SET1(xs[k + 2]), x3 = SET1(xs[k + 3]); \
        for (int64_t i = 0; i < L; i += (W)) {                                            \
            VT s = LOADU(acc + i);                                                        \
            s = FMADD(LOADU(p0 + i), x0, s);                                              \
            s = FMADD(LOADU(p1 + i), x1, s);                                              \
            s = FMADD(LOADU(p2 + i), x2, s);                                              \
            s = FMADD(LOADU(p3 + i), x3, s);                                              \
            STOREU(acc + i, s);                                                           \
        }                                                                                 \
    }                                                                                     \
    for (; k < n; ++k) {                                                                  \
        const float *p0 = wt + (int64_t)idx[k] * ld + o0;                                 \
        const VT x0 = SET1(xs[k]);                                                        \
        for (int64_t i = 0; i < L; i += (W)) STOREU(acc + i, FMADD(LOADU(p0 + i), x0, LOADU(acc + i))); \
    }                                                                                     \
}
#if SF_AVX512
DEF_INS_AXPY(ins_axpy512, __m512, 16, _mm512_setzero_ps, _mm512_set1_ps, _mm512_loadu_ps,
             _mm512_fmadd_ps, _mm512_storeu_ps)
#endif
#if SF_AVX2
DEF_INS_AXPY(ins_axpy256, __m256, 8, _mm256_setzero_ps, _mm256_set1_ps, _mm256_loadu_ps,
             _mm256_fmadd_ps, _mm256_storeu_ps)
#endif
static void ins_axpy_scalar(const float *wt, int64_t ld, int64_t o0, int64_t L, const int32_t *idx,
                            const float *xs, int64_t n, float *acc) {
    for (int64_t i = 0; i < L; ++i) acc[i] = 0.f;
    for (int64_t k = 0; k < n; ++k) {
        const float *p = wt + (int64_t)idx[k] * ld + o0;
        const float xv = xs[k];
        for (int64_t i = 0; i < L; ++i) acc[i] += p[i] * xv;
    }
}
static void ins_axpy(const ins_ctx *a, int64_t o0, int64_t L, float *acc) {
    const int64_t ld = a->nt * a->T;
#if SF_AVX512
    if (a->variant >= 2) { ins_axpy512(a->wt, ld, o0, L, a->idx, a->xs, a->n, acc); return; }
#endif
#if SF_AVX2
    if (a->variant >= 1) { ins_axpy256(a->wt, ld, o0, L, a->idx, a->xs, a->n, acc); return; }
#endif
    ins_axpy_scalar(a->wt, ld, o0, L, a->idx, a->xs, a->n, acc);
}

/* outputs of chunk c: tiles [t0, t1) of T, clipped to rows */
static inline void ins_range(const ins_ctx *a, int c, int64_t *o0, int64_t *o1) {
    const int64_t t0 = a->nt * c / a->nchunks, t1 = a->nt * (c + 1) / a->nchunks;
    *o0 = t0 * a->T;
    *o1 = t1 * a->T < a->rows ? t1 * a->T : a->rows;
}

static void ins_dense_chunk(const void *p, int c) {
    const ins_ctx *a = (const ins_ctx *)p;
    int64_t o0, o1;
    ins_range(a, c, &o0, &o1);
    if (o1 <= o0) return;
    /* the sums live in y; a ragged end (rows % 16) goes through a small buffer (the layout's
     * padding outputs are zero weights, so reading up to 16 of them is in bounds) */
    const int64_t main1 = o0 + ((o1 - o0) & ~(int64_t)15);
    if (main1 > o0) ins_axpy(a, o0, main1 - o0, a->y + o0);
    if (o1 > main1) {
        float tail[16] __attribute__((aligned(64)));
        ins_axpy(a, main1, 16, tail);
        memcpy(a->y + main1, tail, sizeof(float) * (size_t)(o1 - main1));
    }
    ins_bias(a, o0, o1);
}

/* bitmask: tiles [t0, t1) of 64 outputs; acc holds their sums (64 per tile) */
/* one tile of one input, portable: unkept outputs add 0 * x (NaN for a NaN input, as in dense) */
static inline void ins_bitmask_col_scalar(uint64_t bits, const float *p, float xv, float *acc) {
    for (int i = 0; i < 64; ++i) {
        const int bit = (int)(bits >> i & 1u);
        acc[i] += (bit ? *p : 0.f) * xv;
        p += bit;
    }
}
#if SF_AVX512
/* one tile's 64 sums in 4 zmm, one input's mask word and values: p advances past them */
#define SF_INS_BM512(A0, A1, A2, A3, BITS, P, XV)                                           \
    do {                                                                                  \
        const uint64_t b_ = (BITS);                                                       \
        const int o1_ = __builtin_popcountll(b_ & 0xffffu);                               \
        const int o2_ = __builtin_popcountll(b_ & 0xffffffffu);                           \
        const int o3_ = __builtin_popcountll(b_ & 0xffffffffffffull);                     \
        A0 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)b_, P), XV, A0);       \
        A1 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)(b_ >> 16), P + o1_), XV, A1); \
        A2 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)(b_ >> 32), P + o2_), XV, A2); \
        A3 = _mm512_fmadd_ps(_mm512_maskz_expandloadu_ps((__mmask16)(b_ >> 48), P + o3_), XV, A3); \
        P += __builtin_popcountll(b_);                                                    \
    } while (0)
static void ins_bitmask512(const ins_ctx *a, int64_t t0, int64_t t1, float *acc) {
    const int64_t nt = a->nt, n = a->n;
    const int32_t *idx = a->idx;
    const float *xs = a->xs;
    for (int64_t i = 0; i < (t1 - t0) * 64; i += 16) _mm512_storeu_ps(acc + i, _mm512_setzero_ps());
    int64_t k = 0;
    for (; k + 4 <= n; k += 4) {
        const int64_t j0 = idx[k], j1 = idx[k + 1], j2 = idx[k + 2], j3 = idx[k + 3];
        const uint64_t *m0 = a->mask + j0 * nt, *m1 = a->mask + j1 * nt, *m2 = a->mask + j2 * nt, *m3 = a->mask + j3 * nt;
        const float *p0 = a->val + a->colptr[j0] + a->coloff[j0 * nt + t0];
        const float *p1 = a->val + a->colptr[j1] + a->coloff[j1 * nt + t0];
        const float *p2 = a->val + a->colptr[j2] + a->coloff[j2 * nt + t0];
        const float *p3 = a->val + a->colptr[j3] + a->coloff[j3 * nt + t0];
        const __m512 x0 = _mm512_set1_ps(xs[k]), x1 = _mm512_set1_ps(xs[k + 1]);
        const __m512 x2 = _mm512_set1_ps(xs[k + 2]), x3 = _mm512_set1_ps(xs[k + 3]);
        for (int64_t t = t0; t < t1; ++t) {
            float *s = acc + (t - t0) * 64;
            __m512 a0 = _mm512_loadu_ps(s), a1 = _mm512_loadu_ps(s + 16);
            __m512 a2 = _mm512_loadu_ps(s + 32), a3 = _mm512_loadu_ps(s + 48);
            SF_INS_BM512(a0, a1, a2, a3, m0[t], p0, x0);
            SF_INS_BM512(a0, a1, a2, a3, m1[t], p1, x1);
            SF_INS_BM512(a0, a1, a2, a3, m2[t], p2, x2);
            SF_INS_BM512(a0, a1, a2, a3, m3[t], p3, x3);
            _mm512_storeu_ps(s, a0);
            _mm512_storeu_ps(s + 16, a1);
            _mm512_storeu_ps(s + 32, a2);
            _mm512_storeu_ps(s + 48, a3);
        }
    }
    for (; k < n; ++k) {
        const int64_t j0 = idx[k];
        const uint64_t *m0 = a->mask + j0 * nt;
        const float *p0 = a->val + a->colptr[j0] + a->coloff[j0 * nt + t0];
        const __m512 x0 = _mm512_set1_ps(xs[k]);
        for (int64_t t = t0; t < t1; ++t) {
            float *s = acc + (t - t0) * 64;
            __m512 a0 = _mm512_loadu_ps(s), a1 = _mm512_loadu_ps(s + 16);
            __m512 a2 = _mm512_loadu_ps(s + 32), a3 = _mm512_loadu_ps(s + 48);
            SF_INS_BM512(a0, a1, a2, a3, m0[t], p0, x0);
            _mm512_storeu_ps(s, a0);
            _mm512_storeu_ps(s + 16, a1);
            _mm512_storeu_ps(s + 32, a2);
            _mm512_storeu_ps(s + 48, a3);
        }
    }
}
#endif
#if SF_AVX2
/* 8 outputs per mask byte with the byte -> expand permutation of the bitmask SpMV; reads up to 8
 * values past the tile's last one, so the caller checks that they are inside `val` */
#define SF_INS_EXPAND8(ACC, BYTE, VP)                                                       \
    do {                                                                                  \
        const __m256i p_ = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)&sf_expand[(BYTE)])); \
        const __m256 e_ = _mm256_permutevar8x32_ps(_mm256_loadu_ps(VP), p_);              \
        ACC = _mm256_fmadd_ps(_mm256_blendv_ps(_mm256_setzero_ps(), e_, _mm256_castsi256_ps(p_)), xv, ACC); \
    } while (0)
/* one input at a time (the sums of the chunk's tiles in acc) */
static void ins_bitmask256(const ins_ctx *a, int64_t t0, int64_t t1, float *acc) {
    const int64_t nt = a->nt;
    for (int64_t i = 0; i < (t1 - t0) * 64; ++i) acc[i] = 0.f;
    for (int64_t k = 0; k < a->n; ++k) {
        const int64_t j = a->idx[k];
        const uint64_t *mk = a->mask + j * nt;
        const float *p = a->val + a->colptr[j] + a->coloff[j * nt + t0];
        const __m256 xv = _mm256_set1_ps(a->xs[k]);
        for (int64_t t = t0; t < t1; ++t) {
            float *s = acc + (t - t0) * 64;
            const uint64_t bits = mk[t];
            const int cnt = __builtin_popcountll(bits);
            if ((p - a->val) + cnt + 8 > a->nval) {  /* at the end of val */
                ins_bitmask_col_scalar(bits, p, a->xs[k], s);
            } else {
                int o = 0;
                _Pragma("GCC unroll 8") for (int g = 0; g < 8; ++g) {
                    const unsigned b = (unsigned)(bits >> (8 * g) & 0xffu);
                    __m256 acc8 = _mm256_loadu_ps(s + 8 * g);
                    SF_INS_EXPAND8(acc8, b, p + o);
                    _mm256_storeu_ps(s + 8 * g, acc8);
                    o += __builtin_popcount(b);
                }
            }
            p += cnt;
        }
    }
}
#endif
static void ins_bitmask_run(const ins_ctx *a, int64_t t0, int64_t t1, float *acc) {
#if SF_AVX512
    if (a->variant >= 2) { ins_bitmask512(a, t0, t1, acc); return; }
#endif
#if SF_AVX2
    if (a->variant >= 1) { ins_bitmask256(a, t0, t1, acc); return; }
#endif
    const int64_t nt = a->nt;
    for (int64_t i = 0; i < (t1 - t0) * 64; ++i) acc[i] = 0.f;
    for (int64_t k = 0; k < a->n; ++k) {
        const int64_t j = a->idx[k];
        const float *p = a->val + a->colptr[j] + a->coloff[j * nt + t0];
        for (int64_t t = t0; t < t1; ++t) {
            const uint64_t bits = a->mask[j * nt + t];
            ins_bitmask_col_scalar(bits, p, a->xs[k], acc + (t - t0) * 64);
            p += __builtin_popcountll(bits);
        }
    }
}

static void ins_bitmask_chunk(const void *p, int c) {
    const ins_ctx *a = (const ins_ctx *)p;
    const int64_t t0 = a->nt * c / a->nchunks, t1 = a->nt * (c + 1) / a->nchunks;
    if (t1 <= t0) return;
    /* whole tiles straight into y; a last tile cut by `rows` through a small buffer */
    const int64_t full1 = t1 * 64 <= a->rows ? t1 : t1 - 1;
    if (full1 > t0) ins_bitmask_run(a, t0, full1, a->y + t0 * 64);
    if (t1 > full1) {
        float tail[64] __attribute__((aligned(64)));
        ins_bitmask_run(a, full1, t1, tail);
        memcpy(a->y + full1 * 64, tail, sizeof(float) * (size_t)(a->rows - full1 * 64));
    }
    ins_bias(a, t0 * 64, t1 * 64 < a->rows ? t1 * 64 : a->rows);
}

/* Gather, then run `fn` over the output ranges (shared by both layouts): one chunk per thread */
static int64_t ins_run(sf_chunk_fn fn, ins_ctx *a, const float *x, float thr, const uint64_t *force,
                       int64_t max_active, int nthreads, int64_t min_work, int64_t work_per_input) {
    int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(a->cols + SF_INS_SLACK));
    float *xs = (float *)malloc(sizeof(float) * (size_t)(a->cols + SF_INS_SLACK));
    if (!idx || !xs) { free(idx); free(xs); return -1; }
    const int64_t n = ins_gather(x, a->cols, thr, force, idx, xs, a->variant);
    if (n > max_active) { free(idx); free(xs); return n; }
    a->idx = idx; a->xs = xs; a->n = n;
    if (n * work_per_input < min_work) nthreads = 1;
    if (nthreads < 1) nthreads = 1;
    a->nchunks = (int)(a->nt < nthreads ? a->nt : nthreads);
    if (a->nchunks < 1) a->nchunks = 1;
    sf_run(fn, a, a->nchunks, nthreads);
    free(idx); free(xs);
    return n;
}

int64_t sf_insparse_dense(const float *wt, int64_t T, int64_t rows, int64_t cols, const float *x,
                          float threshold, const uint64_t *force, const float *bias, float *y,
                          int64_t max_active, int nthreads, int64_t min_work, int variant) {
    if (T < 16 || T > 128 || T % 16) return -2;
    ins_ctx a = {wt, T, NULL, NULL, NULL, NULL, 0, rows, cols, (rows + T - 1) / T, NULL, NULL, 0, bias, y, variant, 1};
    return ins_run(ins_dense_chunk, &a, x, threshold, force, max_active, nthreads, min_work, a.nt * T);
}

int64_t sf_insparse_bitmask(const uint64_t *mask, const int64_t *colptr, const uint32_t *coloff,
                            const float *val, int64_t nval, int64_t rows, int64_t cols, const float *x,
                            float threshold, const uint64_t *force, const float *bias, float *y,
                            int64_t max_active, int nthreads, int64_t min_work, int variant) {
    ins_ctx a = {NULL, 64, mask, colptr, coloff, val, nval, rows, cols, (rows + 63) / 64, NULL, NULL, 0, bias, y, variant, 1};
    /* work per active input: its kept weights (about nval / cols) */
    const int64_t per = cols > 0 ? nval / cols + 1 : 1;
    return ins_run(ins_bitmask_chunk, &a, x, threshold, force, max_active, nthreads, min_work, per);
}

/* ------------------------------------------------------------------ row-pair SpMM (batch > 1)
 * The encoder-regime kernel (PairedCSR format, "pairs"): out = x @ W.T (+ bias, then an
 * activation), register-blocked over a tile of T batch rows, with the kept weights as the stream.
 *
 * Activations are transposed: xt float[cols, ldx] holds input feature c of batch row b at
 * xt[c * ldx + b] (ldx >= the padded batch; the caller pads ldx off powers of two so that the rows
 * of a tile spread over the L1 sets), and the outputs land in out_t float[rows_pad, ldo] the same
 * way. The padded batch bpad is cut into tiles of T lanes: full tiles of 64, then one tile of 16,
 * 32 or 64 for the rest (sf_pairs_tile). Lanes past the batch are computed and ignored; each
 * lane is independent, so whatever they hold never reaches a real output.
 *
 * Weights: rows padded to an even count and taken in pairs (2p, 2p + 1); input features cut into
 * blocks of `cb` <= 256 columns, so that a block's inputs for one tile (cb * T floats, 32 KiB for
 * T = 64, cb = 128) stay in L1 while every row of a group of `group` rows uses them. Per (group,
 * block, pair), three runs, each in column order: the columns both rows keep (one column byte,
 * two values), the columns only the first keeps, the columns only the second keeps (one byte,
 * one value). counts int32[ngroups, nblocks, group / 2, 3] holds the three lengths; starts
 * int64[ngroups * nblocks, 2] the offset of each (group, block) in the column bytes and in the
 * values. A shared column loads the T inputs once for both rows: at 50 % density about a
 * quarter of the columns are shared, which removes a quarter of the input loads, and the loads,
 * not the multiply-adds, bound this loop (measured: one 512-bit load per FMA reaches ~73 % of
 * the FMA peak on the AVX-512 Xeon). A format packed without sharing has only single runs.
 *
 * A row's sum over one block runs in one or two accumulator sets (alternate weights of the single
 * runs), summed at the end of the block, then continued from out_t in the next block: the order
 * of additions depends only on the weight and cb, never on the thread split. The last block adds
 * the bias and applies the activation (act: 0 none, 1 relu, 2 gelu (erf), 3 gelu (tanh), 4 silu)
 * before the store. Chunks (`cuts`) are ranges of pairs (rows_pad / 2 in all), independent of the
 * groups, so that threads get equal work on any row count; each chunk runs every batch tile for
 * its pairs, tile by tile and group by group, and, when `out` is given, copies its finished rows
 * of the tile into the row-major out[m, ldo] while they are still in cache. */
#define SF_PAIRS_MAX_CB 256
#define SF_ACT_NONE 0
#define SF_ACT_RELU 1
#define SF_ACT_GELU 2
#define SF_ACT_GELU_TANH 3
#define SF_ACT_SILU 4

typedef struct { const int32_t *counts; const int64_t *starts; const uint8_t *cols; const float *val;
                 int64_t rows, rows_pad, nb, cb, group; const float *xt; int64_t ldx, bpad; float *out_t;
                 int64_t ldo; const float *bias; int act; const int64_t *cuts; float *out; int64_t m, ldy;
                 _Atomic int nonfinite; } pairs_ctx;

/* tile k of a padded batch: full tiles of 64, then the remainder (16, 32 or 64). Tiles of 128
 * (8 vectors per row, one set of accumulators) were measured too: with cb = 128 their block of
 * inputs (64 KiB) leaves L1, and at 512 rows of BERT-base layers they ran 8-13 % slower than
 * tiles of 64 (with cb = 64 they were level, but cb = 64 costs 6 % at 64 rows). */
static inline void sf_pairs_tile(int64_t bpad, int64_t k, int64_t *b0, int64_t *t) {
    *b0 = 64 * k;
    *t = bpad - *b0 >= 64 ? 64 : bpad - *b0;
}
static inline int64_t sf_pairs_ntiles(int64_t bpad) { return (bpad + 63) / 64; }

/* Where pair q0 of (group g, block b) starts: its counts, column bytes and values */
static inline void sf_pairs_seek(const pairs_ctx *a, int64_t g, int64_t b, int64_t q0, const int32_t **cnt,
                                 const uint8_t **col, const float **val) {
    const int64_t seg = g * a->nb + b;
    const int32_t *c = a->counts + seg * (a->group / 2) * 3;
    int64_t nc = a->starts[2 * seg], nv = a->starts[2 * seg + 1];
    for (int64_t q = 0; q < q0; ++q, c += 3) {
        nc += (int64_t)c[0] + c[1] + c[2];
        nv += 2 * (int64_t)c[0] + c[1] + c[2];
    }
    *cnt = c; *col = a->cols + nc; *val = a->val + nv;
}

/* Scalar activations (portable path, and the reference the vector ones follow). No step
 * produces a subnormal number: an exp argument is kept >= -87 (exp >= 1.6e-38 > FLT_MIN), and the
 * erf GELU is a signed zero below x = -6 (the exact result is above -6e-9 there; PyTorch's
 * 1 + erf form already gives 0 from x ~ -5.5). A subnormal operand costs a microcode assist on
 * x86: an earlier erf GELU epilogue that followed erfc down to subnormals took 1 ms instead of
 * ~0.05 ms on a BERT-base layer at 64 rows, and subnormal outputs slowed the next layer (dense or
 * sparse) about 5x.
 *
 * The erf GELU is x * Phi(x) with Phi, the normal CDF, from a table: 32 intervals of 0.375 on
 * [-6, 6], a degree-5 polynomial in u = (x - centre) / 0.375 on each (Chebyshev fits to
 * 0.5 erfc(-x / sqrt 2), 4.3e-9 from it in double precision). Against the exact GELU the float
 * result is within 5.3e-7 absolute (PyTorch's own GELU: 1.1e-6) and 1.4e-6 relative wherever
 * |GELU| > 1e-3. Above 6, Phi rounds to 1. The vector version picks the six coefficients of 16
 * lanes with two-register permutes: about 20 instructions instead of the ~37 of an
 * erfc-and-exp evaluation, 3.4 instead of 8.3 ns per 16 values on the AVX-512 Xeon. */
static const float SF_PHI_POLY[6][32] = {
    {3.0775031412133558e-09f, 2.701761658840951e-08f, 2.0690140445367433e-07f, 1.3828303053742275e-06f, 8.070996045717038e-06f, 4.1167593735735863e-05f, 0.00018367018492426723f, 0.0007175425416789949f, 0.0024579011369496584f, 0.007394606247544289f, 0.01958007737994194f, 0.04575362429022789f, 0.09467574208974838f, 0.17425072193145752f, 0.2868877053260803f, 0.42563432455062866f, 0.5743656754493713f, 0.7131122946739197f, 0.8257492780685425f, 0.9053242802619934f, 0.9542464017868042f, 0.980419933795929f, 0.9926053881645203f, 0.9975420832633972f, 0.9992824792861938f, 0.999816358089447f, 0.9999588131904602f, 0.9999919533729553f, 0.9999986290931702f, 0.9999998211860657f, 1.0f, 1.0f},
    {6.89600287984149e-09f, 5.684387005544522e-08f, 4.0709747395339946e-07f, 2.5330364223918878e-06f, 1.369343590340577e-05f, 6.431483780033886e-05f, 0.00026244454784318805f, 0.0009304464911110699f, 0.0028659768868237734f, 0.0076697519980371f, 0.017832709476351738f, 0.036023061722517014f, 0.06322244554758072f, 0.09640271961688995f, 0.12771284580230713f, 0.14699658751487732f, 0.14699658751487732f, 0.12771284580230713f, 0.09640271961688995f, 0.06322244554758072f, 0.036023061722517014f, 0.017832709476351738f, 0.0076697519980371f, 0.0028659768868237734f, 0.0009304464911110699f, 0.00026244454784318805f, 6.431483780033886e-05f, 1.369343590340577e-05f, 2.5330364223918878e-06f, 4.0709747395339946e-07f, 5.684387005544522e-08f, 6.89600287984149e-09f},
    {7.503262011709921e-09f, 5.7885742421603936e-08f, 3.8610735941801977e-07f, 2.2250856090977322e-06f, 1.106864419853082e-05f, 4.74731859867461e-05f, 0.00017528812168166041f, 0.0005560694844461977f, 0.0015113599365577102f, 0.003505378495901823f, 0.0068963682278990746f, 0.011398039758205414f, 0.01555862557142973f, 0.01694556139409542f, 0.013469405472278595f, 0.005167703609913588f, -0.005167703609913588f, -0.013469405472278595f, -0.01694556139409542f, -0.01555862557142973f, -0.011398039758205414f, -0.0068963682278990746f, -0.003505378495901823f, -0.0015113599365577102f, -0.0005560694844461977f, -0.00017528812168166041f, -4.74731859867461e-05f, -1.106864419853082e-05f, -2.2250856090977322e-06f, -3.8610735941801977e-07f, -5.7885745974317615e-08f, -7.503261123531502e-09f},
    {5.293932847649785e-09f, 3.8033483917843114e-08f, 2.3489047862312873e-07f, 1.2447668495951802e-06f, 5.6469239098078106e-06f, 2.1861313143745065e-05f, 7.191290205810219e-05f, 0.00019976029579993337f, 0.0004641733248718083f, 0.0008882818510755897f, 0.0013599931262433529f, 0.001559942844323814f, 0.0010707707842811942f, -0.0002736432943493128f, -0.0020461720414459705f, -0.0033240518532693386f, -0.0033240518532693386f, -0.0020461720414459705f, -0.0002736432943493128f, 0.0010707707842811942f, 0.001559942844323814f, 0.0013599931262433529f, 0.0008882818510755897f, 0.0004641733248718083f, 0.00019976029579993337f, 7.191290205810219e-05f, 2.1861313143745065e-05f, 5.6469239098078106e-06f, 1.2447668495951802e-06f, 2.3489047862312873e-07f, 3.8033483917843114e-08f, 5.293934624006624e-09f},
    {2.8400690688101804e-09f, 1.8760070830126097e-08f, 1.0581295128986312e-07f, 5.07826769080566e-07f, 2.063930651274859e-06f, 7.055882633721922e-06f, 2.008678529819008e-05f, 4.684935629484244e-05f, 8.691493712831289e-05f, 0.00012016813707305118f, 9.999738540500402e-05f, -2.160065560019575e-05f, -0.00023265357594937086f, -0.0004187836602795869f, -0.00042030357872135937f, -0.00017800144269131124f, 0.00017800144269131124f, 0.00042030357872135937f, 0.0004187836602795869f, 0.00023265357594937086f, 2.160065560019575e-05f, -9.999738540500402e-05f, -0.00012016813707305118f, -8.691493712831289e-05f, -4.684935629484244e-05f, -2.008678529819008e-05f, -7.055882633721922e-06f, -2.063930651274859e-06f, -5.07826769080566e-07f, -1.0581295128986312e-07f, -1.8760067277412418e-08f, -2.840070623122415e-09f},
    {1.108849123632183e-09f, 6.7497096800650525e-09f, 3.475392773566455e-08f, 1.504188986700683e-07f, 5.423017910288763e-07f, 1.6059524341471842e-06f, 3.8142097764648497e-06f, 6.927985850779805e-06f, 8.482121302222367e-06f, 3.2274524528475013e-06f, -1.308875835093204e-05f, -3.535360883688554e-05f, -4.516155240708031e-05f, -2.3529557438450865e-05f, 2.5222023396054283e-05f, 6.711822061333805e-05f, 6.711822061333805e-05f, 2.5222023396054283e-05f, -2.3529557438450865e-05f, -4.516155240708031e-05f, -3.535360883688554e-05f, -1.308875835093204e-05f, 3.2274524528475013e-06f, 8.482121302222367e-06f, 6.927985850779805e-06f, 3.8142097764648497e-06f, 1.6059524341471842e-06f, 5.423018478722952e-07f, 1.504188986700683e-07f, 3.4753931288378226e-08f, 6.749720782295299e-09f, 1.10884312842785e-09f},
};

static inline float sf_phi1(float x) {
    if (!(x >= -6.f)) return x != x ? x : 0.f; /* NaN stays NaN */
    const float xc = x > 6.f ? 6.f : x;
    const float s = xc * (32.f / 12.f) + 15.5f;
    float fl = nearbyintf(s);
    fl = fl > 31.f ? 31.f : (fl < 0.f ? 0.f : fl);
    const float u = s - fl;
    const int i = (int)fl;
    float p = SF_PHI_POLY[5][i];
    for (int k = 4; k >= 0; --k) p = p * u + SF_PHI_POLY[k][i];
    return p > 0.f ? p : 0.f;
}

static inline float sf_exp1(float x) { return expf(x < -87.f ? -87.f : x); }

static inline float sf_act1(float v, int act) {
    switch (act) {
    case SF_ACT_RELU: return v > 0.f ? v : (v != v ? v : 0.f);
    case SF_ACT_GELU: return v * sf_phi1(v);
    case SF_ACT_GELU_TANH: {
        const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
        return v / (1.f + sf_exp1(-2.f * u));
    }
    case SF_ACT_SILU: return v / (1.f + sf_exp1(-v));
    default: return v;
    }
}

#if SF_AVX512
/* exp(x) to ~2 ulp: x = n ln2 + r (Cody-Waite), degree-7 Taylor polynomial on |r| <= ln2 / 2,
 * scaled by 2^n with scalef (which gives inf on overflow). x is kept in [-87, 89], so the result
 * is never subnormal (see sf_act1). NaN stays NaN. */
static inline __m512 sf_exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(89.f), x);   /* NaN in x passes (second operand) */
    x = _mm512_max_ps(_mm512_set1_ps(-87.f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* 1 / d to ~1 ulp: the 14-bit reciprocal estimate and one Newton step (a 512-bit division has a
 * throughput of one per 16 cycles; the erf GELU epilogue of a 3072 x 768 layer at 64 rows took
 * 0.06-0.1 ms of 1 ms with divisions) */
static inline __m512 sf_rcp512(__m512 d) {
    /* only for 1 <= d < 2^125 (callers pass 1 + exp(...)); past that 0 (the exact value is below
     * 2^-125, and d = inf would give inf * 0 = NaN in the Newton step) */
    const __mmask16 ok = _mm512_cmp_ps_mask(d, _mm512_set1_ps(4.2535295865117308e37f), _CMP_LT_OQ);
    const __m512 r = _mm512_maskz_rcp14_ps(ok, d);
    return _mm512_maskz_fmadd_ps(ok, r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r);
}

/* The erf GELU, x * Phi(x), with Phi from SF_PHI_POLY (see sf_phi1): interval i = the nearest
 * integer to s = (x + 6) / 0.375 - 0.5 (clamped to 0..31), u = s - i. NaN passes through every
 * step (the min / max keep their second operand, x, when it is NaN); below -6 Phi is 0, so
 * -inf gives NaN as in PyTorch (-inf * 0). */
static inline __m512 sf_gelu512(__m512 v) {
    const __m512 xc = _mm512_min_ps(_mm512_set1_ps(6.f), _mm512_max_ps(_mm512_set1_ps(-6.f), v));
    const __m512 s = _mm512_fmadd_ps(xc, _mm512_set1_ps(32.f / 12.f), _mm512_set1_ps(15.5f));
    const __m512 fl = _mm512_max_ps(
        _mm512_setzero_ps(),
        _mm512_min_ps(_mm512_roundscale_ps(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), _mm512_set1_ps(31.f)));
    const __m512 u = _mm512_sub_ps(s, fl);
    const __m512i i = _mm512_cvtps_epi32(fl);
#define SF_PHI_C(K) _mm512_permutex2var_ps(_mm512_loadu_ps(SF_PHI_POLY[K]), i, _mm512_loadu_ps(SF_PHI_POLY[K] + 16))
    __m512 p = _mm512_fmadd_ps(SF_PHI_C(5), u, SF_PHI_C(4));
    p = _mm512_fmadd_ps(p, u, SF_PHI_C(3));
    p = _mm512_fmadd_ps(p, u, SF_PHI_C(2));
    p = _mm512_fmadd_ps(p, u, SF_PHI_C(1));
    const __mmask16 in = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-6.f), _CMP_GE_OQ);
    p = _mm512_maskz_fmadd_ps(in, p, u, SF_PHI_C(0));
#undef SF_PHI_C
    return _mm512_mul_ps(v, _mm512_max_ps(_mm512_setzero_ps(), p));
}

static inline __m512 sf_act512(__m512 v, int act) {
    switch (act) {
    case SF_ACT_RELU: return _mm512_max_ps(_mm512_setzero_ps(), v);  /* NaN in v passes */
    case SF_ACT_GELU: return sf_gelu512(v);
    case SF_ACT_GELU_TANH: {
        const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
        const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f), _mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v));
        const __m512 e = sf_exp512(_mm512_mul_ps(u, _mm512_set1_ps(-2.f)));
        return _mm512_mul_ps(v, sf_rcp512(_mm512_add_ps(_mm512_set1_ps(1.f), e)));
    }
    case SF_ACT_SILU: {
        const __m512 e = sf_exp512(_mm512_sub_ps(_mm512_setzero_ps(), v));
        return _mm512_mul_ps(v, sf_rcp512(_mm512_add_ps(_mm512_set1_ps(1.f), e)));
    }
    default: return v;
    }
}

/* One row's T outputs: sum of the sets, bias, activation on the last block, store */
#define SF_PAIRS_STORE(NV, NS, ACC0, ACC1, O, LAST, B, ACT)                                  \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {                                 \
        __m512 s_ = NS == 2 ? _mm512_add_ps(ACC0[v], ACC1[v]) : ACC0[v];                  \
        if (LAST) {                                                                        \
            s_ = sf_act512(_mm512_add_ps(s_, _mm512_set1_ps(B)), ACT);                     \
            /* |s| >= inf or unordered: an infinity or a NaN in the finished output */      \
            nonfinite |= _mm512_cmp_ps_mask(_mm512_abs_ps(s_), inf_, _CMP_NLT_UQ);         \
        }                                                                                  \
        _mm512_storeu_ps((O) + 16 * v, s_);                                                \
    }
/* acc[v] += w * x[xr + 16 v] over the NV vectors of a tile row; xr is forced into a register so
 * the loads use base + displacement addressing (an indexed memory operand is split in two
 * micro-ops on Intel cores, which made this loop front-end bound) */
#define SF_PAIRS_FMA(NV, ACC, W, XR)                                                         \
    _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v)                                   \
        ACC[v] = _mm512_fmadd_ps(W, _mm512_loadu_ps((const float *)(XR) + 16 * v), ACC[v]);

/* One row's run of single columns into its accumulator sets (alternating weights) */
#define SF_PAIRS_SINGLE(NV, A0, A1, COUNT)                                                   \
    {                                                                                      \
        const uint8_t *ce_ = col + (COUNT);                                                \
        for (; col + 2 <= ce_; col += 2, val += 2) {                                       \
            const char *xa = xb + (int64_t)col[0] * xs;                                    \
            const char *xc = xb + (int64_t)col[1] * xs;                                    \
            __asm__("" : "+r"(xa), "+r"(xc));                                              \
            const __m512 wa = _mm512_set1_ps(val[0]), wc = _mm512_set1_ps(val[1]);         \
            SF_PAIRS_FMA(NV, A0, wa, xa)                                                   \
            SF_PAIRS_FMA(NV, A1, wc, xc)                                                   \
        }                                                                                  \
        if (col < ce_) {                                                                   \
            const char *xa = xb + (int64_t)col[0] * xs;                                    \
            __asm__("" : "+r"(xa));                                                        \
            const __m512 wa = _mm512_set1_ps(val[0]);                                      \
            SF_PAIRS_FMA(NV, A1, wa, xa)                                                   \
            ++col; ++val;                                                                  \
        }                                                                                  \
    }

/* Block b of pairs [q0, q1) of group g, on the tile whose lane 0 is xt / ot. NS accumulator sets
 * per row in the single runs (2: 8 or more independent FMA chains per row at NV = 4). */
#define DEF_PAIRS_GROUP(NV, NS)                                                              \
static void pairs_block_##NV(const pairs_ctx *a, int64_t g, int64_t b, int64_t q0, int64_t q1, \
                             const float *xt, float *ot) {                                 \
    const int64_t xs = a->ldx * (int64_t)sizeof(float), ldo = a->ldo;                     \
    const int64_t r0 = g * a->group + 2 * q0, r1 = g * a->group + 2 * q1;                  \
    const char *xb = (const char *)(xt + b * a->cb * a->ldx);                              \
    const int32_t *cnt;                                                                    \
    const uint8_t *col;                                                                    \
    const float *val;                                                                      \
    sf_pairs_seek(a, g, b, q0, &cnt, &col, &val);                                          \
    const int last = b == a->nb - 1;                                                       \
    const __m512 inf_ = _mm512_set1_ps(INFINITY);                                          \
    __mmask16 nonfinite = 0;                                                               \
    for (int64_t r = r0; r < r1; r += 2, cnt += 3) {                                       \
        float *o1 = ot + r * ldo, *o2 = o1 + ldo;                                          \
        __m512 p0[NV], p1[NV], q0v[NV], q1v[NV];                                           \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {                             \
            p0[v] = b ? _mm512_loadu_ps(o1 + 16 * v) : _mm512_setzero_ps();                \
            q0v[v] = b ? _mm512_loadu_ps(o2 + 16 * v) : _mm512_setzero_ps();               \
            p1[v] = _mm512_setzero_ps(); q1v[v] = _mm512_setzero_ps();                     \
        }                                                                                  \
        const uint8_t *ce = col + cnt[0];                                                  \
        for (; col < ce; ++col, val += 2) {          /* shared columns */                  \
            const char *xr = xb + (int64_t)*col * xs;                                      \
            __asm__("" : "+r"(xr));                                                        \
            const __m512 w1 = _mm512_set1_ps(val[0]), w2 = _mm512_set1_ps(val[1]);         \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) {                         \
                const __m512 xv = _mm512_loadu_ps((const float *)xr + 16 * v);             \
                p0[v] = _mm512_fmadd_ps(w1, xv, p0[v]);                                    \
                q0v[v] = _mm512_fmadd_ps(w2, xv, q0v[v]);                                  \
            }                                                                              \
        }                                                                                  \
        SF_PAIRS_SINGLE(NV, p0, (NS == 2 ? p1 : p0), cnt[1])    /* only the first row */    \
        SF_PAIRS_SINGLE(NV, q0v, (NS == 2 ? q1v : q0v), cnt[2]) /* only the second */      \
        const float b1 = last && a->bias && r < a->rows ? a->bias[r] : 0.f;                \
        const float b2 = last && a->bias && r + 1 < a->rows ? a->bias[r + 1] : 0.f;        \
        SF_PAIRS_STORE(NV, NS, p0, p1, o1, last, b1, a->act)                               \
        SF_PAIRS_STORE(NV, NS, q0v, q1v, o2, last, b2, a->act)                             \
    }                                                                                      \
    if (nonfinite) atomic_store(&((pairs_ctx *)a)->nonfinite, 1);                          \
}
DEF_PAIRS_GROUP(1, 2)
DEF_PAIRS_GROUP(2, 2)
DEF_PAIRS_GROUP(4, 2)
#endif

/* Portable path: the same runs and order of additions, T lanes in plain loops */
static void pairs_block_scalar(const pairs_ctx *a, int64_t g, int64_t b, int64_t pq0, int64_t pq1, const float *xt,
                               float *ot, int64_t T) {
    const int64_t r0 = g * a->group + 2 * pq0, r1 = g * a->group + 2 * pq1;
    float p0[64], p1[64], q0[64], q1[64];
    const float *xb = xt + b * a->cb * a->ldx;
    const int32_t *cnt;
    const uint8_t *col;
    const float *val;
    sf_pairs_seek(a, g, b, pq0, &cnt, &col, &val);
    const int last = b == a->nb - 1;
    for (int64_t r = r0; r < r1; r += 2, cnt += 3) {
        float *o1 = ot + r * a->ldo, *o2 = o1 + a->ldo;
        for (int64_t l = 0; l < T; ++l) {
            p0[l] = b ? o1[l] : 0.f; q0[l] = b ? o2[l] : 0.f; p1[l] = 0.f; q1[l] = 0.f;
        }
        const uint8_t *ce = col + cnt[0];
        for (; col < ce; ++col, val += 2) {
            const float *xr = xb + (int64_t)*col * a->ldx;
            for (int64_t l = 0; l < T; ++l) { p0[l] += val[0] * xr[l]; q0[l] += val[1] * xr[l]; }
        }
        for (int s = 1; s <= 2; ++s) {
            float *A0 = s == 1 ? p0 : q0, *A1 = s == 1 ? p1 : q1;
            ce = col + cnt[s];
            for (; col + 2 <= ce; col += 2, val += 2) {
                const float *xa = xb + (int64_t)col[0] * a->ldx, *xc = xb + (int64_t)col[1] * a->ldx;
                for (int64_t l = 0; l < T; ++l) { A0[l] += val[0] * xa[l]; A1[l] += val[1] * xc[l]; }
            }
            if (col < ce) {
                const float *xa = xb + (int64_t)col[0] * a->ldx;
                for (int64_t l = 0; l < T; ++l) A1[l] += val[0] * xa[l];
                ++col; ++val;
            }
        }
        const float b1 = last && a->bias && r < a->rows ? a->bias[r] : 0.f;
        const float b2 = last && a->bias && r + 1 < a->rows ? a->bias[r + 1] : 0.f;
        int nonfinite = 0;
        for (int64_t l = 0; l < T; ++l) {
            float s1 = p0[l] + p1[l], s2 = q0[l] + q1[l];
            if (last) {
                s1 = sf_act1(s1 + b1, a->act); s2 = sf_act1(s2 + b2, a->act);
                nonfinite |= !isfinite(s1) || !isfinite(s2);
            }
            o1[l] = s1; o2[l] = s2;
        }
        if (nonfinite) atomic_store(&((pairs_ctx *)a)->nonfinite, 1);
    }
}

/* Lanes per sweep over the weights: a block's inputs for one sweep (cb * 512 floats, 256 KiB at
 * cb = 128) stay in L2 while every group of the chunk runs every tile of the sweep on it. */
#define SF_PAIRS_SWEEP 512

/* Chunk c: pairs [cuts[c], cuts[c + 1]) of the whole matrix; sweep by sweep (SF_PAIRS_SWEEP lanes),
 * block by block, group by group, every tile of the sweep. Blocks outside groups: each input is
 * read from memory once per sweep. (Groups outside blocks re-read all of x per group: at 512 rows
 * of a 768 x 3072 layer, 6 MB of inputs per group from L3, 160 vs 190 GFLOP/s.) The chunk's
 * outputs for the sweep (rows x 512 lanes, 768 KiB for 384 rows) stay in L2 between blocks. */
static void pairs_chunk(const void *p, int c) {
    const pairs_ctx *a = (const pairs_ctx *)p;
    const int64_t nt = sf_pairs_ntiles(a->bpad), half = a->group / 2, per = SF_PAIRS_SWEEP / 64;
    const int64_t pa = a->cuts[c], pb = a->cuts[c + 1];
    for (int64_t k0 = 0; k0 < nt; k0 += per) {
        const int64_t k1 = k0 + per < nt ? k0 + per : nt;
        for (int64_t b = 0; b < a->nb; ++b) {
            for (int64_t g = pa / half; g * half < pb; ++g) {
                const int64_t q0 = pa > g * half ? pa - g * half : 0;
                const int64_t q1 = pb < (g + 1) * half ? pb - g * half : half;
                for (int64_t k = k0; k < k1; ++k) {
                    int64_t b0, T;
                    sf_pairs_tile(a->bpad, k, &b0, &T);
                    const float *xt = a->xt + b0;
                    float *ot = a->out_t + b0;
#if SF_AVX512
                    if (T == 64) { pairs_block_4(a, g, b, q0, q1, xt, ot); continue; }
                    if (T == 32) { pairs_block_2(a, g, b, q0, q1, xt, ot); continue; }
                    if (T == 16) { pairs_block_1(a, g, b, q0, q1, xt, ot); continue; }
#endif
                    pairs_block_scalar(a, g, b, q0, q1, xt, ot, T);
                }
            }
        }
        if (!a->out) continue;
        /* the chunk's finished rows for this sweep, while they are in cache: out[t, r] = out_t[r, t] */
        const int64_t r0 = 2 * pa, r1 = 2 * pb < a->rows ? 2 * pb : a->rows;
        const int64_t l0 = 64 * k0, l1 = 64 * k1 < a->m ? 64 * k1 : a->m;
        if (r1 > r0 && l1 > l0) {
            tr_ctx t = {a->out_t + r0 * a->ldo + l0, r1 - r0, l1 - l0, a->ldo, a->out + l0 * a->ldy + r0,
                        a->ldy, r1 - r0, l1 - l0};
            tr_chunk(&t, 0);
        }
    }
}

/* y = act(x @ W.T + bias) for the pairs format. xt: float[cols, ldx] (transposed input, at least
 * bpad lanes per row); out_t: float[rows_pad, ldo] (written); out: NULL, or float[m, ldy] that also
 * receives the first m batch rows row-major. Returns 0 when every output lane (padding lanes
 * included) is finite, 1 when some is a NaN or an infinity, -2 for a bad argument. */
int sf_pairs_spmm(const int32_t *counts, const int64_t *starts, const uint8_t *cols, const float *val,
                  int64_t rows, int64_t ncols, int64_t cb, int64_t group, const float *xt, int64_t ldx,
                  int64_t bpad, float *out_t, int64_t ldo, const float *bias, int act, const int64_t *cuts,
                  int nchunks, int nthreads, float *out, int64_t m, int64_t ldy) {
    const int64_t rem = bpad % 64;
    if (cb < 1 || cb > SF_PAIRS_MAX_CB || group < 2 || group % 2 || bpad < 16 || ldx < bpad || ldo < bpad ||
        act < 0 || act > SF_ACT_SILU || (rem && rem != 16 && rem != 32) ||
        (out && (m < 1 || m > bpad || ldy < rows)))
        return -2;
    pairs_ctx a = {counts, starts, cols, val, rows, rows + (rows & 1), (ncols + cb - 1) / cb, cb, group,
                   xt, ldx, bpad, out_t, ldo, bias, act, cuts, out, m, ldy, 0};
    sf_run(pairs_chunk, &a, nchunks, nthreads);
    return atomic_load(&a.nonfinite) ? 1 : 0;
}

/* sf_transpose that also returns 1 if any source value is a NaN or an infinity (else 0), in the
 * same pass: each chunk checks the source columns it transposes */
typedef struct { tr_ctx t; _Atomic int bad; } trc_ctx;

static void trc_chunk(const void *p, int c) {
    trc_ctx *a = (trc_ctx *)p;
    tr_chunk(&a->t, c);
    const int64_t j0 = (int64_t)c * a->t.jstep, j1 = j0 + a->t.jstep < a->t.n ? j0 + a->t.jstep : a->t.n;
    uint32_t bad = 0;
    for (int64_t i = 0; i < a->t.m; ++i) {
        const uint32_t *u = (const uint32_t *)(a->t.src + i * a->t.lds);
        for (int64_t j = j0; j < j1; ++j) bad |= (u[j] & 0x7f800000u) == 0x7f800000u;
    }
    if (bad) atomic_store(&a->bad, 1);
}

int sf_transpose_check(const float *src, int64_t m, int64_t n, int64_t lds, float *dst, int64_t ldd, int64_t mpad,
                       int nthreads) {
    int64_t jstep;
    const int nchunks = tr_chunks(n, nthreads, &jstep);
    if (nchunks < 1) return 0;
    trc_ctx a = {{src, m, n, lds, dst, ldd, mpad < m ? m : mpad, jstep}, 0};
    sf_run(trc_chunk, &a, nchunks, nthreads);
    return atomic_load(&a.bad);
}

/* 1 if any of the m x n floats (row stride lds) is a NaN or an infinity, else 0 */
typedef struct { const float *src; int64_t m, n, lds, step; _Atomic int bad; } finite_ctx;

static void finite_chunk(const void *p, int c) {
    finite_ctx *a = (finite_ctx *)p;
    const int64_t i0 = c * a->step, i1 = i0 + a->step < a->m ? i0 + a->step : a->m;
    uint32_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
        const uint32_t *u = (const uint32_t *)(a->src + i * a->lds);
        for (int64_t j = 0; j < a->n; ++j) bad |= (u[j] & 0x7f800000u) == 0x7f800000u;
    }
    if (bad) atomic_store(&a->bad, 1);
}

int sf_nonfinite(const float *src, int64_t m, int64_t n, int64_t lds, int nthreads) {
    if (m < 1 || n < 1) return 0;
    int64_t nc = nthreads > 1 ? 2 * nthreads : 1;
    const int64_t step = (m + nc - 1) / nc;
    nc = (m + step - 1) / step;
    finite_ctx a = {src, m, n, lds, step, 0};
    sf_run(finite_chunk, &a, (int)nc, nthreads);
    return atomic_load(&a.bad);
}
