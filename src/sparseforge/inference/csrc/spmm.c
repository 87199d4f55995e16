/* sparseforge native CPU kernels: y = x @ W.T for packed sparse W (fp32).
 *
 * Compiled on first use by sparseforge.inference.native with the system C compiler
 * (cc -O3 -march=native -fopenmp -shared -fPIC) and loaded with ctypes. Written for this
 * project; AVX2+FMA paths where the compiler targets them, portable scalar code otherwise.
 *
 * Threading: every entry point takes a row partition `cuts` (nchunks + 1 row offsets, balanced
 * by nonzeros on the Python side) and runs the chunks in an OpenMP parallel region of
 * `nthreads` threads. A row's sum is never split, and the order of additions inside a row is
 * fixed, so results do not depend on the thread count.
 *
 * Layouts (all row-major, C-contiguous):
 *   CSR      indptr int64[rows+1], idx uint16 or int32 [nnz], val float[nnz]
 *   bitmask  mask uint64[rows, words] (bit j%64 of word j/64 = column j), rowptr int64[rows+1],
 *            val float[nnz] (row-major order of the set bits)
 *   SpMV     x float[cols] (bitmask: x padded with zeros to words*64), y float[rows]
 *   SpMM     xt float[cols, ldx] = x transposed, ldx a multiple of 8 (zero padded columns);
 *            out_t float[rows, ldx]
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SF_AVX2 1
#else
#define SF_AVX2 0
#endif

#define SF_ABI 3

int sf_abi_version(void) { return SF_ABI; }
int sf_has_avx2(void) { return SF_AVX2; }

#ifdef _OPENMP
#define SF_PARALLEL_BEGIN(nthreads, nchunks)                                   \
    _Pragma("omp parallel num_threads(nthreads)") {                           \
        const int sf_tid = omp_get_thread_num();                              \
        const int sf_nt = omp_get_num_threads();                              \
        for (int sf_c = sf_tid; sf_c < (nchunks); sf_c += sf_nt) {
#define SF_PARALLEL_END }}
#else
#define SF_PARALLEL_BEGIN(nthreads, nchunks)                                   \
    {                                                                          \
        for (int sf_c = 0; sf_c < (nchunks); ++sf_c) {
#define SF_PARALLEL_END }}
#endif

#if SF_AVX2
static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* Byte -> "expand" permutation: lane i takes value number popcount(b & ((1<<i)-1)) if bit i
 * is set; bit 31 of the entry marks a set lane (used as the blendv selector). 8 KiB. */
static int32_t sf_expand[256][8] __attribute__((aligned(32)));
#endif
static int sf_ready = 0;

void sf_init(void) {
#if SF_AVX2
    for (int b = 0; b < 256; ++b) {
        int n = 0;
        for (int i = 0; i < 8; ++i) {
            if (b >> i & 1) {
                sf_expand[b][i] = (int32_t)(0x80000000u | (uint32_t)n);
                ++n;
            } else {
                sf_expand[b][i] = 0;
            }
        }
    }
#endif
    sf_ready = 1;
}

