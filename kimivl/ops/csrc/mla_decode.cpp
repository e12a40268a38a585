// One decode step of absorbed MLA attention (kimivl/ops/mla.py) in one pass over the latent cache.
//
// For each sequence b and head h (one new query per sequence):
//   q[h]   = scale * [W_UK[h]^T q_nope[h] | q_pe[h]]                       (r + rope)
//   p[h,t] = softmax_t(q[h] . kv[t])  over the visible keys t
//   out[h] = W_UV[h] (sum_t p[h,t] kv[t, :r])                              (v)
// The cache is split into chunks of CHUNK rows spread over torch's intra-op threads; each chunk is read
// from memory once (bf16 rows are widened to float32 into a per-thread scratch that stays in L2), scored
// for all heads, and summed with a chunk-local softmax (max, sum, weighted latents) that a final pass
// merges, as flash-decoding does. W_UK / W_UV may be bf16 (widened in registers) or float32: nothing is
// converted or copied per step. An AVX2+FMA path (heads in groups of 8 for the scores), AVX-512 forms of
// the two per-row loops (scores of 16 heads in one register, weighted latents 32 wide) where the compiler
// targets it, and a portable scalar path; every sum is accumulated in float32, each lane in the same order
// on every path (a sum over the cache rows or over the latent width, one term after another; only W_UV's
// dot products end in a sum over 16 or 8 lanes, by path). The caller may ask for a bf16 form instead (`form`;
// namespace `dot` below): for a bf16 cache with bf16 weights it takes the products in bf16 on the rows in place,
// the way the model's prefill does, by vdpbf16ps (asked for on CPUs where it outruns float32 FMAs) or by AMX tiles
// (on CPUs with AMX: the chunk's products cost a fraction of reading it); kimivl.ops.cpu_kernels.mla_decode_form.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "bf16_simd.h"
#include "kernels.h"
#include "parallel.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KIMIVL_MLA_AVX2 1
#if defined(__AVX512F__)
#define KIMIVL_MLA_AVX512 1
#endif
#endif

namespace {

constexpr int64_t CHUNK = 128;  // cache rows per task: 128 x 576 float32 = 288 KiB of scratch (fits L2)

#ifdef KIMIVL_MLA_AVX2
// 8 values as float32: bf16 widened (a 16-bit shift), float32 loaded.
inline __m256 load8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
#endif
#ifdef KIMIVL_MLA_AVX512
inline __m512 load16(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

// Rows [t0, t0 + n) of one sequence's cache as float32, D values per row: the rows themselves when the
// cache is float32 and contiguous per row, else widened into `scratch`.
template <typename KV>
const float* rows_as_float(const KV* kv, int64_t ld, int64_t t0, int64_t n, int64_t D, float* scratch) {
  if constexpr (std::is_same_v<KV, float>) {
    if (ld == D) return kv + t0 * ld;
  }
  for (int64_t t = 0; t < n; ++t) {
    const KV* src = kv + (t0 + t) * ld;
    float* dst = scratch + t * D;
    int64_t k = 0;
#ifdef KIMIVL_MLA_AVX512
    if constexpr (std::is_same_v<KV, uint16_t>) {
      for (; k + 16 <= D; k += 16) _mm512_storeu_ps(dst + k, load16(src + k));
    }
#endif
#ifdef KIMIVL_MLA_AVX2
    if constexpr (std::is_same_v<KV, uint16_t>) {
      for (; k + 8 <= D; k += 8) _mm256_storeu_ps(dst + k, load8(src + k));
    }
#endif
    for (; k < D; ++k) dst[k] = widen(src[k]);
  }
  return scratch;
}


#ifdef KIMIVL_MLA_AVX2
// Scores of ROWS rows for 8 (TWO: 16) heads starting at h0: broadcast a row value, FMA with the heads'
// queries. 6 rows x 16 heads = 12 accumulators + 2 query vectors + 1 broadcast: all 16 AVX2 registers.
template <int ROWS, bool TWO>
void score_block(const float* qt, int64_t H, int64_t h0, const float* r0, int64_t D, float* scores, int64_t n,
                 int64_t t) {
  __m256 a[ROWS][2];
  // The row loops are unrolled before GCC's scalar replacement, so the accumulators live in registers only
  // (left rolled, GCC kept a stack copy of all 12 and stored them on every k: ~3x slower).
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < D; ++k) {
    const __m256 q0 = _mm256_loadu_ps(qt + k * H + h0);
    const __m256 q1 = TWO ? _mm256_loadu_ps(qt + k * H + h0 + 8) : q0;
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const __m256 x = _mm256_broadcast_ss(r0 + i * D + k);
      a[i][0] = _mm256_fmadd_ps(q0, x, a[i][0]);
      if (TWO) a[i][1] = _mm256_fmadd_ps(q1, x, a[i][1]);
    }
  }
  alignas(32) float buf[16];
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
    _mm256_store_ps(buf, a[i][0]);
    if (TWO) _mm256_store_ps(buf + 8, a[i][1]);
    for (int j = 0; j < (TWO ? 16 : 8); ++j) scores[(h0 + j) * n + t + i] = buf[j];
  }
}

template <int ROWS>
void score_rows_block(const float* qt, int64_t H, const float* rows, int64_t D, float* scores, int64_t n, int64_t t) {
  int64_t h0 = 0;
  for (; h0 + 16 <= H; h0 += 16) score_block<ROWS, true>(qt, H, h0, rows + t * D, D, scores, n, t);
  if (h0 < H) score_block<ROWS, false>(qt, H, h0, rows + t * D, D, scores, n, t);
}
#endif

