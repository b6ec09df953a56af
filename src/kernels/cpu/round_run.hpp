// Rounding of a run of values that share one grid (grid.hpp's formulas, vectorized): nearest,
// shared by the quantizers (quantize.cpp) and by batch norm's fused normalize-and-quantize pass
// (batchnorm.cpp), so both write the very codes quantize_in_range would; stochastic, for the
// gradient quantizers.
#pragma once

#include "minmax.hpp"
#include "quant/grid.hpp"

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fqt::kernels {

#if defined(__AVX2__)
// Codes in [0, 255] held in int32 lanes -> bytes, in order: 16 from two vectors, or 8 from one.
inline void store_codes16(__m256i a, __m256i b, uint8_t* out) {
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);  // 16 x u16 in order
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                   _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}
inline void store_codes8(__m256i a, uint8_t* out) {
  const __m128i w = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(a, a), 0xD8));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w, w));
}
#endif

// out[i] = round_nearest(grid_pos(s[i], lo, scale), B) for a run of n finite values, 16 per
// AVX-512 or 8 per AVX2 instruction: the same IEEE operations in the same order as the scalar
// formulas (no contraction), round-to-nearest-even by vroundps, exact clamps: bit-identical.
inline void round_run_nearest(const float* __restrict s, int64_t n, float lo, float scale, int B,
                              uint8_t* __restrict out) {
  using quant_detail::grid_pos;
  using quant_detail::round_nearest;
  int64_t i = 0;
#if defined(__AVX512F__)
  {
    const __m512 vlo = _mm512_set1_ps(lo), vsc = _mm512_set1_ps(scale), vB = _mm512_set1_ps(static_cast<float>(B));
    const __m512 zero = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
      __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i), vlo), vsc);
      v = _mm512_mask_min_ps(v, kAll16, _mm512_mask_max_ps(v, kAll16, v, zero), vB);
      v = _mm512_mask_roundscale_ps(v, kAll16, v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm512_mask_cvtepi32_storeu_epi8(out + i, kAll16, _mm512_mask_cvttps_epi32(_mm512_castps_si512(v), kAll16, v));
    }
  }
#endif
#if defined(__AVX2__)
  const __m256 vlo = _mm256_set1_ps(lo), vsc = _mm256_set1_ps(scale), vB = _mm256_set1_ps(static_cast<float>(B));
  const __m256 zero = _mm256_setzero_ps();
  auto codes8 = [&](int64_t k) {
    __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + k), vlo), vsc);
    v = _mm256_min_ps(_mm256_max_ps(v, zero), vB);
    return _mm256_cvttps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  };
  for (; i + 16 <= n; i += 16) store_codes16(codes8(i), codes8(i + 8), out + i);
  if (i + 8 <= n) store_codes8(codes8(i), out + i), i += 8;
#endif
  for (; i < n; ++i) out[i] = round_nearest(grid_pos(s[i], lo, scale), B);
}

#if defined(__AVX512F__)
// 16 stochastic codes from v = grid position + uniform: round_stochastic's floor(v) clamped to
// [0, B], computed as trunc(min(max(v, 0), B)): after the max v >= 0, where truncation is floor,
// and min(v, B) truncates to B exactly when floor(v) >= B, so the codes are the same for every
// finite v (tests/unit/test_quantize.cpp drives negative, integral and above-B values), with one
// rounding instruction less (quantizers ~2% faster in the psq/s step, session 26). Codes in
// int32 lanes.
[[gnu::always_inline]] inline __m512i stochastic_codes16(__m512 v, __m512 vB) {
  v = _mm512_mask_min_ps(v, kAll16, _mm512_mask_max_ps(v, kAll16, v, _mm512_setzero_ps()), vB);
  return _mm512_mask_cvttps_epi32(_mm512_castps_si512(v), kAll16, v);
}
#endif

// out[i] = round_stochastic(grid_pos(s[i], lo, scale), u[i], B) for a run of n finite values, 16
// per AVX-512 or 8 per AVX2 instruction: the same IEEE operations in the same order as the scalar
// formulas up to the rounding (no contraction), then floor and clamp as stochastic_codes16 does
// them: bit-identical. (The scalar loop the compiler made of the quantizer's lambdas was not
// vectorized, the u8 stores possibly aliasing the captured grids, and was ~8% of the FQT step.)
inline void round_run_stochastic(const float* __restrict s, const float* __restrict u, int64_t n, float lo,
                                 float scale, int B, uint8_t* __restrict out) {
  using quant_detail::grid_pos;
  using quant_detail::round_stochastic;
  int64_t i = 0;
#if defined(__AVX512F__)
  {  // 16 at a time, the codes narrowed by vpmovdb straight to memory (a PSQ row of 16 values is one step)
    const __m512 vlo = _mm512_set1_ps(lo), vsc = _mm512_set1_ps(scale), vB = _mm512_set1_ps(static_cast<float>(B));
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i), vlo), vsc), _mm512_loadu_ps(u + i));
      _mm512_mask_cvtepi32_storeu_epi8(out + i, kAll16, stochastic_codes16(v, vB));
    }
  }
#endif
#if defined(__AVX2__)
  const __m256 vlo = _mm256_set1_ps(lo), vsc = _mm256_set1_ps(scale), vB = _mm256_set1_ps(static_cast<float>(B));
  const __m256 zero = _mm256_setzero_ps();
  auto codes8 = [&](int64_t k) {  // 8 codes as int32 lanes: floor clamped, as stochastic_codes16
    __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + k), vlo), vsc), _mm256_loadu_ps(u + k));
    return _mm256_cvttps_epi32(_mm256_min_ps(_mm256_max_ps(v, zero), vB));
  };
  for (; i + 16 <= n; i += 16) store_codes16(codes8(i), codes8(i + 8), out + i);
  if (i + 8 <= n) store_codes8(codes8(i), out + i), i += 8;
#endif
  for (; i < n; ++i) out[i] = round_stochastic(grid_pos(s[i], lo, scale), u[i], B);
}

}  // namespace fqt::kernels
