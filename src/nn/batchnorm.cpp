// BatchNorm2d: per-channel normalisation over N,H,W; statistics in fp64.
// Training passes split the batch by samples, as the convolutions around them do (each thread
// keeps working on the samples whose activations it produced and will consume: one channel per
// thread moved every activation between the cores' caches), in two phases: per-channel partial
// sums over fixed groups of samples, added in group order (so the sums do not depend on the
// thread count), then the element-wise pass over each thread's samples.
#include "common.hpp"
#include "fqt/profile.hpp"
#include "kernels/cpu/minmax.hpp"
#include "kernels/cpu/round_run.hpp"
#include "quant/grid.hpp"
#include "relu_mask.hpp"

#include <algorithm>
#include <exception>
#include <cmath>
#include <cstring>
#include <limits>

namespace fqt {
using namespace nn_detail;

namespace {

// fp64 sums over a run of floats in 8 independent lanes: a single running double sum is one
// serial chain of dependent adds (4 cycles each); 8 lanes vectorize. The order of the additions
// depends only on n, never on the thread count. The lanes are written out as vector code: the
// compiler's own vectorization of the lane loops built each vector from scalar inserts (perf,
// session 9), and these sums were most of batch norm's time. Lane l of every 8-block gets
// element l; the tail (n % 8 values) goes into lanes 0.. in order. Products of two floats are
// exact in fp64, so these are the very sums of the scalar loops.
constexpr int kLanes = 8;

// The 8 ReLU-mask bits of elements e .. e+7 (bit k = element e + k); the second byte is read only
// when the 8 elements straddle two bytes (then it exists).
inline unsigned mask_bits8(const uint8_t* mk, int64_t e) {
  const int64_t j = e >> 3, sh = e & 7;
  unsigned w = mk[j];
  if (sh) w |= static_cast<unsigned>(mk[j + 1]) << 8;
  return (w >> sh) & 0xFFu;
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
using D8 = __m512d;  // 8 fp64 lanes
inline D8 d8_load(const double* p) { return _mm512_loadu_pd(p); }
inline void d8_store(double* p, D8 v) { _mm512_storeu_pd(p, v); }
// (maskz with all lanes: the unmasked form trips GCC 12's -Wmaybe-uninitialized in its own header)
inline D8 d8_cvt(__m256 f) { return _mm512_maskz_cvtps_pd(0xFF, f); }
inline D8 d8_add(D8 a, D8 b) { return _mm512_add_pd(a, b); }
inline D8 d8_mul(D8 a, D8 b) { return _mm512_mul_pd(a, b); }
// dy[k] where bit k is set, else +0 (ReLU's backward).
inline __m256 f8_keep(unsigned bits, const float* p) { return _mm256_maskz_loadu_ps(static_cast<__mmask8>(bits), p); }
#define FQT_BN_VECTOR 1
#elif defined(__AVX2__)
struct D8 {
  __m256d lo, hi;
};
inline D8 d8_load(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
inline void d8_store(double* p, D8 v) { _mm256_storeu_pd(p, v.lo), _mm256_storeu_pd(p + 4, v.hi); }
inline D8 d8_cvt(__m256 f) { return {_mm256_cvtps_pd(_mm256_castps256_ps128(f)), _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1))}; }
inline D8 d8_add(D8 a, D8 b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
inline D8 d8_mul(D8 a, D8 b) { return {_mm256_mul_pd(a.lo, b.lo), _mm256_mul_pd(a.hi, b.hi)}; }
inline __m256 f8_keep(unsigned bits, const float* p) { return kept_by_bits8(bits, p); }
#define FQT_BN_VECTOR 1
#endif

// Sum and sum of squares in one pass. In fp64 the variance E[x^2] - mean^2 of fp32 inputs loses
// about mean^2 / var * 1e-16 relative: far below fp32 resolution for any batch-norm input.
// kMinMax: also the run's min and max folded into *lo / *hi (the fused quantizer's range; the
// values are finite whenever the sums are).
template <bool kMinMax = false>
void add_sum_sq_run(const float* x, int64_t n, double* acc, double* acc2, float* lo = nullptr, float* hi = nullptr) {
  int64_t i = 0;
#ifdef FQT_BN_VECTOR
  D8 a = d8_load(acc), b = d8_load(acc2);
  __m256 vlo = _mm256_setzero_ps(), vhi = vlo;
  if constexpr (kMinMax) vlo = _mm256_set1_ps(*lo), vhi = _mm256_set1_ps(*hi);
  for (; i + kLanes <= n; i += kLanes) {
    const __m256 f = _mm256_loadu_ps(x + i);
    if constexpr (kMinMax) vlo = _mm256_min_ps(vlo, f), vhi = _mm256_max_ps(vhi, f);
    const D8 v = d8_cvt(f);
    a = d8_add(a, v);
    b = d8_add(b, d8_mul(v, v));
  }
  d8_store(acc, a), d8_store(acc2, b);
  if constexpr (kMinMax) {
    alignas(32) float l8[8], h8[8];
    _mm256_store_ps(l8, vlo), _mm256_store_ps(h8, vhi);
    for (int l = 0; l < kLanes; ++l) *lo = std::min(*lo, l8[l]), *hi = std::max(*hi, h8[l]);
  }
#endif
  auto add = [&](int64_t e, int l) {
    const double v = x[e];
    acc[l] += v;
    acc2[l] += v * v;
    if constexpr (kMinMax) *lo = std::min(*lo, x[e]), *hi = std::max(*hi, x[e]);
  };
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) add(i + l, l);
  for (int l = 0; i < n; ++i, ++l) add(i, l);
}

// One (sample, channel) run of backward: the incoming gradient d (dy, through the fused ReLU's
// mask when there is one: dy or +0, exactly what ReLU::backward hands on; element k of the run is
// mask bit e0 + k) and x-hat h = (x - m) * inv, forward's own expression, so every h is the value
// forward used.
struct GradRun {
  const float* dy;
  const uint8_t* mk;  // null: no fused ReLU
  int64_t e0;
  const float* x;
  float m, inv;
  float d(int64_t p) const { return !mk || (mk[(e0 + p) >> 3] >> ((e0 + p) & 7)) & 1 ? dy[p] : 0.0f; }
  float h(int64_t p) const { return (x[p] - m) * inv; }
#ifdef FQT_BN_VECTOR
  __m256 d8(int64_t p) const { return mk ? f8_keep(mask_bits8(mk, e0 + p), dy + p) : _mm256_loadu_ps(dy + p); }
  __m256 h8(int64_t p) const {
    return _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + p), _mm256_set1_ps(m)), _mm256_set1_ps(inv));
  }
