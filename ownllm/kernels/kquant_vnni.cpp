// GGUF block weights (Q4_K, Q6_K, Q8_0, Q5_0) times bf16 activation rows the way llama.cpp multiplies them:
// the activations quantized to 8 bits once per call, then integer dot products against the weights' own
// codes (AVX-512 VNNI), with the blocks' scales applied once per block in float32. Decoding weights to
// floats costs more instructions per weight than memory costs time on these formats (block_matmul.cpp is
// arithmetic-bound at batch 1); here 64 weights cost one multiply-add of bytes per activation row.
//
// Activations (q8_activations.h), per row, in one of two layouts:
// - Q8_K, for the K-quants (256 values a block): d = absmax / 127, q = round(x * 127 / absmax) in int8, and
//   bsums[16]: the sums of each 16 q (for the weights' offsets: Q4_K's mins, Q6_K's bias of 32).
// - Q8_0-like, for the 32-weight formats: the same per 32 values, stored as q + 128 in uint8 (VNNI's
//   vpdpbusd multiplies unsigned by signed bytes; the weights' codes are the signed side), and each
//   block's d repeated in the 8 lanes its dot products land in.
// Each output is then sum over blocks of d_w * d_x * (integer dot product of codes), exact in int32 within a
// block, so it differs from float math on the weights only by the activations' rounding (|x - d q| <= d / 2).
//
// Weight rows are split between threads (at::parallel_for); each weight block is decoded once into registers
// and multiplied by every activation row (up to kMaxRows, whose quantized data stays in L1/L2), so the weights
// are read once per call whatever the batch. Every row gets the same sequence of operations in any batch.
//
// Q4_K and Q6_K also come repacked at load, 8 weight rows interleaved (Q4_Kx8, Q6_Kx8 below; x8_repack): decoding
// a file block per row (its packed 6-bit scales, fp16 d, the float epilogue) cost more than its multiplies; there
// one 512-bit vector holds 8 rows' codes, so one broadcast of 8 activation codes serves 8 rows. Those layouts are
// multiplied by two kernels: the rows kernels (x8_matmul, up to 32 activation rows, 4 at a time) and the tiles
// (x8_gemm, any number of rows, prefill's too: up to 8 activation rows per tile, each block's codes unpacked once
// per tile, vpdpbusd on whole sub-blocks; the activation rows in L2-sized slabs).
#include <immintrin.h>
#include "torch_lite.h"

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "gguf_blocks.h"
#include "q8_activations.h"

namespace {

using bf16 = at::BFloat16;
using gguf_blocks::fp16_at;
using q8_activations::Activations;
using q8_activations::in_order;
using q8_activations::q4_k_order;
constexpr int64_t kMaxRows = 32;  // activation rows per call of the row kernels (decode batches; the tiles take any)
constexpr int64_t kGrain = 16;    // weight rows per task

// A vpshufb control that spreads byte `first` of each 128-bit lane into the int16 lanes 0-15 and byte `second`
// into lanes 16-31, zero-extended (0x80 zeroes the high byte): one in-lane shuffle of the scales broadcast to
// every 128-bit lane, not a cross-lane word permute, per vector.
inline __m512i spread(int first, int second) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16((short)(0x8000 | first))),
                            _mm256_set1_epi16((short)(0x8000 | second)), 1);
}

// --- the K-quants against Q8_K ---------------------------------------------------------------------------
// Both decode a block to 4 vectors of 64 unsigned codes (in the order the activations are stored), with, for
// each, 32 int16 scales for the 32 int16 pair sums that vpmaddubsw makes of them; vpdpwssd then adds
// scale * pair sum into int32.

// Q4_K (144 bytes per 256 weights): fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins, q[128] nibbles.
// Sub-block c (32 weights) takes the low nibbles of q[32 (c / 2) ...] for even c, the high ones for odd c;
// w = d sc[c] q - dmin m[c], so
//   x . w = d_x (d sum_c sc[c] (q_c . x_c) - dmin sum_c m[c] (bsum[2c] + bsum[2c + 1])).
// Vector 2j (+ 1) is the low (high) nibbles of q[64 j ...]: sub-blocks 4j and 4j + 2 (4j + 1 and 4j + 3), the
// order the activations are stored in for Q4_K (q4_k_order).
struct Q4_K {
  static constexpr int64_t kBytes = 144;
  static constexpr auto kOrder = q4_k_order;
  __m512i codes[4], scales[4];
  __m256i mins;  // m[c] in the int16 lanes 2c and 2c + 1, beside each 16-value sum of x
  float d, dmin;

  explicit Q4_K(const uint8_t* block) {
    d = fp16_at(block);
    dmin = fp16_at(block + 2);
    const __m128i packed = gguf_blocks::scales_and_mins(block + 4);  // bytes 0-7: sc[c], 8-15: m[c]
    const __m512i packed4 = _mm512_broadcast_i32x4(packed);
    mins = _mm256_shuffle_epi8(_mm512_castsi512_si256(packed4),
                               _mm256_setr_epi16(0x8008, 0x8008, 0x8009, 0x8009, 0x800A, 0x800A, 0x800B, 0x800B,
                                                 0x800C, 0x800C, 0x800D, 0x800D, 0x800E, 0x800E, 0x800F, 0x800F));
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int j = 0; j < 2; ++j) {
      const __m512i q = _mm512_loadu_si512(block + 16 + 64 * j);
      codes[2 * j] = _mm512_and_si512(q, mask);
      codes[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16(q, 4), mask);
      for (int e = 0; e < 2; ++e)  // sc[4j + e] in the first 16 lanes, sc[4j + e + 2] in the last 16
        scales[2 * j + e] = _mm512_shuffle_epi8(packed4, spread(4 * j + e, 4 * j + e + 2));
    }
  }

  // this block times one row's Q8_K block (x: 256 codes, bsums: their 16 sums), times d_x
  inline void dot(const int8_t* x, const int16_t* bsums, float dx, __m512& acc) const {
    __m512i sum = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k)
      sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(codes[k], _mm512_loadu_si512(x + 64 * k)), scales[k]);
    const __m256i offsets = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)bsums), mins);  // 8 lanes
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d * dx), acc);
    acc = _mm512_fnmadd_ps(_mm512_zextps256_ps512(_mm256_cvtepi32_ps(offsets)), _mm512_set1_ps(dmin * dx), acc);
  }
};

// Q6_K (210 bytes per 256 weights): ql[128] low nibbles, qh[64] high 2-bit pairs, int8 scales[16] (one per
// 16 weights), fp16 d. In each half h of 128 weights, sub-block t of 32 takes nibble t / 2 of
// ql[64 h + 32 (t % 2) ...] and bits 2t, 2t + 1 of qh[32 h ...]; w = d scale[e / 16] (q - 32), so
//   x . w = d_x d sum_e scale[e] (q_e . x_e - 32 bsum[e]).
struct Q6_K {
  static constexpr int64_t kBytes = 210;
  static constexpr auto kOrder = in_order;
  __m512i codes[4], scales[4];
  __m256i scale16;  // scale[e] as int16, beside each 16-value sum of x
  float d;

