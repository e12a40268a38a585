// A bf16 decoder layer's decode step in two calls: mla_block (input norm, MLA on the latent cache, residual)
// and moe_block / mlp_block (post-attention norm, the routed and shared experts or the dense MLP, residual).
// They compose this extension's own kernels with the same roundings, in the same order, as the Python modules
// (kimivl/decoder/attention.py, moe.py; the router is routing.cpp's, which MoEGate takes for these rows too), so
// the answers are bit-identical to the module path; what they save is the ~100 Python-level calls per layer
// around those kernels (~0.8 -> ~0.3 ms per layer and step on a 2-core AVX2 CPU: docs/performance.md, "A decoder
// layer's decode step in two C++ calls"). Between the kernels they pass raw rows (decode_blocks.h): ATen's views,
// conversions and allocations there were ~130 tensor ops per layer and step ("The decode step's glue in raw rows").
#include "decode_blocks.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace {

void check_bf16(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16, "decode_layer: ", what,
              " must be a bfloat16 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// Gated-SiLU MLP weights, E of them stacked (gate, up (E, I, D); down (E, D, I)) or one plain MLP (E < 0: (I, D)
// and (D, I)): bfloat16 CPU tensors of these shapes, each MLP's matrices row-major and dense (they are read
// through raw row pointers; the stacked gate and up may be views of one (E, 2I, D) tensor).
void check_mlp(const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down, int64_t E, int64_t I,
               int64_t D, const char* what, bool int8 = false) {
  const std::vector<int64_t> gu = E >= 0 ? std::vector<int64_t>{E, I, D} : std::vector<int64_t>{I, D};
  const std::vector<int64_t> dn = E >= 0 ? std::vector<int64_t>{E, D, I} : std::vector<int64_t>{D, I};
  for (const auto* t : {&gate, &up, &down}) {
    if (!int8) {
      check_bf16(*t, what);
    } else {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kInt8, "decode_layer: ", what,
                  " must be int8 CPU tensors (they have scales), got ", t->scalar_type(), " on ", t->device());
    }
  }
  auto dense = [](const torch::Tensor& t) {  // (a dimension of size 1 may carry any stride)
    return (t.size(-1) <= 1 || t.stride(-1) == 1) && (t.size(-2) <= 1 || t.stride(-2) == t.size(-1));
  };
  TORCH_CHECK(gate.sizes() == gu && up.sizes() == gu && down.sizes() == dn && dense(gate) && dense(up) && dense(down),
              "decode_layer: ", what, " must be gate / up ", torch::IntArrayRef(gu), " and down ",
              torch::IntArrayRef(dn), " with dense row-major matrices, got ", gate.sizes(), ", ", up.sizes(), ", ",
              down.sizes(), " (strides ", gate.strides(), ", ", up.strides(), ", ", down.strides(), ")");
}


const c10::optional<torch::Tensor>& scale_at(const Scales& scales, size_t i) {
  static const c10::optional<torch::Tensor> none;
  return i < scales.size() ? scales[i] : none;
}

// count float32 scales, contiguous (one per row of `count` rows), as a pointer.
const float* scale_data(const torch::Tensor& s, int64_t count, const char* what) {
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == torch::kFloat32 && s.numel() == count && s.is_contiguous(),
              "decode_layer: ", what, "'s scales must be ", count, " contiguous float32 values, got ", s.sizes(), " ",
              s.scalar_type());
  return s.data_ptr<float>();
}

// A (N, K) matrix: bf16, or int8 when it comes with scales.
WeightRows weight_rows(const torch::Tensor& w, const c10::optional<torch::Tensor>& scale, int64_t N, int64_t K,
                       const char* what) {
  if (!scale.has_value()) return bf16_rows(bf16_matrix(w, N, K, what));
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kInt8 && w.dim() == 2 && w.size(0) == N &&
                  w.size(1) == K && w.is_contiguous(),
              "decode_layer: ", what, " (with scales) must be a contiguous int8 (", N, ", ", K, ") matrix, got ",
              w.sizes(), " ", w.scalar_type());
  return {w.data_ptr<int8_t>(), scale_data(*scale, N, what)};
}

// Expert e's rows of a stacked (E, N, K) weight.
WeightRows expert_rows(const WeightRows& w, int64_t e, int64_t stride, int64_t scale_stride) {
  if (w.int8()) return {static_cast<const int8_t*>(w.data) + e * stride, w.scale + e * scale_stride};
  return {static_cast<const uint16_t*>(w.data) + e * stride, nullptr};
}

