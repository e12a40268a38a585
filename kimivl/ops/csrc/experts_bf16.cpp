// The routed experts of a MoE layer over a prefill's tokens, on CPUs with AMX or AVX512-BF16 (and in float32
// products on AVX2 ones, at the end of the kernels): every expert's gated-SiLU MLP on its contiguous block of
// expert-sorted rows, all experts in one call.
//
// Why not a library GEMM per expert: a prefill gives each of 64 experts only ~tokens * 6 / 64 rows (~50 at
// 512 tokens), and a bf16 GEMM library multiplies x (n, K) @ w.T by first copying w (N, K) into its blocked
// pairs-of-K layout, a pass over the expert's 17 MB that costs about as much as the product at 50 rows; and
// splitting a 50-row GEMM between threads halves its efficiency again.
// Here the product is computed transposed, C^T = w @ x^T: the weights are the A operand, read in place (16
// rows x 32 columns of w is one AMX tile at stride K; two adjacent bf16 of a row are one vdpbf16ps broadcast
// pair), and only the small activations are packed: x^T as pairs of K, 16 tokens wide (the B layout of both).
// Accumulation is float32; each projection's output is rounded to bf16 as the PyTorch path rounds it (gate, up,
// silu(gate), the product, the down projection), so results differ from it only in summation order (and AMX
// flushes denormals).
// Experts are split between threads whole (longest first, each to whichever thread is free), so no thread waits
// for another inside the layer and each streams its own experts' weights, with software prefetch: the 6-12 weight rows
// of a register block (16 of an AMX tile) are as many concurrent streams on as many pages, which the hardware
// prefetcher does not follow.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "bf16_simd.h"
#include "kernels.h"
#include "parallel.h"

#ifdef KIMIVL_AVX512BF16
namespace {

using kimivl_simd::dot_block;
using kimivl_simd::exp_ps;
using kimivl_simd::round_bf16;
#ifdef KIMIVL_AMX
using kimivl_simd::amx_permitted;
using kimivl_simd::TileConfig;
#endif

// K block (elements): the real widths (2048, 1408) in one block, so a register block's weight rows are one stream
// each from the first column to the last (blocks of 1024 restarted MR cold streams every 2 KB; one block ran 48-64
// rows 10-20 % faster in the FMA-issue proxy, docs/performance.md); a 64-token panel of x is then 256 KB, in L2.
constexpr int64_t KC = 2048;

// n rows of K bf16 (row t at rows[t]) -> pairs (K / 2, nt) of uint32 (x[t][2p] | x[t][2p+1] << 16), the
// columns n..nt zero (nt is n rounded up to 16: one vector of tokens).
void pack_pairs(const uint16_t* const* rows, int64_t n, int64_t K, int64_t nt, uint32_t* out) {
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* row = rows[t];
    for (int64_t p = 0; p < K / 2; ++p) {
      uint32_t v;
      std::memcpy(&v, row + 2 * p, sizeof(v));
      out[p * nt + t] = v;
    }
  }
  for (int64_t p = 0; p < K / 2; ++p)
    for (int64_t t = n; t < nt; ++t) out[p * nt + t] = 0;
}

// The register blocks gemm_t uses: (rows, token vectors) with rows * vectors <= 24 accumulators.
inline void micro_block(int mr, int nv, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t nt, int64_t pairs,
                        float* c, bool accumulate, const uint16_t* next = nullptr) {
  switch (mr * 8 + nv) {
    case 12 * 8 + 1: dot_block<12, 1>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 12 * 8 + 2: dot_block<12, 2>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 8 * 8 + 3: dot_block<8, 3>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 6 * 8 + 1: dot_block<6, 1>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 6 * 8 + 2: dot_block<6, 2>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 6 * 8 + 3: dot_block<6, 3>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 6 * 8 + 4: dot_block<6, 4>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 1 * 8 + 1: dot_block<1, 1>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 1 * 8 + 2: dot_block<1, 2>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 1 * 8 + 3: dot_block<1, 3>(a, lda, b, nt, pairs, c, accumulate, next); break;
    case 1 * 8 + 4: dot_block<1, 4>(a, lda, b, nt, pairs, c, accumulate, next); break;
    default: TORCH_CHECK(false, "experts_bf16: no register block of ", mr, " rows x ", nv, " token vectors");
  }
}

// Rows per register block for NV token vectors: MR * NV accumulators + NV panel vectors within 32 registers, and
// at most 12 rows: rows of 2048 bf16 are 4 KB apart, so the lines in use of every row fall in the same sets of a
// 12-way L1 (Zen 5's and recent Xeons'); 24 rows for one token vector thrashed them (12 rows: 1.5x as fast).
constexpr int rows_for(int nv) { return nv <= 2 ? 12 : nv == 3 ? 8 : 6; }

