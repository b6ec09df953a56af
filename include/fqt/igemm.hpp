// fqt/igemm.hpp — the integer GEMM front end (SPEC section 4, "Real integer arithmetic").
//
// Two layers:
//
// 1. Raw integer GEMM on codes, "A B^T" layout (the natural layout of Y = X W^T):
//        C[m][n] = sum_k A[m][k] * B_t[n][k],   A: u8 [M, K] (row stride lda),
//                                               B_t: s8 [N, K] (row stride ldb)
//    Backends (all exact, all give identical integers):
//      reference — plain loops, int64 accumulation then checked narrowing (the oracle)
//      portable  — blocked C++ loops (int32 per chunk, OpenMP), no intrinsics
//      vnni      — own AVX-512 VNNI kernel (vpdpbusd), packed panels, OpenMP
//      avx2      — own AVX2 kernel for CPUs without VNNI: vpmaddwd on operands widened to
//                  int16 (exact for any codes), or vpmaddubsw when the data has <= 7 bits on
//                  a side (checked per call); about fp32 speed for 8-bit codes (see the source)
//      onednn    — oneDNN int8 matmul, primitives created once per shape and cached
//    `automatic` (the default) resolves to onednn, else vnni, else avx2, else portable: oneDNN measured
//    faster at 1024^3 and on most training shapes (bench/gemm_bench.cpp, Zen 4, 1 thread:
//    ~400 vs ~370 GOPS at 1024^3); the own kernel is on par or ahead only for N <= 16.
//    The onednn backend is available only on CPUs with VNNI: elsewhere its int8 path saturates
//    s16 intermediates (vpmaddubsw; seen on a Zen 3 VM, where the bit-exact test failed). Its
//    primitives are cached per shape for the life of the process (training uses a fixed set of
//    shapes). Products under 2^20 multiply-adds go to the own kernel on the calling thread when
//    automatic.
//
//    No silent overflow: an int32 accumulator holds at most K * a_max * b_absmax, so the
//    reduction is split into chunks of at most igemm_max_k(a_max, b_absmax) terms (65793 for
//    full-range u8 x s8), each computed in int32 and summed in int64. The int32-output entry
//    points narrow with a check and throw fqt::Error when a result does not fit.
//
// 2. Quantized GEMMs with the scale/offset corrections applied afterwards. For groups g(m) on
//    A's rows and h(n) on B's rows, value = q / s + lo, the product expands exactly to
//        C[m][n] = S[m][n] / (sa sb) + (lb / sa) ra[m] + (la / sb) rb[n] + K la lb
//    with S = sum_k qa qb (integer GEMM), ra/rb = code row sums: the integer GEMM plus rank-1
//    corrections, evaluated in double and rounded once to fp32.
//
//    Unsigned x unsigned codes: vpdpbusd multiplies u8 x s8. Codes of b <= 7 bits are already
//    valid s8 (0..127) and are used as they are (zero point z = 0); 8-bit codes on the B side
//    are shifted to s8 by z = 128 (q - 128) and z * ra[m] is added back exactly in int64.
//    The chunk bound uses the actual bit widths: a_max = 2^ba - 1, b_absmax = max(z, 2^bb-1-z).
//    ra comes out of the GEMM itself: the s8 copy of B gets an extra row of ones (N + 1 columns).
//    Scratch (the s8 copy of B, the int32 products) lives in per-thread buffers that grow to the
//    largest shape seen and are reused, so steady-state calls do not page-fault.
//
//    A grid that varies along the reduction dimension k cannot be factored out of the sum, so
//    the integer path supports grids per tensor or per row of the *non-reduced* dimension only.
//    For the three training GEMMs of a linear layer (X [N, Din], W [Dout, Din], G = dY [N, Dout]):
//      fprop  Y  = X W^T : reduction over Din.  X per tensor or per row; W per tensor or per
//                          row (per output channel). Per-column grids are rejected.
//      dgrad  dX = G W   : reduction over Dout. G per tensor, per row (PSQ) or BHQ (per row of
//                          T G; T^-1 is applied in block form to the output). W must NOT vary
//                          along Dout: per tensor or per column (Din).
//      wgrad  dW = G^T X : reduction over the N samples. G per tensor or per column (Dout);
//                          X per tensor or per column (Din). Per-row (PSQ, BHQ) is rejected.
//    Decision for dgrad with a per-output-channel weight grid (symmetric_row, per k here): we do
//    not re-quantize W. Instead the weight scales are folded into G *before* G is quantized:
//        G' = G diag(1/s_w)   (dgrad_fold_weight_scales)
//    and qgemm_dgrad_folded(quantize(G'), wq) computes deq(G') (q_w - z) where z is W's common
//    integer zero code (symmetric grids: z = 2^(b-1) - 1, the same for every row), i.e.
//    deq(G') diag(s_w) deq(W) ~= G W (equal up to the fp32 rounding of W's lo = -z / s_w). Reason: it keeps one weight quantization (the forward one,
//    saved as codes) and the per-channel accuracy of the weight; only G's quantization changes
//    (it now sees the gradient in weight-code units: columns of G are rescaled by 1/s_w before
//    the per-row or BHQ grid is fitted), which the unbiased gradient quantizers handle like any
//    other input; its variance changes accordingly and should be measured with the stats tools. The alternative — a second, per-tensor weight grid for dgrad —
//    would cost a re-quantization of W every step and lose per-channel resolution.
//
//    Exactness contract: each qgemm result equals the GEMM of the dequantized values computed in
//    fp64 up to fp32 rounding. Tested (tests/unit/test_igemm.cpp) with the tolerance
//        eps_f32 sum_k |a b| + 64 eps_f64 sum_k (|qa/sa| + |la|)(|qb/sb| + |lb|)
//    where the second term covers values that nearly cancel inside q/s + lo (a zero code); for
//    BHQ the bound is carried through T^-1. When B has more rows than A (and no accumulate, no
//    BHQ), qgemm computes (B A^T)^T so that the copied operand is the smaller one.
#pragma once

