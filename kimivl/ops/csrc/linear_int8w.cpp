// y = (x @ q.T) * scale (+ bias) for a few rows of activations x (M, K) and int8 weights q (N, K) with one float32
// scale per output row (symmetric, per channel: kimivl.quantization.int8): the decode-step shape of an int8
// model, where the cost is streaming q from memory once, half the bytes of bf16. Each int8 weight is widened to
// float32 in registers (sign-extended, converted) and accumulated in float32 against float32 activations; the
// row's scale multiplies the sum once. Rows of q are split across torch's intra-op threads as they free up.
// An AVX2+FMA path (also what an AVX-512 CPU runs: it streams at the memory's rate there too) and a portable
// scalar one.
#include <torch/extension.h>
#include "bf16_simd.h"
#include "kernels.h"
#include "parallel.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KIMIVL_I8_AVX2 1
#endif

namespace {

#ifdef KIMIVL_I8_AVX2
using kimivl_simd::hsum8;

// 8 int8 weights at p as float32.
inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// R rows of q against MB rows of x, 16 columns a step in two halves (2 * R * MB independent FMA chains). `pf` is the
// offset (in elements) of the block the thread reads next, prefetched one line per row and 64 columns (each row of
// 1-11 KB is its own page for the hardware prefetcher, as in linear_bf16w.cpp); 0 = none.
template <int R, int MB>
void block(const float* x, int64_t ldx, const int8_t* q, int64_t K, const float* scale, float* y, int64_t ldy,
           int64_t pf) {
  __m256 acc[R][MB][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    if ((k & 63) == 0 && pf)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + pf + r * K + k), _MM_HINT_T0);
    for (int r = 0; r < R; ++r) {
      const __m256 lo = widen8(q + r * K + k), hi = widen8(q + r * K + k + 8);
      for (int m = 0; m < MB; ++m) {
        acc[r][m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * ldx + k), acc[r][m][0]);
        acc[r][m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * ldx + k + 8), acc[r][m][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) {
      float s = hsum8(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(q[r * K + kk]) * x[m * ldx + kk];
      y[m * ldy + r] = s * scale[r];
    }
}

// R rows of q against 2 rows of x, 8 columns a step: 2 * R accumulators, and x read once per R weight rows (a
// block per row of q would re-read every x row per weight row, from L2 once x outgrows L1: 7 GB/s at 4 rows).
template <int R>
void block_pair(const float* x, int64_t ldx, const int8_t* q, int64_t K, const float* scale, float* y, int64_t ldy,
                int64_t pf) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 63) == 0 && pf)
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + pf + r * K + k), _MM_HINT_T0);
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + ldx + k);
    for (int r = 0; r < R; ++r) {
      const __m256 w = widen8(q + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(w, x0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w, x1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < 2; ++m) {
      float s = hsum8(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(q[r * K + kk]) * x[m * ldx + kk];
      y[m * ldy + r] = s * scale[r];
    }
}

// nr <= 4 rows of q against mb <= 2 rows of x.
void tile(const float* x, int64_t ldx, int64_t mb, const int8_t* q, int64_t K, int64_t nr, const float* scale,
          float* y, int64_t ldy, int64_t pf) {
  if (mb == 1) {
    if (nr == 4) return block<4, 1>(x, ldx, q, K, scale, y, ldy, pf);
    for (int64_t r = 0; r < nr; ++r) block<1, 1>(x, ldx, q + r * K, K, scale + r, y + r, ldy, pf);
  } else {
    if (nr == 4) return block_pair<4>(x, ldx, q, K, scale, y, ldy, pf);
    for (int64_t r = 0; r < nr; ++r) block_pair<1>(x, ldx, q + r * K, K, scale + r, y + r, ldy, pf);
  }
}
#endif

}  // namespace

// Rows [n0, n1) of q against the M rows of x.
void int8_rows(const float* x, int64_t M, const int8_t* q, int64_t K, const float* scale, int64_t n0, int64_t n1,
               float* y, int64_t ldy) {
#ifdef KIMIVL_I8_AVX2
  // blocks of 4 weight rows; every pair of activation rows runs against a weight block while it is in L1
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t nr = std::min<int64_t>(4, n1 - n);
    const int64_t ahead = n + 8 <= n1 ? 4 * K : 0;
    for (int64_t m0 = 0; m0 < M; m0 += 2)
      tile(x + m0 * K, K, std::min<int64_t>(2, M - m0), q + n * K, K, nr, scale + n, y + m0 * ldy + n, ldy,
           m0 == 0 ? ahead : 0);
  }
#else
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += static_cast<float>(q[n * K + k]) * x[m * K + k];
      y[m * ldy + n] = s * scale[n];
    }
#endif
}

namespace {
// pieces of ~64 KB of weights, starting at multiples of 4 rows: the same blocks whichever thread takes them
int64_t int8_grain(int64_t K) { return std::max<int64_t>(4, (65536 / std::max<int64_t>(K, 1)) & ~int64_t(3)); }
}  // namespace

void linear_rows(const at::BFloat16* x, int64_t M, int64_t K, const WeightRows& w, int64_t N, at::BFloat16* out) {
  if (!w.int8()) return linear_bf16_rows(x, M, K, static_cast<const uint16_t*>(w.data), N, out);
  thread_local std::vector<float> xbuf, ybuf;  // reused: no allocation per decode-step projection
  xbuf.resize(M * K);
  ybuf.resize(M * N);
  for (int64_t i = 0; i < M * K; ++i) xbuf[i] = widen(x[i]);
  const float* xp = xbuf.data();
  float* yp = ybuf.data();
  const int8_t* q = static_cast<const int8_t*>(w.data);
  balanced_for(N, int8_grain(K), [&](int64_t n0, int64_t n1) {
    int8_rows(xp, M, q, K, w.scale, n0, n1, yp, N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = n0; n < n1; ++n) out[m * N + n] = c10::BFloat16(yp[m * N + n]);
  });
}

bool int8_avx2() {
#ifdef KIMIVL_I8_AVX2
  return true;
#else
  return false;
#endif
}

torch::Tensor linear_int8w(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(),
              "linear_int8w: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && q.dim() == 2, "linear_int8w: x (..., K) and q (N, K), got ", x.sizes(), " and ",
              q.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "linear_int8w: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(q.scalar_type() == torch::kInt8, "linear_int8w: q must be int8, got ", q.scalar_type());
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(x.size(-1) == K, "linear_int8w: x has ", x.size(-1), " features, q expects ", K);
  TORCH_CHECK(scale.numel() == N && scale.scalar_type() == torch::kFloat32,
              "linear_int8w: scale must hold ", N, " float32 values (one per row of q), got ", scale.sizes(), " ",
              scale.scalar_type());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N), "linear_int8w: bias must be (", N,
              "), got ", bias.has_value() ? bias->sizes() : torch::IntArrayRef{});
  const auto qc = q.contiguous();
  const auto sc = scale.contiguous();
  const auto xf = x.to(torch::kFloat32).contiguous();  // a few rows: the copy is noise next to the weights
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat32));
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  balanced_for(N, int8_grain(K), [&](int64_t n0, int64_t n1) { int8_rows(xp, M, qp, K, sp, n0, n1, yp, N); });
  if (bias.has_value()) y.add_(bias->to(torch::kFloat32));  // in float32, before the output's rounding
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return y.to(x.scalar_type()).view(sizes);
}
