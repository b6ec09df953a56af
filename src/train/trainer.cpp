// The training loop: data -> model -> loss -> backward -> SGD, with progress, metrics,
// evaluation and atomic checkpoints. See train.hpp for the run folder's contents.
#include "fqt/train.hpp"

#include "fqt/checkpoint.hpp"
#include "fqt/data.hpp"
#include "fqt/layers.hpp"
#include "fqt/models.hpp"
#include "fqt/optim.hpp"
#include "fqt/schedule.hpp"
#include "fqt/variance.hpp"

#include <nlohmann/json.hpp>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace fqt {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

json spec_json(QuantizerSpec s) { return {{"quantizer", traits(s.kind).name}, {"bits", s.bits}}; }
QuantizerSpec spec_from(const json& j) { return {parse_quantizer(j.at("quantizer").get<std::string>()), j.at("bits").get<int>()}; }

Augment augment_for(const std::string& name, const std::string& data) {
  std::string a = name;
  if (a == "auto") a = data == "cifar10" ? "crop+flip" : "none";
  if (a == "none") return {};
  if (a == "flip") return {false, 4, true};
  if (a == "crop") return {true, data == "cifar10" ? 4 : 2, false};
  if (a == "crop+flip") return {true, data == "cifar10" ? 4 : 2, true};
  throw InputError(fmt::format("unknown --augment '{}' (valid: auto, none, flip, crop, crop+flip)", name));
}

Dataset slice(const Dataset& ds, int64_t begin, int64_t end) {
  Dataset out = ds;
  const int64_t per = ds.size() ? ds.images.numel() / ds.size() : 0;
  out.images = Tensor::empty({end - begin, ds.images.size(1), ds.images.size(2), ds.images.size(3)}, DType::u8);
  std::copy(ds.images.data<uint8_t>() + begin * per, ds.images.data<uint8_t>() + end * per, out.images.data<uint8_t>());
  out.labels = Tensor::empty({end - begin}, DType::i32);
  std::copy(ds.labels.data<int32_t>() + begin, ds.labels.data<int32_t>() + end, out.labels.data<int32_t>());
  return out;
}

Dataset load_data(const std::string& name, const std::string& dir, bool train) {
  return load_run_data(name, dir, train);
}

Dataset subset(const Dataset& ds, int64_t limit) {
  if (limit <= 0 || limit >= ds.size()) return ds;
  return slice(ds, 0, limit);
}

std::string fmt_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "--:--";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  return t >= 3600 ? fmt::format("{}:{:02d}:{:02d}", t / 3600, (t / 60) % 60, t % 60)
                   : fmt::format("{:d}:{:02d}", t / 60, t % 60);
}

