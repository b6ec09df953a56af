// The training loop: data -> model -> loss -> backward -> SGD, with progress, metrics,
// evaluation and atomic checkpoints. See train.hpp for the run folder's contents.
#include "fqt/train.hpp"

#include "fqt/checkpoint.hpp"
#include "fqt/data.hpp"
#include "fqt/file.hpp"
#include "fqt/layers.hpp"
#include "fqt/models.hpp"
#include "fqt/optim.hpp"
#include "fqt/schedule.hpp"
#include "fqt/variance.hpp"

#include <nlohmann/json.hpp>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>

namespace fqt {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

json spec_json(QuantizerSpec s) { return {{"quantizer", traits(s.kind).name}, {"bits", s.bits}}; }

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

// ---- non-finite diagnosis ------------------------------------------------------------------

bool finite(const Tensor& t) {
  if (!t.defined() || t.dtype() != DType::f32) return true;
  const float* p = t.data<float>();
  const int64_t n = t.numel();
  uint32_t bad = 0;  // NaN and Inf have every exponent bit set: an OR of integer tests (vectorised)
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, sizeof u);
    bad |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
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

// The first top-level module whose output is not finite on input x (run one by one): its name
// and what is wrong, or "" when the forward pass is finite throughout.
std::pair<std::string, std::string> first_non_finite_module(Sequential& seq, const std::vector<std::string>& names,
                                                            const Tensor& x, const StepContext& ctx) {
  Tensor h = x;
  for (size_t k = 0; k < seq.size(); ++k) {
    try {
      h = seq.child(k).forward(h, ctx);
      if (!finite(h)) return {names[k], "its output is non-finite"};
    } catch (const NonFiniteError& e) {
      if (k > 0 && !finite(h)) return {names[k - 1], fmt::format("its output is non-finite (noticed by {}: {})", names[k], e.what())};
      return {names[k], e.what()};
    }
  }
  return {};
}

// Loss and accuracy on the test set (batch-norm running statistics, no state changes). A NaN/Inf
// in the outputs or the loss throws NonFiniteError "layer <name>: <what>" (the module that made
// it, when the model is a Sequential); with `problem`, that text goes there instead (the first
// one), the batch counts as wrong and the loss is NaN.
EvalResult run_eval(Module& net, const Dataset& test, int64_t batch, const std::vector<std::string>& names = {},
                    std::string* problem = nullptr) {
  Loader loader(test, batch, false, Augment{}, 0, false, true);
  loader.start_epoch(0);
  SoftmaxCrossEntropy ce;
  StepContext ctx{false, 0, 0};
  EvalResult r;
  double loss_sum = 0;
  int64_t correct = 0;
  Batch b;
  while (loader.next(b)) {
    float loss = 0;
    try {
      Tensor logits = net.forward(b.x, ctx);
      loss = ce.forward(logits, b.y);
      if (!std::isfinite(loss)) throw NonFiniteError(fmt::format("loss is {}", loss));
    } catch (const NonFiniteError& e) {
      auto* seq = dynamic_cast<Sequential*>(&net);
      auto [layer, detail] = seq && names.size() == seq->size() ? first_non_finite_module(*seq, names, b.x, ctx)
                                                                : std::pair<std::string, std::string>{};
      const std::string what = layer.empty() ? fmt::format("layer unknown: {}", e.what())
                                             : fmt::format("layer {}: {}", layer, detail);
      if (!problem) throw NonFiniteError(what);
      if (problem->empty()) *problem = what;
      loss_sum = std::numeric_limits<double>::quiet_NaN();
      r.samples += b.size;
      continue;
    }
    loss_sum += static_cast<double>(loss) * b.size;
    correct += ce.num_correct();
    r.samples += b.size;
  }
  r.loss = r.samples ? loss_sum / r.samples : 0;
  r.accuracy = r.samples ? static_cast<double>(correct) / r.samples : 0;
  return r;
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

// The checks of a configuration: one given on the command line (`stored` empty: messages name
// the flag) or one stored in a checkpoint (`stored` says where: messages name it and the key),
// so a damaged checkpoint cannot smuggle in what the command line refuses.
void check_config(const TrainConfig& c, const std::string& stored = "") {
  auto need = [&](bool ok, const char* flag, const char* key, const std::string& rule) {
    if (ok) return;
    throw InputError(stored.empty() ? fmt::format("{} {}", flag, rule) : fmt::format("{}: '{}' {}", stored, key, rule));
  };
  auto rethrow_named = [&](const InputError& e) {
    throw InputError(stored.empty() ? std::string(e.what()) : fmt::format("{}: {}", stored, e.what()));
  };
  const auto& models = model_names();
  need(std::find(models.begin(), models.end(), c.model) != models.end(), "--model", "model",
       fmt::format("is '{}', an unknown model (valid: {})", c.model, fmt::join(models, ", ")));
  const auto datasets = dataset_names();
  need(c.data == "synthetic" || std::find(datasets.begin(), datasets.end(), c.data) != datasets.end(), "--data", "data",
       fmt::format("is '{}', an unknown dataset (valid: {}, synthetic)", c.data, fmt::join(datasets, ", ")));
  need(c.epochs >= 1 && c.epochs <= 100000, "--epochs", "epochs", fmt::format("must be in 1..100000 (got {})", c.epochs));
  need(c.batch >= 1 && c.batch <= 65536, "--batch", "batch", fmt::format("must be in 1..65536 (got {})", c.batch));
  need(std::isfinite(c.lr) && c.lr > 0 && c.lr < 100, "--lr", "lr",
       fmt::format("must be a positive number below 100 (got {})", c.lr));
  need(c.momentum >= 0 && c.momentum < 1, "--momentum", "momentum", fmt::format("must be in [0, 1) (got {})", c.momentum));
  need(!c.nesterov || c.momentum > 0, "--nesterov", "nesterov", "needs a momentum above 0");
  need(c.weight_decay >= 0 && c.weight_decay < 1, "--weight-decay", "weight_decay",
       fmt::format("must be in [0, 1) (got {})", c.weight_decay));
  need(c.label_smoothing >= 0 && c.label_smoothing < 1, "--label-smoothing", "label_smoothing",
       fmt::format("must be in [0, 1) (got {})", c.label_smoothing));
  need(c.warmup_epochs >= 0 && c.warmup_epochs <= c.epochs, "--warmup-epochs", "warmup_epochs",
       fmt::format("must be in [0, epochs = {}] (got {})", c.epochs, c.warmup_epochs));
  need(c.recipe.activation.kind == QuantizerKind::zero_aligned, "the activation quantizer", "activation.quantizer",
       fmt::format("must be zero-aligned, the activation grid fqt trains with (got {})",
                   traits(c.recipe.activation.kind).name));
  need(c.recipe.weight.kind == QuantizerKind::symmetric || c.recipe.weight.kind == QuantizerKind::symmetric_row ||
           c.recipe.weight.kind == QuantizerKind::zero_aligned,
       "--weight-quantizer", "weight.quantizer",
       fmt::format("must be symmetric, symmetric-row or zero-aligned (got '{}')", traits(c.recipe.weight.kind).name));
  const std::pair<QuantizerSpec, std::pair<const char*, const char*>> specs[] = {
      {c.recipe.activation, {"--act-bits", "activation.bits"}},
      {c.recipe.weight, {"--weight-bits", "weight.bits"}},
      {c.recipe.dgrad, {"--dgrad-bits", "dgrad.bits"}},
      {c.recipe.wgrad, {"--wgrad-bits", "wgrad.bits"}}};
  for (const auto& [spec, names] : specs)
    need(spec.bits >= 2 && spec.bits <= 8, names.first, names.second, fmt::format("must be 2..8 (got {})", spec.bits));
  need(traits(c.recipe.dgrad.kind).rounding == Rounding::stochastic, "--dgrad", "dgrad.quantizer",
       fmt::format("must be a stochastic quantizer (ptq, ptq-zero, psq, column, bhq), got {}",
                   traits(c.recipe.dgrad.kind).name));
  need(c.recipe.wgrad.kind != QuantizerKind::bhq, "--wgrad bhq", "wgrad.quantizer bhq",
       "is not supported: BHQ transforms rows (samples), which the wgrad GEMM reduces over; use ptq or column");
  need(traits(c.recipe.wgrad.kind).rounding == Rounding::stochastic, "--wgrad", "wgrad.quantizer",
       fmt::format("must be a stochastic quantizer (ptq, ptq-zero, psq, column), got {}", traits(c.recipe.wgrad.kind).name));
  if (c.on_nonfinite != "stop" && c.on_nonfinite != "skip")
    throw InputError(stored.empty() ? fmt::format("unknown --on-nonfinite '{}' (valid: stop, skip)", c.on_nonfinite)
                                    : fmt::format("{}: 'on_nonfinite' is '{}' (valid: stop, skip)", stored, c.on_nonfinite));
  need(c.max_steps >= 0, "--max-steps", "max_steps", fmt::format("must be >= 0 (got {})", c.max_steps));
  need(c.ckpt_every_steps >= 0, "--ckpt-every", "ckpt_every_steps", fmt::format("must be >= 0 (got {})", c.ckpt_every_steps));
  need(c.train_limit >= 0, "--train-limit", "train_limit", fmt::format("must be >= 0 (got {}; 0 = all)", c.train_limit));
  need(c.test_limit >= 0, "--test-limit", "test_limit", fmt::format("must be >= 0 (got {}; 0 = all)", c.test_limit));
  need(c.threads >= 0 && c.threads <= kMaxThreads, "--threads", "threads",
       fmt::format("must be in 0..{} (0 = all cores), got {}", kMaxThreads, c.threads));
  need(c.track_variance_every >= 0, "--track-variance", "track_variance_every",
       fmt::format("must be 0 (off) or a number of steps (got {})", c.track_variance_every));
  need(c.log_every >= 0, "--log-every", "log_every", fmt::format("must be 0 (off) or a number of steps (got {})", c.log_every));
  try {
    (void)augment_for(c.augment, c.data);
    (void)parse_schedule(c.schedule, c.lr, 1000000, 1000);  // the name; the lengths are checked with the data
  } catch (const InputError& e) {
    rethrow_named(e);
  }
}

void append_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::app);
  if (f) f << text;
  if (f) f.flush();
  FQT_INPUT_CHECK(static_cast<bool>(f), "{}: cannot append ({}); is the disk full?", path, std::strerror(errno));
}