#include "fqt/quant.hpp"
#include "fqt/tensor.hpp"

#include <cstdint>
#include <vector>

namespace fqt {

enum class IgemmBackend : uint8_t { automatic, reference, portable, vnni, onednn, avx2 };

const char* igemm_backend_name(IgemmBackend b);
// Whether a backend can run here (onednn: built with oneDNN and the CPU has VNNI; vnni: CPU has
// AVX512-VNNI and the build enabled it; avx2: CPU has AVX2 and the build enabled it).
bool igemm_backend_available(IgemmBackend b);
// Process-wide choice of backend (default automatic). Throws fqt::Error if unavailable.
void set_igemm_backend(IgemmBackend b);
IgemmBackend igemm_backend();
// The backend `automatic` resolves to.
IgemmBackend igemm_resolved_backend();

// Largest K for which K * a_max * b_absmax fits in int32 (the chunk length of the reduction).
int64_t igemm_max_k(int64_t a_max, int64_t b_absmax);

// C = A B_t^T in int32. Any K: long reductions are chunked and accumulated in int64, and the
// narrowing to int32 is checked (fqt::Error if a result does not fit).
void igemm_u8s8s32(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B_t,
                   int64_t ldb, int32_t* C, int64_t ldc);
// The reference: plain loops, int64 accumulation, checked narrowing.
void igemm_u8s8s32_ref(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B_t,
                       int64_t ldb, int32_t* C, int64_t ldc);
// C = A B_t^T in int64 (never overflows for K < 2^31). a_max / b_absmax bound the operands
// (defaults: full range) and set the chunk length; values outside the bounds are a contract
// violation.
void igemm_u8s8s64(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B_t,
                   int64_t ldb, int64_t* C, int64_t ldc, int64_t a_max = 255, int64_t b_absmax = 128);
void igemm_u8s8s64_ref(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B_t,
                       int64_t ldb, int64_t* C, int64_t ldc);

// C (f32 [a.rows, b.rows]) = deq(A) deq(B)^T, or += with accumulate. A: grids per tensor or per
// row, BHQ allowed (T^-1 applied to C's rows); B: per tensor or per row. A per-column grid (the
// reduction dimension) throws fqt::Error. Without accumulate, C is (re)allocated if needed.
void qgemm(const QuantizedTensor& a, const QuantizedTensor& b, Tensor& c, bool accumulate);

// The training GEMMs of a linear layer, operands in their natural layouts (see above).
Tensor qgemm_fprop(const QuantizedTensor& xq, const QuantizedTensor& wq);  // [N, Dout]
Tensor qgemm_dgrad(const QuantizedTensor& gq, const QuantizedTensor& wq);  // [N, Din]
Tensor qgemm_wgrad(const QuantizedTensor& gq, const QuantizedTensor& xq);  // [Dout, Din]
// dgrad with a per-row (per output channel) weight grid whose zero code is a common integer z:
// gq_folded quantizes G diag(1/s_w) (see dgrad_fold_weight_scales); result deq(G') (q_w - z).
Tensor qgemm_dgrad_folded(const QuantizedTensor& gq_folded, const QuantizedTensor& wq);
// G' = G diag(1/s_w): G f32 [N, Dout], wq per-row [Dout, Din].
Tensor dgrad_fold_weight_scales(const Tensor& g, const QuantizedTensor& wq);

namespace igemm_detail {
// Backend kernels: int32 output, K within the chunk bound for the data (no overflow check).
void s32_portable(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B,
                  int64_t ldb, int32_t* C, int64_t ldc);
bool vnni_available();
void s32_vnni(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
              int32_t* C, int64_t ldc);
bool avx2_available();
void s32_avx2(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
              int32_t* C, int64_t ldc);
// Whether the AVX2 kernel may use vpmaddubsw (2 max|A| max|B| <= 32767) for these operands.
bool avx2_bytes_exact(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb);
// The fastest own kernel of this CPU (vnni, else avx2, else portable), run on the calling
// thread when called inside a parallel region (the layers' per-sample GEMMs), and its name.
void s32_local(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
               int32_t* C, int64_t ldc);
const char* local_kernel_name();
// The VNNI kernel's B packing, done once for many products with the same B (a layer's weights
// over the samples of a batch: packing them per sample cost as much as a stage-3 sample's GEMM),
// and the product with such a packed B.
void pack_b_vnni(int64_t N, int64_t K, const int8_t* B, int64_t ldb, std::vector<int8_t>& out);
void s32_vnni_packed(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* Bpk, int32_t* C,
                     int64_t ldc);
// B [N, K] for s32_local with a fixed B: packed for the VNNI kernel where it runs, else B itself
// (which must then outlive this object).
class LocalB {
 public:
  LocalB(int64_t N, int64_t K, const int8_t* B, int64_t ldb);
  void gemm(int64_t M, const uint8_t* A, int64_t lda, int32_t* C, int64_t ldc) const;  // C = A B^T
  int64_t k() const { return k_; }

 private:
  int64_t n_, k_, ldb_;
  const int8_t* b_;
  std::vector<int8_t> packed_;  // empty: not the VNNI kernel
};
bool onednn_available();
void s32_onednn(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B,
                int64_t ldb, int32_t* C, int64_t ldc);
// Dispatch to the current backend (int32, K within bound).
void s32_dispatch(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B,
                  int64_t ldb, int32_t* C, int64_t ldc);
}  // namespace igemm_detail

}  // namespace fqt
