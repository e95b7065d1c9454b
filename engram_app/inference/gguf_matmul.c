/* Exact fp32 matrix-vector products on GGUF's own Q4_1 and Q8_0 blocks, for decoding on the CPU.
 *
 * Built on the user's machine by engram_app/inference/native.py (gcc or clang, -O3 -march=native
 * -fopenmp) and called through ctypes. Why by hand: PyTorch's CPU int4 kernel is only vectorised
 * for bf16 inputs and outputs, which rounds every linear layer's input, output and scales to 8 bits
 * of mantissa; its fp32 path is exact but ~15x slower than an fp32 matmul. These loops read the 4
 * (or 8) bit codes, widen them to fp32 in registers and accumulate in fp32, so each output is the
 * dequantised weight's dot product with the input, up to fp32 summation order.
 *
 * Layouts (what quant.py passes):
 *   codes: [n, groups, 16] bytes, GGUF's Q4_1 order: byte j holds element j (low nibble) and
 *          element j + 16 (high nibble) of its 32-weight group; weight = d * code + m.
 *   dm:    [n, 2, groups] fp32: each row's scales d, then its minimums m (GGUF stores both as fp16:
 *          exact in fp32).
 *   x: [rows, k] fp32, row-major; y: [rows, n] fp32. rows <= MAX_ROWS.
 *   Q8_0 (engram_q8_0_matmul): codes [n, k] int8, d [n, groups] fp32; weight = d * code.
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ENGRAM_AVX2 1
#endif

#define GROUP 32
#define MAX_ROWS 8

int engram_max_rows(void) { return MAX_ROWS; }

int engram_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int engram_vectorised(void) {
#if defined(__AVX512F__)
    return 2;
#elif defined(ENGRAM_AVX2)
    return 1;
#else
    return 0;
#endif
}

#ifdef ENGRAM_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 widen_u8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }
#endif

/* Sums of each 32-input group of each row: the Q4_1 minimum multiplies them. */
static float *group_sums(const float *x, int64_t rows, int64_t k) {
    int64_t groups = k / GROUP;
    float *sums = (float *)malloc(sizeof(float) * (size_t)(rows * groups));
    if (!sums) return NULL;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + r * k + g * GROUP;
            float s = 0.0f;
            for (int j = 0; j < GROUP; j++) s += xg[j];
            sums[r * groups + g] = s;
        }
    return sums;
}

/* sum over g of m[g] * sums[g]: four partial sums, so consecutive groups do not wait on each other. */
static inline float minimum_dot(const float *m, const float *sums, int64_t groups) {
    float part[4] = {0};
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4)
        for (int i = 0; i < 4; i++) part[i] += m[g + i] * sums[g + i];
    for (; g < groups; g++) part[0] += m[g] * sums[g];
    return (part[0] + part[1]) + (part[2] + part[3]);
}

#if defined(__AVX512F__)
/* One Q4_1 group's codes times its 32 inputs, lane by lane: the 16 bytes widened once to 16 int32
 * lanes, each lane's low nibble weight j and its high nibble weight j + 16. */
static inline __m512 group_dot_avx512(const uint8_t *c, const float *xg) {
    __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)c));
    __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(w, _mm512_set1_epi32(0x0F)));
    __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
    return _mm512_fmadd_ps(hi, _mm512_loadu_ps(xg + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xg)));
}
#endif

/* sum over g of d[g] * (codes of group g . x of group g), the codes widened to fp32. */
static inline float scaled_dot(const uint8_t *c, const float *d, const float *x, int64_t groups) {
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  /* two chains: groups g and g + 1 */
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(d[g]), group_dot_avx512(c + g * 16, x + g * GROUP), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(d[g + 1]), group_dot_avx512(c + g * 16 + 16, x + g * GROUP + GROUP), acc1);
    }
    if (g < groups) acc0 = _mm512_fmadd_ps(_mm512_set1_ps(d[g]), group_dot_avx512(c + g * 16, x + g * GROUP), acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(ENGRAM_AVX2)
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(c + g * 16));
        __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
        const float *xg = x + g * GROUP;
        __m256 t = _mm256_mul_ps(widen_u8(lo), _mm256_loadu_ps(xg));
        t = _mm256_fmadd_ps(widen_u8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xg + 8), t);
        t = _mm256_fmadd_ps(widen_u8(hi), _mm256_loadu_ps(xg + 16), t);
        t = _mm256_fmadd_ps(widen_u8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xg + 24), t);
        if (g & 1) acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d[g]), t, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d[g]), t, acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
#else
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *cg = c + g * 16;
        const float *xg = x + g * GROUP;
        float t = 0.0f;
        for (int j = 0; j < 16; j++) t += (float)(cg[j] & 0x0F) * xg[j] + (float)(cg[j] >> 4) * xg[j + 16];
        acc += d[g] * t;
    }
    return acc;
#endif
}

int engram_q4_1_matmul(const float *x, int64_t rows, int64_t k, const uint8_t *codes, const float *dm, int64_t n,
                       float *y, int threads) {
    if (rows < 1 || rows > MAX_ROWS || k % GROUP) return 1;
    int64_t groups = k / GROUP;
    float *sums = group_sums(x, rows, k);
    if (!sums) return 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const uint8_t *row_codes = codes + o * groups * 16;
        const float *d = dm + o * 2 * groups, *m = d + groups;
        for (int64_t r = 0; r < rows; r++) {
            const float *xr = x + r * k;
            y[r * n + o] = scaled_dot(row_codes, d, xr, groups) + minimum_dot(m, sums + r * groups, groups);
        }
    }
    free(sums);
    return 0;
}

/* The same for GGUF's Q8_0 blocks (the bundled model's output layer): codes [n, groups, 32] int8,
 * d [n, groups] fp32; weight = d * code. */
static inline float scaled_dot_q8(const int8_t *c, const float *d, const float *x, int64_t groups) {
#if defined(__AVX512F__)
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *cg = c + g * GROUP;
        const float *xg = x + g * GROUP;
        __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)cg)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(cg + 16))));
        __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xg + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xg)));
        if (g & 1) acc1 = _mm512_fmadd_ps(_mm512_set1_ps(d[g]), t, acc1);
        else acc0 = _mm512_fmadd_ps(_mm512_set1_ps(d[g]), t, acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(ENGRAM_AVX2)
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *cg = c + g * GROUP;
        const float *xg = x + g * GROUP;
        __m256 t = _mm256_setzero_ps();
        for (int part = 0; part < 4; part++) {
            __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cg + 8 * part))));
            t = _mm256_fmadd_ps(q, _mm256_loadu_ps(xg + 8 * part), t);
        }
        if (g & 1) acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d[g]), t, acc1);
        else acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d[g]), t, acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
#else
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        float t = 0.0f;
        for (int j = 0; j < GROUP; j++) t += (float)c[g * GROUP + j] * x[g * GROUP + j];
        acc += d[g] * t;
    }
    return acc;
#endif
}

int engram_q8_0_matmul(const float *x, int64_t rows, int64_t k, const int8_t *codes, const float *d, int64_t n,
                       float *y, int threads) {
    if (rows < 1 || rows > MAX_ROWS || k % GROUP) return 1;
    int64_t groups = k / GROUP;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n; o++)
        for (int64_t r = 0; r < rows; r++)
            y[r * n + o] = scaled_dot_q8(codes + o * k, d + o * groups, x + r * k, groups);
    return 0;
}
