// GGUF block-quantized weights (Q8_0, Q4_K, Q5_K, Q6_K) times bf16 activation rows, read from the
// file's own bytes, so the weights can stay a view of the file mapping.
//
// Each weight row n is K / W blocks of B bytes, laid out exactly as ggml stores them (see each format
// below). A block is decoded 32 weights at a time to bf16, with the float32 arithmetic of gguf-py's
// dequantize (and llama.cpp's dequantize_row_*) in the same order, then rounded: so the bf16 weights are
// exactly those of dequantizing the tensor to bf16 (built with -ffp-contract=off, so no multiply-add is
// fused). Every output is one float32 accumulator of bf16 dot products over the 32-element chunks in
// order, then one horizontal sum: the arithmetic of the skinny bf16 tiles (bf16_tile.h). So
// block_matmul gives bit for bit what gemv_bf16 gives on the dequantized weights, batch-invariant as that
// is, while reading 1.06 (Q8_0), 0.56 (Q4_K), 0.69 (Q5_K) or 0.82 (Q6_K) bytes per weight instead of 2.
// One activation row is multiplied straight from the decoded registers; for more, 4 weight rows at a
// time are decoded into a bf16 scratch in L1 (the next 4 prefetched meanwhile) and the bf16 tiles run
// over it, so each weight is decoded once for any M (decoding in registers for up to 8 rows, or two
// weight rows at once for M = 1, measured slower on Q8_0).
// block_dequantize gives row ranges as bf16, for prefill batches that go to oneDNN a chunk at a time,
// and for embedding lookups.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "bf16_tile.h"

namespace {

using bf16 = at::BFloat16;
constexpr int64_t kDecodeRows = 4;  // weight rows decoded into the scratch at a time: one bf16 tile
constexpr int64_t kGrain = 64;  // weight rows per task

inline float fp16_at(const uint8_t* p) {
  uint16_t half;
  std::memcpy(&half, p, sizeof(half));
  return _cvtsh_ss(half);
}

// 32 weights from codes (16 per float vector, each with its scale and offset): w = scale * q - offset,
// rounded once per operation as float32 numpy rounds it, then to bf16.
inline __m512bh weights(__m512i q_lo, __m512i q_hi, __m512 scale_lo, __m512 scale_hi, __m512 offset_lo,
                        __m512 offset_hi) {
  const __m512 lo = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q_lo), scale_lo), offset_lo);
  const __m512 hi = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q_hi), scale_hi), offset_hi);
  return _mm512_cvtne2ps_pbh(hi, lo);
}

inline __m512i low16_u8(__m256i v) { return _mm512_cvtepu8_epi32(_mm256_castsi256_si128(v)); }
inline __m512i high16_u8(__m256i v) { return _mm512_cvtepu8_epi32(_mm256_extracti128_si256(v, 1)); }
inline __m256i nibbles(__m256i v, int shift) {
  return _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(0x0F));
}

// Q8_0: fp16 d, int8 q[32]; w = d * q.
struct Q8_0 {
  static constexpr int64_t kWeights = 32, kBytes = 34;
  template <class F>
  static void chunks(const uint8_t* block, F f) {
    const __m512 d = _mm512_set1_ps(fp16_at(block)), zero = _mm512_setzero_ps();
    f(0, weights(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(block + 2))),
                 _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(block + 18))), d, d, zero, zero));
  }
};

