// Statistical properties of the stochastic quantizers (SPEC sections 2, 3, claims 1-2).
// Every test uses fixed seeds, so results are reproducible; each tolerance states the sigma it
// allows and why.
#include "fqt/quant.hpp"
#include "fqt/rng.hpp"
#include "fqt/stats.hpp"

#include <gtest/gtest.h>

#include <cmath>

using namespace fqt;

namespace {
const QuantizerKind kStochastic[] = {QuantizerKind::ptq, QuantizerKind::ptq_zero, QuantizerKind::psq,
                                     QuantizerKind::column, QuantizerKind::bhq};

struct Draws {
  std::vector<double> mean_err;  // per element: mean over K draws of Q(X) - X
  std::vector<double> var;       // per element: unbiased sample variance over the K draws
};
Draws draw(const Tensor& x, QuantizerSpec spec, int K, uint64_t seed) {
  const int64_t n = x.numel();
  std::vector<double> s(n, 0), s2(n, 0);
  for (int k = 0; k < K; ++k) {
    Tensor d = dequantize(quantize(x, spec, {seed, static_cast<uint64_t>(k)}));
    for (int64_t i = 0; i < n; ++i) {
      double e = double(d.data<float>()[i]) - x.data<float>()[i];
      s[i] += e;
      s2[i] += e * e;
    }
  }
  Draws out{std::vector<double>(n), std::vector<double>(n)};
  for (int64_t i = 0; i < n; ++i) {
    out.mean_err[i] = s[i] / K;
    out.var[i] = std::max(0.0, (s2[i] - s[i] * s[i] / K) / (K - 1));
  }
  return out;
}
}  // namespace

// Unbiasedness, E[Q(X)] = X: for every stochastic quantizer at 2, 4 and 8 bits, K = 200 draws.
// The mean error m = mean_k Q_k(X) - X is projected on directions w: z = <w, m> / sqrt(sum w^2
// var / K) is ~N(0,1) for an unbiased quantizer (a sum over >= 64 x 200 independent draws).
// Directions: all ones, 4 random +-1 vectors, every row and every column (64 + 64). Bound:
// |z| < 5.5 for each of the 133 directions (false alarm ~ 133 x 4e-8). A biased rounding (e.g.
// nearest) puts sum(round(v) - v) ~ 0.29 step sqrt(64) on a row against a noise sd of
// sqrt(64/6/200) step: z ~ 10.
TEST(QuantStats, EveryStochasticQuantizerIsUnbiased) {
  const int K = 200, R = 64, C = 64;
  // Gaussian rows: every row/column sum mixes many elements with spread-out fractions p, so the
  // normal approximation holds for all 133 directions. Heavy-tailed rows: a small row can hold
  // only elements with p ~ 1e-4 (the sample variance over 200 draws is then 0 and a per-row z is
  // meaningless), so there only the 5 global directions, dominated by the large rows, are used.
  for (SynthKind data : {SynthKind::gaussian, SynthKind::heavy_tailed}) {
    Tensor x = synthetic_matrix(data, R, C, 21);
    for (QuantizerKind kind : kStochastic)
      for (int bits : {2, 4, 8}) {
        Draws d = draw(x, {kind, bits}, K, 1000 + bits);
        auto z_of = [&](auto weight) {
          double dot = 0, var_w = 0;
          for (int64_t i = 0; i < R * C; ++i) {
            const double w = weight(i);
            dot += w * d.mean_err[i];
            var_w += w * w * d.var[i];
          }
          return dot / std::sqrt(var_w / K);
        };
        double worst = std::fabs(z_of([](int64_t) { return 1.0; }));
        for (uint64_t p = 1; p <= 4; ++p)
          worst = std::max(worst, std::fabs(z_of([&](int64_t i) { return uniform_at({77, p}, i) < 0.5f ? -1.0 : 1.0; })));
        if (data == SynthKind::gaussian) {
          for (int64_t r = 0; r < R; ++r) worst = std::max(worst, std::fabs(z_of([&](int64_t i) { return i / C == r ? 1.0 : 0.0; })));
          for (int64_t c = 0; c < C; ++c) worst = std::max(worst, std::fabs(z_of([&](int64_t i) { return i % C == c ? 1.0 : 0.0; })));
        }
        EXPECT_LT(worst, 5.5) << traits(kind).name << " bits " << bits << (data == SynthKind::gaussian ? " gaussian" : " heavy-tailed");
      }
  }
}

