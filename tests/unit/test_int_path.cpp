// The integer path (Recipe::arith = integer) against the simulated path (dequantize + fp32 GEMM):
// same layer, same weights, same input, same random numbers -> same codes, and outputs, input
// gradients and weight gradients equal to fp32 rounding. Every layer type, every gradient
// quantizer, bit widths 2..8, awkward shapes (odd channels, N = 1, K not a multiple of 4 or 64,
// stride 2, padding, 1x1).
//
// Tolerance: both paths compute the same K-term dot products of the same dequantized values;
// fp32 summation of K terms errs by at most K eps sum_k |a_k b_k| (eps = 2^-24), the integer
// path only by the final rounding (its sum is exact), so
//     |int - sim| <= (K + 2) eps sum_k |a_k b_k| <= (K + 2) eps K max|a| max|b|.
// For BHQ the dgrad operand's max|a| is taken in the transformed domain times the largest
// row-scale ratio of T^-1 (||T^-1||_inf), since T^-1 is applied to the GEMM output.
#include "fqt/igemm.hpp"
#include "fqt/layers.hpp"
#include "fqt/rng.hpp"

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>

using namespace fqt;

namespace {

Tensor randn(Shape s, uint64_t stream, float scale = 1.0f) {
  Tensor t = Tensor::empty(std::move(s));
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = scale * normal_at({91, stream}, i);
  return t;
}

double max_abs(const Tensor& t) {
  double m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, std::fabs(static_cast<double>(t.data<float>()[i])));
  return m;
}

double max_abs_deq(const QuantizedTensor& q) {
  // Magnitude of the dequantized operand as the GEMM sees it: BHQ's in the transformed domain
  // (T^-1 is applied to the GEMM's output), times T^-1's largest amplification ||T^-1||_inf.
  if (!q.transform) return max_abs(dequantize(q));
  QuantizedTensor plain = q;
  plain.transform.reset();
  return max_abs(dequantize(plain)) * q.transform->inverse_inf_norm();
}

// Puts Conv2d's kernel switches and the thread count back to their defaults when a test ends,
// also when an ASSERT leaves it early (the later tests would otherwise run a non-default path).
struct DefaultsOnExit {
  DefaultsOnExit() = default;
  DefaultsOnExit(const DefaultsOnExit&) = delete;
  DefaultsOnExit& operator=(const DefaultsOnExit&) = delete;
  ~DefaultsOnExit() {
    set_conv_fused_fprop(true);
    set_conv_fused_dgrad(true);
    set_conv_direct_dgrad(true);
    set_conv_direct_wgrad(true);
    set_num_threads(0);
  }
};

constexpr double kEps = 1.0 / (1 << 24);

void expect_within(const Tensor& got, const Tensor& want, double bound, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  double worst = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double d = std::fabs(static_cast<double>(got.data<float>()[i]) - want.data<float>()[i]);
    ASSERT_TRUE(std::isfinite(got.data<float>()[i])) << what << " element " << i;
    worst = std::max(worst, d);
  }
  EXPECT_LE(worst, bound) << what << " (max |sim| " << max_abs(want) << ")";
}

bool same_codes(const QuantizedTensor& a, const QuantizedTensor& b) {
  return a.codes.nbytes() == b.codes.nbytes() && std::memcmp(a.codes.raw(), b.codes.raw(), a.codes.nbytes()) == 0 &&
         a.scale == b.scale && a.lo == b.lo;
}

Recipe recipe(Arith arith, QuantizerSpec dgrad, QuantizerSpec wgrad, int fwd_bits = 8) {
  Recipe r;
  r.mode = Mode::fqt;
  r.arith = arith;
  r.dgrad = dgrad;
  r.wgrad = wgrad;
  r.activation.bits = fwd_bits;
  r.weight.bits = fwd_bits;
  return r;
}

struct ConvCase {
  int64_t n, cin, cout, h, w, k, stride, pad;
};

// Each sample (index 0) of t scaled by its own exp(2 N(0,1)) (from `stream`): per-sample grids
// of very different widths, and BHQ groups of several samples.
void scale_samples(Tensor& t, uint64_t stream) {
  const int64_t n = t.size(0), per = t.numel() / n;
  for (int64_t i = 0; i < n; ++i) {
    const float f = std::exp(2.0f * normal_at({stream, 1}, static_cast<uint64_t>(i)));
    for (int64_t j = 0; j < per; ++j) t.data<float>()[i * per + j] *= f;
  }
}

// Value of code i of q (group g) in double: what the integer path's corrections are exact for.
double code_value(const QuantizedTensor& q, int64_t i, int64_t g) {
  return static_cast<double>(q.codes.data<uint8_t>()[i]) / static_cast<double>(q.scale[g]) + static_cast<double>(q.lo[g]);
}

// All of q's values in double, as the integer path's exact sums see them: code / scale + lo per
// element, and for BHQ then T^-1 in double (per group: (y_k - 2 v_k v.y) / s_k over its members).
std::vector<double> deq_exact(const QuantizedTensor& q) {
  std::vector<double> v(static_cast<size_t>(q.rows * q.cols));
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t c = 0; c < q.cols; ++c) v[r * q.cols + c] = code_value(q, r * q.cols + c, q.group(r, c));
  if (!q.transform) return v;
  const BhqTransform& t = *q.transform;
  const int64_t w = q.rows * q.cols / t.rows;  // values per row of T
  std::vector<double> out(v.size());
  for (int64_t g = 0; g < t.num_groups(); ++g) {
    const int64_t n = t.group_size(g), *mem = t.members.data() + t.offsets[g];
    float vf, vr;
    householder_v(n, vf, vr);
    for (int64_t j = 0; j < w; ++j) {
      double z = 0;
      for (int64_t l = 0; l < n; ++l) z += (l == 0 ? vf : vr) * v[mem[l] * w + j];
      for (int64_t k = 0; k < n; ++k)
        out[mem[k] * w + j] = (v[mem[k] * w + j] - 2.0 * (k == 0 ? vf : vr) * z) / static_cast<double>(t.row_scale[mem[k]]);
    }
  }
  return out;
}

// dX in double, rounded once to fp32: the transposed convolution of the gradient operand g
// (rows (n, oh, ow) of c.cout values) with the weights w ([Cout][Cin k k]):
// dx[n, ci, ih, iw] = sum over (o, kh, kw) with oh = (ih + pad - kh) / stride, ow likewise,
// inside the gradient image, of g[(n, oh, ow), o] w[o, ci, kh, kw].
Tensor dgrad_fp64(const std::vector<double>& g, const std::vector<double>& w, const ConvCase& c, int64_t Ho, int64_t Wo) {
  const int64_t ckk = c.cin * c.k * c.k;
  Tensor dx = Tensor::empty({c.n, c.cin, c.h, c.w});
  for (int64_t n = 0; n < c.n; ++n)
    for (int64_t ci = 0; ci < c.cin; ++ci)
      for (int64_t ih = 0; ih < c.h; ++ih)
        for (int64_t iw = 0; iw < c.w; ++iw) {
          double sum = 0;
          for (int64_t o = 0; o < c.cout; ++o)
            for (int64_t kh = 0; kh < c.k; ++kh)
              for (int64_t kw = 0; kw < c.k; ++kw) {
                const int64_t sh = ih + c.pad - kh, sv = iw + c.pad - kw, oh = sh / c.stride, ow = sv / c.stride;
                if (sh < 0 || sv < 0 || sh % c.stride || sv % c.stride || oh >= Ho || ow >= Wo) continue;
                sum += g[((n * Ho + oh) * Wo + ow) * c.cout + o] * w[o * ckk + (ci * c.k + kh) * c.k + kw];
              }
          dx.data<float>()[((n * c.cin + ci) * c.h + ih) * c.w + iw] = static_cast<float>(sum);
        }
  return dx;
}

std::vector<double> as_doubles(const Tensor& t) {
  return std::vector<double>(t.data<float>(), t.data<float>() + t.numel());
}

