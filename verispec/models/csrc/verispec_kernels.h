/* The boundary of the lean backend's compiled library, declared once: every structure, code and
   function that one C file shares with another or that Python calls. Every source of the library
   includes this header; verispec/models/kernels.py binds it with ctypes, and
   tests/test_kernel_abi.py checks that binding against the library's own description of this
   header (vs_layout: every structure's size and alignment, every field's offset and size, every
   code's value) and every function's argument types against the prototypes below, so that a
   field reordered or retyped here without the same change there fails a test instead of
   corrupting memory.

   Built with the sources by setup.py at install, else by kernels.py on first use; the digest of
   what a library is built from (kernels.sources_digest) covers this header too. */

#ifndef VERISPEC_KERNELS_H
#define VERISPEC_KERNELS_H

#include <stdint.h>

/* ---- codes ---- */

/* Storage forms of a projection part (kernels.py: NATIVE_FORMS, QUANTIZED_FORM). */
enum {
  VS_WIDEN_F16 = 1,
  VS_WIDEN_BF16 = 2,
  VS_BF16_DOT = 3,       /* bfloat16 weights times activations rounded to bfloat16 (bf16_dot.c) */
  VS_QUANTIZED = 100,    /* + GGML type id: float activations (quant_linear.c) */
  VS_QUANTIZED_Q8 = 200, /* + GGML type id: activations quantized to 8 bits (quant_int8.c) */
};

/* vs_attention.mode (kernels.py: ATTENTION_CONTIGUOUS, ATTENTION_PAGED). */
enum { VS_CONTIGUOUS = 0, VS_PAGED = 1 };

/* What a kernel's nonzero return means (quant_linear, lean_layers, lean_greedy; kernels.py:
   KERNEL_ERRORS): a form or quantized type it does not run, or out of memory. */
enum { VS_ERROR_UNSUPPORTED = -1, VS_ERROR_NO_MEMORY = -2 };

/* Output columns per panel of a packed 16-bit weight (widen_linear.c), on the AVX2 path
   (kernels.py: PANEL) and the AVX-512 one; widen_panel() says which this CPU streams. */
#define VS_PANEL 24
#define VS_PANEL_AVX512 32

/* Query rows per contiguous attention call of the one-call step, as the per-call step splits a
   pass (lean.py: ATTENTION_ROWS): its scratch is rows x context. */
#define VS_ATTENTION_ROWS 256

/* ---- structures (kernels.py: VsPart, VsProjection, VsLayer, VsModel, VsAttention, VsScratch) ---- */

/* One stored matrix of a projection: y[:, column .. column + out_features) = x @ w^T (+ bias).
   A fused projection (q, k and v stacked) is one part where all of it is stored in one form, or
   several written side by side where its pieces are stored in different forms. */
typedef struct {
  int64_t form; /* VS_WIDEN_F16, VS_WIDEN_BF16, VS_BF16_DOT, or VS_QUANTIZED(_Q8) + GGML type id */
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
typedef struct {
  int64_t mode;
  float* const* keys; /* per layer */
  float* const* values;
  int64_t capacity, start;          /* contiguous */
  const int64_t *positions, *slots; /* paged, per row */
  int64_t block_size, segments;
  const int64_t *seg_row, *seg_len, *seg_pos, *tables, *table_start;
  const int64_t* parents; /* paged: NULL, or per row its parent's row (token trees, paged_attention) */
} vs_attention;

/* Per-pass buffers, T rows each: h (D), qkv ((H + 2 Hkv) hd), attn (H hd), gate_up (2 F), act (F). */
typedef struct {
  float *h, *qkv, *attn, *gate_up, *act;
} vs_scratch;

/* ---- functions ---- */

/* widen_linear.c: y (M rows, ldy apart) = x @ w^T (+ bias), or += it, w packed in panels. */
void widen_linear_f16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                      float* y, int64_t ldy, int accumulate, int threads);
void widen_linear_bf16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias,
                       float* y, int64_t ldy, int accumulate, int threads);
