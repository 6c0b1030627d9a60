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
        float top = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          row[j] = dot(q, k + j * hd, hd) * scale;
          if (row[j] > top) top = row[j];
        }
        float total = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          row[j] = expf(row[j] - top);
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
    for (int64_t i = 0; i < F; ++i) out[t * F + i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
  }
}