// dW of a conv from the codes the integer path multiplied, summed in double: the wgrad operand G
// (rows [N*P, Cout], a per-tensor or per-column grid) against the patches of the saved input
// codes (one per-tensor grid; padding is the grid's zero code, whose value is 0 in fp32 but
// may be ~2^-24 |lo| off 0 in double). The integer path's dW is this, rounded once to fp32 (up
// to the double rounding of its corrections): a batching or accumulation error shows at once.
// With `sim`, the simulated path's dW too: its operands are the codes dequantized in fp32 (code /
// scale + lo: off by up to 2 eps (|v| + |lo|), |lo| possibly >> |v|), summed in fp32 in some
// order (up to (K + 1) eps sum_k |g_k x_k|), so per element within
// (K + 2) eps sum_k |g_k x_k| + 2 eps sum_k (2 |g_k x_k| + |lo_g| |x_k| + |g_k| |lo_x|).
void expect_wgrad_exact(const Tensor& got, const QuantizedTensor& gq, const QuantizedTensor& xq, const ConvCase& c,
                        int64_t ho, int64_t wo, const std::string& what, const Tensor* sim = nullptr) {
  const int64_t P = ho * wo, ckk = c.cin * c.k * c.k;
  const bool per_col = gq.scale.size() > 1;
  const long zero_code = std::lrint(-static_cast<double>(xq.lo[0]) * xq.scale[0]);  // as the layer finds it
  const double pad_value = static_cast<double>(zero_code) / static_cast<double>(xq.scale[0]) + static_cast<double>(xq.lo[0]);
  for (int64_t co = 0; co < c.cout; ++co)
    for (int64_t kk = 0; kk < ckk; ++kk) {
      const int64_t ci = kk / (c.k * c.k), kh = (kk / c.k) % c.k, kw = kk % c.k;
      double sum = 0, abs_sum = 0, deq = 0;
      const double lo_g = std::fabs(static_cast<double>(gq.lo[per_col ? co : 0])), lo_x = std::fabs(static_cast<double>(xq.lo[0]));
      for (int64_t n = 0; n < c.n; ++n)
        for (int64_t oh = 0; oh < ho; ++oh)
          for (int64_t ow = 0; ow < wo; ++ow) {
            const int64_t ih = oh * c.stride - c.pad + kh, iw = ow * c.stride - c.pad + kw;
            const bool inside = ih >= 0 && ih < c.h && iw >= 0 && iw < c.w;
            const int64_t r = n * P + oh * wo + ow;
            const double gv = code_value(gq, r * c.cout + co, per_col ? co : 0);
            const double xv = inside ? code_value(xq, ((n * c.cin + ci) * c.h + ih) * c.w + iw, 0) : pad_value;
            sum += gv * xv, abs_sum += std::fabs(gv * xv);
            deq += 2 * std::fabs(gv * xv) + lo_g * std::fabs(xv) + std::fabs(gv) * lo_x;
          }
      const double g = got.data<float>()[co * ckk + kk];
      ASSERT_LE(std::fabs(g - sum), 0x1p-23 * std::fabs(sum) + 1e-12 * abs_sum)
          << what << " wgrad vs exact: co " << co << " k " << kk << " got " << g << " want " << sum;
      if (sim) {
        const double gs = sim->data<float>()[co * ckk + kk], K = static_cast<double>(c.n * ho * wo);
        ASSERT_LE(std::fabs(gs - sum), (K + 2) * kEps * abs_sum + 2 * kEps * deq)
            << what << " simulated wgrad vs exact: co " << co << " k " << kk << " got " << gs << " want " << sum;
      }
    }
}

}  // namespace

TEST(intPath, ConvEqualsSimulatedEverywhere) {
  const ConvCase cases[] = {
      {4, 3, 8, 9, 9, 3, 1, 1},   // K = 27: not a multiple of 4
      {2, 5, 7, 8, 6, 3, 2, 1},   // odd channels, stride 2, non-square
      {1, 16, 16, 7, 7, 3, 1, 1}, // N = 1
      {3, 13, 6, 5, 5, 1, 2, 0},  // 1x1 stride 2 (shortcut)
      {2, 8, 5, 6, 6, 3, 1, 0},   // no padding
      {2, 9, 4, 4, 4, 5, 1, 2},   // 5x5 kernel, K = 225
      {2, 32, 48, 5, 5, 3, 1, 1}, // Ckk = 288: BHQ's dgrad tiles of 113 rows, groups across tiles
      {20, 8, 6, 7, 7, 3, 1, 1},  // wgrad: 8 sample groups of 2-3, each one GEMM with K = 98 / 147
      {40, 32, 2, 24, 24, 3, 1, 1},  // wgrad: 3 samples per GEMM (patches 166 KB each), groups of 5: 3 + 2
                                     // (P = 576: whole 64-byte blocks in the permuting im2col)
      {2, 3, 4, 50, 3, 3, 1, 0},  // one output column: 48 of them span 144 image bytes, more than
                                  // two registers hold (the permuting im2col steps aside)
      {2, 3, 4, 30, 4, 3, 1, 0},  // two output columns: 56 bytes from a 110-byte window (it fits)
      {1, 3, 2, 1, 1, 1, 1, 0},   // a single gradient row (BHQ: one group of one row, H_1 = I)
      {3, 16, 8, 6, 5, 3, 2, 1},  // dgrad fused with its finishing (Ckk = 144, Cout = 8), stride 2
      {2, 16, 12, 5, 5, 1, 1, 0}, // the same for a 1x1 conv (Ckk = 16, Cout = 12: K4 = 3)
      {2, 4, 16, 6, 30, 3, 2, 1}, // fprop's fused kernel (Cout = 16, k Cin = 12), runs of 14 + 1
      // (no padding in these two: a tap that sees only padding has dW ~ 2^-24 |lo| in double,
      // below the bound's resolution)
  };
  const QuantizerKind dgrads[] = {QuantizerKind::ptq, QuantizerKind::ptq_zero, QuantizerKind::psq, QuantizerKind::bhq};
  const QuantizerKind wgrads[] = {QuantizerKind::ptq, QuantizerKind::column};
  uint64_t stream = 0;
  for (const ConvCase& c : cases)
    for (int bits : {2, 4, 5, 8})
      for (QuantizerKind dk : dgrads) {
        const QuantizerKind wk = wgrads[(stream / 7) % 2];
        const Recipe ri = recipe(Arith::integer, {dk, bits}, {wk, bits == 2 ? 4 : bits}, bits == 2 ? 4 : 8);
        Recipe rs = ri;
        rs.arith = Arith::sim;
        Conv2d li("conv", c.cin, c.cout, c.k, c.stride, c.pad, true, ri, 3, 11);
        Conv2d ls("conv", c.cin, c.cout, c.k, c.stride, c.pad, true, rs, 3, 11);
        // Inputs with negative values (first layer) and after a ReLU (non-negative), alternately.
        Tensor x = randn({c.n, c.cin, c.h, c.w}, ++stream);
        if (stream % 2)
          for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = std::max(0.0f, x.data<float>()[i]);
        const StepContext ctx{true, 5, stream};
        const std::string what = "conv n" + std::to_string(c.n) + " cin" + std::to_string(c.cin) + " k" +
                                 std::to_string(c.k) + " s" + std::to_string(c.stride) + " " + traits(dk).name + " " +
                                 std::to_string(bits) + "b";
        const Tensor yi = li.forward(x, ctx), ys = ls.forward(x, ctx);
        ASSERT_TRUE(same_codes(li.saved_input_q(), ls.saved_input_q())) << what;
        const int64_t K = c.cin * c.k * c.k;
        const double ax = max_abs(dequantize(ls.saved_input_q())), aw = max_abs(dequantize(ls.saved_weight_q()));
        expect_within(yi, ys, (K + 2) * kEps * K * ax * aw, what + " fprop");
        const Tensor dy = randn(ys.shape(), 1000 + stream, 1e-2f);
        const Tensor dxi = li.backward(dy, ctx), dxs = ls.backward(dy, ctx);
        ASSERT_TRUE(same_codes(li.last_dgrad_q(), ls.last_dgrad_q())) << what;
        ASSERT_TRUE(same_codes(li.last_wgrad_q(), ls.last_wgrad_q())) << what;
        // dgrad: K = Cout per output tap, up to k*k taps summed (col2im) -> K = Cout k k.
        const int64_t Kd = c.cout * c.k * c.k;
        expect_within(dxi, dxs, (Kd + 2) * kEps * Kd * max_abs_deq(ls.last_dgrad_q()) * aw, what + " dgrad");
        // wgrad: both paths against the sums in double (the simulated one per element within its
        // fp32 summation bound, not (K + 2) eps K max|g| max|x|, which exceeds rms(dW) at K = 23040)
        expect_wgrad_exact(li.weight().grad, li.last_wgrad_q(), li.saved_input_q(), c, yi.size(2), yi.size(3), what,
                           &ls.weight().grad);
        expect_within(li.bias().grad, ls.bias().grad, 0.0, what + " bias");
      }
}