int widen_panel(void);
int widen_force_panel(int width);

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
                     const int64_t* seg_pos, const int64_t* tables, const int64_t* table_start,
                     const int64_t* parents, int64_t H, int64_t Hkv, int64_t hd, const float* keys,
                     const float* values, int64_t bs, float scale, float* out, int threads);
void silu_mul(const float* gate_up, int64_t T, int64_t F, float* out);

/* quant_linear.c: GGUF block-quantized weights; 0, VS_ERROR_UNSUPPORTED for a type it lacks, or
   (quant_linear) VS_ERROR_NO_MEMORY. */
int quant_linear(int type, const float* x, int64_t M, const uint8_t* w, int64_t N, int64_t K, const float* bias,
                 float* y, int64_t ldy, int accumulate, int threads);
int quant_dequantize(int type, const uint8_t* w, int64_t rows, int64_t K, float* out);
int quant_rows(int type, const uint8_t* w, int64_t K, const int64_t* ids, int64_t n, float* out);
int quant_set_lanes(int lanes);

/* quant_int8.c: the same weights, repacked at load (quant_q8_pack into quant_q8_packed_bytes; 0
   for a type it lacks), times activations quantized to 8 bits per block of 32 (integer dot
   products); 0, VS_ERROR_UNSUPPORTED or VS_ERROR_NO_MEMORY. quant_q8_isa: 0 the best this CPU
   has, 2 force AVX2 (tests); returns the one in use (512: AVX-512 VNNI, 2: AVX2). */
int64_t quant_q8_packed_bytes(int type, int64_t N, int64_t K);
int quant_q8_pack(int type, const uint8_t* w, int64_t N, int64_t K, uint8_t* out);
int quant_linear_q8(int type, const float* x, int64_t M, const uint8_t* packed, int64_t N, int64_t K, const float* bias,
                    float* y, int64_t ldy, int accumulate, int threads);
int quant_q8_isa(int isa);

/* bf16_dot.c: y = bf16(x) @ w^T (+ bias), or += it (--activations bf16), w packed at load: by
   bf16_pack (into bf16_packed_bytes) where bf16_dot_amx(0) is 1 (AMX tiles), else in widen_linear.c's
   panels; 0 or VS_ERROR_NO_MEMORY. bf16_dot_amx: 0 asks which path is in use (the best this CPU
   has, unless forced), -1 forces the widened path (tests), 1 goes back to the best; it returns 1
   where AMX is in use. Weights packed for one path must not be passed after a switch. */
int bf16_dot_amx(int choice);
int64_t bf16_packed_bytes(int64_t N, int64_t K);
void bf16_pack(const uint16_t* w, int64_t N, int64_t K, uint16_t* out);
int bf16_linear(const float* x, int64_t M, const uint16_t* packed, int64_t N, int64_t K, const float* bias, float* y,
                int64_t ldy, int accumulate, int threads);

/* lean_step.c: every layer of a pass in one call, and the draft model's greedy loop; 0, or a
   VS_ERROR_ code. */
int lean_layers(const vs_model* model, float* x, int64_t T, const vs_attention* kv, const vs_scratch* scratch,
                int threads);
int lean_greedy(const vs_model* model, const float* embed, const float* norm, const vs_projection* head,
                int64_t vocab, vs_attention* kv, const vs_scratch* scratch, float* x, float* h, float* logits,
                int64_t token, int64_t steps, int64_t* out, int threads);
int lean_greedy_paged(const vs_model* model, const float* embed, const float* norm, const vs_projection* head,
                      int64_t vocab, const vs_attention* kv, const vs_scratch* scratch, float* x, float* h,
                      float* logits, int64_t S, int64_t* tokens, int64_t* positions, int64_t steps, int64_t* out,
                      int threads, const vs_projection* fc, const int64_t* d2t, float* features, float* joined);

/* layout.c: entry i of this header's layout, for the binding's test; NULL past the last. A
   structure "vs_part": *a = sizeof, *b = alignof. A field "vs_part.form": *a = offsetof, *b =
   sizeof. A code "VS_PAGED": *a = its value, *b = 0. */
const char* vs_layout(int64_t i, int64_t* a, int64_t* b);

#endif
