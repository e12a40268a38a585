// A bf16 decoder layer's decode step in two calls: mla_block (input norm, MLA on the latent cache, residual)
// and moe_block / mlp_block (post-attention norm, the routed and shared experts or the dense MLP, residual).
// They compose this extension's own kernels and the same ATen ops in the same order as the Python modules
// (kimivl/decoder/attention.py, moe.py, kimivl/ops/routing.py), so the answers are bit-identical to the module
// path; what they save is the ~100 Python-level calls per layer around those kernels (~0.8 -> ~0.3 ms per layer
// and step on a 2-core AVX2 CPU: docs/performance.md, "A decoder layer's decode step in two C++ calls").
#include "kernels.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace {

torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w) { return linear_bf16w(x, w, c10::nullopt); }

void check_bf16(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16, "decode_layer: ", what,
              " must be a bfloat16 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// Gated-SiLU MLP weights, E of them stacked (gate, up (E, I, D); down (E, D, I)) or one plain MLP (E < 0: (I, D)
// and (D, I)): bfloat16 CPU tensors of these shapes, each MLP's matrices row-major and dense (they are read
// through raw row pointers; the stacked gate and up may be views of one (E, 2I, D) tensor).
void check_mlp(const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down, int64_t E, int64_t I,
               int64_t D, const char* what) {
  const std::vector<int64_t> gu = E >= 0 ? std::vector<int64_t>{E, I, D} : std::vector<int64_t>{I, D};
  const std::vector<int64_t> dn = E >= 0 ? std::vector<int64_t>{E, D, I} : std::vector<int64_t>{D, I};
  for (const auto* t : {&gate, &up, &down}) check_bf16(*t, what);
  auto dense = [](const torch::Tensor& t) {  // (a dimension of size 1 may carry any stride)
    return (t.size(-1) <= 1 || t.stride(-1) == 1) && (t.size(-2) <= 1 || t.stride(-2) == t.size(-1));
  };
  TORCH_CHECK(gate.sizes() == gu && up.sizes() == gu && down.sizes() == dn && dense(gate) && dense(up) && dense(down),
              "decode_layer: ", what, " must be gate / up ", torch::IntArrayRef(gu), " and down ",
              torch::IntArrayRef(dn), " with dense row-major matrices, got ", gate.sizes(), ", ", up.sizes(), ", ",
              down.sizes(), " (strides ", gate.strides(), ", ", up.strides(), ", ", down.strides(), ")");
}

}  // namespace