// One line on stderr, redrawn in place on a terminal; a line every ~10% otherwise (logs).
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled), tty_(isatty(fileno(stderr))) {}
  void update(int epoch, int epochs, int64_t i, int64_t n, double loss, double acc, double ips, double eta) {
    if (!enabled_) return;
    const bool last = i == n;
    if (!tty_ && !last && (n < 10 || i % (n / 10) != 0)) return;
    const int width = 24, filled = static_cast<int>(width * i / std::max<int64_t>(n, 1));
    std::string bar = std::string(filled, '=') + (filled < width ? ">" : "") + std::string(std::max(0, width - filled - 1), ' ');
    std::fprintf(stderr, "%sepoch %d/%d [%s] %lld/%lld loss %.4f acc %5.2f%% %6.0f img/s ETA %s%s", tty_ ? "\r" : "",
                 epoch, epochs, bar.c_str(), static_cast<long long>(i), static_cast<long long>(n), loss, 100 * acc, ips,
                 fmt_duration(eta).c_str(), tty_ && !last ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  bool enabled_, tty_;
};

struct Model {
  ModulePtr net;
  std::vector<Param*> params;
  NamedBuffers buffers;
};

Model build_model(const TrainConfig& cfg, const Dataset& ds) {
  Model m;
  m.net = make_model(cfg.model, ds.channels(), ds.height(), ds.width(), ds.num_classes, cfg.recipe, cfg.seed);
  m.net->collect_params(m.params);
  m.net->collect_buffers(m.buffers);
  return m;
}

EvalResult run_eval(Module& net, const Dataset& test, int64_t batch) {
  Loader loader(test, batch, false, Augment{}, 0, false, true);
  loader.start_epoch(0);
  SoftmaxCrossEntropy ce;
  StepContext ctx{false, 0, 0};
  EvalResult r;
  double loss_sum = 0;
  int64_t correct = 0;
  Batch b;
  while (loader.next(b)) {
    Tensor logits = net.forward(b.x, ctx);
    loss_sum += static_cast<double>(ce.forward(logits, b.y)) * b.size;
    correct += ce.num_correct();
    r.samples += b.size;
  }
  r.loss = r.samples ? loss_sum / r.samples : 0;
  r.accuracy = r.samples ? static_cast<double>(correct) / r.samples : 0;
  return r;
}

void check_config(const TrainConfig& c) {
  FQT_INPUT_CHECK(c.epochs >= 1 && c.epochs <= 100000, "--epochs must be at least 1 (got {})", c.epochs);
  FQT_INPUT_CHECK(c.batch >= 1 && c.batch <= 65536, "--batch must be in 1..65536 (got {})", c.batch);
  FQT_INPUT_CHECK(std::isfinite(c.lr) && c.lr > 0 && c.lr < 100, "--lr must be a positive number below 100 (got {})", c.lr);
  FQT_INPUT_CHECK(c.momentum >= 0 && c.momentum < 1, "--momentum must be in [0, 1) (got {})", c.momentum);
  FQT_INPUT_CHECK(c.weight_decay >= 0 && c.weight_decay < 1, "--weight-decay must be in [0, 1) (got {})", c.weight_decay);
  FQT_INPUT_CHECK(c.label_smoothing >= 0 && c.label_smoothing < 1, "--label-smoothing must be in [0, 1) (got {})",
                  c.label_smoothing);
  FQT_INPUT_CHECK(c.warmup_epochs >= 0 && c.warmup_epochs <= c.epochs, "--warmup-epochs must be in [0, --epochs]");
  for (QuantizerSpec s : {c.recipe.activation, c.recipe.weight, c.recipe.dgrad, c.recipe.wgrad})
    FQT_INPUT_CHECK(s.bits >= 2 && s.bits <= 8, "bit widths must be 2..8 (got {})", s.bits);
  FQT_INPUT_CHECK(traits(c.recipe.dgrad.kind).rounding == Rounding::stochastic,
                  "--dgrad must be a stochastic quantizer (ptq, ptq-zero, psq, column, bhq), got {}",
                  traits(c.recipe.dgrad.kind).name);
  FQT_INPUT_CHECK(traits(c.recipe.wgrad.kind).rounding == Rounding::stochastic,
                  "--wgrad must be a stochastic quantizer (ptq, ptq-zero, psq, column), got {}",
                  traits(c.recipe.wgrad.kind).name);
  FQT_INPUT_CHECK(c.recipe.wgrad.kind != QuantizerKind::bhq, "--wgrad bhq is not supported: BHQ transforms rows "
                  "(samples), which the wgrad GEMM reduces over; use ptq or column");
  FQT_INPUT_CHECK(c.track_variance_every >= 0, "--track-variance must be 0 (off) or a number of steps (got {})",
                  c.track_variance_every);
  (void)augment_for(c.augment, c.data);
}

// --track-variance: quantization vs sampling variance on the current batch (track_variance in
// variance.hpp), one {"kind": "variance"} record in metrics.jsonl, a warning when quantization
// variance exceeds sampling variance. Leaves gradients and batch-norm statistics unchanged.
void log_variance(Model& m, const Batch& b, const Tensor& dlogits, const StepContext& ctx, const TrainConfig& cfg,
                  int64_t epoch) {
  const std::vector<TrackedVariance> tv =
      track_variance(*m.net, b.x, b.y, dlogits, ctx, 2, 4, static_cast<float>(cfg.label_smoothing));
  json layers = json::object();
  std::vector<std::string> over;
  const TrackedVariance* worst = nullptr;
  for (const auto& t : tv) {
    if (t.layer == "total") continue;
    layers[t.layer] = {{"quant_variance", t.quant_variance},
                       {"sampling_variance", t.sampling_variance},
                       {"ratio", std::isfinite(t.ratio) ? json(t.ratio) : json(nullptr)}};
    if (t.quant_variance > t.sampling_variance) over.push_back(t.layer);
    if (!worst || t.ratio > worst->ratio) worst = &t;
  }
  const TrackedVariance& total = tv.back();
  if (!over.empty() || total.quant_variance > total.sampling_variance)
    std::fprintf(stderr,
                 "%sfqt train: warning: step %llu: quantization variance exceeds sampling variance in %zu of %zu layers "
                 "(worst %s, ratio %.3g; all parameters: ratio %.3g) - consider more gradient bits or bhq\n",
                 cfg.progress && isatty(fileno(stderr)) ? "\n" : "", static_cast<unsigned long long>(ctx.step),
                 over.size(), tv.size() - 1, worst ? worst->layer.c_str() : "-", worst ? worst->ratio : 0.0, total.ratio);
  if (cfg.out.empty()) return;
  json rec = {{"kind", "variance"},
              {"epoch", epoch},
              {"step", ctx.step},
              {"quant_variance", total.quant_variance},
              {"sampling_variance", total.sampling_variance},
              {"ratio", std::isfinite(total.ratio) ? json(total.ratio) : json(nullptr)},
              {"layers_over", over.size()},
              {"layers", layers}};
  std::ofstream(fs::path(cfg.out) / "metrics.jsonl", std::ios::app) << rec.dump() << "\n";
}

}  // namespace