// Rows per sample (quantize_samples_nchw: a grid per sample of an N, C, H, W gradient, BHQ's
// transform across samples, codes stored as pixel rows) are unbiased as well: the test above on
// the dequantized pixel rows against x's, K = 200 draws, PSQ and BHQ at 2, 4 and 8 bits; samples
// of Gaussian values scaled by exp(2 N(0,1)), so that BHQ groups several samples. Directions: all
// ones, 4 random +-1 vectors, every sample (16) and every channel (16); |z| < 5.5 for each of the
// 37 (false alarm ~ 37 x 4e-8). Within a sample the fractions are spread (Gaussian values), so
// every direction sums many elements with non-degenerate variances.
TEST(QuantStats, PerSampleRowsAreUnbiased) {
  const int K = 200;
  const int64_t N = 16, C = 16, P = 36;
  Tensor x = synthetic_matrix(SynthKind::gaussian, N * C, P, 23).reshape({N, C, 6, 6});
  for (int64_t n = 0; n < N; ++n) {
    const float f = std::exp(2.0f * normal_at({95, 0}, n));
    for (int64_t i = 0; i < C * P; ++i) x.data<float>()[n * C * P + i] *= f;
  }
  std::vector<double> g(static_cast<size_t>(N * P * C));  // x's pixel rows, as dequantize returns them
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p) g[(n * P + p) * C + c] = x.data<float>()[(n * C + c) * P + p];
  const int64_t M = N * P * C;
  for (QuantizerKind kind : {QuantizerKind::psq, QuantizerKind::bhq})
    for (int bits : {2, 4, 8}) {
      std::vector<double> s(M, 0), s2(M, 0);
      for (int k = 0; k < K; ++k) {
        const Tensor d = dequantize(quantize_samples_nchw(x, {kind, bits}, {2000u + bits, static_cast<uint64_t>(k)}).first);
        for (int64_t i = 0; i < M; ++i) {
          const double e = double(d.data<float>()[i]) - g[i];
          s[i] += e, s2[i] += e * e;
        }
      }
      auto z_of = [&](auto weight) {
        double dot = 0, var_w = 0;
        for (int64_t i = 0; i < M; ++i) {
          const double w = weight(i), var = std::max(0.0, (s2[i] - s[i] * s[i] / K) / (K - 1));
          dot += w * s[i] / K;
          var_w += w * w * var;
        }
        return dot / std::sqrt(var_w / K);
      };
      double worst = std::fabs(z_of([](int64_t) { return 1.0; }));
      for (uint64_t q = 1; q <= 4; ++q)
        worst = std::max(worst, std::fabs(z_of([&](int64_t i) { return uniform_at({78, q}, i) < 0.5f ? -1.0 : 1.0; })));
      for (int64_t n = 0; n < N; ++n) worst = std::max(worst, std::fabs(z_of([&](int64_t i) { return i / (P * C) == n ? 1.0 : 0.0; })));
      for (int64_t c = 0; c < C; ++c) worst = std::max(worst, std::fabs(z_of([&](int64_t i) { return i % C == c ? 1.0 : 0.0; })));
      EXPECT_LT(worst, 5.5) << traits(kind).name << " bits " << bits;
    }
}

// The bias estimate of quantizer_stats sits at its noise floor and shrinks like 1/sqrt(K).
TEST(QuantStats, BiasStaysAtNoiseFloor) {
  Tensor x = synthetic_matrix(SynthKind::gaussian, 32, 64, 3);
  for (QuantizerKind kind : kStochastic) {
    QuantStats a = quantizer_stats(x, {kind, 4}, 50, 9);
    QuantStats b = quantizer_stats(x, {kind, 4}, 800, 9);
    // ||m||^2 / (Var/K) is a sum of ~M = 2048 squared ~N(0,1) terms on homogeneous data: ratio of
    // norms ~ 1 with relative sd ~ 1/sqrt(2M) = 1.6%; 1.15 is > 9 sigma.
    EXPECT_LT(a.bias, 1.15 * a.bias_noise_floor) << traits(kind).name;
    EXPECT_LT(b.bias, 1.15 * b.bias_noise_floor) << traits(kind).name;
    // 16x the draws: 1/4 the bias (each estimate within ~3%: 0.25 +- 0.03 is > 5 sigma).
    EXPECT_NEAR(b.bias / a.bias, 0.25, 0.03) << traits(kind).name;
  }
}

