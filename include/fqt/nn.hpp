// fqt/nn.hpp — layers with forward, and backward split into dgrad and wgrad (SPEC section 1).
//
// Conventions: activations are f32 tensors in N,C,H,W (conv) or N,D (linear) layout, contiguous.
// forward(x, ctx) keeps exactly what backward needs when ctx.train is true (for quantized layers:
// the codes and grids, not fp32 copies). backward(dy, ctx) ACCUMULATES parameter gradients into
// Param::grad (callers zero them once per step) and returns dL/dx.
//
// Quantized layers (Linear, Conv2d) follow their Recipe:
//   fp32: Y = X W^T;             dX = G W;                      dW = G^T X
//   qat : Y = Qa(X) Qw(W)^T;     dX = G Qw(W);                  dW = G^T Qa(X)
//   fqt : Y = Qa(X) Qw(W)^T;     dX = Qdgrad(G) Qw(W);          dW = Qwgrad(G)^T Qa(X)
// with Qdgrad and Qwgrad two independent stochastic draws keyed by grad_key(seed, step, layer,
// role) (recipe.hpp). For Conv2d, X is the im2col matrix and G is dY laid out as
// (N*Ho*Wo) x Cout, so "rows = samples" means rows = output positions.
#pragma once

#include "fqt/recipe.hpp"
#include "fqt/tensor.hpp"

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace fqt {

struct Param {
  std::string name;
  Tensor value;               // f32 master weights
  Tensor grad;                // f32, same shape
  bool weight_decay = true;   // false for batch-norm parameters
};

// What every layer may need to know about the current step.
struct StepContext {
  bool train = true;
  uint64_t seed = 0;   // run seed: stochastic gradient quantizers draw from grad_key(seed, step, ...)
  uint64_t step = 0;   // global step counter
};

// Recomputation (see set_recompute in models.hpp): a way to rebuild a module's output of the last
// training forward from what its layers saved anyway (8-bit codes in qat/fqt), bit for bit, and
// what it costs: `macs` multiply-adds per output element in the dearest layer on the way (Cin x
// kh x kw for a convolution), i.e. 4 bytes of fp32 not kept for every `macs` MACs spent again.
struct OutputSource {
  std::function<Tensor()> make;  // empty: not recomputable
  int64_t macs = 0;
  // Optional: the output with a tensor of its shape added, as forward added a residual (a
  // convolution adds it while it stores its output: one pass over the output less than
  // make() followed by add_inplace, with the same bits).
  std::function<Tensor(const Tensor&)> make_plus = {};
  explicit operator bool() const { return static_cast<bool>(make); }
  Tensor operator()() const { return make(); }
  // make() + r, through make_plus when there is one.
  Tensor plus(const Tensor& r) const;
};

// How much backward recomputes instead of keeping batch norms' fp32 inputs (set_recompute in
// models.hpp; CLI --recompute off|auto|on).
enum class Recompute { off, automatic, on };

// Which sources a batch norm uses instead of keeping its fp32 input: none (off), or those costing
// at most `max_macs` per element.
struct RecomputePolicy {
  bool on = false;
  int64_t max_macs = std::numeric_limits<int64_t>::max();
  bool allows(const OutputSource& s) const { return on && s && s.macs <= max_macs; }
};

// The min and max of a tensor a layer produced (valid: they were computed, over finite values).
struct ValueRange {
  float lo = 0.0f, hi = 0.0f;
  bool valid = false;
  // Each sample's (index 0 of the tensor) min and max, when the producer took them on the way
  // (BatchNorm2d::backward: N entries each, meaningful when valid); empty otherwise.
  std::vector<float> sample_lo, sample_hi;
};

class Module {
 public:
  virtual ~Module() = default;
  virtual std::string kind() const = 0;
  virtual Tensor forward(const Tensor& x, const StepContext& ctx) = 0;
  virtual Tensor backward(const Tensor& dy, const StepContext& ctx) = 0;
  // backward with dy's min and max where the caller has them (dy_range, valid), reporting dx's
  // where the pass that wrote dx took them (*dx_range, valid or not): a batch norm reports its
  // dx's range, a convolution's gradient quantizer takes dy's instead of reading dy once more for
  // it, containers hand each child's range to the next. Same results as backward, bit for bit.
  // dy by value: a caller that hands over its only handle (std::move) lets a layer whose dx is
  // elementwise in dy write dx into dy's storage (batch norm), memory the layer has just read and
  // so in cache where a fresh tensor's is not; a caller that keeps a handle keeps dy unchanged.
  // Default: backward(dy, ctx), no range reported.
  virtual Tensor backward_ranged(Tensor dy, const StepContext& ctx, const ValueRange* dy_range,
                                 ValueRange* dx_range) {
    (void)dy_range;
    if (dx_range) *dx_range = {};
    return backward(dy, ctx);
  }
  // Trainable parameters, in a stable order (checkpoints rely on it). Names are unique
  // within a model ("layer3.conv1.weight").
  virtual void collect_params(std::vector<Param*>& out) { (void)out; }
  // Non-trainable state saved in checkpoints (batch-norm running mean/var).
  virtual void collect_buffers(std::vector<std::pair<std::string, Tensor*>>& out) { (void)out; }
  // Quantized layers in this module (for per-layer recipe changes and statistics).
  virtual void collect_quantized(std::vector<class QuantizedLayer*>& out) { (void)out; }
  // The storage this module keeps from forward for backward: (address, bytes) per tensor, so
  // that tensors shared between layers are counted once (see saved_bytes()).
  virtual void collect_saved(std::vector<std::pair<const void*, size_t>>& out) const { (void)out; }

  // Recomputation: a batch norm whose input source `policy` allows keeps no fp32 copy of its
  // input for backward; backward asks the source for it again. `input` is the source of this
  // module's input (empty: not recomputable). Containers pass on to each child the source of the
  // previous child's output. Default: nothing to do.
  virtual void enable_recompute(const RecomputePolicy& policy, const OutputSource& input) {
    (void)policy, (void)input;
  }
  // A source of this module's output in the last training forward, recomputed from its saved
  // state, if it can give one (Conv2d, PreActBlock, Sequential of such); else empty.
  virtual OutputSource output_source() { return {}; }
};

// Bytes kept from the last training-mode forward for backward, shared storage counted once.
size_t saved_bytes(const Module& m);

// Linear and Conv2d: the layers whose three GEMMs are quantized.
class QuantizedLayer : public Module {
 public:
  Recipe& recipe() { return recipe_; }
  const Recipe& recipe() const { return recipe_; }
  uint32_t layer_id() const { return layer_id_; }
  const std::string& name() const { return name_; }
  // The two halves of backward, named as in the SPEC. Both read the context saved by forward.
  virtual Tensor dgrad(const Tensor& dy, const StepContext& ctx) = 0;
  virtual void wgrad(const Tensor& dy, const StepContext& ctx) = 0;
  // backward() = wgrad, then dgrad unless the input gradient is not wanted (see set_input_grad):
  // then it returns an undefined Tensor.
  Tensor backward(const Tensor& dy, const StepContext& ctx) override {
    wgrad(dy, ctx);
    return input_grad_ ? dgrad(dy, ctx) : Tensor();
  }
  // A model's first layer has no use for the gradient of its input (the images): the model
  // builders switch it off, which skips that layer's dgrad (its quantizer draw and its GEMM).
  // Every other gradient is unchanged: each draw has its own counter-based key.
  void set_input_grad(bool on) { input_grad_ = on; }
  bool input_grad() const { return input_grad_; }
  void collect_quantized(std::vector<QuantizedLayer*>& out) override { out.push_back(this); }

 protected:
  QuantizedLayer(std::string name, Recipe recipe, uint32_t layer_id)
      : recipe_(recipe), layer_id_(layer_id), name_(std::move(name)) {}
  Recipe recipe_;
  uint32_t layer_id_;
  std::string name_;
  bool input_grad_ = true;
};

using ModulePtr = std::unique_ptr<Module>;

}  // namespace fqt
