// The inner loop of the skinny bf16 matmuls (gemv_bf16.cpp, moe_experts.cpp): one weight row [K] against
// up to 4 activation rows, with AVX-512 BF16 dot products (vdpbf16ps) and float32 accumulation.
#pragma once
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>

namespace gemv {

constexpr int kMaxM = 16;  // beyond this oneDNN's batched kernels win; callers fall back to torch

inline __m512bh load(const at::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_tail(const at::BFloat16* p, __mmask32 mask) { return (__m512bh)_mm512_maskz_loadu_epi16(mask, p); }

// Row n of y for all M activation rows: one sequential stream over the weight row, with two
// accumulator chains per activation row (even and odd 32-element chunks) to hide dpbf16 latency.
template <int M>
inline void row(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* bias, at::BFloat16* y,
                int64_t K, int64_t N, int64_t n) {
  const at::BFloat16* wr = w + n * K;
  __m512 acc0[M], acc1[M];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  const int64_t K64 = K & ~int64_t(63);
  int64_t k = 0;
  for (; k < K64; k += 64) {
    __m512bh w0 = load(wr + k), w1 = load(wr + k + 32);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, load(x + m * K + k));
      acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, load(x + m * K + k + 32));
    }
  }
  for (; k < K; k += 32) {
    const int remaining = (int)std::min<int64_t>(32, K - k);
    const __mmask32 mask = (__mmask32)((1ull << remaining) - 1);
    __m512bh wv = load_tail(wr + k, mask);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc0[m] = _mm512_dpbf16_ps(acc0[m], wv, load_tail(x + m * K + k, mask));
  }
  const float b = bias ? static_cast<float>(bias[n]) : 0.f;
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m) y[m * N + n] = at::BFloat16(_mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + b);
}

using RowFn = void (*)(const at::BFloat16*, const at::BFloat16*, const at::BFloat16*, at::BFloat16*, int64_t, int64_t,
                       int64_t);
constexpr RowFn kRow[4] = {&row<1>, &row<2>, &row<3>, &row<4>};


}  // namespace gemv
