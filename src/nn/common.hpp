// Internal helpers shared by the layers.
#pragma once

#include "fqt/layers.hpp"
#include "fqt/rng.hpp"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

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

// The per-sample loops' split between the threads of a parallel region: thread t owns the
// static chunk [t n / T, (t + 1) n / T) (the samples whose activations it produced in the layer
// before, so they are in its caches) and takes them in order; a thread that has finished its own
// then takes the remaining samples of the others, from the front of what they have left. Each
// index is claimed once, by an atomic counter per chunk. Which thread runs a sample never changes
// a result (samples write their own outputs; per-group sums keep their order), so results do not
// depend on it. Made before the region (for up to T threads), used inside by every thread:
//   WorkSplit split(N);
//   #pragma omp parallel
//   split.run([&](int64_t n) { ... });
// A team smaller than T (an `if` clause that was false) still runs every index.
class WorkSplit {
 public:
  explicit WorkSplit(int64_t n, int threads = omp_get_max_threads())
      : n_(n), t_(std::max(threads, 1)), next_(static_cast<size_t>(t_)) {
    for (int t = 0; t < t_; ++t) next_[t].v.store(t * n_ / t_, std::memory_order_relaxed);
  }
  template <class F>
  void run(F&& f) {
    const int me = omp_get_thread_num() % t_;
    for (int k = 0; k < t_; ++k) {
      const int t = (me + k) % t_;
      const int64_t end = (t + 1) * n_ / t_;
      for (int64_t i; (i = next_[t].v.fetch_add(1, std::memory_order_relaxed)) < end;) f(i);
    }
  }

 private:
  struct alignas(64) Counter {
    std::atomic<int64_t> v{0};
  };
  int64_t n_;
  int t_;
  std::vector<Counter> next_;
};

inline bool quantized_forward(const Recipe& r) { return r.mode != Mode::fp32; }

// Which quantized GEMMs run on integer codes (Recipe::arith == integer). A grid that varies along
// a GEMM's reduction dimension cannot be factored out of the sum; such a GEMM runs the simulated
// path (dequantize + fp32 GEMM) instead, with the same codes.
//   fprop  Y = X W^T   reduces over Din: X and W per tensor or per row.
//   dgrad  dX = G W    reduces over Dout: G per tensor or per row (PSQ, BHQ); W per tensor.
//   wgrad  dW = G^T X  reduces over samples: G per tensor or per column; X per tensor.
inline bool not_column(const QuantizedTensor& q) { return q.granularity() != Granularity::column; }
inline bool int_fprop(const Recipe& r, const QuantizedTensor& xq, const QuantizedTensor& wq) {
  return r.arith == Arith::integer && not_column(xq) && not_column(wq);
}
inline bool int_dgrad(const Recipe& r, const QuantizedTensor& gq, const QuantizedTensor& wq) {
  return r.arith == Arith::integer && not_column(gq) && wq.granularity() == Granularity::tensor;
}
inline bool int_wgrad(const Recipe& r, const QuantizedTensor& gq, const QuantizedTensor& xq) {
  return r.arith == Arith::integer && gq.granularity() != Granularity::row && xq.granularity() == Granularity::tensor;
}

// The code that dequantizes to exactly 0 on a per-tensor grid (q / scale + lo == 0 in fp32, as
// dequantize computes it), or -1 if the grid has none.
inline int exact_zero_code(float scale, float lo, int max_code) {
  const long z = std::lrint(-static_cast<double>(lo) * scale);
  if (z < 0 || z > max_code || static_cast<float>(z) / scale + lo != 0.0f) return -1;
  return static_cast<int>(z);
}

// Convolution geometry of one sample: C,H,W input, k x k kernel; P = Ho*Wo output positions,
// rows() = C*k*k (the im2col row count, the GEMM reduction length of fprop).
struct Geom {
  int64_t C, H, W, k, stride, pad, Ho, Wo;
  int64_t P() const { return Ho * Wo; }
  int64_t rows() const { return C * k * k; }
};

inline Geom geom(const Shape& s, int64_t k, int64_t stride, int64_t pad) {
  FQT_CHECK(s.size() == 4, "conv geometry: want an N,C,H,W shape, got {}", shape_str(s));
  Geom g{s[1], s[2], s[3], k, stride, pad, (s[2] + 2 * pad - k) / stride + 1, (s[3] + 2 * pad - k) / stride + 1};
  FQT_CHECK(g.Ho > 0 && g.Wo > 0, "conv: kernel {} larger than padded input {}x{}", k, g.H, g.W);
  return g;
}

}  // namespace fqt::nn_detail