Dataset load_run_data(const std::string& name, const std::string& dir, bool train) {
  if (name == "synthetic") {
    const Dataset all = synthetic_dataset(2560, 1, 16, 16, 10, 11);
    return train ? slice(all, 0, 2048) : slice(all, 2048, 2560);
  }
  return load_dataset(name, dir, train);
}

std::string TrainConfig::to_json() const {
  json j = {{"model", model},
            {"data", data},
            {"data_dir", data_dir},
            {"mode", mode_name(recipe.mode)},
            {"activation", spec_json(recipe.activation)},
            {"weight", spec_json(recipe.weight)},
            {"dgrad", spec_json(recipe.dgrad)},
            {"wgrad", spec_json(recipe.wgrad)},
            {"epochs", epochs},
            {"batch", batch},
            {"lr", lr},
            {"momentum", momentum},
            {"nesterov", nesterov},
            {"weight_decay", weight_decay},
            {"schedule", schedule},
            {"warmup_epochs", warmup_epochs},
            {"label_smoothing", label_smoothing},
            {"augment", augment},
            {"seed", seed},
            {"train_limit", train_limit},
            {"test_limit", test_limit},
            {"max_steps", max_steps},
            {"ckpt_every_steps", ckpt_every_steps},
            {"track_variance_every", track_variance_every}};
  return j.dump(2);
}

TrainConfig TrainConfig::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    throw InputError(fmt::format("run configuration is not valid JSON: {}", e.what()));
  }
  TrainConfig c;
  try {
    c.model = j.at("model");
    c.data = j.at("data");
    c.data_dir = j.value("data_dir", "");
    c.recipe.mode = parse_mode(j.at("mode"));
    c.recipe.activation = spec_from(j.at("activation"));
    c.recipe.weight = spec_from(j.at("weight"));
    c.recipe.dgrad = spec_from(j.at("dgrad"));
    c.recipe.wgrad = spec_from(j.at("wgrad"));
    c.epochs = j.at("epochs");
    c.batch = j.at("batch");
    c.lr = j.at("lr");
    c.momentum = j.at("momentum");
    c.nesterov = j.at("nesterov");
    c.weight_decay = j.at("weight_decay");
    c.schedule = j.at("schedule");
    c.warmup_epochs = j.at("warmup_epochs");
    c.label_smoothing = j.at("label_smoothing");
    c.augment = j.at("augment");
    c.seed = j.at("seed");
    c.train_limit = j.at("train_limit");
    c.test_limit = j.at("test_limit");
    c.max_steps = j.value("max_steps", int64_t{0});
    c.ckpt_every_steps = j.value("ckpt_every_steps", int64_t{0});
    c.track_variance_every = j.value("track_variance_every", int64_t{0});
  } catch (const json::exception& e) {
    throw InputError(fmt::format("run configuration is incomplete or has a wrong type: {}", e.what()));
  }
  return c;
}

