// A Llama-family decoder's float32 decode step as one call (CPUs with AVX2, no AVX-512: where quantized GGUF files
// compute in float32 with x16_avx2's integer kernels): every layer, no Python between them. decode_ops.cpp's
// DecodeLayers is the bfloat16 counterpart.
//
// At decode the 30 layers of a 135M model cost ~0.5 ms each in torch's float32 small ops and the Python between
// them (RMSNorm alone is 8 torch ops), more than their matmuls. Here each layer is: RMSNorm, the qkv projection(s),
// (q/k RMSNorm), RoPE, the new keys and values written to their slots, paged attention, o_proj, the residual add,
// RMSNorm, gate/up, SiLU times up, down_proj, the residual add.
//
// The numbers are the Python layers' own, bit for bit, so a row gets the same ones in a decode step as in a prompt
// or a mixed batch (the integer kernels round activations to 8 bits: the smallest difference upstream can flip a
// code). So the matmuls and the attention are the very functions the layers call (x16_avx2's, half_avx2's and
// attention_f32's, handed over as capsules; dense float32 weights: at::linear, as F.linear), torch's reductions and
// SiLU are called as torch calls them (at::sum, at::silu), and the elementwise steps round as torch's ops do, one
// operation at a time (this file is compiled with -ffp-contract=off: no fused multiply-adds).
#include "torch_lite.h"

#include <ATen/ops/linear.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/sum.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace {

using X16Matmul = at::Tensor (*)(at::Tensor, at::Tensor, int64_t, int64_t, int64_t, c10::optional<at::Tensor>);
using HalfMatmul = at::Tensor (*)(at::Tensor, at::Tensor, c10::optional<at::Tensor>);
using PagedAttention = at::Tensor (*)(at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, double, int64_t);

template <typename Function>
Function from_capsule(const py::object& object, const char* name) {
  const auto capsule = py::reinterpret_borrow<py::capsule>(object);
  TORCH_CHECK(capsule.name() != nullptr && std::string(capsule.name()) == name, "DecodeLayersF32: expected the ",
              name, " capsule");
  return reinterpret_cast<Function>(capsule.get_pointer());
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.stride(-1) == 1, name, " must be float32, contiguous in its last "
              "dimension");
}

// x: [R, D] rows (any row stride) -> weight * (x * rsqrt(sum(x^2) / D + eps)) [R, D]: F.rms_norm's float32 steps
// (square, at::sum over the last dimension, divide, add eps, rsqrt, scale) and then the weight, as RMSNorm does.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t R = x.size(0), D = x.size(1), stride = x.stride(0);
  const float* xp = x.data_ptr<float>();
  at::Tensor squares = at::empty({R, D}, x.options());
  float* sp = squares.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) sp[r * D + d] = xp[r * stride + d] * xp[r * stride + d];
  const at::Tensor sums = at::sum(squares, {1}, /*keepdim=*/true);  // [R, 1], torch's reduction order
  const float* sum = sums.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  at::Tensor out = at::empty({R, D}, x.options());
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float inv = 1.f / std::sqrt(sum[r] / (float)D + (float)eps);
    for (int64_t d = 0; d < D; ++d) op[r * D + d] = wp[d] * (xp[r * stride + d] * inv);
  }
  return out;
}

// x: [B, heads, D] contiguous, in place -> x * cos + rotate_half(x) * sin, each product and sum rounded as torch
// rounds them; cos, sin: [B, 1, D] contiguous.
void rope_rotate_half_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t B = x.size(0), heads = x.size(1), D = x.size(2), half = D / 2;
  float* xp = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    const float *c = cos.data_ptr<float>() + b * D, *s = sin.data_ptr<float>() + b * D;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = xp + (b * heads + h) * D;
      for (int64_t d = 0; d < half; ++d) {
        const float lo = v[d], hi = v[d + half];
        const float lo_c = lo * c[d], hi_s = hi * s[d], hi_c = hi * c[d + half], lo_s = lo * s[d + half];
        v[d] = lo_c - hi_s;
        v[d + half] = hi_c + lo_s;
      }
    }
  }
}

// x [R, D] += y [R, D] (any row strides)
void add_(at::Tensor& x, const at::Tensor& y) {
  const int64_t R = x.size(0), D = x.size(1), x_stride = x.stride(0), y_stride = y.stride(0);
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) xp[r * x_stride + d] += yp[r * y_stride + d];
}

// One matmul of a projection: a weight in an x16_avx2 layout, a dense float32 weight, a dense 16-bit one (half_avx2),
// or a Python callable (any other kept-quantized weight: the Linear's own forward).
struct Part {
  at::Tensor blocks;  // x16_avx2 layout, or undefined
  int64_t rows = 0, layout = 0, block = 0;
  at::Tensor weight;  // dense [N, K] float32, or undefined
  at::Tensor half;  // dense [N, K] bfloat16 or float16, or undefined
  c10::optional<at::Tensor> bias;
  py::object call;  // or None