  explicit Q6_K(const uint8_t* block) {
    d = fp16_at(block + 208);
    const __m128i packed = _mm_loadu_si128((const __m128i*)(block + 192));
    scale16 = _mm256_cvtepi8_epi16(packed);
    const __m512i packed4 = _mm512_broadcast_i32x4(packed);
    const __m256i two_bits = _mm256_set1_epi8(3);
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int h = 0; h < 2; ++h) {
      const __m512i low = _mm512_loadu_si512(block + 64 * h);
      const __m256i high = _mm256_loadu_si256((const __m256i*)(block + 128 + 32 * h));
      auto top = [&](int t) { return _mm256_and_si256(_mm256_srli_epi16(high, 2 * t), two_bits); };
      const __m512i top01 = _mm512_inserti64x4(_mm512_castsi256_si512(top(0)), top(1), 1);
      const __m512i top23 = _mm512_inserti64x4(_mm512_castsi256_si512(top(2)), top(3), 1);
      codes[2 * h] = _mm512_or_si512(_mm512_and_si512(low, nibble), _mm512_slli_epi16(top01, 4));
      codes[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(low, 4), nibble), _mm512_slli_epi16(top23, 4));
    }
    for (int k = 0; k < 4; ++k) {  // scale[4k + j] in the 8 int16 lanes of 128-bit lane j, sign-extended
      const __m512i lanes = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(
          _mm_set1_epi16((short)(((4 * k + 1) << 8) | 0x80)), _mm_set1_epi16((short)(((4 * k) << 8) | 0x80)))),
          _mm256_set_m128i(_mm_set1_epi16((short)(((4 * k + 3) << 8) | 0x80)), _mm_set1_epi16((short)(((4 * k + 2) << 8) | 0x80))), 1);
      scales[k] = _mm512_srai_epi16(_mm512_shuffle_epi8(packed4, lanes), 8);
    }
  }

  inline void dot(const int8_t* x, const int16_t* bsums, float dx, __m512& acc) const {
    __m512i sum = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k)
      sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(codes[k], _mm512_loadu_si512(x + 64 * k)), scales[k]);
    const __m256i bias = _mm256_slli_epi32(_mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)bsums), scale16), 5);
    sum = _mm512_sub_epi32(sum, _mm512_zextsi256_si512(bias));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d * dx), acc);
  }
};

// --- the 32-weight formats against 32-value blocks, two blocks (64 weights) at a time ------------------------
// The weights as signed codes w (two blocks: lanes 0-7 of the int32 sums are the first's, 8-15 the second's);
// with u = q_x + 128,  u . w - 128 sum(w) = q_x . w, so each pair starts from -128 sum(w) (shared by all rows).

// Q8_0 (34 bytes per 32 weights): fp16 d, int8 q[32]; w = d q.
struct Q8_0 {
  static constexpr int64_t kBytes = 34;
  static __m256i codes(const uint8_t* block) { return _mm256_loadu_si256((const __m256i*)(block + 2)); }
};

// Q5_0 (22 bytes per 32 weights): fp16 d, qh[4] (bit j of the little-endian word: weight j's fifth bit),
// q[16] (weight j in the low nibble of q[j], j + 16 in the high one); w = d (q - 16).
struct Q5_0 {
  static constexpr int64_t kBytes = 22;
  static __m256i codes(const uint8_t* block) {
    uint32_t fifth;
    std::memcpy(&fifth, block + 2, sizeof(fifth));
    const __m128i packed = _mm_loadu_si128((const __m128i*)(block + 6));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble), _mm_and_si128(packed, nibble));
    return _mm256_mask_sub_epi8(q, ~fifth, q, _mm256_set1_epi8(16));  // q - 16 where the fifth bit is 0
  }
};

template <class Format>
struct Pair {
  static constexpr int64_t kBytes = 2 * Format::kBytes;
  __m512i codes, start;
  __m512 d;

  explicit Pair(const uint8_t* blocks) {
    codes = _mm512_inserti64x4(_mm512_castsi256_si512(Format::codes(blocks)), Format::codes(blocks + Format::kBytes), 1);
    start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), codes));
    d = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(fp16_at(blocks)), _mm512_set1_ps(fp16_at(blocks + Format::kBytes)));
  }

  // x: 64 codes + 128; dx: the two blocks' d_x in lanes 0-7 and 8-15
  inline void dot(const int8_t* x, const float* dx, __m512& acc) const {
    const __m512i sum = _mm512_dpbusd_epi32(start, _mm512_loadu_si512(x), codes);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d, _mm512_loadu_ps(dx)), acc);
  }
};

// y[m, n0:n1] for all M rows: each weight block decoded once, then multiplied by every row.
template <class Block, int64_t kValues, class Dot>
void weight_rows(const uint8_t* w, int64_t K, int64_t M, int64_t n0, int64_t n1, const bf16* bias, bf16* y, int64_t N,
                 Dot dot_row) {
  const int64_t blocks = K / kValues;
  __m512 acc[kMaxRows];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* row = w + n * blocks * Block::kBytes;
    for (int64_t g = 0; g < blocks; ++g) {
      const Block block(row + g * Block::kBytes);
      for (int64_t m = 0; m < M; ++m) dot_row(block, m, g, acc[m]);
    }
    const float b = bias ? static_cast<float>(bias[n]) : 0.f;
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = bf16(_mm512_reduce_add_ps(acc[m]) + b);
  }
}

template <class Block>
void q8k_matmul(const bf16* x, int64_t M, const uint8_t* w, int64_t K, int64_t N, const bf16* bias, bf16* y) {
  const Activations<256> a(x, M, K, Block::kOrder);
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    weight_rows<Block, 256>(w, K, M, n0, n1, bias, y, N, [&](const Block& block, int64_t m, int64_t g, __m512& acc) {
      block.dot(a.codes(m) + 256 * g, a.bsums.data() + (m * K + 256 * g) / 16, a.d[m * (K / 256) + g], acc);
    });
  });
}

template <class Format>
void q8_pair_matmul(const bf16* x, int64_t M, const uint8_t* w, int64_t K, int64_t N, const bf16* bias, bf16* y) {
  const Activations<32> a(x, M, K);
  at::parallel_for(0, N, kGrain, [&](int64_t n0, int64_t n1) {
    weight_rows<Pair<Format>, 64>(w, K, M, n0, n1, bias, y, N, [&](const Pair<Format>& pair, int64_t m, int64_t g, __m512& acc) {
      pair.dot(a.codes(m) + 64 * g, a.d.data() + m * (K / 4) + 16 * g, acc);
    });
  });
}

// --- Q4_K repacked at load, 8 weight rows interleaved ("Q4_Kx8") ---------------------------------------------
// Decoding a file Q4_K block costs more instructions than multiplying it (its 6-bit scales, fp16 d and dmin,
// the float epilogue per row); repacked, one 512-bit vector holds 8 rows' codes, so one broadcast of 8
// activation codes serves 8 rows, the scales are bytes ready to spread, and the epilogue runs once for 8 rows.
// Per group of 8 rows (n = 8 G + r) and block g of 256 weights, kX8Bytes (1216) bytes:
//   [0, 64)      float d[r] (r = 0..7), then float dmin[r]
//   [64, 128)    uint8 scale[c][r]: sub-block c's 6-bit scale of row r (c-major)
//   [128, 192)   uint8 min[r][c] (row-major)
//   [192, 1216)  codes: for pair k = 0..3, chunk i = 0..3: 64 bytes, row r's 8 bytes q[32 k + 8 i ...] of the
//                file block (low nibbles: sub-block 2k, positions 8i..8i+7; high nibbles: sub-block 2k + 1)
// so the codes are the file's bytes moved, and w = d scale[c] q - dmin min[c] as in the file.
// In the dot product, vpmaddubsw makes row r's pair sums in int16 lanes 4r..4r+3; four chunks of a sub-block
// add up there (|sum| <= 4 * 2 * 15 * 127 < 2^15), vpdpwssd by the scale puts row r in int32 lanes 2r, 2r+1.
constexpr int64_t kX8Rows = 8, kX8Bytes = 1216;

