// The inner loops of the skinny bf16 matmuls (gemv_bf16.cpp, moe_experts.cpp): y = x w^T for a few
// activation rows x [M, K] and many weight rows w [N, K], with AVX-512 BF16 dot products (vdpbf16ps)
// and float32 accumulation.
//
// A tile of up to 4 weight rows times up to 4 activation rows keeps 16 accumulators in registers, so
// each 32-element chunk costs 8 loads for 16 dot products (the row-at-a-time loop needed 5 loads for 4,
// and ran out of load ports beyond 4 activation rows). A block of weight rows stays in L1 while every
// group of activation rows passes over it, so weights are read from memory once for any M; the next
// block is prefetched meanwhile (M > 4). Against oneDNN on the 1B shape's weights (not cached): 1.5x as
// fast at 1 row, 1.15-1.3x at 16, slower at 64 rows of 8192 inputs (bench/skinny_matmul.py).
//
// A few short activation rows (streams_rows) instead take the weight rows one at a time, in memory order:
// four rows read side by side are four short streams (a row of 576 bf16 is 18 cache lines) that the
// hardware prefetcher barely learns before each ends, while one row after another is one long stream.
// On SmolLM2-135M's matrices (K = 576, 1536) that read 1.5-2x as fast at 1 activation row (bench/gemv_small.py).
// The tiles are the same ones, so the numbers are too.
//
// Batch-invariant: every output is one accumulator over its 32-element chunks in order, then the same
// horizontal sum, whatever the tile shape or M (up to the callers' limit: linear() sends it <= 32 rows).
#pragma once
#include <immintrin.h>
#include "torch_lite.h"

#include <algorithm>

namespace bf16mm {

using bf16 = at::BFloat16;

// A matmul's optional bias as contiguous bf16 (the caller holds it while using its data), or undefined.
inline at::Tensor bf16_bias(const c10::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias->to(at::kBFloat16).contiguous() : at::Tensor();
}

inline __m512bh load32(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load32(const bf16* p, __mmask32 mask) { return (__m512bh)_mm512_maskz_loadu_epi16(mask, p); }

// out[m][n] = x[m, :K] . w[n, :K] for m < MB, n < NB. With `next` (the next block of weight rows), one
// cache line of each of its 4 rows is prefetched per step, so its memory reads overlap this tile's work.
template <int MB, int NB>
void tile(const bf16* x, int64_t ldx, const bf16* w, int64_t ldw, int64_t K, float (*out)[4], const bf16* next) {
  __m512 acc[MB][NB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_setzero_ps();
  auto step = [&](int64_t k, auto load) {
    if (next)
#pragma GCC unroll 4
      for (int n = 0; n < 4; ++n) _mm_prefetch((const char*)(next + n * ldw + k), _MM_HINT_T0);
    __m512bh wv[NB];
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) wv[n] = load(w + n * ldw + k);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m512bh xv = load(x + m * ldx + k);
#pragma GCC unroll 4
      for (int n = 0; n < NB; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], wv[n], xv);
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step(k, [](const bf16* p) { return load32(p); });
  if (k < K) {
    const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
    step(k, [mask](const bf16* p) { return load32(p, mask); });
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int n = 0; n < NB; ++n) out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
}

using TileFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, int64_t, float (*)[4], const bf16*);
constexpr TileFn kTiles[4][4] = {
    {&tile<1, 1>, &tile<1, 2>, &tile<1, 3>, &tile<1, 4>},
    {&tile<2, 1>, &tile<2, 2>, &tile<2, 3>, &tile<2, 4>},
    {&tile<3, 1>, &tile<3, 2>, &tile<3, 3>, &tile<3, 4>},
    {&tile<4, 1>, &tile<4, 2>, &tile<4, 3>, &tile<4, 4>},
};

// Whether rows() takes weight rows from memory one at a time for M activation rows of K: when the activations
// are a few short rows (at most 4, 12 KB in all), so re-reading them from L1 for each weight row is cheap and
// each output's chain of dot products is short. Measured (1 thread, weights from memory, GB/s one row at a
// time / 4 side by side): K = 576: 16 / 8 at M = 1, 11 / 8 at 4; K = 2048: 18 / 11 at 1, 15 / 11 at 3, 8 / 10
// at 4; K = 8192: 13.5 / 15 at 1, 7 / 12 at 3.
inline bool streams_rows(int64_t M, int64_t K) { return M <= 4 && M * K <= 6144; }

// y[m, n] = bf16(x[m] . w[n] + bias[n]) for every m < M and n in [n0, n1); bias may be null. No threads:
// callers split n between them. weights_cached: w is in cache already (a scratch block), not read from memory.
inline void rows(const bf16* x, int64_t ldx, int64_t M, const bf16* w, int64_t ldw, int64_t K, int64_t n0,
                 int64_t n1, const bf16* bias, bf16* y, int64_t ldy, bool weights_cached = false) {
  float out[4][4];
  if (!weights_cached && streams_rows(M, K)) {
    const TileFn one_row = kTiles[M - 1][0];
    for (int64_t n = n0; n < n1; ++n) {
      one_row(x, ldx, w + n * ldw, ldw, K, out, nullptr);
      const float b = bias ? static_cast<float>(bias[n]) : 0.f;
      for (int i = 0; i < M; ++i) y[i * ldy + n] = bf16(out[i][0] + b);
    }
    return;
  }
  for (int64_t n = n0; n < n1; n += 4) {
    const int nb = (int)std::min<int64_t>(4, n1 - n);
    // with several passes over this block, each prefetches the next one so its reads overlap this block's
    // work (1B shape, 16 rows: 28.5 GB/s against 21.9 without); one pass streams faster without
    const bf16* next = M > 4 && n + 8 <= n1 ? w + (n + 4) * ldw : nullptr;
    for (int64_t m = 0; m < M; m += 4) {
      const int mb = (int)std::min<int64_t>(4, M - m);
      kTiles[mb - 1][nb - 1](x + m * ldx, ldx, w + n * ldw, ldw, K, out, next);
      for (int i = 0; i < mb; ++i)
        for (int j = 0; j < nb; ++j)
          y[(m + i) * ldy + n + j] = bf16(out[i][j] + (bias ? static_cast<float>(bias[n + j]) : 0.f));
    }
  }
}

// Calls f(block, first, last) for each piece of rows [r0, r1) of a stack of blocks of `size` rows each,
// with first/last relative to the block (parallel_for ranges over several weight matrices).
template <class F>
inline void split_rows(int64_t r0, int64_t r1, int64_t size, F f) {
  while (r0 < r1) {
    const int64_t block = r0 / size, end = std::min(r1, (block + 1) * size);
    f(block, r0 - block * size, end - block * size);
    r0 = end;
  }
}

}  // namespace bf16mm
