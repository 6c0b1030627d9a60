/* y = x @ w^T (+ bias) for float32 activations x and 16-bit stored weights w (float16 or
   bfloat16), written to y or added to it (a residual connection).

   The lean backend keeps weights that are exactly representable in 16 bits in 16 bits, and
   widens them to float32 in registers here: the arithmetic is float32 on the same values, and a
   decode step streams half the bytes of a float32 weight. Built with the other sources at install
   time (setup.py), else by verispec/models/kernels.py with the system C compiler on first use
   (x86-64 with AVX2, FMA and F16C).

   Each output y[m, n] is one run of an 8-lane accumulator over k and a fixed lane sum, the same
   whatever the number of rows M in the pass: a position's logits do not depend on whether it was
   decoded alone, verified among k+1 positions or batched with other sequences.

   Rows of y are ldy floats apart (ldy >= N): a projection can write its N columns into a wider
   output, as one part of a fused projection whose parts are stored in different forms
   (lean_step.c). */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"
#include "verispec_kernels.h"

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
#define NR VS_PANEL /* 24 */

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

/* One row over 4 panels at once, or two rows over 2 panels: with kernel1 a decode step (M = 1)
   keeps 3 fused multiply-add chains in flight, and each waits on its previous FMA's result (4-5
   cycles), so the FMA units idle most of the time; 12 chains keep them busy. Every output's chain
   is the one kernel1 or kernel2 runs, operation for operation: only more of them are interleaved,
   so the bits are the same. */
#define WIDE(KIND)                                                                            \
  static void wide1_##KIND(const float* x, int64_t K, const uint16_t* const* p, float* y,   \
                           const int64_t* valid, const float* const* b, int accumulate) {    \
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;  \
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;                  \
    const uint16_t *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];                            \
    for (int64_t k = 0; k < K; ++k) {                                                         \
      __m256 a = _mm256_broadcast_ss(x + k);                                                  \
      PANEL_STEP_##KIND(a, p0, c00, c01, c02)                                                 \
      PANEL_STEP_##KIND(a, p1, c10, c11, c12)                                                 \
      PANEL_STEP_##KIND(a, p2, c20, c21, c22)                                                 \
      PANEL_STEP_##KIND(a, p3, c30, c31, c32)                                                 \
    }                                                                                         \
    finish(y, c00, c01, c02, b[0], valid[0], accumulate);                                     \
    finish(y + NR, c10, c11, c12, b[1], valid[1], accumulate);                                \
    finish(y + 2 * NR, c20, c21, c22, b[2], valid[2], accumulate);                            \
    finish(y + 3 * NR, c30, c31, c32, b[3], valid[3], accumulate);                            \
  }                                                                                           \
  static void wide2_##KIND(const float* x, int64_t K, const uint16_t* const* p, float* y,   \
                           int64_t ldy, const int64_t* valid, const float* const* b, int accumulate) { \
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00;  \
    __m256 c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;                  \
    const uint16_t *p0 = p[0], *p1 = p[1];                                                    \
    for (int64_t k = 0; k < K; ++k) {                                                         \
      __m256 a = _mm256_broadcast_ss(x + k), a1 = _mm256_broadcast_ss(x + K + k);             \
      PANEL_STEP_##KIND(a, p0, c00, c01, c02)                                                 \
      PANEL_STEP_##KIND(a1, p0, c10, c11, c12)                                                \
      PANEL_STEP_##KIND(a, p1, c20, c21, c22)                                                 \
      PANEL_STEP_##KIND(a1, p1, c30, c31, c32)                                                \
    }                                                                                         \
    finish(y, c00, c01, c02, b[0], valid[0], accumulate);                                     \
    finish(y + ldy, c10, c11, c12, b[0], valid[0], accumulate);                               \
    finish(y + NR, c20, c21, c22, b[1], valid[1], accumulate);                                \
    finish(y + ldy + NR, c30, c31, c32, b[1], valid[1], accumulate);                          \
  }

#define GROUP 4 /* panels per work item: what wide1 takes */

/* A work item: up to GROUP panels of `width` columns from panel `first`; each panel's address,
   valid columns and bias (zero-padded to the panel, in `padded`, or NULL). Returns the count. */
