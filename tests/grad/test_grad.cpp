// Finite-difference checks of every layer's backward (dgrad and wgrad), batch norm, pooling,
// ReLU, the loss and the residual blocks — all in fp32 mode.
//
// Method: scalar loss L = sum_i y_i r_i for a fixed random r (accumulated in fp64), central
// differences (L(v + eps) - L(v - eps)) / (2 eps) with eps = 1e-2 on O(1) inputs.
// Tolerance: the forward is fp32, so L carries a rounding error of about
// sqrt(#y) * |y| * |r| * K * 2^-24 <~ 1e-5 for our sizes (#y <= ~600, K <= 36); divided by 2 eps
// this is ~5e-4 absolute on gradients of magnitude O(1..10). Linear and conv layers are linear
// in each input, so central differences have no truncation error; BN is smooth with truncation
// O(eps^2) ~ 1e-4. Hence max |analytic - numeric| <= 1e-2 * max |numeric| (+1e-3 absolute).
// Kinks (ReLU, max pool) are avoided by construction of the inputs, except in the residual
// blocks where BN output may sit near 0: there a rare kink crossing changes one numeric entry,
// so those use the relative L2 error <= 2e-2.
#include "fqt/layers.hpp"
#include "fqt/rng.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>

using namespace fqt;

namespace {

double kEps = 1e-2;  // the residual-block tests lower it (see there)

Tensor randn(Shape s, uint64_t stream, float scale = 1.0f, float shift = 0.0f) {
  Tensor t = Tensor::empty(std::move(s));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = shift + scale * normal_at({2024, stream}, i);
  return t;
}

double weighted_sum(const Tensor& y, const Tensor& r) {
  double s = 0.0;
  for (int64_t i = 0; i < y.numel(); ++i) s += static_cast<double>(y.data<float>()[i]) * r.data<float>()[i];
  return s;
}

struct Err {
  double max_abs = 0, max_ref = 0, l2_diff = 0, l2_ref = 0;
  double rel_max() const { return max_abs / std::max(max_ref, 1e-12); }
  double rel_l2() const { return std::sqrt(l2_diff / std::max(l2_ref, 1e-24)); }
};

// Numeric gradient of f() with respect to every entry of `v` (perturbed in place), compared to
// `analytic`.
Err compare(Tensor v, const Tensor& analytic, const std::function<double()>& f) {
  Err e;
  float* p = v.data<float>();
  for (int64_t i = 0; i < v.numel(); ++i) {
    const float orig = p[i];
    p[i] = static_cast<float>(orig + kEps);
    const double lp = f();
    p[i] = static_cast<float>(orig - kEps);
    const double lm = f();
    p[i] = orig;
    const double num = (lp - lm) / (2 * kEps);
    const double ana = analytic.data<float>()[i];
    e.max_abs = std::max(e.max_abs, std::fabs(num - ana));
    e.max_ref = std::max(e.max_ref, std::fabs(num));
    e.l2_diff += (num - ana) * (num - ana);
    e.l2_ref += num * num;
  }
  return e;
}

void expect_close(const Err& e, const std::string& what) {
  EXPECT_LE(e.max_abs, 1e-2 * e.max_ref + 1e-3) << what << ": max abs err " << e.max_abs << " vs max |grad| "
                                                 << e.max_ref;
  EXPECT_GT(e.max_ref, 0.0) << what << ": gradient is identically zero";
}

// Checks dL/dx and dL/dparam for a module in training mode.
void check_module(Module& m, Tensor x, bool l2_metric = false, const std::string& tag = "") {
  StepContext ctx{true, 1, 0};
  Tensor y = m.forward(x, ctx);
  const Tensor r = randn(y.shape(), 999);
  std::vector<Param*> params;
  m.collect_params(params);
  for (Param* p : params) p->grad.fill(0.0);
  const Tensor dx = m.backward(r, ctx);
  auto f = [&] { return weighted_sum(m.forward(x, ctx), r); };
  auto judge = [&](const Err& e, const std::string& what) {
    if (l2_metric) {
      EXPECT_LE(e.rel_l2(), 2e-2) << what << ": relative L2 error";
      EXPECT_GT(e.l2_ref, 0.0) << what;
    } else {
      expect_close(e, what);
    }
  };
  judge(compare(x, dx, f), tag + " dx");
  for (Param* p : params) judge(compare(p->value, p->grad, f), tag + " " + p->name);
}

}  // namespace

TEST(grad, linear) {
  Linear lin("fc", 7, 5, true, Recipe{}, 0, 11);
  randn({5}, 3).data<float>();
  std::copy_n(randn({5}, 3).data<float>(), 5, lin.bias().value.data<float>());
  check_module(lin, randn({4, 7}, 1), false, "linear");
}

TEST(grad, conv2d_stride_padding) {
  Conv2d conv("conv", 3, 4, 3, 2, 1, true, Recipe{}, 0, 12);
  std::copy_n(randn({4}, 4).data<float>(), 4, conv.bias().value.data<float>());
  check_module(conv, randn({2, 3, 7, 6}, 2), false, "conv3x3/s2/p1");
}

TEST(grad, conv2d_1x1_and_5x5) {
  Conv2d c1("c1", 3, 2, 1, 2, 0, false, Recipe{}, 0, 13);
  check_module(c1, randn({2, 3, 5, 5}, 5), false, "conv1x1/s2");
  Conv2d c5("c5", 2, 3, 5, 1, 2, false, Recipe{}, 1, 13);
  check_module(c5, randn({1, 2, 6, 7}, 6), false, "conv5x5/p2");
}

