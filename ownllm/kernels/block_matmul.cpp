// GGUF block-quantized weights (Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) times bf16 activation rows, read from
// the file's own bytes, so the weights can stay a view of the file mapping: 0.69 (Q5_0), 0.75 (Q5_1),
// 1.06 (Q8_0), 0.56 (Q4_K), 0.69 (Q5_K) or 0.82 (Q6_K) bytes per weight instead of bf16's 2.
//
// Each weight row n is K / W blocks of B bytes, laid out exactly as ggml stores them (see each format
// below). Two ways to multiply:
// - Q8_0, Q5_0 and Q5_1 are decoded 32 weights at a time to bf16, with the float32 arithmetic of gguf-py's dequantize
//   (and llama.cpp's dequantize_row_*) in the same order, then rounded (built with -ffp-contract=off, so
//   no multiply-add is fused), and multiplied as the skinny bf16 tiles (bf16_tile.h) multiply: bit for
//   bit what gemv_bf16 gives on the dequantized weights. One activation row is multiplied straight from
//   the decoded registers; for more, 4 weight rows at a time are decoded into a bf16 scratch in L1 (the
//   next 4 prefetched meanwhile) and the bf16 tiles run over it. Rows get the same numbers in any batch of
//   up to 32.
// - The K-quants, for batches of up to 4 rows, in factored form (struct Factored): half the instructions
//   per weight, and decoding binds these kernels, not memory. Other batches are decoded as Q8_0 is.
// block_dequantize decodes row ranges to bf16 (the first way, for every format), for prefill batches
// that go to oneDNN a chunk at a time, and for embedding lookups.
#include <immintrin.h>
#include "torch_lite.h"

#include <cstring>
#include <vector>

#include "bf16_tile.h"
#include "gguf_blocks.h"

namespace {

using bf16 = at::BFloat16;
using gguf_blocks::fp16_at;
using gguf_blocks::scales_and_mins;
constexpr int64_t kDecodeRows = 4;  // weight rows decoded into the scratch at a time: one bf16 tile
constexpr int64_t kGrain = 64;  // weight rows per task

// 32 weights from codes (16 per float vector, each with its scale and offset): w = scale * q - offset,
// rounded once per operation as float32 numpy rounds it, then to bf16.
inline __m512bh weights(__m512i q_lo, __m512i q_hi, __m512 scale_lo, __m512 scale_hi, __m512 offset_lo,
                        __m512 offset_hi) {
  const __m512 lo = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q_lo), scale_lo), offset_lo);
  const __m512 hi = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q_hi), scale_hi), offset_hi);
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// The same with no offset, w = scale * q (subtracting +0 would change no bit, but costs two instructions).
inline __m512bh weights(__m512i q_lo, __m512i q_hi, __m512 scale_lo, __m512 scale_hi) {
  return _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_cvtepi32_ps(q_hi), scale_hi),
                             _mm512_mul_ps(_mm512_cvtepi32_ps(q_lo), scale_lo));
}

// 32 16-bit lanes -> their first / last 16 as 32-bit lanes
inline __m512i low16_u16(__m512i v) { return _mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)); }
inline __m512i high16_u16(__m512i v) { return _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)); }
// codes q < 128 in 16-bit lanes -> the bf16 numbers 128 + q, exactly (the bits 0x4300 | q)
inline __m512bh bf16_128_plus(__m512i q) { return (__m512bh)_mm512_or_si512(q, _mm512_set1_epi16(0x4300)); }
inline __m256i nibbles(__m256i v, int shift) {
  return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(0x0F));
}

// Q8_0: fp16 d, int8 q[32]; w = d * q.
struct Q8_0 {
  static constexpr int64_t kWeights = 32, kBytes = 34;
  template <class F>
  static void chunks(const uint8_t* block, F f) {
    const __m512 d = _mm512_set1_ps(fp16_at(block));
    f(0, weights(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(block + 2))),
                 _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(block + 18))), d, d));
  }
};

