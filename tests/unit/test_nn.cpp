// Layer semantics of the three modes, the bifurcated gradient, thread invariance, model shapes.
#include "fqt/layers.hpp"
#include "fqt/models.hpp"
#include "fqt/rng.hpp"
#include "nn/common.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <set>

using namespace fqt;

namespace {

Tensor randn(Shape s, uint64_t stream, float scale = 1.0f) {
  Tensor t = Tensor::empty(std::move(s));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = scale * normal_at({77, stream}, i);
  return t;
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

double rel_err(const Tensor& a, const Tensor& b) {
  double d = 0, n = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.data<float>()[i], y = b.data<float>()[i];
    d += (x - y) * (x - y);
    n += y * y;
  }
  return std::sqrt(d / n);
}

// The simulated path: these tests pin down the modes' semantics bit for bit against fp32 GEMMs
// (the integer path is checked against this one in test_int_path.cpp).
Recipe make_recipe(Mode m) {
  Recipe r;
  r.mode = m;
  r.arith = Arith::sim;
  return r;
}

Tensor pre_quantize(const Tensor& x, QuantizerSpec spec) {
  return dequantize(quantize(x, spec)).reshape(x.shape());
}

}  // namespace

// qat forward/backward == fp32 forward/backward on the pre-quantized input and weight.
TEST(nn, qat_equals_fp32_on_prequantized_operands_linear) {
  Linear q("fc", 24, 10, true, make_recipe(Mode::qat), 0, 5), f("fc", 24, 10, true, make_recipe(Mode::fp32), 0, 5);
  const Tensor x = randn({6, 24}, 1), dy = randn({6, 10}, 2);
  std::memcpy(f.weight().value.raw(), pre_quantize(q.weight().value, q.recipe().weight).raw(), f.weight().value.nbytes());
  const StepContext ctx{true, 3, 0};
  const Tensor yq = q.forward(x, ctx), yf = f.forward(pre_quantize(x, q.recipe().activation), ctx);
  EXPECT_TRUE(bit_equal(yq, yf));
  const Tensor dxq = q.backward(dy, ctx), dxf = f.backward(dy, ctx);
  EXPECT_TRUE(bit_equal(dxq, dxf));
  EXPECT_TRUE(bit_equal(q.weight().grad, f.weight().grad));
  EXPECT_TRUE(bit_equal(q.bias().grad, f.bias().grad));
  // Backward keeps the codes, not fp32 copies.
  EXPECT_EQ(q.saved_input_q().codes.dtype(), DType::u8);
}

TEST(nn, qat_equals_fp32_on_prequantized_operands_conv) {
  Conv2d q("c", 3, 8, 3, 2, 1, true, make_recipe(Mode::qat), 0, 6), f("c", 3, 8, 3, 2, 1, true, make_recipe(Mode::fp32), 0, 6);
  const Tensor x = randn({2, 3, 9, 8}, 3);
  const Tensor w2 = q.weight().value.reshape({8, 27});
  std::memcpy(f.weight().value.raw(), pre_quantize(w2, q.recipe().weight).raw(), f.weight().value.nbytes());
  const StepContext ctx{true, 3, 0};
  const Tensor yq = q.forward(x, ctx), yf = f.forward(pre_quantize(x, q.recipe().activation), ctx);
  EXPECT_TRUE(bit_equal(yq, yf));
  const Tensor dy = randn(yq.shape(), 4);
  EXPECT_TRUE(bit_equal(q.backward(dy, ctx), f.backward(dy, ctx)));
  EXPECT_TRUE(bit_equal(q.weight().grad, f.weight().grad));
  EXPECT_TRUE(bit_equal(q.bias().grad, f.bias().grad));
}

// fqt: dgrad and wgrad quantize G with two independent draws (same quantizer -> different codes).
TEST(nn, fqt_dgrad_and_wgrad_draws_are_independent) {
  Recipe r = make_recipe(Mode::fqt);
  r.dgrad = r.wgrad = {QuantizerKind::psq, 4};
  for (int kind = 0; kind < 2; ++kind) {
    std::unique_ptr<QuantizedLayer> layer;
    Tensor x;
    if (kind == 0) layer = std::make_unique<Linear>("fc", 16, 12, false, r, 3, 1), x = randn({32, 16}, 5);
    else layer = std::make_unique<Conv2d>("c", 2, 6, 3, 1, 1, false, r, 3, 1), x = randn({2, 2, 5, 5}, 5);
    const StepContext ctx{true, 9, 4};
    const Tensor y = layer->forward(x, ctx);
    layer->backward(randn(y.shape(), 6), ctx);
    const QuantizedTensor& a = kind == 0 ? static_cast<Linear&>(*layer).last_dgrad_q()
                                         : static_cast<Conv2d&>(*layer).last_dgrad_q();
    const QuantizedTensor& b = kind == 0 ? static_cast<Linear&>(*layer).last_wgrad_q()
                                         : static_cast<Conv2d&>(*layer).last_wgrad_q();
    ASSERT_TRUE(a.codes.defined() && b.codes.defined());
    EXPECT_EQ(a.rows, y.numel() / 6 / (kind == 0 ? 2 : 1));  // rows = samples / output positions
    EXPECT_EQ(a.scale, b.scale);                        // same grid ...
    EXPECT_FALSE(bit_equal(a.codes, b.codes));          // ... different random draws
    // Same step and seed -> same draws (deterministic); another step -> new draws.
    Tensor a0 = a.codes.clone();
    layer->dgrad(randn(y.shape(), 6), ctx);
    EXPECT_TRUE(bit_equal(a0, kind == 0 ? static_cast<Linear&>(*layer).last_dgrad_q().codes
                                        : static_cast<Conv2d&>(*layer).last_dgrad_q().codes));
    layer->dgrad(randn(y.shape(), 6), StepContext{true, 9, 5});
    EXPECT_FALSE(bit_equal(a0, kind == 0 ? static_cast<Linear&>(*layer).last_dgrad_q().codes
                                         : static_cast<Conv2d&>(*layer).last_dgrad_q().codes));
  }
}

// fqt with 8-bit gradients stays close to qat (same forward, unbiased small-variance backward).
TEST(nn, fqt_8bit_close_to_qat) {
  Recipe rq = make_recipe(Mode::qat), rf = make_recipe(Mode::fqt);
  Conv2d q("c", 4, 8, 3, 1, 1, false, rq, 0, 7), f("c", 4, 8, 3, 1, 1, false, rf, 0, 7);
  const Tensor x = randn({4, 4, 8, 8}, 7);
  const StepContext ctx{true, 1, 0};
  const Tensor yq = q.forward(x, ctx), yf = f.forward(x, ctx);
  EXPECT_TRUE(bit_equal(yq, yf));
  const Tensor dy = randn(yq.shape(), 8);
  const Tensor dxq = q.backward(dy, ctx), dxf = f.backward(dy, ctx);
  // 8-bit PSQ/PTQ: per-element error <= range / 255, i.e. a few % of the RMS gradient at most.
  EXPECT_LT(rel_err(dxf, dxq), 0.03);
  EXPECT_LT(rel_err(f.weight().grad, q.weight().grad), 0.03);
  EXPECT_GT(rel_err(dxf, dxq), 0.0);
}