// Where a save keeps a file it replaces: "<path>.replaced.tmp.<pid>"; and the empty marker it
// leaves for a file the saved run did not have: "<path>.absent.tmp.<pid>" (temporary names, so
// that remove_stale_temporaries removes what recover_interrupted_save leaves).
std::string aside_name(const std::string& path, long pid) { return aside_prefix(path) + std::to_string(pid); }
std::string absent_name(const std::string& path, long pid) { return fmt::format("{}.absent.tmp.{}", path, pid); }

// `aside` becomes a second name of `path` (a hard link), or where the file system has none, a
// copy (fsync'ed).
void keep_aside(const std::string& path, const std::string& aside) {
  ::unlink(aside.c_str());
  if (::link(path.c_str(), aside.c_str()) == 0) return;
  write_file_atomic(aside, read_whole_file(path));
}

// An exclusive lock on a run folder (flock on the folder itself) for as long as a train() uses it:
// a second `fqt train` in the same folder is refused, and whatever a save left behind in a
// folder we hold belongs to a process that is gone, whatever its pid (pids repeat, e.g. in
// containers). held is false where the file system has no flock (then pids decide).
struct RunFolderLock {
  int fd = -1;
  bool held = false;
  RunFolderLock() = default;
  RunFolderLock(const RunFolderLock&) = delete;
  RunFolderLock& operator=(const RunFolderLock&) = delete;
  ~RunFolderLock() {
    if (fd >= 0) ::close(fd);  // releases the lock
  }
  void acquire(const std::string& dir) {
    if (held || dir.empty()) return;
    if (fd < 0) fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return;  // (an unreadable folder is reported by the checks that follow)
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) {
      held = true;
      return;
    }
    const int err = errno;
    FQT_INPUT_CHECK(err != EWOULDBLOCK, "--out {}: another `fqt train` is using this run folder; wait for it to end, "
                    "or choose another --out", dir);
  }
};

// The pid that ends a temporary name ("<name>.tmp.<pid>", from `at` on), or -1.
long pid_at(const std::string& name, size_t at) {
  char* end = nullptr;
  const long pid = std::strtol(name.c_str() + at, &end, 10);
  return pid > 0 && *end == '\0' ? pid : -1;
}

