// Block-quantized weights times float32 activation rows on CPUs with AVX2 and FMA (no AVX-512): the way
// llama.cpp's AVX2 code multiplies them. The activations are quantized to 8 bits per block of 32 values once per
// call (d = absmax / 127, codes q = round(x / d), as q8_activations.h does for the AVX-512 kernels), then the
// weights' unsigned codes c meet them in integer dot products (vpmaddubsw: u8 x s8 -> pairs summed in int16;
// vpmaddwd by ones -> int32), and each block's scale and offset are applied once per block in float32:
// w = scale c + offset, so
//   x . w = d_x scale (c . q_x) + offset d_x sum(q_x).
// It differs from float math on the weights only by the activations' rounding (|x - d q| <= d / 2 per value).
//
// Weights are repacked at load (layers/quant_avx2.py) in x16_vnni.cpp's layout, 16 rows interleaved: per group
// of 16 weight rows (n = 16 G + r) and block g of B weights, the codes (B / 4 vectors of 64 bytes, int32 lane r
// holding row r's 4 codes), then float scale[r] (64 bytes), then float offset[r] (64 bytes; none in kQ8). A
// 256-bit vector is half of one: rows 0-7, then rows 8-15. Three layouts of blocks of 32:
//   kQ4 (Q4_0, Q4_1; 0.75 bytes a weight): 4 vectors; in vector i, row r's bytes hold codes 4i..4i+3 in their
//      low nibbles and 16 + 4i..16 + 4i + 3 in their high ones (GGUF's Q4_0 byte order);
//   kQ5 (Q5_0, Q5_1, Q5_K; 0.875): kQ4's 4 vectors of the codes' low 4 bits, then one vector of their fifth
//      bits: byte i of row r's lane holds those of vector i's bytes, bit 2b the low-nibble code's of byte b, bit
//      2b + 1 the high-nibble code's;
//   kQ8 (Q8_0; 1.125): one code a byte, q + 128: these are turned back into signed q and multiplied with the
//      sign trick (|q| unsigned times x with q's sign, as llama.cpp does); no offsets (w = scale q).
// Two more keep the K-quants at about the file's bytes, per group and super-block of 256 weights, activations
// still quantized per 32: the sub-block scales stay integers, applied to the int16 sums by vpmaddwd (as llama.cpp's
// Q4_K x Q8_K does), d (and dmin) once per super-block in float32, read as the file's float16 (at one row the
// kernel reads memory as fast as it can: every byte counts):
//   kQ4K (Q4_K, 2368 bytes): 8 sub-blocks of 32 in kQ4's code layout, then uint8 sc[8][16 rows], uint8 m[8][16],
//      float16 d[16], float16 dmin[16]: w = d sc q - dmin m (0.5625 bytes a weight, as the file);
//   kQ6K (Q6_K, 3360 bytes): per 32 weights their low 4 bits in kQ4's layout (256 bytes), then their top 2 bits
//      (2 vectors of 64 bytes: byte b of vector k holds, for code vectors 2k and 2k + 1 in its low and high
//      nibble, the top bits of the byte's low-nibble code in bits 0-1 and of its high-nibble code in bits 2-3);
//      after the 8 groups of 32, int8 sc[16 sub-blocks of 16][16 rows], float16 d[16]: w = d sc (q - 32), the 32
//      taken off in integers with the activations' sums per 16 (0.82 bytes a weight, as the file).
// One broadcast of 4 activation codes meets 8 rows' codes in one vpmaddubsw, each int32 lane's sum is one row's
// (no reduction across lanes), and the float epilogue of a block runs once for 8 rows.
//
// Threads take contiguous ranges of 16-row groups; in each, tiles of up to kTile activation rows pass over the
// group's blocks, prefetching kPrefetchBytes ahead (1.1-1.25x at one row on the 4-, 5- and 6-bit layouts). A tile
// of one row takes a block's two halves at once for kQ4 and kQ4K (each activation broadcast meets both); from a few
// rows on, a K-quant group's codes are unpacked once for all its tiles (unpack_codes). Every activation row gets the
// same integer sums and float operations in the same order whatever the batch and its place in a tile, so a row's
// numbers do not depend on what else shares its call (batch-invariant decoding).
#include <immintrin.h>
#include "torch_lite.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kRows = 16;  // weight rows interleaved
constexpr int kTile = 4;  // activation rows per pass over a group's blocks (AVX2 has 16 vector registers)
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead of its reads a tile fetches its group's bytes
// activation rows from which a K-quant group's codes are unpacked once for all its tiles (unpack_codes): Q6_K
// 1.1-1.2x at 8 rows (0.98-1.1x at 5-7), 1.2-1.35x at 128; Q4_K 1.0x at 16, 1.07-1.12x at 128, 0.9x at 8 (its
// unpacking is cheap). Q4_0 / Q4_1 (kQ4) tried: no gain at 16-64 rows
constexpr int64_t kUnpackRowsQ4K = 16, kUnpackRowsQ6K = 8;
enum Layout : int64_t { kQ4 = 0, kQ5 = 1, kQ8 = 2, kQ4K = 3, kQ6K = 4 };

