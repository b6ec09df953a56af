// Internal helpers shared by the layers.
#pragma once

#include "fqt/layers.hpp"
#include "fqt/rng.hpp"

#include <cmath>

namespace fqt::nn_detail {

// Kaiming-uniform (ReLU gain): U(-sqrt(6/fan_in), +sqrt(6/fan_in)), from a per-layer stream.
inline void kaiming_uniform(Tensor& w, int64_t fan_in, uint64_t seed, uint32_t layer_id) {
  const RngKey key{seed, (0x696e6974ull << 32) | layer_id};  // "init" | layer
  const float bound = std::sqrt(6.0f / static_cast<float>(fan_in));
  float* p = w.data<float>();
  for (int64_t i = 0; i < w.numel(); ++i) p[i] = (2.0f * uniform_at(key, static_cast<uint64_t>(i)) - 1.0f) * bound;
}

inline Param make_param(std::string name, Shape shape, bool weight_decay = true) {
  Param p;
  p.name = std::move(name);
  p.value = Tensor::zeros(shape);
  p.grad = Tensor::zeros(shape);
  p.weight_decay = weight_decay;
  return p;
}

// Opening an OpenMP team costs microseconds (and much more when a core is busy elsewhere):
// loops over fewer elements run on the calling thread. Results are the same either way.
inline bool parallel_worth(int64_t elements) { return elements >= (int64_t{1} << 15); }

inline bool quantized_forward(const Recipe& r) { return r.mode != Mode::fp32; }

}  // namespace fqt::nn_detail