// c (M, nt) float32 = w (M, K) bf16 row-major @ x^T, x^T given as pairs (K / 2, nt).
void gemm_t(const uint16_t* w, int64_t M, int64_t K, const uint32_t* xp, int64_t nt, float* c) {
  // One 16..64-token chunk: the largest row block for its width. Wider: 6 rows against every 64-token chunk
  // in turn, so the block's weights are read from memory once and then from L1.
  const int nv_all = static_cast<int>(std::min<int64_t>(nt / 16, 4));
  const int mr = nt <= 64 ? rows_for(nv_all) : 6;
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t pairs = std::min(KC, K - k0) / 2;
    const bool acc = k0 > 0;
    const uint32_t* xk = xp + (k0 / 2) * nt;
    int64_t m0 = 0;
    for (; m0 < M; m0 += mr) {
      const int rows = static_cast<int>(std::min<int64_t>(mr, M - m0));
      for (int64_t n0 = 0; n0 < nt; n0 += 64) {
        const int nv = static_cast<int>(std::min<int64_t>((nt - n0) / 16, 4));
        const uint16_t* a = w + m0 * K + k0;
        float* cb = c + m0 * nt + n0;
        if (rows == mr) {  // after the last token chunk, the next row block's first lines are prefetched
          const uint16_t* next = n0 + 64 >= nt && m0 + 2 * mr <= M ? a + mr * K : nullptr;
          micro_block(mr, nv, a, K, xk + n0, nt, pairs, cb, acc, next);
        } else {  // the last few rows, one at a time
          for (int r = 0; r < rows; ++r) micro_block(1, nv, a + r * K, K, xk + n0, nt, pairs, cb + r * nt, acc);
        }
      }
    }
  }
}

// h = bf16(bf16(silu(bf16(gate))) * bf16(up)) for c = [gate rows (I, nt); up rows (I, nt)], written as pairs
// (I / 2, nt) for the down projection. Rows i and i + 1 make one pair: their 16-token vectors interleave.
void silu_mul_pack(const float* c, int64_t I, int64_t nt, uint32_t* hp) {
  const __m512 one = _mm512_set1_ps(1.0f);
  auto act = [&](int64_t i, int64_t t) {
    const __m512 g = round_bf16(_mm512_loadu_ps(c + i * nt + t));
    const __m512 u = round_bf16(_mm512_loadu_ps(c + (I + i) * nt + t));
    const __m512 s = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    return _mm512_cvtneps_pbh(_mm512_mul_ps(s, u));
  };
  // element 2m <- a_m (half m), element 2m + 1 <- b_m (half 16 + m)
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t i = 0; i < I; i += 2) {
    for (int64_t t = 0; t < nt; t += 16) {
      // a = 16 bf16 of row i, b = 16 of row i + 1 -> (a0 b0 a1 b1 ...) as 16 pairs = 32 halves
      const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)act(i, t)), (__m256i)act(i + 1, t), 1);
      _mm512_storeu_si512(hp + (i / 2) * nt + t, _mm512_permutexvar_epi16(interleave, ab));
    }
  }
}


// c (D, nt) float32 -> n rows of D bf16 (row t at rows[t]): the transpose back, rounding each value once.
void unpack_rows(const float* c, int64_t D, int64_t nt, int64_t n, uint16_t* const* rows) {
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(static_cast<int>(nt)));
  for (int64_t t = 0; t < n; ++t) {
    uint16_t* row = rows[t];
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) {
      const __m512 v = _mm512_i32gather_ps(column, c + d * nt + t, 4);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + d), (__m256i)_mm512_cvtneps_pbh(v));
    }
    if (d < D) {  // D % 16 columns: a masked gather and store
      const __mmask16 m = static_cast<__mmask16>((1u << (D - d)) - 1);
      const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, column, c + d * nt + t, 4);
      _mm256_mask_storeu_epi16(row + d, m, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

// out[t] = bf16(sum over slots j in order of float32(w[t][j] * y[t * k + j])): moe_dispatch's weighting and sum;
// pair p's expert output row (D bf16) is at y[p].
void combine_rows(const uint16_t* const* y, const float* w, int64_t k, int64_t D, int64_t t0, int64_t t1,
                  uint16_t* out) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t d = 0;
    for (; d < D; d += 16) {
      const __mmask16 m = D - d >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (D - d)) - 1);
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < k; ++j) {
        const __m256i h = _mm256_maskz_loadu_epi16(m, y[t * k + j] + d);
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_set1_ps(w[t * k + j]), v));  // two roundings, as torch
      }
      _mm256_mask_storeu_epi16(out + t * D + d, m, (__m256i)_mm512_cvtneps_pbh(acc));
    }
  }
}

