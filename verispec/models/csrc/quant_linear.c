/* y = x @ w^T (+ bias) for float32 activations x and GGUF block-quantized weights w (Q8_0, Q4_0,
   Q4_1, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS), the embedding gather of such
   rows, and their dequantization.

   The model is exactly "the dequantized weights, in float32": every weight is the float32 value
   that gguf's numpy dequantize gives, bit for bit, and the products and sums are float32 (x is
   not quantized to int8 as llama.cpp does). The weights stay in memory in their 4.5 to 8.5 bits a
   value, in the GGUF file's layout: a decode or verify pass of a few rows dequantizes them in
   registers as it multiplies them; a pass of more rows dequantizes 4 rows of w at a time into a
   small buffer and runs all its rows over that.

   Each output y[m, n] is one fused multiply-add chain of a vector accumulator over k in ascending
   order (lane l of it takes k = l, l + LANES, ...), then a fixed lane sum, then the bias, then the
   residual: the same operations whatever the number of rows M, the tile, the thread or the number
   of threads, so a position's logits are the same bits decoded alone, verified among k+1
   positions or batched. LANES is 16 where the CPU has AVX-512 (chosen once per process, never by
   M) and 8 with AVX2: the two give different, each fixed, roundings of the same sum.

   Built with widen_linear.c by verispec/models/kernels.py (x86-64, AVX2, FMA, F16C); the AVX-512
   functions are compiled for that target only (GCC target pragma) and are called only where the
   CPU has it. */

#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_blocks.h"
#include "team.h"
#include "verispec_kernels.h"

/* ---- AVX2: vector j < QK / 8 of block blk of a chunk ---- */

static inline __m256 vec_q8_0_avx2(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q;
  return _mm256_mul_ps(f8(i8x8(b + blk * 34 + 2 + 8 * j)), _mm256_set1_ps(ctx[blk]));
}

static inline __m256 vec_q4_0_avx2(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q;
  __m256i raw = u8x8(b + blk * 18 + 2 + 8 * (j & 1));
  __m256i v = j < 2 ? _mm256_and_si256(raw, _mm256_set1_epi32(15)) : _mm256_srli_epi32(raw, 4);
  return _mm256_mul_ps(_mm256_set1_ps(ctx[blk]), f8(_mm256_sub_epi32(v, _mm256_set1_epi32(8))));
}

static inline __m256 vec_q4_1_avx2(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q;
  __m256i raw = u8x8(b + blk * 20 + 4 + 8 * (j & 1));
  __m256i v = j < 2 ? _mm256_and_si256(raw, _mm256_set1_epi32(15)) : _mm256_srli_epi32(raw, 4);
  return _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(ctx[blk]), f8(v)), _mm256_set1_ps(ctx[8 + blk]));
}

/* weight 8j = 64 * (j / 8) + 8 * (j % 8): nibble (j % 8) / 4 of bytes 32 * (j / 8) + 8 * (j % 4) */
static inline __m256 vec_q4_k_avx2(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q, (void)blk;
  int high = (j >> 2) & 1, sub = 2 * (j >> 3) + high;
  __m256i raw = u8x8(b + 16 + 32 * (j >> 3) + 8 * (j & 3));
  __m256i v = high ? _mm256_srli_epi32(raw, 4) : _mm256_and_si256(raw, _mm256_set1_epi32(15));
  return _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(ctx[sub]), f8(v)), _mm256_set1_ps(ctx[8 + sub]));
}

static inline __m256 vec_q6_k_avx2(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)b, (void)blk;
  return _mm256_mul_ps(_mm256_set1_ps(ctx[j >> 1]), f8(i8x8((const uint8_t*)q + 8 * j)));
}

/* Weight i = blk * QK + 8j of the chunk: fl(scale * q), scale ctx[i / G]; or then + or - the
   offset ctx[OFF + i / G]. */
#define VEC_SCALED_AVX2(T, G)                                                                 \
  static inline __m256 vec_##T##_avx2(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) { \
    (void)b;                                                                                  \
    int i = blk * QK_##T + 8 * j;                                                             \
    return _mm256_mul_ps(_mm256_set1_ps(ctx[i / (G)]), f8(i8x8((const uint8_t*)q + i)));      \
  }
