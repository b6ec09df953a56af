// Conv2d's integer path (Recipe::arith == integer; SPEC section 4): all three GEMMs run on 8-bit
// codes (fqt's AVX-512 VNNI kernel), one sample at a time per thread, and the scales and
// offsets are applied afterwards as row / column / rank-1 corrections.
//
// For operands a = qa / sa + la and b = qb / sb + lb (qb shifted into s8 when it has 8 bits),
//     sum_k a b = S / (sa sb) + (lb / sa) ra + (la / sb) rb + K la lb,
// with S the integer GEMM and ra, rb the code sums of the two operands along k. The code sums of
// the operand on the B side come out of the GEMM itself: the u8 operand gets an extra row of ones.
// Everything after S is evaluated in double and rounded once to fp32, so each result equals the
// GEMM of the dequantized values (the simulated path) to fp32 rounding.
//
//   fprop  Y_n [Cout, P]  = Wq [Cout, Ckk] . im2row(xq_n)^T      A = weight codes (+ ones row)
//   dgrad  dcols_n [P, Ckk] = Gq_n [P, Cout] . Wq                  A = gradient codes (rows of G)
//          then row2im (the adjoint of im2row) into dx_n; BHQ: T^-1 on all rows first
//   wgrad  dW [Cout, Ckk] = sum_n Gq_n^T . im2col(xq_n)^T          A = gradient codes^T (+ ones)
//          integer partial sums in int64 (exact, so any grouping gives the same result)
//
// im2col runs on the codes: padding is the activation grid's code for 0 (zero-aligned grids have
// one by construction), so nothing is dequantized and the saved input stays 1 byte per value.
#include "common.hpp"
#include "fqt/igemm.hpp"
#include "fqt/profile.hpp"

#include <algorithm>
#include <cstring>

namespace fqt {
using namespace nn_detail;

namespace {

// b-bit codes as s8: 8-bit codes are shifted by 128, narrower ones fit as they are.
int s8_shift(int bits) { return bits == 8 ? 128 : 0; }

// One sample's patches, row per output position: out[p][(c, kh, kw)] = code - shift, padding
// taps = pad_val (the zero code, shifted).
void im2row_codes(const uint8_t* x, const Geom& g, int shift, int8_t pad_val, int8_t* out) {
  const int64_t k = g.k, H = g.H, W = g.W, ckk = g.rows();
  for (int64_t oh = 0; oh < g.Ho; ++oh)
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      int8_t* row = out + (oh * g.Wo + ow) * ckk;
      const int64_t ih0 = oh * g.stride - g.pad, iw0 = ow * g.stride - g.pad;
      const bool inside = ih0 >= 0 && iw0 >= 0 && ih0 + k <= H && iw0 + k <= W;
      for (int64_t c = 0; c < g.C; ++c) {
        const uint8_t* plane = x + c * H * W;
        for (int64_t kh = 0; kh < k; ++kh) {
          int8_t* dst = row + (c * k + kh) * k;
          const int64_t ih = ih0 + kh;
          if (inside) {
            const uint8_t* src = plane + ih * W + iw0;
            for (int64_t kw = 0; kw < k; ++kw) dst[kw] = static_cast<int8_t>(src[kw] - shift);
          } else {
            for (int64_t kw = 0; kw < k; ++kw) {
              const int64_t iw = iw0 + kw;
              dst[kw] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? static_cast<int8_t>(plane[ih * W + iw] - shift)
                                                                 : pad_val;
            }
          }
        }
      }
    }
}

// One sample, column per output position: out[(c, kh, kw)][p] (the transposed layout).
void im2col_codes(const uint8_t* x, const Geom& g, int shift, int8_t pad_val, int8_t* out) {
  const int64_t k = g.k, H = g.H, W = g.W, P = g.P();
  for (int64_t r = 0; r < g.rows(); ++r) {
    const int64_t c = r / (k * k), kh = (r / k) % k, kw = r % k;
    const uint8_t* plane = x + c * H * W;
    int8_t* row = out + r * P;
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const int64_t ih = oh * g.stride - g.pad + kh;
      int8_t* o = row + oh * g.Wo;
      if (ih < 0 || ih >= H) {
        std::memset(o, static_cast<uint8_t>(pad_val), static_cast<size_t>(g.Wo));
        continue;
      }
      const uint8_t* src = plane + ih * W;
      for (int64_t ow = 0; ow < g.Wo; ++ow) {
        const int64_t iw = ow * g.stride - g.pad + kw;
        o[ow] = (iw >= 0 && iw < W) ? static_cast<int8_t>(src[iw] - shift) : pad_val;
      }
    }
  }
}