  // ("x16", blocks, rows, layout, block, bias) | ("dense", weight, bias) | ("half", weight, bias) | ("call", callable)
  explicit Part(const py::tuple& spec) {
    const std::string kind = spec[0].cast<std::string>();
    if (kind == "x16") {
      blocks = spec[1].cast<at::Tensor>();
      rows = spec[2].cast<int64_t>(), layout = spec[3].cast<int64_t>(), block = spec[4].cast<int64_t>();
      if (!spec[5].is_none()) bias = spec[5].cast<at::Tensor>();
    } else if (kind == "dense") {
      weight = spec[1].cast<at::Tensor>();
      check_f32(weight, "dense weights");
      if (!spec[2].is_none()) bias = spec[2].cast<at::Tensor>();
    } else if (kind == "half") {
      half = spec[1].cast<at::Tensor>();
      if (!spec[2].is_none()) bias = spec[2].cast<at::Tensor>();
    } else {
      TORCH_CHECK(kind == "call", "DecodeLayersF32: a projection part is x16, dense, half or call, not ", kind);
      call = spec[1];
    }
  }

  at::Tensor operator()(const at::Tensor& x, X16Matmul x16, HalfMatmul half_matmul) const {
    if (blocks.defined()) return x16(x, blocks, rows, layout, block, bias);
    if (weight.defined()) return at::linear(x, weight, bias);
    if (half.defined()) return half_matmul(x, half, bias);
    py::gil_scoped_acquire gil;
    return call(x).cast<at::Tensor>();
  }
};

}  // namespace

class DecodeLayersF32 {
 public:
  // norms: per layer [input, post-attention, q (or empty), k (or empty)] weights; projections: per layer qkv
  // (1 part, or q, k and v), o (1), gate_up (1, or gate and up), down (1), each part a tuple as Part takes.
  DecodeLayersF32(std::vector<std::vector<at::Tensor>> norms, std::vector<std::vector<std::vector<py::tuple>>> projections,
                  std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, std::vector<int64_t> windows,
                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
                  py::object x16_matmul, py::object half_matmul, py::object paged_attention)
      : norms_(std::move(norms)), k_caches_(std::move(k_caches)), v_caches_(std::move(v_caches)),
        windows_(std::move(windows)), H_(num_heads), KVH_(num_kv_heads), D_(head_dim), eps_(eps), scale_(scale),
        x16_(from_capsule<X16Matmul>(x16_matmul, "ownllm.x16_matmul_avx2")),
        half_(from_capsule<HalfMatmul>(half_matmul, "ownllm.half_matmul_avx2")),
        attention_(from_capsule<PagedAttention>(paged_attention, "ownllm.paged_attention_f32")) {
    const size_t L = norms_.size();
    TORCH_CHECK(L > 0 && projections.size() == L && k_caches_.size() == L && v_caches_.size() == L &&
                windows_.size() == L, "DecodeLayersF32: one norm list, projection list, cache view and window a layer");
    for (size_t l = 0; l < L; ++l) {
      TORCH_CHECK(norms_[l].size() == 4 && projections[l].size() == 4, "each layer: 4 norm weights, 4 projections");
      for (const auto& w : norms_[l])
        if (w.numel()) check_f32(w, "the norm weights");
      const auto& p = projections[l];
      TORCH_CHECK((p[0].size() == 1 || p[0].size() == 3) && p[1].size() == 1 && (p[2].size() == 1 || p[2].size() == 2)
                  && p[3].size() == 1, "projections: qkv in 1 or 3 parts, o 1, gate_up 1 or 2, down 1");
      projections_.emplace_back();
      for (const auto& parts : p) {
        projections_.back().emplace_back();
        for (const auto& spec : parts) projections_.back().back().emplace_back(spec);
      }
      check_f32(k_caches_[l], "the caches");
      check_f32(v_caches_[l], "the caches");
      TORCH_CHECK(k_caches_[l].is_contiguous() && v_caches_[l].is_contiguous(), "the caches must be contiguous");
    }
  }

