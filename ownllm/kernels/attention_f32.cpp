// float32 attention of query rows over the paged KV cache (CPUs with AVX2 and FMA), each row computed alone:
// its scores over its own keys in order (dot products of 8 lanes, summed in a fixed order), the softmax, and the
// weighted sum of values (a fused multiply-add per key, in key order). A row's numbers therefore do not depend on
// how many rows share the call, on other sequences' lengths (no padding), or on whether it is a decode step or a
// prompt row (prompts chunked or whole, speculative verification). The integer kernels round activations to 8 bits,
// which turns the smallest of such differences into a flipped code now and then: torch's SDPA (a row alone vs
// among a prompt's rows: 4e-7) and padded batched decode moved the bundled model's greedy tokens with the batch.
//
// How it is fast without changing a number: keys are walked block by block (one division a block); the heads that
// share a key-value head read each key and value row once (grouped-query attention: 3-7 query heads a KV head in
// the models we run); scores are computed 8 keys at a time (their FMA chains interleaved, their lane sums side by
// side); values accumulate up to 64 outputs at a time in registers. 1.3-1.9x the one-head-at-a-time kernel at
// 8-64 rows, the same at one row (timed on AVX2, Zen 3).
#include <immintrin.h>
#include "torch_lite.h"

#include <cmath>
#include <algorithm>
#include <limits>
#include <type_traits>
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

constexpr int kValueChunk = 32;  // value rows a pass over a head's outputs takes (8 KB at D = 64: they stay in L1)

// o[d] = fma(w[k], values[k][d], o[d]) for k = 0 .. count - 1 in order, every d
inline void accumulate_values(const float* w, const float* const* values, int count, int64_t D, float* o) {
  int64_t d = 0;
  auto vectors = [&](auto width) {
    constexpr int V = decltype(width)::value;
    for (; d + 8 * V <= D; d += 8 * V) {
      __m256 acc[V];
      for (int c = 0; c < V; ++c) acc[c] = _mm256_loadu_ps(o + d + 8 * c);
      for (int k = 0; k < count; ++k) {
        const __m256 weight = _mm256_set1_ps(w[k]);
        for (int c = 0; c < V; ++c) acc[c] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(values[k] + d + 8 * c), acc[c]);
      }
      for (int c = 0; c < V; ++c) _mm256_storeu_ps(o + d + 8 * c, acc[c]);
    }
  };
  vectors(std::integral_constant<int, 8>());
  vectors(std::integral_constant<int, 4>());
  vectors(std::integral_constant<int, 1>());
  for (; d < D; ++d)
    for (int k = 0; k < count; ++k) o[d] = std::fma(w[k], values[k][d], o[d]);
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
  // A task: one row's heads h0 .. h0 + n - 1, which share key-value head kvh: every key and value row is read
  // once for all of them (into L1: 8 keys at a time for the scores, kValueChunk for the values). A row's heads
  // are split one per task when there are too few rows to keep the threads busy otherwise; the numbers are the same.
  const int64_t per_task = R * KVH >= 4 * at::get_num_threads() ? group : 1, tasks_per_kv = group / per_task;
  at::parallel_for(0, R * KVH * tasks_per_kv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p;  // [n, keys]: the task's heads' scores, then weights
    std::vector<float> sums;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / (KVH * tasks_per_kv), kvh = i / tasks_per_kv % KVH;
      const int64_t h0 = kvh * group + i % tasks_per_kv * per_task, n = per_task;
      const int64_t* t = tp + (tables.size(0) == R ? r : 0) * max_blocks;
      const int64_t last = pp[r] + 1, first = window > 0 ? std::max<int64_t>(0, last - window) : 0;
      const int64_t keys = last - first;
      // f(j, row) for keys j = first .. last - 1 in order, row: key j's (or value j's) row of this head
      auto each_key = [&](const float* cache, auto&& f) {
        for (int64_t j = first; j < last;) {
          const int64_t offset = j % block_size, end = std::min(last, j - offset + block_size);
          const float* row = cache + (t[j / block_size] * block_size + offset) * row_stride + kvh * D;
          for (; j < end; ++j, row += row_stride) f(j, row);
        }
      };
      const float* qr = qp + (r * H + h0) * D;  // head h0 + c's query at qr + c D
      p.resize(n * keys);
      sums.resize(n);
      const float* pending[8];
      int count = 0;
      each_key(kp, [&](int64_t j, const float* key) {
        pending[count++] = key;
        if (count < 8) return;
        for (int64_t c = 0; c < n; ++c)
          _mm256_storeu_ps(&p[c * keys + j - 7 - first],
                           _mm256_mul_ps(dot8(qr + c * D, pending, D), _mm256_set1_ps(s)));
        count = 0;
      });
      for (int64_t c = 0; c < n; ++c)
        for (int k = 0; k < count; ++k) p[c * keys + keys - count + k] = dot(qr + c * D, pending[k], D) * s;
      for (int64_t c = 0; c < n; ++c) {
        float* w = p.data() + c * keys;
        float top = -std::numeric_limits<float>::infinity(), sum = 0.f;
        for (int64_t k = 0; k < keys; ++k) top = std::max(top, w[k]);
        for (int64_t k = 0; k < keys; ++k) sum += (w[k] = std::exp(w[k] - top));
        sums[c] = sum;
      }
      // o = sum_j w_j v_j, a fused multiply-add per key in key order; up to 64 values of o at a time in registers,
      // held in o between chunks of keys (the same numbers: o is only stored and loaded back)
      float* o = op + (r * H + h0) * D;
      std::fill(o, o + n * D, 0.f);
      const float* values[kValueChunk];
      int64_t k0 = 0;  // the chunk's first key, from `first`
      count = 0;
      auto flush = [&] {
        for (int64_t c = 0; c < n; ++c) accumulate_values(p.data() + c * keys + k0, values, count, D, o + c * D);
        k0 += count;
        count = 0;
      };
      each_key(vp, [&](int64_t, const float* value) {
        values[count++] = value;
        if (count == kValueChunk) flush();
      });
      if (count) flush();
      for (int64_t c = 0; c < n; ++c) {
        const float inverse = 1.f / sums[c];
        for (int64_t d = 0; d < D; ++d) o[c * D + d] *= inverse;
      }
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
