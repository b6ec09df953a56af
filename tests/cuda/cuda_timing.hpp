// CUDA-event timing for the CUDA tests' benchmarks (Cuda.Bench, CudaGemm.Bench).
#pragma once

#include "fqt/cuda.hpp"

#include <algorithm>
#include <vector>

namespace fqt::cuda_test {

struct EventTimes {
  float median, min;  // ms
};

// Three warm-up calls of fn, then `runs` calls each timed by a pair of CUDA events on the
// default stream: median and fastest.
template <class F> EventTimes time_events(int runs, F&& fn) {
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) fn();
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int i = 0; i < runs; ++i) {
    CUDA_CHECK(cudaEventRecord(e0));
    fn();
    CUDA_CHECK(cudaEventRecord(e1));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  CUDA_CHECK(cudaEventDestroy(e0));
  CUDA_CHECK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front()};
}

}  // namespace fqt::cuda_test
