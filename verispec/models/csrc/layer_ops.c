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

/* out (T, H hd): for query row t (position start+t) and head h, softmax(q . k_j * scale) over
   cache positions j <= start+t of its KV head (grouped-query: H / Hkv query heads per KV head),
   applied to the values. A head's T rows are done together, so each cached key and value is
   read once per pass; each row's sums still run over j in ascending order as if it were alone. */
void attention(const float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* keys,
               const float* values, int64_t P, int64_t start, float scale, float* out, int threads) {
  int64_t width = (H + 2 * Hkv) * hd, group = H / Hkv, end = start + T;
  #pragma omp parallel num_threads(threads)
  {
    float* scores = malloc(sizeof(float) * (size_t)(T * end));  /* row t: scores[t * end + j] */
    float* totals = malloc(sizeof(float) * (size_t)T);
    #pragma omp for schedule(static)
    for (int64_t h = 0; h < H; ++h) {
      const float* k = keys + (h / group) * P * hd;
      const float* v = values + (h / group) * P * hd;
      for (int64_t t = 0; t < T; ++t) {
        const float* q = qkv + t * width + h * hd;
        float* row = scores + t * end;
        int64_t n = start + t + 1;
        int64_t j = 0;
        for (; j + 8 <= n; j += 8)
          _mm256_storeu_ps(row + j, _mm256_mul_ps(dot8(q, k + j * hd, hd), _mm256_set1_ps(scale)));
        for (; j < n; ++j) row[j] = dot_tail(q, k + j * hd, hd) * scale;
        float top = -INFINITY;
        for (j = 0; j < n; ++j) top = row[j] > top ? row[j] : top;
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
        totals[t] = total;
        float* o = out + t * H * hd + h * hd;
        for (int64_t i = 0; i < hd; ++i) o[i] = 0.0f;
      }
      for (int64_t j = 0; j < end; ++j) {  /* value j once, into every row that sees it */
        const float* vj = v + j * hd;
        for (int64_t t = (j > start ? j - start : 0); t < T; ++t) {
          float p = scores[t * end + j] / totals[t];
          float* o = out + t * H * hd + h * hd;
          for (int64_t i = 0; i < hd; ++i) o[i] += p * vj[i];
        }
      }
    }
    free(scores);
    free(totals);
  }
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
