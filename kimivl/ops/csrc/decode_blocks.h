// A bf16 decoder layer's decode-step halves on raw rows (decode_layer.cpp), shared by the tensor functions
// mla_block / mlp_block / moe_block and the one-call step (DecoderStep, decode_model.cpp).
//
// The weights are gathered and checked once into these structs (per call for the tensor functions, once per model
// for DecoderStep); a step then passes only row pointers, so the glue between the kernels is plain loops over a
// few rows instead of ATen views, conversions and allocations (~1-2 us each, ~130 per layer and step before).
#pragma once
#include "kernels.h"

using BF16 = at::BFloat16;

// mla_block's weights: input norm, queries (q_proj, or q_a_proj / q_a_layernorm / q_b_proj), kv_a_proj_with_mqa
// and the latent's norm, kv_b_proj (W_UK / W_UV, read in place), o_proj; every matrix row-major (N, K). The
// projections may be int8 with per-row scales (kimivl.quantization.int8); kv_b_proj is bf16.
struct MlaWeights {
  const BF16* ln_w;
  double ln_eps;
  WeightRows q_w;  // data null: the low-rank queries below
  WeightRows q_a_w;
  const BF16* q_a_ln_w;
  WeightRows q_b_w;
  int64_t q_lora;
  WeightRows kv_a_w;
  const BF16* kv_a_ln_w;
  double latent_eps;
  const uint16_t* kv_b_w;
  WeightRows o_w;
  int64_t D, heads, nope, rope, v, r;
  float scale;
};

// Per-row scales of a block's int8 matrices, in the order the block names its matrices (attention: q_proj or
// q_a_proj, q_b_proj, kv_a_proj_with_mqa, o_proj; an MLP: gate, up, down; a MoE layer: the stacked experts'
// gate, up, down, then the shared MLP's): None for a bf16 matrix; an empty list: all bf16.
using Scales = std::vector<c10::optional<torch::Tensor>>;

// Checks the tensors (bf16 or int8 + scales, shapes, dense rows) and points into them: the tensors must outlive the
// struct.
MlaWeights mla_weights(const torch::Tensor& ln_w, double ln_eps, const c10::optional<torch::Tensor>& q_w,
                       const c10::optional<torch::Tensor>& q_a_w, const c10::optional<torch::Tensor>& q_a_ln_w,
                       const c10::optional<torch::Tensor>& q_b_w, const torch::Tensor& kv_a_w,
                       const torch::Tensor& kv_a_ln_w, double latent_eps, const torch::Tensor& kv_b_w,
                       const torch::Tensor& o_w, int64_t heads, int64_t nope, int64_t rope, int64_t v, double scale,
                       const Scales& scales);

// What a step's attention reads besides h: RoPE tables (B rows of `rope`), this layer's cache (B, L, r + rope),
// bf16 or float32 with contiguous rows, the row written (pos) and the keys each row may see (B, pos + 1) or null.
struct MlaStep {
  const BF16* cos;
  const BF16* sin;
  void* cache;
  bool cache16;
  int64_t cache_batch, cache_row;
  int64_t pos;
  const bool* valid;
  int64_t form;
};

// out (B, D) = h + o_proj(MLA(input_layernorm(h))), the step's latent written to cache row `pos`.
void mla_rows(const MlaWeights& w, const BF16* h, int64_t B, const MlaStep& step, BF16* out);

// A MoE layer's second half: post-attention norm, router (route_rows, routing.cpp), stacked routed experts
// (E, I, D) / (E, D, I) and the shared MLP, if any.
struct MoeWeights {
  const BF16* ln_w;
  double eps;
  RouterArgs router;
  torch::Tensor router_w, bias32;  // what `router` points into
  WeightRows gate, up, down;  // expert 0's; expert e's are `stride` elements (and `scale_stride` scales) on
  int64_t E, I, D, gate_stride, up_stride, down_stride, gate_scale_stride, up_scale_stride, down_scale_stride;
  bool has_shared;
  MlpRows shared;
};

// router_w: (E, D) bfloat16 or float32 (read in place); bias: (E) in any float dtype (kept as float32) or None.
MoeWeights moe_weights(const torch::Tensor& router_w, const c10::optional<torch::Tensor>& bias,
                       const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down,
                       const c10::optional<torch::Tensor>& shared_gate, const c10::optional<torch::Tensor>& shared_up,
                       const c10::optional<torch::Tensor>& shared_down, int64_t top_k, int64_t n_group,
                       int64_t topk_group, int64_t method, bool softmax, bool norm_topk_prob,
                       double routed_scaling_factor, const Scales& scales);

// out (T, D) = residual + moe(x) (residual may be null: moe(x) alone). x: (T, D), already normed.
void moe_forward_rows(const MoeWeights& w, const BF16* x, int64_t T, const BF16* residual, BF16* out);

// out (T, D) = h + mlp(norm(h)) for a dense gated-SiLU MLP / h + moe(norm(h)) for a MoE layer.
void mlp_rows(const BF16* ln_w, double eps, const MlpRows& mlp, const BF16* h, int64_t T, int64_t D, BF16* out);
void moe_block_rows(const MoeWeights& w, const BF16* h, int64_t T, BF16* out);

// A bf16 matrix (N, K) / vector (D), checked (these sizes, contiguous), as the row pointer the blocks read.
const uint16_t* bf16_matrix(const torch::Tensor& w, int64_t N, int64_t K, const char* what);
const BF16* bf16_vector(const torch::Tensor& w, int64_t D, const char* what);

// A dense gated-SiLU MLP's weights (I, D), (I, D), (D, I), checked; scales: none, or the three int8 matrices'.
MlpRows mlp_weights(const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down, int64_t D,
                    const char* what, const Scales& scales, size_t first = 0);