// The 6-bit scales and mins of a Q4_K / Q5_K block's 8 sub-blocks of 32, packed in 12 bytes
// (llama.cpp's get_scale_min_k4).
inline void scales_and_mins(const uint8_t* s, uint8_t* scale, uint8_t* min) {
  for (int j = 0; j < 4; ++j) {
    scale[j] = s[j] & 63;
    min[j] = s[j + 4] & 63;
    scale[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    min[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// Q4_K (144 bytes per 256 weights): fp16 d, fp16 dmin, 12 bytes of scales and mins, q[128] nibbles.
// Sub-block c (32 weights) takes the low nibbles of q[32 (c / 2) ...] for even c, the high ones for odd c;
// w = (d * scale[c]) * q - dmin * min[c]. Q5_K (176 bytes) adds qh[32] before q: bit c of qh[j] is the
// fifth bit of weight j of sub-block c.
template <bool kFifthBit>
struct QK_4or5 {
  static constexpr int64_t kWeights = 256, kBytes = kFifthBit ? 176 : 144;
  template <class F>
  static void chunks(const uint8_t* block, F f) {
    const float d = fp16_at(block), dmin = fp16_at(block + 2);
    uint8_t scale[8], min[8];
    scales_and_mins(block + 4, scale, min);
    const uint8_t* q = block + 16 + (kFifthBit ? 32 : 0);
    const __m256i high_bits = kFifthBit ? _mm256_loadu_si256((const __m256i*)(block + 16)) : _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      __m256i codes = nibbles(_mm256_loadu_si256((const __m256i*)(q + 32 * (c / 2))), 4 * (c % 2));
      if (kFifthBit) {
        const __m256i bit = _mm256_and_si256(_mm256_srli_epi16(high_bits, c), _mm256_set1_epi8(1));
        codes = _mm256_or_si256(codes, _mm256_slli_epi16(bit, 4));
      }
      const __m512 s = _mm512_set1_ps(d * (float)scale[c]), m = _mm512_set1_ps(dmin * (float)min[c]);
      f(c, weights(low16_u8(codes), high16_u8(codes), s, s, m, m));
    }
  }
};

// Q6_K (210 bytes per 256 weights): ql[128] low nibbles, qh[64] high 2-bit pairs, int8 scales[16] (one per
// 16 weights), fp16 d. In each half h of 128 weights, sub-block t of 32 takes nibble t / 2 of
// ql[64 h + 32 (t % 2) ...] and bits 2t, 2t + 1 of qh[32 h ...]; w = (d * scale[e / 16]) * (q - 32).
struct Q6_K {
  static constexpr int64_t kWeights = 256, kBytes = 210;
  template <class F>
  static void chunks(const uint8_t* block, F f) {
    const uint8_t* ql = block;
    const uint8_t* qh = block + 128;
    const int8_t* scale = (const int8_t*)(block + 192);
    const float d = fp16_at(block + 208);
    const __m512i bias = _mm512_set1_epi32(32);
    const __m512 zero = _mm512_setzero_ps();
    for (int h = 0; h < 2; ++h) {
      const __m256i high = _mm256_loadu_si256((const __m256i*)(qh + 32 * h));
      for (int t = 0; t < 4; ++t) {
        const __m256i low = nibbles(_mm256_loadu_si256((const __m256i*)(ql + 64 * h + 32 * (t % 2))), 4 * (t / 2));
        const __m256i top = _mm256_and_si256(_mm256_srli_epi16(high, 2 * t), _mm256_set1_epi8(3));
        const __m256i codes = _mm256_or_si256(low, _mm256_slli_epi16(top, 4));
        const int e = 8 * h + 2 * t;  // the scale of the first 16 of these 32 weights
        f(4 * h + t, weights(_mm512_sub_epi32(low16_u8(codes), bias), _mm512_sub_epi32(high16_u8(codes), bias),
                             _mm512_set1_ps(d * (float)scale[e]), _mm512_set1_ps(d * (float)scale[e + 1]), zero, zero));
      }
    }
  }
};

template <class Format>
struct Kernel {
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
        bf16mm::rows(x, K, M, scratch.data(), K, K, 0, rows, bias ? bias + n : nullptr, y + n, N);
      }
    });
  }

  static void dequantize(const uint8_t* w, int64_t K, int64_t N, bf16* out) {
    at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) { decode_rows(w, K, n0, n1, out + n0 * K, false); });
  }
};

// GGUF's type numbers (ggml_type) for the formats above.
enum Type : int64_t { kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

template <class F>
void dispatch(int64_t type, F f) {
  switch (type) {
    case kQ8_0: return f(Kernel<Q8_0>());
    case kQ4_K: return f(Kernel<QK_4or5<false>>());
    case kQ5_K: return f(Kernel<QK_4or5<true>>());
    case kQ6_K: return f(Kernel<Q6_K>());
    default: TORCH_CHECK(false, "block_matmul: unsupported GGUF type ", type);
  }
}

// -> K, checking weights is [N, K / W * B] uint8 blocks of `type`
int64_t check_weights(const torch::Tensor& weights, int64_t type) {
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
torch::Tensor block_matmul(torch::Tensor x, torch::Tensor weights, int64_t type, c10::optional<torch::Tensor> bias) {
  const int64_t K = check_weights(weights, type), N = weights.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == K, "x: [M, K] bf16, K = ", K);
  x = x.contiguous();
  const torch::Tensor bias_c = bf16mm::bf16_bias(bias);
  const bf16* b = bias_c.defined() ? bias_c.data_ptr<bf16>() : nullptr;
  auto y = torch::empty({x.size(0), N}, x.options());
  dispatch(type, [&](auto kernel) {
    kernel.matmul(x.data_ptr<bf16>(), x.size(0), weights.data_ptr<uint8_t>(), K, N, b, y.data_ptr<bf16>());
  });
  return y;
}

// weights: [N, K / W * B] uint8 -> out [N, K] bf16 (given, so callers can reuse one buffer), rounded as
// dequantizing to bf16 rounds.
torch::Tensor block_dequantize(torch::Tensor weights, int64_t type, torch::Tensor out) {
  const int64_t K = check_weights(weights, type), N = weights.size(0);
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == N &&
                  out.size(1) == K, "out: [N, K] bf16, contiguous");
  dispatch(type, [&](auto kernel) { kernel.dequantize(weights.data_ptr<uint8_t>(), K, N, out.data_ptr<bf16>()); });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_matmul", &block_matmul, "bf16 rows times GGUF block-quantized weights (Q8_0, Q4_K, Q5_K, Q6_K)");
  m.def("block_dequantize", &block_dequantize, "GGUF block-quantized weights as bf16");
}
