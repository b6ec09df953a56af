// fqt/layers.hpp — the layers of fqt (interface in nn.hpp) and the loss.
//
// Shapes: convolution-side activations are f32 N,C,H,W; linear-side N,D. All layers are
// deterministic and give bit-identical results on any thread count (no float atomics; every
// reduction runs in a fixed order per output element).
//
// Quantized layers (Linear, Conv2d) run their three GEMMs through `matmul` below: operands are
// either plain f32 or QuantizedTensors (codes + grids). Today quantized operands are
// dequantized and multiplied in fp32 (the "simulated" path); an integer GEMM on the codes can
// replace `matmul` for the quantized x quantized case without touching the layers.
#pragma once

#include "fqt/nn.hpp"
#include "fqt/quant.hpp"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fqt {

// ---- GEMM on (possibly quantized) operands ---------------------------------------------------

// One GEMM operand: exactly one of `dense` (f32 [rows, cols]) or `quant` is set.
struct GemmOperand {
  const Tensor* dense = nullptr;
  const QuantizedTensor* quant = nullptr;
  static GemmOperand of(const Tensor& t) { return {&t, nullptr}; }
  static GemmOperand of(const QuantizedTensor& q) { return {nullptr, &q}; }
  int64_t rows() const;
  int64_t cols() const;
};

// C = op(A) op(B) (+ C if accumulate); C must be f32 [M, N], allocated by the caller.
void matmul(const GemmOperand& a, bool trans_a, const GemmOperand& b, bool trans_b, Tensor& c,
            bool accumulate);

// Appends a tensor / a quantized tensor (codes + grids) to a collect_saved list.
void saved_add(std::vector<std::pair<const void*, size_t>>& out, const Tensor& t);
void saved_add(std::vector<std::pair<const void*, size_t>>& out, const QuantizedTensor& q);

// ---- quantized layers -------------------------------------------------------------------------

// Y[N, out] = X[N, in] W[out, in]^T + b. Weight init: uniform(+-sqrt(6 / in)) (Kaiming uniform,
// ReLU gain), bias zero; random numbers from RngKey{init_seed, layer_id}.
class Linear : public QuantizedLayer {
 public:
  Linear(std::string name, int64_t in, int64_t out, bool bias, Recipe recipe, uint32_t layer_id,
         uint64_t init_seed = 0);
  std::string kind() const override { return "Linear"; }
  Tensor forward(const Tensor& x, const StepContext& ctx) override;
  Tensor dgrad(const Tensor& dy, const StepContext& ctx) override;
  void wgrad(const Tensor& dy, const StepContext& ctx) override;
  void collect_params(std::vector<Param*>& out) override;
  void collect_saved(std::vector<std::pair<const void*, size_t>>& out) const override {
    saved_add(out, x_);  // activations only: the weight (codes) is not counted
    saved_add(out, xq_);
  }

