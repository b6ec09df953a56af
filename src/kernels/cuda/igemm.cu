// Integer GEMM on the GPU: cuBLASLt int8 x int8 -> int32 on the tensor cores (fqt/cuda.hpp).
//
// Row-major C [M, N] = A [M, K] B_t [N, K]^T, read column-major, is C^T = B_t A^T: cuBLASLt's
// "TN" product with its A = our B_t (stored K x N column-major, transposed), its B = our A
// (stored K x M column-major, not transposed), m = N, n = M, k = K. That is the one form
// cuBLASLt's int8 kernels take, with m, k and the leading dimensions multiples of 4; operands
// that do not fit are copied into zero-padded scratch first. Exactness: int32 compute, int32
// alpha = 1 / beta = 0, and K chunks within the int32 bound (igemm_chunk_k) summed in int64.
#include "fqt/cuda.hpp"

#include <cublasLt.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <tuple>

namespace fqt::cuda {
namespace {

#define LT_CHECK(expr)                                                                                   \
  do {                                                                                                   \
    const cublasStatus_t fqt_lt_st_ = (expr);                                                            \
    if (fqt_lt_st_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                                                \
      throw Error(fmt::format("cuBLASLt error {} ({}): [{}] at {}:{}", static_cast<int>(fqt_lt_st_),     \
                              cublasLtGetStatusString(fqt_lt_st_), #expr, __FILE__, __LINE__));          \
  } while (0)

constexpr size_t kLtWorkspace = size_t(32) << 20;
constexpr uint32_t kAlign = 16;  // pointer alignment the plans are made for (scratch is 256-aligned)

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
bool aligned(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

// One matmul shape: descriptors and the algorithm cuBLASLt's heuristic chose.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

// Per host thread: the handle, its workspace, the plans and the operand scratch.
struct Lt {
  cublasLtHandle_t handle = nullptr;
  DeviceBuffer workspace, a_pad, b_pad, c32;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>, Plan> plans;
  ~Lt() {  // at thread or process exit; errors (a context already gone) cannot be reported usefully
    for (auto& [key, p] : plans) {
      cublasLtMatrixLayoutDestroy(p.a);
      cublasLtMatrixLayoutDestroy(p.b);
      cublasLtMatrixLayoutDestroy(p.c);
      cublasLtMatmulDescDestroy(p.op);
    }
    if (handle) cublasLtDestroy(handle);
  }
};
Lt& lt() {
  thread_local Lt s;
  if (!s.handle) {
    LT_CHECK(cublasLtCreate(&s.handle));
    s.workspace.reserve(kLtWorkspace);
  }
  return s;
}

// cuBLASLt plan for C32 [M rows of ldc] = A [M, k] (lda) B [n_pad, k] (ldb)^T; n_pad, k, lda,
// ldb multiples of 4 (callers guarantee), ldc a multiple of 4.
const Plan& plan(Lt& s, int64_t M, int64_t n_pad, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  const auto key = std::make_tuple(M, n_pad, k, lda, ldb, ldc);
  if (auto it = s.plans.find(key); it != s.plans.end()) return it->second;
  Plan p;
  cublasLtMatmulPreference_t pref = nullptr;
  auto release = [&] {  // on every exit but success: nothing made here outlives a failure
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (p.a) cublasLtMatrixLayoutDestroy(p.a);
    if (p.b) cublasLtMatrixLayoutDestroy(p.b);
    if (p.c) cublasLtMatrixLayoutDestroy(p.c);
    if (p.op) cublasLtMatmulDescDestroy(p.op);
  };
  cublasLtMatmulHeuristicResult_t res{};
  int found = 0;
  try {
    LT_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32I, CUDA_R_32I));
    const cublasOperation_t t = CUBLAS_OP_T, n = CUBLAS_OP_N;
    LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t));
    LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &n, sizeof n));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_8I, k, n_pad, ldb));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_8I, k, M, lda));
    LT_CHECK(cublasLtMatrixLayoutCreate(&p.c, CUDA_R_32I, n_pad, M, ldc));
    LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const size_t ws = kLtWorkspace;
    const uint32_t al = kAlign;
    LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES})
      LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &al, sizeof al));
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(s.handle, p.op, p.a, p.b, p.c, p.c, pref, 1, &res, &found);
    if (st != CUBLAS_STATUS_SUCCESS || found == 0)
      throw Error(fmt::format("cuBLASLt has no int8 kernel for M={} N={} K={} (lda {}, ldb {}, ldc {}): {}", M,
                              n_pad, k, lda, ldb, ldc, cublasLtGetStatusString(st)));
  } catch (...) {
    release();
    throw;
  }
  cublasLtMatmulPreferenceDestroy(pref);
  p.algo = res.algo;
  return s.plans.emplace(key, p).first->second;
}

