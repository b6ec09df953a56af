// fqt train / fqt eval.
#include "commands.hpp"

#include "fqt/data.hpp"
#include "fqt/models.hpp"
#include "fqt/train.hpp"

#include <fmt/format.h>

#include <cstdio>

namespace fqt::cli {

namespace {
struct TrainOptions {
  TrainConfig cfg;
  std::string mode = "fqt";
  std::string dgrad = "bhq", wgrad = "ptq", arith = "int", weight_q = "symmetric", recompute = "auto";
  std::string dgrad_rows = "pixel";
  int dgrad_bits = 5, wgrad_bits = 8, act_bits = 8, weight_bits = 8;
  bool resume = false, quiet = false;
};

// What --resume does with each option given alongside it. The run's stored settings win, so these
// are ignored (a warning names them)...
const std::vector<const char*> kResumeIgnores = {
    "--model", "--data", "--mode", "--dgrad", "--dgrad-bits", "--dgrad-rows", "--wgrad", "--wgrad-bits", "--arith",
    "--weight-quantizer", "--act-bits", "--weight-bits", "--epochs", "--batch", "--lr", "--momentum", "--nesterov",
    "--weight-decay", "--schedule", "--warmup-epochs", "--label-smoothing", "--augment", "--seed", "--train-limit",
    "--test-limit", "--ckpt-every", "--on-nonfinite"};
// ...and these run-time settings apply (train() copies them into the stored configuration);
// the help text and the warning list them from here.
const std::vector<const char*> kResumeApplies = {"--max-steps",       "--threads",   "--data-dir", "--recompute",
                                                 "--track-variance", "--log-every", "--quiet"};
// The rest concern the run folder itself. add_train checks that every option is in one of the three.
const std::vector<const char*> kResumeFolder = {"--help", "--out", "--resume", "--overwrite"};

std::string listed(const std::vector<const char*>& names) {
  std::string s;
  for (size_t i = 0; i < names.size(); ++i)
    s += (i == 0 ? "" : i + 1 == names.size() ? " and " : ", ") + std::string(names[i]);
  return s;
}

// The options of `app` among `names` that the command line gave, as "--a, --b".
std::string given(CLI::App& app, const std::vector<const char*>& names) {
  std::string s;
  for (const char* n : names)
    if (app.get_option(n)->count() > 0) s += (s.empty() ? "" : ", ") + std::string(n);
  return s;
}

// "1 epoch", "3 epochs".
std::string count_of(int64_t n, const char* noun) { return fmt::format("{} {}{}", n, noun, n == 1 ? "" : "s"); }

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}
}  // namespace

