// The training job: determinism, bit-exact resume, learning in every mode (synthetic data).
#include "fqt/checkpoint.hpp"
#include "fqt/train.hpp"

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

using namespace fqt;
namespace fs = std::filesystem;

namespace {
// The run folders this process made, removed when it exits (each test run used to leave ~15 of
// them, ~250 KB each, in the temporary directory for good).
struct TmpDirs {
  std::vector<fs::path> paths;
  ~TmpDirs() {
    std::error_code ec;
    for (const fs::path& p : paths) fs::remove_all(p, ec);
  }
};
TmpDirs& tmp_dirs() {
  static TmpDirs dirs;
  return dirs;
}

std::string tmp_dir(const std::string& name) {
  // Per process: several checkouts may run the suite at once on one machine.
  fs::path p = fs::temp_directory_path() / ("fqt_test_train_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  tmp_dirs().paths.push_back(p);
  return p.string();
}

TrainConfig small(const std::string& out, Mode mode = Mode::fqt) {
  TrainConfig c;
  c.model = "cnn";
  c.data = "synthetic";
  c.recipe.mode = mode;
  c.recipe.dgrad = {QuantizerKind::bhq, 5};
  c.epochs = 2;
  c.batch = 64;
  c.lr = 0.05;
  c.train_limit = 512;  // 8 steps per epoch
  c.test_limit = 256;
  c.seed = 3;
  c.out = out;
  c.progress = false;
  return c;
}

// Every parameter, buffer and momentum tensor of two checkpoints, bit for bit.
void expect_same_checkpoint(const std::string& a, const std::string& b) {
  SafeTensors x = read_safetensors(a), y = read_safetensors(b);
  ASSERT_EQ(x.tensors.size(), y.tensors.size());
  for (const auto& [name, t] : x.tensors) {
    ASSERT_TRUE(y.tensors.count(name)) << name;
    const Tensor& u = y.tensors.at(name);
    ASSERT_EQ(t.shape(), u.shape()) << name;
    EXPECT_EQ(std::memcmp(t.raw(), u.raw(), t.nbytes()), 0) << name << " differs";
  }
  EXPECT_EQ(x.metadata.at("fqt.step"), y.metadata.at("fqt.step"));
}
}  // namespace

TEST(Train, SameSeedGivesBitIdenticalWeights) {
  const std::string a = tmp_dir("same_a"), b = tmp_dir("same_b");
  train(small(a));
  train(small(b));
  expect_same_checkpoint(a + "/ckpt.safetensors", b + "/ckpt.safetensors");
  // A different seed changes the gradient draws (and the init): weights differ.
  TrainConfig c = small(tmp_dir("same_c"));
  c.seed = 4;
  train(c);
  SafeTensors x = read_safetensors(a + "/ckpt.safetensors"), y = read_safetensors(c.out + "/ckpt.safetensors");
  const Tensor& w1 = x.tensors.begin()->second;
  const Tensor& w2 = y.tensors.at(x.tensors.begin()->first);
  EXPECT_NE(std::memcmp(w1.raw(), w2.raw(), w1.nbytes()), 0);
}

TEST(Train, ResumeMidEpochEqualsUninterruptedRun) {
  const std::string full = tmp_dir("resume_full"), cut = tmp_dir("resume_cut");
  train(small(full));
  // Checkpoint every 3 steps, stop at step 7 (mid-epoch 1: --max-steps checkpoints where it
  // stops), then resume: the run must end bit-identical to the uninterrupted one.
  TrainConfig c = small(cut);
  c.ckpt_every_steps = 3;
  c.max_steps = 7;
  TrainResult r = train(c);
  EXPECT_EQ(r.steps, 7);
  EXPECT_TRUE(r.stopped_mid_epoch);
  EXPECT_TRUE(r.evaluated);
  EXPECT_EQ(read_checkpoint_state(cut + "/ckpt.safetensors").step, 7);
  TrainConfig again = small(cut);
  again.ckpt_every_steps = 3;
  train(again, /*resume=*/true);
  expect_same_checkpoint(full + "/ckpt.safetensors", cut + "/ckpt.safetensors");
}

// --recompute changes what is kept for backward, not the arithmetic: runs with it on or auto end
// with the same weights, batch-norm buffers and momenta as one with it off, also when a run is
// resumed with another setting halfway (it is a run-time choice, like the thread count).
TEST(Train, RecomputeTrainsBitIdentically) {
  for (const char* model : {"cnn", "preact_resnet20"}) {
    const std::string keep = tmp_dir(std::string("rc_keep_") + model), re = tmp_dir(std::string("rc_re_") + model),
                      au = tmp_dir(std::string("rc_auto_") + model), mixed = tmp_dir(std::string("rc_mixed_") + model);
    TrainConfig c = small(keep);
    c.model = model;
    c.epochs = 1;
    c.recompute = Recompute::off;
    const TrainResult r_off = train(c);
    c.out = re;
    c.recompute = Recompute::on;
    const TrainResult r_on = train(c);
    expect_same_checkpoint(keep + "/ckpt.safetensors", re + "/ckpt.safetensors");
    c.out = au;
    c.recompute = Recompute::automatic;
    const TrainResult r_auto = train(c);
    expect_same_checkpoint(keep + "/ckpt.safetensors", au + "/ckpt.safetensors");
    // what each kept for backward (the run's result and its metrics): on < auto < off
    EXPECT_GT(r_on.saved_activation_bytes, 0u) << model;
    EXPECT_LT(r_on.saved_activation_bytes, r_auto.saved_activation_bytes) << model;
    EXPECT_LT(r_auto.saved_activation_bytes, r_off.saved_activation_bytes) << model;
    std::ifstream metrics(au + "/metrics.jsonl");
    std::string line, last_epoch;
    while (std::getline(metrics, line))
      if (line.find("\"saved_activation_bytes\"") != std::string::npos) last_epoch = line;
    EXPECT_NE(last_epoch.find("\"saved_activation_bytes\":" + std::to_string(r_auto.saved_activation_bytes)),
              std::string::npos)
        << last_epoch;
    c.out = mixed;
    c.recompute = Recompute::off;
    c.max_steps = 4;
    c.ckpt_every_steps = 4;
    train(c);
    c.max_steps = 0;
    c.recompute = Recompute::on;
    train(c, /*resume=*/true);
    expect_same_checkpoint(keep + "/ckpt.safetensors", mixed + "/ckpt.safetensors");
  }
}

// The stored configuration names the setting; one written before "auto" existed (a bool) still
// reads, and a nonsense value is an InputError.
TEST(Train, RecomputeInStoredConfig) {
  TrainConfig c;
  EXPECT_EQ(c.recompute, Recompute::automatic);
  for (Recompute r : {Recompute::off, Recompute::automatic, Recompute::on}) {
    c.recompute = r;
    EXPECT_EQ(TrainConfig::from_json(c.to_json()).recompute, r);
  }
  auto with = [&](const std::string& v) {
    std::string j = c.to_json();
    const std::string key = "\"recompute\": \"on\"";
    const size_t at = j.find(key);
    EXPECT_NE(at, std::string::npos) << j;
    return j.replace(at, key.size(), "\"recompute\": " + v);
  };
  EXPECT_EQ(TrainConfig::from_json(with("true")).recompute, Recompute::on);
  EXPECT_EQ(TrainConfig::from_json(with("false")).recompute, Recompute::off);
  EXPECT_THROW(TrainConfig::from_json(with("\"sometimes\"")), InputError);
}

// The dgrad rows setting is stored with the run and read back; a configuration from before it
// existed reads as pixel rows, and a nonsense value is an InputError naming the valid ones.
TEST(Train, DgradRowsInStoredConfig) {
  TrainConfig c;
  EXPECT_EQ(c.recipe.dgrad_rows, GradRows::pixel);
  for (GradRows r : {GradRows::pixel, GradRows::sample}) {
    c.recipe.dgrad_rows = r;
    EXPECT_EQ(TrainConfig::from_json(c.to_json()).recipe.dgrad_rows, r);
  }
  std::string j = c.to_json();
  const std::string key = "\"dgrad_rows\": \"sample\",";
  const size_t at = j.find(key);
  ASSERT_NE(at, std::string::npos) << j;
  EXPECT_EQ(TrainConfig::from_json(std::string(j).erase(at, key.size())).recipe.dgrad_rows, GradRows::pixel);
  try {
    TrainConfig::from_json(std::string(j).replace(at, key.size(), "\"dgrad_rows\": \"row\","));
    ADD_FAILURE() << "no error for dgrad_rows \"row\"";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("valid: pixel, sample"), std::string::npos) << e.what();
  }
  c.recipe.mode = Mode::fqt;
  EXPECT_NE(recipe_summary(c.recipe).find("dgrad bhq 5 per sample"), std::string::npos) << recipe_summary(c.recipe);
}