  Param& weight() { return weight_; }
  Param& bias() { return bias_; }
  bool has_bias() const { return has_bias_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  // Saved by forward (train mode): quantized input / weight in qat and fqt, else empty.
  const QuantizedTensor& saved_input_q() const { return xq_; }
  const QuantizedTensor& saved_weight_q() const { return wq_; }
  // The last gradient operands drawn in fqt mode (for tests and statistics).
  const QuantizedTensor& last_dgrad_q() const { return gq_dgrad_; }
  const QuantizedTensor& last_wgrad_q() const { return gq_wgrad_; }

 private:
  int64_t in_, out_;
  bool has_bias_;
  Param weight_, bias_;
  Tensor x_;                // fp32 mode: the input (shared handle, no copy)
  QuantizedTensor xq_, wq_;  // qat/fqt
  QuantizedTensor gq_dgrad_, gq_wgrad_;
};

// For tests and benchmarks: false makes Conv2d's integer fprop take its general path (im2row and
// the GEMM kernel) also where the fused kernel applies (Cout = 16, AVX-512 VNNI); both give the
// same bits. Default true.
void set_conv_fused_fprop(bool on);
// The same for dgrad: false makes the integer dgrad take its general path (GEMM kernel, then the
// epilogue) also where the kernel fused with its finishing applies (Ckk <= 144 in whole vectors,
// Cout <= 16 a multiple of 4, AVX-512 VNNI); both give the same bits. Default true.
void set_conv_fused_dgrad(bool on);
// For tests and benchmarks: false makes the integer dgrad of per-sample gradient grids
// (`--dgrad-rows sample`) and of per-tensor ones (PTQ) take dgrad_int's per-pixel-row form also
// where the direct one (a convolution of the gradient codes: Cin = 16 or a multiple of 32,
// AVX-512 VNNI) applies. The two agree to fp32 rounding (another order of the finishing), not bit for bit.
// Default true.
void set_conv_direct_dgrad(bool on);
// The same for wgrad: false makes the integer wgrad build im2col rows for the GEMM kernel also
// where the direct kernel applies (16 -> 16 channels, stride 1, AVX-512 VNNI and VBMI); both
// give the same bits (exact integer sums). Default true.
void set_conv_direct_wgrad(bool on);
// Which of those fast kernels this build has and this CPU runs (each needs AVX-512 VNNI at
// compile and run time; direct_wgrad also VBMI at compile time). Tests comparing a kernel with
// the general path skip where it is missing: both runs would take the general path.
struct ConvIntKernels {
  bool fused_fprop = false, fused_dgrad = false, direct_dgrad = false, direct_wgrad = false;
};
ConvIntKernels conv_int_kernels();
// The same for backward's gradient draws: false makes Conv2d's backward_ranged ignore a given dy
// range (its quantizer then reads dy for it); both give the same bits. Default true.
void set_conv_given_ranges(bool on);

// 2-D convolution, square kernel, zero padding, via im2col + GEMM.
// The SPEC's matrices: X = im2col matrix [(N*Ho*Wo), Cin*k*k], W as [Cout, Cin*k*k],
// G = dY as [(N*Ho*Wo), Cout] (rows = output positions = samples). Internally the GEMMs run one
// sample at a time on that sample's im2col block, stored transposed ([Cin*k*k, Ho*Wo], see
// im2col below) in a per-thread buffer, so that no batch-sized im2col matrix is materialised;
// the math is the same. wgrad sums samples in fixed, shape-determined groups (thread-count
// invariant). The quantized-operand GEMMs run in fp32 on dequantized values (simulated path).
// Quantization (qat/fqt): the INPUT tensor x (viewed as [N, C*H*W]) is quantized with the
// activation quantizer and the dequantized values are im2col'ed with padding = exact 0. For the
// per-tensor affine activation grid this equals quantizing the im2col matrix except that padding
// zeros stay exact zeros instead of being forced onto the grid (0 may lie outside [min, max]).
// Backward keeps the codes of x, not the im2col matrix (k*k times smaller). Gradient quantizers
// see G in the SPEC's row layout [(N*Ho*Wo), Cout], so PSQ/BHQ rows are output positions.
class Conv2d : public QuantizedLayer {
 public:
  Conv2d(std::string name, int64_t cin, int64_t cout, int64_t kernel, int64_t stride, int64_t padding,
         bool bias, Recipe recipe, uint32_t layer_id, uint64_t init_seed = 0);
  std::string kind() const override { return "Conv2d"; }
  Tensor forward(const Tensor& x, const StepContext& ctx) override { return forward(x, ctx, nullptr); }
  // With `xq`: x's codes under this layer's activation quantizer, made by the caller
  // (quantize_input, possibly of another layer with the same quantizer: a tensor two layers read
  // is quantized once, and its codes are kept once); null: forward quantizes x itself.
  // With `residual` (the output's shape): returns conv(x) + residual, the add done as the output
  // is written (one pass over the output fewer than add_inplace after it; the same bits).
  Tensor forward(const Tensor& x, const StepContext& ctx, const QuantizedTensor* xq, const Tensor* residual = nullptr);
  // The same with only the input's codes (qat, fqt) and shape: for a producer that wrote the codes
  // without the fp32 tensor (BatchNorm2d::forward_codes).
  Tensor forward(const Shape& in_shape, const StepContext& ctx, const QuantizedTensor& xq,
                 const Tensor* residual = nullptr);
  // Whether forward quantizes its input (qat, fqt), and x quantized as forward would (with a
  // valid `range`, x's min and max, without another pass over x).
  bool quantizes_input() const;
  QuantizedTensor quantize_input(const Tensor& x, const ValueRange& range) const;
  QuantizerSpec input_quantizer() const { return recipe_.activation; }
  // Whether `other` quantizes its input exactly as this layer does.
  bool same_input_quantizer(const Conv2d& other) const;
  Tensor dgrad(const Tensor& dy, const StepContext& ctx) override;
  void wgrad(const Tensor& dy, const StepContext& ctx) override;
  Tensor backward(const Tensor& dy, const StepContext& ctx) override;  // wgrad then dgrad, dY laid out once
  // With dy's range (from the batch norm that wrote dy): the fused gradient draws skip their
  // range pass over dy (quantize_pair_nchw). No range reported for dx.
  Tensor backward_ranged(Tensor dy, const StepContext& ctx, const ValueRange* dy_range,
                         ValueRange* dx_range) override;
  void collect_params(std::vector<Param*>& out) override;
  // The last training forward's output again, bit for bit, from what forward kept for backward
  // (the input's codes and the weight's codes in qat/fqt; the fp32 input in fp32 mode).
  // With `residual`: plus that tensor, added as forward adds one (the same bits as add_inplace).
  Tensor recompute_output(const Tensor* residual = nullptr) const;
  std::string region_name() const;  // for profile regions: "conv CIN->COUT KxK sS"
  OutputSource output_source() override {
    return {[this] { return recompute_output(); }, cin_ * k_ * k_,
            [this](const Tensor& r) { return recompute_output(&r); }};
  }
  void collect_saved(std::vector<std::pair<const void*, size_t>>& out) const override {
    saved_add(out, x_);  // activations only: the weight (codes) is not counted
    saved_add(out, xq_);
  }