#ifdef KIMIVL_MLA_AVX512
// Scores of ROWS rows for the 16 heads from h0: one accumulator per row (a lane per head), the row's value
// broadcast into the FMA. 12 rows keep 12 independent FMA chains in flight (latency 4 x 2 ports + slack) and
// leave registers free; twice the heads per instruction of the AVX2 block, which was compute-bound at 4K+.
template <int ROWS>
void score_block16(const float* qt, int64_t H, int64_t h0, const float* r0, int64_t D, float* scores, int64_t n,
                   int64_t t) {
  __m512 a[ROWS];
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < D; ++k) {
    const __m512 q = _mm512_loadu_ps(qt + k * H + h0);
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) a[i] = _mm512_fmadd_ps(q, _mm512_set1_ps(r0[i * D + k]), a[i]);
  }
  alignas(64) float buf[16];
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) {
    _mm512_store_ps(buf, a[i]);
    for (int j = 0; j < 16; ++j) scores[(h0 + j) * n + t + i] = buf[j];
  }
}

template <int ROWS>
void score_rows_block16(const float* qt, int64_t H, const float* rows, int64_t D, float* scores, int64_t n,
                        int64_t t) {
  for (int64_t h0 = 0; h0 < H; h0 += 16) score_block16<ROWS>(qt, H, h0, rows + t * D, D, scores, n, t);
}
#endif

// scores[h * n + t] = q[h] . rows[t] for H heads; qt is q transposed (D, H).
void score_rows(const float* qt, int64_t H, const float* rows, int64_t n, int64_t D, float* scores) {
  int64_t t = 0;
#ifdef KIMIVL_MLA_AVX512
  if (H % 16 == 0) {
    for (; t + 12 <= n; t += 12) score_rows_block16<12>(qt, H, rows, D, scores, n, t);
    for (; t + 4 <= n; t += 4) score_rows_block16<4>(qt, H, rows, D, scores, n, t);
    for (; t < n; ++t) score_rows_block16<1>(qt, H, rows, D, scores, n, t);
  }
#endif
#ifdef KIMIVL_MLA_AVX2
  if (H % 8 == 0) {
    for (; t + 6 <= n; t += 6) score_rows_block<6>(qt, H, rows, D, scores, n, t);
    for (; t + 2 <= n; t += 2) score_rows_block<2>(qt, H, rows, D, scores, n, t);
  }
#endif
  for (; t < n; ++t)
    for (int64_t h = 0; h < H; ++h) {
      float s = 0.f;
      for (int64_t k = 0; k < D; ++k) s += qt[k * H + h] * rows[t * D + k];
      scores[h * n + t] = s;
    }
}

// acc[h * R + j] = sum_t p[h * n + t] * rows[t * D + j] for j < R.
void weighted_sum(const float* p, int64_t H, const float* rows, int64_t n, int64_t D, int64_t R, float* acc) {
  int64_t h = 0;
#ifdef KIMIVL_MLA_AVX512
  // 8 heads x 32 latent columns: 16 accumulators, two row loads and eight broadcasts per cache row.
  if (R % 32 == 0) {
    for (; h + 8 <= H; h += 8) {
      for (int64_t j = 0; j < R; j += 32) {
        __m512 a[8][2];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; ++t) {
          const __m512 x0 = _mm512_loadu_ps(rows + t * D + j), x1 = _mm512_loadu_ps(rows + t * D + j + 16);
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) {
            const __m512 w = _mm512_set1_ps(p[(h + i) * n + t]);
            a[i][0] = _mm512_fmadd_ps(w, x0, a[i][0]);
            a[i][1] = _mm512_fmadd_ps(w, x1, a[i][1]);
          }
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          _mm512_storeu_ps(acc + (h + i) * R + j, a[i][0]);
          _mm512_storeu_ps(acc + (h + i) * R + j + 16, a[i][1]);
        }
      }
    }
  }
#endif
#ifdef KIMIVL_MLA_AVX2
  if (R % 16 == 0) {
    for (; h + 4 <= H; h += 4) {
      for (int64_t j = 0; j < R; j += 16) {
        __m256 a[4][2];
        for (int i = 0; i < 4; ++i) a[i][0] = a[i][1] = _mm256_setzero_ps();
        for (int64_t t = 0; t < n; ++t) {
          const __m256 x0 = _mm256_loadu_ps(rows + t * D + j), x1 = _mm256_loadu_ps(rows + t * D + j + 8);
          for (int i = 0; i < 4; ++i) {
            const __m256 w = _mm256_broadcast_ss(p + (h + i) * n + t);
            a[i][0] = _mm256_fmadd_ps(w, x0, a[i][0]);
            a[i][1] = _mm256_fmadd_ps(w, x1, a[i][1]);
          }
        }
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_ps(acc + (h + i) * R + j, a[i][0]);
          _mm256_storeu_ps(acc + (h + i) * R + j + 8, a[i][1]);
        }
      }
    }
  }
#endif
  for (; h < H; ++h) {
    float* out = acc + h * R;
    std::fill(out, out + R, 0.f);
    for (int64_t t = 0; t < n; ++t) {
      const float w = p[h * n + t];
      for (int64_t j = 0; j < R; ++j) out[j] += w * rows[t * D + j];
    }
  }
}

