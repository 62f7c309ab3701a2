// Matrix products for decode on x86 CPUs with AVX2: a few rows of activations against weights held in a
// compact form, each weight read from memory once per product. See kernels/compiled.py for why they exist.
//
// Weight forms (blocks of 32 input channels, as GGUF's Q8_0 and Q4_1; scales stored as float16):
//   q8_0:  w = d * q,      q int8 in -127..127            q [out, in] int8,       d [out, in / 32] f16
//   q4_1:  w = d * q + m,  q in 0..15, two to a byte:     q [out, in / 2] uint8,  d, m [out, in / group] f16
//          (group: 32, as Q4_1, or a multiple of 32 sharing d and m); byte i of each 32 values' 16 bytes
//          holds value i in its low nibble and value i + 16 in its high one
//   bf16:  w as stored                                    w [out, in] bf16
//   f32:   w as stored                                    w [out, in] float32
// For q8_0 and q4_1 the activations are quantized too, per row and block of 32 (x = dx * qx, qx int8), so
// a block's dot product is one run of integer multiply-adds and one float multiply: sum(w x) = dw dx
// sum(q qx) (+ m dx sum(qx) for q4_1).
//
// Every output element is one row of x against one row of W, summed in an order fixed by `in` alone, so a
// row's result does not depend on the other rows or on how the output is split among threads (exact mode).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;
constexpr int64_t GRAIN = 16;  // output rows: at::parallel_for splits the rest evenly among the threads
// Weights are read once, in order, so each 64-byte line is asked for PREFETCH bytes ahead of its use. On the
// AVX2 machine this was never slower and sometimes faster than the hardware prefetcher alone, within that
// shared machine's noise (none, 2, 4 and 8 KB ahead and the T1 / NTA hints measured alike).
constexpr int64_t PREFETCH = 4096;

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p) + PREFETCH, _MM_HINT_T0); }

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// Activations, quantized per row and block: qx [rows, in] int8, dx and sx [rows, in / 32] (sx = dx sum(qx)).
struct QuantizedActivations {
  std::vector<int8_t> q;
  std::vector<float> d, s;
};

// One block of 32 floats -> 32 int8 (round to nearest, scale max|x| / 127), its scale and dx * sum(qx).
inline void quantize_block(const float* x, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int k = 0; k < 4; ++k) {
    v[k] = _mm256_loadu_ps(x + 8 * k);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float max_abs = _mm_cvtss_f32(m);
  const float scale = max_abs / 127.0f;
  const __m256 inverse = _mm256_set1_ps(max_abs > 0.0f ? 127.0f / max_abs : 0.0f);
  __m256i i[4];
  for (int k = 0; k < 4; ++k) i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inverse));  // nearest, ties to even
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
  // Narrow 4 x 8 int32 to 32 int8: the packs work within 128-bit lanes, so the result is put back in order.
  __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed);
  *d = scale;
  *s = scale * static_cast<float>(sum8(_mm256_cvtepi32_ps(total)));
}

QuantizedActivations quantize_activations(const float* x, int64_t rows, int64_t in) {
  const int64_t blocks = in / BLOCK;
  QuantizedActivations a{std::vector<int8_t>(rows * in), std::vector<float>(rows * blocks),
                         std::vector<float>(rows * blocks)};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i = r * blocks + b;
      quantize_block(x + r * in + b * BLOCK, a.q.data() + i * BLOCK, &a.d[i], &a.s[i]);
    }
  return a;
}

// sum over 32 lanes of a[i] * b[i], a and b int8, as 8 float partial sums (exact: at most 32 * 127 * 127).
inline __m256 dot_block_s8(__m256i a, __m256i b) {
  // maddubs multiplies unsigned by signed bytes: move a's signs onto b.
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// The same for 16 bytes of packed nibbles (0..15; value i low in byte i, value i + 16 high) against int8.
inline __m256 dot_block_u4(const uint8_t* packed, __m256i b) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed));
  const __m128i mask = _mm_set1_epi8(15);
  const __m256i a = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
}

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// The four accumulator chains of a dot product (they hide the multiply-add latency), summed in a fixed order.
inline float sum_chains(const __m256 acc[4]) {
  return sum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

inline __m256 load8_half(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Blocks go 8 at a time (their 8 scales d * dx made at once, then broadcast one by one) over four chains, the
// rest one at a time; the order is fixed by `in`.
float dot_q8_0(const int8_t* w, const uint16_t* dw, const int8_t* x, const float* dx, int64_t blocks) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  alignas(32) float scales[8];
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    for (int line = 0; line < 4; ++line) prefetch(w + b * BLOCK + 64 * line);  // 8 blocks: 256 bytes
    _mm256_store_ps(scales, _mm256_mul_ps(load8_half(dw + b), _mm256_loadu_ps(dx + b)));
    for (int k = 0; k < 8; ++k)
      acc[k % 4] = _mm256_fmadd_ps(_mm256_broadcast_ss(scales + k),
                                   dot_block_s8(load32(x + (b + k) * BLOCK), load32(w + (b + k) * BLOCK)), acc[k % 4]);
  }
  for (; b < blocks; ++b)
    acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(dw[b]) * dx[b]),
                             dot_block_s8(load32(x + b * BLOCK), load32(w + b * BLOCK)), acc[0]);
  return sum_chains(acc);
}

