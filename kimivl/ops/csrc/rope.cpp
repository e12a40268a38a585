// Rotary embedding of a decode step's few rows in one call (kimivl.ops.rope.apply_rope's maths; its PyTorch
// form is ~12 tensor ops of dispatch for a handful of values). x holds interleaved pairs (x0, x1), (x2, x3), ...
// as the checkpoint stores them; the answer is in rotate-half order:
//   out[j] = x[2j] cos[j] - x[2j+1] sin[j],  out[j + D/2] = x[2j+1] cos[j + D/2] + x[2j] sin[j + D/2],
// each product and the sum rounded to x's dtype, as the PyTorch ops round them (no fused multiply-add).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

namespace {

template <typename T>
inline float r(float v) { return static_cast<float>(static_cast<T>(v)); }  // the rounding of a T-typed op

// (The extension is compiled with -ffp-contract=off: a product and a sum stay two roundings, as in PyTorch.)
template <typename T>
void rotate_one(const T* x, const T* c, const T* n, T* o, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < half; ++j) {
    const float even = static_cast<float>(x[2 * j]), odd = static_cast<float>(x[2 * j + 1]);
    const float lo = r<T>(even * static_cast<float>(c[j])) + r<T>(-odd * static_cast<float>(n[j]));
    const float hi = r<T>(odd * static_cast<float>(c[j + half])) + r<T>(even * static_cast<float>(n[j + half]));
    o[j] = static_cast<T>(lo);
    o[j + half] = static_cast<T>(hi);
  }
}

template <typename T>
void rotate(const T* x, const T* cos, const T* sin, T* out, int64_t B, int64_t H, int64_t S, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        rotate_one(x + ((b * H + h) * S + s) * D, cos + (b * S + s) * D, sin + (b * S + s) * D,
                   out + ((b * H + h) * S + s) * D, D);
}

}  // namespace

void rope_rotate_vectors(const at::BFloat16* x, int64_t x_stride, int64_t count, const at::BFloat16* cos,
                         const at::BFloat16* sin, int64_t D, at::BFloat16* out, int64_t out_stride) {
  for (int64_t i = 0; i < count; ++i) rotate_one(x + i * x_stride, cos, sin, out + i * out_stride, D);
}

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

// The vision tower's 2-D RoPE over a whole packed sequence (kimivl.ops.rope_2d.rotate_pairs): x (L, G, D)
// with rows of D contiguous (G = the q and k heads of a fused qkv projection, read in place), per-position
// channel factors C, S (L, D) float32 -> contiguous (L, G, D) in x's dtype. For each pair (x0, x1):
//   out0 = x0 C0 + x1 S0,  out1 = x1 C1 + x0 S1,
// in float32 with the PyTorch form's roundings (x0 C0 rounded, then one fused multiply-add, as torch's
// vectorized addcmul_ does on AVX2 / AVX-512 CPUs; then x's dtype). One pass over x
// instead of that form's six (upcast, swap, multiply, fused add, downcast and their temporaries).
namespace {

template <typename T>
void rotate_rows(const T* x, int64_t sl, int64_t sg, const float* c, const float* s, T* out, int64_t L, int64_t G,
                 int64_t D) {
  at::parallel_for(0, L, 16, [&](int64_t l0, int64_t l1) {
    for (int64_t l = l0; l < l1; ++l) {
      const float* cl = c + l * D;
      const float* sn = s + l * D;
      for (int64_t g = 0; g < G; ++g) {
        const T* xi = x + l * sl + g * sg;
        T* o = out + (l * G + g) * D;
        for (int64_t j = 0; j < D; j += 2) {
          const float x0 = static_cast<float>(xi[j]), x1 = static_cast<float>(xi[j + 1]);
          o[j] = static_cast<T>(std::fma(x1, sn[j], x0 * cl[j]));
          o[j + 1] = static_cast<T>(std::fma(x0, sn[j + 1], x1 * cl[j + 1]));
        }
      }
    }
  });
}

}  // namespace

torch::Tensor rope_pairs(const torch::Tensor& x, const torch::Tensor& rot_cos, const torch::Tensor& rot_sin) {
  TORCH_CHECK(x.device().is_cpu() && rot_cos.device().is_cpu() && rot_sin.device().is_cpu(),
              "rope_pairs: CPU tensors only");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0 && x.stride(2) == 1,
              "rope_pairs: x must be (L, G, D) with D even and contiguous rows, got sizes ", x.sizes(), " strides ",
              x.strides());
  const int64_t L = x.size(0), G = x.size(1), D = x.size(2);
  TORCH_CHECK(rot_cos.dim() == 2 && rot_cos.size(0) == L && rot_cos.size(1) == D && rot_sin.sizes() == rot_cos.sizes(),
              "rope_pairs: rot_cos / rot_sin must be (", L, ", ", D, "), got ", rot_cos.sizes(), " and ",
              rot_sin.sizes());
  TORCH_CHECK(rot_cos.scalar_type() == torch::kFloat32 && rot_sin.scalar_type() == torch::kFloat32,
              "rope_pairs: rot_cos / rot_sin must be float32");
  const auto t = x.scalar_type();
  TORCH_CHECK(t == torch::kFloat32 || t == torch::kBFloat16, "rope_pairs: x must be float32 or bfloat16, got ", t);
  auto cc = rot_cos.contiguous(), sc = rot_sin.contiguous();
  auto out = torch::empty({L, G, D}, x.options());
  if (t == torch::kFloat32)
    rotate_rows<float>(x.data_ptr<float>(), x.stride(0), x.stride(1), cc.data_ptr<float>(), sc.data_ptr<float>(),
                       out.data_ptr<float>(), L, G, D);
  else
    rotate_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(), x.stride(0), x.stride(1), cc.data_ptr<float>(),
                              sc.data_ptr<float>(), out.data_ptr<at::BFloat16>(), L, G, D);
  return out;
}
