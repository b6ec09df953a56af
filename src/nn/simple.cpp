// ReLU, MaxPool2d, GlobalAvgPool, Flatten, Sequential, add_inplace.
#include "common.hpp"
#include "relu_mask.hpp"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <limits>

namespace fqt {
using nn_detail::parallel_worth;

// ---- ReLU -------------------------------------------------------------------------------------

Tensor ReLU::forward(const Tensor& x, const StepContext& ctx) {
  Tensor y = Tensor::empty(x.shape());
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  const int64_t n = x.numel(), bytes = (n + 7) / 8;
  mask_ = ctx.train ? Tensor::empty({bytes}, DType::u8) : Tensor();
  n_ = ctx.train ? n : 0;
  uint8_t* m = ctx.train ? mask_.data<uint8_t>() : nullptr;
  // Blocks of 16 values = two mask bytes, so threads never share a byte. Bit k of byte j is
  // x[8j + k] > 0 (NaN: 0), in both the vector and the scalar form.
  const int64_t blocks = n / 16;
#pragma omp parallel for schedule(static) if (parallel_worth(n))
  for (int64_t b = 0; b < blocks; ++b) {
#if defined(__AVX512F__)
    const __m512 v = _mm512_loadu_ps(xp + b * 16);
    const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
    _mm512_storeu_ps(yp + b * 16, _mm512_maskz_mov_ps(pos, v));
    if (m) {
      m[2 * b] = static_cast<uint8_t>(pos & 0xff);
      m[2 * b + 1] = static_cast<uint8_t>(pos >> 8);
    }
#elif defined(__AVX2__)
    // Two 8-value halves: compare, movemask (bit k = lane k, as the mask layout wants).
    for (int h = 0; h < 2; ++h) {
      const __m256 v = _mm256_loadu_ps(xp + b * 16 + h * 8);
      const __m256 pos = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ);
      _mm256_storeu_ps(yp + b * 16 + h * 8, _mm256_and_ps(pos, v));
      if (m) m[2 * b + h] = static_cast<uint8_t>(_mm256_movemask_ps(pos));
    }
#else
    uint32_t bits = 0;
    for (int64_t k = 0; k < 16; ++k) {
      const float v = xp[b * 16 + k];
      const bool pos = v > 0.0f;
      yp[b * 16 + k] = pos ? v : 0.0f;
      bits |= static_cast<uint32_t>(pos) << k;
    }
    if (m) m[2 * b] = static_cast<uint8_t>(bits & 0xff), m[2 * b + 1] = static_cast<uint8_t>(bits >> 8);
#endif
  }
  for (int64_t j = blocks * 2; j < bytes; ++j) {  // the tail: at most 15 values
    uint8_t bits = 0;
    for (int64_t i = j * 8, k = 0; i < std::min(n, j * 8 + 8); ++i, ++k) {
      const bool pos = xp[i] > 0.0f;
      yp[i] = pos ? xp[i] : 0.0f;
      bits |= static_cast<uint8_t>(pos) << k;
    }
    if (m) m[j] = bits;
  }
  return y;
}

Tensor ReLU::backward(const Tensor& dy, const StepContext& ctx) {
  FQT_CHECK(mask_.defined() && n_ == dy.numel(), "ReLU: backward without a training forward");
  Tensor dx = Tensor::empty(dy.shape());
  const uint8_t* m = mask_.data<uint8_t>();
  const float* dyp = dy.data<float>();
  float* dxp = dx.data<float>();
  const int64_t n = n_;
  const int64_t blocks = n / 16;
#pragma omp parallel for schedule(static) if (parallel_worth(n))
  for (int64_t b = 0; b < blocks; ++b) {
#if defined(__AVX512F__)
    const __mmask16 pos = static_cast<__mmask16>(m[2 * b] | (static_cast<unsigned>(m[2 * b + 1]) << 8));
    _mm512_storeu_ps(dxp + b * 16, _mm512_maskz_loadu_ps(pos, dyp + b * 16));
#elif defined(__AVX2__)
    for (int h = 0; h < 2; ++h) nn_detail::keep_by_bits8(m[2 * b + h], dyp + b * 16 + h * 8, dxp + b * 16 + h * 8);
#else
    for (int64_t i = b * 16; i < b * 16 + 16; ++i) dxp[i] = (m[i >> 3] >> (i & 7)) & 1 ? dyp[i] : 0.0f;
#endif
  }
  for (int64_t i = blocks * 16; i < n; ++i) dxp[i] = (m[i >> 3] >> (i & 7)) & 1 ? dyp[i] : 0.0f;
  return dx;
}