#endif
};

// a[l] += d, b[l] += d * h over a run of n values.
void add_dy_dyh_run(const GradRun& g, int64_t n, double* a, double* b) {
  int64_t i = 0;
#ifdef FQT_BN_VECTOR
  D8 va = d8_load(a), vb = d8_load(b);
  for (; i + kLanes <= n; i += kLanes) {
    const D8 d = d8_cvt(g.d8(i));
    va = d8_add(va, d);
    vb = d8_add(vb, d8_mul(d, d8_cvt(g.h8(i))));
  }
  d8_store(a, va), d8_store(b, vb);
#endif
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double d = g.d(i + l);
      a[l] += d;
      b[l] += d * static_cast<double>(g.h(i + l));
    }
  for (int l = 0; i < n; ++i, ++l) {
    const double d = g.d(i);
    a[l] += d;
    b[l] += d * static_cast<double>(g.h(i));
  }
}

// o = k * (d - md - h * mh) over a run of n values; with `res`, o = that + res (rounded apart:
// the very values of adding res afterwards).
void dx_run(const GradRun& g, int64_t n, float k, float md, float mh, const float* res, float* o) {
  int64_t p = 0;
#ifdef FQT_BN_VECTOR
  const __m256 vk = _mm256_set1_ps(k), vmd = _mm256_set1_ps(md), vmh = _mm256_set1_ps(mh);
  if (res) {
    for (; p + 8 <= n; p += 8)
      _mm256_storeu_ps(o + p, _mm256_add_ps(_mm256_mul_ps(vk, _mm256_sub_ps(_mm256_sub_ps(g.d8(p), vmd),
                                                                           _mm256_mul_ps(g.h8(p), vmh))),
                                            _mm256_loadu_ps(res + p)));
  } else {
    for (; p + 8 <= n; p += 8)
      _mm256_storeu_ps(o + p, _mm256_mul_ps(vk, _mm256_sub_ps(_mm256_sub_ps(g.d8(p), vmd), _mm256_mul_ps(g.h8(p), vmh))));
  }
#endif
  for (; p < n; ++p) {
    const float v = k * (g.d(p) - md - g.h(p) * mh);
    o[p] = res ? v + res[p] : v;
  }
}

