// Per-image (block-diagonal) attention of the vision tower with AVX512-BF16 dot products: bf16 q, k, v of packed
// images, every image and head in one call.
//
// Why: on CPUs with AVX512-BF16 but no AMX (AMD Zen 4 / 5) torch's flash CPU kernel runs at ~1/5 of the bf16 GEMM
// rate (performance notes §1: ~100 against 510 GFLOP/s per core on the acceptance Zen 5), and attention is then
// most of a large image's vision time. Here both products are vdpbf16ps register blocks, so the time is those
// instructions plus the softmax's exp; on AMX CPUs torch's kernel (oneDNN on AMX tiles) is the faster one and
// Python does not pick this one there (kimivl.ops.attention).
//
// For each image (segment) and head: k packed once as pairs of head dims ([block of 64 keys][dim pair][key]), v
// as pairs of keys ([key pair][dim], dims padded to 16); then 48 queries at a time, 512 keys per step (flash
// attention's online softmax):
//   S = q k^T                      (48 x 512 float32; 6 queries x 64 keys per register block, q read in place;
//                                   the rows' maxima taken from the accumulators)
//   m' = max(m, rowmax(S) * scale); O *= exp(m - m'); l *= exp(m - m')   (in base 2, scale * log2(e) folded in)
//   P = exp(S * scale - m')         rounded to bf16 for the second product; l += rowsum of the unrounded exps
//   O += P v                        (4 queries x up to 80 dims per register block; 2 x 128 dims)
// and out = O / l rounded to bf16. P's rounding to bf16 and the float32 accumulators are those of bf16 flash
// kernels (torch's CPU one too). (segment, head) pairs go longest first to whichever thread is free.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bf16_simd.h"
#include "parallel.h"

namespace {
constexpr int64_t kMaxDim = 128;
}

#ifdef KIMIVL_AVX512BF16
namespace {

using kimivl_simd::dot_block;
using kimivl_simd::first_lanes;
using kimivl_simd::pair_bcast;
using kimivl_simd::exp2_nonpositive_ps;

constexpr int64_t KB = 64;   // keys per packed k block: 4 score vectors
constexpr int64_t KC = 512;  // keys per softmax step
constexpr int64_t BQ = 48;   // queries per block: 8 score row groups of 6, 12 (or 24) value row groups of 4 (2)
constexpr int RQ = 6;

struct Task {
  int64_t start, len, head;
};

struct Scratch {
  std::vector<uint32_t> kp, vp;  // packed k, v of one (segment, head)
  std::vector<float> s, o, m, l;
  std::vector<uint16_t> p, zero;
};

// s[r][0..64) = q_r . k_j for 6 query rows (zero rows past the segment) and one packed block of 64 keys, of which
// the first `valid` are keys of the segment; rowmax[r] = lane-wise max of itself and the valid scores.
inline void score_block(const uint16_t* const* q, const uint32_t* kb, int64_t pairs, int64_t valid, float* s,
                        __m512* rowmax) {
  __m512 acc[RQ][4];
#pragma GCC unroll 6
  for (int r = 0; r < RQ; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < pairs; ++d2) {
    const uint32_t* kk = kb + d2 * KB;
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kk), k1 = (__m512bh)_mm512_loadu_si512(kk + 16),
                   k2 = (__m512bh)_mm512_loadu_si512(kk + 32), k3 = (__m512bh)_mm512_loadu_si512(kk + 48);
#pragma GCC unroll 6
    for (int r = 0; r < RQ; ++r) {
      const __m512bh qb = pair_bcast(q[r] + 2 * d2);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, k1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], qb, k2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], qb, k3);
    }
  }
  const __mmask16 m2 = first_lanes(valid - 32), m3 = first_lanes(valid - 48);
#pragma GCC unroll 6
  for (int r = 0; r < RQ; ++r) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(s + r * KC + 16 * j, acc[r][j]);
    if (valid >= KB) {
      rowmax[r] = _mm512_max_ps(rowmax[r], _mm512_max_ps(_mm512_max_ps(acc[r][0], acc[r][1]),
                                                         _mm512_max_ps(acc[r][2], acc[r][3])));
    } else {  // the segment's last block: keys past its end (zero scores) must not raise the max
      __m512 m = _mm512_mask_max_ps(rowmax[r], first_lanes(valid), rowmax[r], acc[r][0]);
      m = _mm512_mask_max_ps(m, first_lanes(valid - 16), m, acc[r][1]);
      m = _mm512_mask_max_ps(m, m2, m, acc[r][2]);
      rowmax[r] = _mm512_mask_max_ps(m, m3, m, acc[r][3]);
    }
  }
}