// Measured variance against sum p(1-p)/scale^2. For per-element quantizers (all but BHQ) each
// element's error is a two-point variable, so the sampling sd of the measured total is exact:
// Var(S^2) = mu4/K - sigma^4 (K-3)/(K(K-1)), with sigma^2 = p(1-p)/s^2,
// mu4 = p(1-p)(1-3p+3p^2)/s^4. Require |measured - analytic| < 5 sd.
// BHQ rounds T x and returns T^-1 of it: per group and column the error is d = M e, M = T^-1 on
// the group (M_mk = H_mk / s_m), e independent two-point errors of variance sigma_k^2 and fourth
// cumulant kappa_k = mu4_k - 3 sigma_k^4; the measured total there estimates E e^T A e (A = M^T M),
// whose variance is 2 sum_kl A_kl^2 sigma_k^2 sigma_l^2 + sum_k A_kk^2 kappa_k (to first order
// in 1/K, divided by K). Same 5 sd.
double bhq_sd_of_total(const QuantPlan& plan, int K) {
  const QuantizedTensor& q = plan.q;
  const BhqTransform& t = *q.transform;
  const float B = float(q.max_code());
  double var = 0;
  for (int64_t g = 0; g < t.num_groups(); ++g) {
    const int64_t n = t.group_size(g), *mem = t.members.data() + t.offsets[g];
    float vf, vr;
    householder_v(n, vf, vr);
    auto v = [&](int64_t k) { return double(k == 0 ? vf : vr); };
    std::vector<double> A(n * n, 0.0);
    for (int64_t k = 0; k < n; ++k)
      for (int64_t l = 0; l < n; ++l)
        for (int64_t m = 0; m < n; ++m) {
          const double hmk = (m == k) - 2 * v(m) * v(k), hml = (m == l) - 2 * v(m) * v(l);
          const double s = t.row_scale[mem[m]];
          A[k * n + l] += hmk * hml / (s * s);
        }
    std::vector<double> s2(n), kappa(n);
    for (int64_t c = 0; c < q.cols; ++c) {
      for (int64_t k = 0; k < n; ++k) {
        const int64_t r = mem[k], gi = q.group(r, c);
        const double sc = q.scale[gi];
        const float u = std::min(std::max((plan.source.data<float>()[r * q.cols + c] - q.lo[gi]) * q.scale[gi], 0.0f), B);
        const double p = u - std::floor(u);
        s2[k] = p * (1 - p) / (sc * sc);
        kappa[k] = p * (1 - p) * (1 - 3 * p + 3 * p * p) / (sc * sc * sc * sc) - 3 * s2[k] * s2[k];
      }
      for (int64_t k = 0; k < n; ++k) {
        var += A[k * n + k] * A[k * n + k] * kappa[k];
        for (int64_t l = 0; l < n; ++l) var += 2 * A[k * n + l] * A[k * n + l] * s2[k] * s2[l];
      }
    }
  }
  return std::sqrt(var / K);
}

TEST(QuantStats, MeasuredVarianceMatchesAnalytic) {
  const int K = 200;
  Tensor x = synthetic_matrix(SynthKind::heavy_tailed, 64, 256, 5);
  for (QuantizerKind kind : kStochastic)
    for (int bits : {2, 4, 8}) {
      QuantizerSpec spec{kind, bits};
      QuantStats s = quantizer_stats(x, spec, K, 31);
      QuantPlan plan = quant_plan(x, spec);
      if (kind == QuantizerKind::bhq) {
        const double sd = bhq_sd_of_total(plan, K);
        EXPECT_LT(std::fabs(s.measured_variance - s.analytic_variance), 5 * sd)
            << "bhq bits " << bits << " measured " << s.measured_variance << " analytic " << s.analytic_variance
            << " sd " << sd;
        EXPECT_LT(sd, 0.01 * s.analytic_variance) << "bhq bits " << bits << ": the check would be loose";
        EXPECT_LE(s.analytic_variance, s.bound) << "bhq";
        std::printf("BHQ %d bits: measured / analytic %.5f, sd %.5f\n", bits, s.measured_variance / s.analytic_variance, sd / s.analytic_variance);
        continue;
      }
      double var_of_total = 0;
      for (int64_t r = 0; r < plan.q.rows; ++r)
        for (int64_t c = 0; c < plan.q.cols; ++c) {
          const int64_t g = plan.q.group(r, c);
          const double sc = plan.q.scale[g];
          const float v = std::min(std::max((plan.source.data<float>()[r * plan.q.cols + c] - plan.q.lo[g]) * plan.q.scale[g], 0.0f),
                                   float(plan.q.max_code()));
          const double p = v - std::floor(v), s2 = p * (1 - p) / (sc * sc);
          const double mu4 = p * (1 - p) * (1 - 3 * p + 3 * p * p) / (sc * sc * sc * sc);
          var_of_total += mu4 / K - s2 * s2 * (K - 3) / (double(K) * (K - 1));
        }
      const double sd = std::sqrt(var_of_total);
      EXPECT_LT(std::fabs(s.measured_variance - s.analytic_variance), 5 * sd)
          << traits(kind).name << " bits " << bits << " measured " << s.measured_variance << " analytic "
          << s.analytic_variance << " sd " << sd;
      EXPECT_LE(s.analytic_variance, s.bound) << traits(kind).name;
    }
}

