// Linear: Y[N, out] = X W^T + b with the recipe's quantizers (nn.hpp, SPEC section 1).
#include "common.hpp"
#include "fqt/profile.hpp"
#include "fqt/igemm.hpp"

namespace fqt {
using namespace nn_detail;

Linear::Linear(std::string name, int64_t in, int64_t out, bool bias, Recipe recipe, uint32_t layer_id,
               uint64_t init_seed)
    : QuantizedLayer(std::move(name), recipe, layer_id), in_(in), out_(out), has_bias_(bias) {
  FQT_CHECK(in > 0 && out > 0, "Linear {}: bad sizes {} -> {}", name_, in, out);
  weight_ = make_param(name_ + ".weight", {out, in});
  kaiming_uniform(weight_.value, in, init_seed, layer_id);
  if (has_bias_) bias_ = make_param(name_ + ".bias", {out});
}

void Linear::collect_params(std::vector<Param*>& out) {
  out.push_back(&weight_);
  if (has_bias_) out.push_back(&bias_);
}

Tensor Linear::forward(const Tensor& x_in, const StepContext& ctx) {
  profile::RegionScope region([&] { return fmt::format("linear {}->{}: forward", in_, out_); });
  FQT_CHECK(x_in.dtype() == DType::f32 && x_in.dim() >= 1 && x_in.numel() == x_in.size(0) * in_,
            "Linear {}: input {} is not [N, {}]", name_, shape_str(x_in.shape()), in_);
  const Tensor x = x_in.reshape({x_in.size(0), in_});
  const int64_t n = x.size(0);
  Tensor y = Tensor::empty({n, out_});
  if (!quantized_forward(recipe_)) {
    matmul(GemmOperand::of(x), false, GemmOperand::of(weight_.value), true, y, false);
    if (ctx.train) x_ = x;
    xq_ = {}, wq_ = {};
  } else {
    QuantizedTensor xq = quantize(x, recipe_.activation);
    QuantizedTensor wq = quantize(weight_.value, recipe_.weight);
    if (int_fprop(recipe_, xq, wq)) y = qgemm_fprop(xq, wq);
    else matmul(GemmOperand::of(xq), false, GemmOperand::of(wq), true, y, false);
    x_ = {};
    if (ctx.train) xq_ = std::move(xq), wq_ = std::move(wq);
  }
  if (has_bias_) {
    const float* b = bias_.value.data<float>();
    float* yp = y.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(y.numel()))
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < out_; ++j) yp[i * out_ + j] += b[j];
  }
  return y;
}

Tensor Linear::dgrad(const Tensor& dy_in, const StepContext& ctx) {
  profile::RegionScope region([&] { return fmt::format("linear {}->{}: backward: dgrad", in_, out_); });
  FQT_CHECK(dy_in.numel() == dy_in.size(0) * out_, "Linear {}: dy {} is not [N, {}]", name_,
            shape_str(dy_in.shape()), out_);
  const Tensor g = dy_in.reshape({dy_in.size(0), out_});
  Tensor dx = Tensor::empty({g.size(0), in_});
  // exact_dgrad: fqt mode with the dgrad GEMM computed as in qat (wgrad stays quantized).
  const Mode mode = recipe_.mode == Mode::fqt && recipe_.exact_dgrad ? Mode::qat : recipe_.mode;
  if (mode != recipe_.mode) gq_dgrad_ = QuantizedTensor{};  // no dgrad operand was quantized
  switch (mode) {
    case Mode::fp32:
      matmul(GemmOperand::of(g), false, GemmOperand::of(weight_.value), false, dx, false);
      break;
    case Mode::qat:
      FQT_CHECK(wq_.codes.defined(), "Linear {}: backward without a training forward", name_);
      matmul(GemmOperand::of(g), false, GemmOperand::of(wq_), false, dx, false);
      break;
    case Mode::fqt:
      FQT_CHECK(wq_.codes.defined(), "Linear {}: backward without a training forward", name_);
      gq_dgrad_ = quantize(g, recipe_.dgrad, grad_key(ctx.seed, ctx.step, layer_id_, GradRole::dgrad));
      if (int_dgrad(recipe_, gq_dgrad_, wq_)) dx = qgemm_dgrad(gq_dgrad_, wq_);
      else matmul(GemmOperand::of(gq_dgrad_), false, GemmOperand::of(wq_), false, dx, false);
      break;
  }
  return dx;
}

void Linear::wgrad(const Tensor& dy_in, const StepContext& ctx) {
  profile::RegionScope region([&] { return fmt::format("linear {}->{}: backward: wgrad", in_, out_); });
  const Tensor g = dy_in.reshape({dy_in.size(0), out_});
  // exact_wgrad: fqt mode with the wgrad GEMM computed as in qat (dgrad stays quantized).
  const Mode mode = recipe_.mode == Mode::fqt && recipe_.exact_wgrad ? Mode::qat : recipe_.mode;
  if (mode != recipe_.mode) gq_wgrad_ = QuantizedTensor{};  // no wgrad operand was quantized
  switch (mode) {
    case Mode::fp32:
      FQT_CHECK(x_.defined(), "Linear {}: backward without a training forward", name_);
      matmul(GemmOperand::of(g), true, GemmOperand::of(x_), false, weight_.grad, true);
      break;
    case Mode::qat:
      FQT_CHECK(xq_.codes.defined(), "Linear {}: backward without a training forward", name_);
      matmul(GemmOperand::of(g), true, GemmOperand::of(xq_), false, weight_.grad, true);
      break;
    case Mode::fqt:
      FQT_CHECK(xq_.codes.defined(), "Linear {}: backward without a training forward", name_);
      gq_wgrad_ = quantize(g, recipe_.wgrad, grad_key(ctx.seed, ctx.step, layer_id_, GradRole::wgrad));
      if (int_wgrad(recipe_, gq_wgrad_, xq_)) {
        const Tensor dw = qgemm_wgrad(gq_wgrad_, xq_);
        float* acc = weight_.grad.data<float>();
        const float* d = dw.data<float>();
        for (int64_t i = 0; i < dw.numel(); ++i) acc[i] += d[i];
      } else {
        matmul(GemmOperand::of(gq_wgrad_), true, GemmOperand::of(xq_), false, weight_.grad, true);
      }
      break;
  }
  if (has_bias_) {  // fp32, from the unquantized G; fixed summation order per output
    const float* gp = g.data<float>();
    float* db = bias_.grad.data<float>();
    const int64_t n = g.size(0);
#pragma omp parallel for schedule(static) if (parallel_worth(g.numel()))
    for (int64_t j = 0; j < out_; ++j) {
      double s = 0.0;
      for (int64_t i = 0; i < n; ++i) s += gp[i * out_ + j];
      db[j] += static_cast<float>(s);
    }
  }
}

}  // namespace fqt