#ifdef KIMIVL_AVX512BF16
// The vdpbf16ps form of a chunk, for a bf16 cache with bf16 W_UK / W_UV (any number of heads; latent width a
// multiple of 32): the products of a bf16 model in bf16, as its prefill (and the official expanded attention)
// takes them. The scaled latent queries are rounded to bf16 once per step and the chunk's probabilities to bf16
// (as bf16 flash kernels round P); every sum stays float32. Per chunk: scores with a lane per head (a pair of
// a cache row broadcast, 12 rows per block), the softmax down the rows (lane-wise, no horizontal sums), then per
// 32 latent columns the chunk's row pairs interleaved into an L1 buffer and every head's probability pairs
// broadcast against them. Per cache row, for 16 heads: 288 + 256 vdpbf16ps of 32 multiply-adds where the float32
// form issues 576 + 512 FMAs of 16, on rows it first widens; a vdpbf16ps issues as fast as an FMA on AMD Zen 4 /
// 5 (twice the FLOPs) but at half the rate on the AMX Xeons measured (docs/performance.md).
namespace dot {

using kimivl_simd::exp_ps;
using kimivl_simd::first_lanes;
using kimivl_simd::pair_bcast;

// S[i * H + h0 + l] = q[h0 + l] . row i for ROWS rows at stride ld and the heads h0 + l of `lanes` (up to 16);
// qp holds q as (pairs, H) pairs of bf16. One accumulator per row (a lane per head), a pair of the row broadcast.
template <int ROWS>
inline void scores(const uint32_t* qp, int64_t H, int64_t h0, __mmask16 lanes, const uint16_t* r0, int64_t ld,
                   int64_t pairs, float* S) {
  __m512 a[ROWS];
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh q = (__m512bh)_mm512_maskz_loadu_epi32(lanes, qp + p * H + h0);
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) a[i] = _mm512_dpbf16_ps(a[i], q, pair_bcast(r0 + i * ld + 2 * p));
  }
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) _mm512_mask_storeu_ps(S + i * H + h0, lanes, a[i]);
}

// Two float32 vectors rounded to bf16 and interleaved: lane l = lo[l] | hi[l] << 16 (a pair for vdpbf16ps).
inline __m512i pack_pair(__m512 lo, __m512 hi) {
  const __m512i a = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i b = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
}

// In place over S (n rows of H heads): per head the chunk's max m and sum l of exp(S - m); P (ceil(n / 2), H)
// = those exps as bf16 pairs of rows (a missing last row and masked keys (-inf) give exact zeros).
inline void softmax_pairs(const float* S, int64_t n, int64_t H, float* m, float* l, uint32_t* P) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), zero = _mm512_setzero_ps();
  for (int64_t h0 = 0; h0 < H; h0 += 16) {
    const __mmask16 lanes = first_lanes(H - h0);
    __m512 mx = ninf;
    for (int64_t t = 0; t < n; ++t) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, lanes, S + t * H + h0));
    _mm512_mask_storeu_ps(m + h0, lanes, mx);
    const __m512 shift = _mm512_mask_mov_ps(mx, _mm512_cmp_ps_mask(mx, ninf, _CMP_EQ_OQ), zero);
    auto ex = [&](int64_t t) {
      if (t >= n) return zero;
      const __m512 s = _mm512_mask_loadu_ps(ninf, lanes, S + t * H + h0);
      return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, ninf, _CMP_NEQ_OQ), exp_ps(_mm512_sub_ps(s, shift)));
    };
    __m512 sum = zero;
    for (int64_t t = 0; t < n; t += 2) {
      const __m512 e0 = ex(t), e1 = ex(t + 1);
      sum = _mm512_add_ps(_mm512_add_ps(sum, e0), e1);
      _mm512_mask_storeu_epi32(P + (t / 2) * H + h0, lanes, pack_pair(e0, e1));
    }
    _mm512_mask_storeu_ps(l + h0, lanes, sum);
  }
}

// out (ceil(n / 2), 32) = 32 columns of the chunk's rows as pairs of rows (a missing last row reads as zeros). One
// in-lane interleave each way (a cheap shuffle, where a full permute costs three on Intel), so the two vectors
// of a row pair hold the columns' pairs in the order {0-3, 8-11, 16-19, 24-27} and {4-7, 12-15, 20-23, 28-31};
// weighted() puts the sums back in column order.
inline void pack_columns(const uint16_t* r0, int64_t ld, int64_t n, uint32_t* out) {
  for (int64_t t = 0; t < n; t += 2) {
    const __m512i x = _mm512_loadu_si512(r0 + t * ld);
    const __m512i y = t + 1 < n ? _mm512_loadu_si512(r0 + (t + 1) * ld) : _mm512_setzero_si512();
    _mm512_storeu_si512(out + (t / 2) * 32, _mm512_unpacklo_epi16(x, y));
    _mm512_storeu_si512(out + (t / 2) * 32 + 16, _mm512_unpackhi_epi16(x, y));
  }
}

// The sums of one head over a 32-column block, lo / hi in the order of pack_columns' two vectors, stored to
// out[0, 32) in column order.
inline void store_columns(__m512 lo, __m512 hi, float* out) {
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo, second, hi));
}

// out[h * ldo + j] = sum_t p[h, t] row t [j] for HB heads from h0 and 32 columns (pack_columns' order in, column
// order out): a head's pair of probabilities broadcast against the two vectors of a row pair.
template <int HB>
inline void weighted(const uint32_t* P, int64_t H, int64_t h0, const uint32_t* cols, int64_t pairs, float* out,
                     int64_t ldo) {
  __m512 a[HB][2];
#pragma GCC unroll 16
  for (int i = 0; i < HB; ++i) a[i][0] = a[i][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(cols + p * 32), x1 = (__m512bh)_mm512_loadu_si512(cols + p * 32 + 16);
#pragma GCC unroll 16
    for (int i = 0; i < HB; ++i) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(P[p * H + h0 + i]));
      a[i][0] = _mm512_dpbf16_ps(a[i][0], w, x0);
      a[i][1] = _mm512_dpbf16_ps(a[i][1], w, x1);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < HB; ++i) store_columns(a[i][0], a[i][1], out + (h0 + i) * ldo);
}