// y = (x - m) * inv * gc + bc over a run of n values, through the fused ReLU when `relu` (as
// ReLU computes it: NaN and -0 give +0, which max(v, +0) also gives: MAXPS returns its second
// operand for a NaN or two zeros); with lo/hi (ReLU only: no NaN can reach them), the run's min
// and max of y folded in.
// (GCC 12 warns inside its own AVX-512 headers here, on their `_mm512_undefined_*()`
// placeholders, once inlined: a known false positive, silenced for this function only.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
void normalize_run(const float* x, int64_t n, float m, float inv, float gc, float bc, bool relu, float* y, float* lo,
                   float* hi) {
  int64_t p = 0;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(m), vi = _mm512_set1_ps(inv), vg = _mm512_set1_ps(gc), vb = _mm512_set1_ps(bc);
  const __m512 zero = _mm512_setzero_ps();
  __m512 vlo = _mm512_set1_ps(std::numeric_limits<float>::infinity()), vhi = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (; p < n; p += 16) {
    const __mmask16 k = n - p >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - p)) - 1);
    __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + p), vm), vi), vg), vb);
    if (relu) v = _mm512_max_ps(v, zero);
    _mm512_mask_storeu_ps(y + p, k, v);
    if (lo) vlo = _mm512_mask_min_ps(vlo, k, vlo, v), vhi = _mm512_mask_max_ps(vhi, k, vhi, v);
  }
  if (lo) *lo = std::min(*lo, _mm512_reduce_min_ps(vlo)), *hi = std::max(*hi, _mm512_reduce_max_ps(vhi));
#else
  for (; p < n; ++p) {
    const float h = (x[p] - m) * inv;
    const float v = h * gc + bc;
    y[p] = relu ? (v > 0.0f ? v : 0.0f) : v;
    if (lo) *lo = std::min(*lo, y[p]), *hi = std::max(*hi, y[p]);
  }
#endif
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// The mask bits of elements [i0, i0 + n) from y[0..n) (that run's outputs): bytes wholly inside
// the run are stored; a byte the run shares with a neighbour (runs start mid-byte when n % 8 != 0)
// gets its bits OR-ed in atomically — it must have been zeroed before (zero_shared_mask_bytes).
inline void mask_run(const float* y, int64_t i0, int64_t n, uint8_t* mask) {
  const int64_t e1 = i0 + n;
  // A byte shared with a neighbouring run (its first or last, when they are not whole): its bits
  // or-ed in atomically.
  auto shared = [&](int64_t j) {
    const int64_t a = std::max(i0, 8 * j), b = std::min(e1, 8 * j + 8);
    uint8_t bits = 0;
    for (int64_t e = a; e < b; ++e) bits |= static_cast<uint8_t>(y[e - i0] > 0.0f) << (e - 8 * j);
    __atomic_fetch_or(mask + j, bits, __ATOMIC_RELAXED);
  };
  int64_t j = i0 / 8;
  const int64_t jend = e1 / 8;  // whole bytes: j .. jend - 1 (after a partial first one)
  if (i0 % 8 != 0) {
    shared(j);
    if (++j > jend) return;  // the run ends inside its first byte
  }
#if defined(__AVX512F__)
  // Two whole bytes per compare (the 8-wide loop's index arithmetic cost more than its compare:
  // ~1% of the PSQ step in perf, session 15).
  for (; j + 2 <= jend; j += 2) {
    const auto bits = static_cast<uint16_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(y + (8 * j - i0)), _mm512_setzero_ps(), _CMP_GT_OQ));
    std::memcpy(mask + j, &bits, 2);
  }
#endif
  for (; j < jend; ++j) mask[j] = positive_bits8(y + (8 * j - i0));
  if (e1 % 8 != 0) shared(jend);
}

// Zeroes the mask bytes that runs of n elements share or leave partial (see mask_run).
void zero_shared_mask_bytes(int64_t runs, int64_t n, uint8_t* mask) {
  for (int64_t r = 0; r < runs; ++r) {
    const int64_t i0 = r * n;
    if (i0 % 8 != 0) mask[i0 / 8] = 0;
    if ((i0 + n) % 8 != 0) mask[(i0 + n) / 8] = 0;
  }
}

