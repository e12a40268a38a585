// y = x @ w.T for a few rows of float32 activations x (M, K) and bfloat16 weights w (N, K): the decode-
// step shape, where the cost is streaming w from memory once. Each bf16 weight is widened to float32 in
// registers (a 16-bit shift) and accumulated in float32; w is read exactly once per block of 4 rows of x.
// Rows of w are split across torch's intra-op threads. An AVX-512 path (x's columns reordered so a weight line
// widens without shuffles), an AVX2+FMA path and a portable scalar path.
// moe_bf16w runs a MoE layer's chosen and shared experts (or a dense MLP) for a few tokens the same way:
// the gate and up rows of every MLP as one parallel loop, silu(gate) * up in float32, then every down row
// as another, and the routed outputs weighted and summed with the roundings of the PyTorch path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "bf16_simd.h"
#include "kernels.h"
#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KIMIVL_AVX2 1
#if defined(__AVX512F__)
#define KIMIVL_AVX512 1
#endif
#endif

namespace {

#ifdef KIMIVL_AVX2
using kimivl_simd::hsum8;

// 16 bf16 values -> two float32 vectors.
inline void widen16(const uint16_t* p, __m256& lo, __m256& hi) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
}

// R rows of w against MB rows of x; acc[r][m] holds two vectors (halves of a 16-wide step). `pf` is the
// offset (in elements) of the next block the thread will read, prefetched one cache line per row and step:
// with rows of 2-6 KB every row is its own page, where the hardware prefetcher keeps restarting (measured
// with 2 threads: 13-16 -> 17-20 GB/s on 1408-11264 x 2048 weights). 0 = nothing left to prefetch.
template <int R, int MB>
void block(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* y, int64_t ldy, int64_t pf) {
  __m256 acc[R][MB][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
  auto step = [&](int64_t k) {
    for (int r = 0; r < R; ++r) {
      __m256 lo, hi;
      widen16(w + r * K + k, lo, hi);
      for (int m = 0; m < MB; ++m) {
        acc[r][m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * ldx + k), acc[r][m][0]);
        acc[r][m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * ldx + k + 8), acc[r][m][1]);
      }
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {  // 32 bf16 = one 64-byte line per row
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + pf + r * K + k), _MM_HINT_T0);
    step(k);
    step(k + 16);
  }
  for (; k + 16 <= K; k += 16) step(k);
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) {
      float s = hsum8(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
      for (int64_t kk = k; kk < K; ++kk) s += widen(w[r * K + kk]) * x[m * ldx + kk];
      y[m * ldy + r] = s;
    }
  }
}

// R rows of w against MB = 3-4 rows of x, 8 columns per step: R * MB accumulators (8 for 2 x 4) and one
// widened weight vector per row, so each step loads R + MB vectors for R * MB FMAs (the 16-wide block<1, 4>
// loads 9 for 8 and was bound by its loads at 4+ rows).
template <int R, int MB>
void block8(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* y, int64_t ldy, int64_t pf) {
  __m256 acc[R][MB];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 31) == 0)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + pf + r * K + k), _MM_HINT_T0);
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      wv[r] = _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k))), 16));
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      float s = hsum8(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += widen(w[r * K + kk]) * x[m * ldx + kk];
      y[m * ldy + r] = s;
    }
}
#endif

#ifdef KIMIVL_AVX512
// With AVX-512 the rows of x come split (split_pairs): in every block of 32 columns the 16 even ones, then the 16
// odd ones. A 512-bit load of 32 bf16 weights then widens without a shuffle: shifted left 16 bits it is the even
// weights as float32, masked it is the odd ones; 2 integer ops per 32 weights where the AVX2 blocks spend 8 (with
// cross-lane shuffles). R = 4 weight rows against MB = 1-4 rows of x: at 2-8 rows of x the AVX2 blocks are
// bound by their FMAs and conversions (M = 8: 8.6 GB/s of weights on this Xeon's 2 cores, M = 1 28), these
// stream at the memory's rate. Columns past the last full block of 32 (in place in the split rows) are summed
// one by one.
inline int64_t split_columns(int64_t K) { return K & ~int64_t(31); }

