// Quantized GEMMs: the integer GEMM on codes plus the scale/offset corrections (see
// include/fqt/igemm.hpp for the algebra and for which grids each training GEMM accepts).
#include "fqt/igemm.hpp"
#include "kernels/cpu/transpose.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace fqt {
namespace {

// One operand of C = A B^T: u8 codes [rows, K] with a grid per row or one per tensor.
struct Side {
  const uint8_t* codes = nullptr;
  int64_t ld = 0;
  const float* scale = nullptr;  // rows entries if per_row, else 1
  const float* lo = nullptr;
  bool per_row = false;
  int max_code = 255;
  double s(int64_t i) const { return scale[per_row ? i : 0]; }
  double l(int64_t i) const { return lo[per_row ? i : 0]; }
};

const char* gran_name(Granularity g) {
  return g == Granularity::tensor ? "tensor" : g == Granularity::row ? "row" : "column";
}

void check_codes(const QuantizedTensor& q, const char* what) {
  FQT_CHECK(q.codes.defined() && q.codes.dtype() == DType::u8 && q.codes.numel() == q.rows * q.cols,
            "{}: codes must be u8 [{}, {}]", what, q.rows, q.cols);
  FQT_CHECK(q.spec.bits >= 1 && q.spec.bits <= 8, "{}: bits = {} (1..8)", what, q.spec.bits);
  const size_t groups = q.granularity() == Granularity::tensor ? 1
                        : q.granularity() == Granularity::row  ? size_t(q.rows)
                                                               : size_t(q.cols);
  FQT_CHECK(q.scale.size() == groups && q.lo.size() == groups, "{}: {} grids for {} groups", what, q.scale.size(),
            groups);
}

// Side for the operand as stored (rows = non-reduced dimension).
Side side_rows(const QuantizedTensor& q) {
  Side s;
  s.codes = q.codes.data<uint8_t>();
  s.ld = q.cols;
  s.scale = q.scale.data();
  s.lo = q.lo.data();
  s.per_row = q.granularity() == Granularity::row;
  s.max_code = q.max_code();
  return s;
}

// u8 transpose: src [R, C] -> dst [C, R].
// In blocks of 64 source rows over the threads, each by 8x8 byte tiles (a strided byte loop was
// 5.8% of the MLP's FQT step in perf).
std::vector<uint8_t> transpose_u8(const uint8_t* src, int64_t R, int64_t C) {
  std::vector<uint8_t> dst(static_cast<size_t>(R * C));
  constexpr int64_t T = 64;
#pragma omp parallel for schedule(static) if (R * C > (1 << 16))
  for (int64_t r0 = 0; r0 < R; r0 += T)
    kernels::transpose_bytes(src + r0 * C, std::min(T, R - r0), C, C, dst.data() + r0, R, 0x00);
  return dst;
}

// Side for the transposed operand: rows of q^T = columns of q; the grid must not vary along
// q's rows (the reduction dimension), so it is per tensor or per column of q.
Side side_transposed(const QuantizedTensor& q, std::vector<uint8_t>& storage) {
  storage = transpose_u8(q.codes.data<uint8_t>(), q.rows, q.cols);
  Side s;
  s.codes = storage.data();
  s.ld = q.rows;
  s.scale = q.scale.data();
  s.lo = q.lo.data();
  s.per_row = q.granularity() == Granularity::column;
  s.max_code = q.max_code();
  return s;
}

// C[m][n] (+)= sum_k (qa/sa + la)(qb/sb + lb), exactly up to the final fp32 rounding.
// B is copied to an s8 operand [N + 1, K]: its codes (shifted by z for 8 bits) and a row of
// ones, so that the GEMM also yields the code row sums of A (column N of S) without a separate
// pass over A. One parallel region besides the GEMM's for the copy, one for the epilogue (each
// costs a scheduler slice on a busy machine).
void core(int64_t M, int64_t N, int64_t K, const Side& a, const Side& b, float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  // Codes of <= 7 bits are valid s8 as they are (z = 0); 8-bit codes become q - 128.
  const int z = b.max_code > 127 ? 128 : 0;
  const uint8_t flip = z ? 0x80 : 0x00;
  const int64_t NS = N + 1;  // columns of S
  static thread_local std::vector<int8_t> bs;
  if (bs.size() < size_t(NS * K)) bs.resize(size_t(NS * K));
  int8_t* bsp = bs.data();
  std::vector<double> ib(N), lb(N), rib(N);
#pragma omp parallel for schedule(static) if (N * K > (1 << 18))
  for (int64_t n = 0; n <= N; ++n) {
    int8_t* d = bsp + n * K;
    if (n == N) {
      std::fill(d, d + K, int8_t(1));
      continue;
    }
    int64_t s = 0;
    const uint8_t* p = b.codes + n * b.ld;
    for (int64_t k = 0; k < K; ++k) {
      s += p[k];
      d[k] = static_cast<int8_t>(p[k] ^ flip);
    }
    ib[n] = 1.0 / b.s(n);
    lb[n] = b.l(n);
    rib[n] = double(s) * ib[n];
  }
  const int64_t a_max = a.max_code, b_absmax = std::max(z, b.max_code - z);

  auto epilogue = [&](const auto* S) {
#pragma omp parallel for schedule(static) if (M * N > (1 << 15))
    for (int64_t m = 0; m < M; ++m) {
      const auto* s = S + m * NS;
      const int64_t ra = s[N];  // row sum of A's codes
      const double iam = 1.0 / a.s(m), lam = a.l(m), riam = double(ra) * iam, klam = double(K) * lam;
      const double zra = double(int64_t(z) * ra);  // exact: |.| < 2^53
      float* c = C + m * ldc;
      const double* ibp = ib.data();
      const double* lbp = lb.data();
      const double* ribp = rib.data();
      if (accumulate) {
        for (int64_t n = 0; n < N; ++n) {
          const double sum = double(s[n]) + zra;
          c[n] = static_cast<float>(double(c[n]) + (sum * iam * ibp[n] + lbp[n] * riam + lam * ribp[n] + klam * lbp[n]));
        }
      } else {
        for (int64_t n = 0; n < N; ++n) {
          const double sum = double(s[n]) + zra;
          c[n] = static_cast<float>(sum * iam * ibp[n] + lbp[n] * riam + lam * ribp[n] + klam * lbp[n]);
        }
      }
    }
  };
  if (K <= igemm_max_k(a_max, b_absmax)) {
    static thread_local std::vector<int32_t> S;
    if (S.size() < size_t(M * NS)) S.resize(size_t(M * NS));
    igemm_detail::s32_dispatch(M, NS, K, a.codes, a.ld, bsp, K, S.data(), NS);
    epilogue(S.data());
  } else {
    std::vector<int64_t> S(static_cast<size_t>(M * NS));
    igemm_u8s8s64(M, NS, K, a.codes, a.ld, bsp, K, S.data(), NS, a_max, b_absmax);
    epilogue(S.data());
  }
}

// Runs core into c (f32 [M, N]); for a BHQ left operand the rows of the product are in T's
// domain and T^-1 is applied afterwards in block form.
void run(int64_t M, int64_t N, int64_t K, const Side& a, const Side& b, const BhqTransform* t, Tensor& c,
         bool accumulate) {
  FQT_CHECK(!t || t->rows == M, "qgemm: a BHQ transform over {} rows for a left operand of {} rows (a per-sample "
            "transform of a convolution's pixel rows is applied by Conv2d, not here)", t ? t->rows : 0, M);
  if (!accumulate || !c.defined()) {
    if (!c.defined() || c.dtype() != DType::f32 || c.shape() != Shape{M, N}) c = Tensor::empty({M, N});
    accumulate = false;
  }
  FQT_CHECK(c.dtype() == DType::f32 && c.shape() == (Shape{M, N}), "qgemm: output must be f32 [{}, {}], got {} {}", M,
            N, dtype_name(c.dtype()), shape_str(c.shape()));
  if (!t && !accumulate && N > M) {
    // core copies its right operand (s8 shift, ones row): give it the smaller one and
    // transpose the product, C = (B A^T)^T. Wgrad-like shapes save a pass over the big operand.
    static thread_local std::vector<float> ct;
    if (ct.size() < size_t(M * N)) ct.resize(size_t(M * N));
    core(N, M, K, b, a, ct.data(), M, false);
    float* cp = c.data<float>();
    // The calling thread's buffer, by pointer: inside the parallel region `ct` would name each
    // worker thread's own (empty) thread_local vector.
    // ct [N, M] -> c [M, N], in blocks of 64 rows of ct by 8x8 tiles (an element loop with
    // strided reads was 9% of the MLP's FQT step in perf).
    const float* ctp = ct.data();
    constexpr int64_t T = 64;
#pragma omp parallel for schedule(static) if (M * N > (1 << 16))
    for (int64_t n0 = 0; n0 < N; n0 += T) kernels::transpose(ctp + n0 * M, std::min(T, N - n0), M, M, cp + n0, N);
    return;
  }
  if (!t) {
    core(M, N, K, a, b, c.data<float>(), N, accumulate);
    return;
  }
  FQT_CHECK(t->rows == M, "qgemm: BHQ transform has {} rows for {}", t->rows, M);
  Tensor y = Tensor::empty({M, N});
  core(M, N, K, a, b, y.data<float>(), N, false);
  if (!accumulate) {
    t->apply_inverse(y.data<float>(), c.data<float>(), N);
    return;
  }
  Tensor x = Tensor::empty({M, N});
  t->apply_inverse(y.data<float>(), x.data<float>(), N);
  float* cp = c.data<float>();
  const float* xp = x.data<float>();
  for (int64_t i = 0; i < M * N; ++i) cp[i] += xp[i];
}

}  // namespace

