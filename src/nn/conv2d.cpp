// Conv2d via im2col + GEMM with the recipe's quantizers (see layers.hpp for the layout).
#include "common.hpp"
#include "fqt/profile.hpp"
#include "kernels/cpu/minmax.hpp"
#include "kernels/cpu/transpose.hpp"
#include "fqt/gemm.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>

namespace fqt {
using namespace nn_detail;

// ---- layout helpers ---------------------------------------------------------------------------

namespace {

// One sample: x C,H,W -> out [C*k*k, Ho*Wo] with row stride ld.
void im2col_one(const float* x, const Geom& g, float* out, int64_t ld) {
  const int64_t k = g.k, H = g.H, W = g.W, Wo = g.Wo, pad = g.pad, stride = g.stride;
  for (int64_t r = 0; r < g.rows(); ++r) {
    const int64_t c = r / (k * k), kh = (r / k) % k, kw = r % k;
    const float* plane = x + c * H * W;
    float* row = out + r * ld;
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const int64_t ih = oh * stride - pad + kh;
      float* o = row + oh * Wo;
      if (ih < 0 || ih >= H) {
        std::memset(o, 0, sizeof(float) * Wo);
        continue;
      }
      const float* src = plane + ih * W;
      if (stride == 1) {
        // iw = ow - pad + kw is inside the image for ow in [pad - kw, W + pad - kw)
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

// One sample, the adjoint: x C,H,W = sum of cols [C*k*k, Ho*Wo] (row stride ld) (overwrites x).
// Each plane is summed in a fixed (kh, kw, oh, ow) order.
void col2im_one(const float* cols, int64_t ld, const Geom& g, float* x) {
  const int64_t k = g.k, H = g.H, W = g.W, Wo = g.Wo, pad = g.pad, stride = g.stride;
  std::memset(x, 0, sizeof(float) * g.C * H * W);
  for (int64_t c = 0; c < g.C; ++c) {
    float* plane = x + c * H * W;
    for (int64_t kh = 0; kh < k; ++kh) {
      for (int64_t kw = 0; kw < k; ++kw) {
        const float* src = cols + ((c * k + kh) * k + kw) * ld;
        for (int64_t oh = 0; oh < g.Ho; ++oh) {
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

}  // namespace

Tensor im2col(const Tensor& x, int64_t k, int64_t stride, int64_t pad) {
  FQT_CHECK(x.dim() == 4 && x.dtype() == DType::f32, "im2col: want f32 N,C,H,W, got {}", shape_str(x.shape()));
  const Geom g = geom(x.shape(), k, stride, pad);
  const int64_t N = x.size(0), P = g.P(), NP = N * P;
  Tensor cols = Tensor::empty({g.rows(), NP});
  const float* xp = x.data<float>();
  float* cp = cols.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(cols.numel()))
  for (int64_t n = 0; n < N; ++n) im2col_one(xp + n * g.C * g.H * g.W, g, cp + n * P, NP);
  return cols;
}

Tensor col2im(const Tensor& cols, const Shape& in_shape, int64_t k, int64_t stride, int64_t pad) {
  const Geom g = geom(in_shape, k, stride, pad);
  const int64_t N = in_shape[0], P = g.P(), NP = N * P;
  FQT_CHECK(cols.numel() == g.rows() * NP, "col2im: cols {} do not match input {}", shape_str(cols.shape()),
            shape_str(in_shape));
  Tensor x = Tensor::empty(in_shape);
  const float* cp = cols.data<float>();
  float* xp = x.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(cols.numel()))
  for (int64_t n = 0; n < N; ++n) col2im_one(cp + n * P, NP, g, xp + n * g.C * g.H * g.W);
  return x;
}

Tensor nchw_to_rows(const Tensor& x, float* range) {
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / (N * C);
  Tensor out = Tensor::empty({N * P, C});
  const float* xp = x.data<float>();
  float* op = out.data<float>();
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  uint32_t nan = 0;
#pragma omp parallel for schedule(static) reduction(min : lo) reduction(max : hi) reduction(| : nan) \
    if (parallel_worth(x.numel()))
  for (int64_t n = 0; n < N; ++n) {
    // sample n: [C, P] -> [P, C]; its range from the rows just written (in cache)
    kernels::transpose(xp + n * C * P, C, P, P, op + n * P * C, C);
    if (range) kernels::minmax_lanes(op + n * P * C, P * C, lo, hi, nan);
  }
  if (range) {
    const float q = std::numeric_limits<float>::quiet_NaN();
    range[0] = nan ? q : lo, range[1] = nan ? q : hi;
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

// Forward and dgrad run one sample per iteration: im2col of the sample into a per-thread buffer
// ([Cin*k*k, Ho*Wo], cache-resident), then a GEMM straight into / out of the N,C,H,W tensor. No
// batch-sized im2col matrix or layout transposes; each sample's GEMM has the same shape on any
// thread count, so results are bit-identical across thread counts. Quantized operands are
// dequantized first (the simulated path; W is small, x was quantized as a tensor).
bool Conv2d::quantizes_input() const { return quantized_forward(recipe_); }

QuantizedTensor Conv2d::quantize_input(const Tensor& x, const ValueRange& range) const {
  return range.valid ? quantize_in_range(x, recipe_.activation, range.lo, range.hi) : quantize(x, recipe_.activation);
}

bool Conv2d::same_input_quantizer(const Conv2d& other) const {
  return quantizes_input() && other.quantizes_input() && recipe_.activation.kind == other.recipe_.activation.kind &&
         recipe_.activation.bits == other.recipe_.activation.bits;
}

Tensor Conv2d::forward(const Tensor& x, const StepContext& ctx, const QuantizedTensor* given, const Tensor* residual) {
  FQT_CHECK(x.dtype() == DType::f32, "Conv2d {}: input is not f32", name_);
  return forward_impl(x.shape(), &x, ctx, given, residual);
}

Tensor Conv2d::forward(const Shape& in_shape, const StepContext& ctx, const QuantizedTensor& xq, const Tensor* residual) {
  FQT_CHECK(quantized_forward(recipe_), "Conv2d {}: input codes given to an fp32 layer", name_);
  return forward_impl(in_shape, nullptr, ctx, &xq, residual);
}

namespace {
// A residual must have the conv's output shape (N, Cout, Ho, Wo) for input shape `in`.
void check_residual(const std::string& name, const Shape& in, int64_t cout, int64_t k, int64_t stride, int64_t pad,
                    const Tensor& r) {
  const Geom g = geom(in, k, stride, pad);
  const Shape out{in[0], cout, g.Ho, g.Wo};
  FQT_CHECK(r.shape() == out && r.dtype() == DType::f32, "Conv2d {}: residual {} does not match the output {}", name,
            shape_str(r.shape()), shape_str(out));
}
}  // namespace

// x: the input, or null when its codes are `given` (then only its shape is known; qat, fqt).
Tensor Conv2d::forward_impl(const Shape& shape, const Tensor* x, const StepContext& ctx, const QuantizedTensor* given,
                            const Tensor* residual) {
  profile::RegionScope region([&] { return region_name() + ": forward"; });
  FQT_CHECK(shape.size() == 4 && shape[1] == cin_, "Conv2d {}: input {} is not N,{},H,W", name_, shape_str(shape), cin_);
  (void)geom(shape, k_, stride_, pad_);  // validates the geometry (throws on a too-small input)
  if (residual) check_residual(name_, shape, cout_, k_, stride_, pad_, *residual);
  Tensor xin, w = weight2d();
  if (!quantized_forward(recipe_)) {
    xin = *x;
    if (ctx.train) x_ = xin;
    xq_ = {}, wq_ = {};
  } else {
    FQT_CHECK(!given || (given->spec.kind == recipe_.activation.kind && given->spec.bits == recipe_.activation.bits &&
                         given->rows == shape[0] && given->rows * given->cols == shape_numel(shape)),
              "Conv2d {}: the given input codes are not x's under this layer's activation quantizer", name_);
    QuantizedTensor xq = given ? *given : quantize(*x, recipe_.activation);
    QuantizedTensor wq = quantize(w, recipe_.weight);
    x_ = {};
    in_shape_ = shape;
    // Integer path: needs grids that factor out of the GEMM and an exact code for 0 (padding).
    const int zero_code =
        xq.granularity() == Granularity::tensor ? exact_zero_code(xq.scale[0], xq.lo[0], xq.max_code()) : -1;
    if (zero_code >= 0 && int_fprop(recipe_, xq, wq)) {
      Tensor y = forward_int(xq, wq, zero_code, residual);
      if (ctx.train) xq_ = std::move(xq), wq_ = std::move(wq);
      return y;
    }
    xin = dequantize(xq).reshape(shape);
    w = dequantize(wq);
    if (ctx.train) xq_ = std::move(xq), wq_ = std::move(wq);
  }
  in_shape_ = shape;
  Tensor y = forward_f32(xin, w);
  if (residual) add_inplace(y, *residual);
  return y;
}

Tensor Conv2d::forward_f32(const Tensor& xin, const Tensor& w) const {
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W;
  Tensor y = Tensor::empty({N, cout_, g.Ho, g.Wo});
  const float* xp = xin.data<float>();
  const float* wp = w.data<float>();
  const float* b = has_bias_ ? bias_.value.data<float>() : nullptr;
  float* yp = y.data<float>();
  const bool identity_cols = k_ == 1 && stride_ == 1 && pad_ == 0;
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<float> buf(identity_cols ? 0 : static_cast<size_t>(ckk * P));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* cols = xp + n * chw;
      if (!identity_cols) im2col_one(cols, g, buf.data(), P), cols = buf.data();
      float* yn = yp + n * cout_ * P;
      sgemm(false, false, cout_, P, ckk, 1.0f, wp, ckk, cols, P, 0.0f, yn, P);
      if (b)
        for (int64_t c = 0; c < cout_; ++c)
          for (int64_t p = 0; p < P; ++p) yn[c * P + p] += b[c];
    }
  }
  return y;
}

// Forward again from what it kept: the same branch (integer or fp32 GEMMs) on the same operands,
// so the same bits. The weights have not changed yet (the optimizer runs after backward).
// A residual is added as forward adds it: inside forward_int's store, else by add_inplace.
Tensor Conv2d::recompute_output(const Tensor* residual) const {
  FQT_CHECK(!in_shape_.empty(), "Conv2d {}: recompute without a training forward", name_);
  if (residual) check_residual(name_, in_shape_, cout_, k_, stride_, pad_, *residual);
  Tensor y;
  if (!quantized_forward(recipe_)) {
    FQT_CHECK(x_.defined(), "Conv2d {}: recompute without a training forward", name_);
    y = forward_f32(x_, weight2d());
  } else {
    FQT_CHECK(xq_.codes.defined() && wq_.codes.defined(), "Conv2d {}: recompute without a training forward", name_);
    const int zero_code = saved_zero_code();
    if (zero_code >= 0 && int_fprop(recipe_, xq_, wq_)) return forward_int(xq_, wq_, zero_code, residual);
    y = forward_f32(dequantize(xq_).reshape(in_shape_), dequantize(wq_));
  }
  if (residual) add_inplace(y, *residual);
  return y;
}

int Conv2d::saved_zero_code() const {
  return xq_.codes.defined() && xq_.granularity() == Granularity::tensor
             ? exact_zero_code(xq_.scale[0], xq_.lo[0], xq_.max_code())
             : -1;
}

// "conv CIN->COUT KxK sS" (fqt bench step --breakdown)
std::string Conv2d::region_name() const { return fmt::format("conv {}->{} {}x{} s{}", cin_, cout_, k_, k_, stride_); }

Tensor Conv2d::rows_for_gradients(const Tensor& dy, float* range) const {
  return recipe_.mode == Mode::fqt ? nchw_to_rows(dy, range) : Tensor();
}

namespace {
std::atomic<bool> g_given_ranges{true};  // set_conv_given_ranges
}  // namespace

void set_conv_given_ranges(bool on) { g_given_ranges.store(on, std::memory_order_relaxed); }

Tensor Conv2d::backward(const Tensor& dy, const StepContext& ctx) { return backward_ranged(dy, ctx, nullptr, nullptr); }

Tensor Conv2d::backward_ranged(Tensor dy, const StepContext& ctx, const ValueRange* dy_range,
                               ValueRange* dx_range) {
  if (dx_range) *dx_range = {};
  if (!g_given_ranges.load(std::memory_order_relaxed)) dy_range = nullptr;
  // FQT with both halves: the two draws of G at once, handed to wgrad_rows / dgrad_rows (which
  // then need no rows of G). Per-row / per-tensor draws straight from dy (quantize_pair_nchw:
  // the rows of G are formed block by block in cache, never written); others (BHQ, per-column)
  // from G's rows, laid out once (nchw_to_rows, with G's range for quantize_pair).
  const bool drawn = recipe_.mode == Mode::fqt && input_grad_ && !recipe_.exact_dgrad && !recipe_.exact_wgrad;
  const RngKey kd = grad_key(ctx.seed, ctx.step, layer_id_, GradRole::dgrad);
  const RngKey kw = grad_key(ctx.seed, ctx.step, layer_id_, GradRole::wgrad);
  Tensor rows;
  if (drawn && dgrad_per_sample()) {
    // The dgrad draw with a row per sample, its codes as G's pixel rows; the wgrad draw as
    // quantize_pair_nchw makes it (the same codes as with pixel rows), in the same pass.
    profile::RegionScope region([&] { return region_name() + ": backward: quantize dY"; });
    const float given[2] = {dy_range ? dy_range->lo : 0.0f, dy_range ? dy_range->hi : 0.0f};
    const bool valid = dy_range && dy_range->valid;
    const bool per = valid && static_cast<int64_t>(dy_range->sample_lo.size()) == dy.size(0) &&
                     dy_range->sample_hi.size() == dy_range->sample_lo.size();
    auto [d, w] = quantize_samples_nchw(dy, recipe_.dgrad, kd, &recipe_.wgrad, kw, valid ? given : nullptr,
                                        per ? dy_range->sample_lo.data() : nullptr,
                                        per ? dy_range->sample_hi.data() : nullptr);
    gq_dgrad_ = std::move(d), gq_wgrad_ = std::move(w);
  } else if (drawn && quantize_pair_fuses(recipe_.dgrad, recipe_.wgrad)) {
    profile::RegionScope region([&] { return region_name() + ": backward: quantize dY"; });
    const float given[2] = {dy_range ? dy_range->lo : 0.0f, dy_range ? dy_range->hi : 0.0f};
    auto [d, w] = quantize_pair_nchw(dy, recipe_.dgrad, kd, recipe_.wgrad, kw, dy_range && dy_range->valid ? given : nullptr);
    gq_dgrad_ = std::move(d), gq_wgrad_ = std::move(w);
  } else {
    float range[2];
    profile::RegionScope layout([&] { return region_name() + ": backward: dY layout"; });
    rows = rows_for_gradients(dy, drawn ? range : nullptr);  // (single draws take no range)
    layout.close();
    if (drawn) {
      profile::RegionScope region([&] { return region_name() + ": backward: quantize dY"; });
      auto [d, w] = quantize_pair(rows, recipe_.dgrad, kd, recipe_.wgrad, kw, range);
      gq_dgrad_ = std::move(d), gq_wgrad_ = std::move(w);
    }
  }
  {
    profile::RegionScope region([&] { return region_name() + ": backward: wgrad"; });
    wgrad_rows(dy, rows, ctx, drawn);
  }
  if (!input_grad_) return Tensor();
  profile::RegionScope region([&] { return region_name() + ": backward: dgrad"; });
  return dgrad_rows(dy, rows, ctx, drawn);
}

bool Conv2d::dgrad_per_sample() const {
  return recipe_.mode == Mode::fqt && !recipe_.exact_dgrad && recipe_.dgrad_rows == GradRows::sample &&
         traits(recipe_.dgrad.kind).granularity == Granularity::row;
}

Tensor Conv2d::dgrad(const Tensor& dy, const StepContext& ctx) { return dgrad_rows(dy, rows_for_gradients(dy), ctx); }

void Conv2d::wgrad(const Tensor& dy, const StepContext& ctx) { wgrad_rows(dy, rows_for_gradients(dy), ctx); }

Tensor Conv2d::dgrad_on_codes(const QuantizedTensor& gq) const {
  FQT_CHECK(!in_shape_.empty() && wq_.codes.defined(), "Conv2d {}: dgrad_on_codes without a training forward", name_);
  const int64_t rows = in_shape_[0] * geom(in_shape_, k_, stride_, pad_).P();
  FQT_CHECK(gq.rows == rows && gq.cols == cout_, "Conv2d {}: gradient codes [{}, {}], expected [{}, {}]", name_,
            gq.rows, gq.cols, rows, cout_);
  FQT_CHECK(int_dgrad(recipe_, gq, wq_), "Conv2d {}: dgrad_on_codes needs the integer path (fqt, --arith int)", name_);
  if (!dgrad_per_sample() && gq.rows_per_transform_row() == 1) return dgrad_int(gq);
  // Rows per sample (as backward takes them): one grid for each sample's positions.
  const int64_t P = rows / in_shape_[0];
  for (int64_t r = 0; r < rows && gq.granularity() == Granularity::row; ++r)
    FQT_CHECK(gq.scale[r] == gq.scale[r - r % P] && gq.lo[r] == gq.lo[r - r % P],
              "Conv2d {}: per-sample gradient codes whose grid varies within sample {}", name_, r / P);
  return dgrad_int_samples(gq);
}

Tensor Conv2d::dgrad_rows(const Tensor& dy, const Tensor& rows, const StepContext& ctx, bool drawn) {
  FQT_CHECK(!in_shape_.empty() && dy.dim() == 4 && dy.size(1) == cout_ && dy.size(0) == in_shape_[0],
            "Conv2d {}: dy {} does not match the last forward", name_, shape_str(dy.shape()));
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W;
  FQT_CHECK(dy.numel() == N * cout_ * P, "Conv2d {}: dy {} does not match the output size", name_,
            shape_str(dy.shape()));
  if (recipe_.mode != Mode::fp32)
    FQT_CHECK(wq_.codes.defined(), "Conv2d {}: backward without a training forward", name_);
  Tensor grows;  // fqt: dequantized Qdgrad(G) in the SPEC's row layout [(N*P), Cout]
  if (recipe_.mode == Mode::fqt && recipe_.exact_dgrad) {
    gq_dgrad_ = QuantizedTensor{};  // dgrad as in qat: the fp32 GEMM on dy below
  } else if (recipe_.mode == Mode::fqt) {
    const bool per_sample = dgrad_per_sample();
    const RngKey kd = grad_key(ctx.seed, ctx.step, layer_id_, GradRole::dgrad);
    if (!drawn) gq_dgrad_ = per_sample ? quantize_samples_nchw(dy, recipe_.dgrad, kd).first : quantize(rows, recipe_.dgrad, kd);
    if (int_dgrad(recipe_, gq_dgrad_, wq_)) return per_sample ? dgrad_int_samples(gq_dgrad_) : dgrad_int(gq_dgrad_);
    grows = dequantize(gq_dgrad_);  // (per sample: T^-1 across the samples' pixel rows)
  }
  const Tensor w = recipe_.mode == Mode::fp32 ? weight2d() : dequantize(wq_);
  Tensor dx = Tensor::empty(in_shape_);
  const float* wp = w.data<float>();
  const float* gp = grows.defined() ? grows.data<float>() : dy.data<float>();
  const bool rows_layout = grows.defined();
  float* dxp = dx.data<float>();
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<float> buf(static_cast<size_t>(ckk * P));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      // dcols_n [ckk, P] = W^T [ckk, Cout] . G_n^T, G_n = rows n*P.. of G ([P, Cout]) or dy_n ([Cout, P])
      if (rows_layout) sgemm(true, true, ckk, P, cout_, 1.0f, wp, ckk, gp + n * P * cout_, cout_, 0.0f, buf.data(), P);
      else sgemm(true, false, ckk, P, cout_, 1.0f, wp, ckk, gp + n * cout_ * P, P, 0.0f, buf.data(), P);
      col2im_one(buf.data(), P, g, dxp + n * chw);
    }
  }
  return dx;
}

// wgrad: dW = sum_n G_n^T X_n over samples. Samples are cut into a fixed number of groups that
// depends only on the shape (not on the thread count); each group sums its samples in order into
// its own partial dW (one im2col per sample into a cache-resident buffer, then a GEMM with
// beta = 1), and the partials are added in group order.
void Conv2d::wgrad_rows(const Tensor& dy, const Tensor& rows, const StepContext& ctx, bool drawn) {
  FQT_CHECK(!in_shape_.empty() && dy.dim() == 4 && dy.size(1) == cout_ && dy.size(0) == in_shape_[0],
            "Conv2d {}: dy {} does not match the last forward", name_, shape_str(dy.shape()));
  if (recipe_.mode == Mode::fp32) {
    FQT_CHECK(x_.defined(), "Conv2d {}: backward without a training forward", name_);
  } else {
    FQT_CHECK(xq_.codes.defined(), "Conv2d {}: backward without a training forward", name_);
  }
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W, wsize = cout_ * ckk;
  Tensor grows;  // fqt: dequantized Qwgrad(G) in the SPEC's row layout [(N*P), Cout]
  if (recipe_.mode == Mode::fqt && recipe_.exact_wgrad) {
    gq_wgrad_ = QuantizedTensor{};  // wgrad as in qat: the fp32 GEMM on dy below
  } else if (recipe_.mode == Mode::fqt) {
    if (!drawn)
      gq_wgrad_ = quantize(rows, recipe_.wgrad, grad_key(ctx.seed, ctx.step, layer_id_, GradRole::wgrad));
    if (saved_zero_code() >= 0 && int_wgrad(recipe_, gq_wgrad_, xq_)) {
      wgrad_int(gq_wgrad_);
      add_bias_grad(dy);
      return;
    }
    grows = dequantize(gq_wgrad_);
  }
  const Tensor xin = recipe_.mode == Mode::fp32 ? x_ : dequantize(xq_).reshape(in_shape_);
  const bool rows_layout = grows.defined();
  const float* gp = rows_layout ? grows.data<float>() : dy.data<float>();
  const float* xp = xin.data<float>();
  // Groups: up to 8, fewer when the partials would be large (ResNet-18's last stage).
  const int64_t groups = std::clamp<int64_t>(std::min<int64_t>(8, (int64_t{1} << 24) / wsize), 1, N);
  std::vector<float> part(static_cast<size_t>(groups * wsize));
  const bool identity_cols = k_ == 1 && stride_ == 1 && pad_ == 0;
#pragma omp parallel if (groups > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<float> buf(identity_cols ? 0 : static_cast<size_t>(ckk * P));
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < groups; ++gi) {
      float* acc = part.data() + gi * wsize;
      const int64_t n0 = gi * N / groups, n1 = (gi + 1) * N / groups;
      for (int64_t n = n0; n < n1; ++n) {
        const float* cols = xp + n * chw;
        if (!identity_cols) im2col_one(cols, g, buf.data(), P), cols = buf.data();
        const float beta = n == n0 ? 0.0f : 1.0f;
        // acc [Cout, ckk] (+)= G_n^T . cols^T, G_n^T = dy_n [Cout, P] or rows n*P.. of G ([P, Cout])^T
        if (rows_layout) sgemm(true, true, cout_, ckk, P, 1.0f, gp + n * P * cout_, cout_, cols, P, beta, acc, ckk);
        else sgemm(false, true, cout_, ckk, P, 1.0f, gp + n * cout_ * P, P, cols, P, beta, acc, ckk);
      }
    }
  }
  float* dw = weight_.grad.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(groups * wsize))
  for (int64_t i = 0; i < wsize; ++i) {
    float s = part[i];
    for (int64_t gi = 1; gi < groups; ++gi) s += part[gi * wsize + i];
    dw[i] += s;
  }
  add_bias_grad(dy);
}

void Conv2d::add_bias_grad(const Tensor& dy) {
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
