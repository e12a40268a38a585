// The DeepSeek-V3 router on a decode step's few rows, in plain loops: kimivl.ops.routing.route's rules (noaux_tc,
// greedy, group_limited_greedy; sigmoid or softmax scores) without ATen.
//
// Why: the router of a decode step was a dozen ATen ops on a (T, 64) tensor (the float32 GEMV, sigmoid, bias add,
// top-k, gather, normalisation, scale). Each costs a few microseconds of dispatch and allocation, and more when the
// step's weight streams have pushed the dispatcher's working set out of the caches: ~1.3 % of the main thread's
// samples in a decode step of the real-width slice (perf), while the other thread waited. Here the logits are one parallel loop over the experts'
// rows (read where they are, bf16 or float32) and the rest a few hundred scalar operations.
//
// Every decode path routes with this function (the one-call step, moe_block / moe_forward, and MoEGate for a few bf16
// rows on the CPU), so they agree bit for bit; against the ATen route of longer inputs the scores and weights differ
// in the last bits (another summation order, another exp) and the order of the chosen experts is this one's:
// best first, ties to the lower index.
#include "kernels.h"
#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

// x . w in float32: 64 running sums (lane j takes the columns j mod 64; the compiler keeps them in 4-8 vector
// registers, enough independent adds to cover their latency), added pairwise, then the columns past the last
// multiple of 64. The same order on every CPU.
template <typename W>
float dot(const float* x, const W* w, int64_t D) {
  constexpr int kLanes = 64;
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[d + j] * widen(w[d + j]);
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  float s = acc[0];
  for (; d < D; ++d) s += x[d] * widen(w[d]);
  return s;
}

template <typename W>
void logits_rows(const float* x, int64_t T, const W* w, int64_t E, int64_t D, float* logits) {
  // experts outer: each router row is read from memory once for all T rows of x
  balanced_for(E, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      for (int64_t t = 0; t < T; ++t) logits[t * E + i] = dot(x + t * D, w + i * D, D);
  });
}

// a ranks before b: the larger value (NaN largest, as torch.topk), ties to the lower index.
struct Before {
  const float* v;
  bool operator()(int64_t a, int64_t b) const {
    const float x = v[a], y = v[b];
    const bool xn = std::isnan(x), yn = std::isnan(y);
    if (xn != yn) return xn;
    if (!xn && x != y) return x > y;
    return a < b;
  }
};

}  // namespace

void route_rows(const RouterArgs& r, const float* x, int64_t T, int64_t* topk_idx, float* topk_weight,
                float* scores) {
  const int64_t E = r.E, k = r.top_k;
  // reused per thread: a decode step routes every MoE layer through here
  thread_local std::vector<float> logits, choice, group_score;
  thread_local std::vector<int64_t> order, groups, in;
  thread_local std::vector<char> keep;
  logits.resize(T * E), choice.resize(E), order.resize(E);
  if (r.w16)
    logits_rows(x, T, static_cast<const uint16_t*>(r.w), E, r.D, logits.data());
  else
    logits_rows(x, T, static_cast<const float*>(r.w), E, r.D, logits.data());
  const bool grouped = r.method != 1 && r.n_group > 1;
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits.data() + t * E;
    float* s = scores + t * E;
    if (r.softmax) {
      const float m = *std::max_element(l, l + E);
      float sum = 0.f;
      for (int64_t i = 0; i < E; ++i) sum += s[i] = std::exp(l[i] - m);
      for (int64_t i = 0; i < E; ++i) s[i] /= sum;
    } else {
      for (int64_t i = 0; i < E; ++i) s[i] = 1.f / (1.f + std::exp(-l[i]));
    }
    for (int64_t i = 0; i < E; ++i) choice[i] = r.method == 0 && r.bias ? s[i] + r.bias[i] : s[i];
    if (grouped) {  // keep the topk_group best groups (noaux_tc: by the sum of their top 2, else by their best)
      const int64_t G = r.n_group, per = E / G;
      group_score.assign(G, 0.f);
      for (int64_t g = 0; g < G; ++g) {
        const float* c = choice.data() + g * per;
        in.resize(per);
        std::iota(in.begin(), in.end(), 0);
        const int64_t top = r.method == 0 ? std::min<int64_t>(2, per) : 1;
        std::partial_sort(in.begin(), in.begin() + top, in.end(), Before{c});
        float sum = c[in[0]];
        for (int64_t j = 1; j < top; ++j) sum += c[in[j]];
        group_score[g] = sum;
      }
      groups.resize(G);
      std::iota(groups.begin(), groups.end(), 0);
      std::partial_sort(groups.begin(), groups.begin() + r.topk_group, groups.end(), Before{group_score.data()});
      keep.assign(G, 0);
      for (int64_t j = 0; j < r.topk_group; ++j) keep[groups[j]] = 1;
      for (int64_t i = 0; i < E; ++i)
        if (!keep[i / per]) choice[i] = -std::numeric_limits<float>::infinity();
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), Before{choice.data()});
    int64_t* idx = topk_idx + t * k;
    float* w = topk_weight + t * k;
    for (int64_t j = 0; j < k; ++j) w[j] = s[idx[j] = order[j]];
    if (r.norm_topk_prob && k > 1) {
      float sum = 0.f;
      for (int64_t j = 0; j < k; ++j) sum += w[j];
      for (int64_t j = 0; j < k; ++j) w[j] /= sum + 1e-20f;
    }
    for (int64_t j = 0; j < k; ++j) w[j] *= r.scale;
  }
}