// A (B, ..., D) bf16 tensor's rows, contiguous (a copy only if they are not).
torch::Tensor rows_of(const torch::Tensor& h, int64_t D, const char* what) {
  check_bf16(h, what);
  TORCH_CHECK(h.dim() >= 2 && h.size(-1) == D, "decode_layer: ", what, " must be (..., ", D, "), got ", h.sizes());
  return h.contiguous();
}

}  // namespace

// A bf16 matrix (N, K) read through a raw row pointer: these sizes, rows dense.
const uint16_t* bf16_matrix(const torch::Tensor& w, int64_t N, int64_t K, const char* what) {
  check_bf16(w, what);
  TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == K && w.is_contiguous(), "decode_layer: ", what,
              " must be a contiguous (", N, ", ", K, ") matrix, got ", w.sizes(), " (strides ", w.strides(), ")");
  return bf16_data(w);
}

const BF16* bf16_vector(const torch::Tensor& w, int64_t D, const char* what) {
  check_bf16(w, what);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.is_contiguous(), "decode_layer: ", what, " must be (", D,
              "), got ", w.sizes());
  return w.data_ptr<BF16>();
}

MlaWeights mla_weights(const torch::Tensor& ln_w, double ln_eps, const c10::optional<torch::Tensor>& q_w,
                       const c10::optional<torch::Tensor>& q_a_w, const c10::optional<torch::Tensor>& q_a_ln_w,
                       const c10::optional<torch::Tensor>& q_b_w, const torch::Tensor& kv_a_w,
                       const torch::Tensor& kv_a_ln_w, double latent_eps, const torch::Tensor& kv_b_w,
                       const torch::Tensor& o_w, int64_t heads, int64_t nope, int64_t rope, int64_t v, double scale,
                       const Scales& scales) {
  TORCH_CHECK(scales.empty() || scales.size() == 4, "mla_block: scales of q_proj (or q_a_proj), q_b_proj, "
              "kv_a_proj_with_mqa and o_proj, or none, got ", scales.size());
  TORCH_CHECK(ln_w.dim() == 1 && kv_a_w.dim() == 2 && heads > 0 && nope > 0 && rope > 0 && rope % 2 == 0 && v > 0,
              "mla_block: a (D) norm weight, a (r + rope, D) kv_a_proj weight and positive dimensions (rope even), "
              "got ", ln_w.sizes(), ", ", kv_a_w.sizes(), ", heads ", heads, ", nope ", nope, ", rope ", rope, ", v ",
              v);
  const int64_t D = ln_w.size(0), r = kv_a_w.size(0) - rope, qk = nope + rope;
  TORCH_CHECK(r > 0, "mla_block: kv_a_proj has ", kv_a_w.size(0), " rows, not more than rope = ", rope);
  TORCH_CHECK(kv_b_w.dim() == 2 && kv_b_w.size(0) == heads * (nope + v) && kv_b_w.size(1) == r,
              "mla_block: kv_b_proj weight ", kv_b_w.sizes(), " does not match ", heads, " heads of ", nope, " + ", v,
              " from a latent of ", r);
  MlaWeights w{};
  w.ln_w = bf16_vector(ln_w, D, "input_layernorm");
  w.ln_eps = ln_eps;
  if (q_w.has_value()) {
    w.q_w = weight_rows(*q_w, scale_at(scales, 0), heads * qk, D, "q_proj");
  } else {
    TORCH_CHECK(q_a_w.has_value() && q_a_ln_w.has_value() && q_b_w.has_value(),
                "mla_block: pass q_w, or q_a_w, q_a_ln_w and q_b_w");
    TORCH_CHECK(q_a_w->dim() == 2, "mla_block: q_a_proj weight must be (q_lora, D), got ", q_a_w->sizes());
    w.q_lora = q_a_w->size(0);
    w.q_a_w = weight_rows(*q_a_w, scale_at(scales, 0), w.q_lora, D, "q_a_proj");
    w.q_a_ln_w = bf16_vector(*q_a_ln_w, w.q_lora, "q_a_layernorm");
    w.q_b_w = weight_rows(*q_b_w, scale_at(scales, 1), heads * qk, w.q_lora, "q_b_proj");
  }
  w.kv_a_w = weight_rows(kv_a_w, scale_at(scales, 2), r + rope, D, "kv_a_proj_with_mqa");
  w.kv_a_ln_w = bf16_vector(kv_a_ln_w, r, "kv_a_layernorm");
  w.latent_eps = latent_eps;
  w.kv_b_w = bf16_matrix(kv_b_w, heads * (nope + v), r, "kv_b_proj");
  w.o_w = weight_rows(o_w, scale_at(scales, 3), D, heads * v, "o_proj");
  w.D = D, w.heads = heads, w.nope = nope, w.rope = rope, w.v = v, w.r = r;
  w.scale = static_cast<float>(scale);
  return w;
}