namespace {
struct RunResult {
  Tensor logits, dx;
  std::vector<Tensor> grads;
  size_t saved_bytes = 0;  // kept from forward for backward
};
struct RunOptions {
  Recompute recompute = Recompute::off;
  Arith arith = Arith::sim;
  QuantizerKind dgrad = QuantizerKind::psq;
  bool given_ranges = true;  // set_conv_given_ranges
  GradRows dgrad_rows = GradRows::pixel;
};
RunResult run_model(const std::string& name, Mode mode, int threads, Shape in, bool input_grad = true,
                    RunOptions opt = {}) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  Recipe r = make_recipe(mode);
  r.arith = opt.arith;
  r.dgrad.kind = opt.dgrad;
  r.dgrad_rows = opt.dgrad_rows;
  ModulePtr m = make_model(name, in[1], in[2], in[3], 10, r, 17);
  set_recompute(*m, opt.recompute, mode);
  std::vector<QuantizedLayer*> layers;
  m->collect_quantized(layers);
  if (input_grad) layers.front()->set_input_grad(true);  // the builders switch it off
  std::vector<Param*> params;
  m->collect_params(params);
  const Tensor x = randn(in, 9);
  Tensor labels = Tensor::empty({in[0]}, DType::i32);
  for (int64_t i = 0; i < in[0]; ++i) labels.data<int32_t>()[i] = static_cast<int32_t>(i % 10);
  const StepContext ctx{true, 5, 2};
  RunResult out;
  out.logits = m->forward(x, ctx);
  out.saved_bytes = fqt::saved_bytes(*m);
  SoftmaxCrossEntropy loss;
  loss.forward(out.logits, labels, 0.1f);
  set_conv_given_ranges(opt.given_ranges);
  out.dx = m->backward(loss.backward(), ctx);
  set_conv_given_ranges(true);
  for (Param* p : params) out.grads.push_back(p->grad.clone());
  omp_set_num_threads(saved);
  return out;
}
}  // namespace

// The gradient's row layout [N*H*W, C] and, on request, its exact range (which lets
// quantize_pair read it once): every value moved, min and max those of the data, NaN when the
// data hold one; 1 and 2 threads, and a shape with a tail (C and H*W not multiples of 8).
TEST(nn, nchw_to_rows_moves_every_value_and_reports_the_range) {
  const int saved = omp_get_max_threads();
  for (Shape shape : {Shape{128, 16, 28, 28}, Shape{3, 5, 7, 9}}) {
    Tensor x = randn(shape, 31);
    const int64_t N = shape[0], C = shape[1], P = shape[2] * shape[3];
    x.data<float>()[x.numel() / 3] = 40.0f;   // the max, away from the ends
    x.data<float>()[x.numel() - 2] = -50.0f;  // the min, in the last sample
    for (int threads : {1, 2}) {
      omp_set_num_threads(threads);
      float range[2];
      const Tensor rows = nchw_to_rows(x, range);
      ASSERT_EQ(rows.shape(), (Shape{N * P, C}));
      bool moved = true;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t p = 0; p < P; ++p)
            moved &= rows.data<float>()[(n * P + p) * C + c] == x.data<float>()[(n * C + c) * P + p];
      EXPECT_TRUE(moved);
      EXPECT_EQ(range[0], -50.0f);
      EXPECT_EQ(range[1], 40.0f);
      EXPECT_TRUE(bit_equal(nchw_to_rows(x), rows));
      Tensor y = x.clone();
      y.data<float>()[y.numel() / 2 + 1] = std::numeric_limits<float>::quiet_NaN();
      nchw_to_rows(y, range);
      EXPECT_TRUE(std::isnan(range[0]) && std::isnan(range[1]));
    }
  }
  omp_set_num_threads(saved);
}

TEST(nn, thread_count_gives_bit_identical_results) {
  for (const char* name : {"cnn", "preact_resnet20"}) {
    for (Mode mode : {Mode::fp32, Mode::fqt}) {
      const RunResult a = run_model(name, mode, 1, {8, 1, 16, 16}), b = run_model(name, mode, 2, {8, 1, 16, 16});
      EXPECT_TRUE(bit_equal(a.logits, b.logits)) << name << " " << mode_name(mode);
      ASSERT_TRUE(a.dx.defined() && b.dx.defined());
      EXPECT_TRUE(bit_equal(a.dx, b.dx)) << name << " " << mode_name(mode);
      ASSERT_EQ(a.grads.size(), b.grads.size());
      for (size_t i = 0; i < a.grads.size(); ++i)
        EXPECT_TRUE(bit_equal(a.grads[i], b.grads[i])) << name << " " << mode_name(mode) << " param " << i;
    }
  }
}

// The model builders switch off the first layer's input gradient (nobody needs d loss / d image):
// backward then returns no tensor, and every parameter gradient is bit for bit what it is with
// the input gradient on (each gradient draw has its own key, so skipping one moves no other).
TEST(nn, first_layer_skips_only_the_input_gradient) {
  for (const std::string& name : model_names()) {
    if (name == "preact_resnet56" || name == "resnet18") continue;  // same builders, larger
    for (Mode mode : {Mode::fp32, Mode::qat, Mode::fqt}) {
      const RunResult on = run_model(name, mode, 1, {4, 1, 16, 16}, true);
      const RunResult off = run_model(name, mode, 1, {4, 1, 16, 16}, false);
      EXPECT_TRUE(on.dx.defined() && on.dx.shape() == (Shape{4, 1, 16, 16})) << name;
      EXPECT_FALSE(off.dx.defined()) << name << " " << mode_name(mode);
      EXPECT_TRUE(bit_equal(on.logits, off.logits));
      ASSERT_EQ(on.grads.size(), off.grads.size());
      for (size_t i = 0; i < on.grads.size(); ++i)
        EXPECT_TRUE(bit_equal(on.grads[i], off.grads[i])) << name << " " << mode_name(mode) << " param " << i;
    }
  }
  std::vector<QuantizedLayer*> ql;
  ModulePtr m = make_model("resnet18", 3, 32, 32, 10, Recipe{}, 1);
  m->collect_quantized(ql);
  for (size_t i = 0; i < ql.size(); ++i) EXPECT_EQ(ql[i]->input_grad(), i != 0) << ql[i]->name();
}

