/* Every layer of a lean Llama-family pass in one call: for each layer, RMSNorm, the fused QKV
   projection, rotary embedding with the write into the KV cache, attention, the output projection
   added to the residual, RMSNorm, the fused gate/up projection, SwiGLU and the down projection
   added to the residual.

   From Python each of those is a ctypes call, about 8 per layer: on a small draft model their
   fixed cost (argument conversion, releasing and taking the GIL, tensor bookkeeping around them)
   was most of a step. Here the loop over layers runs in C and calls the same functions
   (layer_ops.c, widen_linear.c) with the same arguments in the same order as that per-call loop
   did, so the result is the same bits; the embedding, the final norm and the LM head stay with
   the caller (LeanLM.kernel_pass in verispec/models/lean.py).

   What a pass needs is described by plain structures that the caller builds once (the model, its
   layers and projections, the per-layer cache pointers) or per pass (positions, segments):
   kernels.py mirrors them with ctypes. A projection is a list of parts, each a stored matrix
   writing its own columns of the output: one part for a 16-bit widened weight (widen_linear.c), or,
   for a GGUF checkpoint, a fused projection whose q, k and v pieces may be stored in different
   quantized types side by side (quant_linear.c). Built with the other sources by
   verispec/models/kernels.py. */

#include <stdint.h>
#include <string.h>

/* layer_ops.c */
void rms_norm(const float* x, int64_t T, int64_t D, const float* weight, float eps, float* out);
void rope_store(float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* cos_table,
                const float* sin_table, int64_t start, float* keys, float* values, int64_t P);
void attention(const float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* keys,
               const float* values, int64_t P, int64_t start, float scale, float* out, int threads);
void rope_store_paged(float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* cos_table,
                      const float* sin_table, const int64_t* positions, const int64_t* slots, float* keys,
                      float* values, int64_t bs);
void paged_attention(const float* qkv, int64_t S, const int64_t* seg_row, const int64_t* seg_len,
                     const int64_t* seg_pos, const int64_t* tables, const int64_t* table_start, int64_t H,
                     int64_t Hkv, int64_t hd, const float* keys, const float* values, int64_t bs, float scale,
                     float* out, int threads);
void silu_mul(const float* gate_up, int64_t T, int64_t F, float* out);

/* quant_linear.c: 0, or nonzero for a type it lacks (-1) or out of memory (-2) */
int quant_linear(int type, const float* x, int64_t M, const uint8_t* w, int64_t N, int64_t K, const float* bias,
                 float* y, int64_t ldy, int accumulate, int threads);

/* widen_linear.c */
void widen_linear_f16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                      float* y, int64_t ldy, int accumulate, int threads);
void widen_linear_bf16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                       float* y, int64_t ldy, int accumulate, int threads);

/* Storage forms of a projection part (kernels.py: NATIVE_FORMS). */
enum { VS_WIDEN_F16 = 1, VS_WIDEN_BF16 = 2, VS_QUANTIZED = 100 /* + GGML type id */ };

/* One stored matrix of a projection: y[:, column .. column + out_features) = x @ w^T (+ bias).
   A fused projection (q, k and v stacked) is one part where all of it is stored in one form, or
   several written side by side where its pieces are stored in different forms. */
typedef struct {
  int64_t form;
  const void* weight;
  int64_t out_features, in_features;
  const float* bias; /* this part's out_features values, or NULL */
  int64_t column;
} vs_part;

typedef struct {
  int64_t parts;
  const vs_part* part;
  int64_t out_features; /* the output's row stride */
} vs_projection;

typedef struct {
  const float* attn_norm;
  vs_projection qkv; /* D -> (H + 2 Hkv) hd */
  vs_projection o;   /* H hd -> D, added to the residual */
  const float* mlp_norm;
  vs_projection gate_up; /* D -> 2 F */
  vs_projection down;    /* F -> D, added to the residual */
} vs_layer;