// Q5_0 (22 bytes per 32 weights): fp16 d, qh[4] (bit j of the little-endian word: weight j's fifth bit),
// q[16] (weight j in the low nibble of q[j], j + 16 in the high one); w = d * (q - 16). Q5_1 (24 bytes)
// adds an fp16 m after d, with w = d * q + m. These fill in K-quant files where rows are not a multiple
// of 256 weights (llama.cpp's fallback, e.g. SmolLM2's 576 or Qwen2.5-0.5B's 896).
template <bool kMin>
struct Q5_0or1 {
  static constexpr int64_t kWeights = 32, kBytes = kMin ? 24 : 22;
  template <class F>
  static void chunks(const uint8_t* block, F f) {
    const uint8_t* qh = block + (kMin ? 4 : 2);
    uint32_t high;
    std::memcpy(&high, qh, sizeof(high));
    const __m512i nibbles = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qh + 4)));  // q[0..15]
    const __m512i low = _mm512_and_si512(nibbles, _mm512_set1_epi32(0x0F)), high_nibbles = _mm512_srli_epi32(nibbles, 4);
    // the fifth bit, 16, where qh has it: Q5_1's codes q, Q5_0's q - 16 (so 16 is added, or 16 taken off)
    const __m512i sixteen = _mm512_set1_epi32(16);
    const __mmask16 lo_bits = (__mmask16)high, hi_bits = (__mmask16)(high >> 16);
    const __m512 d = _mm512_set1_ps(fp16_at(block));
    if (kMin) {  // d * q + m, as (d * q) - (-m)
      const __m512 neg_m = _mm512_set1_ps(-fp16_at(block + 2));
      return f(0, weights(_mm512_mask_or_epi32(low, lo_bits, low, sixteen),
                          _mm512_mask_or_epi32(high_nibbles, hi_bits, high_nibbles, sixteen), d, d, neg_m, neg_m));
    }
    f(0, weights(_mm512_mask_sub_epi32(low, (__mmask16)~lo_bits, low, sixteen),
                 _mm512_mask_sub_epi32(high_nibbles, (__mmask16)~hi_bits, high_nibbles, sixteen), d, d));
  }
};

// Lane i of v in every lane.
inline __m512 lane(__m512 v, int i) { return _mm512_permutexvar_ps(_mm512_set1_epi32(i), v); }

// Q4_K (144 bytes per 256 weights): fp16 d, fp16 dmin, 12 bytes of scales and mins, q[128] nibbles.
// Sub-block c (32 weights) takes the low nibbles of q[32 (c / 2) ...] for even c, the high ones for odd c;
// w = (d * scale[c]) * q - dmin * min[c]. Q5_K (176 bytes) adds qh[32] before q: bit c of qh[j] is the
// fifth bit of weight j of sub-block c.
template <bool kFifthBit>
struct QK_4or5 {
  static constexpr int64_t kWeights = 256, kBytes = kFifthBit ? 176 : 144;
  static constexpr int kGroup = 32;  // weights per scale

