// Skinny bf16 matmul for decode: y[M, N] = x[M, K] @ w[N, K]^T with M <= 16, float32 accumulation.
// Decode is memory bound: each weight row is streamed from memory once and multiplied against all
// M activation rows (which stay in cache) with AVX-512 BF16 dot products (vdpbf16ps).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "gemv_row.h"

namespace {

using gemv::kMaxM;
using gemv::kRow;

// Activation rows go in groups of 4: the first group streams the weight row from memory, the
// others find it in L1, so the weights are read from memory once however many rows there are.
void run(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* bias, at::BFloat16* y, int64_t M,
         int64_t K, int64_t N) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += 4)
        kRow[std::min<int64_t>(4, M - m0) - 1](x + m0 * K, w, bias, y + m0 * N, K, N, n);
  });
}

}  // namespace

torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 inputs expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes: x [M, K], w [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "1 <= M <= 16");
  x = x.contiguous();
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const at::BFloat16* b = nullptr;
  torch::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kBFloat16).contiguous();
    b = bias_c.data_ptr<at::BFloat16>();
  }
  run(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), b, y.data_ptr<at::BFloat16>(), M, K, N);
  return y;
}

// One skinny matmul per head: x [M, heads, K] (any strides but the last) times w [heads, N, K] -> [M, heads, N] (a transposed view).
// MLA's absorbed decode multiplies each head's query and output by that head's slice of kv_b_proj.
torch::Tensor gemv_bf16_heads(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 inputs expected");
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && x.size(1) == w.size(0) && x.size(2) == w.size(2),
              "shapes: x [M, heads, K], w [heads, N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "1 <= M <= 16");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const int64_t M = x.size(0), H = w.size(0), N = w.size(1), K = w.size(2);
  auto xh = x.transpose(0, 1).contiguous();  // [heads, M, K]
  auto yh = torch::empty({H, M, N}, x.options());
  const at::BFloat16* xp = xh.data_ptr<at::BFloat16>();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* yp = yh.data_ptr<at::BFloat16>();
  at::parallel_for(0, H * N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t h = r / N, n = r % N;
      for (int64_t m0 = 0; m0 < M; m0 += 4)
        kRow[std::min<int64_t>(4, M - m0) - 1](xp + (h * M + m0) * K, wp + h * N * K, nullptr, yp + (h * M + m0) * N, K, N, n);
    }
  });
  return yh.transpose(0, 1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "skinny bf16 matmul (M <= 16)");
  m.def("gemv_bf16_heads", &gemv_bf16_heads, "skinny bf16 matmul per head (M <= 16)");
}
