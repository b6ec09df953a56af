// SPEC claim 1 at network level: the FQT gradient is an unbiased estimator of the QAT gradient.
//
// A tiny conv net (conv-BN-ReLU-conv-GAP-linear) with fixed weights and a fixed batch. The QAT
// gradient g is deterministic. K FQT gradients g_k (steps 0..K-1, i.e. fresh random draws for
// every gradient quantizer) with 4-bit PSQ dgrad and 4-bit PTQ wgrad. If E[g_k] = g then
// e_K = mean_k g_k - g has E||e_K||^2 = tr(Var g_k) / K. We estimate tr(Var) from the draws and
// require ||e_K|| <= 4 sqrt(tr(Var) / K) (by Markov's inequality the probability of exceeding
// it when unbiased is < 1/16; by the CLT it is astronomically smaller since e_K is a sum of
// ~1000 coordinates of roughly equal share). A bias b would show as ||e_K|| -> ||b||, not -> 0,
// so we also check that the error shrinks with K (16 -> 512: expected factor 5.7, we ask for 2).
// Fixed seeds: the test is deterministic.
#include "fqt/layers.hpp"
#include "tiny_net.hpp"
#include "fqt/rng.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <vector>

using namespace fqt;
using fqt::test::TinyNet;

namespace {

double norm(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s);
}

}  // namespace

TEST(stat, fqt_gradient_is_unbiased_estimate_of_qat_gradient) {
  // Results do not depend on the thread count (tests/unit/test_nn.cpp); one thread avoids many tiny
  // OpenMP regions per step (quantizers on small matrices), which only cost barriers.
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  for (QuantizerKind dgrad_kind : {QuantizerKind::psq, QuantizerKind::bhq}) {
  SCOPED_TRACE(traits(dgrad_kind).name);
  std::printf("  dgrad quantizer: 4-bit %s, wgrad: 4-bit ptq\n", traits(dgrad_kind).name);
  Recipe r;
  r.mode = Mode::qat;
  r.dgrad = {dgrad_kind, 4};
  r.wgrad = {QuantizerKind::ptq, 4};
  TinyNet model(r);
  Tensor x = Tensor::empty({16, 3, 8, 8});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = normal_at({31, 0}, i);
  Tensor y = Tensor::empty({16}, DType::i32);
  for (int i = 0; i < 16; ++i) y.data<int32_t>()[i] = (i * 7) % 10;

  const std::vector<double> qat = model.gradient(x, y, 0);
  std::vector<QuantizedLayer*> ql;
  model.net.collect_quantized(ql);
  for (QuantizedLayer* l : ql) l->recipe().mode = Mode::fqt;

  const int K = 512, K_small = 16;
  const size_t D = qat.size();
  std::vector<double> sum(D, 0.0), sum2(D, 0.0);
  double err_small = 0, bound_small = 0;
  for (int k = 0; k < K; ++k) {
    const std::vector<double> g = model.gradient(x, y, static_cast<uint64_t>(k));
    for (size_t i = 0; i < D; ++i) sum[i] += g[i], sum2[i] += g[i] * g[i];
    if (k + 1 == K_small) {
      std::vector<double> e(D);
      double tr = 0;
      for (size_t i = 0; i < D; ++i) {
        e[i] = sum[i] / K_small - qat[i];
        tr += (sum2[i] - sum[i] * sum[i] / K_small) / (K_small - 1);
      }
      err_small = norm(e);
      bound_small = 4 * std::sqrt(tr / K_small);
    }
  }
  std::vector<double> e(D);
  double tr = 0;
  for (size_t i = 0; i < D; ++i) {
    e[i] = sum[i] / K - qat[i];
    tr += (sum2[i] - sum[i] * sum[i] / K) / (K - 1);
  }
  const double err = norm(e), qn = norm(qat), bound = 4 * std::sqrt(tr / K);
  std::printf("  ||qat|| = %.4g, per-draw sqrt(tr Var) = %.4g (%.1f%% of ||qat||)\n", qn, std::sqrt(tr),
              100 * std::sqrt(tr) / qn);
  std::printf("  K=%d: ||mean - qat|| / ||qat|| = %.4g (bound %.4g)\n", K_small, err_small / qn, bound_small / qn);
  std::printf("  K=%d: ||mean - qat|| / ||qat|| = %.4g (bound %.4g)\n", K, err / qn, bound / qn);
  EXPECT_GT(tr, 0.0) << "FQT draws must differ (4-bit stochastic gradients)";
  EXPECT_LE(err_small, bound_small);
  EXPECT_LE(err, bound);
  EXPECT_LT(err, err_small / 2) << "the error must shrink like 1/sqrt(K)";
  }
  omp_set_num_threads(saved_threads);
}
