// fqt variance: bias and variance of the FQT gradient of a network, per layer and in total
// (SPEC sections 3 and 5; the computation is fqt::measure_variance in include/fqt/variance.hpp).
#include "commands.hpp"

#include "fqt/checkpoint.hpp"
#include "fqt/data.hpp"
#include "fqt/models.hpp"
#include "fqt/optim.hpp"
#include "fqt/train.hpp"
#include "fqt/variance.hpp"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>

namespace fqt::cli {

namespace {
struct VarianceCliOptions {
  std::string model = "preact_resnet20";
  std::string data = "fashion-mnist";
  std::string data_dir;
  std::string checkpoint;
  std::string dgrad = "ptq,psq,bhq";
  std::string dgrad_bits = "4,5,6,7,8";
  std::string wgrad = "ptq";
  std::string dgrad_rows = "pixel";
  int wgrad_bits = 8, act_bits = 8, weight_bits = 8;
  int samples = 16;
  int batches = 8;
  int64_t batch = 128;
  std::string breakdown = "lowest";
  int breakdown_samples = 1;
  uint64_t seed = 0;
  std::string out;
  int threads = 0;
  bool json = false, quiet = false;
  bool no_floor = false;  // skip the wgrad-only floor configuration
  bool model_given = false, data_given = false;  // else taken from --checkpoint
  bool wgrad_bits_given = false;
  std::string command_line;
};

std::string fmt_num(double v) {
  if (!std::isfinite(v)) return "inf";
  return fmt::format("{:.3e}", v);
}

nlohmann::json record_json(const VarianceRecord& r) {
  auto num = [](double v) -> nlohmann::json { return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr); };
  return {{"quantizer", r.quantizer},
          {"bits", r.bits},
          {"dgrad_rows", r.dgrad_rows},
          {"wgrad", r.wgrad},
          {"wgrad_bits", r.wgrad_bits},
          {"layer", r.layer},
          {"layer_index", r.layer_index},
          {"params", r.params},
          {"samples", r.samples},
          {"batches", r.batches},
          {"quant_variance", r.quant_variance},
          {"quant_variance_se", num(r.quant_variance_se)},
          {"quant_variance_batches", r.quant_variance_batches},
          {"sampling_variance", r.sampling_variance},
          {"ratio", num(r.ratio)},
          {"bias", r.bias},
          {"bias_noise_floor", r.bias_noise_floor},
          {"bound", r.bound},
          {"wgrad_bound", r.wgrad_bound},
          {"increment", r.increment >= 0 ? nlohmann::json(r.increment) : nlohmann::json(nullptr)},
          {"qat_norm2", r.qat_norm2}};
}

int run_variance(const VarianceCliOptions& o) {
  std::vector<QuantizerKind> kinds;
  for (const auto& n : split_list(o.dgrad)) {
    QuantizerKind k = parse_quantizer(n);
    FQT_INPUT_CHECK(traits(k).rounding == Rounding::stochastic,
                    "--dgrad: '{}' is deterministic; gradient quantizers must be stochastic (ptq, ptq-zero, psq, bhq)", n);
    kinds.push_back(k);
  }
  FQT_INPUT_CHECK(!kinds.empty(), "--dgrad needs at least one quantizer name");
  const std::vector<int> bits = parse_bits(o.dgrad_bits, "--dgrad-bits");
  const GradRows rows = parse_grad_rows(o.dgrad_rows);
  // --wgrad exact: only the dgrad quantizers add variance; a floor would be the QAT gradient itself.
  const bool exact_wgrad = o.wgrad == "exact";
  const QuantizerKind wkind = exact_wgrad ? QuantizerKind::ptq : parse_quantizer(o.wgrad);
  FQT_INPUT_CHECK(exact_wgrad || (traits(wkind).rounding == Rounding::stochastic && wkind != QuantizerKind::bhq),
                  "--wgrad must be ptq, ptq-zero, column or exact (got {})", o.wgrad);
  FQT_INPUT_CHECK(o.wgrad_bits >= 2 && o.wgrad_bits <= 8, "--wgrad-bits must be 2..8 (got {})", o.wgrad_bits);
  FQT_INPUT_CHECK(!exact_wgrad || !o.wgrad_bits_given,
                  "--wgrad-bits has no meaning with --wgrad exact (the wgrad GEMM is not quantized)");
  FQT_INPUT_CHECK(o.samples >= 2 && o.samples <= 100000, "--samples must be in 2..100000 (got {})", o.samples);
  FQT_INPUT_CHECK(o.batches >= 2, "--batches must be at least 2: the sampling variance is measured across batches (got {})",
                  o.batches);
  FQT_INPUT_CHECK(o.batch >= 2, "--batch must be at least 2 (got {})", o.batch);
  FQT_INPUT_CHECK(o.breakdown_samples >= 1 && o.breakdown_samples <= o.samples,
                  "--breakdown-samples must be in 1..--samples (got {})", o.breakdown_samples);
  set_num_threads(o.threads);

  // Which configurations get the per-layer breakdown.
  const int min_bits = *std::min_element(bits.begin(), bits.end());
  std::set<std::pair<int, int>> breakdown;  // (kind, bits)
  if (o.breakdown == "all") {
    for (QuantizerKind k : kinds)
      for (int b : bits) breakdown.insert({int(k), b});
  } else if (o.breakdown == "lowest") {
    for (QuantizerKind k : kinds) breakdown.insert({int(k), min_bits});
  } else if (o.breakdown != "none") {
    for (const auto& item : split_list(o.breakdown)) {
      const size_t colon = item.find(':');
      FQT_INPUT_CHECK(colon != std::string::npos,
                      "--breakdown: '{}' is not lowest, all, none or a list of quantizer:bits (e.g. bhq:4,psq:4)", item);
      const QuantizerKind k = parse_quantizer(item.substr(0, colon));
      const int b = parse_bits(item.substr(colon + 1), "--breakdown")[0];
      FQT_INPUT_CHECK(std::find(kinds.begin(), kinds.end(), k) != kinds.end() &&
                          std::find(bits.begin(), bits.end(), b) != bits.end(),
                      "--breakdown: '{}' is not one of the configurations measured (--dgrad {} with --dgrad-bits {})",
                      item, o.dgrad, o.dgrad_bits);
      breakdown.insert({int(k), b});
    }
  }

  // Model, recipe and weights.
  TrainConfig cfg;
  cfg.model = o.model;
  cfg.data = o.data;
  cfg.data_dir = o.data_dir;
  cfg.seed = o.seed;
  cfg.recipe.mode = Mode::qat;
  cfg.recipe.activation.bits = o.act_bits;
  cfg.recipe.weight.bits = o.weight_bits;
  FQT_INPUT_CHECK(o.act_bits >= 2 && o.act_bits <= 8 && o.weight_bits >= 2 && o.weight_bits <= 8,
                  "--act-bits and --weight-bits must be bit widths from 2 to 8 (got {} and {})", o.act_bits, o.weight_bits);
  if (!o.checkpoint.empty()) {
    TrainConfig stored = TrainConfig::from_json(read_checkpoint_state(o.checkpoint).config_json, o.checkpoint);
    if (!o.model_given) cfg.model = stored.model;
    if (!o.data_given) cfg.data = stored.data;
    FQT_INPUT_CHECK(stored.model == cfg.model, "--checkpoint {} holds a {} model, not {} (pass --model {})", o.checkpoint,
                    stored.model, cfg.model, stored.model);
    FQT_INPUT_CHECK(stored.data == cfg.data, "--checkpoint {} was trained on {}, not {} (pass --data {})", o.checkpoint,
                    stored.data, cfg.data, stored.data);
    cfg.recipe.activation = stored.recipe.activation;
    cfg.recipe.weight = stored.recipe.weight;
    if (o.data_dir.empty()) cfg.data_dir = stored.data_dir;
  }
  const Dataset train_set = load_run_data(cfg.data, cfg.data_dir, true);
  FQT_INPUT_CHECK(train_set.size() >= o.batch * o.batches, "--batches {} x --batch {} needs {} training samples; {} has {}",
                  o.batches, o.batch, o.batch * o.batches, cfg.data, train_set.size());
  ModulePtr net = make_model(cfg.model, train_set.channels(), train_set.height(), train_set.width(),
                             train_set.num_classes, cfg.recipe, cfg.seed);
  if (!o.checkpoint.empty()) {
    std::vector<Param*> params;
    NamedBuffers buffers;
    net->collect_params(params);
    net->collect_buffers(buffers);
    SGD opt(params, SGDOptions{});
    load_checkpoint(o.checkpoint, params, buffers, opt, train_set.describe_images());
  }

  // A fixed set of batches: the first --batches of a shuffled epoch (seed), no augmentation.
  std::vector<VarianceBatch> batches;
  {
    Loader loader(train_set, o.batch, true, Augment{}, o.seed, true, false);
    loader.start_epoch(0);
    Batch b;
    while (static_cast<int>(batches.size()) < o.batches && loader.next(b)) batches.push_back({b.x, b.y});
  }

  std::vector<VarianceConfig> configs;
  for (QuantizerKind k : kinds)
    for (int b : bits)
      configs.push_back({{k, b}, {wkind, o.wgrad_bits}, breakdown.count({int(k), b}) > 0, false, rows, exact_wgrad});
  // The wgrad-only floor: dgrad exact, only the (fixed) wgrad quantizer active; records "none", 0.
  // With --wgrad exact there is none (it would be the QAT gradient, variance 0).
  const bool floor = !o.no_floor && !exact_wgrad;
  if (floor) configs.push_back({{}, {wkind, o.wgrad_bits}, false, true, rows});

  std::vector<QuantizedLayer*> layers;
  net->collect_quantized(layers);
  const bool talk = !o.quiet && !o.json;
  if (talk)
    std::fprintf(stderr,
                 "fqt variance: %s on %s (%s), %zu quantized layers; %zu configurations%s x %d batches x %d draws; "
                 "per-layer breakdown for %zu of them (%d draw%s per batch, %zu backward passes each)\n",
                 cfg.model.c_str(), cfg.data.c_str(), o.checkpoint.empty() ? "initial weights" : o.checkpoint.c_str(),
                 layers.size(), configs.size(), floor ? " (incl. the wgrad-only floor)" : "", o.batches, o.samples,
                 breakdown.size(), o.breakdown_samples,
                 o.breakdown_samples == 1 ? "" : "s", layers.size() - 1);
  VarianceOptions vo;
  vo.samples = o.samples;
  vo.breakdown_samples = o.breakdown_samples;
  vo.seed = o.seed;
  if (talk) vo.progress = [](const std::string& s) { std::fprintf(stderr, "  %s\n", s.c_str()); };
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<VarianceRecord> recs = measure_variance(*net, batches, configs, vo);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  nlohmann::json jrecs = nlohmann::json::array();
  for (const auto& r : recs) jrecs.push_back(record_json(r));
  nlohmann::json doc = {{"command", o.command_line},
                        {"model", cfg.model},
                        {"data", cfg.data},
                        {"checkpoint", o.checkpoint},
                        {"samples", o.samples},
                        {"batches", o.batches},
                        {"batch", o.batch},
                        {"dgrad_rows", o.dgrad_rows},
                        {"seed", o.seed},
                        {"seconds", secs},
                        {"records", jrecs}};

  std::string table;
  auto line = [&](const std::string& s) { table += s + "\n"; };
  line(fmt::format("{} on {}, {}: {} batches of {}, K = {} FQT draws per batch, wgrad {}, dgrad rows per {} "
                   "({:.1f} s)", cfg.model, cfg.data, o.checkpoint.empty() ? "initial weights" : o.checkpoint, o.batches,
                   o.batch, o.samples, exact_wgrad ? std::string("exact (only dgrad quantized)") : fmt::format("{} {}-bit", o.wgrad, o.wgrad_bits),
                   o.dgrad_rows, secs));
  line("Totals over all parameters (quant = quantization variance given the batch, se = its standard error over the");
  line(floor ? "batches; sampling = QAT variance across batches; quantizer none = the wgrad-only floor, dgrad exact):"
             : "batches; sampling = QAT variance across batches):");
  line(fmt::format("{:<9} {:>4}  {:>10}  {:>9}  {:>10}  {:>9}  {:>10}  {:>10}  {:>10}  {:>12}", "quantizer", "bits",
                   "quant_var", "se", "sampl_var", "ratio", "bias", "noise_flr", "dgrad_bnd", "sum_of_incr"));
  for (const auto& r : recs)
    if (r.layer_index < 0)
      line(fmt::format("{:<9} {:>4}  {:>10}  {:>9}  {:>10}  {:>9.3g}  {:>10}  {:>10}  {:>10}  {:>12}", r.quantizer,
                       r.bits > 0 ? std::to_string(r.bits) : std::string("-"), fmt_num(r.quant_variance),
                       std::isfinite(r.quant_variance_se) ? fmt::format("{:.2e}", r.quant_variance_se) : "-",
                       fmt_num(r.sampling_variance), r.ratio, fmt_num(r.bias), fmt_num(r.bias_noise_floor),
                       r.bits > 0 ? fmt_num(r.bound) : "-", r.increment >= 0 ? fmt_num(r.increment) : "-"));
  for (const auto& c : configs) {
    if (!c.breakdown) continue;
    line("");
    line(fmt::format("Per-layer breakdown, dgrad {} {}-bit (increment = variance added to the whole gradient by the "
                     "layer's quantizers; quant/sampl = of the layer's own parameters):",
                     traits(c.dgrad.kind).name, c.dgrad.bits));
    line(fmt::format("{:<3} {:<28} {:>7}  {:>10}  {:>10}  {:>10}  {:>9}  {:>10}  {:>10}", "#", "layer", "params",
                     "increment", "quant_var", "sampl_var", "ratio", "bias", "dgrad_bnd"));
    for (const auto& r : recs)
      if (r.quantizer == traits(c.dgrad.kind).name && r.bits == c.dgrad.bits)
        line(fmt::format("{:<3} {:<28} {:>7}  {:>10}  {:>10}  {:>10}  {:>9.3g}  {:>10}  {:>10}",
                         r.layer_index < 0 ? std::string("") : std::to_string(r.layer_index), r.layer, r.params,
                         r.increment >= 0 ? fmt_num(r.increment) : "-", fmt_num(r.quant_variance),
                         fmt_num(r.sampling_variance), r.ratio, fmt_num(r.bias), fmt_num(r.bound)));
  }

  if (!o.out.empty()) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::create_directories(o.out, ec);
    FQT_INPUT_CHECK(!ec && fs::is_directory(o.out), "--out {}: cannot create the folder ({})", o.out, ec.message());
    // (each replaced atomically, as checkpoints are: a failure is an error naming the file)
    write_file_atomic((fs::path(o.out) / "variance.json").string(), doc.dump(1) + "\n");
    write_file_atomic((fs::path(o.out) / "variance.txt").string(), table);
  }
  if (o.json) {
    std::printf("%s\n", jrecs.dump(2).c_str());
  } else {
    std::printf("%s", table.c_str());
    if (!o.out.empty())
      std::printf("\nwrote %s/variance.json and variance.txt; plots: /usr/bin/python3 scripts/plot_variance %s/variance.json\n",
                  o.out.c_str(), o.out.c_str());
  }
  return 0;
}
}  // namespace

