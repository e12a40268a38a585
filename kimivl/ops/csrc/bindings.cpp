// The Python module of kimivl's CPU kernels (kimivl/ops/cpu_kernels.py builds it).
#include <torch/extension.h>

torch::Tensor linear_bf16w(const torch::Tensor& x, const torch::Tensor& w);
std::vector<torch::Tensor> experts_bf16w(const std::vector<torch::Tensor>& xs, const std::vector<torch::Tensor>& gate,
                                         const std::vector<torch::Tensor>& up, const std::vector<torch::Tensor>& down);
bool has_avx2();
torch::Tensor mla_decode(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& kv,
                         const torch::Tensor& w_uk, const torch::Tensor& w_uv, double scale,
                         const c10::optional<torch::Tensor>& valid);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16w", &linear_bf16w, "x (M, K) float32 @ w (N, K) bfloat16 .T -> (M, N) float32");
  m.def("experts_bf16w", &experts_bf16w,
        "down(silu(gate x) * up x) for several experts in two parallel passes: xs[e] (M_e, K) float32, "
        "gate/up[e] (I, K), down[e] (K, I) bfloat16 -> [(M_e, K) float32]");
  m.def("has_avx2", &has_avx2, "whether the AVX2+FMA path was compiled in");
  m.def("mla_decode", &mla_decode,
        "one absorbed-MLA decode step: q_nope (B, H, nope), q_pe (B, H, rope) float32, kv (B, T, r + rope), "
        "w_uk (H, nope, r), w_uv (H, v, r), scale, valid (B, T) bool or None -> (B, H, v) float32");
}
