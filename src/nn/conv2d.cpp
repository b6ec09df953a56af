// Conv2d via im2col + GEMM with the recipe's quantizers (see layers.hpp for the layout).
#include "common.hpp"

#include <cstring>

namespace fqt {
using namespace nn_detail;

// ---- layout helpers ---------------------------------------------------------------------------

Tensor im2col(const Tensor& x, int64_t k, int64_t stride, int64_t pad) {
  FQT_CHECK(x.dim() == 4 && x.dtype() == DType::f32, "im2col: want f32 N,C,H,W, got {}", shape_str(x.shape()));
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
  FQT_CHECK(Ho > 0 && Wo > 0, "im2col: kernel {} larger than padded input {}x{}", k, H, W);
  const int64_t P = Ho * Wo, NP = N * P, rows = C * k * k;
  Tensor cols = Tensor::empty({rows, NP});
  const float* xp = x.data<float>();
  float* cp = cols.data<float>();
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(rows * NP))
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t c = r / (k * k), kh = (r / k) % k, kw = r % k;
      const float* plane = xp + (n * C + c) * H * W;
      float* out = cp + r * NP + n * P;
      for (int64_t oh = 0; oh < Ho; ++oh) {
        const int64_t ih = oh * stride - pad + kh;
        float* o = out + oh * Wo;
        if (ih < 0 || ih >= H) {
          std::memset(o, 0, sizeof(float) * Wo);
          continue;
        }
        const float* src = plane + ih * W;
        if (stride == 1) {
          // iw = ow - pad + kw; valid ow in [pad - kw, W + pad - kw)
          const int64_t lo = std::min<int64_t>(Wo, std::max<int64_t>(0, pad - kw));
          const int64_t hi = std::min<int64_t>(Wo, W + pad - kw);
          for (int64_t ow = 0; ow < lo; ++ow) o[ow] = 0.0f;
          if (hi > lo) std::memcpy(o + lo, src + lo - pad + kw, sizeof(float) * (hi - lo));
          for (int64_t ow = std::max(lo, hi); ow < Wo; ++ow) o[ow] = 0.0f;
        } else {
          for (int64_t ow = 0; ow < Wo; ++ow) {
            const int64_t iw = ow * stride - pad + kw;
            o[ow] = (iw >= 0 && iw < W) ? src[iw] : 0.0f;
          }
        }
      }
    }
  }
  return cols;
}

Tensor col2im(const Tensor& cols, const Shape& in_shape, int64_t k, int64_t stride, int64_t pad) {
  FQT_CHECK(in_shape.size() == 4, "col2im: want an N,C,H,W shape");
  const int64_t N = in_shape[0], C = in_shape[1], H = in_shape[2], W = in_shape[3];
  const int64_t Ho = (H + 2 * pad - k) / stride + 1, Wo = (W + 2 * pad - k) / stride + 1;
  const int64_t P = Ho * Wo, NP = N * P;
  FQT_CHECK(cols.numel() == C * k * k * NP, "col2im: cols {} do not match input {}", shape_str(cols.shape()),
            shape_str(in_shape));
  Tensor x = Tensor::zeros(in_shape);
  const float* cp = cols.data<float>();
  float* xp = x.data<float>();
  // Each (n, c) plane is owned by one thread and summed in a fixed (kh, kw, oh, ow) order.
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(cols.numel()))
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      float* plane = xp + (n * C + c) * H * W;
      for (int64_t kh = 0; kh < k; ++kh) {
        for (int64_t kw = 0; kw < k; ++kw) {
          const float* src = cp + ((c * k + kh) * k + kw) * NP + n * P;
          for (int64_t oh = 0; oh < Ho; ++oh) {
            const int64_t ih = oh * stride - pad + kh;
            if (ih < 0 || ih >= H) continue;
            float* dst = plane + ih * W;
            const float* s = src + oh * Wo;
            if (stride == 1) {
              const int64_t lo = std::max<int64_t>(0, pad - kw), hi = std::min<int64_t>(Wo, W + pad - kw);
              for (int64_t ow = lo; ow < hi; ++ow) dst[ow - pad + kw] += s[ow];
            } else {
              for (int64_t ow = 0; ow < Wo; ++ow) {
                const int64_t iw = ow * stride - pad + kw;
                if (iw >= 0 && iw < W) dst[iw] += s[ow];
              }
            }
          }
        }
      }
    }
  }
  return x;
}