template <int R, int MB>
void block512(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* y, int64_t ldy, int64_t pf) {
  constexpr int kOdd = R * MB < 8 ? 1 : 0;  // too few accumulators for the FMA latency: odd ones apart
  __m512 acc[R][MB][kOdd + 1];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 2
      for (int e = 0; e <= kOdd; ++e) acc[r][m][e] = _mm512_setzero_ps();
  const __m512i odd_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t K32 = split_columns(K);
  for (int64_t k = 0; k < K32; k += 32) {  // 32 bf16 = one 64-byte line per row
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + pf + r * K + k), _MM_HINT_T0);
    __m512 we[R], wo[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512i raw = _mm512_loadu_si512(w + r * K + k);
      we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
      wo[r] = _mm512_castsi512_ps(_mm512_and_si512(raw, odd_mask));
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m512 xe = _mm512_loadu_ps(x + m * ldx + k), xo = _mm512_loadu_ps(x + m * ldx + k + 16);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        acc[r][m][0] = _mm512_fmadd_ps(we[r], xe, acc[r][m][0]);
        acc[r][m][kOdd] = _mm512_fmadd_ps(wo[r], xo, acc[r][m][kOdd]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      float s = _mm512_reduce_add_ps(kOdd ? _mm512_add_ps(acc[r][m][0], acc[r][m][kOdd]) : acc[r][m][0]);
      for (int64_t kk = K32; kk < K; ++kk) s += widen(w[r * K + kk]) * x[m * ldx + kk];
      y[m * ldy + r] = s;
    }
}

template <int MB>
void rows512(const float* x, int64_t ldx, const uint16_t* w, int64_t K, int64_t nr, float* y, int64_t ldy,
             int64_t pf) {
  if (nr == 4) return block512<4, MB>(x, ldx, w, K, y, ldy, pf);
  for (int64_t r = 0; r < nr; ++r) block512<1, MB>(x, ldx, w + r * K, K, y + r, ldy, pf);
}

// nr <= 4 weight rows from w against mb <= 4 rows of (split) x, into y's columns from y.
void tile(const float* x, int64_t ldx, int64_t mb, const uint16_t* w, int64_t K, int64_t nr, float* y, int64_t ldy,
          int64_t pf) {
  if (mb == 1) rows512<1>(x, ldx, w, K, nr, y, ldy, pf);
  else if (mb == 2) rows512<2>(x, ldx, w, K, nr, y, ldy, pf);
  else if (mb == 3) rows512<3>(x, ldx, w, K, nr, y, ldy, pf);
  else rows512<4>(x, ldx, w, K, nr, y, ldy, pf);
}
#elif defined(KIMIVL_AVX2)
void tile(const float* x, int64_t ldx, int64_t mb, const uint16_t* w, int64_t K, int64_t nr, float* y, int64_t ldy,
          int64_t pf) {
  if (mb == 1 && nr == 4) {
    block<4, 1>(x, ldx, w, K, y, ldy, pf);
  } else if (mb == 2) {
    int64_t r = 0;
    for (; r + 2 <= nr; r += 2) block<2, 2>(x, ldx, w + r * K, K, y + r, ldy, pf);
    for (; r < nr; ++r) block<1, 2>(x, ldx, w + r * K, K, y + r, ldy, pf);
  } else if (mb == 1) {
    for (int64_t r = 0; r < nr; ++r) block<1, 1>(x, ldx, w + r * K, K, y + r, ldy, pf);
  } else {
    int64_t r = 0;
    for (; r + 2 <= nr; r += 2) {
      if (mb == 3) block8<2, 3>(x, ldx, w + r * K, K, y + r, ldy, pf);
      else block8<2, 4>(x, ldx, w + r * K, K, y + r, ldy, pf);
    }
    for (; r < nr; ++r) {
      if (mb == 3) block8<1, 3>(x, ldx, w + r * K, K, y + r, ldy, pf);
      else block8<1, 4>(x, ldx, w + r * K, K, y + r, ldy, pf);
    }
  }
}
#endif