// The adjoint of im2row: x C,H,W (overwritten) = sum of rows [P, Ckk] onto their taps.
void row2im_one(const float* rows, const Geom& g, float* x) {
  const int64_t k = g.k, H = g.H, W = g.W, ckk = g.rows();
  std::memset(x, 0, sizeof(float) * g.C * H * W);
  for (int64_t oh = 0; oh < g.Ho; ++oh)
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      const float* row = rows + (oh * g.Wo + ow) * ckk;
      const int64_t ih0 = oh * g.stride - g.pad, iw0 = ow * g.stride - g.pad;
      for (int64_t c = 0; c < g.C; ++c)
        for (int64_t kh = 0; kh < k; ++kh) {
          const int64_t ih = ih0 + kh;
          if (ih < 0 || ih >= H) continue;
          float* dst = x + (c * H + ih) * W;
          const float* src = row + (c * k + kh) * k;
          for (int64_t kw = 0; kw < k; ++kw) {
            const int64_t iw = iw0 + kw;
            if (iw >= 0 && iw < W) dst[iw] += src[kw];
          }
        }
    }
}

// The per-sample GEMMs run inside the layer's own OpenMP loop over samples, one GEMM per thread:
// they call fqt's kernels directly (AVX-512 VNNI, else portable), which run on the calling thread
// there. (oneDNN is not re-entered from several threads at once.) K stays within the int32 chunk
// bound, so no reduction is split here.
void igemm_worker(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                  int32_t* C, int64_t ldc) {
  FQT_CHECK(K <= igemm_max_k(255, 128), "conv integer GEMM: reduction of {} terms exceeds the int32 bound", K);
  if (igemm_detail::vnni_available()) igemm_detail::s32_vnni(M, N, K, A, lda, B, ldb, C, ldc);
  else igemm_detail::s32_portable(M, N, K, A, lda, B, ldb, C, ldc);
}

double scale_of(const QuantizedTensor& q, int64_t group) { return q.scale[q.scale.size() == 1 ? 0 : group]; }
double lo_of(const QuantizedTensor& q, int64_t group) { return q.lo[q.lo.size() == 1 ? 0 : group]; }

}  // namespace

Tensor Conv2d::forward_int(const QuantizedTensor& xq, const QuantizedTensor& wq, int zero_code) const {
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W;
  // A = weight codes [Cout, Ckk] plus a row of ones (its GEMM row = the patch code sums).
  std::vector<uint8_t> A(static_cast<size_t>((cout_ + 1) * ckk), 1);
  std::memcpy(A.data(), wq.codes.data<uint8_t>(), static_cast<size_t>(cout_ * ckk));
  const int shx = s8_shift(xq.spec.bits);
  const double sx = xq.scale[0], lx = xq.lo[0] + shx / sx;  // value = (code - shx) / sx + lx
  std::vector<double> inv(cout_), cb(cout_), crow(cout_);
  for (int64_t c = 0; c < cout_; ++c) {
    const double sw = scale_of(wq, c), lw = lo_of(wq, c);
    int64_t ra = 0;
    for (int64_t k = 0; k < ckk; ++k) ra += A[c * ckk + k];
    inv[c] = 1.0 / (sw * sx), cb[c] = lw / sx, crow[c] = lx / sw * static_cast<double>(ra) + static_cast<double>(ckk) * lw * lx;
  }
  const auto pad_val = static_cast<int8_t>(zero_code - shx);
  const uint8_t* xc = xq.codes.data<uint8_t>();
  const float* b = has_bias_ ? bias_.value.data<float>() : nullptr;
  Tensor y = Tensor::empty({N, cout_, g.Ho, g.Wo});
  float* yp = y.data<float>();
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<int8_t> B(static_cast<size_t>(P * ckk));
    std::vector<int32_t> C(static_cast<size_t>((cout_ + 1) * P));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      im2row_codes(xc + n * chw, g, shx, pad_val, B.data());
      igemm_worker(cout_ + 1, P, ckk, A.data(), ckk, B.data(), ckk, C.data(), P);
      const int32_t* rb = C.data() + cout_ * P;
      float* yn = yp + n * cout_ * P;
      for (int64_t c = 0; c < cout_; ++c) {
        const int32_t* s = C.data() + c * P;
        for (int64_t p = 0; p < P; ++p) {
          float v = static_cast<float>(s[p] * inv[c] + cb[c] * rb[p] + crow[c]);
          yn[c * P + p] = b ? v + b[c] : v;
        }
      }
    }
  }
  return y;
}

