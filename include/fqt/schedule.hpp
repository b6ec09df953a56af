// fqt/schedule.hpp — learning-rate schedules as pure functions of the global step.
//
// lr_at(step) for step = 0, 1, 2, ... (the step about to be taken):
//   * warmup: for step < warmup_steps the scheduled value is multiplied by
//     (step + 1) / warmup_steps, a linear ramp from base/warmup_steps (~0) up to the full value
//     at step warmup_steps - 1. Cosine schedules start their decay when warmup ends.
//   * constant: base_lr.
//   * cosine, per_step: min_lr + (base_lr - min_lr) * (1 + cos(pi * t)) / 2 with
//     t = (step - warmup_steps) / (total_steps - warmup_steps), clamped to [0, 1]; base_lr right
//     after warmup, min_lr at step >= total_steps.
//   * cosine, per epoch (per_step = false): as above with t = epoch / total_epochs where
//     epoch = step / steps_per_epoch and total_epochs = ceil(total_steps / steps_per_epoch), so
//     the rate is constant within an epoch (torch CosineAnnealingLR stepped once per epoch).
//   * step: base_lr * gamma^k where k = number of milestones (in epochs) <= step / steps_per_epoch.
// The value is computed in double and rounded to float once, so it is reproducible.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace fqt {

enum class LrKind { constant, cosine, step };

struct LrSchedule {
  LrKind kind = LrKind::constant;
  double base_lr = 0.1;
  int64_t total_steps = 0;      // needed by cosine
  int64_t steps_per_epoch = 1;  // needed by per-epoch cosine and step decay
  int64_t warmup_steps = 0;
  bool per_step = true;               // cosine: per step (true) or per epoch (false)
  std::vector<int64_t> milestones;    // step decay: epochs at which the rate is multiplied by gamma
  double gamma = 0.1;
  double min_lr = 0.0;

  // Throws InputError when the fields are inconsistent (e.g. cosine without total_steps).
  void validate() const;
  float lr_at(int64_t step) const;
};

const char* lr_kind_name(LrKind k);

// Builds a schedule from its command-line name:
//   "constant"
//   "cosine"            cosine annealing per step
//   "cosine-epoch"      cosine annealing per epoch (constant within an epoch)
//   "step:30,60,80"     multiply by 0.1 at epochs 30, 60 and 80
//   "step:30,60,80@0.2" the same with gamma = 0.2
// Unknown names and malformed milestone lists throw InputError saying what is accepted.
// The result is validated.
LrSchedule parse_schedule(const std::string& name, double base_lr, int64_t total_steps, int64_t steps_per_epoch,
                          int64_t warmup_steps = 0, double min_lr = 0.0);

}  // namespace fqt