// One group-block's scales and mins, ready for the dot products.
struct Q4_Kx8 {
  __m512 d2, dmin2;        // d[r] and dmin[r] in float lanes 2r and 2r + 1
  __m512i scales[8];       // sub-block c's scale of row r in int16 lanes 4r..4r+3
  __m512i mins_a, mins_b;  // min[r][0..7] as int16 in 128-bit lane r (rows 0-3), r - 4 (rows 4-7)

  explicit Q4_Kx8(const uint8_t* p) {
    const __m512 dd = _mm512_loadu_ps((const float*)p);
    const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    d2 = _mm512_permutexvar_ps(twice, dd);
    dmin2 = _mm512_permutexvar_ps(_mm512_add_epi32(twice, _mm512_set1_epi32(8)), dd);
    // in 128-bit lane L: int16 lanes 0-3 from byte 2L, 4-7 from byte 2L + 1 (high bytes zeroed)
    const __m512i spread_rows = _mm512_set_epi64(0x8007800780078007LL, 0x8006800680068006LL, 0x8005800580058005LL, 0x8004800480048004LL,
                                                 0x8003800380038003LL, 0x8002800280028002LL, 0x8001800180018001LL, 0x8000800080008000LL);
    for (int c = 0; c < 8; ++c) {
      int64_t bytes;
      std::memcpy(&bytes, p + 64 + 8 * c, sizeof(bytes));
      scales[c] = _mm512_shuffle_epi8(_mm512_set1_epi64(bytes), spread_rows);
    }
    mins_a = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + 128)));
    mins_b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + 160)));
  }

  // acc += d_x (d sum - dmin (the mins against bsums)) for one activation row (bsums: its block's 16 sums)
  inline void finish(__m512i sum, const int16_t* bsums, float dx, __m512& acc) const {
    const __m256i pairs = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)bsums), _mm256_set1_epi16(1));  // |.| <= 4064
    const __m512i bs = _mm512_broadcast_i32x4(_mm256_cvtepi32_epi16(pairs));
    const __m512i pa = _mm512_madd_epi16(mins_a, bs), pb = _mm512_madd_epi16(mins_b, bs);  // row r: lanes 4r..4r+3
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i offsets = _mm512_add_epi32(_mm512_permutex2var_epi32(pa, even, pb),
                                             _mm512_permutex2var_epi32(pa, _mm512_add_epi32(even, _mm512_set1_epi32(1)), pb));
    const __m512 dxv = _mm512_set1_ps(dx);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(d2, dxv), acc);
    acc = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(offsets), _mm512_mul_ps(dmin2, dxv), acc);
  }
};

// rows m0..m0 + R - 1 of y for the 8 weight rows of one group (R accumulators in registers; each pair's codes
// unpacked once for the R rows)
template <int R>
void q4_kx8_rows(const uint8_t* group, int64_t blocks, const Activations<256>& a, int64_t m0, float (*out)[kX8Rows]) {
  __m512 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
  const int64_t K = a.K;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < blocks; ++g) {
    const uint8_t* p = group + g * kX8Bytes;
    const Q4_Kx8 block(p);
    __m512i sum[R];
    for (int j = 0; j < R; ++j) sum[j] = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) {
      __m512i lo_codes[4], hi_codes[4];
      for (int i = 0; i < 4; ++i) {
        const __m512i q = _mm512_loadu_si512(p + 192 + 256 * k + 64 * i);
        lo_codes[i] = _mm512_and_si512(q, nibble);
        hi_codes[i] = _mm512_and_si512(_mm512_srli_epi16(q, 4), nibble);
      }
      for (int j = 0; j < R; ++j) {
        const int8_t* x = a.codes(m0 + j) + 256 * g + 64 * k;
        __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
        for (int i = 0; i < 4; ++i) {
          int64_t xl, xh;
          std::memcpy(&xl, x + 8 * i, sizeof(xl));
          std::memcpy(&xh, x + 32 + 8 * i, sizeof(xh));
          lo = _mm512_add_epi16(lo, _mm512_maddubs_epi16(lo_codes[i], _mm512_set1_epi64(xl)));
          hi = _mm512_add_epi16(hi, _mm512_maddubs_epi16(hi_codes[i], _mm512_set1_epi64(xh)));
        }
        sum[j] = _mm512_dpwssd_epi32(sum[j], lo, block.scales[2 * k]);
        sum[j] = _mm512_dpwssd_epi32(sum[j], hi, block.scales[2 * k + 1]);
      }
    }
    for (int j = 0; j < R; ++j) {
      const int64_t m = m0 + j;
      block.finish(sum[j], a.bsums.data() + (m * K + 256 * g) / 16, a.d[m * (K / 256) + g], acc[j]);
    }
  }
  for (int j = 0; j < R; ++j) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[j]);
    for (int r = 0; r < kX8Rows; ++r) out[j][r] = lanes[2 * r] + lanes[2 * r + 1];
  }
}

// --- Q6_K repacked at load, 8 weight rows interleaved ("Q6_Kx8") ---------------------------------------------
// As Q4_Kx8, for Q6_K. Per group of 8 rows and block g of 256 weights, kQ6X8Bytes (1728) bytes:
//   [0, 32)      float d[r]
//   [32, 64)     int32 bias[r] = 128 sum_e scale[e] sum_{j in e} (q_j - 32): what the activations' + 128 adds
//   [64, 192)    int8 scale[e][r] (e = 0..15, sub-blocks of 16; e-major)
//   [192, 1728)  codes: for half h = 0, 1 and chunk i = 0..3, three 64-byte vectors (row r's 8 bytes each) of the
//                file block: ql[64 h + 8 i ...], ql[64 h + 32 + 8 i ...], qh[32 h + 8 i ...]
// Weight 128 h + 32 t + 8 i + j (t = 0..3) is q = (nibble t / 2 of the first (t even) or second (t odd) vector) |
// (bits 2t, 2t + 1 of the third) << 4, in sub-block e = 8 h + 2 t + i / 2, w = d scale[e] (q - 32).
// The codes enter vpmaddubsw as signed q - 32 and the activations as unsigned x + 128 (|pair sums| <= 2 * 255 * 32,
// two chunks of a sub-block add up in int16), so sum (x + 128)(q - 32) scale - bias[r] = sum x (q - 32) scale.
constexpr int64_t kQ6X8Bytes = 1728;