#ifdef KIMIVL_AMX
// c (16, 16 * NT) float32 = a (16 rows of w from column 0, stride lda elements; K of them) @ b (pairs (K / 2, nt)).
// Tiles: 0..NT-1 the outputs, 6 the weights, 7 the tokens; a pass streams its 16 weight rows once.
template <int NT>
inline void amx_rows(const uint16_t* a, int64_t lda, int64_t K, const uint32_t* b, int64_t nt, float* c) {
  static_assert(NT >= 1 && NT <= 6, "six output tiles at most");
  if (NT > 0) _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (NT > 2) _tile_zero(2);
  if (NT > 3) _tile_zero(3);
  if (NT > 4) _tile_zero(4);
  if (NT > 5) _tile_zero(5);
  const int64_t sb = nt * 4;
  for (int64_t k = 0; k < K; k += 32) {
    if (k + 256 < K)  // the weight rows 8 steps ahead: 16 rows on 16 pages defeat the hardware prefetcher
      for (int r = 0; r < 16; ++r) _mm_prefetch(reinterpret_cast<const char*>(a + r * lda + k + 256), _MM_HINT_T0);
    _tile_loadd(6, a + k, lda * 2);
    const uint32_t* bk = b + (k / 2) * nt;
    if (NT > 0) { _tile_loadd(7, bk, sb); _tile_dpbf16ps(0, 6, 7); }
    if (NT > 1) { _tile_loadd(7, bk + 16, sb); _tile_dpbf16ps(1, 6, 7); }
    if (NT > 2) { _tile_loadd(7, bk + 32, sb); _tile_dpbf16ps(2, 6, 7); }
    if (NT > 3) { _tile_loadd(7, bk + 48, sb); _tile_dpbf16ps(3, 6, 7); }
    if (NT > 4) { _tile_loadd(7, bk + 64, sb); _tile_dpbf16ps(4, 6, 7); }
    if (NT > 5) { _tile_loadd(7, bk + 80, sb); _tile_dpbf16ps(5, 6, 7); }
  }
  if (NT > 0) _tile_stored(0, c, sb);
  if (NT > 1) _tile_stored(1, c + 16, sb);
  if (NT > 2) _tile_stored(2, c + 32, sb);
  if (NT > 3) _tile_stored(3, c + 48, sb);
  if (NT > 4) _tile_stored(4, c + 64, sb);
  if (NT > 5) _tile_stored(5, c + 80, sb);
}

// gemm_t on AMX tiles (M % 16 == 0, K % 32 == 0; the caller has loaded the tile configuration).
void gemm_t_amx(const uint16_t* w, int64_t M, int64_t K, const uint32_t* xp, int64_t nt, float* c) {
  // row blocks outer: a block's 16 weight rows come from memory once and from cache for every further 96 tokens
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    for (int64_t n0 = 0; n0 < nt; n0 += 96) {
      const int tiles = static_cast<int>(std::min<int64_t>((nt - n0) / 16, 6));
      const uint16_t* a = w + m0 * K;
      float* cb = c + m0 * nt + n0;
      switch (tiles) {
        case 1: amx_rows<1>(a, K, K, xp + n0, nt, cb); break;
        case 2: amx_rows<2>(a, K, K, xp + n0, nt, cb); break;
        case 3: amx_rows<3>(a, K, K, xp + n0, nt, cb); break;
        case 4: amx_rows<4>(a, K, K, xp + n0, nt, cb); break;
        case 5: amx_rows<5>(a, K, K, xp + n0, nt, cb); break;
        default: amx_rows<6>(a, K, K, xp + n0, nt, cb); break;
      }
    }
  }
}
#endif

}  // namespace
#endif

#if !defined(KIMIVL_AVX512BF16) && defined(KIMIVL_SIMD_AVX2)
// The AVX2 path (CPUs without AVX512-BF16: Zen 2 / 3, Intel client cores): the same transposed products, in
// float32. x^T is packed as float32 (K, nt), 8 tokens to a vector; the weights are read as bf16 once per 64-token
// chunk, a block of 6 rows at a time widened into a small float32 buffer and broadcast from there: no float32
// copy of a whole expert (the module path's upcast, a pass writing twice the expert's bytes) and no GEMM library
// call per expert.
#define KIMIVL_EXPERTS_AVX2 1
namespace {

using kimivl_simd::bf16_bits_8;
using kimivl_simd::exp8;
using kimivl_simd::round_bf16_8;
using kimivl_simd::widen_8;

// Tokens per chunk: x^T of a chunk is K x 64 float32 = 512 KB at K = 2048, about an L2; each chunk streams the
// expert's weights once.
constexpr int64_t CHUNK_TOKENS = 64;

// n rows of K bf16 (row t at rows[t]) -> x^T (K, nt) float32, the columns n..nt zero (nt a multiple of 8).
void pack_cols(const uint16_t* const* rows, int64_t n, int64_t K, int64_t nt, float* out) {
  for (int64_t k = 0; k < K; ++k) std::fill(out + k * nt + n, out + (k + 1) * nt, 0.f);
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* row = rows[t];
    int64_t k = 0;
    alignas(32) float buf[8];
    for (; k + 8 <= K; k += 8) {
      _mm256_store_ps(buf, widen_8(row + k));
      for (int j = 0; j < 8; ++j) out[(k + j) * nt + t] = buf[j];
    }
    for (; k < K; ++k) out[k * nt + t] = widen(row[k]);
  }
}

