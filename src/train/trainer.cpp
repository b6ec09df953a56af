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
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
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
  set_recompute(*m.net, cfg.recompute, cfg.recipe.mode);
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

// ---- non-finite diagnosis ------------------------------------------------------------------

bool finite(const Tensor& t) {
  if (!t.defined() || t.dtype() != DType::f32) return true;
  const float* p = t.data<float>();
  const int64_t n = t.numel();
  float acc = 0.0f;  // x * 0 is NaN exactly when x is NaN or Inf
  for (int64_t i = 0; i < n; ++i) acc += p[i] * 0.0f;
  return std::isfinite(acc);
}

int64_t first_bad(const Tensor& t) {
  const float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(p[i])) return i;
  return -1;
}

std::string layer_of_param(const std::string& name) {
  const size_t dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(0, dot);
}

// Names of the top-level modules: the common dotted prefix of their parameter names ("conv1",
// "stage2.block0"), or their kind and the named module before them ("ReLU after bn1").
std::vector<std::string> child_names(Sequential& seq) {
  std::vector<std::string> names;
  std::string prev;
  for (size_t k = 0; k < seq.size(); ++k) {
    std::vector<Param*> ps;
    seq.child(k).collect_params(ps);
    std::string name;
    if (!ps.empty()) {
      name = layer_of_param(ps[0]->name);
      for (const Param* p : ps)
        while (!name.empty() && p->name.rfind(name + ".", 0) != 0) {
          const size_t dot = name.rfind('.');
          name = dot == std::string::npos ? "" : name.substr(0, dot);
        }
    }
    if (name.empty())
      name = prev.empty() ? fmt::format("{} (module {})", seq.child(k).kind(), k + 1)
                          : fmt::format("{} after {}", seq.child(k).kind(), prev);
    else
      prev = name;
    names.push_back(name);
  }
  return names;
}

// FQT_TEST_POISON="grad:<param>:<step>" or "weight:<param>:<step>" (see train.hpp).
struct Poison {
  std::string kind, param;
  int64_t step = -1;
};

Poison poison_from_env() {
  Poison p;
  const char* env = std::getenv("FQT_TEST_POISON");
  if (!env || !*env) return p;
  const std::string v = env;
  const size_t a = v.find(':'), b = v.rfind(':');
  FQT_INPUT_CHECK(a != std::string::npos && b != a && (v.substr(0, a) == "grad" || v.substr(0, a) == "weight"),
                  "FQT_TEST_POISON='{}' is not grad:<param>:<step> or weight:<param>:<step>", v);
  p.kind = v.substr(0, a);
  p.param = v.substr(a + 1, b - a - 1);
  p.step = std::stoll(v.substr(b + 1));
  return p;
}

void apply_poison(const Poison& poison, const char* kind, int64_t step, const std::vector<Param*>& params) {
  if (poison.step != step || poison.kind != kind) return;
  for (Param* p : params)
    if (p->name == poison.param) {
      (poison.kind == "grad" ? p->grad : p->value).data<float>()[0] = std::numeric_limits<float>::quiet_NaN();
      return;
    }
  throw InputError(fmt::format("FQT_TEST_POISON: the model has no parameter '{}'", poison.param));
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
  FQT_INPUT_CHECK(c.on_nonfinite == "stop" || c.on_nonfinite == "skip",
                  "unknown --on-nonfinite '{}' (valid: stop, skip)", c.on_nonfinite);
  FQT_INPUT_CHECK(c.max_steps >= 0, "--max-steps must be >= 0 (got {})", c.max_steps);
  FQT_INPUT_CHECK(c.ckpt_every_steps >= 0, "--ckpt-every must be >= 0 (got {})", c.ckpt_every_steps);
  FQT_INPUT_CHECK(c.train_limit >= 0 && c.test_limit >= 0, "--train-limit and --test-limit must be >= 0");
  FQT_INPUT_CHECK(c.threads >= 0 && c.threads <= 4096, "--threads must be in 0..4096 (got {})", c.threads);
  FQT_INPUT_CHECK(c.track_variance_every >= 0, "--track-variance must be 0 (off) or a number of steps (got {})",
                  c.track_variance_every);
  FQT_INPUT_CHECK(c.log_every >= 0, "--log-every must be 0 (off) or a number of steps (got {})", c.log_every);
  (void)augment_for(c.augment, c.data);
}