// Whether the process that wrote "<name>.tmp.<pid>" in a folder we may hold is gone.
bool writer_gone(long pid, bool folder_locked) {
  if (folder_locked || pid == static_cast<long>(::getpid())) return true;
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

// The first save of a run that continues or replaces a saved run (save_pending in train())
// keeps config.json and metrics.jsonl aside (or marks them absent), then renames the old
// checkpoint aside, which marks the save as begun, renames its new files into place, the
// checkpoint last, and removes the asides and markers. A kill in between leaves
// "ckpt.safetensors.replaced.tmp.<pid>" of a process that is gone: without a ckpt.safetensors the
// old run is put back (config.json and metrics.jsonl from their asides, or removed where marked
// absent, then the checkpoint; then the markers and the killed save's temporaries go); beside one
// (the kill came after the new checkpoint landed), the asides and markers are removed. Each step
// can be repeated: a kill during the recovery is recovered by the next run. Returns a note for
// the user when a run was put back.
std::string recover_interrupted_save(const std::string& dir, bool folder_locked) {
  std::error_code ec;
  if (dir.empty() || !fs::is_directory(dir, ec)) return "";
  const std::string ckpt = (fs::path(dir) / "ckpt.safetensors").string();
  const std::string prefix = aside_prefix("ckpt.safetensors");
  std::vector<long> pids;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(prefix, 0) != 0) continue;
    const long pid = pid_at(n, prefix.size());
    if (pid < 0 || !writer_gone(pid, folder_locked)) continue;  // (a live pid: still saving)
    pids.push_back(pid);
  }
  std::string note;
  const char* const names[] = {"config.json", "metrics.jsonl", "ckpt.safetensors"};
  for (long pid : pids) {
    const bool restore = !fs::exists(fs::symlink_status(ckpt, ec));
    if (restore)  // the killed save's staged files first (a full checkpoint among them)
      for (const char* name : names) fs::remove(fmt::format("{}.tmp.{}", (fs::path(dir) / name).string(), pid), ec);
    for (const char* name : names) {
      const std::string path = (fs::path(dir) / name).string();
      const std::string aside = aside_name(path, pid);
      const bool has_aside = fs::exists(fs::symlink_status(aside, ec));
      if (!restore || !has_aside) {
        if (restore && fs::exists(fs::symlink_status(absent_name(path, pid), ec)))
          fs::remove(path, ec);  // the saved run had none: the interrupted save's own
      } else if (rename_file(aside, path) == 0) {
        fs::remove(aside, ec);  // (left when it was a hard link of the file itself)
      } else {
        throw InputError(fmt::format("{}: a save of this run was interrupted (process {}) and its earlier file '{}' "
                                     "cannot be put back ({}); rename it to {} by hand",
                                     path, pid, aside, std::strerror(errno), name));
      }
    }
    for (const char* name : names) {  // the asides (beside a new checkpoint) and the markers
      const std::string path = (fs::path(dir) / name).string();
      fs::remove(aside_name(path, pid), ec);
      fs::remove(absent_name(path, pid), ec);
    }
    if (restore)
      note = fmt::format("the save of a run in {} was interrupted (process {}) before its checkpoint was written: "
                         "the run saved before it is put back",
                         dir, pid);
  }
  return note;
}

// Temporary files "<name>.tmp.<pid>" left by a killed run (kill -9 mid-write), whose process
// is gone. The asides of a save that has begun ("<name>.replaced.tmp.<pid>") are left to
// recover_interrupted_save. Files only `fqt train` writes (config.json, metrics.jsonl,
// ckpt.safetensors and their asides and markers) are stale whatever their pid in a folder we
// hold; others only when no process has that pid (another command may write there).
void remove_stale_temporaries(const std::string& dir, bool folder_locked) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    const size_t k = n.rfind(".tmp.");
    if (k == std::string::npos) continue;
    const long pid = pid_at(n, k + 5);
    if (pid < 0) continue;
    // A save that has begun (its checkpoint aside exists) is recover_interrupted_save's; the asides
    // and markers of one killed before (config.json's, metrics.jsonl's, a copy's temporary) are stale.
    if ((n.find(".replaced.tmp.") != std::string::npos || n.find(".absent.tmp.") != std::string::npos) &&
        fs::exists(fs::symlink_status(aside_name((fs::path(dir) / "ckpt.safetensors").string(), pid), ec)))
      continue;
    const bool ours = n.rfind("config.json.", 0) == 0 || n.rfind("metrics.jsonl.", 0) == 0 ||
                      n.rfind("ckpt.safetensors.", 0) == 0;
    if (!writer_gone(pid, ours && folder_locked)) continue;
    fs::remove(e.path(), ec);
  }
}