  Param& weight() { return weight_; }  // [Cout, Cin, k, k]
  Param& bias() { return bias_; }
  int64_t out_size(int64_t in) const { return (in + 2 * pad_ - k_) / stride_ + 1; }
  // The integer wgrad's plan for N samples of P output positions: `groups` fixed groups of
  // consecutive samples, each `per_gemm` samples at a time through one GEMM with K = per_gemm * P
  // (the batches the threads claim, summing into int64 partials; fqt bench gemm times the same
  // products).
  struct WgradPlan {
    int64_t groups, per_gemm;
  };
  static WgradPlan wgrad_int_plan(int64_t N, int64_t ckk, int64_t cout, int64_t P);
  const QuantizedTensor& saved_input_q() const { return xq_; }
  const QuantizedTensor& saved_weight_q() const { return wq_; }
  const QuantizedTensor& last_dgrad_q() const { return gq_dgrad_; }
  // dX from given codes of dY's rows ([N*P, Cout], as backward's dgrad quantizer makes them): the
  // integer dgrad alone, for benchmarks. Needs a training forward with the integer path.
  Tensor dgrad_on_codes(const QuantizedTensor& gq) const;
  const QuantizedTensor& last_wgrad_q() const { return gq_wgrad_; }

 private:
  Tensor weight2d() const { return weight_.value.reshape({cout_, cin_ * k_ * k_}); }
  // The integer path (conv2d_int.cpp): GEMMs on 8-bit codes, im2col on codes (padding = the
  // activation grid's zero code), scales and offsets applied after each per-sample GEMM.
  Tensor forward_impl(const Shape& shape, const Tensor* x, const StepContext& ctx, const QuantizedTensor* given,
                      const Tensor* residual);
  Tensor forward_int(const QuantizedTensor& xq, const QuantizedTensor& wq, int zero_code,
                     const Tensor* residual = nullptr) const;
  // fp32 GEMMs of (possibly dequantized) input [N, Cin, H, W] and weight [Cout, Cin*k*k], + bias.
  Tensor forward_f32(const Tensor& xin, const Tensor& w) const;
  // With `across` (per-sample BHQ's transform over the N samples): T^-1 applied to dX as well.
  Tensor dgrad_int(const QuantizedTensor& gq, const BhqTransform* across = nullptr) const;
  // Whether the dgrad quantizer's rows are samples (recipe dgrad_rows = sample, a per-row
  // quantizer: PSQ, BHQ): then gq_dgrad_ is quantize_samples_nchw's (pixel rows, a grid per sample).
  bool dgrad_per_sample() const;
  // The integer dgrad of such codes: dgrad_int (each sample's grid on its pixel rows) with BHQ's
  // T^-1 across the samples of dX ([N, Cin*H*W]: conv's transpose is linear and per sample, so
  // T^-1 may follow it), applied group by group as each group's samples finish (`across`).
  Tensor dgrad_int_samples(const QuantizedTensor& gq) const;
  // Its layers with Cin = 16 or a multiple of 32 (AVX-512 VNNI): each sample's dX as the
  // convolution of its gradient codes with the flipped weights (one grid per sample makes the
  // scales factor out of that reduction; stride s: s x s phases, each a stride-1 convolution with
  // its share of the taps); T^-1 across the samples as dgrad_int's. Also for one grid over the
  // whole gradient (PTQ).
  Tensor dgrad_int_direct(const QuantizedTensor& gq, const BhqTransform* across) const;
  // Whether dgrad_int_direct applies to this layer (and set_conv_direct_dgrad allows it).
  bool direct_dgrad_applies() const;
  void wgrad_int(const QuantizedTensor& gq);
  void add_bias_grad(const Tensor& dy);
  // The two halves given dY in the SPEC's row layout [(N*P), Cout] (fqt mode; else undefined):
  // backward() lays dY out once for both, dgrad() / wgrad() alone each lay it out themselves.
  // drawn: gq_dgrad_ / gq_wgrad_ already hold this step's draw (backward()'s quantize_pair).
  Tensor dgrad_rows(const Tensor& dy, const Tensor& rows, const StepContext& ctx, bool drawn = false);
  void wgrad_rows(const Tensor& dy, const Tensor& rows, const StepContext& ctx, bool drawn = false);
  Tensor rows_for_gradients(const Tensor& dy, float* range = nullptr) const;
  // The saved activation grid's code for 0 (-1: none; the integer path needs one for padding).
  int saved_zero_code() const;
  int64_t cin_, cout_, k_, stride_, pad_;
  bool has_bias_;
  Param weight_, bias_;
  Shape in_shape_;
  Tensor x_;
  QuantizedTensor xq_, wq_;
  QuantizedTensor gq_dgrad_, gq_wgrad_;
};

// Whole-batch im2col (reference / tools; the layer itself works per sample), transposed
// layout: x N,C,H,W -> cols [C*k*k, N*Ho*Wo], row (c, kh, kw), column
// (n, oh, ow); out-of-image taps are 0. cols^T is the SPEC's X.
Tensor im2col(const Tensor& x, int64_t k, int64_t stride, int64_t pad);
// The adjoint: sums cols [C*k*k, N*Ho*Wo] back into an N,C,H,W tensor of shape `in_shape`.
Tensor col2im(const Tensor& cols, const Shape& in_shape, int64_t k, int64_t stride, int64_t pad);
// N,C,H,W -> [N*H*W, C] (the SPEC's row layout of G). With `range`, also x's min and max in
// range[0], range[1] (NaN in both when x holds a NaN), taken as each sample's rows are written.
Tensor nchw_to_rows(const Tensor& x, float* range = nullptr);

// ---- other layers -----------------------------------------------------------------------------

// Per-channel batch norm over N,H,W (also accepts N,C). Train: batch statistics (biased variance
// for normalisation, unbiased for the running variance, as PyTorch); eval: running statistics.
//
// with_relu(): the ReLU that follows is fused in (output relu(y), a 1-bit mask kept for backward,
// exactly as the ReLU module keeps it; backward applies the mask to dy on the fly): one pass over
// the tensor less each way, the same bits as BatchNorm2d then ReLU.
class BatchNorm2d : public Module {
 public:
  BatchNorm2d(std::string name, int64_t channels, float momentum = 0.1f, float eps = 1e-5f);
  BatchNorm2d& with_relu() {
    relu_ = true;
    return *this;
  }
  std::string kind() const override { return relu_ ? "BatchNorm2d+ReLU" : "BatchNorm2d"; }
  Tensor forward(const Tensor& x, const StepContext& ctx) override { return forward(x, ctx, nullptr); }
  // With `range` (and the ReLU fused in): also the output's min and max, taken in the pass that
  // writes it, for the next layer's activation quantizer (quantize_in_range). Only a training
  // forward fills it; range->valid says whether it did.
  Tensor forward(const Tensor& x, const StepContext& ctx, ValueRange* range);
  // The training forward straight to the next layer's input codes: quantize_in_range(forward(x,
  // ctx, &range), spec, range) code for code, the same saved state, without writing the fp32
  // output (it is normalized and rounded run by run in cache). For the fused ReLU, training
  // forwards and the quantizers quantize_in_range takes a range from (can_forward_codes).
  bool can_forward_codes(QuantizerSpec spec, const StepContext& ctx) const;
  QuantizedTensor forward_codes(const Tensor& x, const StepContext& ctx, QuantizerSpec spec);
  Tensor backward(const Tensor& dy, const StepContext& ctx) override;
  // With `residual` (dy's shape): returns dx + residual, the add done as dx is written (the same
  // bits as add_inplace after it, one pass fewer). With `dx_range`: also the returned tensor's
  // min and max, taken as it is written (valid unless it holds a NaN or an infinity). dx is
  // written into dy's storage when dy holds its only handle (the caller moved it in; see
  // Module::backward_ranged), else into a new tensor.
  Tensor backward(Tensor dy, const StepContext& ctx, const Tensor* residual, ValueRange* dx_range = nullptr);
  Tensor backward_ranged(Tensor dy, const StepContext& ctx, const ValueRange* dy_range,
                         ValueRange* dx_range) override {
    (void)dy_range;
    return backward(std::move(dy), ctx, nullptr, dx_range);
  }
  void collect_params(std::vector<Param*>& out) override;
  void collect_buffers(std::vector<std::pair<std::string, Tensor*>>& out) override;
  Param& gamma() { return gamma_; }
  Param& beta() { return beta_; }
  Tensor& running_mean() { return running_mean_; }
  Tensor& running_var() { return running_var_; }