void mla_rows(const MlaWeights& w, const BF16* h, int64_t B, const MlaStep& s, BF16* out) {
  const int64_t D = w.D, H = w.heads, nope = w.nope, rope = w.rope, r = w.r, qk = nope + rope, kvw = r + rope;
  thread_local std::vector<BF16> x, q, qa, qa_normed, kv, latent, q_rot, attn, y;
  thread_local std::vector<float> qn, qp, o;
  x.resize(B * D);
  rms_norm_rows(h, D, w.ln_w, B, D, w.ln_eps, x.data(), D);
  q.resize(B * H * qk);
  if (w.q_w.data != nullptr) {
    linear_rows(x.data(), B, D, w.q_w, H * qk, q.data());
  } else {
    qa.resize(B * w.q_lora);
    qa_normed.resize(B * w.q_lora);
    linear_rows(x.data(), B, D, w.q_a_w, w.q_lora, qa.data());
    rms_norm_rows(qa.data(), w.q_lora, w.q_a_ln_w, B, w.q_lora, w.latent_eps, qa_normed.data(), w.q_lora);
    linear_rows(qa_normed.data(), B, w.q_lora, w.q_b_w, H * qk, q.data());
  }
  // latent(): [c_kv | k_pe] from kv_a_proj_with_mqa, c_kv normed, k_pe rotated; written to the cache at pos
  kv.resize(B * kvw);
  latent.resize(B * kvw);
  linear_rows(x.data(), B, D, w.kv_a_w, kvw, kv.data());
  rms_norm_rows(kv.data(), kvw, w.kv_a_ln_w, B, r, w.latent_eps, latent.data(), kvw);
  for (int64_t b = 0; b < B; ++b) {
    rope_rotate_vectors(kv.data() + b * kvw + r, 0, 1, s.cos + b * rope, s.sin + b * rope, rope,
                        latent.data() + b * kvw + r, 0);
    const BF16* src = latent.data() + b * kvw;
    if (s.cache16) {
      std::memcpy(static_cast<BF16*>(s.cache) + b * s.cache_batch + s.pos * s.cache_row, src, kvw * sizeof(BF16));
    } else {
      float* dst = static_cast<float*>(s.cache) + b * s.cache_batch + s.pos * s.cache_row;
      for (int64_t j = 0; j < kvw; ++j) dst[j] = widen(src[j]);
    }
  }
  // query_parts(): q_nope as it is, q_pe rotated (rounded to bf16 as the module rounds it), both in float32
  qn.resize(B * H * nope);
  qp.resize(B * H * rope);
  q_rot.resize(H * rope);
  for (int64_t b = 0; b < B; ++b) {
    const BF16* row = q.data() + b * H * qk;
    rope_rotate_vectors(row + nope, qk, H, s.cos + b * rope, s.sin + b * rope, rope, q_rot.data(), rope);
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < nope; ++j) qn[(b * H + i) * nope + j] = widen(row[i * qk + j]);
    for (int64_t j = 0; j < H * rope; ++j) qp[b * H * rope + j] = widen(q_rot[j]);
  }
  // the absorbed attention over rows 0..pos; W_UK / W_UV are the (nope, r) / (v, r) blocks of each head's
  // (nope + v, r) rows of kv_b_proj
  o.resize(B * H * w.v);
  const int64_t head_rows = (nope + w.v) * r;
  const MlaArgs args{qn.data(), qp.data(), B, H, nope, rope, s.cache, s.cache16, s.pos + 1, s.cache_batch,
                     s.cache_row, w.kv_b_w, w.kv_b_w + nope * r, true, r, w.v, head_rows, r, head_rows, r, s.valid,
                     w.scale, s.form, o.data()};
  mla_decode_rows(args);
  attn.resize(B * H * w.v);
  for (int64_t i = 0; i < B * H * w.v; ++i) attn[i] = BF16(o[i]);  // the attention's output in bf16
  y.resize(B * D);
  linear_rows(attn.data(), B, H * w.v, w.o_w, D, y.data());
  for (int64_t i = 0; i < B * D; ++i) out[i] = BF16(widen(h[i]) + widen(y[i]));  // the residual, a bf16 add
}

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
                        int64_t v, double scale, int64_t form, const Scales& scales) {
  const MlaWeights w = mla_weights(ln_w, ln_eps, q_w, q_a_w, q_a_ln_w, q_b_w, kv_a_w, kv_a_ln_w, latent_eps, kv_b_w,
                                   o_w, heads, nope, rope, v, scale, scales);
  TORCH_CHECK(h.dim() == 3 && h.size(1) == 1, "mla_block: h must be (B, 1, D), got ", h.sizes());
  const auto hc = rows_of(h, w.D, "h");
  const int64_t B = h.size(0);
  TORCH_CHECK(cache.dim() == 3 && cache.size(0) == B && cache.size(2) == w.r + rope && 0 <= pos &&
                  pos < cache.size(1) && cache.stride(2) == 1 &&
                  (cache.scalar_type() == torch::kBFloat16 || cache.scalar_type() == torch::kFloat32),
              "mla_block: a bfloat16 or float32 cache (", B, ", L, ", w.r + rope, ") with row ", pos,
              " < L and contiguous rows, got ", cache.sizes(), " ", cache.scalar_type());
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == torch::kBFloat16 && t->sizes() == torch::IntArrayRef({B, 1, rope}),
                "mla_block: cos and sin must be bfloat16 (", B, ", 1, ", rope, "), got ", t->sizes(), " ",
                t->scalar_type());
  c10::optional<torch::Tensor> mask;
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == torch::kBool && valid->sizes() == torch::IntArrayRef({B, pos + 1}),
                "mla_block: valid must be bool (", B, ", ", pos + 1, "), got ", valid->sizes(), " ",
                valid->scalar_type());
    mask = valid->contiguous();
  }
  check_mla_form(form);
  const auto cc = cos.contiguous(), sc = sin.contiguous();
  const MlaStep step{cc.data_ptr<BF16>(), sc.data_ptr<BF16>(), cache.data_ptr(),
                     cache.scalar_type() == torch::kBFloat16, cache.stride(0), cache.stride(1), pos,
                     mask.has_value() ? mask->data_ptr<bool>() : nullptr, form};
  auto out = torch::empty_like(hc);
  mla_rows(w, hc.data_ptr<BF16>(), B, step, out.data_ptr<BF16>());
  return out;
}