double lanes_total(const double* acc) {
  double t = 0.0;
  for (int l = 0; l < kLanes; ++l) t += acc[l];
  return t;
}

// Fixed groups of consecutive samples for the partial sums: a function of N only.
int64_t sample_groups(int64_t N) { return std::min<int64_t>(N, 16); }

}  // namespace

BatchNorm2d::BatchNorm2d(std::string name, int64_t channels, float momentum, float eps)
    : name_(std::move(name)), c_(channels), momentum_(momentum), eps_(eps) {
  gamma_ = make_param(name_ + ".weight", {channels}, false);
  gamma_.value.fill(1.0);
  beta_ = make_param(name_ + ".bias", {channels}, false);
  running_mean_ = Tensor::zeros({channels});
  running_var_ = Tensor::full({channels}, 1.0);
}

void BatchNorm2d::collect_params(std::vector<Param*>& out) {
  out.push_back(&gamma_);
  out.push_back(&beta_);
}

void BatchNorm2d::collect_buffers(std::vector<std::pair<std::string, Tensor*>>& out) {
  out.emplace_back(name_ + ".running_mean", &running_mean_);
  out.emplace_back(name_ + ".running_var", &running_var_);
}

Tensor BatchNorm2d::forward(const Tensor& x, const StepContext& ctx, ValueRange* range) {
  return forward_impl(x, ctx, range, nullptr);
}

bool BatchNorm2d::can_forward_codes(QuantizerSpec spec, const StepContext& ctx) const {
  return relu_ && ctx.train && quantize_uses_range(spec);
}

QuantizedTensor BatchNorm2d::forward_codes(const Tensor& x, const StepContext& ctx, QuantizerSpec spec) {
  FQT_CHECK(can_forward_codes(spec, ctx), "BatchNorm2d {}: forward_codes needs the fused ReLU, a training forward and "
            "a deterministic per-tensor quantizer", name_);
  quant_detail::check_spec(spec);  // (before the parallel region, where it may not throw)
  QuantizedTensor q;
  q.spec = spec;
  ValueRange range;
  const Tensor y = forward_impl(x, ctx, &range, &q);
  if (y.defined()) q = quantize_in_range(y, spec, range.lo, range.hi);  // (non-finite statistics)
  return q;
}

// Training forward, two phases over the samples (see the top of the file): the per-channel sums,
// then y = ReLU((x - mean) * invstd * gamma + beta) run by run. With `codes` (fused ReLU, a
// deterministic per-tensor quantizer in codes->spec), the second phase writes y's codes instead
// of y: each run is normalized into a per-thread buffer (in L1) and rounded from there, as
// quantize_in_range would round it, on the grid of y's range — known before the pass, from the
// per-channel min and max of x that the first phase also takes: y is a monotone function of x
// within a channel (each IEEE operation of normalize_run is monotone in its operand, the ReLU
// too; increasing or decreasing with the sign of gamma), so y's extremes are the images of x's,
// computed by normalize_run itself. The fp32 output is then never written: returns an empty
// tensor. When the statistics are not finite (x holds a NaN or an Inf), it writes y as without
// `codes` and leaves them to the caller.
Tensor BatchNorm2d::forward_impl(const Tensor& x, const StepContext& ctx, ValueRange* range, QuantizedTensor* codes) {
  profile::RegionScope region([&] { return fmt::format("batchnorm {}: forward", c_); });
  FQT_CHECK(x.dtype() == DType::f32 && x.dim() >= 2 && x.size(1) == c_, "BatchNorm2d {}: input {} has not {} channels",
            name_, shape_str(x.shape()), c_);
  const int64_t N = x.size(0), C = c_, P = x.numel() / (N * C), M = N * P;
  const float* xp = x.data<float>();
  const float* g = gamma_.value.data<float>();
  const float* b = beta_.value.data<float>();
  float* rm = running_mean_.data<float>();
  float* rv = running_var_.data<float>();
  saved_train_ = ctx.train;
  if (range) *range = {};
  invstd_.assign(C, 0.0f);
  mean_.assign(C, 0.0f);
  in_shape_ = x.shape();
  if (!ctx.train) {
    x_ = {};
    mask_ = {};
    Tensor y = Tensor::empty(x.shape());
    float* yp = y.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(N * C * P))
    for (int64_t c = 0; c < C; ++c) {
      const float inv = static_cast<float>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps_));
      invstd_[c] = inv;
      const float scale = g[c] * inv, shift = b[c] - rm[c] * scale;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = (n * C + c) * P + p;
          const float v = xp[i] * scale + shift;
          yp[i] = relu_ ? (v > 0.0f ? v : 0.0f) : v;
        }
    }
    return y;
  }
  FQT_INPUT_CHECK(M > 1,
                  "BatchNorm2d {}: training needs more than one value per channel, got a batch of {} at {}x{} "
                  "(use a larger --batch or input)", name_, x.size(0), x.size(2), x.size(3));
  FQT_CHECK(!codes || relu_, "BatchNorm2d {}: codes need the fused ReLU", name_);
  // Backward rebuilds x-hat from x: kept here (a handle, no copy), or recomputed.
  x_ = input_src_ ? Tensor() : x;
  mask_ = relu_ ? Tensor::empty({(N * C * P + 7) / 8}, DType::u8) : Tensor();
  uint8_t* mk = relu_ ? mask_.data<uint8_t>() : nullptr;
  const int64_t NG = sample_groups(N);
  std::vector<double> part(static_cast<size_t>(NG * C * 2));  // [group][channel] sum, sum of squares
  std::vector<float> part_lo, part_hi;                        // [group][channel] min, max of x (codes)
  if (codes) part_lo.resize(static_cast<size_t>(NG * C)), part_hi.resize(static_cast<size_t>(NG * C));
  std::vector<double> mean(static_cast<size_t>(C)), ssd(static_cast<size_t>(C));
  const bool want_range = range && relu_;
  bool fused = false;  // codes, and finite statistics: the second phase writes codes
  Tensor y;
  float* yp = nullptr;
  uint8_t* cp = nullptr;
  float ylo = std::numeric_limits<float>::infinity(), yhi = -ylo;
  std::exception_ptr err;