// Rows per sample (the paper's): training lowers the loss, and a run cut mid-epoch and resumed
// ends bit-identical to the uninterrupted one, the resumed half taking the stored setting (the
// resuming config asks for pixel rows; a run's recipe is its stored one).
TEST(Train, RowsPerSampleTrainAndResume) {
  const std::string full = tmp_dir("rows_full"), cut = tmp_dir("rows_cut");
  TrainConfig c = small(full);
  c.recipe.dgrad_rows = GradRows::sample;
  c.epochs = 3;  // (as LossGoesDownInEveryMode: this problem's loss first rises, then falls)
  const TrainResult whole = train(c);
  EXPECT_GT(whole.final_test_acc, 0.5) << "10 classes, chance is 0.1";
  TrainConfig first = small("");
  first.recipe.dgrad_rows = GradRows::sample;
  first.epochs = 1, first.max_steps = 1;
  EXPECT_LT(whole.final_train_loss, 0.7 * train(first).final_train_loss);
  TrainConfig part = small(cut);
  part.recipe.dgrad_rows = GradRows::sample;
  part.epochs = 3;
  part.ckpt_every_steps = 3;
  part.max_steps = 7;
  train(part);
  TrainConfig again = small(cut);  // (pixel rows asked for: the stored sample rows are used)
  again.epochs = 3;
  again.ckpt_every_steps = 3;
  train(again, /*resume=*/true);
  expect_same_checkpoint(full + "/ckpt.safetensors", cut + "/ckpt.safetensors");
}