// Conv2d's fused fprop kernels (Cout = 16, and Cout a multiple of 32 in 32-output slices; AVX-512
// VNNI) against the general path (im2row, GEMM kernel, transpose, epilogue), set_conv_fused_fprop
// switching: the same integer products and patch code sums, the same epilogue operations, so the
// same bits. Cout 16, 32 and 64; runs of every length the kernels take (Wo = 30: 28 + 2 and
// 14 + 14 + 2; 15: 14 + 1; 28; 5; 1), stride 2, 1x1 and 3x3, no padding,
// Cin 4 / 8 / 12 / 16, a bias, a residual, 2/5/8-bit codes, and kernel rows of k Cin = 9, 3, 5, 15
// bytes (Cin 3 and 1: the model's first layer; 5x5 and 1x1 with Cin 1, 3x3 with Cin 5), read in
// 4-byte groups whose last bytes belong to the next pixels (zero weights), the image's very last
// group 3 bytes past it.
TEST(intPath, ConvFusedFpropEqualsGeneralPath) {
  const DefaultsOnExit defaults;
  if (!conv_int_kernels().fused_fprop) GTEST_SKIP() << "no fused fprop kernel in this build / on this CPU";
  struct Case {
    int64_t n, cin, h, w, k, stride, pad;
    bool bias;
  };
  const Case cases[] = {{3, 16, 7, 30, 3, 1, 1, false}, {2, 4, 9, 29, 3, 2, 1, true}, {2, 12, 5, 5, 3, 1, 0, true},
                        {1, 16, 4, 1, 1, 1, 0, false},  {2, 16, 28, 28, 3, 1, 1, false}, {3, 8, 6, 15, 1, 2, 0, true},
                        {2, 3, 8, 8, 3, 1, 1, false},   {3, 1, 28, 28, 3, 1, 1, true},  {2, 1, 9, 11, 5, 1, 2, false},
                        {2, 1, 6, 7, 1, 1, 0, true},    {2, 5, 7, 6, 3, 2, 1, false}};
  uint64_t stream = 700;
  for (const int64_t co : {16, 32, 64})
  for (const Case& c : cases)
    for (int bits : {2, 5, 8})
      for (bool with_res : {false, true}) {
        const Recipe r = recipe(Arith::integer, {QuantizerKind::psq, 8}, {QuantizerKind::ptq, 8}, bits);
        Conv2d conv("conv", c.cin, co, c.k, c.stride, c.pad, c.bias, r, 3, 11);
        if (c.bias)
          for (int64_t o = 0; o < co; ++o) conv.bias().value.data<float>()[o] = 0.1f * static_cast<float>(o % 16) - 0.5f;
        Tensor x = randn({c.n, c.cin, c.h, c.w}, ++stream);
        if (stream % 2)
          for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = std::max(0.0f, x.data<float>()[i]);
        const int64_t ho = (c.h + 2 * c.pad - c.k) / c.stride + 1, wo = (c.w + 2 * c.pad - c.k) / c.stride + 1;
        const Tensor res = randn({c.n, co, ho, wo}, 5000 + stream);
        const StepContext ctx{true, 5, stream};
        set_conv_fused_fprop(true);
        const Tensor yf = conv.forward(x, ctx, nullptr, with_res ? &res : nullptr);
        set_conv_fused_fprop(false);
        const Tensor yg = conv.forward(x, ctx, nullptr, with_res ? &res : nullptr);
        set_conv_fused_fprop(true);
        const std::string what = "cin " + std::to_string(c.cin) + " cout " + std::to_string(co) + " " +
                                 std::to_string(c.h) + "x" + std::to_string(c.w) +
                                 " k" + std::to_string(c.k) + " s" + std::to_string(c.stride) + " " +
                                 std::to_string(bits) + "b" + (with_res ? " residual" : "");
        ASSERT_EQ(yf.shape(), yg.shape()) << what;
        EXPECT_EQ(std::memcmp(yf.raw(), yg.raw(), yf.nbytes()), 0) << what;
      }
}

// Conv2d's dgrad kernel fused with its finishing (AVX-512 VNNI; Ckk <= 144 in whole vectors,
// Cout <= 16 a multiple of 4), and for the wider layers the GEMM's vector epilogue, against the
// general path (GEMM kernel, then the scalar epilogue),
// set_conv_fused_dgrad switching: the same bits, for PTQ, PSQ and BHQ. A third of the gradient
// rows sit far from 0 (dY + 40 on every channel of those positions: a row offset O of ~10^5 code
// units, whose term O rb is not exact in fp32), the others cover 0. Stride 2, 1x1, Cout 4 / 8 /
// 16, 2/5/8 bits; the 3x3 stride-1 16-channel layers (AccWindow3x3: no zeroing of its
// accumulator between samples) with padding 0, 1 and 2 and more samples than threads, so that
// each thread's accumulator serves several samples.
TEST(intPath, ConvFusedDgradEqualsGeneralPath) {
  const DefaultsOnExit defaults;
  if (!conv_int_kernels().fused_dgrad) GTEST_SKIP() << "no fused dgrad kernel in this build / on this CPU";
  set_conv_direct_dgrad(false);  // (PTQ's dgrad would take the direct form: not this test's)
  struct Case {
    int64_t n, cin, cout, h, w, k, stride, pad;
  };
  const Case cases[] = {{3, 16, 16, 7, 9, 3, 1, 1}, {2, 16, 8, 9, 8, 3, 2, 1}, {2, 16, 4, 5, 5, 1, 1, 0},
                        {2, 16, 16, 28, 28, 3, 1, 1}, {7, 16, 16, 6, 5, 3, 1, 0}, {6, 16, 16, 5, 7, 3, 1, 2},
                        // wider layers: the GEMM, then the vector epilogue (PTQ, PSQ), through the
                        // register window for 3x3 stride 1 with 32, 48 or 64 input channels (any padding)
                        {3, 32, 32, 9, 9, 3, 1, 1}, {2, 16, 32, 9, 9, 3, 2, 1}, {2, 32, 64, 6, 6, 1, 2, 0},
                        {2, 32, 32, 6, 7, 3, 1, 0}, {3, 32, 16, 5, 6, 3, 1, 2}, {2, 48, 32, 5, 5, 3, 1, 1},
                        {2, 64, 16, 6, 5, 3, 1, 1}};
  const QuantizerKind dgrads[] = {QuantizerKind::ptq, QuantizerKind::psq, QuantizerKind::bhq};
  uint64_t stream = 900;
  for (const Case& c : cases)
    for (int bits : {2, 5, 8})
      for (QuantizerKind dk : dgrads) {
        const Recipe r = recipe(Arith::integer, {dk, bits}, {QuantizerKind::ptq, 8}, 8);
        Conv2d conv("conv", c.cin, c.cout, c.k, c.stride, c.pad, false, r, 3, 11);
        Tensor x = randn({c.n, c.cin, c.h, c.w}, ++stream);
        const int64_t ho = (c.h + 2 * c.pad - c.k) / c.stride + 1, wo = (c.w + 2 * c.pad - c.k) / c.stride + 1;
        Tensor dy = randn({c.n, c.cout, ho, wo}, 6000 + stream, 1e-2f);
        for (int64_t n = 0; n < c.n; ++n)
          for (int64_t p = 0; p < ho * wo; p += 3)
            for (int64_t o = 0; o < c.cout; ++o) dy.data<float>()[(n * c.cout + o) * ho * wo + p] += 40.0f;
        const StepContext ctx{true, 5, stream};
        Tensor dx[2];
        for (int f = 0; f < 2; ++f) {
          set_conv_fused_dgrad(f == 0);
          conv.forward(x, ctx);
          dx[f] = conv.backward(dy, ctx);
        }
        set_conv_fused_dgrad(true);
        const std::string what = "cin " + std::to_string(c.cin) + " cout " + std::to_string(c.cout) + " k" +
                                 std::to_string(c.k) + " s" + std::to_string(c.stride) + " " + traits(dk).name + " " +
                                 std::to_string(bits) + "b";
        ASSERT_EQ(dx[0].shape(), dx[1].shape()) << what;
        EXPECT_EQ(std::memcmp(dx[0].raw(), dx[1].raw(), dx[0].nbytes()), 0) << what;
      }
  set_conv_direct_dgrad(true);
}