// Recomputation (set_recompute): batch norms keep no fp32 input, backward rebuilds it from the
// convolutions' saved codes (or fp32 inputs) — every parameter gradient and the input gradient
// are bit for bit those of the run that keeps x-hat, in every mode and arithmetic, with every
// batch norm recomputing (on) or the cheap ones (auto), and less is kept from forward: on < auto
// < off in qat/fqt (each model's first convolution reduces over <= 144 terms), auto = off in fp32.
// Odd sizes and a batch of 3 exercise the tails of the recomputed GEMMs.
TEST(nn, recompute_gives_bit_identical_gradients_and_keeps_less) {
  struct Case {
    Mode mode;
    Arith arith;
    QuantizerKind dgrad;
  };
  const std::vector<Case> cases = {{Mode::fp32, Arith::sim, QuantizerKind::psq},
                                   {Mode::qat, Arith::integer, QuantizerKind::psq},
                                   {Mode::fqt, Arith::integer, QuantizerKind::psq},
                                   {Mode::fqt, Arith::integer, QuantizerKind::bhq},
                                   {Mode::fqt, Arith::sim, QuantizerKind::ptq}};
  for (const char* name : {"cnn", "preact_resnet20", "resnet18"}) {
    const Shape in = std::string(name) == "resnet18" ? Shape{3, 3, 9, 9} : Shape{3, 1, 13, 13};
    for (const Case& c : cases) {
      const RunResult keep = run_model(name, c.mode, 2, in, true, {Recompute::off, c.arith, c.dgrad});
      const RunResult au = run_model(name, c.mode, 2, in, true, {Recompute::automatic, c.arith, c.dgrad});
      const RunResult re = run_model(name, c.mode, 2, in, true, {Recompute::on, c.arith, c.dgrad});
      for (const RunResult* r : {&au, &re}) {
        const std::string what = std::string(name) + " " + mode_name(c.mode) + " " + arith_name(c.arith) + " " +
                                 traits(c.dgrad).name + (r == &au ? " auto" : " on");
        EXPECT_TRUE(bit_equal(keep.logits, r->logits)) << what;
        ASSERT_TRUE(keep.dx.defined() && r->dx.defined()) << what;
        EXPECT_TRUE(bit_equal(keep.dx, r->dx)) << what;
        ASSERT_EQ(keep.grads.size(), r->grads.size());
        for (size_t i = 0; i < keep.grads.size(); ++i)
          EXPECT_TRUE(bit_equal(keep.grads[i], r->grads[i])) << what << " param " << i;
      }
      const std::string what = std::string(name) + " " + mode_name(c.mode);
      EXPECT_LT(re.saved_bytes, au.saved_bytes) << what;
      if (c.mode == Mode::fp32) EXPECT_EQ(au.saved_bytes, keep.saved_bytes) << what;
      else EXPECT_LT(au.saved_bytes, keep.saved_bytes) << what;
    }
  }
}

// What recomputation leaves: in an FQT PreAct-ResNet every batch norm recomputes (no x-hat at
// all), so per activation value the step keeps the 8-bit conv input codes and the 1-bit ReLU
// masks: at least 3x less than fp32 keeps (x-hat and the conv input, 4 bytes each).
TEST(nn, recompute_fqt_preact_keeps_only_codes) {
  const Shape in{4, 1, 28, 28};
  const RunResult fp32 = run_model("preact_resnet20", Mode::fp32, 2, in, false, {Recompute::off, Arith::sim, QuantizerKind::psq});
  const RunResult fqt = run_model("preact_resnet20", Mode::fqt, 2, in, false, {Recompute::on, Arith::integer, QuantizerKind::psq});
  EXPECT_GE(static_cast<double>(fp32.saved_bytes) / static_cast<double>(fqt.saved_bytes), 3.0)
      << fp32.saved_bytes << " vs " << fqt.saved_bytes;
  ModulePtr m = make_model("preact_resnet20", 1, 28, 28, 10, make_recipe(Mode::fqt), 1);
  set_recompute(*m, Recompute::on, Mode::fqt);
  m->forward(randn(in, 3), StepContext{true, 0, 0});
  std::vector<std::pair<const void*, size_t>> items;
  m->collect_saved(items);
  for (const auto& [ptr, bytes] : items) EXPECT_LT(bytes, size_t(4) * 16 * 28 * 28 * 4) << "an fp32 activation is kept";
}

// The default (auto) in an FQT PreAct-ResNet-20 on 28x28: the batch norms fed by convolutions
// reducing over <= 144 terms (the stem's 9, the first stage's 16 x 3x3, the stride-2 conv1 of
// stage 2) recompute, the later ones (288 and 576 terms) keep their input. So no fp32 tensor of
// the first stage's size is kept, some of the later stages' are, and the step keeps at least 3x
// less than fp32 (issue 4's target; 3.2x at 28x28), where keeping every input does not.
TEST(nn, recompute_auto_drops_the_cheap_large_activations) {
  const Shape in{4, 1, 28, 28};
  const RunResult fp32 = run_model("preact_resnet20", Mode::fp32, 2, in, false, {Recompute::automatic, Arith::sim, QuantizerKind::psq});
  const RunResult off = run_model("preact_resnet20", Mode::fqt, 2, in, false, {Recompute::off, Arith::integer, QuantizerKind::psq});
  const RunResult au = run_model("preact_resnet20", Mode::fqt, 2, in, false, {Recompute::automatic, Arith::integer, QuantizerKind::psq});
  EXPECT_LT(static_cast<double>(fp32.saved_bytes) / static_cast<double>(off.saved_bytes), 3.0);
  EXPECT_GE(static_cast<double>(fp32.saved_bytes) / static_cast<double>(au.saved_bytes), 3.0)
      << fp32.saved_bytes << " vs " << au.saved_bytes;
  // Which ones keep it: what auto keeps beyond on (which keeps no fp32 input at all, see above)
  // is exactly 5 stage-2 inputs (bn1, bn2 of blocks 1 and 2; stage 3 block 0's bn1, fed by stage
  // 2's output) and 6 stage-3 inputs (bn2 of block 0, bn1 and bn2 of blocks 1 and 2, the final
  // bn), 4 bytes per value; nothing of the first stage.
  const RunResult on = run_model("preact_resnet20", Mode::fqt, 2, in, false, {Recompute::on, Arith::integer, QuantizerKind::psq});
  const size_t stage2 = size_t(4) * 32 * 14 * 14 * 4, stage3 = size_t(4) * 64 * 7 * 7 * 4;
  EXPECT_EQ(au.saved_bytes - on.saved_bytes, 5 * stage2 + 6 * stage3);
}

// BatchNorm2d::with_relu() is BatchNorm2d followed by ReLU, bit for bit: output, what backward
// hands down, dgamma and dbeta; with runs of H*W values that start mid-byte of the mask (P = 49,
// 7, 3: the bytes two channels share), a total that is not a multiple of 8, a NaN, 1 and 2
// threads, and with the input recomputed instead of x-hat kept.
TEST(nn, batchnorm_with_relu_equals_batchnorm_then_relu) {
  for (const Shape& sh : {Shape{4, 3, 7, 7}, Shape{3, 5, 1, 7}, Shape{2, 3, 1, 3}, Shape{128, 16, 28, 28}})
    for (int threads : {1, 2})
      for (bool recompute : {false, true}) {
        const int saved = omp_get_max_threads();
        omp_set_num_threads(threads);
        Tensor x = randn(sh, 31, 2.0f), dy = randn(sh, 32);
        x.data<float>()[5] = std::nanf("");
        BatchNorm2d plain("bn", sh[1]), fused("bn", sh[1]);
        fused.with_relu();
        for (BatchNorm2d* b : {&plain, &fused}) {  // non-trivial affine parameters, the same in both
          for (int64_t c = 0; c < sh[1]; ++c) {
            b->gamma().value.data<float>()[c] = 0.5f + 0.25f * static_cast<float>(c);
            b->beta().value.data<float>()[c] = 0.3f - 0.2f * static_cast<float>(c);
          }
          if (recompute) b->enable_recompute(RecomputePolicy{true}, OutputSource{[&x] { return x; }, 1});
        }
        ReLU relu;
        const StepContext ctx{true, 0, 0};
        const Tensor y_plain = relu.forward(plain.forward(x, ctx), ctx);
        const Tensor y_fused = fused.forward(x, ctx);
        const std::string what = shape_str(sh) + " threads " + std::to_string(threads) + (recompute ? " recompute" : "");
        EXPECT_TRUE(bit_equal(y_plain, y_fused)) << what;
        const Tensor dx_plain = plain.backward(relu.backward(dy, ctx), ctx);
        const Tensor dx_fused = fused.backward(dy, ctx);
        EXPECT_TRUE(bit_equal(dx_plain, dx_fused)) << what;
        EXPECT_TRUE(bit_equal(plain.gamma().grad, fused.gamma().grad)) << what;
        EXPECT_TRUE(bit_equal(plain.beta().grad, fused.beta().grad)) << what;
        omp_set_num_threads(saved);
      }
}