// --track-variance: quantization vs sampling variance on the current batch (track_variance in
// variance.hpp), one {"kind": "variance"} record in metrics.jsonl, a warning when quantization
// variance exceeds sampling variance. Leaves gradients and batch-norm statistics unchanged.
// Returns the record's line ("" without a run folder).
std::string log_variance(Model& m, const Batch& b, const Tensor& dlogits, const StepContext& ctx, const TrainConfig& cfg,
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
  if (cfg.out.empty()) return "";
  json rec = {{"kind", "variance"},
              {"epoch", epoch},
              {"step", ctx.step},
              {"quant_variance", total.quant_variance},
              {"sampling_variance", total.sampling_variance},
              {"ratio", std::isfinite(total.ratio) ? json(total.ratio) : json(nullptr)},
              {"layers_over", over.size()},
              {"layers", layers}};
  return rec.dump() + "\n";
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

namespace {

// "run configuration" or "<file>: run configuration (fqt.config)": how messages name a stored
// configuration.
std::string config_label(const std::string& source) {
  return source.empty() ? "run configuration" : fmt::format("{}: run configuration (fqt.config)", source);
}

// Typed, range-checked access to the keys of a stored configuration. Every problem is an
// InputError "<label> is incomplete or has a wrong type: <what>", never a JSON library message.
struct ConfigReader {
  std::string label;

  [[noreturn]] void fail(const std::string& what) const {
    throw InputError(fmt::format("{} is incomplete or has a wrong type: {}", label, what));
  }
  static std::string shown(const json& v) {
    std::string s = v.dump();
    return s.size() > 40 ? s.substr(0, 37) + "..." : s;
  }
  const json& at(const json& obj, const std::string& key, const std::string& path) const {
    if (!obj.contains(key)) fail(fmt::format("key '{}' is missing", path));
    return obj.at(key);
  }
  std::string str(const json& v, const std::string& path) const {
    if (!v.is_string()) fail(fmt::format("'{}' must be a string (got {})", path, shown(v)));
    return v.get<std::string>();
  }
  bool boolean(const json& v, const std::string& path) const {
    if (!v.is_boolean()) fail(fmt::format("'{}' must be true or false (got {})", path, shown(v)));
    return v.get<bool>();
  }
  double number(const json& v, const std::string& path) const {
    if (!v.is_number()) fail(fmt::format("'{}' must be a number (got {})", path, shown(v)));
    return v.get<double>();
  }
  // An integer in [lo, hi] (the range of the field's type; the meaning is checked by check_config).
  int64_t integer(const json& v, const std::string& path, int64_t lo = std::numeric_limits<int64_t>::min(),
                  int64_t hi = std::numeric_limits<int64_t>::max()) const {
    if (v.is_number_unsigned()) {
      const uint64_t u = v.get<uint64_t>();
      if (u > static_cast<uint64_t>(hi)) fail(fmt::format("'{}' is {}, out of range (at most {})", path, u, hi));
      return static_cast<int64_t>(u);
    }
    if (!v.is_number_integer()) fail(fmt::format("'{}' must be an integer (got {})", path, shown(v)));
    const int64_t i = v.get<int64_t>();
    if (i < lo || i > hi) fail(fmt::format("'{}' is {}, out of range ({}..{})", path, i, lo, hi));
    return i;
  }
  int int32(const json& v, const std::string& path) const {
    return static_cast<int>(integer(v, path, std::numeric_limits<int>::min(), std::numeric_limits<int>::max()));
  }
  uint64_t uinteger(const json& v, const std::string& path) const {
    if (v.is_number_unsigned()) return v.get<uint64_t>();
    if (v.is_number_integer()) fail(fmt::format("'{}' must be a non-negative integer (got {})", path, shown(v)));
    fail(fmt::format("'{}' must be an integer (got {})", path, shown(v)));
  }
  QuantizerSpec spec(const json& j, const std::string& key) const {
    const json& o = at(j, key, key);
    if (!o.is_object()) fail(fmt::format("'{}' must be an object {{\"quantizer\": ..., \"bits\": ...}} (got {})", key, shown(o)));
    return {parse_quantizer(str(at(o, "quantizer", key + ".quantizer"), key + ".quantizer")),
            int32(at(o, "bits", key + ".bits"), key + ".bits")};
  }
};

}  // namespace

TrainConfig TrainConfig::from_json(const std::string& text, const std::string& source) {
  const std::string label = config_label(source);
  FQT_INPUT_CHECK(!text.empty(), "{} is empty (the checkpoint holds no settings: damaged?)", label);
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    std::string what = e.what();
    if (what.rfind("[json.exception.", 0) == 0 && what.find("] ") != std::string::npos)
      what = what.substr(what.find("] ") + 2);  // the library's own tag says nothing to users
    throw InputError(fmt::format("{} is not valid JSON: {}", label, what));
  }
  const ConfigReader r{label};
  if (!j.is_object()) r.fail(fmt::format("it is {}, not a JSON object", j.type_name()));
  TrainConfig c;
  try {
    c.model = r.str(r.at(j, "model", "model"), "model");
    c.data = r.str(r.at(j, "data", "data"), "data");
    c.data_dir = j.contains("data_dir") ? r.str(j.at("data_dir"), "data_dir") : "";
    c.recipe.mode = parse_mode(r.str(r.at(j, "mode", "mode"), "mode"));
    c.recipe.arith = parse_arith(j.contains("arith") ? r.str(j.at("arith"), "arith") : "int");
    c.recipe.activation = r.spec(j, "activation");
    c.recipe.weight = r.spec(j, "weight");
    c.recipe.dgrad = r.spec(j, "dgrad");
    // runs from before the option: pixel rows
    c.recipe.dgrad_rows = parse_grad_rows(j.contains("dgrad_rows") ? r.str(j.at("dgrad_rows"), "dgrad_rows") : "pixel");
    c.recipe.wgrad = r.spec(j, "wgrad");
    c.epochs = r.int32(r.at(j, "epochs", "epochs"), "epochs");
    c.batch = r.integer(r.at(j, "batch", "batch"), "batch");
    c.lr = r.number(r.at(j, "lr", "lr"), "lr");
    c.momentum = r.number(r.at(j, "momentum", "momentum"), "momentum");
    c.nesterov = r.boolean(r.at(j, "nesterov", "nesterov"), "nesterov");
    c.weight_decay = r.number(r.at(j, "weight_decay", "weight_decay"), "weight_decay");
    c.schedule = r.str(r.at(j, "schedule", "schedule"), "schedule");
    c.warmup_epochs = r.number(r.at(j, "warmup_epochs", "warmup_epochs"), "warmup_epochs");
    c.label_smoothing = r.number(r.at(j, "label_smoothing", "label_smoothing"), "label_smoothing");
    c.augment = r.str(r.at(j, "augment", "augment"), "augment");
    c.seed = r.uinteger(r.at(j, "seed", "seed"), "seed");
    c.train_limit = r.integer(r.at(j, "train_limit", "train_limit"), "train_limit");
    c.test_limit = r.integer(r.at(j, "test_limit", "test_limit"), "test_limit");
    c.max_steps = j.contains("max_steps") ? r.integer(j.at("max_steps"), "max_steps") : 0;
    c.ckpt_every_steps = j.contains("ckpt_every_steps") ? r.integer(j.at("ckpt_every_steps"), "ckpt_every_steps") : 0;
    c.on_nonfinite = j.contains("on_nonfinite") ? r.str(j.at("on_nonfinite"), "on_nonfinite") : "stop";
    c.track_variance_every =
        j.contains("track_variance_every") ? r.integer(j.at("track_variance_every"), "track_variance_every") : 0;
    c.log_every = j.contains("log_every") ? r.integer(j.at("log_every"), "log_every") : 0;
    // (before "auto": a bool)
    if (j.contains("recompute"))
      c.recompute = j.at("recompute").is_boolean() ? (j.at("recompute").get<bool>() ? Recompute::on : Recompute::off)
                                                   : parse_recompute(r.str(j.at("recompute"), "recompute"));
  } catch (const InputError& e) {
    const std::string m = e.what();
    if (m.rfind(label, 0) == 0) throw;
    throw InputError(fmt::format("{}: {}", label, m));  // an unknown name (mode, quantizer, ...)
  } catch (const json::exception& e) {  // (not expected: every access above is typed)
    r.fail(e.what());
  }
  return c;
}

