/* The kernels' work shared out among OpenMP threads, either by the kernel's own parallel region or
   by the region of a whole step (lean_step.c: lean_layers runs every layer of a pass inside one
   region, its threads staying in the step from operation to operation instead of a fork and a
   join for each of the 200-odd operations of a pass).

   A kernel's body is written once, for "the team": every thread of the current team calls it,
   and its loops are `omp for` worksharing loops that split their iterations among the team (an
   orphaned `omp for` binds to the innermost enclosing region; with none, it runs them all). What
   an output is computed from does not depend on which thread computes it, so the bits are the same
   whoever takes which iterations. The projections' loops are scheduled `guided` (shrinking chunks
   handed out as threads ask): the first chunks are long runs of contiguous weights, as a static
   split gives, which the hardware prefetcher streams well (chunks of 4 tiles handed out dynamically
   were 19% slower on a quantized decode step), and the last are small, so when another process
   takes a core the thread still running takes more of the remaining work instead of waiting. */

#ifndef VERISPEC_TEAM_H
#define VERISPEC_TEAM_H

#include <omp.h>
#include <stdint.h>

/* Run `call` on the current team inside a parallel region, else on a team of `threads` of its own
   (`call` may read and write the caller's locals: they are shared by that region). */
#define VS_TEAM(threads, call)                                                                \
  do {                                                                                        \
    if (omp_get_level() > 0) {                                                                \
      call;                                                                                   \
    } else {                                                                                  \
      int vs_team_size_ = (threads) > 0 ? (threads) : 1;                                      \
      _Pragma("omp parallel num_threads(vs_team_size_)") { call; }                            \
    }                                                                                         \
  } while (0)

/* What the team of a step shares: the first error a kernel met inside a loop (written by the
   thread that met it, read by all after the loop's closing barrier), and the quantized
   activations of the q8 path (made by one thread, read by all). Zeroed before the region. */
typedef struct {
  int failed;
  void* acts;
} vs_shared;

/* The team bodies of the projections (every thread of the team calls them). */
void widen_team_f16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias, float* y,
                    int64_t ldy, int accumulate);
void widen_team_bf16(const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, const float* bias, float* y,
                     int64_t ldy, int accumulate);
/* 0, or the error every thread gets alike (a type it lacks); an error met by one thread's tile
   (out of memory) goes to shared->failed instead. */
int quant_team(int type, const float* x, int64_t M, const uint8_t* w, int64_t N, int64_t K, const float* bias,
               float* y, int64_t ldy, int accumulate, vs_shared* shared);
int quant_q8_team(int type, const float* x, int64_t M, const uint8_t* packed, int64_t N, int64_t K,
                  const float* bias, float* y, int64_t ldy, int accumulate, vs_shared* shared);
int bf16_team(const float* x, int64_t M, const uint16_t* packed, int64_t N, int64_t K, const float* bias, float* y,
              int64_t ldy, int accumulate, vs_shared* shared);
void attention_team(const float* qkv, int64_t T, int64_t H, int64_t Hkv, int64_t hd, const float* keys,
                    const float* values, int64_t P, int64_t start, float scale, float* out);
void paged_attention_team(const float* qkv, int64_t S, const int64_t* seg_row, const int64_t* seg_len,
                          const int64_t* seg_pos, const int64_t* tables, const int64_t* table_start,
                          const int64_t* parents, int64_t H, int64_t Hkv, int64_t hd, const float* keys,
                          const float* values, int64_t bs, float scale, float* out);

#endif
