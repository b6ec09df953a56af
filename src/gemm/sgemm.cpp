// fp32 GEMM: OpenBLAS front end and the plain-loop reference.
#include "fqt/gemm.hpp"

#include "fqt/error.hpp"

#include <omp.h>

#include <algorithm>
#include <mutex>

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
#ifdef FQT_HAVE_OPENBLAS
  if (K == 0) {  // BLAS would scale C by beta; do it explicitly (beta == 0 must not read C)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.0f ? 0.0f : beta * C[i * ldc + j];
    return;
  }
  FQT_CHECK(lda >= (trans_a ? M : K) && ldb >= (trans_b ? K : N) && ldc >= N,
            "sgemm: leading dimensions {} {} {} too small for {}x{}x{}", lda, ldb, ldc, M, N, K);
  // One thread pool: OpenBLAS runs single-threaded inside OpenMP threads that each own a block
  // of rows or columns of C (OpenBLAS' own pthreads would spin against OpenMP's on few cores).
  // Splitting M or N never splits the K reduction, so every element of C is computed by the same
  // kernel in the same order on any thread count.
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  auto call = [&](int64_t i0, int64_t m, int64_t j0, int64_t n) {
    const float* a = A + (trans_a ? i0 : i0 * lda);
    const float* b = B + (trans_b ? j0 * ldb : j0);
    cblas_sgemm(CblasRowMajor, ta, tb, static_cast<blasint>(m), static_cast<blasint>(n), static_cast<blasint>(K),
                alpha, a, static_cast<blasint>(lda), b, static_cast<blasint>(ldb), beta, C + i0 * ldc + j0,
                static_cast<blasint>(ldc));
  };
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  const double flops = 2.0 * static_cast<double>(M) * static_cast<double>(N) * static_cast<double>(K);
  if (threads <= 1 || flops < 4e6 || (M < 32 && N < 32)) {
    call(0, M, 0, N);
    return;
  }
  // Split the larger output dimension into blocks that are multiples of 64 (kernel-friendly).
  const bool split_n = N >= M;
  const int64_t D = split_n ? N : M;
  const int64_t chunks = std::min<int64_t>(threads, (D + 63) / 64);
  const int64_t per = ((D + chunks - 1) / chunks + 63) / 64 * 64;
#pragma omp parallel for num_threads(static_cast<int>(chunks)) schedule(static, 1)
  for (int64_t t = 0; t < chunks; ++t) {
    const int64_t lo = t * per, hi = std::min(D, lo + per);
    if (lo >= hi) continue;
    if (split_n) call(0, M, lo, hi - lo);
    else call(lo, hi - lo, 0, N);
  }
#else
  sgemm_ref(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

}  // namespace fqt
