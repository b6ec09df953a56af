// fqt/optim.hpp — stochastic gradient descent with momentum, PyTorch semantics.
//
// For every parameter p with gradient g (all f32), one step with learning rate lr does exactly
// what torch.optim.SGD(momentum=m, dampening=0, weight_decay=wd, nesterov=n) does:
//   d = g + wd * p                    (only when Param::weight_decay; batch-norm params skip it)
//   if m != 0:
//     buf = d                         (first step)
//     buf = m * buf + d               (later steps)
//     d   = n ? d + m * buf : buf
//   p = p - lr * d
// in f32 arithmetic, elementwise, so the result does not depend on the thread count.
//
// Before anything is modified, step() scans every gradient: a NaN or Inf anywhere throws
// fqt::NonFiniteError naming the parameter and the element, and no weight or momentum buffer
// is touched (the caller may skip the batch, lower the learning rate, or stop).
#pragma once

#include "fqt/nn.hpp"
#include "fqt/tensor.hpp"

#include <string>
#include <vector>

namespace fqt {

struct SGDOptions {
  float momentum = 0.9f;
  float weight_decay = 0.0f;  // applied only to params with Param::weight_decay == true
  bool nesterov = false;      // needs momentum > 0
};

class SGD {
 public:
  // Parameters must outlive the optimizer; each needs value and grad of the same f32 shape.
  // Invalid hyper-parameters (negative momentum or weight decay, nesterov without momentum)
  // throw InputError.
  explicit SGD(std::vector<Param*> params, SGDOptions options = {});
  SGD(std::vector<Param*> params, float momentum, float weight_decay, bool nesterov = false)
      : SGD(std::move(params), SGDOptions{momentum, weight_decay, nesterov}) {}

  // One update with learning rate lr. Throws NonFiniteError (weights unchanged) when a
  // gradient holds NaN or Inf.
  void step(float lr);
  // Sets every gradient to +0.
  void zero_grad();
  // True when every gradient element is finite.
  bool all_finite() const;
  // Name and flat index of the first non-finite gradient element; empty name when none.
  std::pair<std::string, int64_t> first_non_finite() const;

  const std::vector<Param*>& params() const { return params_; }
  const SGDOptions& options() const { return options_; }

  // One f32 buffer per parameter, same order and shape as params() (empty when momentum == 0).
  // They hold meaningful values only once momentum_initialized() is true (after the first
  // step, or after a checkpoint restored them).
  std::vector<Tensor>& momentum_buffers() { return buffers_; }
  const std::vector<Tensor>& momentum_buffers() const { return buffers_; }
  bool momentum_initialized() const { return initialized_; }
  void set_momentum_initialized(bool v);
  // Number of successful step() calls since construction (not saved in checkpoints:
  // TrainState::step is the authority).
  int64_t steps_taken() const { return steps_; }

 private:
  std::vector<Param*> params_;
  SGDOptions options_;
  std::vector<Tensor> buffers_;
  bool initialized_ = false;
  int64_t steps_ = 0;
};

}  // namespace fqt