TEST(Train, LossGoesDownInEveryMode) {
  for (Mode mode : {Mode::fp32, Mode::qat, Mode::fqt}) {
    TrainConfig c = small("", mode);
    c.epochs = 1;
    c.max_steps = 1;
    TrainResult first = train(c);  // loss of the first step only
    c.epochs = 3;
    c.max_steps = 0;
    TrainResult last = train(c);
    EXPECT_LT(last.final_train_loss, 0.7 * first.final_train_loss) << mode_name(mode);
    EXPECT_GT(last.final_test_acc, 0.5) << mode_name(mode) << ": 10 classes, chance is 0.1";
  }
}

TEST(Train, BadSettingsAreInputErrors) {
  TrainConfig c = small("");
  c.batch = 0;
  EXPECT_THROW(train(c), InputError);
  c = small("");
  c.recipe.dgrad = {QuantizerKind::affine, 4};  // deterministic: would bias the gradient
  EXPECT_THROW(train(c), InputError);
  c = small("");
  c.model = "resnet1000";
  EXPECT_THROW(train(c), InputError);
  c = small(tmp_dir("noresume"));
  EXPECT_THROW(train(c, /*resume=*/true), InputError);
}

// Starting a fresh run in a folder that holds one is refused, and the saved checkpoint survives.
TEST(Train, FreshRunDoesNotOverwriteSavedRun) {
  const std::string dir = tmp_dir("no_overwrite");
  TrainConfig c = small(dir);
  c.epochs = 1;
  train(c);
  const auto before = fs::file_size(dir + "/ckpt.safetensors");
  const auto stamp = fs::last_write_time(dir + "/ckpt.safetensors");
  EXPECT_THROW(train(c), InputError);
  EXPECT_EQ(fs::file_size(dir + "/ckpt.safetensors"), before);
  EXPECT_EQ(fs::last_write_time(dir + "/ckpt.safetensors"), stamp);
}

namespace {
// Sets FQT_TEST_POISON for one scope (the trainer's NaN-injection test hook).
struct PoisonEnv {
  explicit PoisonEnv(const char* v) { setenv("FQT_TEST_POISON", v, 1); }
  ~PoisonEnv() { unsetenv("FQT_TEST_POISON"); }
};

std::string train_error(const TrainConfig& c) {
  try {
    train(c);
  } catch (const NonFiniteError& e) {
    return e.what();
  }
  return "<no error>";
}

bool all_finite(const std::string& ckpt) {
  for (const auto& [name, t] : read_safetensors(ckpt).tensors)
    if (t.dtype() == DType::f32)
      for (int64_t i = 0; i < t.numel(); ++i)
        if (!std::isfinite(t.data<float>()[i])) return false;
  return true;
}
}  // namespace

// A NaN injected into one layer's gradient stops the run with a message naming the step and
// that layer, in every mode; the checkpoint on disk stays the last good one.
TEST(TrainNonFinite, NaNGradientStopsNamingStepAndLayer) {
  for (Mode mode : {Mode::fp32, Mode::qat, Mode::fqt}) {
    SCOPED_TRACE(mode_name(mode));
    const std::string out = tmp_dir("nan_stop");
    TrainConfig c = small(out, mode);
    c.ckpt_every_steps = 2;
    PoisonEnv poison("grad:conv2.weight:5");
    const std::string msg = train_error(c);
    EXPECT_NE(msg.find("non-finite gradient at epoch 1 step 5, layer conv2: gradient of conv2.weight is nan"),
              std::string::npos) << msg;
    EXPECT_NE(msg.find("(saved after 4 steps) is kept"), std::string::npos) << msg;
    EXPECT_EQ(read_checkpoint_state(out + "/ckpt.safetensors").step, 4);
    EXPECT_TRUE(all_finite(out + "/ckpt.safetensors"));
  }
}

// Non-finite weights (here injected; in practice an overflowing update) are named too, whichever
// check notices first (a quantizer in the forward pass, the loss, or the optimizer).
TEST(TrainNonFinite, NaNWeightNamesTheLayer) {
  for (Mode mode : {Mode::fp32, Mode::fqt}) {
    SCOPED_TRACE(mode_name(mode));
    TrainConfig c = small("", mode);
    PoisonEnv poison("weight:fc.weight:2");
    const std::string msg = train_error(c);
    EXPECT_NE(msg.find("at epoch 1 step 2, layer fc: the weights fc.weight are non-finite"), std::string::npos) << msg;
  }
}

