// fp32 GEMM: OpenBLAS front end and the plain-loop reference.
#include "fqt/gemm.hpp"

#include "fqt/error.hpp"

#include <omp.h>

#include <atomic>

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
  // Follow the OpenMP thread setting (fqt::set_num_threads / omp_set_num_threads).
  static std::atomic<int> blas_threads{-1};
  const int want = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (blas_threads.load(std::memory_order_relaxed) != want) {
    openblas_set_num_threads(want);
    blas_threads.store(want, std::memory_order_relaxed);
  }
  FQT_CHECK(lda >= (trans_a ? M : K) && ldb >= (trans_b ? K : N) && ldc >= N,
            "sgemm: leading dimensions {} {} {} too small for {}x{}x{}", lda, ldb, ldc, M, N, K);
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
              static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C, static_cast<blasint>(ldc));
#else
  sgemm_ref(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

}  // namespace fqt
