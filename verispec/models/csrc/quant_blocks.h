/* GGUF block formats as the quantized kernels read them: the GGML type ids, each type's block
   size and bytes, and per type a "prep" that decodes a chunk of KC weights of one row into its
   per-block floats (ctx: scales, mins) and, for the types that need it, its weights as small
   integers (q). quant_linear.c (float activations) and quant_int8.c (8-bit activations) both
   decode through these, so the two numeric paths read every block the same way. Static inline:
   each source that includes this header compiles its own copy for its own targets. */

#ifndef VERISPEC_QUANT_BLOCKS_H
#define VERISPEC_QUANT_BLOCKS_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* GGML type ids. A row of K weights is K / QK blocks of BYTES bytes each. */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14,
       IQ4_NL = 20, IQ4_XS = 23 };
#define QK_q8_0 32
#define QK_q4_0 32
#define QK_q4_1 32
#define QK_q4_k 256
#define QK_q6_k 256
#define BYTES_q8_0 34
#define BYTES_q4_0 18
#define BYTES_q4_1 20
#define BYTES_q4_k 144
#define BYTES_q6_k 210
#define QK_q5_0 32
#define QK_q5_1 32
#define QK_iq4_nl 32
#define QK_q2_k 256
#define QK_q3_k 256
#define QK_q5_k 256
#define QK_iq4_xs 256
#define BYTES_q5_0 22
#define BYTES_q5_1 24
#define BYTES_iq4_nl 18
#define BYTES_q2_k 84
#define BYTES_q3_k 110
#define BYTES_q5_k 176
#define BYTES_iq4_xs 136

/* Weights are decoded in chunks of KC = 256 (8 blocks of 32, or one of 256). For a chunk, prep_T
   computes the per-block floats (scales, mins: 32 at most) into ctx and, for Q6_K, the 6-bit
   values as bytes into q; then vec_T_ISA gives vector j of block blk of the chunk, in registers. */
#define KC 256

/* Exactness. numpy computes Q8_0 fl(q * d), Q4_0 fl(d * (q - 8)), Q4_1 fl(fl(d * q) + m), Q4_K
   fl(fl(fl(d * sc) * q) - fl(dmin * m)), Q6_K fl(fl(d * sc) * q), with d, dmin, m float16 (11
   significant bits) and q, sc small integers. The same operations are done here on the same
   values, so the results are numpy's. Every product is exact in float32 (at most 11 + 6 + 4 bits
   for Q4_K, 11 + 7 + 5 for Q6_K: |sc| <= 128 and |q| <= 32 are powers of two at the top), so only
   Q4_1's add and Q4_K's subtract round, once, and a multiply fused with them rounds the same (gcc
   contracts even _mm256_mul_ps + _mm256_add_ps into an FMA under -mfma; it does here). A 4-bit
   weight takes one of 16 values per block or sub-block: with AVX-512 those 16 are computed with
   numpy's operations into a table and each weight is a lookup (vpermps; it reads the low 4 bits
   of each lane, so a low nibble needs no mask). */

static inline uint64_t half_bits(const uint8_t* p) {
  uint16_t h;
  memcpy(&h, p, sizeof h);
  return h;
}

/* The float16 at first + i * stride, i < count <= 8, as float32 into out[i]. */
static inline void halves8(const uint8_t* first, int stride, int count, float* out) {
  __m128i h;
  if (count == 8) {  // a whole chunk: packed in two 64-bit registers by scalar shifts (ports the
                     // vector arithmetic leaves free), not a stack array gcc merges and reloads
    uint64_t lo = half_bits(first) | half_bits(first + stride) << 16 | half_bits(first + 2 * stride) << 32 |
                  half_bits(first + 3 * stride) << 48;
    uint64_t hi = half_bits(first + 4 * stride) | half_bits(first + 5 * stride) << 16 |
                  half_bits(first + 6 * stride) << 32 | half_bits(first + 7 * stride) << 48;
    h = _mm_set_epi64x((long long)hi, (long long)lo);
  } else {
    uint16_t part[8] = {0};
    for (int i = 0; i < count && i < 8; ++i) memcpy(part + i, first + i * stride, 2);
    h = _mm_loadu_si128((const __m128i*)part);
  }
  _mm256_storeu_ps(out, _mm256_cvtph_ps(h));
}