inline float horizontal_max(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

inline int32_t horizontal_sum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1))));
}

// Activation rows [M, K] quantized per block of B: codes q [M, K] int8, d [M, K / B], dsum [M, K / B] = d times
// the block's sum of codes (for the weights' offsets), and for kQ6K sum16 [M, K / 16], each 16 codes' sum.
struct Activations {
  int64_t K, B;
  std::vector<int8_t> q;
  std::vector<float> d, dsum;
  std::vector<int16_t> sum16;

  Activations(const float* x, int64_t M, int64_t K, int64_t B, bool sums16 = false)
      : K(K), B(B), q(M * K), d(M * K / B), dsum(M * K / B), sum16(sums16 ? M * K / 16 : 0) {
    // rows split between threads where there are enough of them (prefill); each row's numbers are the same
    at::parallel_for(0, M, std::max<int64_t>(1, (int64_t{1} << 16) / K), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        for (int64_t b = 0; b < K / B; ++b) quantize_block(x + m * K + b * B, m * (K / B) + b);
        for (int64_t i = 0; i < (int64_t)sum16.size() / M; ++i) {
          int32_t total = 0;
          for (int64_t j = 0; j < 16; ++j) total += q[m * K + 16 * i + j];
          sum16[m * (K / 16) + i] = (int16_t)total;  // |total| <= 16 x 127
        }
      }
    });
  }

  // One block: d = absmax / 127, q = round-to-nearest-even(x * (127 / absmax)) in float32 (0 when all are 0).
  void quantize_block(const float* x, int64_t i) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 amax = _mm256_setzero_ps();
    for (int64_t v = 0; v < B; v += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + v)));
    const float absmax = horizontal_max(amax);
    const __m256 inverse = _mm256_set1_ps(absmax > 0.f ? 127.f / absmax : 0.f);
    int8_t* codes = q.data() + i * B;
    __m256i total = _mm256_setzero_si256();
    for (int64_t v = 0; v < B; v += 8) {
      const __m256i qi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + v), inverse));  // |qi| <= 127
      total = _mm256_add_epi32(total, qi);
      const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
      _mm_storel_epi64((__m128i*)(codes + v), _mm_packs_epi16(words, words));
    }
    d[i] = absmax / 127.f;
    dsum[i] = d[i] * (float)horizontal_sum(total);
  }

  const int8_t* codes(int64_t m) const { return q.data() + m * K; }
};

inline __m256i broadcast4(const int8_t* x) {
  int32_t word;
  std::memcpy(&word, x, sizeof(word));
  return _mm256_set1_epi32(word);
}

// A kQ4 / kQ4K code vector -> the codes of its bytes' low nibbles (lo) and of their high ones (hi)
inline void q4_codes(const uint8_t* codes, __m256i& lo, __m256i& hi) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), v = _mm256_loadu_si256((const __m256i*)codes);
  lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
}

