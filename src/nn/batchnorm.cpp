// BatchNorm2d: per-channel normalisation over N,H,W; statistics in fp64.
// Training passes split the batch by samples, as the convolutions around them do (each thread
// keeps working on the samples whose activations it produced and will consume: one channel per
// thread moved every activation between the cores' caches), in two phases: per-channel partial
// sums over fixed groups of samples, added in group order (so the sums do not depend on the
// thread count), then the element-wise pass over each thread's samples.
#include "common.hpp"
#include "relu_mask.hpp"

#include <algorithm>
#include <cmath>
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
void add_sum_sq_run(const float* x, int64_t n, double* acc, double* acc2) {
  int64_t i = 0;
#ifdef FQT_BN_VECTOR
  D8 a = d8_load(acc), b = d8_load(acc2);
  for (; i + kLanes <= n; i += kLanes) {
    const D8 v = d8_cvt(_mm256_loadu_ps(x + i));
    a = d8_add(a, v);
    b = d8_add(b, d8_mul(v, v));
  }
  d8_store(acc, a), d8_store(acc2, b);
#endif
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const double v = x[i + l];
      acc[l] += v;
      acc2[l] += v * v;
    }
  for (int l = 0; i < n; ++i, ++l) {
    const double v = x[i];
    acc[l] += v;
    acc2[l] += v * v;
  }
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

// o = k * (d - md - h * mh) over a run of n values.
void dx_run(const GradRun& g, int64_t n, float k, float md, float mh, float* o) {
  int64_t p = 0;
#ifdef FQT_BN_VECTOR
  const __m256 vk = _mm256_set1_ps(k), vmd = _mm256_set1_ps(md), vmh = _mm256_set1_ps(mh);
  for (; p + 8 <= n; p += 8)
    _mm256_storeu_ps(o + p, _mm256_mul_ps(vk, _mm256_sub_ps(_mm256_sub_ps(g.d8(p), vmd), _mm256_mul_ps(g.h8(p), vmh))));
#endif
  for (; p < n; ++p) o[p] = k * (g.d(p) - md - g.h(p) * mh);
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

// Bytes of `mask` that lie wholly inside elements [i0, i0 + n) of `out` (a thread owns them).
inline void mask_inner_bytes(const float* out, int64_t i0, int64_t n, uint8_t* mask) {
  for (int64_t j = (i0 + 7) / 8; j < (i0 + n) / 8; ++j) mask[j] = positive_bits8(out + 8 * j);
}

// Byte j from elements [8j, min(8j + 8, total)) (the bytes runs share, the tensor's last one).
inline uint8_t mask_byte(const float* out, int64_t j, int64_t total) {
  uint8_t bits = 0;
  for (int64_t i = 8 * j, k = 0; i < std::min(total, 8 * j + 8); ++i, ++k) bits |= static_cast<uint8_t>(out[i] > 0.0f) << k;
  return bits;
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
  FQT_CHECK(x.dtype() == DType::f32 && x.dim() >= 2 && x.size(1) == c_, "BatchNorm2d {}: input {} has not {} channels",
            name_, shape_str(x.shape()), c_);
  const int64_t N = x.size(0), C = c_, P = x.numel() / (N * C), M = N * P;
  Tensor y = Tensor::empty(x.shape());
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  const float* g = gamma_.value.data<float>();
  const float* b = beta_.value.data<float>();
  float* rm = running_mean_.data<float>();
  float* rv = running_var_.data<float>();
  saved_train_ = ctx.train;
  if (range) *range = {};
  invstd_.assign(C, 0.0f);
  mean_.assign(C, 0.0f);
  in_shape_ = x.shape();
  if (ctx.train) {
    FQT_CHECK(M > 1, "BatchNorm2d {}: training needs more than one value per channel", name_);
    // Backward rebuilds x-hat from x: kept here (a handle, no copy), or recomputed.
    x_ = input_src_ ? Tensor() : x;
    mask_ = relu_ ? Tensor::empty({(N * C * P + 7) / 8}, DType::u8) : Tensor();
    uint8_t* mk = relu_ ? mask_.data<uint8_t>() : nullptr;
    const int64_t NG = sample_groups(N);
    std::vector<double> part(static_cast<size_t>(NG * C * 2));  // [group][channel] sum, sum of squares
    std::vector<double> mean(static_cast<size_t>(C)), ssd(static_cast<size_t>(C));
    const bool want_range = range && relu_;
    float ylo = std::numeric_limits<float>::infinity(), yhi = -ylo;
#pragma omp parallel if (parallel_worth(N * C * P))
    {
#pragma omp for schedule(static)
      for (int64_t gi = 0; gi < NG; ++gi)
        for (int64_t c = 0; c < C; ++c) {
          double acc[kLanes] = {}, acc2[kLanes] = {};
          for (int64_t n = gi * N / NG; n < (gi + 1) * N / NG; ++n) add_sum_sq_run(xp + (n * C + c) * P, P, acc, acc2);
          part[(gi * C + c) * 2] = lanes_total(acc), part[(gi * C + c) * 2 + 1] = lanes_total(acc2);
        }
#pragma omp single
      for (int64_t c = 0; c < C; ++c) {
        double sum = 0.0, sq = 0.0;
        for (int64_t gi = 0; gi < NG; ++gi) sum += part[(gi * C + c) * 2], sq += part[(gi * C + c) * 2 + 1];
        const double m = sum / static_cast<double>(M);
        mean[c] = m;
        ssd[c] = std::max(0.0, sq - sum * m);  // sum of squared deviations
        invstd_[c] = static_cast<float>(1.0 / std::sqrt(ssd[c] / static_cast<double>(M) + eps_));
        mean_[c] = static_cast<float>(m);
      }  // (implicit barrier)
#pragma omp for schedule(static) reduction(min : ylo) reduction(max : yhi)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i0 = (n * C + c) * P;
          // h = (x - mean) * invstd: backward's GradRun::h repeats exactly this
          normalize_run(xp + i0, P, mean_[c], invstd_[c], g[c], b[c], relu_, yp + i0, want_range ? &ylo : nullptr,
                        want_range ? &yhi : nullptr);
          if (relu_) mask_inner_bytes(yp, i0, P, mk);
        }
    }
    if (want_range) *range = {ylo, yhi, true};
    for (int64_t c = 0; c < C; ++c) {
      rm[c] = static_cast<float>((1.0 - momentum_) * rm[c] + momentum_ * mean[c]);
      rv[c] = static_cast<float>((1.0 - momentum_) * rv[c] + momentum_ * ssd[c] / static_cast<double>(M - 1));
    }
    if (relu_) {  // the bytes shared by two runs (a run starting mid-byte) and the last one
      const int64_t total = N * C * P;
      for (int64_t r = 1; r < N * C; ++r)
        if ((r * P) % 8 != 0) mk[r * P / 8] = mask_byte(yp, r * P / 8, total);
      if (total % 8 != 0) mk[total / 8] = mask_byte(yp, total / 8, total);
    }
  } else {
    x_ = {};
    mask_ = {};
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
  }
  return y;
}