// O (+)= P v for a group of rows: kimivl_simd::dot_block with a = rows of P (stride KC), b = v as pairs of keys.
using ValueFn = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, int64_t, float*, bool, const uint16_t*);

struct ValueKernel {
  ValueFn fn;
  int rows;
};

ValueKernel value_kernel(int64_t nv) {  // 4 rows x NV <= 20 accumulators; 2 rows above 5 vectors (D > 80)
  switch (nv) {
    case 1: return {dot_block<4, 1>, 4};
    case 2: return {dot_block<4, 2>, 4};
    case 3: return {dot_block<4, 3>, 4};
    case 4: return {dot_block<4, 4>, 4};
    case 5: return {dot_block<4, 5>, 4};
    case 6: return {dot_block<2, 6>, 2};
    case 7: return {dot_block<2, 7>, 2};
    default: return {dot_block<2, 8>, 2};
  }
}

// One (segment, head): q, k, v rows of L tokens at strides sq, sk, sv; out rows at stride so.
void attend(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t sq, int64_t sk, int64_t sv, int64_t D,
            int64_t L, float scale, uint16_t* out, int64_t so, Scratch& w) {
  const int64_t pairs = D / 2, blocks = (L + KB - 1) / KB, LB = blocks * KB;
  const int64_t nv = (D + 15) / 16, dv = nv * 16;
  const ValueKernel vk = value_kernel(nv);
  w.kp.assign(blocks * pairs * KB, 0);
  for (int64_t t = 0; t < L; ++t) {
    const uint16_t* row = k + t * sk;
    uint32_t* dst = w.kp.data() + (t / KB) * pairs * KB + (t % KB);
    for (int64_t d2 = 0; d2 < pairs; ++d2) std::memcpy(dst + d2 * KB, row + 2 * d2, sizeof(uint32_t));
  }
  w.vp.assign(LB / 2 * dv, 0);
  for (int64_t t = 0; t < L; ++t) {
    const uint16_t* row = v + t * sv;
    uint16_t* dst = reinterpret_cast<uint16_t*>(w.vp.data() + (t / 2) * dv) + (t % 2);
    for (int64_t d = 0; d < D; ++d) dst[2 * d] = row[d];
  }
  w.s.resize(BQ * KC);
  w.p.assign(BQ * KC, 0);  // rows past the segment stay 0: their products are computed, never stored
  w.o.resize(BQ * dv);
  w.m.resize(BQ);
  w.l.resize(BQ);
  w.zero.assign(kMaxDim, 0);
  const uint16_t* qrow[BQ];
  __m512 rowmax[BQ];
  const float scale2 = scale * 1.4426950408889634f;  // scores to base-2 exponents
  for (int64_t q0 = 0; q0 < L; q0 += BQ) {
    const int64_t rows = std::min<int64_t>(BQ, L - q0);
    const int64_t score_rows = (rows + RQ - 1) / RQ * RQ, value_rows = (rows + vk.rows - 1) / vk.rows * vk.rows;
    for (int64_t r = 0; r < BQ; ++r) qrow[r] = r < rows ? q + (q0 + r) * sq : w.zero.data();
    std::fill(w.o.begin(), w.o.end(), 0.0f);
    std::fill(w.m.begin(), w.m.end(), -INFINITY);
    std::fill(w.l.begin(), w.l.end(), 0.0f);
    for (int64_t c0 = 0; c0 < L; c0 += KC) {
      const int64_t keys = std::min<int64_t>(KC, L - c0), kblocks = (keys + KB - 1) / KB;
      // 1. scores: each block of 64 keys (9 KB at D = 72) against every row group while it is in L1, and the
      //    rows' maxima on the way
      for (int64_t r = 0; r < score_rows; ++r) rowmax[r] = _mm512_set1_ps(-INFINITY);
      for (int64_t b = 0; b < kblocks; ++b) {
        const uint32_t* kb = w.kp.data() + (c0 / KB + b) * pairs * KB;
        for (int64_t r = 0; r < score_rows; r += RQ)
          score_block(qrow + r, kb, pairs, keys - b * KB, w.s.data() + r * KC + b * KB, rowmax + r);
      }
      // 2. online softmax of the step's keys, in base 2: exp(s * scale - m) = 2^(s * scale * log2(e) - m log2(e))
      const __m512 vscale = _mm512_set1_ps(scale2);
      for (int64_t r = 0; r < rows; ++r) {
        const float* sr = w.s.data() + r * KC;
        const float m_new = std::max(w.m[r], _mm512_reduce_max_ps(rowmax[r]) * scale2);
        const float alpha = std::exp2(w.m[r] - m_new);  // 0 on the first step (m = -inf)
        w.m[r] = m_new;
        if (alpha != 1.0f) {
          const __m512 va = _mm512_set1_ps(alpha);
          float* orow = w.o.data() + r * dv;
          for (int64_t d = 0; d < dv; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), va));
        }
        const __m512 vm = _mm512_set1_ps(m_new);
        __m512 vsum = _mm512_setzero_ps();
        uint16_t* pr = w.p.data() + r * KC;
        for (int64_t j = 0; j < keys; j += 16) {
          const __mmask16 mk = first_lanes(keys - j);
          const __m512 e =
              _mm512_maskz_mov_ps(mk, exp2_nonpositive_ps(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), vscale, vm)));
          vsum = _mm512_add_ps(vsum, e);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        w.l[r] = w.l[r] * alpha + _mm512_reduce_add_ps(vsum);
      }
      // 3. O += P v over the step's key pairs (a last odd key pairs with a zero P entry and a zero v row)
      const uint32_t* vb = w.vp.data() + (c0 / 2) * dv;
      const int64_t key_pairs = (keys + 1) / 2;
      for (int64_t r = 0; r < value_rows; r += vk.rows)
        vk.fn(w.p.data() + r * KC, KC, vb, dv, key_pairs, w.o.data() + r * dv, true, nullptr);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 il = _mm512_set1_ps(1.0f / w.l[r]);
      uint16_t* dst = out + (q0 + r) * so;
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 mk = first_lanes(D - d);
        const __m512 val = _mm512_mul_ps(_mm512_loadu_ps(w.o.data() + r * dv + d), il);
        _mm256_mask_storeu_epi16(dst + d, mk, (__m256i)_mm512_cvtneps_pbh(val));
      }
    }
  }
}

}  // namespace
#endif

