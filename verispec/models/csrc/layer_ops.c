/* The rest of a Llama-family layer for a decode or verify pass of a few rows, in float32: RMSNorm,
   rotary embedding with the write into the KV cache, causal attention over the cache, SwiGLU.

   In torch each of these is several operator calls whose fixed cost (dispatch, allocation,
   thread start) exceeds their arithmetic at one to a few rows; here each is one call. Every row
   is computed on its own, in an order that does not depend on how many rows the pass has, so
   with widen_linear.c a position's logits are the same bits decoded alone or verified among
   k+1 positions. Built with widen_linear.c by verispec/models/kernels.py. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "team.h"
#include "verispec_kernels.h"

/* Scratch of rows x columns floats, or NULL: out of memory, a size that does not fit size_t, or
   an empty one. Every caller has a path without scratch that gives the same bits. The tests build
   with -DVS_NO_SCRATCH to take those paths. */
static float* scratch_floats(int64_t rows, int64_t columns) {
#ifdef VS_NO_SCRATCH
  (void)rows, (void)columns;
  return NULL;
#else
  if (rows <= 0 || columns <= 0 || rows > (int64_t)(SIZE_MAX / sizeof(float)) / columns) return NULL;
  return malloc(sizeof(float) * (size_t)rows * (size_t)columns);
#endif
}

/* a . b over n floats: 8-lane partial sums in a fixed order, then the lanes, then the tail. */
static inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  float total = _mm_cvtss_f32(s);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

/* e^x for 8 lanes: Cephes' single-precision exp (range reduction by ln 2, degree-5 polynomial),
   about 1 ulp; inputs are clamped to +-88.38, where float32 over- or underflows. */
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

/* The same function one value at a time (tails), so every element gets the same result. */
static inline float exp1(float x) { return _mm256_cvtss_f32(exp8(_mm256_set1_ps(x))); }

/* A row of scores, in place, into exp(score - top) (a softmax's numerators, top the row's max);
   returns their total. Lanes of 8 then the tail, in one fixed order: the dense and the paged
   attention share it, so a row gets the same bits on either. */
static inline float exponentiate_from(float* row, int64_t n, float top) {
  int64_t j;
  __m256 sum8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), _mm256_set1_ps(top)));
    _mm256_storeu_ps(row + j, e);
    sum8 = _mm256_add_ps(sum8, e);
  }
  float lanes[8], total = 0.0f;
  _mm256_storeu_ps(lanes, sum8);
  for (int u = 0; u < 8; ++u) total += lanes[u];
  for (; j < n; ++j) {
    row[j] = exp1(row[j] - top);
    total += row[j];
  }
  return total;
}

/* exponentiate_from over the row's max: the largest score that is not NaN, -INFINITY if none. */
static inline float exponentiate(float* row, int64_t n) {
  float top = -INFINITY;
  for (int64_t j = 0; j < n; ++j) top = row[j] > top ? row[j] : top;
  return exponentiate_from(row, n, top);
}

/* exponentiate's `top`, 8 lanes at a time (the scalar loop's chain of dependent maxima is a good
   part of a verify pass's softmax): `row[j] > top ? row[j] : top` per lane, as vmaxps computes
   it with the running maximum second (kept for a NaN), then over the lanes and the tail the same
   way. The maximum is the same value; only where it is zero may its sign differ, which changes
   no result: x - (+0) and x - (-0) differ only for x = -0, and exp8 gives 1 for either zero. */
static inline float row_max(const float* row, int64_t n) {
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) top8 = _mm256_max_ps(_mm256_loadu_ps(row + j), top8);
  float lanes[8], top = -INFINITY;
  _mm256_storeu_ps(lanes, top8);
  for (int u = 0; u < 8; ++u) top = lanes[u] > top ? lanes[u] : top;
  for (; j < n; ++j) top = row[j] > top ? row[j] : top;
  return top;
}

/* q . k_u for the 8 keys k + u * hd, u < 8, as one vector; every key's sum runs in the same order
   as dot_tail's. */