typedef struct {
  int64_t layers, hidden, heads, kv_heads, head_dim, ffn;
  float eps, scale;       /* RMSNorm epsilon; attention scale, hd^-0.5 */
  const float *cos, *sin; /* rotary tables, (positions, hd) */
  const vs_layer* layer;
} vs_model;

/* Where a pass's keys and values go and what its rows attend to.
   VS_CONTIGUOUS: one sequence, rows at positions start.., per layer a key and a value cache of
   (Hkv, capacity, hd) (LeanSession). VS_PAGED: rows of several sequences, per layer a key and a
   value pool of (blocks, Hkv, block_size, hd), each row's position and slot, and the segments as
   paged_attention takes them (core/runner.py). */
enum { VS_CONTIGUOUS = 0, VS_PAGED = 1 };

typedef struct {
  int64_t mode;
  float* const* keys; /* per layer */
  float* const* values;
  int64_t capacity, start;          /* contiguous */
  const int64_t *positions, *slots; /* paged, per row */
  int64_t block_size, segments;
  const int64_t *seg_row, *seg_len, *seg_pos, *tables, *table_start;
} vs_attention;

/* Per-pass buffers, T rows each: h (D), qkv ((H + 2 Hkv) hd), attn (H hd), gate_up (2 F), act (F). */
typedef struct {
  float *h, *qkv, *attn, *gate_up, *act;
} vs_scratch;

/* Query rows per contiguous attention call, as the per-call step splits a pass (lean.py:
   ATTENTION_ROWS): its scratch is rows x context. */
#define ATTENTION_ROWS 256

/* Whether every part of a projection has a form this file knows (quant_linear may still refuse
   a quantized type it lacks). */
static int runnable(const vs_projection* projection) {
  for (int64_t i = 0; i < projection->parts; ++i) {
    int64_t form = projection->part[i].form;
    if (form != VS_WIDEN_F16 && form != VS_WIDEN_BF16 && form < VS_QUANTIZED) return 0;
  }
  return 1;
}

/* y (M rows of projection->out_features floats) = x @ W^T (+ bias), or += it; 0, or quant_linear's
   error. */
static int project(const vs_projection* projection, const float* x, int64_t M, float* y, int accumulate,
                   int threads) {
  for (int64_t i = 0; i < projection->parts; ++i) {
    const vs_part* p = projection->part + i;
    float* out = y + p->column;
    switch (p->form) {
      case VS_WIDEN_F16:
        widen_linear_f16(x, M, p->weight, p->out_features, p->in_features, p->bias, out, projection->out_features,
                         accumulate, threads);
        break;
      case VS_WIDEN_BF16:
        widen_linear_bf16(x, M, p->weight, p->out_features, p->in_features, p->bias, out, projection->out_features,
                          accumulate, threads);
        break;
      default: { /* VS_QUANTIZED + GGML type id */
        int failed = quant_linear((int)(p->form - VS_QUANTIZED), x, M, p->weight, p->out_features, p->in_features,
                                  p->bias, out, projection->out_features, accumulate, threads);
        if (failed) return failed;
      }
    }
  }
  return 0;
}

/* Store the rows' rotated keys and values in layer i's cache, and write their attention output. */
static void attend(const vs_model* m, const vs_attention* a, int64_t i, float* qkv, int64_t T, float* attn,
                   int threads) {
  int64_t H = m->heads, Hkv = m->kv_heads, hd = m->head_dim, width = (H + 2 * Hkv) * hd;
  float *keys = a->keys[i], *values = a->values[i];
  if (a->mode == VS_PAGED) {
    rope_store_paged(qkv, T, H, Hkv, hd, m->cos, m->sin, a->positions, a->slots, keys, values, a->block_size);
    paged_attention(qkv, a->segments, a->seg_row, a->seg_len, a->seg_pos, a->tables, a->table_start, H, Hkv, hd,
                    keys, values, a->block_size, m->scale, attn, threads);
    return;
  }
  rope_store(qkv, T, H, Hkv, hd, m->cos, m->sin, a->start, keys, values, a->capacity);
  for (int64_t first = 0; first < T; first += ATTENTION_ROWS) { /* bounded scratch: rows are independent */
    int64_t rows = T - first < ATTENTION_ROWS ? T - first : ATTENTION_ROWS;
    attention(qkv + first * width, rows, H, Hkv, hd, keys, values, a->capacity, a->start + first, m->scale,
              attn + first * H * hd, threads);
  }
}

