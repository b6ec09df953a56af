// fqt/models.hpp — model builders.
//
// Every Linear/Conv2d is quantized according to `recipe` (first and last layers included) and
// gets a unique layer_id 0, 1, 2, ... in forward order and a dotted name ("stage2.block0.conv1").
// Weights are initialised deterministically from `init_seed`. A BN followed by a ReLU is one
// BatchNorm2d::with_relu() module (the same arithmetic, one pass less each way).
//
//   mlp              Flatten, Linear(D, 256), ReLU, Linear(256, 256), ReLU, Linear(256, classes)
//   cnn              [conv3x3 32, BN, ReLU, maxpool2] [conv3x3 64, BN, ReLU, maxpool2], Flatten, FC
//   preact_resnet20  CIFAR PreAct-ResNet (He et al. 2016): conv3x3 16, 3 stages x n pre-activation
//   preact_resnet56  blocks (n = 3 / 9) with 16/32/64 channels, stride 2 at stages 2 and 3,
//                    1x1 projection shortcuts, then BN, ReLU, global average pool, FC
//   resnet18         basic-block ResNet-18 for small images: conv3x3 64 stride 1 + BN + ReLU,
//                    no max pool, 4 stages x 2 blocks with 64/128/256/512 channels, GAP, FC
#pragma once

#include "fqt/layers.hpp"

#include <string>
#include <vector>

namespace fqt {

// Throws InputError listing the valid names for an unknown `name`.
ModulePtr make_model(const std::string& name, int in_c, int in_h, int in_w, int num_classes, const Recipe& recipe,
                     uint64_t init_seed);
const std::vector<std::string>& model_names();

// Recomputation instead of fp32 copies (SPEC section 4: what backward needs from forward is kept
// as codes). A batch norm that recomputes keeps no fp32 input for backward: backward rebuilds it
// from the codes the convolutions saved anyway — conv outputs are recomputed (integer GEMMs on
// the saved codes), PreAct blocks add them up as their forward did, back to the stem conv or a
// projection shortcut — and the gradients are bit-identical to those without it. It costs the
// forward GEMMs of the convolutions it goes through again (a PreAct block's bn1 input is the sum
// of the stage's earlier block outputs; each is recomputed once per step).
//   off   every batch norm keeps its input (the fastest step);
//   on    every batch norm whose input a layer can recompute;
//   auto  in qat / fqt, those whose recomputation costs at most kAutoRecomputeMacs multiply-adds
//         per fp32 element not kept (the dearest convolution on the way reduces over at most
//         Cin x kh x kw = 144 terms: 16 channels x 3x3): the large, cheap activations of the
//         first stage. fp32 models keep everything (the baseline). The default.
// Batch norms whose input no layer can recompute keep their input.
inline constexpr int64_t kAutoRecomputeMacs = 144;
// The setting in effect for a model in `mode`: auto is off in fp32, the rest as given.
Recompute effective_recompute(Recompute r, Mode mode);
RecomputePolicy recompute_policy(Recompute r, Mode mode);
void set_recompute(Module& model, Recompute r, Mode mode);
// "off", "auto", "on"; parse_recompute throws InputError naming the valid values.
const char* recompute_name(Recompute r);
Recompute parse_recompute(const std::string& s);

}  // namespace fqt