static inline __m256 dot8(const float* q, const float* k, int64_t hd) {
  __m256 a[8];
  for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= hd; i += 8) {
    __m256 qv = _mm256_loadu_ps(q + i);
    for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + u * hd + i), a[u]);
  }
  /* lanes: ((l0+l1)+(l2+l3)) in each 128-bit half, then low half + high half */
  __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
  if (i < hd) {  /* head sizes that are not a multiple of 8 */
    float tail[8];
    for (int u = 0; u < 8; ++u) {
      tail[u] = 0.0f;
      for (int64_t r = i; r < hd; ++r) tail[u] += q[r] * k[u * hd + r];
    }
    sums = _mm256_add_ps(sums, _mm256_loadu_ps(tail));
  }
  return sums;
}

/* q . k for one key, summed exactly as dot8 sums each of its keys. */
static inline float dot_tail(const float* q, const float* k, int64_t hd) {
  __m256 a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= hd; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + i), a);
  float l[8];
  _mm256_storeu_ps(l, a);
  float total = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  float tail = 0.0f;
  for (; i < hd; ++i) tail += q[i] * k[i];
  return total + tail;
}

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, for T rows of D. */
void rms_norm(const float* x, int64_t T, int64_t D, const float* weight, float eps, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float* row = x + t * D;
    float squares = dot(row, row, D);
    float inverse = 1.0f / sqrtf(squares / (float)D + eps);
    for (int64_t i = 0; i < D; ++i) out[t * D + i] = row[i] * inverse * weight[i];
  }
}

