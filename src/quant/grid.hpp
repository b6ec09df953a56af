// Internal: the grid formulas of SPEC section 2, shared by every implementation of every
// quantizer (reference, fast CPU, CUDA). Grid arithmetic is done in double and stored in fp32;
// rounding is done in fp32 exactly as written here (the build uses -ffp-contract=off so that
// (x - lo) * scale + u is never fused differently in two places). The inline formulas are
// FQT_HD: plain `inline` for the C++ compiler, host+device under nvcc (built with --fmad=false),
// so the CUDA kernels run exactly this arithmetic.
#pragma once

#include "fqt/error.hpp"
#include "fqt/quant.hpp"
#include "fqt/rng.hpp"  // FQT_HD: host inline, or __host__ __device__ under nvcc

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cmath>

#if defined(__AVX512F__) && defined(__AVX512VL__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

namespace fqt::quant_detail {

struct Grid {
  float scale;  // codes per unit
  float lo;     // value of code 0
};

// Below this many elements a kernel runs on one thread: a parallel region costs more than the
// work, and far more when the machine is oversubscribed.
constexpr int64_t kParallelMin = 1 << 15;

FQT_HD int max_code(int bits) { return (1 << bits) - 1; }

// Affine min/max grid: lo = min - 1e-8, hi = max + 1e-8, scale = B / (hi - lo).
FQT_HD Grid affine_grid(double mn, double mx, int bits) {
  double lo = mn - 1e-8, hi = mx + 1e-8;
  return {static_cast<float>(max_code(bits) / (hi - lo)), static_cast<float>(lo)};
}

// Symmetric grid: codes 0 .. 2Z with Z = 2^(b-1) - 1 standing for -amax .. amax.
FQT_HD Grid symmetric_grid(double mn, double mx, int bits) {
  double amax = std::max(std::fabs(mn), std::fabs(mx)) + 1e-8;
  int z = (1 << (bits - 1)) - 1;
  float scale = static_cast<float>(z / amax);
  // lo chosen so that code z dequantizes to exactly 0 in fp32: z / scale + lo == 0.
  return {scale, -(static_cast<float>(z) / scale)};
}

// Zero-aligned grid (the authors' weight grid): the range is widened to contain 0, then the top
// end moves (scale shrinks) until 0 falls exactly on the integer code zi = floor(-lo * scale),
// so the grid still covers [min, max]. Guards: all-positive data (their code divides by zero:
// here 0 is simply code 0), all-negative (0 is code B), all-zero (a tiny nonzero range).
FQT_HD Grid zero_aligned_grid(double mn, double mx, int bits) {
  const int B = max_code(bits);
  double lo = std::min(mn, 0.0), hi = std::max(mx, 0.0);
  if (hi - lo < 1e-8) hi = lo + 1e-8;
  double s;
  int zi;
  if (lo >= 0) {
    zi = 0;
    s = B / hi;
  } else if (hi <= 0) {
    zi = B;
    s = B / -lo;
  } else {
    double z = -lo * B / (hi - lo);
    zi = std::clamp(static_cast<int>(std::floor(z)), 1, B - 1);
    // Both ends must stay inside the grid: -zi/s <= lo and (B - zi)/s >= hi.
    s = std::min(zi / -lo, (B - zi) / hi);
  }
  float scale = static_cast<float>(s);
  return {scale, -(static_cast<float>(zi) / scale)};
}

// The kinds whose grid is the plain affine min/max grid (no zero code to keep exact).
FQT_HD bool affine_grid_kind(QuantizerKind kind) {
  return kind == QuantizerKind::affine || kind == QuantizerKind::ptq || kind == QuantizerKind::psq ||
         kind == QuantizerKind::column || kind == QuantizerKind::bhq;
}

FQT_HD Grid make_grid_raw(QuantizerKind kind, double mn, double mx, int bits) {
  switch (kind) {
    case QuantizerKind::symmetric:
    case QuantizerKind::symmetric_row: return symmetric_grid(mn, mx, bits);
    case QuantizerKind::zero_aligned:
    case QuantizerKind::ptq_zero: return zero_aligned_grid(mn, mx, bits);
    default: return affine_grid(mn, mx, bits);
  }
}

// The grid of SPEC section 2, then made to cover [mn, mx] in fp32 arithmetic too: rounding the
// double-precision scale to fp32 can move an end by an ulp, and a value that falls outside the
// grid is clamped, i.e. rounded deterministically (a tiny bias). Shrinking the scale by an ulp
// at a time fixes that; grids anchored on a zero code keep that code exactly at 0.
FQT_HD Grid make_grid(QuantizerKind kind, double mn, double mx, int bits) {
  Grid g = make_grid_raw(kind, mn, mx, bits);
  const bool anchored = !affine_grid_kind(kind);
  const float zero_code = anchored ? -g.lo * g.scale : 0.0f;
  const float zc = std::nearbyint(zero_code);
  const float B = static_cast<float>(max_code(bits));
  for (int it = 0; it < 64; ++it) {
    if ((static_cast<float>(mn) - g.lo) * g.scale >= 0.0f && (static_cast<float>(mx) - g.lo) * g.scale <= B) break;
    g.scale = std::nextafter(g.scale, 0.0f);
    if (anchored) g.lo = -(zc / g.scale);
  }
  return g;
}

// Position of x on the grid, before rounding.
FQT_HD float grid_pos(float x, float lo, float scale) { return (x - lo) * scale; }

// Nearest rounding (ties to even, as torch.round and CUDA rintf): q = round(clamp(v, 0, B)).
FQT_HD uint8_t round_nearest(float v, int B) {
  v = std::min(std::max(v, 0.0f), static_cast<float>(B));
  return static_cast<uint8_t>(std::nearbyint(v));
}

// Stochastic rounding: q = floor(v + u), then clamp to [0, B]. E[q] = v for v in [0, B].
FQT_HD uint8_t round_stochastic(float v, float u, int B) {
  float q = std::floor(v + u);
  q = std::min(std::max(q, 0.0f), static_cast<float>(B));
  return static_cast<uint8_t>(q);
}

FQT_HD float dequant_value(uint8_t q, float scale, float lo) { return static_cast<float>(q) / scale + lo; }

// BHQ's sort key of a row (SPEC section 2, step 1) from its fp32 min and max.
FQT_HD double bhq_row_range(float mn, float mx) { return static_cast<double>(mx) - static_cast<double>(mn) + 1e-8; }

// BHQ's row scales, w^(-1/3) (SPEC section 2 step 5), as a float: a guess from the float's bits,
// then four Newton steps y <- y + y (1 - w y^3) / 3 in double (each roughly squares the relative
// error: ~6e-2 -> ~1e-15), rounded to float. ~1 ns against ~9.5 ns for pow(w, -1/3.) (a pair
// per group, ~9 ms of a one-thread BHQ step in docs/profiles); equal to (float)pow(w, -1/3.)
// (tests/unit/test_bhq.cpp: a 1.2M-point sweep over 10^-30 .. 10^30 and ulp neighbours). Outside
// [1e-30, 1e30], or for NaN, it is pow itself. Explicit fma and no contraction (-ffp-contract=off,
// nvcc --fmad=false), so host and device compute the same float.
FQT_HD float bhq_inv_cbrt(double w) {
  if (!(w >= 1e-30 && w <= 1e30)) return static_cast<float>(std::pow(w, -1.0 / 3.0));
  const float f = static_cast<float>(w);
#if defined(__CUDA_ARCH__)
  double y = __uint_as_float(0x54a2fa8cu - __float_as_uint(f) / 3u);
#else
  double y = std::bit_cast<float>(0x54a2fa8cu - std::bit_cast<uint32_t>(f) / 3u);
#endif
  for (int k = 0; k < 4; ++k) {
    const double y3 = y * y * y;
    y = std::fma(y * std::fma(-w, y3, 1.0), 1.0 / 3.0, y);
  }
  return static_cast<float>(y);
}

// (int64_t)std::round(x) for 0 <= x < 2^52, inline (the library call was most of BHQ's serial
// share loop): x - trunc(x) is exact (Sterbenz's lemma for x >= 1), so comparing it with 0.5
// rounds halves away from zero as round() does (tests/unit/test_bhq.cpp).
FQT_HD int64_t round_nonneg(double x) {
  const double t = std::trunc(x);
  return static_cast<int64_t>(t) + (x - t >= 0.5 ? 1 : 0);
}

#if !defined(__CUDACC__)
// bhq_inv_cbrt of n values, out[i] = bhq_inv_cbrt(w[i]) bit for bit: the same operations lane by
// lane, 8 doubles per AVX-512 vector (the bit guess's u / 3 as (u * 0xAAAAAAAB) >> 33, exact for
// every 32-bit u); values outside [1e-30, 1e30] (and NaN) go to the scalar function (pow).
// Each scale is a chain of ~20 dependent multiply-adds: BHQ's grouping computed two per group,
// one group at a time (tests/unit/test_bhq.cpp: equal to the scalar on the sweep).
void bhq_inv_cbrt_batch(const double* w, int64_t n, float* out);
#endif

#if !defined(__CUDACC__)
// A per-sample quantization of x [N, C, P] (codes [N, C*P], a grid per row, BHQ's transform over
// the N rows) laid out as quantize_samples_nchw returns it: codes as pixel rows [(N*P), C], each
// sample's grid repeated P times; the transform kept (it acts on [N, P*C]).
QuantizedTensor samples_as_pixel_rows(QuantizedTensor q, int64_t N, int64_t C, int64_t P);

// BHQ's rows of T x not finite although x is (values near float's limit, times a row scale
// above 1 or summed in a group's Householder, overflow): the fast quantizers throw this instead
// of rounding on a non-finite grid.
[[noreturn]] inline void throw_transformed_not_finite() {
  throw NonFiniteError(
      "quantizer: BHQ's transformed gradient T x is not finite although its input is (values near float's "
      "limit overflow when scaled and mixed)");
}
#endif

// Number of groups for a granularity.
FQT_HD int64_t num_groups(Granularity g, int64_t rows, int64_t cols) {
  return g == Granularity::tensor ? 1 : g == Granularity::row ? rows : cols;
}

// Header (grids, no codes) from per-group min/max. For BHQ `mn`/`mx` are those of T X.
QuantizedTensor make_header(QuantizerSpec spec, int64_t rows, int64_t cols, const double* mn,
                            const double* mx);
// The grids of n groups from their min and max (what make_header stores: make_grid's, computed
// 256 at a time through a vectorizable loop), on the calling thread.
void make_grids(QuantizerSpec spec, const double* mn, const double* mx, int64_t n, float* scale, float* lo);

#if defined(__AVX512F__) && defined(__AVX512VL__) && !defined(__CUDACC__)
// make_grid for eight affine-kind groups at once (make_grids' vector step), stored to
// scale[0..7] / lo[0..7]: the grid of SPEC section 2 (the same IEEE operations in the same order
// as affine_grid), then make_grid's coverage fix on the lanes that need it (the scale shrunk an
// ulp at a time, at most 64 times, until [mn, mx] maps into [0, B] in fp32; the scale is positive
// and finite, so its next float toward 0 is its bit pattern minus one). Rows of unit-scale
// Gaussian values (bench_quantizers' data) need a step ~19% of the time, and make_grid's scalar
// loop for those was ~8% of the NCHW pair pass there; rows of values ~1e-3 (gradient-sized,
// where the 1e-8 margins weigh more) needed none in the same count.
// A lane with mn > mx (an empty group) or a NaN end gets the grid of [0, 0], as in make_grids'
// scalar loop. (Masked converts: GCC 12 warns on the plain ones.)
[[gnu::always_inline]] inline void affine_grids8(__m512d mn8, __m512d mx8, int bits, float* scale, float* lo) {
  const __m512d vB = _mm512_set1_pd(static_cast<double>(max_code(bits))), eps = _mm512_set1_pd(1e-8);
  const __m256 vBf = _mm256_set1_ps(static_cast<float>(max_code(bits))), fzero = _mm256_setzero_ps();
  const __mmask8 full = _mm512_cmp_pd_mask(mn8, mx8, _CMP_LE_OQ);  // not empty (NaN: empty)
  const __m512d a = _mm512_maskz_mov_pd(full, mn8), b = _mm512_maskz_mov_pd(full, mx8);
  const __m512d l = _mm512_sub_pd(a, eps), h = _mm512_add_pd(b, eps);
  __m256 sc = _mm512_maskz_cvtpd_ps(0xFF, _mm512_div_pd(vB, _mm512_sub_pd(h, l)));
  const __m256 lf = _mm512_maskz_cvtpd_ps(0xFF, l);
  const __m256 af = _mm512_maskz_cvtpd_ps(0xFF, a), bf = _mm512_maskz_cvtpd_ps(0xFF, b);
  auto covered = [&] {
    return static_cast<__mmask8>(_mm256_cmp_ps_mask(_mm256_mul_ps(_mm256_sub_ps(af, lf), sc), fzero, _CMP_GE_OQ) &
                                 _mm256_cmp_ps_mask(_mm256_mul_ps(_mm256_sub_ps(bf, lf), sc), vBf, _CMP_LE_OQ));
  };
  __mmask8 bad = static_cast<__mmask8>(~covered());
  for (int it = 0; it < 64 && bad; ++it) {  // make_grid's loop: check, else step; 64 checks at most
    sc = _mm256_castsi256_ps(_mm256_mask_sub_epi32(_mm256_castps_si256(sc), bad, _mm256_castps_si256(sc), _mm256_set1_epi32(1)));
    if (it + 1 < 64) bad = static_cast<__mmask8>(bad & ~covered());
  }
  _mm256_storeu_ps(scale, sc), _mm256_storeu_ps(lo, lf);
}
#endif
void check_spec(QuantizerSpec spec);
// View of x as a contiguous f32 matrix [rows, cols]; validates dtype and rank.
Tensor as_matrix(const Tensor& x);

}  // namespace fqt::quant_detail