  // lanes 0-7: d * scale[c], lanes 8-15: dmin * min[c], as float32 numpy computes them
  static __m512 scales(const uint8_t* block) {
    const __m512 d = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(fp16_at(block)), _mm512_set1_ps(fp16_at(block + 2)));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(scales_and_mins(block + 4))), d);
  }

  // f(c, q) for each sub-block c, with its 32 codes as 16-bit lanes
  template <class F>
  static void code_values(const uint8_t* block, F f) {
    const uint8_t* q = block + 16 + (kFifthBit ? 32 : 0);
    __m512i high_bits;  // qh as 32 16-bit lanes
    if (kFifthBit) high_bits = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(block + 16)));
    for (int pair = 0; pair < 4; ++pair) {
      const __m512i codes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(q + 32 * pair)));
      for (int half = 0; half < 2; ++half) {
        const int c = 2 * pair + half;
        __m512i value = half ? _mm512_srli_epi16(codes, 4) : _mm512_and_si512(codes, _mm512_set1_epi16(0x0F));
        if (kFifthBit)
          value = _mm512_or_si512(value, _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(high_bits, c), _mm512_set1_epi16(1)), 4));
        f(c, value);
      }
    }
  }

  template <class F>
  static void chunks(const uint8_t* block, F f) {
    const __m512 scaled = scales(block);
    code_values(block, [&](int c, __m512i q) {
      const __m512 s = lane(scaled, c), m = lane(scaled, 8 + c);
      f(c, weights(low16_u16(q), high16_u16(q), s, s, m, m));
    });
  }

  // The factored form (see Factored): w = scale[c] (128 + q) - offset[c], in lanes c = 0-7 of each.
  static void factors(const uint8_t* block, __m512& scale, __m512& offset) {
    scale = scales(block);  // mins in lanes 8-15
    const __m512 mins = _mm512_permutexvar_ps(_mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15), scale);
    offset = _mm512_fmadd_ps(scale, _mm512_set1_ps(128.f), mins);
  }
  template <class F>
  static void codes(const uint8_t* block, __m512 scale, F f) {
    code_values(block, [&](int c, __m512i q) { f(c, bf16_128_plus(q), lane(scale, c)); });
  }
};

// Q6_K (210 bytes per 256 weights): ql[128] low nibbles, qh[64] high 2-bit pairs, int8 scales[16] (one per
// 16 weights), fp16 d. In each half h of 128 weights, sub-block t of 32 takes nibble t / 2 of
// ql[64 h + 32 (t % 2) ...] and bits 2t, 2t + 1 of qh[32 h ...]; w = (d * scale[e / 16]) * (q - 32).
struct Q6_K {
  static constexpr int64_t kWeights = 256, kBytes = 210;
  static constexpr int kGroup = 16;

  // lane e: d * scale[e], as float32 numpy computes it
  static __m512 scales(const uint8_t* block) {
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(block + 192)))),
                         _mm512_set1_ps(fp16_at(block + 208)));
  }

  // f(c, q, pair) for each 32 weights c, with their codes (0..63) as 16-bit lanes and, in lanes 0-7 and 8-15,
  // the indices of the scales of their first and last 16
  template <class F>
  static void code_values(const uint8_t* block, F f) {
    const uint8_t* ql = block;
    const uint8_t* qh = block + 128;
    for (int h = 0; h < 2; ++h) {
      const __m256i high = _mm256_loadu_si256((const __m256i*)(qh + 32 * h));
      for (int t = 0; t < 4; ++t) {
        const __m256i low = nibbles(_mm256_loadu_si256((const __m256i*)(ql + 64 * h + 32 * (t % 2))), 4 * (t / 2));
        const __m256i top = _mm256_and_si256(_mm256_srli_epi16(high, 2 * t), _mm256_set1_epi8(3));
        const int e = 8 * h + 2 * t;
        f(4 * h + t, _mm512_cvtepu8_epi16(_mm256_or_si256(low, _mm256_slli_epi16(top, 4))),
          _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(e), _mm512_set1_epi32(e + 1)));
      }
    }
  }

  template <class F>
  static void chunks(const uint8_t* block, F f) {
    const __m512 scaled = scales(block);
    const __m512i bias = _mm512_set1_epi32(32);
    code_values(block, [&](int c, __m512i q, __m512i pair) {
      f(c, weights(_mm512_sub_epi32(low16_u16(q), bias), _mm512_sub_epi32(high16_u16(q), bias),
                   lane(scaled, 2 * c), lane(scaled, 2 * c + 1)));
    });
  }

  // The factored form (see Factored): w = scale[e] (128 + q) - offset[e] for each 16 weights e.
  static void factors(const uint8_t* block, __m512& scale, __m512& offset) {
    scale = scales(block);
    offset = _mm512_mul_ps(scale, _mm512_set1_ps(160.f));  // 128 + the codes' bias of 32
  }
  template <class F>
  static void codes(const uint8_t* block, __m512 scale, F f) {
    // dot product lanes 0-7 sum the first 16 weights' products, lanes 8-15 the last 16's
    code_values(block, [&](int c, __m512i q, __m512i pair) { f(c, bf16_128_plus(q), _mm512_permutexvar_ps(pair, scale)); });
  }
};

