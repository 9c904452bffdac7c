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

// The 6-bit scales and mins of a Q4_K / Q5_K block's 8 sub-blocks of 32, packed in 12 bytes, unpacked to
// scale[0..7] and min[0..7] as bytes (llama.cpp's get_scale_min_k4, four at a time).
inline __m128i scales_and_mins(const uint8_t* packed) {
  constexpr uint32_t kLow6 = 0x3f3f3f3f, kLow4 = 0x0f0f0f0f, kLow2 = 0x03030303;
  uint32_t s[4];
  std::memcpy(s, packed, 12);
  const uint32_t min_low = s[1] & kLow6;
  s[3] = ((s[2] >> 4) & kLow4) | (((s[1] >> 6) & kLow2) << 4);
  s[1] = (s[2] & kLow4) | (((s[0] >> 6) & kLow2) << 4);
  s[2] = min_low;
  s[0] &= kLow6;
  return _mm_loadu_si128((const __m128i*)s);
}

}  // namespace gguf_blocks
