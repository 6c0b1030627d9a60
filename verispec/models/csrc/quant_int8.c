/* y = x @ w^T (+ bias) for GGUF block-quantized weights w and activations x quantized to 8 bits:
   the numeric model of `--activations q8`, as llama.cpp runs its quantized models.

   Activations. Each row of x is quantized per block of 32 values: d = max|x| / 127 and q = x / d
   rounded to the nearest integer, ties to even (llama.cpp's Q8_0, d kept in float32).

   Weights, repacked once at load (quant_q8_pack). Every type is decoded by the float path's preps
   (quant_blocks.h) into small integers and per-group floats: w = s * q, or s * q + m for the types
   with mins, a group being the 32 (or, for Q2_K, Q3_K and Q6_K, 16) weights sharing s. The rows of
   w are then interleaved 8 at a time: per tile of 8 rows and per group, the 8 rows' s (float32),
   their m where the type has mins, then the integers, 32 bytes per 4 columns (row r's 4 values at
   bytes 4r..4r+3): as bytes, or for the 4-bit types (Q4_0, Q4_1, Q4_K) as nibbles, two runs of 4
   columns in one 32 bytes. So one 32-byte load feeds a vector of 8 outputs, and llama.cpp's
   repack buffers (its q4_0 8x8 GEMV/GEMM) are the model: the arithmetic is per 8 outputs at once,
   not per output, and no lane sum is left at the end.

   Arithmetic. For each group and each output, the dot product of the group's integers with the
   row's quantized activations is exact in int32 (AVX-512 VNNI's vpdpbusd on bytes offset by 128 or
   on nibbles, or AVX2's maddubs + madd on |q| and x signed as q, which give the same integers);
   then, in that output's lane,
       acc = fma(float(dot), s * d_x, acc)          and, with mins,
       acc = fma(m, d_x * sum(q_x of the group), acc)
   over the groups in ascending order, then the bias, then the residual. Those are the same
   operations whatever the number of rows M, the tile, the thread, the thread count or the
   instruction set, so a position's logits are the same bits decoded alone, verified among k+1
   positions or batched: width and batch invariance by construction.

   It changes the model's numerics (the activations lose bits), which is why it is a choice the
   user makes (ModelSettings.activations) and sees in the model's identity, never a default.
   Built with the other sources by verispec/models/kernels.py; the VNNI functions are compiled for
   that target only (GCC target pragma) and called only where the CPU has it. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant_blocks.h"
#include "team.h"
#include "verispec_kernels.h"

/* ---- weights as integers: the types whose float-path prep leaves q empty decode it here ---- */

static inline void iprep_q8_0(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  prep_q8_0(b, blocks, ctx, q);
  for (int blk = 0; blk < blocks; ++blk)
    _mm256_storeu_si256((__m256i*)(q + 32 * blk), _mm256_loadu_si256((const __m256i*)(b + 34 * blk + 2)));
}

static inline void iprep_q4_0(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  prep_q4_0(b, blocks, ctx, q);
  for (int blk = 0; blk < blocks; ++blk)
    _mm256_storeu_si256((__m256i*)(q + 32 * blk), _mm256_sub_epi8(nibbles32(b + 18 * blk + 2), _mm256_set1_epi8(8)));
}

static inline void iprep_q4_1(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  prep_q4_1(b, blocks, ctx, q);
  for (int blk = 0; blk < blocks; ++blk) _mm256_storeu_si256((__m256i*)(q + 32 * blk), nibbles32(b + 20 * blk + 4));
}

/* sub-block 2j in the low nibbles of bytes 16 + 32j.., 2j + 1 in their high nibbles */
static inline void iprep_q4_k(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  prep_q4_k(b, blocks, ctx, q);
  const __m256i nibble = _mm256_set1_epi8(0x0f);
  for (int j = 0; j < 4; ++j) {
    __m256i raw = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * j));
    _mm256_storeu_si256((__m256i*)(q + 64 * j), _mm256_and_si256(raw, nibble));
    _mm256_storeu_si256((__m256i*)(q + 64 * j + 32), _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble));
  }
}