#define VEC_OFFSET_AVX2(T, G, OFF, OP)                                                        \
  static inline __m256 vec_##T##_avx2(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) { \
    (void)b;                                                                                  \
    int i = blk * QK_##T + 8 * j;                                                             \
    return OP(_mm256_mul_ps(_mm256_set1_ps(ctx[i / (G)]), f8(i8x8((const uint8_t*)q + i))),   \
              _mm256_set1_ps(ctx[(OFF) + i / (G)]));                                          \
  }
VEC_SCALED_AVX2(q5_0, 32) VEC_OFFSET_AVX2(q5_1, 32, 8, _mm256_add_ps) VEC_SCALED_AVX2(iq4_nl, 32)
VEC_OFFSET_AVX2(q5_k, 32, 8, _mm256_sub_ps) VEC_SCALED_AVX2(q3_k, 16) VEC_OFFSET_AVX2(q2_k, 16, 16, _mm256_sub_ps)
VEC_SCALED_AVX2(iq4_xs, 32)

/* ---- AVX-512: vector j < QK / 16 of block blk of a chunk ---- */

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")

static inline __m512i u8x16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline __m512i i8x16(const uint8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
static inline __m512 f16x(__m512i v) { return _mm512_cvtepi32_ps(v); }
static inline __m512 iota16(void) {
  return _mm512_cvtepi32_ps(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
}

static inline __m512 vec_q8_0_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q;
  return _mm512_mul_ps(f16x(i8x16(b + blk * 34 + 2 + 16 * j)), _mm512_set1_ps(ctx[blk]));
}

static inline __m512 vec_q4_0_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q;
  __m512 table = _mm512_mul_ps(_mm512_set1_ps(ctx[blk]), _mm512_sub_ps(iota16(), _mm512_set1_ps(8.0f)));
  __m512i raw = u8x16(b + blk * 18 + 2);
  return _mm512_permutexvar_ps(j ? _mm512_srli_epi32(raw, 4) : raw, table);
}

static inline __m512 vec_q4_1_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q;
  __m512 table = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(ctx[blk]), iota16()), _mm512_set1_ps(ctx[8 + blk]));
  __m512i raw = u8x16(b + blk * 20 + 4);
  return _mm512_permutexvar_ps(j ? _mm512_srli_epi32(raw, 4) : raw, table);
}

/* weight 16j = 64 * (j / 4) + 16 * (j % 4): nibble (j % 4) / 2 of bytes 32 * (j / 4) + 16 * (j % 2) */
static inline __m512 vec_q4_k_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q, (void)blk;
  int high = (j >> 1) & 1, sub = 2 * (j >> 2) + high;
  __m512 table = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(ctx[sub]), iota16()), _mm512_set1_ps(ctx[8 + sub]));
  __m512i raw = u8x16(b + 16 + 32 * (j >> 2) + 16 * (j & 1));
  return _mm512_permutexvar_ps(high ? _mm512_srli_epi32(raw, 4) : raw, table);
}

static inline __m512 vec_q6_k_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)b, (void)blk;
  return _mm512_mul_ps(_mm512_set1_ps(ctx[j]), f16x(i8x16((const uint8_t*)q + 16 * j)));
}

/* Q5_0 and Q5_1: the 32 values of a block in two tables (q < 16, q >= 16), looked up by 5 bits. */
static inline __m512 q5_avx512(const uint8_t* p, int j, __m512 low_table, __m512 high_table) {
  uint32_t high;
  memcpy(&high, p, 4);
  __m512i raw = u8x16(p + 4);
  __m512i index = j ? _mm512_srli_epi32(raw, 4) : _mm512_and_si512(raw, _mm512_set1_epi32(15));
  index = _mm512_mask_or_epi32(index, (__mmask16)(high >> (16 * j)), index, _mm512_set1_epi32(16));
  return _mm512_permutex2var_ps(low_table, index, high_table);
}

static inline __m512 vec_q5_0_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q;
  __m512 d = _mm512_set1_ps(ctx[blk]);
  __m512 low = _mm512_mul_ps(d, _mm512_sub_ps(iota16(), _mm512_set1_ps(16.0f))), high = _mm512_mul_ps(d, iota16());
  return q5_avx512(b + blk * 22 + 2, j, low, high);
}