namespace {
// Batch norm (+ ReLU) written as plain scalar loops in the order the layer defines (per fixed
// group of samples and channel: 8 fp64 lanes over the runs of H*W values, tails into lanes 0..;
// lane totals; groups added in order), the independent check of its vector code.
struct BnRef {
  Tensor y, dx;
  std::vector<float> dgamma, dbeta;
};
BnRef bn_reference(const Tensor& x, const Tensor& dy, const std::vector<float>& g, const std::vector<float>& b,
                   bool relu, float eps = 1e-5f) {
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / (N * C), M = N * P, NG = std::min<int64_t>(N, 16);
  const float* xp = x.data<float>();
  const float* dyp = dy.data<float>();
  auto lane_sums = [&](int64_t c, auto&& value) {  // sum over the batch of value(i), in the layer's order
    double total = 0.0;
    for (int64_t gi = 0; gi < NG; ++gi) {
      double lane[8] = {};
      for (int64_t n = gi * N / NG; n < (gi + 1) * N / NG; ++n) {
        const int64_t i0 = (n * C + c) * P;
        int64_t p = 0;
        for (; p + 8 <= P; p += 8)
          for (int l = 0; l < 8; ++l) lane[l] += value(i0 + p + l);
        for (int l = 0; p < P; ++p, ++l) lane[l] += value(i0 + p);
      }
      double t = 0.0;
      for (double v : lane) t += v;
      total += t;
    }
    return total;
  };
  BnRef r{Tensor::empty(x.shape()), Tensor::empty(x.shape()), std::vector<float>(C), std::vector<float>(C)};
  for (int64_t c = 0; c < C; ++c) {
    const double sum = lane_sums(c, [&](int64_t i) { return static_cast<double>(xp[i]); });
    const double sq = lane_sums(c, [&](int64_t i) { return static_cast<double>(xp[i]) * xp[i]; });
    const double m = sum / static_cast<double>(M), ssd = std::max(0.0, sq - sum * m);
    const auto inv = static_cast<float>(1.0 / std::sqrt(ssd / static_cast<double>(M) + eps));
    const auto mf = static_cast<float>(m);
    auto h = [&](int64_t i) { return (xp[i] - mf) * inv; };
    auto y = [&](int64_t i) {
      const float v = h(i) * g[c] + b[c];
      return relu ? (v > 0.0f ? v : 0.0f) : v;
    };
    auto d = [&](int64_t i) { return !relu || y(i) > 0.0f ? dyp[i] : 0.0f; };
    const double sdy = lane_sums(c, [&](int64_t i) { return static_cast<double>(d(i)); });
    const double sdyh = lane_sums(c, [&](int64_t i) { return static_cast<double>(d(i)) * h(i); });
    r.dgamma[c] = static_cast<float>(sdyh), r.dbeta[c] = static_cast<float>(sdy);
    const float k = g[c] * inv, md = static_cast<float>(sdy / M), mh = static_cast<float>(sdyh / M);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < P; ++p) {
        const int64_t i = (n * C + c) * P + p;
        r.y.data<float>()[i] = y(i);
        r.dx.data<float>()[i] = k * (d(i) - md - h(i) * mh);
      }
  }
  return r;
}
}  // namespace

// The layer's vector code (lane sums, the fused ReLU's mask, x-hat rebuilt in backward, tails
// of every length, runs that start mid-byte of the mask) against bn_reference, bit for bit, on
// 1 and 2 threads, with -0, large offsets and a dead channel.
TEST(nn, batchnorm_equals_scalar_reference) {
  std::vector<Shape> shapes = {Shape{128, 16, 28, 28}, Shape{20, 5, 7, 7}};
  for (int64_t P = 1; P <= 17; ++P) shapes.push_back(Shape{3, 2, 1, P});
  for (const Shape& sh : shapes)
    for (bool relu : {false, true})
      for (int threads : {1, 2}) {
        const int saved = omp_get_max_threads();
        omp_set_num_threads(threads);
        Tensor x = randn(sh, 61, 3.0f);
        const Tensor dy = randn(sh, 62);
        float* xp = x.data<float>();
        for (int64_t i = 0; i < x.numel(); i += 7) xp[i] += 40.0f;  // a large offset
        if (x.numel() > 5) xp[5] = -0.0f;
        std::vector<float> g(sh[1]), b(sh[1]);
        for (int64_t c = 0; c < sh[1]; ++c) g[c] = c == 1 ? 0.0f : 0.5f + 0.25f * c, b[c] = 0.3f - 0.2f * c;
        BatchNorm2d bn("bn", sh[1]);
        if (relu) bn.with_relu();
        std::copy(g.begin(), g.end(), bn.gamma().value.data<float>());
        std::copy(b.begin(), b.end(), bn.beta().value.data<float>());
        const StepContext ctx{true, 0, 0};
        const Tensor y = bn.forward(x, ctx);
        const Tensor dx = bn.backward(dy, ctx);
        omp_set_num_threads(saved);
        const BnRef ref = bn_reference(x, dy, g, b, relu);
        const std::string what = shape_str(sh) + (relu ? " relu" : "") + " threads " + std::to_string(threads);
        EXPECT_TRUE(bit_equal(y, ref.y)) << what;
        EXPECT_TRUE(bit_equal(dx, ref.dx)) << what;
        for (int64_t c = 0; c < sh[1]; ++c) {
          EXPECT_EQ(bn.gamma().grad.data<float>()[c], ref.dgamma[c]) << what << " c " << c;
          EXPECT_EQ(bn.beta().grad.data<float>()[c], ref.dbeta[c]) << what << " c " << c;
        }
      }
}

// The output range a training forward of BatchNorm2d+ReLU reports is the output's min and max
// (what the next layer's quantizer would find), on 1 and 2 threads, with tails of every length;
// eval forwards and plain batch norms report none.
TEST(nn, batchnorm_reports_its_output_range) {
  std::vector<Shape> shapes = {Shape{4, 3, 7, 7}, Shape{64, 16, 28, 28}};
  for (int64_t P = 1; P <= 17; ++P) shapes.push_back(Shape{3, 2, 1, P});  // every tail length
  for (const Shape& sh : shapes)
    for (bool positive : {false, true})  // positive: every output > 0, so the min is not the ReLU's 0
      for (int threads : {1, 2}) {
        const int saved = omp_get_max_threads();
        omp_set_num_threads(threads);
        const Tensor x = randn(sh, 41, 3.0f);
        BatchNorm2d bn("bn", sh[1]);
        bn.with_relu();
        for (int64_t c = 0; c < sh[1]; ++c)
          bn.beta().value.data<float>()[c] = positive ? 8.0f + static_cast<float>(c) : 0.4f * static_cast<float>(c) - 0.5f;
        ValueRange r;
        const Tensor y = bn.forward(x, StepContext{true, 0, 0}, &r);
        const float* yp = y.data<float>();
        ASSERT_TRUE(r.valid) << shape_str(sh);
        if (positive) {
          ASSERT_GT(r.lo, 0.0f) << shape_str(sh);
        }
        EXPECT_EQ(r.lo, *std::min_element(yp, yp + y.numel())) << shape_str(sh) << " threads " << threads;
        EXPECT_EQ(r.hi, *std::max_element(yp, yp + y.numel())) << shape_str(sh) << " threads " << threads;
        bn.forward(x, StepContext{false, 0, 0}, &r);
        EXPECT_FALSE(r.valid);
        BatchNorm2d plain("bn", sh[1]);
        plain.forward(x, StepContext{true, 0, 0}, &r);
        EXPECT_FALSE(r.valid);
        omp_set_num_threads(saved);
      }
}