// ---- MaxPool2d (no padding) -------------------------------------------------------------------

Tensor MaxPool2d::forward(const Tensor& x, const StepContext& ctx) {
  FQT_CHECK(x.dim() == 4, "MaxPool2d: want N,C,H,W, got {}", shape_str(x.shape()));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H - k_) / stride_ + 1, Wo = (W - k_) / stride_ + 1;
  FQT_CHECK(Ho > 0 && Wo > 0, "MaxPool2d: kernel {} larger than {}x{}", k_, H, W);
  Tensor y = Tensor::empty({N, C, Ho, Wo});
  Tensor am = Tensor::empty({N, C, Ho, Wo}, DType::i32);
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  int32_t* ap = am.data<int32_t>();
#pragma omp parallel for schedule(static) if (parallel_worth(x.numel()))
  for (int64_t nc = 0; nc < N * C; ++nc) {
    const float* plane = xp + nc * H * W;
    for (int64_t oh = 0; oh < Ho; ++oh)
      for (int64_t ow = 0; ow < Wo; ++ow) {
        float best = -std::numeric_limits<float>::infinity();
        int32_t bi = static_cast<int32_t>((oh * stride_) * W + ow * stride_);
        for (int64_t kh = 0; kh < k_; ++kh)
          for (int64_t kw = 0; kw < k_; ++kw) {
            const int64_t i = (oh * stride_ + kh) * W + ow * stride_ + kw;
            if (plane[i] > best) best = plane[i], bi = static_cast<int32_t>(i);  // first max wins
          }
        const int64_t o = nc * Ho * Wo + oh * Wo + ow;
        yp[o] = best;
        ap[o] = bi;
      }
  }
  in_shape_ = x.shape();
  argmax_ = ctx.train ? am : Tensor();
  return y;
}

Tensor MaxPool2d::backward(const Tensor& dy, const StepContext& ctx) {
  FQT_CHECK(argmax_.defined() && argmax_.numel() == dy.numel(), "MaxPool2d: backward without a training forward");
  Tensor dx = Tensor::zeros(in_shape_);
  const int64_t NC = in_shape_[0] * in_shape_[1], HW = in_shape_[2] * in_shape_[3];
  const int64_t P = dy.numel() / NC;
  const float* dyp = dy.data<float>();
  const int32_t* ap = argmax_.data<int32_t>();
  float* dxp = dx.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(dy.numel() * 4))
  for (int64_t nc = 0; nc < NC; ++nc)
    for (int64_t p = 0; p < P; ++p) dxp[nc * HW + ap[nc * P + p]] += dyp[nc * P + p];
  return dx;
}

// ---- GlobalAvgPool ----------------------------------------------------------------------------

Tensor GlobalAvgPool::forward(const Tensor& x, const StepContext& ctx) {
  FQT_CHECK(x.dim() == 4, "GlobalAvgPool: want N,C,H,W, got {}", shape_str(x.shape()));
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  Tensor y = Tensor::empty({N, C});
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(x.numel()))
  for (int64_t nc = 0; nc < N * C; ++nc) {
    double s = 0.0;
    for (int64_t p = 0; p < P; ++p) s += xp[nc * P + p];
    yp[nc] = static_cast<float>(s / static_cast<double>(P));
  }
  in_shape_ = x.shape();
  return y;
}

Tensor GlobalAvgPool::backward(const Tensor& dy, const StepContext& ctx) {
  FQT_CHECK(in_shape_.size() == 4 && dy.numel() == in_shape_[0] * in_shape_[1], "GlobalAvgPool: bad dy {}",
            shape_str(dy.shape()));
  Tensor dx = Tensor::empty(in_shape_);
  const int64_t NC = in_shape_[0] * in_shape_[1], P = in_shape_[2] * in_shape_[3];
  const float inv = 1.0f / static_cast<float>(P);
  const float* dyp = dy.data<float>();
  float* dxp = dx.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(dx.numel()))
  for (int64_t nc = 0; nc < NC; ++nc)
    for (int64_t p = 0; p < P; ++p) dxp[nc * P + p] = dyp[nc] * inv;
  return dx;
}

