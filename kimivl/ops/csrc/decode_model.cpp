// A bf16 decoder's whole decode step in one call: the token embedding, every layer's mla_block and mlp_block /
// moe_block (decode_layer.cpp), the final norm and lm_head, returning the next-token logits.
//
// Why: with the layers' two C++ calls each, a decode step of the real-width slice still spent ~0.8 ms of its
// ~14 ms in Python between them (the embedding and its id check, RoPE's cos / sin, the plan checks and calls of
// every layer, the final norm): after the weights of a layer have streamed through the caches, the interpreter's
// own code and objects come back from memory, so each Python-level step costs several times its warm time
// (docs/performance.md, "The whole decode step in one call"). The step is bound by reading the weights, so that
// time is a direct loss. Same kernels and roundings in the same order as DeepseekV3ForCausalLM's modules and
// kimivl.decoder.cpu_decode's layer blocks (RoPE's cos / sin by the same ATen functions on the same shapes):
// bit-identical logits and cache (tested). The layers run on raw rows (decode_blocks.h), the hidden state in two
// buffers taking turns.
#include "decode_blocks.h"

#include <cstring>
#include <functional>
#include <vector>

// Built once per model by kimivl.decoder.cpu_decode (a plan of its weights); step() runs a decode step.
class DecoderStep {
 public:
  DecoderStep(torch::Tensor embed_w, torch::Tensor norm_w, double norm_eps, torch::Tensor head_w,
              torch::Tensor inv_freq, double rope_scale)
      : embed_w_(embed_w), norm_eps_(norm_eps), inv_freq_(inv_freq.contiguous()), rope_scale_(rope_scale) {
    TORCH_CHECK(embed_w.dim() == 2 && embed_w.scalar_type() == torch::kBFloat16 && embed_w.is_contiguous() &&
                    inv_freq_.scalar_type() == torch::kFloat32 && inv_freq_.dim() == 1,
                "DecoderStep: a contiguous bfloat16 embedding (vocab, D) and float32 inverse frequencies (rope / 2), "
                "got ", embed_w.sizes(), " ", embed_w.scalar_type(), " and ", inv_freq_.sizes(), " ",
                inv_freq_.scalar_type());
    D_ = embed_w.size(1);
    TORCH_CHECK(head_w.dim() == 2, "DecoderStep: lm_head's weight must be (vocab, ", D_, "), got ", head_w.sizes());
    norm_w_ = bf16_vector(norm_w, D_, "the final norm's weight");
    head_w_ = bf16_matrix(head_w, head_w.size(0), D_, "lm_head's weight");
    vocab_out_ = head_w.size(0);
    keep_ = {embed_w, norm_w, head_w};
  }

  // mla_block's weights and dimensions for the next layer (which reads cache[layer] for layer = its index).
  void add_attention(torch::Tensor ln_w, double ln_eps, c10::optional<torch::Tensor> q_w,
                     c10::optional<torch::Tensor> q_a_w, c10::optional<torch::Tensor> q_a_ln_w,
                     c10::optional<torch::Tensor> q_b_w, torch::Tensor kv_a_w, torch::Tensor kv_a_ln_w,
                     double latent_eps, torch::Tensor kv_b_w, torch::Tensor o_w, int64_t heads, int64_t nope,
                     int64_t rope, int64_t v, double scale, Scales scales) {
    attention_.push_back(mla_weights(ln_w, ln_eps, q_w, q_a_w, q_a_ln_w, q_b_w, kv_a_w, kv_a_ln_w, latent_eps,
                                     kv_b_w, o_w, heads, nope, rope, v, scale, scales));
    TORCH_CHECK(attention_.back().D == D_ && attention_.back().rope == 2 * inv_freq_.size(0),
                "DecoderStep: layer ", attention_.size() - 1, " is ", attention_.back().D, " wide with RoPE over ",
                attention_.back().rope, " channels; the model is ", D_, " wide with ", 2 * inv_freq_.size(0));
    keep(ln_w, q_w, q_a_w, q_a_ln_w, q_b_w, kv_a_w, kv_a_ln_w, kv_b_w, o_w);
    keep_all(scales);
  }

  // The same layer's second half: a dense gated-SiLU MLP (mlp_block) ...
  void add_mlp(torch::Tensor ln_w, double eps, torch::Tensor gate, torch::Tensor up, torch::Tensor down,
               Scales scales) {
    const MlpRows mlp = mlp_weights(gate, up, down, D_, "the MLP's weights", scales);
    const BF16* norm = bf16_vector(ln_w, D_, "post_attention_layernorm");
    const int64_t D = D_;
    second_.push_back([=](const BF16* h, int64_t B, BF16* out) { mlp_rows(norm, eps, mlp, h, B, D, out); });
    keep(ln_w, gate, up, down);
    keep_all(scales);
  }