  void collect_saved(std::vector<std::pair<const void*, size_t>>& out) const override {
    saved_add(out, x_);
    saved_add(out, mask_);
  }
  // Backward rebuilds x-hat = (x - mean) * invstd from x and the saved per-channel statistics, as
  // forward computed it. With a source, training forwards keep no x either: backward recomputes
  // it from the source.
  void enable_recompute(const RecomputePolicy& policy, const OutputSource& input) override {
    input_src_ = policy.allows(input) ? input : OutputSource();
  }

 private:
  Tensor forward_impl(const Tensor& x, const StepContext& ctx, ValueRange* range, QuantizedTensor* codes);

  std::string name_;
  int64_t c_;
  float momentum_, eps_;
  Param gamma_, beta_;
  Tensor running_mean_, running_var_;
  Tensor x_;                    // the input, kept for backward (not when recomputing); layers do
                                // not modify a tensor in place once a later layer has read it
  std::vector<float> invstd_;   // per channel
  std::vector<float> mean_;     // per channel, the fp32 mean forward subtracted
  OutputSource input_src_;      // recomputation of the input (empty: x is kept)
  Shape in_shape_;
  bool relu_ = false;           // ReLU fused in
  Tensor mask_;                 // with relu_: bit i % 8 of byte i / 8 = (output_i > 0), as ReLU's
  bool saved_train_ = true;
};

// Backward needs only where the output is positive: kept as a bit mask (1 bit per value, not the
// fp32 output), so the output itself may be freed once the next layer has used it (an FQT conv
// keeps only its 8-bit codes).
class ReLU : public Module {
 public:
  std::string kind() const override { return "ReLU"; }
  Tensor forward(const Tensor& x, const StepContext& ctx) override;
  Tensor backward(const Tensor& dy, const StepContext& ctx) override;