Tensor nchw_to_cm(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / (N * C);
  Tensor out = Tensor::empty({C, N * P});
  const float* xp = x.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(x.numel()))
  for (int64_t c = 0; c < C; ++c)
    for (int64_t n = 0; n < N; ++n) std::memcpy(op + (c * N + n) * P, xp + (n * C + c) * P, sizeof(float) * P);
  return out;
}

Tensor cm_to_nchw(const Tensor& x, const Shape& shape) {
  const int64_t N = shape[0], C = shape[1], P = shape_numel(shape) / (N * C);
  FQT_CHECK(x.numel() == N * C * P, "cm_to_nchw: {} vs {}", shape_str(x.shape()), shape_str(shape));
  Tensor out = Tensor::empty(shape);
  const float* xp = x.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(x.numel()))
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) std::memcpy(op + (n * C + c) * P, xp + (c * N + n) * P, sizeof(float) * P);
  return out;
}

Tensor nchw_to_rows(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / (N * C);
  Tensor out = Tensor::empty({N * P, C});
  const float* xp = x.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(x.numel()))
  for (int64_t n = 0; n < N; ++n) {
    const float* src = xp + n * C * P;
    float* dst = op + n * P * C;
    for (int64_t p0 = 0; p0 < P; p0 += 64) {
      const int64_t p1 = std::min(P, p0 + 64);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t p = p0; p < p1; ++p) dst[p * C + c] = src[c * P + p];
    }
  }
  return out;
}

// ---- the layer --------------------------------------------------------------------------------

Conv2d::Conv2d(std::string name, int64_t cin, int64_t cout, int64_t kernel, int64_t stride, int64_t padding,
               bool bias, Recipe recipe, uint32_t layer_id, uint64_t init_seed)
    : QuantizedLayer(std::move(name), recipe, layer_id), cin_(cin), cout_(cout), k_(kernel), stride_(stride),
      pad_(padding), has_bias_(bias) {
  FQT_CHECK(cin > 0 && cout > 0 && kernel > 0 && stride > 0 && padding >= 0, "Conv2d {}: bad geometry", name_);
  weight_ = make_param(name_ + ".weight", {cout, cin, kernel, kernel});
  kaiming_uniform(weight_.value, cin * kernel * kernel, init_seed, layer_id);
  if (has_bias_) bias_ = make_param(name_ + ".bias", {cout});
}

void Conv2d::collect_params(std::vector<Param*>& out) {
  out.push_back(&weight_);
  if (has_bias_) out.push_back(&bias_);
}

Tensor Conv2d::forward(const Tensor& x, const StepContext& ctx) {
  FQT_CHECK(x.dim() == 4 && x.size(1) == cin_ && x.dtype() == DType::f32, "Conv2d {}: input {} is not N,{},H,W",
            name_, shape_str(x.shape()), cin_);
  const int64_t N = x.size(0), Ho = out_size(x.size(2)), Wo = out_size(x.size(3));
  Tensor yt = Tensor::empty({cout_, N * Ho * Wo});
  if (!quantized_forward(recipe_)) {
    const Tensor cols = im2col(x, k_, stride_, pad_);
    const Tensor w = weight2d();
    matmul(GemmOperand::of(w), false, GemmOperand::of(cols), false, yt, false);
    if (ctx.train) x_ = x;
    xq_ = {}, wq_ = {};
  } else {
    QuantizedTensor xq = quantize(x, recipe_.activation);
    QuantizedTensor wq = quantize(weight2d(), recipe_.weight);
    const Tensor cols = im2col(dequantize(xq).reshape(x.shape()), k_, stride_, pad_);
    matmul(GemmOperand::of(wq), false, GemmOperand::of(cols), false, yt, false);
    x_ = {};
    if (ctx.train) xq_ = std::move(xq), wq_ = std::move(wq);
  }
  in_shape_ = x.shape();
  Tensor y = cm_to_nchw(yt, {N, cout_, Ho, Wo});
  if (has_bias_) {
    const float* b = bias_.value.data<float>();
    float* yp = y.data<float>();
    const int64_t P = Ho * Wo;
#pragma omp parallel for collapse(2) schedule(static) if (parallel_worth(y.numel()))
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < cout_; ++c)
        for (int64_t p = 0; p < P; ++p) yp[(n * cout_ + c) * P + p] += b[c];
  }
  return y;
}