void scalar_rows(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0, int64_t n1,
                 float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += widen(w[n * K + k]) * x[m * ldx + k];
      y[m * ldy + n] = s;
    }
}

void rows(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* y,
          int64_t ldy) {
#ifdef KIMIVL_AVX2
  // Blocks of 4 weight rows; every block of up to 4 activation rows runs against a weight block while it is
  // in L1, so the weights stream from memory once whatever M is (an expert's 2-8 tokens, a shared expert's 8).
  // While the first activation block runs, the next weight block is prefetched.
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nr = std::min<int64_t>(4, n1 - n);
    const int64_t ahead = n + 8 <= n1 ? 4 * K : 0;  // offset of the next full block, 0 = none
    for (int64_t m0 = 0; m0 < M; m0 += 4)
      tile(x + m0 * ldx, ldx, std::min<int64_t>(4, M - m0), w + n * K, K, nr, y + m0 * ldy + n, ldy,
           m0 == 0 ? ahead : 0);
  }
#else
  scalar_rows(x, ldx, M, w, K, n0, n1, y, ldy);
#endif
}

}  // namespace

namespace {

// In place: each row's blocks of 32 columns as their 16 even columns, then their 16 odd ones (the order rows()
// reads x in with AVX-512); columns past the last full block stay. A no-op without AVX-512.
void split_pairs(float* x, int64_t M, int64_t K) {
#ifdef KIMIVL_AVX512
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const int64_t K32 = split_columns(K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K32; k += 32) {
      float* p = x + m * K + k;
      const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
      _mm512_storeu_ps(p, _mm512_permutex2var_ps(a, even, b));
      _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(a, odd, b));
    }
#else
  (void)x, (void)M, (void)K;
#endif
}

// split_pairs undone (an int8 MLP's input: its kernel reads the columns in order). A no-op without AVX-512.
void unsplit_pairs(float* x, int64_t M, int64_t K) {
#ifdef KIMIVL_AVX512
  const int64_t K32 = split_columns(K);
  float block[32];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K32; k += 32) {
      float* p = x + m * K + k;
      for (int j = 0; j < 16; ++j) block[2 * j] = p[j], block[2 * j + 1] = p[16 + j];
      std::memcpy(p, block, sizeof(block));
    }
#else
  (void)x, (void)M, (void)K;
#endif
}

// Rows of x (..., K): the product of its leading dimensions.
int64_t leading_rows(const torch::Tensor& x) {
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  return m;
}

// Per-thread buffers keep their capacity between calls (a decode step's calls allocate nothing), except past
// 16 MB, which only a direct call with many rows reaches: that is handed back.
void trim(std::vector<float>& buf) {
  if (buf.capacity() > (size_t(4) << 20)) std::vector<float>().swap(buf);
}

// Activations as float32 rows (M, K) in the order rows() reads them, written into `buf` (converted from bf16 in
// place of a torch conversion: a decode step calls this ~20 times, and each tensor op costs a few us of dispatch).
const float* float_rows(const at::BFloat16* x, int64_t M, int64_t K, std::vector<float>& buf) {
  buf.resize(M * K);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x);
  uint32_t* dst = reinterpret_cast<uint32_t*>(buf.data());  // a bf16's bits are a float32's top half
  for (int64_t i = 0; i < M * K; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;
  split_pairs(buf.data(), M, K);
  return buf.data();
}

const float* float_rows(const torch::Tensor& x, int64_t K, std::vector<float>& buf) {
  const auto xc = x.contiguous();
  const int64_t M = leading_rows(x);
  if (xc.scalar_type() == torch::kBFloat16) return float_rows(xc.data_ptr<at::BFloat16>(), M, K, buf);
  buf.resize(M * K);
  std::memcpy(buf.data(), xc.data_ptr<float>(), M * K * sizeof(float));
  split_pairs(buf.data(), M, K);
  return buf.data();
}

// The smallest piece of output columns a thread takes (balanced_for): ~64 KB of weights, enough to amortise taking it.
int64_t column_grain(int64_t K) { return std::max<int64_t>(4, (32768 / std::max<int64_t>(K, 1)) & ~int64_t(3)); }