namespace {
// dW of one training forward and backward with the direct wgrad kernel ([0]) and without ([1]).
std::array<Tensor, 2> dw_direct_and_general(Conv2d& conv, const Tensor& x, const Tensor& dy, const StepContext& ctx) {
  std::array<Tensor, 2> dw;
  for (int d = 0; d < 2; ++d) {
    set_conv_direct_wgrad(d == 0);
    conv.weight().grad.fill(0.0);
    conv.forward(x, ctx);
    conv.backward(dy, ctx);
    dw[d] = conv.weight().grad.clone();
  }
  set_conv_direct_wgrad(true);
  return dw;
}
}  // namespace

// Conv2d's direct wgrad kernels (16 -> 16 channels, 1 -> 16, and the wider layers: Cin a multiple
// of 16 from 32, Cout a multiple of 16; stride 1; AVX-512 VNNI and VBMI: no im2col) against its
// general path (im2col rows, GEMM kernel), set_conv_direct_wgrad switching: exact integer sums
// either way, so the same bits of dW. Rows whose length is not a multiple of 4 (Wo = 5, 7, 30,
// 11), 1x1, 3x3 and 5x5 (one input channel: 25 taps, passes of 9, 9 and 7; the wider layers:
// passes of 3 and 2 taps) with and without padding, 2/5/8-bit codes, per-tensor and per-column
// gradient grids; 128 x 128 images (P = 16384) make the int32 partials widen every 4 samples (the
// int32 bound) with 10 samples: a flush and a remainder on each thread.
TEST(intPath, ConvDirectWgradEqualsGeneralPath) {
  const DefaultsOnExit defaults;
  if (!conv_int_kernels().direct_wgrad) GTEST_SKIP() << "no direct wgrad kernel in this build / on this CPU";
  struct Case {
    int64_t n, h, w, k, pad;
  };
  const Case cases[] = {{3, 28, 28, 3, 1}, {2, 7, 5, 3, 1}, {2, 9, 7, 3, 0}, {3, 6, 30, 1, 0},
                        {2, 11, 13, 5, 1}, {10, 128, 128, 3, 1}};
  uint64_t stream = 1300;
  const std::pair<int64_t, int64_t> channels[] = {{16, 16}, {1, 16}, {32, 32}, {64, 64}, {32, 16}, {48, 64}};
  for (const auto& [cin, cout] : channels)
    for (const Case& c : cases)
      for (int bits : {2, 5, 8})
        for (QuantizerKind wk : {QuantizerKind::ptq, QuantizerKind::column}) {
          // (the wider layers at 2 and 8 bits, on the 128 x 128 images once: 32 -> 16, 8 bits, per tensor)
          if (cin >= 32 && (bits == 5 || (c.h * c.w > 1024 && (cin != 32 || cout != 16 || bits != 8 ||
                                                                 wk != QuantizerKind::ptq))))
            continue;
          const Recipe r = recipe(Arith::integer, {QuantizerKind::psq, 8}, {wk, bits}, bits == 2 ? 4 : 8);
          Conv2d conv("conv", cin, cout, c.k, 1, c.pad, false, r, 3, 11);
          Tensor x = randn({c.n, cin, c.h, c.w}, ++stream);
          if (stream % 2)
            for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = std::max(0.0f, x.data<float>()[i]);
          const int64_t ho = c.h + 2 * c.pad - c.k + 1, wo = c.w + 2 * c.pad - c.k + 1;
          const Tensor dy = randn({c.n, cout, ho, wo}, 7000 + stream, 1e-2f);
          const StepContext ctx{true, 5, stream};
          const std::array<Tensor, 2> dw = dw_direct_and_general(conv, x, dy, ctx);
          const std::string what = std::to_string(cin) + "->" + std::to_string(cout) + " " + std::to_string(c.h) + "x" + std::to_string(c.w) +
                                   " k" + std::to_string(c.k) + " pad" + std::to_string(c.pad) + " " + traits(wk).name +
                                   " " + std::to_string(bits) + "b";
          EXPECT_EQ(std::memcmp(dw[0].raw(), dw[1].raw(), dw[0].nbytes()), 0) << what;
          if (c.h * c.w <= 1024 && (cin <= 16 || bits == 8)) {  // (and against the sums in double, where that is quick)
            const ConvCase cc{c.n, cin, cout, c.h, c.w, c.k, 1, c.pad};
            expect_wgrad_exact(dw[0], conv.last_wgrad_q(), conv.saved_input_q(), cc, ho, wo, what);
          }
        }
}

// The direct wgrads at their int32 bound: activation codes 255 (x = 1 but one 0) against
// gradient codes -128 (dY = -1 but one value above), P = 16384 positions per sample, so each
// int32 partial reaches 255 * 128 * 16384 per sample, 2.14e9 over the 4 samples it holds before
// it is widened (one more sample would wrap). dW equals the general path's (int64 throughout).
TEST(intPath, ConvDirectWgradWorstCaseIsExact) {
  const DefaultsOnExit defaults;
  if (!conv_int_kernels().direct_wgrad) GTEST_SKIP() << "no direct wgrad kernel in this build / on this CPU";
  const int64_t n = 10, hw = 128;
  const Recipe r = recipe(Arith::integer, {QuantizerKind::psq, 8}, {QuantizerKind::ptq, 8}, 8);
  for (int64_t cin : {16, 1}) {
    Conv2d conv("conv", cin, 16, 3, 1, 1, false, r, 3, 11);
    Tensor x = Tensor::empty({n, cin, hw, hw});
    x.fill(1.0);
    x.data<float>()[0] = 0.0f;
    Tensor dy = Tensor::empty({n, 16, hw, hw});
    dy.fill(-1.0);
    dy.data<float>()[5] = 1e-3f;
    const StepContext ctx{true, 5, 77};
    const std::array<Tensor, 2> dw = dw_direct_and_general(conv, x, dy, ctx);
    const uint8_t* xc = conv.saved_input_q().codes.data<uint8_t>();
    const uint8_t* gc = conv.last_wgrad_q().codes.data<uint8_t>();
    EXPECT_EQ(xc[1], 255) << cin;
    EXPECT_EQ(gc[0], 0) << cin;  // (s8: -128)
    EXPECT_EQ(std::memcmp(dw[0].raw(), dw[1].raw(), dw[0].nbytes()), 0) << cin;
  }
}