// A real divergence (absurd learning rate, fp32): the first module whose output overflows is named.
TEST(TrainNonFinite, DivergenceIsReportedWithTheLayer) {
  TrainConfig c = small("", Mode::fp32);
  c.model = "mlp";
  c.lr = 99;
  c.momentum = 0.99;
  c.weight_decay = 0;
  const std::string msg = train_error(c);
  EXPECT_NE(msg.find("non-finite"), std::string::npos) << msg;
  EXPECT_NE(msg.find(", layer fc"), std::string::npos) << msg;
  EXPECT_NE(msg.find("try a lower --lr"), std::string::npos) << msg;
}

// --on-nonfinite skip: the poisoned step makes no update and is counted; the run finishes with
// finite weights and the count survives in the checkpoint.
TEST(TrainNonFinite, SkipModeSkipsTheStepAndFinishes) {
  const std::string out = tmp_dir("nan_skip");
  TrainConfig c = small(out);
  c.on_nonfinite = "skip";
  PoisonEnv poison("grad:conv1.weight:3");
  TrainResult r = train(c);
  EXPECT_EQ(r.skipped_steps, 1);
  EXPECT_EQ(r.steps, 16);
  EXPECT_TRUE(all_finite(out + "/ckpt.safetensors"));
  EXPECT_EQ(read_checkpoint_state(out + "/ckpt.safetensors").extra.at("nonfinite_skipped"), "1");
  c.on_nonfinite = "sometimes";
  EXPECT_THROW(train(c), InputError);
}

