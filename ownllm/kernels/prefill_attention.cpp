// Causal attention of one sequence's new tokens (a prompt or a chunk of it) over its keys: bf16 in,
// float32 math, bf16 out. The many-query counterpart of paged_decode_attention (decode_ops.cpp).
//
// torch's CPU SDPA computes in float32 here (its bf16 path converts and is slower without AMX), ~50 GFLOP/s:
// two thirds of a 2048-token prefill of the SmolLM2 shape went to attention. Here the scores are vdpbf16ps
// dot products (exact bf16 products, float32 sums), the keys packed once per call in blocks of 16 with
// dimension pairs interleaved, the instruction's operand layout; softmax and the weighted sum of the values
// are float32, as the reference computes them. Each query's keys are one contiguous range (causal, and a
// sliding window or an attention chunk's start as the lower end), so masks are bounds.
//
// Work items are (kv head, block of query positions): the rows of an item are its positions times the
// query heads of the kv head's group, which share its keys. An item keeps its rows' scores whole (two passes
// over exact row maxima, no online rescaling): rows x keys float32, within L2 for a few thousand keys.
//
// A query's numbers depend on it and its keys only, not on the rows it shares an item with: key blocks start at
// multiples of 16 and keys outside its range add exact zeros. So a prompt gets the same numbers in one piece, in
// chunks, or after a prefix-cache hit (torch's SDPA did not: tests/test_bundled_model.py).
#include <immintrin.h>
#include "torch_lite.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "simd_exp.h"

namespace {

using bf16 = at::BFloat16;
constexpr int64_t kKeyBlock = 16;      // keys per packed block: one score vector
constexpr int64_t kRowsPerItem = 32;   // query rows (positions x group heads) per work item, about
constexpr int64_t kScoreRows = 8;      // rows whose scores one pass over a key block computes

inline __m512 widen(const bf16* p) {  // 16 bf16 -> float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// One call's inputs (see prefill_attention below). Dk: the query and key size; Dv: the value size.
struct Problem {
  const bf16 *q, *keys, *values;
  const int64_t* pos;
  int64_t ldq, S, KVH, T, H, Dk, Dv, key_start, window, chunk;
  float scale;
  bf16* out;

  int64_t group() const { return H / KVH; }
  int64_t pairs() const { return Dk / 2; }
  int64_t blocks() const { return (S + kKeyBlock - 1) / kKeyBlock; }

  // key index range [lo, hi] of query t
  void range(int64_t t, int64_t& lo, int64_t& hi) const {
    const int64_t p = pos[t];
    int64_t first = 0;
    if (window > 0) first = std::max<int64_t>(first, p - window + 1);
    if (chunk > 0) first = std::max<int64_t>(first, p - p % chunk);
    lo = std::max<int64_t>(0, first - key_start);
    hi = p - key_start;
  }

  // the keys, packed: [KVH, blocks, pairs, 16] pairs of bf16 (as uint32), zeros past S
  std::vector<uint32_t> pack_keys() const {
    const int64_t blocks = this->blocks(), pairs = this->pairs();
    std::vector<uint32_t> packed(KVH * blocks * pairs * kKeyBlock, 0);
    at::parallel_for(0, KVH * blocks, 16, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t h = i / blocks, blk = i % blocks;
        uint32_t* dst = packed.data() + i * pairs * kKeyBlock;
        for (int64_t j = 0; j < kKeyBlock && blk * kKeyBlock + j < S; ++j) {
          const uint32_t* key = (const uint32_t*)(keys + ((blk * kKeyBlock + j) * KVH + h) * Dk);
          for (int64_t p = 0; p < pairs; ++p) dst[p * kKeyBlock + j] = key[p];
        }
      }
    });
    return packed;
  }
};

// One work item's rows (kv head h, positions t0..): their queries, key ranges and scores [rows, width] for the
// keys base.. base + width, then their softmax numerators in place.
struct Item {
  std::vector<uint32_t> queries;  // [rows padded to kScoreRows, pairs], zeros past rows
  std::vector<float> scores, inv_sum;
  std::vector<int64_t> lo, hi;
  int64_t h = 0, t0 = 0, rows = 0, base = 0, width = 0, end = 0;  // end: keys past base any row attends

  Item(const Problem& pr, int64_t max_rows)
      : queries(max_rows * pr.pairs()), scores(max_rows * (pr.blocks() + 1) * kKeyBlock), inv_sum(max_rows),
        lo(max_rows), hi(max_rows) {}