#define iprep_q5_0 prep_q5_0_avx2
#define iprep_q5_1 prep_q5_1_avx2
#define iprep_iq4_nl prep_iq4_nl_avx2
#define iprep_q2_k prep_q2_k
#define iprep_q3_k prep_q3_k
#define iprep_q5_k prep_q5_k
#define iprep_q6_k prep_q6_k
#define iprep_iq4_xs prep_iq4_xs


/* ---- the repacked formats ---- */

typedef void (*prep_fn)(const uint8_t* b, int blocks, float* ctx, int8_t* q);

/* Per type: its prep; G, the weights sharing a scale (ctx[i / G] for weight i of a chunk); mins,
   where they start in ctx (ctx[mins + i / G]), or -1 without; negative, whether w = s * q - m;
   nibble, the offset of its 4-bit integers (stored as q + nibble - 1 in 4 bits), or 0 for bytes;
   half, whether its scales and mins are the file's float16 values, kept in 16 bits (the bytes a
   decode streams are then the file's), else products of them, kept in float32. */
struct format {
  int type, qk, bytes;
  prep_fn prep;
  int group, mins, negative, nibble, half;
};

static const struct format formats[] = {
  {Q8_0, QK_q8_0, BYTES_q8_0, iprep_q8_0, 32, -1, 0, 0, 1},
  {Q4_0, QK_q4_0, BYTES_q4_0, iprep_q4_0, 32, -1, 0, 9, 1},
  {Q4_1, QK_q4_1, BYTES_q4_1, iprep_q4_1, 32, 8, 0, 1, 1},
  {Q5_0, QK_q5_0, BYTES_q5_0, iprep_q5_0, 32, -1, 0, 0, 1},
  {Q5_1, QK_q5_1, BYTES_q5_1, iprep_q5_1, 32, 8, 0, 0, 1},
  {IQ4_NL, QK_iq4_nl, BYTES_iq4_nl, iprep_iq4_nl, 32, -1, 0, 0, 1},
  {Q2_K, QK_q2_k, BYTES_q2_k, iprep_q2_k, 16, 16, 1, 0, 0},
  {Q3_K, QK_q3_k, BYTES_q3_k, iprep_q3_k, 16, -1, 0, 0, 0},
  {Q4_K, QK_q4_k, BYTES_q4_k, iprep_q4_k, 32, 8, 1, 1, 0},
  {Q5_K, QK_q5_k, BYTES_q5_k, iprep_q5_k, 32, 8, 1, 0, 0},
  {Q6_K, QK_q6_k, BYTES_q6_k, iprep_q6_k, 16, -1, 0, 0, 0},
  {IQ4_XS, QK_iq4_xs, BYTES_iq4_xs, iprep_iq4_xs, 32, -1, 0, 0, 0},
};

static const struct format* format_of(int type) {
  for (size_t i = 0; i < sizeof formats / sizeof formats[0]; ++i)
    if (formats[i].type == type) return formats + i;
  return NULL;
}

/* Bytes of one group of a tile: the 8 scales, the 8 mins, the integers. */
static inline int64_t group_bytes(const struct format* f) {
  int floats = f->half ? 16 : 32;
  return floats + (f->mins >= 0 ? floats : 0) + (f->nibble ? 4 : 8) * f->group;
}

int64_t quant_q8_packed_bytes(int type, int64_t N, int64_t K) {
  const struct format* f = format_of(type);
  if (!f || K % f->qk || N <= 0) return 0;
  return (N + 7) / 8 * (K / f->group) * group_bytes(f);
}

/* w (N rows of K in the GGUF layout) repacked into out (quant_q8_packed_bytes); rows past N in the
   last tile repeat row N - 1 (their outputs are never written). 0, or VS_ERROR_UNSUPPORTED. */
