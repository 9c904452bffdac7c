// 4-bit weights (GGUF Q4_0 / Q4_1 groups of 32) times bf16 activation rows, float32 accumulation.
// Every output element is computed the same way whatever the number of rows, so a prompt gives the
// same numbers in one piece, in chunks, or after a prefix-cache hit (a dequantize-then-oneDNN path
// for long batches would round the weights to bf16 and break that).
//
// Layout, per output row n: codes [K / 2] bytes, group g in bytes 16g..16g+15 with element j in the
// low nibble of byte j and element j + 16 in the high nibble (GGUF's own order); scales and mins
// [K / 32] float32, w = scale * (128 + code) + min. Each row's codes are read once per 4 activation
// rows, from L1 after the first (blocks of 64 weight rows). A nibble v OR'ed
// into the bf16 pattern 0x4300 is exactly the bf16 number 128 + v (one instruction per 32 codes), so
// the AVX-512 BF16 dot products (float32 accumulation, one scale multiply per group) compute
// sum scale * (128 + v) * x; the mins (the file's minimum less 128 scales) contribute
// sum_g min_g * sum(x over g), from per-group activation sums computed once per call.
#include <immintrin.h>
#include "torch_lite.h"

#include <vector>

#include "bf16_tile.h"

namespace {

using bf16 = at::BFloat16;
constexpr int64_t kRowBlock = 64;  // weight rows whose codes stay in L1 while every activation row passes

// Activations rearranged for two groups at a time: for pair p, 32 values x[64p + 0..15] then
// x[64p + 32..47] (the low nibbles' partners), then x[64p + 16..31], x[64p + 48..63]; a last odd group as is.
void pair_layout(const bf16* x, bf16* out, int64_t K) {
  const int64_t pairs = K / 64;
  for (int64_t p = 0; p < pairs; ++p)
    for (int64_t j = 0; j < 16; ++j) {
      out[64 * p + j] = x[64 * p + j];
      out[64 * p + 16 + j] = x[64 * p + 32 + j];
      out[64 * p + 32 + j] = x[64 * p + 16 + j];
      out[64 * p + 48 + j] = x[64 * p + 48 + j];
    }
  for (int64_t k = pairs * 64; k < K; ++k) out[k] = x[k];
}

template <int M>
void row(const bf16* const* xs, const float* const* xsums, const uint8_t* codes, const float* scales,
         const float* mins, const bf16* bias, bf16* y, int64_t K, int64_t N, int64_t n) {
  const int64_t groups = K / 32, pairs = K / 64;
  const uint8_t* c = codes + n * (K / 2);
  const float* s = scales + n * groups;
  const float* mn = mins + n * groups;
  const __m512i mask = _mm512_set1_epi16(0x0F), biased = _mm512_set1_epi16(0x4300);  // bf16(128)
  const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  // two accumulator chains per row (even and odd pairs): the fma latency, not its throughput, binds
  __m512 acc0[M], acc1[M];
  for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  auto pair = [&](int64_t p, __m512* acc) {
    const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(c + 32 * p)));
    const __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(bytes, mask, biased, 0xEA);  // (bytes & mask) | biased
    const __m512bh hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(bytes, 4), biased);
    const __m512 scale = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double*)(s + 2 * p)))));
    for (int m = 0; m < M; ++m) {
      const bf16* x = xs[m] + 64 * p;
      __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(x));
      dot = _mm512_dpbf16_ps(dot, hi, (__m512bh)_mm512_loadu_si512(x + 32));
      acc[m] = _mm512_fmadd_ps(dot, scale, acc[m]);
    }
  };
  int64_t p = 0;
  for (; p + 2 <= pairs; p += 2) {
    pair(p, acc0);
    pair(p + 1, acc1);
  }
  if (p < pairs) pair(p, acc0);
  if (groups % 2) {  // the odd last group: 16 bytes
    const int64_t g = groups - 1;
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(c + 16 * g)));
    const __m512i codes16 = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_and_si256(bytes, _mm256_set1_epi16(0x0F))), _mm256_srli_epi16(bytes, 4), 1);
    const __m512bh w = (__m512bh)_mm512_or_si512(codes16, biased);
    for (int m = 0; m < M; ++m) {
      const __m512 dot = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, (__m512bh)_mm512_loadu_si512(xs[m] + 32 * g));
      acc0[m] = _mm512_fmadd_ps(dot, _mm512_set1_ps(s[g]), acc0[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 offsets = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
      const __mmask16 valid = groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
      offsets = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(valid, mn + g), _mm512_maskz_loadu_ps(valid, xsums[m] + g), offsets);
    }
    const float b = bias ? static_cast<float>(bias[n]) : 0.f;
    y[m * N + n] = bf16(_mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m])) + _mm512_reduce_add_ps(offsets) + b);
  }
}

