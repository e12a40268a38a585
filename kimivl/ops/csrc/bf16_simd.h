// Helpers of the AVX512-BF16 / AMX kernels (experts_bf16.cpp, attention_bf16.cpp): what the build targets, bf16
// rounding, vector exps, the vdpbf16ps register block both kernels multiply with, and AMX's tile configuration
// and permission; and the AVX2 forms of the rounding and the exp (experts_bf16.cpp's AVX2 path, mla_decode.cpp).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KIMIVL_SIMD_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define KIMIVL_AVX512BF16 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define KIMIVL_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace kimivl_simd {

#ifdef KIMIVL_SIMD_AVX2
// The sum of a vector's 8 lanes (the streaming kernels' last step per output: linear_bf16w.cpp, linear_int8w.cpp).
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp for float32 lanes (Cephes-style: 2^n * poly(r), |rel. error| < 2e-7 on [-87, 88]; -inf -> 0).
inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// 8 float32 rounded to the nearest even bf16 and back to float32 (NaN stays NaN), as torch rounds to bf16.
inline __m256 round_bf16_8(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))),
                                     _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __m256i nan = _mm256_and_si256(_mm256_or_si256(b, _mm256_set1_epi32(0x00400000)),
                                       _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(nan), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// The bf16 bits of 8 float32 already rounded by round_bf16_8, in order.
inline __m128i bf16_bits_8(__m256 rounded) {
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(rounded), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
}

// 8 bf16 widened to float32.
inline __m256 widen_8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
#endif

#ifdef KIMIVL_AVX512BF16
inline __m512 round_bf16(__m512 v) {  // round to nearest even bf16 and back to float32
  const __m256bh h = _mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

// exp(x) in float32 to ~2 ulp: 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2] (degree-6 Taylor polynomial);
// exp(-inf) = 0.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// Two adjacent bf16 (a pair for vdpbf16ps) in every 32-bit lane.
inline __m512bh pair_bcast(const uint16_t* at) {
  uint32_t bits;
  std::memcpy(&bits, at, sizeof(bits));
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(bits));
}

// The first min(n, 16) lanes (none for n <= 0).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n > 0 ? n : 0)) - 1);
}

// c (MR, 16 * NV) float32 (+)= a (MR rows of a bf16 matrix, stride lda) @ b (pairs of rows, nt wide: b[p][j] holds
// the two bf16 of rows 2p and 2p + 1 of column j), c's rows at stride nt: vdpbf16ps with a pair of a row of `a`
// broadcast against NV vectors of b. The weights of experts_bf16.cpp (a = weight rows) and the probabilities of
// attention_bf16.cpp (a = rows of P, b = v as pairs of keys) go through it. `next`, when given, is where the
// caller's next block of MR rows (same stride) starts: the last 8 lines' prefetches fetch its first lines instead.
template <int MR, int NV>
inline void dot_block(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t nt, int64_t pairs, float* c,
                  bool accumulate, const uint16_t* next = nullptr) {
  // every loop over r and v unrolled: the accumulators must live in registers, not on the stack
  __m512 acc[MR][NV];
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * nt + 16 * v) : _mm512_setzero_ps();
  auto step = [&](int64_t p) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * nt + 16 * v);
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = pair_bcast(a + r * lda + 2 * p);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  };
  int64_t p = 0;
  for (; p + 16 <= pairs; p += 16) {
    if (p + 128 < pairs) {  // each row's line 8 lines ahead: MR rows on as many pages are MR streams, which the
                            // hardware prefetcher does not follow
#pragma GCC unroll 32
      for (int r = 0; r < MR; ++r) _mm_prefetch(reinterpret_cast<const char*>(a + r * lda + 2 * p + 256), _MM_HINT_T0);
    } else if (next != nullptr) {  // else each block would start on MR cold rows (8 lines each on demand)
#pragma GCC unroll 32
      for (int r = 0; r < MR; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(next + r * lda + 2 * (p - pairs) + 256), _MM_HINT_T0);
    }
    // unrolled: the MR row pointers advance once per 4 steps (fixed offsets in between), not once per step
#pragma GCC unroll 4
    for (int64_t q = p; q < p + 16; ++q) step(q);
  }
  for (; p < pairs; ++p) step(p);
#pragma GCC unroll 32
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * nt + 16 * v, acc[r][v]);
}

// 2^x in float32 for x <= 0 to ~1 ulp: 2^n * p(f), n = round(x), f = x - n in [-1/2, 1/2], p the degree-6 Taylor
// polynomial of e^(f ln 2) (truncation error < 1.3e-7 relative); very negative x gives 0 (scalef underflows).
inline __m512 exp2_nonpositive_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);  // ln2^6 / 720
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 120
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 24
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 6
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif

#ifdef KIMIVL_AMX
// Linux hands out AMX's tile state only on request (once per process; oneDNN makes the same request).
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr int kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

struct TileConfig {  // ldtilecfg's 64-byte layout, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void set(int tile, int rows_, int colsb_) {
    rows[tile] = static_cast<uint8_t>(rows_);
    colsb[tile] = static_cast<uint16_t>(colsb_);
  }
};
#endif

}  // namespace kimivl_simd