typedef struct {
  const uint16_t* panel[GROUP];
  int64_t valid[GROUP];
  const float* bias[GROUP];
  float padded[GROUP][32]; /* the widest panel: NR512 */
} group_t;

static inline int64_t panel_group(group_t* g, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                                  int64_t width, int64_t panels, int64_t first) {
  int64_t count = panels - first < GROUP ? panels - first : GROUP;
  for (int64_t i = 0; i < count; ++i) {
    int64_t n = (first + i) * width;
    g->panel[i] = w + (first + i) * K * width;
    g->valid[i] = N - n < width ? N - n : width;
    g->bias[i] = NULL;
    if (bias) {
      for (int64_t j = 0; j < width; ++j) g->padded[i][j] = j < g->valid[i] ? bias[n + j] : 0.0f;
      g->bias[i] = g->padded[i];
    }
  }
  return count;
}

#define LINEAR(KIND)                                                                          \
  KERNEL(1, KIND) KERNEL(2, KIND) KERNEL(3, KIND) KERNEL(4, KIND) WIDE(KIND)                  \
  static void linear_avx2_##KIND(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, \
                                 const float* bias, float* y, int64_t ldy, int accumulate) {  \
    int64_t panels = (N + NR - 1) / NR, groups = (panels + GROUP - 1) / GROUP, tiled = M / 4 * 4; \
    _Pragma("omp for schedule(guided)") /* team.h */                                           \
    for (int64_t g = 0; g < groups; ++g) {                                                    \
      group_t group;                                                                          \
      int64_t first = g * GROUP, count = panel_group(&group, w, N, K, bias, NR, panels, first); \
      const uint16_t* const* panel = group.panel;                                             \
      const int64_t* valid = group.valid;                                                     \
      const float* const* b = group.bias;                                                     \
      float* out = y + first * NR;                                                            \
      for (int64_t i = 0; i < count; ++i)                                                     \
        for (int64_t m = 0; m < tiled; m += 4)                                                \
          kernel4_##KIND(x + m * K, K, panel[i], out + m * ldy + i * NR, ldy, valid[i], b[i], accumulate); \
      const float* xr = x + tiled * K;                                                        \
      float* yr = out + tiled * ldy;                                                          \
      int64_t i = 0;                                                                          \
      switch (M - tiled) {                                                                    \
        case 3:                                                                               \
          for (; i < count; ++i) kernel3_##KIND(xr, K, panel[i], yr + i * NR, ldy, valid[i], b[i], accumulate); \
          break;                                                                              \
        case 2:                                                                               \
          for (; i + 2 <= count; i += 2) wide2_##KIND(xr, K, panel + i, yr + i * NR, ldy, valid + i, b + i, accumulate); \
          for (; i < count; ++i) kernel2_##KIND(xr, K, panel[i], yr + i * NR, ldy, valid[i], b[i], accumulate); \
          break;                                                                              \
        case 1:                                                                               \
          if (count == GROUP) wide1_##KIND(xr, K, panel, yr, valid, b, accumulate);           \
          else                                                                                \
            for (; i < count; ++i) kernel1_##KIND(xr, K, panel[i], yr + i * NR, ldy, valid[i], b[i], accumulate); \
          break;                                                                              \
      }                                                                                       \
    }                                                                                         \
  }

#define PANEL_STEP_f16(X, P, C0, C1, C2)                                                      \
  {                                                                                           \
    const uint16_t* q = (P) + k * NR;                                                         \
    C0 = _mm256_fmadd_ps(X, widen8_f16(q), C0);                                               \
    C1 = _mm256_fmadd_ps(X, widen8_f16(q + 8), C1);                                           \
    C2 = _mm256_fmadd_ps(X, widen8_f16(q + 16), C2);                                          \
  }
#define PANEL_STEP_bf16(X, P, C0, C1, C2)                                                     \
  {                                                                                           \
    const uint16_t* q = (P) + k * NR;                                                         \
    C0 = _mm256_fmadd_ps(X, widen8_bf16(q), C0);                                              \
    C1 = _mm256_fmadd_ps(X, widen8_bf16(q + 8), C1);                                          \
    C2 = _mm256_fmadd_ps(X, widen8_bf16(q + 16), C2);                                         \
  }

LINEAR(f16)
LINEAR(bf16)

