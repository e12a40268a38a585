// Every function of kimivl's CPU kernels extension: bindings.cpp exposes them to Python, and the layer blocks
// (decode_layer.cpp) compose the kernels of the other files.
#pragma once
#include <torch/extension.h>

#include <cstring>
#include <string>
#include <tuple>
#include <vector>

torch::Tensor linear_bf16w(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias);
torch::Tensor moe_bf16w(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                        const std::vector<int64_t>& ids, const std::vector<torch::Tensor>& gate,
                        const std::vector<torch::Tensor>& up, const std::vector<torch::Tensor>& down,
                        int64_t n_shared, const std::vector<c10::optional<torch::Tensor>>& gate_scale,
                        const std::vector<c10::optional<torch::Tensor>>& up_scale,
                        const std::vector<c10::optional<torch::Tensor>>& down_scale);
// A bfloat16 value as float32 (exact): from raw 16-bit words (what the kernels read) or at::BFloat16; float32 as is.
inline float widen(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }
inline float widen(float v) { return v; }

// A bfloat16 tensor's data as raw 16-bit words (what the kernels read).
inline const uint16_t* bf16_data(const torch::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}

// A weight matrix (N, K) with dense rows as the streaming kernels read it: bf16 words, or int8 with one float32
// scale per row (weight-only int8, kimivl.quantization.int8).
struct WeightRows {
  const void* data = nullptr;
  const float* scale = nullptr;  // set: int8
  bool int8() const { return scale != nullptr; }
};
inline WeightRows bf16_rows(const uint16_t* w) { return {w, nullptr}; }

// moe_bf16w on raw weight rows (what moe_forward passes: rows of its stacked experts, no per-expert tensors).
// An MLP's three matrices are all bf16 or all int8.
struct MlpRows {
  WeightRows gate;  // (I, D), row-major
  WeightRows up;    // (I, D)
  WeightRows down;  // (D, I)
  int64_t I;
};
torch::Tensor moe_rows(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                       const std::vector<int64_t>& ids, const std::vector<MlpRows>& mlps, int64_t n_shared);
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);

// The same kernels on raw bf16 rows (the decode blocks' glue: a tensor op's dispatch, view or allocation costs
// ~1-2 us, and a decode step of the real-width slice had ~130 of them per layer). Same roundings as above.
void linear_bf16_rows(const at::BFloat16* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, at::BFloat16* out);
// linear_bf16_rows for either kind of weight (int8: linear_int8w's kernel, same roundings of the output).
void linear_rows(const at::BFloat16* x, int64_t M, int64_t K, const WeightRows& w, int64_t N, at::BFloat16* out);
// Rows [n0, n1) of int8 q (N, K) times its scales against M float32 rows of x (natural column order) -> y (M, ldy).
void int8_rows(const float* x, int64_t M, const int8_t* q, int64_t K, const float* scale, int64_t n0, int64_t n1,
               float* y, int64_t ldy);
void moe_rows_bf16(const at::BFloat16* x, int64_t T, int64_t D, const int64_t* topk_idx, const float* topk_weight,
                   int64_t k, const std::vector<int64_t>& ids, const std::vector<MlpRows>& mlps, int64_t n_shared,
                   const at::BFloat16* residual, at::BFloat16* out);  // out = residual + moe (bf16 add), if given
void rms_norm_rows(const at::BFloat16* x, int64_t x_stride, const at::BFloat16* w, int64_t rows, int64_t D,
                   double eps, at::BFloat16* out, int64_t out_stride);
// `count` vectors of D channels, x_stride apart, rotated by the same cos / sin (D each): out_stride apart.
void rope_rotate_vectors(const at::BFloat16* x, int64_t x_stride, int64_t count, const at::BFloat16* cos,
                         const at::BFloat16* sin, int64_t D, at::BFloat16* out, int64_t out_stride);
