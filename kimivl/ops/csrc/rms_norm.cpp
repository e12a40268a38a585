// DeepseekV3RMSNorm for inference in one call: the PyTorch module takes ~9 tensor ops (float, pow, mean,
// add, rsqrt, mul, to, mul), each ~10-20 us of dispatch for a decode step's single row. Same roundings:
// normalised in float32, rounded to x's dtype, times the weight in the promoted dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>

namespace {

// One row: the mean square in double, normalised in float32, rounded to x's dtype (bf16 input), times the weight,
// stored in the output's dtype. X, W, O: float or c10::BFloat16 (read and written in place, no converted copies).
template <typename X, typename W, typename O>
void norm_row(const X* row, const W* w, int64_t D, float eps, O* out) {
  double ss = 0.0;  // a double sum: the row's mean square without order-dependent float32 rounding
  for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(static_cast<float>(row[d])) * static_cast<float>(row[d]);
  const float inv = 1.f / std::sqrt(static_cast<float>(ss / D) + eps);
  for (int64_t d = 0; d < D; ++d) {
    float v = static_cast<float>(row[d]) * inv;
    if (std::is_same<X, c10::BFloat16>::value) v = static_cast<float>(c10::BFloat16(v));
    out[d] = static_cast<O>(v * static_cast<float>(w[d]));
  }
}

template <typename X, typename W, typename O>
void norm_rows(const torch::Tensor& x, const torch::Tensor& w, float eps, torch::Tensor& out) {
  const int64_t D = w.size(0), rows = out.size(0);
  const X* xp = x.data_ptr<X>();
  const W* wp = w.data_ptr<W>();
  O* op = out.data_ptr<O>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm_row(xp + r * D, wp, D, eps, op + r * D);
  });
}

}  // namespace

void rms_norm_rows(const at::BFloat16* x, int64_t x_stride, const at::BFloat16* w, int64_t rows, int64_t D,
                   double eps, at::BFloat16* out, int64_t out_stride) {
  for (int64_t r = 0; r < rows; ++r) norm_row(x + r * x_stride, w, D, static_cast<float>(eps), out + r * out_stride);
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  const auto xt = x.scalar_type(), wt = weight.scalar_type();
  TORCH_CHECK((xt == torch::kFloat32 || xt == torch::kBFloat16) && (wt == torch::kFloat32 || wt == torch::kBFloat16),
              "rms_norm: float32 or bfloat16 tensors, got ", xt, " and ", wt);
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: x (..., ",
              weight.size(0), ") for a weight of ", weight.size(0), ", got ", x.sizes());
  const int64_t D = weight.size(0);
  // read in their own dtypes: a decode step's converted copies were two allocations and copies per call
  auto xc = x.contiguous().view({-1, D});
  auto wc = weight.contiguous();
  const auto out_type = c10::promoteTypes(xt, wt);
  auto out = torch::empty({xc.size(0), D}, x.options().dtype(out_type));
  const float feps = static_cast<float>(eps);
  using BF = c10::BFloat16;
  const bool x16 = xt == torch::kBFloat16, w16 = wt == torch::kBFloat16;
  if (x16 && w16) norm_rows<BF, BF, BF>(xc, wc, feps, out);
  else if (x16) norm_rows<BF, float, float>(xc, wc, feps, out);
  else if (w16) norm_rows<float, BF, float>(xc, wc, feps, out);
  else norm_rows<float, float, float>(xc, wc, feps, out);
  return out.view(x.sizes());
}
