// Time of each stage of the gradient quantizers on one layer's gradient in row layout (SPEC's
// [N*P, Cout]: PreAct-ResNet-20's stage-1 conv at batch 128 by default), median and fastest of
// repeated runs (on a drifting VM the fastest is the steadier comparison).
// What `fqt bench step` reports as one quantizer share, split into its passes, so a change to one
// pass can be measured on its own.
//   build/bench/bench_quantizers [rows=100352] [cols=16] [threads=1] [reps=15] [kind=gaussian]
// (FQT_BENCH_COLD=1: caches evicted before each call, as the step leaves them; bench_util.hpp)
// (kind: gaussian, uniform, heavy-tailed; real gradients of PreAct-ResNet-20 form BHQ groups of
// ~2.4 rows, as gaussian data do: ~42% of the rows lead a group.)
#include "fqt/quant.hpp"
#include "fqt/stats.hpp"
#include "kernels/cpu/bhq_fast.hpp"
#include "kernels/cpu/philox_batch.hpp"
#include "bench_util.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

using namespace fqt;

using bench::Times;
using bench::time_ms;

int run(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : 100352, cols = argc > 2 ? std::atoll(argv[2]) : 16;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 1, reps = argc > 4 ? std::atoi(argv[4]) : 15;
  if (rows < 1 || cols < 1 || threads < 1 || reps < 1) {
    std::fprintf(stderr, "usage: bench_quantizers [rows>=1] [cols>=1] [threads>=1] [reps>=1] [kind] [only rows containing]\n");
    return 2;
  }
  set_num_threads(threads);
  const SynthKind kind = parse_synth_kind(argc > 5 ? argv[5] : "gaussian");
  const Tensor x = synthetic_matrix(kind, rows, cols, 1);
  Tensor out = Tensor::empty({rows, cols});
  std::vector<float> u(static_cast<size_t>(rows * cols + 64));
  const BhqTransform t = bhq_transform(x.data<float>(), rows, cols);
  std::vector<double> ranges(static_cast<size_t>(rows));  // BHQ's row ranges (its sort key)
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = x.data<float>() + r * cols;
    ranges[r] = double(*std::max_element(p, p + cols)) - double(*std::min_element(p, p + cols)) + 1e-8;
  }
  std::printf("gradient [%ld, %ld], %d thread(s), median of %d; BHQ: %ld groups\n", static_cast<long>(rows),
              static_cast<long>(cols), threads, reps, static_cast<long>(t.num_groups()));
  std::vector<double> rmin(static_cast<size_t>(rows)), rmax(static_cast<size_t>(rows));
  // The same values as an N,C,H,W gradient (what Conv2d hands quantize_pair_nchw): P positions
  // per sample, the largest of PreAct-ResNet-20's 784 / 196 / 49 that divides the rows.
  int64_t P = rows;
  for (int64_t p : {784, 196, 49})
    if (rows % p == 0) {
      P = p;
      break;
    }
  const Tensor x_nchw = x.reshape({rows / P, cols, P});
  // Each sample's range (what BatchNorm2d's backward hands the per-sample quantizer).
  std::vector<float> slo(static_cast<size_t>(rows / P)), shi(static_cast<size_t>(rows / P));
  for (int64_t n = 0; n < rows / P; ++n) {
    const float* p = x.data<float>() + n * P * cols;
    slo[n] = *std::min_element(p, p + P * cols), shi[n] = *std::max_element(p, p + P * cols);
  }
  // The per-sample quantizer (8 bits), with or without the wgrad draw (ptq 8) and the given ranges.
  auto samples = [&](QuantizerKind a, bool wgrad, bool given) {
    const QuantizerSpec b{QuantizerKind::ptq, 8};
    (void)quantize_samples_nchw(x_nchw, {a, 8}, {1, 2}, wgrad ? &b : nullptr, {1, 3}, nullptr,
                                given ? slo.data() : nullptr, given ? shi.data() : nullptr);
  };
  BhqTransform seq = t;  // what the scattered rows of a group cost: the groups over rows in order
  std::iota(seq.members.begin(), seq.members.end(), 0);
  const std::vector<int64_t> rank = bhq_rank_descending(ranges);
  struct Row {
    const char* name;
    std::function<void()> f;
  };
  const std::vector<Row> table = {
      {"check_finite", [&] { check_finite(x, "x"); }},
      {"fill_uniforms (one draw)", [&] { kernels::fill_uniforms({1, 2}, 0, (rows * cols + 3) / 4, u.data()); }},
      {"bhq_transform (ranges, sort, groups)", [&] { (void)bhq_transform(x.data<float>(), rows, cols); }},
      {"bhq_rank_descending", [&] { (void)bhq_rank_descending(ranges); }},
      {"  parallel (fast path)", [&] { (void)kernels::bhq_rank_descending_parallel(ranges); }},
      {"  bhq_row_ranges (fast path)", [&] { (void)kernels::bhq_row_ranges(x.data<float>(), rows, cols); }},
      {"  bhq_transform_from_ranges", [&] { (void)bhq_transform_from_ranges(ranges, rank); }},
      {"    batched scales (fast path)", [&] { (void)bhq_transform_from_ranges_batched(ranges, rank); }},
      {"bhq_transform_fast", [&] { (void)kernels::bhq_transform_fast(x.data<float>(), rows, cols); }},
      {"BhqTransform::apply", [&] { t.apply(x.data<float>(), out.data<float>(), cols); }},
      {"  the same groups on consecutive rows", [&] { seq.apply(x.data<float>(), out.data<float>(), cols); }},
      {"  bhq_apply_rows (fast path)", [&] {
         kernels::bhq_apply_rows(t, x.data<float>(), cols, out.data<float>(), rmin.data(), rmax.data());
       }},
      {"    its group sums (bhq_group_dots)", [&] { (void)kernels::bhq_group_dots(t, x.data<float>(), cols); }},
      {"quantize ptq 8", [&] { (void)quantize(x, {QuantizerKind::ptq, 8}, {1, 2}); }},
      {"quantize psq 8", [&] { (void)quantize(x, {QuantizerKind::psq, 8}, {1, 2}); }},
      {"quantize_pair psq 8 + ptq 8", [&] {
         (void)quantize_pair(x, {QuantizerKind::psq, 8}, {1, 2}, {QuantizerKind::ptq, 8}, {1, 3});
       }},
      {"quantize_pair_nchw psq 8 + ptq 8", [&] {
         (void)quantize_pair_nchw(x_nchw, {QuantizerKind::psq, 8}, {1, 2}, {QuantizerKind::ptq, 8}, {1, 3});
       }},
      {"quantize_samples_nchw psq 8 + ptq 8", [&] { samples(QuantizerKind::psq, true, false); }},
      {"  psq, the samples' ranges given", [&] { samples(QuantizerKind::psq, true, true); }},
      {"  psq, ranges given, no wgrad draw", [&] { samples(QuantizerKind::psq, false, true); }},
      {"  bhq, ranges given, no wgrad draw", [&] { samples(QuantizerKind::bhq, false, true); }},
      {"quantize_samples_nchw bhq 8 + ptq 8", [&] { samples(QuantizerKind::bhq, true, false); }},
      {"  bhq, the samples' ranges given", [&] { samples(QuantizerKind::bhq, true, true); }},
      {"quantize bhq 8", [&] { (void)quantize(x, {QuantizerKind::bhq, 8}, {1, 2}); }},
      {"quantize bhq 8, then quantize ptq 8", [&] {
         (void)quantize(x, {QuantizerKind::bhq, 8}, {1, 2});
         (void)quantize(x, {QuantizerKind::ptq, 8}, {1, 3});
       }},
      {"quantize_pair bhq 8 + ptq 8", [&] {
         (void)quantize_pair(x, {QuantizerKind::bhq, 8}, {1, 2}, {QuantizerKind::ptq, 8}, {1, 3});
       }},
  };
  std::printf("  %-38s %9s %9s\n", "", "median", "fastest");
  const std::string only = argc > 6 ? argv[6] : "";  // run only the rows whose name contains this
  for (const Row& r : table) {
    if (!only.empty() && std::string(r.name).find(only) == std::string::npos) continue;
    const Times tm = time_ms(reps, r.f);
    std::printf("  %-38s %6.3f ms %6.3f ms\n", r.name, tm.median, tm.best);
  }
  return 0;
}

int main(int argc, char** argv) { return fqt::bench::main_guard("bench_quantizers", argc, argv, run); }
