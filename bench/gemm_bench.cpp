// fqt_bench_gemm: int8 (u8 x s8 -> s32, raw and qgemm with corrections) against fp32
// cblas_sgemm on the same shapes, in one run. Every repetition times int8 and fp32 back to back
// (interleaved, so that load from other users of the machine hits both alike); medians.
// On a shared machine compare --threads 1 too: OpenBLAS (pthreads) and OpenMP each keep their
// threads spinning after a call, and with other users' jobs the 2-thread figures swing widely.
//   fqt_bench_gemm [--json] [--threads N] [--reps R] [--pause-ms P] [--quick] [--shape MxNxK ...]
// GOPS = 2 M N K / t. Layout for all: C = A B^T with A [M, K], B [N, K] row-major.
#include "fqt/igemm.hpp"
#include "fqt/quant.hpp"

#ifdef FQT_HAVE_OPENBLAS
#include <cblas.h>
#endif
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace fqt;

namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct ShapeM {
  int64_t m, n, k;
  const char* what;
};

}  // namespace

int main(int argc, char** argv) {
  bool json = false, quick = false;
  int threads = 2, reps = 25, pause_ms = 300;
  std::vector<ShapeM> shapes;
  std::vector<std::string> owned;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json") json = true;
    else if (a == "--quick") quick = true;
    else if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--pause-ms" && i + 1 < argc) pause_ms = std::atoi(argv[++i]);
    else if (a == "--shape" && i + 1 < argc) {
      long long m, n, k;
      if (std::sscanf(argv[++i], "%lldx%lldx%lld", &m, &n, &k) != 3) {
        std::fprintf(stderr, "bad --shape %s (want MxNxK)\n", argv[i]);
        return 2;
      }
      shapes.push_back({m, n, k, "custom"});
    } else {
      std::fprintf(stderr, "usage: %s [--json] [--threads N] [--reps R] [--pause-ms P] [--quick] [--shape MxNxK ...]\n", argv[0]);
      return 2;
    }
  }
  if (shapes.empty()) {
    shapes = {{1024, 1024, 1024, "square"},
              {128 * 28 * 28, 16, 144, "conv fprop im2col 3x3x16->16, 28x28, batch 128"},
              {16, 144, 128 * 28 * 28, "conv wgrad dW = G^T X: reduction over batch x spatial"},
              {128 * 28 * 28, 144, 16, "wgrad-like as given: M=100352 N=144 K=16"},
              {128 * 7 * 7, 64, 576, "conv fprop im2col 3x3x64->64, 7x7, batch 128"}};
    if (quick) shapes.resize(1);
  }
  omp_set_num_threads(threads);
#ifdef FQT_HAVE_OPENBLAS
  openblas_set_num_threads(threads);