// c (MR, 8 * NV) float32 = MR rows of w (float32, stride K) @ x^T (K rows of nt), c's rows at stride nt: a
// weight broadcast against NV vectors of x^T per row and k. MR * NV accumulators + NV vectors + the broadcast:
// at most 16 registers; 12 independent FMA chains keep both FMA pipes busy (latency 4, 2 per cycle).
template <int MR, int NV>
inline void fma_block(const float* w, int64_t K, const float* xt, int64_t nt, float* c) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 x[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) x[v] = _mm256_loadu_ps(xt + k * nt + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 b = _mm256_broadcast_ss(w + r * K + k);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(b, x[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + r * nt + 8 * v, acc[r][v]);
}

template <int MR>
void fma_rows(const float* w, int64_t K, const float* xt, int64_t nt, float* c) {
  int64_t n0 = 0;
  for (; n0 + 16 <= nt; n0 += 16) fma_block<MR, 2>(w, K, xt + n0, nt, c + n0);
  if (n0 < nt) fma_block<MR, 1>(w, K, xt + n0, nt, c + n0);
}

// Rows per block: the block's weights widened to float32 once (6 x 2048 x 4 = 48 KB, L1 / L2) and broadcast from
// there for every 16 tokens of the chunk, instead of widening each weight in registers once per 16 tokens (a
// shift and a mask per pair on the FMA pipes' ports: 56 GFLOP/s against 80+ this way on a 2-core Zen 3).
constexpr int64_t MR_F32 = 6;

// 8 int8 weights at p as float32 times `scale`: dequantize_weight's product (one rounding), bit for bit.
inline __m256 widen_int8_8(const int8_t* p, __m256 scale) {
  const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), scale);
}

// Rows [m0, m0 + rows) of w (K columns) as float32 into wbuf: bf16 widened, or int8 times its row's scale.
void widen_rows(const WeightRows& w, int64_t m0, int64_t rows, int64_t K, float* wbuf) {
  if (!w.int8()) {
    const uint16_t* src = static_cast<const uint16_t*>(w.data) + m0 * K;
    int64_t i = 0;
    for (; i + 8 <= rows * K; i += 8) _mm256_storeu_ps(wbuf + i, widen_8(src + i));
    for (; i < rows * K; ++i) wbuf[i] = widen(src[i]);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* src = static_cast<const int8_t*>(w.data) + (m0 + r) * K;
    const float scale = w.scale[m0 + r];
    const __m256 sv = _mm256_set1_ps(scale);
    float* dst = wbuf + r * K;
    int64_t i = 0;
    for (; i + 8 <= K; i += 8) _mm256_storeu_ps(dst + i, widen_int8_8(src + i, sv));
    for (; i < K; ++i) dst[i] = static_cast<float>(src[i]) * scale;
  }
}

// c (M, nt) float32 = w (M, K) row-major (bf16, or int8 with its scales) @ x^T (K, nt) float32; wbuf holds
// MR_F32 * K floats.
void gemm_f32(const WeightRows& w, int64_t M, int64_t K, const float* xt, int64_t nt, float* c, float* wbuf) {
  for (int64_t m0 = 0; m0 < M; m0 += MR_F32) {
    const int64_t rows = std::min(MR_F32, M - m0);
    widen_rows(w, m0, rows, K, wbuf);
    float* cb = c + m0 * nt;
    switch (rows) {
      case 6: fma_rows<6>(wbuf, K, xt, nt, cb); break;
      case 5: fma_rows<5>(wbuf, K, xt, nt, cb); break;
      case 4: fma_rows<4>(wbuf, K, xt, nt, cb); break;
      case 3: fma_rows<3>(wbuf, K, xt, nt, cb); break;
      case 2: fma_rows<2>(wbuf, K, xt, nt, cb); break;
      default: fma_rows<1>(wbuf, K, xt, nt, cb); break;
    }
  }
}

// h^T (I, nt) = bf16(bf16(silu(bf16(gate))) * bf16(up)) as float32, for c = [gate rows (I, nt); up rows (I, nt)]:
// the module's roundings, and the x^T of the down projection.
void silu_mul_cols(const float* c, int64_t I, int64_t nt, float* ht) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  for (int64_t i = 0; i < I * nt; i += 8) {
    const __m256 g = round_bf16_8(_mm256_loadu_ps(c + i));
    const __m256 u = round_bf16_8(_mm256_loadu_ps(c + I * nt + i));
    const __m256 s = round_bf16_8(_mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g)))));
    _mm256_storeu_ps(ht + i, round_bf16_8(_mm256_mul_ps(s, u)));
  }
}

