// fqt/train.hpp — the training job: `fqt train` and `fqt eval` are thin wrappers around this.
//
// A run lives in one folder (TrainConfig::out):
//   config.json        the full configuration (also stored inside every checkpoint)
//   metrics.jsonl      one record per epoch: epoch, step, train_loss, train_acc, test_loss,
//                      test_acc, images_per_s, saved_activation_bytes (the most a step kept
//                      from forward for backward, see --recompute), lr, seconds; with track_variance_every also
//                      {"kind": "variance", epoch, step, quant_variance, sampling_variance, ratio,
//                      layers_over, layers: {name: {quant_variance, sampling_variance, ratio}}};
//                      with log_every also {"kind": "step", step, epoch (fractional), train_loss,
//                      train_acc, lr} every N steps (means over those N steps)
//   ckpt.safetensors   the latest checkpoint (weights, BN buffers, momentum, RNG counters,
//                      epoch/step), replaced atomically at the end of every epoch, where
//                      max_steps stops the run and, with ckpt_every_steps, every N steps
// Everything random is a pure function of (seed, step, layer, role) or (seed, epoch, sample), so
// a run resumed from any checkpoint continues bit for bit like the uninterrupted run.
#pragma once

#include "fqt/nn.hpp"
#include "fqt/recipe.hpp"

#include <cstdint>
#include <functional>
#include <string>

namespace fqt {

struct Dataset;
// The data of a run: a dataset by name (data.hpp) or `synthetic` (a small learnable problem,
// 1x16x16, 10 classes, 2048 train / 512 test samples, independent of the run seed).
Dataset load_run_data(const std::string& name, const std::string& dir, bool train);

struct TrainConfig {
  std::string model = "cnn";
  std::string data = "fashion-mnist";
  std::string data_dir;  // "" = the dataset's default folder
  Recipe recipe = [] {  // recipe.hpp's defaults, with 5-bit BHQ gradients
    Recipe r;
    r.mode = Mode::fqt;
    r.dgrad = {QuantizerKind::bhq, 5};
    return r;
  }();
  int epochs = 10;
  int64_t batch = 128;
  double lr = 0.1;
  double momentum = 0.9;
  bool nesterov = false;
  double weight_decay = 5e-4;
  std::string schedule = "cosine";
  double warmup_epochs = 0;
  double label_smoothing = 0;
  std::string augment = "auto";  // auto | none | flip | crop | crop+flip
  uint64_t seed = 0;
  int64_t train_limit = 0;  // use only the first N training samples (0 = all)
  int64_t test_limit = 0;   // evaluate on the first N test samples (0 = all)
  int64_t max_steps = 0;    // stop after this many steps in total (0 = run all epochs)
  int64_t ckpt_every_steps = 0;
  // What a NaN or Inf in the loss or a gradient does: "stop" (throw NonFiniteError naming the
  // step and the layer; the last good checkpoint is kept) or "skip" (no optimizer update for
  // that step, batch-norm statistics restored; counted in TrainResult::skipped_steps).
  std::string on_nonfinite = "stop";
  // Every N steps (0 = never): estimate quantization and sampling variance of the gradient on the
  // current batch (variance.hpp, track_variance: 2 extra FQT draws around the QAT gradient; batch
  // split in 4 for the sampling variance), log a {"kind": "variance"} record with the ratio per
  // layer to metrics.jsonl and warn when quantization variance exceeds sampling variance. Costs
  // about 4 extra backward passes and 1 forward pass (1 QAT + 2 FQT backward on the batch, forward +
  // backward of its 4 quarters) per tracked step; training is unchanged.
  int64_t track_variance_every = 0;
  // Every N steps, a {"kind": "step"} record (training loss and accuracy over those steps) in
  // metrics.jsonl: training curves finer than one point per epoch. 0 = off.
  int64_t log_every = 0;
  // Which batch norms keep no fp32 input, backward recomputing it from the saved codes
  // (set_recompute in models.hpp): less memory, extra forward GEMMs, bit-identical training. A
  // run-time choice like `threads`: --resume takes the value of the resuming command.
  Recompute recompute = Recompute::automatic;
  std::string out;          // run folder; "" = no files written
  bool overwrite = false;   // start afresh even if `out` holds a checkpoint (otherwise an InputError)
  int threads = 0;
  bool progress = true;

  // Called once every setting and input has been validated (resume: the checkpoint too), before
  // anything is written or trained: the CLI prints its warnings there, so that bad input still
  // gets a single error line.
  std::function<void()> on_validated;

  std::string to_json() const;
  // Parses a stored configuration (config.json, a checkpoint's fqt.config); every key is typed
  // and range-checked. Problems are InputErrors naming `source` (the file, if given) and the key.
  static TrainConfig from_json(const std::string& json, const std::string& source = "");
};

struct TrainResult {
  int64_t epochs_done = 0;
  int64_t steps = 0;
  double final_train_loss = 0;
  double final_test_acc = 0;
  double best_test_acc = 0;
  double images_per_s = 0;
  size_t saved_activation_bytes = 0;  // the most a training step kept from forward for backward
  int64_t skipped_steps = 0;  // steps skipped for a non-finite loss or gradient (on_nonfinite = skip)
  int64_t steps_per_epoch = 0;
  // final_test_acc / best_test_acc come from evaluations of this run (at every epoch end, and
  // where max_steps stops the run inside an epoch).
  bool evaluated = false;
  // max_steps ended the run inside an epoch: the checkpoint was written at that step (a resume
  // continues from it) and the test set evaluated there; epochs_done counts whole epochs.
  bool stopped_mid_epoch = false;
  // resume found nothing to do (the run is complete, or already at max_steps): nothing was
  // trained or written; `note` says why, for the user.
  bool nothing_to_do = false;
  std::string note;
};

// Trains (or, with resume, continues the run in cfg.out). Throws InputError for bad settings or
// inputs (also an unwritable or full output folder), NonFiniteError when the loss, a gradient,
// the updated weights or batch-norm statistics, or the test outputs stop being finite: its
// message names the epoch, the step and the layer where the NaN/Inf appeared, and the last good
// checkpoint stays in place.
//
// Everything is validated before cfg.out is touched (with resume: the stored configuration, with
// the same checks as a new one, and the whole checkpoint). A fresh run writes config.json and
// metrics.jsonl at once; one that continues (resume) or replaces (cfg.overwrite) a saved run
// changes nothing there until its first checkpoint, when config.json, metrics.jsonl and the
// checkpoint are replaced together. resume with cfg.overwrite is an InputError; resume with
// nothing to do (run complete, or at max_steps) writes nothing and sets nothing_to_do.
// max_steps stopping inside an epoch saves the checkpoint there and evaluates the test set.
//
// Test hook (not a user option): the environment variable FQT_TEST_POISON="grad:<param>:<step>"
// or "weight:<param>:<step>" writes a NaN into that parameter's gradient (after backward) or
// weights (before forward) at that global step, to test the detection end to end.
// FQT_TEST_KILL_BEFORE="config.json" (or "metrics.jsonl", "ckpt.safetensors") sends the process
// SIGKILL just before the first save of a --resume / --overwrite run renames that file into
// place, to test that the next run puts the saved run back.
TrainResult train(const TrainConfig& cfg, bool resume = false);

struct EvalResult {
  double loss = 0;
  double accuracy = 0;
  int64_t samples = 0;
};
// Test accuracy of a checkpoint with the model and recipe stored in it.
EvalResult evaluate_checkpoint(const std::string& path, const std::string& data_dir = "", int64_t limit = 0);

}  // namespace fqt