/* Rotate-half rotary embedding of one head vector in place, with the angles of its position. */
static inline void rotate(float* v, const float* cos, const float* sin, int64_t hd) {
  int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) {
    float a = v[i], b = v[i + half];
    v[i] = a * cos[i] - b * sin[i];
    v[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

/* qkv: T rows of [q (H hd) | k (Hkv hd) | v (Hkv hd)] for positions start..start+T-1. Rotates q
   in place and writes rotated k and v into the caches keys/values, each (Hkv, P, hd). */
void rope_store(float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* cos_table,
                const float* sin_table, int64_t start, float* keys, float* values, int64_t P) {
  int64_t width = (H + 2 * Hkv) * hd;
  for (int64_t t = 0; t < T; ++t) {
    float* row = qkv + t * width;
    const float* cos = cos_table + (start + t) * hd;
    const float* sin = sin_table + (start + t) * hd;
    for (int64_t h = 0; h < H; ++h) rotate(row + h * hd, cos, sin, hd);
    for (int64_t g = 0; g < Hkv; ++g) {
      float* k = keys + (g * P + start + t) * hd;
      float* v = values + (g * P + start + t) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        k[i] = row[(H + g) * hd + i];
        v[i] = row[(H + Hkv + g) * hd + i];
      }
      rotate(k, cos, sin, hd);
    }
  }
}

/* The paged KV cache of a batch of sequences: per layer a key pool and a value pool, each
   (num_blocks, Hkv, bs, hd); position p of a sequence lives in block table[p / bs] at offset
   p % bs, its slot is block * bs + offset. bs is a multiple of 8, so the 8 keys j..j+7 from a j
   that is a multiple of 8 lie in one block, one after another, as dot8 reads them. */

/* KV head g's bs rows in block number b of a sequence's table. */
static inline const float* paged_block(const float* pool, const int64_t* table, int64_t g, int64_t b, int64_t Hkv,
                                       int64_t bs, int64_t hd) {
  return pool + (table[b] * Hkv + g) * bs * hd;
}

/* Position j's row (a division: the loops that run over every position walk block by block). */
static inline const float* paged_at(const float* pool, const int64_t* table, int64_t g, int64_t j, int64_t Hkv,
                                    int64_t bs, int64_t hd) {
  return paged_block(pool, table, g, j / bs, Hkv, bs, hd) + j % bs * hd;
}

/* rope_store for rows of any sequences in any order: row t is at position positions[t] and
   its k and v go to slot slots[t] of the pools. q, k and v come out the same bits as
   rope_store's at that position. */
void rope_store_paged(float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* cos_table,
                      const float* sin_table, const int64_t* positions, const int64_t* slots, float* keys,
                      float* values, int64_t bs) {
  int64_t width = (H + 2 * Hkv) * hd;
  for (int64_t t = 0; t < T; ++t) {
    float* row = qkv + t * width;
    const float* cos = cos_table + positions[t] * hd;
    const float* sin = sin_table + positions[t] * hd;
    int64_t block = slots[t] / bs, offset = slots[t] % bs;
    for (int64_t h = 0; h < H; ++h) rotate(row + h * hd, cos, sin, hd);
    for (int64_t g = 0; g < Hkv; ++g) {
      float* k = keys + ((block * Hkv + g) * bs + offset) * hd;
      float* v = values + ((block * Hkv + g) * bs + offset) * hd;
      for (int64_t i = 0; i < hd; ++i) {
        k[i] = row[(H + g) * hd + i];
        v[i] = row[(H + Hkv + g) * hd + i];
      }
      rotate(k, cos, sin, hd);
    }
  }
}

/* Scratch floats per work item of paged_attention (rows x context); a position whose context
   alone is longer is done without scratch. Overridable at build time (the tests shrink it). */
#ifndef PAGED_SCRATCH_FLOATS
#define PAGED_SCRATCH_FLOATS (1 << 22)
#endif
#define PAGED_MAX_ROWS 256

/* Rows per work item for a segment whose last position sees `context` keys. */
static inline int64_t paged_chunk_rows(int64_t context) {
  int64_t rows = PAGED_SCRATCH_FLOATS / (context > 0 ? context : 1);
  return rows < 1 ? 1 : rows > PAGED_MAX_ROWS ? PAGED_MAX_ROWS : rows;
}

/* Prefetching. A KV head's block (bs positions of hd floats: 4 KB at 16 x 64) is one run of
   lines, and the sequence's next block is elsewhere in the pool: the hardware prefetchers, which
   follow a run of lines, do not cross to it, so without help every block would start with a
   stall to memory. The sweeps below ask for the positions about PAGED_AHEAD_FLOATS floats on
   while they work, and go through the cache in runs of up to PAGED_RUN_FLOATS floats of one
   block (each run's keys or values read once for every row, each row's accumulators kept in
   registers through a run); the keys' sweep runs on into the first values, which the values'
   sweep reads next. None of this changes the arithmetic or its order. */
#ifndef PAGED_AHEAD_FLOATS
#define PAGED_AHEAD_FLOATS 2048
#endif
#ifndef PAGED_RUN_FLOATS
#define PAGED_RUN_FLOATS 4096
#endif

/* Positions of hd floats in about `floats` floats, in whole groups of 8, at least one group. */
static inline int64_t paged_positions(int64_t floats, int64_t hd) {
  int64_t n = floats / hd / 8 * 8;
  return n > 8 ? n : 8;
}

/* Where a sweep asks next: position block * bs + offset (offset a multiple of 8) of KV head g of
   one sequence's keys, then of its values if `then` is set; stepped without dividing. */
typedef struct {
  const float *pool, *then;
  const int64_t* table;
  int64_t g, Hkv, bs, hd, end, block, offset;
} paged_cursor;

static inline paged_cursor paged_cursor_at(const float* pool, const float* then, const int64_t* table, int64_t g,
                                           int64_t Hkv, int64_t bs, int64_t hd, int64_t end, int64_t j) {
  paged_cursor c = {pool, then, table, g, Hkv, bs, hd, end, j / bs, j % bs};
  return c;
}

/* Ask for the cursor's group of 8 positions (in one block: bs and the offset are multiples of
   8; lines past the sequence's end but in its block are harmless) and move on; nothing past the
   last group. */
static inline void paged_prefetch(paged_cursor* c) {
  if (c->block * c->bs + c->offset >= c->end) {
    if (!c->then) return;
    c->pool = c->then, c->then = NULL, c->block = 0, c->offset = 0;
  }
  const char* p = (const char*)(paged_block(c->pool, c->table, c->g, c->block, c->Hkv, c->bs, c->hd) + c->offset * c->hd);
  for (int64_t i = 0; i < 8 * c->hd * (int64_t)sizeof(float); i += 64) __builtin_prefetch(p + i, 0, 3);
  if ((c->offset += 8) == c->bs) c->offset = 0, c->block += 1;
}

/* attention's scores for the T rows at positions start.. (row t: query q0 + t * qstride, sees
   keys 0..start+t of KV head g) into scores + t * end, end = start + T: q . k_j * scale, by dot8
   over groups of 8 keys from key 0 and dot_tail for the last few, exactly as attention computes
   them. A run of keys at a time for every row that sees it: each key is read from memory once. */
__attribute__((noinline)) static void paged_scores(const float* q0, int64_t qstride, const float* keys,
                                                   const float* values, const int64_t* table, int64_t g, int64_t Hkv,
                                                   int64_t bs, int64_t hd, int64_t start, int64_t T, float scale,
                                                   float* scores) {
  int64_t end = start + T, run = paged_positions(PAGED_RUN_FLOATS, hd);
  __m256 scale8 = _mm256_set1_ps(scale);
  paged_cursor ahead = paged_cursor_at(keys, values, table, g, Hkv, bs, hd, end, 0);
  for (int64_t j = 0; j < paged_positions(PAGED_AHEAD_FLOATS, hd); j += 8) paged_prefetch(&ahead);
  for (int64_t b = 0, j = 0; j < end; ++b) {
    const float* k = paged_block(keys, table, g, b, Hkv, bs, hd);
    for (int64_t first = b * bs, stop = end < first + bs ? end : first + bs, last; j < stop; j = last) {
      last = stop < j + run ? stop : j + run;  /* the run j..last-1 */
      for (int64_t u = j; u < last; u += 8) paged_prefetch(&ahead);
      for (int64_t t = j > start ? j - start : 0; t < T; ++t) {
        const float* q = q0 + t * qstride;
        float* row = scores + t * end;
        int64_t n = start + t + 1, seen = n < last ? n : last, i = j;
        for (; i + 8 <= seen; i += 8) _mm256_storeu_ps(row + i, _mm256_mul_ps(dot8(q, k + (i - first) * hd, hd), scale8));
        for (; i < seen; ++i) row[i] = dot_tail(q, k + (i - first) * hd, hd) * scale;
      }
    }
  }
}

/* o[0 .. 8 nv) += p[u] * v_u[0 .. 8 nv) for u < count (v_u = v + u * hd), u ascending: one fma
   per element and value, as attention's `o[i] = fmaf(p, vj[i], o[i])`. Inlined with a constant
   nv, those vectors of o stay in registers. */
static inline __attribute__((always_inline)) void weigh_vectors(const float* p, const float* v, int64_t hd,
                                                                int64_t count, float* o, int nv) {
  __m256 acc[8];
  for (int u = 0; u < nv; ++u) acc[u] = _mm256_loadu_ps(o + 8 * u);
  for (int64_t j = 0; j < count; ++j) {
    __m256 pj = _mm256_set1_ps(p[j]);
    for (int u = 0; u < nv; ++u) acc[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + j * hd + 8 * u), acc[u]);
  }
  for (int u = 0; u < nv; ++u) _mm256_storeu_ps(o + 8 * u, acc[u]);
}