Tensor BatchNorm2d::backward(const Tensor& dy, const StepContext& ctx) {
  const int64_t N = dy.size(0), C = c_, P = dy.numel() / (N * C), M = N * P;
  Tensor dx = Tensor::empty(dy.shape());
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
    x = input_src_();
    FQT_CHECK(x.shape() == in_shape_ && x.dtype() == DType::f32,
              "BatchNorm2d {}: recomputed input {} does not match the forward's {}", name_, shape_str(x.shape()),
              shape_str(in_shape_));
  }
  const float* xp = x.data<float>();
  FQT_CHECK(!relu_ || (mask_.defined() && mask_.numel() == (dy.numel() + 7) / 8),
            "BatchNorm2d {}: backward without a training forward", name_);
  const uint8_t* mk = relu_ ? mask_.data<uint8_t>() : nullptr;
  std::vector<double> part(static_cast<size_t>(sample_groups(N) * C * 2));  // [group][channel] sums of dy, dy xhat
  std::vector<float> kc(static_cast<size_t>(C)), mdy(static_cast<size_t>(C)), mdyh(static_cast<size_t>(C));
  auto run = [&](int64_t n, int64_t c) {
    const int64_t off = (n * C + c) * P;
    return GradRun{dyp + off, mk, off, xp + off, mean_[c], invstd_[c]};
  };
#pragma omp parallel if (parallel_worth(N * C * P))
  {
    const int64_t NG = sample_groups(N);
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < NG; ++gi)
      for (int64_t c = 0; c < C; ++c) {
        double a[kLanes] = {}, b[kLanes] = {};
        for (int64_t n = gi * N / NG; n < (gi + 1) * N / NG; ++n) add_dy_dyh_run(run(n, c), P, a, b);
        part[(gi * C + c) * 2] = lanes_total(a), part[(gi * C + c) * 2 + 1] = lanes_total(b);
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
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) dx_run(run(n, c), P, kc[c], mdy[c], mdyh[c], dxp + (n * C + c) * P);
  }
  return dx;
}

}  // namespace fqt