void matmul_tn(Lt& s, int64_t M, int64_t n_pad, int64_t k, const int8_t* A, int64_t lda, const int8_t* B,
               int64_t ldb, int32_t* C, int64_t ldc, cudaStream_t stream) {
  const Plan& p = plan(s, M, n_pad, k, lda, ldb, ldc);
  const int32_t alpha = 1, beta = 0;
  LT_CHECK(cublasLtMatmul(s.handle, p.op, &alpha, B, p.a, A, p.b, &beta, C, p.c, C, p.c, &p.algo,
                          s.workspace.data(), kLtWorkspace, stream));
}

// The operands as cuBLASLt takes them: the caller's when they already fit, else padded copies.
struct Operands {
  const int8_t *A, *B;
  int64_t lda, ldb, n_pad, k_pad;
};
Operands prepare(Lt& s, int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                 cudaStream_t stream) {
  if (N % 4 == 0 && K % 4 == 0 && lda % 16 == 0 && ldb % 16 == 0 && aligned(A, kAlign) && aligned(B, kAlign))
    return {A, B, lda, ldb, N, K};
  const int64_t kp = round_up(K, 16), np = round_up(N, 4);
  s.a_pad.reserve(static_cast<size_t>(M * kp));
  s.b_pad.reserve(static_cast<size_t>(np * kp));
  auto* ap = s.a_pad.as<int8_t>();
  auto* bp = s.b_pad.as<int8_t>();
  CUDA_CHECK(cudaMemsetAsync(ap, 0, static_cast<size_t>(M * kp), stream));
  CUDA_CHECK(cudaMemsetAsync(bp, 0, static_cast<size_t>(np * kp), stream));
  CUDA_CHECK(cudaMemcpy2DAsync(ap, kp, A, lda, K, M, cudaMemcpyDeviceToDevice, stream));
  CUDA_CHECK(cudaMemcpy2DAsync(bp, kp, B, ldb, K, N, cudaMemcpyDeviceToDevice, stream));
  return {ap, bp, kp, kp, np, kp};
}

void check_args(const char* what, int64_t M, int64_t N, int64_t K, const void* A, int64_t lda, const void* B,
                int64_t ldb, const void* C, int64_t ldc, int64_t a_absmax, int64_t b_absmax) {
  FQT_CHECK(M >= 0 && N >= 0 && K >= 0, "{}: negative shape {} x {} x {}", what, M, N, K);
  FQT_CHECK(lda >= std::max<int64_t>(K, 1) && ldb >= std::max<int64_t>(K, 1) && ldc >= std::max<int64_t>(N, 1),
            "{}: leading dimensions lda {} ldb {} ldc {} below K {} / N {}", what, lda, ldb, ldc, K, N);
  FQT_CHECK(a_absmax >= 0 && a_absmax <= 128 && b_absmax >= 0 && b_absmax <= 128,
            "{}: operand bounds {} / {} outside the int8 range", what, a_absmax, b_absmax);
  FQT_CHECK(M * N == 0 || C, "{}: null C", what);
  FQT_CHECK(M * N * K == 0 || (A && B), "{}: null operand", what);
}

