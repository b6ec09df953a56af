// Time of one Conv2d's three parts on the integer FQT path — forward (from fp32, and from codes
// through the fused kernel and the general path), dgrad (dY laid out in rows,
// quantized, integer GEMM, epilogue, col2im), wgrad, and backward (both, as training runs them) —
// median and fastest of repeated calls on
// fixed data. A layer-sized measurement: steadier on a shared VM than a whole training step, so a
// change to one of the three can be measured on its own (docs/profiles/README.md).
//   build/bench/bench_conv_layer [cin=16] [cout=16] [hw=28] [batch=128] [threads=1] [reps=21] [dgrad=psq]
// (defaults: a stage-1 conv of PreAct-ResNet-20 at batch 128 on 1x28x28; 8-bit codes throughout)
#include "fqt/layers.hpp"
#include "fqt/quant.hpp"
#include "fqt/rng.hpp"
#include "bench_util.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <vector>

using namespace fqt;

using bench::Times;
using bench::time_ms;

int run(int argc, char** argv) {
  auto arg = [&](int i, long def) { return argc > i ? std::atol(argv[i]) : def; };
  const int64_t cin = arg(1, 16), cout = arg(2, 16), hw = arg(3, 28), batch = arg(4, 128);
  const int threads = static_cast<int>(arg(5, 1)), reps = static_cast<int>(arg(6, 21));
  const std::string dk = argc > 7 ? argv[7] : "psq";
  if (cin < 1 || cout < 1 || hw < 1 || batch < 2 || threads < 1 || reps < 1) {
    std::fprintf(stderr,
                 "usage: bench_conv_layer [cin>=1] [cout>=1] [hw>=1] [batch>=2] [threads>=1] [reps>=1] [ptq|psq|bhq]\n");
    return 2;
  }
  set_num_threads(threads);
  Recipe r;
  r.mode = Mode::fqt;
  r.arith = Arith::integer;
  r.dgrad = {parse_quantizer(dk), 8};
  r.wgrad = {QuantizerKind::ptq, 8};
  Conv2d conv("conv", cin, cout, 3, 1, 1, false, r, 1, 7);
  Tensor x = bench::randn({batch, cin, hw, hw}, 1, 9);
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = std::max(0.0f, x.data<float>()[i]);  // post-ReLU
  const StepContext ctx{true, 3, 5};
  const Tensor y = conv.forward(x, ctx);
  const Tensor dy = bench::randn(y.shape(), 2, 9, 1e-2f);
  const Times f = time_ms(reps, [&] { conv.forward(x, ctx); });
  // On codes (as a PreAct block's batch norm hands them over): the fused kernel and the general
  // path (im2row + GEMM kernel) alternately, rep by rep (set_conv_fused_fprop).
  const QuantizedTensor xq = quantize(x.reshape({batch, cin * hw * hw}), r.activation);
  std::vector<double> fused_ms, general_ms;
  for (int i = 0; i < reps; ++i)
    for (bool fused : {true, false}) {
      set_conv_fused_fprop(fused);
      (fused ? fused_ms : general_ms).push_back(time_ms(1, [&] { conv.forward(x.shape(), ctx, xq); }).median);
    }
  set_conv_fused_fprop(true);
  auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
  auto best = [](const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); };
  const Times d = time_ms(reps, [&] { conv.dgrad(dy, ctx); });
  // dgrad's integer part alone (Conv2d::dgrad_int on the codes of dY's rows, as backward hands
  // them over): the kernel, without the layout and the quantizer.
  const QuantizedTensor gq = quantize(nchw_to_rows(dy), r.dgrad, RngKey{11, 0});
  const Times dk_t = time_ms(reps, [&] { conv.dgrad_on_codes(gq); });
  const Times w = time_ms(reps, [&] { conv.wgrad(dy, ctx); });
  const Times b = time_ms(reps, [&] { conv.backward(dy, ctx); });
  std::printf("conv %ld -> %ld, 3x3, %ldx%ld, batch %ld, %d thread(s), dgrad %s 8-bit; median / fastest of %d\n",
              static_cast<long>(cin), static_cast<long>(cout), static_cast<long>(hw), static_cast<long>(hw),
              static_cast<long>(batch), threads, dk.c_str(), reps);
  std::printf("  forward  %8.3f ms  %8.3f ms\n", f.median, f.best);
  std::printf("  forward on codes, fused kernel   %8.3f ms  %8.3f ms   (Cout 16 or a multiple of 32; else the general path)\n",
              med(fused_ms), best(fused_ms));
  std::printf("  forward on codes, general path   %8.3f ms  %8.3f ms   (im2row, GEMM kernel, transpose, epilogue)\n",
              med(general_ms), best(general_ms));
  std::printf("  dgrad    %8.3f ms  %8.3f ms\n", d.median, d.best);
  std::printf("  dgrad on codes   %8.3f ms  %8.3f ms   (Conv2d::dgrad_on_codes: the integer dgrad alone, no layout or quantizer)\n",
              dk_t.median, dk_t.best);
  std::printf("  wgrad    %8.3f ms  %8.3f ms\n", w.median, w.best);
  std::printf("  backward %8.3f ms  %8.3f ms   (training: wgrad + dgrad, both draws of dY in one quantize_pair)\n",
              b.median, b.best);
  return 0;
}

int main(int argc, char** argv) { return fqt::bench::main_guard("bench_conv_layer", argc, argv, run); }
