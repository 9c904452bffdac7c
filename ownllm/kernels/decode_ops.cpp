// The small bf16 ops of a decode step, each one call instead of several torch ops: RMSNorm, RoPE
// (rotate-half layout, in place), SiLU-and-multiply, and attention of one query per sequence over
// the paged KV cache (writing the new keys and values into their slots first). DecodeLayers runs a
// Llama-family decoder's whole stack of layers for a decode batch as one call, made of these ops and
// gemv_bf16's tiles: no Python between the layers.
//
// At decode every tensor here is a few KB, so torch's per-op dispatch, not arithmetic, is the cost:
// the plain-torch versions take 5-20 ops each. Rounding follows the torch reference step by step
// (float32 math, bf16 wherever the reference rounds to bf16), so results match it to bf16 ulps.
#include <immintrin.h>
#include "torch_lite.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "bf16_tile.h"
#include "simd_exp.h"

namespace {

using bf16 = at::BFloat16;

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

// 16 bf16 values (the first n of them) widened to float32.
inline __m512 load(const bf16* p, int64_t n = 16) {
  __m256i raw = n >= 16 ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(tail_mask(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Rounded to bf16 (nearest even, as torch rounds) and stored, the first n lanes.
inline void store(bf16* p, __m512 v, int64_t n = 16) {
  __m256i packed = (__m256i)_mm512_cvtneps_pbh(v);
  if (n >= 16)
    _mm256_storeu_si256((__m256i*)p, packed);
  else
    _mm256_mask_storeu_epi16(p, tail_mask(n), packed);
}

// 32 bf16 values (the first n of them, zeros after) as dot-product operands.
inline __m512bh load_pairs(const bf16* p, int64_t n = 32) {
  return (__m512bh)(n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p));
}

// Float32 values rounded to bf16 and back: the reference's intermediate roundings.
inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// The 16 horizontal sums of v[0..15], in order: a transposing tree of adds.
inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  const __m512 x0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 x1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x0, x1, 0x88), _mm512_shuffle_f32x4(x0, x1, 0xDD));
}

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension");
}

}  // namespace

// x: [..., D] -> weight * bf16(x * rsqrt(mean(x^2) + eps)), the Llama RMSNorm (per head for [T, heads, D]).
at::Tensor rms_norm(at::Tensor input, at::Tensor weight, double eps) {
  check_bf16(input, "x");
  check_bf16(weight, "weight");
  TORCH_CHECK(input.dim() >= 1 && weight.dim() == 1 && weight.size(0) == input.size(-1), "shapes: x [..., D], weight [D]");
  const at::Tensor x = input.dim() == 2 ? input : input.reshape({-1, input.size(-1)});
  const int64_t T = x.size(0), D = x.size(1), stride = x.stride(0);
  auto out = at::empty({T, D}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const bf16* row = xp + t * stride;
      __m512 sq = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 v = load(row + d, D - d);
        sq = _mm512_fmadd_ps(v, v, sq);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / D + (float)eps));
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 normed = round_bf16(_mm512_mul_ps(load(row + d, D - d), inv));
        store(op + t * D + d, _mm512_mul_ps(load(wp + d, D - d), normed), D - d);
      }
    }
  });
  return out.view(input.sizes());
}