__global__ void add_chunk_kernel(const int32_t* __restrict__ src, int64_t lds, int64_t* __restrict__ dst, int64_t ldd,
                                 int64_t M, int64_t N, bool first) {
  const int64_t n = M * N;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / N, c = i - r * N;
    const int64_t v = src[r * lds + c];
    dst[r * ldd + c] = first ? v : dst[r * ldd + c] + v;
  }
}

// The cases with no product to run: nothing (M or N = 0) or C = 0 (K = 0). True when handled.
template <typename T> bool trivial(int64_t M, int64_t N, int64_t K, T* C, int64_t ldc, cudaStream_t stream) {
  if (M == 0 || N == 0) return true;
  if (K != 0) return false;
  CUDA_CHECK(cudaMemset2DAsync(C, ldc * sizeof(T), 0, N * sizeof(T), M, stream));
  return true;
}

}  // namespace

int64_t igemm_chunk_k(int64_t a_absmax, int64_t b_absmax) {
  const int64_t prod = std::max<int64_t>(1, a_absmax * b_absmax);
  return INT32_MAX / prod / 16 * 16;
}

void igemm_s8s8s32(int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda, const int8_t* B_t, int64_t ldb,
                   int32_t* C, int64_t ldc, cudaStream_t stream, int64_t a_absmax, int64_t b_absmax) {
  check_args("cuda::igemm_s8s8s32", M, N, K, A, lda, B_t, ldb, C, ldc, a_absmax, b_absmax);
  FQT_CHECK(K * a_absmax * b_absmax <= INT32_MAX,
            "cuda::igemm_s8s8s32: K = {} products of |A| <= {} and |B| <= {} can overflow int32 (use igemm_s8s8s64)",
            K, a_absmax, b_absmax);
  if (trivial(M, N, K, C, ldc, stream)) return;
  Lt& s = lt();
  const Operands o = prepare(s, M, N, K, A, lda, B_t, ldb, stream);
  if (o.n_pad == N && ldc % 4 == 0 && aligned(C, kAlign)) {
    matmul_tn(s, M, o.n_pad, o.k_pad, o.A, o.lda, o.B, o.ldb, C, ldc, stream);
    return;
  }
  s.c32.reserve(static_cast<size_t>(M * o.n_pad) * sizeof(int32_t));
  matmul_tn(s, M, o.n_pad, o.k_pad, o.A, o.lda, o.B, o.ldb, s.c32.as<int32_t>(), o.n_pad, stream);
  CUDA_CHECK(cudaMemcpy2DAsync(C, ldc * sizeof(int32_t), s.c32.data(), o.n_pad * sizeof(int32_t), N * sizeof(int32_t),
                               M, cudaMemcpyDeviceToDevice, stream));
}

void igemm_s8s8s64(int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda, const int8_t* B_t, int64_t ldb,
                   int64_t* C, int64_t ldc, cudaStream_t stream, int64_t a_absmax, int64_t b_absmax) {
  check_args("cuda::igemm_s8s8s64", M, N, K, A, lda, B_t, ldb, C, ldc, a_absmax, b_absmax);
  if (trivial(M, N, K, C, ldc, stream)) return;
  Lt& s = lt();
  const Operands o = prepare(s, M, N, K, A, lda, B_t, ldb, stream);
  const int64_t chunk = igemm_chunk_k(a_absmax, b_absmax);
  s.c32.reserve(static_cast<size_t>(M * o.n_pad) * sizeof(int32_t));
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((M * N + threads - 1) / threads, 65535));
  for (int64_t k0 = 0; k0 < o.k_pad; k0 += chunk) {
    const int64_t kc = std::min(chunk, o.k_pad - k0);  // a multiple of 4: k_pad is, chunk is of 16
    matmul_tn(s, M, o.n_pad, kc, o.A + k0, o.lda, o.B + k0, o.ldb, s.c32.as<int32_t>(), o.n_pad, stream);
    add_chunk_kernel<<<blocks, threads, 0, stream>>>(s.c32.as<int32_t>(), o.n_pad, C, ldc, M, N, k0 == 0);
    CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace fqt::cuda
