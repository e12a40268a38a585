// The Python module of kimivl's CPU kernels (kimivl/ops/cpu_kernels.py builds it).
#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The tensor functions run without Python's lock, as torch's own operators do: a chat server's event loop keeps
  // running while a decode step computes in a worker thread. (They touch no Python object; pybind converts the
  // arguments before releasing it and the result after taking it back.)
  const auto nogil = pybind11::call_guard<pybind11::gil_scoped_release>();
  m.def("linear_bf16w", &linear_bf16w, nogil,
        "x (..., K) float32 or bfloat16 @ w (N, K) bfloat16 .T (+ bias) -> (..., N) in x's dtype, accumulated in "
        "float32", pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("bias") = pybind11::none());
  m.def("linear_int8w", &linear_int8w, nogil,
        "x (..., K) float32 or bfloat16 @ q (N, K) int8 .T * scale (N) float32 (+ bias) -> (..., N) in x's dtype, "
        "accumulated in float32 (weight-only int8, one scale per output row)",
        pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("scale"), pybind11::arg("bias") = pybind11::none());
  m.def("int8_avx2", &int8_avx2, "whether linear_int8w's AVX2+FMA path was compiled in");
  using Scales = std::vector<c10::optional<torch::Tensor>>;
  m.def("moe_bf16w", &moe_bf16w, nogil,
        "a MoE layer's experts for a few tokens in two parallel passes: x (T, D) float32 or bfloat16, topk_idx / "
        "topk_weight (T, k), ids = the chosen experts (sorted), gate/up/down = their bfloat16 weights followed by "
        "n_shared shared (or dense) MLPs applied to every token -> (T, D) in x's dtype; an MLP whose gate_scale / "
        "up_scale / down_scale entries are tensors has int8 weights with those per-row scales",
        pybind11::arg("x"), pybind11::arg("topk_idx"), pybind11::arg("topk_weight"), pybind11::arg("ids"),
        pybind11::arg("gate"), pybind11::arg("up"), pybind11::arg("down"), pybind11::arg("n_shared"),
        pybind11::arg("gate_scale") = Scales{}, pybind11::arg("up_scale") = Scales{},
        pybind11::arg("down_scale") = Scales{});
  m.def("rms_norm", &rms_norm, nogil,
        "weight * (x / sqrt(mean(x^2) + eps)) in float32, rounded to x's dtype before the weight, output in the "
        "promoted dtype (DeepseekV3RMSNorm's roundings)");
  m.def("has_avx2", &has_avx2, "whether the AVX2+FMA path was compiled in");
  m.def("bf16_isa", &bf16_isa,
        "what moe_experts_bf16 and attention_bf16 can run here: 'amx', 'avx512_bf16' or '' (not compiled for this "
        "CPU: neither runs)");
  m.def("experts_isa", &experts_isa,
        "moe_experts_bf16's kernels here: 'amx', 'avx512_bf16', 'avx2' (float32 products from bf16 weights) or ''");
  m.def("attention_bf16", &attention_bf16, nogil,
        "per-segment non-causal attention with AVX512-BF16 dot products: q, k, v (L, H, D) bfloat16 (D even, at most "
        "128; rows may be strided views of a fused qkv), lengths = the packed segments -> (L, H, D) bfloat16, scale "
        "1/sqrt(D)");
  m.def("moe_experts_bf16", &moe_experts_bf16, nogil,
        "a MoE layer's routed experts over many tokens: x (T, D) bfloat16, topk_idx / topk_weight (T, k) int64 / "
        "float32, gate_up (E, 2I, D) = each expert's gate rows then its up rows, down (E, D, I), use_amx, max_rows "
        "-> (T, D) bfloat16 = moe_dispatch's weighted sum (its roundings); experts with more than max_rows (token, "
        "slot) pairs run as ATen GEMMs inside the call");
  m.def("moe_experts_int8", &moe_experts_int8, nogil,
        "moe_experts_bf16 for int8 experts (float32 products, experts_isa() 'avx2' only): x (T, D) bfloat16, "
        "topk_idx / topk_weight (T, k), gate / up (E, I, D) and down (E, D, I) int8, gate_scale / up_scale (E * I) "
        "and down_scale (E * D) float32 -> (T, D) bfloat16, the int8 modules' roundings");
  m.def("mla_decode", &mla_decode, nogil,
        "one absorbed-MLA decode step: q_nope (B, H, nope), q_pe (B, H, rope) float32 or bfloat16, kv (B, T, r + "
        "rope), w_uk (H, nope, r), w_uv (H, v, r), scale, valid (B, T) bool or None, form -> (B, H, v) in q's "
        "dtype; form MLA_FLOAT32, or MLA_VDPBF16 / MLA_AMX for bf16 products where the cache and weights are bf16 "
        "and r a multiple of 32 (AMX: and r + rope too; vdpbf16ps: where compiled in), else the float32 form",
        pybind11::arg("q_nope"), pybind11::arg("q_pe"), pybind11::arg("kv"), pybind11::arg("w_uk"),
        pybind11::arg("w_uv"), pybind11::arg("scale"), pybind11::arg("valid"), pybind11::arg("form") = FORM_FLOAT32);
  m.attr("MLA_FLOAT32") = FORM_FLOAT32;
  m.attr("MLA_VDPBF16") = FORM_VDPBF16;
  m.attr("MLA_AMX") = FORM_AMX;
  m.def("rope_rotate", &rope_rotate, nogil,
        "RoPE on interleaved channel pairs, answered in rotate-half order: x (B, H, S, D), cos / sin (B, S, D) -> "
        "(B, H, S, D) in x's dtype, each product and the sum rounded to it as the PyTorch ops do");
  m.def("rope_pairs", &rope_pairs, nogil,
        "the vision tower's 2-D RoPE in one pass: x (L, G, D) float32 or bfloat16 with contiguous rows (a view of a "
        "fused qkv projection is read in place), rot_cos / rot_sin (L, D) float32 -> contiguous (L, G, D) in x's "
        "dtype, with kimivl.ops.rope_2d.rotate_pairs' roundings");
  m.def("mla_block", &mla_block, nogil,
        "a bf16 decoder layer's attention half for one decode step: h + o_proj(MLA(input_layernorm(h))), the new "
        "latent written to cache row pos (kimivl.decoder.cpu_decode)");
  m.def("moe_block", &moe_block, nogil,
        "a bf16 MoE layer's second half for a decode step: h + moe(post_attention_layernorm(h)), router included "
        "(kimivl.decoder.cpu_decode)");
  m.def("moe_forward", &moe_forward, nogil,
        "a bf16 MoE layer for a few tokens, router included: x (..., D) -> DeepseekV3MoE(x) "
        "(kimivl.decoder.cpu_decode)");
  m.def("route", &route, nogil,
        "DeepSeek-V3 routing of a few rows in plain loops (kimivl.ops.routing.route's rules): x (T, D) float32 or "
        "bfloat16, weight (E, D) float32 or bfloat16, bias (E) or None, top_k, n_group, topk_group, method (0 "
        "noaux_tc, 1 greedy, 2 group_limited_greedy), softmax, norm_topk_prob, routed_scaling_factor -> topk_idx "
        "(T, k) int64 (best first), topk_weight (T, k) float32, scores (T, E) float32");
  m.def("mlp_block", &mlp_block, nogil,
        "a bf16 dense layer's second half for a decode step: h + mlp(post_attention_layernorm(h))");
  bind_decoder_step(m);
}