// c (D, nt) float32 -> n rows of D bf16 (row t at rows[t]): the transpose back, rounding each value once.
void unpack_rows(const float* c, int64_t D, int64_t nt, int64_t n, uint16_t* const* rows) {
  alignas(32) float buf[8];
  for (int64_t t = 0; t < n; ++t) {
    uint16_t* row = rows[t];
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      for (int j = 0; j < 8; ++j) buf[j] = c[(d + j) * nt + t];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(row + d), bf16_bits_8(round_bf16_8(_mm256_load_ps(buf))));
    }
    for (; d < D; ++d) row[d] = c10::BFloat16(c[d * nt + t]).x;  // torch's rounding, as round_bf16_8's
  }
}

// One expert over its rows, in chunks of CHUNK_TOKENS: gate_up rows (2I, D), down (D, I), scratch for a chunk.
struct ExpertScratch {
  std::vector<float> xt, c1, ht, c2, wbuf;
  ExpertScratch(int64_t D, int64_t I)
      : xt(D * CHUNK_TOKENS), c1(2 * I * CHUNK_TOKENS), ht(I * CHUNK_TOKENS), c2(D * CHUNK_TOKENS),
        wbuf(MR_F32 * std::max(D, I)) {}
};

// gate and up (I, D) each (for a bf16 stack, the two halves of the expert's gate_up rows), down (D, I).
void run_expert(const WeightRows& gate, const WeightRows& up, const WeightRows& down, int64_t D, int64_t I,
                const uint16_t* const* in, int64_t rows, uint16_t* const* out, ExpertScratch& s) {
  for (int64_t r0 = 0; r0 < rows; r0 += CHUNK_TOKENS) {
    const int64_t n = std::min(CHUNK_TOKENS, rows - r0), nt = (n + 7) / 8 * 8;
    pack_cols(in + r0, n, D, nt, s.xt.data());
    gemm_f32(gate, I, D, s.xt.data(), nt, s.c1.data(), s.wbuf.data());
    gemm_f32(up, I, D, s.xt.data(), nt, s.c1.data() + I * nt, s.wbuf.data());
    silu_mul_cols(s.c1.data(), I, nt, s.ht.data());
    gemm_f32(down, D, I, s.ht.data(), nt, s.c2.data(), s.wbuf.data());
    unpack_rows(s.c2.data(), D, nt, n, out + r0);
  }
}

// out[t] = bf16(sum over slots j in order of float32(w[t][j] * y[t * k + j])): moe_dispatch's weighting and sum;
// pair p's expert output row (D bf16) is at y[p].
void combine_rows(const uint16_t* const* y, const float* w, int64_t k, int64_t D, int64_t t0, int64_t t1,
                  uint16_t* out) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t j = 0; j < k; ++j)  // a product, then a sum: two roundings, as torch
        acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(w[t * k + j]), widen_8(y[t * k + j] + d)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + t * D + d), bf16_bits_8(round_bf16_8(acc)));
    }
    for (; d < D; ++d) {
      float acc = 0.f;
      for (int64_t j = 0; j < k; ++j) acc += w[t * k + j] * widen(y[t * k + j][d]);  // (-ffp-contract=off: no FMA)
      out[t * D + d] = c10::BFloat16(acc).x;
    }
  }
}

}  // namespace
#endif

namespace {
struct Work {
  int64_t expert, first, rows;  // rows (token, slot) pairs of the expert, listed from pairs[first]
  int64_t out;                  // its first output row in ys (this file's kernels only)
};

// x (T, D) bf16, topk_idx (T, k) int64 and topk_weight (T, k) float32 on the CPU: checked, `who` names the caller.
void check_routing(const char* who, const torch::Tensor& x, const torch::Tensor& topk_idx,
                   const torch::Tensor& topk_weight) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kBFloat16, who,
              ": x must be a bfloat16 (T, D) CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t T = x.size(0);
  TORCH_CHECK(topk_idx.device().is_cpu() && topk_idx.dim() == 2 && topk_idx.size(0) == T &&
                  topk_idx.scalar_type() == torch::kInt64 && topk_weight.sizes() == topk_idx.sizes() &&
                  topk_weight.scalar_type() == torch::kFloat32,
              who, ": topk_idx (T, k) int64 and topk_weight (T, k) float32 with T = ", T, ", got ", topk_idx.sizes(),
              " ", topk_idx.scalar_type(), " and ", topk_weight.sizes(), " ", topk_weight.scalar_type());
}

// The (token, slot) pairs of idx (P = T * k expert ids) grouped by expert, each group in (token, slot) order (a
// stable sort by expert id): expert e's pairs are pairs[first[e] : first[e] + counts[e]].
struct ExpertPairs {
  std::vector<int64_t> counts, first, pairs;
};

