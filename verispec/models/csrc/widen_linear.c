/* y = x @ w^T (+ bias) for float32 activations x and 16-bit stored weights w (float16 or
   bfloat16), written to y or added to it (a residual connection).

   The lean backend keeps weights that are exactly representable in 16 bits in 16 bits, and
   widens them to float32 in registers here: the arithmetic is float32 on the same values, and a
   decode step streams half the bytes of a float32 weight. Built by verispec/models/kernels.py
   with the system C compiler on first use (x86-64 with AVX2, FMA and F16C).

   Each output y[m, n] is one run of two 8-lane accumulators over k and a fixed lane sum, the
   same whatever the number of rows M in the pass: a position's logits do not depend on whether
   it was decoded alone or verified among k+1 positions. */

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

/* One weight row (K values) against MB rows of x (row stride K); sets or adds y[m * N], m < MB. */
#define ROWS(MB, KIND)                                                                        \
  static inline void rows##MB##_##KIND(const float* x, const uint16_t* w, int64_t K, float* y, \
                                        int64_t N, float bias, int accumulate) {              \
    __m256 even[MB], odd[MB];                                                                 \
    for (int m = 0; m < MB; ++m) even[m] = odd[m] = _mm256_setzero_ps();                     \
    int64_t k = 0;                                                                            \
    for (; k + 16 <= K; k += 16) {                                                            \
      __m256 w0 = widen8_##KIND(w + k), w1 = widen8_##KIND(w + k + 8);                        \
      for (int m = 0; m < MB; ++m) {                                                          \
        even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), even[m]);               \
        odd[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), odd[m]);             \
      }                                                                                       \
    }                                                                                         \
    if (k + 8 <= K) {                                                                         \
      __m256 w0 = widen8_##KIND(w + k);                                                       \
      for (int m = 0; m < MB; ++m) even[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), even[m]); \
      k += 8;                                                                                 \
    }                                                                                         \
    for (int m = 0; m < MB; ++m) {                                                            \
      float s = lane_sum(_mm256_add_ps(even[m], odd[m]));                                     \
      for (int64_t j = k; j < K; ++j) s += widen1_##KIND(w[j]) * x[m * K + j];                \
      s += bias;                                                                              \
      y[m * N] = accumulate ? y[m * N] + s : s;                                               \
    }                                                                                         \
  }

#define LINEAR(KIND)                                                                          \
  ROWS(1, KIND) ROWS(2, KIND) ROWS(4, KIND)                                                   \
  void widen_linear_##KIND(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, \
                           const float* bias, float* y, int accumulate, int threads) {        \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                        \
    for (int64_t n = 0; n < N; ++n) {                                                         \
      const uint16_t* row = w + n * K;                                                        \
      if (n + 2 < N) /* fetch row n+2 while this one is computed: about 15% faster at M=1 */  \
        for (int64_t byte = 0; byte < K * 2; byte += 64)                                      \
          _mm_prefetch((const char*)(row + 2 * K) + byte, _MM_HINT_T0);                       \
      float b = bias ? bias[n] : 0.0f;                                                        \
      int64_t m = 0;                                                                          \
      for (; m + 4 <= M; m += 4) rows4_##KIND(x + m * K, row, K, y + m * N + n, N, b, accumulate);          \
      if (m + 2 <= M) {                                                                       \
        rows2_##KIND(x + m * K, row, K, y + m * N + n, N, b, accumulate);                                    \
        m += 2;                                                                               \
      }                                                                                       \
      if (m < M) rows1_##KIND(x + m * K, row, K, y + m * N + n, N, b, accumulate);                           \
    }                                                                                         \
  }

LINEAR(f16)
LINEAR(bf16)