struct Scratch {
  std::vector<float> S;
  std::vector<uint32_t> P, cols;
};

// One chunk of n rows (n <= CHUNK) of a sequence's bf16 cache: max, sum and weighted latents per head, as the
// float32 form's chunk gives them. valid: the chunk's mask entries or nullptr.
inline void chunk(const uint32_t* qp, int64_t H, const uint16_t* rows, int64_t ld, int64_t n, int64_t D, int64_t R,
                  const bool* valid, float* m, float* l, float* acc, Scratch& w) {
  w.S.resize(CHUNK * H);
  w.P.resize((CHUNK / 2) * H);
  w.cols.resize((CHUNK / 2) * 32);
  float* S = w.S.data();
  const int64_t pairs = D / 2;
  for (int64_t h0 = 0; h0 < H; h0 += 16) {
    const __mmask16 lanes = first_lanes(H - h0);
    int64_t t = 0;
    for (; t + 12 <= n; t += 12) scores<12>(qp, H, h0, lanes, rows + t * ld, ld, pairs, S + t * H);
    for (; t + 4 <= n; t += 4) scores<4>(qp, H, h0, lanes, rows + t * ld, ld, pairs, S + t * H);
    for (; t < n; ++t) scores<1>(qp, H, h0, lanes, rows + t * ld, ld, pairs, S + t * H);
  }
  if (valid != nullptr)
    for (int64_t t = 0; t < n; ++t)
      if (!valid[t]) std::fill(S + t * H, S + (t + 1) * H, -std::numeric_limits<float>::infinity());
  softmax_pairs(S, n, H, m, l, w.P.data());
  // 32 columns at a time: their row pairs (8 KiB, in L1) against every head
  const int64_t row_pairs = (n + 1) / 2;
  for (int64_t j0 = 0; j0 < R; j0 += 32) {
    pack_columns(rows + j0, ld, n, w.cols.data());
    int64_t h = 0;
    for (; h + 8 <= H; h += 8) weighted<8>(w.P.data(), H, h, w.cols.data(), row_pairs, acc + j0, R);
    for (; h < H; ++h) weighted<1>(w.P.data(), H, h, w.cols.data(), row_pairs, acc + j0, R);
  }
}

#ifdef KIMIVL_AMX
// The same chunk on AMX tiles (latent width R and row width D multiples of 32, queries as (D / 2, Hp) pairs for Hp =
// H rounded up to 16 heads, the extra heads zero): the same roundings (bf16 queries and probabilities, float32
// sums), other summation orders. Scores as C (16 rows, 16 heads) = A (16 cache rows x 32 columns, read in place
// at the cache's stride) x B (16 pairs of query columns x 16 heads); the softmax as above; the weighted latents as
// C (16 heads, 16 columns) = A (16 heads x 32 rows of probabilities: P transposed to (Hp, pairs)) x B (16 row
// pairs x 16 columns: pack_columns' halves). A tile computes 16 x 16 x 32 products where a vdpbf16ps computes
// 16 x 2: what bounds the chunk is loading its rows into tiles (docs/performance.md). Tiles (all 16 rows x 64
// bytes, configured by the caller): scores 0 / 3 / 4 / 5 (four row tiles), cache rows 1 / 6, queries 2; weighted
// latents 3 / 4 (the two halves), probabilities 5, row pairs 6 / 7.
struct AmxScratch {
  std::vector<float> S, m, l, out;
  std::vector<uint32_t> P, PT, cols;
  std::vector<uint16_t> tail;
};