ExpertPairs group_pairs(const char* who, const int64_t* idx, int64_t P, int64_t E, int64_t k) {
  ExpertPairs g{std::vector<int64_t>(E, 0), std::vector<int64_t>(E, 0), std::vector<int64_t>(P)};
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(idx[p] >= 0 && idx[p] < E, who, ": expert id ", idx[p], " chosen for token ", p / k,
                " of a layer of ", E, " experts");
    ++g.counts[idx[p]];
  }
  for (int64_t e = 1; e < E; ++e) g.first[e] = g.first[e - 1] + g.counts[e - 1];
  std::vector<int64_t> fill(g.first);
  for (int64_t p = 0; p < P; ++p) g.pairs[fill[idx[p]]++] = p;
  return g;
}
}  // namespace

// What this build can run here: "amx" (AMX tiles, permitted by the kernel), "avx512_bf16", or "" (neither): the
// prefill experts' path, and whether attention_bf16 is compiled in (any non-empty answer).
std::string bf16_isa() {
#if defined(KIMIVL_AMX)
  if (amx_permitted()) return "amx";
#endif
#if defined(KIMIVL_AVX512BF16)
  return "avx512_bf16";
#else
  return "";
#endif
}

// The prefill experts' path of moe_experts_bf16 in this build here: bf16_isa()'s answer, else "avx2" (float32
// products from bf16 weights; a CPU without AVX512-BF16), else "".
std::string experts_isa() {
  const std::string isa = bf16_isa();
#ifdef KIMIVL_EXPERTS_AVX2
  if (isa.empty()) return "avx2";
#endif
  return isa;
}