int quant_q8_pack(int type, const uint8_t* w, int64_t N, int64_t K, uint8_t* out) {
  const struct format* f = format_of(type);
  if (!f || K % f->qk || N <= 0) return VS_ERROR_UNSUPPORTED;
  int64_t row_bytes = K / f->qk * f->bytes, gbytes = group_bytes(f), groups = K / f->group;
  int G = f->group;
  memset(out, 0, (size_t)quant_q8_packed_bytes(type, N, K));
  for (int64_t t = 0; t < (N + 7) / 8; ++t)
    for (int r = 0; r < 8; ++r) {
      int64_t n = t * 8 + r < N ? t * 8 + r : N - 1;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        int blocks = (int)((K - k0 < KC ? K - k0 : KC) / f->qk);
        float ctx[32];
        int8_t q[KC] __attribute__((aligned(32)));
        f->prep(w + n * row_bytes + k0 / f->qk * f->bytes, blocks, ctx, q);
        for (int i = 0; i < blocks * f->qk; i += G) {
          uint8_t* p = out + (t * groups + (k0 + i) / G) * gbytes;
          float scale = ctx[i / G], min = f->mins >= 0 ? ctx[f->mins + i / G] : 0.0f;
          int floats = f->half ? 16 : 32;
          if (f->half) { /* float16 values widened by the prep: exact back in 16 bits */
            uint16_t h = _cvtss_sh(scale, 0), m = _cvtss_sh(f->negative ? -min : min, 0);
            memcpy(p + 2 * r, &h, 2);
            if (f->mins >= 0) memcpy(p + floats + 2 * r, &m, 2);
          } else {
            memcpy(p + 4 * r, &scale, 4);
            if (f->mins >= 0) ((float*)(p + floats))[r] = f->negative ? -min : min;
          }
          uint8_t* v = p + (f->mins >= 0 ? 2 * floats : floats);
          for (int c = 0; c < G; ++c) {
            int quad = c / 4, at = 4 * r + c % 4;
            if (f->nibble)  /* quads 0..3 in the low nibbles of runs 0..3, quads 4..7 in their high */
              v[32 * (quad % 4) + at] |= (uint8_t)(((q[i + c] + f->nibble - 1) & 15) << (4 * (quad / 4)));
            else
              v[32 * quad + at] = (uint8_t)q[i + c];
          }
        }
      }
    }
  return 0;
}

/* ---- activations ---- */

/* x's rows quantized: q (M x K int8), d (per 32: the scale), and per group of G, s (the sum of
   its q, int32) and ds (d * s, float). One allocation, freed with q. */
typedef struct {
  int8_t* q;
  float* d;
  int32_t* s;
  float* ds;
} acts_t;

static int quantize_rows(const float* x, int64_t M, int64_t K, int G, acts_t* a) {
  size_t n = (size_t)(M * K), groups = n / (size_t)G;
  char* memory = malloc(n + n / 32 * sizeof(float) + groups * (sizeof(int32_t) + sizeof(float)));
  if (!memory) return VS_ERROR_NO_MEMORY;
  a->q = (int8_t*)memory;
  a->d = (float*)(memory + n);
  a->s = (int32_t*)(a->d + n / 32);
  a->ds = (float*)(a->s + groups);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (size_t b = 0; b < n / 32; ++b) {
    const float* v = x + 32 * b;
    __m256 x0 = _mm256_loadu_ps(v), x1 = _mm256_loadu_ps(v + 8), x2 = _mm256_loadu_ps(v + 16),
           x3 = _mm256_loadu_ps(v + 24);
    __m256 top = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, x0), _mm256_andnot_ps(sign, x1)),
                               _mm256_max_ps(_mm256_andnot_ps(sign, x2), _mm256_andnot_ps(sign, x3)));
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    t = _mm_max_ss(t, _mm_movehdup_ps(t));
    float amax = _mm_cvtss_f32(t), d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    __m256 scale = _mm256_set1_ps(id);
    /* round to nearest, ties to even (the default rounding mode), then pack to bytes in order */
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(x0, scale)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(x1, scale));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(x2, scale)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(x3, scale));
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i*)(a->q + 32 * b), packed);
    a->d[b] = d;
    for (int g = 0; g < 32 / G; ++g) {
      int32_t sum = 0;
      for (int i = 0; i < G; ++i) sum += a->q[32 * b + G * g + i];
      a->s[32 / G * b + g] = sum;
      a->ds[32 / G * b + g] = d * (float)sum;
    }
  }
  return 0;
}

