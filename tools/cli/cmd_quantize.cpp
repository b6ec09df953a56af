// fqt quantize: statistics of gradient quantizers on a user's matrix.
#include "commands.hpp"

#include "fqt/npy.hpp"
#include "fqt/stats.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdio>

namespace fqt::cli {

namespace {
struct QuantizeOptions {
  std::string input;
  std::string quantizers = "ptq,psq,bhq";
  std::string bits = "4,8";
  int samples = 200;
  uint64_t seed = 0;
  int threads = 0;
  bool json = false;
};

int run_quantize(const QuantizeOptions& o) {
  std::vector<QuantizerKind> kinds;
  for (const auto& n : split_list(o.quantizers)) kinds.push_back(parse_quantizer(n));
  FQT_INPUT_CHECK(!kinds.empty(), "--quantizer needs at least one name");
  const std::vector<int> bits = parse_bits(o.bits, "--bits");
  FQT_INPUT_CHECK(o.samples >= 2 && o.samples <= 100000, "--samples must be in 2..100000 (got {})", o.samples);
  set_num_threads(o.threads);

  Tensor x = read_npy(o.input);
  FQT_INPUT_CHECK(x.dim() == 2, "{}: expected a 2-D array (rows = samples), got shape {}", o.input,
                  shape_str(x.shape()));
  FQT_INPUT_CHECK(x.numel() > 0, "{}: the array is empty (shape {})", o.input, shape_str(x.shape()));
  if (x.dtype() == DType::f64) {  // finite doubles beyond fp32's range would read as "contains Inf" after the cast
    const double* d = x.data<double>();
    for (int64_t i = 0; i < x.numel(); ++i)
      FQT_INPUT_CHECK(!std::isfinite(d[i]) || std::fabs(d[i]) <= std::numeric_limits<float>::max(),
                      "{}: the value {:.9g} at row {}, column {} is beyond float32's range (|x| <= {:.9g}); fqt "
                      "quantizes in float32",
                      o.input, d[i], i / x.size(1), i % x.size(1), std::numeric_limits<float>::max());
  }
  x = x.to(DType::f32);
  check_finite(x, o.input.c_str());
  {  // x - lo must stay finite in fp32 (a matrix spanning -3e38..3e38 gave bias "inf")
    const auto [mn, mx] = std::minmax_element(x.data<float>(), x.data<float>() + x.numel());
    FQT_INPUT_CHECK(static_cast<double>(*mx) - *mn <= 1e38, "{}: values span {:g} .. {:g}, wider than fp32 grids can hold (at most 1e38)",
                    o.input, *mn, *mx);
  }

  nlohmann::json records = nlohmann::json::array();
  if (!o.json) {
    std::printf("%s: %lld x %lld, %d samples per quantizer, seed %llu\n", o.input.c_str(),
                static_cast<long long>(x.size(0)), static_cast<long long>(x.size(1)), o.samples,
                static_cast<unsigned long long>(o.seed));
    std::printf("%-13s %4s  %12s  %12s  %12s  %9s  %10s  %10s\n", "quantizer", "bits", "measured_var",
                "analytic_var", "bound", "var/|X|^2", "bias", "noise_floor");
  }
  for (int b : bits)
    for (QuantizerKind k : kinds) {
      QuantStats s = quantizer_stats(x, {k, b}, o.samples, o.seed);
      const double rel = s.input_norm2 > 0 ? s.measured_variance / s.input_norm2 : 0.0;
      if (o.json) {
        records.push_back({{"quantizer", s.quantizer},
                           {"bits", s.bits},
                           {"samples", s.samples},
                           {"rows", s.rows},
                           {"cols", s.cols},
                           {"measured_variance", s.measured_variance},
                           {"analytic_variance", s.analytic_variance},
                           {"bound", s.bound},
                           {"relative_variance", rel},
                           {"bias", s.bias},
                           {"bias_noise_floor", s.bias_noise_floor}});
      } else {
        std::printf("%-13s %4d  %12.4e  %12.4e  %12.4e  %9.2e  %10.3e  %10.3e\n", s.quantizer.c_str(), s.bits,
                    s.measured_variance, s.analytic_variance, s.bound, rel, s.bias, s.bias_noise_floor);
      }
    }
  if (o.json) std::printf("%s\n", records.dump(2).c_str());
  return 0;
}
}  // namespace

Runner add_quantize(CLI::App& app) {
  auto o = std::make_shared<QuantizeOptions>();
  std::string names;
  for (const auto& t : quantizer_table()) names += fmt::format("\n  {:<13} {}", t.name, t.description);
  app.description(
      "Quantize a 2-D float32/float64 .npy matrix (rows = samples) K times with each quantizer and\n"
      "bit width, and report: measured variance E||Q(X)-X||^2 over the K draws, the analytic\n"
      "variance sum p(1-p)/scale^2, the theoretical bound (SPEC section 3), and the relative bias\n"
      "||mean - X|| / ||X|| next to its noise floor sqrt(Var/K)/||X||.\n"
      "Example: fqt synth --kind heavy-tailed --out g.npy && fqt quantize --input g.npy\n"
      "Quantizers:" + names);
  app.add_option("-i,--input", o->input, "2-D .npy array (float32 or float64)")->required();
  app.add_option("-q,--quantizer", o->quantizers, "comma-separated quantizer names")->capture_default_str();
  app.add_option("-b,--bits", o->bits, "comma-separated bit widths, 2..8")->capture_default_str();
  app.add_option("-k,--samples", o->samples, "independent draws per quantizer (K)")->capture_default_str();
  app.add_option("--seed", o->seed, "random seed (draw k uses Philox stream k)")->capture_default_str();
  app.add_option("--threads", o->threads, "CPU threads (0 = all)")->capture_default_str();
  app.add_flag("--json", o->json, "print a JSON list of records instead of a table");
  return [o] { return run_quantize(*o); };
}

}  // namespace fqt::cli
