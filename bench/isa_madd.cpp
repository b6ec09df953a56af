// Multiply-add throughput of one core, from registers (no memory traffic): fp32 FMA against the
// two exact integer forms of fqt's AVX2 kernel (src/kernels/cpu/igemm_avx2.cpp):
//   fp32   vfmadd231ps                          8 multiply-adds per instruction
//   wide   vpmaddwd + vpaddd (int16 operands)   16
//   bytes  vpmaddubsw + vpmaddwd(ones) + vpaddd 32 (exact only for <= 7-bit data on a side)
// 12 independent accumulators each (more than latency x throughput), best of 5 runs.
//   build/bench_isa_madd
#include <chrono>
#include <cstdio>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace {
constexpr int kAcc = 12;
constexpr long kIters = 20'000'000;

template <typename F>
double best_seconds(F&& f) {
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = s < best ? s : best;
  }
  return best;
}
}  // namespace

int main() {
  volatile float sink_f = 0;
  volatile int sink_i = 0;
  const double fp32 = best_seconds([&] {
    __m256 acc[kAcc];
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_ps(static_cast<float>(i));
    __m256 x = _mm256_set1_ps(1.0001f), y = _mm256_set1_ps(0.9999f);
    for (long it = 0; it < kIters; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_fmadd_ps(x, y, acc[i]);
      __asm__ volatile("" : "+x"(x));
    }
    float s = 0;
    for (int i = 0; i < kAcc; ++i) s += _mm256_cvtss_f32(acc[i]);
    sink_f = s;
  });
  const double wide = best_seconds([&] {
    __m256i acc[kAcc];
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_epi32(i);
    __m256i a = _mm256_set1_epi16(3), b = _mm256_set1_epi16(5);
    for (long it = 0; it < kIters; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(a, b));
      __asm__ volatile("" : "+x"(a));
    }
    int s = 0;
    for (int i = 0; i < kAcc; ++i) s += _mm256_cvtsi256_si32(acc[i]);
    sink_i = s;
  });
  const double bytes = best_seconds([&] {
    __m256i acc[kAcc];
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_epi32(i);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(5);
    for (long it = 0; it < kIters; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
      __asm__ volatile("" : "+x"(a));
    }
    int s = 0;
    for (int i = 0; i < kAcc; ++i) s += _mm256_cvtsi256_si32(acc[i]);
    sink_i = s;
  });
  const double n = static_cast<double>(kIters) * kAcc;
  const double g_fp32 = n * 8 / fp32 / 1e9, g_wide = n * 16 / wide / 1e9, g_bytes = n * 32 / bytes / 1e9;
  std::printf("multiply-adds per second, one core, from registers:\n");
  std::printf("  fp32  vfmadd231ps                 %7.1f G   1.00x\n", g_fp32);
  std::printf("  wide  vpmaddwd + vpaddd           %7.1f G   %.2fx\n", g_wide, g_wide / g_fp32);
  std::printf("  bytes vpmaddubsw + vpmaddwd + add %7.1f G   %.2fx\n", g_bytes, g_bytes / g_fp32);
  return 0;
}
#else
int main() {
  std::printf("bench_isa_madd: built without AVX2/FMA; nothing to measure\n");
  return 0;
}
#endif