/* o[0 .. hd) += p[u] * v_u for the `count` values v + u * hd, u ascending: one row's share of a
   run of values (weigh_vectors over the head's vectors, then the elements past them). */
static inline __attribute__((always_inline)) void weigh_run(const float* p, const float* v, int64_t hd, int64_t count, float* o) {
  int64_t vec = hd / 8 * 8;
  for (int64_t i = 0; i < vec; i += 64) {
    switch ((vec - i) / 8) {
      case 1: weigh_vectors(p, v + i, hd, count, o + i, 1); break;
      case 2: weigh_vectors(p, v + i, hd, count, o + i, 2); break;
      case 3: weigh_vectors(p, v + i, hd, count, o + i, 3); break;
      case 4: weigh_vectors(p, v + i, hd, count, o + i, 4); break;
      case 5: weigh_vectors(p, v + i, hd, count, o + i, 5); break;
      case 6: weigh_vectors(p, v + i, hd, count, o + i, 6); break;
      case 7: weigh_vectors(p, v + i, hd, count, o + i, 7); break;
      default: weigh_vectors(p, v + i, hd, count, o + i, 8);
    }
  }
  for (int64_t i = vec; i < hd; ++i) {
    float a = o[i];
    for (int64_t u = 0; u < count; ++u) a = fmaf(p[u], v[u * hd + i], a);
    o[i] = a;
  }
}