MlpRows mlp_weights(const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down, int64_t D,
                    const char* what, const Scales& scales, size_t first) {
  TORCH_CHECK(gate.dim() == 2, "decode_layer: ", what, " gate weight must be (I, D), got ", gate.sizes());
  const int64_t I = gate.size(0);
  const auto& gs = scale_at(scales, first);
  const bool int8 = gs.has_value();
  TORCH_CHECK(int8 == scale_at(scales, first + 1).has_value() && int8 == scale_at(scales, first + 2).has_value(),
              "decode_layer: ", what, ": all three matrices int8 (with scales) or none");
  check_mlp(gate, up, down, -1, I, D, what, int8);
  if (!int8) return {bf16_rows(bf16_data(gate)), bf16_rows(bf16_data(up)), bf16_rows(bf16_data(down)), I};
  return {{gate.data_ptr<int8_t>(), scale_data(*gs, I, what)},
          {up.data_ptr<int8_t>(), scale_data(*scale_at(scales, first + 1), I, what)},
          {down.data_ptr<int8_t>(), scale_data(*scale_at(scales, first + 2), D, what)}, I};
}

MoeWeights moe_weights(const torch::Tensor& router_w, const c10::optional<torch::Tensor>& bias,
                       const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down,
                       const c10::optional<torch::Tensor>& shared_gate, const c10::optional<torch::Tensor>& shared_up,
                       const c10::optional<torch::Tensor>& shared_down, int64_t top_k, int64_t n_group,
                       int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
                       double routed_scaling_factor, const Scales& scales) {
  TORCH_CHECK(gate.dim() == 3, "moe_forward: stacked expert weights (E, I, D), got ", gate.sizes());
  TORCH_CHECK(scales.empty() || scales.size() == 6, "moe_forward: scales of the experts' gate, up, down and the "
              "shared MLP's, or none, got ", scales.size());
  const int64_t E = gate.size(0), I = gate.size(1), D = gate.size(2);
  const bool int8 = scale_at(scales, 0).has_value();
  TORCH_CHECK(int8 == scale_at(scales, 1).has_value() && int8 == scale_at(scales, 2).has_value(),
              "moe_forward: the experts' three matrices int8 (with scales) or none");
  check_mlp(gate, up, down, E, I, D, "the stacked expert weights", int8);
  TORCH_CHECK(router_w.dim() == 2 && router_w.size(0) == E && router_w.size(1) == D,
              "moe_forward: the router weight must be (", E, ", ", D, "), got ", router_w.sizes());
  MoeWeights w{};
  w.router_w = router_w;
  if (bias.has_value()) w.bias32 = bias->to(torch::kFloat32).contiguous();
  w.router = router_args(router_w, bias.has_value() ? c10::optional<torch::Tensor>(w.bias32) : c10::nullopt, top_k,
                         n_group, topk_group, method, softmax, norm_topk_prob, routed_scaling_factor);
  if (int8) {
    w.gate = {gate.data_ptr<int8_t>(), scale_data(*scale_at(scales, 0), E * I, "the experts' gate")};
    w.up = {up.data_ptr<int8_t>(), scale_data(*scale_at(scales, 1), E * I, "the experts' up")};
    w.down = {down.data_ptr<int8_t>(), scale_data(*scale_at(scales, 2), E * D, "the experts' down")};
    w.gate_scale_stride = w.up_scale_stride = I, w.down_scale_stride = D;
  } else {
    w.gate = bf16_rows(bf16_data(gate)), w.up = bf16_rows(bf16_data(up)), w.down = bf16_rows(bf16_data(down));
  }
  w.E = E, w.I = I, w.D = D;
  w.gate_stride = gate.stride(0), w.up_stride = up.stride(0), w.down_stride = down.stride(0);
  w.has_shared = shared_gate.has_value();
  if (w.has_shared) {
    TORCH_CHECK(shared_up.has_value() && shared_down.has_value(), "moe_forward: pass all three shared weights");
    w.shared = mlp_weights(*shared_gate, *shared_up, *shared_down, D, "the shared MLP's weights", scales, 3);
  }
  return w;
}