static inline __m512 vec_q5_1_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q;
  __m512 d = _mm512_set1_ps(ctx[blk]), m = _mm512_set1_ps(ctx[8 + blk]);
  __m512 low = _mm512_add_ps(_mm512_mul_ps(d, iota16()), m);
  __m512 high = _mm512_add_ps(_mm512_mul_ps(d, _mm512_add_ps(iota16(), _mm512_set1_ps(16.0f))), m);
  return q5_avx512(b + blk * 24 + 4, j, low, high);
}

static inline __m512 vec_iq4_nl_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) {
  (void)q;
  __m512 table = _mm512_mul_ps(_mm512_set1_ps(ctx[blk]), f16x(_mm512_cvtepi8_epi32(iq4_values16())));
  __m512i raw = u8x16(b + blk * 18 + 2);
  return _mm512_permutexvar_ps(j ? _mm512_srli_epi32(raw, 4) : raw, table);
}

#define VEC_SCALED_AVX512(T, G)                                                               \
  static inline __m512 vec_##T##_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) { \
    (void)b;                                                                                  \
    int i = blk * QK_##T + 16 * j;                                                            \
    return _mm512_mul_ps(_mm512_set1_ps(ctx[i / (G)]), f16x(i8x16((const uint8_t*)q + i)));   \
  }
#define VEC_OFFSET_AVX512(T, G, OFF, OP)                                                      \
  static inline __m512 vec_##T##_avx512(const uint8_t* b, const float* ctx, const int8_t* q, int blk, int j) { \
    (void)b;                                                                                  \
    int i = blk * QK_##T + 16 * j;                                                            \
    return OP(_mm512_mul_ps(_mm512_set1_ps(ctx[i / (G)]), f16x(i8x16((const uint8_t*)q + i))), \
              _mm512_set1_ps(ctx[(OFF) + i / (G)]));                                          \
  }
VEC_OFFSET_AVX512(q5_k, 32, 8, _mm512_sub_ps) VEC_SCALED_AVX512(q3_k, 16)
VEC_OFFSET_AVX512(q2_k, 16, 16, _mm512_sub_ps) VEC_SCALED_AVX512(iq4_xs, 32)

#pragma GCC pop_options

/* ---- kernels, written once for both widths with these names (defined before each use): V a
   vector, LD a load, ST a store, FMA, ZERO, HSUM its fixed lane sum, W the lanes, ISA the suffix ---- */

#define GLUE(a, b) GLUE_(a, b) /* pastes after expanding ISA */
#define GLUE_(a, b) a##b