static inline __m256i u8x8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline __m256i i8x8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
static inline __m256 f8(__m256i v) { return _mm256_cvtepi32_ps(v); }

/* Q8_0 (34 bytes): float16 d, 32 int8 q. ctx: the blocks' d. */
static inline void prep_q8_0(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)q;
  halves8(b, 34, blocks, ctx);
}

/* Q4_0 (18 bytes): float16 d, 16 bytes: weight j < 16 in the low nibble of byte j, 16 + j in its
   high nibble. ctx: the blocks' d. */
static inline void prep_q4_0(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)q;
  halves8(b, 18, blocks, ctx);
}

/* Q4_1 (20 bytes): float16 d and m, then nibbles as Q4_0's, unsigned. ctx: d, then m. */
static inline void prep_q4_1(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)q;
  halves8(b, 20, blocks, ctx);
  halves8(b + 2, 20, blocks, ctx + 8);
}

/* Q4_K (144 bytes): float16 d and dmin, 12 bytes of 6-bit scales and mins of 8 sub-blocks of 32
   (unpacked as gguf's get_scale_min), 128 bytes of nibbles: bytes 32j..32j+31 hold sub-block 2j
   in their low nibbles, 2j+1 in their high. ctx: fl(d * sc) of each sub-block, then fl(dmin * m). */
static inline void prep_q4_k(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)blocks, (void)q;
  uint32_t u[4];
  memcpy(u, b + 4, 12);
  const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
  u[3] = ((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4);
  uint32_t mins = u[1] & six;
  u[1] = (u[2] & four) | (((u[0] >> 6) & two) << 4);
  u[2] = mins;
  u[0] &= six;
  uint16_t h[2];
  memcpy(h, b, 4);
  _mm256_storeu_ps(ctx, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(h[0])), f8(u8x8((const uint8_t*)u))));
  _mm256_storeu_ps(ctx + 8, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss(h[1])), f8(u8x8((const uint8_t*)u + 8))));
}

/* Q6_K (210 bytes): 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales (one per 16
   weights), float16 d. Weight 128h + r (r < 128) has low nibble r / 64 of byte 64h + r % 64 and
   high pair r / 32 of byte 32h + r % 32; q = low | high << 4, minus 32. ctx: fl(d * sc) of each
   16; q: the 256 values as int8 (byte arithmetic on 32 at a time). */
static inline void prep_q6_k(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)blocks;
  __m256 d = _mm256_set1_ps(_cvtsh_ss((uint16_t)(b[208] | b[209] << 8)));
  _mm256_storeu_ps(ctx, _mm256_mul_ps(d, f8(i8x8(b + 192))));
  _mm256_storeu_ps(ctx + 8, _mm256_mul_ps(d, f8(i8x8(b + 200))));
  const __m256i nibble = _mm256_set1_epi8(0x0f), pair = _mm256_set1_epi8(0x30), bias = _mm256_set1_epi8(32);
  for (int h = 0; h < 2; ++h) {
    __m256i l0 = _mm256_loadu_si256((const __m256i*)(b + 64 * h));
    __m256i l1 = _mm256_loadu_si256((const __m256i*)(b + 64 * h + 32));
    __m256i hi = _mm256_loadu_si256((const __m256i*)(b + 128 + 32 * h));
    /* 16-bit shifts: the bits crossing between bytes are masked off */
    __m256i v0 = _mm256_or_si256(_mm256_and_si256(l0, nibble), _mm256_and_si256(_mm256_slli_epi16(hi, 4), pair));
    __m256i v1 = _mm256_or_si256(_mm256_and_si256(l1, nibble), _mm256_and_si256(_mm256_slli_epi16(hi, 2), pair));
    __m256i v2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), nibble), _mm256_and_si256(hi, pair));
    __m256i v3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), nibble),
                                 _mm256_and_si256(_mm256_srli_epi16(hi, 2), pair));
    _mm256_storeu_si256((__m256i*)(q + 128 * h), _mm256_sub_epi8(v0, bias));
    _mm256_storeu_si256((__m256i*)(q + 128 * h + 32), _mm256_sub_epi8(v1, bias));
    _mm256_storeu_si256((__m256i*)(q + 128 * h + 64), _mm256_sub_epi8(v2, bias));
    _mm256_storeu_si256((__m256i*)(q + 128 * h + 96), _mm256_sub_epi8(v3, bias));
  }
}