/* ---- AVX-512: panels of NR512 = 32 columns (two 16-lane registers a row), up to 12 rows a tile ----
   Each output is still one fused multiply-add chain over k of x[m, k] * w[n, k] in a lane of its
   own, then the bias, then the residual: the same operations as the AVX2 path, so the same bits,
   on panels packed 32 wide (`widen_panel()` says which width this CPU's path streams). A pass of
   several rows is bound by the multiply-adds, which a 16-lane FMA does twice as many of. */
#define NR512 VS_PANEL_AVX512 /* 32 */
#define PREFETCH 16 /* rows of a panel ahead: a wide pass is busy multiplying, and the hardware
                       prefetcher alone then falls behind the stream of weights */

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,f16c,fma")

typedef uint16_t elem_f16;
typedef uint16_t elem_bf16;
typedef float elem_f32; /* a panel pair widened once into scratch (`widened_pair`) */

static inline __m512 widen16_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m512 widen16_f32(const float* p) { return _mm512_load_ps(p); }
static inline __m512 widen16_bf16(const uint16_t* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline void finish512(float* row, __m512 c0, __m512 c1, const float* bias, int64_t valid, int accumulate) {
  float out[NR512];
  if (bias) {
    c0 = _mm512_add_ps(c0, _mm512_loadu_ps(bias));
    c1 = _mm512_add_ps(c1, _mm512_loadu_ps(bias + 16));
  }
  _mm512_storeu_ps(out, c0);
  _mm512_storeu_ps(out + 16, c1);
  for (int64_t j = 0; j < valid; ++j) row[j] = accumulate ? row[j] + out[j] : out[j];
}

/* Rows R of a tile, panels P: accumulators cRP0, cRP1. */
#define STEP512(R, W0, W1, C0, C1)                                                            \
  {                                                                                           \
    __m512 a = _mm512_set1_ps(x[(R) * K + k]);                                                \
    C0 = _mm512_fmadd_ps(a, W0, C0);                                                          \
    C1 = _mm512_fmadd_ps(a, W1, C1);                                                          \
  }
/* MR rows (<= 12) over one panel: 24 accumulators, the two widened panel rows and a broadcast
   take 27 of the 32 registers, so a pass of up to 12 rows streams each weight once. */
#define MR512 12
#define KERNEL512(MR, KIND)                                                                   \
  static void k512_##MR##_##KIND(const float* x, int64_t K, const uint16_t* panel, float* y, int64_t ldy, \
                                 int64_t valid, const float* bias, int accumulate) {          \
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;  \
    __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;                  \
    __m512 c60 = c00, c61 = c00, c70 = c00, c71 = c00, c80 = c00, c81 = c00;                  \
    __m512 c90 = c00, c91 = c00, ca0 = c00, ca1 = c00, cb0 = c00, cb1 = c00;                  \
    for (int64_t k = 0; k < K; ++k) {                                                         \
      const uint16_t* q = panel + k * NR512;                                                  \
      _mm_prefetch((const char*)(q + PREFETCH * NR512), _MM_HINT_T0);                          \
      __m512 w0 = widen16_##KIND(q), w1 = widen16_##KIND(q + 16);                             \
      STEP512(0, w0, w1, c00, c01)                                                            \
      if (MR > 1) STEP512(1, w0, w1, c10, c11)                                                \
      if (MR > 2) STEP512(2, w0, w1, c20, c21)                                                \
      if (MR > 3) STEP512(3, w0, w1, c30, c31)                                                \
      if (MR > 4) STEP512(4, w0, w1, c40, c41)                                                \
      if (MR > 5) STEP512(5, w0, w1, c50, c51)                                                \
      if (MR > 6) STEP512(6, w0, w1, c60, c61)                                                \
      if (MR > 7) STEP512(7, w0, w1, c70, c71)                                                \
      if (MR > 8) STEP512(8, w0, w1, c80, c81)                                                \
      if (MR > 9) STEP512(9, w0, w1, c90, c91)                                                \
      if (MR > 10) STEP512(10, w0, w1, ca0, ca1)                                              \
      if (MR > 11) STEP512(11, w0, w1, cb0, cb1)                                              \
    }                                                                                         \
    finish512(y, c00, c01, bias, valid, accumulate);                                          \
    if (MR > 1) finish512(y + ldy, c10, c11, bias, valid, accumulate);                        \
    if (MR > 2) finish512(y + 2 * ldy, c20, c21, bias, valid, accumulate);                    \
    if (MR > 3) finish512(y + 3 * ldy, c30, c31, bias, valid, accumulate);                    \
    if (MR > 4) finish512(y + 4 * ldy, c40, c41, bias, valid, accumulate);                    \
    if (MR > 5) finish512(y + 5 * ldy, c50, c51, bias, valid, accumulate);                    \
    if (MR > 6) finish512(y + 6 * ldy, c60, c61, bias, valid, accumulate);                    \
    if (MR > 7) finish512(y + 7 * ldy, c70, c71, bias, valid, accumulate);                    \
    if (MR > 8) finish512(y + 8 * ldy, c80, c81, bias, valid, accumulate);                    \
    if (MR > 9) finish512(y + 9 * ldy, c90, c91, bias, valid, accumulate);                    \
    if (MR > 10) finish512(y + 10 * ldy, ca0, ca1, bias, valid, accumulate);                  \
    if (MR > 11) finish512(y + 11 * ldy, cb0, cb1, bias, valid, accumulate);                  \
  }
