// SGD (PyTorch semantics, non-finite gradients, thread-count independence) and LR schedules.
// Suite names start with optim / sched so that `ctest -R "optim|ckpt|sched"` selects them.
#include "fqt/optim.hpp"
#include "fqt/schedule.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>

using namespace fqt;

namespace {

Param make_param(const std::string& name, Shape shape, float value, float grad, bool wd = true) {
  Param p;
  p.name = name;
  p.value = Tensor::full(shape, value);
  p.grad = Tensor::full(shape, grad);
  p.weight_decay = wd;
  return p;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// torch.optim.SGD for one scalar, written out in f32 exactly as in optim.hpp.
struct RefSGD {
  float m, wd;
  bool nesterov;
  float buf = 0;
  bool init = false;
  void step(float& p, float g, float lr) {
    float d = g;
    if (wd != 0.0f) d = d + wd * p;
    if (m != 0.0f) {
      buf = init ? m * buf + d : d;
      init = true;
      d = nesterov ? d + m * buf : buf;
    }
    p = p + (-lr) * d;
  }
};

}  // namespace

TEST(optimSGD, MomentumMatchesHandComputedTorchValues) {
  Param w = make_param("w", {3}, 1.0f, 0.5f);
  Param bn = make_param("bn.gamma", {2}, 1.0f, 0.5f, /*wd=*/false);
  SGD opt({&w, &bn}, SGDOptions{0.9f, 0.01f, false});
  EXPECT_FALSE(opt.momentum_initialized());
  opt.step(0.1f);
  EXPECT_TRUE(opt.momentum_initialized());
  // Step 1: d = 0.5 + 0.01*1 = 0.51, buf = d, p = 1 - 0.1*0.51.
  EXPECT_NEAR(w.value.data<float>()[0], 0.949f, 1e-6);
  EXPECT_NEAR(opt.momentum_buffers()[0].data<float>()[0], 0.51f, 1e-6);
  // No weight decay for bn: buf = 0.5, p = 0.95.
  EXPECT_NEAR(bn.value.data<float>()[1], 0.95f, 1e-6);
  opt.step(0.1f);
  // Step 2: d = 0.5 + 0.01*0.949 = 0.50949, buf = 0.9*0.51 + 0.50949 = 0.96849, p = 0.949 - 0.096849.
  EXPECT_NEAR(w.value.data<float>()[2], 0.852151f, 1e-6);
  EXPECT_NEAR(opt.momentum_buffers()[0].data<float>()[1], 0.96849f, 1e-6);
  // bn: buf = 0.45 + 0.5 = 0.95, p = 0.95 - 0.095.
  EXPECT_NEAR(bn.value.data<float>()[0], 0.855f, 1e-6);
  EXPECT_NEAR(opt.momentum_buffers()[1].data<float>()[0], 0.95f, 1e-6);
  EXPECT_EQ(opt.steps_taken(), 2);
}

TEST(optimSGD, NesterovMatchesHandComputedTorchValues) {
  Param w = make_param("w", {1}, 1.0f, 0.5f);
  SGD opt({&w}, 0.9f, 0.01f, /*nesterov=*/true);
  opt.step(0.1f);
  // d = 0.51, buf = 0.51, d = 0.51 + 0.9*0.51 = 0.969, p = 1 - 0.0969.
  EXPECT_NEAR(w.value.data<float>()[0], 0.9031f, 1e-6);
  opt.step(0.1f);
  // d = 0.5 + 0.01*0.9031 = 0.509031, buf = 0.459 + 0.509031 = 0.968031,
  // d = 0.509031 + 0.9*0.968031 = 1.3802589, p = 0.9031 - 0.13802589.
  EXPECT_NEAR(w.value.data<float>()[0], 0.76507411f, 1e-6);
}

TEST(optimSGD, PlainSgdWithoutMomentum) {
  Param w = make_param("w", {2}, 1.0f, 0.5f);
  SGD opt({&w}, 0.0f, 0.01f);
  EXPECT_TRUE(opt.momentum_buffers().empty());
  opt.step(0.1f);
  EXPECT_NEAR(w.value.data<float>()[0], 0.949f, 1e-7);
  EXPECT_FALSE(opt.momentum_initialized());
}

TEST(optimSGD, BitExactAgainstScalarReferenceOverManySteps) {
  for (bool nesterov : {false, true})
    for (float wd : {0.0f, 5e-4f}) {
      const int64_t n = 257;
      Param a = make_param("a", {n}, 0.0f, 0.0f, true);
      Param b = make_param("b", {n}, 0.0f, 0.0f, false);
      for (int64_t i = 0; i < n; ++i) {
        a.value.data<float>()[i] = std::sin(0.37f * static_cast<float>(i));
        b.value.data<float>()[i] = std::cos(0.11f * static_cast<float>(i));
      }
      std::vector<float> ra(a.value.data<float>(), a.value.data<float>() + n);
      std::vector<float> rb(b.value.data<float>(), b.value.data<float>() + n);
      std::vector<RefSGD> refa(n, RefSGD{0.9f, wd, nesterov}), refb(n, RefSGD{0.9f, 0.0f, nesterov});
      SGD opt({&a, &b}, 0.9f, wd, nesterov);
      for (int s = 0; s < 7; ++s) {
        const float lr = 0.1f / static_cast<float>(s + 1);
        for (int64_t i = 0; i < n; ++i) {
          const float ga = std::sin(1.3f * static_cast<float>(i + 7 * s)), gb = 0.01f * static_cast<float>(i - s);
          a.grad.data<float>()[i] = ga;
          b.grad.data<float>()[i] = gb;
          refa[i].step(ra[i], ga, lr);
          refb[i].step(rb[i], gb, lr);
        }
        opt.step(lr);
      }
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_EQ(a.value.data<float>()[i], ra[i]) << "nesterov=" << nesterov << " wd=" << wd << " i=" << i;
        ASSERT_EQ(b.value.data<float>()[i], rb[i]) << "nesterov=" << nesterov << " i=" << i;
        ASSERT_EQ(opt.momentum_buffers()[0].data<float>()[i], refa[i].buf);
      }
    }
}

