// fqt/variance.hpp — the statistical framework as a tool (SPEC sections 3 and 5): bias and
// variance of the FQT gradient of a whole network, per layer and in total.
//
// For fixed weights and a fixed set of batches b = 1..B:
//   qat_b            the QAT gradient of batch b (deterministic: forward quantized, backward exact)
//   g_{b,k}          K FQT gradients of batch b (independent random draws of every gradient
//                    quantizer: step = b*K + k of the run seed)
// and for a set of parameters (one layer's weight+bias, or all parameters = "total"):
//   quant_variance    E_b[ sum_i Var_k(g_{b,k,i}) ]  (unbiased sample variance over the K draws,
//                     conditional on the batch, averaged over batches)
//   quant_variance_batches  the B per-batch values v_b = sum_i Var_k(g_{b,k,i}) it averages
//   quant_variance_se standard error of quant_variance: sd_b(v_b) / sqrt(B) (sample sd, B-1),
//                     i.e. the batches are treated as independent draws from the data and the
//                     estimate's uncertainty includes both the K-draw noise and the batch-to-batch
//                     spread; NaN for B = 1 (no estimate)
//   sampling_variance sum_i Var_b(qat_{b,i})         (the QAT / mini-batch variance across batches;
//                     independent of the gradient quantizer by construction)
//   bias              sqrt(E_b ||mean_k g_{b,k} - qat_b||^2) / sqrt(E_b ||qat_b||^2)
//   bias_noise_floor  sqrt(quant_variance / K) / sqrt(E_b ||qat_b||^2): what `bias` is for an
//                     unbiased estimator (E||mean - qat||^2 = Var / K)
//   bound             SPEC section 3 bound on the variance of the layer's quantized dgrad operand,
//                     Var[Q(G_l)] <= sum over elements of 1/(4 scale^2) (mapped through T^-1 for
//                     BHQ): N D R^2/(4B^2) for PTQ, D/(4B^2) sum_i R_i^2 for PSQ, ...; evaluated
//                     on the G_l of every FQT draw and averaged. `wgrad_bound` likewise for the
//                     wgrad operand. These bound the quantizer noise of the GEMM operand, not the
//                     parameter-gradient variance (which also depends on W and X).
//   increment         (the per-layer breakdown of SPEC section 3) the variance that layer l's two
//                     gradient quantizers add to the WHOLE gradient vector. Layers are switched to
//                     exact (QAT) one at a time from input to output: configuration C_l has layers
//                     0..l-1 exact and l..L-1 quantized (C_0 = FQT, C_L = QAT). With common random
//                     numbers (same seed/step), the upper layers' draws coincide in C_l and C_{l+1}
//                     and, every quantizer being unbiased and backward linear in its incoming
//                     gradient, E[f_l | draws above l] = f_{l+1}. Hence
//                         increment_l = E||f_l - f_{l+1}||^2 = Var(f_l) - Var(f_{l+1})
//                     (the law-of-total-variance term of layer l), and sum_l increment_l equals the
//                     total quant_variance in expectation. Costs L-1 extra backward passes per
//                     draw, so it is computed for `breakdown_samples` draws per batch and only for
//                     the configurations that ask for it.
// The forward pass is run once per batch (it is deterministic for fixed weights and batch in
// qat/fqt mode); every draw reruns only the backward pass. Batch-norm running statistics are
// restored afterwards, so the model is left as it was given.
#pragma once

#include "fqt/nn.hpp"
#include "fqt/recipe.hpp"
#include "fqt/tensor.hpp"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace fqt {

struct VarianceBatch {
  Tensor x;  // f32 [N, ...]
  Tensor y;  // i32 [N]
};

// One gradient-quantizer configuration to measure: the model's layers get these gradient
// quantizers in fqt mode (their forward quantizers are left as they are).
// exact_dgrad: the "wgrad-only floor": every layer's dgrad is computed as in QAT (exact, `dgrad`
// ignored; Recipe::exact_dgrad) and only the wgrad quantizers are active. Its records carry
// quantizer "none" and bits 0. Since the wgrad quantizer is the same in every configuration, the
// floor is the part of each configuration's variance that no dgrad quantizer can remove.
// exact_wgrad: every layer's wgrad is computed as in QAT (`wgrad` ignored; Recipe::exact_wgrad),
// so only the dgrad quantizers add variance: the dgrad-induced variance itself, with no floor to
// subtract (and none of the floor's sampling noise). Its records carry wgrad "exact", bits 0.
struct VarianceConfig {
  QuantizerSpec dgrad{QuantizerKind::psq, 8};
  QuantizerSpec wgrad{QuantizerKind::ptq, 8};
  bool breakdown = false;    // also compute the per-layer increments
  bool exact_dgrad = false;  // the wgrad-only floor (see above)
  GradRows dgrad_rows = GradRows::pixel;  // what a row of a convolution's dgrad operand is (recipe.hpp)
  bool exact_wgrad = false;  // only the dgrad quantizers active (see above)
};