template <int R>
void q6_kx8_rows(const uint8_t* group, int64_t blocks, const Activations<256>& a, int64_t m0, float (*out)[kX8Rows]) {
  __m512 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
  const int64_t K = a.K;
  const __m512i nibble = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30), bias32 = _mm512_set1_epi8(32);
  const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  // in 128-bit lane L: int16 lanes 0-3 get byte 2L in their high half, 4-7 byte 2L + 1 (then >> 8, sign-extending)
  const __m512i spread_rows = _mm512_set_epi64(0x0780078007800780LL, 0x0680068006800680LL, 0x0580058005800580LL, 0x0480048004800480LL,
                                               0x0380038003800380LL, 0x0280028002800280LL, 0x0180018001800180LL, 0x0080008000800080LL);
  constexpr int64_t kFlip = (int64_t)0x8080808080808080ULL;  // x + 128 as unsigned bytes
  for (int64_t g = 0; g < blocks; ++g) {
    const uint8_t* p = group + g * kQ6X8Bytes;
    __m512i sum[R];
    for (int j = 0; j < R; ++j) sum[j] = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h)
      for (int half = 0; half < 2; ++half) {  // chunks i = 2 half, 2 half + 1: sub-blocks 8 h + 2 t + half
        __m512i codes[4][2];
        for (int c = 0; c < 2; ++c) {
          const uint8_t* v = p + 192 + (4 * h + 2 * half + c) * 192;
          const __m512i first = _mm512_loadu_si512(v), second = _mm512_loadu_si512(v + 64), high = _mm512_loadu_si512(v + 128);
          auto code = [&](__m512i low, __m512i top_bits) {
            return _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(low, nibble), _mm512_and_si512(top_bits, top)), bias32);
          };
          codes[0][c] = code(first, _mm512_slli_epi16(high, 4));
          codes[1][c] = code(second, _mm512_slli_epi16(high, 2));
          codes[2][c] = code(_mm512_srli_epi16(first, 4), high);
          codes[3][c] = code(_mm512_srli_epi16(second, 4), _mm512_srli_epi16(high, 2));
        }
        for (int t = 0; t < 4; ++t) {
          int64_t scale_bytes;
          std::memcpy(&scale_bytes, p + 64 + 8 * (8 * h + 2 * t + half), sizeof(scale_bytes));
          const __m512i scale = _mm512_srai_epi16(_mm512_shuffle_epi8(_mm512_set1_epi64(scale_bytes), spread_rows), 8);
          for (int j = 0; j < R; ++j) {
            const int8_t* x = a.codes(m0 + j) + 256 * g + 128 * h + 32 * t + 16 * half;
            int64_t x0, x1;
            std::memcpy(&x0, x, sizeof(x0));
            std::memcpy(&x1, x + 8, sizeof(x1));
            const __m512i s = _mm512_add_epi16(_mm512_maddubs_epi16(_mm512_set1_epi64(x0 ^ kFlip), codes[t][0]),
                                               _mm512_maddubs_epi16(_mm512_set1_epi64(x1 ^ kFlip), codes[t][1]));
            sum[j] = _mm512_dpwssd_epi32(sum[j], s, scale);
          }
        }
      }
    const __m512 d2 = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(_mm256_loadu_ps((const float*)p)));
    const __m512i bias = _mm512_maskz_permutexvar_epi32(0x5555, twice, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(p + 32))));
    for (int j = 0; j < R; ++j) {  // lane 2r: row r's block total, exact, scaled as q6_kx8_tile scales it
      const __m512i half = _mm512_sub_epi32(sum[j], bias), total = _mm512_add_epi32(half, _mm512_srli_epi64(half, 32));
      const float dx = a.d[(m0 + j) * (K / 256) + g];
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d2, _mm512_set1_ps(dx)), acc[j]);
    }
  }
  for (int j = 0; j < R; ++j) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[j]);
    for (int r = 0; r < kX8Rows; ++r) out[j][r] = lanes[2 * r];
  }
}

using X8Rows = void (*)(const uint8_t*, int64_t, const Activations<256>&, int64_t, float (*)[kX8Rows]);

// y = x times the 8-row groups at w (group_bytes per block of 256): rows[R - 1] multiplies R activation rows at once
void x8_matmul(const bf16* x, int64_t M, const uint8_t* w, int64_t group_bytes, const X8Rows* rows_fn, int64_t K,
               int64_t N, const bf16* bias, bf16* y) {
  const Activations<256> a(x, M, K);
  const int64_t blocks = K / 256;
  at::parallel_for(0, N / kX8Rows, 2, [&](int64_t g0, int64_t g1) {
    float out[4][kX8Rows];
    for (int64_t G = g0; G < g1; ++G) {
      const uint8_t* group = w + G * blocks * group_bytes;
      for (int64_t m0 = 0; m0 < M; m0 += 4) {  // 4 rows at a time: each row's operations are the same in any batch
        const int64_t rows = std::min<int64_t>(4, M - m0);
        rows_fn[rows - 1](group, blocks, a, m0, out);
        for (int64_t j = 0; j < rows; ++j)
          for (int r = 0; r < kX8Rows; ++r) {
            const int64_t n = G * kX8Rows + r;
            y[(m0 + j) * N + n] = bf16(out[j][r] + (bias ? static_cast<float>(bias[n]) : 0.f));
          }
      }
    }
  });
}

constexpr X8Rows kQ4_Kx8Rows[4] = {q4_kx8_rows<1>, q4_kx8_rows<2>, q4_kx8_rows<3>, q4_kx8_rows<4>};
constexpr X8Rows kQ6_Kx8Rows[4] = {q6_kx8_rows<1>, q6_kx8_rows<2>, q6_kx8_rows<3>, q6_kx8_rows<4>};

// --- the 8-row layouts times many activation rows (prefill, batched decode): tiles -------------------------
// A tile is up to kTileRows activation rows times one group of 8 weight rows. Per block of 256, each pair of
// sub-blocks has its codes unpacked and its scales spread once per tile; then per activation row, vpdpbusd (the
// weights' unsigned codes times the activations' signed ones, 4 products per int32 lane) sums each sub-block
// exactly, row r's bytes 0-3 of each 8-byte chunk in lane 2r, bytes 4-7 in lane 2r + 1. Each sum fits in int16
// (Q4_K: 16 products of at most 15 x 127 a lane; Q6_K: 8 of (q - 32) x, at most 32 x 127, the lane starting from
// -32 times its activations' sum), so vpackssdw packs the pair's sums into one vector without saturating and one
// vpdpwssd by the scales adds scale x sum into int32 lanes: lane 4L + b holds row 2L + b's first sub-block, 4L + 2
// + b its second (the "row lanes" below). 5 (Q4_K) or 3 (Q6_K) vector instructions per activation row and 32 or 16
// weights of 8 rows, where the rows kernels above take 8 and 4. A row's operations are the same whichever tile it is in, and
// whatever the number of rows, so its numbers are the same in any batch.
constexpr int64_t kTileRows = 8;  // as fast as 12 or 16 on the 1.5B's shapes (Zen 4, 1 thread, under load)

// row lanes: int32 lane l holds weight row 2 (l / 4) + l % 2
inline __m512i row_lane_index() { return _mm512_setr_epi32(0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7); }

// Words for the mins (Q4_K): word w of A (B) is min[r][c] for row lane l = w / 2's row r and c = (0 or 4 for
// l % 4 < 2 or >= 2) + w % 2 (+ 2): an index into the 64 words 8r + c of the mins as int16
constexpr std::array<int16_t, 32> mins_words(int first) {
  std::array<int16_t, 32> index{};
  for (int w = 0; w < 32; ++w) {
    const int l = w / 2, r = 2 * (l / 4) + l % 2, c = (l % 4 < 2 ? 0 : 4) + first + w % 2;
    index[w] = (int16_t)(8 * r + c);
  }
  return index;
}
alignas(64) constexpr std::array<int16_t, 32> kMinsA = mins_words(0), kMinsB = mins_words(2);

