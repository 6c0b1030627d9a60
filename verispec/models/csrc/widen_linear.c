/* y = x @ w^T (+ bias) for float32 activations x and 16-bit stored weights w (float16 or
   bfloat16), written to y or added to it (a residual connection).

   The lean backend keeps weights that are exactly representable in 16 bits in 16 bits, and
   widens them to float32 in registers here: the arithmetic is float32 on the same values, and a
   decode step streams half the bytes of a float32 weight. Built by verispec/models/kernels.py
   with the system C compiler on first use (x86-64 with AVX2, FMA and F16C).

   Each output y[m, n] is one run of an 8-lane accumulator over k and a fixed lane sum, the same
   whatever the number of rows M in the pass: a position's logits do not depend on whether it was
   decoded alone, verified among k+1 positions or batched with other sequences.

   Rows of y are ldy floats apart (ldy >= N): a projection can write its N columns into a wider
   output, as one part of a fused projection whose parts are stored in different forms
   (lean_step.c). */

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

/* The weight is packed in panels of NR = 24 output columns: panel p holds w[p*NR + c, k] at
   [k * NR + c], so a pass reads each panel front to back (kernels.py pads the last one with
   zeros). A micro-kernel keeps an MR x NR block of outputs in 12 registers and, for each k,
   widens one panel row and broadcasts MR values of x: the register blocking of a GEMM.

   Each output is one fused multiply-add chain over k in ascending order from 0, then the bias,
   then the residual: the same operations whatever the block it falls in and whatever the number
   of rows M, so an output's bits do not depend on the pass (decode, verify, prompt chunk, batch). */
#define NR 24

/* One row of a block: (acc + bias), then into y (set, or added to the residual). */
static inline void finish(float* row, __m256 c0, __m256 c1, __m256 c2, const float* bias, int64_t valid,
                          int accumulate) {
  float out[NR];
  if (bias) {
    c0 = _mm256_add_ps(c0, _mm256_loadu_ps(bias));
    c1 = _mm256_add_ps(c1, _mm256_loadu_ps(bias + 8));
    c2 = _mm256_add_ps(c2, _mm256_loadu_ps(bias + 16));
  }
  _mm256_storeu_ps(out, c0);
  _mm256_storeu_ps(out + 8, c1);
  _mm256_storeu_ps(out + 16, c2);
  for (int64_t j = 0; j < valid; ++j) row[j] = accumulate ? row[j] + out[j] : out[j];
}

/* The accumulators are named variables, not an array: gcc keeps an array in memory and stores
   it back on every k, which halves the kernel's speed. */
#define STEP(R, C0, C1, C2)                                                                   \
  {                                                                                           \
    __m256 a = _mm256_broadcast_ss(x + (R) * K + k);                                          \
    C0 = _mm256_fmadd_ps(a, w0, C0);                                                          \
    C1 = _mm256_fmadd_ps(a, w1, C1);                                                          \
    C2 = _mm256_fmadd_ps(a, w2, C2);                                                          \
  }

#define KERNEL(MR, KIND)                                                                      \
  static inline void kernel##MR##_##KIND(const float* x, int64_t K, const uint16_t* panel,    \
                                         float* y, int64_t ldy, int64_t valid, const float* bias, \
                                         int accumulate) {                                    \
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;  \
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;                  \
    for (int64_t k = 0; k < K; ++k) {                                                         \
      const uint16_t* p = panel + k * NR;                                                     \
      __m256 w0 = widen8_##KIND(p), w1 = widen8_##KIND(p + 8), w2 = widen8_##KIND(p + 16);    \
      STEP(0, c00, c01, c02)                                                                  \
      if (MR > 1) STEP(1, c10, c11, c12)                                                      \
      if (MR > 2) STEP(2, c20, c21, c22)                                                      \
      if (MR > 3) STEP(3, c30, c31, c32)                                                      \
    }                                                                                         \
    finish(y, c00, c01, c02, bias, valid, accumulate);                                        \
    if (MR > 1) finish(y + ldy, c10, c11, c12, bias, valid, accumulate);                      \
    if (MR > 2) finish(y + 2 * ldy, c20, c21, c22, bias, valid, accumulate);                  \
    if (MR > 3) finish(y + 3 * ldy, c30, c31, c32, bias, valid, accumulate);                  \
  }

#define LINEAR(KIND)                                                                          \
  KERNEL(1, KIND) KERNEL(2, KIND) KERNEL(3, KIND) KERNEL(4, KIND)                             \
  void widen_linear_##KIND(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, \
                           const float* bias, float* y, int64_t ldy, int accumulate, int threads) { \
    int64_t panels = (N + NR - 1) / NR;                                                       \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                        \
    for (int64_t p = 0; p < panels; ++p) {                                                    \
      const uint16_t* panel = w + p * K * NR;                                                 \
      int64_t n = p * NR, valid = N - n < NR ? N - n : NR;                                    \
      const float* b = NULL;                                                                  \
      float padded[NR];                                                                       \
      if (bias) {                                                                             \
        for (int j = 0; j < NR; ++j) padded[j] = j < valid ? bias[n + j] : 0.0f;             \
        b = padded;                                                                           \
      }                                                                                       \
      int64_t m = 0;                                                                          \
      for (; m + 4 <= M; m += 4) kernel4_##KIND(x + m * K, K, panel, y + m * ldy + n, ldy, valid, b, accumulate); \
      switch (M - m) {                                                                        \
        case 3: kernel3_##KIND(x + m * K, K, panel, y + m * ldy + n, ldy, valid, b, accumulate); break; \
        case 2: kernel2_##KIND(x + m * K, K, panel, y + m * ldy + n, ldy, valid, b, accumulate); break; \
        case 1: kernel1_##KIND(x + m * K, K, panel, y + m * ldy + n, ldy, valid, b, accumulate); break; \
      }                                                                                       \
    }                                                                                         \
  }

LINEAR(f16)
LINEAR(bf16)
