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
   layers and projections, the per-layer cache pointers) or per pass (positions, segments),
   declared with the functions it calls in verispec_kernels.h, which kernels.py binds with ctypes
   (tests/test_kernel_abi.py checks the two agree). A projection is a list of parts, each a stored matrix
   writing its own columns of the output: one part for a 16-bit widened weight (widen_linear.c), or,
   for a GGUF checkpoint, a fused projection whose q, k and v pieces may be stored in different
   quantized types side by side (quant_linear.c). Built with the other sources by
   verispec/models/kernels.py. */

#include <stdlib.h>
#include <string.h>

#include "team.h"
#include "verispec_kernels.h"

/* Whether every part of a projection has a form this file knows (quant_linear may still refuse
   a quantized type it lacks). */
static int runnable(const vs_projection* projection) {
  for (int64_t i = 0; i < projection->parts; ++i) {
    int64_t form = projection->part[i].form;
    if (form != VS_WIDEN_F16 && form != VS_WIDEN_BF16 && form != VS_BF16_DOT && form < VS_QUANTIZED) return 0;
  }
  return 1;
}

/* y (M rows of projection->out_features floats) = x @ W^T (+ bias), or += it, by the team of the
   step (team.h: every thread calls it); 0, or the error every thread gets alike; an error met by
   one thread (out of memory) goes to shared->failed. */
static int project(const vs_projection* projection, const float* x, int64_t M, float* y, int accumulate,
                   vs_shared* shared) {
  for (int64_t i = 0; i < projection->parts; ++i) {
    const vs_part* p = projection->part + i;
    float* out = y + p->column;
    int64_t ldy = projection->out_features;
    int failed = 0;
    switch (p->form) {
      case VS_WIDEN_F16:
        widen_team_f16(x, M, p->weight, p->out_features, p->in_features, p->bias, out, ldy, accumulate);
        break;
      case VS_WIDEN_BF16:
        widen_team_bf16(x, M, p->weight, p->out_features, p->in_features, p->bias, out, ldy, accumulate);
        break;
      case VS_BF16_DOT:
        failed = bf16_team(x, M, p->weight, p->out_features, p->in_features, p->bias, out, ldy, accumulate, shared);
        break;
      default: { /* VS_QUANTIZED or VS_QUANTIZED_Q8 + GGML type id */
        int q8 = p->form >= VS_QUANTIZED_Q8;
        failed = (q8 ? quant_q8_team : quant_team)((int)(p->form - (q8 ? VS_QUANTIZED_Q8 : VS_QUANTIZED)), x, M,
                                                   p->weight, p->out_features, p->in_features, p->bias, out, ldy,
                                                   accumulate, shared);
      }
    }
    if (failed) return failed;
    if (shared->failed) return shared->failed; /* read after the loop's closing barrier: alike for all */
  }
  return 0;
}

/* Record a thread's error for the whole team (read once the team has left the region). */
static void keep_failure(vs_shared* shared, int failed) {
  if (failed) {
    #pragma omp atomic write
    shared->failed = failed;
  }
}

/* The T rows of a row-wise operation shared out among the team (one thread for a single row). */
#define EACH_ROW(T, t) _Pragma("omp for schedule(static)") for (int64_t t = 0; t < (T); ++t)

/* Store the rows' rotated keys and values in layer i's cache, and write their attention output. */
static void attend(const vs_model* m, const vs_attention* a, int64_t i, float* qkv, int64_t T, float* attn) {
  int64_t H = m->heads, Hkv = m->kv_heads, hd = m->head_dim, width = (H + 2 * Hkv) * hd;
  float *keys = a->keys[i], *values = a->values[i];
  if (a->mode == VS_PAGED) {
    EACH_ROW(T, t)
    rope_store_paged(qkv + t * width, 1, H, Hkv, hd, m->cos, m->sin, a->positions + t, a->slots + t, keys, values,
                     a->block_size);
    paged_attention_team(qkv, a->segments, a->seg_row, a->seg_len, a->seg_pos, a->tables, a->table_start,
                         a->parents, H, Hkv, hd, keys, values, a->block_size, m->scale, attn);
    return;
  }
  EACH_ROW(T, t)
  rope_store(qkv + t * width, 1, H, Hkv, hd, m->cos, m->sin, a->start + t, keys, values, a->capacity);
  for (int64_t first = 0; first < T; first += VS_ATTENTION_ROWS) { /* bounded scratch: rows are independent */
    int64_t rows = T - first < VS_ATTENTION_ROWS ? T - first : VS_ATTENTION_ROWS;
    attention_team(qkv + first * width, rows, H, Hkv, hd, keys, values, a->capacity, a->start + first, m->scale,
                   attn + first * H * hd);
  }
}

