// Model builders (models.hpp).
#include "fqt/models.hpp"

namespace fqt {

const std::vector<std::string>& model_names() {
  static const std::vector<std::string> names = {"mlp", "cnn", "preact_resnet20", "preact_resnet56", "resnet18"};
  return names;
}

namespace {

ModulePtr make_mlp(int in_c, int in_h, int in_w, int classes, const Recipe& r, LayerIds& ids) {
  auto m = std::make_unique<Sequential>();
  const int64_t d = static_cast<int64_t>(in_c) * in_h * in_w;
  m->emplace<Flatten>();
  m->emplace<Linear>("fc1", d, 256, true, r, ids.take(), ids.init_seed);
  m->emplace<ReLU>();
  m->emplace<Linear>("fc2", 256, 256, true, r, ids.take(), ids.init_seed);
  m->emplace<ReLU>();
  m->emplace<Linear>("fc3", 256, classes, true, r, ids.take(), ids.init_seed);
  return m;
}

ModulePtr make_cnn(int in_c, int in_h, int in_w, int classes, const Recipe& r, LayerIds& ids) {
  FQT_INPUT_CHECK(in_h >= 4 && in_w >= 4, "model cnn needs images of at least 4x4, got {}x{}", in_h, in_w);
  auto m = std::make_unique<Sequential>();
  m->emplace<Conv2d>("conv1", in_c, 32, 3, 1, 1, false, r, ids.take(), ids.init_seed);
  m->emplace<BatchNorm2d>("bn1", 32).with_relu();
  m->emplace<MaxPool2d>(2, 2);
  m->emplace<Conv2d>("conv2", 32, 64, 3, 1, 1, false, r, ids.take(), ids.init_seed);
  m->emplace<BatchNorm2d>("bn2", 64).with_relu();
  m->emplace<MaxPool2d>(2, 2);
  m->emplace<Flatten>();
  const int64_t h = (in_h / 2) / 2, w = (in_w / 2) / 2;
  m->emplace<Linear>("fc", 64 * h * w, classes, true, r, ids.take(), ids.init_seed);
  return m;
}

ModulePtr make_preact(int blocks_per_stage, int in_c, int classes, const Recipe& r, LayerIds& ids) {
  auto m = std::make_unique<Sequential>();
  m->emplace<Conv2d>("conv1", in_c, 16, 3, 1, 1, false, r, ids.take(), ids.init_seed);
  const int64_t widths[3] = {16, 32, 64};
  int64_t cin = 16;
  for (int s = 0; s < 3; ++s) {
    for (int b = 0; b < blocks_per_stage; ++b) {
      const int64_t stride = (s > 0 && b == 0) ? 2 : 1;
      m->emplace<PreActBlock>(fmt::format("stage{}.block{}", s + 1, b), cin, widths[s], stride, r, ids);
      cin = widths[s];
    }
  }
  m->emplace<BatchNorm2d>("bn", cin).with_relu();
  m->emplace<GlobalAvgPool>();
  m->emplace<Linear>("fc", cin, classes, true, r, ids.take(), ids.init_seed);
  return m;
}

ModulePtr make_resnet18(int in_c, int classes, const Recipe& r, LayerIds& ids) {
  auto m = std::make_unique<Sequential>();
  m->emplace<Conv2d>("conv1", in_c, 64, 3, 1, 1, false, r, ids.take(), ids.init_seed);
  m->emplace<BatchNorm2d>("bn1", 64).with_relu();
  const int64_t widths[4] = {64, 128, 256, 512};
  int64_t cin = 64;
  for (int s = 0; s < 4; ++s) {
    for (int b = 0; b < 2; ++b) {
      const int64_t stride = (s > 0 && b == 0) ? 2 : 1;
      m->emplace<BasicBlock>(fmt::format("layer{}.block{}", s + 1, b), cin, widths[s], stride, r, ids);
      cin = widths[s];
    }
  }
  m->emplace<GlobalAvgPool>();
  m->emplace<Linear>("fc", cin, classes, true, r, ids.take(), ids.init_seed);
  return m;
}

// The first quantized layer (forward order) gets no input gradient: only parameter-free layers
// (Flatten) come before it, so nothing needs the gradient of the images.
ModulePtr first_layer_without_input_grad(ModulePtr m) {
  std::vector<QuantizedLayer*> layers;
  m->collect_quantized(layers);
  FQT_CHECK(!layers.empty(), "model without quantized layers");
  layers.front()->set_input_grad(false);
  return m;
}

}  // namespace

ModulePtr make_model(const std::string& name, int in_c, int in_h, int in_w, int num_classes, const Recipe& recipe,
                     uint64_t init_seed) {
  FQT_INPUT_CHECK(in_c > 0 && in_h > 0 && in_w > 0 && num_classes > 0,
                  "model {}: bad input {}x{}x{} or class count {}", name, in_c, in_h, in_w, num_classes);
  LayerIds ids{0, init_seed};
  ModulePtr m;
  if (name == "mlp") m = make_mlp(in_c, in_h, in_w, num_classes, recipe, ids);
  else if (name == "cnn") m = make_cnn(in_c, in_h, in_w, num_classes, recipe, ids);
  else if (name == "preact_resnet20") m = make_preact(3, in_c, num_classes, recipe, ids);
  else if (name == "preact_resnet56") m = make_preact(9, in_c, num_classes, recipe, ids);
  else if (name == "resnet18") m = make_resnet18(in_c, num_classes, recipe, ids);
  else throw InputError(fmt::format("unknown model '{}'; valid models: {}", name, fmt::join(model_names(), ", ")));
  return first_layer_without_input_grad(std::move(m));
}

Recompute effective_recompute(Recompute r, Mode mode) {
  return r == Recompute::automatic && mode == Mode::fp32 ? Recompute::off : r;
}

RecomputePolicy recompute_policy(Recompute r, Mode mode) {
  RecomputePolicy p;
  r = effective_recompute(r, mode);
  p.on = r != Recompute::off;
  if (r == Recompute::automatic) p.max_macs = kAutoRecomputeMacs;
  return p;
}

void set_recompute(Module& model, Recompute r, Mode mode) { model.enable_recompute(recompute_policy(r, mode), {}); }

const char* recompute_name(Recompute r) {
  switch (r) {
    case Recompute::off: return "off";
    case Recompute::automatic: return "auto";
    case Recompute::on: return "on";
  }
  return "?";
}

Recompute parse_recompute(const std::string& s) {
  if (s == "off") return Recompute::off;
  if (s == "auto") return Recompute::automatic;
  if (s == "on") return Recompute::on;
  throw InputError(fmt::format("recompute setting '{}' is not off, auto or on", s));
}

}  // namespace fqt
