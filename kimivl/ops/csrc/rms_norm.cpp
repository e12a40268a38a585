// DeepseekV3RMSNorm for inference in one call: the PyTorch module takes ~9 tensor ops (float, pow, mean,
// add, rsqrt, mul, to, mul), each ~10-20 us of dispatch for a decode step's single row. Same roundings:
// normalised in float32, rounded to x's dtype, times the weight in the promoted dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  TORCH_CHECK((xt == torch::kFloat32 || xt == torch::kBFloat16) && (wt == torch::kFloat32 || wt == torch::kBFloat16),
              "rms_norm: float32 or bfloat16 tensors, got ", xt, " and ", wt);
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: x (..., ",
              weight.size(0), ") for a weight of ", weight.size(0), ", got ", x.sizes());
  const int64_t D = weight.size(0);
  auto xf = x.reshape({-1, D}).to(torch::kFloat32).contiguous();
  auto wf = weight.to(torch::kFloat32).contiguous();
  const auto out_type = c10::promoteTypes(xt, wt);
  auto out = torch::empty({xf.size(0), D}, x.options().dtype(out_type));
  const float* xp = xf.data_ptr<float>();
  const float* wp = wf.data_ptr<float>();
  const bool x16 = xt == torch::kBFloat16, o16 = out_type == torch::kBFloat16;
  const float feps = static_cast<float>(eps);
  at::BFloat16* o16p = o16 ? out.data_ptr<at::BFloat16>() : nullptr;
  float* o32p = o16 ? nullptr : out.data_ptr<float>();
  at::parallel_for(0, xf.size(0), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = xp + r * D;
      double ss = 0.0;  // a double sum: the row's mean square without order-dependent float32 rounding
      for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(row[d]) * row[d];
      const float inv = 1.f / std::sqrt(static_cast<float>(ss / D) + feps);
      for (int64_t d = 0; d < D; ++d) {
        float v = row[d] * inv;
        if (x16) v = static_cast<float>(c10::BFloat16(v));
        v *= wp[d];
        if (o16)
          o16p[r * D + d] = c10::BFloat16(v);
        else
          o32p[r * D + d] = v;
      }
    }
  });
  auto sizes = x.sizes().vec();
  return out.view(sizes);
}
