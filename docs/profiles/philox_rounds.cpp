// Session 27's timing of Philox4x32-10 on AVX-512 (docs/profiles/README.md, session 27): four
// sets of 16 blocks a step, as fill_uniforms runs them, through the general rounds (counters()
// then the ten rounds: what fill_uniforms did before e37eb79) and through philox512::blocks
// (rounds 1 and 2's lane-uniform multiplies as scalars), each with the rounds looped and unrolled;
// the words summed as uniforms (no stores), 16384 blocks a call (L1-resident state), median and
// fastest of 301 calls, ns per uniform. Both forms run side by side in one process.
//   g++ -O3 -march=native -std=c++20 -I include -I src docs/profiles/philox_rounds.cpp -o /tmp/philox_rounds
//   /tmp/philox_rounds
#include "kernels/cpu/philox_avx512.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#if defined(__AVX512F__)
using namespace fqt;
using namespace fqt::kernels::philox512;

template <bool kBlocks, bool kUnroll>
__attribute__((noinline)) __m512 run(RngKey key, uint64_t base, int64_t sets) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < sets; j += 4) {
    __m512i c0[4], c1[4], c2[4], c3[4];
    if constexpr (kBlocks) {
      blocks<4, kUnroll>(key, base + 16 * j, 16, lane, 15, c0, c1, c2, c3);
    } else {
      for (int q = 0; q < 4; ++q) counters(key, base + 16 * (j + q), lane, c0[q], c1[q], c2[q], c3[q]);
      rounds<4, kUnroll>(key, c0, c1, c2, c3);
    }
    for (int q = 0; q < 4; ++q)
      acc = _mm512_add_ps(acc, _mm512_add_ps(_mm512_add_ps(to_uniform(c0[q]), to_uniform(c1[q])),
                                             _mm512_add_ps(to_uniform(c2[q]), to_uniform(c3[q]))));
  }
  return acc;
}

int main() {
  const RngKey key{123, 456};
  constexpr int64_t kSets = 1024;  // 16384 blocks, 65536 uniforms a call
  struct Form {
    const char* name;
    __m512 (*f)(RngKey, uint64_t, int64_t);
  };
  const Form forms[] = {{"general rounds, looped", run<false, false>},
                        {"blocks(), looped", run<true, false>},
                        {"general rounds, unrolled", run<false, true>},
                        {"blocks(), unrolled", run<true, true>}};
  std::vector<std::vector<double>> t(4);
  float sink = 0;
  for (int r = 0; r < 301; ++r)
    for (int f = 0; f < 4; ++f) {  // alternated call by call
      const auto a = std::chrono::steady_clock::now();
      const __m512 v = forms[f].f(key, 1000 + 16 * kSets * r, kSets);
      const auto b = std::chrono::steady_clock::now();
      sink += _mm512_reduce_add_ps(v);
      t[f].push_back(std::chrono::duration<double, std::nano>(b - a).count() / (kSets * 64.0));
    }
  for (int f = 0; f < 4; ++f) {
    std::sort(t[f].begin(), t[f].end());
    std::printf("%-26s %.4f ns a uniform (median), %.4f (fastest)\n", forms[f].name, t[f][t[f].size() / 2], t[f][0]);
  }
  return sink == 0.125f ? 1 : 0;  // (keeps the sums live)
}
#else
int main() {
  std::puts("philox_rounds: needs AVX-512");
  return 0;
}
#endif
