// Session 24's check that the core which wrote data last does not change what writing or reading
// it costs here (docs/profiles/README.md, "Why batch norm's backward was slower after a bhq/s
// convolution"). Two threads; each first writes 1 MB (its own half, or the other thread's), then
// every thread writes (or reads) its own half; thread 0's time, median of 41.
//   g++ -O2 -march=native -fopenmp docs/profiles/cross_core_write.cpp -o /tmp/cross_core_write
//   OMP_WAIT_POLICY=passive /tmp/cross_core_write
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

int main() {
  const size_t n = size_t{1} << 18;  // floats per half: 1 MB
  std::vector<float> a(2 * n), b(2 * n, 1.0f);
  for (int mode = 0; mode < 4; ++mode) {
    std::vector<double> ts;
    for (int r = 0; r < 41; ++r) {
      double t = 0;
#pragma omp parallel num_threads(2)
      {
        const int me = omp_get_thread_num();
        const int owner = (mode & 1) ? 1 - me : me;  // whose half this thread writes first
        float* h = a.data() + owner * n;
        for (size_t i = 0; i < n; ++i) h[i] = static_cast<float>(i + r);
#pragma omp barrier
        float* mine = a.data() + me * n;
        const auto s = std::chrono::steady_clock::now();
        if (mode < 2) {
          for (size_t i = 0; i < n; ++i) mine[i] = b[i] * 2.0f;
        } else {
          float acc = 0;
          for (size_t i = 0; i < n; ++i) acc += mine[i];
          b[me] += acc * 1e-30f;
        }
        const auto e = std::chrono::steady_clock::now();
        if (me == 0) t = std::chrono::duration<double, std::micro>(e - s).count();
      }
      ts.push_back(t);
    }
    std::sort(ts.begin(), ts.end());
    std::printf("%s, %s: %.1f us\n", mode < 2 ? "write" : "read", (mode & 1) ? "the other core wrote it" : "this core wrote it",
                ts[ts.size() / 2]);
  }
}
