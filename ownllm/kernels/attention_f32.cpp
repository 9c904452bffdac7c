// float32 attention of query rows over the paged KV cache (CPUs with AVX2 and FMA), each row computed alone:
// its scores over its own keys in order (dot products of 8 lanes, summed in a fixed order), the softmax, and the
// weighted sum of values (a fused multiply-add per key, in key order). Keys are walked block by block (one
// division a block, not two a key); scores are computed 8 keys at a time (their FMA chains interleaved, their lane
// sums side by side: 1.2-1.3x at 16 rows, each key's number as alone), values 64 outputs at a time in registers. A row's numbers therefore do not depend on how many rows share the call, on other
// sequences' lengths (no padding), or on whether it is a decode step or a prompt row (prompts chunked or
// whole, speculative verification). The integer kernels round activations to 8 bits, which turns the smallest
// of such differences into a flipped code now and then: torch's SDPA (a row alone vs among a prompt's rows:
// 4e-7) and padded batched decode moved the bundled model's greedy tokens with the batch.
#include <immintrin.h>
#include "torch_lite.h"

#include <cmath>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  float total = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  for (; d < D; ++d) total += a[d] * b[d];
  return total;
}

// The scores of 8 keys at once: dot(a, keys[k]) for k < 8, each summed exactly as dot() sums it (8 lanes of
// FMAs in d order, then the lanes added as (l0 + l4 + (l2 + l6)) + (l1 + l5 + (l3 + l7)), then the D % 8 tail one
// product at a time), the 8 keys' FMA chains interleaved and their lane sums done side by side in vectors.
inline __m256 dot8(const float* a, const float* const (&keys)[8], int64_t D) {
  __m256 acc[8];
  for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256 x = _mm256_loadu_ps(a + d);
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys[k] + d), acc[k]);
  }
  // per key: l_i + l_{i+4} (i < 4), keys k and k + 4 side by side in one vector's halves
  __m256 half[4];
  for (int k = 0; k < 4; ++k)
    half[k] = _mm256_add_ps(_mm256_permute2f128_ps(acc[k], acc[k + 4], 0x20),
                            _mm256_permute2f128_ps(acc[k], acc[k + 4], 0x31));
  // s_0 + s_2, s_1 + s_3 of keys (k, k + 1) in each 128-bit half
  const __m256 p01 = _mm256_add_ps(_mm256_shuffle_ps(half[0], half[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm256_shuffle_ps(half[0], half[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 p23 = _mm256_add_ps(_mm256_shuffle_ps(half[2], half[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm256_shuffle_ps(half[2], half[3], _MM_SHUFFLE(3, 2, 3, 2)));
  // (s_0 + s_2) + (s_1 + s_3): keys 0-3 in the low half, 4-7 in the high one, in order
  __m256 total = _mm256_add_ps(_mm256_shuffle_ps(p01, p23, _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm256_shuffle_ps(p01, p23, _MM_SHUFFLE(3, 1, 3, 1)));
  if (d < D) {
    alignas(32) float t[8];
    _mm256_store_ps(t, total);
    for (int k = 0; k < 8; ++k)
      for (int64_t e = d; e < D; ++e) t[k] += a[e] * keys[k][e];
    total = _mm256_load_ps(t);
  }
  return total;
}

}  // namespace

// q: [R, H, D]; k_cache, v_cache: [blocks, block_size, KVH, D]; tables: [R, max_blocks] (or [1, max_blocks]:
// every row one sequence's), positions: [R] (row r attends to keys max(0, p - window + 1) .. p, window 0: none)
// -> [R, H, D] float32.
at::Tensor paged_attention_f32(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor tables,
                               at::Tensor positions, double scale, int64_t window) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "paged_attention_f32: float32 q and caches");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && k_cache.size(3) == q.size(2) && q.size(1) % k_cache.size(2) == 0,
              "paged_attention_f32: q [R, H, D], caches [blocks, block_size, KVH, D] contiguous, H a multiple of KVH");
  const int64_t R = q.size(0), H = q.size(1), D = q.size(2), block_size = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(positions.numel() == R && tables.dim() == 2 && (tables.size(0) == R || tables.size(0) == 1),
              "paged_attention_f32: positions [R], tables [R or 1, max_blocks]");
  q = q.contiguous();
  const at::Tensor table = tables.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  auto out = at::empty({R, H, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  const int64_t *tp = table.data_ptr<int64_t>(), *pp = pos.data_ptr<int64_t>();
  const int64_t max_blocks = table.size(1), group = H / KVH, row_stride = KVH * D;
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(pp[r] >= 0 && pp[r] < max_blocks * block_size, "paged_attention_f32: position ", pp[r],
                " beyond the block table's ", max_blocks * block_size, " slots");
  float* op = out.data_ptr<float>();
  const float s = (float)scale;
  at::parallel_for(0, R * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / H, h = i % H, kvh = h / group;
      const int64_t* t = tp + (tables.size(0) == R ? r : 0) * max_blocks;
      const int64_t last = pp[r] + 1, first = window > 0 ? std::max<int64_t>(0, last - window) : 0;
      // f(j, row) for keys j = first .. last - 1 in order, row: key j's (or value j's) row of this head
      auto each_key = [&](const float* cache, auto&& f) {
        for (int64_t j = first; j < last;) {
          const int64_t offset = j % block_size, end = std::min(last, j - offset + block_size);
          const float* row = cache + (t[j / block_size] * block_size + offset) * row_stride + kvh * D;
          for (; j < end; ++j, row += row_stride) f(j, row);
        }
      };
      const float* qr = qp + i * D;
      p.resize(last - first);
      float top = -std::numeric_limits<float>::infinity();
      const float* pending[8];
      int n = 0;
      each_key(kp, [&](int64_t j, const float* key) {
        pending[n++] = key;
        if (n < 8) return;
        _mm256_storeu_ps(&p[j - 7 - first], _mm256_mul_ps(dot8(qr, pending, D), _mm256_set1_ps(s)));
        n = 0;
      });
      for (int k = 0; k < n; ++k) p[last - n + k - first] = dot(qr, pending[k], D) * s;
      for (const float v : p) top = std::max(top, v);
      float sum = 0.f;
      for (auto& v : p) sum += (v = std::exp(v - top));
      // o = sum_j p_j v_j, a fused multiply-add per key in key order, 32 values of o at a time in registers
      float* o = op + i * D;
      int64_t d = 0;
      for (; d + 64 <= D; d += 64) {
        __m256 acc[8];
        for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
        each_key(vp, [&](int64_t j, const float* value) {
          const __m256 w = _mm256_set1_ps(p[j - first]);
          for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(value + d + 8 * c), acc[c]);
        });
        for (int c = 0; c < 8; ++c) _mm256_storeu_ps(o + d + 8 * c, acc[c]);
      }
      for (; d + 32 <= D; d += 32) {
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        each_key(vp, [&](int64_t j, const float* value) {
          const __m256 w = _mm256_set1_ps(p[j - first]);
          for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(value + d + 8 * c), acc[c]);
        });
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o + d + 8 * c, acc[c]);
      }
      for (; d + 8 <= D; d += 8) {
        __m256 acc = _mm256_setzero_ps();
        each_key(vp, [&](int64_t j, const float* value) {
          acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j - first]), _mm256_loadu_ps(value + d), acc);
        });
        _mm256_storeu_ps(o + d, acc);
      }
      for (; d < D; ++d) {
        float acc = 0.f;
        each_key(vp, [&](int64_t j, const float* value) { acc = std::fma(p[j - first], value[d], acc); });
        o[d] = acc;
      }
      const float inverse = 1.f / sum;
      for (int64_t d = 0; d < D; ++d) o[d] *= inverse;
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_f32", &paged_attention_f32,
        "float32 query rows over the paged KV cache, each row alone (AVX2)", py::call_guard<py::gil_scoped_release>());
  // the same function for decode_f32's DecodeLayersF32, which calls it from C++
  m.attr("paged_attention_f32_capsule") = py::capsule((void*)&paged_attention_f32, "ownllm.paged_attention_f32");
}
