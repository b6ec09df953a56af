// Internal: min and max of a run of floats, the vector loop shared by the fast quantizers
// (quantize.cpp) and BHQ's row ranges (bhq_fast.cpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fqt::kernels {

// min and max of n floats. 16 independent lanes (an elementwise min/max the compiler turns into
// vector instructions; a single running min is a serial chain under strict fp semantics), then
// the lanes. Inputs are finite (checked before), and min/max are exact, so the order of the
// comparisons cannot change the result (up to the sign of a zero, which no grid depends on).
// NaN never wins a comparison, so the lanes also OR together "x != x": the caller learns of a
// NaN (an Inf shows up as the min or max itself) without a separate pass over the data.
inline void minmax_lanes(const float* p, int64_t n, float& lo, float& hi, uint32_t& nan) {
#if defined(__AVX2__)
  // Two 8-lane vectors each way, reduced across lanes in registers: a PSQ row of 16 values is one
  // iteration, where the 16 scalar lane reductions below cost more than the loads (perf: the
  // per-row min/max was ~3% of the FQT step). _mm256_min_ps(v, acc) returns acc when v is NaN,
  // so NaN never wins here either; the unordered compare collects it.
  if (n >= 8) {
    __m256 mn0 = _mm256_set1_ps(std::numeric_limits<float>::infinity()), mn1 = mn0;
    __m256 mx0 = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), mx1 = mx0;
    __m256 bad = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m256 v0 = _mm256_loadu_ps(p + i), v1 = _mm256_loadu_ps(p + i + 8);
      mn0 = _mm256_min_ps(v0, mn0), mx0 = _mm256_max_ps(v0, mx0);
      mn1 = _mm256_min_ps(v1, mn1), mx1 = _mm256_max_ps(v1, mx1);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
    }
    if (i + 8 <= n) {
      const __m256 v = _mm256_loadu_ps(p + i);
      mn0 = _mm256_min_ps(v, mn0), mx0 = _mm256_max_ps(v, mx0);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      i += 8;
    }
    if (i < n) {  // the last n % 8 values as an overlapping vector (min/max are idempotent)
      const __m256 v = _mm256_loadu_ps(p + n - 8);
      mn1 = _mm256_min_ps(v, mn1), mx1 = _mm256_max_ps(v, mx1);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    __m256 mn = _mm256_min_ps(mn0, mn1), mx = _mm256_max_ps(mx0, mx1);
    mn = _mm256_min_ps(mn, _mm256_permute2f128_ps(mn, mn, 1));
    mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
    mn = _mm256_min_ps(mn, _mm256_shuffle_ps(mn, mn, 0x4E));
    mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0x4E));
    mn = _mm256_min_ps(mn, _mm256_shuffle_ps(mn, mn, 0xB1));
    mx = _mm256_max_ps(mx, _mm256_shuffle_ps(mx, mx, 0xB1));
    lo = std::min(lo, _mm256_cvtss_f32(mn)), hi = std::max(hi, _mm256_cvtss_f32(mx));
    nan |= static_cast<uint32_t>(_mm256_movemask_ps(bad) != 0);
    return;
  }
#endif
  constexpr int L = 16;
  float a[L], b[L];
  uint32_t bad[L] = {};
  for (int l = 0; l < L; ++l) a[l] = std::numeric_limits<float>::infinity(), b[l] = -a[l];
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) {
      a[l] = p[i + l] < a[l] ? p[i + l] : a[l];
      b[l] = p[i + l] > b[l] ? p[i + l] : b[l];
      bad[l] |= static_cast<uint32_t>(p[i + l] != p[i + l]);
    }
  for (; i < n; ++i) a[0] = std::min(a[0], p[i]), b[0] = std::max(b[0], p[i]), bad[0] |= static_cast<uint32_t>(p[i] != p[i]);
  for (int l = 1; l < L; ++l) a[0] = std::min(a[0], a[l]), b[0] = std::max(b[0], b[l]), bad[0] |= bad[l];
  lo = std::min(lo, a[0]), hi = std::max(hi, b[0]), nan |= bad[0];
}

}  // namespace fqt::kernels
