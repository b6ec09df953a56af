// fp32 GEMM: OpenBLAS front end and the plain-loop reference.
#include "fqt/gemm.hpp"

#include "fqt/error.hpp"
#include "fqt/profile.hpp"

#include <omp.h>

#include <algorithm>
#include <mutex>
#include <vector>

#ifdef FQT_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace fqt {

void sgemm_ref(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  FQT_CHECK(M >= 0 && N >= 0 && K >= 0, "sgemm_ref: negative size {}x{}x{}", M, N, K);
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        const double a = trans_a ? A[k * lda + i] : A[i * lda + k];
        const double b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        acc += a * b;
      }
      float& c = C[i * ldc + j];
      const double prev = beta == 0.0f ? 0.0 : static_cast<double>(beta) * c;
      c = static_cast<float>(static_cast<double>(alpha) * acc + prev);
    }
  }
}

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  FQT_CHECK(M >= 0 && N >= 0 && K >= 0, "sgemm: negative size {}x{}x{}", M, N, K);
  if (M == 0 || N == 0) return;
  profile::Scope timer(profile::gemm_f32);  // fqt bench step: time in fp32 GEMMs
#ifdef FQT_HAVE_OPENBLAS
  if (K == 0) {  // BLAS would scale C by beta; do it explicitly (beta == 0 must not read C)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  FQT_CHECK(lda >= (trans_a ? M : K) && ldb >= (trans_b ? K : N) && ldc >= N,
            "sgemm: leading dimensions {} {} {} too small for {}x{}x{}", lda, ldb, ldc, M, N, K);
  // One thread pool: OpenBLAS runs single-threaded inside OpenMP threads (its own pthreads
  // would spin against OpenMP's on few cores). The work is cut into blocks that depend only on
  // the shape, never on the thread count, and each block's result does not depend on which
  // thread computes it: so C is bit-identical on any thread count. (Cutting by thread count is
  // not enough: OpenBLAS picks different kernels, with different summation orders, for
  // different sub-shapes.)
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  auto call = [&](int64_t i0, int64_t m, int64_t j0, int64_t n, int64_t k0, int64_t k, float bt, float* c,
                  int64_t ldc_) {
    const float* a = A + (trans_a ? k0 * lda + i0 : i0 * lda + k0);
    const float* b = B + (trans_b ? j0 * ldb + k0 : k0 * ldb + j0);
    cblas_sgemm(CblasRowMajor, ta, tb, static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(k),
                alpha, a, static_cast<blasint>(lda), b, static_cast<blasint>(ldb), bt, c, static_cast<blasint>(ldc_));
  };
  constexpr int64_t kBlocks = 8;
  const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (flops < 4e6) {
    call(0, M, 0, N, 0, K, beta, C + 0, ldc);
    return;
  }
  if (std::max(M, N) >= 256 || K < 1024) {
    // Split the larger output dimension into <= kBlocks blocks (multiples of 16).
    const bool split_n = N >= M;
    const int64_t D = split_n ? N : M;
    const int64_t per = ((D + kBlocks - 1) / kBlocks + 15) / 16 * 16;
    const int64_t blocks = (D + per - 1) / per;
#pragma omp parallel for num_threads(static_cast<int>(std::min<int64_t>(threads, blocks))) schedule(static, 1)
    for (int64_t t = 0; t < blocks; ++t) {
      const int64_t lo = t * per, hi = std::min(D, lo + per);
      if (split_n) call(0, M, lo, hi - lo, 0, K, beta, C + lo, ldc);
      else call(lo, hi - lo, 0, N, 0, K, beta, C + lo * ldc, ldc);
    }
    return;
  }
  // Small output, long reduction (wgrad: K = batch x positions): split K into kBlocks fixed
  // slices, then add the partial products in slice order.
  const int64_t per = ((K + kBlocks - 1) / kBlocks + 63) / 64 * 64;
  const int64_t blocks = (K + per - 1) / per;
  std::vector<float> part(static_cast<size_t>(blocks * M * N));
#pragma omp parallel for num_threads(static_cast<int>(std::min<int64_t>(threads, blocks))) schedule(static, 1)
  for (int64_t t = 0; t < blocks; ++t) {
    const int64_t lo = t * per, hi = std::min(K, lo + per);
    call(0, M, 0, N, lo, hi - lo, 0.0f, part.data() + t * M * N, N);
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float acc = part[i * N + j];
      for (int64_t t = 1; t < blocks; ++t) acc += part[(t * M + i) * N + j];
      float& c = C[i * ldc + j];
      c = beta == 0.0f ? acc : acc + beta * c;
    }
#else
  sgemm_ref(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

}  // namespace fqt