/* Row t of the T at positions start.. (output o0 + t * stride, zeroed) gets, for every key j it
   sees, ascending, weights[t * end + j] times value j: attention's sums, in its order. A run of
   values at a time for every row that sees it: each value is read from memory once. */
__attribute__((noinline)) static void paged_weigh(const float* weights, const float* values, const int64_t* table,
                                                  int64_t g, int64_t Hkv, int64_t bs, int64_t hd, int64_t start,
                                                  int64_t T, float* o0, int64_t stride) {
  int64_t end = start + T, run = paged_positions(PAGED_RUN_FLOATS, hd);
  int64_t prefetched = paged_positions(PAGED_AHEAD_FLOATS, hd);  /* by paged_scores */
  paged_cursor ahead = paged_cursor_at(values, NULL, table, g, Hkv, bs, hd, end, prefetched < end ? prefetched : end);
  for (int64_t b = 0, j = 0; j < end; ++b) {
    const float* v = paged_block(values, table, g, b, Hkv, bs, hd);
    for (int64_t first = b * bs, stop = end < first + bs ? end : first + bs, last; j < stop; j = last) {
      last = stop < j + run ? stop : j + run;  /* the run j..last-1 */
      if (T == 1)  /* with more rows, their arithmetic hides the jumps and prefetching cost more */
        for (int64_t u = j; u < last; u += 8) paged_prefetch(&ahead);
      const float* vj = v + (j - first) * hd;
      for (int64_t t = j > start ? j - start : 0; t < T; ++t) {
        int64_t n = start + t + 1, count = (n < last ? n : last) - j;
        weigh_run(weights + t * end + j, vj, hd, count, o0 + t * stride);
      }
    }
  }
}

/* The value rounded to float as it is: the compiler may not fuse the multiply that made it
   with the add that uses it (the buffered path stores a score before subtracting the max). */
static inline __m256 rounded8(__m256 v) {
  __asm__("" : "+x"(v));
  return v;
}
static inline float rounded1(float v) {
  __asm__("" : "+x"(v));
  return v;
}

/* A tree row's key j (its virtual sequence: the context positions 0..start-1, then its path
   from the tree's root, path[d] the row of the node at depth d, positions start + path[d]);
   a chain row's (path NULL) is position j. */
static inline int64_t tree_position(int64_t j, int64_t start, const int64_t* path) {
  return path == NULL || j < start ? j : start + path[j - start];
}

/* Key or value j of a row's sequence (tree_position), in the pool. */
static inline const float* path_at(const float* pool, const int64_t* table, int64_t g, int64_t j, int64_t Hkv,
                                   int64_t bs, int64_t hd, int64_t start, const int64_t* path) {
  return paged_at(pool, table, g, tree_position(j, start, path), Hkv, bs, hd);
}

/* One row without scratch (a context past PAGED_SCRATCH_FLOATS, or out of memory): the scores
   are computed three times (max, total, weights), each time the same bits, so the output is
   the same as the buffered path's. A tree row reads its virtual sequence (tree_position). */