// The integer dot products of one half of a group's block (rows r < 8 of the half at `p`: 32 bytes a vector,
// vectors 64 bytes apart) with the codes of R activation rows (row j's at x + j K), row r's sum in int32 lane r
// of sum[j].
// Each weight vector is loaded and unpacked once for the R rows (a tile's rows share it); each row's integer
// sums are the same as alone.
// kQ4's 32 codes of a row times row j's 32 codes, the pairs summed in int16: 16 products a lane, at most 16 x 15 x 127
template <int R, bool Unpacked = false>
inline void q4_sums(const uint8_t* p, const int8_t* x, int64_t K, __m256i (&sum)[R], const uint8_t* u = nullptr) {
  for (int j = 0; j < R; ++j) sum[j] = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    __m256i lo, hi;
    if constexpr (Unpacked) {
      lo = _mm256_load_si256((const __m256i*)(u + 64 * i));
      hi = _mm256_load_si256((const __m256i*)(u + 64 * i + 32));
    } else {
      q4_codes(p + 64 * i, lo, hi);
    }
    for (int j = 0; j < R; ++j) {
      sum[j] = _mm256_add_epi16(sum[j], _mm256_maddubs_epi16(lo, broadcast4(x + j * K + 4 * i)));
      sum[j] = _mm256_add_epi16(sum[j], _mm256_maddubs_epi16(hi, broadcast4(x + j * K + 16 + 4 * i)));
    }
  }
}

// q4_sums of one activation row with both halves of a group's block at once (sum[h]: half h), the same integer
// sums: each activation broadcast meets both halves' codes, where the halves one after the other broadcast every
// code twice (1.15-1.25x at one row; with more rows the registers run out, and a broadcast serves every row's codes)
inline void q4_row_sums(const uint8_t* p, const int8_t* x, __m256i (&sum)[2]) {
  sum[0] = sum[1] = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    const __m256i low = broadcast4(x + 4 * i), high = broadcast4(x + 16 + 4 * i);
    for (int h = 0; h < 2; ++h) {
      __m256i lo, hi;
      q4_codes(p + 64 * i + 32 * h, lo, hi);
      sum[h] = _mm256_add_epi16(sum[h], _mm256_maddubs_epi16(lo, low));
      sum[h] = _mm256_add_epi16(sum[h], _mm256_maddubs_epi16(hi, high));
    }
  }
}

// Where unpack_codes puts the code vectors of super-block g, sub-block j and half h: 4 vectors of 64 bytes
constexpr int64_t unpacked_at(int64_t g, int j, int h) { return ((g * 8 + j) * 2 + h) * 256; }

// 8 float16 (one per row of a half) -> float32 (exactly)
inline __m256 halves_to_float(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
// 8 bytes (one per row of a half) -> int32 lanes, zero-extended
inline __m256i widen_u8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }

// 8 int8 scales (one per row of a half) -> int32 lanes holding the row's scale in both int16 halves (for
// vpmaddwd), sign-extended: one shuffle puts each scale in the high byte of both halves, an arithmetic shift brings
// it down (2 operations, where widening and pairing take 4)
inline __m256i scale_pairs(const int8_t* sc) {
  int64_t bytes;
  std::memcpy(&bytes, sc, sizeof(bytes));
  const __m256i high_bytes = _mm256_setr_epi8(-1, 0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3,
                                              -1, 4, -1, 4, -1, 5, -1, 5, -1, 6, -1, 6, -1, 7, -1, 7);
  return _mm256_srai_epi16(_mm256_shuffle_epi8(_mm256_set1_epi64x(bytes), high_bytes), 8);
}