template <class Format>
struct Decoded {  // decoded to bf16, then the bf16 tiles (Q8_0; and dequantizing every format)
  static constexpr int64_t kWeights = Format::kWeights, kBytes = Format::kBytes;
  // rows [n0, n1) of the weights -> out [n1 - n0, K] bf16. With `prefetch`, the same number of rows after
  // them is fetched meanwhile, a cache line per 64 bytes, so memory reads overlap the work on these rows.
  static void decode_rows(const uint8_t* weights, int64_t K, int64_t n0, int64_t n1, bf16* out, bool prefetch) {
    const int64_t blocks = K / Format::kWeights, ahead = (n1 - n0) * blocks * Format::kBytes;
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t g = 0; g < blocks; ++g) {
        const uint8_t* block = weights + (n * blocks + g) * Format::kBytes;
        if (prefetch)
          for (int64_t b = 0; b < Format::kBytes; b += 64) _mm_prefetch((const char*)block + ahead + b, _MM_HINT_T0);
        bf16* dst = out + (n - n0) * K + Format::kWeights * g;
        Format::chunks(block, [&](int c, __m512bh w) { _mm512_storeu_si512(dst + 32 * c, (__m512i)w); });
      }
  }

  // y[0, n] for one activation row: weight row n decoded block by block in registers (memory bound).
  static void single_row(const bf16* x, const uint8_t* weights, int64_t K, int64_t n, const bf16* bias, bf16* y) {
    const int64_t blocks = K / Format::kWeights;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < blocks; ++g) {
      const bf16* xg = x + Format::kWeights * g;
      Format::chunks(weights + (n * blocks + g) * Format::kBytes, [&](int c, __m512bh w) {
        acc = _mm512_dpbf16_ps(acc, w, (__m512bh)_mm512_loadu_si512(xg + 32 * c));
      });
    }
    y[n] = bf16(_mm512_reduce_add_ps(acc) + (bias ? static_cast<float>(bias[n]) : 0.f));
  }

  // x: [M, K] bf16 (contiguous); weights: [N, K / W * B] uint8 -> y [M, N] bf16.
  static void matmul(const bf16* x, int64_t M, const uint8_t* w, int64_t K, int64_t N, const bf16* bias, bf16* y) {
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
      if (M == 1) {
        for (int64_t n = n0; n < n1; ++n) single_row(x, w, K, n, bias, y);
        return;
      }
      std::vector<bf16> scratch(kDecodeRows * K);
      for (int64_t n = n0; n < n1; n += kDecodeRows) {
        const int64_t rows = std::min(kDecodeRows, n1 - n);
        decode_rows(w, K, n, n + rows, scratch.data(), n + 2 * rows <= n1);
        bf16mm::rows(x, K, M, scratch.data(), K, K, 0, rows, bias ? bias + n : nullptr, y + n, N, true);
      }
    });
  }

  static void dequantize(const uint8_t* w, int64_t K, int64_t N, bf16* out) {
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) { decode_rows(w, K, n0, n1, out + n0 * K, false); });
  }
};