// q: [T, heads, D] and k: [T, kv_heads, D] in place -> x * cos + rotate_half(x) * sin, each product
// and the sum rounded to bf16 as the reference rounds them. cos, sin: [T, 1, D] (or [T, D]) bf16.
void rope_rotate_half_(at::Tensor q, at::Tensor k, at::Tensor cos, at::Tensor sin) {
  check_bf16(q, "q");
  check_bf16(k, "k");
  const int64_t T = q.size(0), Hq = q.size(1), Hk = k.size(1), D = q.size(2), half = D / 2;
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == T && k.size(2) == D && cos.numel() == T * D &&
                  sin.numel() == T * D, "shapes: q [T, heads, D], k [T, kv_heads, D], cos and sin [T, 1, D]");
  cos = cos.contiguous();
  sin = sin.contiguous();
  bf16* qp = q.data_ptr<bf16>();
  bf16* kp = k.data_ptr<bf16>();
  const bf16* cp = cos.data_ptr<bf16>();
  const bf16* sp = sin.data_ptr<bf16>();
  at::parallel_for(0, T * (Hq + Hk), 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / (Hq + Hk), h = i % (Hq + Hk);
      bf16* head = h < Hq ? qp + t * q.stride(0) + h * q.stride(1) : kp + t * k.stride(0) + (h - Hq) * k.stride(1);
      const bf16 *c = cp + t * D, *s = sp + t * D;
      for (int64_t d = 0; d < half; d += 16) {
        const int64_t n = half - d;
        const __m512 lo = load(head + d, n), hi = load(head + half + d, n);
        const __m512 new_lo = _mm512_sub_ps(round_bf16(_mm512_mul_ps(lo, load(c + d, n))),
                                            round_bf16(_mm512_mul_ps(hi, load(s + d, n))));
        const __m512 new_hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(hi, load(c + half + d, n))),
                                            round_bf16(_mm512_mul_ps(lo, load(s + half + d, n))));
        store(head + d, new_lo, n);
        store(head + half + d, new_hi, n);
      }
    }
  });
}

// out[i] = bf16(silu(gate[i])) * up[i] for i < n (each lane alone: any span of a row gives the same numbers).
inline void silu_mul_span(const bf16* gate, const bf16* up, bf16* out, int64_t n) {
  for (int64_t d = 0; d < n; d += 16) {
    const __m512 g = load(gate + d, n - d);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    store(out + d, _mm512_mul_ps(round_bf16(silu), load(up + d, n - d)), n - d);
  }
}

// gate_up: [T, 2I] (gate then up) -> bf16(silu(gate)) * up: [T, I].
at::Tensor silu_mul(at::Tensor gate_up) {
  check_bf16(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "shape: gate_up [T, 2I]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = at::empty({T, I}, gate_up.options());
  const bf16* gp = gate_up.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const int64_t chunks = (I + 15) / 16;
  at::parallel_for(0, T * chunks, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / chunks, d = (i % chunks) * 16;
      silu_mul_span(gp + t * stride + d, gp + t * stride + I + d, op + t * I + d, std::min<int64_t>(16, I - d));
    }
  });
  return out;
}

// One query per sequence over its cached context, after writing this step's keys and values.
// q: [B, H, D]; k, v: [B, KVH, D] (the new token's); k_cache, v_cache: [num_blocks, block_size, KVH, D];
// slots, positions: [B]; block_tables: [B, max_blocks]. A query at position p attends keys p' <= p,
// and p' > p - window (window > 0) and p' >= p - p % chunk (chunk > 0). Float32 scores, softmax and
// sums (as the reference), output rounded to bf16: [B, H * D].
//
// Work items are (sequence, kv head, split of kSplitTokens context tokens): each split's group of query
// heads walks its tokens together in steps of 16, so each key and value is fetched once, all of them
// prefetched up front (the cache is cold: a decode step streams the weights through L3 between two visits
// of a layer). Splits spread one long sequence over the threads; a second pass merges each head's splits
// (softmax partials rescaled to their common max). The splits depend on the context length only, so a
// sequence gets the same numbers in any batch; a context of up to kSplitTokens is one split, merged as is.
constexpr int64_t kSplitTokens = 64;