static void paged_attend_unbuffered(const float* q, const float* keys, const float* values, const int64_t* table,
                                    int64_t g, int64_t Hkv, int64_t bs, int64_t hd, int64_t n, float scale,
                                    float* o, int64_t start, const int64_t* path) {
  float s[8], top = -INFINITY;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(s, _mm256_mul_ps(dot8(q, path_at(keys, table, g, j, Hkv, bs, hd, start, path), hd), _mm256_set1_ps(scale)));
    for (int u = 0; u < 8; ++u) top = s[u] > top ? s[u] : top;
  }
  for (; j < n; ++j) {
    float x = dot_tail(q, path_at(keys, table, g, j, Hkv, bs, hd, start, path), hd) * scale;
    top = x > top ? x : top;
  }
  __m256 sum8 = _mm256_setzero_ps();
  for (j = 0; j + 8 <= n; j += 8) {
    __m256 x = rounded8(_mm256_mul_ps(dot8(q, path_at(keys, table, g, j, Hkv, bs, hd, start, path), hd), _mm256_set1_ps(scale)));
    sum8 = _mm256_add_ps(sum8, exp8(_mm256_sub_ps(x, _mm256_set1_ps(top))));
  }
  float lanes[8], total = 0.0f;
  _mm256_storeu_ps(lanes, sum8);
  for (int u = 0; u < 8; ++u) total += lanes[u];
  for (; j < n; ++j) total += exp1(rounded1(dot_tail(q, path_at(keys, table, g, j, Hkv, bs, hd, start, path), hd) * scale) - top);
  for (int64_t i = 0; i < hd; ++i) o[i] = 0.0f;
  for (j = 0; j + 8 <= n; j += 8) {
    __m256 x = rounded8(_mm256_mul_ps(dot8(q, path_at(keys, table, g, j, Hkv, bs, hd, start, path), hd), _mm256_set1_ps(scale)));
    _mm256_storeu_ps(s, exp8(_mm256_sub_ps(x, _mm256_set1_ps(top))));
    for (int u = 0; u < 8; ++u) {
      const float* vj = path_at(values, table, g, j + u, Hkv, bs, hd, start, path);
      float p = s[u] / total;
      for (int64_t i = 0; i < hd; ++i) o[i] = fmaf(p, vj[i], o[i]);
    }
  }
  for (; j < n; ++j) {
    const float* vj = path_at(values, table, g, j, Hkv, bs, hd, start, path);
    float p = exp1(rounded1(dot_tail(q, path_at(keys, table, g, j, Hkv, bs, hd, start, path), hd) * scale) - top) / total;
    for (int64_t i = 0; i < hd; ++i) o[i] = fmaf(p, vj[i], o[i]);
  }
}


/* A token tree's row: it attends to the context 0..start-1 and to its own path from the root
   (path[0..depth], rows of the segment), nothing else. Its scores are laid out as the chain
   that path is would have them (n = start + depth + 1 keys, key start + d the node at depth d)
   and go through the same softmax and the same ascending sums, so the row gets the bits that
   row of that chain gets: whatever the tree, a node's output is its path's. `row`: n floats. */
static void tree_attend_row(const float* q, const float* keys, const float* values, const int64_t* table, int64_t g,
                            int64_t Hkv, int64_t bs, int64_t hd, int64_t start, const int64_t* path, int64_t depth,
                            float scale, float* row, float* o) {
  int64_t n = start + depth + 1, j = 0;
  __m256 scale8 = _mm256_set1_ps(scale);
  for (; j + 8 <= start; j += 8)  /* whole groups of the context: 8 keys one after another in a block */
    _mm256_storeu_ps(row + j, _mm256_mul_ps(dot8(q, paged_at(keys, table, g, j, Hkv, bs, hd), hd), scale8));
  for (; j < n; ++j)  /* dot_tail sums a key as dot8 does */
    row[j] = dot_tail(q, path_at(keys, table, g, j, Hkv, bs, hd, start, path), hd) * scale;
  float total = exponentiate_from(row, n, row_max(row, n));
  __m256 total8 = _mm256_set1_ps(total);
  for (j = 0; j + 8 <= n; j += 8) _mm256_storeu_ps(row + j, _mm256_div_ps(_mm256_loadu_ps(row + j), total8));
  for (; j < n; ++j) row[j] = row[j] / total;
  for (int64_t i = 0; i < hd; ++i) o[i] = 0.0f;
  for (j = 0; j < start;) {  /* the context a block's run at a time, then the path a node at a time */
    int64_t count = bs - j % bs < start - j ? bs - j % bs : start - j;
    weigh_run(row + j, paged_at(values, table, g, j, Hkv, bs, hd), hd, count, o);
    j += count;
  }
  for (; j < n; ++j) weigh_run(row + j, path_at(values, table, g, j, Hkv, bs, hd, start, path), hd, 1, o);
}