namespace {
// f(shape, fused ReLU, residual, description) for every shape, with and without the fused ReLU
// and the residual, on 1 and 2 threads (set around each call, restored after it).
template <class F>
void for_each_bn_backward_case(const std::vector<Shape>& shapes, F&& f) {
  for (const Shape& sh : shapes)
    for (bool relu : {false, true})
      for (bool residual : {false, true})
        for (int threads : {1, 2}) {
          const int saved = omp_get_max_threads();
          omp_set_num_threads(threads);
          f(sh, relu, residual,
            shape_str(sh) + (relu ? " relu" : "") + (residual ? " residual" : "") + " threads " + std::to_string(threads));
          omp_set_num_threads(saved);
        }
}
}  // namespace

// Backward's ranges: a batch norm's backward reports its dx's exact min and max (with and without
// the residual added as dx is written; 1 and 2 threads; runs of every tail length), none when dx
// holds a NaN or an infinity; and a model's gradients are bit for bit the same whether the
// convolutions take the range their dy's batch norm reported or read dy for it themselves.
TEST(nn, batchnorm_backward_reports_its_dx_range) {
  std::vector<Shape> shapes = {Shape{4, 3, 7, 7}, Shape{16, 16, 28, 28}};
  for (int64_t P = 1; P <= 17; ++P) shapes.push_back(Shape{3, 2, 1, P});
  for_each_bn_backward_case(shapes, [&](const Shape& sh, bool relu, bool residual, const std::string& what) {
    const Tensor x = randn(sh, 43, 3.0f), dy = randn(sh, 44), res = randn(sh, 45, 0.5f);
    BatchNorm2d bn("bn", sh[1]);
    if (relu) bn.with_relu();
    const StepContext ctx{true, 0, 0};
    bn.forward(x, ctx);
    ValueRange r;
    const Tensor dx = bn.backward(dy, ctx, residual ? &res : nullptr, &r);
    const Tensor plain = bn.backward(dy, ctx, residual ? &res : nullptr);  // (gradients accumulate: dx only)
    EXPECT_TRUE(bit_equal(dx, plain)) << what;
    const float* p = dx.data<float>();
    ASSERT_TRUE(r.valid) << what;
    EXPECT_EQ(r.lo, *std::min_element(p, p + dx.numel())) << what;
    EXPECT_EQ(r.hi, *std::max_element(p, p + dx.numel())) << what;
    const int64_t per = dx.numel() / sh[0];  // each sample's range too
    ASSERT_EQ(static_cast<int64_t>(r.sample_lo.size()), sh[0]) << what;
    ASSERT_EQ(static_cast<int64_t>(r.sample_hi.size()), sh[0]) << what;
    for (int64_t n = 0; n < sh[0]; ++n) {
      EXPECT_EQ(r.sample_lo[n], *std::min_element(p + n * per, p + (n + 1) * per)) << what << " sample " << n;
      EXPECT_EQ(r.sample_hi[n], *std::max_element(p + n * per, p + (n + 1) * per)) << what << " sample " << n;
    }
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      Tensor dyb = dy.clone();
      dyb.data<float>()[dy.numel() - 1] = bad;  // the last value: the tail of the last run (the mask may drop it)
      ValueRange rb;
      const Tensor dxb = bn.backward(dyb, ctx, residual ? &res : nullptr, &rb);
      bool nonfinite = false;
      for (int64_t i = 0; i < dxb.numel(); ++i) nonfinite |= !std::isfinite(dxb.data<float>()[i]);
      EXPECT_EQ(rb.valid, !nonfinite) << what << " with " << bad;
      if (nonfinite) continue;
      EXPECT_EQ(rb.lo, *std::min_element(dxb.data<float>(), dxb.data<float>() + dxb.numel())) << what;
    }
  });
}

// A batch norm's backward handed dy's only handle (moved in) writes dx over dy's storage, with the
// same bits (and the same parameter gradients) as with a fresh dx; a caller that keeps a handle
// (or passes dy as the residual too) keeps dy unchanged. With and without the fused ReLU and the
// residual, 1 and 2 threads, a shape with tails.
TEST(nn, batchnorm_backward_over_a_moved_dy_equals_a_fresh_dx) {
  for_each_bn_backward_case({Shape{4, 3, 7, 7}, Shape{16, 16, 28, 28}, Shape{3, 2, 1, 13}},
                            [&](const Shape& sh, bool relu, bool residual, const std::string& what) {
    const Tensor x = randn(sh, 53, 2.0f), dy = randn(sh, 54), res = randn(sh, 55, 0.5f);
    const StepContext ctx{true, 0, 0};
    auto run = [&](bool move, Tensor* dg) {
      BatchNorm2d bn("bn", sh[1]);
      if (relu) bn.with_relu();
      bn.forward(x, ctx);
      Tensor d = dy.clone();
      const void* storage = d.raw();
      ValueRange r;
      Tensor dx = move ? bn.backward(std::move(d), ctx, residual ? &res : nullptr, &r)
                       : bn.backward(d, ctx, residual ? &res : nullptr, &r);
      EXPECT_EQ(dx.raw() == storage, move) << what << (move ? ": moved dy, new storage" : ": kept dy, written over");
      if (!move) {
        EXPECT_TRUE(bit_equal(d, dy)) << what << ": the caller's dy changed";
      }
      std::vector<Param*> ps;
      bn.collect_params(ps);
      *dg = Tensor::empty({2 * sh[1]});
      std::copy_n(ps[0]->grad.data<float>(), sh[1], dg->data<float>());
      std::copy_n(ps[1]->grad.data<float>(), sh[1], dg->data<float>() + sh[1]);
      return dx;
    };
    Tensor g_fresh, g_over;
    const Tensor fresh = run(false, &g_fresh), over = run(true, &g_over);
    EXPECT_TRUE(bit_equal(fresh, over)) << what;
    EXPECT_TRUE(bit_equal(g_fresh, g_over)) << what;
  });
  // dy as its own residual: not written over (the residual is read as dx is written).
  const Shape sh{2, 3, 5, 5};
  const StepContext ctx{true, 0, 0};
  BatchNorm2d bn("bn", 3);
  bn.forward(randn(sh, 56), ctx);
  Tensor d = randn(sh, 57);
  const Tensor keep = d.clone();
  const Tensor dx = bn.backward(d, ctx, &d);
  EXPECT_NE(dx.raw(), d.raw());
  EXPECT_TRUE(bit_equal(d, keep));
}