/* Run every layer over the T rows of the residual stream x (T, D), in place, in one parallel region
   of `threads` (team.h): each operation's work is shared out among threads that stay in the step.
   0 on success; -1, before touching anything, if a projection has a form this file does not know
   or the attention mode is unknown; quant_linear's error if it refuses a part (x and the cache
   rows of the pass are then partly written). */
int lean_layers(const vs_model* model, float* x, int64_t T, const vs_attention* kv, const vs_scratch* scratch,
                int threads) {
  int64_t D = model->hidden, F = model->ffn;
  if (kv->mode != VS_CONTIGUOUS && kv->mode != VS_PAGED) return VS_ERROR_UNSUPPORTED;
  for (int64_t i = 0; i < model->layers; ++i) {
    const vs_layer* layer = model->layer + i;
    if (!runnable(&layer->qkv) || !runnable(&layer->o) || !runnable(&layer->gate_up) || !runnable(&layer->down))
      return VS_ERROR_UNSUPPORTED;
  }
  vs_shared shared = {0, NULL};
  int team = threads > 0 ? threads : 1;
  #pragma omp parallel num_threads(team)
  {
    int failed = 0;
    for (int64_t i = 0; i < model->layers && !failed; ++i) {
      const vs_layer* layer = model->layer + i;
      EACH_ROW(T, t) rms_norm(x + t * D, 1, D, layer->attn_norm, model->eps, scratch->h + t * D);
      if ((failed = project(&layer->qkv, scratch->h, T, scratch->qkv, 0, &shared))) break;
      attend(model, kv, i, scratch->qkv, T, scratch->attn);
      if ((failed = project(&layer->o, scratch->attn, T, x, 1, &shared))) break;
      EACH_ROW(T, t) rms_norm(x + t * D, 1, D, layer->mlp_norm, model->eps, scratch->h + t * D);
      if ((failed = project(&layer->gate_up, scratch->h, T, scratch->gate_up, 0, &shared))) break;
      EACH_ROW(T, t) silu_mul(scratch->gate_up + t * 2 * F, 1, F, scratch->act + t * F);
      if ((failed = project(&layer->down, scratch->act, T, x, 1, &shared))) break;
    }
    keep_failure(&shared, failed);
  }
  return shared.failed;
}

/* The head's projection, on a team of its own. */
static int project_alone(const vs_projection* head, const float* h, int64_t M, float* logits, int threads) {
  vs_shared shared = {0, NULL};
  VS_TEAM(threads, keep_failure(&shared, project(head, h, M, logits, 0, &shared)));
  return shared.failed;
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
  if (kv->mode != VS_CONTIGUOUS || !runnable(head)) return VS_ERROR_UNSUPPORTED;
  if (vocab > head->out_features) vocab = head->out_features;
  for (int64_t s = 0; s < steps; ++s) {
    memcpy(x, embed + token * D, (size_t)D * sizeof(float));
    int failed = lean_layers(model, x, 1, kv, scratch, threads);
    if (failed) return failed;
    kv->start += 1;
    rms_norm(x, 1, D, norm, model->eps, h);
    if ((failed = project_alone(head, h, 1, logits, threads))) return failed;
    int64_t best = 0;
    for (int64_t v = 1; v < vocab; ++v)
      if (logits[v] > logits[best]) best = v; /* the first maximal one, as torch.argmax */
    out[s] = token = best;
  }
  return 0;
}

