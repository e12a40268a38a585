// A bf16 decoder's whole decode step in one call: the token embedding, every layer's mla_block and mlp_block /
// moe_block (decode_layer.cpp), the final norm and lm_head, returning the next-token logits.
//
// Why: with the layers' two C++ calls each, a decode step of the real-width slice still spent ~0.8 ms of its
// ~14 ms in Python between them (the embedding and its id check, RoPE's cos / sin, the plan checks and calls of
// every layer, the final norm): after the weights of a layer have streamed through the caches, the interpreter's
// own code and objects come back from memory, so each Python-level step costs several times its warm time
// (docs/performance.md, "The whole decode step in one call"). The step is bound by reading the weights, so that
// time is a direct loss. Same ATen ops and kernels in the same order as DeepseekV3ForCausalLM's modules and
// kimivl.decoder.cpu_decode's layer blocks: bit-identical logits and cache (tested).
#include "kernels.h"

#include <functional>
#include <vector>

namespace {

// What a layer's attention half reads besides h: the step's RoPE tables, the cache (all layers), the row being
// written, the key mask and the MLA form.
struct StepInputs {
  const torch::Tensor& cos;
  const torch::Tensor& sin;
  const torch::Tensor& cache;  // (layers, B, L, r + rope)
  int64_t pos;
  const c10::optional<torch::Tensor>& valid;
  int64_t form;
};
// One half of a layer (attention, or the dense / MoE MLP): h (B, 1, D) -> h + the half's output.
using Half = std::function<torch::Tensor(const torch::Tensor&, const StepInputs&)>;

}  // namespace

// Built once per model by kimivl.decoder.cpu_decode (a plan of its weights); step() runs a decode step.
class DecoderStep {
 public:
  DecoderStep(torch::Tensor embed_w, torch::Tensor norm_w, double norm_eps, torch::Tensor head_w,
              torch::Tensor inv_freq, double rope_scale)
      : embed_w_(std::move(embed_w)), norm_w_(std::move(norm_w)), norm_eps_(norm_eps), head_w_(std::move(head_w)),
        inv_freq_(std::move(inv_freq)), rope_scale_(rope_scale) {
    TORCH_CHECK(embed_w_.dim() == 2 && inv_freq_.scalar_type() == torch::kFloat32 && inv_freq_.dim() == 1,
                "DecoderStep: embedding (vocab, D) and float32 inverse frequencies (rope / 2), got ",
                embed_w_.sizes(), " and ", inv_freq_.sizes(), " ", inv_freq_.scalar_type());
  }

  // mla_block's weights and dimensions for the next layer (which reads cache[layer] for layer = its index).
  void add_attention(torch::Tensor ln_w, double ln_eps, c10::optional<torch::Tensor> q_w,
                     c10::optional<torch::Tensor> q_a_w, c10::optional<torch::Tensor> q_a_ln_w,
                     c10::optional<torch::Tensor> q_b_w, torch::Tensor kv_a_w, torch::Tensor kv_a_ln_w,
                     double latent_eps, torch::Tensor kv_b_w, torch::Tensor o_w, int64_t heads, int64_t nope,
                     int64_t rope, int64_t v, double scale) {
    const int64_t layer = static_cast<int64_t>(attention_.size());
    attention_.push_back([=](const torch::Tensor& h, const StepInputs& in) {
      return mla_block(h, ln_w, ln_eps, q_w, q_a_w, q_a_ln_w, q_b_w, kv_a_w, kv_a_ln_w, latent_eps, kv_b_w, o_w,
                       in.cos, in.sin, in.cache.select(0, layer), in.pos, in.valid, heads, nope, rope, v, scale,
                       in.form);
    });
  }

  // The same layer's second half: a dense gated-SiLU MLP (mlp_block) ...
  void add_mlp(torch::Tensor ln_w, double eps, torch::Tensor gate, torch::Tensor up, torch::Tensor down) {
    mlp_.push_back([=](const torch::Tensor& h, const StepInputs&) { return mlp_block(h, ln_w, eps, gate, up, down); });
  }

  // ... or a MoE layer, router included (moe_block).
  void add_moe(torch::Tensor ln_w, double eps, torch::Tensor gate_w32, c10::optional<torch::Tensor> bias,
               torch::Tensor gate, torch::Tensor up, torch::Tensor down, c10::optional<torch::Tensor> shared_gate,
               c10::optional<torch::Tensor> shared_up, c10::optional<torch::Tensor> shared_down, int64_t top_k,
               int64_t n_group, int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
               double routed_scaling_factor) {
    mlp_.push_back([=](const torch::Tensor& h, const StepInputs&) {
      return moe_block(h, ln_w, eps, gate_w32, bias, gate, up, down, shared_gate, shared_up, shared_down, top_k,
                       n_group, topk_group, method, softmax, norm_topk_prob, routed_scaling_factor);
    });
  }

  // ids (B, 1) int64 -> next-token logits (B, vocab) float32, each layer's latent written to cache row `pos`.
  // positions (B, 1) int64 (left padding) or None (every row at `pos`); valid (B, pos + 1) bool or None.
  // An id outside the vocabulary returns None: the caller's module path raises its error for it.
  c10::optional<torch::Tensor> step(const torch::Tensor& ids, const torch::Tensor& cache, int64_t pos,
                                    const c10::optional<torch::Tensor>& positions,
                                    const c10::optional<torch::Tensor>& valid, int64_t form) const {
    TORCH_CHECK(attention_.size() == mlp_.size() && ids.dim() == 2 && ids.size(1) == 1 &&
                    ids.scalar_type() == torch::kInt64 && cache.dim() == 4 &&
                    cache.size(0) == static_cast<int64_t>(attention_.size()) && cache.size(1) == ids.size(0),
                "DecoderStep.step: ids (B, 1) int64 and a cache (", attention_.size(), ", B, L, .) for ",
                attention_.size(), " layers, got ", ids.sizes(), " ", ids.scalar_type(), " and ", cache.sizes());
    const int64_t B = ids.size(0), vocab = embed_w_.size(0);
    auto idc = ids.contiguous();
    const int64_t* ip = idc.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      if (ip[b] < 0 || ip[b] >= vocab) return c10::nullopt;
    auto h = at::embedding(embed_w_, idc);  // (B, 1, D)
    // rope_cos_sin: positions in float32 times the inverse frequencies, both halves, cos / sin (scaled), cast
    auto position_ids = positions.has_value() ? *positions : torch::full({1, 1}, pos, idc.options()).expand({B, 1});
    auto freqs = position_ids.to(torch::kFloat32).unsqueeze(-1) * inv_freq_;
    auto emb = at::cat({freqs, freqs}, -1);
    auto cos = emb.cos(), sin = emb.sin();
    if (rope_scale_ != 1.0) {
      cos = cos * rope_scale_;
      sin = sin * rope_scale_;
    }
    cos = cos.to(h.scalar_type());
    sin = sin.to(h.scalar_type());
    const StepInputs in{cos, sin, cache, pos, valid, form};
    for (size_t layer = 0; layer < attention_.size(); ++layer) {
      h = attention_[layer](h, in);
      h = mlp_[layer](h, in);
    }
    h = rms_norm(h, norm_w_, norm_eps_);
    return linear_bf16w(h.select(1, 0), head_w_, c10::nullopt).to(torch::kFloat32);
  }

 private:
  torch::Tensor embed_w_, norm_w_;
  double norm_eps_;
  torch::Tensor head_w_, inv_freq_;
  double rope_scale_;
  std::vector<Half> attention_, mlp_;
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