// kD: the head size the loops are compiled for (their trip counts known, accumulators in registers), or 0
// for any (q.size(2)).
template <int64_t kD>
at::Tensor paged_decode_attention_d(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor k_cache,
                                       at::Tensor v_cache, at::Tensor slots, at::Tensor positions,
                                       at::Tensor block_tables, double scale, int64_t window, int64_t chunk) {
  const int64_t B = q.size(0), H = q.size(1), D = kD ? kD : q.size(2), KVH = k_cache.size(2), block_size = k_cache.size(1);
  TORCH_CHECK(k.size(0) == B && k.size(1) == KVH && k.size(2) == D && k_cache.size(3) == D && H % KVH == 0,
              "shapes: q [B, H, D], k and v [B, KVH, D], caches [blocks, block_size, KVH, D]");
  TORCH_CHECK(D <= 512, "head_dim <= 512");
  slots = slots.to(at::kLong).contiguous();
  positions = positions.to(at::kLong).contiguous();
  block_tables = block_tables.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1), group = H / KVH;
  bf16* kc = k_cache.data_ptr<bf16>();
  bf16* vc = v_cache.data_ptr<bf16>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KVH; ++h) {
      std::memcpy(kc + (slot[b] * KVH + h) * D, k.data_ptr<bf16>() + b * k.stride(0) + h * k.stride(1), D * sizeof(bf16));
      std::memcpy(vc + (slot[b] * KVH + h) * D, v.data_ptr<bf16>() + b * v.stride(0) + h * v.stride(1), D * sizeof(bf16));
    }
  // each sequence's first attended position and its splits; items[i] = (sequence, kv head, split)
  std::vector<int64_t> firsts(B), split_start(B + 1, 0);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pos[b];
    int64_t first = 0;
    if (window > 0) first = std::max<int64_t>(first, p - window + 1);
    if (chunk > 0) first = std::max<int64_t>(first, p - p % chunk);
    firsts[b] = first;
    split_start[b + 1] = split_start[b] + (p + 1 - first + kSplitTokens - 1) / kSplitTokens;
  }
  const int64_t num_splits = split_start[B], num_items = num_splits * KVH;
  const int64_t chunks = (D + 15) / 16, pair_chunks = (D + 31) / 32, line_stride = 32;  // bf16 per 64-byte line
  // per item and head of its group: the split's max score, its sum of exponentials, its weighted values [D]
  const int64_t head_size = 2 + chunks * 16, partial_size = group * head_size;
  std::vector<float> partial(num_items * partial_size);
  const bf16* qp = q.data_ptr<bf16>();
  // item i's context rows in the cache (block by block, no divisions), each key and value prefetched;
  // -> (sequence, tokens)
  const auto plan = [&](int64_t i, int64_t* rows) -> std::pair<int64_t, int64_t> {
    const int64_t split = i / KVH, kvh = i % KVH;
    const int64_t b = std::upper_bound(split_start.begin(), split_start.end(), split) - split_start.begin() - 1;
    const int64_t lo = firsts[b] + (split - split_start[b]) * kSplitTokens;
    const int64_t n = std::min(kSplitTokens, pos[b] + 1 - lo);
    const int64_t* table = tables + b * max_blocks;
    for (int64_t s = 0, block = lo / block_size, offset = lo % block_size; s < n; ++s) {
      rows[s] = (table[block] * block_size + offset) * KVH + kvh;
      if (++offset == block_size) offset = 0, ++block;
      for (int64_t d = 0; d < D; d += line_stride) {
        _mm_prefetch((const char*)(kc + rows[s] * D + d), _MM_HINT_T0);
        _mm_prefetch((const char*)(vc + rows[s] * D + d), _MM_HINT_T0);
      }
    }
    return {b, n};
  };
  at::parallel_for(0, num_items, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> scores(group * kSplitTokens);  // [group, kSplitTokens]
    int64_t rows[kSplitTokens], next_rows[kSplitTokens];
    __m512bh qv[16];
    __m512 acc[32];
    std::pair<int64_t, int64_t> next = plan(i0, next_rows);
    for (int64_t i = i0; i < i1; ++i) {  // the next item's keys and values load while this one computes
      const auto [b, n] = next;
      std::copy(next_rows, next_rows + n, rows);
      if (i + 1 < i1) next = plan(i + 1, next_rows);
      const int64_t kvh = i % KVH;
      for (int64_t j = 0; j < n; j += 16) {  // scores: 16 dot products per head, then one tree of sums
        for (int64_t g = 0; g < group; ++g) {
          const bf16* qh = qp + b * q.stride(0) + (kvh * group + g) * q.stride(1);
          for (int64_t c = 0; c < pair_chunks; ++c) qv[c] = load_pairs(qh + c * 32, D - c * 32);
          __m512 dots[16];  // exact bf16 products, float32 sums (bf16 dot-product instructions)
          for (int64_t t = 0; t < 16; ++t) {
            dots[t] = _mm512_setzero_ps();
            if (j + t >= n) continue;
            const bf16* key = kc + rows[j + t] * D;
            for (int64_t c = 0; c < pair_chunks; ++c) dots[t] = _mm512_dpbf16_ps(dots[t], qv[c], load_pairs(key + c * 32, D - c * 32));
          }
          _mm512_storeu_ps(scores.data() + g * kSplitTokens + j, _mm512_mul_ps(hsum16(dots), _mm512_set1_ps((float)scale)));
        }
      }
      float* out_partial = partial.data() + i * partial_size;
      for (int64_t g = 0; g < group; ++g) {  // softmax numerators in place
        float* row_scores = scores.data() + g * kSplitTokens;
        __m512 max_scores = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < n; j += 16)
          max_scores = _mm512_mask_max_ps(max_scores, tail_mask(n - j), max_scores, _mm512_loadu_ps(row_scores + j));
        const float max_score = _mm512_reduce_max_ps(max_scores);
        __m512 total = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
          const __m512 e = _mm512_maskz_mov_ps(tail_mask(n - j), exp512(_mm512_sub_ps(_mm512_loadu_ps(row_scores + j), _mm512_set1_ps(max_score))));
          _mm512_storeu_ps(row_scores + j, e);
          total = _mm512_add_ps(total, e);
        }
        out_partial[g * head_size] = max_score;
        out_partial[g * head_size + 1] = _mm512_reduce_add_ps(total);
      }
      for (int64_t g = 0; g < group; ++g) {  // weighted values, token by token per head
        for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
        const float* weights = scores.data() + g * kSplitTokens;
        for (int64_t t = 0; t < n; ++t) {
          const bf16* value = vc + rows[t] * D;
          const __m512 weight = _mm512_set1_ps(weights[t]);
          for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_fmadd_ps(weight, load(value + c * 16, D - c * 16), acc[c]);
        }
        for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(out_partial + g * head_size + 2 + c * 16, acc[c]);
      }
    }
  });
  auto out = at::empty({B, H * D}, q.options());
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, B * H, 16, [&](int64_t h0, int64_t h1) {  // merge each head's splits
    __m512 acc[32];
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / H, h = bh % H, kvh = h / group, g = h % group;
      const auto head_partial = [&](int64_t split) {
        return partial.data() + ((split_start[b] + split) * KVH + kvh) * partial_size + g * head_size;
      };
      const int64_t splits = split_start[b + 1] - split_start[b];
      float max_score = -INFINITY;
      for (int64_t s = 0; s < splits; ++s) max_score = std::max(max_score, head_partial(s)[0]);
      float total = 0.f;
      for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
      for (int64_t s = 0; s < splits; ++s) {
        const float* part = head_partial(s);
        const float weight = std::exp(part[0] - max_score);  // exactly 1 for a single split
        total += weight * part[1];
        for (int64_t c = 0; c < chunks; ++c)
          acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(weight), _mm512_loadu_ps(part + 2 + c * 16), acc[c]);
      }
      for (int64_t c = 0; c < chunks; ++c)
        store(op + b * H * D + h * D + c * 16, _mm512_mul_ps(acc[c], _mm512_set1_ps(1.f / total)), D - c * 16);
    }
  });
  return out;
}

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor k_cache,
                                     at::Tensor v_cache, at::Tensor slots, at::Tensor positions,
                                     at::Tensor block_tables, double scale, int64_t window, int64_t chunk) {
  for (auto* t : {&q, &k, &v, &k_cache, &v_cache}) check_bf16(*t, "q, k, v and the caches");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "the caches must be contiguous");
  TORCH_CHECK(q.dim() == 3, "q: [B, H, D]");
  auto attend = paged_decode_attention_d<0>;
  if (q.size(2) == 64) attend = paged_decode_attention_d<64>;
  if (q.size(2) == 128) attend = paged_decode_attention_d<128>;
  return attend(q, k, v, k_cache, v_cache, slots, positions, block_tables, scale, window, chunk);
}