Tensor Conv2d::dgrad_int(const QuantizedTensor& gq) const {
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W;
  // B = W^T codes [Ckk, Cout] as s8, plus a row of ones (its GEMM column = the row sums of G's codes).
  const int shw = s8_shift(wq_.spec.bits);
  const double sw = wq_.scale[0], lw = wq_.lo[0] + shw / sw;
  const int64_t ldc = ckk + 1;
  std::vector<int8_t> Bt(static_cast<size_t>(ldc * cout_), 1);
  std::vector<double> rb(ckk, 0.0);
  const uint8_t* wc = wq_.codes.data<uint8_t>();
  for (int64_t k = 0; k < ckk; ++k) {
    int64_t s = 0;
    for (int64_t c = 0; c < cout_; ++c) {
      const int v = wc[c * ckk + k] - shw;
      Bt[k * cout_ + c] = static_cast<int8_t>(v), s += v;
    }
    rb[k] = static_cast<double>(s);
  }
  const bool bhq = gq.transform.has_value();
  const bool per_row = gq.granularity() == Granularity::row;
  Tensor all = bhq ? Tensor::empty({N * P, ckk}) : Tensor();  // BHQ: T^-1 mixes rows of all samples
  Tensor dx = Tensor::empty(in_shape_);
  const uint8_t* gc = gq.codes.data<uint8_t>();
  float* dxp = dx.data<float>();
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<int32_t> C(static_cast<size_t>(P * ldc));
    std::vector<float> rows(bhq ? 0 : static_cast<size_t>(P * ckk));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      igemm_worker(P, ldc, cout_, gc + n * P * cout_, cout_, Bt.data(), cout_, C.data(), ldc);
      float* out = bhq ? all.data<float>() + n * P * ckk : rows.data();
      for (int64_t p = 0; p < P; ++p) {
        const int64_t r = n * P + p;
        const double sg = scale_of(gq, per_row ? r : 0), lg = lo_of(gq, per_row ? r : 0);
        const int32_t* s = C.data() + p * ldc;
        const double inv = 1.0 / (sg * sw), cb = lg / sw;
        const double cr = lw / sg * s[ckk] + static_cast<double>(cout_) * lg * lw;
        for (int64_t k = 0; k < ckk; ++k) out[p * ckk + k] = static_cast<float>(s[k] * inv + cb * rb[k] + cr);
      }
      if (!bhq) row2im_one(out, g, dxp + n * chw);
    }
  }
  if (bhq) {
    Tensor back = Tensor::empty({N * P, ckk});
    gq.transform->apply_inverse(all.data<float>(), back.data<float>(), ckk);
    const float* bp = back.data<float>();
#pragma omp parallel for schedule(static) if (N > 1 && parallel_worth(N * P * ckk))
    for (int64_t n = 0; n < N; ++n) row2im_one(bp + n * P * ckk, g, dxp + n * chw);
  }
  return dx;
}

void Conv2d::wgrad_int(const QuantizedTensor& gq) {
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W;
  const int64_t m = cout_ + 1, wsize = m * ckk;
  const int shx = s8_shift(xq_.spec.bits);
  const double sx = xq_.scale[0], lx = xq_.lo[0] + shx / sx;
  const auto pad_val = static_cast<int8_t>(zero_code_ - shx);
  const uint8_t* gc = gq.codes.data<uint8_t>();
  const uint8_t* xc = xq_.codes.data<uint8_t>();
  // Integer partial sums per fixed group of samples (exact: the grouping cannot change them).
  const int64_t groups = std::clamp<int64_t>(std::min<int64_t>(8, (int64_t{1} << 23) / wsize), 1, N);
  std::vector<int64_t> part(static_cast<size_t>(groups * wsize), 0);
#pragma omp parallel if (groups > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<uint8_t> At(static_cast<size_t>(m * P), 1);  // G_n^T codes [Cout, P] + ones row
    std::vector<int8_t> B(static_cast<size_t>(ckk * P));
    std::vector<int32_t> C(static_cast<size_t>(wsize));
#pragma omp for schedule(static, 1)
    for (int64_t gi = 0; gi < groups; ++gi) {
      int64_t* acc = part.data() + gi * wsize;
      for (int64_t n = gi * N / groups; n < (gi + 1) * N / groups; ++n) {
        const uint8_t* gn = gc + n * P * cout_;
        for (int64_t p0 = 0; p0 < P; p0 += 64)
          for (int64_t c = 0; c < cout_; ++c)
            for (int64_t p = p0; p < std::min(P, p0 + 64); ++p) At[c * P + p] = gn[p * cout_ + c];
        im2col_codes(xc + n * chw, g, shx, pad_val, B.data());
        igemm_worker(m, ckk, P, At.data(), P, B.data(), P, C.data(), ckk);
        for (int64_t i = 0; i < wsize; ++i) acc[i] += C[i];
      }
    }
  }
  for (int64_t gi = 1; gi < groups; ++gi)
    for (int64_t i = 0; i < wsize; ++i) part[i] += part[gi * wsize + i];
  // Code sums of G's columns over all rows.
  std::vector<int64_t> ra(cout_, 0);
  for (int64_t r = 0; r < N * P; ++r)
    for (int64_t c = 0; c < cout_; ++c) ra[c] += gc[r * cout_ + c];
  const bool per_col = gq.granularity() == Granularity::column;
  const int64_t* S = part.data();
  const int64_t* rb = part.data() + cout_ * ckk;
  const double K = static_cast<double>(N * P);
  float* dw = weight_.grad.data<float>();
  for (int64_t c = 0; c < cout_; ++c) {
    const double sg = scale_of(gq, per_col ? c : 0), lg = lo_of(gq, per_col ? c : 0);
    const double inv = 1.0 / (sg * sx), cb = lg / sx, cr = lx / sg * static_cast<double>(ra[c]) + K * lg * lx;
    for (int64_t k = 0; k < ckk; ++k)
      dw[c * ckk + k] += static_cast<float>(static_cast<double>(S[c * ckk + k]) * inv + cb * static_cast<double>(rb[k]) + cr);
  }
}

}  // namespace fqt