template <int64_t L, int64_t B, int R>
inline void dots(const uint8_t* p, const int8_t* x, int64_t K, __m256i (&sum)[R]) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (L == kQ4) {
    q4_sums<R>(p, x, K, sum);
    for (int j = 0; j < R; ++j) sum[j] = _mm256_madd_epi16(sum[j], ones);
  } else if constexpr (L == kQ5) {  // two vectors' pairs summed in int16: at most 4 x 31 x 127 = 15748
    const __m256i nibble = _mm256_set1_epi8(0x0F), sixteen = _mm256_set1_epi8(0x10);
    const __m256i low_bit = _mm256_set1_epi32(0x40100401), high_bit = _mm256_set1_epi32((int)0x80200802);
    const __m256i lanes = _mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404, 0x08080808,
                                            0x0C0C0C0C);  // each byte's lane, as pshufb indexes
    const __m256i fifth = _mm256_loadu_si256((const __m256i*)(p + 256));
    for (int j = 0; j < R; ++j) sum[j] = _mm256_setzero_si256();
    for (int i = 0; i < 4; ++i) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(p + 64 * i));
      const __m256i bits = _mm256_shuffle_epi8(fifth, _mm256_add_epi8(lanes, _mm256_set1_epi8((char)i)));  // byte i, x4
      const __m256i lo = _mm256_or_si256(_mm256_and_si256(v, nibble), _mm256_and_si256(
          _mm256_cmpeq_epi8(_mm256_and_si256(bits, low_bit), low_bit), sixteen));
      const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), _mm256_and_si256(
          _mm256_cmpeq_epi8(_mm256_and_si256(bits, high_bit), high_bit), sixteen));
      for (int j = 0; j < R; ++j) {
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(x + j * K + 4 * i)),
                                               _mm256_maddubs_epi16(hi, broadcast4(x + j * K + 16 + 4 * i)));
        sum[j] = _mm256_add_epi32(sum[j], _mm256_madd_epi16(pairs, ones));
      }
    }
  } else {  // kQ8: a pair at most 2 x 128 x 127 = 32512
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int j = 0; j < R; ++j) sum[j] = _mm256_setzero_si256();
    for (int k = 0; k < 8; ++k) {
      const __m256i c = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + 64 * k)), flip);  // signed q
      const __m256i magnitude = _mm256_abs_epi8(c);
      for (int j = 0; j < R; ++j) {
        const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(broadcast4(x + j * K + 4 * k), c));
        sum[j] = _mm256_add_epi32(sum[j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
}

template <int64_t L, int64_t B>
constexpr int64_t kCodeBytes = L == kQ4 ? 256 : L == kQ5 ? 320 : 512;  // per group and block of 32

// A tile's activation rows m0 .. m0 + R - 1 as plain values (held in registers: the vector stores cannot alias
// them): row m0 + r's codes at x + r K, its scales per 32 at d + r K / 32 (and dsum), its sums of 16 (kQ6K) at
// sum16 + r K / 16.
struct TileRows {
  const int8_t* x;
  int64_t K;
  const float *d, *dsum;
  const int16_t* sum16;
  const uint8_t* u;  // the group's codes unpacked (unpack_codes), or null

  TileRows(const Activations& a, int64_t m0, const uint8_t* unpacked)
      : x(a.codes(m0)), K(a.K), d(a.d.data() + m0 * (a.K / 32)), dsum(a.dsum.data() + m0 * (a.K / 32)),
        sum16(a.sum16.empty() ? nullptr : a.sum16.data() + m0 * (a.K / 16)), u(unpacked) {}
};

// kQ4K: one half's (rows 8 h ..) super-block g at `p` times the tile's rows, the float sums
// d sum_j dx_j sc_j (q_j . x_j) - dmin sum_j m_j dsum_j added to acc[2 r + h]
template <int R, bool Unpacked>
inline void q4_k_super_block(const uint8_t* p, int h, const TileRows& t, int64_t g, __m256 (&acc)[2 * R]) {
  const int64_t blocks32 = t.K / 32;
  __m256 scaled[R], mins[R];
  for (int r = 0; r < R; ++r) scaled[r] = mins[r] = _mm256_setzero_ps();
  for (int j = 0; j < 8; ++j) {
    const __m256i sc_pairs = scale_pairs((const int8_t*)p + 2048 + 16 * j + 8 * h);  // sc < 64
    const __m256 m = _mm256_cvtepi32_ps(widen_u8(p + 2176 + 16 * j + 8 * h));
    __m256i sums[R];
    const uint8_t* unpacked = Unpacked ? t.u + unpacked_at(g, j, h) : nullptr;
    q4_sums<R, Unpacked>(p + 256 * j + 32 * h, t.x + 256 * g + 32 * j, t.K, sums, unpacked);
    for (int r = 0; r < R; ++r) {
      const int64_t i = r * blocks32 + 8 * g + j;
      const __m256i scaled_sums = _mm256_madd_epi16(sums[r], sc_pairs);  // sc (q . x)
      scaled[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(scaled_sums), _mm256_set1_ps(t.d[i]), scaled[r]);
      mins[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(t.dsum[i]), mins[r]);
    }
  }
  const __m256 d = halves_to_float(p + 2304 + 16 * h), dmin = halves_to_float(p + 2336 + 16 * h);
  for (int r = 0; r < R; ++r)
    acc[2 * r + h] = _mm256_fnmadd_ps(dmin, mins[r], _mm256_fmadd_ps(d, scaled[r], acc[2 * r + h]));
}

// kQ4K at one activation row: both halves of super-block g at once (q4_row_sums), the numbers of
// q4_k_super_block<1> for h = 0 and 1
inline void q4_k_super_block_row(const uint8_t* p, const TileRows& t, int64_t g, __m256 (&acc)[2]) {
  __m256 scaled[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, mins[2] = {scaled[0], scaled[0]};
  for (int j = 0; j < 8; ++j) {
    __m256i sums[2];
    q4_row_sums(p + 256 * j, t.x + 256 * g + 32 * j, sums);
    const int64_t i = 8 * g + j;
    for (int h = 0; h < 2; ++h) {
      const __m256 m = _mm256_cvtepi32_ps(widen_u8(p + 2176 + 16 * j + 8 * h));
      const __m256i scaled_sums = _mm256_madd_epi16(sums[h], scale_pairs((const int8_t*)p + 2048 + 16 * j + 8 * h));
      scaled[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(scaled_sums), _mm256_set1_ps(t.d[i]), scaled[h]);
      mins[h] = _mm256_fmadd_ps(m, _mm256_set1_ps(t.dsum[i]), mins[h]);
    }
  }
  for (int h = 0; h < 2; ++h) {
    const __m256 d = halves_to_float(p + 2304 + 16 * h), dmin = halves_to_float(p + 2336 + 16 * h);
    acc[h] = _mm256_fnmadd_ps(dmin, mins[h], _mm256_fmadd_ps(d, scaled[h], acc[h]));
  }
}

// kQ6K's code vector i of a half (at `codes`, its top bits in top_bits) -> the 6-bit codes of its bytes' low nibbles
// (lo) and of their high ones (hi)
inline void q6_codes(const uint8_t* codes, __m256i top_bits, int i, __m256i& lo, __m256i& hi) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03), twelve = _mm256_set1_epi8(0x0C);
  const __m256i v = _mm256_loadu_si256((const __m256i*)codes);
  const __m256i top = i % 2 ? _mm256_srli_epi16(top_bits, 4) : top_bits;
  lo = _mm256_or_si256(_mm256_and_si256(v, nibble), _mm256_slli_epi16(_mm256_and_si256(top, two), 4));
  hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nibble),
                       _mm256_slli_epi16(_mm256_and_si256(top, twelve), 2));
}