namespace {

// bf16mm::rows, prefetching the weight rows `ahead` rows on while a tile multiplies (0: as rows does); the tiles,
// and so the numbers, are the same.
void rows_ahead(const bf16* x, int64_t ldx, int64_t M, const bf16* w, int64_t K, int64_t n0, int64_t n1,
                const bf16* bias, bf16* y, int64_t ldy, int64_t ahead) {
  if (ahead == 0) return bf16mm::rows(x, ldx, M, w, K, K, n0, n1, bias, y, ldy);
  float out[4][4];
  for (int64_t n = n0; n < n1; n += 4) {
    const int nb = (int)std::min<int64_t>(4, n1 - n);
    const bf16* next = n + ahead + 4 <= n1 ? w + (n + ahead) * K : nullptr;
    for (int64_t m = 0; m < M; m += 4) {
      const int mb = (int)std::min<int64_t>(4, M - m);
      bf16mm::kTiles[mb - 1][nb - 1](x + m * ldx, ldx, w + n * K, K, K, out, m == 0 ? next : nullptr);
      for (int i = 0; i < mb; ++i)
        for (int j = 0; j < nb; ++j)
          y[(m + i) * ldy + n + j] = bf16(out[i][j] + (bias ? static_cast<float>(bias[n + j]) : 0.f));
    }
  }
}

// How far ahead rows_ahead prefetches weight rows for M activation rows of K. A few short activation rows: none,
// rows streams the weights one row at a time (bf16mm::streams_rows). Otherwise rows does not prefetch for M <= 4;
// there prefetching 64 rows ahead made the SmolLM2-135M shape's forwards 5-15% faster (one thread, under load).
int64_t rows_ahead_for(int64_t M, int64_t K) { return bf16mm::streams_rows(M, K) ? 0 : M > 4 ? 4 : 64; }

// y [M, N] = x [M, K] (rows any stride) @ w [N, K]^T (+ bias, numel 0: none): gemv_bf16's arithmetic exactly.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), ldx = x.stride(0);
  auto y = at::empty({M, N}, x.options());
  const bf16 *xp = x.data_ptr<bf16>(), *wp = w.data_ptr<bf16>();
  const bf16* b = bias.numel() ? bias.data_ptr<bf16>() : nullptr;
  bf16* yp = y.data_ptr<bf16>();
  const int64_t ahead = rows_ahead_for(M, K);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { rows_ahead(xp, ldx, M, wp, K, n0, n1, b, yp, N, ahead); });
  return y;
}