/* lean_greedy over S sequences of the paged cache at once (the batched draft model's loop): row s
   feeds tokens[s] at position positions[s] of its sequence, whose block table starts at
   kv->tables + kv->table_start[s] (blocks reserved for every position the steps reach), takes
   the first maximal logit among the first `vocab` as its next token, feeds it, and so on, `steps`
   times; out[s * steps + i] is row s's i-th choice; tokens[s] ends as its last choice and
   positions[s] advances by `steps`. Each step is the pass the runner makes for these rows (every
   row computed alone, lean_layers over S rows, final rms_norm, head projection), so row s's tokens
   are those a pass per step would choose, whatever the other rows. x, h: S x D floats; logits:
   S x head->out_features floats; scratch: S rows. 0, or lean_layers' or the head's error.

   A draft head (fc not NULL, models/head.py) reads a vector beside each token: row s's input is
   fc over [its token's embedding, features[s]] (joined: S x 2D floats), features[s] being what the
   head predicted at the row before; features[s] then becomes this row's normed output, and the
   chosen draft id maps to the verifier's token through d2t, as the runner's passes do it. */
int lean_greedy_paged(const vs_model* model, const float* embed, const float* norm, const vs_projection* head,
                      int64_t vocab, const vs_attention* kv, const vs_scratch* scratch, float* x, float* h,
                      float* logits, int64_t S, int64_t* tokens, int64_t* positions, int64_t steps, int64_t* out,
                      int threads, const vs_projection* fc, const int64_t* d2t, float* features, float* joined) {
  if (kv->mode != VS_PAGED || !runnable(head) || (fc && !runnable(fc))) return VS_ERROR_UNSUPPORTED;
  int64_t D = model->hidden, V = head->out_features, bs = kv->block_size;
  if (vocab > V) vocab = V;
  int64_t* work = malloc(sizeof(int64_t) * 3 * (size_t)S);
  if (!work) return VS_ERROR_NO_MEMORY;
  int64_t *slots = work, *seg_row = work + S, *seg_len = work + 2 * S;
  vs_attention a = *kv; /* the rows' positions are their segments' first positions */
  a.positions = positions;
  a.slots = slots;
  a.segments = S;
  a.seg_row = seg_row;
  a.seg_len = seg_len;
  a.seg_pos = positions;
  a.parents = NULL;
  for (int64_t s = 0; s < S; ++s) {
    seg_row[s] = s;
    seg_len[s] = 1;
  }
  int failed = 0;
  for (int64_t i = 0; i < steps; ++i) {
    for (int64_t s = 0; s < S; ++s) {
      int64_t p = positions[s];
      slots[s] = kv->tables[kv->table_start[s] + p / bs] * bs + p % bs;
      if (fc) {
        memcpy(joined + s * 2 * D, embed + tokens[s] * D, (size_t)D * sizeof(float));
        memcpy(joined + s * 2 * D + D, features + s * D, (size_t)D * sizeof(float));
      } else {
        memcpy(x + s * D, embed + tokens[s] * D, (size_t)D * sizeof(float));
      }
    }
    if (fc && (failed = project_alone(fc, joined, S, x, threads))) break;
    if ((failed = lean_layers(model, x, S, &a, scratch, threads))) break;
    rms_norm(x, S, D, norm, model->eps, h);
    if ((failed = project_alone(head, h, S, logits, threads))) break;
    for (int64_t s = 0; s < S; ++s) {
      const float* row = logits + s * V;
      int64_t best = 0;
      for (int64_t v = 1; v < vocab; ++v)
        if (row[v] > row[best]) best = v; /* the first maximal one, as torch.argmax */
      out[s * steps + i] = tokens[s] = d2t ? d2t[best] : best;
      if (features) memcpy(features + s * D, h + s * D, (size_t)D * sizeof(float));
      positions[s] += 1;
    }
  }
  free(work);
  return failed;
}