// h (B, 1, D) -> h + o_proj(attention(input_layernorm(h))), writing the step's latent into `cache` (B, L, r + rope)
// at row `pos` and attending over rows 0..pos (`valid` (B, pos + 1) bool, or None for all of them).
// Queries from q_proj (q_w), or from q_a_proj / q_a_layernorm / q_b_proj when q_w is None.
torch::Tensor mla_block(const torch::Tensor& h, const torch::Tensor& ln_w, double ln_eps,
                        const c10::optional<torch::Tensor>& q_w, const c10::optional<torch::Tensor>& q_a_w,
                        const c10::optional<torch::Tensor>& q_a_ln_w, const c10::optional<torch::Tensor>& q_b_w,
                        const torch::Tensor& kv_a_w, const torch::Tensor& kv_a_ln_w, double latent_eps,
                        const torch::Tensor& kv_b_w, const torch::Tensor& o_w, const torch::Tensor& cos,
                        const torch::Tensor& sin, const torch::Tensor& cache, int64_t pos,
                        const c10::optional<torch::Tensor>& valid, int64_t heads, int64_t nope, int64_t rope,
                        int64_t v, double scale, int64_t form) {
  check_bf16(h, "h");
  TORCH_CHECK(h.dim() == 3 && h.size(1) == 1, "mla_block: h must be (B, 1, D), got ", h.sizes());
  const int64_t B = h.size(0);
  const int64_t r = kv_a_w.size(0) - rope;
  TORCH_CHECK(cache.dim() == 3 && cache.size(0) == B && cache.size(2) == r + rope && 0 <= pos && pos < cache.size(1),
              "mla_block: cache (", B, ", L, ", r + rope, ") with row ", pos, " < L, got ", cache.sizes());
  TORCH_CHECK(kv_b_w.size(0) == heads * (nope + v) && kv_b_w.size(1) == r, "mla_block: kv_b_proj weight ",
              kv_b_w.sizes(), " does not match ", heads, " heads of ", nope, " + ", v, " from a latent of ", r);
  auto x = rms_norm(h, ln_w, ln_eps);
  torch::Tensor q;
  if (q_w.has_value()) {
    q = project(x, *q_w);
  } else {
    TORCH_CHECK(q_a_w.has_value() && q_a_ln_w.has_value() && q_b_w.has_value(),
                "mla_block: pass q_w, or q_a_w, q_a_ln_w and q_b_w");
    q = project(rms_norm(project(x, *q_a_w), *q_a_ln_w, latent_eps), *q_b_w);
  }
  // latent(): [c_kv | k_pe] from kv_a_proj_with_mqa; k_pe rotated, c_kv normed; written to the cache
  auto kv = project(x, kv_a_w);
  auto k_pe = rope_rotate(kv.narrow(-1, r, rope).unsqueeze(1), cos, sin).squeeze(1);
  auto c_kv = rms_norm(kv.narrow(-1, 0, r), kv_a_ln_w, latent_eps);
  auto row = cache.narrow(1, pos, 1);
  row.narrow(2, 0, r).copy_(c_kv);
  row.narrow(2, r, rope).copy_(k_pe);
  // query_parts(): (B, 1, H * (nope + rope)) -> q_nope (B, H, nope), rotated q_pe (B, H, rope)
  auto qh = q.view({B, 1, heads, nope + rope}).transpose(1, 2);
  auto q_pe = rope_rotate(qh.narrow(-1, nope, rope), cos, sin);
  auto w = kv_b_w.view({heads, nope + v, r});
  auto out = mla_decode(qh.narrow(-1, 0, nope).select(2, 0), q_pe.select(2, 0), cache.narrow(1, 0, pos + 1),
                        w.narrow(1, 0, nope), w.narrow(1, nope, v), scale, valid, form);
  return h + project(out.reshape({B, 1, heads * v}), o_w);
}