// silu_mul(linear(x, w, bias)) in one parallel region instead of two: each thread multiplies gate rows [i0, i1)
// and up rows [I + i0, I + i1) of w [2I, K], then takes their SiLU product -> [M, I]. The same numbers.
at::Tensor gate_up_silu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias) {
  const int64_t M = x.size(0), K = x.size(1), I = w.size(0) / 2, ldx = x.stride(0);
  auto gate_up = at::empty({M, 2 * I}, x.options());
  auto out = at::empty({M, I}, x.options());
  const bf16 *xp = x.data_ptr<bf16>(), *wp = w.data_ptr<bf16>();
  const bf16* b = bias.numel() ? bias.data_ptr<bf16>() : nullptr;
  bf16 *gp = gate_up.data_ptr<bf16>(), *op = out.data_ptr<bf16>();
  const int64_t ahead = rows_ahead_for(M, K);
  at::parallel_for(0, I, 64, [&](int64_t i0, int64_t i1) {
    rows_ahead(xp, ldx, M, wp, K, i0, i1, b, gp, 2 * I, ahead);
    rows_ahead(xp, ldx, M, wp + I * K, K, i0, i1, b ? b + I : nullptr, gp + I, 2 * I, ahead);
    for (int64_t m = 0; m < M; ++m) silu_mul_span(gp + m * 2 * I + i0, gp + m * 2 * I + I + i0, op + m * I + i0, i1 - i0);
  });
  return out;
}

