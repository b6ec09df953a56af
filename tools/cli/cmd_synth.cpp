// fqt synth: synthetic gradient-like matrices to try the quantizers on.
#include "commands.hpp"

#include "fqt/npy.hpp"
#include "fqt/stats.hpp"

#include <cstdio>

namespace fqt::cli {

namespace {
struct SynthOptions {
  std::string kind = "heavy-tailed";
  int64_t rows = 128, cols = 1024;
  uint64_t seed = 0;
  std::string out;
};
}  // namespace

Runner add_synth(CLI::App& app) {
  auto o = std::make_shared<SynthOptions>();
  app.description(
      "Write a float32 .npy matrix: gaussian (N(0,1)), uniform (U(-1,1)) or heavy-tailed\n"
      "(row r scaled by exp(2 z_r), z_r ~ N(0,1): per-sample gradients whose ranges span orders of\n"
      "magnitude, where BHQ beats PSQ beats PTQ).");
  app.add_option("--kind", o->kind, "gaussian, uniform or heavy-tailed")->capture_default_str();
  app.add_option("--rows", o->rows, "rows (samples)")->capture_default_str()->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--cols", o->cols, "columns")->capture_default_str()->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  app.add_option("--seed", o->seed, "random seed")->capture_default_str();
  app.add_option("-o,--out", o->out, "output .npy path")->required();
  return [o] {
    SynthKind kind = parse_synth_kind(o->kind);
    FQT_INPUT_CHECK(o->rows * o->cols <= (int64_t{1} << 30), "--rows x --cols is too large (at most 2^30 elements)");
    write_npy(o->out, synthetic_matrix(kind, o->rows, o->cols, o->seed));
    std::printf("wrote %s: %s %lld x %lld (seed %llu)\n", o->out.c_str(), o->kind.c_str(),
                static_cast<long long>(o->rows), static_cast<long long>(o->cols),
                static_cast<unsigned long long>(o->seed));
    return 0;
  };
}

}  // namespace fqt::cli