struct VarianceOptions {
  int samples = 16;            // K FQT draws per batch (>= 2)
  int breakdown_samples = 1;   // draws per batch used for the per-layer increments (<= samples)
  uint64_t seed = 0;           // gradient-quantizer seed
  float label_smoothing = 0.0f;
  // Called with a line of progress text (may be empty).
  std::function<void(const std::string&)> progress;
};

struct VarianceRecord {
  std::string quantizer;   // dgrad quantizer name; "none" for the wgrad-only floor (exact dgrad)
  int bits = 0;            // dgrad bits; 0 for the wgrad-only floor
  std::string dgrad_rows = "pixel";  // pixel or sample (Recipe::dgrad_rows)
  std::string wgrad;       // wgrad quantizer name; "exact" with VarianceConfig::exact_wgrad (bits 0)
  int wgrad_bits = 0;
  std::string layer;       // layer name, or "total" (all parameters)
  int layer_index = -1;    // forward order of the quantized layer, -1 for total
  int64_t params = 0;      // number of parameters in the record
  int samples = 0, batches = 0;
  double quant_variance = 0;
  double quant_variance_se = 0;               // sd over batches / sqrt(B); NaN when B = 1
  std::vector<double> quant_variance_batches; // the B per-batch values quant_variance averages
  double sampling_variance = 0;
  double ratio = 0;        // quant_variance / sampling_variance (inf when the latter is 0)
  double bias = 0;
  double bias_noise_floor = 0;
  double bound = 0;        // dgrad operand bound (total: summed over layers)
  double wgrad_bound = 0;  // wgrad operand bound (total: summed over layers)
  double increment = -1;   // per-layer breakdown; -1 = not computed (total: sum of increments)
  double qat_norm2 = 0;    // E_b ||qat_b||^2 over the record's parameters
};

// Measures every configuration on `batches` (at least 2 for a sampling variance; with one batch
// it is reported as 0). `model` must have been built with quantized forward (qat or fqt recipe);
// its layers' recipes are restored on return. Records: per configuration, one per quantized
// layer (forward order) then "total".
std::vector<VarianceRecord> measure_variance(Module& model, const std::vector<VarianceBatch>& batches,
                                             const std::vector<VarianceConfig>& configs,
                                             const VarianceOptions& options);

// The SPEC section 3 bound sum over elements of 1/(4 scale^2) of a quantized tensor, from its
// grids (weighted by ||T^-1 e_r||^2 for BHQ). 0 for deterministic quantizers.
double grid_variance_bound(const QuantizedTensor& q);

// ---- online tracking during training (fqt train --track-variance N) ---------------------------

// Cheap estimate on the current batch, for a model whose forward just ran on (x, y) in training
// mode and whose layers are in fqt mode:
//   quant_variance    mean over `draws` FQT draws (run seed, independent stream) of
//                     ||g_k - qat||^2, with qat the QAT gradient of the batch (the exact mean of
//                     the draws, since the quantizers are unbiased)
//   sampling_variance the batch is split into `splits` equal parts; each part's QAT gradient
//                     (own forward, batch statistics of the part) gives the spread
//                     s^2 = sum ||g_s - mean||^2 / (splits - 1) of a batch of N/splits samples,
//                     and the full batch's sampling variance is estimated as s^2 / splits
// per quantized layer (its weight+bias) and in total. Parameter gradients and batch-norm running
// statistics are restored, so training continues exactly as without tracking; the layers'
// saved forward state is NOT (the caller must not run backward again on the old forward).
struct TrackedVariance {
  std::string layer;  // name or "total"
  double quant_variance = 0;
  double sampling_variance = 0;
  double ratio = 0;
};
std::vector<TrackedVariance> track_variance(Module& model, const Tensor& x, const Tensor& y, const Tensor& dlogits,
                                            const StepContext& ctx, int draws = 2, int splits = 4,
                                            float label_smoothing = 0.0f);

}  // namespace fqt