// v rounded to `dtype` and back (the rounding a PyTorch op in that dtype applies to its output).
inline float round_to(float v, bool bf16) { return bf16 ? static_cast<float>(c10::BFloat16(v)) : v; }

}  // namespace

void linear_bf16_rows(const at::BFloat16* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, at::BFloat16* out) {
  thread_local std::vector<float> xbuf, ybuf;  // reused: no allocation per decode-step projection
  const float* xp = float_rows(x, M, K, xbuf);
  ybuf.resize(M * N);
  float* yp = ybuf.data();
  // each task rounds its own columns to bf16 (as the float32 result's conversion would: round to nearest even)
  balanced_for(N, column_grain(K), [&](int64_t n0, int64_t n1) {
    rows(xp, K, M, w, K, n0, n1, yp, N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) out[m * N + n] = c10::BFloat16(yp[m * N + n]);
  });
  trim(xbuf);
  trim(ybuf);
}

torch::Tensor linear_bf16w(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear_bf16w: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 2, "linear_bf16w: x (..., K) and w (N, K), got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "linear_bf16w: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "linear_bf16w: w must be bfloat16, got ", w.scalar_type());
  TORCH_CHECK(x.size(-1) == w.size(1), "linear_bf16w: x has ", x.size(-1), " features, w expects ", w.size(1));
  const int64_t K = w.size(1), N = w.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N), "linear_bf16w: bias must be (", N,
              "), got ", bias.has_value() ? bias->sizes() : torch::IntArrayRef{});
  auto wc = w.contiguous();
  const int64_t M = leading_rows(x);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  if (x.scalar_type() == torch::kBFloat16 && !bias.has_value()) {
    auto out = torch::empty({M, N}, x.options());
    linear_bf16_rows(x.contiguous().data_ptr<at::BFloat16>(), M, K, wp, N, out.data_ptr<at::BFloat16>());
    return out.view(sizes);
  }
  thread_local std::vector<float> xbuf;  // reused: no allocation per decode-step projection
  const float* xp = float_rows(x, K, xbuf);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  float* yp = y.data_ptr<float>();
  balanced_for(N, column_grain(K), [&](int64_t n0, int64_t n1) { rows(xp, K, M, wp, K, n0, n1, yp, N); });
  if (bias.has_value()) y.add_(bias->to(torch::kFloat32));  // in float32, before the output's rounding
  trim(xbuf);
  return y.to(x.scalar_type()).view(sizes);
}

namespace {

// One matrix product of a segmented row space: rows [n0, n1) of w (N, K) against M rows of x -> y (M, N).
// x in the order the weight's kernel reads: split_pairs' for bf16 (rows()), natural for int8 (int8_rows()).
struct Segment {
  const float* x;
  int64_t M, K, N;
  WeightRows w;
  float* y;
};

// Rows [begin, end) of the concatenated row space of `segs` (offsets[i] = first row of segment i).
void segment_rows(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets, int64_t begin,
                  int64_t end) {
  size_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
  for (; i < segs.size() && offsets[i] < end; ++i) {
    const Segment& s = segs[i];
    const int64_t n0 = std::max<int64_t>(begin - offsets[i], 0), n1 = std::min<int64_t>(end - offsets[i], s.N);
    if (n0 >= n1) continue;
    if (s.w.int8())
      int8_rows(s.x, s.M, static_cast<const int8_t*>(s.w.data), s.K, s.w.scale, n0, n1, s.y, s.N);
    else
      rows(s.x, s.K, s.M, static_cast<const uint16_t*>(s.w.data), s.K, n0, n1, s.y, s.N);
  }
}

void run_segments(const std::vector<Segment>& segs) {
  // Each segment starts at a multiple of the loop's 16 rows, so every piece a thread takes starts at a multiple of
  // 16 inside its segment: the same blocks of 4 rows (and the same sums) whichever thread takes it.
  constexpr int64_t kGrain = 16;
  std::vector<int64_t> offsets(segs.size());
  int64_t total = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    offsets[i] = (total + kGrain - 1) / kGrain * kGrain;
    total = offsets[i] + segs[i].N;
  }
  // One parallel loop over every row of every matrix: the threads split the experts' weights between them
  // instead of each small matrix separately.
  balanced_for(total, kGrain, [&](int64_t b, int64_t e) { segment_rows(segs, offsets, b, e); });
}


}  // namespace