TEST(nn, given_gradient_ranges_give_bit_identical_gradients) {
  struct Case {
    Mode mode;
    Arith arith;
    QuantizerKind dgrad;
    Recompute recompute;
    GradRows rows = GradRows::pixel;
  };
  // (rows per sample: the batch norms' per-sample ranges replace the quantizer's own passes)
  const std::vector<Case> cases = {{Mode::fqt, Arith::integer, QuantizerKind::psq, Recompute::automatic},
                                   {Mode::fqt, Arith::integer, QuantizerKind::ptq, Recompute::off},
                                   {Mode::fqt, Arith::sim, QuantizerKind::psq, Recompute::on},
                                   {Mode::fqt, Arith::integer, QuantizerKind::bhq, Recompute::automatic},
                                   {Mode::fqt, Arith::integer, QuantizerKind::psq, Recompute::automatic, GradRows::sample},
                                   {Mode::fqt, Arith::integer, QuantizerKind::bhq, Recompute::off, GradRows::sample}};
  for (const char* name : {"cnn", "preact_resnet20"})
    for (const Case& c : cases)
      for (int threads : {1, 2}) {
        const Shape in{5, 1, 13, 13};
        const RunResult on = run_model(name, c.mode, threads, in, true, {c.recompute, c.arith, c.dgrad, true, c.rows});
        const RunResult off = run_model(name, c.mode, threads, in, true, {c.recompute, c.arith, c.dgrad, false, c.rows});
        const std::string what = std::string(name) + " " + arith_name(c.arith) + " " + traits(c.dgrad).name + " rows " +
                                 grad_rows_name(c.rows) + " threads " + std::to_string(threads);
        EXPECT_TRUE(bit_equal(on.dx, off.dx)) << what;
        ASSERT_EQ(on.grads.size(), off.grads.size());
        for (size_t i = 0; i < on.grads.size(); ++i) EXPECT_TRUE(bit_equal(on.grads[i], off.grads[i])) << what << " param " << i;
      }
}

// forward_codes writes, without the fp32 output, the very codes and grid quantize_in_range makes
// of forward's output and range, and leaves the same state for backward (mask, statistics): on
// 1 and 2 threads, tails of every length (runs starting mid-byte of the mask), negative and zero
// gammas (y decreasing / constant in x; y's extremes from either sign, the min above the ReLU's 0
// too), several activation quantizers; a NaN in x takes the unfused route (same codes again). Eval forwards, plain batch norms and stochastic quantizers
// cannot use it.
TEST(nn, batchnorm_forward_codes_equals_forward_then_quantize) {
  std::vector<Shape> shapes = {Shape{16, 16, 28, 28}, Shape{8, 32, 14, 14}, Shape{5, 3, 7, 7}};
  for (int64_t P = 1; P <= 17; ++P) shapes.push_back(Shape{3, 2, 1, P});
  const QuantizerSpec specs[] = {{QuantizerKind::zero_aligned, 8}, {QuantizerKind::affine, 4}, {QuantizerKind::symmetric, 2}};
  for (const Shape& sh : shapes)
    for (const QuantizerSpec& spec : specs)
      for (int threads : {1, 2})
        for (int variant : {0, 1, 2}) {  // 0: the negative gammas give y's max; 1: a positive one; 2: NaN in x
          const bool with_nan = variant == 2;
          const int saved = omp_get_max_threads();
          omp_set_num_threads(threads);
          Tensor x = randn(sh, 71, 2.0f);
          if (with_nan) x.data<float>()[x.numel() / 2] = std::nanf("");
          const Tensor dy = randn(sh, 72);
          BatchNorm2d a("bn", sh[1]), b("bn", sh[1]);
          a.with_relu(), b.with_relu();
          for (BatchNorm2d* bn : {&a, &b})
            for (int64_t c = 0; c < sh[1]; ++c) {
              const float gs[2][3] = {{0.75f, -1.25f, 0.0f}, {2.0f, -0.25f, 0.0f}};
              bn->gamma().value.data<float>()[c] = gs[variant % 2][c % 3];
              // variant 1: every output > 0 (ReLU inactive), so y's min is an image of x's too
              bn->beta().value.data<float>()[c] = 0.2f * static_cast<float>(c) + (variant == 1 ? 10.0f : -0.3f);
            }
          const StepContext ctx{true, 0, 0};
          ASSERT_TRUE(b.can_forward_codes(spec, ctx));
          ValueRange r;
          const Tensor y = a.forward(x, ctx, &r);
          const QuantizedTensor want = quantize_in_range(y, spec, r.lo, r.hi);
          const QuantizedTensor got = b.forward_codes(x, ctx, spec);
          const std::string what = shape_str(sh) + " bits " + std::to_string(spec.bits) + " threads " +
                                   std::to_string(threads) + " variant " + std::to_string(variant);
          ASSERT_EQ(got.codes.shape(), want.codes.shape()) << what;
          EXPECT_EQ(got.spec.kind, spec.kind) << what;
          EXPECT_EQ(got.scale, want.scale) << what;
          EXPECT_EQ(got.lo, want.lo) << what;
          EXPECT_EQ(std::memcmp(got.codes.raw(), want.codes.raw(), static_cast<size_t>(got.codes.numel())), 0) << what;
          const Tensor dxa = a.backward(dy, ctx), dxb = b.backward(dy, ctx);
          EXPECT_TRUE(bit_equal(dxa, dxb)) << what;
          EXPECT_TRUE(bit_equal(a.gamma().grad, b.gamma().grad)) << what;
          EXPECT_TRUE(bit_equal(a.beta().grad, b.beta().grad)) << what;
          EXPECT_TRUE(bit_equal(a.running_mean(), b.running_mean())) << what;
          EXPECT_TRUE(bit_equal(a.running_var(), b.running_var())) << what;
          omp_set_num_threads(saved);
        }
  BatchNorm2d relu_bn("bn", 2), plain("bn", 2);
  relu_bn.with_relu();
  const QuantizerSpec act{QuantizerKind::zero_aligned, 8};
  EXPECT_FALSE(relu_bn.can_forward_codes(act, StepContext{false, 0, 0}));
  EXPECT_FALSE(plain.can_forward_codes(act, StepContext{true, 0, 0}));
  EXPECT_FALSE(relu_bn.can_forward_codes({QuantizerKind::ptq, 8}, StepContext{true, 0, 0}));
  EXPECT_THROW(plain.forward_codes(randn({2, 2, 3, 3}, 73), StepContext{true, 0, 0}, act), Error);
  // A spec it cannot quantize to (9 bits) is an error, also on an input big enough for the
  // threads (no exception may leave the parallel region).
  EXPECT_THROW(relu_bn.forward_codes(randn({8, 2, 64, 64}, 74), StepContext{true, 0, 0},
                                     {QuantizerKind::zero_aligned, 9}),
               Error);
}

// The fused entry points refuse what they cannot do, with a message: codes given to an fp32
// convolution, codes of another shape, a residual of another shape for batch norm's backward.
TEST(nn, fused_entry_points_reject_bad_input) {
  LayerIds ids{0, 1};
  Conv2d fp32_conv("c", 2, 3, 3, 1, 1, false, make_recipe(Mode::fp32), ids.take(), ids.init_seed);
  Conv2d fqt_conv("c", 2, 3, 3, 1, 1, false, make_recipe(Mode::fqt), ids.take(), ids.init_seed);
  const Tensor x = randn({2, 2, 5, 5}, 81);
  const QuantizedTensor xq = quantize(x, fqt_conv.input_quantizer());
  const StepContext ctx{true, 0, 0};
  EXPECT_THROW(fp32_conv.forward(x.shape(), ctx, xq), Error);
  EXPECT_THROW(fqt_conv.forward(Shape{2, 2, 5, 4}, ctx, xq), Error);
  EXPECT_NO_THROW(fqt_conv.forward(x.shape(), ctx, xq));
  BatchNorm2d bn("bn", 2);
  bn.forward(x, ctx);
  const Tensor wrong = randn({2, 2, 5, 4}, 82);
  EXPECT_THROW(bn.backward(x, ctx, &wrong), Error);
}

