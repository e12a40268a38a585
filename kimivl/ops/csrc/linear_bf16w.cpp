// y = x @ w.T for a few rows of float32 activations x (M, K) and bfloat16 weights w (N, K): the decode-
// step shape, where the cost is streaming w from memory once. Each bf16 weight is widened to float32 in
// registers (a 16-bit shift) and accumulated in float32; w is read exactly once per block of 4 rows of x.
// Rows of w are split across torch's intra-op threads. An AVX2+FMA path and a portable scalar path.
// experts_bf16w runs the routed experts of a MoE layer for a few tokens the same way: the gate and up rows
// of every chosen expert as one parallel loop, silu(gate) * up in float32, then every down row as another.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

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

namespace {

// One matrix product of a segmented row space: rows [n0, n1) of w (N, K) against M rows of x -> y (M, N).
struct Segment {
  const float* x;
  int64_t M, K, N;
  const uint16_t* w;
  float* y;
};

// Rows [begin, end) of the concatenated row space of `segs` (offsets[i] = first row of segment i).
void segment_rows(const std::vector<Segment>& segs, const std::vector<int64_t>& offsets, int64_t begin,
                  int64_t end) {
  size_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
  for (; i < segs.size() && offsets[i] < end; ++i) {
    const Segment& s = segs[i];
    const int64_t n0 = std::max<int64_t>(begin - offsets[i], 0), n1 = std::min<int64_t>(end - offsets[i], s.N);
    if (n0 < n1) rows(s.x, s.K, s.M, s.w, s.K, n0, n1, s.y, s.N);
  }
}

void run_segments(const std::vector<Segment>& segs) {
  std::vector<int64_t> offsets(segs.size());
  int64_t total = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    offsets[i] = total;
    total += segs[i].N;
  }
  // One parallel loop over every row of every matrix: the threads split the experts' weights evenly
  // instead of each small matrix separately.
  at::parallel_for(0, total, 16, [&](int64_t b, int64_t e) { segment_rows(segs, offsets, b, e); });
}

const uint16_t* bf16_ptr(const torch::Tensor& w) {
  return reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
}

}  // namespace

std::vector<torch::Tensor> experts_bf16w(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& gate,
                                         const std::vector<torch::Tensor>& up, const std::vector<torch::Tensor>& down) {
  const size_t E = xs.size();
  TORCH_CHECK(gate.size() == E && up.size() == E && down.size() == E, "experts_bf16w: ", E, " inputs but ",
              gate.size(), " gate, ", up.size(), " up and ", down.size(), " down weights");
  std::vector<torch::Tensor> xc(E), g(E), u(E), d(E), h(E), y(E);
  std::vector<Segment> first, second;
  for (size_t e = 0; e < E; ++e) {
    TORCH_CHECK(xs[e].device().is_cpu() && xs[e].dim() == 2 && xs[e].scalar_type() == torch::kFloat32,
                "experts_bf16w: input ", e, " must be a float32 (M, K) CPU tensor, got ", xs[e].sizes());
    for (const auto* w : {&gate[e], &up[e], &down[e]})
      TORCH_CHECK(w->device().is_cpu() && w->dim() == 2 && w->scalar_type() == torch::kBFloat16,
                  "experts_bf16w: expert ", e, " weights must be bfloat16 (N, K) CPU tensors");
    const int64_t M = xs[e].size(0), K = xs[e].size(1), I = gate[e].size(0);
    TORCH_CHECK(gate[e].size(1) == K && up[e].size(0) == I && up[e].size(1) == K && down[e].size(0) == K &&
                    down[e].size(1) == I,
                "experts_bf16w: expert ", e, ": x ", xs[e].sizes(), ", gate ", gate[e].sizes(), ", up ", up[e].sizes(),
                ", down ", down[e].sizes(), " do not agree");
    xc[e] = xs[e].contiguous();
    g[e] = gate[e].contiguous();
    u[e] = up[e].contiguous();
    d[e] = down[e].contiguous();
    h[e] = torch::empty({2, M, I}, xc[e].options());  // gate and up outputs
    y[e] = torch::empty({M, K}, xc[e].options());
    float* hp = h[e].data_ptr<float>();
    first.push_back({xc[e].data_ptr<float>(), M, K, I, bf16_ptr(g[e]), hp});
    first.push_back({xc[e].data_ptr<float>(), M, K, I, bf16_ptr(u[e]), hp + M * I});
  }
  run_segments(first);
  for (size_t e = 0; e < E; ++e) {
    const int64_t M = xc[e].size(0), I = g[e].size(0);
    float* gp = h[e].data_ptr<float>();
    const float* upp = gp + M * I;
    for (int64_t i = 0; i < M * I; ++i) gp[i] = gp[i] / (1.f + std::exp(-gp[i])) * upp[i];  // silu(gate) * up
    second.push_back({gp, M, I, xc[e].size(1), bf16_ptr(d[e]), y[e].data_ptr<float>()});
  }
  run_segments(second);
  return y;
}

bool has_avx2() {
#ifdef KIMIVL_AVX2
  return true;
#else
  return false;
#endif
}