/* Whether a segment's rows form a tree rather than a chain: some row's parent is not the row
   before it. parents: per row of the pass, its parent's row, -1 for a segment's first. */
static int segment_is_tree(const int64_t* parents, int64_t first, int64_t length) {
  if (parents == NULL) return 0;
  for (int64_t r = first + 1; r < first + length; ++r)
    if (parents[r] != r - 1) return 1;
  return 0;
}

/* A tree row's path from its segment's root: path[0..depth] (rows of the segment), its depth. */
static int64_t tree_path(const int64_t* parents, int64_t first, int64_t row, int64_t* path) {
  int64_t depth = 0;
  for (int64_t r = row; r != first; r = parents[r]) ++depth;
  for (int64_t r = row, d = depth; d >= 0; r = parents[r], --d) path[d] = r - first;
  return depth;
}

/* attention for a batch over the paged cache. The T rows of qkv / out form S segments: segment
   s is rows seg_row[s].. (seg_len[s] of them) at positions seg_pos[s].. of one sequence, whose
   block table starts at tables[table_start[s]]; the row at position p sees that sequence's
   positions 0..p. Each row's output is the bits attention gives it over a contiguous cache,
   whatever the segments, their order and the thread count. Work items are (segment, head,
   chunk of rows); a chunk reads each value once for all its rows. `parents` (NULL: every
   segment a chain) gives per row of the pass its parent's row (-1 for a segment's first): a
   segment whose rows are not a chain is a token tree, its rows at positions seg_pos + their
   depth (`positions` of rope_store_paged), stored at slots seg_pos + their index, each row
   attending to the context and its own path (tree_attend_row). */
void paged_attention_team(const float* qkv, int64_t S, const int64_t* seg_row, const int64_t* seg_len,
                          const int64_t* seg_pos, const int64_t* tables, const int64_t* table_start,
                          const int64_t* parents, int64_t H, int64_t Hkv, int64_t hd, const float* keys,
                          const float* values, int64_t bs, float scale, float* out) {
  int64_t width = (H + 2 * Hkv) * hd, group = H / Hkv, chunks = 0;
  for (int64_t s = 0; s < S; ++s) {
    int64_t rows = paged_chunk_rows(seg_pos[s] + seg_len[s]);
    int64_t n = (seg_len[s] + rows - 1) / rows;
    chunks = n > chunks ? n : chunks;
  }
  /* every segment gets `chunks` slots (no list to allocate); slots past its rows are empty; the
     team (team.h) shares them out */
  {
    float* scores = NULL;  /* grown as needed, at most PAGED_SCRATCH_FLOATS */
    int64_t capacity = 0;
    #pragma omp for schedule(dynamic)
    for (int64_t item = 0; item < S * chunks * H; ++item) {
      int64_t h = item % H, c = item / H % chunks, s = item / H / chunks;
      int64_t rows = paged_chunk_rows(seg_pos[s] + seg_len[s]);
      int64_t first = c * rows;
      if (first >= seg_len[s]) continue;
      int64_t T = seg_len[s] - first < rows ? seg_len[s] - first : rows;
      int64_t start = seg_pos[s] + first, end = start + T, g = h / group;
      const int64_t* table = tables + table_start[s];
      const float* q0 = qkv + (seg_row[s] + first) * width + h * hd;
      float* o0 = out + (seg_row[s] + first) * H * hd + h * hd;
      if (segment_is_tree(parents, seg_row[s], seg_len[s])) {
        int64_t path[PAGED_MAX_ROWS + 1], n = seg_pos[s] + seg_len[s];
        if (n > capacity) {
          free(scores);
          scores = scratch_floats(1, n);
          capacity = scores ? n : 0;
        }
        for (int64_t t = 0; t < T; ++t) {
          int64_t depth = tree_path(parents, seg_row[s], seg_row[s] + first + t, path);
          if (scores)
            tree_attend_row(q0 + t * width, keys, values, table, g, Hkv, bs, hd, seg_pos[s], path, depth, scale,
                            scores, o0 + t * H * hd);
          else
            paged_attend_unbuffered(q0 + t * width, keys, values, table, g, Hkv, bs, hd, seg_pos[s] + depth + 1,
                                    scale, o0 + t * H * hd, seg_pos[s], path);
        }
        continue;
      }
      if (T * end <= PAGED_SCRATCH_FLOATS && T * end > capacity) {
        free(scores);
        scores = scratch_floats(T, end);
        capacity = scores ? T * end : 0;
      }
      if (T * end > capacity) {
        for (int64_t t = 0; t < T; ++t)
          paged_attend_unbuffered(q0 + t * width, keys, values, table, g, Hkv, bs, hd, start + t + 1, scale,
                                  o0 + t * H * hd, 0, NULL);
        continue;
      }
      paged_scores(q0, width, keys, values, table, g, Hkv, bs, hd, start, T, scale, scores);
      for (int64_t t = 0; t < T; ++t) {  /* each row's softmax: exponentials over their total */
        float* row = scores + t * end;
        int64_t n = start + t + 1, j = 0;
        float total = exponentiate_from(row, n, row_max(row, n));
        __m256 total8 = _mm256_set1_ps(total);
        for (; j + 8 <= n; j += 8) _mm256_storeu_ps(row + j, _mm256_div_ps(_mm256_loadu_ps(row + j), total8));
        for (; j < n; ++j) row[j] = row[j] / total;
        float* o = o0 + t * H * hd;
        for (int64_t i = 0; i < hd; ++i) o[i] = 0.0f;
      }
      paged_weigh(scores, values, table, g, Hkv, bs, hd, start, T, o0, H * hd);
    }
    free(scores);
  }
}

