// fqt/stats.hpp — statistics of a quantizer on a given matrix (SPEC section 3).
//
// For X and a stochastic quantizer Q, over K independent draws (streams 0..K-1 of one seed):
//   measured_variance  = sum over elements of the unbiased sample variance of Q(X)   [= E||Q(X)-X||^2]
//   analytic_variance  = sum over elements of p(1-p)/scale^2 (p = frac of the grid position),
//                        mapped through T^-1 for BHQ: sum_r ||T^-1 e_r||^2 sum_c p(1-p)/scale_r^2
//   bound              = sum over elements of 1/(4 scale^2) (same mapping for BHQ): the bounds
//                        N D R^2/(4B^2) (PTQ), D/(4B^2) sum_i R_i^2 (PSQ), ... with R the grid range
//   bias               = ||mean of the K draws - X||_F / ||X||_F
//   bias_noise_floor   = sqrt(measured_variance / K) / ||X||_F: what `bias` is for an unbiased
//                        quantizer (E||mean - X||^2 = Var / K)
// For a deterministic quantizer the variance is 0 and the bias is its rounding error.
#pragma once

#include "fqt/quant.hpp"

#include <string>

namespace fqt {

struct QuantStats {
  std::string quantizer;
  int bits = 0;
  int samples = 0;
  int64_t rows = 0, cols = 0;
  double measured_variance = 0;
  double analytic_variance = 0;
  double bound = 0;
  double bias = 0;
  double bias_noise_floor = 0;
  double input_norm2 = 0;  // ||X||_F^2, for relative variances
};

// Exact analytic variance and bound of quantizing X with `spec` (no random draws).
struct AnalyticVariance {
  double variance = 0;
  double bound = 0;
};
AnalyticVariance analytic_variance(const Tensor& x, QuantizerSpec spec);

QuantStats quantizer_stats(const Tensor& x, QuantizerSpec spec, int samples, uint64_t seed);

}  // namespace fqt

namespace fqt {

// Synthetic gradient-like matrices for tests, benchmarks and `fqt synth`:
//   gaussian      G_ij ~ N(0, 1)
//   uniform       G_ij ~ U(-1, 1)
//   heavy-tailed  G_ij = exp(2 z_i) N(0, 1), z_i ~ N(0, 1): row scales spread over orders of
//                 magnitude, like per-sample gradients (SPEC section 3)
enum class SynthKind { gaussian, uniform, heavy_tailed };
SynthKind parse_synth_kind(const std::string& name);
Tensor synthetic_matrix(SynthKind kind, int64_t rows, int64_t cols, uint64_t seed);

}  // namespace fqt