#pragma omp parallel if (parallel_worth(N * C * P))
  {
    // A group's samples in memory order, each channel's lanes summing its runs in sample order
    // (the same additions as channel by channel, so the same sums; 16 sweeps of 3 KB runs over the
    // group's samples streamed worse).
    std::vector<double> acc(static_cast<size_t>(C * kLanes)), acc2(static_cast<size_t>(C * kLanes));
    std::vector<float> lo(static_cast<size_t>(C)), hi(static_cast<size_t>(C));
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < NG; ++gi) {
      std::fill(acc.begin(), acc.end(), 0.0), std::fill(acc2.begin(), acc2.end(), 0.0);
      std::fill(lo.begin(), lo.end(), std::numeric_limits<float>::infinity());
      std::fill(hi.begin(), hi.end(), -std::numeric_limits<float>::infinity());
      for (int64_t n = gi * N / NG; n < (gi + 1) * N / NG; ++n)
        for (int64_t c = 0; c < C; ++c) {
          if (codes) add_sum_sq_run<true>(xp + (n * C + c) * P, P, &acc[c * kLanes], &acc2[c * kLanes], &lo[c], &hi[c]);
          else add_sum_sq_run(xp + (n * C + c) * P, P, &acc[c * kLanes], &acc2[c * kLanes]);
        }
      for (int64_t c = 0; c < C; ++c) {
        part[(gi * C + c) * 2] = lanes_total(&acc[c * kLanes]), part[(gi * C + c) * 2 + 1] = lanes_total(&acc2[c * kLanes]);
        if (codes) part_lo[gi * C + c] = lo[c], part_hi[gi * C + c] = hi[c];
      }
    }
