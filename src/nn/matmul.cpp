// GEMM on (possibly quantized) operands: the one place where the layers' three GEMMs run.
// Simulated path: quantized operands are dequantized (f32) and multiplied with sgemm. An integer
// GEMM on codes + grids (SPEC section 4) replaces the quantized x quantized case here.
#include "fqt/gemm.hpp"
#include "fqt/layers.hpp"

namespace fqt {

int64_t GemmOperand::rows() const { return dense ? dense->size(0) : quant->rows; }
int64_t GemmOperand::cols() const { return dense ? dense->numel() / dense->size(0) : quant->cols; }

void matmul(const GemmOperand& a, bool trans_a, const GemmOperand& b, bool trans_b, Tensor& c,
            bool accumulate) {
  FQT_CHECK((a.dense != nullptr) != (a.quant != nullptr) && (b.dense != nullptr) != (b.quant != nullptr),
            "matmul: each operand must be either dense or quantized");
  const int64_t M = trans_a ? a.cols() : a.rows();
  const int64_t K = trans_a ? a.rows() : a.cols();
  const int64_t Kb = trans_b ? b.cols() : b.rows();
  const int64_t N = trans_b ? b.rows() : b.cols();
  FQT_CHECK(K == Kb, "matmul: inner dimensions differ ({} vs {})", K, Kb);
  FQT_CHECK(c.dtype() == DType::f32 && c.numel() == M * N && c.size(0) == M,
            "matmul: output {} is not [{}, {}]", shape_str(c.shape()), M, N);
  Tensor da = a.dense ? *a.dense : dequantize(*a.quant);
  Tensor db = b.dense ? *b.dense : dequantize(*b.quant);
  sgemm(trans_a, trans_b, M, N, K, 1.0f, da.data<float>(), a.cols(), db.data<float>(), b.cols(),
        accumulate ? 1.0f : 0.0f, c.data<float>(), N);
}

}  // namespace fqt
