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

namespace fqt {
using namespace nn_detail;

namespace {

// fp64 sums over a run of floats in 8 independent lanes: a single running double sum is one
// serial chain of dependent adds (4 cycles each); 8 lanes vectorize. The order of the additions
// depends only on n, never on the thread count.
constexpr int kLanes = 8;

// Sum and sum of squares in one pass. In fp64 the variance E[x^2] - mean^2 of fp32 inputs loses
// about mean^2 / var * 1e-16 relative: far below fp32 resolution for any batch-norm input.
void add_sum_sq_run(const float* x, int64_t n, double* acc, double* acc2) {
  int64_t i = 0;
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

void add_dy_dyh_run(const float* dy, const float* h, int64_t n, double* a, double* b) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      a[l] += dy[i + l];
      b[l] += static_cast<double>(dy[i + l]) * h[i + l];
    }
  for (int l = 0; i < n; ++i, ++l) {
    a[l] += dy[i];
    b[l] += static_cast<double>(dy[i]) * h[i];
  }
}

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

Tensor BatchNorm2d::forward(const Tensor& x, const StepContext& ctx) {
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
  invstd_.assign(C, 0.0f);
  mean_.assign(C, 0.0f);
  in_shape_ = x.shape();
  if (ctx.train) {
    FQT_CHECK(M > 1, "BatchNorm2d {}: training needs more than one value per channel", name_);
    // Recomputing: x-hat is not kept (backward rebuilds it from the recomputed input).
    xhat_ = input_src_ ? Tensor() : Tensor::empty(x.shape());
    float* hp = input_src_ ? nullptr : xhat_.data<float>();
    mask_ = relu_ ? Tensor::empty({(N * C * P + 7) / 8}, DType::u8) : Tensor();
    uint8_t* mk = relu_ ? mask_.data<uint8_t>() : nullptr;
    const int64_t NG = sample_groups(N);
    std::vector<double> part(static_cast<size_t>(NG * C * 2));  // [group][channel] sum, sum of squares
    std::vector<double> mean(static_cast<size_t>(C)), ssd(static_cast<size_t>(C));
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
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i0 = (n * C + c) * P;
          const float m = mean_[c], inv = invstd_[c], gc = g[c], bc = b[c];
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = i0 + p;
            const float h = (xp[i] - m) * inv;  // backward's recomputation repeats exactly this
            if (hp) hp[i] = h;
            const float v = h * gc + bc;
            yp[i] = relu_ ? (v > 0.0f ? v : 0.0f) : v;  // the fused ReLU as ReLU computes it (NaN -> 0)
          }
          if (relu_) mask_inner_bytes(yp, i0, P, mk);
        }
    }
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
    xhat_ = {};
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
  FQT_CHECK(saved_train_ && !in_shape_.empty() && shape_numel(in_shape_) == dy.numel() && (xhat_.defined() || input_src_),
            "BatchNorm2d {}: backward without a training forward", name_);
  // x-hat: kept by forward, or recomputed run by run from the recomputed input with forward's
  // own expression (x - mean) * invstd, so every value (and so every sum below) is the same.
  Tensor x;
  if (!xhat_.defined()) {
    x = input_src_();
    FQT_CHECK(x.shape() == in_shape_ && x.dtype() == DType::f32,
              "BatchNorm2d {}: recomputed input {} does not match the forward's {}", name_, shape_str(x.shape()),
              shape_str(in_shape_));
  }
  const float* hp = xhat_.defined() ? xhat_.data<float>() : nullptr;
  const float* xp = x.defined() ? x.data<float>() : nullptr;
  FQT_CHECK(!relu_ || (mask_.defined() && mask_.numel() == (dy.numel() + 7) / 8),
            "BatchNorm2d {}: backward without a training forward", name_);
  const uint8_t* mk = relu_ ? mask_.data<uint8_t>() : nullptr;
  std::vector<double> part(static_cast<size_t>(sample_groups(N) * C * 2));  // [group][channel] sums of dy, dy xhat
  std::vector<float> kc(static_cast<size_t>(C)), mdy(static_cast<size_t>(C)), mdyh(static_cast<size_t>(C));
#pragma omp parallel if (parallel_worth(N * C * P))
  {
    std::vector<float> buf(hp ? 0 : static_cast<size_t>(P));
    std::vector<float> dm(mk ? static_cast<size_t>(P) : 0);
    // The incoming gradient run of (n, c): dy itself, or through the fused ReLU's mask (dy or
    // +0, exactly what ReLU::backward hands on).
    auto grad_run = [&](int64_t n, int64_t c) -> const float* {
      const int64_t off = (n * C + c) * P;
      if (!mk) return dyp + off;
      int64_t p = 0;
      // 8 values at a time: their 8 mask bits (from two bytes when the run is not byte-aligned;
      // the second byte only when it exists), dy kept where the bit is set.
      const int64_t nbytes = (N * C * P + 7) / 8;
      for (; p + 8 <= P; p += 8) {
        const int64_t i = off + p, j = i >> 3;
        unsigned w = mk[j];
        if ((i & 7) && j + 1 < nbytes) w |= static_cast<unsigned>(mk[j + 1]) << 8;
        keep_by_bits8(w >> (i & 7), dyp + i, dm.data() + p);
      }
      for (; p < P; ++p) {
        const int64_t i = off + p;
        dm[p] = (mk[i >> 3] >> (i & 7)) & 1 ? dyp[i] : 0.0f;
      }
      return dm.data();
    };
    // The x-hat run of (n, c): in place, or rebuilt into buf.
    auto run = [&](int64_t n, int64_t c) -> const float* {
      const int64_t off = (n * C + c) * P;
      if (hp) return hp + off;
      const float m = mean_[c], inv = invstd_[c];
      for (int64_t p = 0; p < P; ++p) buf[p] = (xp[off + p] - m) * inv;
      return buf.data();
    };
    const int64_t NG = sample_groups(N);
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < NG; ++gi)
      for (int64_t c = 0; c < C; ++c) {
        double a[kLanes] = {}, b[kLanes] = {};
        for (int64_t n = gi * N / NG; n < (gi + 1) * N / NG; ++n) add_dy_dyh_run(grad_run(n, c), run(n, c), P, a, b);
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
      for (int64_t c = 0; c < C; ++c) {
        const float* h = run(n, c);
        const float* d = grad_run(n, c);
        float* o = dxp + (n * C + c) * P;
        const float k = kc[c], md = mdy[c], mh = mdyh[c];
        for (int64_t p = 0; p < P; ++p) o[p] = k * (d[p] - md - h[p] * mh);
      }
  }
  return dx;
}

}  // namespace fqt