#pragma omp single
    try {  // (allocations: an exception may not leave the region; rethrown after it)
      bool finite = true;
      for (int64_t c = 0; c < C; ++c) {
        double sum = 0.0, sq = 0.0;
        for (int64_t gi = 0; gi < NG; ++gi) sum += part[(gi * C + c) * 2], sq += part[(gi * C + c) * 2 + 1];
        const double m = sum / static_cast<double>(M);
        mean[c] = m;
        ssd[c] = std::max(0.0, sq - sum * m);  // sum of squared deviations
        invstd_[c] = static_cast<float>(1.0 / std::sqrt(ssd[c] / static_cast<double>(M) + eps_));
        mean_[c] = static_cast<float>(m);
        finite = finite && std::isfinite(sum) && std::isfinite(sq);  // (fp64 sums of finite floats cannot overflow)
      }
      fused = codes && finite;
      if (fused) {  // y's range: the images of each channel's extremes of x
        for (int64_t c = 0; c < C; ++c) {
          float xlo = std::numeric_limits<float>::infinity(), xhi = -xlo;
          for (int64_t gi = 0; gi < NG; ++gi) xlo = std::min(xlo, part_lo[gi * C + c]), xhi = std::max(xhi, part_hi[gi * C + c]);
          const float ends[2] = {xlo, xhi};
          float img[2];
          normalize_run(ends, 2, mean_[c], invstd_[c], g[c], b[c], relu_, img, &ylo, &yhi);
        }
        const double dmn = ylo, dmx = yhi;
        *codes = quant_detail::make_header(codes->spec, N, C * P, &dmn, &dmx);
        codes->codes = Tensor::empty({N, C * P}, DType::u8);
        cp = codes->codes.data<uint8_t>();
      } else {
        y = Tensor::empty(x.shape());
        yp = y.data<float>();
      }
      if (relu_) zero_shared_mask_bytes(N * C, P, mk);
    } catch (...) {
      err = std::current_exception();
    }  // (implicit barrier: every thread sees err)
    if (err) {
      // nothing more: rethrown below
    } else if (fused) {
      std::vector<float> buf(static_cast<size_t>(P));
      const float qlo = codes->lo[0], qscale = codes->scale[0];
      const int B = codes->max_code();
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i0 = (n * C + c) * P;
          normalize_run(xp + i0, P, mean_[c], invstd_[c], g[c], b[c], relu_, buf.data(), nullptr, nullptr);
          mask_run(buf.data(), i0, P, mk);
          kernels::round_run_nearest(buf.data(), P, qlo, qscale, B, cp + i0);
        }
    } else {
#pragma omp for schedule(static) reduction(min : ylo) reduction(max : yhi)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i0 = (n * C + c) * P;
          // h = (x - mean) * invstd: backward's GradRun::h repeats exactly this
          normalize_run(xp + i0, P, mean_[c], invstd_[c], g[c], b[c], relu_, yp + i0, want_range ? &ylo : nullptr,
                        want_range ? &yhi : nullptr);
          if (relu_) mask_run(yp + i0, i0, P, mk);
        }
    }
  }
  if (err) std::rethrow_exception(err);
  if (range && relu_) *range = {ylo, yhi, true, {}, {}};
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = static_cast<float>((1.0 - momentum_) * rm[c] + momentum_ * mean[c]);
    rv[c] = static_cast<float>((1.0 - momentum_) * rv[c] + momentum_ * ssd[c] / static_cast<double>(M - 1));
  }
  return y;
}

Tensor BatchNorm2d::backward(const Tensor& dy, const StepContext& ctx) { return backward(dy, ctx, nullptr); }

