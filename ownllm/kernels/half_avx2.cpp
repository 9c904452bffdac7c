// 16-bit weights (bfloat16 or float16, as a checkpoint stores them) times float32 activation rows on CPUs with AVX2,
// FMA and F16C but no AVX-512 BF16: each weight vector is widened to float32 in registers (bfloat16: its bits
// shifted into the high half; float16: F16C, exact) and multiplied in float32, so the weights are read at their 2
// bytes, as llama.cpp reads an F16 file, where float32 copies of them would double what every token reads.
//
// Each output y[m, n] is one chain of fused multiply-adds over k in steps of 8 (8 lanes: lane l takes k = 8 i + l),
// its lanes summed as (l0 + l4 + (l2 + l6)) + (l1 + l5 + (l3 + l7)), then the K % 8 tail one product at a time,
// then the bias: the same operations in the same order whatever tile, batch or thread computes it, so a row's
// numbers do not depend on what else shares its call (batch-invariant decoding, prompts as decode steps).
//
// Threads take chunks of kChunk weight rows; in a chunk, tiles of R activation rows times C weight rows pass over
// K: one row at decode streams 8 weight rows at once (8 independent chains hide the FMA latency) and prefetches the
// next 8 (rows of a few KB are streams too short for the hardware prefetcher to learn), 4 rows take 3 weight rows
// (12 accumulators and 3 widened weight vectors in registers, each activation vector loaded once a step): bound by
// memory at one row, by the two FMA pipes from 4 rows on (70-80 GMAC/s on two Zen 3 cores).
#include <immintrin.h>
#include "torch_lite.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>

namespace {

constexpr int64_t kChunk = 24;  // weight rows a task takes: a multiple of every tile's C (8, 4, 3)

template <bool BF16>
inline __m256 widen(const uint16_t* w) {  // 8 weights -> float32, exactly
  const __m128i h = _mm_loadu_si128((const __m128i*)w);
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else return _mm256_cvtph_ps(h);
}

template <bool BF16>
inline float widen1(uint16_t w) {
  if constexpr (BF16) {
    const uint32_t bits = (uint32_t)w << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    return _cvtsh_ss(w);
  }
}

inline float lane_sum(__m256 v) {  // (l0 + l4 + (l2 + l6)) + (l1 + l5 + (l3 + l7))
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// y[r][c] for activation rows x + r K (r < R) and weight rows w + c K (c < C): out + r N + c
template <bool BF16, int R, int C>
void tile(const float* x, const uint16_t* w, int64_t K, int64_t N, const float* bias, float* out) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const int64_t K8 = K / 8 * 8;
  for (int64_t k = 0; k < K8; k += 8) {
    if constexpr (R == 1) {  // the next tile's rows, which follow these: C x 16 of their bytes a step (1.2-1.5x)
      constexpr int lines = (C + 3) / 4;
      for (int i = 0; i < lines; ++i) _mm_prefetch((const char*)(w + C * K) + (k / 8 * lines + i) * 64, _MM_HINT_T0);
    }
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = widen<BF16>(w + c * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float total = lane_sum(acc[r][c]);
      for (int64_t k = K8; k < K; ++k) total = std::fma(widen1<BF16>(w[c * K + k]), x[r * K + k], total);
      out[r * N + c] = bias ? total + bias[c] : total;
    }
}

using Tile = void (*)(const float*, const uint16_t*, int64_t, int64_t, const float*, float*);

constexpr int kRowsPerTile = 4;
// weight rows a tile of `rows` activation rows takes (all in registers: 12 accumulators at most)
constexpr int columns_for(int rows) { return rows == 1 ? 8 : rows == 4 ? 3 : 4; }

template <bool BF16, int R, int... Cs>
constexpr std::array<Tile, 8> tiles_of(std::integer_sequence<int, Cs...>) {
  return {tile<BF16, R, Cs + 1>...};
}

// kTiles<BF16>[R - 1][C - 1] for C up to columns_for(R) (a chunk's last rows may take fewer)
template <bool BF16>
constexpr std::array<Tile, 8> kTiles[kRowsPerTile] = {
    tiles_of<BF16, 1>(std::make_integer_sequence<int, columns_for(1)>{}),
    tiles_of<BF16, 2>(std::make_integer_sequence<int, columns_for(2)>{}),
    tiles_of<BF16, 3>(std::make_integer_sequence<int, columns_for(3)>{}),
    tiles_of<BF16, 4>(std::make_integer_sequence<int, columns_for(4)>{})};

template <bool BF16>
void matmul(const float* x, const uint16_t* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  at::parallel_for(0, (N + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t chunk = c0; chunk < c1; ++chunk) {
      const int64_t n0 = chunk * kChunk, n1 = std::min(N, n0 + kChunk);
      for (int64_t m0 = 0; m0 < M; m0 += kRowsPerTile) {
        const int rows = (int)std::min<int64_t>(kRowsPerTile, M - m0), columns = columns_for(rows);
        for (int64_t n = n0; n < n1; n += columns) {
          const int64_t c = std::min<int64_t>(columns, n1 - n);
          kTiles<BF16>[rows - 1][c - 1](x + m0 * K, w + n * K, K, N, bias ? bias + n : nullptr, y + m0 * N + n);
        }
      }
    }
  });
}

}  // namespace

// x: [M, K] float32 (any M); weight: [N, K] bfloat16 or float16, contiguous; bias: [N] or None -> [M, N] float32.
at::Tensor half_matmul_avx2(at::Tensor x, at::Tensor weight, c10::optional<at::Tensor> bias) {
  const bool bf16 = weight.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || weight.scalar_type() == at::kHalf) && weight.dim() == 2 && weight.is_contiguous(),
              "half_matmul_avx2: weight [N, K] bfloat16 or float16, contiguous");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K,
              "half_matmul_avx2: x [M, K] float32, K = ", K);
  x = x.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "half_matmul_avx2: bias [N], N = ", N);
    bias_c = bias->to(at::kFloat).contiguous();
  }
  auto y = at::empty({x.size(0), N}, x.options());
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const float* b = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  (bf16 ? matmul<true> : matmul<false>)(x.data_ptr<float>(), w, b, y.data_ptr<float>(), x.size(0), N, K);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("half_matmul_avx2", &half_matmul_avx2,
        "float32 rows times bfloat16 or float16 weights widened in registers (AVX2)",
        py::call_guard<py::gil_scoped_release>());
  // the same function for decode_f32's DecodeLayersF32, which calls it from C++
  m.attr("half_matmul_avx2_capsule") = py::capsule((void*)&half_matmul_avx2, "ownllm.half_matmul_avx2");
}