/* The types below are decoded by prep into q, as Q6_K is (the blocks of 32 with AVX2 only; see
   Q5_0): q holds the chunk's weights as small integers (int8), ctx their per-block or
   per-sub-block floats, and a vector of weights is fl(scale * q), or fl(fl(scale * q) +- offset)
   (VEC_SCALED and VEC_OFFSET below). As above, the operations are numpy's on the same values: Q5_0 fl(d * (q - 16)), Q5_1 fl(fl(d * q) + m),
   IQ4_NL fl(d * kv[q]), Q5_K as Q4_K with 5-bit q, Q3_K fl(fl(d * (sc - 32)) * q), Q2_K
   fl(fl(fl(d * sc) * q) - fl(dmin * m)), IQ4_XS fl(fl(d * (sc - 32)) * kv[q]); every product is
   exact in float32 (at most 11 + 6 + 7 bits), so an add or subtract rounds once, fused or not. */

/* 16 bytes of nibbles as 32 bytes: the low nibbles, then the high ones. */
static inline __m256i nibbles32(const uint8_t* p) {
  __m128i raw = _mm_loadu_si128((const __m128i*)p), mask = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), _mm_and_si128(raw, mask));
}

/* IQ4_NL's 16 non-linear values (ggml's kvalues_iq4nl), also IQ4_XS's. */
#define IQ4_VALUES -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113
static inline __m128i iq4_values16(void) { return _mm_setr_epi8(IQ4_VALUES); }

/* The value of the nibble in each byte. */
static inline __m256i iq4_values(__m256i nibbles) {
  return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(iq4_values16()), nibbles);
}

/* Bit i of bits as byte i of 32: value where it is set, else 0. */
static inline __m256i bits_to_bytes(uint32_t bits, int value) {
  const __m256i spread = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread);
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8((char)value));
}

/* The blocks of 32 have a prep per ISA: with AVX-512 their weights are looked up in registers in
   tables of their 16 or 32 values, as Q4_0's (prep: the floats only); with AVX2, which has no
   such lookup of floats, prep decodes the chunk's weights into q with byte arithmetic on 32 at
   a time, cheaper than decoding them 8 at a time in 32-bit lanes (measured). */

/* Q5_0 (22 bytes): float16 d, 32 bits of fifth bits (bit i: weight i), nibbles as Q4_0's;
   q = low | fifth << 4, minus 16. ctx: the blocks' d. */
static inline void prep_q5_0_avx512(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)q;
  halves8(b, 22, blocks, ctx);
}

static inline void prep_q5_0_avx2(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  halves8(b, 22, blocks, ctx);
  for (int blk = 0; blk < blocks; ++blk) {
    const uint8_t* p = b + 22 * blk;
    uint32_t high;
    memcpy(&high, p + 2, 4);
    __m256i v = _mm256_or_si256(nibbles32(p + 6), bits_to_bytes(high, 16));
    _mm256_storeu_si256((__m256i*)(q + 32 * blk), _mm256_sub_epi8(v, _mm256_set1_epi8(16)));
  }
}

/* Q5_1 (24 bytes): float16 d and m, then Q5_0's fifth bits and nibbles, unsigned. ctx: d, then m. */
static inline void prep_q5_1_avx512(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)q;
  halves8(b, 24, blocks, ctx);
  halves8(b + 2, 24, blocks, ctx + 8);
}

