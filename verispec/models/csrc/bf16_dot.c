/* bfloat16 dot products (--activations bf16): y = bf16(x) @ w^T (+ bias), or += it, for a weight
   stored in bfloat16, each row of x rounded to bfloat16 (to nearest even) and every product summed
   in float32. A change of model, chosen by the user, as 8-bit activations are (quant_int8.c).

   Where the CPU has AMX (Intel Sapphire Rapids and later) and the kernel lets this process use its
   tiles, the sums run on them: TDPBF16PS multiplies a 16-row tile of activations by a tile of 32
   weights per output column and adds into a 16 x 16 tile of float32 sums, 8,192 multiply-adds an
   instruction, against 16 for a float32 FMA. A prompt's wide pass is bound by its multiply-adds
   (performance.md, "What the prompt's share leaves to speculation"), so this is where it gets
   cheaper. The weight is packed at load (bf16_pack) in the tiles' layout: for each block of 16
   output columns, for each chunk of 32 inputs, 16 rows of (column, pair) = 1 KB.

   Every output is the same bits at any number of rows: its sum starts at zero in a tile and takes
   the chunks of 32 inputs in order, whatever tile holds it and whatever rows share the tile (a
   tile's rows never mix), so a position's logits are the same decoded alone, verified among k+1
   positions or in a batch, and a prompt's keys and values the same however it is chunked.

   Elsewhere the same model runs on widen_linear.c's bfloat16 kernel (its panels, packed by
   kernels.py) over the activations rounded here: the same products, summed in another order, so
   the bits differ from an AMX machine's and are again the same at any number of rows.
   bf16_dot_amx says which one this process runs. */

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"
#include "verispec_kernels.h"

#if defined(__linux__) && defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define VS_AMX_BUILT 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define VS_AMX_BUILT 0
#endif

#define COLUMNS 16                /* output columns of a tile */
#define CHUNK 32                  /* inputs of a tile row: 16 pairs of bfloat16 */
#define BLOCK (COLUMNS * CHUNK)   /* bfloat16 values of one packed (columns, chunk) block */

static int64_t chunks_of(int64_t K) { return (K + CHUNK - 1) / CHUNK; }
/* Output blocks, a multiple of 4: a pass of up to 16 rows takes four at a time, a wider one two
   (zero blocks at the end). */
static int64_t column_blocks_of(int64_t N) { return 4 * ((N + 4 * COLUMNS - 1) / (4 * COLUMNS)); }

int64_t bf16_packed_bytes(int64_t N, int64_t K) { return column_blocks_of(N) * chunks_of(K) * BLOCK * 2; }

void bf16_pack(const uint16_t* w, int64_t N, int64_t K, uint16_t* out) {
  int64_t chunks = chunks_of(K), blocks = column_blocks_of(N);
  memset(out, 0, bf16_packed_bytes(N, K));
  for (int64_t b = 0; b < blocks; ++b)
    for (int64_t c = 0; c < chunks; ++c) {
      uint16_t* block = out + (b * chunks + c) * BLOCK;
      for (int64_t pair = 0; pair < CHUNK / 2; ++pair)
        for (int64_t n = 0; n < COLUMNS; ++n)
          for (int64_t half = 0; half < 2; ++half) {
            int64_t row = b * COLUMNS + n, k = c * CHUNK + 2 * pair + half;
            if (row < N && k < K) block[(pair * COLUMNS + n) * 2 + half] = w[row * K + k];
          }
    }
}

/* float -> bfloat16, to nearest even (a NaN stays a NaN). */
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* A thread's rounded rows, kept from pass to pass and grown as needed; NULL out of memory. */
static __thread uint16_t* own_rows;
static __thread int64_t own_capacity;

static uint16_t* rows_buffer(int64_t elements) {
  if (elements > own_capacity) {
    free(own_rows);
    own_rows = aligned_alloc(64, (elements * 2 + 63) / 64 * 64);
    own_capacity = own_rows ? elements : 0;
  }
  return own_rows;
}

/* ---- AMX ---- */

#if VS_AMX_BUILT
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl")

typedef struct {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
} tile_config;

/* Every tile 16 rows of 64 bytes. Tiles 0-3 hold sums: two row blocks x two column blocks
   (sums_32_rows, activations in 4 and 5, weights in 6 and 7), or one row block x four column
   blocks (sums_16_rows, activations in 4, weights in 5, 6 and 7). */
static void configure_tiles(void) {
  tile_config config;
  memset(&config, 0, sizeof config);
  config.palette = 1;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
}