// x += delta in place (each sum rounded to bf16, as torch's bf16 add), then, with a weight (numel > 0), the
// RMSNorm of the new x -> [T, D] (undefined without a weight). x, delta: [T, D] contiguous.
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  const int64_t T = x.size(0), D = x.size(1);
  bf16* xp = x.data_ptr<bf16>();
  const bf16* dp = delta.data_ptr<bf16>();
  const bool norm = weight.defined() && weight.numel() > 0;
  at::Tensor out = norm ? at::empty({T, D}, x.options()) : at::Tensor();
  const bf16* wp = norm ? weight.data_ptr<bf16>() : nullptr;
  bf16* op = norm ? out.data_ptr<bf16>() : nullptr;
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      bf16* row = xp + t * D;
      __m512 sq = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 sum = round_bf16(_mm512_add_ps(load(row + d, D - d), load(dp + t * D + d, D - d)));
        store(row + d, sum, D - d);
        sq = _mm512_fmadd_ps(sum, sum, sq);
      }
      if (!norm) continue;
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / D + (float)eps));
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 normed = round_bf16(_mm512_mul_ps(load(row + d, D - d), inv));
        store(op + t * D + d, _mm512_mul_ps(load(wp + d, D - d), normed), D - d);
      }
    }
  });
  return out;
}

}  // namespace

// A Llama-family decoder's layers for one decode batch (one token per sequence), each layer
//   x += o_proj(attention(rope(qkv_proj(rms_norm(x))))); x += down_proj(silu_mul(gate_up_proj(rms_norm(x))))
// made of the ops above in the order, shapes and roundings of the Python layers (so the same numbers, in any
// batch of up to 64 rows). Holds every layer's bf16 weights (biases and q/k norms: numel 0 when absent) and its
// KV-cache views, given once; forward takes a step's input embeddings and metadata. A projection whose weights
// are not dense bf16 (quantized) is given as a Python callable instead (its Linear's forward), called with the
// GIL held: one call per projection, where the Python layers make several calls around each.
class DecodeLayers {
 public:
  DecodeLayers(std::vector<std::vector<at::Tensor>> layers, std::vector<std::vector<py::object>> projections,
               std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches, std::vector<int64_t> windows,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale)
      : layers_(std::move(layers)), projections_(std::move(projections)), k_caches_(std::move(k_caches)),
        v_caches_(std::move(v_caches)),
        windows_(std::move(windows)), H_(num_heads), KVH_(num_kv_heads), D_(head_dim), eps_(eps), scale_(scale) {
    const size_t L = layers_.size();
    TORCH_CHECK(L > 0 && projections_.size() == L && k_caches_.size() == L && v_caches_.size() == L &&
                    windows_.size() == L, "one weight list, projection list, cache view and window per layer");
    for (size_t l = 0; l < L; ++l) {
      const auto& w = layers_[l];
      TORCH_CHECK(w.size() == kWeights && projections_[l].size() == 4, "each layer: ", kWeights,
                  " tensors and 4 projections");
      for (const auto& t : w) check_bf16(t, "the weights");
      for (int p = 0; p < 4; ++p)
        TORCH_CHECK(!projections_[l][p].is_none() || (w[kWeight[p]].dim() == 2 && w[kWeight[p]].is_contiguous()),
                    "2-D contiguous weights where no callable is given");
    }
    for (const auto& c : k_caches_) check_bf16(c, "the caches");
    for (const auto& c : v_caches_) check_bf16(c, "the caches");
  }