// PreActBlock's forward (batch-norm ranges handed to the quantizers, bn1's output quantized once
// for conv1 and the shortcut) against the same layers run one by one through Module::forward:
// the same output, input gradient and parameter gradients bit for bit, in every mode, with and
// without a projection shortcut; a projecting FQT block keeps bn1's output codes once.
TEST(nn, preact_block_equals_its_layers_run_one_by_one) {
  for (Mode mode : {Mode::fp32, Mode::qat, Mode::fqt})
    for (int64_t stride : {1, 2}) {
      const int64_t cin = 4, cout = stride == 1 ? 4 : 8;
      Recipe r = make_recipe(mode);
      r.arith = Arith::integer;
      LayerIds ids{3, 11}, ids2{3, 11};
      PreActBlock block("b", cin, cout, stride, r, ids);
      BatchNorm2d bn1("b.bn1", cin), bn2("b.bn2", cout);
      bn1.with_relu(), bn2.with_relu();
      std::unique_ptr<Conv2d> sc;
      if (stride != 1) sc = std::make_unique<Conv2d>("b.shortcut", cin, cout, 1, stride, 0, false, r, ids2.take(), ids2.init_seed);
      Conv2d conv1("b.conv1", cin, cout, 3, stride, 1, false, r, ids2.take(), ids2.init_seed);
      Conv2d conv2("b.conv2", cout, cout, 3, 1, 1, false, r, ids2.take(), ids2.init_seed);
      const Tensor x = randn({6, cin, 9, 9}, 51), dy = randn({6, cout, 9 / stride + (stride == 2 ? 1 : 0), 9 / stride + (stride == 2 ? 1 : 0)}, 52);
      const StepContext ctx{true, 3, 1};
      const Tensor y = block.forward(x, ctx);
      const Tensor a = bn1.forward(x, ctx);
      const Tensor s = sc ? sc->forward(a, ctx) : x;
      Tensor y_ref = conv2.forward(bn2.forward(conv1.forward(a, ctx), ctx), ctx);
      const float* sp = s.data<float>();
      for (int64_t i = 0; i < y_ref.numel(); ++i) y_ref.data<float>()[i] += sp[i];
      const std::string what = std::string(mode_name(mode)) + " stride " + std::to_string(stride);
      ASSERT_EQ(y.shape(), dy.shape()) << what;
      EXPECT_TRUE(bit_equal(y, y_ref)) << what;
      // The layers' saved storage, shared storage counted once (fp32: both convolutions keep a).
      std::vector<std::pair<const void*, size_t>> items;
      for (const Module* m : std::vector<const Module*>{&bn1, sc.get(), &conv1, &bn2, &conv2})
        if (m) m->collect_saved(items);
      std::sort(items.begin(), items.end());
      items.erase(std::unique(items.begin(), items.end(), [](const auto& u, const auto& v) { return u.first == v.first; }),
                  items.end());
      size_t ref_saved = 0;
      for (const auto& it : items) ref_saved += it.second;
      if (sc && mode != Mode::fp32) ref_saved -= static_cast<size_t>(a.numel());  // bn1's output codes, kept once
      EXPECT_EQ(saved_bytes(block), ref_saved) << what;
      const Tensor dx = block.backward(dy, ctx);
      Tensor da = conv1.backward(bn2.backward(conv2.backward(dy, ctx), ctx), ctx);
      if (sc) {
        const Tensor ds = sc->backward(dy, ctx);
        for (int64_t i = 0; i < da.numel(); ++i) da.data<float>()[i] += ds.data<float>()[i];
      }
      Tensor dx_ref = bn1.backward(da, ctx);
      if (!sc)
        for (int64_t i = 0; i < dx_ref.numel(); ++i) dx_ref.data<float>()[i] += dy.data<float>()[i];
      EXPECT_TRUE(bit_equal(dx, dx_ref)) << what;
      std::vector<Param*> got, want;
      block.collect_params(got);  // bn1, shortcut, conv1, bn2, conv2
      for (Module* m : std::vector<Module*>{&bn1, sc.get(), &conv1, &bn2, &conv2})
        if (m) m->collect_params(want);
      ASSERT_EQ(got.size(), want.size()) << what;
      for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(bit_equal(got[i]->grad, want[i]->grad)) << what << " param " << i;
      // Eval forwards (running statistics, no range from batch norm) agree too.
      const StepContext ev{false, 3, 1};
      const Tensor ye = block.forward(x, ev);
      const Tensor ae = bn1.forward(x, ev);
      Tensor ye_ref = conv2.forward(bn2.forward(conv1.forward(ae, ev), ev), ev);
      const Tensor se = sc ? sc->forward(ae, ev) : x;
      for (int64_t i = 0; i < ye_ref.numel(); ++i) ye_ref.data<float>()[i] += se.data<float>()[i];
      EXPECT_TRUE(bit_equal(ye, ye_ref)) << what << " eval";
    }
}

TEST(nn, model_shapes_names_and_layer_ids) {
  for (const std::string& name : model_names()) {
    for (const Shape& in : {Shape{2, 1, 28, 28}, Shape{2, 3, 32, 32}}) {
      ModulePtr m = make_model(name, in[1], in[2], in[3], 10, make_recipe(Mode::qat), 1);
      const Tensor y = m->forward(randn(in, 10), StepContext{false, 0, 0});
      EXPECT_EQ(y.shape(), (Shape{2, 10})) << name << " on " << shape_str(in);
      std::vector<Param*> params;
      m->collect_params(params);
      std::set<std::string> names;
      for (Param* p : params) {
        EXPECT_TRUE(names.insert(p->name).second) << "duplicate parameter name " << p->name;
        EXPECT_EQ(p->grad.shape(), p->value.shape());
      }
      std::vector<std::pair<std::string, Tensor*>> buffers;
      m->collect_buffers(buffers);
      std::set<std::string> bnames;
      for (auto& b : buffers) EXPECT_TRUE(bnames.insert(b.first).second) << b.first;
      std::vector<QuantizedLayer*> ql;
      m->collect_quantized(ql);
      ASSERT_FALSE(ql.empty());
      for (size_t i = 0; i < ql.size(); ++i) {
        EXPECT_EQ(ql[i]->layer_id(), i) << name << ": layer ids follow forward order";
        EXPECT_EQ(ql[i]->recipe().mode, Mode::qat) << ql[i]->name();
      }
    }
  }
  {
    std::vector<QuantizedLayer*> ql;
    make_model("preact_resnet20", 3, 32, 32, 10, Recipe{}, 1)->collect_quantized(ql);
    EXPECT_EQ(ql.size(), 19u + 2u + 1u);  // 19 3x3 convs + 2 projections + fc
    ql.clear();
    make_model("preact_resnet56", 3, 32, 32, 10, Recipe{}, 1)->collect_quantized(ql);
    EXPECT_EQ(ql.size(), 55u + 2u + 1u);
  }
  EXPECT_THROW(make_model("resnet1000", 3, 32, 32, 10, Recipe{}, 1), InputError);
  try {
    make_model("vgg", 3, 32, 32, 10, Recipe{}, 1);
    ADD_FAILURE() << "make_model(\"vgg\") did not throw";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("preact_resnet56"), std::string::npos) << e.what();
  }
}