TEST(grad, batchnorm_train) {
  BatchNorm2d bn("bn", 3);
  std::copy_n(randn({3}, 7, 0.5f, 1.0f).data<float>(), 3, bn.gamma().value.data<float>());
  std::copy_n(randn({3}, 8).data<float>(), 3, bn.beta().value.data<float>());
  check_module(bn, randn({4, 3, 3, 3}, 9, 2.0f, 1.0f), false, "bn");
}

TEST(grad, relu_away_from_kink) {
  Tensor x = randn({3, 20}, 10);
  for (int64_t i = 0; i < x.numel(); ++i) {  // |x| >= 0.1 > eps: no kink inside [x - eps, x + eps]
    float& v = x.data<float>()[i];
    v = v >= 0 ? v + 0.1f : v - 0.1f;
  }
  ReLU relu;
  check_module(relu, x, false, "relu");
}

TEST(grad, relu_bitmask_backward_is_exact) {
  // ReLU keeps a 1-bit mask instead of its output: dx must be exactly (x > 0 ? dy : 0), at the
  // kink (+0, -0), for denormals, across mask-byte and thread-block boundaries, and an eval
  // forward must not leave a mask behind.
  // Sizes around the 16-value vector blocks and their scalar tail.
  for (int64_t n : {1, 13, 15, 16, 17, 31, 33, 64, 300007}) {
    Tensor x = randn({n}, 11);
    float* xp = x.data<float>();
    const float specials[] = {0.0f, -0.0f, 1e-40f, -1e-40f, 3.0f, -3.0f, std::nanf("")};
    for (int64_t i = 0; i < n; i += 5) xp[i] = specials[(i / 5) % 7];
    Tensor dy = randn({n}, 12);
    ReLU relu;
    const Tensor y = relu.forward(x, StepContext{true, 0, 0});
    const Tensor dx = relu.backward(dy, StepContext{true, 0, 0});
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(dx.data<float>()[i], xp[i] > 0.0f ? dy.data<float>()[i] : 0.0f) << "n " << n << " i " << i;
      const float want = xp[i] > 0.0f ? xp[i] : 0.0f;  // NaN and -0 give +0
      ASSERT_EQ(std::memcmp(&y.data<float>()[i], &want, sizeof want), 0) << "n " << n << " i " << i;
    }
    EXPECT_EQ(saved_bytes(relu), static_cast<size_t>((n + 7) / 8)) << "one bit per value";
    relu.forward(x, StepContext{false, 0, 0});
    EXPECT_EQ(saved_bytes(relu), 0u);
  }
}

TEST(grad, maxpool_distinct_values) {
  // A permutation of 0.1 * k: neighbours differ by >= 0.1 > 2 eps, so the argmax never flips.
  const int64_t n = 2 * 2 * 6 * 7;
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = 0.1f * static_cast<float>((i * 37) % n) - 5.0f;
  MaxPool2d pool(2, 2);
  check_module(pool, Tensor::from<float>({2, 2, 6, 7}, v), false, "maxpool2/2");
  MaxPool2d pool3(3, 2);
  check_module(pool3, Tensor::from<float>({2, 2, 6, 7}, v), false, "maxpool3/2");
}

TEST(grad, global_avg_pool_and_flatten) {
  GlobalAvgPool gap;
  check_module(gap, randn({2, 3, 4, 5}, 11), false, "gap");
  Flatten fl;
  check_module(fl, randn({2, 3, 2, 2}, 12), false, "flatten");
}

TEST(grad, softmax_cross_entropy_with_label_smoothing) {
  for (float ls : {0.0f, 0.1f}) {
    Tensor logits = randn({5, 7}, 13, 2.0f);
    Tensor labels = Tensor::from<int32_t>({5}, {0, 3, 6, 2, 3});
    SoftmaxCrossEntropy loss;
    loss.forward(logits, labels, ls);
    const Tensor d = loss.backward();
    auto f = [&] {
      SoftmaxCrossEntropy l2;
      return static_cast<double>(l2.forward(logits, labels, ls));
    };
    // The loss is returned as fp32 (relative rounding 6e-8 on O(1) values): noise 3e-6 / eps.
    expect_close(compare(logits, d, f), "cross-entropy ls=" + std::to_string(ls));
  }
}

TEST(grad, preact_block_projection_and_identity) {
  // BN outputs feed ReLUs here, so some sit within eps of the kink: a perturbation of a BN
  // bias shifts a whole channel and moves ~eps * density of its elements across the kink, which
  // biases the numeric derivative by O(eps). eps = 1e-3 keeps that below ~0.5%; fp32 noise grows
  // to ~5e-3 absolute, still far below the 2e-2 relative L2 tolerance on O(1) gradients.
  kEps = 1e-3;
  LayerIds ids{0, 21};
  PreActBlock proj("b0", 3, 4, 2, Recipe{}, ids);
  check_module(proj, randn({3, 3, 6, 6}, 14), true, "preact/proj");
  PreActBlock ident("b1", 3, 3, 1, Recipe{}, ids);
  check_module(ident, randn({3, 3, 5, 5}, 15), true, "preact/identity");
  kEps = 1e-2;
}

TEST(grad, basic_block) {
  kEps = 1e-3;  // as for the pre-activation blocks
  LayerIds ids{0, 22};
  BasicBlock blk("b0", 2, 4, 2, Recipe{}, ids);
  check_module(blk, randn({3, 2, 6, 6}, 16), true, "basic/proj");
  kEps = 1e-2;
}
