// Time of one BatchNorm2d+ReLU training forward into the next convolution's input codes, both
// ways PreAct blocks can run it — forward (fp32 output and its range) then quantize_in_range, or
// forward_codes (no fp32 output; docs/profiles/README.md, session 12) — and of its backward;
// median and fastest of repeated calls on fixed data.
//   build/bench/bench_batchnorm [channels=16] [hw=28] [batch=128] [threads=1] [reps=21]
// (defaults: a stage-1 batch norm of PreAct-ResNet-20 at batch 128 on 1x28x28; the activation
// quantizer of the default recipe, zero-aligned 8-bit)
#include "fqt/layers.hpp"
#include "fqt/quant.hpp"
#include "fqt/recipe.hpp"
#include "bench_util.hpp"

#include <cstdio>
#include <cstdlib>
#include <exception>

using namespace fqt;

using bench::Times;
using bench::time_ms;

int run(int argc, char** argv) {
  auto arg = [&](int i, long def) { return argc > i ? std::atol(argv[i]) : def; };
  const int64_t c = arg(1, 16), hw = arg(2, 28), batch = arg(3, 128);
  const int threads = static_cast<int>(arg(4, 1)), reps = static_cast<int>(arg(5, 21));
  if (c < 1 || hw < 1 || batch < 2 || threads < 1 || reps < 1) {
    std::fprintf(stderr, "usage: bench_batchnorm [channels>=1] [hw>=1] [batch>=2] [threads>=1] [reps>=1]\n");
    return 2;
  }
  set_num_threads(threads);
  const QuantizerSpec act = Recipe{}.activation;
  BatchNorm2d bn("bn", c);
  bn.with_relu();
  const Tensor x = bench::randn({batch, c, hw, hw}, 1, 9);
  const Tensor dy = bench::randn(x.shape(), 2, 9, 1e-2f);
  const StepContext ctx{true, 3, 5};
  const Times two = time_ms(reps, [&] {
    ValueRange r;
    const Tensor y = bn.forward(x, ctx, &r);
    quantize_in_range(y, act, r.lo, r.hi);
  });
  const Times fused = time_ms(reps, [&] { bn.forward_codes(x, ctx, act); });
  const Times back = time_ms(reps, [&] { bn.backward(dy, ctx); });
  std::printf("batch norm + ReLU, %ld channels, %ldx%ld, batch %ld, %d thread(s); median / fastest of %d\n",
              static_cast<long>(c), static_cast<long>(hw), static_cast<long>(hw), static_cast<long>(batch), threads,
              reps);
  std::printf("  forward + quantize_in_range  %8.3f ms  %8.3f ms\n", two.median, two.best);
  std::printf("  forward_codes                %8.3f ms  %8.3f ms\n", fused.median, fused.best);
  std::printf("  backward                     %8.3f ms  %8.3f ms\n", back.median, back.best);
  return 0;
}

int main(int argc, char** argv) { return fqt::bench::main_guard("bench_batchnorm", argc, argv, run); }