static inline void prep_q5_1_avx2(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  prep_q5_1_avx512(b, blocks, ctx, q);
  for (int blk = 0; blk < blocks; ++blk) {
    const uint8_t* p = b + 24 * blk;
    uint32_t high;
    memcpy(&high, p + 4, 4);
    _mm256_storeu_si256((__m256i*)(q + 32 * blk), _mm256_or_si256(nibbles32(p + 8), bits_to_bytes(high, 16)));
  }
}

/* IQ4_NL (18 bytes): Q4_0's layout, each nibble an index into the 16 values. ctx: the blocks' d. */
static inline void prep_iq4_nl_avx512(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)q;
  halves8(b, 18, blocks, ctx);
}

static inline void prep_iq4_nl_avx2(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  halves8(b, 18, blocks, ctx);
  for (int blk = 0; blk < blocks; ++blk)
    _mm256_storeu_si256((__m256i*)(q + 32 * blk), iq4_values(nibbles32(b + 18 * blk + 2)));
}

/* Q5_K (176 bytes): Q4_K's d, dmin and scales, 32 bytes of fifth bits (bit s of byte i: weight i
   of sub-block s), then Q4_K's nibbles. ctx: as Q4_K's; q: low | fifth << 4. */
static inline void prep_q5_k(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  prep_q4_k(b, blocks, ctx, q);
  const __m256i nibble = _mm256_set1_epi8(0x0f), five = _mm256_set1_epi8(16);
  __m256i high = _mm256_loadu_si256((const __m256i*)(b + 16));
  for (int j = 0; j < 4; ++j) {
    __m256i low = _mm256_loadu_si256((const __m256i*)(b + 48 + 32 * j));
    __m256i bit0 = _mm256_set1_epi8((char)(1 << (2 * j))), bit1 = _mm256_set1_epi8((char)(2 << (2 * j)));
    __m256i h0 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(high, bit0), bit0), five);
    __m256i h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(high, bit1), bit1), five);
    _mm256_storeu_si256((__m256i*)(q + 64 * j), _mm256_or_si256(_mm256_and_si256(low, nibble), h0));
    _mm256_storeu_si256((__m256i*)(q + 64 * j + 32),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low, 4), nibble), h1));
  }
}

/* Q3_K (110 bytes): 32 bytes of high bits, 64 of 2-bit pairs, 12 bytes of 16 6-bit scales,
   float16 d. Weight 128h + 32s + i has pair s of byte 32h + i and high bit 4h + s of byte i;
   q = pair - (high ? 0 : 4). Scale t < 16: nibble t / 8 of byte t % 8, and pair t / 4 of byte
   8 + t % 4 above it, minus 32. ctx: fl(d * scale) of each 16 weights. */
static inline void prep_q3_k(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)blocks;
  uint32_t u[4], top;  // 4 scales a word, as ggml's dequantize_row_q3_K
  memcpy(u, b + 96, 8);
  memcpy(&top, b + 104, 4);
  const uint32_t low4 = 0x0f0f0f0f, low2 = 0x03030303;
  u[2] = ((u[0] >> 4) & low4) | (((top >> 4) & low2) << 4);
  u[3] = ((u[1] >> 4) & low4) | (((top >> 6) & low2) << 4);
  u[0] = (u[0] & low4) | ((top & low2) << 4);
  u[1] = (u[1] & low4) | (((top >> 2) & low2) << 4);
  int8_t scales[16];
  _mm_storeu_si128((__m128i*)scales, _mm_sub_epi8(_mm_loadu_si128((const __m128i*)u), _mm_set1_epi8(32)));
  __m256 d = _mm256_set1_ps(_cvtsh_ss((uint16_t)(b[108] | b[109] << 8)));
  _mm256_storeu_ps(ctx, _mm256_mul_ps(d, f8(i8x8((const uint8_t*)scales))));
  _mm256_storeu_ps(ctx + 8, _mm256_mul_ps(d, f8(i8x8((const uint8_t*)scales + 8))));
  const __m256i pair = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);
  __m256i high = _mm256_loadu_si256((const __m256i*)b);
  for (int h = 0; h < 2; ++h) {
    __m256i pairs = _mm256_loadu_si256((const __m256i*)(b + 32 + 32 * h));
    for (int sh = 0; sh < 4; ++sh) {
      __m256i low = _mm256_and_si256(_mm256_srl_epi16(pairs, _mm_cvtsi32_si128(2 * sh)), pair);
      __m256i bit = _mm256_set1_epi8((char)(1 << (4 * h + sh)));
      __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(high, bit), bit);
      _mm256_storeu_si256((__m256i*)(q + 128 * h + 32 * sh), _mm256_sub_epi8(low, _mm256_andnot_si256(set, four)));
    }
  }
}