TrainResult train(const TrainConfig& cfg_in, bool resume) {
  TrainConfig cfg = cfg_in;
  const std::string ckpt_path = cfg.out.empty() ? "" : (fs::path(cfg.out) / "ckpt.safetensors").string();
  TrainState state;
  // The run folder is ours for the whole run. A save killed midway (see save_pending) is settled
  // first: the only change made to the folder before validation, and one that restores the run
  // saved before it.
  RunFolderLock folder_lock;
  {
    std::error_code ec;
    if (!cfg.out.empty() && fs::is_directory(cfg.out, ec)) folder_lock.acquire(cfg.out);
  }
  if (const std::string note = recover_interrupted_save(cfg.out, folder_lock.held); !note.empty())
    std::fprintf(stderr, "fqt train: note: %s\n", note.c_str());
  // ---- validate everything before the run folder is touched -----------------------------------
  FQT_INPUT_CHECK(!(resume && cfg.overwrite),
                  "--resume and --overwrite cannot be combined: --resume continues the run in {}, --overwrite "
                  "starts it again from scratch; give one of them",
                  cfg.out.empty() ? "--out" : cfg.out);
  if (resume) {
    FQT_INPUT_CHECK(!cfg.out.empty(), "--resume needs --out: the run folder to continue");
    FQT_INPUT_CHECK(fs::exists(ckpt_path), "--resume: no checkpoint at {} (nothing to resume; drop --resume to start)",
                    ckpt_path);
    state = read_checkpoint_state(ckpt_path);
    // The stored configuration wins, checked as strictly as the command line; only run-time
    // settings (length, threads, data folder, logging, recomputation) come from the caller
    // (`fqt train --resume` lists them from kResumeApplies in tools/cli/cmd_train.cpp).
    TrainConfig stored = TrainConfig::from_json(state.config_json, ckpt_path);
    check_config(stored, config_label(ckpt_path));
    FQT_INPUT_CHECK(stored.seed == state.seed,
                    "{}: checkpoint metadata fqt.seed = {} but its run configuration has seed {}: the checkpoint is "
                    "damaged",
                    ckpt_path, state.seed, stored.seed);
    stored.out = cfg.out;
    stored.threads = cfg.threads;
    stored.progress = cfg.progress;
    if (!cfg.data_dir.empty()) stored.data_dir = cfg.data_dir;
    stored.max_steps = cfg.max_steps;
    stored.track_variance_every = cfg.track_variance_every;
    stored.log_every = cfg.log_every;
    stored.recompute = cfg.recompute;
    stored.on_validated = cfg.on_validated;
    cfg = stored;
  }
  check_config(cfg);
  {  // Run-time settings that do nothing with this run's (stored) settings: warned about once
     // the input is valid, after the caller's own warnings.
    std::vector<std::string> warnings;
    if (cfg.recipe.mode != Mode::fqt && cfg.track_variance_every > 0)
      warnings.push_back(fmt::format("--track-variance in {} mode: the gradients are not quantized, so its records "
                                     "show a quantization variance of 0 (the sampling variance only)",
                                     mode_name(cfg.recipe.mode)));
    if (cfg.data == "synthetic" && !cfg_in.data_dir.empty())
      warnings.push_back("--data-dir ignored: the synthetic data is generated, not read from files");
    if (!warnings.empty())
      cfg.on_validated = [before = cfg.on_validated, warnings] {
        if (before) before();
        for (const std::string& w : warnings) std::fprintf(stderr, "fqt train: warning: %s\n", w.c_str());
      };
  }
  std::error_code exists_ec;
  const bool replaces = !resume && !ckpt_path.empty() && fs::exists(ckpt_path, exists_ec);
  FQT_INPUT_CHECK(!replaces || cfg.overwrite,
                  "--out {} already holds a run ({} exists): add --resume to continue it, --overwrite to start "
                  "it again, or choose another --out",
                  cfg.out, ckpt_path);
  set_num_threads(cfg.threads);

  const Dataset train_full = load_data(cfg.data, cfg.data_dir, true);
  const Dataset train_set = subset(train_full, cfg.train_limit);
  const Dataset test_set = subset(load_data(cfg.data, cfg.data_dir, false), cfg.test_limit);
  auto files = [](const Dataset& ds, const char* split) {
    return ds.source.empty() ? fmt::format("the {} set", split) : ds.source;
  };
  FQT_INPUT_CHECK(train_full.channels() == test_set.channels() && train_full.height() == test_set.height() &&
                      train_full.width() == test_set.width(),
                  "{} holds {}x{}x{} images but {} holds {}x{}x{}: the training and test images must have the same "
                  "shape (files of two different datasets in one folder?)",
                  files(train_full, "training"), train_full.channels(), train_full.height(), train_full.width(),
                  files(test_set, "test"), test_set.channels(), test_set.height(), test_set.width());
  FQT_INPUT_CHECK(train_full.num_classes == test_set.num_classes,
                  "{} has {} classes but {} has {}: the training and test sets must have the same classes",
                  files(train_full, "training"), train_full.num_classes, files(test_set, "test"), test_set.num_classes);
  FQT_INPUT_CHECK(train_set.size() >= cfg.batch, "--batch {} is larger than the training set ({} samples)", cfg.batch,
                  train_set.size());

  Model m = build_model(cfg, train_set);
  SGD opt(m.params, SGDOptions{static_cast<float>(cfg.momentum), static_cast<float>(cfg.weight_decay), cfg.nesterov});
  Loader loader(train_set, cfg.batch, true, augment_for(cfg.augment, cfg.data), cfg.seed, true);
  const int64_t spe = loader.batches_per_epoch();
  const int64_t total_steps = spe * cfg.epochs;
  LrSchedule sched;
  try {
    sched = parse_schedule(cfg.schedule, cfg.lr, total_steps, spe,
                           static_cast<int64_t>(std::llround(cfg.warmup_epochs * spe)));
  } catch (const InputError& e) {
    if (!resume) throw;
    throw InputError(fmt::format("{}: {}", config_label(ckpt_path), e.what()));
  }

  TrainResult result;
  result.steps_per_epoch = spe;
  if (resume) {
    // Tensors (shapes, dtypes, NaN/Inf) and optimizer metadata; copied into the model only when
    // all of it is valid (the run folder is not touched either way).
    state = load_checkpoint(ckpt_path, m.params, m.buffers, opt, train_set.describe_images());
    const SGDOptions want{static_cast<float>(cfg.momentum), static_cast<float>(cfg.weight_decay), cfg.nesterov};
    FQT_INPUT_CHECK(state.sgd.momentum == want.momentum && state.sgd.weight_decay == want.weight_decay &&
                        state.sgd.nesterov == want.nesterov,
                    "{}: checkpoint metadata fqt.sgd.* (momentum {}, weight decay {}, nesterov {}) does not match its "
                    "run configuration (momentum {}, weight decay {}, nesterov {}): the checkpoint is damaged",
                    ckpt_path, state.sgd.momentum, state.sgd.weight_decay, state.sgd.nesterov, want.momentum,
                    want.weight_decay, want.nesterov);
    // Where the checkpoint lies in the run: inside an epoch (a mid-epoch checkpoint is never at
    // an epoch's end: that one is saved as the next epoch's start), or at the end of the run.
    FQT_INPUT_CHECK(state.epoch <= cfg.epochs,
                    "{}: checkpoint metadata fqt.epoch = {} is past the run's {} epochs: the checkpoint is damaged or "
                    "belongs to another run",
                    ckpt_path, state.epoch, cfg.epochs);
    const int64_t into = state.step - state.epoch * spe;
    // Steps per epoch come from the training set found now: other data (--data-dir) shows here too.
    const std::string data_note =
        fmt::format("the checkpoint is damaged or belongs to another run, or the training data differs from the run's "
                    "({} training samples in {}, batch {})",
                    train_set.size(), train_set.source.empty() ? train_set.name : train_set.source, cfg.batch);
    FQT_INPUT_CHECK(state.epoch < cfg.epochs || into == 0,
                    "{}: checkpoint metadata fqt.epoch = {} (the run's last) but fqt.step = {}, not the run's {} steps "
                    "({} per epoch): {}",
                    ckpt_path, state.epoch, state.step, total_steps, spe, data_note);
    FQT_INPUT_CHECK(into >= 0 && (into < spe || (into == 0 && state.epoch == cfg.epochs)),
                    "{}: checkpoint step {} does not lie in epoch {} ({} steps per epoch): {}", ckpt_path, state.step,
                    state.epoch + 1, spe, data_note);
    if (auto it = state.extra.find("nonfinite_skipped"); it != state.extra.end()) {
      int64_t v = -1;
      const std::string& t = it->second;
      auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), v);
      FQT_INPUT_CHECK(!t.empty() && ec == std::errc() && p == t.data() + t.size() && v >= 0 && v <= state.step,
                      "{}: checkpoint metadata fqt.extra.nonfinite_skipped is '{}', not a step count in 0..{}: the "
                      "checkpoint is damaged",
                      ckpt_path, t, state.step);
    }
    FQT_INPUT_CHECK(cfg.max_steps == 0 || cfg.max_steps >= state.step,
                    "--max-steps {}: the run in {} is already at step {} (its checkpoint), and a run cannot go back; "
                    "give a larger --max-steps, or 0 to run all {} epochs",
                    cfg.max_steps, cfg.out, state.step, cfg.epochs);
    if (state.epoch >= cfg.epochs || (cfg.max_steps > 0 && state.step >= cfg.max_steps)) {
      if (cfg.on_validated) cfg.on_validated();
      result.nothing_to_do = true;
      result.epochs_done = state.epoch;
      result.steps = state.step;
      result.note =
          state.epoch >= cfg.epochs
              ? fmt::format("the run in {} is complete ({} epochs, {} steps); nothing was changed (`fqt eval "
                            "--checkpoint {}` evaluates it)",
                            cfg.out, state.epoch, state.step, ckpt_path)
              : fmt::format("the run in {} is already at step {} = --max-steps (epoch {}, {} of {} steps); nothing "
                            "was changed (a larger --max-steps, or none, continues it)",
                            cfg.out, state.step, state.epoch + 1, into, spe);
      return result;
    }
  } else {
    state.seed = cfg.seed;
  }
  if (cfg.on_validated) cfg.on_validated();

  // ---- the run folder ---------------------------------------------------------------------------
  // A fresh run writes config.json and an empty metrics.jsonl now. A run that continues
  // (--resume) or replaces (--overwrite) a saved run changes nothing in the folder until it
  // writes its first checkpoint: metrics are kept in memory until then, and then config.json,
  // metrics.jsonl and the checkpoint are replaced together (save_pending below), so a run that
  // fails before or while doing that leaves the saved run as it was.
  state.config_json = cfg.to_json();
  const std::string config_path = cfg.out.empty() ? "" : (fs::path(cfg.out) / "config.json").string();
  const std::string mpath = cfg.out.empty() ? "" : (fs::path(cfg.out) / "metrics.jsonl").string();
  bool pending = false;
  std::string pending_metrics;
  if (!cfg.out.empty()) {
    std::error_code ec;
    fs::create_directories(cfg.out, ec);
    FQT_INPUT_CHECK(!ec && fs::is_directory(cfg.out), "--out {}: cannot create the run folder ({})", cfg.out, ec.message());
    FQT_INPUT_CHECK(::access(cfg.out.c_str(), W_OK | X_OK) == 0,
                    "--out {}: the run folder is not writable ({}); choose another --out or fix its permissions",
                    cfg.out, std::strerror(errno));
    folder_lock.acquire(cfg.out);  // (a folder created just now)
    remove_stale_temporaries(cfg.out, folder_lock.held);
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
    if (resume || replaces) {
      pending = true;
      pending_metrics = kept;
    } else {
      write_file_atomic(config_path, state.config_json + "\n");
      write_file_atomic(mpath, kept);
    }
  }
  auto add_metrics = [&](const std::string& line) {
    if (mpath.empty() || line.empty()) return;
    if (pending) pending_metrics += line;
    else append_text(mpath, line);
  };

  int64_t saved_step = resume ? state.step : -1;  // the last good checkpoint on disk
  const std::string saved_run_note =
      fmt::format("the run in {} it was to {} is left as it was", cfg.out, replaces ? "replace" : "continue");
  // The first checkpoint of a run that continues or replaces a saved run (see
  // recover_interrupted_save for the protocol): the new config.json, metrics.jsonl and checkpoint
  // are written first (fsync'ed temporaries), the old ones kept aside (config.json and
  // metrics.jsonl linked or copied, the checkpoint renamed: last, it marks the save as begun), the
  // new ones renamed into place, the checkpoint last, and the asides removed. A failure puts the
  // old files back; a kill before the checkpoint landed is undone by the next run in the folder.
  auto save_pending = [&] {
    std::vector<std::unique_ptr<StagedFile>> staged;
    try {
      staged.push_back(std::make_unique<StagedFile>(config_path, state.config_json + "\n"));
      staged.push_back(std::make_unique<StagedFile>(mpath, pending_metrics));
      staged.push_back(
          std::make_unique<StagedFile>(ckpt_path, serialize_checkpoint(m.params, m.buffers, opt, state)));
    } catch (const InputError& e) {
      throw InputError(fmt::format("{}; {}", e.what(), saved_run_note));
    }
    const std::vector<std::string> paths = {config_path, mpath, ckpt_path};
    std::vector<std::string> aside, absent;
    std::vector<bool> had;
    std::error_code ec;
    for (const std::string& p : paths) {
      aside.push_back(aside_name(p, static_cast<long>(::getpid())));
      absent.push_back(absent_name(p, static_cast<long>(::getpid())));
      had.push_back(fs::exists(p, ec));
    }
    auto remove_asides = [&] {
      for (size_t j = 0; j < paths.size(); ++j) {
        fs::remove(aside[j], ec);
        fs::remove(absent[j], ec);
      }
    };
    try {
      for (size_t j = 0; j < 2; ++j) {
        if (had[j]) keep_aside(paths[j], aside[j]);
        else write_file_atomic(absent[j], "");
      }
      if (had[2] && rename_file(ckpt_path, aside[2]) != 0)
        throw InputError(fmt::format("{}: cannot rename it aside to '{}' ({})", ckpt_path, aside[2],
                                     std::strerror(errno)));
    } catch (const InputError& e) {
      remove_asides();
      throw InputError(fmt::format("{}; {}", e.what(), saved_run_note));
    }
    const char* kill_before = std::getenv("FQT_TEST_KILL_BEFORE");  // (test hook, see train.hpp)
    size_t done = 0;
    try {
      for (; done < staged.size(); ++done) {
        if (kill_before && fs::path(paths[done]).filename() == kill_before) ::raise(SIGKILL);
        staged[done]->commit();
      }
    } catch (const InputError& e) {
      if (staged[done]->committed()) ++done;  // renamed, then its folder's fsync failed: undo it too
      // First the new checkpoint goes, if it landed: from then on every instant is "checkpoint
      // aside, no ckpt.safetensors", which the next run's recovery undoes should this be killed.
      if (done > 2 && ::unlink(ckpt_path.c_str()) != 0 && errno != ENOENT) {
        const int err = errno;
        remove_asides();  // the new run is in place, all three files: it stays
        throw InputError(fmt::format("{}; the new {} could not be removed to put the saved run back ({}): the folder "
                                     "holds the new run",
                                     e.what(), ckpt_path, std::strerror(err)));
      }
      std::string restore_failed;
      for (size_t j = 0; j < 2; ++j) {
        if (had[j]) {
          // (rename of a hard link onto its own file does nothing: the aside name is removed after)
          if (rename_file(aside[j], paths[j]) == 0) fs::remove(aside[j], ec);
          else
            restore_failed += fmt::format("; and {} could not be put back from '{}' ({})", paths[j], aside[j],
                                          std::strerror(errno));
        } else if (j < done && !fs::remove(paths[j], ec) && fs::exists(paths[j], ec)) {
          restore_failed += fmt::format("; and {} (which the saved run did not have) could not be removed", paths[j]);
        }
      }
      if (restore_failed.empty() && had[2] && rename_file(aside[2], ckpt_path) != 0)
        restore_failed += fmt::format("; and {} could not be put back from '{}' ({})", ckpt_path, aside[2],
                                      std::strerror(errno));
      if (restore_failed.empty()) remove_asides();
      else  // the checkpoint aside, the markers and the other asides left stay for the next run's recovery
        restore_failed += fmt::format("; the saved checkpoint is kept as '{}', and the next `fqt train` in {} puts "
                                      "the saved run back",
                                      aside[2], cfg.out);
      throw InputError(restore_failed.empty() ? fmt::format("{}; {}", e.what(), saved_run_note)
                                              : fmt::format("{}{}", e.what(), restore_failed));
    }
    remove_asides();
    pending = false;
    pending_metrics.clear();
  };
  auto save = [&] {
    if (ckpt_path.empty()) return;
    if (pending) save_pending();
    else save_checkpoint(ckpt_path, m.params, m.buffers, opt, state);
    saved_step = state.step;
  };
  // What a failed run leaves behind, for its error message.
  auto kept_note = [&] {
    if (saved_step >= 0)
      return fmt::format("the last good checkpoint {} (saved after {} steps) is kept", ckpt_path, saved_step);
    if (replaces)
      return fmt::format("no checkpoint of this run was written, and the run in {} it was to replace is left as it was",
                         cfg.out);
    return std::string("no checkpoint was written");
  };
  const char* const hint = resume ? "(the run's stored settings apply on --resume: to change them start it again "
                                    "with --overwrite, e.g. with a lower --lr or --on-nonfinite skip)"
                                  : "(try a lower --lr, or --on-nonfinite skip)";

  // Non-finite handling: top-level modules are run one by one so that a NaN/Inf caught inside
  // one (quantizers reject them) is attributed to it; batch-norm statistics are snapshot before
  // every step and restored when the step fails; with skip, weights and momentum too (an update
  // can overflow them).
  Sequential* seq = dynamic_cast<Sequential*>(m.net.get());
  const std::vector<std::string> names = seq ? child_names(*seq) : std::vector<std::string>{};
  std::vector<Tensor> buffer_snapshot;
  for (auto& [name, t] : m.buffers) buffer_snapshot.push_back(t->clone());
  const bool skip_mode = cfg.on_nonfinite == "skip";
  std::vector<Tensor> param_snapshot, momentum_snapshot;
  bool momentum_initialized_snapshot = false;
  if (skip_mode) {
    for (const Param* p : m.params) param_snapshot.push_back(p->value.clone());
    for (const Tensor& t : opt.momentum_buffers()) momentum_snapshot.push_back(t.clone());
  }
  const Poison poison = poison_from_env();
  int64_t skipped = 0;
  size_t saved_peak = 0;  // bytes kept from forward for backward, the most in an epoch's steps
  if (auto it = state.extra.find("nonfinite_skipped"); it != state.extra.end()) skipped = std::atoll(it->second.c_str());
  const float smoothing = static_cast<float>(cfg.label_smoothing);
  SoftmaxCrossEntropy ce;
  // Runs one training step; returns "" or, when a loss/gradient/update is not finite, "non-finite
  // <what> at epoch E step N, layer <name>: <detail>" (then nothing is updated).
  auto train_step = [&](const Batch& b, const StepContext& ctx, float lr, float& loss) -> std::string {
    for (size_t k = 0; k < buffer_snapshot.size(); ++k)
      std::memcpy(buffer_snapshot[k].raw(), m.buffers[k].second->raw(), buffer_snapshot[k].nbytes());
    if (skip_mode) {
      for (size_t k = 0; k < param_snapshot.size(); ++k)
        std::memcpy(param_snapshot[k].raw(), m.params[k]->value.raw(), param_snapshot[k].nbytes());
      for (size_t k = 0; k < momentum_snapshot.size(); ++k)
        std::memcpy(momentum_snapshot[k].raw(), opt.momentum_buffers()[k].raw(), momentum_snapshot[k].nbytes());
      momentum_initialized_snapshot = opt.momentum_initialized();
    }
    const char* phase = "activation";
    std::string layer;
    std::string after_update;  // what the update made non-finite
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
      if (track) add_metrics(log_variance(m, b, dlogits, ctx, cfg, state.epoch + 1));
      apply_poison(poison, "grad", static_cast<int64_t>(ctx.step), m.params);
      phase = "update";
      opt.step(lr);
      // A finite gradient times a large learning rate can still overflow the weights, and a
      // finite forward pass the batch-norm statistics: caught here, not at the next use.
      for (const Param* p : m.params)
        if (!finite(p->value)) {
          const int64_t i = first_bad(p->value);
          phase = "weights";
          layer = layer_of_param(p->name);
          after_update = fmt::format("the SGD update (learning rate {}) made {} non-finite ({} at element {} of {})", lr,
                                     p->name, p->value.data<float>()[i], i, p->value.numel());
          throw NonFiniteError(after_update);
        }
      for (const auto& [name, t] : m.buffers)
        if (!finite(*t)) {
          const int64_t i = first_bad(*t);
          phase = "batch-norm statistics";
          layer = layer_of_param(name);
          after_update = fmt::format("the running statistics {} became non-finite ({} at element {} of {})", name,
                                     t->data<float>()[i], i, t->numel());
          throw NonFiniteError(after_update);
        }
      return "";
    } catch (const NonFiniteError& e) {
      std::string detail = e.what();
      // Weights that are already non-finite explain everything downstream.
      for (const Param* p : m.params)
        if (after_update.empty() && !finite(p->value)) {
          layer = layer_of_param(p->name);
          detail = fmt::format("the weights {} are non-finite ({} at element {}); {}", p->name,
                               p->value.data<float>()[first_bad(p->value)], first_bad(p->value), detail);
          phase = "weight";
          break;
        }
      if (std::string(phase) == "loss" && seq) {
        // The NaN/Inf went through the forward pass unnoticed (fp32): find the first module
        // whose output is not finite.
        auto [l, d] = first_non_finite_module(*seq, names, b.x, ctx);
        if (!l.empty()) layer = l, detail = d == "its output is non-finite" ? fmt::format("{} ({})", d, detail) : d;
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
      if (skip_mode) {
        for (size_t k = 0; k < param_snapshot.size(); ++k)
          std::memcpy(m.params[k]->value.raw(), param_snapshot[k].raw(), param_snapshot[k].nbytes());
        for (size_t k = 0; k < momentum_snapshot.size(); ++k)
          std::memcpy(opt.momentum_buffers()[k].raw(), momentum_snapshot[k].raw(), momentum_snapshot[k].nbytes());
        opt.set_momentum_initialized(momentum_initialized_snapshot);
      }
      return fmt::format("non-finite {} at epoch {} step {}, layer {}: {}", phase, state.epoch + 1, ctx.step,
                         layer.empty() ? "unknown" : layer, detail);
    }
  };
  // The test set at the end of an epoch (or where --max-steps stops the run). Weights that give a
  // NaN/Inf there (a diverged run: finite, but so large that the forward pass overflows) stop the
  // run like a step would; with skip, a warning, the batch counts as wrong, the test loss is NaN,
  // and training goes on (its next steps meet the same overflow and are skipped).
  auto evaluate_now = [&](const char* when) {
    std::string problem;
    const EvalResult ev = run_eval(*m.net, test_set, 500, names, &problem);
    if (problem.empty()) return ev;
    const std::string what =
        fmt::format("non-finite test output at epoch {} step {}, {} (evaluating the test set {})",
                    state.epoch + (std::string(when) == "where --max-steps stopped" ? 1 : 0), state.step, problem, when);
    if (!skip_mode) throw NonFiniteError(fmt::format("{}; training stopped, {} {}", what, kept_note(), hint));
    std::fprintf(stderr, "%sfqt train: warning: %s; those test samples count as wrong\n", cfg.progress ? "\n" : "",
                 what.c_str());
    return ev;
  };

  if (cfg.progress)
    std::fprintf(stderr,
                 "fqt train: %s on %s (%lld train / %lld test), %s, %d epochs x %lld steps, batch %lld, recompute %s%s\n",
                 cfg.model.c_str(), cfg.data.c_str(), static_cast<long long>(train_set.size()),
                 static_cast<long long>(test_set.size()), recipe_summary(cfg.recipe).c_str(), cfg.epochs,
                 static_cast<long long>(spe), static_cast<long long>(cfg.batch),
                 recompute_name(effective_recompute(cfg.recompute, cfg.recipe.mode)),
                 resume ? fmt::format(", resumed at epoch {} step {}", state.epoch, state.step).c_str() : "");

  Progress progress(cfg.progress);
  using clock = std::chrono::steady_clock;
  const auto run_start = clock::now();
  int64_t run_images = 0;
  while (state.epoch < cfg.epochs) {
    const int64_t epoch = state.epoch;
    const int64_t skip = state.step - epoch * spe;  // > 0 when resuming mid-epoch
    FQT_CHECK(skip >= 0 && skip < spe, "step {} outside epoch {}", state.step, epoch + 1);
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
    while (true) {
      // (At the epoch's last step the epoch ends as usual first: its evaluation, metrics record
      // and checkpoint with the next epoch's number; the next epoch then stops at once.)
      if (cfg.max_steps > 0 && state.step >= cfg.max_steps && i < spe) {
        stopped = true;
        break;
      }
      if (!loader.next(b)) break;
      StepContext ctx{true, cfg.seed, static_cast<uint64_t>(state.step)};
      opt.zero_grad();
      float loss = 0;
      const std::string problem = train_step(b, ctx, sched.lr_at(state.step), loss);
      if (!problem.empty()) {
        if (!skip_mode) throw NonFiniteError(fmt::format("{}; training stopped, {} {}", problem, kept_note(), hint));
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
          add_metrics(rec.dump() + "\n");
          log_loss = 0, log_correct = 0, log_seen = 0;
        }
      }
      if (cfg.ckpt_every_steps > 0 && state.step % cfg.ckpt_every_steps == 0 && i < spe) save();
    }
    if (stopped) {
      if (i > skip) {
        // --max-steps ended the run inside this epoch: checkpoint here (a later --resume goes on
        // from this step, bit for bit) and evaluate, so the result is not the last epoch's.
        const double secs = std::chrono::duration<double>(clock::now() - epoch_start).count();
        if (saved_step != state.step) save();
        const EvalResult ev = evaluate_now("where --max-steps stopped");
        result.final_train_loss = seen ? loss_sum / seen : 0;
        result.final_test_acc = ev.accuracy;
        result.best_test_acc = std::max(result.best_test_acc, ev.accuracy);
        result.evaluated = true;
        result.stopped_mid_epoch = true;
        result.images_per_s = seen / std::max(secs, 1e-9);
        result.saved_activation_bytes = std::max(result.saved_activation_bytes, saved_peak);
        if (cfg.progress)
          std::fprintf(stderr,
                       "%sstopped at --max-steps %lld in epoch %lld (%lld of %lld steps): train loss %.4f | test loss "
                       "%.4f acc %.2f%%%s\n",
                       isatty(fileno(stderr)) ? "\n" : "", static_cast<long long>(cfg.max_steps), static_cast<long long>(epoch + 1),
                       static_cast<long long>(i), static_cast<long long>(spe), result.final_train_loss, ev.loss,
                       100 * ev.accuracy, ckpt_path.empty() ? "" : ", checkpoint saved");
      }
      break;
    }
    const double secs = std::chrono::duration<double>(clock::now() - epoch_start).count();
    state.epoch = epoch + 1;
    const EvalResult ev = evaluate_now("at the end of the epoch");
    save();
    result.epochs_done = state.epoch;
    result.final_train_loss = seen ? loss_sum / seen : 0;
    result.final_test_acc = ev.accuracy;
    result.best_test_acc = std::max(result.best_test_acc, ev.accuracy);
    result.evaluated = true;
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
      add_metrics(rec.dump() + "\n");
    }
  }
  result.steps = state.step;
  result.skipped_steps = skipped;
  result.epochs_done = state.epoch;
  const double total = std::chrono::duration<double>(clock::now() - run_start).count();
  if (result.images_per_s == 0 && total > 0) result.images_per_s = run_images / total;
  return result;
}

EvalResult evaluate_checkpoint(const std::string& path, const std::string& data_dir, int64_t limit) {
  FQT_INPUT_CHECK(limit >= 0, "--test-limit must be >= 0 (got {}; 0 = all samples)", limit);
  TrainState st = read_checkpoint_state(path);
  TrainConfig cfg = TrainConfig::from_json(st.config_json, path);
  check_config(cfg, config_label(path));
  if (!data_dir.empty()) cfg.data_dir = data_dir;
  const Dataset test = subset(load_data(cfg.data, cfg.data_dir, false), limit);
  Model m = build_model(cfg, test);
  SGD opt(m.params, SGDOptions{static_cast<float>(cfg.momentum), static_cast<float>(cfg.weight_decay), cfg.nesterov});
  load_checkpoint(path, m.params, m.buffers, opt, test.describe_images());
  Sequential* seq = dynamic_cast<Sequential*>(m.net.get());
  try {
    return run_eval(*m.net, test, 500, seq ? child_names(*seq) : std::vector<std::string>{});
  } catch (const NonFiniteError& e) {
    throw InputError(fmt::format("{}: the model it holds gives non-finite test outputs ({}): the run had diverged "
                                 "when it was saved",
                                 path, e.what()));
  }
}

}  // namespace fqt
