#include "fqt/stats.hpp"

#include "quant/grid.hpp"

#include <cmath>

namespace fqt {
using namespace quant_detail;

AnalyticVariance analytic_variance(const Tensor& x, QuantizerSpec spec) {
  QuantPlan plan = quant_plan(x, spec);
  const QuantizedTensor& q = plan.q;
  const bool stochastic = traits(spec.kind).rounding == Rounding::stochastic;
  std::vector<double> weight(q.rows, 1.0);
  if (q.transform) weight = q.transform->inverse_column_norms2();
  const float* src = plan.source.data<float>();
  const float B = static_cast<float>(q.max_code());
  AnalyticVariance out;
  if (!stochastic) return out;
  for (int64_t r = 0; r < q.rows; ++r) {
    double var = 0, bound = 0;
    for (int64_t c = 0; c < q.cols; ++c) {
      const int64_t gi = q.group(r, c);
      const float v = std::min(std::max(grid_pos(src[r * q.cols + c], q.lo[gi], q.scale[gi]), 0.0f), B);
      const double p = v - std::floor(v);
      const double inv2 = 1.0 / (static_cast<double>(q.scale[gi]) * q.scale[gi]);
      var += p * (1 - p) * inv2;
      bound += 0.25 * inv2;
    }
    out.variance += weight[r] * var;
    out.bound += weight[r] * bound;
  }
  return out;
}

QuantStats quantizer_stats(const Tensor& x_in, QuantizerSpec spec, int samples, uint64_t seed) {
  FQT_INPUT_CHECK(samples >= 2, "need at least 2 samples to measure a variance (got {})", samples);
  Tensor x = as_matrix(x_in);
  const int64_t n = x.numel();
  const float* xp = x.data<float>();
  std::vector<double> sum(n, 0.0), sumsq(n, 0.0);
  for (int k = 0; k < samples; ++k) {
    Tensor d = dequantize(quantize(x, spec, RngKey{seed, static_cast<uint64_t>(k)}));
    const float* dp = d.data<float>();
#pragma omp parallel for schedule(static) if (n > kParallelMin)
    for (int64_t i = 0; i < n; ++i) {
      const double e = static_cast<double>(dp[i]) - xp[i];  // error, centred on the input
      sum[i] += e;
      sumsq[i] += e * e;
    }
  }
  QuantStats s;
  s.quantizer = traits(spec.kind).name;
  s.bits = spec.bits;
  s.samples = samples;
  s.rows = x.size(0);
  s.cols = x.size(1);
  double var = 0, bias2 = 0, norm2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double mean = sum[i] / samples;
    var += std::max(0.0, (sumsq[i] - sum[i] * mean) / (samples - 1));
    bias2 += mean * mean;
    norm2 += static_cast<double>(xp[i]) * xp[i];
  }
  const double denom = norm2 > 0 ? std::sqrt(norm2) : 1.0;
  s.measured_variance = var;
  s.bias = std::sqrt(bias2) / denom;
  s.bias_noise_floor = std::sqrt(var / samples) / denom;
  s.input_norm2 = norm2;
  AnalyticVariance a = analytic_variance(x, spec);
  s.analytic_variance = a.variance;
  s.bound = a.bound;
  return s;
}

}  // namespace fqt
