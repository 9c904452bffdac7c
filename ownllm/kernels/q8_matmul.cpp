// GGUF Q8_0 weights times bf16 activation rows, read from the file's own bytes.
//
// Layout, per output row n: K / 32 blocks of 34 bytes, each an fp16 scale d then 32 int8 codes q
// (w = d * q), exactly as GGUF stores them, so the weights can stay a view of the file mapping.
// Each block is decoded to bf16 weights, d * q rounded as dequantizing the tensor to bf16 rounds it, and
// every output is one float32 accumulator of bf16 dot products over the 32-element blocks in order, then
// one horizontal sum: the arithmetic of the skinny bf16 tiles (bf16_tile.h). So q8_matmul gives bit for
// bit what gemv_bf16 gives on the dequantized weights, batch-invariant as that is, while reading 1.06
// bytes per weight from memory instead of 2. One activation row is multiplied straight from the
// decoded registers; for more, 4 weight rows at a time are decoded into a bf16 scratch in L1 (the next
// 4 prefetched meanwhile) and the bf16 tiles run over it, so each weight is decoded once for any M
// (decoding in registers for up to 8 rows, or two weight rows at once for M = 1, measured slower).
// q8_dequantize gives row ranges as bf16, for prefill batches that go to oneDNN a chunk at a time.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "bf16_tile.h"

namespace {

using bf16 = at::BFloat16;
constexpr int64_t kBlockBytes = 34;
constexpr int64_t kDecodeRows = 4;  // weight rows decoded into the scratch at a time: one bf16 tile
constexpr int64_t kGrain = 64;  // weight rows per task

// One block's 32 weights d * q, rounded to bf16, in x's element order.
inline __m512bh block_weights(const uint8_t* block) {
  uint16_t half;
  std::memcpy(&half, block, sizeof(half));
  const __m512 scale = _mm512_set1_ps(_cvtsh_ss(half));
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(block + 2))));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(block + 18))));
  return _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, scale), _mm512_mul_ps(lo, scale));
}

// rows [n0, n1) of the weights -> out [n1 - n0, K] bf16. With `prefetch`, the same number of rows after
// them is fetched meanwhile, a cache line per block, so memory reads overlap the work on these rows.
void decode_rows(const uint8_t* weights, int64_t K, int64_t n0, int64_t n1, bf16* out, bool prefetch = false) {
  const int64_t groups = K / 32, ahead = (n1 - n0) * groups * kBlockBytes;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* block = weights + (n * groups + g) * kBlockBytes;
      if (prefetch) _mm_prefetch((const char*)block + ahead, _MM_HINT_T0);
      _mm512_storeu_si512(out + (n - n0) * K + 32 * g, (__m512i)block_weights(block));
    }
}

// y[0, n] for one activation row: weight row n decoded block by block in registers (memory bound).
void single_row(const bf16* x, const uint8_t* weights, int64_t K, int64_t n, const bf16* bias, bf16* y) {
  const int64_t groups = K / 32;
  __m512 acc = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g)
    acc = _mm512_dpbf16_ps(acc, block_weights(weights + (n * groups + g) * kBlockBytes),
                           (__m512bh)_mm512_loadu_si512(x + 32 * g));
  y[n] = bf16(_mm512_reduce_add_ps(acc) + (bias ? static_cast<float>(bias[n]) : 0.f));
}

int64_t check_weights(const torch::Tensor& weights) {  // -> K
  TORCH_CHECK(weights.scalar_type() == at::kByte && weights.dim() == 2 && weights.is_contiguous() &&
                  weights.size(1) % kBlockBytes == 0, "weights: [N, K / 32 * 34] uint8 Q8_0 blocks");
  return weights.size(1) / kBlockBytes * 32;
}

}  // namespace

// x: [M, K] bf16; weights: [N, K / 32 * 34] uint8 -> [M, N] bf16.
torch::Tensor q8_matmul(torch::Tensor x, torch::Tensor weights, c10::optional<torch::Tensor> bias) {
  const int64_t K = check_weights(weights), N = weights.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == K, "x: [M, K] bf16, K = ", K);
  x = x.contiguous();
  const int64_t M = x.size(0);
  const torch::Tensor bias_c = bf16mm::bf16_bias(bias);
  const bf16* b = bias_c.defined() ? bias_c.data_ptr<bf16>() : nullptr;
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* w = weights.data_ptr<uint8_t>();
  const bf16* xp = x.data_ptr<bf16>();
  bf16* yp = y.data_ptr<bf16>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    if (M == 1) {
      for (int64_t n = n0; n < n1; ++n) single_row(xp, w, K, n, b, yp);
      return;
    }
    std::vector<bf16> scratch(kDecodeRows * K);
    for (int64_t n = n0; n < n1; n += kDecodeRows) {
      const int64_t rows = std::min(kDecodeRows, n1 - n);
      decode_rows(w, K, n, n + rows, scratch.data(), n + 2 * rows <= n1);
      bf16mm::rows(xp, K, M, scratch.data(), K, K, 0, rows, b ? b + n : nullptr, yp + n, N);
    }
  });
  return y;
}

// weights: [N, K / 32 * 34] uint8 -> out [N, K] bf16 (given, so callers can reuse one buffer), d * q rounded to bf16.
torch::Tensor q8_dequantize(torch::Tensor weights, torch::Tensor out) {
  const int64_t K = check_weights(weights), N = weights.size(0);
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == N &&
                  out.size(1) == K, "out: [N, K] bf16, contiguous");
  const uint8_t* w = weights.data_ptr<uint8_t>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) { decode_rows(w, K, n0, n1, op + n0 * K); });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q8_matmul", &q8_matmul, "bf16 rows times GGUF Q8_0 weights");
  m.def("q8_dequantize", &q8_dequantize, "GGUF Q8_0 weights as bf16");
}
