// The training job: determinism, bit-exact resume, learning in every mode (synthetic data).
#include "fqt/checkpoint.hpp"
#include "fqt/train.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

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
  // Checkpoint every 3 steps, "crash" at step 7 (after the checkpoint at step 6, mid-epoch 1),
  // then resume: the run must end bit-identical to the uninterrupted one.
  TrainConfig c = small(cut);
  c.ckpt_every_steps = 3;
  c.max_steps = 7;
  TrainResult r = train(c);
  EXPECT_EQ(r.steps, 7);
  EXPECT_EQ(read_checkpoint_state(cut + "/ckpt.safetensors").step, 6);
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
// resumed; one of a live process is left alone. The resumed run is unaffected.
TEST(Train, ResumeRemovesTemporariesOfKilledRuns) {
  const std::string out = tmp_dir("stale_tmp");
  TrainConfig c = small(out);
  c.max_steps = 3;
  c.ckpt_every_steps = 1;
  train(c);
  const std::string dead = out + "/ckpt.safetensors.tmp.999999999";  // above any pid_max
  const std::string live = out + "/ckpt.safetensors.tmp.1";           // pid 1 always exists
  for (const std::string& p : {dead, live}) {
    std::FILE* f = std::fopen(p.c_str(), "w");
    ASSERT_NE(f, nullptr);
    std::fputs("partial", f);
    std::fclose(f);
  }
  train(small(out), /*resume=*/true);
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_EQ(read_checkpoint_state(out + "/ckpt.safetensors").step, 16);
}
