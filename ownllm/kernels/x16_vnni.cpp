// 32-weight block formats (GGUF Q4_0, Q4_1, Q8_0) times bf16 activation rows the way llama.cpp multiplies them
// (its Q4_1 x Q8_1 dot products): the activations quantized to 8 bits per block of 32 once per call
// (q8_activations.h, Q8_1: codes, d, and d times the codes' sum), then integer dot products of the weights'
// codes, unsigned, with the activations' codes, signed (AVX-512 VNNI vpdpbusd), with each block's scale and
// offset applied once per block in float32: w = scale c + offset for the unsigned code c, so
//   x . w = d_x scale (c . q_x) + offset d_x sum(q_x).
// It differs from float math on the weights only by the activations' rounding (|x - d q| <= d / 2 per value).
//
// Weights are repacked at load (layers/quant.py), 16 rows interleaved: per group of 16 weight rows (n = 16 G + r)
// and block g of 32 weights, the codes, then float scale[r] (64 bytes), then float offset[r] (64 bytes):
//   Q4 (Q4_0 and Q4_1, 384 bytes): 4 vectors of 64 bytes; in vector i, int32 lane r holds row r's code bytes
//      4i..4i+3 of the file block (weights 4i..4i+3 in the low nibbles, 16 + 4i..16 + 4i + 3 in the high ones);
//      c = the file's code, offset = -8 d (Q4_0) or m (Q4_1): the same bytes per weight as the file's codes with
//      float32 scales;
//   Q8 (Q8_0, 640 bytes): 8 vectors of 64 bytes; in vector k, int32 lane r holds row r's codes 4k..4k+3 + 128
//      (as uint8); offset = -128 d.
// So one broadcast of 4 activation codes meets 16 rows' codes in one vpdpbusd, each lane's int32 sum is one
// row's (no reduction across lanes), and the float epilogue of a block runs once for 16 rows.
//
// Threads take contiguous ranges of 16-row groups; in each, tiles of up to kTile activation rows pass over the
// group's codes (unpacked into registers once per block per tile; the group's blocks stay in L1). Every
// activation row gets the same operations in the same order whatever the batch and its place in a tile, so a
// row's numbers do not depend on what else shares its call.
#include <immintrin.h>
#include "torch_lite.h"

#include <cstring>

#include "q8_activations.h"

namespace {

using bf16 = at::BFloat16;
using Q8_1 = q8_activations::Activations<32, true>;
constexpr int64_t kRows = 16;  // weight rows interleaved
constexpr int kTile = 8;       // activation rows per pass over a group's codes

// The formats' codes: codes[k] (unsigned) meets activation codes 4k..4k+3 of the block.
struct Q4 {
  static constexpr int64_t kCodeBytes = 256;
  static void codes(const uint8_t* p, __m512i* codes) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < 4; ++i) {
      const __m512i v = _mm512_loadu_si512(p + 64 * i);
      codes[i] = _mm512_and_si512(v, nibble);
      codes[4 + i] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
    }
  }
};

struct Q8 {
  static constexpr int64_t kCodeBytes = 512;
  static void codes(const uint8_t* p, __m512i* codes) {
    for (int k = 0; k < 8; ++k) codes[k] = _mm512_loadu_si512(p + 64 * k);
  }
};

inline __m512i broadcast4(const int8_t* x) {
  int32_t word;
  std::memcpy(&word, x, sizeof(word));
  return _mm512_set1_epi32(word);
}