  void collect_saved(std::vector<std::pair<const void*, size_t>>& out) const override { saved_add(out, mask_); }

 private:
  Tensor mask_;  // u8, bit i % 8 of byte i / 8 = (y_i > 0); empty after an eval forward
  int64_t n_ = 0;
};

class MaxPool2d : public Module {
 public:
  MaxPool2d(int64_t kernel, int64_t stride) : k_(kernel), stride_(stride) {}
  std::string kind() const override { return "MaxPool2d"; }
  Tensor forward(const Tensor& x, const StepContext& ctx) override;
  Tensor backward(const Tensor& dy, const StepContext& ctx) override;

  void collect_saved(std::vector<std::pair<const void*, size_t>>& out) const override { saved_add(out, argmax_); }

 private:
  int64_t k_, stride_;
  Shape in_shape_;
  Tensor argmax_;  // i32, index within the input plane
};

// N,C,H,W -> N,C (mean over H,W).
class GlobalAvgPool : public Module {
 public:
  std::string kind() const override { return "GlobalAvgPool"; }
  Tensor forward(const Tensor& x, const StepContext& ctx) override;
  Tensor backward(const Tensor& dy, const StepContext& ctx) override;

 private:
  Shape in_shape_;
};

// N,... -> N,D.
class Flatten : public Module {
 public:
  std::string kind() const override { return "Flatten"; }
  Tensor forward(const Tensor& x, const StepContext& ctx) override;
  Tensor backward(const Tensor& dy, const StepContext& ctx) override;