torch::Tensor attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const std::vector<int64_t>& lengths) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 3 && q.scalar_type() == torch::kBFloat16 && k.sizes() == q.sizes() &&
                  v.sizes() == q.sizes() && k.scalar_type() == torch::kBFloat16 && v.scalar_type() == torch::kBFloat16,
              "attention_bf16: q, k, v must be bfloat16 (L, H, D) CPU tensors of one shape, got ", q.sizes(), " ",
              q.scalar_type(), ", ", k.sizes(), " ", k.scalar_type(), ", ", v.sizes(), " ", v.scalar_type());
  const int64_t L = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(D % 2 == 0 && D > 0 && D <= kMaxDim, "attention_bf16: head dim ", D, " is not even and at most ",
              kMaxDim);
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(2) == 1, "attention_bf16: head dims must be contiguous, got strides ", t->strides());
  int64_t total = 0;
  for (int64_t n : lengths) {
    TORCH_CHECK(n >= 0, "attention_bf16: segment of ", n, " tokens");
    total += n;
  }
  TORCH_CHECK(total == L, "attention_bf16: segments of ", total, " tokens in all for ", L, " packed tokens");
#ifndef KIMIVL_AVX512BF16
  TORCH_CHECK(false, "attention_bf16: this build has no AVX512-BF16 path (check bf16_isa() first)");
#else
  auto out = torch::empty({L, H, D}, q.options());
  std::vector<Task> tasks;
  for (int64_t i = 0, start = 0; i < static_cast<int64_t>(lengths.size()); start += lengths[i], ++i)
    if (lengths[i])
      for (int64_t h = 0; h < H; ++h) tasks.push_back({start, lengths[i], h});
  // longest first, each to the first thread free (cost ~ queries x keys: the 896^2 image's heads lead)
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.len > b.len; });
  const auto* qb = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* kb = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  const auto* vb = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  auto* ob = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  take_in_turn(static_cast<int64_t>(tasks.size()), [&](const auto& take) {
    Scratch w;
    for (int64_t i; (i = take()) >= 0;) {
      const Task& t = tasks[i];
      attend(qb + t.start * q.stride(0) + t.head * q.stride(1), kb + t.start * k.stride(0) + t.head * k.stride(1),
             vb + t.start * v.stride(0) + t.head * v.stride(1), q.stride(0), k.stride(0), v.stride(0), D, t.len,
             scale, ob + t.start * H * D + t.head * D, H * D, w);
    }
  });
  return out;
#endif
}