// An output folder that cannot be created or written is an InputError before any training.
TEST(Train, UnwritableOutputFolderIsAnInputError) {
  const std::string dir = tmp_dir("unwritable");
  fs::create_directories(dir);
  std::FILE* f = std::fopen((dir + "/file").c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fclose(f);
  TrainConfig c = small(dir + "/file/run");  // a folder below a regular file
  try {
    train(c);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot create the run folder"), std::string::npos) << e.what();
  }
}

// A temporary file left by a killed writer (its process is gone) is removed when the run is
// resumed; another command's file of a live process is left alone, but a checkpoint temporary is
// fqt train's own, stale in a folder it holds whatever its pid (pids repeat, e.g. in containers).
// The resumed run is unaffected.
TEST(Train, ResumeRemovesTemporariesOfKilledRuns) {
  const std::string out = tmp_dir("stale_tmp");
  TrainConfig c = small(out);
  c.max_steps = 3;
  c.ckpt_every_steps = 1;
  train(c);
  const std::string dead = out + "/ckpt.safetensors.tmp.999999999";  // above any pid_max
  const std::string live = out + "/variance.json.tmp.1";              // pid 1 always exists
  const std::string reused = out + "/ckpt.safetensors.tmp.1";
  // A save killed while it kept config.json and metrics.jsonl aside (a copy, on a file system
  // without hard links), before its checkpoint aside marked it as begun: stale too.
  const std::string dead_aside = out + "/config.json.replaced.tmp.999999998";
  const std::string dead_copy = out + "/metrics.jsonl.replaced.tmp.999999998.tmp.999999998";
  for (const std::string& p : {dead, live, reused, dead_aside, dead_copy}) {
    std::FILE* f = std::fopen(p.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs("partial", f);
    std::fclose(f);
  }
  train(small(out), /*resume=*/true);
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_FALSE(fs::exists(dead_aside));
  EXPECT_FALSE(fs::exists(dead_copy));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_FALSE(fs::exists(reused));
  EXPECT_EQ(read_checkpoint_state(out + "/ckpt.safetensors").step, 16);
}

namespace {
// Every file of a folder and its bytes.
std::map<std::string, std::string> folder(const std::string& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    std::ifstream f(e.path(), std::ios::binary);
    out[e.path().filename().string()] = std::string(std::istreambuf_iterator<char>(f), {});
  }
  return out;
}

std::string input_error(const TrainConfig& c, bool resume) {
  try {
    train(c, resume);
  } catch (const InputError& e) {
    return e.what();
  }
  return "<no error>";
}

TrainConfig tiny(const std::string& out) {  // mlp, 2 steps an epoch, 2 epochs
  TrainConfig c = small(out);
  c.model = "mlp";
  c.train_limit = 128;
  c.test_limit = 64;
  return c;
}

// The checkpoint's metadata and tensors rewritten with one change.
void rewrite_checkpoint(const std::string& path, const std::function<void(SafeTensors&)>& change) {
  SafeTensors st = read_safetensors(path);
  change(st);
  write_safetensors(path, NamedTensors(st.tensors.begin(), st.tensors.end()), st.metadata);
}
}  // namespace

// --max-steps inside an epoch: the checkpoint is written at that step and the test set
// evaluated; --resume goes on from there to the uninterrupted run's weights, bit for bit.
TEST(Train, MaxStepsMidEpochCheckpointsAndResumes) {
  const std::string full = tmp_dir("ms_full"), cut = tmp_dir("ms_cut");
  train(tiny(full));
  TrainConfig c = tiny(cut);
  c.max_steps = 1;
  const TrainResult r = train(c);
  EXPECT_EQ(r.steps, 1);
  EXPECT_EQ(r.epochs_done, 0);
  EXPECT_TRUE(r.stopped_mid_epoch);
  EXPECT_TRUE(r.evaluated);
  EXPECT_GT(r.final_test_acc, 0.0);
  EXPECT_EQ(read_checkpoint_state(cut + "/ckpt.safetensors").step, 1);
  c.max_steps = 3;
  EXPECT_EQ(train(c, /*resume=*/true).steps, 3);
  EXPECT_EQ(read_checkpoint_state(cut + "/ckpt.safetensors").step, 3);
  c.max_steps = 0;
  const TrainResult rest = train(c, /*resume=*/true);
  EXPECT_FALSE(rest.stopped_mid_epoch);
  expect_same_checkpoint(full + "/ckpt.safetensors", cut + "/ckpt.safetensors");
}

// --max-steps at an epoch's last step ends that epoch as usual (evaluation, metrics record, the
// checkpoint numbered for the next epoch), so --resume goes on from it (it was refused: "step 2
// does not lie in epoch 1") and the run ends as an uninterrupted one.
TEST(Train, MaxStepsAtAnEpochEndResumes) {
  const std::string full = tmp_dir("ms_end_full"), cut = tmp_dir("ms_end_cut");
  train(tiny(full));
  TrainConfig c = tiny(cut);
  c.max_steps = 2;  // (2 steps per epoch)
  const TrainResult r = train(c);
  EXPECT_EQ(r.steps, 2);
  EXPECT_EQ(r.epochs_done, 1);
  EXPECT_FALSE(r.stopped_mid_epoch);
  const TrainState st = read_checkpoint_state(cut + "/ckpt.safetensors");
  EXPECT_EQ(st.step, 2);
  EXPECT_EQ(st.epoch, 1);
  c.max_steps = 0;
  const TrainResult rest = train(c, /*resume=*/true);
  EXPECT_EQ(rest.epochs_done, 2);
  expect_same_checkpoint(full + "/ckpt.safetensors", cut + "/ckpt.safetensors");
}

// A resume with nothing to do (complete run, or already at --max-steps) changes nothing and says
// so; one asking for fewer steps than the checkpoint holds is an InputError, also changing nothing.
TEST(Train, ResumeWithNothingToDoOrGoingBackChangesNothing) {
  const std::string dir = tmp_dir("nothing");
  TrainConfig c = tiny(dir);
  c.max_steps = 3;
  train(c);
  const auto before = folder(dir);
  TrainResult r = train(c, /*resume=*/true);
  EXPECT_TRUE(r.nothing_to_do);
  EXPECT_NE(r.note.find("already at step 3 = --max-steps"), std::string::npos) << r.note;
  EXPECT_EQ(folder(dir), before);
  c.max_steps = 2;
  EXPECT_NE(input_error(c, true).find("--max-steps 2: the run in " + dir + " is already at step 3"), std::string::npos);
  EXPECT_EQ(folder(dir), before);
  c.max_steps = 0;
  train(c, /*resume=*/true);
  const auto done = folder(dir);
  r = train(c, /*resume=*/true);
  EXPECT_TRUE(r.nothing_to_do);
  EXPECT_NE(r.note.find("is complete (2 epochs, 4 steps)"), std::string::npos) << r.note;
  EXPECT_EQ(folder(dir), done);
}

// A resume refused for a damaged checkpoint leaves every file of the folder as it was (config.json
// used to be rewritten first), and names the file.
TEST(Train, FailedResumeChangesNothing) {
  const std::string dir = tmp_dir("failed_resume");
  TrainConfig c = tiny(dir);
  c.max_steps = 1;
  train(c);
  const std::string ckpt = dir + "/ckpt.safetensors";
  const std::string good = folder(dir).at("ckpt.safetensors");
  // std::string(1, 'x') rather than "x": GCC 12 warns falsely (-Wrestrict, its bug 105329) on
  // assigning a one-character literal to a map's string here.
  const std::vector<std::pair<std::function<void(SafeTensors&)>, std::string>> damages = {
      {[](SafeTensors& st) { st.tensors.at("param/fc1.weight").data<float>()[0] = NAN; },
       "tensor 'param/fc1.weight' holds nan at element 0"},
      {[](SafeTensors& st) { st.metadata["fqt.step"] = "999999999"; }, "checkpoint step 999999999 does not lie in epoch 1"},
      {[](SafeTensors& st) { st.metadata["fqt.epoch"] = "7", st.metadata["fqt.step"] = "14"; },
       "fqt.epoch = 7 is past the run's 2 epochs"},
      {[](SafeTensors& st) { st.metadata["fqt.sgd.weight_decay"] = "0.25"; }, "does not match its run configuration"},
      {[](SafeTensors& st) { st.metadata["fqt.extra.nonfinite_skipped"] = std::string(1, 'x'); }, "nonfinite_skipped is 'x'"},
  };
  for (const auto& [damage, expect] : damages) {
    SCOPED_TRACE(expect);
    {
      std::ofstream(ckpt, std::ios::binary | std::ios::trunc) << good;
    }
    rewrite_checkpoint(ckpt, damage);
    const auto before = folder(dir);
    c.max_steps = 4;
    const std::string msg = input_error(c, true);
    EXPECT_EQ(msg.rfind(ckpt + ": ", 0), 0u) << msg;
    EXPECT_NE(msg.find(expect), std::string::npos) << msg;
    EXPECT_EQ(folder(dir), before);
  }
}

// The configuration stored in a checkpoint passes the command line's checks, with messages that
// name the file and the key (not a flag, not the JSON library).
TEST(Train, StoredConfigIsValidatedLikeTheCommandLine) {
  const std::string dir = tmp_dir("stored_config");
  TrainConfig c = tiny(dir);
  c.max_steps = 1;
  train(c);
  const std::string ckpt = dir + "/ckpt.safetensors";
  const std::string good = folder(dir).at("ckpt.safetensors");
  const std::vector<std::pair<std::pair<std::string, std::string>, std::string>> rows = {
      {{"activation", R"({"quantizer": "bhq", "bits": 8})"}, "'activation.quantizer' must be zero-aligned"},
      {{"weight", R"({"quantizer": "ptq", "bits": 8})"}, "'weight.quantizer' must be symmetric, symmetric-row or zero-aligned"},
      {{"dgrad", R"({"quantizer": "affine", "bits": 4})"}, "'dgrad.quantizer' must be a stochastic quantizer"},
      {{"dgrad", R"({"quantizer": "bhq", "bits": 9})"}, "'dgrad.bits' must be 2..8 (got 9)"},
      {{"seed", "-1"}, "'seed' must be a non-negative integer (got -1)"},
      {{"seed", "1.5"}, "'seed' must be an integer (got 1.5)"},
      {{"log_every", "-1"}, "'log_every' must be 0 (off) or a number of steps (got -1)"},
      {{"track_variance_every", "-1"}, "'track_variance_every' must be 0 (off)"},
      {{"batch", "1e30"}, "'batch' must be an integer (got 1e+30)"},
      {{"batch", "\"64\""}, "'batch' must be an integer (got \"64\")"},
      {{"epochs", "10000000000"}, "'epochs' is 10000000000, out of range"},
      {{"momentum", "null"}, "'momentum' must be a number (got null)"},
      {{"schedule", "\"wavy\""}, "schedule"},
      {{"on_nonfinite", "\"ignore\""}, "'on_nonfinite' is 'ignore' (valid: stop, skip)"},
  };
  for (const auto& [edit, expect] : rows) {
    SCOPED_TRACE(edit.first + " = " + edit.second);
    {
      std::ofstream(ckpt, std::ios::binary | std::ios::trunc) << good;
    }
    rewrite_checkpoint(ckpt, [&, &edit = edit](SafeTensors& st) {
      nlohmann::json j = nlohmann::json::parse(st.metadata.at("fqt.config"));
      j[edit.first] = nlohmann::json::parse(edit.second);
      st.metadata["fqt.config"] = j.dump();
    });
    const auto before = folder(dir);
    const std::string msg = input_error(c, true);
    EXPECT_EQ(msg.rfind(ckpt + ": run configuration (fqt.config)", 0), 0u) << msg;
    EXPECT_NE(msg.find(expect), std::string::npos) << msg;
    EXPECT_EQ(msg.find("json.exception"), std::string::npos) << msg;
    EXPECT_EQ(msg.find("--"), std::string::npos) << msg;
    EXPECT_EQ(folder(dir), before);
    try {
      evaluate_checkpoint(ckpt);
      ADD_FAILURE() << "eval accepted it";
    } catch (const InputError& e) {
      EXPECT_EQ(std::string(e.what()).rfind(ckpt + ": ", 0), 0u) << e.what();
    }
  }
  // Without a file: the same messages, naming the configuration.
  try {
    TrainConfig::from_json(R"({"model": "mlp", "data": 3})");
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_STREQ(e.what(), "run configuration is incomplete or has a wrong type: 'data' must be a string (got 3)");
  }
  try {
    TrainConfig::from_json("");
    ADD_FAILURE();
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("run configuration is empty"), std::string::npos) << e.what();
  }
}