inline void amx_chunk(const uint32_t* qp, int64_t H, int64_t Hp, const uint16_t* rows, int64_t ld, int64_t n,
                      int64_t D, int64_t R, const bool* valid, float* m, float* l, float* acc, AmxScratch& w,
                      const uint16_t* next, int64_t next_n) {
  const int64_t n16 = (n + 15) / 16 * 16, n32 = (n + 31) / 32 * 32, half = CHUNK / 2;
  w.S.resize(CHUNK * Hp);
  w.P.resize(half * Hp);
  w.PT.resize(Hp * half);
  w.cols.resize(half * 32);
  w.tail.resize(16 * D);
  w.m.resize(Hp);
  w.l.resize(Hp);
  w.out.resize(2 * 256);
  float* S = w.S.data();
  const int64_t full = n / 16;  // whole tiles of rows read in place; the last rows, if any, zero-padded in `tail`
  if (full * 16 < n) {
    std::fill(w.tail.begin(), w.tail.end(), uint16_t(0));
    for (int64_t i = 0; i < n - full * 16; ++i)
      std::memcpy(w.tail.data() + i * D, rows + (full * 16 + i) * ld, D * sizeof(uint16_t));
  }
  auto tile_rows = [&](int64_t tile) { return tile < full ? rows + tile * 16 * ld : w.tail.data(); };
  auto tile_ld = [&](int64_t tile) { return (tile < full ? ld : D) * 2; };
  // The next chunk's lines (this thread's next chunk follows in memory; next_n rows, 0 for none) prefetched into L2,
  // spread over the steps of both loops: tile loads that miss L2 wait for their 16 lines nearly one by one (a
  // chunk from memory took ~2x as long without this).
  const int64_t slots = (n16 / 16 + 3) / 4 * (D / 32) + R / 32;
  const char* ahead = reinterpret_cast<const char*>(next);
  const char* const ahead_end = ahead + next_n * ld * 2;
  const int64_t per_slot = (next_n * ld * 2 / 64 + slots - 1) / slots;
  auto prefetch = [&](int64_t parts) {  // 1 / parts of a slot's lines
    for (int64_t i = 0; i < (per_slot + parts - 1) / parts && ahead < ahead_end; ++i, ahead += 64)
      _mm_prefetch(ahead, _MM_HINT_T1);
  };
  for (int64_t h0 = 0; h0 < Hp; h0 += 16) {
    for (int64_t t0 = 0; t0 < n16 / 16; t0 += 4) {  // up to 4 tiles of rows share each tile of queries
      const int64_t nt = std::min<int64_t>(4, n16 / 16 - t0);
      _tile_zero(0);
      if (nt > 1) _tile_zero(3);
      if (nt > 2) _tile_zero(4);
      if (nt > 3) _tile_zero(5);
      const uint16_t* a0 = tile_rows(t0);
      const uint16_t* a1 = nt > 1 ? tile_rows(t0 + 1) : a0;
      const uint16_t* a2 = nt > 2 ? tile_rows(t0 + 2) : a0;
      const uint16_t* a3 = nt > 3 ? tile_rows(t0 + 3) : a0;
      const int64_t s0 = tile_ld(t0), s1 = nt > 1 ? tile_ld(t0 + 1) : s0, s2 = nt > 2 ? tile_ld(t0 + 2) : s0,
                    s3 = nt > 3 ? tile_ld(t0 + 3) : s0;
      for (int64_t k = 0; k < D; k += 32) {
        const bool pf = h0 == 0;  // the prefetches between the tile operations, a quarter of a slot each
        _tile_loadd(2, qp + (k / 2) * Hp + h0, Hp * 4);
        _tile_loadd(1, a0 + k, s0);
        if (pf) prefetch(4);
        _tile_dpbf16ps(0, 1, 2);
        if (nt > 1) { _tile_loadd(6, a1 + k, s1); if (pf) prefetch(4); _tile_dpbf16ps(3, 6, 2); }
        if (nt > 2) { _tile_loadd(1, a2 + k, s2); if (pf) prefetch(4); _tile_dpbf16ps(4, 1, 2); }
        if (nt > 3) { _tile_loadd(6, a3 + k, s3); if (pf) prefetch(4); _tile_dpbf16ps(5, 6, 2); }
      }
      float* c = S + t0 * 16 * Hp + h0;
      _tile_stored(0, c, Hp * 4);
      if (nt > 1) _tile_stored(3, c + 16 * Hp, Hp * 4);
      if (nt > 2) _tile_stored(4, c + 32 * Hp, Hp * 4);
      if (nt > 3) _tile_stored(5, c + 48 * Hp, Hp * 4);
    }
  }
  if (valid != nullptr)
    for (int64_t t = 0; t < n; ++t)
      if (!valid[t]) std::fill(S + t * Hp, S + (t + 1) * Hp, -std::numeric_limits<float>::infinity());
  softmax_pairs(S, n, Hp, w.m.data(), w.l.data(), w.P.data());
  std::copy(w.m.begin(), w.m.begin() + H, m);
  std::copy(w.l.begin(), w.l.begin() + H, l);
  // probabilities as A operands: (pairs, heads) -> (heads, pairs), zero pairs up to a multiple of 16
  const int64_t pairs = (n + 1) / 2, pairs32 = n32 / 2;
  for (int64_t p = 0; p < pairs32; ++p)
    for (int64_t h = 0; h < Hp; ++h) w.PT[h * half + p] = p < pairs ? w.P[p * Hp + h] : 0u;
  for (int64_t j0 = 0; j0 < R; j0 += 32) {
    prefetch(1);
    pack_columns(rows + j0, ld, n, w.cols.data());
    std::fill(w.cols.begin() + pairs * 32, w.cols.begin() + pairs32 * 32, 0u);
    for (int64_t h0 = 0; h0 < Hp; h0 += 16) {
      _tile_zero(3);
      _tile_zero(4);
      for (int64_t p0 = 0; p0 < pairs32; p0 += 16) {
        _tile_loadd(5, w.PT.data() + h0 * half + p0, half * 4);
        _tile_loadd(6, w.cols.data() + p0 * 32, 128);
        _tile_loadd(7, w.cols.data() + p0 * 32 + 16, 128);
        _tile_dpbf16ps(3, 5, 6);
        _tile_dpbf16ps(4, 5, 7);
      }
      float* lo = w.out.data();
      float* hi = lo + 256;
      _tile_stored(3, lo, 64);
      _tile_stored(4, hi, 64);
      for (int64_t i = 0; i < 16 && h0 + i < H; ++i)
        store_columns(_mm512_loadu_ps(lo + i * 16), _mm512_loadu_ps(hi + i * 16), acc + (h0 + i) * R + j0);
    }
  }
}
#endif

}  // namespace dot
#endif

// In place: scores -> exp(scores - max) per head row (masked keys give 0); returns max and sum per head.
void softmax_parts(float* scores, int64_t H, int64_t n, float* m, float* l) {
  for (int64_t h = 0; h < H; ++h) {
    float* s = scores + h * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
    m[h] = mx;
    if (mx == -std::numeric_limits<float>::infinity()) {  // every key of the chunk masked
      std::fill(s, s + n, 0.f);
      l[h] = 0.f;
      continue;
    }
    int64_t t = 0;
    float sum = 0.f;
#ifdef KIMIVL_MLA_AVX2
    __m256 vs = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(mx);
    for (; t + 8 <= n; t += 8) {
      __m256 e = kimivl_simd::exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
      _mm256_storeu_ps(s + t, e);
      vs = _mm256_add_ps(vs, e);
    }
    alignas(32) float buf[8];
    _mm256_store_ps(buf, vs);
    for (float v : buf) sum += v;
#endif
    for (; t < n; ++t) {
      s[t] = std::exp(s[t] - mx);
      sum += s[t];
    }
    l[h] = sum;
  }
}