// x (..., D) -> moe(x): the router of kimivl.ops.routing.route (method 0 = noaux_tc, 1 = greedy, 2 =
// group_limited_greedy; sigmoid or softmax scores) run by the same ATen ops, then the chosen experts of the stacked
// (E, ., .) weights and the shared MLP (if any) in one moe_bf16w pass (DeepseekV3MoE.forward's answer, same bits).
torch::Tensor moe_forward(const torch::Tensor& x_in, const torch::Tensor& gate_w32, const c10::optional<torch::Tensor>& bias,
                          const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down,
                          const c10::optional<torch::Tensor>& shared_gate, const c10::optional<torch::Tensor>& shared_up,
                          const c10::optional<torch::Tensor>& shared_down, int64_t top_k, int64_t n_group,
                          int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
                          double routed_scaling_factor) {
  check_bf16(x_in, "x");
  const int64_t D = x_in.size(-1), E = gate.dim() == 3 ? gate.size(0) : 0;
  check_mlp(gate, up, down, E, gate.dim() == 3 ? gate.size(1) : 0, D, "the stacked expert weights");
  TORCH_CHECK(gate_w32.scalar_type() == torch::kFloat32 && gate_w32.dim() == 2 && gate_w32.size(0) == E &&
                  gate_w32.size(1) == D,
              "moe_forward: the router weight must be float32 (", E, ", ", D, "), got ", gate_w32.sizes(), " ",
              gate_w32.scalar_type());
  auto x = x_in.reshape({-1, D});
  const int64_t T = x.size(0);
  auto logits = at::linear(x.to(torch::kFloat32), gate_w32);
  auto scores = softmax ? logits.softmax(-1) : logits.sigmoid();
  auto choice = scores;
  if (method == 0 && bias.has_value()) choice = choice + bias->to(torch::kFloat32);
  if (method != 1 && n_group > 1) {
    auto grouped = choice.view({T, n_group, E / n_group});
    auto group_scores = method == 0 ? std::get<0>(grouped.topk(std::min<int64_t>(2, E / n_group), -1)).sum(-1)
                                    : grouped.amax(-1);
    auto group_idx = std::get<1>(group_scores.topk(topk_group, -1, true, false));
    auto keep = torch::zeros_like(group_scores, group_scores.options().dtype(torch::kBool)).scatter_(1, group_idx, true);
    keep = keep.unsqueeze(-1).expand({T, n_group, E / n_group}).reshape({T, -1});
    choice = choice.masked_fill(keep.logical_not(), -std::numeric_limits<double>::infinity());
  }
  auto topk_idx = std::get<1>(choice.topk(top_k, -1, true, false));
  auto topk_weight = scores.gather(1, topk_idx);
  if (norm_topk_prob && top_k > 1) topk_weight = topk_weight / (topk_weight.sum(-1, true) + 1e-20);
  topk_weight = topk_weight * routed_scaling_factor;

  auto idx = topk_idx.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int64_t> ids(ip, ip + idx.numel());
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  TORCH_CHECK(ids.empty() || (ids.front() >= 0 && ids.back() < E), "moe_forward: expert ids out of range");
  // the chosen experts' rows of the stacked weights, by pointer (a select per weight was ~1 us of dispatch each)
  const int64_t I = gate.size(1);
  const uint16_t *g0 = bf16_data(gate), *u0 = bf16_data(up), *d0 = bf16_data(down);
  std::vector<MlpRows> mlps;
  for (int64_t e : ids) mlps.push_back({g0 + e * gate.stride(0), u0 + e * up.stride(0), d0 + e * down.stride(0), I});
  const bool shared = shared_gate.has_value();
  if (shared) {
    TORCH_CHECK(shared_up.has_value() && shared_down.has_value(), "moe_forward: pass all three shared weights");
    const int64_t Is = shared_gate->size(0);
    check_mlp(*shared_gate, *shared_up, *shared_down, -1, Is, D, "the shared MLP's weights");
    mlps.push_back({bf16_data(*shared_gate), bf16_data(*shared_up), bf16_data(*shared_down), Is});
  }
  return moe_rows(x, topk_idx, topk_weight, ids, mlps, shared ? 1 : 0).view(x_in.sizes());
}

// h (B, S, D) -> h + moe_forward(post_attention_layernorm(h), ...).
torch::Tensor moe_block(const torch::Tensor& h, const torch::Tensor& ln_w, double eps, const torch::Tensor& gate_w32,
                        const c10::optional<torch::Tensor>& bias, const torch::Tensor& gate, const torch::Tensor& up,
                        const torch::Tensor& down, const c10::optional<torch::Tensor>& shared_gate,
                        const c10::optional<torch::Tensor>& shared_up, const c10::optional<torch::Tensor>& shared_down,
                        int64_t top_k, int64_t n_group, int64_t topk_group, int64_t method, bool softmax,
                        bool norm_topk_prob, double routed_scaling_factor) {
  check_bf16(h, "h");
  return h + moe_forward(rms_norm(h, ln_w, eps), gate_w32, bias, gate, up, down, shared_gate, shared_up, shared_down,
                         top_k, n_group, topk_group, method, softmax, norm_topk_prob, routed_scaling_factor);
}

// h (B, S, D) -> h + mlp(post_attention_layernorm(h)) for a dense gated-SiLU MLP (layer 0 of DeepSeek-V3).
torch::Tensor mlp_block(const torch::Tensor& h, const torch::Tensor& ln_w, double eps, const torch::Tensor& gate,
                        const torch::Tensor& up, const torch::Tensor& down) {
  check_bf16(h, "h");
  TORCH_CHECK(h.dim() == 3, "mlp_block: h must be (B, S, D), got ", h.sizes());
  auto x = rms_norm(h, ln_w, eps).reshape({-1, h.size(2)});
  auto none = torch::empty({x.size(0), 0}, x.options().dtype(torch::kInt64));
  auto y = moe_bf16w(x, none, none.to(torch::kFloat32), {}, {gate}, {up}, {down}, 1);
  return h + y.view(h.sizes());
}