Runner add_variance(CLI::App& app) {
  auto o = std::make_shared<VarianceCliOptions>();
  app.description(
      "Bias and variance of the FQT gradient of a network (SPEC sections 3 and 5). For fixed weights and a fixed\n"
      "set of training batches: the QAT gradient of each batch and K FQT gradients per batch (independent\n"
      "draws), then per layer and in total: relative bias ||mean - QAT|| / ||QAT|| next to its noise floor;\n"
      "quantization variance (given the batch), sampling variance across batches (the QAT variance) and\n"
      "their ratio; the per-layer breakdown (variance added by each layer's quantizers, layers switched to\n"
      "exact one at a time from input to output); and the SPEC section 3 bound of each dgrad operand.\n"
      "Also measures the wgrad-only floor (dgrad exact, only the wgrad quantizer active; --no-floor skips it;\n"
      "--wgrad exact instead leaves wgrad unquantized, so that only the dgrad quantizers add variance and there\n"
      "is no floor), and the standard error over batches of every quantization variance.\n"
      "Writes variance.json (records) and variance.txt to --out; plot with scripts/plot_variance.\n"
      "Example: fqt variance --model preact_resnet20 --data fashion-mnist --checkpoint runs/x/ckpt.safetensors\n"
      "         --dgrad ptq,psq,bhq --dgrad-bits 4,5,6,7,8 --samples 16 --batches 8 --out runs/var");
  app.add_option("--model", o->model, "model: " + [] {
    std::string s;
    for (const auto& m : model_names()) s += (s.empty() ? "" : ", ") + m;
    return s;
  }())->capture_default_str();
  app.add_option("--data", o->data, "dataset: fashion-mnist, mnist, cifar10, synthetic")->capture_default_str();
  app.add_option("--data-dir", o->data_dir, "folder with the dataset files (default: the dataset's standard folder)");
  app.add_option("--checkpoint", o->checkpoint,
                 "weights from `fqt train` (default: the model's initial weights for --seed); its model, data and forward bit "
                 "widths are used unless --model/--data are given");
  app.add_option("--dgrad", o->dgrad, "comma-separated dgrad quantizers to compare")->capture_default_str();
  app.add_option("--dgrad-bits", o->dgrad_bits, "comma-separated dgrad bit widths, 2..8")->capture_default_str();
  app.add_option("--dgrad-rows", o->dgrad_rows,
                 "what a row of a convolution's dgrad operand is for psq / bhq: pixel (fqt's default) | sample (the "
                 "paper's code); see fqt train --help")
      ->check(CLI::IsMember({"pixel", "sample"}))
      ->capture_default_str();
  app.add_option("--wgrad", o->wgrad,
                 "wgrad quantizer (fixed across configurations): ptq, ptq-zero, column, or exact (wgrad as in QAT: the "
                 "variance is the dgrad quantizers' alone; no floor)")
      ->capture_default_str();
  app.add_option("--wgrad-bits", o->wgrad_bits, "wgrad bits")->capture_default_str();
  app.add_option("--act-bits", o->act_bits, "forward activation bits, 2..8 (without --checkpoint: a checkpoint's own are used)")->capture_default_str();
  app.add_option("--weight-bits", o->weight_bits, "forward weight bits, 2..8 (without --checkpoint: a checkpoint's own are used)")->capture_default_str();
  app.add_option("-k,--samples", o->samples, "FQT draws per batch (K)")->capture_default_str();
  app.add_option("--batches", o->batches, "training batches (>= 2; the sampling variance is across them)")
      ->capture_default_str();
  app.add_option("--batch", o->batch, "batch size")->capture_default_str();
  app.add_option("--breakdown", o->breakdown,
                 "per-layer breakdown for: lowest (each quantizer at the lowest bit width), all, none, or a list "
                 "quantizer:bits (bhq:4,psq:4); costs (layers - 1) extra backward passes per draw")
      ->capture_default_str();
  app.add_option("--breakdown-samples", o->breakdown_samples, "draws per batch used for the breakdown")
      ->capture_default_str();
  app.add_option("--seed", o->seed, "seed of batch choice, initial weights and gradient quantizers")->capture_default_str();
  app.add_option("--out", o->out, "folder for variance.json and variance.txt (default: print only)");
  app.add_option("--threads", o->threads, "CPU threads (0 = all cores)")->capture_default_str();
  app.add_flag("--no-floor", o->no_floor,
               "skip the wgrad-only floor (by default also measured: dgrad exact as in QAT, only the wgrad quantizer "
               "active; records quantizer \"none\", bits 0)");
  app.add_flag("--json", o->json, "print the JSON records instead of the table");
  app.add_flag("-q,--quiet", o->quiet, "no progress output");
  return [o, &app] {
    std::string cmd = "fqt variance";
    for (const CLI::Option* opt : app.get_options()) {
      if (opt->count() == 0 || opt->get_name() == "--help") continue;
      cmd += " " + opt->get_name();
      if (opt->get_expected_max() == 0) continue;  // a flag: CLI11 records it as "true", which no rerun accepts
      for (const auto& r : opt->results()) cmd += " " + r;
    }
    o->command_line = cmd;
    o->model_given = app.count("--model") > 0;
    o->data_given = app.count("--data") > 0;
    o->wgrad_bits_given = app.count("--wgrad-bits") > 0;
    return run_variance(*o);
  };
}

}  // namespace fqt::cli
