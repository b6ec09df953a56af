// The tiny conv net of the network-level statistical tests (conv-BN-ReLU-conv-GAP-linear, input
// 3 channels, 10 classes), and its full gradient on a batch for one step's random draws.
#pragma once

#include "fqt/layers.hpp"

#include <cstdint>
#include <vector>

namespace fqt::test {

struct TinyNet {
  Sequential net;
  explicit TinyNet(const Recipe& r) {
    net.emplace<Conv2d>("conv1", 3, 8, 3, 1, 1, false, r, 0, 5);
    net.emplace<BatchNorm2d>("bn1", 8);
    net.emplace<ReLU>();
    net.emplace<Conv2d>("conv2", 8, 8, 3, 1, 1, true, r, 1, 5);
    net.emplace<GlobalAvgPool>();
    net.emplace<Linear>("fc", 8, 10, true, r, 2, 5);
  }
  std::vector<double> gradient(const Tensor& x, const Tensor& y, uint64_t step) {
    std::vector<Param*> params;
    net.collect_params(params);
    for (Param* p : params) p->grad.fill(0.0);
    const StepContext ctx{true, 1234, step};
    SoftmaxCrossEntropy loss;
    loss.forward(net.forward(x, ctx), y);
    net.backward(loss.backward(), ctx);
    std::vector<double> g;
    for (Param* p : params)
      for (int64_t i = 0; i < p->grad.numel(); ++i) g.push_back(p->grad.data<float>()[i]);
    return g;
  }
};

}  // namespace fqt::test