  void load(const Problem& pr, int64_t kv_head, int64_t first_position, int64_t positions) {
    const int64_t group = pr.group(), pairs = pr.pairs();
    h = kv_head, t0 = first_position, rows = positions * group;
    std::fill(queries.begin(), queries.end(), 0u);
    int64_t first = pr.S, last = 0;  // the union of the rows' ranges
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = t0 + r / group, head = h * group + r % group;
      std::memcpy(queries.data() + r * pairs, pr.q + t * pr.ldq + head * pr.Dk, pr.Dk * sizeof(bf16));
      pr.range(t, lo[r], hi[r]);
      first = std::min(first, lo[r]);
      last = std::max(last, hi[r]);
    }
    base = first / kKeyBlock * kKeyBlock;
    width = (last / kKeyBlock + 1) * kKeyBlock - base;
    end = last - base + 1;
  }

  // scaled q . k for every row and key block of the range, kScoreRows rows per pass over a block
  void score(const Problem& pr, const uint32_t* packed) {
    const int64_t pairs = pr.pairs(), padded = (rows + kScoreRows - 1) / kScoreRows * kScoreRows;
    for (int64_t col = 0; col < width; col += kKeyBlock) {
      const uint32_t* kb = packed + (h * pr.blocks() + (base + col) / kKeyBlock) * pairs * kKeyBlock;
      for (int64_t r0 = 0; r0 < padded; r0 += kScoreRows) {
        __m512 acc[kScoreRows];
        for (int r = 0; r < kScoreRows; ++r) acc[r] = _mm512_setzero_ps();
        const uint32_t* qr = queries.data() + r0 * pairs;
        for (int64_t p = 0; p < pairs; ++p) {
          const __m512bh kv = (__m512bh)_mm512_loadu_si512(kb + p * kKeyBlock);
#pragma GCC unroll 8
          for (int r = 0; r < kScoreRows; ++r)
            acc[r] = _mm512_dpbf16_ps(acc[r], kv, (__m512bh)_mm512_set1_epi32((int)qr[r * pairs + p]));
        }
        for (int r = 0; r < kScoreRows; ++r)
          _mm512_storeu_ps(scores.data() + (r0 + r) * width + col, _mm512_mul_ps(acc[r], _mm512_set1_ps(pr.scale)));
      }
    }
  }

  // scores -> exp(score - the row's max) within each row's range, zero outside; inv_sum: 1 / their sum
  void softmax_numerators() {
    for (int64_t r = 0; r < rows; ++r) {
      float* row = scores.data() + r * width;
      const int64_t a = lo[r] - base, b = hi[r] - base + 1;
      const auto inside = [&](int64_t j) {  // lanes j.. within [a, b)
        const __m512i lane = _mm512_add_epi32(_mm512_set1_epi32((int)j), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        return (__mmask16)(_mm512_cmpge_epi32_mask(lane, _mm512_set1_epi32((int)a)) &
                           _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32((int)b)));
      };
      __m512 maxima = _mm512_set1_ps(-INFINITY);
      for (int64_t j = a / 16 * 16; j < b; j += 16) maxima = _mm512_mask_max_ps(maxima, inside(j), maxima, _mm512_loadu_ps(row + j));
      const float max_score = _mm512_reduce_max_ps(maxima);
      __m512 total = _mm512_setzero_ps();
      for (int64_t j = 0; j < width; j += 16) {
        const __m512 e = _mm512_maskz_mov_ps(inside(j), exp512(_mm512_sub_ps(_mm512_loadu_ps(row + j), _mm512_set1_ps(max_score))));
        _mm512_storeu_ps(row + j, e);
        total = _mm512_add_ps(total, e);
      }
      inv_sum[r] = 1.f / _mm512_reduce_add_ps(total);
    }
  }

  // out rows = numerators . values / sum, kRows rows at a time (their accumulators in registers). kChunks: Dv / 16
  // as compiled, or 0 for any Dv (a multiple of 16, <= 256).
  template <int64_t kChunks>
  void weigh_values(const Problem& pr) const {
    constexpr int64_t kRows = kChunks ? std::max<int64_t>(1, 16 / kChunks) : 1;
    const int64_t Dv = kChunks ? kChunks * 16 : pr.Dv, chunks = Dv / 16, group = pr.group();
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t n = std::min(kRows, rows - r0);
      __m512 acc[kRows][kChunks ? kChunks : 16];
      for (int64_t r = 0; r < kRows; ++r)
        for (int64_t c = 0; c < chunks; ++c) acc[r][c] = _mm512_setzero_ps();
      for (int64_t j = 0; j < end; ++j) {
        const bf16* value = pr.values + ((base + j) * pr.KVH + h) * Dv;
        __m512 v[kChunks ? kChunks : 16];
        for (int64_t c = 0; c < chunks; ++c) v[c] = widen(value + 16 * c);
        for (int64_t r = 0; r < n; ++r) {
          const __m512 weight = _mm512_set1_ps(scores[(r0 + r) * width + j]);
          for (int64_t c = 0; c < chunks; ++c) acc[r][c] = _mm512_fmadd_ps(weight, v[c], acc[r][c]);
        }
      }
      for (int64_t r = 0; r < n; ++r) {
        const int64_t row = r0 + r, t = t0 + row / group, head = h * group + row % group;
        bf16* dst = pr.out + (t * pr.H + head) * Dv;
        for (int64_t c = 0; c < chunks; ++c)
          _mm256_storeu_si256((__m256i*)(dst + 16 * c),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv_sum[row]))));
      }
    }
  }
};