/* Dequantize count blocks to out. */
#define DEQUANT(T)                                                                            \
  static void GLUE(dq_##T##_, ISA)(const uint8_t* b, int64_t count, float* out) {             \
    for (int64_t i = 0; i < count; i += KC / QK_##T) {                                        \
      int blocks = count - i < KC / QK_##T ? (int)(count - i) : KC / QK_##T;                  \
      float ctx[32];                                                                          \
      int8_t q[KC] __attribute__((aligned(32)));                                              \
      const uint8_t* chunk = b + i * BYTES_##T;                                               \
      GLUE(prep_##T##_, ISA)(chunk, blocks, ctx, q);                                         \
      __asm__ volatile("" : : "r"(ctx) : "memory"); /* as in FUSED */                         \
      for (int blk = 0; blk < blocks; ++blk) {                                                \
        _Pragma("GCC unroll 32") for (int j = 0; j < QK_##T / W; ++j)                         \
          ST(out + (i + blk) * QK_##T + j * W, GLUE(vec_##T##_, ISA)(chunk, ctx, q, blk, j)); \
      }                                                                                       \
    }                                                                                         \
  }

/* Outputs go in tiles of 4 rows of w, each a register-blocked MR x 4 block of accumulators.
   Accumulators are named variables, not an array: gcc keeps an array in memory and stores it back
   on every k. */
#define STEP(R)                                                                               \
  {                                                                                           \
    V a = LD(x + (R) * K + k);                                                                \
    c##R##0 = FMA(a, w0, c##R##0);                                                            \
    c##R##1 = FMA(a, w1, c##R##1);                                                            \
    c##R##2 = FMA(a, w2, c##R##2);                                                            \
    c##R##3 = FMA(a, w3, c##R##3);                                                            \
  }
#define STEPS(MR)                                                                             \
  STEP(0)                                                                                     \
  if (MR > 1) STEP(1)                                                                         \
  if (MR > 2) STEP(2)                                                                         \
  if (MR > 3) STEP(3)                                                                         \
  if (MR > 4) STEP(4)                                                                         \
  if (MR > 5) STEP(5)
#define ACCUMULATORS                                                                          \
  V c00 = ZERO(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00; \
  V c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;   \
  V c40 = c00, c41 = c00, c42 = c00, c43 = c00, c50 = c00, c51 = c00, c52 = c00, c53 = c00;
/* One output: (lane sum + bias), then into y (set, or added to the residual). */
#define FINISH1(R, C)                                                                         \
  if ((C) < valid) {                                                                          \
    float v = HSUM(c##R##C);                                                                  \
    if (bias) v += bias[C];                                                                   \
    float* o = y + (R) * ldy + (C);                                                           \
    *o = accumulate ? *o + v : v;                                                             \
  }
#define FINISH(R) { FINISH1(R, 0) FINISH1(R, 1) FINISH1(R, 2) FINISH1(R, 3) }
#define FINISHES(MR)                                                                          \
  FINISH(0)                                                                                   \
  if (MR > 1) FINISH(1)                                                                       \
  if (MR > 2) FINISH(2)                                                                       \
  if (MR > 3) FINISH(3)                                                                       \
  if (MR > 4) FINISH(4)                                                                       \
  if (MR > 5) FINISH(5)

/* A decode or verify pass (MR rows): the 4 rows' weights are dequantized in registers as they
   are multiplied, each vector used for all MR rows (a short last tile repeats its last row). */
#define FUSED(MR, T)                                                                          \
  static void GLUE(fused##MR##_##T##_, ISA)(const float* x, int64_t K, const uint8_t* const* w, \
                                            float* y, int64_t ldy, int valid, const float* bias, \
                                            int accumulate) {                                 \
    ACCUMULATORS                                                                              \
    for (int64_t k0 = 0; k0 < K; k0 += KC) {                                                  \
      int blocks = (int)((K - k0 < KC ? K - k0 : KC) / QK_##T);                               \
      const uint8_t *b0 = w[0] + k0 / QK_##T * BYTES_##T, *b1 = w[1] + k0 / QK_##T * BYTES_##T; \
      const uint8_t *b2 = w[2] + k0 / QK_##T * BYTES_##T, *b3 = w[3] + k0 / QK_##T * BYTES_##T; \
      float ctx0[32], ctx1[32], ctx2[32], ctx3[32];                                           \
      int8_t q0[KC] __attribute__((aligned(32))), q1[KC] __attribute__((aligned(32)));        \
      int8_t q2[KC] __attribute__((aligned(32))), q3[KC] __attribute__((aligned(32)));        \
      GLUE(prep_##T##_, ISA)(b0, blocks, ctx0, q0);                                          \
      GLUE(prep_##T##_, ISA)(b1, blocks, ctx1, q1);                                          \
      GLUE(prep_##T##_, ISA)(b2, blocks, ctx2, q2);                                          \
      GLUE(prep_##T##_, ISA)(b3, blocks, ctx3, q3);                                          \
      /* ctx stays in memory, read by broadcast loads: else gcc keeps it in registers and     \
         broadcasts lanes with shuffles, which compete with the arithmetic for port 5 */      \
      __asm__ volatile("" : : "r"(ctx0), "r"(ctx1), "r"(ctx2), "r"(ctx3) : "memory");         \
      for (int blk = 0; blk < blocks; ++blk) {                                                \
        _Pragma("GCC unroll 32") for (int j = 0; j < QK_##T / W; ++j) {                       \
          int64_t k = k0 + blk * QK_##T + j * W;                                              \
          V w0 = GLUE(vec_##T##_, ISA)(b0, ctx0, q0, blk, j);                                 \
          V w1 = GLUE(vec_##T##_, ISA)(b1, ctx1, q1, blk, j);                                 \
          V w2 = GLUE(vec_##T##_, ISA)(b2, ctx2, q2, blk, j);                                 \
          V w3 = GLUE(vec_##T##_, ISA)(b3, ctx3, q3, blk, j);                                 \
          STEPS(MR)                                                                           \
        }                                                                                     \
      }                                                                                       \
    }                                                                                         \
    FINISHES(MR)                                                                              \
  }

/* More rows (a prompt chunk, a wide batch): the 4 rows dequantized once over all of K into s
   (stride K), then the row tiles over it. Each output is the same chain as in FUSED. */
#define DENSE(MR)                                                                             \
  static void GLUE(dense##MR##_, ISA)(const float* x, int64_t K, const float* s, float* y,    \
                                      int64_t ldy, int valid, const float* bias, int accumulate) { \
    ACCUMULATORS                                                                              \
    for (int64_t k = 0; k < K; k += W) {                                                      \
      V w0 = LD(s + k), w1 = LD(s + K + k), w2 = LD(s + 2 * K + k), w3 = LD(s + 3 * K + k);   \
      STEPS(MR)                                                                               \
    }                                                                                         \
    FINISHES(MR)                                                                              \
  }

typedef void (*dequant_fn)(const uint8_t* blocks, int64_t count, float* out);
typedef void (*fused_fn)(const float*, int64_t, const uint8_t* const*, float*, int64_t, int, const float*, int);
typedef void (*dense_fn)(const float*, int64_t, const float*, float*, int64_t, int, const float*, int);

/* lane sums: ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)) after halving, as widen_linear.c's */
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#define V __m256
#define LD _mm256_loadu_ps
#define ST _mm256_storeu_ps
#define FMA _mm256_fmadd_ps
#define ZERO _mm256_setzero_ps
#define HSUM hsum8
#define W 8
#define ISA avx2
/* 16 registers: fused, 2 rows x 4 outputs of accumulators and 4 weight vectors; dense, the same. */
#define TYPE(T)                                                                               \
  DEQUANT(T) FUSED(1, T) FUSED(2, T)                                                          \
  static const fused_fn fused_##T##_avx2[] = {fused1_##T##_avx2, fused2_##T##_avx2};
TYPE(q8_0) TYPE(q4_0) TYPE(q4_1) TYPE(q4_k) TYPE(q6_k)
TYPE(q5_0) TYPE(q5_1) TYPE(iq4_nl) TYPE(q2_k) TYPE(q3_k) TYPE(q5_k) TYPE(iq4_xs)
DENSE(1) DENSE(2)
static const dense_fn dense_avx2[] = {dense1_avx2, dense2_avx2};
#undef TYPE
#undef V
#undef LD
#undef ST
#undef FMA
#undef ZERO
#undef HSUM
#undef W
#undef ISA

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
static inline float hsum16(__m512 v) {
  __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), high));
}
#define V __m512
#define LD _mm512_loadu_ps
#define ST _mm512_storeu_ps
#define FMA _mm512_fmadd_ps
#define ZERO _mm512_setzero_ps
#define HSUM hsum16
#define W 16
#define ISA avx512
/* 32 registers: fused, up to 3 rows x 4 outputs with the decoding's temporaries; dense, 6 x 4. */
#define TYPE(T)                                                                               \
  DEQUANT(T) FUSED(1, T) FUSED(2, T) FUSED(3, T)                                              \
  static const fused_fn fused_##T##_avx512[] = {fused1_##T##_avx512, fused2_##T##_avx512,     \
                                                fused3_##T##_avx512};
TYPE(q8_0) TYPE(q4_0) TYPE(q4_1) TYPE(q4_k) TYPE(q6_k)
TYPE(q5_0) TYPE(q5_1) TYPE(iq4_nl) TYPE(q2_k) TYPE(q3_k) TYPE(q5_k) TYPE(iq4_xs)
DENSE(1) DENSE(2) DENSE(3) DENSE(4) DENSE(5) DENSE(6)
static const dense_fn dense_avx512[] = {dense1_avx512, dense2_avx512, dense3_avx512,
                                        dense4_avx512, dense5_avx512, dense6_avx512};
#undef TYPE
#undef V
#undef LD
#undef ST
#undef FMA
#undef ZERO
#undef HSUM
#undef W
#undef ISA
#pragma GCC pop_options

/* ---- dispatch ---- */

/* Up to fused_rows rows of x (3 with AVX-512, 2 with AVX2: the accumulators and the decoding's
   temporaries fill the registers) the weights are decoded in registers (FUSED); from there on
   decoding each tile's rows once into a buffer (DENSE) measured faster than decoding them again
   for every tile of rows. At 4 rows with AVX-512, a 4-row pass of SmolLM2-135M's Q4_1 file cost
   1.61-1.68x its decode step fused and 1.35x dense (scripts/width_costs.py, AMD EPYC). */
struct variant {
  dequant_fn dequantize;
  const fused_fn* fused;  /* by rows - 1, up to fused_rows */
  const dense_fn* dense;  /* by rows - 1, up to dense_rows */
  int fused_rows, dense_rows;
};

struct qtype {
  int qk, bytes;
  struct variant avx2, avx512;
};

#define QTYPE(T)                                                                              \
  {QK_##T, BYTES_##T, {dq_##T##_avx2, fused_##T##_avx2, dense_avx2, 2, 2},                    \
   {dq_##T##_avx512, fused_##T##_avx512, dense_avx512, 3, 6}}

static const struct qtype* qtype_of(int type) {
  static const struct qtype q4_0 = QTYPE(q4_0), q4_1 = QTYPE(q4_1), q8_0 = QTYPE(q8_0);
  static const struct qtype q4_k = QTYPE(q4_k), q6_k = QTYPE(q6_k);
  static const struct qtype q5_0 = QTYPE(q5_0), q5_1 = QTYPE(q5_1), iq4_nl = QTYPE(iq4_nl);
  static const struct qtype q2_k = QTYPE(q2_k), q3_k = QTYPE(q3_k), q5_k = QTYPE(q5_k), iq4_xs = QTYPE(iq4_xs);
  switch (type) {
    case Q4_0: return &q4_0;
    case Q4_1: return &q4_1;
    case Q8_0: return &q8_0;
    case Q4_K: return &q4_k;
    case Q6_K: return &q6_k;
    case Q5_0: return &q5_0;
    case Q5_1: return &q5_1;
    case IQ4_NL: return &iq4_nl;
    case Q2_K: return &q2_k;
    case Q3_K: return &q3_k;
    case Q5_K: return &q5_k;
    case IQ4_XS: return &iq4_xs;
    default: return NULL;
  }
}

/* 16 where the CPU has AVX-512 (F, BW, VL), else 8; quant_set_lanes can force 8 (tests). */
static int lanes_in_use = 0;

static int best_lanes(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
             ? 16
             : 8;
}

/* lanes 0: the best this CPU has; 8: AVX2; 16: AVX-512 where the CPU has it; other values only
   ask. Returns the lanes now in use. Not to be called while a kernel runs. */
int quant_set_lanes(int lanes) {
  if (lanes == 0 || (lanes == 16 && best_lanes() == 16)) lanes_in_use = best_lanes();
  else if (lanes == 8) lanes_in_use = 8;
  else if (lanes_in_use == 0) lanes_in_use = best_lanes();
  return lanes_in_use;
}

static inline const struct variant* variant_of(const struct qtype* t) {
  return (lanes_in_use ? lanes_in_use : quant_set_lanes(0)) == 16 ? &t->avx512 : &t->avx2;
}

int quant_dequantize(int type, const uint8_t* w, int64_t rows, int64_t K, float* out) {
  const struct qtype* t = qtype_of(type);
  if (!t || K % t->qk) return -1;
  dequant_fn dq = variant_of(t)->dequantize;
  int64_t blocks = K / t->qk;
  #pragma omp parallel for schedule(static) if (rows * K >= (1 << 20))
  for (int64_t r = 0; r < rows; ++r) dq(w + r * blocks * t->bytes, blocks, out + r * K);
  return 0;
}

int quant_rows(int type, const uint8_t* w, int64_t K, const int64_t* ids, int64_t n, float* out) {
  const struct qtype* t = qtype_of(type);
  if (!t || K % t->qk) return -1;
  dequant_fn dq = variant_of(t)->dequantize;
  int64_t blocks = K / t->qk;
  for (int64_t i = 0; i < n; ++i) dq(w + ids[i] * blocks * t->bytes, blocks, out + i * K);
  return 0;
}

/* The per-thread buffer of a tile's rows over all of K; OpenMP's threads live on, so it is kept,
   and freed when its thread ends (a caller's thread may not live on). NULL: out of memory, or a
   size that does not fit size_t; the tests build with -DVS_NO_SCRATCH to take that path. */
static __thread float* tile_rows;
static __thread int64_t tile_rows_size;
static pthread_key_t tile_rows_key;
static int tile_rows_keyed; /* the key exists: its destructor frees a thread's buffer */
static pthread_once_t tile_rows_once = PTHREAD_ONCE_INIT;

static void make_tile_rows_key(void) { tile_rows_keyed = pthread_key_create(&tile_rows_key, free) == 0; }

static float* rows_buffer(int64_t floats) {
  if (floats > tile_rows_size) {
    free(tile_rows);
    tile_rows = NULL;
    tile_rows_size = 0;
#ifndef VS_NO_SCRATCH
    if (floats > 0 && floats <= (int64_t)((SIZE_MAX - 63) / sizeof(float)))
      tile_rows = aligned_alloc(64, ((size_t)floats * sizeof(float) + 63) / 64 * 64);
#endif
    tile_rows_size = tile_rows ? floats : 0;
    pthread_once(&tile_rows_once, make_tile_rows_key);
    if (tile_rows_keyed) pthread_setspecific(tile_rows_key, tile_rows);
  }
  return tile_rows;
}

/* The team body (team.h) of quant_linear: the tiles of 4 outputs shared out; a tile out of memory
   sets shared->failed. */
int quant_team(int type, const float* x, int64_t M, const uint8_t* w, int64_t N, int64_t K, const float* bias,
               float* y, int64_t ldy, int accumulate, vs_shared* shared) {
  const struct qtype* t = qtype_of(type);
  if (!t || K % t->qk) return -1;
  if (M <= 0 || N <= 0) return 0;
  const struct variant* v = variant_of(t);
  int64_t tiles = (N + 3) / 4, row_bytes = K / t->qk * t->bytes;
  #pragma omp for schedule(guided)
  for (int64_t p = 0; p < tiles; ++p) {
    int64_t n = p * 4;
    int valid = N - n < 4 ? (int)(N - n) : 4;
    const uint8_t* rows[4];
    for (int c = 0; c < 4; ++c) rows[c] = w + (n + (c < valid ? c : valid - 1)) * row_bytes;
    const float* b = bias ? bias + n : NULL;
    if (M <= v->fused_rows) {
      v->fused[M - 1](x, K, rows, y + n, ldy, valid, b, accumulate);
      continue;
    }
    float* s = rows_buffer(4 * K);
    if (!s) {  // out of memory: -2, this tile not written
      #pragma omp atomic write
      shared->failed = -2;
      continue;
    }
    for (int c = 0; c < 4; ++c) v->dequantize(rows[c], K / t->qk, s + c * K);
    for (int64_t m = 0; m < M; m += v->dense_rows) {
      int64_t r = M - m < v->dense_rows ? M - m : v->dense_rows;
      v->dense[r - 1](x + m * K, K, s, y + m * ldy + n, ldy, valid, b, accumulate);
    }
  }
  return 0;
}

/* y (M rows, ldy apart) = x @ w^T (+ bias), or += it. 0; -1 for a type it lacks (or K not a whole
   number of its blocks), nothing written; -2 out of memory for a pass of more than the fused
   rows, the tiles that ran out not written (kernels.py: kernel_error). */
int quant_linear(int type, const float* x, int64_t M, const uint8_t* w, int64_t N, int64_t K, const float* bias,
                 float* y, int64_t ldy, int accumulate, int threads) {
  const struct qtype* t = qtype_of(type);
  if (!t || K % t->qk) return -1;
  vs_shared shared = {0, NULL};
  VS_TEAM(threads, quant_team(type, x, M, w, N, K, bias, y, ldy, accumulate, &shared));
  return shared.failed;
}
