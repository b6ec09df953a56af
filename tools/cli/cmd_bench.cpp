// fqt bench step: time full training steps (forward + both backward GEMMs + quantizers + SGD)
// of a model in several precision modes, side by side in one process; medians.
#include "commands.hpp"

#include "fqt/layers.hpp"
#include "fqt/models.hpp"
#include "fqt/optim.hpp"
#include "fqt/profile.hpp"
#include "fqt/stats.hpp"

#include <nlohmann/json.hpp>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

namespace fqt::cli {

namespace {
struct StepOptions {
  std::string model = "preact_resnet20";
  std::string modes = "fp32,qat,fqt";
  std::string dgrads = "psq";
  int dgrad_bits = 8;
  int64_t batch = 128;
  std::string input = "1x28x28";
  int steps = 20, warmup = 3, threads = 0;
  bool json = false;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

int run_step_bench(const StepOptions& o) {
  int c = 0, h = 0, w = 0;
  FQT_INPUT_CHECK(std::sscanf(o.input.c_str(), "%dx%dx%d", &c, &h, &w) == 3 && c > 0 && h > 0 && w > 0,
                  "--input must look like CxHxW, e.g. 1x28x28 (got '{}')", o.input);
  FQT_INPUT_CHECK(o.steps >= 1 && o.warmup >= 0, "--steps must be >= 1 and --warmup >= 0");
  FQT_INPUT_CHECK(o.batch >= 1 && o.batch <= 65536, "--batch must be in 1..65536");
  set_num_threads(o.threads);
  struct Config {
    Mode mode;
    QuantizerKind dgrad;
  };
  std::vector<Config> configs;
  for (const auto& m : split_list(o.modes)) {
    Mode mode = parse_mode(m);
    if (mode == Mode::fqt)
      for (const auto& d : split_list(o.dgrads)) configs.push_back({mode, parse_quantizer(d)});
    else
      configs.push_back({mode, QuantizerKind::psq});
  }
  FQT_INPUT_CHECK(!configs.empty(), "--mode needs at least one of fp32, qat, fqt");

  // One fixed batch of N(0,1) inputs and random labels.
  Tensor x = synthetic_matrix(SynthKind::gaussian, o.batch, int64_t{c} * h * w, 1).reshape({o.batch, c, h, w});
  Tensor y = Tensor::empty({o.batch}, DType::i32);
  for (int64_t i = 0; i < o.batch; ++i) y.data<int32_t>()[i] = static_cast<int32_t>(uniform_at({2, 0}, i) * 10) % 10;

  nlohmann::json records = nlohmann::json::array();
  if (!o.json)
    std::printf("%-16s %-5s %-6s %5s  %10s  %10s  %10s  %8s  %9s  %12s\n", "model", "mode", "dgrad", "batch", "median_ms",
                "min_ms", "quant_ms", "quant_%", "images/s", "saved_act_MB");
  for (const Config& cfg : configs) {
    Recipe r;
    r.mode = cfg.mode;
    r.dgrad = {cfg.dgrad, o.dgrad_bits};
    ModulePtr net = make_model(o.model, c, h, w, 10, r, 0);
    std::vector<Param*> params;
    net->collect_params(params);
    SGD opt(params, SGDOptions{0.9f, 5e-4f, false});
    SoftmaxCrossEntropy ce;
    std::vector<double> ms, qms;
    size_t saved = 0;
    for (int s = 0; s < o.warmup + o.steps; ++s) {
      StepContext ctx{true, 0, static_cast<uint64_t>(s)};
      profile::reset();
      profile::enable(true);
      const auto t0 = std::chrono::steady_clock::now();
      opt.zero_grad();
      Tensor logits = net->forward(x, ctx);
      ce.forward(logits, y);
      saved = saved_bytes(*net);
      net->backward(ce.backward(), ctx);
      opt.step(0.01f);
      const double dt = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      profile::enable(false);
      if (s >= o.warmup) {
        ms.push_back(dt);
        qms.push_back(1e3 * (profile::seconds(profile::quantize) + profile::seconds(profile::dequantize)));
      }
    }
    const double med = median(ms), qmed = median(qms), mn = *std::min_element(ms.begin(), ms.end());
    const std::string dg = cfg.mode == Mode::fqt ? traits(cfg.dgrad).name : "-";
    if (o.json) {
      records.push_back({{"model", o.model},
                         {"mode", mode_name(cfg.mode)},
                         {"dgrad", dg},
                         {"dgrad_bits", o.dgrad_bits},
                         {"batch", o.batch},
                         {"input", o.input},
                         {"steps", o.steps},
                         {"threads", num_threads()},
                         {"median_ms", med},
                         {"min_ms", mn},
                         {"quantizer_ms", qmed},
                         {"quantizer_share", med > 0 ? qmed / med : 0},
                         {"images_per_s", o.batch / (med / 1e3)},
                         {"saved_activation_bytes", saved}});
    } else {
      std::printf("%-16s %-5s %-6s %5lld  %10.1f  %10.1f  %10.1f  %7.1f%%  %9.0f  %12.2f\n", o.model.c_str(),
                  mode_name(cfg.mode), dg.c_str(), static_cast<long long>(o.batch), med, mn, qmed,
                  med > 0 ? 100 * qmed / med : 0, o.batch / (med / 1e3), saved / 1048576.0);
      std::fflush(stdout);
    }
  }
  if (o.json) std::printf("%s\n", records.dump(2).c_str());
  return 0;
}
}  // namespace

Runner add_bench(CLI::App& app) {
  app.description("Benchmarks. `fqt bench step`: full training steps, several modes side by side (medians).");
  app.require_subcommand(1);
  auto o = std::make_shared<StepOptions>();
  CLI::App* step = app.add_subcommand("step", "Median time of a full training step per precision mode");
  step->add_option("--model", o->model, "model name")->capture_default_str();
  step->add_option("--mode", o->modes, "comma-separated modes: fp32, qat, fqt")->capture_default_str();
  step->add_option("--dgrad", o->dgrads, "comma-separated dgrad quantizers for fqt (ptq, psq, bhq)")->capture_default_str();
  step->add_option("--dgrad-bits", o->dgrad_bits, "dgrad bits")->capture_default_str();
  step->add_option("--batch", o->batch, "batch size")->capture_default_str();
  step->add_option("--input", o->input, "input shape CxHxW")->capture_default_str();
  step->add_option("--steps", o->steps, "timed steps")->capture_default_str();
  step->add_option("--warmup", o->warmup, "untimed warm-up steps")->capture_default_str();
  step->add_option("--threads", o->threads, "CPU threads (0 = all)")->capture_default_str();
  step->add_flag("--json", o->json, "JSON records instead of a table");
  return [o, step] {
    if (step->parsed()) return run_step_bench(*o);
    return 2;
  };
}

}  // namespace fqt::cli
