// Pieces of GGUF's block layouts that more than one kernel decodes (block_matmul.cpp, kquant_vnni.cpp).
#pragma once
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace gguf_blocks {

// The fp16 number stored at p (a block's d, dmin, m).
inline float fp16_at(const uint8_t* p) {
  uint16_t half;
  std::memcpy(&half, p, sizeof(half));
  return _cvtsh_ss(half);
}

// The 6-bit scales and mins of a Q4_K / Q5_K block's 8 sub-blocks of 32, packed in 12 bytes s0, s1, s2 (as
// little-endian words), unpacked to scale[0..7] and min[0..7] as bytes (llama.cpp's get_scale_min_k4, four at
// a time), in registers (4-byte stores read back as one 16-byte load would stall store forwarding):
//   scale[0..3] = s0 & 0x3f..,  scale[4..7] = (s2 & 0x0f..) | (s0 >> 6 & 0x03..) << 4,
//   min[0..3]   = s1 & 0x3f..,  min[4..7]   = (s2 >> 4 & 0x0f..) | (s1 >> 6 & 0x03..) << 4.
// Reads 16 bytes from `packed` (the 4 after the 12 are the block's codes, ignored).
inline __m128i scales_and_mins(const uint8_t* packed) {
  const __m128i s = _mm_loadu_si128((const __m128i*)packed);
  const __m128i low = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(s, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4)),
                                    _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
  const __m128i high = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(s, _MM_SHUFFLE(1, 1, 0, 0)), 2),
                                     _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
  return _mm_or_si128(low, high);
}

}  // namespace gguf_blocks