void qgemm(const QuantizedTensor& a, const QuantizedTensor& b, Tensor& c, bool accumulate) {
  check_codes(a, "qgemm A");
  check_codes(b, "qgemm B");
  FQT_CHECK(a.cols == b.cols, "qgemm: A is [{}, {}] and B is [{}, {}]: reduction sizes differ", a.rows, a.cols, b.rows,
            b.cols);
  FQT_CHECK(a.granularity() != Granularity::column && b.granularity() != Granularity::column,
            "qgemm: a per-column grid varies along the reduction dimension and cannot be factored out of "
            "the integer sum (A {}, B {})",
            gran_name(a.granularity()), gran_name(b.granularity()));
  FQT_CHECK(!b.transform, "qgemm: B with a BHQ transform is not supported (transform the left operand)");
  run(a.rows, b.rows, a.cols, side_rows(a), side_rows(b), a.transform ? &*a.transform : nullptr, c, accumulate);
}

Tensor qgemm_fprop(const QuantizedTensor& xq, const QuantizedTensor& wq) {
  check_codes(xq, "qgemm_fprop X");
  check_codes(wq, "qgemm_fprop W");
  FQT_CHECK(xq.cols == wq.cols, "qgemm_fprop: X is [{}, {}], W is [{}, {}] (want [N, Din] and [Dout, Din])", xq.rows,
            xq.cols, wq.rows, wq.cols);
  FQT_CHECK(xq.granularity() != Granularity::column && wq.granularity() != Granularity::column,
            "qgemm_fprop: per-column grids vary along Din, the reduction (X {}, W {}); use per tensor / per row",
            gran_name(xq.granularity()), gran_name(wq.granularity()));
  FQT_CHECK(!wq.transform, "qgemm_fprop: W cannot carry a BHQ transform");
  Tensor y;
  run(xq.rows, wq.rows, xq.cols, side_rows(xq), side_rows(wq), xq.transform ? &*xq.transform : nullptr, y, false);
  return y;
}