  // x: [B, hidden] the input embeddings (not modified); cos, sin: [B, 1, D]; slots, positions: [B];
  // block_tables: [B, max_blocks] -> the last layer's output [B, hidden], before the final norm.
  at::Tensor forward(const at::Tensor& embeds, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                     const at::Tensor& positions, const at::Tensor& block_tables) const {
    check_bf16(embeds, "x");
    TORCH_CHECK(embeds.dim() == 2 && embeds.size(0) >= 1 && embeds.size(0) <= 64, "x: [B, hidden], B <= 64");
    at::Tensor x = embeds.contiguous().clone();  // the residual stream, updated in place
    const int64_t B = x.size(0), q_size = H_ * D_, kv_size = KVH_ * D_;
    at::Tensor h = rms_norm(x, layers_[0][kInputNorm], eps_);
    for (size_t l = 0; l < layers_.size(); ++l) {
      const auto& w = layers_[l];
      const at::Tensor qkv = project(l, 0, h);  // [B, (H + 2 KVH) D]
      at::Tensor q = qkv.narrow(1, 0, q_size).view({B, H_, D_});
      at::Tensor k = qkv.narrow(1, q_size, kv_size).view({B, KVH_, D_});
      const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({B, KVH_, D_});
      if (w[kQNorm].numel()) {
        q = rms_norm(q, w[kQNorm], eps_);
        k = rms_norm(k, w[kKNorm], eps_);
      }
      rope_rotate_half_(q, k, cos, sin);
      const at::Tensor attn = paged_decode_attention(q, k, v, k_caches_[l], v_caches_[l], slots, positions,
                                                     block_tables, scale_, windows_[l], 0);  // [B, H * D]
      h = add_rms_norm_(x, project(l, 1, attn), w[kPostNorm], eps_);
      const at::Tensor act = projections_[l][2].is_none() ? gate_up_silu(h, w[kGateUp], w[kGateUpBias])
                                                          : silu_mul(project(l, 2, h));  // [B, I]
      const at::Tensor down = project(l, 3, act);
      h = add_rms_norm_(x, down, l + 1 < layers_.size() ? layers_[l + 1][kInputNorm] : at::Tensor(), eps_);
    }
    return x;
  }

  // the order of each layer's tensors
  enum : int { kInputNorm, kQkv, kQkvBias, kQNorm, kKNorm, kO, kOBias, kPostNorm, kGateUp, kGateUpBias, kDown,
               kDownBias, kWeights };
  // projection p (qkv, o, gate_up, down): its weight's and bias's places in a layer's tensors
  static constexpr int kWeight[4] = {kQkv, kO, kGateUp, kDown}, kBias[4] = {kQkvBias, kOBias, kGateUpBias, kDownBias};

 private:
  // projection p of layer l on x: the bf16 tiles, or the callable given for it
  at::Tensor project(size_t l, int p, const at::Tensor& x) const {
    const py::object& fn = projections_[l][p];
    if (fn.is_none()) return linear(x, layers_[l][kWeight[p]], layers_[l][kBias[p]]);
    py::gil_scoped_acquire gil;
    return fn(x).cast<at::Tensor>();
  }

  std::vector<std::vector<at::Tensor>> layers_;
  std::vector<std::vector<py::object>> projections_;
  std::vector<at::Tensor> k_caches_, v_caches_;
  std::vector<int64_t> windows_;
  int64_t H_, KVH_, D_;
  double eps_, scale_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<DecodeLayers>(m, "DecodeLayers")
      .def(py::init<std::vector<std::vector<at::Tensor>>, std::vector<std::vector<py::object>>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>, int64_t, int64_t, int64_t,
                    double, double>())
      .def("forward", &DecodeLayers::forward, "the decoder layers of one decode step, bf16",
           py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "Llama RMSNorm, bf16", py::call_guard<py::gil_scoped_release>());
  m.def("rope_rotate_half_", &rope_rotate_half_, "rotate-half RoPE of q and k in place, bf16", py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, "silu(gate) * up, bf16", py::call_guard<py::gil_scoped_release>());
  m.def("paged_decode_attention", &paged_decode_attention, "one query per sequence over the paged KV cache, bf16", py::call_guard<py::gil_scoped_release>());
}