void moe_forward_rows(const MoeWeights& w, const BF16* x, int64_t T, const BF16* residual, BF16* out) {
  const int64_t k = w.router.top_k;
  thread_local std::vector<float> x32, topk_weight, scores;
  thread_local std::vector<int64_t> topk_idx, ids;
  thread_local std::vector<MlpRows> mlps;  // (reused like the buffers above: every MoE layer of every step)
  x32.resize(T * w.D), topk_weight.resize(T * k), scores.resize(T * w.E), topk_idx.resize(T * k);
  for (int64_t i = 0; i < T * w.D; ++i) x32[i] = widen(x[i]);  // x.float(): exact
  route_rows(w.router, x32.data(), T, topk_idx.data(), topk_weight.data(), scores.data());
  const int64_t* ip = topk_idx.data();
  ids.assign(ip, ip + T * k);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  TORCH_CHECK(ids.empty() || (ids.front() >= 0 && ids.back() < w.E), "moe_forward: expert ids out of range");
  // the chosen experts' rows of the stacked weights, by pointer (a select per weight was ~1 us of dispatch each)
  mlps.clear();
  for (int64_t e : ids)
    mlps.push_back({expert_rows(w.gate, e, w.gate_stride, w.gate_scale_stride),
                    expert_rows(w.up, e, w.up_stride, w.up_scale_stride),
                    expert_rows(w.down, e, w.down_stride, w.down_scale_stride), w.I});
  if (w.has_shared) mlps.push_back(w.shared);
  moe_rows_bf16(x, T, w.D, ip, topk_weight.data(), k, ids, mlps, w.has_shared ? 1 : 0, residual, out);
}