// What the tiles read of each activation row besides its codes and d, made once per call from them.
struct TileActivations {
  const Activations<256>& a;
  // Q4_K [M, K / 256, 16]: S_c = bsum[2c] + bsum[2c + 1] as S0 S1 S0 S1 S4 S5 S4 S5 (against mins A), then with 2, 3,
  // 6, 7 (B): each 128-bit lane's words, beside row lanes' mins
  std::vector<int16_t> min_sums;
  std::vector<int64_t> corrections;  // Q6_K [M, K / 16]: int32 pair -32 x (sum of bytes 0-3 and 8-11, of 4-7 and 12-15)

  TileActivations(const Activations<256>& a, int64_t M, bool q4_k) : a(a) {
    const int64_t K = a.K;
    if (q4_k) min_sums.resize(M * K / 16);
    else corrections.resize(M * K / 16);
    at::parallel_for(0, M, std::max<int64_t>(1, (int64_t{1} << 16) / K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        if (q4_k) {
          static constexpr int kOrder[16] = {0, 1, 0, 1, 4, 5, 4, 5, 2, 3, 2, 3, 6, 7, 6, 7};
          for (int64_t g = 0; g < K / 256; ++g)
            for (int j = 0; j < 16; ++j) {
              const int16_t* bs = a.bsums.data() + (m * K + 256 * g) / 16 + 2 * kOrder[j];
              min_sums[(m * (K / 256) + g) * 16 + j] = (int16_t)(bs[0] + bs[1]);
            }
        } else {
          const int8_t* x = a.codes(m);
          for (int64_t e = 0; e < K / 16; ++e) {
            int32_t even = 0, odd = 0;
            for (int i = 0; i < 4; ++i) {
              even += x[16 * e + i] + x[16 * e + 8 + i];
              odd += x[16 * e + 4 + i] + x[16 * e + 12 + i];
            }
            corrections[m * (K / 16) + e] = (int64_t)(uint32_t)(-32 * even) | (int64_t)(uint32_t)(-32 * odd) << 32;
          }
        }
      }
    });
  }
};

// the tile's float row lanes -> out[j][r]
template <int R>
inline void tile_out(const __m512* acc, float (*out)[kX8Rows]) {
  for (int j = 0; j < R; ++j) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[j]);
    for (int r = 0; r < kX8Rows; ++r) out[j][r] = lanes[4 * (r / 2) + r % 2] + lanes[4 * (r / 2) + 2 + r % 2];
  }
}

// 16 scale bytes at p (a pair of sub-blocks: rows 0-7 of the first, then of the second) -> the words vpdpwssd takes
// against vpackssdw's pairs: in 128-bit lane L, the first's rows 2L, 2L, 2L + 1, 2L + 1, then the second's;
// zero-extended (Q4_K's unsigned scales) or sign-extended (Q6_K's int8 ones)
inline __m512i spread_pair_u8(const uint8_t* p) {
  const __m512i ctrl = _mm512_set_epi64(0x800F800F800E800ELL, 0x8007800780068006LL, 0x800D800D800C800CLL, 0x8005800580048004LL,
                                        0x800B800B800A800ALL, 0x8003800380028002LL, 0x8009800980088008LL, 0x8001800180008000LL);
  return _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p)), ctrl);
}
inline __m512i spread_pair_i8(const uint8_t* p) {
  const __m512i ctrl = _mm512_set_epi64(0x0F800F800E800E80LL, 0x0780078006800680LL, 0x0D800D800C800C80LL, 0x0580058004800480LL,
                                        0x0B800B800A800A80LL, 0x0380038002800280LL, 0x0980098008800880LL, 0x0180018000800080LL);
  return _mm512_srai_epi16(_mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)p)), ctrl), 8);
}

inline __m512i broadcast8(const int8_t* x) {  // vpbroadcastq from memory (through a general register it is slower)
  return _mm512_broadcastq_epi64(_mm_loadl_epi64((const __m128i*)x));
}

// rows m0..m0 + R - 1 of y for the 8 weight rows of one Q4_Kx8 group
template <int R>
void q4_kx8_tile(const uint8_t* group, int64_t blocks, const TileActivations& t, int64_t m0, float (*out)[kX8Rows]) {
  const Activations<256>& a = t.a;
  __m512 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i pick_a = _mm512_load_si512(kMinsA.data()), pick_b = _mm512_load_si512(kMinsB.data());
  for (int64_t g = 0; g < blocks; ++g) {
    const uint8_t* p = group + g * kX8Bytes;
    __m512i sum[R];
    for (int j = 0; j < R; ++j) sum[j] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {  // sub-blocks 2k (the low nibbles of pair k's bytes) and 2k + 1 (the high ones)
      __m512i low[4], high[4];
      for (int i = 0; i < 4; ++i) {
        const __m512i q = _mm512_loadu_si512(p + 192 + 256 * k + 64 * i);
        low[i] = _mm512_and_si512(q, nibble);
        high[i] = _mm512_and_si512(_mm512_srli_epi16(q, 4), nibble);
      }
      const __m512i scales = spread_pair_u8(p + 64 + 16 * k);
      for (int j = 0; j < R; ++j) {
        const int8_t* x = a.codes(m0 + j) + 256 * g + 64 * k;
        __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low[0], broadcast8(x));
        __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), high[0], broadcast8(x + 32));
        for (int i = 1; i < 4; ++i) {
          s0 = _mm512_dpbusd_epi32(s0, low[i], broadcast8(x + 8 * i));
          s1 = _mm512_dpbusd_epi32(s1, high[i], broadcast8(x + 32 + 8 * i));
        }
        sum[j] = _mm512_dpwssd_epi32(sum[j], _mm512_packs_epi32(s0, s1), scales);
      }
    }
    const __m512 dd = _mm512_loadu_ps((const float*)p);
    const __m512i rows = row_lane_index();
    const __m512 d = _mm512_permutexvar_ps(rows, dd), dmin = _mm512_permutexvar_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(8)), dd);
    const __m512i mins_lo = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + 128)));
    const __m512i mins_hi = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(p + 160)));
    const __m512i mins_a = _mm512_permutex2var_epi16(mins_lo, pick_a, mins_hi);
    const __m512i mins_b = _mm512_permutex2var_epi16(mins_lo, pick_b, mins_hi);
    for (int j = 0; j < R; ++j) {
      const int64_t m = m0 + j;
      const int16_t* s = t.min_sums.data() + (m * blocks + g) * 16;
      __m512i offsets = _mm512_dpwssd_epi32(_mm512_setzero_si512(), mins_a, _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)s)));
      offsets = _mm512_dpwssd_epi32(offsets, mins_b, _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(s + 8))));
      const __m512 w = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(offsets), dmin, _mm512_mul_ps(_mm512_cvtepi32_ps(sum[j]), d));
      acc[j] = _mm512_fmadd_ps(w, _mm512_set1_ps(a.d[m * blocks + g]), acc[j]);
    }
  }
  tile_out<R>(acc, out);
}