Tensor qgemm_dgrad(const QuantizedTensor& gq, const QuantizedTensor& wq) {
  check_codes(gq, "qgemm_dgrad G");
  check_codes(wq, "qgemm_dgrad W");
  FQT_CHECK(gq.cols == wq.rows, "qgemm_dgrad: G is [{}, {}], W is [{}, {}] (want [N, Dout] and [Dout, Din])", gq.rows,
            gq.cols, wq.rows, wq.cols);
  FQT_CHECK(gq.granularity() != Granularity::column,
            "qgemm_dgrad: G's per-column grid varies along Dout, the reduction; use per tensor, PSQ or BHQ");
  FQT_CHECK(wq.granularity() != Granularity::row,
            "qgemm_dgrad: W's per-row (per output channel) grid varies along Dout, the reduction; fold the "
            "weight scales into G and use qgemm_dgrad_folded (see fqt/igemm.hpp)");
  FQT_CHECK(!wq.transform, "qgemm_dgrad: W cannot carry a BHQ transform");
  std::vector<uint8_t> wt;
  const Side b = side_transposed(wq, wt);
  Tensor dx;
  run(gq.rows, wq.cols, gq.cols, side_rows(gq), b, gq.transform ? &*gq.transform : nullptr, dx, false);
  return dx;
}

