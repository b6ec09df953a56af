#include "fqt/schedule.hpp"

#include "fqt/error.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <numbers>

namespace fqt {

const char* lr_kind_name(LrKind k) {
  switch (k) {
    case LrKind::constant: return "constant";
    case LrKind::cosine: return "cosine";
    case LrKind::step: return "step";
  }
  return "?";
}

void LrSchedule::validate() const {
  FQT_INPUT_CHECK(std::isfinite(base_lr) && base_lr >= 0, "learning rate must be a finite number >= 0, got {}",
                  base_lr);
  FQT_INPUT_CHECK(std::isfinite(min_lr) && min_lr >= 0 && min_lr <= base_lr,
                  "minimum learning rate must be between 0 and the base rate {}, got {}", base_lr, min_lr);
  FQT_INPUT_CHECK(warmup_steps >= 0, "warmup steps must be >= 0, got {}", warmup_steps);
  FQT_INPUT_CHECK(steps_per_epoch >= 1, "steps per epoch must be >= 1, got {}", steps_per_epoch);
  if (kind == LrKind::cosine) {
    FQT_INPUT_CHECK(total_steps > warmup_steps,
                    "cosine schedule needs more total steps ({}) than warmup steps ({}): shorten the warmup or "
                    "train longer",
                    total_steps, warmup_steps);
  }
  if (kind == LrKind::step) {
    FQT_INPUT_CHECK(std::isfinite(gamma) && gamma > 0 && gamma <= 1,
                    "step decay factor gamma must be in (0, 1] (the learning rate is multiplied by it at each milestone), got {}",
                    gamma);
    for (size_t i = 0; i < milestones.size(); ++i) {
      FQT_INPUT_CHECK(milestones[i] >= 1, "step schedule milestone {} is not an epoch after the first (>= 1)", milestones[i]);
      FQT_INPUT_CHECK(i == 0 || milestones[i] > milestones[i - 1],
                      "step schedule milestones must be strictly increasing epochs, got {} after {}", milestones[i],
                      milestones[i - 1]);
    }
  }
}

float LrSchedule::lr_at(int64_t step) const {
  FQT_CHECK(step >= 0, "lr_at: negative step {}", step);
  FQT_CHECK(steps_per_epoch >= 1, "lr_at: steps_per_epoch is {}", steps_per_epoch);
  double lr = base_lr;
  const int64_t epoch = step / steps_per_epoch;
  switch (kind) {
    case LrKind::constant: break;
    case LrKind::cosine: {
      double t;
      if (per_step) {
        FQT_CHECK(total_steps > warmup_steps, "cosine schedule: total_steps {} <= warmup_steps {}", total_steps,
                  warmup_steps);
        t = static_cast<double>(step - warmup_steps) / static_cast<double>(total_steps - warmup_steps);
      } else {
        FQT_CHECK(total_steps > 0, "cosine schedule: total_steps is {}", total_steps);
        const int64_t total_epochs = (total_steps + steps_per_epoch - 1) / steps_per_epoch;
        t = static_cast<double>(epoch) / static_cast<double>(total_epochs);
      }
      t = std::clamp(t, 0.0, 1.0);
      lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * t));
      break;
    }
    case LrKind::step: {
      for (int64_t m : milestones)
        if (epoch >= m) lr *= gamma;
      break;
    }
  }
  if (step < warmup_steps) lr *= static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  return static_cast<float>(lr);
}

LrSchedule parse_schedule(const std::string& name, double base_lr, int64_t total_steps, int64_t steps_per_epoch,
                          int64_t warmup_steps, double min_lr) {
  LrSchedule s;
  s.base_lr = base_lr;
  s.total_steps = total_steps;
  s.steps_per_epoch = steps_per_epoch;
  s.warmup_steps = warmup_steps;
  s.min_lr = min_lr;
  if (name == "constant") {
    s.kind = LrKind::constant;
  } else if (name == "cosine") {
    s.kind = LrKind::cosine;
    s.per_step = true;
  } else if (name == "cosine-epoch") {
    s.kind = LrKind::cosine;
    s.per_step = false;
  } else if (name.rfind("step:", 0) == 0) {
    s.kind = LrKind::step;
    std::string spec = name.substr(5);
    const size_t at = spec.find('@');
    if (at != std::string::npos) {
      const std::string g = spec.substr(at + 1);
      spec = spec.substr(0, at);
      size_t used = 0;
      double gamma = 0;
      bool ok = !g.empty();
      try {
        if (ok) gamma = std::stod(g, &used);
      } catch (const std::exception&) {
        ok = false;
      }
      FQT_INPUT_CHECK(ok && used == g.size(), "schedule '{}': gamma '{}' is not a number (e.g. step:30,60,80@0.1)",
                      name, g);
      s.gamma = gamma;
    }
    FQT_INPUT_CHECK(!spec.empty(), "schedule '{}' has no milestones: write e.g. step:30,60,80 (epochs)", name);
    size_t i = 0;
    while (i <= spec.size()) {
      size_t j = spec.find(',', i);
      if (j == std::string::npos) j = spec.size();
      const std::string tok = spec.substr(i, j - i);
      int64_t v = 0;
      auto [p, ec] = std::from_chars(tok.data(), tok.data() + tok.size(), v);
      FQT_INPUT_CHECK(!tok.empty() && ec == std::errc() && p == tok.data() + tok.size(),
                      "schedule '{}': milestone '{}' is not an epoch number (e.g. step:30,60,80)", name, tok);
      s.milestones.push_back(v);
      i = j + 1;
    }
  } else if (name == "step") {
    throw InputError("schedule 'step' needs milestones in epochs: write e.g. step:30,60,80 or step:30,60,80@0.1");
  } else {
    throw InputError(fmt::format(
        "unknown learning-rate schedule '{}': use constant, cosine, cosine-epoch or step:E1,E2,...[@gamma]", name));
  }
  s.validate();
  return s;
}

}  // namespace fqt
