/* One decoding step of an Engram module (engram_app/engram/layer.py) for one token, in one call.
 *
 * Built with gguf_matmul.c into the same library (engram_app/inference/native.py) and called by
 * EngramBlock.forward for a one-token, unpadded step on the CPU in fp32 without gradients. Why by
 * hand: in PyTorch this step is some 40 operations on vectors of a few hundred floats (three RMS
 * norms, the gate, the four-tap convolution), each costing more in dispatch than in arithmetic:
 * ~0.4 ms of a ~20 ms step of the 4-bit runtime, where the memory's budget is 3% (~0.6 ms) in all.
 * Here the two projections run on PyTorch's OpenMP threads and the rest is a few loops.
 *
 * The same maths as EngramBlock.forward, in the same order of operations (sums may be added in
 * another order: equal to fp32 rounding):
 *   k = W_K e,  v = W_V e                                      (W_K, W_V: [hidden, width] row-major)
 *   s = sum(RMSNorm_h(h) * RMSNorm_k(k)) / sqrt(hidden);  s = sign(s) sqrt(max(|s|, 1e-6))
 *   gate = sigmoid(s);  u = gate * v
 *   with a convolution: n = RMSNorm_u(u); c = sum_j tap_j * w[:, j]; y = silu(c) + u; else y = u
 *   ratio = |y| / max(|h|, 1e-12)
 * RMSNorm(x) = x * rsqrt(mean(x^2) + eps) * weight. The convolution's taps are the inputs of
 * positions t - (kernel - 1 - j) * dilation (j = 0 .. kernel - 1, the last one n itself), read from
 * ``state`` (the previous positions' n, oldest first, ``state_len`` rows ``state_stride`` floats
 * apart); positions before the sequence's start are zeros.
 */
#include <math.h>
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MEMORY_STEP_AVX2 1
#endif

static float dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float total = 0.0f;
#ifdef MEMORY_STEP_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    __m256 acc = _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    total = _mm_cvtss_f32(s);
#endif
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

/* rsqrt(mean(x^2) + eps): RMSNorm's scale for x. */
static float rms_scale(const float *x, int64_t n, float eps) {
    return 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
}

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

int engram_memory_step(const float *h, const float *e, int64_t hidden, int64_t width, const float *wk,
                       const float *wv, const float *norm_h, float eps_h, const float *norm_k, float eps_k,
                       const float *norm_u, float eps_u, const float *conv_w, int64_t kernel, int64_t dilation,
                       const float *state, int64_t state_len, int64_t state_stride, float *kv, float *y,
                       float *normed, float *gate_score_ratio, int threads) {
    if (hidden < 1 || width < 1 || (norm_u && (kernel < 1 || dilation < 1 || state_len < 0))) return 1;
    /* k and v: 2 * hidden dot products of length width, on PyTorch's threads. */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < 2 * hidden; o++)
        kv[o] = dot(o < hidden ? wk + o * width : wv + (o - hidden) * width, e, width);
    const float *k = kv, *v = kv + hidden;
    float scale_h = rms_scale(h, hidden, eps_h), scale_k = rms_scale(k, hidden, eps_k);
    float score = 0.0f;
    for (int64_t i = 0; i < hidden; i++) score += (h[i] * scale_h * norm_h[i]) * (k[i] * scale_k * norm_k[i]);
    score /= sqrtf((float)hidden);
    if (score > 0.0f) score = sqrtf(fmaxf(score, 1e-6f));
    else if (score < 0.0f) score = -sqrtf(fmaxf(-score, 1e-6f));  /* sign(0) = 0 */
    float gate = sigmoid(score);
    float *u = y;  /* y = u (+ the convolution's output, added below) */
    for (int64_t i = 0; i < hidden; i++) u[i] = gate * v[i];
    if (norm_u) {
        float scale_u = rms_scale(u, hidden, eps_u);
        for (int64_t i = 0; i < hidden; i++) normed[i] = u[i] * scale_u * norm_u[i];
        int64_t context = (kernel - 1) * dilation;
        for (int64_t i = 0; i < hidden; i++) {
            float c = 0.0f;
            for (int64_t j = 0; j < kernel; j++) {
                int64_t back = context - j * dilation;  /* positions before this one */
                float tap;
                if (back == 0) tap = normed[i];
                else if (back <= state_len) tap = state[(state_len - back) * state_stride + i];
                else tap = 0.0f;  /* before the sequence's start */
                c += tap * conv_w[i * kernel + j];
            }
            y[i] = c / (1.0f + expf(-c)) + u[i];  /* silu(c) + u */
        }
    }
    gate_score_ratio[0] = gate;
    gate_score_ratio[1] = score;
    gate_score_ratio[2] = sqrtf(dot(y, y, hidden)) / fmaxf(sqrtf(dot(h, h, hidden)), 1e-12f);
    return 0;
}