/* ---- kernels: one tile of 8 outputs over MR rows of x, written once for both instruction sets
   with these defined before each use: BYTES(acc, w, x) and NIBBLES(acc, u, x) add a quad's exact
   dot products to acc; PREPARE(w) readies a quad of byte integers for BYTES; OFFSET, the value
   BYTES' integers are offset by (the dot products then exceed the true ones by OFFSET * s) ---- */

typedef void (*tile_fn)(const acts_t*, int64_t, int64_t, const uint8_t*, int, float*, int64_t, int, const float*, int);

/* MR rows from row m of the activations; G, MINS, NIBBLE and HALF compile-time constants. */
#define FLOATS(HALF, p) ((HALF) ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p))) : _mm256_loadu_ps((const float*)(p)))
#define TILE_BODY(MR, G, MINS, NIBBLE, HALF)                                                  \
  {                                                                                           \
    __m256 acc[8];                                                                            \
    for (int r = 0; r < (MR); ++r) acc[r] = _mm256_setzero_ps();                              \
    const int floats = (HALF) ? 16 : 32;                                                      \
    const int64_t groups = K / (G), gbytes = floats * ((MINS) ? 2 : 1) + ((NIBBLE) ? 4 : 8) * (G); \
    const int8_t* xq = a->q + m * K;                                                          \
    const int offset = (NIBBLE) ? nibble_offset : OFFSET;                                     \
    for (int64_t b = 0; b < groups; ++b) {                                                    \
      const uint8_t* p = tile + b * gbytes;                                                   \
      const uint8_t* v = p + floats * ((MINS) ? 2 : 1);                                       \
      const int64_t k = b * (G);                                                              \
      __m256i dot[8];                                                                         \
      for (int r = 0; r < (MR); ++r) dot[r] = _mm256_setzero_si256();                         \
      if (NIBBLE) {                                                                           \
        _Pragma("GCC unroll 4") for (int c = 0; c < 4; ++c) {                                 \
          __m256i raw = _mm256_loadu_si256((const __m256i*)(v + 32 * c));                     \
          __m256i low = _mm256_and_si256(raw, _mm256_set1_epi8(15));                          \
          __m256i high = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(15));   \
          _Pragma("GCC unroll 8") for (int r = 0; r < (MR); ++r) {                            \
            const int8_t* x = xq + r * K + k;                                                 \
            dot[r] = NIBBLES(dot[r], low, _mm256_set1_epi32(*(const int32_t*)(x + 4 * c)));   \
            dot[r] = NIBBLES(dot[r], high, _mm256_set1_epi32(*(const int32_t*)(x + 4 * c + 16))); \
          }                                                                                   \
        }                                                                                     \
      } else {                                                                                \
        _Pragma("GCC unroll 8") for (int j = 0; j < (G) / 4; ++j) {                           \
          __m256i w = PREPARE(_mm256_loadu_si256((const __m256i*)(v + 32 * j)));              \
          _Pragma("GCC unroll 8") for (int r = 0; r < (MR); ++r)                              \
            dot[r] = BYTES(dot[r], w, _mm256_set1_epi32(*(const int32_t*)(xq + r * K + k + 4 * j))); \
        }                                                                                     \
      }                                                                                       \
      __m256 scale = FLOATS(HALF, p), mins = (MINS) ? FLOATS(HALF, p + floats) : scale;       \
      _Pragma("GCC unroll 8") for (int r = 0; r < (MR); ++r) {                                \
        int64_t row = m + r;                                                                  \
        __m256i exact = offset ? _mm256_sub_epi32(dot[r], _mm256_set1_epi32(offset * a->s[row * groups + b])) : dot[r]; \
        __m256 sd = _mm256_mul_ps(scale, _mm256_set1_ps(a->d[row * (K / 32) + k / 32]));      \
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact), sd, acc[r]);                      \
        if (MINS) acc[r] = _mm256_fmadd_ps(mins, _mm256_set1_ps(a->ds[row * groups + b]), acc[r]); \
      }                                                                                       \
    }                                                                                         \
    for (int r = 0; r < (MR); ++r) {                                                          \
      float out[8], *o = y + r * ldy;                                                         \
      _mm256_storeu_ps(out, acc[r]);                                                          \
      for (int c = 0; c < valid; ++c) {                                                       \
        float value = bias ? out[c] + bias[c] : out[c];                                       \
        o[c] = accumulate ? o[c] + value : value;                                             \
      }                                                                                       \
    }                                                                                         \
  }

