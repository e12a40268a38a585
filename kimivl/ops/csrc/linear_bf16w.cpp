// y = x @ w.T for a few rows of float32 activations x (M, K) and bfloat16 weights w (N, K): the decode-
// step shape, where the cost is streaming w from memory once. Each bf16 weight is widened to float32 in
// registers (a 16-bit shift) and accumulated in float32; w is read exactly once per block of 4 rows of x.
// Rows of w are split across torch's intra-op threads. An AVX2+FMA path and a portable scalar path.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KIMIVL_AVX2 1
#endif

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

#ifdef KIMIVL_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bf16 values -> two float32 vectors.
inline void widen16(const uint16_t* p, __m256& lo, __m256& hi) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16));
}

// R rows of w against MB rows of x; acc[r][m] holds two vectors (halves of a 16-wide step).
template <int R, int MB>
void block(const float* x, int64_t ldx, const uint16_t* w, int64_t K, float* y, int64_t ldy) {
  __m256 acc[R][MB][2];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int r = 0; r < R; ++r) {
      __m256 lo, hi;
      widen16(w + r * K + k, lo, hi);
      for (int m = 0; m < MB; ++m) {
        acc[r][m][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * ldx + k), acc[r][m][0]);
        acc[r][m][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * ldx + k + 8), acc[r][m][1]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) {
      float s = hsum(_mm256_add_ps(acc[r][m][0], acc[r][m][1]));
      for (int64_t kk = k; kk < K; ++kk) s += bf16_to_float(w[r * K + kk]) * x[m * ldx + kk];
      y[m * ldy + r] = s;
    }
  }
}
#endif

void scalar_rows(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0, int64_t n1,
                 float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += bf16_to_float(w[n * K + k]) * x[m * ldx + k];
      y[m * ldy + n] = s;
    }
}

void rows(const float* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* y,
          int64_t ldy) {
#ifdef KIMIVL_AVX2
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const int64_t mb = std::min<int64_t>(4, M - m0);
    const float* xm = x + m0 * ldx;
    float* ym = y + m0 * ldy;
    int64_t n = n0;
    if (mb == 1) {
      for (; n + 4 <= n1; n += 4) block<4, 1>(xm, ldx, w + n * K, K, ym + n, ldy);
      for (; n < n1; ++n) block<1, 1>(xm, ldx, w + n * K, K, ym + n, ldy);
    } else if (mb == 2) {
      for (; n + 2 <= n1; n += 2) block<2, 2>(xm, ldx, w + n * K, K, ym + n, ldy);
      for (; n < n1; ++n) block<1, 2>(xm, ldx, w + n * K, K, ym + n, ldy);
    } else if (mb == 3) {
      for (; n < n1; ++n) block<1, 3>(xm, ldx, w + n * K, K, ym + n, ldy);
    } else {
      for (; n < n1; ++n) block<1, 4>(xm, ldx, w + n * K, K, ym + n, ldy);
    }
  }
#else
  scalar_rows(x, ldx, M, w, K, n0, n1, y, ldy);
#endif
}

}  // namespace

torch::Tensor linear_bf16w(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear_bf16w: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2, "linear_bf16w: x (M, K) and w (N, K), got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "linear_bf16w: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "linear_bf16w: w must be bfloat16, got ", w.scalar_type());
  TORCH_CHECK(x.size(1) == w.size(1), "linear_bf16w: x has ", x.size(1), " features, w expects ", w.size(1));
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = wc.size(0);
  auto y = torch::empty({M, N}, xc.options());
  const float* xp = xc.data_ptr<float>();
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  // ~64 KB of weights per task: big enough to amortise scheduling, small enough to balance.
  const int64_t grain = std::max<int64_t>(4, (32768 / std::max<int64_t>(K, 1)) & ~int64_t(3));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(xp, K, M, wp, K, n0, n1, yp, N); });
  return y;
}

bool has_avx2() {
#ifdef KIMIVL_AVX2
  return true;
#else
  return false;
#endif
}