// out[j][r] = activation row m0 + j times weight row 16 G + r, for the group at `group`
template <class Format, int R>
void tile(const uint8_t* group, int64_t blocks, const Q8_1& a, int64_t m0, __m512* out) {
  constexpr int64_t kBlockBytes = Format::kCodeBytes + 128;
  __m512 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < blocks; ++g) {
    const uint8_t* p = group + g * kBlockBytes;
    __m512i codes[8];
    Format::codes(p, codes);
    const __m512 scale = _mm512_loadu_ps((const float*)(p + Format::kCodeBytes));
    const __m512 offset = _mm512_loadu_ps((const float*)(p + Format::kCodeBytes + 64));
    for (int j = 0; j < R; ++j) {
      const int64_t m = m0 + j;
      const int8_t* x = a.codes(m) + 32 * g;
      __m512i low = _mm512_setzero_si512(), high = _mm512_setzero_si512();  // two chains: weights 0-15, 16-31
      for (int k = 0; k < 4; ++k) {
        low = _mm512_dpbusd_epi32(low, codes[k], broadcast4(x + 4 * k));
        high = _mm512_dpbusd_epi32(high, codes[4 + k], broadcast4(x + 16 + 4 * k));
      }
      const float dx = a.d[m * blocks + g];
      const __m512 sum = _mm512_cvtepi32_ps(_mm512_add_epi32(low, high));
      acc[j] = _mm512_fmadd_ps(sum, _mm512_mul_ps(scale, _mm512_set1_ps(dx)), acc[j]);
      acc[j] = _mm512_fmadd_ps(offset, _mm512_set1_ps(a.dsum[m * blocks + g]), acc[j]);
    }
  }
  for (int j = 0; j < R; ++j) out[j] = acc[j];
}

using Tile = void (*)(const uint8_t*, int64_t, const Q8_1&, int64_t, __m512*);
template <class Format>
constexpr Tile kTiles[kTile] = {tile<Format, 1>, tile<Format, 2>, tile<Format, 3>, tile<Format, 4>,
                                tile<Format, 5>, tile<Format, 6>, tile<Format, 7>, tile<Format, 8>};

// GGUF's type numbers (ggml_type) of the formats above.
enum Type : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };

}  // namespace

// x: [M, K] bf16 (any M); packed: [ceil(N / 16), K / 32 * block bytes] uint8, the layout above of GGUF type
// `type` (Q4_0, Q4_1: the Q4 layout; Q8_0: Q8) -> [M, N] bf16.
at::Tensor x16_matmul(at::Tensor x, at::Tensor packed, int64_t N, int64_t type, c10::optional<at::Tensor> bias) {
  TORCH_CHECK(type == kQ4_0 || type == kQ4_1 || type == kQ8_0, "x16_matmul: GGUF type ", type, " is not Q4_0, Q4_1 or Q8_0");
  const bool q8 = type == kQ8_0;
  const int64_t kBlockBytes = (q8 ? Q8::kCodeBytes : Q4::kCodeBytes) + 128;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous() &&
              packed.size(1) % kBlockBytes == 0 && packed.size(0) == (N + kRows - 1) / kRows,
              "x16_matmul: packed [ceil(N / 16), K / 32 * ", kBlockBytes, "] uint8, contiguous, N = ", N);
  const int64_t blocks = packed.size(1) / kBlockBytes, K = 32 * blocks, M = x.size(0);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == K, "x: [M, K] bf16, K = ", K);
  x = x.contiguous();
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) bias_c = bias->to(at::kBFloat16).contiguous();
  const bf16* b = bias_c.defined() ? bias_c.data_ptr<bf16>() : nullptr;
  auto y = at::empty({M, N}, x.options());
  const Q8_1 a(x.data_ptr<bf16>(), M, K);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  bf16* yp = y.data_ptr<bf16>();
  const Tile* tiles = q8 ? kTiles<Q8> : kTiles<Q4>;
  at::parallel_for(0, packed.size(0), 1, [&](int64_t g0, int64_t g1) {
    __m512 out[kTile];
    for (int64_t G = g0; G < g1; ++G) {
      const int64_t n0 = G * kRows;
      const __mmask16 valid = N - n0 >= kRows ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n0)) - 1);
      const __m512 bias16 = b ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                    _mm256_maskz_loadu_epi16(valid, b + n0)), 16))
                              : _mm512_setzero_ps();
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int64_t rows = std::min<int64_t>(kTile, M - m0);
        tiles[rows - 1](w + G * blocks * kBlockBytes, blocks, a, m0, out);
        for (int64_t j = 0; j < rows; ++j)
          _mm256_mask_storeu_epi16(yp + (m0 + j) * N + n0, valid, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(out[j], bias16)));
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("x16_matmul", &x16_matmul, "bf16 rows quantized to 8 bits times 16-row interleaved Q4_0 / Q4_1 / Q8_0 weights (AVX-512 VNNI)",
        py::call_guard<py::gil_scoped_release>());
}