Tensor BatchNorm2d::backward(Tensor dy, const StepContext& ctx, const Tensor* residual, ValueRange* dx_range) {
  const int64_t N = dy.size(0), C = c_, P = dy.numel() / (N * C), M = N * P;
  if (residual)
    FQT_CHECK(residual->shape() == dy.shape() && residual->dtype() == DType::f32,
              "BatchNorm2d {}: residual {} does not match dy {}", name_, shape_str(residual->shape()), shape_str(dy.shape()));
  const float* rp = residual ? residual->data<float>() : nullptr;
  // dx over dy where dy is ours alone (moved in): each element of dx is written after the last
  // read of that element of dy, by the same thread (pass 2 below), and dy's memory was just read,
  // so it is in cache where a new tensor's is not (PreAct-ResNet-20, 3 alternated breakdowns:
  // batch norm 16 backward 3.69-3.93 -> 3.18-3.45 ms a step with psq/s, 4.87-5.14 -> 4.07-4.19
  // with bhq/s; peak RSS 163.6 -> 154.5 MB).
  const bool over_dy = dy.sole_handle() && (!residual || residual->raw() != dy.raw());
  Tensor dx = over_dy ? dy : Tensor::empty(dy.shape());
  const float* dyp = dy.data<float>();
  float* dxp = dx.data<float>();
  const float* g = gamma_.value.data<float>();
  float* dg = gamma_.grad.data<float>();
  float* db = beta_.grad.data<float>();
  // Eval-mode forwards keep nothing (ctx.train == false): there is no backward for them.
  FQT_CHECK(saved_train_ && !in_shape_.empty() && shape_numel(in_shape_) == dy.numel() && (x_.defined() || input_src_),
            "BatchNorm2d {}: backward without a training forward", name_);
  // x: kept by forward, or recomputed; x-hat is rebuilt run by run with forward's own expression
  // (x - mean) * invstd, so every value (and so every sum below) is the same.
  Tensor x = x_;
  if (!x.defined()) {
    profile::RegionScope region([&] { return fmt::format("batchnorm {}: backward: recompute input", c_); });
    x = input_src_();
    FQT_CHECK(x.shape() == in_shape_ && x.dtype() == DType::f32,
              "BatchNorm2d {}: recomputed input {} does not match the forward's {}", name_, shape_str(x.shape()),
              shape_str(in_shape_));
  }
  profile::RegionScope region([&] { return fmt::format("batchnorm {}: backward", c_); });
  const float* xp = x.data<float>();
  FQT_CHECK(!relu_ || (mask_.defined() && mask_.numel() == (dy.numel() + 7) / 8),
            "BatchNorm2d {}: backward without a training forward", name_);
  const uint8_t* mk = relu_ ? mask_.data<uint8_t>() : nullptr;
  std::vector<double> part(static_cast<size_t>(sample_groups(N) * C * 2));  // [group][channel] sums of dy, dy xhat
  std::vector<float> kc(static_cast<size_t>(C)), mdy(static_cast<size_t>(C)), mdyh(static_cast<size_t>(C));
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;  // dx's range (dx_range)
  uint32_t nan = 0;
  std::vector<float> slo(dx_range ? N : 0), shi(dx_range ? N : 0);  // and each sample's
  auto run = [&](int64_t n, int64_t c) {
    const int64_t off = (n * C + c) * P;
    return GradRun{dyp + off, mk, off, xp + off, mean_[c], invstd_[c]};
  };
#pragma omp parallel if (parallel_worth(N * C * P))
  {
    const int64_t NG = sample_groups(N);
    // (a group's samples in memory order, as forward's statistics)
    std::vector<double> a(static_cast<size_t>(C * kLanes)), b(static_cast<size_t>(C * kLanes));
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < NG; ++gi) {
      std::fill(a.begin(), a.end(), 0.0), std::fill(b.begin(), b.end(), 0.0);
      for (int64_t n = gi * N / NG; n < (gi + 1) * N / NG; ++n)
        for (int64_t c = 0; c < C; ++c) add_dy_dyh_run(run(n, c), P, &a[c * kLanes], &b[c * kLanes]);
      for (int64_t c = 0; c < C; ++c)
        part[(gi * C + c) * 2] = lanes_total(&a[c * kLanes]), part[(gi * C + c) * 2 + 1] = lanes_total(&b[c * kLanes]);
    }
#pragma omp single
    for (int64_t c = 0; c < C; ++c) {
      double sdy = 0.0, sdyh = 0.0;
      for (int64_t gi = 0; gi < NG; ++gi) sdy += part[(gi * C + c) * 2], sdyh += part[(gi * C + c) * 2 + 1];
      dg[c] += static_cast<float>(sdyh);
      db[c] += static_cast<float>(sdy);
      // dx = gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
      kc[c] = g[c] * invstd_[c];
      mdy[c] = static_cast<float>(sdy / M), mdyh[c] = static_cast<float>(sdyh / M);
    }  // (implicit barrier)
    // With dx_range: each run's min and max (minmax_lanes) while the run just written is in L1.
#pragma omp for schedule(static) reduction(min : lo) reduction(max : hi) reduction(| : nan)
    for (int64_t n = 0; n < N; ++n) {
      float a = std::numeric_limits<float>::infinity(), b = -a;
      for (int64_t c = 0; c < C; ++c) {
        float* const o = dxp + (n * C + c) * P;
        dx_run(run(n, c), P, kc[c], mdy[c], mdyh[c], rp ? rp + (n * C + c) * P : nullptr, o);
        if (dx_range) kernels::minmax_lanes(o, P, a, b, nan);
      }
      if (dx_range) slo[n] = a, shi[n] = b, lo = std::min(lo, a), hi = std::max(hi, b);
    }
  }
  // (an infinity shows in lo / hi; a NaN only in nan)
  if (dx_range) {
    dx_range->lo = lo, dx_range->hi = hi, dx_range->valid = !nan && std::isfinite(lo) && std::isfinite(hi);
    dx_range->sample_lo = std::move(slo), dx_range->sample_hi = std::move(shi);
  }
  return dx;
}

}  // namespace fqt