#ifdef KIMIVL_MLA_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
#endif

// y[i] = sum_k x[k] * w[k * ldw + i] for i < N (a row vector times a (K, N) matrix), w float or bf16.
// These two products read W_UK and W_UV (4 MB of bf16 per layer at the real size) once per step: they must run
// at the memory's rate, so their outputs are register blocks (128 columns, or 8 rows), not a pass over y per k,
// and they prefetch: a block's rows are 1 KB apart (vec_mat) or 8 rows side by side (mat_vec), patterns the
// hardware prefetcher follows late (one thread read 7-8 GB/s without, 11-12 with, as a plain sequential sum).
template <typename W>
void vec_mat(const float* x, const W* w, int64_t K, int64_t N, int64_t ldw, float* y) {
  int64_t i = 0;
#ifdef KIMIVL_MLA_AVX512
  for (; i + 128 <= N; i += 128) {
    __m512 a[8];
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) a[v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
      const __m512 xk = _mm512_set1_ps(x[k]);
      const W* row = w + k * ldw + i;
      if (k + 16 < K)  // the block's columns 16 rows ahead
        for (int64_t b = 0; b < 128 * int64_t(sizeof(W)); b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(row + 16 * ldw) + b, _MM_HINT_T0);
#pragma GCC unroll 8
      for (int v = 0; v < 8; ++v) a[v] = _mm512_fmadd_ps(xk, load16(row + 16 * v), a[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < 8; ++v) _mm512_storeu_ps(y + i + 16 * v, a[v]);
  }
#endif
  std::fill(y + i, y + N, 0.f);
  for (int64_t k = 0; k < K; ++k) {
    const float xk = x[k];
    const W* row = w + k * ldw;
    int64_t j = i;
#ifdef KIMIVL_MLA_AVX2
    const __m256 vx = _mm256_set1_ps(xk);
    for (; j + 8 <= N; j += 8) {
      const __m256 wv = load8(row + j);
      _mm256_storeu_ps(y + j, _mm256_fmadd_ps(vx, wv, _mm256_loadu_ps(y + j)));
    }
#endif
    for (; j < N; ++j) y[j] += xk * widen(row[j]);
  }
}

// y[i] = w[i] . x for i < N (a (N, K) matrix with row stride ldw times a vector), w float or bf16.
template <typename W>
void mat_vec(const W* w, const float* x, int64_t N, int64_t K, int64_t ldw, float* y) {
  int64_t i = 0;
#ifdef KIMIVL_MLA_AVX512
  if (K % 16 == 0) {
    for (; i + 8 <= N; i += 8) {
      __m512 a[8];
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) a[r] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        if (i + 16 <= N && (k * int64_t(sizeof(W))) % 64 == 0)  // the next block's rows, a line per row and step
#pragma GCC unroll 8
          for (int r = 0; r < 8; ++r)
            _mm_prefetch(reinterpret_cast<const char*>(w + (i + 8 + r) * ldw + k), _MM_HINT_T0);
        const __m512 xv = _mm512_loadu_ps(x + k);
#pragma GCC unroll 8
        for (int r = 0; r < 8; ++r) a[r] = _mm512_fmadd_ps(load16(w + (i + r) * ldw + k), xv, a[r]);
      }
#pragma GCC unroll 8
      for (int r = 0; r < 8; ++r) y[i + r] = _mm512_reduce_add_ps(a[r]);
    }
  }
#endif
  for (; i < N; ++i) {
    const W* row = w + i * ldw;
    int64_t k = 0;
    float s = 0.f;
#ifdef KIMIVL_MLA_AVX2
    __m256 a = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = load8(row + k);
      a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + k), a);
    }
    alignas(32) float buf[8];
    _mm256_store_ps(buf, a);
    for (float v : buf) s += v;
#endif
    for (; k < K; ++k) s += widen(row[k]) * x[k];
    y[i] = s;
  }
}

template <typename KV, typename W>
void run(const MlaArgs& a) {
  const int64_t B = a.B, H = a.H, NOPE = a.nope, ROPE = a.rope, T = a.T, D = a.R + a.rope, R = a.R, V = a.V;
  const float* qn = a.q_nope;
  const float* qp = a.q_pe;
  const KV* kvp = static_cast<const KV*>(a.kv);
  const W* wk = static_cast<const W*>(a.w_uk);
  const W* wv = static_cast<const W*>(a.w_uv);
  const int64_t kv_batch = a.kv_batch, kv_row = a.kv_row;
  // W_UK / W_UV are strided views of kv_b_proj.weight (heads interleave their nope and v rows): read in place.
  const int64_t wk_head = a.wk_head, wk_row = a.wk_row, wv_head = a.wv_head, wv_row = a.wv_row;
  const bool* vp = a.valid;
  const float fscale = a.scale;
  const int64_t form = a.form;

  // 1. Queries in the latent space, transposed to (D, H) per sequence for the score kernel.
  std::vector<float> qt(B * D * H);
  balanced_for(B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      vec_mat(qn + (b * H + h) * NOPE, wk + h * wk_head, NOPE, R, wk_row, row.data());
      for (int64_t k = 0; k < ROPE; ++k) row[R + k] = qp[(b * H + h) * ROPE + k];
      for (int64_t k = 0; k < D; ++k) qt[(b * D + k) * H + h] = row[k] * fscale;
    }
  });

