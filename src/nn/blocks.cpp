// Residual blocks for the ResNets.
#include "common.hpp"

#include <algorithm>
#include <optional>

namespace fqt {

// ---- PreActBlock ------------------------------------------------------------------------------

PreActBlock::PreActBlock(const std::string& name, int64_t cin, int64_t cout, int64_t stride, const Recipe& recipe,
                         LayerIds& ids) {
  bn1_ = &pre_.emplace<BatchNorm2d>(name + ".bn1", cin).with_relu();
  if (stride != 1 || cin != cout) {
    auto sc = std::make_unique<Conv2d>(name + ".shortcut", cin, cout, 1, stride, 0, false, recipe, ids.take(),
                                       ids.init_seed);
    short_conv_ = sc.get();
    shortcut_ = std::move(sc);
  }
  conv1_ = &main_.emplace<Conv2d>(name + ".conv1", cin, cout, 3, stride, 1, false, recipe, ids.take(), ids.init_seed);
  bn2_ = &main_.emplace<BatchNorm2d>(name + ".bn2", cout).with_relu();
  conv2_ = &main_.emplace<Conv2d>(name + ".conv2", cout, cout, 3, 1, 1, false, recipe, ids.take(), ids.init_seed);
}

// bn1, shortcut, conv1, bn2, conv2, as pre_ and main_ would run them, with fewer passes per
// convolution input: in training, a batch norm whose output only a convolution's codes need
// writes those codes straight away (BatchNorm2d::forward_codes: no fp32 output); otherwise its
// output range comes from the pass that wrote it (quantize_in_range: the same codes). bn1's
// output, which conv1 and the shortcut both read, is quantized once when their quantizers agree
// (their codes are then kept once).
Tensor PreActBlock::forward(const Tensor& x, const StepContext& ctx) {
  cached_input_ = {};
  Tensor s = x;  // the shortcut
  const Shape a_shape = x.shape();
  const bool q1 = conv1_->quantizes_input();
  const bool share = short_conv_ && q1 && short_conv_->same_input_quantizer(*conv1_);
  if (q1 && (!short_conv_ || share) && bn1_->can_forward_codes(conv1_->input_quantizer(), ctx)) {
    const QuantizedTensor aq = bn1_->forward_codes(x, ctx, conv1_->input_quantizer());
    if (short_conv_) s = short_conv_->forward(a_shape, ctx, aq);
    return forward_main(conv1_->forward(a_shape, ctx, aq), s, ctx);
  }
  ValueRange ra;
  const Tensor a = bn1_->forward(x, ctx, q1 ? &ra : nullptr);
  std::optional<QuantizedTensor> aq;
  if (q1) aq = conv1_->quantize_input(a, ra);
  if (short_conv_) s = short_conv_->forward(a, ctx, share ? &*aq : nullptr);
  const Tensor h = conv1_->forward(a, ctx, aq ? &*aq : nullptr);
  aq.reset();
  return forward_main(h, s, ctx);
}

// bn2, conv2 on conv1's output h, + the shortcut s.
Tensor PreActBlock::forward_main(const Tensor& h, const Tensor& s, const StepContext& ctx) {
  if (conv2_->quantizes_input() && bn2_->can_forward_codes(conv2_->input_quantizer(), ctx))
    return conv2_->forward(h.shape(), ctx, bn2_->forward_codes(h, ctx, conv2_->input_quantizer()), &s);
  ValueRange rb;
  const Tensor b = bn2_->forward(h, ctx, conv2_->quantizes_input() ? &rb : nullptr);
  std::optional<QuantizedTensor> bq;
  if (conv2_->quantizes_input()) bq = conv2_->quantize_input(b, rb);
  return conv2_->forward(b, ctx, bq ? &*bq : nullptr, &s);  // + the shortcut, added as conv2 writes
}

Tensor PreActBlock::backward(const Tensor& dy, const StepContext& ctx) { return backward_ranged(dy, ctx, nullptr, nullptr); }

Tensor PreActBlock::backward_ranged(Tensor dy, const StepContext& ctx, const ValueRange* dy_range,
                                    ValueRange* dx_range) {
  Tensor da = main_.backward_ranged(dy, ctx, dy_range, nullptr);
  if (shortcut_) {
    add_inplace(da, shortcut_->backward_ranged(dy, ctx, dy_range, nullptr));
    return pre_.backward_ranged(std::move(da), ctx, nullptr, dx_range);
  }
  return bn1_->backward(std::move(da), ctx, &dy, dx_range);  // (pre_ is bn1 alone) + the identity shortcut's gradient
}

void PreActBlock::enable_recompute(const RecomputePolicy& policy, const OutputSource& input) {
  input_src_ = policy.allows(input) ? input : OutputSource();
  cached_input_ = {};
  pre_.enable_recompute(policy, input_src_ ? OutputSource{[this] { return take_input(); }, input_src_.macs}
                                           : OutputSource());  // bn1
  main_.enable_recompute(policy, {});  // bn2 <- conv1
}

Tensor PreActBlock::take_input() {
  if (!cached_input_.defined()) return input_src_();
  Tensor x = std::move(cached_input_);
  cached_input_ = {};
  return x;
}

// y = conv2 + (shortcut or the input), added as forward added them. Backward asks for a block's
// output once, from the next block's bn1 (or the model's last bn); with an identity shortcut the
// input it needed is kept until this block's own bn1 asks for it — which comes next in backward —
// so each conv output of a chain of identity blocks is recomputed once, not once per later block.
// (A consumer the policy allows this source implies bn1 allowed the input: the source costs the
// dearer of conv2 and the input or shortcut, so the kept input is always taken.)
OutputSource PreActBlock::output_source() {
  if (!shortcut_ && !input_src_) return {};
  const int64_t macs = std::max(main_.output_source().macs,
                                shortcut_ ? shortcut_->output_source().macs : input_src_.macs);
  // (conv2 adds the other term as it stores its output, as in forward: OutputSource::plus)
  return {[this] {
            if (shortcut_) return main_.output_source().plus(shortcut_->output_source()());
            Tensor x = take_input();
            Tensor y = main_.output_source().plus(x);
            cached_input_ = x;
            return y;
          },
          macs};
}

// Order: bn1, shortcut, conv1, bn2, conv2 (construction order).
void PreActBlock::collect_params(std::vector<Param*>& out) {
  pre_.collect_params(out);
  if (shortcut_) shortcut_->collect_params(out);
  main_.collect_params(out);
}
void PreActBlock::collect_buffers(std::vector<std::pair<std::string, Tensor*>>& out) {
  pre_.collect_buffers(out);
  main_.collect_buffers(out);
}
void PreActBlock::collect_quantized(std::vector<QuantizedLayer*>& out) {
  if (shortcut_) shortcut_->collect_quantized(out);
  main_.collect_quantized(out);
}

// ---- BasicBlock -------------------------------------------------------------------------------

BasicBlock::BasicBlock(const std::string& name, int64_t cin, int64_t cout, int64_t stride, const Recipe& recipe,
                       LayerIds& ids) {
  main_.emplace<Conv2d>(name + ".conv1", cin, cout, 3, stride, 1, false, recipe, ids.take(), ids.init_seed);
  main_.emplace<BatchNorm2d>(name + ".bn1", cout).with_relu();
  main_.emplace<Conv2d>(name + ".conv2", cout, cout, 3, 1, 1, false, recipe, ids.take(), ids.init_seed);
  main_.emplace<BatchNorm2d>(name + ".bn2", cout);
  if (stride != 1 || cin != cout) {
    shortcut_ = std::make_unique<Sequential>();
    shortcut_->emplace<Conv2d>(name + ".shortcut.conv", cin, cout, 1, stride, 0, false, recipe, ids.take(),
                               ids.init_seed);
    shortcut_->emplace<BatchNorm2d>(name + ".shortcut.bn", cout);
  }
}

Tensor BasicBlock::forward(const Tensor& x, const StepContext& ctx) {
  Tensor y = main_.forward(x, ctx);
  add_inplace(y, shortcut_ ? shortcut_->forward(x, ctx) : x);
  return out_relu_.forward(y, ctx);
}

Tensor BasicBlock::backward(const Tensor& dy, const StepContext& ctx) {
  const Tensor dsum = out_relu_.backward(dy, ctx);
  Tensor dx = main_.backward(dsum, ctx);
  add_inplace(dx, shortcut_ ? shortcut_->backward(dsum, ctx) : dsum);
  return dx;
}

void BasicBlock::enable_recompute(const RecomputePolicy& policy, const OutputSource& input) {
  main_.enable_recompute(policy, input);  // bn1 <- conv1, bn2 <- conv2
  if (shortcut_) shortcut_->enable_recompute(policy, input);  // shortcut.bn <- shortcut.conv
}

void BasicBlock::collect_params(std::vector<Param*>& out) {
  main_.collect_params(out);
  if (shortcut_) shortcut_->collect_params(out);
}
void BasicBlock::collect_buffers(std::vector<std::pair<std::string, Tensor*>>& out) {
  main_.collect_buffers(out);
  if (shortcut_) shortcut_->collect_buffers(out);
}
void BasicBlock::collect_quantized(std::vector<QuantizedLayer*>& out) {
  main_.collect_quantized(out);
  if (shortcut_) shortcut_->collect_quantized(out);
}

}  // namespace fqt