void moe_block_rows(const MoeWeights& w, const BF16* h, int64_t T, BF16* out) {
  thread_local std::vector<BF16> x;
  x.resize(T * w.D);
  rms_norm_rows(h, w.D, w.ln_w, T, w.D, w.eps, x.data(), w.D);
  moe_forward_rows(w, x.data(), T, h, out);
}

void mlp_rows(const BF16* ln_w, double eps, const MlpRows& mlp, const BF16* h, int64_t T, int64_t D, BF16* out) {
  thread_local std::vector<BF16> x;
  x.resize(T * D);
  rms_norm_rows(h, D, ln_w, T, D, eps, x.data(), D);
  moe_rows_bf16(x.data(), T, D, nullptr, nullptr, 0, {}, {mlp}, 1, h, out);
}

// x (..., D) -> moe(x): the router (route_rows), then the chosen experts of the stacked (E, ., .)
// weights and the shared MLP (if any) in one moe_bf16w pass (DeepseekV3MoE.forward's answer, same bits).
torch::Tensor moe_forward(const torch::Tensor& x, const torch::Tensor& router_w, const c10::optional<torch::Tensor>& bias,
                          const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down,
                          const c10::optional<torch::Tensor>& shared_gate, const c10::optional<torch::Tensor>& shared_up,
                          const c10::optional<torch::Tensor>& shared_down, int64_t top_k, int64_t n_group,
                          int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
                          double routed_scaling_factor, const Scales& scales) {
  const MoeWeights w = moe_weights(router_w, bias, gate, up, down, shared_gate, shared_up, shared_down, top_k,
                                   n_group, topk_group, method, softmax, norm_topk_prob, routed_scaling_factor,
                                   scales);
  check_bf16(x, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == w.D, "moe_forward: x must be (..., ", w.D, "), got ", x.sizes());
  const auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  moe_forward_rows(w, xc.data_ptr<BF16>(), xc.numel() / w.D, nullptr, out.data_ptr<BF16>());
  return out;
}

// h (B, S, D) -> h + moe_forward(post_attention_layernorm(h), ...).
torch::Tensor moe_block(const torch::Tensor& h, const torch::Tensor& ln_w, double eps, const torch::Tensor& router_w,
                        const c10::optional<torch::Tensor>& bias, const torch::Tensor& gate, const torch::Tensor& up,
                        const torch::Tensor& down, const c10::optional<torch::Tensor>& shared_gate,
                        const c10::optional<torch::Tensor>& shared_up, const c10::optional<torch::Tensor>& shared_down,
                        int64_t top_k, int64_t n_group, int64_t topk_group, int64_t method, bool softmax,
                        bool norm_topk_prob, double routed_scaling_factor, const Scales& scales) {
  MoeWeights w = moe_weights(router_w, bias, gate, up, down, shared_gate, shared_up, shared_down, top_k, n_group,
                             topk_group, method, softmax, norm_topk_prob, routed_scaling_factor, scales);
  w.ln_w = bf16_vector(ln_w, w.D, "post_attention_layernorm");
  w.eps = eps;
  TORCH_CHECK(h.dim() == 3, "moe_block: h must be (B, S, D), got ", h.sizes());
  const auto hc = rows_of(h, w.D, "h");
  auto out = torch::empty_like(hc);
  moe_block_rows(w, hc.data_ptr<BF16>(), hc.numel() / w.D, out.data_ptr<BF16>());
  return out;
}

// h (B, S, D) -> h + mlp(post_attention_layernorm(h)) for a dense gated-SiLU MLP (layer 0 of DeepSeek-V3).
torch::Tensor mlp_block(const torch::Tensor& h, const torch::Tensor& ln_w, double eps, const torch::Tensor& gate,
                        const torch::Tensor& up, const torch::Tensor& down, const Scales& scales) {
  TORCH_CHECK(h.dim() == 3, "mlp_block: h must be (B, S, D), got ", h.sizes());
  const int64_t D = h.size(2);
  const MlpRows mlp = mlp_weights(gate, up, down, D, "the MLP's weights", scales);
  const BF16* norm = bf16_vector(ln_w, D, "post_attention_layernorm");
  const auto hc = rows_of(h, D, "h");
  auto out = torch::empty_like(hc);
  mlp_rows(norm, eps, mlp, hc.data_ptr<BF16>(), hc.numel() / D, D, out.data_ptr<BF16>());
  return out;
}