#define TILE(ISA, MR, NAME, G, MINS, NIBBLE, HALF)                                            \
  static void ISA##_##NAME##_##MR(const acts_t* a, int64_t m, int64_t K, const uint8_t* tile, int nibble_offset, \
                                  float* y, int64_t ldy, int valid, const float* bias, int accumulate) \
  TILE_BODY(MR, G, MINS, NIBBLE, HALF)
/* The variants: 4-bit integers (G 32) or bytes (G 32 or 16), with or without mins, with
   float16 or float32 scales; each for 1 to 8 rows (AVX2's 16 registers hold the accumulators
   of 4, AVX-512's 32 those of 8: quant_linear_q8 takes tiles of that many rows). */
#define VARIANT(ISA, NAME, G, MINS, NIBBLE, HALF)                                             \
  TILE(ISA, 1, NAME, G, MINS, NIBBLE, HALF) TILE(ISA, 2, NAME, G, MINS, NIBBLE, HALF)         \
  TILE(ISA, 3, NAME, G, MINS, NIBBLE, HALF) TILE(ISA, 4, NAME, G, MINS, NIBBLE, HALF)         \
  TILE(ISA, 5, NAME, G, MINS, NIBBLE, HALF) TILE(ISA, 6, NAME, G, MINS, NIBBLE, HALF)         \
  TILE(ISA, 7, NAME, G, MINS, NIBBLE, HALF) TILE(ISA, 8, NAME, G, MINS, NIBBLE, HALF)
#define ROWS_OF(ISA, NAME)                                                                    \
  {ISA##_##NAME##_1, ISA##_##NAME##_2, ISA##_##NAME##_3, ISA##_##NAME##_4,                    \
   ISA##_##NAME##_5, ISA##_##NAME##_6, ISA##_##NAME##_7, ISA##_##NAME##_8}
#define VARIANTS(ISA)                                                                         \
  VARIANT(ISA, nibbles, 32, 0, 1, 0) VARIANT(ISA, nibbles_mins, 32, 1, 1, 0)                  \
  VARIANT(ISA, bytes32, 32, 0, 0, 0) VARIANT(ISA, bytes32_mins, 32, 1, 0, 0)                  \
  VARIANT(ISA, bytes16, 16, 0, 0, 0) VARIANT(ISA, bytes16_mins, 16, 1, 0, 0)                  \
  VARIANT(ISA, half_nibbles, 32, 0, 1, 1) VARIANT(ISA, half_nibbles_mins, 32, 1, 1, 1)        \
  VARIANT(ISA, half_bytes32, 32, 0, 0, 1) VARIANT(ISA, half_bytes32_mins, 32, 1, 0, 1)        \
  static const tile_fn ISA##_tiles[10][8] = {                                                 \
    ROWS_OF(ISA, nibbles), ROWS_OF(ISA, nibbles_mins), ROWS_OF(ISA, bytes32), ROWS_OF(ISA, bytes32_mins), \
    ROWS_OF(ISA, bytes16), ROWS_OF(ISA, bytes16_mins), ROWS_OF(ISA, half_nibbles), ROWS_OF(ISA, half_nibbles_mins), \
    ROWS_OF(ISA, half_bytes32), ROWS_OF(ISA, half_bytes32_mins),                              \
  };

/* AVX2: maddubs takes unsigned times signed bytes, and its 16-bit pair sums must not saturate:
   bytes go as |q| times x signed as q (at most 2 * 128 * 127), nibbles as they are. */