/* Tiles 0-3, the sums, to zero: every output's sum starts there. */
static inline void zero_sums(void) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

/* Sums of 32 rows (a, lda bfloat16 apart) by two column blocks (w0, w1) into out (32 x 32). */
static void sums_32_rows(const uint16_t* a, int64_t lda, const uint16_t* w0, const uint16_t* w1, int64_t chunks,
                         float* out) {
  zero_sums();
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, a + c * CHUNK, lda * 2);
    _tile_loadd(5, a + 16 * lda + c * CHUNK, lda * 2);
    _tile_loadd(6, w0 + c * BLOCK, 64);
    _tile_loadd(7, w1 + c * BLOCK, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, 2 * COLUMNS * 4);
  _tile_stored(1, out + COLUMNS, 2 * COLUMNS * 4);
  _tile_stored(2, out + 16 * 2 * COLUMNS, 2 * COLUMNS * 4);
  _tile_stored(3, out + 16 * 2 * COLUMNS + COLUMNS, 2 * COLUMNS * 4);
}

/* Sums of 16 rows (a pass of up to 16 rows: decode, verify, a draft) by four column blocks (w, the
   next three chunks * BLOCK apart) into out (16 x 64): four chains of sums in flight, where two
   would wait on each other's latency. Each output's sum is the same as sums_32_rows makes. */
static void sums_16_rows(const uint16_t* a, int64_t lda, const uint16_t* w, int64_t chunks, float* out) {
  zero_sums();
  for (int64_t c = 0; c < chunks; ++c) {
    _tile_loadd(4, a + c * CHUNK, lda * 2);
    _tile_loadd(5, w + c * BLOCK, 64);
    _tile_loadd(6, w + (chunks + c) * BLOCK, 64);
    _tile_loadd(7, w + (2 * chunks + c) * BLOCK, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, w + (3 * chunks + c) * BLOCK, 64);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, out, 4 * COLUMNS * 4);
  _tile_stored(1, out + COLUMNS, 4 * COLUMNS * 4);
  _tile_stored(2, out + 2 * COLUMNS, 4 * COLUMNS * 4);
  _tile_stored(3, out + 3 * COLUMNS, 4 * COLUMNS * 4);
}

/* rows x valid columns of sums (blocks x 16 columns, as many apart) into y: + bias, then written
   or added. */
static void store_sums(const float* sums, int64_t blocks, int64_t rows, int64_t valid, const float* bias, float* y,
                       int64_t ldy, int accumulate) {
  for (int64_t block = 0; block < blocks; ++block) {
    int64_t n = valid - block * COLUMNS;
    if (n <= 0) break;
    __mmask16 mask = n >= COLUMNS ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
    __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + block * COLUMNS) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      __m512 s = _mm512_loadu_ps(sums + r * blocks * COLUMNS + block * COLUMNS);
      if (bias) s = _mm512_add_ps(s, b);
      float* out = y + r * ldy + block * COLUMNS;
      if (accumulate) s = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), s);
      _mm512_mask_storeu_ps(out, mask, s);
    }
  }
}

/* x's M rows rounded into a, each padded with zeros to whole chunks (a's rows past M are left as
   they are: a tile's rows never mix, so theirs are sums no one stores). */
static void round_rows(const float* x, int64_t M, int64_t K, uint16_t* a, int64_t lda) {
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    uint16_t* to = a + m * lda;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m512i u = _mm512_castps_si512(_mm512_loadu_ps(row + k));
      /* to nearest even, as to_bf16 (finite values: activations of a model) */
      __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
      _mm256_storeu_si256((__m256i*)(to + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    }
    for (; k < K; ++k) to[k] = to_bf16(row[k]);
    for (; k < lda; ++k) to[k] = 0;
  }
}

/* The team body on AMX: every thread rounds the rows into its own buffer (no wait for one thread
   to do it: a decode step's row is a few hundred values), then the column blocks are shared out
   four at a time (up to 16 rows) or two at a time (in blocks of 32 rows), each thread running its
   own tiles. Out of memory sets shared->failed, and that thread's blocks are not written. */
