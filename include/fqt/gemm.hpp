// fqt/gemm.hpp — the fp32 GEMM front end.
//
// Row-major BLAS-style interface: C[M,N] = alpha * op(A) op(B) + beta * C with op(A) M x K and
// op(B) K x N; lda/ldb/ldc are row strides of the stored (untransposed) matrices.
//   sgemm     — OpenBLAS cblas_sgemm when built with it (FQT_HAVE_OPENBLAS), else sgemm_ref.
//               Uses num_threads() BLAS threads; results do not depend on the thread count
//               (OpenBLAS partitions M and N across threads, never the K reduction).
//   sgemm_ref — plain loops with fp64 accumulation: the oracle.
// beta == 0 overwrites C without reading it (NaNs in C do not propagate), as in BLAS.
#pragma once

#include <cstdint>

namespace fqt {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

void sgemm_ref(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace fqt