/* One row over 4 panels at once (8 chains in flight instead of 2; see wide1). */
#define WIDE512(KIND)                                                                         \
  static void w512_##KIND(const float* x, int64_t K, const uint16_t* const* p, float* y,     \
                          const int64_t* valid, const float* const* b, int accumulate) {     \
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;  \
    __m512 c30 = c00, c31 = c00;                                                              \
    for (int64_t k = 0; k < K; ++k) {                                                         \
      __m512 a = _mm512_set1_ps(x[k]);                                                        \
      const uint16_t *q0 = p[0] + k * NR512, *q1 = p[1] + k * NR512;                          \
      const uint16_t *q2 = p[2] + k * NR512, *q3 = p[3] + k * NR512;                          \
      _mm_prefetch((const char*)(q0 + PREFETCH * NR512), _MM_HINT_T0);                         \
      _mm_prefetch((const char*)(q1 + PREFETCH * NR512), _MM_HINT_T0);                         \
      _mm_prefetch((const char*)(q2 + PREFETCH * NR512), _MM_HINT_T0);                         \
      _mm_prefetch((const char*)(q3 + PREFETCH * NR512), _MM_HINT_T0);                         \
      c00 = _mm512_fmadd_ps(a, widen16_##KIND(q0), c00);                                      \
      c01 = _mm512_fmadd_ps(a, widen16_##KIND(q0 + 16), c01);                                 \
      c10 = _mm512_fmadd_ps(a, widen16_##KIND(q1), c10);                                      \
      c11 = _mm512_fmadd_ps(a, widen16_##KIND(q1 + 16), c11);                                 \
      c20 = _mm512_fmadd_ps(a, widen16_##KIND(q2), c20);                                      \
      c21 = _mm512_fmadd_ps(a, widen16_##KIND(q2 + 16), c21);                                 \
      c30 = _mm512_fmadd_ps(a, widen16_##KIND(q3), c30);                                      \
      c31 = _mm512_fmadd_ps(a, widen16_##KIND(q3 + 16), c31);                                 \
    }                                                                                         \
    finish512(y, c00, c01, b[0], valid[0], accumulate);                                       \
    finish512(y + NR512, c10, c11, b[1], valid[1], accumulate);                               \
    finish512(y + 2 * NR512, c20, c21, b[2], valid[2], accumulate);                           \
    finish512(y + 3 * NR512, c30, c31, b[3], valid[3], accumulate);                           \
  }
/* MR rows (<= 6) over two panels at once: 24 accumulators, four widened panel halves and a
   broadcast (29 registers); each broadcast feeds 4 multiply-adds instead of 2. With STORE, the
   tile also writes the widened halves to `s` (panel 0's at s, panel 1's at s + K * NR512) for the
   pass's other tiles (`widened_pair`); the stores take no port of the multiply-adds. */
#define STEP512X2(R, C00, C01, C10, C11)                                                      \
  {                                                                                           \
    __m512 a = _mm512_set1_ps(x[(R) * K + k]);                                                \
    C00 = _mm512_fmadd_ps(a, w00, C00);                                                       \
    C01 = _mm512_fmadd_ps(a, w01, C01);                                                       \
    C10 = _mm512_fmadd_ps(a, w10, C10);                                                       \
    C11 = _mm512_fmadd_ps(a, w11, C11);                                                       \
  }
#define FINISH512X2(R, C00, C01, C10, C11)                                                    \
  {                                                                                           \
    finish512(y + (R) * ldy, C00, C01, b[0], valid[0], accumulate);                           \
    finish512(y + (R) * ldy + NR512, C10, C11, b[1], valid[1], accumulate);                   \
  }
#define KERNEL512X2(MR, KIND, STORE)                                                          \
  static void k512x2_##MR##_##KIND##_##STORE(const float* x, int64_t K, const elem_##KIND* const* p, float* y, \
                                             int64_t ldy, const int64_t* valid, const float* const* b, \
                                             int accumulate, float* s) {                      \
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, b00 = a00, b01 = a00, b10 = a00, b11 = a00; \
    __m512 c00 = a00, c01 = a00, c10 = a00, c11 = a00, d00 = a00, d01 = a00, d10 = a00, d11 = a00; \
    __m512 e00 = a00, e01 = a00, e10 = a00, e11 = a00, f00 = a00, f01 = a00, f10 = a00, f11 = a00; \
    const elem_##KIND *p0 = p[0], *p1 = p[1];                                                 \
    for (int64_t k = 0; k < K; ++k) {                                                         \
      const elem_##KIND *q0 = p0 + k * NR512, *q1 = p1 + k * NR512;                           \
      _mm_prefetch((const char*)(q0 + PREFETCH * NR512), _MM_HINT_T0);                         \
      _mm_prefetch((const char*)(q1 + PREFETCH * NR512), _MM_HINT_T0);                         \
      __m512 w00 = widen16_##KIND(q0), w01 = widen16_##KIND(q0 + 16);                         \
      __m512 w10 = widen16_##KIND(q1), w11 = widen16_##KIND(q1 + 16);                         \
      if (STORE) {                                                                            \
        float* d = s + k * NR512;                                                             \
        _mm512_store_ps(d, w00);                                                              \
        _mm512_store_ps(d + 16, w01);                                                         \
        _mm512_store_ps(d + K * NR512, w10);                                                  \
        _mm512_store_ps(d + K * NR512 + 16, w11);                                             \
      }                                                                                       \
      STEP512X2(0, a00, a01, a10, a11)                                                        \
      if (MR > 1) STEP512X2(1, b00, b01, b10, b11)                                            \
      if (MR > 2) STEP512X2(2, c00, c01, c10, c11)                                            \
      if (MR > 3) STEP512X2(3, d00, d01, d10, d11)                                            \
      if (MR > 4) STEP512X2(4, e00, e01, e10, e11)                                            \
      if (MR > 5) STEP512X2(5, f00, f01, f10, f11)                                            \
    }                                                                                         \
    FINISH512X2(0, a00, a01, a10, a11)                                                        \
    if (MR > 1) FINISH512X2(1, b00, b01, b10, b11)                                            \
    if (MR > 2) FINISH512X2(2, c00, c01, c10, c11)                                            \
    if (MR > 3) FINISH512X2(3, d00, d01, d10, d11)                                            \
    if (MR > 4) FINISH512X2(4, e00, e01, e10, e11)                                            \
    if (MR > 5) FINISH512X2(5, f00, f01, f10, f11)                                            \
  }
#define PAIR512(KIND, STORE)                                                                  \
  KERNEL512X2(1, KIND, STORE) KERNEL512X2(2, KIND, STORE) KERNEL512X2(3, KIND, STORE)         \
  KERNEL512X2(4, KIND, STORE) KERNEL512X2(5, KIND, STORE) KERNEL512X2(6, KIND, STORE)         \
  static inline void pair512_##KIND##_##STORE(int64_t rows, const float* x, int64_t K, const elem_##KIND* const* p, \
                                              float* y, int64_t ldy, const int64_t* valid, const float* const* b, \
                                              int accumulate, float* s) {                     \
    switch (rows) {                                                                           \
      case 6: k512x2_6_##KIND##_##STORE(x, K, p, y, ldy, valid, b, accumulate, s); break;     \
      case 5: k512x2_5_##KIND##_##STORE(x, K, p, y, ldy, valid, b, accumulate, s); break;     \
      case 4: k512x2_4_##KIND##_##STORE(x, K, p, y, ldy, valid, b, accumulate, s); break;     \
      case 3: k512x2_3_##KIND##_##STORE(x, K, p, y, ldy, valid, b, accumulate, s); break;     \
      case 2: k512x2_2_##KIND##_##STORE(x, K, p, y, ldy, valid, b, accumulate, s); break;     \
      default: k512x2_1_##KIND##_##STORE(x, K, p, y, ldy, valid, b, accumulate, s); break;    \
    }                                                                                         \
  }

/* Rows `rows` (1 to MR512) of a tile over one panel. */
#define TILE512(KIND)                                                                         \
  static inline void tile512_##KIND(int64_t rows, const float* x, int64_t K, const uint16_t* panel, float* y, \
                                    int64_t ldy, int64_t valid, const float* bias, int accumulate) { \
    switch (rows) {                                                                           \
      case 12: k512_12_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;           \
      case 11: k512_11_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;           \
      case 10: k512_10_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;           \
      case 9: k512_9_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;             \
      case 8: k512_8_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;             \
      case 7: k512_7_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;             \
      case 6: k512_6_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;             \
      case 5: k512_5_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;             \
      case 4: k512_4_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;             \
      case 3: k512_3_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;             \
      case 2: k512_2_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;             \
      default: k512_1_##KIND(x, K, panel, y, ldy, valid, bias, accumulate); break;            \
    }                                                                                         \
  }
PAIR512(f32, 0)

/* A pass of WIDENED_ROWS rows or more widens each panel pair once: its first tile writes the
   widened halves to this thread's scratch as it goes, and the other tiles read the float32 pair
   from there (L2) instead of widening it again. The conversions share the ports of the
   multiply-adds (4 to a tile of 6 rows' 24), so a prompt chunk of 128 rows spent about a fifth of
   its projection time converting the same weights 22 times. The values are the widened ones
   either way: every output's chain is the same, and so are its bits. */
#define WIDENED_ROWS 16 /* three tiles of a pair or more: at 13 rows no gain (scripts/widen_ab.py) */
static __thread float* widened_scratch = NULL;
static __thread int64_t widened_floats = 0;

static float* widened_pair(int64_t K) {
  int64_t need = 2 * K * NR512;
  if (need > widened_floats) {
    free(widened_scratch);
    widened_scratch = aligned_alloc(64, (size_t)need * sizeof(float));
    widened_floats = widened_scratch ? need : 0;
  }
  return widened_scratch;
}

/* A pass of M rows takes the panels two at a time, in tiles of up to 6 rows as even as they come
   (13 rows: 5 + 4 + 4, not 6 + 6 + 1), so no sweep is spent on a small remainder; a group's odd
   last panel takes tiles of up to 12 rows. Two panels a tile beat 12 rows a tile by 7-17% at every
   width from 2 to 64 (scripts/widen_ab.py): a broadcast feeds 4 multiply-adds, and the second sweep
   of a panel pair comes from L2. One row over a whole group of panels takes w512 (more chains in
   flight). Every output's chain is the same in any tile. */
#define LINEAR512(KIND)                                                                       \
  KERNEL512(1, KIND) KERNEL512(2, KIND) KERNEL512(3, KIND) KERNEL512(4, KIND) KERNEL512(5, KIND) \
  KERNEL512(6, KIND) KERNEL512(7, KIND) KERNEL512(8, KIND) KERNEL512(9, KIND) KERNEL512(10, KIND) \
  KERNEL512(11, KIND) KERNEL512(12, KIND) WIDE512(KIND) TILE512(KIND) PAIR512(KIND, 0) PAIR512(KIND, 1) \
  static void linear_avx512_##KIND(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, \
                                   const float* bias, float* y, int64_t ldy, int accumulate) { \
    int64_t panels = (N + NR512 - 1) / NR512, groups = (panels + GROUP - 1) / GROUP;          \
    int64_t tiles = (M + MR512 - 1) / MR512, rows = M / tiles, longer = M % tiles;            \
    int64_t pair_tiles = (M + 5) / 6, pair_rows = M / pair_tiles, pair_longer = M % pair_tiles; \
    _Pragma("omp for schedule(guided)") /* team.h */                                           \
    for (int64_t g = 0; g < groups; ++g) {                                                    \
      group_t group;                                                                          \
      int64_t first = g * GROUP, count = panel_group(&group, w, N, K, bias, NR512, panels, first); \
      const uint16_t* const* panel = group.panel;                                             \
      const int64_t* valid = group.valid;                                                     \
      const float* const* b = group.bias;                                                     \
      float* out = y + first * NR512;                                                         \
      if (M == 1 && count == GROUP) {                                                         \
        w512_##KIND(x, K, panel, out, valid, b, accumulate);                                  \
        continue;                                                                             \
      }                                                                                       \
      int64_t i = 0;                                                                          \
      float* s = M >= WIDENED_ROWS ? widened_pair(K) : NULL;                                 \
      for (; i + 2 <= count; i += 2) /* pairs of panels, in tiles of up to 6 rows */          \
        for (int64_t t = 0, m = 0; t < pair_tiles; ++t) {                                     \
          int64_t r = pair_rows + (t < pair_longer);                                          \
          float* yt = out + m * ldy + i * NR512;                                              \
          if (!s)                                                                             \
            pair512_##KIND##_0(r, x + m * K, K, panel + i, yt, ldy, valid + i, b + i, accumulate, NULL); \
          else if (t == 0) /* widens the pair, and keeps it for the others */                 \
            pair512_##KIND##_1(r, x + m * K, K, panel + i, yt, ldy, valid + i, b + i, accumulate, s); \
          else {                                                                              \
            const float* wide[2] = {s, s + K * NR512};                                        \
            pair512_f32_0(r, x + m * K, K, wide, yt, ldy, valid + i, b + i, accumulate, NULL); \
          }                                                                                   \
          m += r;                                                                             \
        }                                                                                     \
      for (; i < count; ++i)                                                                  \
        for (int64_t t = 0, m = 0; t < tiles; ++t) {                                          \
          int64_t r = rows + (t < longer);                                                    \
          tile512_##KIND(r, x + m * K, K, panel[i], out + m * ldy + i * NR512, ldy, valid[i], b[i], accumulate); \
          m += r;                                                                             \
        }                                                                                     \
    }                                                                                         \
  }

LINEAR512(f16)
LINEAR512(bf16)

#pragma GCC pop_options

/* The panel width this CPU's path streams: 32 with AVX-512 (F, BW, VL), else 24 (kernels.py packs
   weights to it once, at load). */
static int panel_width = 0;

int widen_panel(void) {
  if (!panel_width)
    panel_width = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") ? NR512 : NR;
  return panel_width;
}

/* Tests: run the AVX2 path (24) even where AVX-512 is present, or back to the best (0); the
   panel width now in use. Weights packed for the other width must not be passed after it. */
int widen_force_panel(int width) {
  panel_width = 0;
  int best = widen_panel();
  panel_width = width == NR ? NR : best;
  return panel_width;
}

/* The team bodies (team.h): every thread of a team calls them, the groups of panels shared out. */
void widen_team_f16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias, float* y,
                    int64_t ldy, int accumulate) {
  if (widen_panel() == NR512) linear_avx512_f16(x, M, w, N, K, bias, y, ldy, accumulate);
  else linear_avx2_f16(x, M, w, N, K, bias, y, ldy, accumulate);
}

void widen_team_bf16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias, float* y,
                     int64_t ldy, int accumulate) {
  if (widen_panel() == NR512) linear_avx512_bf16(x, M, w, N, K, bias, y, ldy, accumulate);
  else linear_avx2_bf16(x, M, w, N, K, bias, y, ldy, accumulate);
}

void widen_linear_f16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                      float* y, int64_t ldy, int accumulate, int threads) {
  VS_TEAM(threads, widen_team_f16(x, M, w, N, K, bias, y, ldy, accumulate));
}

void widen_linear_bf16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                       float* y, int64_t ldy, int accumulate, int threads) {
  VS_TEAM(threads, widen_team_bf16(x, M, w, N, K, bias, y, ldy, accumulate));
}