torch::Tensor rope_rotate(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
torch::Tensor rope_pairs(const torch::Tensor& x, const torch::Tensor& rot_cos, const torch::Tensor& rot_sin);
// The DeepSeek-V3 router on raw rows (routing.cpp): kimivl.ops.routing.route's rules in plain loops.
struct RouterArgs {
  const void* w;  // (E, D) router weight, rows contiguous: bfloat16 (w16) or float32
  bool w16;
  const float* bias;  // (E) e_score_correction_bias in float32 (noaux_tc), or null
  int64_t E, D, top_k, n_group, topk_group, method;  // method: 0 noaux_tc, 1 greedy, 2 group_limited_greedy
  bool softmax, norm_topk_prob;
  float scale;  // routed_scaling_factor
};
// Checks and points into the tensors (which must outlive the struct).
RouterArgs router_args(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias32, int64_t top_k,
                       int64_t n_group, int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
                       double routed_scaling_factor);
// x (T, D) float32 -> topk_idx (T, k), topk_weight (T, k), scores (T, E).
void route_rows(const RouterArgs& r, const float* x, int64_t T, int64_t* topk_idx, float* topk_weight,
                float* scores);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> route(const torch::Tensor& x, const torch::Tensor& weight,
                                                              const c10::optional<torch::Tensor>& bias, int64_t top_k,
                                                              int64_t n_group, int64_t topk_group, int64_t method,
                                                              bool softmax, bool norm_topk_prob,
                                                              double routed_scaling_factor);
bool has_avx2();
bool int8_avx2();
// y = (x @ q.T) * scale (+ bias): int8 weights (N, K), one float32 scale per row (linear_int8w.cpp).
torch::Tensor linear_int8w(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale,
                           const c10::optional<torch::Tensor>& bias);
std::string bf16_isa();
std::string experts_isa();
torch::Tensor attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const std::vector<int64_t>& lengths);
torch::Tensor moe_experts_bf16(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                               const torch::Tensor& gate_up, const torch::Tensor& down, bool use_amx,
                               int64_t max_rows);
torch::Tensor moe_experts_int8(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                               const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down,
                               const torch::Tensor& gate_scale, const torch::Tensor& up_scale,
                               const torch::Tensor& down_scale);
// mla_decode's forms (its `form` argument; kimivl.ops.cpu_kernels.mla_decode_form picks one): products in float32
// on widened rows, or bf16 products (bf16 queries and probabilities, float32 sums) by vdpbf16ps or by AMX tiles.
constexpr int64_t FORM_FLOAT32 = 0, FORM_VDPBF16 = 1, FORM_AMX = 2;
// mla_decode on raw rows (what the decode blocks pass): queries in float32, the answer (B, H, V) in float32.
struct MlaArgs {
  const float* q_nope;  // (B, H, nope), contiguous
  const float* q_pe;    // (B, H, rope)
  int64_t B, H, nope, rope;
  const void* kv;  // (B, T, R + rope) bf16 (kv16) or float32, rows contiguous, strides kv_batch / kv_row
  bool kv16;
  int64_t T, kv_batch, kv_row;
  const void* w_uk;  // (H, nope, R) and (H, V, R), bf16 (w16) or float32, rows contiguous, strides as named
  const void* w_uv;
  bool w16;
  int64_t R, V, wk_head, wk_row, wv_head, wv_row;
  const bool* valid;  // (B, T) keys each row may see, or null for all
  float scale;
  int64_t form;
  float* out;  // (B, H, V)
};
void check_mla_form(int64_t form);
void mla_decode_rows(const MlaArgs& args);
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
                        int64_t v, double scale, int64_t form,
                        const std::vector<c10::optional<torch::Tensor>>& scales);
torch::Tensor moe_block(const torch::Tensor& h, const torch::Tensor& ln_w, double eps, const torch::Tensor& router_w,
                        const c10::optional<torch::Tensor>& bias, const torch::Tensor& gate, const torch::Tensor& up,
                        const torch::Tensor& down, const c10::optional<torch::Tensor>& shared_gate,
                        const c10::optional<torch::Tensor>& shared_up, const c10::optional<torch::Tensor>& shared_down,
                        int64_t top_k, int64_t n_group, int64_t topk_group, int64_t method, bool softmax,
                        bool norm_topk_prob, double routed_scaling_factor,
                        const std::vector<c10::optional<torch::Tensor>>& scales);
torch::Tensor moe_forward(const torch::Tensor& x, const torch::Tensor& router_w, const c10::optional<torch::Tensor>& bias,
                          const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down,
                          const c10::optional<torch::Tensor>& shared_gate, const c10::optional<torch::Tensor>& shared_up,
                          const c10::optional<torch::Tensor>& shared_down, int64_t top_k, int64_t n_group,
                          int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
                          double routed_scaling_factor, const std::vector<c10::optional<torch::Tensor>>& scales);
torch::Tensor mlp_block(const torch::Tensor& h, const torch::Tensor& ln_w, double eps, const torch::Tensor& gate,
                        const torch::Tensor& up, const torch::Tensor& down,
                        const std::vector<c10::optional<torch::Tensor>>& scales);
// The DecoderStep class (decode_model.cpp): a bf16 decoder's whole decode step in one call.
void bind_decoder_step(pybind11::module& m);