/* Run every layer over the T rows of the residual stream x (T, D), in place. 0 on success; -1,
   before touching anything, if a projection has a form this file does not know or the attention
   mode is unknown; quant_linear's error if it refuses a part (x and the cache rows of the pass are
   then partly written). */
int lean_layers(const vs_model* model, float* x, int64_t T, const vs_attention* kv, const vs_scratch* scratch,
                int threads) {
  int64_t D = model->hidden, F = model->ffn;
  int failed;
  if (kv->mode != VS_CONTIGUOUS && kv->mode != VS_PAGED) return -1;
  for (int64_t i = 0; i < model->layers; ++i) {
    const vs_layer* layer = model->layer + i;
    if (!runnable(&layer->qkv) || !runnable(&layer->o) || !runnable(&layer->gate_up) || !runnable(&layer->down))
      return -1;
  }
  for (int64_t i = 0; i < model->layers; ++i) {
    const vs_layer* layer = model->layer + i;
    rms_norm(x, T, D, layer->attn_norm, model->eps, scratch->h);
    if ((failed = project(&layer->qkv, scratch->h, T, scratch->qkv, 0, threads))) return failed;
    attend(model, kv, i, scratch->qkv, T, scratch->attn, threads);
    if ((failed = project(&layer->o, scratch->attn, T, x, 1, threads))) return failed;
    rms_norm(x, T, D, layer->mlp_norm, model->eps, scratch->h);
    if ((failed = project(&layer->gate_up, scratch->h, T, scratch->gate_up, 0, threads))) return failed;
    silu_mul(scratch->gate_up, T, F, scratch->act);
    if ((failed = project(&layer->down, scratch->act, T, x, 1, threads))) return failed;
  }
  return 0;
}

/* The draft model's inner loop, greedy: feed `token` at position kv->start, take the first
   maximal logit among the first `vocab` as the next token, feed it, and so on, `steps` times;
   out[0..steps) are the tokens chosen, kv->start advances by `steps`. Each step is the single-row
   pass of the Python path (embedding row, lean_layers, final rms_norm, head projection) with the
   same calls in the same order, so the tokens are those a Python loop would choose; what is saved
   is Python's and torch's fixed cost per step, most of a small draft's step. x, h: D floats;
   logits: head->out_features floats. 0, or lean_layers' or the head's error. */
int lean_greedy(const vs_model* model, const float* embed, const float* norm, const vs_projection* head,
                int64_t vocab, vs_attention* kv, const vs_scratch* scratch, float* x, float* h, float* logits,
                int64_t token, int64_t steps, int64_t* out, int threads) {
  int64_t D = model->hidden;
  if (kv->mode != VS_CONTIGUOUS || !runnable(head)) return -1;
  if (vocab > head->out_features) vocab = head->out_features;
  for (int64_t s = 0; s < steps; ++s) {
    memcpy(x, embed + token * D, (size_t)D * sizeof(float));
    int failed = lean_layers(model, x, 1, kv, scratch, threads);
    if (failed) return failed;
    kv->start += 1;
    rms_norm(x, 1, D, norm, model->eps, h);
    if ((failed = project(head, h, 1, logits, 0, threads))) return failed;
    int64_t best = 0;
    for (int64_t v = 1; v < vocab; ++v)
      if (logits[v] > logits[best]) best = v; /* the first maximal one, as torch.argmax */
    out[s] = token = best;
  }
  return 0;
}