#ifdef KIMIVL_AVX512BF16
  // A bf16 model (bf16 cache and weights) takes the bf16 products' form it asks for: vdpbf16ps, or AMX tiles where
  // the rows are whole tiles (r + rope a multiple of 32; else the float32 form, the faster one on AMX CPUs). The
  // queries as (D / 2, Hq) pairs of bf16, Hq = H, or H rounded up to 16 for AMX (whole tiles of heads, the extra
  // ones zero).
  const bool bf16_ok = std::is_same_v<KV, uint16_t> && std::is_same_v<W, uint16_t> && D % 2 == 0 && R % 32 == 0;
#ifdef KIMIVL_AMX
  const bool use_amx = form == FORM_AMX && bf16_ok && D % 32 == 0;
#else
  const bool use_amx = false;
#endif
  const bool use_dot = use_amx || (form == FORM_VDPBF16 && bf16_ok);
  const int64_t Hq = use_amx ? (H + 15) / 16 * 16 : H;
  std::vector<uint32_t> qpair(use_dot ? B * D / 2 * Hq : 0);
  if (use_dot)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = 0; p < D / 2; ++p)
        for (int64_t h0 = 0; h0 < Hq; h0 += 16) {
          const __mmask16 lanes = kimivl_simd::first_lanes(H - h0);
          const float* q0 = qt.data() + (b * D + 2 * p) * H + h0;
          _mm512_mask_storeu_epi32(qpair.data() + (b * D / 2 + p) * Hq + h0, kimivl_simd::first_lanes(Hq - h0),
                                   dot::pack_pair(_mm512_maskz_loadu_ps(lanes, q0), _mm512_maskz_loadu_ps(lanes, q0 + H)));
        }
#endif

  // 2. Chunks of the cache: local max, sum and weighted latents per head.
  const int64_t chunks = (T + CHUNK - 1) / CHUNK;
  std::vector<float> part_m(B * chunks * H), part_l(B * chunks * H);
  // Every chunk writes its whole slice of part_acc: no zero-filling of B * chunks * H * R floats (4 MiB at 16K).
  std::unique_ptr<float[]> part_acc_buf(new float[B * chunks * H * R]);
  float* part_acc = part_acc_buf.get();
  balanced_for(B * chunks, 1, [&](int64_t c0, int64_t c1) {
#ifdef KIMIVL_AMX
    if (use_amx) {
      kimivl_simd::TileConfig cfg;  // per thread: the tile configuration is thread state
      for (int i = 0; i < 8; ++i) cfg.set(i, 16, 64);
      _tile_loadconfig(&cfg);
      dot::AmxScratch work;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c / chunks, t0 = (c % chunks) * CHUNK, n = std::min(CHUNK, T - t0);
        const uint16_t* rows = reinterpret_cast<const uint16_t*>(kvp) + b * kv_batch + t0 * kv_row;
        // the thread's next chunk, if it is this sequence's next one: prefetched while this one computes
        const int64_t next_n = c + 1 < c1 && t0 + n < T ? std::min(CHUNK, T - t0 - n) : 0;
        dot::amx_chunk(qpair.data() + b * D / 2 * Hq, H, Hq, rows, kv_row, n, D, R,
                       vp != nullptr ? vp + b * T + t0 : nullptr, part_m.data() + c * H, part_l.data() + c * H,
                       part_acc + c * H * R, work, rows + n * kv_row, next_n);
      }
      _tile_release();
      return;
    }
#endif
#ifdef KIMIVL_AVX512BF16
    if (use_dot) {
      dot::Scratch work;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c / chunks, t0 = (c % chunks) * CHUNK, n = std::min(CHUNK, T - t0);
        dot::chunk(qpair.data() + b * D * H / 2, H, reinterpret_cast<const uint16_t*>(kvp) + b * kv_batch + t0 * kv_row,
                   kv_row, n, D, R, vp != nullptr ? vp + b * T + t0 : nullptr, part_m.data() + c * H,
                   part_l.data() + c * H, part_acc + c * H * R, work);
      }
      return;
    }
#endif
    std::vector<float> scratch(CHUNK * D), scores(H * CHUNK);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / chunks, t0 = (c % chunks) * CHUNK, n = std::min(CHUNK, T - t0);
      const float* rows = rows_as_float(kvp + b * kv_batch, kv_row, t0, n, D, scratch.data());
      score_rows(qt.data() + b * D * H, H, rows, n, D, scores.data());
      if (vp != nullptr)
        for (int64_t t = 0; t < n; ++t)
          if (!vp[b * T + t0 + t])
            for (int64_t h = 0; h < H; ++h) scores[h * n + t] = -std::numeric_limits<float>::infinity();
      softmax_parts(scores.data(), H, n, part_m.data() + c * H, part_l.data() + c * H);
      weighted_sum(scores.data(), H, rows, n, D, R, part_acc + c * H * R);
    }
  });

  // 3. Merge the chunks and 4. project through W_UV, per (sequence, head).
  float* op = a.out;
  balanced_for(B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> lat(R);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, part_m[(b * chunks + c) * H + h]);
      std::fill(lat.begin(), lat.end(), 0.f);
      float total = 0.f;
      if (mx != -std::numeric_limits<float>::infinity()) {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t at = (b * chunks + c) * H + h;
          if (part_l[at] == 0.f) continue;
          const float f = std::exp(part_m[at] - mx);
          total += f * part_l[at];
          const float* a = part_acc + at * R;
          for (int64_t j = 0; j < R; ++j) lat[j] += f * a[j];
        }
      }
      // A sequence with no visible key gets zeros (the PyTorch path would give NaN from softmax(-inf)).
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t j = 0; j < R; ++j) lat[j] *= inv;
      mat_vec(wv + h * wv_head, lat.data(), V, R, wv_row, op + (b * H + h) * V);
    }
  });
}

}  // namespace