// --overwrite replaces the old run's files together when the new run writes its first
// checkpoint: a new run that fails first (bad input, divergence) leaves the old one as it was.
TEST(Train, FailedOverwriteKeepsTheOldRun) {
  const std::string dir = tmp_dir("overwrite");
  train(tiny(dir));
  const auto before = folder(dir);
  TrainConfig bad = tiny(dir);
  bad.overwrite = true;
  bad.batch = 32;
  bad.lr = 99;  // diverges in its first epoch
  try {
    train(bad);
    ADD_FAILURE() << "did not diverge";
  } catch (const NonFiniteError& e) {
    EXPECT_NE(std::string(e.what()).find("no checkpoint of this run was written, and the run in " + dir +
                                         " it was to replace is left as it was"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(folder(dir), before);
  TrainConfig good = tiny(dir);
  good.overwrite = true;
  good.epochs = 1;
  good.batch = 32;
  train(good);
  const auto after = folder(dir);
  EXPECT_NE(after.at("config.json").find("\"batch\": 32"), std::string::npos);
  EXPECT_EQ(read_checkpoint_state(dir + "/ckpt.safetensors").step, 4);
  EXPECT_EQ(std::count(after.at("metrics.jsonl").begin(), after.at("metrics.jsonl").end(), '\n'), 1);
  // --resume with --overwrite is contradictory.
  good.overwrite = true;
  EXPECT_NE(input_error(good, true).find("--resume and --overwrite cannot be combined"), std::string::npos);
  EXPECT_EQ(folder(dir), after);
}

// The first checkpoint of an --overwrite or --resume run replaces config.json, metrics.jsonl and
// the checkpoint together: when any of the three cannot be written or renamed into place (a full
// disk; EPERM for an immutable file, injected), the saved run is exactly as it was, with no
// temporary left, and the error says so. Before this, --overwrite removed the old checkpoint
// first and a failed config.json rename lost it.
TEST(Train, SaveThatFailsMidwayKeepsTheSavedRun) {
  for (const bool resume : {false, true}) {
    const std::string dir = tmp_dir(resume ? "replace_fault_resume" : "replace_fault_overwrite");
    TrainConfig first = tiny(dir);
    if (resume) first.max_steps = 2;  // end of epoch 1 of 2
    train(first);
    const auto before = folder(dir);
    ASSERT_EQ(before.size(), 3u);
    TrainConfig next = tiny(dir);
    next.overwrite = !resume;
    if (!resume) next.batch = 32;
    const std::string note =
        "the run in " + dir + " it was to " + std::string(resume ? "continue" : "replace") + " is left as it was";
    for (const char* file : {"config.json", "metrics.jsonl", "ckpt.safetensors"}) {
      SCOPED_TRACE(std::string(resume ? "--resume, " : "--overwrite, ") + file);
      detail::set_commit_fault_for_testing(file, EPERM);
      std::string msg = input_error(next, resume);
      detail::set_commit_fault_for_testing("", 0);
      EXPECT_EQ(msg.rfind(dir + "/" + file + ": cannot rename", 0), 0u) << msg;
      EXPECT_NE(msg.find("Operation not permitted"), std::string::npos) << msg;
      EXPECT_NE(msg.find(note), std::string::npos) << msg;
      EXPECT_EQ(folder(dir), before);
      // The rename done, the folder's fsync failing: that file is put back too.
      detail::set_commit_fault_for_testing(file, EIO, true);
      msg = input_error(next, resume);
      detail::set_commit_fault_for_testing("", 0);
      EXPECT_EQ(msg.rfind(dir + "/" + file + ": written, but syncing its folder failed", 0), 0u) << msg;
      EXPECT_NE(msg.find(note), std::string::npos) << msg;
      EXPECT_EQ(folder(dir), before);
    }
    {  // A full disk while the first of the three is written.
      detail::set_write_fault_for_testing(10);
      const std::string msg = input_error(next, resume);
      detail::set_write_fault_for_testing(-1);
      EXPECT_EQ(msg.rfind(dir + "/config.json: write failed after 10 bytes", 0), 0u) << msg;
      EXPECT_NE(msg.find(note), std::string::npos) << msg;
      EXPECT_EQ(folder(dir), before);
    }
    // The same run without a fault saves; --overwrite left nothing of the old run behind.
    train(next, resume);
    const auto after = folder(dir);
    EXPECT_EQ(after.size(), 3u);
    EXPECT_EQ(read_checkpoint_state(dir + "/ckpt.safetensors").step, resume ? 4 : 8);
    EXPECT_EQ(after.at("config.json").find("\"batch\": 32") != std::string::npos, !resume);
  }
}

// Two faults in a row: the checkpoint's rename refused, then putting metrics.jsonl back refused
// too. The save cannot restore the saved run itself: it leaves the checkpoint aside and says so,
// and the next `fqt train` in the folder (here a fresh run, refused as the folder holds a run)
// puts the saved run back byte for byte, nothing else left.
TEST(Train, RollbackThatFailsIsFinishedByTheNextRun) {
  for (const bool resume : {false, true}) {
    SCOPED_TRACE(resume ? "--resume" : "--overwrite");
    const std::string dir = tmp_dir(resume ? "double_fault_resume" : "double_fault_overwrite");
    TrainConfig first = tiny(dir);
    first.max_steps = 2;
    train(first);
    const auto before = folder(dir);
    TrainConfig next = tiny(dir);
    next.overwrite = !resume;
    detail::set_commit_fault_for_testing("ckpt.safetensors", EPERM);
    detail::set_commit_fault_for_testing("metrics.jsonl", EIO, false, 1);  // its commit passes, its restore not
    const std::string msg = input_error(next, resume);
    detail::set_commit_fault_for_testing("", 0);
    EXPECT_EQ(msg.rfind(dir + "/ckpt.safetensors: cannot rename", 0), 0u) << msg;
    EXPECT_NE(msg.find("and " + dir + "/metrics.jsonl could not be put back"), std::string::npos) << msg;
    EXPECT_NE(msg.find("the saved checkpoint is kept as '" + dir + "/ckpt.safetensors.replaced.tmp."),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("the next `fqt train` in " + dir + " puts the saved run back"), std::string::npos) << msg;
    EXPECT_FALSE(fs::exists(dir + "/ckpt.safetensors"));
    EXPECT_NE(folder(dir), before);
    EXPECT_NE(input_error(tiny(dir), false).find("already holds a run"), std::string::npos);
    EXPECT_EQ(folder(dir), before);
  }
}

// One `fqt train` per run folder: a second one (here: this test holding the folder's flock, as a
// running train() does) is refused before anything is touched, for a fresh run, --resume and
// --overwrite alike; once the folder is free the same run goes through.
TEST(Train, RunFolderInUseIsRefused) {
  const std::string dir = tmp_dir("in_use");
  TrainConfig first = tiny(dir);
  first.max_steps = 2;
  train(first);
  const auto before = folder(dir);
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  TrainConfig over = tiny(dir);
  over.overwrite = true;
  for (const auto& [c, resume] : {std::pair{tiny(dir), true}, std::pair{over, false}, std::pair{tiny(dir), false}}) {
    const std::string msg = input_error(c, resume);
    EXPECT_EQ(msg, "--out " + dir + ": another `fqt train` is using this run folder; wait for it to end, or choose "
                   "another --out");
    EXPECT_EQ(folder(dir), before);
  }
  ::close(fd);
  EXPECT_EQ(train(tiny(dir), true).steps, 4);
}

// A divergence that only shows in the epoch's test evaluation (weights finite but so large that
// the forward pass overflows) is reported like a step's: epoch, step, layer, what is kept, the
// hint. With skip, the run goes on (its later steps are skipped) and writes its checkpoints.
TEST(TrainNonFinite, DivergenceInTheEvaluationIsReported) {
  TrainConfig c = tiny(tmp_dir("diverge_eval"));
  c.batch = 32;
  c.lr = 99;
  const std::string msg = train_error(c);
  EXPECT_NE(msg.find("non-finite test output at epoch 1 step 4, layer fc"), std::string::npos) << msg;
  EXPECT_NE(msg.find("training stopped, no checkpoint was written (try a lower --lr, or --on-nonfinite skip)"),
            std::string::npos)
      << msg;
  c.out = tmp_dir("diverge_eval_skip");
  c.on_nonfinite = "skip";
  const TrainResult r = train(c);
  EXPECT_EQ(r.steps, 8);
  EXPECT_GT(r.skipped_steps, 0);
  EXPECT_TRUE(all_finite(c.out + "/ckpt.safetensors"));
}

// With skip, a step whose update overflows the weights, or whose weights were already poisoned,
// is rolled back entirely (weights and momentum too), so the run goes on from finite weights.
TEST(TrainNonFinite, SkipRestoresWeightsAndMomentum) {
  const std::string out = tmp_dir("skip_weights");
  TrainConfig c = tiny(out);
  c.on_nonfinite = "skip";
  PoisonEnv poison("weight:fc1.weight:1");
  const TrainResult r = train(c);
  EXPECT_EQ(r.skipped_steps, 1);
  EXPECT_EQ(r.steps, 4);
  EXPECT_TRUE(all_finite(out + "/ckpt.safetensors"));
}

// MNIST-style files of two image shapes: refused when loading, naming both files, before anything
// is written.
TEST(Train, TrainAndTestImagesOfDifferentShapesAreRefused) {
  const std::string data = tmp_dir("mixed_mnist"), out = tmp_dir("mixed_run");
  fs::create_directories(data);
  auto be32 = [](std::string& s, uint32_t v) {
    for (int sh = 24; sh >= 0; sh -= 8) s.push_back(static_cast<char>((v >> sh) & 0xff));
  };
  auto write = [&](const std::string& split, uint32_t n, uint32_t side) {
    std::string img, lab;
    be32(img, 0x803), be32(img, n), be32(img, side), be32(img, side);
    img.append(size_t{n} * side * side, '\x40');
    be32(lab, 0x801), be32(lab, n);
    for (uint32_t i = 0; i < n; ++i) lab.push_back(static_cast<char>(i % 10));
    std::ofstream(data + "/" + split + "-images-idx3-ubyte", std::ios::binary) << img;
    std::ofstream(data + "/" + split + "-labels-idx1-ubyte", std::ios::binary) << lab;
  };
  write("train", 32, 28);
  write("t10k", 16, 32);
  TrainConfig c = small(out);
  c.model = "mlp";
  c.data = "mnist";
  c.data_dir = data;
  c.batch = 16;
  c.train_limit = c.test_limit = 0;
  const std::string msg = input_error(c, false);
  EXPECT_NE(msg.find(data + "/train-images-idx3-ubyte holds 1x28x28 images but " + data +
                     "/t10k-images-idx3-ubyte holds 1x32x32"),
            std::string::npos)
      << msg;
  EXPECT_FALSE(fs::exists(out));
}
