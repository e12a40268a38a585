// Every function of kimivl's CPU kernels extension: bindings.cpp exposes them to Python, and the layer blocks
// (decode_layer.cpp) compose the kernels of the other files.
#pragma once
#include <torch/extension.h>

#include <string>
#include <vector>

torch::Tensor linear_bf16w(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias);
torch::Tensor moe_bf16w(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                        const std::vector<int64_t>& ids, const std::vector<torch::Tensor>& gate,
                        const std::vector<torch::Tensor>& up, const std::vector<torch::Tensor>& down,
                        int64_t n_shared);
// A bfloat16 tensor's data as raw 16-bit words (what the kernels read).
inline const uint16_t* bf16_data(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// moe_bf16w on raw weight rows (what moe_forward passes: rows of its stacked experts, no per-expert tensors).
struct MlpRows {
  const uint16_t* gate;  // (I, D) bf16, row-major
  const uint16_t* up;    // (I, D)
  const uint16_t* down;  // (D, I)
  int64_t I;
};
torch::Tensor moe_rows(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                       const std::vector<int64_t>& ids, const std::vector<MlpRows>& mlps, int64_t n_shared);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor rope_rotate(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
torch::Tensor rope_pairs(const torch::Tensor& x, const torch::Tensor& rot_cos, const torch::Tensor& rot_sin);
bool has_avx2();
std::string bf16_isa();
torch::Tensor attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const std::vector<int64_t>& lengths);
torch::Tensor moe_experts_bf16(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                               const torch::Tensor& gate_up, const torch::Tensor& down, bool use_amx,
                               int64_t max_rows);
// mla_decode's forms (its `form` argument; kimivl.ops.cpu_kernels.mla_decode_form picks one): products in float32
// on widened rows, or bf16 products (bf16 queries and probabilities, float32 sums) by vdpbf16ps or by AMX tiles.
constexpr int64_t FORM_FLOAT32 = 0, FORM_VDPBF16 = 1, FORM_AMX = 2;
torch::Tensor mla_decode(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& kv,
                         const torch::Tensor& w_uk, const torch::Tensor& w_uv, double scale,
                         const c10::optional<torch::Tensor>& valid, int64_t form);
torch::Tensor mla_block(const torch::Tensor& h, const torch::Tensor& ln_w, double ln_eps,
                        const c10::optional<torch::Tensor>& q_w, const c10::optional<torch::Tensor>& q_a_w,
                        const c10::optional<torch::Tensor>& q_a_ln_w, const c10::optional<torch::Tensor>& q_b_w,
                        const torch::Tensor& kv_a_w, const torch::Tensor& kv_a_ln_w, double latent_eps,
                        const torch::Tensor& kv_b_w, const torch::Tensor& o_w, const torch::Tensor& cos,
                        const torch::Tensor& sin, const torch::Tensor& cache, int64_t pos,
                        const c10::optional<torch::Tensor>& valid, int64_t heads, int64_t nope, int64_t rope,
                        int64_t v, double scale, int64_t form);
torch::Tensor moe_block(const torch::Tensor& h, const torch::Tensor& ln_w, double eps, const torch::Tensor& gate_w32,
                        const c10::optional<torch::Tensor>& bias, const torch::Tensor& gate, const torch::Tensor& up,
                        const torch::Tensor& down, const c10::optional<torch::Tensor>& shared_gate,
                        const c10::optional<torch::Tensor>& shared_up, const c10::optional<torch::Tensor>& shared_down,
                        int64_t top_k, int64_t n_group, int64_t topk_group, int64_t method, bool softmax,
                        bool norm_topk_prob, double routed_scaling_factor);
torch::Tensor moe_forward(const torch::Tensor& x, const torch::Tensor& gate_w32, const c10::optional<torch::Tensor>& bias,
                          const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down,
                          const c10::optional<torch::Tensor>& shared_gate, const c10::optional<torch::Tensor>& shared_up,
                          const c10::optional<torch::Tensor>& shared_down, int64_t top_k, int64_t n_group,
                          int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
                          double routed_scaling_factor);
torch::Tensor mlp_block(const torch::Tensor& h, const torch::Tensor& ln_w, double eps, const torch::Tensor& gate,
                        const torch::Tensor& up, const torch::Tensor& down);
// The DecoderStep class (decode_model.cpp): a bf16 decoder's whole decode step in one call.
void bind_decoder_step(pybind11::module& m);