TEST(nn, init_is_deterministic_and_seeded) {
  auto first = [](uint64_t seed) {
    ModulePtr m = make_model("mlp", 1, 28, 28, 10, Recipe{}, seed);
    std::vector<Param*> p;
    m->collect_params(p);
    return p[0]->value.clone();
  };
  EXPECT_TRUE(bit_equal(first(3), first(3)));
  EXPECT_FALSE(bit_equal(first(3), first(4)));
}

// Training batch norm splits the batch by samples between threads, with per-channel partial sums
// over fixed groups of samples: output, mask, dx, dgamma, dbeta and the running statistics are
// the same bits on 1, 2 and 3 threads (40 samples: 16 groups of 2 or 3; P = 289: runs start
// mid-byte of the mask). Channel 0 holds +-1e16 in its first and last samples, so that its fp64
// sums change with any change in how they are grouped (checked: partial sums per thread fail).
TEST(nn, batchnorm_thread_count_gives_bit_identical_results) {
  for (const Shape& sh : {Shape{40, 3, 17, 17}, Shape{128, 16, 28, 28}}) {
    std::vector<Tensor> ref;
    for (int threads : {1, 2, 3}) {
      const int saved = omp_get_max_threads();
      omp_set_num_threads(threads);
      BatchNorm2d bn("bn", sh[1]);
      bn.with_relu();
      for (int64_t c = 0; c < sh[1]; ++c) bn.gamma().value.data<float>()[c] = 0.5f + 0.25f * static_cast<float>(c);
      const StepContext ctx{true, 0, 0};
      Tensor x = randn(sh, 41, 3.0f);
      const int64_t P = sh[2] * sh[3];
      x.data<float>()[0] = 1e16f, x.data<float>()[(sh[0] - 1) * sh[1] * P + P - 1] = -1e16f;
      const Tensor y = bn.forward(x, ctx);
      const Tensor dx = bn.backward(randn(sh, 42), ctx);
      std::vector<Tensor> got = {y, dx, bn.gamma().grad.clone(), bn.beta().grad.clone(), bn.running_mean().clone(),
                                 bn.running_var().clone()};
      omp_set_num_threads(saved);
      if (ref.empty()) ref = got;
      for (size_t i = 0; i < got.size(); ++i)
        EXPECT_TRUE(bit_equal(ref[i], got[i])) << shape_str(sh) << " threads " << threads << " tensor " << i;
    }
  }
}

TEST(nn, batchnorm_running_stats_and_eval) {
  BatchNorm2d bn("bn", 2, 0.1f);
  Tensor x = randn({8, 2, 3, 3}, 11, 2.0f);
  bn.forward(x, StepContext{true, 0, 0});
  // running = 0.9 * init + 0.1 * batch stat (unbiased variance)
  for (int c = 0; c < 2; ++c) {
    double s = 0, ss = 0;
    for (int n = 0; n < 8; ++n)
      for (int p = 0; p < 9; ++p) s += x.data<float>()[(n * 2 + c) * 9 + p];
    const double mean = s / 72;
    for (int n = 0; n < 8; ++n)
      for (int p = 0; p < 9; ++p) ss += std::pow(x.data<float>()[(n * 2 + c) * 9 + p] - mean, 2);
    EXPECT_NEAR(bn.running_mean().data<float>()[c], 0.1 * mean, 1e-6);
    EXPECT_NEAR(bn.running_var().data<float>()[c], 0.9 + 0.1 * ss / 71, 1e-5);
  }
  const Tensor ye = bn.forward(x, StepContext{false, 0, 0});
  const float rm = bn.running_mean().data<float>()[0], rv = bn.running_var().data<float>()[0];
  EXPECT_NEAR(ye.data<float>()[0], (x.data<float>()[0] - rm) / std::sqrt(rv + 1e-5f), 1e-5);
}

TEST(nn, loss_accuracy_count) {
  SoftmaxCrossEntropy loss;
  const Tensor logits = Tensor::from<float>({3, 3}, {5, 0, 0, 0, 5, 0, 0, 0, 5});
  const float l = loss.forward(logits, Tensor::from<int32_t>({3}, {0, 1, 0}));
  EXPECT_EQ(loss.num_correct(), 2);
  EXPECT_NEAR(l, (2 * std::log(1 + 2 * std::exp(-5.0)) + std::log(std::exp(5.0) + 2) ) / 3, 1e-5);
}

// col2im is the adjoint of im2col: <col2im(C), X> == <C, im2col(X)>, and im2col gathers the
// right pixels (spot check against direct indexing).
TEST(nn, im2col_col2im_adjoint) {
  const Tensor x = randn({2, 3, 7, 6}, 20);
  for (int64_t k : {1, 3}) {
    for (int64_t stride : {1, 2}) {
      const int64_t pad = k / 2;
      const Tensor cols = im2col(x, k, stride, pad);
      const Tensor c = randn(cols.shape(), 21);
      const Tensor back = col2im(c, x.shape(), k, stride, pad);
      double lhs = 0, rhs = 0;
      for (int64_t i = 0; i < x.numel(); ++i) lhs += double(back.data<float>()[i]) * x.data<float>()[i];
      for (int64_t i = 0; i < cols.numel(); ++i) rhs += double(c.data<float>()[i]) * cols.data<float>()[i];
      EXPECT_NEAR(lhs, rhs, 1e-4 * std::fabs(rhs) + 1e-4);
      const int64_t Ho = (7 + 2 * pad - k) / stride + 1, Wo = (6 + 2 * pad - k) / stride + 1, NP = 2 * Ho * Wo;
      // row (c=1, kh=k-1, kw=0), sample 1, output (1, 1)
      const int64_t r = (1 * k + (k - 1)) * k, col = Ho * Wo + 1 * Wo + 1;
      const int64_t ih = stride - pad + k - 1, iw = stride - pad;
      const float want = (ih >= 0 && ih < 7 && iw >= 0 && iw < 6) ? x.data<float>()[((1 * 3 + 1) * 7 + ih) * 6 + iw] : 0.0f;
      EXPECT_EQ(cols.data<float>()[r * NP + col], want);
    }
  }
}

// WorkSplit runs every index exactly once, whatever the team size against the split's thread
// count (a smaller team: an `if` clause that was false; a larger one), N = 0 included.
TEST(nn, work_split_runs_every_index_once) {
  for (int64_t n : {0, 1, 5, 128, 1001})
    for (int split_threads : {1, 2, 3})
      for (int team : {1, 2, 4}) {
        std::vector<std::atomic<int>> count(static_cast<size_t>(n));
        nn_detail::WorkSplit split(n, split_threads);
#pragma omp parallel num_threads(team)
        split.run([&](int64_t i) { count[static_cast<size_t>(i)].fetch_add(1); });
        for (int64_t i = 0; i < n; ++i)
          ASSERT_EQ(count[static_cast<size_t>(i)].load(), 1) << "n " << n << " split " << split_threads << " team " << team;
      }
}
