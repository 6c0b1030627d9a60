/* y = x @ w^T (+ bias) for float32 activations x and 16-bit stored weights w (float16 or
   bfloat16), written to y or added to it (a residual connection).

   The lean backend keeps weights that are exactly representable in 16 bits in 16 bits, and
   widens them to float32 in registers here: the arithmetic is float32 on the same values, and a
   decode step streams half the bytes of a float32 weight. Built by verispec/models/kernels.py
   with the system C compiler on first use (x86-64 with AVX2, FMA and F16C).

   Each output y[m, n] is one run of an 8-lane accumulator over k and a fixed lane sum, the same
   whatever the number of rows M in the pass: a position's logits do not depend on whether it was
   decoded alone, verified among k+1 positions or batched with other sequences. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m256 widen8_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}
static inline __m256 widen8_bf16(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline float widen1_f16(uint16_t v) { return _cvtsh_ss(v); }
static inline float widen1_bf16(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/* y[m, n] for NB weight rows w (row stride K) and MB rows of x (row stride K), written at y[m * N + r].
   Each output is one 8-lane accumulator over k in ascending steps of 8, then lane_sum, then the
   scalar tail, then the bias: the same order whatever NB and MB, so an output's bits do not depend
   on how many rows the pass has or which block it fell in. Blocking NB x MB lets one load of x
   serve NB weight rows and one widened weight vector MB rows of x (register blocking, as a GEMM
   micro-kernel does), which is what makes wide passes (prompt chunks, batches) cheap. */
#define BLOCK(NB, MB, KIND)                                                                   \
  static inline void block##NB##x##MB##_##KIND(const float* x, const uint16_t* w, int64_t K,  \
                                                float* y, int64_t N, const float* bias,       \
                                                int accumulate) {                             \
    __m256 acc[NB][MB];                                                                       \
    for (int r = 0; r < NB; ++r)                                                              \
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();                           \
    int64_t k = 0;                                                                            \
    for (; k + 8 <= K; k += 8) {                                                              \
      __m256 xv[MB];                                                                          \
      for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);                   \
      for (int r = 0; r < NB; ++r) {                                                          \
        __m256 wv = widen8_##KIND(w + r * K + k);                                             \
        for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);       \
      }                                                                                       \
    }                                                                                         \
    for (int r = 0; r < NB; ++r)                                                              \
      for (int m = 0; m < MB; ++m) {                                                          \
        float s = lane_sum(acc[r][m]);                                                        \
        for (int64_t j = k; j < K; ++j) s += widen1_##KIND(w[r * K + j]) * x[m * K + j];      \
        s += bias ? bias[r] : 0.0f;                                                           \
        float* out = y + m * N + r;                                                           \
        *out = accumulate ? *out + s : s;                                                     \
      }                                                                                       \
  }

/* NB weight rows against all M rows of x, MB rows at a time. */
#define ROWS(NB, KIND)                                                                        \
  static inline void rows##NB##_##KIND(const float* x, int64_t M, const uint16_t* w, int64_t K, \
                                        float* y, int64_t N, const float* bias, int accumulate) { \
    int64_t m = 0;                                                                            \
    for (; m + 3 <= M; m += 3) block##NB##x3_##KIND(x + m * K, w, K, y + m * N, N, bias, accumulate); \
    if (m + 2 <= M) {                                                                         \
      block##NB##x2_##KIND(x + m * K, w, K, y + m * N, N, bias, accumulate);                  \
      m += 2;                                                                                 \
    }                                                                                         \
    if (m < M) block##NB##x1_##KIND(x + m * K, w, K, y + m * N, N, bias, accumulate);         \
  }

#define LINEAR(KIND)                                                                          \
  BLOCK(4, 1, KIND) BLOCK(4, 2, KIND) BLOCK(4, 3, KIND)                                       \
  BLOCK(1, 1, KIND) BLOCK(1, 2, KIND) BLOCK(1, 3, KIND)                                       \
  ROWS(4, KIND) ROWS(1, KIND)                                                                 \
  void widen_linear_##KIND(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, \
                           const float* bias, float* y, int accumulate, int threads) {        \
    int64_t blocks = N / 4;                                                                   \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                        \
    for (int64_t b = 0; b < blocks; ++b) {                                                    \
      int64_t n = 4 * b;                                                                      \
      rows4_##KIND(x, M, w + n * K, K, y + n, N, bias ? bias + n : NULL, accumulate);         \
    }                                                                                         \
    for (int64_t n = 4 * blocks; n < N; ++n)                                                  \
      rows1_##KIND(x, M, w + n * K, K, y + n, N, bias ? bias + n : NULL, accumulate);         \
  }

LINEAR(f16)
LINEAR(bf16)