// rows m0..m0 + R - 1 of y for the 8 weight rows of one Q6_Kx8 group
template <int R>
void q6_kx8_tile(const uint8_t* group, int64_t blocks, const TileActivations& t, int64_t m0, float (*out)[kX8Rows]) {
  const Activations<256>& a = t.a;
  __m512 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  for (int64_t g = 0; g < blocks; ++g) {
    const uint8_t* p = group + g * kQ6X8Bytes;
    __m512i sum[R];
    for (int j = 0; j < R; ++j) sum[j] = _mm512_setzero_si512();
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {  // weights 128 h + 32 u ...: chunks i = 0..3, sub-blocks e = 8 h + 2 u (i < 2), e + 1
        __m512i codes[4];
        for (int i = 0; i < 4; ++i) {
          const uint8_t* v = p + 192 + (4 * h + i) * 192;
          const __m512i low = _mm512_loadu_si512(v + (u % 2) * 64), high = _mm512_loadu_si512(v + 128);
          const __m512i nib = u < 2 ? low : _mm512_srli_epi16(low, 4);
          const __m512i top_bits = u == 0 ? _mm512_slli_epi16(high, 4) : u == 1 ? _mm512_slli_epi16(high, 2)
                                 : u == 2 ? high : _mm512_srli_epi16(high, 2);
          codes[i] = _mm512_ternarylogic_epi32(_mm512_and_si512(nib, nibble), top_bits, top, 0xF8);  // a | (b & c)
        }
        const int e = 8 * h + 2 * u;
        const __m512i scales = spread_pair_i8(p + 64 + 8 * e);
        for (int j = 0; j < R; ++j) {
          const int64_t m = m0 + j;
          const int8_t* x = a.codes(m) + 256 * g + 16 * e;
          const int64_t* corrections = t.corrections.data() + m * (blocks * 16) + 16 * g + e;
          __m512i s0 = _mm512_dpbusd_epi32(_mm512_set1_epi64(corrections[0]), codes[0], broadcast8(x));
          __m512i s1 = _mm512_dpbusd_epi32(_mm512_set1_epi64(corrections[1]), codes[2], broadcast8(x + 16));
          s0 = _mm512_dpbusd_epi32(s0, codes[1], broadcast8(x + 8));
          s1 = _mm512_dpbusd_epi32(s1, codes[3], broadcast8(x + 24));
          sum[j] = _mm512_dpwssd_epi32(sum[j], _mm512_packs_epi32(s0, s1), scales);
        }
      }
    // row lanes 4L + b: row 2L + b's block total, exact, then one rounding of d dx and one fma: q6_kx8_rows' numbers
    const __m512 d = _mm512_permutexvar_ps(row_lane_index(), _mm512_castps256_ps512(_mm256_loadu_ps((const float*)p)));
    for (int j = 0; j < R; ++j) {
      const __m512i total = _mm512_add_epi32(sum[j], _mm512_bsrli_epi128(sum[j], 8));
      acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d, _mm512_set1_ps(a.d[(m0 + j) * blocks + g])), acc[j]);
    }
  }
  for (int j = 0; j < R; ++j) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, acc[j]);
    for (int r = 0; r < kX8Rows; ++r) out[j][r] = lanes[4 * (r / 2) + r % 2];
  }
}

using X8Tile = void (*)(const uint8_t*, int64_t, const TileActivations&, int64_t, float (*)[kX8Rows]);
template <template <int> class Tile, size_t... R>
constexpr std::array<X8Tile, sizeof...(R)> tile_table(std::index_sequence<R...>) { return {Tile<R + 1>::run...}; }
template <int R> struct Q4_KTile { static constexpr X8Tile run = q4_kx8_tile<R>; };
template <int R> struct Q6_KTile { static constexpr X8Tile run = q6_kx8_tile<R>; };
// tiles[R - 1] multiplies R activation rows
constexpr auto kQ4_Kx8Tiles = tile_table<Q4_KTile>(std::make_index_sequence<kTileRows>());
constexpr auto kQ6_Kx8Tiles = tile_table<Q6_KTile>(std::make_index_sequence<kTileRows>());

// y = x times the 8-row groups at w, by tiles: the activation rows in slabs of about kSlabBytes of codes (kept in
// L2 while a thread's groups go by), each group's blocks (L1 / L2) read once per slab.
constexpr int64_t kSlabBytes = 640 * 1024;  // of a 1 MB L2: 1536x8960 at 512 rows 5-15% faster than 256 KB
void x8_gemm(const bf16* x, int64_t M, const uint8_t* w, int64_t group_bytes, const X8Tile* tiles, bool q4_k, int64_t K,
             int64_t N, const bf16* bias, bf16* y) {
  const Activations<256> a(x, M, K);
  const TileActivations t(a, M, q4_k);
  const int64_t blocks = K / 256, slab = std::max<int64_t>(kTileRows, kSlabBytes / K / kTileRows * kTileRows);
  at::parallel_for(0, N / kX8Rows, 1, [&](int64_t g0, int64_t g1) {
    float out[kTileRows][kX8Rows];
    for (int64_t s0 = 0; s0 < M; s0 += slab)
      for (int64_t G = g0; G < g1; ++G) {
        const uint8_t* group = w + G * blocks * group_bytes;
        for (int64_t m0 = s0; m0 < std::min(M, s0 + slab); m0 += kTileRows) {
          const int64_t rows = std::min(kTileRows, std::min(M, s0 + slab) - m0);
          tiles[rows - 1](group, blocks, t, m0, out);
          for (int64_t j = 0; j < rows; ++j)
            for (int r = 0; r < kX8Rows; ++r) {
              const int64_t n = G * kX8Rows + r;
              y[(m0 + j) * N + n] = bf16(out[j][r] + (bias ? static_cast<float>(bias[n]) : 0.f));
            }
        }
      }
  });
}

// GGUF's type numbers (ggml_type) of the formats above.
enum Type : int64_t { kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };

}  // namespace

// x: [M, K] bf16 (M <= 32); weights: [N, K / W * B] uint8 blocks of GGUF type `type` (Q5_0, Q8_0: K a multiple
// of 64; Q4_K, Q6_K: of 256) -> [M, N] bf16.
at::Tensor kquant_matmul(at::Tensor x, at::Tensor weights, int64_t type, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(weights.scalar_type() == at::kByte && weights.dim() == 2 && weights.is_contiguous(), "weights: [N, bytes] uint8, contiguous");
  int64_t weights_per_block, bytes_per_block;
  switch (type) {
    case kQ5_0: weights_per_block = 32, bytes_per_block = Q5_0::kBytes; break;
    case kQ8_0: weights_per_block = 32, bytes_per_block = Q8_0::kBytes; break;
    case kQ4_K: weights_per_block = 256, bytes_per_block = Q4_K::kBytes; break;
    case kQ6_K: weights_per_block = 256, bytes_per_block = Q6_K::kBytes; break;
    default: TORCH_CHECK(false, "kquant_matmul: unsupported GGUF type ", type);
  }
  TORCH_CHECK(weights.size(1) % bytes_per_block == 0, "weights: rows of whole blocks");
  const int64_t K = weights.size(1) / bytes_per_block * weights_per_block, N = weights.size(0), M = x.size(0);
  TORCH_CHECK(K % 64 == 0, "kquant_matmul: K must be a multiple of 64");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == K && M <= kMaxRows,
              "x: [M <= 32, K] bf16, K = ", K);
  x = x.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->to(at::kBFloat16).contiguous();
  const bf16* b = bias_c.defined() ? bias_c.data_ptr<bf16>() : nullptr;
  auto y = at::empty({M, N}, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const uint8_t* wp = weights.data_ptr<uint8_t>();
  bf16* yp = y.data_ptr<bf16>();
  switch (type) {
    case kQ5_0: q8_pair_matmul<Q5_0>(xp, M, wp, K, N, b, yp); break;
    case kQ8_0: q8_pair_matmul<Q8_0>(xp, M, wp, K, N, b, yp); break;
    case kQ4_K: q8k_matmul<Q4_K>(xp, M, wp, K, N, b, yp); break;
    case kQ6_K: q8k_matmul<Q6_K>(xp, M, wp, K, N, b, yp); break;
  }
  return y;
}