void paged_attention(const float* qkv, int64_t S, const int64_t* seg_row, const int64_t* seg_len,
                     const int64_t* seg_pos, const int64_t* tables, const int64_t* table_start,
                     const int64_t* parents, int64_t H, int64_t Hkv, int64_t hd, const float* keys,
                     const float* values, int64_t bs, float scale, float* out, int threads) {
  VS_TEAM(threads, paged_attention_team(qkv, S, seg_row, seg_len, seg_pos, tables, table_start, parents, H, Hkv,
                                        hd, keys, values, bs, scale, out));
}

/* out (T, H hd): for query row t (position start+t) and head h, softmax(q . k_j * scale) over
   cache positions j <= start+t of its KV head (grouped-query: H / Hkv query heads per KV head),
   applied to the values. The contiguous cache (Hkv, P, hd) is the paged pool of one block of P
   positions, so this is paged_attention over one segment with the table {0}: the same sweeps
   (each key and value read once for all the rows, accumulators in registers, prefetch), the same
   bits as the paged cache gives those positions. */
void attention_team(const float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* keys,
                    const float* values, int64_t P, int64_t start, float scale, float* out) {
  static const int64_t zero[1] = {0};
  const int64_t rows[1] = {T}, position[1] = {start};
  paged_attention_team(qkv, 1, zero, rows, position, zero, zero, NULL, H, Hkv, hd, keys, values, P, scale, out);
}

void attention(const float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* keys,
               const float* values, int64_t P, int64_t start, float scale, float* out, int threads) {
  VS_TEAM(threads, attention_team(qkv, T, H, Hkv, hd, keys, values, P, start, scale, out));
}

/* out (T, F) = silu(gate) * up, gate_up (T, 2F) = [gate | up]. */
void silu_mul(const float* gate_up, int64_t T, int64_t F, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float* gate = gate_up + t * 2 * F;
    const float* up = gate + F;
    int64_t i = 0;
    for (; i + 8 <= F; i += 8) {
      __m256 g = _mm256_loadu_ps(gate + i);
      __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
      _mm256_storeu_ps(out + t * F + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
    for (; i < F; ++i) out[t * F + i] = gate[i] / (1.0f + exp1(-gate[i])) * up[i];
  }
}