/* Q2_K (84 bytes): 16 bytes of scales (low nibble) and mins (high) of each 16 weights, 64 bytes of
   2-bit pairs as Q3_K's, float16 d and dmin. ctx: fl(d * sc) of each 16, then fl(dmin * m). */
static inline void prep_q2_k(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)blocks;
  __m256 d = _mm256_set1_ps(_cvtsh_ss((uint16_t)(b[80] | b[81] << 8)));
  __m256 dmin = _mm256_set1_ps(_cvtsh_ss((uint16_t)(b[82] | b[83] << 8)));
  for (int half = 0; half < 2; ++half) {
    __m256i sc = u8x8(b + 8 * half);
    _mm256_storeu_ps(ctx + 8 * half, _mm256_mul_ps(d, f8(_mm256_and_si256(sc, _mm256_set1_epi32(15)))));
    _mm256_storeu_ps(ctx + 16 + 8 * half, _mm256_mul_ps(dmin, f8(_mm256_srli_epi32(sc, 4))));
  }
  const __m256i pair = _mm256_set1_epi8(3);
  for (int h = 0; h < 2; ++h) {
    __m256i pairs = _mm256_loadu_si256((const __m256i*)(b + 16 + 32 * h));
    for (int sh = 0; sh < 4; ++sh)
      _mm256_storeu_si256((__m256i*)(q + 128 * h + 32 * sh),
                          _mm256_and_si256(_mm256_srl_epi16(pairs, _mm_cvtsi32_si128(2 * sh)), pair));
  }
}

/* IQ4_XS (136 bytes): float16 d, 16 bits of scales' high pairs (pair s: sub-block s), 4 bytes of
   their low nibbles (nibble s % 2 of byte s / 2), then 8 sub-blocks of 32 as IQ4_NL's 16 bytes.
   ctx: fl(d * (scale - 32)) of each sub-block. */
static inline void prep_iq4_xs(const uint8_t* b, int blocks, float* ctx, int8_t* q) {
  (void)blocks;
  unsigned high = b[2] | b[3] << 8;
  int8_t scales[8];
  for (int s = 0; s < 8; ++s)
    scales[s] = (int8_t)((((b[4 + s / 2] >> (4 * (s % 2))) & 15) | (((high >> (2 * s)) & 3) << 4)) - 32);
  _mm256_storeu_ps(ctx, _mm256_mul_ps(_mm256_set1_ps(_cvtsh_ss((uint16_t)(b[0] | b[1] << 8))),
                                      f8(i8x8((const uint8_t*)scales))));
  for (int s = 0; s < 8; ++s) _mm256_storeu_si256((__m256i*)(q + 32 * s), iq4_values(nibbles32(b + 8 + 16 * s)));
}

/* The other types' prep is the same for both ISAs. */
#define SAME_PREP(T)                                                                          \
  static inline void prep_##T##_avx2(const uint8_t* b, int blocks, float* ctx, int8_t* q) {   \
    prep_##T(b, blocks, ctx, q);                                                              \
  }                                                                                           \
  static inline void prep_##T##_avx512(const uint8_t* b, int blocks, float* ctx, int8_t* q) { \
    prep_##T(b, blocks, ctx, q);                                                              \
  }
SAME_PREP(q8_0) SAME_PREP(q4_0) SAME_PREP(q4_1) SAME_PREP(q2_k) SAME_PREP(q3_k) SAME_PREP(q4_k) SAME_PREP(q5_k)
SAME_PREP(q6_k) SAME_PREP(iq4_xs)

#endif