TrainResult train(const TrainConfig& cfg_in, bool resume) {
  TrainConfig cfg = cfg_in;
  const std::string ckpt_path = cfg.out.empty() ? "" : (fs::path(cfg.out) / "ckpt.safetensors").string();
  TrainState state;
  if (resume) {
    FQT_INPUT_CHECK(!cfg.out.empty(), "--resume needs --out: the run folder to continue");
    FQT_INPUT_CHECK(fs::exists(ckpt_path), "--resume: no checkpoint at {} (nothing to resume; drop --resume to start)",
                    ckpt_path);
    state = read_checkpoint_state(ckpt_path);
    // The stored configuration wins; only the length of the run may be extended.
    TrainConfig stored = TrainConfig::from_json(state.config_json);
    stored.out = cfg.out;
    stored.threads = cfg.threads;
    stored.progress = cfg.progress;
    if (!cfg.data_dir.empty()) stored.data_dir = cfg.data_dir;
    stored.max_steps = cfg.max_steps;
    stored.track_variance_every = cfg.track_variance_every;
    cfg = stored;
  }
  check_config(cfg);
  set_num_threads(cfg.threads);

  const Dataset train_full = load_data(cfg.data, cfg.data_dir, true);
  const Dataset train_set = subset(train_full, cfg.train_limit);
  const Dataset test_set = subset(load_data(cfg.data, cfg.data_dir, false), cfg.test_limit);
  FQT_INPUT_CHECK(train_set.size() >= cfg.batch, "--batch {} is larger than the training set ({} samples)", cfg.batch,
                  train_set.size());

  Model m = build_model(cfg, train_set);
  SGD opt(m.params, SGDOptions{static_cast<float>(cfg.momentum), static_cast<float>(cfg.weight_decay), cfg.nesterov});
  Loader loader(train_set, cfg.batch, true, augment_for(cfg.augment, cfg.data), cfg.seed, true);
  const int64_t spe = loader.batches_per_epoch();
  const int64_t total_steps = spe * cfg.epochs;
  LrSchedule sched = parse_schedule(cfg.schedule, cfg.lr, total_steps, spe,
                                    static_cast<int64_t>(std::llround(cfg.warmup_epochs * spe)));

  if (resume) {
    state = load_checkpoint(ckpt_path, m.params, m.buffers, opt);
  } else {
    state.seed = cfg.seed;
  }
  state.config_json = cfg.to_json();
  if (!cfg.out.empty()) {
    std::error_code ec;
    fs::create_directories(cfg.out, ec);
    FQT_INPUT_CHECK(!ec && fs::is_directory(cfg.out), "--out {}: cannot create the run folder ({})", cfg.out, ec.message());
    const std::string cfg_path = (fs::path(cfg.out) / "config.json").string();
    std::ofstream(cfg_path) << state.config_json << "\n";
    if (resume) {
      // Drop metrics of epochs after the checkpoint (written before a crash, redone now).
      const std::string mpath = (fs::path(cfg.out) / "metrics.jsonl").string();
      std::ifstream in(mpath);
      std::string line, kept;
      while (std::getline(in, line))
        if (!line.empty()) {
          try {
            const json rec = json::parse(line);
            const bool keep = rec.value("kind", std::string()) == "variance"
                                  ? rec.value("step", int64_t{0}) < state.step  // redone from state.step on
                                  : rec.value("epoch", int64_t{0}) <= state.epoch;
            if (keep) kept += line + "\n";
          } catch (const std::exception&) {
          }
        }
      in.close();
      std::ofstream(mpath, std::ios::trunc) << kept;
    } else {
      std::ofstream(fs::path(cfg.out) / "metrics.jsonl", std::ios::trunc);
    }
  }

  auto save = [&] {
    if (ckpt_path.empty()) return;
    save_checkpoint(ckpt_path, m.params, m.buffers, opt, state);
  };

  if (cfg.progress)
    std::fprintf(stderr, "fqt train: %s on %s (%lld train / %lld test), mode %s, dgrad %s %d-bit, wgrad %s %d-bit, %d epochs x %lld steps, batch %lld%s\n",
                 cfg.model.c_str(), cfg.data.c_str(), static_cast<long long>(train_set.size()),
                 static_cast<long long>(test_set.size()), mode_name(cfg.recipe.mode), traits(cfg.recipe.dgrad.kind).name,
                 cfg.recipe.dgrad.bits, traits(cfg.recipe.wgrad.kind).name, cfg.recipe.wgrad.bits, cfg.epochs,
                 static_cast<long long>(spe), static_cast<long long>(cfg.batch),
                 resume ? fmt::format(", resumed at epoch {} step {}", state.epoch, state.step).c_str() : "");

  TrainResult result;
  SoftmaxCrossEntropy ce;
  Progress progress(cfg.progress);
  using clock = std::chrono::steady_clock;
  const auto run_start = clock::now();
  int64_t run_images = 0;
  while (state.epoch < cfg.epochs) {
    const int64_t epoch = state.epoch;
    const int64_t skip = state.step - epoch * spe;  // > 0 when resuming mid-epoch
    FQT_CHECK(skip >= 0 && skip <= spe, "checkpoint step {} does not lie in epoch {}", state.step, epoch);
    loader.start_epoch(static_cast<uint64_t>(epoch), skip);
    double loss_sum = 0;
    int64_t correct = 0, seen = 0;
    const auto epoch_start = clock::now();
    Batch b;
    int64_t i = skip;
    bool stopped = false;
    while (loader.next(b)) {
      if (cfg.max_steps > 0 && state.step >= cfg.max_steps) {
        stopped = true;
        break;
      }
      StepContext ctx{true, cfg.seed, static_cast<uint64_t>(state.step)};
      opt.zero_grad();
      Tensor logits = m.net->forward(b.x, ctx);
      const float loss = ce.forward(logits, b.y, static_cast<float>(cfg.label_smoothing));
      if (!std::isfinite(loss))
        throw NonFiniteError(fmt::format("loss is {} at epoch {} step {} (try a lower --lr); the last good checkpoint is kept",
                                         loss, epoch + 1, state.step));
      const bool track = cfg.track_variance_every > 0 && state.step % cfg.track_variance_every == 0;
      const Tensor dlogits = ce.backward();
      m.net->backward(track ? dlogits.clone() : dlogits, ctx);
      if (track) log_variance(m, b, dlogits, ctx, cfg, epoch + 1);
      try {
        opt.step(sched.lr_at(state.step));
      } catch (const NonFiniteError& e) {
        throw NonFiniteError(fmt::format("at epoch {} step {}: {}; the last good checkpoint is kept", epoch + 1,
                                         state.step, e.what()));
      }
      ++state.step;
      ++i;
      loss_sum += static_cast<double>(loss) * b.size;
      correct += ce.num_correct();
      seen += b.size;
      run_images += b.size;
      const double secs = std::chrono::duration<double>(clock::now() - epoch_start).count();
      const double ips = seen / std::max(secs, 1e-9);
      const double eta = (spe - i + (cfg.epochs - epoch - 1) * spe) * cfg.batch / std::max(ips, 1e-9);
      progress.update(static_cast<int>(epoch + 1), cfg.epochs, i, spe, loss_sum / seen, double(correct) / seen, ips, eta);
      if (cfg.ckpt_every_steps > 0 && state.step % cfg.ckpt_every_steps == 0 && i < spe) save();
    }
    if (stopped) {
      result.final_train_loss = seen ? loss_sum / seen : 0;
      break;
    }
    const double secs = std::chrono::duration<double>(clock::now() - epoch_start).count();
    state.epoch = epoch + 1;
    EvalResult ev = run_eval(*m.net, test_set, 500);
    save();
    result.epochs_done = state.epoch;
    result.final_train_loss = seen ? loss_sum / seen : 0;
    result.final_test_acc = ev.accuracy;
    result.best_test_acc = std::max(result.best_test_acc, ev.accuracy);
    result.images_per_s = seen / std::max(secs, 1e-9);
    if (cfg.progress)
      std::fprintf(stderr, "epoch %lld/%d: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%% | %.0f img/s, %s\n",
                   static_cast<long long>(state.epoch), cfg.epochs, result.final_train_loss,
                   seen ? 100.0 * correct / seen : 0.0, ev.loss, 100 * ev.accuracy, result.images_per_s,
                   fmt_duration(secs).c_str());
    if (!cfg.out.empty()) {
      json rec = {{"epoch", state.epoch},
                  {"step", state.step},
                  {"train_loss", result.final_train_loss},
                  {"train_acc", seen ? double(correct) / seen : 0.0},
                  {"test_loss", ev.loss},
                  {"test_acc", ev.accuracy},
                  {"images_per_s", result.images_per_s},
                  {"lr", sched.lr_at(std::max<int64_t>(state.step - 1, 0))},
                  {"seconds", secs}};
      std::ofstream(fs::path(cfg.out) / "metrics.jsonl", std::ios::app) << rec.dump() << "\n";
    }
  }
  result.steps = state.step;
  if (result.epochs_done == 0) result.epochs_done = state.epoch;
  const double total = std::chrono::duration<double>(clock::now() - run_start).count();
  if (result.images_per_s == 0 && total > 0) result.images_per_s = run_images / total;
  return result;
}

EvalResult evaluate_checkpoint(const std::string& path, const std::string& data_dir, int64_t limit) {
  TrainState st = read_checkpoint_state(path);
  TrainConfig cfg = TrainConfig::from_json(st.config_json);
  if (!data_dir.empty()) cfg.data_dir = data_dir;
  const Dataset test = subset(load_data(cfg.data, cfg.data_dir, false), limit);
  Model m = build_model(cfg, test);
  SGD opt(m.params, SGDOptions{static_cast<float>(cfg.momentum), static_cast<float>(cfg.weight_decay), cfg.nesterov});
  load_checkpoint(path, m.params, m.buffers, opt);
  return run_eval(*m.net, test, 500);
}

}  // namespace fqt