// The K-quants are multiplied in factored form, for small batches (see factored()). A block's weights are
// w = scale_g (128 + q) - offset_g for groups g of G weights (32 for Q4_K and Q5_K, 16 for Q6_K), and 128 + q
// (q < 128) is exact in bf16 as the bits 0x4300 | q, so
//   x . w = sum over chunks c of 32: scale_c * (x_c . bf16(128 + q_c))  -  sum over groups g: offset_g * sum(x_g)
// with float32 dot products of exact products (vdpbf16ps) and the group sums of x computed once per call.
// Each 32 weights cost an OR, a dot product and a multiply-add on top of extracting the codes: half the
// instructions of decoding them to bf16, which binds these kernels at batch 1 (Q4_K: 76 against 41 G
// weights/s, memory-bound now; bench/skinny_matmul.py). The weights are used exactly, not rounded to bf16
// as dequantizing rounds them. Every output is the same sequence of operations in any factored batch, and
// again in any decoded one (as Q8_0, up to 32 rows): rows get the same numbers alone as in a factored batch,
// and the same in any decoded batch; between the two they differ by the weights' bf16 rounding.
template <class Format>
struct Factored : Decoded<Format> {
  static constexpr int64_t kWeights = Format::kWeights, kBytes = Format::kBytes, kGroup = Format::kGroup;
  static constexpr int64_t kGroups = kWeights / kGroup;  // per block: 8 or 16
  static constexpr __mmask16 kGroupLanes = kGroups == 16 ? 0xFFFF : 0xFF;
  // Batches of up to this many rows are factored; larger ones decoded to bf16 tiles, as Q8_0 is: each row
  // pays a multiply-add per 32 weights here, which the decoded form shares between rows (16 rows of the 1B
  // MLP's 8192x2048: 1.2 against 2.5 ms; up to 4 rows the factored form is as fast or faster).
  static constexpr int64_t kFactoredRows = 4;
  // ... and only while their activation rows stay in half of L1 with the weight row beside them (2-4 rows of
  // 8192: 1.2-1.4x slower than decoded), except a single row, read once
  static constexpr int64_t kActivationBytes = 16 * 1024;
  static bool factored(int64_t M, int64_t K) {
    return M == 1 || (M <= kFactoredRows && M * K * (int64_t)sizeof(bf16) <= kActivationBytes);
  }

  // sums [M, K / G]: each G elements of each row of x, in float32
  static void group_sums(const bf16* x, int64_t M, int64_t K, float* sums) {
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3F80);  // bf16 1.0
    const __mmask32 lanes = kGroup == 32 ? 0xFFFFFFFF : 0xFFFF;
    for (int64_t i = 0; i < M * K / kGroup; ++i)
      sums[i] = _mm512_reduce_add_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), ones, bf16mm::load32(x + kGroup * i, lanes)));
  }

  // out[m] = x[m] . w for MR activation rows and one weight row
  template <int MR>
  static void tile(const bf16* x, int64_t K, const float* sums, const uint8_t* row, float* out) {
    // two accumulator chains per row (even and odd chunks): one row's fma latency, not throughput, binds
    __m512 acc[2][MR], off[MR];
    for (int m = 0; m < MR; ++m) acc[0][m] = acc[1][m] = off[m] = _mm512_setzero_ps();
    const int64_t groups = K / kGroup;
    for (int64_t g = 0; g < K / kWeights; ++g) {
      const uint8_t* block = row + g * kBytes;
      __m512 scale, offsets;
      Format::factors(block, scale, offsets);
      for (int m = 0; m < MR; ++m)  // lanes past the block's groups: sums loaded as 0
        off[m] = _mm512_fmadd_ps(offsets, _mm512_maskz_loadu_ps(kGroupLanes, sums + m * groups + g * kGroups), off[m]);
      Format::codes(block, scale, [&](int c, __m512bh codes, __m512 s) {
        for (int m = 0; m < MR; ++m) {
          const __m512bh xv = bf16mm::load32(x + m * K + g * kWeights + 32 * c);
          acc[c & 1][m] = _mm512_fmadd_ps(s, _mm512_dpbf16_ps(_mm512_setzero_ps(), codes, xv), acc[c & 1][m]);
        }
      });
    }
    for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])) - _mm512_reduce_add_ps(off[m]);
  }

  static void matmul(const bf16* x, int64_t M, const uint8_t* w, int64_t K, int64_t N, const bf16* bias, bf16* y) {
    if (!factored(M, K)) return Decoded<Format>::matmul(x, M, w, K, N, bias, y);
    std::vector<float> sums(M * K / kGroup);
    group_sums(x, M, K, sums.data());
    using TileFn = void (*)(const bf16*, int64_t, const float*, const uint8_t*, float*);
    constexpr TileFn tiles[kFactoredRows] = {&tile<1>, &tile<2>, &tile<3>, &tile<4>};
    const int64_t row_bytes = K / kWeights * kBytes;
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
      float out[kFactoredRows];
      for (int64_t n = n0; n < n1; ++n) {
        tiles[M - 1](x, K, sums.data(), w + n * row_bytes, out);
        for (int m = 0; m < M; ++m) y[m * N + n] = bf16(out[m] + (bias ? static_cast<float>(bias[n]) : 0.f));
      }
    });
  }
};