// kQ6K: as above, d sum_j dx_j (sum over its two sub-blocks s of sc_s (q_s . x_s - 32 sum(x_s)))
template <int R, bool Unpacked>
inline void q6_k_super_block(const uint8_t* p, int h, const TileRows& t, int64_t g, __m256 (&acc)[2 * R]) {
  const int64_t blocks32 = t.K / 32;
  __m256 scaled[R];
  for (int r = 0; r < R; ++r) scaled[r] = _mm256_setzero_ps();
  for (int j = 0; j < 8; ++j) {
    const uint8_t* codes = p + 384 * j + 32 * h;
    const int8_t* x = t.x + 256 * g + 32 * j;
    const int8_t* sc = (const int8_t*)p + 3072 + 32 * j + 8 * h;  // sub-blocks 2 j (codes 0-15), 2 j + 1 (16-31)
    const __m256i s00 = scale_pairs(sc), s11 = scale_pairs(sc + 16);
    __m256i sums[R];
    for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
    for (int half = 0; half < 2; ++half) {  // two products a pair, two pairs summed: at most 4 x 63 x 127 = 32004
      __m256i low[R], high[R];  // int16 pairs
      for (int r = 0; r < R; ++r) low[r] = high[r] = _mm256_setzero_si256();
      const __m256i top_bits =
          Unpacked ? _mm256_setzero_si256() : _mm256_loadu_si256((const __m256i*)(codes + 256 + 64 * half));
      for (int i = 2 * half; i < 2 * half + 2; ++i) {
        __m256i lo, hi;
        if constexpr (Unpacked) {
          const uint8_t* u = t.u + unpacked_at(g, j, h) + 64 * i;
          lo = _mm256_load_si256((const __m256i*)u);
          hi = _mm256_load_si256((const __m256i*)(u + 32));
        } else {
          q6_codes(codes + 64 * i, top_bits, i, lo, hi);
        }
        for (int r = 0; r < R; ++r) {
          low[r] = _mm256_add_epi16(low[r], _mm256_maddubs_epi16(lo, broadcast4(x + r * t.K + 4 * i)));
          high[r] = _mm256_add_epi16(high[r], _mm256_maddubs_epi16(hi, broadcast4(x + r * t.K + 16 + 4 * i)));
        }
      }
      for (int r = 0; r < R; ++r)
        sums[r] = _mm256_add_epi32(sums[r], _mm256_add_epi32(_mm256_madd_epi16(low[r], s00), _mm256_madd_epi16(high[r], s11)));
    }
    const __m256i s01 = _mm256_blend_epi16(s00, s11, 0xAA);  // s0 in the low int16 of a lane, s1 in the high
    for (int r = 0; r < R; ++r) {
      const int16_t* sum16 = t.sum16 + r * (t.K / 16) + 16 * g;
      int32_t xs;  // the two activation sums of 16, as an int16 pair
      std::memcpy(&xs, sum16 + 2 * j, sizeof(xs));
      const __m256i total = _mm256_sub_epi32(sums[r], _mm256_slli_epi32(_mm256_madd_epi16(s01, _mm256_set1_epi32(xs)), 5));
      scaled[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total), _mm256_set1_ps(t.d[r * blocks32 + 8 * g + j]), scaled[r]);
    }
  }
  const __m256 d = halves_to_float(p + 3328 + 16 * h);
  for (int r = 0; r < R; ++r) acc[2 * r + h] = _mm256_fmadd_ps(d, scaled[r], acc[2 * r + h]);
}

