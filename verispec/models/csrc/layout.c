/* The layout of verispec_kernels.h as this compiler lays it out: every structure's size and
   alignment, every field's offset and size, every code's value. tests/test_kernel_abi.py checks
   kernels.py's ctypes binding against it, entry for entry. A field added to a structure of the
   header needs its FIELD line here (the test compares the sets of fields both ways). */

#include <stddef.h>

#include "verispec_kernels.h"

typedef struct {
  const char* name;
  int64_t a, b;
} entry;

#define STRUCTURE(S) {#S, (int64_t)sizeof(S), (int64_t)_Alignof(S)}
#define FIELD(S, F) {#S "." #F, (int64_t)offsetof(S, F), (int64_t)sizeof(((S*)0)->F)}
#define CODE(C) {#C, (int64_t)(C), 0}

static const entry entries[] = {
  STRUCTURE(vs_part),
  FIELD(vs_part, form),
  FIELD(vs_part, weight),
  FIELD(vs_part, out_features),
  FIELD(vs_part, in_features),
  FIELD(vs_part, bias),
  FIELD(vs_part, column),

  STRUCTURE(vs_projection),
  FIELD(vs_projection, parts),
  FIELD(vs_projection, part),
  FIELD(vs_projection, out_features),

  STRUCTURE(vs_layer),
  FIELD(vs_layer, attn_norm),
  FIELD(vs_layer, qkv),
  FIELD(vs_layer, o),
  FIELD(vs_layer, mlp_norm),
  FIELD(vs_layer, gate_up),
  FIELD(vs_layer, down),

  STRUCTURE(vs_model),
  FIELD(vs_model, layers),
  FIELD(vs_model, hidden),
  FIELD(vs_model, heads),
  FIELD(vs_model, kv_heads),
  FIELD(vs_model, head_dim),
  FIELD(vs_model, ffn),
  FIELD(vs_model, eps),
  FIELD(vs_model, scale),
  FIELD(vs_model, cos),
  FIELD(vs_model, sin),
  FIELD(vs_model, layer),

  STRUCTURE(vs_attention),
  FIELD(vs_attention, mode),
  FIELD(vs_attention, keys),
  FIELD(vs_attention, values),
  FIELD(vs_attention, capacity),
  FIELD(vs_attention, start),
  FIELD(vs_attention, positions),
  FIELD(vs_attention, slots),
  FIELD(vs_attention, block_size),
  FIELD(vs_attention, segments),
  FIELD(vs_attention, seg_row),
  FIELD(vs_attention, seg_len),
  FIELD(vs_attention, seg_pos),
  FIELD(vs_attention, tables),
  FIELD(vs_attention, table_start),
  FIELD(vs_attention, parents),

  STRUCTURE(vs_scratch),
  FIELD(vs_scratch, h),
  FIELD(vs_scratch, qkv),
  FIELD(vs_scratch, attn),
  FIELD(vs_scratch, gate_up),
  FIELD(vs_scratch, act),

  CODE(VS_WIDEN_F16),
  CODE(VS_WIDEN_BF16),
  CODE(VS_BF16_DOT),
  CODE(VS_QUANTIZED),
  CODE(VS_QUANTIZED_Q8),
  CODE(VS_CONTIGUOUS),
  CODE(VS_PAGED),
  CODE(VS_ERROR_UNSUPPORTED),
  CODE(VS_ERROR_NO_MEMORY),
  CODE(VS_PANEL),
  CODE(VS_PANEL_AVX512),
  CODE(VS_ATTENTION_ROWS),
};

const char* vs_layout(int64_t i, int64_t* a, int64_t* b) {
  if (i < 0 || i >= (int64_t)(sizeof entries / sizeof entries[0])) return NULL;
  *a = entries[i].a;
  *b = entries[i].b;
  return entries[i].name;
}