#endif
  std::vector<IgemmBackend> backends;
  for (auto b : {IgemmBackend::vnni, IgemmBackend::onednn, IgemmBackend::portable})
    if (igemm_backend_available(b)) backends.push_back(b);
  const IgemmBackend deflt = igemm_resolved_backend();

  if (!json) {
    std::printf("threads %d, reps %d (medians), default int8 backend %s\n", threads, reps,
                igemm_backend_name(deflt));
    std::printf("%8s %6s %8s | %-30s | %9s %9s | %9s | %9s %6s\n", "M", "N", "K", "int8 raw GOPS per backend",
                "int8 ms", "int8 GOPS", "qgemm GOPS", "fp32 GFLOP", "ratio");
  }
  std::mt19937 gen(1234);
  bool first_json = true;
  if (json) std::printf("[\n");
  for (const auto& s : shapes) {
    const int64_t M = s.m, N = s.n, K = s.k;
    std::vector<uint8_t> A(M * K);
    std::vector<int8_t> B(N * K);
    std::vector<int32_t> C(M * N);
    std::uniform_int_distribution<int> du(0, 255), ds(-128, 127);
    for (auto& v : A) v = static_cast<uint8_t>(du(gen));
    for (auto& v : B) v = static_cast<int8_t>(ds(gen));
    std::vector<float> Af(M * K), Bf(N * K), Cf(M * N);
    std::normal_distribution<float> dn;
    for (auto& v : Af) v = dn(gen);
    for (auto& v : Bf) v = dn(gen);
    // Quantized operands for qgemm (fprop-like: activation per tensor, weight per row, 8 bits).
    Tensor xa = Tensor::empty({M, K}), wb = Tensor::empty({N, K});
    std::memcpy(xa.data<float>(), Af.data(), Af.size() * 4);
    std::memcpy(wb.data<float>(), Bf.data(), Bf.size() * 4);
    const QuantizedTensor qa = quantize(xa, {QuantizerKind::affine, 8});
    const QuantizedTensor qb = quantize(wb, {QuantizerKind::symmetric_row, 8});
    Tensor qc;

    std::map<IgemmBackend, std::vector<double>> t_raw;
    std::vector<double> t_q, t_f;
    auto time = [](const std::function<void()>& f) {
      const double t0 = now_ms();
      f();
      return now_ms() - t0;
    };
    const double ops = 2.0 * double(M) * double(N) * double(K);
    // Blocks of repetitions, alternating between the contenders, with a pause after each block:
    // OpenMP (int8) and OpenBLAS (fp32) keep their idle threads spinning for a while after a
    // call, and on 2 cores a spinning pool halves the other's throughput. Alternating blocks
    // still spread slow changes of the machine's load over both sides.
    const int blocks = std::min(reps, 5);
    auto block = [&](std::vector<double>& out, int n, const std::function<void()>& f) {
      f();  // warm-up (first call of a shape also creates the oneDNN primitive)
      for (int i = 0; i < n; ++i) out.push_back(time(f));
      std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
    };
    for (int bl = 0; bl < blocks; ++bl) {
      const int n = reps / blocks + (bl < reps % blocks ? 1 : 0);
      for (auto be : backends) {
        set_igemm_backend(be);
        block(t_raw[be], n, [&] { igemm_u8s8s32(M, N, K, A.data(), K, B.data(), K, C.data(), N); });
      }
      set_igemm_backend(IgemmBackend::automatic);
      block(t_q, n, [&] { qgemm(qa, qb, qc, false); });
#ifdef FQT_HAVE_OPENBLAS
      block(t_f, n, [&] {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, Af.data(), K, Bf.data(), K, 0.0f,
                    Cf.data(), N);
      });
#else
      t_f.push_back(0);
#endif
    }
    const double int8_ms = median(t_raw[deflt]), q_ms = median(t_q), f_ms = median(t_f);
    const double int8_gops = ops / int8_ms * 1e-6, q_gops = ops / q_ms * 1e-6, f_gflops = ops / f_ms * 1e-6;
    const double ratio = int8_gops / f_gflops;
    if (json) {
      std::printf("%s  {\"m\": %lld, \"n\": %lld, \"k\": %lld, \"int8_gops\": %.2f, \"fp32_gflops\": %.2f, "
                  "\"ratio\": %.3f, \"int8_ms\": %.4f, \"fp32_ms\": %.4f, \"qgemm_gops\": %.2f, \"qgemm_ms\": %.4f, "
                  "\"int8_backend\": \"%s\", \"threads\": %d, \"reps\": %d",
                  first_json ? "" : ",\n", (long long)M, (long long)N, (long long)K, int8_gops, f_gflops, ratio,
                  int8_ms, f_ms, q_gops, q_ms, igemm_backend_name(deflt), threads, reps);
      for (auto be : backends)
        std::printf(", \"%s_gops\": %.2f", igemm_backend_name(be), ops / median(t_raw[be]) * 1e-6);
      std::printf("}");
      first_json = false;
    } else {
      std::string per;
      for (auto be : backends) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%s %.0f ", igemm_backend_name(be), ops / median(t_raw[be]) * 1e-6);
        per += buf;
      }
      std::printf("%8lld %6lld %8lld | %-30s | %9.3f %9.1f | %9.1f | %9.1f %6.2f\n", (long long)M, (long long)N,
                  (long long)K, per.c_str(), int8_ms, int8_gops, q_gops, f_gflops, ratio);
    }
    std::fflush(stdout);
  }
  if (json) std::printf("\n]\n");
  return 0;
}