// out[2 j + h] = activation row m0 + j times weight rows 16 G + 8 h .. + 7, for the group at `group`
// bytes per group of 16 rows and block (of 32; the K layouts' super-blocks of 256)
constexpr int64_t layout_bytes(int64_t L) {
  return L == kQ4 ? 384 : L == kQ5 ? 448 : L == kQ8 ? 576 : L == kQ4K ? 2368 : 3360;
}

template <int64_t L, int64_t B, int R, bool Unpacked = false>
void tile(const uint8_t* group, int64_t blocks, const Activations& a, int64_t m0, __m256* out, const uint8_t* u) {
  const TileRows t(a, m0, u);
  __m256 acc[2 * R];
  for (int j = 0; j < 2 * R; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < blocks; ++g) {
    const uint8_t* p = group + g * layout_bytes(L);
    for (int64_t line = 0; line < layout_bytes(L); line += 64)  // the lines read kPrefetchBytes later
      _mm_prefetch((const char*)(p + kPrefetchBytes + line), _MM_HINT_T0);
    if constexpr (L == kQ4K && R == 1) {
      q4_k_super_block_row(p, t, g, acc);
      continue;
    }
    __m256i row_sums[2];  // kQ4 at one activation row: both halves' sums at once
    if constexpr (L == kQ4 && R == 1) {
      q4_row_sums(p, t.x + B * g, row_sums);
      for (int h = 0; h < 2; ++h) row_sums[h] = _mm256_madd_epi16(row_sums[h], _mm256_set1_epi16(1));
    }
    for (int h = 0; h < 2; ++h) {
      // the halves share their activation codes: a compiler that hoists those broadcasts out of this loop runs
      // out of registers and spills (here: 15-30% slower at 4 rows)
      asm volatile("" ::: "memory");
      if constexpr (L == kQ4K) {
        q4_k_super_block<R, Unpacked>(p, h, t, g, acc);
      } else if constexpr (L == kQ6K) {
        q6_k_super_block<R, Unpacked>(p, h, t, g, acc);
      } else {
        const __m256 scale = _mm256_loadu_ps((const float*)(p + kCodeBytes<L, B>) + 8 * h);
        const __m256 offset =
            L == kQ8 ? _mm256_setzero_ps() : _mm256_loadu_ps((const float*)(p + kCodeBytes<L, B> + 64) + 8 * h);
        __m256i sums[R];
        if constexpr (L == kQ4 && R == 1) sums[0] = row_sums[h];
        else dots<L, B, R>(p + 32 * h, t.x + B * g, t.K, sums);
        for (int j = 0; j < R; ++j) {
          const int64_t i = j * blocks + g;
          __m256 r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[j]), _mm256_mul_ps(scale, _mm256_set1_ps(t.d[i])),
                                     acc[2 * j + h]);
          if constexpr (L != kQ8) r = _mm256_fmadd_ps(offset, _mm256_set1_ps(t.dsum[i]), r);
          acc[2 * j + h] = r;
        }
      }
    }
  }
  for (int j = 0; j < 2 * R; ++j) out[j] = acc[j];
}