namespace {

// One file block of row r into its 8-row group-block p (Q4_Kx8, Q6_Kx8 layouts above).
void q4_k_repack_block(const uint8_t* block, int r, uint8_t* p) {
  float* dd = reinterpret_cast<float*>(p);
  dd[r] = fp16_at(block);
  dd[8 + r] = fp16_at(block + 2);
  alignas(16) uint8_t sm[16];
  _mm_store_si128((__m128i*)sm, gguf_blocks::scales_and_mins(block + 4));
  for (int c = 0; c < 8; ++c) {
    p[64 + 8 * c + r] = sm[c];
    p[128 + 8 * r + c] = sm[8 + c];
  }
  for (int k = 0; k < 4; ++k)
    for (int i = 0; i < 4; ++i) std::memcpy(p + 192 + 256 * k + 64 * i + 8 * r, block + 16 + 32 * k + 8 * i, 8);
}

void q6_k_repack_block(const uint8_t* block, int r, uint8_t* p) {
  reinterpret_cast<float*>(p)[r] = fp16_at(block + 208);
  const int8_t* scales = reinterpret_cast<const int8_t*>(block + 192);
  int32_t bias = 0;
  for (int h = 0; h < 2; ++h)
    for (int l = 0; l < 32; ++l) {
      const uint8_t* ql = block + 64 * h;
      const uint8_t qh = block[128 + 32 * h + l];
      const int q[4] = {(ql[l] & 0xF) | (qh & 3) << 4, (ql[l + 32] & 0xF) | (qh >> 2 & 3) << 4,
                        (ql[l] >> 4) | (qh >> 4 & 3) << 4, (ql[l + 32] >> 4) | (qh >> 6 & 3) << 4};
      for (int t = 0; t < 4; ++t) bias += 128 * scales[8 * h + 2 * t + l / 16] * (q[t] - 32);
    }
  reinterpret_cast<int32_t*>(p + 32)[r] = bias;
  for (int e = 0; e < 16; ++e) p[64 + 8 * e + r] = (uint8_t)scales[e];
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      uint8_t* v = p + 192 + (4 * h + i) * 192 + 8 * r;
      std::memcpy(v, block + 64 * h + 8 * i, 8);
      std::memcpy(v + 64, block + 64 * h + 32 + 8 * i, 8);
      std::memcpy(v + 128, block + 128 + 32 * h + 8 * i, 8);
    }
}

struct X8Format {
  int64_t file_bytes, group_bytes;
  void (*repack_block)(const uint8_t*, int, uint8_t*);
  const X8Rows* rows;
  const X8Tile* tiles;
};

X8Format x8_format(int64_t type) {
  switch (type) {
    case kQ4_K: return {Q4_K::kBytes, kX8Bytes, q4_k_repack_block, kQ4_Kx8Rows, kQ4_Kx8Tiles.data()};
    case kQ6_K: return {Q6_K::kBytes, kQ6X8Bytes, q6_k_repack_block, kQ6_Kx8Rows, kQ6_Kx8Tiles.data()};
    default: TORCH_CHECK(false, "the 8-row layouts take Q4_K and Q6_K, not GGUF type ", type);
  }
}

}  // namespace

// file blocks [N, K / 256 * B] of `type` (Q4_K, Q6_K; N a multiple of 8) -> [N / 8, K / 256 * group bytes]: the
// Q4_Kx8 or Q6_Kx8 layout above.
at::Tensor x8_repack(at::Tensor weights, int64_t type) {
  const X8Format f = x8_format(type);
  TORCH_CHECK(weights.scalar_type() == at::kByte && weights.dim() == 2 && weights.is_contiguous() &&
              weights.size(0) % kX8Rows == 0 && weights.size(1) % f.file_bytes == 0,
              "x8_repack: weights [N, K / 256 * block bytes] uint8, contiguous, N a multiple of 8");
  const int64_t N = weights.size(0), blocks = weights.size(1) / f.file_bytes;
  auto out = at::empty({N / kX8Rows, blocks * f.group_bytes}, weights.options());  // every byte written below
  const uint8_t* src = weights.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, N / kX8Rows, 16, [&](int64_t g0, int64_t g1) {
    for (int64_t G = g0; G < g1; ++G)
      for (int64_t g = 0; g < blocks; ++g)
        for (int r = 0; r < kX8Rows; ++r)
          f.repack_block(src + ((G * kX8Rows + r) * blocks + g) * f.file_bytes, r, dst + (G * blocks + g) * f.group_bytes);
  });
  return out;
}

namespace {

// 32 bf16 weights from two float32 vectors (scale * code - offset, rounded once to float32, then to bf16)
inline void store_weights(bf16* out, __m256i codes, __m512 scale, __m512 offset) {
  const __m512 lo = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes))), scale), offset);
  const __m512 hi = _mm512_sub_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(codes, 1))), scale), offset);
  _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// 32 bytes: row r's 8 bytes of the 64-byte vectors at v, v + stride, v + 2 stride, v + 3 stride
inline __m256i gather_row(const uint8_t* v, int64_t stride, int r) {
  int64_t q[4];
  for (int i = 0; i < 4; ++i) std::memcpy(&q[i], v + i * stride + 8 * r, 8);
  return _mm256_setr_epi64x(q[0], q[1], q[2], q[3]);
}

}  // namespace