using RowFn = void (*)(const bf16* const*, const float* const*, const uint8_t*, const float*, const float*,
                       const bf16*, bf16*, int64_t, int64_t, int64_t);
constexpr int kRowsAtOnce = 4;  // activation rows per pass over a weight row (two accumulators each)
constexpr RowFn kRow[kRowsAtOnce] = {&row<1>, &row<2>, &row<3>, &row<4>};

void check(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2 && codes.is_contiguous(), "codes: [N, K / 2] uint8");
  TORCH_CHECK(codes.size(1) % 16 == 0, "K must be a multiple of 32");
  for (const auto* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->size(0) == codes.size(0) &&
                    t->size(1) == codes.size(1) / 16, "scales and mins: [N, K / 32] float32");
}

}  // namespace

// x: [M, K] bf16 -> [M, N] bf16.
at::Tensor int4_matmul(at::Tensor x, at::Tensor codes, at::Tensor scales, at::Tensor mins,
                          c10::optional<at::Tensor> bias) {
  check(codes, scales, mins);
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(1) == 2 * codes.size(1), "x: [M, K] bf16");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), groups = K / 32;
  auto arranged = at::empty({M, K}, x.options());
  auto sums = at::empty({M, groups}, x.options().dtype(at::kFloat));
  const bf16* xp = x.data_ptr<bf16>();
  bf16* ap = arranged.data_ptr<bf16>();
  float* sp = sums.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      pair_layout(xp + m * K, ap + m * K, K);
      for (int64_t g = 0; g < groups; ++g) {
        float total = 0.f;
        for (int64_t j = 0; j < 32; ++j) total += static_cast<float>(xp[m * K + 32 * g + j]);
        sp[m * groups + g] = total;
      }
    }
  });
  std::vector<const bf16*> xs(M);
  std::vector<const float*> xsums(M);
  for (int64_t m = 0; m < M; ++m) xs[m] = ap + m * K, xsums[m] = sp + m * groups;
  const at::Tensor bias_c = bf16mm::bf16_bias(bias);
  const bf16* b = bias_c.defined() ? bias_c.data_ptr<bf16>() : nullptr;
  auto y = at::empty({M, N}, x.options());
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  const float* mn = mins.data_ptr<float>();
  bf16* yp = y.data_ptr<bf16>();
  at::parallel_for(0, N, kRowBlock, [&](int64_t n0, int64_t n1) {
    for (int64_t block = n0; block < n1; block += kRowBlock)
      for (int64_t m0 = 0; m0 < M; m0 += kRowsAtOnce)
        for (int64_t n = block; n < std::min(n1, block + kRowBlock); ++n)
          kRow[std::min<int64_t>(kRowsAtOnce, M - m0) - 1](xs.data() + m0, xsums.data() + m0, c, s, mn, b, yp + m0 * N, K, N, n);
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_matmul", &int4_matmul, "bf16 rows times 4-bit weights", py::call_guard<py::gil_scoped_release>());
}