torch::Tensor moe_bf16w(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                        const std::vector<int64_t>& ids, const std::vector<torch::Tensor>& gate,
                        const std::vector<torch::Tensor>& up, const std::vector<torch::Tensor>& down,
                        int64_t n_shared, const std::vector<c10::optional<torch::Tensor>>& gate_scale,
                        const std::vector<c10::optional<torch::Tensor>>& up_scale,
                        const std::vector<c10::optional<torch::Tensor>>& down_scale) {
  TORCH_CHECK(x.dim() == 2, "moe_bf16w: x must be a float32 or bfloat16 (T, D) CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t D = x.size(1), P = static_cast<int64_t>(ids.size());
  TORCH_CHECK(n_shared >= 0 && static_cast<int64_t>(gate.size()) == P + n_shared && up.size() == gate.size() &&
                  down.size() == gate.size(),
              "moe_bf16w: ", P, " routed ids + ", n_shared, " shared MLPs but ", gate.size(), " gate, ", up.size(),
              " up and ", down.size(), " down weights");
  const size_t Q = gate.size();
  TORCH_CHECK((gate_scale.empty() && up_scale.empty() && down_scale.empty()) ||
                  (gate_scale.size() == Q && up_scale.size() == Q && down_scale.size() == Q),
              "moe_bf16w: scales for each of the ", Q, " MLPs' gate, up and down (None for a bf16 MLP) or none");
  std::vector<MlpRows> mlps(Q);
  for (size_t q = 0; q < Q; ++q) {
    const bool int8 = !gate_scale.empty() && gate_scale[q].has_value();
    TORCH_CHECK(gate_scale.empty() || (int8 == up_scale[q].has_value() && int8 == down_scale[q].has_value()),
                "moe_bf16w: MLP ", q, ": all three matrices int8 (with scales) or none");
    const auto dtype = int8 ? torch::kInt8 : torch::kBFloat16;
    for (const auto* w : {&gate[q], &up[q], &down[q]})
      TORCH_CHECK(w->device().is_cpu() && w->dim() == 2 && w->scalar_type() == dtype && w->is_contiguous(),
                  "moe_bf16w: MLP ", q, " weights must be contiguous ", int8 ? "int8" : "bfloat16",
                  " (N, K) CPU tensors");
    const int64_t I = gate[q].size(0);
    TORCH_CHECK(gate[q].size(1) == D && up[q].size(0) == I && up[q].size(1) == D && down[q].size(0) == D &&
                    down[q].size(1) == I,
                "moe_bf16w: MLP ", q, ": x ", x.sizes(), ", gate ", gate[q].sizes(), ", up ", up[q].sizes(), ", down ",
                down[q].sizes(), " do not agree");
    if (!int8) {
      mlps[q] = {bf16_rows(bf16_data(gate[q])), bf16_rows(bf16_data(up[q])), bf16_rows(bf16_data(down[q])), I};
      continue;
    }
    const auto scale_of = [&](const c10::optional<torch::Tensor>& s, int64_t n) {
      TORCH_CHECK(s->device().is_cpu() && s->scalar_type() == torch::kFloat32 && s->numel() == n &&
                      s->is_contiguous(),
                  "moe_bf16w: MLP ", q, ": scales must be ", n, " contiguous float32 values, got ", s->sizes());
      return s->data_ptr<float>();
    };
    mlps[q] = {{gate[q].data_ptr<int8_t>(), scale_of(gate_scale[q], I)},
               {up[q].data_ptr<int8_t>(), scale_of(up_scale[q], I)},
               {down[q].data_ptr<int8_t>(), scale_of(down_scale[q], D)}, I};
  }
  return moe_rows(x, topk_idx, topk_weight, ids, mlps, n_shared);
}

namespace {

// g = silu(g) * u over n floats: in vectors of 16 where the build has AVX512-BF16 (its exp_ps, ~2 ulp), else with
// std::exp. The scalar loop was most of moe_core's serial time (~1.5 % of a decode step's main-thread samples,
// while the other thread waited; 0.84 % with this, combine included).
void silu_mul(float* g, const float* u, int64_t n) {
  int64_t i = 0;
#ifdef KIMIVL_AVX512BF16
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    const __m512 e = kimivl_simd::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x));
    _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// The experts pass on float32 rows xp (T, D) in float_rows' order: out (T, D) in bf16 (plus `residual`, if given)
// or float32. ip / wp: (T, k) routing.
void moe_core(const float* xp, int64_t T, int64_t D, const int64_t* ip, const float* wp, int64_t k,
              const std::vector<int64_t>& ids, const std::vector<MlpRows>& mlps, int64_t n_shared, bool bf16,
              const at::BFloat16* residual, void* out) {
  const int64_t P = static_cast<int64_t>(ids.size());
  TORCH_CHECK(n_shared >= 0 && static_cast<int64_t>(mlps.size()) == P + n_shared, "moe_bf16w: ", P,
              " routed ids + ", n_shared, " shared MLPs but ", mlps.size(), " weight sets");
  const size_t Q = mlps.size();

  // Which routed MLP and which of its input rows every (token, slot) pair is, in (token, slot) order.
  std::vector<std::vector<int64_t>> members(P);
  std::vector<int64_t> slot_mlp(T * k), slot_row(T * k);
  for (int64_t i = 0; i < T * k; ++i) {
    const auto it = std::lower_bound(ids.begin(), ids.end(), ip[i]);
    TORCH_CHECK(it != ids.end() && *it == ip[i], "moe_bf16w: expert ", ip[i], " is chosen but not among the ", P,
                " ids given (sorted, unique)");
    const int64_t p = it - ids.begin();
    slot_mlp[i] = p;
    slot_row[i] = static_cast<int64_t>(members[p].size());
    members[p].push_back(i / k);
  }
  // Inputs (gathered token rows for routed MLPs, every token for shared ones), hidden and output buffers, all in
  // one reused arena (not ~3 tensors per MLP: each allocation is a few us of a decode step).
  std::vector<int64_t> rows_q(Q);
  std::vector<size_t> x_at(Q), h_at(Q), y_at(Q);
  size_t total = 0;
  for (size_t q = 0; q < Q; ++q) {
    const int64_t I = mlps[q].I;
    rows_q[q] = static_cast<int64_t>(q) < P ? static_cast<int64_t>(members[q].size()) : T;
    x_at[q] = total;
    // routed MLPs gather their tokens' rows; an int8 shared MLP copies them too (into its kernel's column order)
    total += static_cast<int64_t>(q) < P || mlps[q].gate.int8() ? rows_q[q] * D : 0;
    h_at[q] = total;
    total += 2 * rows_q[q] * I;  // gate and up outputs
    y_at[q] = total;
    total += rows_q[q] * D;
  }
  thread_local std::vector<float> arena;
  arena.resize(total);
  std::vector<const float*> xs(Q);
  std::vector<float*> y(Q);
  std::vector<Segment> first, second;
  for (size_t q = 0; q < Q; ++q) {
    const int64_t I = mlps[q].I, M = rows_q[q];
    if (static_cast<int64_t>(q) < P) {
      float* dst = arena.data() + x_at[q];
      for (int64_t r = 0; r < M; ++r) std::memcpy(dst + r * D, xp + members[q][r] * D, D * sizeof(float));
      xs[q] = dst;
    } else if (mlps[q].gate.int8()) {
      float* dst = arena.data() + x_at[q];
      std::memcpy(dst, xp, M * D * sizeof(float));
      xs[q] = dst;
    } else {
      xs[q] = xp;
    }
    if (mlps[q].gate.int8()) unsplit_pairs(const_cast<float*>(xs[q]), M, D);
    y[q] = arena.data() + y_at[q];
    float* hp = arena.data() + h_at[q];
    first.push_back({xs[q], M, D, I, mlps[q].gate, hp});
    first.push_back({xs[q], M, D, I, mlps[q].up, hp + M * I});
  }
  run_segments(first);
  for (size_t q = 0; q < Q; ++q) {
    const int64_t M = rows_q[q], I = mlps[q].I;
    float* gp = arena.data() + h_at[q];
    const float* upp = gp + M * I;
    silu_mul(gp, upp, M * I);
    if (!mlps[q].down.int8()) split_pairs(gp, M, I);  // the down projection's x, in its kernel's order
    second.push_back({gp, M, I, D, mlps[q].down, y[q]});
  }
  run_segments(second);

  // Combine as the PyTorch path rounds: each expert's output in x's dtype, weighted and summed over the
  // slots in slot order in float32, rounded; then each shared MLP's output (rounded) added and rounded.
  std::vector<float> acc(D);
  for (int64_t t = 0; t < T; ++t) {
    bool started = false;
    if (k > 0) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = t * k + j;
        const float w = wp[i];
        const float* src = y[slot_mlp[i]] + slot_row[i] * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += round_to(src[d], bf16) * w;
      }
      for (int64_t d = 0; d < D; ++d) acc[d] = round_to(acc[d], bf16);
      started = true;
    }
    for (int64_t q = P; q < static_cast<int64_t>(Q); ++q) {
      const float* src = y[q] + t * D;
      for (int64_t d = 0; d < D; ++d) {
        const float s = round_to(src[d], bf16);
        acc[d] = started ? round_to(acc[d] + s, bf16) : s;
      }
      started = true;
    }
    if (!started) std::fill(acc.begin(), acc.end(), 0.f);
    if (bf16) {
      auto* op = static_cast<at::BFloat16*>(out) + t * D;
      if (residual != nullptr) {  // h + moe(x) as the bf16 add rounds it (acc is bf16-exact here)
        const at::BFloat16* rp = residual + t * D;
        for (int64_t d = 0; d < D; ++d) op[d] = c10::BFloat16(static_cast<float>(rp[d]) + acc[d]);
      } else {
        for (int64_t d = 0; d < D; ++d) op[d] = c10::BFloat16(acc[d]);
      }
    } else {
      std::memcpy(static_cast<float*>(out) + t * D, acc.data(), D * sizeof(float));
    }
  }
  trim(arena);
}

}  // namespace