template <int64_t kChunks>
void attend(const Problem& pr) {
  const std::vector<uint32_t> packed = pr.pack_keys();
  const int64_t group = pr.group(), positions_per_item = std::max<int64_t>(1, kRowsPerItem / group);
  const int64_t position_blocks = (pr.T + positions_per_item - 1) / positions_per_item;
  const int64_t max_rows = (positions_per_item * group + kScoreRows - 1) / kScoreRows * kScoreRows;
  // items in the order 0, last, 1, last - 1, ...: the threads' contiguous shares of them cost alike
  const auto item_block = [&](int64_t i) { return i % 2 ? position_blocks - 1 - i / 2 : i / 2; };
  at::parallel_for(0, pr.KVH * position_blocks, 1, [&](int64_t i0, int64_t i1) {
    Item item(pr, max_rows);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t0 = item_block(i % position_blocks) * positions_per_item;
      item.load(pr, i / position_blocks, t0, std::min(pr.T, t0 + positions_per_item) - t0);
      item.score(pr, packed.data());
      item.softmax_numerators();
      item.weigh_values<kChunks>(pr);
    }
  });
}

}  // namespace

// q: [T, H, Dk] bf16 (rows may be strided); keys: [S, KVH, Dk], values: [S, KVH, Dv] bf16, key j at position
// key_start + j; positions: [T] the queries' positions. A query at p attends keys p' <= p, and p' > p - window
// (window > 0) and p' >= p - p % chunk (chunk > 0); its own key must be among them. -> [T, H * Dv] bf16.
at::Tensor prefill_attention(at::Tensor q, at::Tensor keys, at::Tensor values, at::Tensor positions,
                                int64_t key_start, double scale, int64_t window, int64_t chunk) {
  for (auto* t : {&q, &keys, &values})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu() && t->dim() == 3, "q, keys, values: 3-D bf16 on the CPU");
  const int64_t T = q.size(0), H = q.size(1), Dk = q.size(2), Dv = values.size(2), S = keys.size(0), KVH = keys.size(1);
  TORCH_CHECK(Dk % 16 == 0 && Dk <= 256 && Dv % 16 == 0 && Dv <= 256, "head sizes: multiples of 16, at most 256");
  TORCH_CHECK(keys.size(2) == Dk && values.size(0) == S && values.size(1) == KVH && H % KVH == 0,
              "keys: [S, KVH, Dk], values: [S, KVH, Dv]");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == Dk, "q: each position's heads contiguous");
  keys = keys.contiguous();
  values = values.contiguous();
  positions = positions.to(at::kLong).contiguous();
  TORCH_CHECK(positions.numel() == T, "positions: [T]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= key_start && pos[t] < key_start + S, "query position ", pos[t], " has no key");
  auto out = at::empty({T, H * Dv}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const Problem problem{q.data_ptr<bf16>(), keys.data_ptr<bf16>(), values.data_ptr<bf16>(), pos, q.stride(0), S, KVH,
                        T, H, Dk, Dv, key_start, window, chunk, (float)scale, out.data_ptr<bf16>()};
  auto run = attend<0>;
  if (Dv == 64) run = attend<4>;
  if (Dv == 128) run = attend<8>;
  run(problem);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prefill_attention", &prefill_attention, "causal attention of a sequence's new tokens over its keys, bf16", py::call_guard<py::gil_scoped_release>());
}