 private:
  Shape in_shape_;
};

// Runs its children in order; backward in reverse. Children carry their full dotted names
// (given at construction), so collection just concatenates in order.
class Sequential : public Module {
 public:
  Sequential() = default;
  std::string kind() const override { return "Sequential"; }
  Module& add(ModulePtr m);
  template <typename T, typename... Args> T& emplace(Args&&... args) {
    auto p = std::make_unique<T>(std::forward<Args>(args)...);
    T& ref = *p;
    add(std::move(p));
    return ref;
  }
  size_t size() const { return children_.size(); }
  Module& child(size_t i) { return *children_.at(i); }
  Tensor forward(const Tensor& x, const StepContext& ctx) override;
  Tensor backward(const Tensor& dy, const StepContext& ctx) override;  // backward_ranged without ranges
  // Each child's reported dx range goes with its dx to the child below.
  Tensor backward_ranged(Tensor dy, const StepContext& ctx, const ValueRange* dy_range,
                         ValueRange* dx_range) override;
  void collect_params(std::vector<Param*>& out) override;
  void collect_buffers(std::vector<std::pair<std::string, Tensor*>>& out) override;
  void collect_quantized(std::vector<QuantizedLayer*>& out) override;
  void collect_saved(std::vector<std::pair<const void*, size_t>>& out) const override {
    for (const auto& c : children_) c->collect_saved(out);
  }
  void enable_recompute(const RecomputePolicy& policy, const OutputSource& input) override;
  OutputSource output_source() override { return children_.empty() ? OutputSource() : children_.back()->output_source(); }

 private:
  std::vector<ModulePtr> children_;
};

// Hands out layer ids 0, 1, 2, ... in construction (= forward) order, and the init seed.
struct LayerIds {
  uint32_t next = 0;
  uint64_t init_seed = 0;
  uint32_t take() { return next++; }
};

// Pre-activation residual block (He et al. 2016, CIFAR variant):
//   a = ReLU(BN1(x)); s = shortcut(a) if projecting else x;
//   y = conv2(ReLU(BN2(conv1(a)))) + s
// The projection (1x1 conv, stride) is used when stride != 1 or cin != cout.
// Layer ids in forward order: shortcut (if any), conv1, conv2.
class PreActBlock : public Module {
 public:
  PreActBlock(const std::string& name, int64_t cin, int64_t cout, int64_t stride, const Recipe& recipe,
              LayerIds& ids);
  std::string kind() const override { return "PreActBlock"; }
  Tensor forward(const Tensor& x, const StepContext& ctx) override;
  Tensor backward(const Tensor& dy, const StepContext& ctx) override;  // backward_ranged without ranges
  // dy's range to conv2 and the shortcut conv (both quantize dy); bn1's dx range reported.
  Tensor backward_ranged(Tensor dy, const StepContext& ctx, const ValueRange* dy_range,
                         ValueRange* dx_range) override;
  void collect_params(std::vector<Param*>& out) override;
  void collect_buffers(std::vector<std::pair<std::string, Tensor*>>& out) override;
  void collect_quantized(std::vector<QuantizedLayer*>& out) override;
  void collect_saved(std::vector<std::pair<const void*, size_t>>& out) const override {
    pre_.collect_saved(out);
    if (shortcut_) shortcut_->collect_saved(out);
    main_.collect_saved(out);
  }
  // bn1 recomputes its input from `input` (the previous block or the stem conv), bn2 from conv1.
  void enable_recompute(const RecomputePolicy& policy, const OutputSource& input) override;
  // conv2's output + the shortcut's (or the recomputed input), as forward added them.
  OutputSource output_source() override;