TEST(intPath, LinearEqualsSimulatedEverywhere) {
  struct Case {
    int64_t n, in, out;
  };
  // The last case has more output features than samples and M N > 2^16: qgemm computes the
  // transposed product and transposes it back in a parallel loop (once crashed: the loop read a
  // thread_local buffer by name from the worker threads).
  const Case cases[] = {{1, 7, 3}, {5, 67, 10}, {33, 130, 17}, {64, 256, 64}, {100, 48, 1024}};
  uint64_t stream = 500;
  for (const Case& c : cases)
    for (int bits : {2, 5, 8})
      for (QuantizerKind dk : {QuantizerKind::ptq, QuantizerKind::psq, QuantizerKind::bhq})
        for (QuantizerKind wk : {QuantizerKind::ptq, QuantizerKind::column}) {
          const Recipe ri = recipe(Arith::integer, {dk, bits}, {wk, 8});
          Recipe rs = ri;
          rs.arith = Arith::sim;
          Linear li("fc", c.in, c.out, true, ri, 2, 7), ls("fc", c.in, c.out, true, rs, 2, 7);
          const Tensor x = randn({c.n, c.in}, ++stream);
          const StepContext ctx{true, 9, stream};
          const std::string what = "linear " + std::to_string(c.n) + "x" + std::to_string(c.in) + "->" +
                                   std::to_string(c.out) + " " + traits(dk).name + "/" + traits(wk).name + " " +
                                   std::to_string(bits) + "b";
          const Tensor yi = li.forward(x, ctx), ys = ls.forward(x, ctx);
          const double ax = max_abs(dequantize(ls.saved_input_q())), aw = max_abs(dequantize(ls.saved_weight_q()));
          expect_within(yi, ys, (c.in + 2) * kEps * c.in * ax * aw, what + " fprop");
          const Tensor dy = randn(ys.shape(), 2000 + stream, 1e-2f);
          const Tensor dxi = li.backward(dy, ctx), dxs = ls.backward(dy, ctx);
          ASSERT_TRUE(same_codes(li.last_dgrad_q(), ls.last_dgrad_q())) << what;
          expect_within(dxi, dxs, (c.out + 2) * kEps * c.out * max_abs_deq(ls.last_dgrad_q()) * aw, what + " dgrad");
          expect_within(li.weight().grad, ls.weight().grad,
                        (c.n + 2) * kEps * c.n * max_abs(dequantize(ls.last_wgrad_q())) * ax, what + " wgrad");
        }
}

// Per-output-channel weights: fprop still integer, dgrad falls back to fp32 on the same codes.
TEST(intPath, PerChannelWeightsStillMatch) {
  Recipe ri = recipe(Arith::integer, {QuantizerKind::psq, 8}, {QuantizerKind::ptq, 8});
  ri.weight = {QuantizerKind::symmetric_row, 8};
  Recipe rs = ri;
  rs.arith = Arith::sim;
  Conv2d li("conv", 6, 10, 3, 1, 1, false, ri, 1, 3), ls("conv", 6, 10, 3, 1, 1, false, rs, 1, 3);
  const Tensor x = randn({2, 6, 8, 8}, 77);
  const StepContext ctx{true, 1, 1};
  const Tensor yi = li.forward(x, ctx), ys = ls.forward(x, ctx);
  const double ax = max_abs(dequantize(ls.saved_input_q())), aw = max_abs(dequantize(ls.saved_weight_q()));
  expect_within(yi, ys, 56 * kEps * 54 * ax * aw, "per-channel fprop");
  const Tensor dy = randn(ys.shape(), 78, 1e-2f);
  const Tensor dxi = li.backward(dy, ctx), dxs = ls.backward(dy, ctx);
  expect_within(dxi, dxs, 0.0, "per-channel dgrad (same fp32 fallback)");
}

// BHQ's dgrad gathers each row's group members into its GEMM (groups of up to 4 rows) or finishes
// it from a group sum made beforehand (larger groups): heavy-tailed gradient rows make groups of
// every size, and one dominant row makes a single group of all 400 rows (summed over two GEMM
// chunks).
// Heavy-tailed gradient rows give BHQ groups of 3+ rows (and, with one huge row, a single group
// of every row): through the gathering dgrad (Cin 8, Cout 6) and through the one fused with its
// finishing (Cin 16, Cout 8: Ckk = 144).
TEST(intPath, ConvBhqHeavyTailedGroupsEqualSimulated) {
  const DefaultsOnExit defaults;
  for (auto [cin, cout] : {std::pair<int64_t, int64_t>{8, 6}, {16, 8}})
  for (int variant = 0; variant < 2; ++variant)
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      const Recipe ri = recipe(Arith::integer, {QuantizerKind::bhq, 5}, {QuantizerKind::ptq, 8});
      Recipe rs = ri;
      rs.arith = Arith::sim;
      Conv2d li("conv", cin, cout, 3, 1, 1, false, ri, 3, 11), ls("conv", cin, cout, 3, 1, 1, false, rs, 3, 11);
      const Tensor x = randn({4, cin, 10, 10}, 41);
      const StepContext ctx{true, 5, 7};
      const Tensor yi = li.forward(x, ctx), ys = ls.forward(x, ctx);
      Tensor dy = randn(ys.shape(), 42, 1e-2f);
      // Row (n, p) of the gradient (its Cout values) scaled by exp(2 N(0,1)), or one row by 1e6.
      const int64_t P = 100;
      for (int64_t n = 0; n < 4; ++n)
        for (int64_t p = 0; p < P; ++p) {
          const float f = variant == 0 ? std::exp(2.0f * normal_at({93, 5}, n * P + p)) : (n == 2 && p == 37 ? 1e6f : 1.0f);
          for (int64_t c = 0; c < cout; ++c) dy.data<float>()[(n * cout + c) * P + p] *= f;
        }
      const Tensor dxi = li.backward(dy, ctx), dxs = ls.backward(dy, ctx);
      const std::string what = "bhq heavy-tailed variant " + std::to_string(variant) + ", cin " + std::to_string(cin) +
                               ", " + std::to_string(threads) + " threads";
      ASSERT_TRUE(same_codes(li.last_dgrad_q(), ls.last_dgrad_q())) << what;
      const BhqTransform& t = *li.last_dgrad_q().transform;
      int64_t largest = 0;
      for (int64_t g = 0; g < t.num_groups(); ++g) largest = std::max(largest, t.group_size(g));
      if (variant == 0) EXPECT_GE(largest, 5) << what;  // not only pairs: groups past the 4 gathered
      else EXPECT_EQ(largest, 400) << what;             // one group of every row
      const double aw = max_abs(dequantize(ls.saved_weight_q()));
      const int64_t Kd = cout * 9;
      expect_within(dxi, dxs, (Kd + 2) * kEps * Kd * max_abs_deq(ls.last_dgrad_q()) * aw, what);
    }
  set_num_threads(0);
}

// Rows per sample (Recipe::dgrad_rows = sample, the paper's): the dgrad draw is
// quantize_samples_nchw's (checked against its oracle), the wgrad draw the same as with pixel
// rows, and the integer dgrad (each sample's grid on its pixel rows; BHQ's T^-1 across samples
// group by group as their samples finish) equals the simulated one within the tolerance above,
// and is bit-identical on 1 and 2 threads. Samples scaled by exp(2 N(0,1)) so that BHQ makes
// groups of several samples. Layers: 16 -> 16 3x3 (the dgrad fused with its finishing), 32 -> 32
// 3x3 (general path, window epilogue), 16 -> 32 3x3 stride 2, 16 -> 32 1x1 stride 2 (no padding),
// 8 -> 12 (channels not a multiple of 16: the quantizer's generic path), with 2..8 bits.
TEST(intPath, ConvPerSampleRowsEqualSimulated) {
  const DefaultsOnExit defaults;
  const ConvCase cases[] = {{9, 16, 16, 8, 8, 3, 1, 1},  {6, 32, 32, 7, 7, 3, 1, 1}, {6, 16, 32, 9, 9, 3, 2, 1},
                            {5, 16, 32, 8, 8, 1, 2, 0},  {7, 8, 12, 6, 6, 3, 1, 1}, {6, 16, 16, 3, 3, 3, 1, 0},
                            {6, 8, 12, 3, 3, 3, 1, 0},   {1, 16, 16, 5, 5, 3, 1, 1}};  // (then P = 1, P = 1, N = 1)
  for (const ConvCase& c : cases)
    for (QuantizerKind dk : {QuantizerKind::psq, QuantizerKind::bhq})
      for (int bits : {3, 8}) {
        const std::string what = std::string(traits(dk).name) + std::to_string(bits) + " " + std::to_string(c.cin) + "->" +
                                 std::to_string(c.cout) + " k" + std::to_string(c.k) + " s" + std::to_string(c.stride);
        Recipe ri = recipe(Arith::integer, {dk, bits}, {QuantizerKind::ptq, 8});
        ri.dgrad_rows = GradRows::sample;
        Recipe rs = ri, rp = ri;
        rs.arith = Arith::sim;
        rp.dgrad_rows = GradRows::pixel;
        const Tensor x = randn({c.n, c.cin, c.h, c.w}, 51);
        const StepContext ctx{true, 4, 9};
        Tensor dxi[2];
        QuantizedTensor gi[2];
        for (int threads : {1, 2}) {
          set_num_threads(threads);
          Conv2d li("conv", c.cin, c.cout, c.k, c.stride, c.pad, false, ri, 5, 13);
          const Tensor y = li.forward(x, ctx);
          Tensor dy = randn(y.shape(), 52, 1e-2f);
          scale_samples(dy, 94);
          dxi[threads - 1] = li.backward(dy, ctx);
          gi[threads - 1] = li.last_dgrad_q();
          if (threads == 2) break;
          const QuantizedTensor want = quantize_samples_nchw_ref(dy, {dk, bits}, grad_key(ctx.seed, ctx.step, 5, GradRole::dgrad));
          ASSERT_TRUE(same_codes(li.last_dgrad_q(), want)) << what;
          if (dk == QuantizerKind::bhq && c.n > 5) {
            ASSERT_TRUE(want.transform.has_value()) << what;
            int64_t largest = 0;
            for (int64_t g = 0; g < want.transform->num_groups(); ++g) largest = std::max(largest, want.transform->group_size(g));
            EXPECT_GE(largest, 3) << what;  // groups of several samples
          }
          Conv2d ls("conv", c.cin, c.cout, c.k, c.stride, c.pad, false, rs, 5, 13);
          Conv2d lp("conv", c.cin, c.cout, c.k, c.stride, c.pad, false, rp, 5, 13);
          ls.forward(x, ctx), lp.forward(x, ctx);
          const Tensor dxs = ls.backward(dy, ctx);
          lp.backward(dy, ctx);
          ASSERT_TRUE(same_codes(li.last_dgrad_q(), ls.last_dgrad_q())) << what;
          ASSERT_TRUE(same_codes(li.last_wgrad_q(), lp.last_wgrad_q())) << what << ": wgrad draw as with pixel rows";
          EXPECT_EQ(std::memcmp(li.weight().grad.raw(), lp.weight().grad.raw(), lp.weight().grad.nbytes()), 0) << what;
          const double aw = max_abs(dequantize(ls.saved_weight_q()));
          const int64_t Kd = c.cout * c.k * c.k;
          expect_within(dxi[0], dxs, (Kd + 2) * kEps * Kd * max_abs_deq(ls.last_dgrad_q()) * aw, what);
        }
        set_num_threads(0);
        ASSERT_TRUE(same_codes(gi[0], gi[1])) << what << ": codes on 1 and 2 threads";
        EXPECT_EQ(std::memcmp(dxi[0].raw(), dxi[1].raw(), dxi[0].nbytes()), 0) << what << ": dX on 1 and 2 threads";
      }
}