torch::Tensor moe_experts_bf16(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                               const torch::Tensor& gate_up, const torch::Tensor& down, bool use_amx,
                               int64_t max_rows) {
  check_routing("moe_experts_bf16", x, topk_idx, topk_weight);
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(gate_up.device().is_cpu() && down.device().is_cpu() && gate_up.dim() == 3 && down.dim() == 3 &&
                  gate_up.scalar_type() == torch::kBFloat16 && down.scalar_type() == torch::kBFloat16 &&
                  gate_up.is_contiguous() && down.is_contiguous(),
              "moe_experts_bf16: gate_up (E, 2I, D) and down (E, D, I) must be contiguous bfloat16 CPU tensors, "
              "got ", gate_up.sizes(), " and ", down.sizes());
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2, k = topk_idx.size(1), P = T * k;
  TORCH_CHECK(gate_up.size(1) == 2 * I && gate_up.size(2) == D && down.size(0) == E && down.size(1) == D &&
                  down.size(2) == I,
              "moe_experts_bf16: x has ", D, " features; gate_up ", gate_up.sizes(), " and down ", down.sizes(),
              " must be (E, 2I, ", D, ") and (E, ", D, ", I)");
  TORCH_CHECK(D % 2 == 0 && I % 2 == 0, "moe_experts_bf16: hidden size ", D, " and expert width ", I,
              " must be even");
  const bool amx = use_amx && bf16_isa() == "amx";
  TORCH_CHECK(!use_amx || amx, "moe_experts_bf16: AMX asked for, but this build or process cannot use it");
  TORCH_CHECK(!amx || (D % 32 == 0 && I % 32 == 0), "moe_experts_bf16: AMX tiles need hidden size ", D,
              " and expert width ", I, " in multiples of 32");
#if !defined(KIMIVL_AVX512BF16) && !defined(KIMIVL_EXPERTS_AVX2)
  TORCH_CHECK(false, "moe_experts_bf16: this build has neither an AVX512-BF16 nor an AVX2 path (check experts_isa() "
              "first)");
#else
  auto idx_c = topk_idx.contiguous();
  auto w_c = topk_weight.contiguous();
  ExpertPairs grouped = group_pairs("moe_experts_bf16", idx_c.data_ptr<int64_t>(), P, E, k);
  std::vector<int64_t>&counts = grouped.counts, &first = grouped.first, &pairs = grouped.pairs;
  // Experts of up to max_rows rows run in this file's kernels, wider ones as the GEMM library's products (which
  // win there, see kimivl/ops/moe.py) with the gathering, activation and combining done here all the same.
  std::vector<Work> work, wide;
  int64_t narrow_rows = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (counts[e] == 0) continue;
    if (counts[e] <= max_rows) {
      work.push_back({e, first[e], counts[e], narrow_rows});
      narrow_rows += counts[e];
    } else {
      wide.push_back({e, first[e], counts[e], -1});
    }
  }
  // Longest first, each to whichever thread is free (a thread slowed by another process takes fewer).
  std::stable_sort(work.begin(), work.end(), [](const Work& a, const Work& b) { return a.rows > b.rows; });
  auto xc = x.contiguous();
  // each (token, slot) pair's expert output, bf16 as the module's: rows of ys for this file's kernels, rows of
  // the GEMM library's outputs for the wide experts (read in place by the weighted sum, not copied into ys)
  auto ys = torch::empty({narrow_rows, D}, x.options());
  std::vector<const uint16_t*> src(P);  // pair p's output row
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint16_t* gu = reinterpret_cast<const uint16_t*>(gate_up.data_ptr<at::BFloat16>());
  const uint16_t* dn = reinterpret_cast<const uint16_t*>(down.data_ptr<at::BFloat16>());
  uint16_t* yb = reinterpret_cast<uint16_t*>(ys.data_ptr<at::BFloat16>());
  // expert w's input rows (its tokens' rows of x) and output rows (its rows of ys, which pair p's output is read from)
  const auto expert_rows = [&](const Work& w, const uint16_t** in, uint16_t** out) {
    for (int64_t r = 0; r < w.rows; ++r) {
      const int64_t p = pairs[w.first + r];
      in[r] = xb + (p / k) * D;
      out[r] = yb + (w.out + r) * D;
      src[p] = out[r];
    }
  };
  take_in_turn(static_cast<int64_t>(work.size()), [&](const auto& take) {
#ifdef KIMIVL_EXPERTS_AVX2
    ExpertScratch scratch(D, I);
    const int64_t widest = work.front().rows;  // (sorted: the first is the widest)
    std::vector<const uint16_t*> in(widest);
    std::vector<uint16_t*> out(widest);
    for (int64_t i; (i = take()) >= 0;) {
      const Work& w = work[i];
      expert_rows(w, in.data(), out.data());
      const uint16_t* g = gu + w.expert * 2 * I * D;
      run_expert(bf16_rows(g), bf16_rows(g + I * D), bf16_rows(dn + w.expert * D * I), D, I, in.data(), w.rows,
                 out.data(), scratch);
    }
#else
#ifdef KIMIVL_AMX
    if (amx) {  // per thread: the tile configuration is thread state
      TileConfig cfg;
      for (int i = 0; i < 8; ++i) cfg.set(i, 16, 64);  // every tile 16 rows x 64 bytes
      _tile_loadconfig(&cfg);
    }
    auto gemm = [&](const uint16_t* w, int64_t M, int64_t K, const uint32_t* xp, int64_t nt, float* c) {
      if (amx) gemm_t_amx(w, M, K, xp, nt, c); else gemm_t(w, M, K, xp, nt, c);
    };
#else
    auto gemm = gemm_t;
#endif
    const int64_t widest = (work.front().rows + 15) / 16 * 16;  // (sorted: the first is the widest)
    std::vector<uint32_t> xpk(D / 2 * widest), hpk(I / 2 * widest);
    std::vector<float> c1(2 * I * widest), c2(D * widest);
    std::vector<const uint16_t*> in(widest);
    std::vector<uint16_t*> out(widest);
    for (int64_t i; (i = take()) >= 0;) {
      const Work& w = work[i];
      const int64_t nt = (w.rows + 15) / 16 * 16;
      expert_rows(w, in.data(), out.data());
      pack_pairs(in.data(), w.rows, D, nt, xpk.data());
      gemm(gu + w.expert * 2 * I * D, 2 * I, D, xpk.data(), nt, c1.data());
      silu_mul_pack(c1.data(), I, nt, hpk.data());
      gemm(dn + w.expert * D * I, D, I, hpk.data(), nt, c2.data());
      unpack_rows(c2.data(), D, nt, w.rows, out.data());
    }
#ifdef KIMIVL_AMX
    if (amx) _tile_release();
#endif
#endif  // KIMIVL_EXPERTS_AVX2
  });
  std::vector<torch::Tensor> wide_out;  // kept until the weighted sum has read them
  if (!wide.empty()) {
    // x rows gathered, h = gate_up(x) rounded, silu(gate) * up (the module's ops), down
    auto pair_index = torch::from_blob(pairs.data(), {P}, torch::kInt64);
    for (const Work& w : wide) {
      auto slots = pair_index.narrow(0, w.first, w.rows);
      auto h = at::linear(xc.index_select(0, at::floor_divide(slots, k)), gate_up[w.expert]);
      auto a = at::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I);
      wide_out.push_back(at::linear(a, down[w.expert]).contiguous());
      const uint16_t* rows = reinterpret_cast<const uint16_t*>(wide_out.back().data_ptr<at::BFloat16>());
      for (int64_t r = 0; r < w.rows; ++r) src[pairs[w.first + r]] = rows + r * D;
    }
  }
  auto y = torch::empty({T, D}, x.options());
  const float* wp = w_c.data_ptr<float>();
  uint16_t* out = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) { combine_rows(src.data(), wp, k, D, t0, t1, out); });
  return y;
#endif
}

