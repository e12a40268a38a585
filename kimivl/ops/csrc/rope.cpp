// Rotary embedding of a decode step's few rows in one call (kimivl.ops.rope.apply_rope's maths; its PyTorch
// form is ~12 tensor ops of dispatch for a handful of values). x holds interleaved pairs (x0, x1), (x2, x3), ...
// as the checkpoint stores them; the answer is in rotate-half order:
//   out[j] = x[2j] cos[j] - x[2j+1] sin[j],  out[j + D/2] = x[2j+1] cos[j + D/2] + x[2j] sin[j + D/2],
// each product and the sum rounded to x's dtype, as the PyTorch ops round them (no fused multiply-add).
#include <torch/extension.h>

namespace {

template <typename T>
inline float r(float v) { return static_cast<float>(static_cast<T>(v)); }  // the rounding of a T-typed op

// (The extension is compiled with -ffp-contract=off: a product and a sum stay two roundings, as in PyTorch.)
template <typename T>
void rotate(const T* x, const T* cos, const T* sin, T* out, int64_t B, int64_t H, int64_t S, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const T* xi = x + ((b * H + h) * S + s) * D;
        const T* c = cos + (b * S + s) * D;
        const T* n = sin + (b * S + s) * D;
        T* o = out + ((b * H + h) * S + s) * D;
        for (int64_t j = 0; j < half; ++j) {
          const float even = static_cast<float>(xi[2 * j]), odd = static_cast<float>(xi[2 * j + 1]);
          const float lo = r<T>(even * static_cast<float>(c[j])) + r<T>(-odd * static_cast<float>(n[j]));
          const float hi = r<T>(odd * static_cast<float>(c[j + half])) + r<T>(even * static_cast<float>(n[j + half]));
          o[j] = static_cast<T>(lo);
          o[j + half] = static_cast<T>(hi);
        }
      }
}

}  // namespace

torch::Tensor rope_rotate(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "rope_rotate: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && sin.sizes() == cos.sizes() && x.size(0) == cos.size(0) &&
                  x.size(2) == cos.size(1) && x.size(3) == cos.size(2) && x.size(3) % 2 == 0,
              "rope_rotate: x (B, H, S, D) with D even and cos / sin (B, S, D), got ", x.sizes(), ", ", cos.sizes(),
              " and ", sin.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK((t == torch::kFloat32 || t == torch::kBFloat16) && cos.scalar_type() == t && sin.scalar_type() == t,
              "rope_rotate: x, cos and sin must share one dtype, float32 or bfloat16; got ", t, ", ",
              cos.scalar_type(), " and ", sin.scalar_type());
  auto xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  auto out = torch::empty_like(xc);
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3);
  if (t == torch::kFloat32)
    rotate<float>(xc.data_ptr<float>(), cc.data_ptr<float>(), sc.data_ptr<float>(), out.data_ptr<float>(), B, H, S, D);
  else
    rotate<at::BFloat16>(xc.data_ptr<at::BFloat16>(), cc.data_ptr<at::BFloat16>(), sc.data_ptr<at::BFloat16>(),
                         out.data_ptr<at::BFloat16>(), B, H, S, D);
  return out;
}