// The direct dgrad of per-sample grids and of PTQ's one grid (Conv2d::dgrad_int_direct: Cin = 16
// or a multiple of 32; each sample's dX as a convolution of its gradient codes with the flipped
// weights, by stride phases, the offsets' terms per border class) against the fp64 transposed convolution of the
// dequantized codes, and against the per-pixel-row form (set_conv_direct_dgrad(false)). Both
// evaluate the exact integer sum with a handful of fp32 roundings, each of a term no larger
// than ~2 K max|g| max|w| (K = Cout k k terms), so they agree with the fp64 value within
// 16 eps K max|g| max|w| (BHQ: max|g| as max_abs_deq, T^-1's amplification included) -- K
// times tighter than the int-vs-sim bound above, whose fp32 GEMM errs by K eps per term.
// Shapes: 16, 32, 64 input channels; padding 0, 1, 2 (k 5); Cout 3, 5, 12 (k Cout not a multiple
// of 4: the kernel rows' gap bytes); 1x1; non-square images; N = 1; stride 2 (3x3, 1x1: phases
// no tap reaches, 5x5) and 3; and Cin 12 (not direct).
TEST(intPath, ConvDirectDgradEqualsExactValue) {
  const DefaultsOnExit defaults;
  const ConvCase cases[] = {{4, 16, 16, 9, 9, 3, 1, 1}, {3, 32, 16, 7, 7, 3, 1, 1}, {3, 32, 32, 7, 6, 3, 1, 1},
                            {3, 64, 64, 5, 5, 3, 1, 1}, {3, 16, 12, 6, 6, 3, 1, 0}, {2, 32, 8, 6, 7, 5, 1, 2},
                            {2, 16, 3, 5, 5, 3, 1, 1},  {2, 16, 5, 6, 5, 3, 1, 1},  {2, 64, 16, 4, 4, 1, 1, 0},
                            {1, 16, 16, 3, 3, 3, 1, 2}, {3, 16, 32, 9, 9, 3, 2, 1}, {3, 32, 64, 8, 8, 3, 2, 1},
                            {2, 16, 32, 8, 8, 1, 2, 0}, {2, 32, 16, 7, 6, 3, 2, 0}, {2, 16, 8, 10, 9, 5, 2, 2},
                            {2, 16, 16, 7, 8, 3, 3, 1}, {2, 12, 16, 5, 5, 3, 1, 1}};  // (the last: not direct, Cin 12)
  for (const ConvCase& c : cases)
    for (QuantizerKind dk : {QuantizerKind::psq, QuantizerKind::bhq, QuantizerKind::ptq})
      for (int bits : {3, 8})
        for (bool far : {false, true}) {
          const std::string what = std::string(traits(dk).name) + std::to_string(bits) + " " + std::to_string(c.cin) + "->" +
                                   std::to_string(c.cout) + " k" + std::to_string(c.k) + " s" + std::to_string(c.stride) +
                                   " pad " + std::to_string(c.pad) + (far ? " far from 0" : "");
          Recipe r = recipe(Arith::integer, {dk, bits}, {QuantizerKind::ptq, 8});
          r.dgrad_rows = GradRows::sample;
          Conv2d l("conv", c.cin, c.cout, c.k, c.stride, c.pad, false, r, 5, 13);
          const Tensor x = randn({c.n, c.cin, c.h, c.w}, 61);
          const StepContext ctx{true, 4, 9};
          const Tensor y = l.forward(x, ctx);
          Tensor dy = randn(y.shape(), 62, 1e-2f);
          scale_samples(dy, 95);
          const int64_t per = dy.numel() / c.n;
          // Sample 0 (with PTQ: every sample) far from 0 (+1000): a grid that does not cover 0, its
          // offset Lz ~10^6 code units (Oz clamped to 255, the rest in E; unclamped, Oz Zb overflows).
          if (far)
            for (int64_t i = 0; i < (dk == QuantizerKind::ptq ? c.n : 1) * per; ++i) dy.data<float>()[i] += 1000.0f;
          set_conv_direct_dgrad(false);
          const Tensor rows = l.backward(dy, ctx);
          const QuantizedTensor gq = l.last_dgrad_q();
          set_conv_direct_dgrad(true);
          const Tensor direct = l.backward(dy, ctx);
          ASSERT_TRUE(same_codes(gq, l.last_dgrad_q())) << what;
          // fp64 of the dequantized (fp32) operands
          const Tensor g = dequantize(gq), w = dequantize(l.saved_weight_q());
          const int64_t K = c.cout * c.k * c.k;
          const Tensor want = dgrad_fp64(as_doubles(g), as_doubles(w), c, y.size(2), y.size(3));
          const double bound = 16 * kEps * K * max_abs_deq(gq) * max_abs(w);
          expect_within(direct, want, bound, what + ": direct vs fp64");
          expect_within(rows, want, bound, what + ": per-pixel rows vs fp64");
        }
}