  // ... or a MoE layer, router included (moe_block).
  void add_moe(torch::Tensor ln_w, double eps, torch::Tensor router_w, c10::optional<torch::Tensor> bias,
               torch::Tensor gate, torch::Tensor up, torch::Tensor down, c10::optional<torch::Tensor> shared_gate,
               c10::optional<torch::Tensor> shared_up, c10::optional<torch::Tensor> shared_down, int64_t top_k,
               int64_t n_group, int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
               double routed_scaling_factor, Scales scales) {
    MoeWeights w = moe_weights(router_w, bias, gate, up, down, shared_gate, shared_up, shared_down, top_k, n_group,
                               topk_group, method, softmax, norm_topk_prob, routed_scaling_factor, scales);
    TORCH_CHECK(w.D == D_, "DecoderStep: a MoE layer ", w.D, " wide in a model ", D_, " wide");
    w.ln_w = bf16_vector(ln_w, D_, "post_attention_layernorm");
    w.eps = eps;
    second_.push_back([w](const BF16* h, int64_t B, BF16* out) { moe_block_rows(w, h, B, out); });
    keep(ln_w, gate, up, down, shared_gate, shared_up, shared_down);
    keep_all(scales);
  }

  // ids (B, 1) int64 -> next-token logits (B, vocab) float32, each layer's latent written to cache row `pos`.
  // positions (B, 1) int64 (left padding) or None (every row at `pos`); valid (B, pos + 1) bool or None.
  // An id outside the vocabulary returns None: the caller's module path raises its error for it.
  c10::optional<torch::Tensor> step(const torch::Tensor& ids, const torch::Tensor& cache, int64_t pos,
                                    const c10::optional<torch::Tensor>& positions,
                                    const c10::optional<torch::Tensor>& valid, int64_t form) const {
    const int64_t layers = static_cast<int64_t>(attention_.size());
    TORCH_CHECK(layers == static_cast<int64_t>(second_.size()) && ids.dim() == 2 && ids.size(1) == 1 &&
                    ids.scalar_type() == torch::kInt64 && cache.dim() == 4 && cache.size(0) == layers &&
                    cache.size(1) == ids.size(0),
                "DecoderStep.step: ids (B, 1) int64 and a cache (", layers, ", B, L, .) for ", layers,
                " layers, got ", ids.sizes(), " ", ids.scalar_type(), " and ", cache.sizes());
    const int64_t B = ids.size(0), vocab = embed_w_.size(0), D = D_;
    TORCH_CHECK(0 <= pos && pos < cache.size(2) && cache.stride(3) == 1 &&
                    (cache.scalar_type() == torch::kBFloat16 || cache.scalar_type() == torch::kFloat32),
                "DecoderStep.step: a bfloat16 or float32 cache with contiguous rows and room for row ", pos, ", got ",
                cache.sizes(), " ", cache.scalar_type());
    for (const auto& w : attention_)
      TORCH_CHECK(cache.size(3) == w.r + w.rope, "DecoderStep.step: cache rows of ", cache.size(3), " for latents of ",
                  w.r, " + ", w.rope);
    c10::optional<torch::Tensor> mask;
    if (valid.has_value()) {
      TORCH_CHECK(valid->scalar_type() == torch::kBool && valid->sizes() == torch::IntArrayRef({B, pos + 1}),
                  "DecoderStep.step: valid must be bool (", B, ", ", pos + 1, "), got ", valid->sizes());
      mask = valid->contiguous();
    }
    check_mla_form(form);
    auto idc = ids.contiguous();
    const int64_t* ip = idc.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      if (ip[b] < 0 || ip[b] >= vocab) return c10::nullopt;
    // rope_cos_sin's ops in its order: float32 positions times the inverse frequencies (one float32 product,
    // as torch's mul), both halves, cos / sin by ATen on a tensor of the module path's shape (so the same vector
    // code and bits), the scale, bf16. Plain loops but for the two ATen calls: the dozen tensor ops they replace
    // were ~0.5 % of a step's samples (dispatch and allocation, cold after the weight streams).
    const int64_t rope = 2 * inv_freq_.size(0), half = rope / 2;
    const int64_t* pp = nullptr;
    torch::Tensor pc;
    if (positions.has_value()) {
      TORCH_CHECK(positions->scalar_type() == torch::kInt64 && positions->numel() == B,
                  "DecoderStep.step: positions must be int64 (B, 1) for B = ", B, ", got ", positions->sizes(), " ",
                  positions->scalar_type());
      pc = positions->contiguous();
      pp = pc.data_ptr<int64_t>();
    }
    auto emb = torch::empty({B, 1, rope}, torch::kFloat32);
    float* ep = emb.data_ptr<float>();
    const float* fr = inv_freq_.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      const float position = static_cast<float>(pp != nullptr ? pp[b] : pos);
      for (int64_t j = 0; j < half; ++j) ep[b * rope + j] = ep[b * rope + half + j] = position * fr[j];
    }
    const auto emb_cos = emb.cos(), emb_sin = emb.sin();
    std::vector<BF16> cos(B * rope), sin(B * rope);
    const float* cp = emb_cos.data_ptr<float>();
    const float* sp = emb_sin.data_ptr<float>();
    // torch multiplies a float32 tensor by a float32 scalar; where the module path skips the product (scale 1),
    // a product by 1.0f is exact
    const float scale = static_cast<float>(rope_scale_);
    for (int64_t i = 0; i < B * rope; ++i) {
      cos[i] = BF16(cp[i] * scale);
      sin[i] = BF16(sp[i] * scale);
    }
    // the embedding, then every layer on raw rows, h and h2 taking turns
    std::vector<BF16> h(B * D), h2(B * D);
    const BF16* table = embed_w_.data_ptr<BF16>();
    for (int64_t b = 0; b < B; ++b) std::memcpy(h.data() + b * D, table + ip[b] * D, D * sizeof(BF16));
    MlaStep in{cos.data(), sin.data(), nullptr, cache.scalar_type() == torch::kBFloat16,
               cache.stride(1), cache.stride(2), pos, mask.has_value() ? mask->data_ptr<bool>() : nullptr, form};
    char* base = static_cast<char*>(cache.data_ptr());
    for (int64_t layer = 0; layer < layers; ++layer) {
      in.cache = base + layer * cache.stride(0) * cache.element_size();
      mla_rows(attention_[layer], h.data(), B, in, h2.data());
      second_[layer](h2.data(), B, h.data());
    }
    // the final norm and lm_head; the bf16 logits widened to float32
    rms_norm_rows(h.data(), D, norm_w_, B, D, norm_eps_, h2.data(), D);
    std::vector<BF16> logits16(B * vocab_out_);
    linear_bf16_rows(h2.data(), B, D, head_w_, vocab_out_, logits16.data());
    auto logits = torch::empty({B, vocab_out_}, torch::kFloat32);
    float* lp = logits.data_ptr<float>();
    for (int64_t i = 0; i < B * vocab_out_; ++i) lp[i] = static_cast<float>(logits16[i]);
    return logits;
  }

 private:
  // The tensors the raw pointers point into stay alive with the step.
  template <typename... Ts>
  void keep(const Ts&... ts) {
    (keep_one(ts), ...);
  }
  void keep_one(const torch::Tensor& t) { keep_.push_back(t); }
  void keep_all(const Scales& scales) {
    for (const auto& s : scales) keep_one(s);
  }
  void keep_one(const c10::optional<torch::Tensor>& t) {
    if (t.has_value()) keep_.push_back(*t);
  }

  torch::Tensor embed_w_;
  int64_t D_ = 0, vocab_out_ = 0;
  const BF16* norm_w_ = nullptr;
  double norm_eps_;
  const uint16_t* head_w_ = nullptr;
  torch::Tensor inv_freq_;
  double rope_scale_;
  std::vector<MlaWeights> attention_;
  // A layer's second half (dense MLP or MoE): h (B, D) -> out = h + the half's output.
  std::vector<std::function<void(const BF16*, int64_t, BF16*)>> second_;
  std::vector<torch::Tensor> keep_;
};

void bind_decoder_step(pybind11::module& m) {
  pybind11::class_<DecoderStep>(m, "DecoderStep",
                                "a bf16 decoder's decode step in one call (kimivl.decoder.cpu_decode.model_step)")
      .def(pybind11::init<torch::Tensor, torch::Tensor, double, torch::Tensor, torch::Tensor, double>(),
           pybind11::arg("embed_w"), pybind11::arg("norm_w"), pybind11::arg("norm_eps"), pybind11::arg("head_w"),
           pybind11::arg("inv_freq"), pybind11::arg("rope_scale"))
      .def("add_attention", &DecoderStep::add_attention)
      .def("add_mlp", &DecoderStep::add_mlp)
      .def("add_moe", &DecoderStep::add_moe)
      .def("step", &DecoderStep::step, pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("ids"),
           pybind11::arg("cache"), pybind11::arg("pos"), pybind11::arg("positions"), pybind11::arg("valid"),
           pybind11::arg("form"));
}