// ---- Flatten ----------------------------------------------------------------------------------

Tensor Flatten::forward(const Tensor& x, const StepContext& ctx) {
  in_shape_ = x.shape();
  return x.reshape({x.size(0), x.numel() / x.size(0)});
}

Tensor Flatten::backward(const Tensor& dy, const StepContext& ctx) { return dy.reshape(in_shape_); }

// ---- Sequential -------------------------------------------------------------------------------

Module& Sequential::add(ModulePtr m) {
  FQT_CHECK(m != nullptr, "Sequential::add: null module");
  children_.push_back(std::move(m));
  return *children_.back();
}

Tensor Sequential::forward(const Tensor& x, const StepContext& ctx) {
  Tensor h = x;
  for (auto& c : children_) h = c->forward(h, ctx);
  return h;
}

Tensor Sequential::backward(const Tensor& dy, const StepContext& ctx) { return backward_ranged(dy, ctx, nullptr, nullptr); }

Tensor Sequential::backward_ranged(Tensor dy, const StepContext& ctx, const ValueRange* dy_range,
                                   ValueRange* dx_range) {
  Tensor g = std::move(dy);
  ValueRange r = dy_range ? *dy_range : ValueRange{};
  for (auto it = children_.rbegin(); it != children_.rend(); ++it) {
    ValueRange next;
    g = (*it)->backward_ranged(std::move(g), ctx, r.valid ? &r : nullptr, &next);  // (g's only handle)
    r = g.defined() ? std::move(next) : ValueRange{};
    if (!g.defined()) break;  // a first layer without input gradient: nothing below needs one
  }
  if (dx_range) *dx_range = r;
  return g;
}

void Sequential::enable_recompute(const RecomputePolicy& policy, const OutputSource& input) {
  OutputSource cur = input;
  for (auto& c : children_) {
    c->enable_recompute(policy, cur);
    cur = c->output_source();
  }
}

void Sequential::collect_params(std::vector<Param*>& out) {
  for (auto& c : children_) c->collect_params(out);
}
void Sequential::collect_buffers(std::vector<std::pair<std::string, Tensor*>>& out) {
  for (auto& c : children_) c->collect_buffers(out);
}
void Sequential::collect_quantized(std::vector<QuantizedLayer*>& out) {
  for (auto& c : children_) c->collect_quantized(out);
}

Tensor OutputSource::plus(const Tensor& r) const {
  if (make_plus) return make_plus(r);
  Tensor y = make();
  add_inplace(y, r);
  return y;
}

void add_inplace(Tensor& a, const Tensor& b) {
  FQT_CHECK(a.numel() == b.numel(), "add_inplace: {} vs {}", shape_str(a.shape()), shape_str(b.shape()));
  float* ap = a.data<float>();
  const float* bp = b.data<float>();
  const int64_t n = a.numel();
#pragma omp parallel for schedule(static) if (parallel_worth(n))
  for (int64_t i = 0; i < n; ++i) ap[i] += bp[i];
}

}  // namespace fqt

namespace fqt {

void saved_add(std::vector<std::pair<const void*, size_t>>& out, const Tensor& t) {
  if (t.defined() && t.numel() > 0) out.emplace_back(t.raw(), t.nbytes());
}

void saved_add(std::vector<std::pair<const void*, size_t>>& out, const QuantizedTensor& q) {
  saved_add(out, q.codes);
  if (!q.scale.empty()) out.emplace_back(q.scale.data(), q.scale.size() * sizeof(float));
  if (!q.lo.empty()) out.emplace_back(q.lo.data(), q.lo.size() * sizeof(float));
}

size_t saved_bytes(const Module& m) {
  std::vector<std::pair<const void*, size_t>> items;
  m.collect_saved(items);
  std::sort(items.begin(), items.end());
  size_t total = 0;
  const void* last = nullptr;
  for (const auto& [p, n] : items) {
    if (p == last) continue;  // one storage shared by two layers (e.g. ReLU output = conv input)
    total += n;
    last = p;
  }
  return total;
}

}  // namespace fqt