using Tile = void (*)(const uint8_t*, int64_t, const Activations&, int64_t, __m256*, const uint8_t*);
template <int64_t L, int64_t B, bool Unpacked = false>
constexpr Tile kTiles[kTile] = {tile<L, B, 1, Unpacked>, tile<L, B, 2, Unpacked>, tile<L, B, 3, Unpacked>,
                                tile<L, B, 4, Unpacked>};

// A K-quant group's codes as the tiles read them, ready to multiply: per super-block g, sub-block j, half h and code
// vector i, 64 bytes at unpacked_at(g, j, h) + 64 i: the codes in the vector's low nibbles (with their top bits:
// kQ6K), then those in its high ones. Done once per group where many tiles pass over it, each of which would
// unpack every vector again.
template <int64_t L>
void unpack_codes(const uint8_t* group, int64_t blocks, uint8_t* u) {
  for (int64_t g = 0; g < blocks; ++g)
    for (int j = 0; j < 8; ++j)
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 4; ++i) {
          __m256i lo, hi;
          if constexpr (L == kQ4K) {
            q4_codes(group + g * layout_bytes(L) + 256 * j + 32 * h + 64 * i, lo, hi);
          } else {
            const uint8_t* codes = group + g * layout_bytes(L) + 384 * j + 32 * h;
            q6_codes(codes + 64 * i, _mm256_loadu_si256((const __m256i*)(codes + 256 + 64 * (i / 2))), i, lo, hi);
          }
          uint8_t* o = u + unpacked_at(g, j, h) + 64 * i;
          _mm256_store_si256((__m256i*)o, lo);
          _mm256_store_si256((__m256i*)(o + 32), hi);
        }
}

}  // namespace