// One more bit divides the PSQ variance by ((2^(b+1)-1)/(2^b-1))^2 on random data (uniform
// fractions): required within 1%, 5 sd. The ratio's sd, ~0.18%: each bit width's sum of p(1-p)
// over the N = 131072 elements deviates from N/6 by sd sqrt(N/180) (0.12% of it; the two widths'
// fractions nearly independent), and K = 50 draws measure it within sqrt(N/1500) (0.04%).
TEST(QuantStats, PsqPerBitRatio) {
  Tensor x = synthetic_matrix(SynthKind::uniform, 128, 1024, 6);
  double prev = quantizer_stats(x, {QuantizerKind::psq, 2}, 50, 1).measured_variance;
  for (int b = 2; b < 8; ++b) {
    double next = quantizer_stats(x, {QuantizerKind::psq, b + 1}, 50, 1).measured_variance;
    const double want = std::pow(double((1 << (b + 1)) - 1) / ((1 << b) - 1), 2);
    EXPECT_NEAR(prev / next / want, 1.0, 0.01) << b << " -> " << b + 1 << " bits: ratio " << prev / next << " want " << want;
    prev = next;
  }
}

// Heavy-tailed rows (scales exp(2 N(0,1)), 128 x 1024): BHQ < PSQ < PTQ with PSQ/BHQ >= 5.
// Homogeneous (Gaussian) rows: BHQ within 10% of PSQ. Exact analytic variances (no sampling
// noise) plus a measured cross-check at 4 bits.
TEST(QuantStats, VarianceOrderingOnHeavyTailedRows) {
  for (uint64_t seed : {0, 1, 2}) {
    Tensor heavy = synthetic_matrix(SynthKind::heavy_tailed, 128, 1024, seed);
    Tensor homo = synthetic_matrix(SynthKind::gaussian, 128, 1024, seed);
    for (int bits = 2; bits <= 8; ++bits) {
      const double ptq = analytic_variance(heavy, {QuantizerKind::ptq, bits}).variance;
      const double psq = analytic_variance(heavy, {QuantizerKind::psq, bits}).variance;
      const double bhq = analytic_variance(heavy, {QuantizerKind::bhq, bits}).variance;
      EXPECT_LT(psq, ptq) << "seed " << seed << " bits " << bits;
      EXPECT_LT(bhq, psq) << "seed " << seed << " bits " << bits;
      EXPECT_GE(psq / bhq, 5.0) << "seed " << seed << " bits " << bits;
      const double psq_h = analytic_variance(homo, {QuantizerKind::psq, bits}).variance;
      const double bhq_h = analytic_variance(homo, {QuantizerKind::bhq, bits}).variance;
      EXPECT_NEAR(bhq_h / psq_h, 1.0, 0.10) << "homogeneous rows, seed " << seed << " bits " << bits;
    }
    const double m_psq = quantizer_stats(heavy, {QuantizerKind::psq, 4}, 20, 3).measured_variance;
    const double m_bhq = quantizer_stats(heavy, {QuantizerKind::bhq, 4}, 20, 3).measured_variance;
    EXPECT_GE(m_psq / m_bhq, 5.0);
  }
}

// SPEC section 3 bounds: PSQ never above PTQ, and the bounds hold for the analytic variance.
TEST(QuantStats, BoundsHoldAndPsqBoundBelowPtq) {
  for (SynthKind kind : {SynthKind::heavy_tailed, SynthKind::gaussian, SynthKind::uniform}) {
    Tensor x = synthetic_matrix(kind, 64, 128, 8);
    for (int bits : {2, 5, 8}) {
      AnalyticVariance ptq = analytic_variance(x, {QuantizerKind::ptq, bits});
      AnalyticVariance psq = analytic_variance(x, {QuantizerKind::psq, bits});
      EXPECT_LE(psq.bound, ptq.bound * (1 + 1e-9));
      for (QuantizerKind k : kStochastic) {
        AnalyticVariance a = analytic_variance(x, {k, bits});
        EXPECT_LE(a.variance, a.bound) << traits(k).name;
      }
      // PTQ bound in closed form: N D R^2 / (4 B^2), R = max - min (+2e-8 of the grid).
      const float* p = x.data<float>();
      const auto [mn, mx] = std::minmax_element(p, p + x.numel());
      const double R = double(*mx) - double(*mn) + 2e-8, B = (1 << bits) - 1;
      EXPECT_NEAR(ptq.bound / (x.numel() * R * R / (4 * B * B)), 1.0, 1e-5);
    }
  }
}
