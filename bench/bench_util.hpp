// Helpers shared by the micro-benchmarks in bench/: timing by median and fastest of repeated
// runs, and fixed normal test data.
#pragma once

#include "fqt/rng.hpp"
#include "fqt/tensor.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <cstdlib>
#include <vector>

namespace fqt::bench {

struct Times {
  double median, best;  // ms
};

// One warm-up call (page faults, buffers), then reps timed calls.
inline Times time_ms(int reps, const std::function<void()>& f) {
  f();
  std::vector<double> t;
  // FQT_BENCH_COLD=1: 64 MB written before each timed call, so that its data come from memory as
  // in a training step (where the layers in between evict them), not from the last call's cache.
  static std::vector<char> evict(std::getenv("FQT_BENCH_COLD") ? (64 << 20) : 0);
  for (int r = 0; r < reps; ++r) {
    for (size_t i = 0; i < evict.size(); i += 64) evict[i]++;
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t[0]};
}

// N(0, s^2) entries from Philox stream (seed, stream): the same tensor on every run.
inline Tensor randn(const Shape& shape, uint64_t seed, uint64_t stream, float s = 1.0f) {
  Tensor t = Tensor::empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = s * normal_at({seed, stream}, static_cast<uint64_t>(i));
  return t;
}

// A micro-benchmark's main(): the fqt CLI's allocator setting (retain_freed_memory;
// FQT_NO_MALLOPT=1: without), then run(argc, argv); an exception is printed as "name: what" and
// exits 2.
inline int main_guard(const char* name, int argc, char** argv, int (*run)(int, char**)) {
  retain_freed_memory();
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 2;
  }
}

}  // namespace fqt::bench
