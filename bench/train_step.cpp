// One training step (forward + backward, loss included, no optimizer) of a model, timed.
// Usage: bench_train_step [model=preact_resnet20] [batch=128] [mode=fp32] [iters=5] [c h w = 1 28 28]
// Prints the median over `iters` after one warm-up step, as JSON.
// On a shared machine run with OMP_WAIT_POLICY=passive: with libgomp's default active waiting a
// thread preempted by another process stalls every barrier (measured 3-10x slower steps at load
// 4 on 2 cores; 310-340 ms median per PreAct-ResNet-20 fp32 step when the cores are free).
#include "fqt/models.hpp"
#include "fqt/rng.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using namespace fqt;

int main(int argc, char** argv) {
  // Keep freed buffers in the heap (FQT_NO_MALLOPT=1 to measure without): see tensor.hpp.
  retain_freed_memory();
  const std::string model = argc > 1 ? argv[1] : "preact_resnet20";
  const int batch = argc > 2 ? std::atoi(argv[2]) : 128;
  Recipe recipe;
  recipe.mode = parse_mode(argc > 3 ? argv[3] : "fp32");
  const int iters = argc > 4 ? std::atoi(argv[4]) : 5;
  const int c = argc > 5 ? std::atoi(argv[5]) : 1, h = argc > 6 ? std::atoi(argv[6]) : 28,
            w = argc > 7 ? std::atoi(argv[7]) : 28;
  ModulePtr net = make_model(model, c, h, w, 10, recipe, 1);
  std::vector<Param*> params;
  net->collect_params(params);
  Tensor x = Tensor::empty({batch, c, h, w});
  for (int64_t i = 0; i < x.numel(); ++i) x.data<float>()[i] = normal_at({7, 0}, i);
  Tensor y = Tensor::empty({batch}, DType::i32);
  for (int i = 0; i < batch; ++i) y.data<int32_t>()[i] = i % 10;
  SoftmaxCrossEntropy loss;
  std::vector<double> fwd_ms, step_ms;
  for (int it = 0; it <= iters; ++it) {
    StepContext ctx{true, 1, static_cast<uint64_t>(it)};
    for (Param* p : params) p->grad.fill(0.0);
    const auto t0 = std::chrono::steady_clock::now();
    Tensor logits = net->forward(x, ctx);
    loss.forward(logits, y);
    const auto t1 = std::chrono::steady_clock::now();
    net->backward(loss.backward(), ctx);
    const auto t2 = std::chrono::steady_clock::now();
    if (it == 0) continue;  // warm-up
    fwd_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
    step_ms.push_back(std::chrono::duration<double, std::milli>(t2 - t0).count());
  }
  std::sort(fwd_ms.begin(), fwd_ms.end());
  std::sort(step_ms.begin(), step_ms.end());
  std::printf("{\"model\": \"%s\", \"mode\": \"%s\", \"batch\": %d, \"input\": [%d, %d, %d], \"threads\": %d, "
              "\"forward_ms_median\": %.1f, \"step_ms_median\": %.1f, \"step_ms_min\": %.1f}\n",
              model.c_str(), mode_name(recipe.mode), batch, c, h, w, omp_get_max_threads(), fwd_ms[fwd_ms.size() / 2],
              step_ms[step_ms.size() / 2], step_ms.front());
  return 0;
}
