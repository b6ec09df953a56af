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

#if defined(__AVX512F__)
// Every lane of a 16-lane vector. The AVX-512 code uses the masked forms of the intrinsics with
// this mask: they take their pass-through register from the caller, where the unmasked forms'
// undefined one makes GCC 12 warn "may be used uninitialized" once they are inlined into a loop.
constexpr __mmask16 kAll16 = 0xFFFF;

// Rows of exactly 16 floats, 16 rows at a time (PSQ's gradient rows of a 16-channel layer): lane i
// of *lo / *hi = min / max of row i, by a transposing reduction tree (unpack, shuffle, two 128-bit
// block shuffles: 45 instructions each way for 16 rows, where minmax_lanes reduces every row
// across its lanes alone: ~20 per row). The rows' NaNs are OR-ed into nan. (Exact as above: the
// order of min/max cannot change a finite result.)
inline void minmax_rows16(const float* p, __m512& lo, __m512& hi, uint32_t& nan) {
  __m512 v[16];
  __mmask16 bad = 0;
  for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_ps(p + 16 * i), bad |= _mm512_cmp_ps_mask(v[i], v[i], _CMP_UNORD_Q);
  nan |= static_cast<uint32_t>(bad != 0);
  auto lo_half = [](__m512 x, __m512 y) { return _mm512_mask_unpacklo_ps(x, kAll16, x, y); };
  auto hi_half = [](__m512 x, __m512 y) { return _mm512_mask_unpackhi_ps(x, kAll16, x, y); };
  auto tree = [&](auto op) {
    __m512 a[8], b[4], c[2];
    for (int k = 0; k < 8; ++k)  // per 128-bit block j: [r2k(j), r2k+1(j), r2k(j'), r2k+1(j')] partials
      a[k] = op(lo_half(v[2 * k], v[2 * k + 1]), hi_half(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; ++k)  // per block j: rows 4k..4k+3 over block j
      b[k] = op(_mm512_mask_shuffle_ps(a[2 * k], kAll16, a[2 * k], a[2 * k + 1], 0x44),
                _mm512_mask_shuffle_ps(a[2 * k], kAll16, a[2 * k], a[2 * k + 1], 0xEE));
    for (int k = 0; k < 2; ++k)  // blocks: rows 8k..8k+3 (blocks 0-1, 2-3), rows 8k+4..8k+7 (0-1, 2-3)
      c[k] = op(_mm512_mask_shuffle_f32x4(b[2 * k], kAll16, b[2 * k], b[2 * k + 1], 0x88),
                _mm512_mask_shuffle_f32x4(b[2 * k], kAll16, b[2 * k], b[2 * k + 1], 0xDD));
    return op(_mm512_mask_shuffle_f32x4(c[0], kAll16, c[0], c[1], 0x88), _mm512_mask_shuffle_f32x4(c[0], kAll16, c[0], c[1], 0xDD));
  };
  lo = tree([](__m512 x, __m512 y) { return _mm512_mask_min_ps(x, kAll16, x, y); });
  hi = tree([](__m512 x, __m512 y) { return _mm512_mask_max_ps(x, kAll16, x, y); });
}
#endif

// mn[i] / mx[i] = min / max of row i of x [rows, cols] (each starting from +inf / -inf): 16 rows at
// a time by minmax_rows16 when the rows hold 16 values and AVX-512 is there, else minmax_lanes.
inline void minmax_rows(const float* x, int64_t rows, int64_t cols, float* mn, float* mx, uint32_t& nan) {
  int64_t r = 0;
#if defined(__AVX512F__)
  if (cols == 16)
    for (; r + 16 <= rows; r += 16) {
      __m512 lo, hi;
      minmax_rows16(x + r * 16, lo, hi, nan);
      _mm512_storeu_ps(mn + r, lo), _mm512_storeu_ps(mx + r, hi);
    }
#endif
  for (; r < rows; ++r) {
    mn[r] = std::numeric_limits<float>::infinity(), mx[r] = -mn[r];
    minmax_lanes(x + r * cols, cols, mn[r], mx[r], nan);
  }
}

}  // namespace fqt::kernels