RouterArgs router_args(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias32, int64_t top_k,
                       int64_t n_group, int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
                       double routed_scaling_factor) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.is_contiguous() &&
                  (weight.scalar_type() == torch::kFloat32 || weight.scalar_type() == torch::kBFloat16),
              "route: the router weight must be a contiguous float32 or bfloat16 (E, D) CPU tensor, got ",
              weight.sizes(), " ", weight.scalar_type(), " on ", weight.device());
  const int64_t E = weight.size(0);
  TORCH_CHECK(0 <= method && method <= 2, "route: method ", method, " (0 noaux_tc, 1 greedy, 2 group_limited_greedy)");
  TORCH_CHECK(0 < top_k && top_k <= E && n_group >= 1 && E % n_group == 0 && 0 < topk_group && topk_group <= n_group,
              "route: top_k ", top_k, " of ", E, " experts in ", n_group, " groups (", topk_group, " kept)");
  if (bias32.has_value())
    TORCH_CHECK(bias32->scalar_type() == torch::kFloat32 && bias32->is_contiguous() && bias32->numel() == E,
                "route: the score correction bias must be float32 (", E, "), got ", bias32->sizes(), " ",
                bias32->scalar_type());
  RouterArgs r{};
  r.w = weight.data_ptr();
  r.w16 = weight.scalar_type() == torch::kBFloat16;
  r.bias = bias32.has_value() ? bias32->data_ptr<float>() : nullptr;
  r.E = E, r.D = weight.size(1), r.top_k = top_k, r.n_group = n_group, r.topk_group = topk_group, r.method = method;
  r.softmax = softmax, r.norm_topk_prob = norm_topk_prob;
  r.scale = static_cast<float>(routed_scaling_factor);
  return r;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> route(const torch::Tensor& x, const torch::Tensor& weight,
                                                              const c10::optional<torch::Tensor>& bias, int64_t top_k,
                                                              int64_t n_group, int64_t topk_group, int64_t method,
                                                              bool softmax, bool norm_topk_prob,
                                                              double routed_scaling_factor) {
  c10::optional<torch::Tensor> bias32;
  if (bias.has_value()) bias32 = bias->to(torch::kFloat32).contiguous();
  const RouterArgs r = router_args(weight, bias32, top_k, n_group, topk_group, method, softmax, norm_topk_prob,
                                   routed_scaling_factor);
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == r.D &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "route: x must be a float32 or bfloat16 (T, ", r.D, ") CPU tensor, got ", x.sizes(), " ",
              x.scalar_type());
  const auto x32 = x.to(torch::kFloat32).contiguous();  // x.float(): exact
  const int64_t T = x.size(0);
  auto idx = torch::empty({T, top_k}, torch::kInt64);
  auto w = torch::empty({T, top_k}, torch::kFloat32);
  auto scores = torch::empty({T, r.E}, torch::kFloat32);
  route_rows(r, x32.data_ptr<float>(), T, idx.data_ptr<int64_t>(), w.data_ptr<float>(), scores.data_ptr<float>());
  return {idx, w, scores};
}