// Two blocks' nibbles (32 bytes: block b's 16, then block b + 1's) against their activations laid out as
// xp = [x_b 0..15, x_b+1 0..15, x_b 16..31, x_b+1 16..31]: one load and one shift unpack both blocks, and
// the 8 partial sums come out as lanes 0-3 for block b, 4-7 for block b + 1 (scales: s_b x4, s_b+1 x4).
inline __m256 dot_pair_u4(const uint8_t* packed, const int8_t* xp, __m256 scales, __m256 acc) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed));
  const __m256i mask = _mm256_set1_epi8(15);
  const __m256i low = _mm256_and_si256(bytes, mask), high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
  // pair sums of 15 * 127 at most: two of them add within int16
  const __m256i sums = _mm256_add_epi16(_mm256_maddubs_epi16(low, load32(xp)), _mm256_maddubs_epi16(high, load32(xp + 32)));
  return _mm256_fmadd_ps(scales, _mm256_cvtepi32_ps(_mm256_madd_epi16(sums, _mm256_set1_epi16(1))), acc);
}

// x's blocks re-laid in pairs for dot_pair_u4, for the first (blocks / 8) * 8 blocks of a row.
void pair_activations(const int8_t* x, int64_t blocks, int8_t* xp) {
  for (int64_t b = 0; b < blocks / 8 * 8; b += 2) {
    const int8_t* first = x + b * BLOCK;
    const int8_t* second = first + BLOCK;
    int8_t* out = xp + b * BLOCK;
    std::memcpy(out, first, 16);
    std::memcpy(out + 16, second, 16);
    std::memcpy(out + 32, first + 16, 16);
    std::memcpy(out + 48, second + 16, 16);
  }
}

// 2^shift blocks of 32 share one d and m (a group); sxg [groups]: dx * sum(qx) over each group's blocks.
// Blocks go 8 at a time as four pairs (four chains), the rest one at a time; the order is fixed by `in`.
float dot_q4_1(const uint8_t* w, const uint16_t* dw, const uint16_t* mw, int shift, int64_t groups, const int8_t* x,
               const int8_t* xp, const float* dx, const float* sxg, int64_t blocks) {
  auto scale8 = [&](int64_t b) {
    if (shift == 0) return _mm256_mul_ps(load8_half(dw + b), _mm256_loadu_ps(dx + b));
    alignas(32) float d[8];
    for (int k = 0; k < 8; ++k) d[k] = half_to_float(dw[(b + k) >> shift]);
    return _mm256_mul_ps(_mm256_load_ps(d), _mm256_loadu_ps(dx + b));
  };
  const __m256i pair[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                           _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    prefetch(w + b * BLOCK / 2);
    prefetch(w + b * BLOCK / 2 + 64);
    const __m256 scales = scale8(b);
    for (int k = 0; k < 4; ++k)
      acc[k] = dot_pair_u4(w + (b + 2 * k) * BLOCK / 2, xp + (b + 2 * k) * BLOCK,
                           _mm256_permutevar8x32_ps(scales, pair[k]), acc[k]);
  }
  for (; b < blocks; ++b)
    acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(dw[b >> shift]) * dx[b]),
                             dot_block_u4(w + b * BLOCK / 2, load32(x + b * BLOCK)), acc[0]);
  const float products = sum_chains(acc);
  __m256 minimum = _mm256_setzero_ps();  // the minimums: sum over groups of m * dx * sum(qx)
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8) minimum = _mm256_fmadd_ps(load8_half(mw + g), _mm256_loadu_ps(sxg + g), minimum);
  float minimums = sum8(minimum);
  for (; g < groups; ++g) minimums += half_to_float(mw[g]) * sxg[g];
  return products + minimums;
}

inline __m256 load8_bf16(const uint16_t* p) {  // bf16 is float32's upper half
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// A row of bf16 or float32 weights against a float32 row: four chains of 8 lanes over 32 values a step.
template <typename W, typename Load8>
float dot_float(const W* w, const float* x, int64_t n, Load8 load8, float (*one)(W)) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int64_t line = 0; line < 32 * static_cast<int64_t>(sizeof(W)); line += 64) prefetch(w + i + line / sizeof(W));
    for (int k = 0; k < 4; ++k) acc[k] = _mm256_fmadd_ps(load8(w + i + 8 * k), _mm256_loadu_ps(x + i + 8 * k), acc[k]);
  }
  float total = sum_chains(acc);
  for (; i < n; ++i) total += one(w[i]) * x[i];
  return total;
}

float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float same(float f) { return f; }