static inline __m256i sum_pairs(__m256i pairs) { return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)); }
#define PREPARE(w) (w)
#define BYTES(acc, w, x) _mm256_add_epi32(acc, sum_pairs(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))))
#define NIBBLES(acc, u, x) _mm256_add_epi32(acc, sum_pairs(_mm256_maddubs_epi16(u, x)))
#define OFFSET 0
VARIANTS(avx2)
#undef PREPARE
#undef BYTES
#undef NIBBLES
#undef OFFSET

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
/* VNNI: one instruction a quad; bytes offset by 128 to be unsigned (q ^ 0x80 = q + 128). */
#define PREPARE(w) _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80))
#define BYTES(acc, w, x) _mm256_dpbusd_epi32(acc, w, x)
#define NIBBLES(acc, u, x) _mm256_dpbusd_epi32(acc, u, x)
#define OFFSET 128
VARIANTS(vnni)
#undef PREPARE
#undef BYTES
#undef NIBBLES
#undef OFFSET
#pragma GCC pop_options

/* ---- dispatch ---- */

/* 512 where the CPU has AVX-512 VNNI (with VL), else 2 (AVX2); quant_q8_isa(2) forces AVX2 (tests). */
static int isa_in_use = 0;

int quant_q8_isa(int isa) {
  int best = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") ? 512 : 2;
  isa_in_use = isa == 2 ? 2 : best;
  return isa_in_use;
}

/* The team body (team.h) of quant_linear_q8: one thread quantizes the rows into shared->acts, then
   the tiles of 8 outputs are shared out; out of memory sets shared->failed, and nothing is written. */
int quant_q8_team(int type, const float* x, int64_t M, const uint8_t* packed, int64_t N, int64_t K,
                  const float* bias, float* y, int64_t ldy, int accumulate, vs_shared* shared) {
  const struct format* f = format_of(type);
  if (!f || K % f->qk) return VS_ERROR_UNSUPPORTED;
  if (M <= 0 || N <= 0) return 0;
  #pragma omp single
  {
    acts_t* made = malloc(sizeof(acts_t));
    if (made && quantize_rows(x, M, K, f->group, made)) {
      free(made);
      made = NULL;
    }
    if (!made) shared->failed = VS_ERROR_NO_MEMORY;
    shared->acts = made;
    if (!isa_in_use) quant_q8_isa(0);
  } /* its barrier: every thread sees acts (or the failure) */
  const acts_t* a = shared->acts;
  if (!a) return 0;
  int variant = (f->nibble ? 0 : f->group == 32 ? 2 : 4) + (f->mins >= 0) + (f->half ? 6 : 0);
  const tile_fn* tiles = (isa_in_use == 512 ? vnni_tiles : avx2_tiles)[variant];
  int64_t tile_bytes = K / f->group * group_bytes(f), most = isa_in_use == 512 ? 8 : 4;
  int nibble_offset = f->nibble - 1;
  #pragma omp for schedule(guided)
  for (int64_t t = 0; t < (N + 7) / 8; ++t) {
    int valid = N - 8 * t < 8 ? (int)(N - 8 * t) : 8;
    for (int64_t m = 0; m < M; m += most) {
      int rows = M - m < most ? (int)(M - m) : (int)most;
      tiles[rows - 1](a, m, K, packed + t * tile_bytes, nibble_offset, y + m * ldy + 8 * t, ldy, valid,
                      bias ? bias + 8 * t : NULL, accumulate);
    }
  } /* its barrier: every tile is done with acts */
  #pragma omp single nowait
  {
    free(a->q);
    free((void*)a);
  }
  return 0;
}

/* y (M rows, ldy apart) = q8(x) @ w^T (+ bias), or += it, w as quant_q8_pack left it. 0;
   VS_ERROR_UNSUPPORTED for a type it lacks (or K not a whole number of its blocks), nothing
   written; VS_ERROR_NO_MEMORY. */
int quant_linear_q8(int type, const float* x, int64_t M, const uint8_t* packed, int64_t N, int64_t K,
                    const float* bias, float* y, int64_t ldy, int accumulate, int threads) {
  const struct format* f = format_of(type);
  if (!f || K % f->qk) return VS_ERROR_UNSUPPORTED;
  vs_shared shared = {0, NULL};
  VS_TEAM(threads, quant_q8_team(type, x, M, packed, N, K, bias, y, ldy, accumulate, &shared));
  return shared.failed;
}