static void amx_team(const float* x, int64_t M, const uint16_t* packed, int64_t N, int64_t K, const float* bias,
                     float* y, int64_t ldy, int accumulate, vs_shared* shared) {
  int64_t chunks = chunks_of(K), lda = chunks * CHUNK;
  int64_t padded = M <= 16 ? 16 : (M + 31) / 32 * 32;
  uint16_t* a = rows_buffer(padded * lda);
  if (a) {
    round_rows(x, M, K, a, lda);
  } else {
    #pragma omp atomic write
    shared->failed = VS_ERROR_NO_MEMORY;
  }
  configure_tiles();
  float sums[32 * 2 * COLUMNS] __attribute__((aligned(64))); /* 32 x 32, or 16 x 64 */
  int64_t blocks = M <= 16 ? 4 : 2, units = column_blocks_of(N) / blocks;
  #pragma omp for schedule(guided)
  for (int64_t u = 0; u < units; ++u) {
    if (!a) continue;
    const uint16_t* w = packed + blocks * u * chunks * BLOCK;
    int64_t column = blocks * u * COLUMNS, valid = N - column < blocks * COLUMNS ? N - column : blocks * COLUMNS;
    const float* b = bias ? bias + column : NULL;
    if (M <= 16) {
      sums_16_rows(a, lda, w, chunks, sums);
      store_sums(sums, 4, M, valid, b, y + column, ldy, accumulate);
      continue;
    }
    for (int64_t m = 0; m < M; m += 32) {
      int64_t rows = M - m < 32 ? M - m : 32;
      sums_32_rows(a + m * lda, lda, w, w + chunks * BLOCK, chunks, sums);
      store_sums(sums, 2, rows, valid, b, y + m * ldy + column, ldy, accumulate);
    }
  } /* its barrier: every block is written */
  _tile_release();
}

#pragma GCC pop_options
#endif

/* ---- elsewhere: widen_linear.c's kernel over rounded activations ---- */

static void widen_rounded_team(const float* x, int64_t M, const uint16_t* panels, int64_t N, int64_t K,
                               const float* bias, float* y, int64_t ldy, int accumulate, vs_shared* shared) {
  float* rounded = (float*)rows_buffer(2 * M * K); /* each thread its own, as on AMX */
  if (rounded) {
    for (int64_t i = 0; i < M * K; ++i) {
      uint32_t u = (uint32_t)to_bf16(x[i]) << 16;
      memcpy(rounded + i, &u, 4);
    }
  } else {
    #pragma omp atomic write
    shared->failed = VS_ERROR_NO_MEMORY;
  }
  /* Every thread takes part in the kernel's loop; out of memory, what it writes is unrounded and the
     call fails. */
  widen_team_bf16(rounded ? rounded : x, M, panels, N, K, bias, y, ldy, accumulate);
}

/* ---- dispatch ---- */

/* 1 once AMX is in use, 0 where it is not (or refused), -1 not yet asked. */
static int amx_in_use = -1;

#if VS_AMX_BUILT
static int amx_available(void) {
  unsigned int eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
  int tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
  if (!tile || !bf16 || !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl")) return 0;
  /* Linux hands out the tiles' state to a process that asks (5.16 and later): 0x1023 is
     ARCH_REQ_XCOMP_PERM, 18 XFEATURE_XTILEDATA. */
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#else
static int amx_available(void) { return 0; }
#endif

int bf16_dot_amx(int choice) {
  static int here = -1; /* whether this CPU and kernel let the process use AMX, asked once */
  if (here < 0) here = amx_available();
  if (choice < 0) amx_in_use = 0; /* tests: the widened path even where AMX is here */
  else if (choice > 0 || amx_in_use < 0) amx_in_use = here;
  return amx_in_use;
}

int bf16_team(const float* x, int64_t M, const uint16_t* packed, int64_t N, int64_t K, const float* bias, float* y,
              int64_t ldy, int accumulate, vs_shared* shared) {
  if (M <= 0 || N <= 0) return 0;
#if VS_AMX_BUILT
  if (amx_in_use > 0) { /* set when the weight was packed for it (kernels.py asks bf16_dot_amx first) */
    amx_team(x, M, packed, N, K, bias, y, ldy, accumulate, shared);
    return 0;
  }
#endif
  widen_rounded_team(x, M, packed, N, K, bias, y, ldy, accumulate, shared);
  return 0;
}

/* y (M rows, ldy apart) = bf16(x) @ w^T (+ bias), or += it, w as bf16_pack left it on AMX, else in
   widen_linear.c's panels (kernels.py packs it as bf16_dot_amx says); 0 or VS_ERROR_NO_MEMORY. */
int bf16_linear(const float* x, int64_t M, const uint16_t* packed, int64_t N, int64_t K, const float* bias, float* y,
                int64_t ldy, int accumulate, int threads) {
  vs_shared shared = {0, NULL};
  VS_TEAM(threads, bf16_team(x, M, packed, N, K, bias, y, ldy, accumulate, &shared));
  return shared.failed;
}