// A small text file, replaced atomically (temporary file + rename); a full disk or an
// unwritable folder is an InputError naming the file.
void write_text(const std::string& path, const std::string& text) {
  const std::string tmp = fmt::format("{}.tmp.{}", path, static_cast<long>(::getpid()));
  {
    std::ofstream f(tmp, std::ios::trunc);
    if (f) f << text;
    if (f) f.flush();
    if (!f) {
      const int err = errno;
      f.close();
      std::remove(tmp.c_str());
      throw InputError(fmt::format("{}: cannot write ({}); is the output folder writable, is the disk full?", path,
                                   std::strerror(err)));
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    throw InputError(fmt::format("{}: cannot rename into place ({})", path, std::strerror(err)));
  }
}

void append_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::app);
  if (f) f << text;
  if (f) f.flush();
  FQT_INPUT_CHECK(static_cast<bool>(f), "{}: cannot append ({}); is the disk full?", path, std::strerror(errno));
}

// Temporary files "<name>.tmp.<pid>" left by a killed run (kill -9 mid-write), whose process
// is gone. A live writer's file is left alone.
void remove_stale_temporaries(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    const size_t k = n.rfind(".tmp.");
    if (k == std::string::npos) continue;
    char* end = nullptr;
    const long pid = std::strtol(n.c_str() + k + 5, &end, 10);
    if (pid <= 0 || *end != '\0') continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;
    fs::remove(e.path(), ec);
  }
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
            {"arith", arith_name(recipe.arith)},
            {"activation", spec_json(recipe.activation)},
            {"weight", spec_json(recipe.weight)},
            {"dgrad", spec_json(recipe.dgrad)},
            {"dgrad_rows", grad_rows_name(recipe.dgrad_rows)},
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
            {"on_nonfinite", on_nonfinite},
            {"track_variance_every", track_variance_every},
            {"log_every", log_every},
            {"recompute", recompute_name(recompute)}};
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
    c.recipe.arith = parse_arith(j.value("arith", "int"));
    c.recipe.activation = spec_from(j.at("activation"));
    c.recipe.weight = spec_from(j.at("weight"));
    c.recipe.dgrad = spec_from(j.at("dgrad"));
    c.recipe.dgrad_rows = parse_grad_rows(j.value("dgrad_rows", "pixel"));  // runs from before the option: pixel
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
    c.on_nonfinite = j.value("on_nonfinite", std::string("stop"));
    c.track_variance_every = j.value("track_variance_every", int64_t{0});
    c.log_every = j.value("log_every", int64_t{0});
    // (before "auto": a bool)
    if (j.contains("recompute"))
      c.recompute = j["recompute"].is_boolean() ? (j["recompute"].get<bool>() ? Recompute::on : Recompute::off)
                                                : parse_recompute(j["recompute"].get<std::string>());
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
    stored.log_every = cfg.log_every;
    stored.recompute = cfg.recompute;
    cfg = stored;
  }
  check_config(cfg);
  std::error_code exists_ec;
  FQT_INPUT_CHECK(resume || cfg.overwrite || ckpt_path.empty() || !fs::exists(ckpt_path, exists_ec),
                  "--out {} already holds a run ({} exists): add --resume to continue it, --overwrite to start "
                  "it again, or choose another --out",
                  cfg.out, ckpt_path);
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
    FQT_INPUT_CHECK(::access(cfg.out.c_str(), W_OK | X_OK) == 0,
                    "--out {}: the run folder is not writable ({}); choose another --out or fix its permissions",
                    cfg.out, std::strerror(errno));
    remove_stale_temporaries(cfg.out);
    write_text((fs::path(cfg.out) / "config.json").string(), state.config_json + "\n");
    const std::string mpath = (fs::path(cfg.out) / "metrics.jsonl").string();
    std::string kept;
    if (resume) {
      // Drop metrics of epochs after the checkpoint (written before a crash, redone now).
      std::ifstream in(mpath);
      std::string line;
      while (std::getline(in, line))
        if (!line.empty()) {
          try {
            const json rec = json::parse(line);
            const std::string kind = rec.value("kind", std::string());
            const bool keep = kind == "variance" ? rec.value("step", int64_t{0}) < state.step  // redone from state.step on
                              : kind == "step"   ? rec.value("step", int64_t{0}) <= state.step
                                                 : rec.value("epoch", int64_t{0}) <= state.epoch;
            if (keep) kept += line + "\n";
          } catch (const std::exception&) {
          }
        }
    }
    write_text(mpath, kept);
  }

  int64_t saved_step = resume ? state.step : -1;  // the last good checkpoint on disk
  auto save = [&] {
    if (ckpt_path.empty()) return;
    save_checkpoint(ckpt_path, m.params, m.buffers, opt, state);
    saved_step = state.step;
  };

  // Non-finite handling: top-level modules are run one by one so that a NaN/Inf caught inside
  // one (quantizers reject them) is attributed to it; batch-norm statistics are snapshot before
  // every step and restored when the step fails.
  Sequential* seq = dynamic_cast<Sequential*>(m.net.get());
  const std::vector<std::string> names = seq ? child_names(*seq) : std::vector<std::string>{};
  std::vector<Tensor> buffer_snapshot;
  for (auto& [name, t] : m.buffers) buffer_snapshot.push_back(t->clone());
  const Poison poison = poison_from_env();
  int64_t skipped = 0;
  size_t saved_peak = 0;  // bytes kept from forward for backward, the most in an epoch's steps
  if (auto it = state.extra.find("nonfinite_skipped"); it != state.extra.end()) skipped = std::atoll(it->second.c_str());
  const float smoothing = static_cast<float>(cfg.label_smoothing);
  SoftmaxCrossEntropy ce;
  // Runs one training step; returns "" or, when a loss/gradient is not finite, "non-finite
  // <what> at epoch E step N, layer <name>: <detail>" (then nothing is updated).
  auto train_step = [&](const Batch& b, const StepContext& ctx, float lr, float& loss) -> std::string {
    for (size_t k = 0; k < buffer_snapshot.size(); ++k)
      std::memcpy(buffer_snapshot[k].raw(), m.buffers[k].second->raw(), buffer_snapshot[k].nbytes());
    const char* phase = "activation";
    std::string layer;
    try {
      apply_poison(poison, "weight", static_cast<int64_t>(ctx.step), m.params);
      Tensor h = b.x;
      if (seq) {
        for (size_t k = 0; k < seq->size(); ++k) {
          layer = names[k];
          try {
            h = seq->child(k).forward(h, ctx);
          } catch (const NonFiniteError& e) {
            // A non-finite input was made by the module before (a quantizer here noticed it).
            if (k == 0 || finite(h)) throw;
            layer = names[k - 1];
            throw NonFiniteError(fmt::format("its output is non-finite (noticed by {}: {})", names[k], e.what()));
          }
        }
      } else {
        h = m.net->forward(h, ctx);
      }
      layer.clear();
      saved_peak = std::max(saved_peak, saved_bytes(*m.net));
      phase = "loss";
      loss = ce.forward(h, b.y, smoothing);
      if (!std::isfinite(loss)) throw NonFiniteError(fmt::format("loss is {}", loss));
      phase = "gradient";
      Tensor g = ce.backward();
      const bool track = cfg.track_variance_every > 0 && static_cast<int64_t>(ctx.step) % cfg.track_variance_every == 0;
      const Tensor dlogits = track ? g.clone() : Tensor();
      if (seq) {
        for (size_t k = seq->size(); k-- > 0;) {
          layer = names[k];
          try {
            g = seq->child(k).backward(g, ctx);
            if (!g.defined()) break;  // the first layer: no input gradient (models.cpp)
          } catch (const NonFiniteError& e) {
            // A non-finite incoming gradient was made by the module after this one.
            if (k + 1 == seq->size() || finite(g)) throw;
            layer = names[k + 1];
            throw NonFiniteError(fmt::format("the gradient it passes back is non-finite (noticed by {}: {})", names[k],
                                             e.what()));
          }
        }
      } else {
        m.net->backward(g, ctx);
      }
      layer.clear();
      if (track) log_variance(m, b, dlogits, ctx, cfg, state.epoch + 1);
      apply_poison(poison, "grad", static_cast<int64_t>(ctx.step), m.params);
      phase = "update";
      opt.step(lr);
      return "";
    } catch (const NonFiniteError& e) {
      std::string detail = e.what();
      // Weights that are already non-finite explain everything downstream.
      for (const Param* p : m.params)
        if (!finite(p->value)) {
          layer = layer_of_param(p->name);
          detail = fmt::format("the weights {} are non-finite ({} at element {}); {}", p->name,
                               p->value.data<float>()[first_bad(p->value)], first_bad(p->value), detail);
          phase = "weight";
          break;
        }
      if (std::string(phase) == "loss" && seq) {
        // The NaN/Inf went through the forward pass unnoticed (fp32): find the first module
        // whose output is not finite.
        Tensor h = b.x;
        for (size_t k = 0; k < seq->size() && layer.empty(); ++k) {
          try {
            h = seq->child(k).forward(h, ctx);
            if (!finite(h)) layer = names[k], detail = fmt::format("its output is non-finite ({})", detail);
          } catch (const NonFiniteError& e2) {
            layer = names[k], detail = e2.what();
          }
        }
      }
      if (std::string(phase) == "update") {
        // Gradients went non-finite without a quantizer noticing (fp32): name the layer nearest
        // the output, where backpropagation produced the NaN/Inf first.
        int bad = 0;
        const Param* origin = nullptr;
        for (const Param* p : m.params)
          if (!finite(p->grad)) ++bad, origin = p;
        if (origin) {
          phase = "gradient";
          layer = layer_of_param(origin->name);
          const int64_t i = first_bad(origin->grad);
          detail = fmt::format("gradient of {} is {} at element {} of {}", origin->name, origin->grad.data<float>()[i],
                               i, origin->grad.numel());
          if (bad > 1)
            detail += fmt::format(" ({} of {} parameter tensors have non-finite gradients; this is the one nearest the "
                                  "output)", bad, m.params.size());
        }
      }
      for (size_t k = 0; k < buffer_snapshot.size(); ++k)
        std::memcpy(m.buffers[k].second->raw(), buffer_snapshot[k].raw(), buffer_snapshot[k].nbytes());
      return fmt::format("non-finite {} at epoch {} step {}, layer {}: {}", phase, state.epoch + 1, ctx.step,
                         layer.empty() ? "unknown" : layer, detail);
    }
  };

  if (cfg.progress)
    std::fprintf(stderr,
                 "fqt train: %s on %s (%lld train / %lld test), %s, %d epochs x %lld steps, batch %lld, recompute %s%s\n",
                 cfg.model.c_str(), cfg.data.c_str(), static_cast<long long>(train_set.size()),
                 static_cast<long long>(test_set.size()), recipe_summary(cfg.recipe).c_str(), cfg.epochs,
                 static_cast<long long>(spe), static_cast<long long>(cfg.batch),
                 recompute_name(effective_recompute(cfg.recompute, cfg.recipe.mode)),
                 resume ? fmt::format(", resumed at epoch {} step {}", state.epoch, state.step).c_str() : "");

  TrainResult result;
  Progress progress(cfg.progress);
  using clock = std::chrono::steady_clock;
  const auto run_start = clock::now();
  int64_t run_images = 0;
  while (state.epoch < cfg.epochs) {
    const int64_t epoch = state.epoch;
    const int64_t skip = state.step - epoch * spe;  // > 0 when resuming mid-epoch
    FQT_INPUT_CHECK(skip >= 0 && skip <= spe,
                    "{}: checkpoint step {} does not lie in epoch {} ({} steps per epoch): the checkpoint is damaged "
                    "or belongs to another run",
                    ckpt_path, state.step, epoch + 1, spe);
    loader.start_epoch(static_cast<uint64_t>(epoch), skip);
    double loss_sum = 0;
    int64_t correct = 0, seen = 0;
    double log_loss = 0;  // --log-every window
    int64_t log_correct = 0, log_seen = 0;
    const auto epoch_start = clock::now();
    saved_peak = 0;
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
      float loss = 0;
      const std::string problem = train_step(b, ctx, sched.lr_at(state.step), loss);
      if (!problem.empty()) {
        if (cfg.on_nonfinite == "stop")
          throw NonFiniteError(fmt::format(
              "{}; training stopped, {} (try a lower --lr, or --on-nonfinite skip)", problem,
              saved_step >= 0 ? fmt::format("the last good checkpoint {} (saved after {} steps) is kept", ckpt_path, saved_step)
                              : std::string("no checkpoint was written")));
        ++skipped;
        state.extra["nonfinite_skipped"] = std::to_string(skipped);
        std::fprintf(stderr, "%sfqt train: warning: %s; step skipped (%lld so far)\n", cfg.progress ? "\n" : "",
                     problem.c_str(), static_cast<long long>(skipped));
        ++state.step;
        ++i;
        if (cfg.ckpt_every_steps > 0 && state.step % cfg.ckpt_every_steps == 0 && i < spe) save();
        continue;
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
      if (cfg.log_every > 0 && !cfg.out.empty()) {
        log_loss += static_cast<double>(loss) * b.size, log_correct += ce.num_correct(), log_seen += b.size;
        if (state.step % cfg.log_every == 0) {
          const json rec = {{"kind", "step"},
                            {"step", state.step},
                            {"epoch", static_cast<double>(state.step) / static_cast<double>(spe)},
                            {"train_loss", log_loss / log_seen},
                            {"train_acc", double(log_correct) / log_seen},
                            {"lr", sched.lr_at(state.step - 1)}};
          append_text((fs::path(cfg.out) / "metrics.jsonl").string(), rec.dump() + "\n");
          log_loss = 0, log_correct = 0, log_seen = 0;
        }
      }
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
    result.saved_activation_bytes = std::max(result.saved_activation_bytes, saved_peak);
    if (cfg.progress)
      std::fprintf(stderr,
                   "epoch %lld/%d: train loss %.4f acc %.2f%% | test loss %.4f acc %.2f%% | %.0f img/s, %s, "
                   "%.1f MiB kept for backward\n",
                   static_cast<long long>(state.epoch), cfg.epochs, result.final_train_loss,
                   seen ? 100.0 * correct / seen : 0.0, ev.loss, 100 * ev.accuracy, result.images_per_s,
                   fmt_duration(secs).c_str(), static_cast<double>(saved_peak) / 1048576.0);
    if (!cfg.out.empty()) {
      json rec = {{"epoch", state.epoch},
                  {"step", state.step},
                  {"train_loss", result.final_train_loss},
                  {"train_acc", seen ? double(correct) / seen : 0.0},
                  {"test_loss", ev.loss},
                  {"test_acc", ev.accuracy},
                  {"images_per_s", result.images_per_s},
                  {"saved_activation_bytes", saved_peak},
                  {"lr", sched.lr_at(std::max<int64_t>(state.step - 1, 0))},
                  {"seconds", secs}};
      append_text((fs::path(cfg.out) / "metrics.jsonl").string(), rec.dump() + "\n");
    }
  }
  result.steps = state.step;
  result.skipped_steps = skipped;
  if (result.epochs_done == 0) result.epochs_done = state.epoch;
  const double total = std::chrono::duration<double>(clock::now() - run_start).count();
  if (result.images_per_s == 0 && total > 0) result.images_per_s = run_images / total;
  return result;
}

EvalResult evaluate_checkpoint(const std::string& path, const std::string& data_dir, int64_t limit) {
  FQT_INPUT_CHECK(limit >= 0, "--test-limit must be >= 0 (got {}; 0 = all samples)", limit);
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
