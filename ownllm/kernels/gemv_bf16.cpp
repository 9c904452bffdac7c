// Skinny bf16 matmul for decode: y[M, N] = x[M, K] @ w[N, K]^T with M <= 64, float32 accumulation.
// Decode is memory bound: each weight row is streamed from memory once and multiplied against all
// M activation rows (which stay in cache); the tiles are in bf16_tile.h.
#include "torch_lite.h"

#include "bf16_tile.h"

namespace {

constexpr int kMaxM = 64;  // beyond this oneDNN's blocked kernels win; callers fall back to torch
constexpr int64_t kGrain = 64;  // weight rows per task: 16 tiles

}  // namespace

at::Tensor gemv_bf16(at::Tensor x, at::Tensor w, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 inputs expected");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "shapes: x [M, K], w [N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "1 <= M <= 64");
  x = x.contiguous();
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const at::Tensor bias_c = bf16mm::bf16_bias(bias);
  const at::BFloat16* b = bias_c.defined() ? bias_c.data_ptr<at::BFloat16>() : nullptr;
  const at::BFloat16 *xp = x.data_ptr<at::BFloat16>(), *wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) { bf16mm::rows(xp, K, M, wp, K, K, n0, n1, b, yp, N); });
  return y;
}

// One skinny matmul per head: x [M, heads, K] (any strides but the last) times w [heads, N, K] -> [M, heads, N] (a transposed view).
// MLA's absorbed decode multiplies each head's query and output by that head's slice of kv_b_proj.
at::Tensor gemv_bf16_heads(at::Tensor x, at::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16 inputs expected");
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && x.size(1) == w.size(0) && x.size(2) == w.size(2),
              "shapes: x [M, heads, K], w [heads, N, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxM, "1 <= M <= 64");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const int64_t M = x.size(0), H = w.size(0), N = w.size(1), K = w.size(2);
  auto xh = x.transpose(0, 1).contiguous();  // [heads, M, K]
  auto yh = at::empty({H, M, N}, x.options());
  const at::BFloat16 *xp = xh.data_ptr<at::BFloat16>(), *wp = w.data_ptr<at::BFloat16>();
  at::BFloat16* yp = yh.data_ptr<at::BFloat16>();
  at::parallel_for(0, H * N, kGrain, [&](int64_t r0, int64_t r1) {
    bf16mm::split_rows(r0, r1, N, [&](int64_t h, int64_t n0, int64_t n1) {
      bf16mm::rows(xp + h * M * K, K, M, wp + h * N * K, K, K, n0, n1, nullptr, yp + h * M * N, N);
    });
  });
  return yh.transpose(0, 1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_bf16", &gemv_bf16, "skinny bf16 matmul (M <= 64)", py::call_guard<py::gil_scoped_release>());
  m.def("gemv_bf16_heads", &gemv_bf16_heads, "skinny bf16 matmul per head (M <= 64)", py::call_guard<py::gil_scoped_release>());
}