// y[r, j] = dot(row r of x, row j of W) for every r, j; threads split the output rows j, so each reads its
// share of W once, the x rows staying in cache.
template <typename Dot>
at::Tensor product(const at::Tensor& x, int64_t out, Dot dot) {
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out}, x.options().dtype(at::kFloat));
  float* py = y.data_ptr<float>();
  at::parallel_for(0, out, GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      for (int64_t r = 0; r < rows; ++r) py[r * out + j] = dot(r, j);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

void check_input(const at::Tensor& x, const at::Tensor& w, int64_t in, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, name, ": x must be [rows, ", in, "]");
  TORCH_CHECK(w.is_contiguous(), name, ": the weight must be contiguous");
  TORCH_CHECK(in % BLOCK == 0 || w.is_floating_point(), name, ": in_features must be a multiple of 32");
}

at::Tensor linear_q8_0(const at::Tensor& x_, const at::Tensor& q, const at::Tensor& d) {
  const int64_t out = q.size(0), in = q.size(1), blocks = in / BLOCK;
  check_input(x_, q, in, "linear_q8_0");
  const at::Tensor x = x_.to(at::kFloat).contiguous();
  const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), x.size(0), in);
  const int8_t* pq = q.data_ptr<int8_t>();
  const uint16_t* pd = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  return product(x_, out, [&](int64_t r, int64_t j) {
    return dot_q8_0(pq + j * in, pd + j * blocks, a.q.data() + r * in, a.d.data() + r * blocks, blocks);
  });
}

at::Tensor linear_q4_1(const at::Tensor& x_, const at::Tensor& q, const at::Tensor& d, const at::Tensor& m) {
  const int64_t out = q.size(0), in = 2 * q.size(1), blocks = in / BLOCK, groups = d.size(1);
  check_input(x_, q, in, "linear_q4_1");
  TORCH_CHECK(groups > 0 && blocks % groups == 0 && d.sizes() == m.sizes(), "linear_q4_1: d, m must be [out, in / group]");
  int shift = 0;
  while ((groups << shift) < blocks) ++shift;
  TORCH_CHECK((groups << shift) == blocks, "linear_q4_1: a group must be 32 times a power of two input channels");
  const at::Tensor x = x_.to(at::kFloat).contiguous();
  const QuantizedActivations a = quantize_activations(x.data_ptr<float>(), x.size(0), in);
  std::vector<float> sxg(x.size(0) * groups, 0.0f);  // [rows, groups]
  for (int64_t r = 0; r < x.size(0); ++r)
    for (int64_t b = 0; b < blocks; ++b) sxg[r * groups + (b >> shift)] += a.s[r * blocks + b];
  std::vector<int8_t> paired(x.size(0) * in);  // [rows, in]: each row's blocks laid out in pairs
  for (int64_t r = 0; r < x.size(0); ++r) pair_activations(a.q.data() + r * in, blocks, paired.data() + r * in);
  const uint8_t* pq = q.data_ptr<uint8_t>();
  const uint16_t* pd = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* pm = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  return product(x_, out, [&](int64_t r, int64_t j) {
    return dot_q4_1(pq + j * in / 2, pd + j * groups, pm + j * groups, shift, groups, a.q.data() + r * in,
                    paired.data() + r * in, a.d.data() + r * blocks, sxg.data() + r * groups, blocks);
  });
}

at::Tensor linear_bf16(const at::Tensor& x_, const at::Tensor& w) {
  const int64_t out = w.size(0), in = w.size(1);
  check_input(x_, w, in, "linear_bf16");
  const at::Tensor x = x_.to(at::kFloat).contiguous();
  const float* px = x.data_ptr<float>();
  const uint16_t* pw = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  return product(x_, out, [&](int64_t r, int64_t j) {
    return dot_float(pw + j * in, px + r * in, in, [](const uint16_t* p) { return load8_bf16(p); }, bf16_to_float);
  });
}

at::Tensor linear_f32(const at::Tensor& x_, const at::Tensor& w) {
  const int64_t out = w.size(0), in = w.size(1);
  check_input(x_, w, in, "linear_f32");
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "linear_f32: x and w must be float32");
  const at::Tensor x = x_.contiguous();
  const float* px = x.data_ptr<float>();
  const float* pw = w.data_ptr<float>();
  return product(x_, out, [&](int64_t r, int64_t j) {
    return dot_float(pw + j * in, px + r * in, in, [](const float* p) { return _mm256_loadu_ps(p); }, same);
  });
}

}  // namespace

TORCH_LIBRARY(minillm, m) {
  m.def("linear_q8_0(Tensor x, Tensor q, Tensor d) -> Tensor");
  m.def("linear_q4_1(Tensor x, Tensor q, Tensor d, Tensor m) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(minillm, CPU, m) {
  m.impl("linear_q8_0", linear_q8_0);
  m.impl("linear_q4_1", linear_q4_1);
  m.impl("linear_bf16", linear_bf16);
  m.impl("linear_f32", linear_f32);
}