void check_mla_form(int64_t form) {
  TORCH_CHECK(form == FORM_FLOAT32 || form == FORM_VDPBF16 || form == FORM_AMX, "mla_decode: form must be ",
              FORM_FLOAT32, " (float32), ", FORM_VDPBF16, " (vdpbf16ps) or ", FORM_AMX, " (AMX), got ", form);
  TORCH_CHECK(form != FORM_AMX || bf16_isa() == "amx", "mla_decode: the AMX form asked for, but this build or "
              "process cannot use AMX (bf16_isa() is '", bf16_isa(), "')");
}

void mla_decode_rows(const MlaArgs& a) {
  if (a.kv16 && a.w16)
    run<uint16_t, uint16_t>(a);
  else if (a.kv16)
    run<uint16_t, float>(a);
  else if (a.w16)
    run<float, uint16_t>(a);
  else
    run<float, float>(a);
}

torch::Tensor mla_decode(const torch::Tensor& q_nope, const torch::Tensor& q_pe, const torch::Tensor& kv,
                         const torch::Tensor& w_uk, const torch::Tensor& w_uv, double scale,
                         const c10::optional<torch::Tensor>& valid, int64_t form) {
  for (const auto* t : {&q_nope, &q_pe, &kv, &w_uk, &w_uv})
    TORCH_CHECK(t->device().is_cpu(), "mla_decode: CPU tensors only");
  TORCH_CHECK(q_nope.dim() == 3 && q_pe.dim() == 3 && kv.dim() == 3 && w_uk.dim() == 3 && w_uv.dim() == 3,
              "mla_decode: q_nope (B, H, nope), q_pe (B, H, rope), kv (B, T, r + rope), w_uk (H, nope, r), "
              "w_uv (H, v, r); got ", q_nope.sizes(), ", ", q_pe.sizes(), ", ", kv.sizes(), ", ", w_uk.sizes(), ", ",
              w_uv.sizes());
  const auto q_type = q_nope.scalar_type();
  TORCH_CHECK((q_type == torch::kFloat32 || q_type == torch::kBFloat16) && q_pe.scalar_type() == q_type,
              "mla_decode: queries must both be float32 or both bfloat16, got ", q_type, " and ", q_pe.scalar_type());
  const int64_t B = q_nope.size(0), H = q_nope.size(1), R = w_uk.size(2);
  TORCH_CHECK(q_pe.size(0) == B && q_pe.size(1) == H && kv.size(0) == B && w_uk.size(0) == H &&
                  w_uk.size(1) == q_nope.size(2) && w_uv.size(0) == H && w_uv.size(2) == R &&
                  kv.size(2) == R + q_pe.size(2),
              "mla_decode: shapes do not agree: q_nope ", q_nope.sizes(), ", q_pe ", q_pe.sizes(), ", kv ", kv.sizes(),
              ", w_uk ", w_uk.sizes(), ", w_uv ", w_uv.sizes());
  TORCH_CHECK(kv.stride(2) == 1, "mla_decode: the cache's rows must be contiguous");
  TORCH_CHECK(w_uk.scalar_type() == w_uv.scalar_type(), "mla_decode: w_uk and w_uv differ in dtype");
  check_mla_form(form);
  c10::optional<torch::Tensor> mask;
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == torch::kBool && valid->dim() == 2 && valid->size(0) == B &&
                    valid->size(1) == kv.size(1),
                "mla_decode: valid must be bool (B, T) = (", B, ", ", kv.size(1), "), got ", valid->sizes());
    mask = valid->contiguous();
  }
  // Weights only need contiguous rows (the split views of kv_b_proj.weight have them): no per-step copy.
  auto rows_contiguous = [](const torch::Tensor& w) { return w.stride(2) == 1 ? w : w.contiguous(); };
  auto qn = q_nope.to(torch::kFloat32).contiguous(), qp = q_pe.to(torch::kFloat32).contiguous();
  auto wk = rows_contiguous(w_uk), wv = rows_contiguous(w_uv);
  const bool kv16 = kv.scalar_type() == torch::kBFloat16, w16 = wk.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(kv16 || kv.scalar_type() == torch::kFloat32, "mla_decode: the cache must be float32 or bfloat16");
  TORCH_CHECK(w16 || wk.scalar_type() == torch::kFloat32, "mla_decode: W_UK / W_UV must be float32 or bfloat16");
  auto out = torch::empty({B, H, w_uv.size(1)}, q_nope.options().dtype(torch::kFloat32));
  const MlaArgs args{qn.data_ptr<float>(), qp.data_ptr<float>(), B, H, q_nope.size(2), q_pe.size(2), kv.data_ptr(),
                     kv16, kv.size(1), kv.stride(0), kv.stride(1), wk.data_ptr(), wv.data_ptr(), w16, R,
                     w_uv.size(1), wk.stride(0), wk.stride(1), wv.stride(0), wv.stride(1),
                     mask.has_value() ? mask->data_ptr<bool>() : nullptr, static_cast<float>(scale), form,
                     out.data_ptr<float>()};
  mla_decode_rows(args);
  return out.to(q_type);  // computed in float32, answered in the queries' dtype
}