// The fprop and the default dgrad (a gradient grid per output pixel for PSQ and BHQ; PTQ's one
// grid as the direct convolution where that applies) against the fp64 value of the same codes:
// y = sum over (ci, kh, kw) of x w + b, dX the transposed convolution of the gradient operand
// (BHQ's T^-1 applied in double, deq_exact) with the weights. Both layers evaluate the exact
// integer sum with a handful of fp32 roundings of terms no larger than ~2 K max|a| max|b| (the
// bias and residual adds: a rounding of |y|), so they stay within 16 eps K max|a| max|b| + 2 eps
// max|b|: K times tighter than the int-vs-sim bound. The largest error seen is 0.03 (fprop) and
// 0.21 (dgrad) of the bound; the weights' values off by a factor 1 + 1e-5 in the reference fail
// 70 of the 288 comparisons (1 + 1e-4: 266). Shapes through each kernel: the fused fprop (Cout 16, 32, 64; Cin 1, 3, 16, 32),
// the pixel-row dgrad fused with its finishing (Cout <= 16, Ckk <= 144), through the register
// window (3x3 stride 1, Cin 32 / 64) and the general epilogue (stride 2, 1x1, 5x5, odd
// channels); padding 0-2; N = 1; gradients far from 0 (sample 0 + 1000: grids not covering 0).
TEST(intPath, ConvFpropAndDgradEqualExactValue) {
  const ConvCase cases[] = {{3, 16, 16, 9, 9, 3, 1, 1}, {2, 1, 16, 12, 11, 3, 1, 1}, {2, 3, 32, 8, 8, 3, 1, 1},
                            {2, 16, 32, 9, 9, 3, 2, 1}, {2, 32, 32, 7, 6, 3, 1, 1}, {2, 32, 64, 6, 6, 1, 2, 0},
                            {2, 64, 64, 5, 5, 3, 1, 1}, {2, 16, 8, 6, 7, 3, 1, 0},  {1, 16, 12, 5, 5, 1, 1, 0},
                            {2, 5, 7, 8, 6, 3, 2, 1},   {2, 9, 4, 6, 6, 5, 1, 2},   {2, 32, 16, 7, 7, 3, 1, 2}};
  double worst_f = 0, worst_d = 0;  // the largest error seen, as a fraction of its bound
  for (const ConvCase& c : cases)
    for (QuantizerKind dk : {QuantizerKind::psq, QuantizerKind::bhq, QuantizerKind::ptq})
      for (int bits : {3, 8})
        for (bool far : {false, true}) {
          const std::string what = std::string(traits(dk).name) + std::to_string(bits) + " " + std::to_string(c.cin) +
                                   "->" + std::to_string(c.cout) + " k" + std::to_string(c.k) + " s" +
                                   std::to_string(c.stride) + " pad " + std::to_string(c.pad) + (far ? " far from 0" : "");
          const Recipe r = recipe(Arith::integer, {dk, bits}, {QuantizerKind::ptq, 8}, bits);
          Conv2d l("conv", c.cin, c.cout, c.k, c.stride, c.pad, true, r, 5, 13);
          for (int64_t o = 0; o < c.cout; ++o) l.bias().value.data<float>()[o] = 0.25f * static_cast<float>(o % 5) - 0.5f;
          Tensor x = randn({c.n, c.cin, c.h, c.w}, 71 + c.cin);
          if (c.cin % 2)
            for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = std::max(0.0f, x.data<float>()[i]);
          const StepContext ctx{true, 4, 9};
          const Tensor y = l.forward(x, ctx);
          const int64_t Ho = y.size(2), Wo = y.size(3), ckk = c.cin * c.k * c.k;
          const QuantizedTensor& xq = l.saved_input_q();
          const QuantizedTensor& wq = l.saved_weight_q();
          const std::vector<double> xv = deq_exact(xq), wv = deq_exact(wq);
          const long zero_code = std::lrint(-static_cast<double>(xq.lo[0]) * xq.scale[0]);
          const double pad_value = static_cast<double>(zero_code) / static_cast<double>(xq.scale[0]) + static_cast<double>(xq.lo[0]);
          double ax = std::fabs(pad_value), aw = 0, ab = 0;
          for (double v : xv) ax = std::max(ax, std::fabs(v));
          for (double v : wv) aw = std::max(aw, std::fabs(v));
          for (int64_t o = 0; o < c.cout; ++o) ab = std::max(ab, std::fabs(static_cast<double>(l.bias().value.data<float>()[o])));
          Tensor want = Tensor::empty(y.shape());
          for (int64_t n = 0; n < c.n; ++n)
            for (int64_t o = 0; o < c.cout; ++o)
              for (int64_t oh = 0; oh < Ho; ++oh)
                for (int64_t ow = 0; ow < Wo; ++ow) {
                  double sum = l.bias().value.data<float>()[o];
                  for (int64_t ci = 0; ci < c.cin; ++ci)
                    for (int64_t kh = 0; kh < c.k; ++kh)
                      for (int64_t kw = 0; kw < c.k; ++kw) {
                        const int64_t ih = oh * c.stride - c.pad + kh, iw = ow * c.stride - c.pad + kw;
                        const bool inside = ih >= 0 && ih < c.h && iw >= 0 && iw < c.w;
                        sum += (inside ? xv[((n * c.cin + ci) * c.h + ih) * c.w + iw] : pad_value) *
                               wv[o * ckk + (ci * c.k + kh) * c.k + kw];
                      }
                  want.data<float>()[((n * c.cout + o) * Ho + oh) * Wo + ow] = static_cast<float>(sum);
                }
          const double bound_f = 16 * kEps * ckk * ax * aw + 2 * kEps * ab;
          expect_within(y, want, bound_f, what + ": fprop vs fp64");
          for (int64_t i = 0; i < y.numel(); ++i)
            worst_f = std::max(worst_f, std::fabs(static_cast<double>(y.data<float>()[i]) - want.data<float>()[i]) / bound_f);

          Tensor dy = randn(y.shape(), 72, 1e-2f);
          scale_samples(dy, 96);
          if (far)
            for (int64_t i = 0; i < (dk == QuantizerKind::ptq ? c.n : 1) * dy.numel() / c.n; ++i) dy.data<float>()[i] += 1000.0f;
          const Tensor dx = l.backward(dy, ctx);
          const QuantizedTensor& gq = l.last_dgrad_q();
          if (dk != QuantizerKind::ptq) {
            ASSERT_EQ(gq.rows, c.n * Ho * Wo) << what << ": a grid per output pixel";
          }
          const std::vector<double> gv = deq_exact(gq);
          const int64_t K = c.cout * c.k * c.k;
          const Tensor want_dx = dgrad_fp64(gv, wv, c, Ho, Wo);
          const double bound_d = 16 * kEps * K * max_abs_deq(gq) * aw;
          expect_within(dx, want_dx, bound_d, what + ": dgrad vs fp64");
          for (int64_t i = 0; i < dx.numel(); ++i)
            worst_d = std::max(worst_d, std::fabs(static_cast<double>(dx.data<float>()[i]) - want_dx.data<float>()[i]) / bound_d);
        }
  std::printf("  largest error / bound: fprop %.3g, dgrad %.3g\n", worst_f, worst_d);
}

// The same for Linear: y = x W^T + b and dX = G W against the fp64 value of the codes, bound
// 16 eps K max|a| max|b| (+ the bias's rounding), for each dgrad quantizer, K = 1, 7, 67, 130.
TEST(intPath, LinearEqualsExactValue) {
  struct Case {
    int64_t n, in, out;
  };
  const Case cases[] = {{1, 7, 3}, {5, 67, 10}, {33, 130, 17}, {64, 256, 64}, {9, 1, 5}, {4, 20, 1}};
  uint64_t stream = 800;
  for (const Case& c : cases)
    for (QuantizerKind dk : {QuantizerKind::ptq, QuantizerKind::psq, QuantizerKind::bhq})
      for (int bits : {3, 8}) {
        const std::string what = "linear " + std::to_string(c.n) + "x" + std::to_string(c.in) + "->" +
                                 std::to_string(c.out) + " " + traits(dk).name + " " + std::to_string(bits) + "b";
        Linear l("fc", c.in, c.out, true, recipe(Arith::integer, {dk, bits}, {QuantizerKind::ptq, 8}, bits), 2, 7);
        for (int64_t o = 0; o < c.out; ++o) l.bias().value.data<float>()[o] = 0.3f * static_cast<float>(o % 4) - 0.4f;
        const Tensor x = randn({c.n, c.in}, ++stream);
        const StepContext ctx{true, 9, stream};
        const Tensor y = l.forward(x, ctx);
        const std::vector<double> xv = deq_exact(l.saved_input_q()), wv = deq_exact(l.saved_weight_q());
        double ax = 0, aw = 0, ab = 0;
        for (double v : xv) ax = std::max(ax, std::fabs(v));
        for (double v : wv) aw = std::max(aw, std::fabs(v));
        Tensor want = Tensor::empty(y.shape());
        for (int64_t n = 0; n < c.n; ++n)
          for (int64_t o = 0; o < c.out; ++o) {
            double sum = l.bias().value.data<float>()[o];
            ab = std::max(ab, std::fabs(sum));
            for (int64_t k = 0; k < c.in; ++k) sum += xv[n * c.in + k] * wv[o * c.in + k];
            want.data<float>()[n * c.out + o] = static_cast<float>(sum);
          }
        expect_within(y, want, 16 * kEps * c.in * ax * aw + 2 * kEps * ab, what + ": fprop vs fp64");
        Tensor dy = randn(y.shape(), 3000 + stream, 1e-2f);
        scale_samples(dy, 97);
        const Tensor dx = l.backward(dy, ctx);
        const std::vector<double> gv = deq_exact(l.last_dgrad_q());
        Tensor want_dx = Tensor::empty(x.shape());
        for (int64_t n = 0; n < c.n; ++n)
          for (int64_t k = 0; k < c.in; ++k) {
            double sum = 0;
            for (int64_t o = 0; o < c.out; ++o) sum += gv[n * c.out + o] * wv[o * c.in + k];
            want_dx.data<float>()[n * c.in + k] = static_cast<float>(sum);
          }
        expect_within(dx, want_dx, 16 * kEps * c.out * max_abs_deq(l.last_dgrad_q()) * aw, what + ": dgrad vs fp64");
      }
}