// 8-row groups [N / 8, K / 256 * group bytes] of `type` -> their weights [N, K] in bf16 (as gguf-py's dequantize
// rounds them in float32, then to bf16), into out.
at::Tensor x8_dequantize(at::Tensor packed, int64_t type, at::Tensor out) {
  const X8Format f = x8_format(type);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() && packed.size(1) % f.group_bytes == 0,
              "x8_dequantize: packed [N / 8, K / 256 * group bytes] uint8, contiguous");
  const int64_t groups = packed.size(0), blocks = packed.size(1) / f.group_bytes, K = blocks * 256;
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == groups * kX8Rows &&
              out.size(1) == K, "x8_dequantize: out [N, K] bf16, contiguous");
  const uint8_t* src = packed.data_ptr<uint8_t>();
  bf16* dst = out.data_ptr<bf16>();
  const __m256i nibble = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30), bias32 = _mm256_set1_epi8(32);
  at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t G = g0; G < g1; ++G)
      for (int64_t g = 0; g < blocks; ++g) {
        const uint8_t* p = src + (G * blocks + g) * f.group_bytes;
        const float* dd = reinterpret_cast<const float*>(p);
        // the sub-blocks' float scales (and Q4_K's offsets), d scale[c][r] at 8 c + r, dmin min[r][c] at 8 r + c
        alignas(64) float scale[128], offset[64];
        const __m512 d = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7), _mm512_loadu_ps(dd));
        for (int v = 0; v < (type == kQ4_K ? 4 : 8); ++v) {
          const __m128i bytes = _mm_loadu_si128((const __m128i*)(p + 64 + 16 * v));
          const __m512i ints = type == kQ4_K ? _mm512_cvtepu8_epi32(bytes) : _mm512_cvtepi8_epi32(bytes);
          _mm512_store_ps(scale + 16 * v, _mm512_mul_ps(d, _mm512_cvtepi32_ps(ints)));
        }
        if (type == kQ4_K)
          for (int v = 0; v < 4; ++v) {
            const __m512 dmin = _mm512_permutexvar_ps(_mm512_setr_epi32(8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9), _mm512_loadu_ps(dd + 2 * v));
            _mm512_store_ps(offset + 16 * v, _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + 128 + 16 * v))))));
          }
        for (int r = 0; r < kX8Rows; ++r) {
          bf16* row = dst + (G * kX8Rows + r) * K + 256 * g;
          if (type == kQ4_K) {
            for (int k = 0; k < 4; ++k) {
              const __m256i q = gather_row(p + 192 + 256 * k, 64, r);
              for (int half = 0; half < 2; ++half) {  // sub-block c = 2k + half
                const int c = 2 * k + half;
                const __m256i codes = _mm256_and_si256(half ? _mm256_srli_epi16(q, 4) : q, nibble);
                store_weights(row + 32 * c, codes, _mm512_set1_ps(scale[8 * c + r]), _mm512_set1_ps(offset[8 * r + c]));
              }
            }
          } else {
            for (int h = 0; h < 2; ++h) {
              const uint8_t* v = p + 192 + 4 * h * 192;
              const __m256i first = gather_row(v, 192, r), second = gather_row(v + 64, 192, r), high = gather_row(v + 128, 192, r);
              const __m256i codes[4] = {_mm256_or_si256(_mm256_and_si256(first, nibble), _mm256_and_si256(_mm256_slli_epi16(high, 4), top)),
                                        _mm256_or_si256(_mm256_and_si256(second, nibble), _mm256_and_si256(_mm256_slli_epi16(high, 2), top)),
                                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(first, 4), nibble), _mm256_and_si256(high, top)),
                                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(second, 4), nibble), _mm256_and_si256(_mm256_srli_epi16(high, 2), top))};
              for (int t = 0; t < 4; ++t) {  // 32 weights 128 h + 32 t ...: sub-blocks 8 h + 2 t and 8 h + 2 t + 1
                const __m256i signed_codes = _mm256_sub_epi8(codes[t], bias32);
                const int e = 8 * h + 2 * t;
                const __m512 scale_lo = _mm512_set1_ps(scale[8 * e + r]), scale_hi = _mm512_set1_ps(scale[8 * (e + 1) + r]);
                const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(signed_codes))), scale_lo);
                const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(signed_codes, 1))), scale_hi);
                _mm512_storeu_si512(row + 128 * h + 32 * t, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
              }
            }
          }
        }
      }
  });
  return out;
}

// x: [M, K] bf16 (M <= 32), 8-row groups [N / 8, K / 256 * group bytes] of `type` -> [M, N] bf16
at::Tensor x8_matmul_op(at::Tensor x, at::Tensor packed, int64_t type, c10::optional<at::Tensor> bias) {
  const X8Format f = x8_format(type);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() && packed.size(1) % f.group_bytes == 0,
              "x8_matmul: packed [N / 8, K / 256 * group bytes] uint8, contiguous");
  const int64_t N = packed.size(0) * kX8Rows, K = packed.size(1) / f.group_bytes * 256, M = x.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == K && M <= kMaxRows,
              "x: [M <= 32, K] bf16, K = ", K);
  x = x.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->to(at::kBFloat16).contiguous();
  auto y = at::empty({M, N}, x.options());
  x8_matmul(x.data_ptr<bf16>(), M, packed.data_ptr<uint8_t>(), f.group_bytes, f.rows, K, N,
            bias_c.defined() ? bias_c.data_ptr<bf16>() : nullptr, y.data_ptr<bf16>());
  return y;
}

// x: [M, K] bf16 (any M), 8-row groups [N / 8, K / 256 * group bytes] of `type` -> [M, N] bf16, by tiles of rows
at::Tensor x8_gemm_op(at::Tensor x, at::Tensor packed, int64_t type, c10::optional<at::Tensor> bias) {
  const X8Format f = x8_format(type);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() && packed.size(1) % f.group_bytes == 0,
              "x8_gemm: packed [N / 8, K / 256 * group bytes] uint8, contiguous");
  const int64_t N = packed.size(0) * kX8Rows, K = packed.size(1) / f.group_bytes * 256, M = x.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == K, "x: [M, K] bf16, K = ", K);
  x = x.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->to(at::kBFloat16).contiguous();
  auto y = at::empty({M, N}, x.options());
  if (M > 0)
    x8_gemm(x.data_ptr<bf16>(), M, packed.data_ptr<uint8_t>(), f.group_bytes, f.tiles, type == kQ4_K, K, N,
            bias_c.defined() ? bias_c.data_ptr<bf16>() : nullptr, y.data_ptr<bf16>());
  return y;
}

// x: [M, K] bf16 -> (codes [M, K] int8, scales [M, K / block] float32): the activations as the kernel quantizes
// them (for tests; block 32: the codes as signed int8, not + 128).
std::tuple<at::Tensor, at::Tensor> quantize_activations(at::Tensor x, int64_t block) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && (block == 32 || block == 256) && x.size(1) % (2 * block) == 0 &&
              x.size(1) % 64 == 0, "x: [M, K] bf16, K a multiple of 64 and of the block");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto codes = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scales = at::empty({M, K / block}, x.options().dtype(at::kFloat));
  auto copy = [&](const auto& a, bool shifted) {
    for (int64_t i = 0; i < M * K; ++i) codes.data_ptr<int8_t>()[i] = (int8_t)(a.q[i] ^ (shifted ? 0x80 : 0));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < K / block; ++g)
        scales.data_ptr<float>()[m * (K / block) + g] = block == 256 ? a.d[m * (K / 256) + g] : a.d[m * (K / 4) + 8 * g];
  };
  if (block == 256) copy(Activations<256>(x.data_ptr<bf16>(), M, K), false);
  else copy(Activations<32>(x.data_ptr<bf16>(), M, K), true);
  return {codes, scales};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kquant_matmul", &kquant_matmul, "bf16 rows quantized to 8 bits times GGUF Q4_K, Q6_K, Q8_0 or Q5_0 blocks (AVX-512 VNNI)",
        py::call_guard<py::gil_scoped_release>());
  m.def("x8_repack", &x8_repack, "Q4_K or Q6_K rows -> the 8-row interleaved layout", py::call_guard<py::gil_scoped_release>());
  m.def("x8_matmul", &x8_matmul_op, "bf16 rows quantized to 8 bits times 8-row interleaved Q4_K / Q6_K weights (AVX-512 VNNI)",
        py::call_guard<py::gil_scoped_release>());
  m.def("x8_gemm", &x8_gemm_op, "bf16 rows (any number) quantized to 8 bits times 8-row interleaved Q4_K / Q6_K weights, by tiles of rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("x8_dequantize", &x8_dequantize, "8-row interleaved Q4_K / Q6_K weights -> bf16 rows", py::call_guard<py::gil_scoped_release>());
  m.def("quantize_activations", &quantize_activations, "bf16 rows as kquant_matmul quantizes them",
        py::call_guard<py::gil_scoped_release>());
}