/* ------------------------------------------------------------------ CSR SpMV (batch 1) */
#define DEF_CSR_SPMV(SUFFIX, IDXT, LOAD8)                                                   \
static void csr_spmv_rows_scalar_##SUFFIX(const int64_t *indptr, const IDXT *idx,         \
        const float *val, const float *x, float *y, int64_t r0, int64_t r1) {             \
    for (int64_t r = r0; r < r1; ++r) {                                                   \
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f; \
        int64_t k = indptr[r];                                                            \
        const int64_t e = indptr[r + 1];                                                  \
        for (; k + 8 <= e; k += 8) {                                                      \
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
void sf_csr_spmv_##SUFFIX(const int64_t *indptr, const IDXT *idx, const float *val,       \
        const float *x, float *y, const int64_t *cuts, int nchunks, int nthreads,          \
        int variant) {                                                                    \
    SF_PARALLEL_BEGIN(nthreads, nchunks)                                                  \
        if (variant == 1 && SF_AVX2)                                                      \
            csr_spmv_rows_gather_##SUFFIX(indptr, idx, val, x, y, cuts[sf_c], cuts[sf_c + 1]); \
        else                                                                              \
            csr_spmv_rows_scalar_##SUFFIX(indptr, idx, val, x, y, cuts[sf_c], cuts[sf_c + 1]); \
    SF_PARALLEL_END                                                                       \
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
#define DEF_TILE(NAME, IDXT, NV, NS)                                                        \
static inline void NAME(const IDXT *idx, const float *val, int64_t k0, int64_t k1,       \
        const float *xt, int64_t ldx, float *o) {                                         \
    __m256 acc[NS][NV];                                                                   \
    _Pragma("GCC unroll 8") for (int s = 0; s < NS; ++s)                                  \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v) acc[s][v] = _mm256_setzero_ps(); \
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
#define DEF_TILE(NAME, IDXT, NV, NS)                                                        \
static inline void NAME(const IDXT *idx, const float *val, int64_t k0, int64_t k1,       \
        const float *xt, int64_t ldx, float *o) {                                         \
    float acc[8 * NV];                                                                    \
    for (int b = 0; b < 8 * NV; ++b) acc[b] = 0.f;                                        \
    for (int64_t k = k0; k < k1; ++k) {                                                   \
        const float w = val[k];                                                           \
        const float *xr = xt + (int64_t)idx[k] * ldx;                                     \
        for (int b = 0; b < 8 * NV; ++b) acc[b] += w * xr[b];                             \
    }                                                                                     \
    for (int b = 0; b < 8 * NV; ++b) o[b] = acc[b];                                       \
}
#endif

#define DEF_TILES(SUFFIX, IDXT)                                                             \
DEF_TILE(tile8_##SUFFIX, IDXT, 1, 4)                                                      \
DEF_TILE(tile16_##SUFFIX, IDXT, 2, 4)                                                     \
DEF_TILE(tile32_##SUFFIX, IDXT, 4, 2)                                                     \
DEF_TILE(tile64_##SUFFIX, IDXT, 8, 1)                                                     \
/* one row of out_t: all tiles of the (padded) batch */                                   \
static inline void row_tiles_##SUFFIX(const IDXT *idx, const float *val, int64_t k0,     \
        int64_t k1, const float *xt, int64_t ldx, float *o) {                             \
    int64_t b = 0;                                                                        \
    for (; b + 64 <= ldx; b += 64) tile64_##SUFFIX(idx, val, k0, k1, xt + b, ldx, o + b); \
    if (b + 32 <= ldx) { tile32_##SUFFIX(idx, val, k0, k1, xt + b, ldx, o + b); b += 32; } \
    if (b + 16 <= ldx) { tile16_##SUFFIX(idx, val, k0, k1, xt + b, ldx, o + b); b += 16; } \
    if (b + 8 <= ldx) { tile8_##SUFFIX(idx, val, k0, k1, xt + b, ldx, o + b); b += 8; }  \
}

DEF_TILES(u16, uint16_t)
DEF_TILES(i32, int32_t)

#define DEF_CSR_SPMM(SUFFIX, IDXT)                                                          \
void sf_csr_spmm_##SUFFIX(const int64_t *indptr, const IDXT *idx, const float *val,       \
        const float *xt, int64_t ldx, float *out_t, const int64_t *cuts, int nchunks,      \
        int nthreads) {                                                                   \
    SF_PARALLEL_BEGIN(nthreads, nchunks)                                                  \
        for (int64_t r = cuts[sf_c]; r < cuts[sf_c + 1]; ++r)                             \
            row_tiles_##SUFFIX(idx, val, indptr[r], indptr[r + 1], xt, ldx, out_t + r * ldx); \
    SF_PARALLEL_END                                                                       \
}

DEF_CSR_SPMM(u16, uint16_t)
DEF_CSR_SPMM(i32, int32_t)

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
        const __m256i p_ = _mm256_load_si256((const __m256i *)sf_expand[b_]);            \
        const __m256 e_ = _mm256_permutevar8x32_ps(_mm256_loadu_ps(v), p_);               \
        const __m256 w_ = _mm256_blendv_ps(_mm256_setzero_ps(), e_, _mm256_castsi256_ps(p_)); \
        ACC = _mm256_fmadd_ps(w_, _mm256_loadu_ps(XP), ACC);                              \
        v += __builtin_popcount(b_);                                                      \
    } while (0)

static inline float bitmask_row_expand(const uint64_t *m, int64_t words, const float *v,
                                       const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t w = 0; w < words; ++w) {
        const uint64_t bits = m[w];
        const float *xw = x + 64 * w;
        if (!bits) continue;
        SF_EXPAND_STEP(a0, bits & 0xff, xw);
        SF_EXPAND_STEP(a1, bits >> 8 & 0xff, xw + 8);
        SF_EXPAND_STEP(a2, bits >> 16 & 0xff, xw + 16);
        SF_EXPAND_STEP(a3, bits >> 24 & 0xff, xw + 24);
        SF_EXPAND_STEP(a0, bits >> 32 & 0xff, xw + 32);
        SF_EXPAND_STEP(a1, bits >> 40 & 0xff, xw + 40);
        SF_EXPAND_STEP(a2, bits >> 48 & 0xff, xw + 48);
        SF_EXPAND_STEP(a3, bits >> 56, xw + 56);
    }
    return hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}
#endif

/* variant 0: bit iteration (tzcnt), 1: byte expand (AVX2 only; falls back to 0). */
void sf_bitmask_spmv(const uint64_t *mask, int64_t words, const int64_t *rowptr,
                     const float *val, int64_t nnz, const float *x, float *y,
                     const int64_t *cuts, int nchunks, int nthreads, int variant) {
    SF_PARALLEL_BEGIN(nthreads, nchunks)
        for (int64_t r = cuts[sf_c]; r < cuts[sf_c + 1]; ++r) {
            const uint64_t *m = mask + r * words;
            const float *v = val + rowptr[r];
#if SF_AVX2
            if (variant == 1 && rowptr[r + 1] + 8 <= nnz) {
                y[r] = bitmask_row_expand(m, words, v, x);
                continue;
            }
#endif
            (void)variant; (void)nnz;
            y[r] = bitmask_row_scalar(m, words, v, x);
        }
    SF_PARALLEL_END
}

/* Batch > 1: decode the row's set bits into column indices (per-thread buffer), then run the
 * same tiles as CSR. */
void sf_bitmask_spmm(const uint64_t *mask, int64_t words, const int64_t *rowptr,
                     const float *val, const float *xt, int64_t ldx, float *out_t,
                     const int64_t *cuts, int nchunks, int nthreads) {
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        int32_t *cols = (int32_t *)malloc(sizeof(int32_t) * (size_t)(words * 64 + 1));
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int tid = 0, nt = 1;
#endif
        for (int c = tid; cols && c < nchunks; c += nt) {
            for (int64_t r = cuts[c]; r < cuts[c + 1]; ++r) {
                const uint64_t *m = mask + r * words;
                int64_t n = 0;
                for (int64_t w = 0; w < words; ++w) {
                    uint64_t bits = m[w];
                    while (bits) {
                        cols[n++] = (int32_t)(64 * w + __builtin_ctzll(bits));
                        bits &= bits - 1;
                    }
                }
                row_tiles_i32(cols, val + rowptr[r], 0, n, xt, ldx, out_t + r * ldx);
            }
        }
        free(cols);
    }
}
