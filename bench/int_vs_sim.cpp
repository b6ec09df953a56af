// How far the integer path's conv output and input gradient are from the simulated path's
// (dequantize, fp32 GEMM) on the same codes: max |int - sim| / max |sim| over 6 seeds, for a
// 16 -> 16 channel 3x3 conv on 8 x 16 x 14 x 14 non-negative inputs, 8-bit codes, each dgrad
// quantizer. The tests bound this loosely (tests/unit/test_int_path.cpp); this prints the figure
// quoted when the finishing arithmetic changes (docs/profiles/README.md).
//   build/bench/bench_int_vs_sim
#include "fqt/layers.hpp"
#include "fqt/quant.hpp"
#include "fqt/rng.hpp"
#include "bench_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

using namespace fqt;

namespace {
Tensor randn(const Shape& shape, uint64_t seed, float s = 1.0f) { return bench::randn(shape, seed, 7, s); }
double rel_dev(const Tensor& a, const Tensor& ref) {
  double mx = 0, err = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    mx = std::max(mx, static_cast<double>(std::fabs(ref.data<float>()[i])));
    err = std::max(err, static_cast<double>(std::fabs(a.data<float>()[i] - ref.data<float>()[i])));
  }
  return err / mx;
}
}  // namespace

int main() {
  for (QuantizerKind dk : {QuantizerKind::ptq, QuantizerKind::psq, QuantizerKind::bhq}) {
    double dgrad = 0, fprop = 0;
    for (uint64_t seed = 1; seed <= 6; ++seed) {
      Recipe ri;
      ri.mode = Mode::fqt;
      ri.arith = Arith::integer;
      ri.dgrad = {dk, 8};
      ri.wgrad = {QuantizerKind::ptq, 8};
      Recipe rs = ri;
      rs.arith = Arith::sim;
      Conv2d li("c", 16, 16, 3, 1, 1, false, ri, 3, 11), ls("c", 16, 16, 3, 1, 1, false, rs, 3, 11);
      Tensor x = randn({8, 16, 14, 14}, seed);
      for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = std::max(0.0f, x.data<float>()[i]);
      const StepContext ctx{true, 5, seed};
      const Tensor yi = li.forward(x, ctx), ys = ls.forward(x, ctx);
      fprop = std::max(fprop, rel_dev(yi, ys));
      const Tensor dy = randn(yi.shape(), 100 + seed, 1e-2f);
      dgrad = std::max(dgrad, rel_dev(li.backward(dy, ctx), ls.backward(dy, ctx)));
    }
    std::printf("%-4s max |int - sim| / max |sim|: fprop %.3g, dgrad %.3g (fp32 epsilon 6e-8)\n", traits(dk).name,
                fprop, dgrad);
  }
  return 0;
}
