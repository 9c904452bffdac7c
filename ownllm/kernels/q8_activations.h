// bf16 activation rows quantized to 8 bits per block, as llama.cpp quantizes them for its integer dot products
// (kquant_vnni.cpp, x16_vnni.cpp): per block d = absmax / 127 and codes q = round(x / d) in int8, so that
// |x - d q| <= d / 2 for every value.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "torch_lite.h"

namespace q8_activations {

using bf16 = at::BFloat16;

// x[0..15] as float32 (bf16 is float32's upper half)
inline __m512 load16(const bf16* x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)x)), 16));
}

// Where each 16 values of a 256-value block go: in order, or (Q4_K) in the order its codes unpack, each 128
// values as the sub-blocks of 32 at 0, 64, 32, 96 (a byte's low nibbles, then its high ones).
inline int64_t in_order(int64_t chunk) { return 16 * chunk; }
inline int64_t q4_k_order(int64_t chunk) {
  const int64_t v = 16 * chunk, sub = v % 128 / 32;
  return v / 128 * 128 + sub % 2 * 64 + sub / 2 * 32 + v % 32;
}

// The quantized activation rows, [M, K] codes with their scales, in one of three layouts:
// - Q8_K (kBlock 256, for the K-quants): int8 codes, d [M, K / 256], bsums [M, K / 16] (each 16 codes' sum);
// - pairs (kBlock 32, kSigned false, for kquant_vnni's Q8_0 / Q5_0 pairs of blocks): the codes + 128 as uint8
//   (vpdpbusd's unsigned side), d [M, K / 64, 16] with each block's d in the 8 lanes its dot products land in;
// - Q8_1 (kBlock 32, kSigned true, for x16_vnni, whose weights are the unsigned side): int8 codes,
//   d [M, K / 32] and dsum [M, K / 32] = d * (the block's sum of codes), for the weights' offsets.
template <int64_t kBlock, bool kSigned = false>
struct Activations {
  static constexpr bool kKQuant = kBlock == 256;
  static constexpr bool kPairs = kBlock == 32 && !kSigned;
  int64_t K;
  std::vector<int8_t> q;        // [M, K]
  std::vector<float> d;         // as above
  std::vector<int16_t> bsums;   // Q8_K: [M, K / 16]
  std::vector<float> dsum;      // Q8_1: [M, K / 32]

  // order: where each 16 values of a block go among its codes (bsums stay in order)
  Activations(const bf16* x, int64_t M, int64_t K, int64_t (*order)(int64_t) = in_order)
      : K(K), q(M * K), d(M * (kPairs ? K / 4 : K / kBlock)), bsums(kKQuant ? M * K / 16 : 0),
        dsum(kSigned ? M * K / 32 : 0) {
    // rows split between threads where there are enough of them (prefill); each row's numbers are the same
    at::parallel_for(0, M, std::max<int64_t>(1, (int64_t{1} << 16) / K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t b = 0; b < K / kBlock; ++b) quantize_block(x + m * K + b * kBlock, m, b, order);
    });
  }

  // One block: d = absmax / 127, q = round-to-nearest-even(x * (127 / absmax)) in float32 (0 when all are 0).
  void quantize_block(const bf16* x, int64_t m, int64_t b, int64_t (*order)(int64_t)) {
    __m512 v[kBlock / 16];
    __m512 amax = _mm512_setzero_ps();
    for (int i = 0; i < kBlock / 16; ++i) {
      v[i] = load16(x + 16 * i);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
    }
    const float absmax = _mm512_reduce_max_ps(amax);
    const float scale = absmax / 127.f, inverse = absmax > 0.f ? 127.f / absmax : 0.f;
    int8_t* codes = q.data() + m * K + b * kBlock;
    int32_t total = 0;
    for (int i = 0; i < kBlock / 16; ++i) {
      const __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], _mm512_set1_ps(inverse)));
      __m128i bytes = _mm512_cvtsepi32_epi8(qi);
      if (kKQuant) bsums[(m * K + b * kBlock) / 16 + i] = (int16_t)_mm512_reduce_add_epi32(qi);
      if (kSigned) total += _mm512_reduce_add_epi32(qi);
      if (kPairs) bytes = _mm_xor_si128(bytes, _mm_set1_epi8((char)0x80));  // + 128, as uint8
      _mm_storeu_si128((__m128i*)(codes + order(i)), bytes);
    }
    if (kPairs) std::fill_n(d.data() + m * (K / 4) + b * 8, 8, scale);  // pair b / 2, lanes 8 (b % 2) ...
    else d[m * (K / kBlock) + b] = scale;
    if (kSigned) dsum[m * (K / 32) + b] = scale * (float)total;
  }

  const int8_t* codes(int64_t m) const { return q.data() + m * K; }
};

}  // namespace q8_activations