 private:
  Tensor forward_main(const Tensor& h, const Tensor& s, const StepContext& ctx);

  Sequential pre_;       // bn1 (+ ReLU, fused)
  ModulePtr shortcut_;   // Conv2d or null (identity)
  Sequential main_;      // conv1, bn2 (+ ReLU, fused), conv2
  // The same layers, for forward, which hands each batch norm's output range to the next
  // convolution's quantizer and quantizes bn1's output once for conv1 and the shortcut.
  BatchNorm2d* bn1_ = nullptr;
  BatchNorm2d* bn2_ = nullptr;
  Conv2d* conv1_ = nullptr;
  Conv2d* conv2_ = nullptr;
  Conv2d* short_conv_ = nullptr;
  OutputSource input_src_;  // recomputation of the block's input (empty: not recomputing)
  Tensor cached_input_;     // the recomputed input, between output_source() and bn1's backward
  Tensor take_input();
};

// Basic residual block (ResNet-18): y = ReLU(BN2(conv2(ReLU(BN1(conv1(x))))) + s(x)), s = 1x1
// conv + BN when the shape changes, else identity. Layer ids: conv1, conv2, shortcut conv.
class BasicBlock : public Module {
 public:
  BasicBlock(const std::string& name, int64_t cin, int64_t cout, int64_t stride, const Recipe& recipe,
             LayerIds& ids);
  std::string kind() const override { return "BasicBlock"; }
  Tensor forward(const Tensor& x, const StepContext& ctx) override;
  Tensor backward(const Tensor& dy, const StepContext& ctx) override;
  void collect_params(std::vector<Param*>& out) override;
  void collect_buffers(std::vector<std::pair<std::string, Tensor*>>& out) override;
  void collect_quantized(std::vector<QuantizedLayer*>& out) override;
  void collect_saved(std::vector<std::pair<const void*, size_t>>& out) const override {
    main_.collect_saved(out);
    if (shortcut_) shortcut_->collect_saved(out);
    out_relu_.collect_saved(out);
  }
  void enable_recompute(const RecomputePolicy& policy, const OutputSource& input) override;

 private:
  Sequential main_;                 // conv1, bn1 (+ ReLU, fused), conv2, bn2
  std::unique_ptr<Sequential> shortcut_;  // conv, bn or null
  ReLU out_relu_;
};

// Elementwise a += b (same shape, f32).
void add_inplace(Tensor& a, const Tensor& b);

// ---- loss -------------------------------------------------------------------------------------

// Softmax + cross-entropy with optional label smoothing (target = (1-ls) onehot + ls/K),
// mean over the batch. Computed in fp64 per row.
class SoftmaxCrossEntropy {
 public:
  // logits f32 [N, K], labels i32 [N] in [0, K). Returns the mean loss.
  float forward(const Tensor& logits, const Tensor& labels, float label_smoothing = 0.0f);
  // dL/dlogits for the mean loss, f32 [N, K].
  Tensor backward() const;
  int64_t num_correct() const { return correct_; }  // argmax == label in the last forward
  const Tensor& probs() const { return probs_; }

 private:
  Tensor probs_, labels_;
  float ls_ = 0.0f;
  int64_t correct_ = 0;
};

}  // namespace fqt
