// The ReLU's 1-bit mask (shared by ReLU and BatchNorm2d::with_relu, which must keep the same
// bits): bit i % 8 of byte i / 8 = (y_i > 0); NaN counts as not positive.
#pragma once

#include <cstdint>

#if defined(__AVX__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fqt::nn_detail {

// The mask byte of v[0..7].
inline uint8_t positive_bits8(const float* v) {
#if defined(__AVX__)
  return static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v), _mm256_setzero_ps(), _CMP_GT_OQ)));
#else
  uint8_t bits = 0;
  for (int k = 0; k < 8; ++k) bits |= static_cast<uint8_t>(v[k] > 0.0f) << k;
  return bits;
#endif
}

#if defined(__AVX2__)
// src[k] where bit k of `bits` is set, else +0, for k < 8, in a register.
inline __m256 kept_by_bits8(unsigned bits, const float* src) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i sel = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits & 0xFF)), bit);
  return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(sel, bit)), _mm256_loadu_ps(src));
}
#endif

// dst[k] = bit k of `bits` ? src[k] : +0, for k < 8 (what ReLU's backward hands on).
inline void keep_by_bits8(unsigned bits, const float* src, float* dst) {
#if defined(__AVX2__)
  _mm256_storeu_ps(dst, kept_by_bits8(bits, src));
#else
  for (int k = 0; k < 8; ++k) dst[k] = (bits >> k) & 1 ? src[k] : 0.0f;
#endif
}

}  // namespace fqt::nn_detail