// The routed experts with int8 weights (kimivl.quantization.int8): gate, up (E, I, D) and down (E, D, I) int8, each
// row's float32 scale in gate_scale, up_scale (E * I) and down_scale (E * D). Every expert runs in the float32
// kernels above, each weight block dequantized as the module's dequantize_weight does (float(q) * scale, one
// rounding) into the small buffer the products read: no dequantized copy of an expert, no GEMM call per expert.
// Same roundings as moe_dispatch over the int8 modules (their products on the dequantized weights); only the
// summation order of the products differs. AVX2 builds without AVX512-BF16 (experts_isa() == "avx2") only.
torch::Tensor moe_experts_int8(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& topk_weight,
                               const torch::Tensor& gate, const torch::Tensor& up, const torch::Tensor& down,
                               const torch::Tensor& gate_scale, const torch::Tensor& up_scale,
                               const torch::Tensor& down_scale) {
  check_routing("moe_experts_int8", x, topk_idx, topk_weight);
  const int64_t T = x.size(0), D = x.size(1);
  for (const auto* w : {&gate, &up, &down})
    TORCH_CHECK(w->device().is_cpu() && w->dim() == 3 && w->scalar_type() == torch::kInt8 && w->is_contiguous(),
                "moe_experts_int8: gate, up and down must be contiguous (E, N, K) int8 CPU tensors, got ", w->sizes(),
                " ", w->scalar_type());
  const int64_t E = gate.size(0), I = gate.size(1), k = topk_idx.size(1), P = T * k;
  TORCH_CHECK(gate.size(2) == D && up.sizes() == gate.sizes() && down.size(0) == E && down.size(1) == D &&
                  down.size(2) == I,
              "moe_experts_int8: x has ", D, " features; gate ", gate.sizes(), ", up ", up.sizes(), " and down ",
              down.sizes(), " must be (E, I, ", D, "), (E, I, ", D, ") and (E, ", D, ", I)");
  for (const auto& [scale, rows] : {std::pair{&gate_scale, E * I}, std::pair{&up_scale, E * I},
                                    std::pair{&down_scale, E * D}})
    TORCH_CHECK(scale->device().is_cpu() && scale->scalar_type() == torch::kFloat32 && scale->is_contiguous() &&
                    scale->numel() == rows,
                "moe_experts_int8: each scale tensor must be contiguous float32 with one value per weight row (", rows,
                "), got ", scale->sizes(), " ", scale->scalar_type());
#ifndef KIMIVL_EXPERTS_AVX2
  TORCH_CHECK(false, "moe_experts_int8: this build has no float32 experts path (experts_isa() is not 'avx2')");
#else
  auto idx_c = topk_idx.contiguous();
  auto w_c = topk_weight.contiguous();
  const ExpertPairs g = group_pairs("moe_experts_int8", idx_c.data_ptr<int64_t>(), P, E, k);
  std::vector<Work> work;
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e)
    if (g.counts[e] > 0) {
      work.push_back({e, g.first[e], g.counts[e], total});
      total += g.counts[e];
    }
  auto y = torch::empty({T, D}, x.options());
  if (work.empty()) return y.zero_();
  // Longest first, each to whichever thread is free (a thread slowed by another process takes fewer).
  std::stable_sort(work.begin(), work.end(), [](const Work& a, const Work& b) { return a.rows > b.rows; });
  auto xc = x.contiguous();
  auto ys = torch::empty({total, D}, x.options());  // each (token, slot) pair's expert output, bf16
  std::vector<const uint16_t*> src(P);
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  uint16_t* yb = reinterpret_cast<uint16_t*>(ys.data_ptr<at::BFloat16>());
  const int8_t *gq = gate.data_ptr<int8_t>(), *uq = up.data_ptr<int8_t>(), *dq = down.data_ptr<int8_t>();
  const float *gs = gate_scale.data_ptr<float>(), *us = up_scale.data_ptr<float>(),
              *ds = down_scale.data_ptr<float>();
  take_in_turn(static_cast<int64_t>(work.size()), [&](const auto& take) {
    ExpertScratch scratch(D, I);
    std::vector<const uint16_t*> in(work.front().rows);  // (sorted: the first is the widest)
    std::vector<uint16_t*> out(work.front().rows);
    for (int64_t i; (i = take()) >= 0;) {
      const Work& w = work[i];
      for (int64_t r = 0; r < w.rows; ++r) {
        const int64_t p = g.pairs[w.first + r];
        in[r] = xb + (p / k) * D;
        out[r] = yb + (w.out + r) * D;
        src[p] = out[r];
      }
      const int64_t e = w.expert;
      run_expert({gq + e * I * D, gs + e * I}, {uq + e * I * D, us + e * I}, {dq + e * D * I, ds + e * D}, D, I,
                 in.data(), w.rows, out.data(), scratch);
    }
  });
  const float* wp = w_c.data_ptr<float>();
  uint16_t* yo = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) { combine_rows(src.data(), wp, k, D, t0, t1, yo); });
  return y;
#endif
}