TEST(optimSGD, ResultIndependentOfThreadCount) {
  const int64_t n = 300000;  // above the parallel threshold
  auto run = [&](int threads) {
    Param w = make_param("w", {n}, 0.0f, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      w.value.data<float>()[i] = std::sin(0.001f * static_cast<float>(i));
      w.grad.data<float>()[i] = std::cos(0.003f * static_cast<float>(i));
    }
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    SGD opt({&w}, 0.9f, 1e-4f, true);
    opt.step(0.05f);
    opt.step(0.04f);
    omp_set_num_threads(saved);
    return w.value.clone();
  };
  EXPECT_TRUE(same_bits(run(1), run(3)));
}

TEST(optimSGD, NonFiniteGradientThrowsAndLeavesWeightsUntouched) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    Param a = make_param("layer1.weight", {4}, 1.0f, 0.5f);
    Param b = make_param("layer2.weight", {5}, 2.0f, 0.25f);
    SGD opt({&a, &b}, 0.9f, 1e-4f);
    opt.step(0.1f);  // initialise momentum
    const Tensor a0 = a.value.clone(), b0 = b.value.clone();
    const Tensor m0 = opt.momentum_buffers()[0].clone(), m1 = opt.momentum_buffers()[1].clone();
    b.grad.data<float>()[3] = bad;
    EXPECT_FALSE(opt.all_finite());
    EXPECT_EQ(opt.first_non_finite().first, "layer2.weight");
    EXPECT_EQ(opt.first_non_finite().second, 3);
    try {
      opt.step(0.1f);
      FAIL() << "expected NonFiniteError";
    } catch (const NonFiniteError& e) {
      EXPECT_NE(std::string(e.what()).find("layer2.weight"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("element 3"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(same_bits(a.value, a0));  // the first param, before the bad one, is untouched too
    EXPECT_TRUE(same_bits(b.value, b0));
    EXPECT_TRUE(same_bits(opt.momentum_buffers()[0], m0));
    EXPECT_TRUE(same_bits(opt.momentum_buffers()[1], m1));
    EXPECT_EQ(opt.steps_taken(), 1);
    b.grad.data<float>()[3] = 0.25f;
    EXPECT_TRUE(opt.all_finite());
    EXPECT_NO_THROW(opt.step(0.1f));
  }
}

// The non-finite scan on a longer gradient (its vector body, not only the tail): the largest
// finite values, denormals and -0 pass; a negative quiet NaN, a signalling NaN or an Inf at any
// position is found at that exact index.
TEST(optimSGD, NonFiniteScanFindsTheExactElement) {
  Param a = make_param("w", {1000}, 1.0f, 0.5f);
  SGD opt({&a}, 0.9f, 0.0f);
  float* g = a.grad.data<float>();
  g[0] = std::numeric_limits<float>::max();
  g[1] = -std::numeric_limits<float>::max();
  g[2] = std::numeric_limits<float>::denorm_min();
  g[3] = -0.0f;
  EXPECT_TRUE(opt.all_finite());
  for (int64_t at : {int64_t{5}, int64_t{517}, int64_t{999}})
    for (float bad : {-std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::signaling_NaN(),
                      std::numeric_limits<float>::infinity()}) {
      const float keep = g[at];
      g[at] = bad;
      EXPECT_EQ(opt.first_non_finite().second, at) << bad;
      g[at] = keep;
    }
  EXPECT_TRUE(opt.all_finite());
}

TEST(optimSGD, ZeroGradAndBadOptions) {
  Param w = make_param("w", {3}, 1.0f, -0.0f);
  w.grad.fill(7.0);
  SGD opt({&w});
  EXPECT_EQ(opt.options().momentum, 0.9f);
  opt.zero_grad();
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(w.grad.data<float>()[i], 0.0f);
    EXPECT_FALSE(std::signbit(w.grad.data<float>()[i]));
  }
  EXPECT_THROW(SGD({&w}, 0.0f, 0.0f, /*nesterov=*/true), InputError);
  EXPECT_THROW(SGD({&w}, -0.1f, 0.0f), InputError);
  EXPECT_THROW(SGD({&w}, 0.9f, -1.0f), InputError);
  EXPECT_THROW(opt.step(std::numeric_limits<float>::quiet_NaN()), InputError);
}

// ---- schedules -------------------------------------------------------------------------------

TEST(schedLr, ConstantWithWarmupEndpoints) {
  LrSchedule s = parse_schedule("constant", 0.4, 1000, 10, /*warmup=*/8);
  EXPECT_FLOAT_EQ(s.lr_at(0), 0.4f / 8);
  EXPECT_FLOAT_EQ(s.lr_at(3), 0.4f * 4 / 8);
  EXPECT_FLOAT_EQ(s.lr_at(7), 0.4f);
  EXPECT_FLOAT_EQ(s.lr_at(8), 0.4f);
  EXPECT_FLOAT_EQ(s.lr_at(100000), 0.4f);
  for (int64_t i = 1; i < 8; ++i) EXPECT_GT(s.lr_at(i), s.lr_at(i - 1));
}

TEST(schedLr, CosinePerStepEndpointsAndMidpoint) {
  LrSchedule s = parse_schedule("cosine", 0.1, 100, 10);
  EXPECT_FLOAT_EQ(s.lr_at(0), 0.1f);
  EXPECT_NEAR(s.lr_at(50), 0.05f, 1e-7);
  EXPECT_NEAR(s.lr_at(25), 0.1f * 0.5f * (1.0f + std::cos(3.14159265f / 4)), 1e-7);
  EXPECT_NEAR(s.lr_at(99), 0.1 * 0.5 * (1 + std::cos(M_PI * 0.99)), 1e-8);
  EXPECT_EQ(s.lr_at(100), 0.0f);
  EXPECT_EQ(s.lr_at(1000), 0.0f);
  for (int64_t i = 1; i <= 100; ++i) EXPECT_LE(s.lr_at(i), s.lr_at(i - 1));

  // With a floor and a warmup: the decay starts when the warmup ends.
  LrSchedule w = parse_schedule("cosine", 0.1, 110, 10, /*warmup=*/10, /*min_lr=*/0.01);
  EXPECT_FLOAT_EQ(w.lr_at(0), 0.01f);
  EXPECT_FLOAT_EQ(w.lr_at(9), 0.1f);
  EXPECT_FLOAT_EQ(w.lr_at(10), 0.1f);
  EXPECT_NEAR(w.lr_at(60), 0.055f, 1e-7);
  EXPECT_FLOAT_EQ(w.lr_at(110), 0.01f);
  EXPECT_FLOAT_EQ(w.lr_at(500), 0.01f);
}

TEST(schedLr, CosinePerEpochIsConstantWithinAnEpoch) {
  LrSchedule s = parse_schedule("cosine-epoch", 0.2, 100, 10);  // 10 epochs of 10 steps
  EXPECT_FALSE(s.per_step);
  for (int64_t e = 0; e < 10; ++e) {
    const float expect = static_cast<float>(0.2 * 0.5 * (1 + std::cos(M_PI * e / 10.0)));
    for (int64_t i = 0; i < 10; ++i) EXPECT_EQ(s.lr_at(e * 10 + i), expect) << "epoch " << e << " step " << i;
  }
  EXPECT_FLOAT_EQ(s.lr_at(0), 0.2f);
  EXPECT_NEAR(s.lr_at(55), 0.1f, 1e-7);
  EXPECT_EQ(s.lr_at(100), 0.0f);
  // A partial last epoch counts as an epoch: 95 steps of 10 = 10 epochs.
  LrSchedule p = parse_schedule("cosine-epoch", 0.2, 95, 10);
  EXPECT_EQ(p.lr_at(50), s.lr_at(50));
}

TEST(schedLr, StepDecayAtMilestones) {
  LrSchedule s = parse_schedule("step:3,6", 1.0, 0, 10);
  EXPECT_EQ(s.kind, LrKind::step);
  EXPECT_FLOAT_EQ(s.gamma, 0.1);
  EXPECT_FLOAT_EQ(s.lr_at(0), 1.0f);
  EXPECT_FLOAT_EQ(s.lr_at(29), 1.0f);
  EXPECT_FLOAT_EQ(s.lr_at(30), 0.1f);
  EXPECT_FLOAT_EQ(s.lr_at(59), 0.1f);
  EXPECT_FLOAT_EQ(s.lr_at(60), 0.01f);
  EXPECT_FLOAT_EQ(s.lr_at(10000), 0.01f);
  LrSchedule g = parse_schedule("step:30,60,80@0.2", 0.5, 0, 100, /*warmup=*/4);
  EXPECT_FLOAT_EQ(g.gamma, 0.2);
  EXPECT_FLOAT_EQ(g.lr_at(0), 0.5f / 4);
  EXPECT_FLOAT_EQ(g.lr_at(3), 0.5f);
  EXPECT_FLOAT_EQ(g.lr_at(3000), 0.1f);
  EXPECT_FLOAT_EQ(g.lr_at(8000), 0.5f * 0.2f * 0.2f * 0.2f);
}

TEST(schedLr, ParseRejectsBadInput) {
  auto msg = [](auto f) {
    try {
      f();
    } catch (const InputError& e) {
      return std::string(e.what());
    }
    return std::string("<no InputError>");
  };
  EXPECT_NE(msg([] { parse_schedule("linear", 0.1, 100, 10); }).find("unknown learning-rate schedule 'linear'"),
            std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("step", 0.1, 100, 10); }).find("needs milestones"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("step:3,x", 0.1, 100, 10); }).find("milestone 'x'"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("step:3,", 0.1, 100, 10); }).find("milestone ''"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("step:6,3", 0.1, 100, 10); }).find("strictly increasing"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("step:3@abc", 0.1, 100, 10); }).find("gamma"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("step:3@1e30", 0.1, 100, 10); }).find("gamma must be in (0, 1]"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("step:3@inf", 0.1, 100, 10); }).find("gamma must be in (0, 1]"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("step:0", 0.1, 100, 10); }).find("milestone 0 is not an epoch"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("cosine", 0.1, 10, 10, 10); }).find("warmup"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("constant", -1.0, 10, 10); }).find("learning rate"), std::string::npos);
  EXPECT_NE(msg([] { parse_schedule("constant", 0.1, 10, 0); }).find("steps per epoch"), std::string::npos);
}
