// Softmax cross-entropy with label smoothing, fp64 per row.
#include "common.hpp"

#include <cmath>

namespace fqt {
using nn_detail::parallel_worth;

float SoftmaxCrossEntropy::forward(const Tensor& logits, const Tensor& labels, float label_smoothing) {
  FQT_CHECK(logits.dim() == 2 && logits.dtype() == DType::f32, "SoftmaxCrossEntropy: logits {} are not f32 [N, K]",
            shape_str(logits.shape()));
  FQT_CHECK(labels.dtype() == DType::i32 && labels.numel() == logits.size(0),
            "SoftmaxCrossEntropy: labels {} ({}) are not i32 [{}]", shape_str(labels.shape()), dtype_name(labels.dtype()),
            logits.size(0));
  FQT_CHECK(label_smoothing >= 0.0f && label_smoothing < 1.0f, "label smoothing {} not in [0, 1)", label_smoothing);
  const int64_t N = logits.size(0), K = logits.size(1);
  probs_ = Tensor::empty({N, K});
  labels_ = labels;
  ls_ = label_smoothing;
  const float* lp = logits.data<float>();
  const int32_t* yp = labels.data<int32_t>();
  float* pp = probs_.data<float>();
  std::vector<double> row_loss(N);
  std::vector<int> row_correct(N);
  const double off = label_smoothing / static_cast<double>(K), on = 1.0 - label_smoothing + off;
  for (int64_t i = 0; i < N; ++i)
    FQT_CHECK(yp[i] >= 0 && yp[i] < K, "SoftmaxCrossEntropy: label {} of sample {} not in [0, {})", yp[i], i, K);
#pragma omp parallel for schedule(static) if (parallel_worth(logits.numel()))
  for (int64_t i = 0; i < N; ++i) {
    const float* l = lp + i * K;
    double mx = l[0];
    int64_t arg = 0;
    for (int64_t k = 1; k < K; ++k)
      if (l[k] > mx) mx = l[k], arg = k;
    double z = 0.0;
    for (int64_t k = 0; k < K; ++k) z += std::exp(l[k] - mx);
    const double logz = std::log(z) + mx;
    double loss = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double logp = l[k] - logz;
      pp[i * K + k] = static_cast<float>(std::exp(logp));
      loss -= (k == yp[i] ? on : off) * logp;
    }
    row_loss[i] = loss;
    row_correct[i] = arg == yp[i];
  }
  double total = 0.0;
  correct_ = 0;
  for (int64_t i = 0; i < N; ++i) total += row_loss[i], correct_ += row_correct[i];
  const float mean = static_cast<float>(total / static_cast<double>(N));
  if (!std::isfinite(mean)) throw NonFiniteError(fmt::format("SoftmaxCrossEntropy: loss is {}", mean));
  return mean;
}

Tensor SoftmaxCrossEntropy::backward() const {
  FQT_CHECK(probs_.defined(), "SoftmaxCrossEntropy::backward before forward");
  const int64_t N = probs_.size(0), K = probs_.size(1);
  Tensor d = Tensor::empty({N, K});
  const float* pp = probs_.data<float>();
  const int32_t* yp = labels_.data<int32_t>();
  float* dp = d.data<float>();
  const double off = ls_ / static_cast<double>(K), on = 1.0 - ls_ + off;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < K; ++k)
      dp[i * K + k] = static_cast<float>((pp[i * K + k] - (k == yp[i] ? on : off)) / static_cast<double>(N));
  return d;
}

}  // namespace fqt