// A build for the machine's own CPU (FQT_NATIVE, the default) on an AVX-512 VNNI CPU, as CI's,
// runs the fast kernels: otherwise the tests above that compare each with its general path would
// skip, and the exact-value tests would see only the general paths.
TEST(intPath, NativeVnniBuildRunsTheFastKernels) {
#if defined(__AVX512VNNI__)
  EXPECT_TRUE(igemm_backend_available(IgemmBackend::vnni));
  const ConvIntKernels k = conv_int_kernels();
  EXPECT_TRUE(k.fused_fprop);
  EXPECT_TRUE(k.fused_dgrad);
  EXPECT_TRUE(k.direct_dgrad);
#if defined(__AVX512VBMI__)
  EXPECT_TRUE(k.direct_wgrad);
#endif
#else
  GTEST_SKIP() << "built without AVX-512 VNNI (FQT_NATIVE=OFF or another CPU)";
#endif
}

// The integer path is thread-count invariant: integer sums are exact.
TEST(intPath, ConvIntegerPathIsThreadInvariant) {
  const DefaultsOnExit defaults;
  const Recipe r = recipe(Arith::integer, {QuantizerKind::bhq, 5}, {QuantizerKind::ptq, 8});
  // 2 and 3 threads: BHQ's dgrad splits the 32 samples 16 + 16 and 10 + 11 + 11
  Tensor outs[3], grads[3], dxs[3];
  for (int t = 0; t < 3; ++t) {
    set_num_threads(t + 1);
    Conv2d l("conv", 8, 12, 3, 1, 1, false, r, 4, 21);
    // 32 x 100 gradient rows x 12 channels: enough work for the parallel passes
    const Tensor x = randn({32, 8, 10, 10}, 31);
    const StepContext ctx{true, 2, 3};
    outs[t] = l.forward(x, ctx);
    dxs[t] = l.backward(randn(outs[t].shape(), 32, 1e-2f), ctx);
    grads[t] = l.weight().grad.clone();
  }
  set_num_threads(0);
  for (int t = 1; t < 3; ++t) {
    EXPECT_EQ(std::memcmp(outs[0].raw(), outs[t].raw(), outs[0].nbytes()), 0) << t + 1 << " threads";
    EXPECT_EQ(std::memcmp(dxs[0].raw(), dxs[t].raw(), dxs[0].nbytes()), 0) << t + 1 << " threads";
    EXPECT_EQ(std::memcmp(grads[0].raw(), grads[t].raw(), grads[0].nbytes()), 0) << t + 1 << " threads";
  }
}

// dgrad_on_codes (the integer dgrad alone, for benchmarks) on backward's own draw gives backward's
// dX bit for bit, for each dgrad quantizer; codes of another shape, and the simulated path, are
// refused with a message.
TEST(intPath, ConvDgradOnCodesEqualsBackward) {
  for (GradRows rows : {GradRows::pixel, GradRows::sample})
    for (QuantizerKind dk : {QuantizerKind::ptq, QuantizerKind::psq, QuantizerKind::bhq}) {
      Recipe r = recipe(Arith::integer, {dk, 8}, {QuantizerKind::ptq, 8});
      r.dgrad_rows = rows;
      const std::string what = std::string(traits(dk).name) + (rows == GradRows::sample ? " rows per sample" : "");
      Conv2d l("conv", 16, 16, 3, 1, 1, false, r, 4, 21);
      const Tensor x = randn({4, 16, 9, 9}, 41);
      const StepContext ctx{true, 2, 3};
      const Tensor y = l.forward(x, ctx);
      const Tensor dx = l.backward(randn(y.shape(), 42, 1e-2f), ctx);
      const Tensor again = l.dgrad_on_codes(l.last_dgrad_q());
      ASSERT_EQ(again.shape(), dx.shape());
      EXPECT_EQ(std::memcmp(again.raw(), dx.raw(), dx.nbytes()), 0) << what;
      const QuantizedTensor wrong = quantize(randn({4 * 81, 8}, 43), {dk, 8}, RngKey{1, 1});
      EXPECT_THROW(l.dgrad_on_codes(wrong), Error) << what;
      if (rows == GradRows::sample && dk == QuantizerKind::psq) {  // a grid per pixel row, not per sample
        EXPECT_THROW(l.dgrad_on_codes(quantize(randn({4 * 81, 16}, 44), {dk, 8}, RngKey{1, 1})), Error) << what;
      }
    }
  Recipe rs = recipe(Arith::sim, {QuantizerKind::psq, 8}, {QuantizerKind::ptq, 8});
  Conv2d l("conv", 16, 16, 3, 1, 1, false, rs, 4, 21);
  const StepContext ctx{true, 2, 3};
  const Tensor y = l.forward(randn({4, 16, 9, 9}, 41), ctx);
  l.backward(randn(y.shape(), 42, 1e-2f), ctx);
  EXPECT_THROW(l.dgrad_on_codes(l.last_dgrad_q()), Error);
}

// forward(x, ctx, xq, &residual) is forward(x) + residual, added as the output is written: the
// same bits as add_inplace afterwards, on the integer, simulated and fp32 paths, and so is
// recompute_output(&residual); a residual of another shape is refused by both.
TEST(intPath, ConvResidualAddEqualsAddAfterwards) {
  for (Arith a : {Arith::integer, Arith::sim})
    for (Mode m : {Mode::fqt, Mode::fp32}) {
      Recipe r = recipe(a, {QuantizerKind::psq, 8}, {QuantizerKind::ptq, 8});
      r.mode = m;
      Conv2d l1("conv", 5, 7, 3, 2, 1, true, r, 4, 21), l2("conv", 5, 7, 3, 2, 1, true, r, 4, 21);
      const Tensor x = randn({3, 5, 9, 9}, 61);
      const StepContext ctx{true, 1, 1};
      Tensor want = l1.forward(x, ctx);
      const Tensor res = randn(want.shape(), 62);
      add_inplace(want, res);
      const Tensor got = l2.forward(x, ctx, nullptr, &res);
      ASSERT_EQ(got.shape(), want.shape());
      EXPECT_EQ(std::memcmp(got.raw(), want.raw(), got.nbytes()), 0) << (a == Arith::integer ? "int" : "sim")
                                                                       << (m == Mode::fqt ? " fqt" : " fp32");
      // recompute_output(&residual) (backward's recompute of a PreAct block's output): the same bits.
      const Tensor again = l2.recompute_output(&res);
      EXPECT_EQ(std::memcmp(again.raw(), want.raw(), again.nbytes()), 0) << (a == Arith::integer ? "int" : "sim")
                                                                         << (m == Mode::fqt ? " fqt" : " fp32");
      const Tensor wrong = randn({3, 7, 4, 4}, 63);
      EXPECT_THROW(l2.recompute_output(&wrong), Error);
      EXPECT_THROW(l2.forward(x, ctx, nullptr, &wrong), Error);
    }
}
