// sgemm (OpenBLAS front end) against sgemm_ref (fp64 accumulation) on awkward shapes.
#include "fqt/gemm.hpp"
#include "fqt/rng.hpp"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <vector>

using namespace fqt;

namespace {
std::vector<float> randn(int64_t n, uint64_t stream) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = normal_at({42, stream}, i);
  return v;
}
}  // namespace

TEST(gemm, sgemm_matches_reference_all_transposes) {
  const int64_t shapes[][3] = {{1, 1, 1}, {1, 7, 3}, {13, 1, 5}, {17, 33, 1}, {31, 29, 67}, {65, 130, 3},
                               {3, 257, 100}, {200, 48, 513}, {129, 140, 72},
                               {16, 100, 3000} /* K-split path */, {300, 20, 700} /* M split */};
  for (auto& s : shapes) {
    const int64_t M = s[0], N = s[1], K = s[2];
    for (int t = 0; t < 4; ++t) {
      const bool ta = t & 1, tb = t & 2;
      // Padded leading dimensions exercise the strides.
      const int64_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 1, ldc = N + 2;
      const auto A = randn((ta ? K : M) * lda, 1), B = randn((tb ? N : K) * ldb, 2);
      for (float beta : {0.0f, 0.5f}) {
        auto C = randn(M * ldc, 3), R = C;
        if (beta == 0.0f)  // beta == 0 must not read C
          for (int64_t i = 0; i < M * ldc; i += 7) C[i] = NAN;
        sgemm(ta, tb, M, N, K, 1.5f, A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
        sgemm_ref(ta, tb, M, N, K, 1.5f, A.data(), lda, B.data(), ldb, beta, R.data(), ldc);
        for (int64_t i = 0; i < M; ++i)
          for (int64_t j = 0; j < N; ++j) {
            // fp32 accumulation error bound: K * 2^-24 * sum_k |a b| (+ the beta term), times 2.
            double mag = 0.0;
            for (int64_t k = 0; k < K; ++k)
              mag += std::fabs((ta ? A[k * lda + i] : A[i * lda + k]) * (tb ? B[j * ldb + k] : B[k * ldb + j]));
            const double tol = 2.0 * (K + 2) * std::ldexp(1.0, -24) * (1.5 * mag + std::fabs(R[i * ldc + j])) + 1e-30;
            ASSERT_NEAR(C[i * ldc + j], R[i * ldc + j], tol) << M << "x" << N << "x" << K << " ta=" << ta
                                                             << " tb=" << tb << " at " << i << "," << j;
          }
      }
    }
  }
}

TEST(gemm, sgemm_independent_of_thread_count) {
  const int64_t M = 96, N = 1000, K = 77;
  const auto A = randn(M * K, 4), B = randn(K * N, 5);
  std::vector<float> C1(M * N), C2(M * N), C3(M * N);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  sgemm(false, false, M, N, K, 1.0f, A.data(), K, B.data(), N, 0.0f, C1.data(), N);
  omp_set_num_threads(2);
  sgemm(false, false, M, N, K, 1.0f, A.data(), K, B.data(), N, 0.0f, C2.data(), N);
  omp_set_num_threads(3);
  sgemm(false, false, M, N, K, 1.0f, A.data(), K, B.data(), N, 0.0f, C3.data(), N);
  omp_set_num_threads(saved);
  EXPECT_EQ(C1, C2);
  EXPECT_EQ(C1, C3);
}

TEST(gemm, sgemm_k_split_independent_of_thread_count) {
  // wgrad shape: small output, long reduction -> fixed K slices summed in order.
  const int64_t M = 16, N = 144, K = 5000;
  const auto A = randn(K * M, 6), B = randn(K * N, 7);
  std::vector<float> C1(M * N), C2(M * N);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  sgemm(true, false, M, N, K, 1.0f, A.data(), M, B.data(), N, 0.0f, C1.data(), N);
  omp_set_num_threads(2);
  sgemm(true, false, M, N, K, 1.0f, A.data(), M, B.data(), N, 0.0f, C2.data(), N);
  omp_set_num_threads(saved);
  EXPECT_EQ(C1, C2);
}
