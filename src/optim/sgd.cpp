#include "fqt/optim.hpp"

#include <cmath>
#include <cstring>
#include <set>

namespace fqt {

SGD::SGD(std::vector<Param*> params, SGDOptions options) : params_(std::move(params)), options_(options) {
  FQT_INPUT_CHECK(std::isfinite(options_.momentum) && options_.momentum >= 0.0f,
                  "SGD: momentum must be a finite number >= 0, got {}", options_.momentum);
  FQT_INPUT_CHECK(std::isfinite(options_.weight_decay) && options_.weight_decay >= 0.0f,
                  "SGD: weight decay must be a finite number >= 0, got {}", options_.weight_decay);
  FQT_INPUT_CHECK(!options_.nesterov || options_.momentum > 0.0f,
                  "SGD: Nesterov momentum needs momentum > 0 (set a momentum or turn nesterov off)");
  std::set<std::string> names;
  for (const Param* p : params_) {
    FQT_CHECK(p != nullptr, "SGD: null parameter");
    FQT_CHECK(names.insert(p->name).second, "SGD: parameter name '{}' appears twice", p->name);
    FQT_CHECK(p->value.defined() && p->value.dtype() == DType::f32, "SGD: parameter '{}' must be an f32 tensor",
              p->name);
    FQT_CHECK(p->grad.defined() && p->grad.dtype() == DType::f32 && p->grad.shape() == p->value.shape(),
              "SGD: gradient of '{}' must be f32 of shape {}", p->name, shape_str(p->value.shape()));
  }
  if (options_.momentum != 0.0f) {
    buffers_.reserve(params_.size());
    for (const Param* p : params_) buffers_.push_back(Tensor::zeros(p->value.shape(), DType::f32));
  }
}

void SGD::set_momentum_initialized(bool v) {
  FQT_CHECK(!v || options_.momentum != 0.0f, "SGD: no momentum buffers when momentum == 0");
  initialized_ = v;
}

namespace {
// Whether any of n floats is NaN or +-Inf (exponent bits all set): an OR of integer tests, which
// the compiler vectorizes (the first-index search below does not; it was ~5% of the MLP's step).
bool any_non_finite(const float* g, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, g + i, sizeof u);
    bad |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
  }
  return bad != 0;
}
}  // namespace

std::pair<std::string, int64_t> SGD::first_non_finite() const {
  for (const Param* p : params_) {
    const float* g = p->grad.data<float>();
    const int64_t n = p->grad.numel();
    if (!any_non_finite(g, n)) continue;
    int64_t first = n;
#pragma omp parallel for reduction(min : first) schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(g[i]) && i < first) first = i;
    if (first < n) return {p->name, first};
  }
  return {std::string(), -1};
}

bool SGD::all_finite() const { return first_non_finite().second < 0; }

void SGD::zero_grad() {
  for (Param* p : params_) std::memset(p->grad.raw(), 0, p->grad.nbytes());
}

void SGD::step(float lr) {
  FQT_INPUT_CHECK(std::isfinite(lr), "SGD: learning rate is {}, it must be finite", lr);
  // Validate everything before touching anything.
  for (const Param* p : params_)
    FQT_CHECK(p->grad.defined() && p->grad.shape() == p->value.shape() && p->grad.dtype() == DType::f32,
              "SGD: gradient of '{}' changed shape or dtype", p->name);
  auto [bad, index] = first_non_finite();
  if (index >= 0) {
    for (const Param* p : params_)
      if (p->name == bad)
        throw NonFiniteError(fmt::format("SGD: gradient of '{}' is {} at element {} (of {}); weights not updated",
                                         bad, p->grad.data<float>()[index], index, p->grad.numel()));
  }

  const float m = options_.momentum;
  const bool nesterov = options_.nesterov;
  const bool first = !initialized_;
  for (size_t k = 0; k < params_.size(); ++k) {
    Param* p = params_[k];
    float* w = p->value.data<float>();
    const float* g = p->grad.data<float>();
    const float wd = p->weight_decay ? options_.weight_decay : 0.0f;
    const int64_t n = p->value.numel();
    if (m == 0.0f) {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; ++i) {
        float d = g[i];
        if (wd != 0.0f) d = d + wd * w[i];
        w[i] = w[i] + (-lr) * d;
      }
    } else {
      float* buf = buffers_[k].data<float>();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; ++i) {
        float d = g[i];
        if (wd != 0.0f) d = d + wd * w[i];
        const float b = first ? d : m * buf[i] + d;
        buf[i] = b;
        d = nesterov ? d + m * b : b;
        w[i] = w[i] + (-lr) * d;
      }
    }
  }
  if (m != 0.0f) initialized_ = true;
  ++steps_;
}

}  // namespace fqt