Tensor Conv2d::dgrad(const Tensor& dy, const StepContext& ctx) {
  FQT_CHECK(!in_shape_.empty() && dy.dim() == 4 && dy.size(1) == cout_ && dy.size(0) == in_shape_[0],
            "Conv2d {}: dy {} does not match the last forward", name_, shape_str(dy.shape()));
  const int64_t NP = dy.numel() / cout_, ckk = cin_ * k_ * k_;
  Tensor dcols = Tensor::empty({ckk, NP});
  switch (recipe_.mode) {
    case Mode::fp32: {
      const Tensor gt = nchw_to_cm(dy), w = weight2d();
      matmul(GemmOperand::of(w), true, GemmOperand::of(gt), false, dcols, false);
      break;
    }
    case Mode::qat: {
      FQT_CHECK(wq_.codes.defined(), "Conv2d {}: backward without a training forward", name_);
      const Tensor gt = nchw_to_cm(dy);
      matmul(GemmOperand::of(wq_), true, GemmOperand::of(gt), false, dcols, false);
      break;
    }
    case Mode::fqt:
      FQT_CHECK(wq_.codes.defined(), "Conv2d {}: backward without a training forward", name_);
      gq_dgrad_ = quantize(nchw_to_rows(dy), recipe_.dgrad, grad_key(ctx.seed, ctx.step, layer_id_, GradRole::dgrad));
      matmul(GemmOperand::of(wq_), true, GemmOperand::of(gq_dgrad_), true, dcols, false);
      break;
  }
  return col2im(dcols, in_shape_, k_, stride_, pad_);
}

void Conv2d::wgrad(const Tensor& dy, const StepContext& ctx) {
  FQT_CHECK(!in_shape_.empty() && dy.dim() == 4 && dy.size(1) == cout_ && dy.size(0) == in_shape_[0],
            "Conv2d {}: dy {} does not match the last forward", name_, shape_str(dy.shape()));
  Tensor dw = weight_.grad.reshape({cout_, cin_ * k_ * k_});
  if (recipe_.mode == Mode::fp32) {
    FQT_CHECK(x_.defined(), "Conv2d {}: backward without a training forward", name_);
  } else {
    FQT_CHECK(xq_.codes.defined(), "Conv2d {}: backward without a training forward", name_);
  }
  const Tensor cols =
      im2col(recipe_.mode == Mode::fp32 ? x_ : dequantize(xq_).reshape(in_shape_), k_, stride_, pad_);
  if (recipe_.mode == Mode::fqt) {
    gq_wgrad_ = quantize(nchw_to_rows(dy), recipe_.wgrad, grad_key(ctx.seed, ctx.step, layer_id_, GradRole::wgrad));
    matmul(GemmOperand::of(gq_wgrad_), true, GemmOperand::of(cols), true, dw, true);
  } else {
    const Tensor gt = nchw_to_cm(dy);
    matmul(GemmOperand::of(gt), false, GemmOperand::of(cols), true, dw, true);
  }
  if (has_bias_) {
    const int64_t N = dy.size(0), P = dy.numel() / (N * cout_);
    const float* gp = dy.data<float>();
    float* db = bias_.grad.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(dy.numel()))
    for (int64_t c = 0; c < cout_; ++c) {
      double s = 0.0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t p = 0; p < P; ++p) s += gp[(n * cout_ + c) * P + p];
      db[c] += static_cast<float>(s);
    }
  }
}

}  // namespace fqt