// x: [M, K] float32 (any M); packed: [ceil(N / 16), K / B * block bytes] uint8 in layout `layout` (above) with
// blocks of `block` (B) weights; bias: [N] or None -> [M, N] float32.
at::Tensor x16_matmul_avx2(at::Tensor x, at::Tensor packed, int64_t N, int64_t layout, int64_t block,
                           c10::optional<at::Tensor> bias) {
  const bool k_quant = layout == kQ4K || layout == kQ6K;
  TORCH_CHECK(((layout == kQ4 || layout == kQ5 || layout == kQ8) && block == 32) || (k_quant && block == 256),
              "x16_matmul_avx2: layout ", layout, " with blocks of ", block,
              " is not one of Q4 / 32, Q5 / 32, Q8 / 32, Q4K / 256, Q6K / 256");
  const int64_t block_bytes = layout_bytes(layout);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
              packed.size(1) % block_bytes == 0 && packed.size(0) == (N + kRows - 1) / kRows,
              "x16_matmul_avx2: packed [ceil(N / 16), K / ", block, " * ", block_bytes, "] uint8, contiguous, N = ", N);
  const int64_t blocks = packed.size(1) / block_bytes, K = block * blocks, M = x.size(0);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K, "x: [M, K] float32, K = ", K);
  x = x.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->to(at::kFloat).contiguous();
  const float* b = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  auto y = at::empty({M, N}, x.options());
  const Activations a(x.data_ptr<float>(), M, K, k_quant ? 32 : block, layout == kQ6K);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const Tile* tiles = layout == kQ4 ? kTiles<kQ4, 32> : layout == kQ5 ? kTiles<kQ5, 32> : layout == kQ8 ? kTiles<kQ8, 32>
                      : layout == kQ4K ? kTiles<kQ4K, 256> : kTiles<kQ6K, 256>;
  const bool unpack = k_quant && M >= (layout == kQ4K ? kUnpackRowsQ4K : kUnpackRowsQ6K);
  if (unpack) tiles = layout == kQ4K ? kTiles<kQ4K, 256, true> : kTiles<kQ6K, 256, true>;
  at::parallel_for(0, packed.size(0), 1, [&](int64_t g0, int64_t g1) {
    __m256 out[2 * kTile];
    float row[kRows];
    uint8_t* u = nullptr;
    std::vector<__m256i> unpacked(unpack ? blocks * 8 * 2 * 4 * 2 : 0);  // 64 bytes a code vector: aligned
    if (unpack) u = (uint8_t*)unpacked.data();
    for (int64_t G = g0; G < g1; ++G) {
      const int64_t n0 = G * kRows, valid = std::min(kRows, N - n0);
      if (unpack)
        (layout == kQ4K ? unpack_codes<kQ4K> : unpack_codes<kQ6K>)(w + G * blocks * block_bytes, blocks, u);
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int64_t rows = std::min<int64_t>(kTile, M - m0);
        tiles[rows - 1](w + G * blocks * block_bytes, blocks, a, m0, out, u);
        for (int64_t j = 0; j < rows; ++j) {
          _mm256_storeu_ps(row, out[2 * j]);
          _mm256_storeu_ps(row + 8, out[2 * j + 1]);
          float* y_row = yp + (m0 + j) * N + n0;
          for (int64_t r = 0; r < valid; ++r) y_row[r] = b ? row[r] + b[n0 + r] : row[r];
        }
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("x16_matmul_avx2", &x16_matmul_avx2,
        "float32 rows quantized to 8 bits times 16-row interleaved block-quantized weights (AVX2)",
        py::call_guard<py::gil_scoped_release>());
  // the same function for decode_f32's DecodeLayersF32, which calls it from C++
  m.attr("x16_matmul_avx2_capsule") = py::capsule((void*)&x16_matmul_avx2, "ownllm.x16_matmul_avx2");
}