// GGUF's type numbers (ggml_type) for the formats above.
enum Type : int64_t { kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

template <class F>
void dispatch(int64_t type, F f) {
  switch (type) {
    case kQ5_0: return f(Decoded<Q5_0or1<false>>());
    case kQ5_1: return f(Decoded<Q5_0or1<true>>());
    case kQ8_0: return f(Decoded<Q8_0>());
    case kQ4_K: return f(Factored<QK_4or5<false>>());
    case kQ5_K: return f(Factored<QK_4or5<true>>());
    case kQ6_K: return f(Factored<Q6_K>());
    default: TORCH_CHECK(false, "block_matmul: unsupported GGUF type ", type);
  }
}

// -> K, checking weights is [N, K / W * B] uint8 blocks of `type`
int64_t check_weights(const at::Tensor& weights, int64_t type) {
  int64_t K = 0;
  dispatch(type, [&](auto kernel) {
    constexpr int64_t W = decltype(kernel)::kWeights, B = decltype(kernel)::kBytes;
    TORCH_CHECK(weights.scalar_type() == at::kByte && weights.dim() == 2 && weights.is_contiguous() &&
                    weights.size(1) % B == 0, "weights: [N, K / ", W, " * ", B, "] uint8 blocks, contiguous");
    K = weights.size(1) / B * W;
  });
  return K;
}

}  // namespace

// x: [M, K] bf16; weights: [N, K / W * B] uint8 blocks of GGUF type `type` -> [M, N] bf16.
at::Tensor block_matmul(at::Tensor x, at::Tensor weights, int64_t type, c10::optional<at::Tensor> bias) {
  const int64_t K = check_weights(weights, type), N = weights.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == K, "x: [M, K] bf16, K = ", K);
  x = x.contiguous();
  const at::Tensor bias_c = bf16mm::bf16_bias(bias);
  const bf16* b = bias_c.defined() ? bias_c.data_ptr<bf16>() : nullptr;
  auto y = at::empty({x.size(0), N}, x.options());
  dispatch(type, [&](auto kernel) {
    kernel.matmul(x.data_ptr<bf16>(), x.size(0), weights.data_ptr<uint8_t>(), K, N, b, y.data_ptr<bf16>());
  });
  return y;
}

// weights: [N, K / W * B] uint8 -> out [N, K] bf16 (given, so callers can reuse one buffer), rounded as
// dequantizing to bf16 rounds.
at::Tensor block_dequantize(at::Tensor weights, int64_t type, at::Tensor out) {
  const int64_t K = check_weights(weights, type), N = weights.size(0);
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == N &&
                  out.size(1) == K, "out: [N, K] bf16, contiguous");
  dispatch(type, [&](auto kernel) { kernel.dequantize(weights.data_ptr<uint8_t>(), K, N, out.data_ptr<bf16>()); });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_matmul", &block_matmul, "bf16 rows times GGUF block-quantized weights (Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)", py::call_guard<py::gil_scoped_release>());
  m.def("block_dequantize", &block_dequantize, "GGUF block-quantized weights as bf16", py::call_guard<py::gil_scoped_release>());
}