torch::Tensor moe_rows(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                       const std::vector<int64_t>& ids, const std::vector<MlpRows>& mlps, int64_t n_shared) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "moe_bf16w: x must be a float32 or bfloat16 (T, D) CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.size(0) == T && topk_idx.scalar_type() == torch::kInt64 &&
                  topk_weight.sizes() == topk_idx.sizes() && topk_weight.scalar_type() == torch::kFloat32,
              "moe_bf16w: topk_idx (T, k) int64 and topk_weight (T, k) float32 with T = ", T, ", got ",
              topk_idx.sizes(), " and ", topk_weight.sizes());
  thread_local std::vector<float> xbuf;
  const float* xp = float_rows(x, D, xbuf);
  auto idx = topk_idx.contiguous();
  auto wts = topk_weight.contiguous();
  auto out = torch::empty({T, D}, x.options());
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  moe_core(xp, T, D, idx.data_ptr<int64_t>(), wts.data_ptr<float>(), topk_idx.size(1), ids, mlps, n_shared, bf16,
           nullptr, out.data_ptr());
  trim(xbuf);
  return out;
}

void moe_rows_bf16(const at::BFloat16* x, int64_t T, int64_t D, const int64_t* topk_idx, const float* topk_weight,
                   int64_t k, const std::vector<int64_t>& ids, const std::vector<MlpRows>& mlps, int64_t n_shared,
                   const at::BFloat16* residual, at::BFloat16* out) {
  thread_local std::vector<float> xbuf;
  moe_core(float_rows(x, T, D, xbuf), T, D, topk_idx, topk_weight, k, ids, mlps, n_shared, true, residual, out);
  trim(xbuf);
}

bool has_avx2() {
#ifdef KIMIVL_AVX2
  return true;
#else
  return false;
#endif
}