Runner add_train(CLI::App& app) {
  auto o = std::make_shared<TrainOptions>();
  TrainConfig& c = o->cfg;
  app.description(
      "Train a network in fp32, QAT or FQT (forward and both backward GEMMs quantized; gradients\n"
      "quantized stochastically and without bias, two independent draws per layer).\n"
      "Writes to --out: config.json, metrics.jsonl (one record per epoch) and ckpt.safetensors\n"
      "(replaced atomically every epoch). --resume continues a run bit for bit from its checkpoint.\n"
      "Example: fqt train --model preact_resnet20 --data fashion-mnist --mode fqt --dgrad bhq\n"
      "         --dgrad-bits 5 --epochs 10 --batch 128 --lr 0.1 --seed 0 --out runs/bhq5");
  app.add_option("--model", c.model, "model: " + join(model_names()))->capture_default_str();
  app.add_option("--data", c.data, "dataset: " + join(dataset_names()) + ", synthetic (a small built-in problem)")->capture_default_str();
  app.add_option("--data-dir", c.data_dir, "folder with the dataset files (default: the dataset's standard folder)");
  app.add_option("--mode", o->mode, "fp32 | qat (forward quantized) | fqt (forward + both backward GEMMs quantized)")
      ->capture_default_str();
  app.add_option("--dgrad", o->dgrad,
                 "gradient quantizer of the dgrad GEMM: ptq, ptq-zero, psq, bhq (the SPEC's), or column (unbiased "
                 "too, but its per-column grid varies along the GEMM's reduction, so that GEMM runs simulated in "
                 "fp32); fqt mode only")
      ->capture_default_str();
  app.add_option("--dgrad-bits", o->dgrad_bits, "bits of the dgrad gradient quantizer (2..8; fqt mode only)")->capture_default_str();
  app.add_option("--dgrad-rows", o->dgrad_rows,
                 "what a row of a convolution's gradient is for psq / bhq: pixel (each output position of each "
                 "sample has its own grid; fqt's default) | sample (a row per sample, [N, C*H*W], as in the "
                 "paper's code: BHQ's groups then mix whole samples)")
      ->check(CLI::IsMember({"pixel", "sample"}))
      ->capture_default_str();
  app.add_option("--wgrad", o->wgrad,
                 "gradient quantizer of the wgrad GEMM: ptq, ptq-zero, column (the SPEC's), or psq (unbiased too, "
                 "but its per-row grid varies along the GEMM's reduction over samples, so that GEMM runs simulated "
                 "in fp32); not bhq; fqt mode only")
      ->capture_default_str();
  app.add_option("--wgrad-bits", o->wgrad_bits, "bits of the wgrad gradient quantizer (2..8; fqt mode only)")->capture_default_str();
  app.add_option("--arith", o->arith,
                 "arithmetic of the quantized GEMMs: int (8-bit integer GEMMs on the codes) | sim (dequantize, fp32 GEMM)")
      ->capture_default_str();
  app.add_option("--weight-quantizer", o->weight_q,
                 "weight grid: symmetric (per tensor) | symmetric-row (per output channel; dgrad then runs in fp32) | zero-aligned")
      ->capture_default_str();
  app.add_option("--act-bits", o->act_bits, "bits of forward activations (per-tensor, zero-aligned)")->capture_default_str();
  app.add_option("--weight-bits", o->weight_bits, "bits of weights (on the --weight-quantizer grid)")->capture_default_str();
  app.add_option("--epochs", c.epochs, "epochs")->capture_default_str();
  app.add_option("--batch", c.batch, "batch size")->capture_default_str();
  app.add_option("--lr", c.lr, "peak learning rate")->capture_default_str();
  app.add_option("--momentum", c.momentum, "SGD momentum")->capture_default_str();
  app.add_flag("--nesterov", c.nesterov, "Nesterov momentum");
  app.add_option("--weight-decay", c.weight_decay, "weight decay (not applied to batch-norm parameters)")->capture_default_str();
  app.add_option("--schedule", c.schedule, "constant | cosine (per step) | cosine-epoch | step:E1,E2[@gamma]")->capture_default_str();
  app.add_option("--warmup-epochs", c.warmup_epochs, "linear warmup length in epochs (fractions allowed)")->capture_default_str();
  app.add_option("--label-smoothing", c.label_smoothing, "label smoothing of the cross-entropy")->capture_default_str();
  app.add_option("--augment", c.augment, "auto (crop+flip on cifar10, none otherwise) | none | flip | crop | crop+flip")
      ->capture_default_str();
  app.add_option("--seed", c.seed,
                 "seed of initialisation, data order, augmentation and gradient quantizers (0..2^64-1)")
      ->capture_default_str();
  app.add_option("--train-limit", c.train_limit, "use only the first N training samples (0 = all)")->capture_default_str();
  app.add_option("--test-limit", c.test_limit, "evaluate on the first N test samples (0 = all)")->capture_default_str();
  app.add_option("--max-steps", c.max_steps,
                 "stop after this many steps in total (0 = all epochs); a stop inside an epoch writes the checkpoint "
                 "there (--resume goes on from it) and evaluates the test set")
      ->capture_default_str();
  app.add_option("--ckpt-every", c.ckpt_every_steps, "also checkpoint every N steps (0 = at epoch ends only)")->capture_default_str();
  app.add_option("--on-nonfinite", c.on_nonfinite,
                 "NaN/Inf in the loss or a gradient: stop (error naming step and layer; the last good checkpoint "
                 "is kept) | skip (no update for that step, logged and counted)")
      ->capture_default_str();
  app.add_option("--track-variance", c.track_variance_every,
                 "every N steps, log quantization/sampling variance ratio per layer to metrics.jsonl and warn "
                 "when quantization variance exceeds sampling variance (0 = off)")
      ->capture_default_str();
  app.add_option("--log-every", c.log_every,
                 "every N steps, log training loss and accuracy over those steps to metrics.jsonl "
                 "(training curves finer than per epoch; 0 = off)")
      ->capture_default_str();
  app.add_option("--recompute", o->recompute,
                 "which batch norms keep no fp32 input for backward, recomputing it from the 8-bit codes the "
                 "convolutions saved (bit-identical training; extra forward GEMMs in backward): off = none "
                 "(fastest), on = all (least memory), auto = in qat/fqt those cheapest to recompute "
                 "(convolutions reducing over <= 144 terms, e.g. 16 channels x 3x3: the large first-stage "
                 "activations; none in fp32)")
      ->check(CLI::IsMember({"off", "auto", "on"}))
      ->capture_default_str();
  app.add_option("--out", c.out,
                 "run folder for config, metrics and checkpoints (default: write nothing); one fqt train at a time "
                 "per folder");
  app.add_flag("--overwrite", c.overwrite,
               "start afresh even if --out holds a run: its checkpoint, config.json and metrics.jsonl are replaced "
               "together when the new run writes its first checkpoint (a run that fails or is killed before or "
               "while doing that leaves the old one as it was; after a kill, the next fqt train in the folder puts "
               "it back)");
  app.add_flag("--resume", o->resume,
               "continue the run in --out from its checkpoint, bit for bit, with the run's stored settings: only " +
                   listed(kResumeApplies) +
                   " apply; other settings given are ignored (with a warning). Not with --overwrite");
  app.add_option("--threads", c.threads, "CPU threads (0 = all cores)")->capture_default_str();
  app.add_flag("-q,--quiet", o->quiet, "no progress output");
  for (const CLI::Option* opt : app.get_options()) {  // a new option must say what --resume does with it
    const std::string name = "--" + opt->get_lnames().at(0);
    bool classified = false;
    for (const auto* list : {&kResumeIgnores, &kResumeApplies, &kResumeFolder})
      for (const char* n : *list) classified = classified || name == n;
    FQT_CHECK(classified, "fqt train: option {} is in none of cmd_train.cpp's --resume lists", name);
  }
  return [o, &app] {
    TrainConfig cfg = o->cfg;
    cfg.recipe.mode = parse_mode(o->mode);
    cfg.recipe.dgrad = {parse_quantizer(o->dgrad), o->dgrad_bits};
    cfg.recipe.wgrad = {parse_quantizer(o->wgrad), o->wgrad_bits};
    cfg.recipe.activation.bits = o->act_bits;
    cfg.recipe.weight = {parse_quantizer(o->weight_q), o->weight_bits};
    cfg.recipe.arith = parse_arith(o->arith);
    cfg.recipe.dgrad_rows = parse_grad_rows(o->dgrad_rows);
    cfg.recompute = parse_recompute(o->recompute);
    cfg.progress = !o->quiet;
    // Settings that do nothing here: one warning line each, printed once everything has been
    // validated (bad input still gets a single error line).
    std::vector<std::string> warnings;
    if (o->resume) {
      const std::string ignored = given(app, kResumeIgnores);
      if (!ignored.empty())
        warnings.push_back(fmt::format("{} ignored: --resume continues with the settings stored in the run (only {} "
                                       "apply)",
                                       ignored, listed(kResumeApplies)));
    } else if (cfg.recipe.mode != Mode::fqt) {
      std::vector<const char*> unused = {"--dgrad", "--dgrad-bits", "--dgrad-rows", "--wgrad", "--wgrad-bits"};
      if (cfg.recipe.mode == Mode::fp32)
        for (const char* n : {"--arith", "--weight-quantizer", "--act-bits", "--weight-bits"}) unused.push_back(n);
      const std::string ignored = given(app, unused);
      if (!ignored.empty())
        warnings.push_back(fmt::format("{} ignored: unused in --mode {} ({})", ignored, o->mode,
                                       cfg.recipe.mode == Mode::fp32 ? "nothing is quantized"
                                                                     : "the gradient GEMMs are not quantized in qat"));
    }
    cfg.on_validated = [warnings] {
      for (const std::string& w : warnings) std::fprintf(stderr, "fqt train: warning: %s\n", w.c_str());
    };
    TrainResult r = train(cfg, o->resume);
    if (r.nothing_to_do) {
      std::printf("fqt train: nothing to do: %s\n", r.note.c_str());
      return 0;
    }
    if (!r.evaluated)
      std::printf("no test accuracy: no epoch was completed or evaluated in this run (%lld steps)\n",
                  static_cast<long long>(r.steps));
    else if (r.stopped_mid_epoch)
      std::printf("final test accuracy %.2f%% (best %.2f%%) after %s, %s (stopped by --max-steps in "
                  "epoch %lld, %lld of %lld steps%s), %.0f images/s\n",
                  100 * r.final_test_acc, 100 * r.best_test_acc, count_of(r.epochs_done, "epoch").c_str(),
                  count_of(r.steps, "step").c_str(), static_cast<long long>(r.epochs_done + 1),
                  static_cast<long long>(r.steps - r.epochs_done * r.steps_per_epoch),
                  static_cast<long long>(r.steps_per_epoch), cfg.out.empty() ? "" : "; checkpoint saved",
                  r.images_per_s);
    else
      std::printf("final test accuracy %.2f%% (best %.2f%%) after %s, %s, %.0f images/s\n", 100 * r.final_test_acc,
                  100 * r.best_test_acc, count_of(r.epochs_done, "epoch").c_str(), count_of(r.steps, "step").c_str(),
                  r.images_per_s);
    if (r.skipped_steps > 0)
      std::printf("%lld step(s) skipped for a non-finite loss or gradient\n", static_cast<long long>(r.skipped_steps));
    return 0;
  };
}

Runner add_eval(CLI::App& app) {
  auto path = std::make_shared<std::string>();
  auto dir = std::make_shared<std::string>();
  auto limit = std::make_shared<int64_t>(0);
  app.description("Test accuracy of a checkpoint written by `fqt train`, with its stored model and recipe.");
  app.add_option("--checkpoint", *path, "ckpt.safetensors of a run")->required();
  app.add_option("--data-dir", *dir, "folder with the dataset files (default: the one stored in the run)");
  app.add_option("--test-limit", *limit, "evaluate on the first N test samples (0 = all)")->capture_default_str();
  return [=] {
    EvalResult r = evaluate_checkpoint(*path, *dir, *limit);
    std::printf("%s: test accuracy %.2f%% (loss %.4f) on %lld samples\n", path->c_str(), 100 * r.accuracy, r.loss,
                static_cast<long long>(r.samples));
    return 0;
  };
}

}  // namespace fqt::cli