  // embeds: [B, hidden] (not modified); cos, sin: [B, 1, D]; slots, positions: [B]; block_tables: [B, max_blocks]
  // -> the last layer's output [B, hidden], before the final norm.
  at::Tensor forward(const at::Tensor& embeds, const at::Tensor& cos_in, const at::Tensor& sin_in,
                     const at::Tensor& slots, const at::Tensor& positions, const at::Tensor& block_tables) const {
    check_f32(embeds, "x");
    TORCH_CHECK(embeds.dim() == 2 && embeds.size(0) >= 1 && slots.numel() == embeds.size(0),
                "x: [B, hidden], slots: [B]");
    at::Tensor x = embeds.contiguous().clone();  // the residual stream, updated in place
    const int64_t B = x.size(0), q_size = H_ * D_, kv_size = KVH_ * D_;
    const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous(), slot = slots.to(at::kLong).contiguous();
    for (size_t l = 0; l < norms_.size(); ++l) {
      const auto& w = norms_[l];
      const std::vector<at::Tensor> qkv = project(l, 0, rms_norm(x, w[0], eps_));
      at::Tensor q = qkv.size() == 1 ? qkv[0].narrow(1, 0, q_size) : qkv[0];
      at::Tensor k = qkv.size() == 1 ? qkv[0].narrow(1, q_size, kv_size) : qkv[1];
      const at::Tensor v = qkv.size() == 1 ? qkv[0].narrow(1, q_size + kv_size, kv_size) : qkv[2];
      if (w[2].numel()) {  // per-head RMSNorm of q and k (Qwen3)
        q = rms_norm(q.reshape({B * H_, D_}), w[2], eps_);
        k = rms_norm(k.reshape({B * KVH_, D_}), w[3], eps_);
      }
      q = q.reshape({B, H_, D_}).contiguous();  // rotated in place: the projection's output is ours alone
      k = k.reshape({B, KVH_, D_}).contiguous();
      rope_rotate_half_(q, cos, sin);
      rope_rotate_half_(k, cos, sin);
      write_slots(l, k, v, slot.data_ptr<int64_t>());
      const at::Tensor attn = attention_(q, k_caches_[l], v_caches_[l], block_tables, positions, scale_,
                                         windows_[l]).view({B, q_size});
      add_(x, project(l, 1, attn)[0]);
      const std::vector<at::Tensor> gate_up = project(l, 2, rms_norm(x, w[1], eps_));
      const int64_t I = gate_up.size() == 1 ? gate_up[0].size(1) / 2 : gate_up[0].size(1);
      const at::Tensor gate = gate_up.size() == 1 ? gate_up[0].narrow(1, 0, I) : gate_up[0];
      const at::Tensor up = gate_up.size() == 1 ? gate_up[0].narrow(1, I, I) : gate_up[1];
      at::Tensor act = at::silu(gate);  // [B, I] contiguous, torch's SiLU on the tensor the layer gives it
      mul_(act, up);
      add_(x, project(l, 3, act)[0]);
    }
    return x;
  }

 private:
  // projection p of layer l on x: each part's output
  std::vector<at::Tensor> project(size_t l, int p, const at::Tensor& x) const {
    std::vector<at::Tensor> out;
    for (const Part& part : projections_[l][p]) out.push_back(part(x, x16_, half_));
    return out;
  }

  // act [B, I] *= up [B, I] (any row stride)
  static void mul_(at::Tensor& act, const at::Tensor& up) {
    const int64_t B = act.size(0), I = act.size(1), act_stride = act.stride(0), up_stride = up.stride(0);
    float* ap = act.data_ptr<float>();
    const float* up_p = up.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i) ap[b * act_stride + i] *= up_p[b * up_stride + i];
  }

  // k [B, KVH, D] (rotated), v [B, KVH * D] rows into layer l's cache slots
  void write_slots(size_t l, const at::Tensor& k, const at::Tensor& v, const int64_t* slots) const {
    const int64_t B = k.size(0), row = KVH_ * D_, capacity = k_caches_[l].numel() / row;
    float* kc = k_caches_[l].data_ptr<float>();
    float* vc = v_caches_[l].data_ptr<float>();
    const float* vp = v.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(slots[b] >= 0 && slots[b] < capacity, "DecodeLayersF32: slot ", slots[b], " outside the cache");
      std::memcpy(kc + slots[b] * row, k.data_ptr<float>() + b * row, row * sizeof(float));
      std::memcpy(vc + slots[b] * row, vp + b * v.stride(0), row * sizeof(float));
    }
  }

  std::vector<std::vector<at::Tensor>> norms_;
  std::vector<std::vector<std::vector<Part>>> projections_;
  std::vector<at::Tensor> k_caches_, v_caches_;
  std::vector<int64_t> windows_;
  int64_t H_, KVH_, D_;
  double eps_, scale_;
  X16Matmul x16_;
  HalfMatmul half_;
  PagedAttention attention_;
};

// The float32 RMSNorm step as DecodeLayersF32 computes it (x: [R, D]), for tests against RMSNorm.
at::Tensor rms_norm_f32(at::Tensor x, at::Tensor weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "shapes: x [R, D], weight [D]");
  return rms_norm(x, weight, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecodeLayersF32>(m, "DecodeLayersF32")
      .def(py::init<std::vector<std::vector<at::Tensor>>, std::vector<std::vector<std::vector<py::tuple>>>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, int64_t, int64_t, int64_t,
                    double, double, py::object, py::object, py::object>())
      .def("forward", &DecodeLayersF32::forward, py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm_f32", &rms_norm_f32, "float32 RMSNorm as the decode stack computes it",
        py::call_guard<py::gil_scoped_release>());
}