Tensor qgemm_dgrad_folded(const QuantizedTensor& gq, const QuantizedTensor& wq) {
  check_codes(gq, "qgemm_dgrad_folded G'");
  check_codes(wq, "qgemm_dgrad_folded W");
  FQT_CHECK(gq.cols == wq.rows, "qgemm_dgrad_folded: G' is [{}, {}], W is [{}, {}]", gq.rows, gq.cols, wq.rows,
            wq.cols);
  FQT_CHECK(wq.granularity() != Granularity::column && !wq.transform,
            "qgemm_dgrad_folded: W needs per-row or per-tensor grids");
  FQT_CHECK(gq.granularity() != Granularity::column, "qgemm_dgrad_folded: G' per column varies along the reduction");
  // W = diag(1/s_w) (q_w - z): every grid must have the same integer zero code z = -lo * s.
  const double z = std::nearbyint(-double(wq.lo[0]) * wq.scale[0]);
  for (size_t r = 0; r < wq.scale.size(); ++r) {
    const double zr = -double(wq.lo[r]) * wq.scale[r];
    FQT_CHECK(std::fabs(zr - z) <= 1e-3 * std::max(1.0, std::fabs(z)),
              "qgemm_dgrad_folded: W grid {} has zero code {} (grid 0: {}); needs a common integer zero code "
              "(symmetric grids)",
              r, zr, z);
  }
  std::vector<uint8_t> wt;
  Side b = side_transposed(wq, wt);
  const float one = 1.0f, mz = static_cast<float>(-z);
  b.scale = &one;
  b.lo = &mz;
  b.per_row = false;
  Tensor dx;
  run(gq.rows, wq.cols, gq.cols, side_rows(gq), b, gq.transform ? &*gq.transform : nullptr, dx, false);
  return dx;
}

Tensor dgrad_fold_weight_scales(const Tensor& g, const QuantizedTensor& wq) {
  FQT_CHECK(g.dtype() == DType::f32 && g.dim() == 2 && g.size(1) == wq.rows,
            "dgrad_fold_weight_scales: G must be f32 [N, {}], got {} {}", wq.rows, dtype_name(g.dtype()),
            shape_str(g.shape()));
  FQT_CHECK(wq.granularity() != Granularity::column, "dgrad_fold_weight_scales: W needs per-row or per-tensor grids");
  const int64_t N = g.size(0), D = g.size(1);
  Tensor out = Tensor::empty({N, D});
  const float* gp = g.data<float>();
  float* op = out.data<float>();
  const bool per_row = wq.granularity() == Granularity::row;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) op[n * D + d] = gp[n * D + d] / wq.scale[per_row ? d : 0];
  return out;
}

Tensor qgemm_wgrad(const QuantizedTensor& gq, const QuantizedTensor& xq) {
  check_codes(gq, "qgemm_wgrad G");
  check_codes(xq, "qgemm_wgrad X");
  FQT_CHECK(gq.rows == xq.rows, "qgemm_wgrad: G is [{}, {}], X is [{}, {}] (want [N, Dout] and [N, Din])", gq.rows,
            gq.cols, xq.rows, xq.cols);
  FQT_CHECK(gq.granularity() != Granularity::row && !gq.transform && xq.granularity() != Granularity::row &&
                !xq.transform,
            "qgemm_wgrad: per-row (per-sample, PSQ/BHQ) grids vary along the reduction over samples (G {}, X {}); "
            "use per tensor or per column",
            gran_name(gq.granularity()), gran_name(xq.granularity()));
  std::vector<uint8_t> gt, xt;
  const Side a = side_transposed(gq, gt), b = side_transposed(xq, xt);
  Tensor dw;
  run(gq.cols, xq.cols, gq.rows, a, b, nullptr, dw, false);
  return dw;
}

}  // namespace fqt
