// Sanity check that a model trains: Fashion-MNIST (Debian's dataset-fashion-mnist), plain SGD
// with momentum (this file's own minimal loop; the real trainer lives in src/train/).
// Usage: fmnist_check [model=cnn] [mode=fp32] [epochs=2] [lr=0.02] [dir=/usr/share/datasets/fashion-mnist]
#include "fqt/models.hpp"

#include <zlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>
#include <vector>

using namespace fqt;

static std::vector<uint8_t> read_gz(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  FQT_INPUT_CHECK(f != nullptr, "cannot open {}", path);
  std::vector<uint8_t> out;
  uint8_t buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + n);
  gzclose(f);
  return out;
}

int main(int argc, char** argv) {
  retain_freed_memory();
  const std::string model = argc > 1 ? argv[1] : "cnn";
  Recipe recipe;
  recipe.mode = parse_mode(argc > 2 ? argv[2] : "fp32");
  const int epochs = argc > 3 ? std::atoi(argv[3]) : 2;
  const float lr0 = argc > 4 ? static_cast<float>(std::atof(argv[4])) : 0.02f;
  const std::string dir = argc > 5 ? argv[5] : "/usr/share/datasets/fashion-mnist";
  auto load = [&](const std::string& split, std::vector<float>& x, std::vector<int32_t>& y) {
    const auto img = read_gz(dir + "/" + split + "-images-idx3-ubyte.gz");
    const auto lab = read_gz(dir + "/" + split + "-labels-idx1-ubyte.gz");
    const size_t n = lab.size() - 8;
    x.resize(n * 784);
    y.resize(n);
    for (size_t i = 0; i < n * 784; ++i) x[i] = (img[16 + i] / 255.0f - 0.2860f) / 0.3530f;
    for (size_t i = 0; i < n; ++i) y[i] = lab[8 + i];
  };
  std::vector<float> xtr, xte;
  std::vector<int32_t> ytr, yte;
  load("train", xtr, ytr);
  load("t10k", xte, yte);
  ModulePtr net = make_model(model, 1, 28, 28, 10, recipe, 1);
  std::vector<Param*> params;
  net->collect_params(params);
  std::vector<Tensor> mom;
  for (Param* p : params) mom.push_back(Tensor::zeros(p->value.shape()));
  const int B = 128;
  const int64_t ntr = static_cast<int64_t>(ytr.size()), steps_per_epoch = ntr / B;
  const float wd = 5e-4f;
  std::vector<int64_t> perm(ntr);
  uint64_t step = 0;
  SoftmaxCrossEntropy loss;
  const auto t0 = std::chrono::steady_clock::now();
  for (int e = 0; e < epochs; ++e) {
    std::iota(perm.begin(), perm.end(), 0);
    for (int64_t i = ntr - 1; i > 0; --i) std::swap(perm[i], perm[static_cast<int64_t>(uniform_at({9, 100u + e}, i) * (i + 1))]);
    double lsum = 0;
    int64_t correct = 0;
    for (int64_t s = 0; s < steps_per_epoch; ++s, ++step) {
      Tensor x = Tensor::empty({B, 1, 28, 28}), y = Tensor::empty({B}, DType::i32);
      for (int b = 0; b < B; ++b) {
        const int64_t j = perm[s * B + b];
        std::copy_n(&xtr[j * 784], 784, x.data<float>() + b * 784);
        y.data<int32_t>()[b] = ytr[j];
      }
      // cosine schedule over all steps
      const float lr = lr0 * 0.5f * (1 + std::cos(3.14159265f * step / (epochs * steps_per_epoch)));
      const StepContext ctx{true, 42, step};
      for (Param* p : params) p->grad.fill(0.0);
      lsum += loss.forward(net->forward(x, ctx), y);
      correct += loss.num_correct();
      net->backward(loss.backward(), ctx);
      for (size_t k = 0; k < params.size(); ++k) {
        float* w = params[k]->value.data<float>();
        const float* g = params[k]->grad.data<float>();
        float* m = mom[k].data<float>();
        const float d = params[k]->weight_decay ? wd : 0.0f;
        for (int64_t i = 0; i < params[k]->value.numel(); ++i) {
          m[i] = 0.9f * m[i] + g[i] + d * w[i];
          w[i] -= lr * m[i];
        }
      }
    }
    // evaluation
    int64_t tc = 0;
    const int64_t nte = static_cast<int64_t>(yte.size());
    for (int64_t s = 0; s < nte; s += 500) {
      const int64_t b = std::min<int64_t>(500, nte - s);
      Tensor x = Tensor::empty({b, 1, 28, 28}), y = Tensor::empty({b}, DType::i32);
      std::copy_n(&xte[s * 784], b * 784, x.data<float>());
      std::copy_n(&yte[s], b, y.data<int32_t>());
      loss.forward(net->forward(x, StepContext{false, 0, 0}), y);
      tc += loss.num_correct();
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("{\"model\": \"%s\", \"mode\": \"%s\", \"epoch\": %d, \"train_loss\": %.4f, \"train_acc\": %.4f, "
                "\"test_acc\": %.4f, \"seconds\": %.1f}\n",
                model.c_str(), mode_name(recipe.mode), e + 1, lsum / steps_per_epoch,
                static_cast<double>(correct) / (steps_per_epoch * B), static_cast<double>(tc) / nte, secs);
    std::fflush(stdout);
  }
  return 0;
}
