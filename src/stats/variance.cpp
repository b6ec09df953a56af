// Network-level gradient bias and variance (variance.hpp, SPEC sections 3 and 5).
#include "fqt/variance.hpp"

#include "fqt/error.hpp"
#include "fqt/layers.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>

namespace fqt {

namespace {

// The parameters of a model flattened into one vector; each quantized layer owns some ranges.
struct ParamLayout {
  std::vector<Param*> params;
  std::vector<int64_t> offset;  // per param
  int64_t total = 0;
  std::vector<QuantizedLayer*> layers;                        // forward order (layer_id)
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges;  // per layer: (begin, end)
};

ParamLayout layout_of(Module& model) {
  ParamLayout L;
  model.collect_params(L.params);
  std::map<const Param*, int64_t> where;
  for (Param* p : L.params) {
    L.offset.push_back(L.total);
    where[p] = L.total;
    L.total += p->grad.numel();
  }
  model.collect_quantized(L.layers);
  std::stable_sort(L.layers.begin(), L.layers.end(),
                   [](const QuantizedLayer* a, const QuantizedLayer* b) { return a->layer_id() < b->layer_id(); });
  for (QuantizedLayer* l : L.layers) {
    std::vector<Param*> own;
    l->collect_params(own);
    std::vector<std::pair<int64_t, int64_t>> r;
    for (Param* p : own) {
      auto it = where.find(p);
      FQT_CHECK(it != where.end(), "layer {}: parameter {} not among the model's parameters", l->name(), p->name);
      r.emplace_back(it->second, it->second + p->grad.numel());
    }
    L.ranges.push_back(std::move(r));
  }
  return L;
}

void zero_grads(const ParamLayout& L) {
  for (Param* p : L.params) p->grad.fill(0.0);
}

void read_grads(const ParamLayout& L, std::vector<float>& out) {
  out.resize(static_cast<size_t>(L.total));
  for (size_t i = 0; i < L.params.size(); ++i) {
    const Tensor& g = L.params[i]->grad;
    std::copy(g.data<float>(), g.data<float>() + g.numel(), out.begin() + L.offset[i]);
  }
}

void write_grads(const ParamLayout& L, const std::vector<float>& in) {
  for (size_t i = 0; i < L.params.size(); ++i) {
    Tensor& g = L.params[i]->grad;
    std::copy(in.begin() + L.offset[i], in.begin() + L.offset[i] + g.numel(), g.data<float>());
  }
}

// Gradient of the (already forwarded) model for the loss gradient `dlogits`.
void backward_into(Module& model, const ParamLayout& L, const Tensor& dlogits, const StepContext& ctx,
                   std::vector<float>& out) {
  zero_grads(L);
  model.backward(dlogits.clone(), ctx);  // clone: no layer may see a shared, reused input
  read_grads(L, out);
}

// Per-segment sums of a function of index over the layer ranges and the whole vector.
// Returns size layers+1 (last = total).
template <typename F>
std::vector<double> segment_sums(const ParamLayout& L, F&& f) {
  std::vector<double> out(L.layers.size() + 1, 0.0);
  double total = 0;
  for (int64_t i = 0; i < L.total; ++i) total += f(i);
  out.back() = total;
  for (size_t l = 0; l < L.layers.size(); ++l)
    for (auto [b, e] : L.ranges[l])
      for (int64_t i = b; i < e; ++i) out[l] += f(i);
  return out;
}

double dist2(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    s += d * d;
  }
  return s;
}

struct BufferSnapshot {
  std::vector<std::pair<std::string, Tensor*>> refs;
  std::vector<Tensor> copies;
  explicit BufferSnapshot(Module& m) {
    m.collect_buffers(refs);
    for (auto& [name, t] : refs) copies.push_back(t->clone());
  }
  void restore() {
    for (size_t i = 0; i < refs.size(); ++i) {
      Tensor& t = *refs[i].second;
      std::copy(copies[i].data<float>(), copies[i].data<float>() + t.numel(), t.data<float>());
    }
  }
};

struct RecipeSnapshot {
  std::vector<QuantizedLayer*> layers;
  std::vector<Recipe> recipes;
  explicit RecipeSnapshot(const std::vector<QuantizedLayer*>& ls) : layers(ls) {
    for (QuantizedLayer* l : ls) recipes.push_back(l->recipe());
  }
  void restore() {
    for (size_t i = 0; i < layers.size(); ++i) layers[i]->recipe() = recipes[i];
  }
};

const QuantizedTensor* last_dgrad_q(QuantizedLayer* l) {
  if (auto* c = dynamic_cast<Conv2d*>(l)) return &c->last_dgrad_q();
  if (auto* f = dynamic_cast<Linear*>(l)) return &f->last_dgrad_q();
  return nullptr;
}
const QuantizedTensor* last_wgrad_q(QuantizedLayer* l) {
  if (auto* c = dynamic_cast<Conv2d*>(l)) return &c->last_wgrad_q();
  if (auto* f = dynamic_cast<Linear*>(l)) return &f->last_wgrad_q();
  return nullptr;
}

// Per configuration, summed over batches (divided by B at the end).
struct Accum {
  std::vector<double> quant_var, bias2, bound, wbound, increment;
  std::vector<std::vector<double>> quant_var_batches;  // per segment: one value per batch
  int64_t bound_n = 0, increment_n = 0;
  explicit Accum(size_t n)
      : quant_var(n, 0), bias2(n, 0), bound(n, 0), wbound(n, 0), increment(n, 0), quant_var_batches(n) {}
};

// Standard error of the mean of `v`: sample sd (B - 1) / sqrt(B); NaN for fewer than 2 values.
double standard_error(const std::vector<double>& v) {
  const size_t n = v.size();
  if (n < 2) return std::numeric_limits<double>::quiet_NaN();
  double mean = 0;
  for (double x : v) mean += x;
  mean /= static_cast<double>(n);
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return std::sqrt(ss / static_cast<double>(n - 1) / static_cast<double>(n));
}

}  // namespace

double grid_variance_bound(const QuantizedTensor& q) {
  if (!q.codes.defined() || traits(q.spec.kind).rounding != Rounding::stochastic) return 0.0;
  auto inv2 = [&](int64_t g) { return 0.25 / (static_cast<double>(q.scale[g]) * q.scale[g]); };
  switch (q.granularity()) {
    case Granularity::tensor:
      return static_cast<double>(q.rows) * q.cols * inv2(0);
    case Granularity::column: {
      double s = 0;
      for (int64_t c = 0; c < q.cols; ++c) s += inv2(c);
      return s * q.rows;
    }
    case Granularity::row: {
      std::vector<double> w;
      if (q.transform) w = q.transform->inverse_column_norms2();
      double s = 0;
      const int64_t per = q.rows_per_transform_row();  // (per-sample BHQ: T's row r / per)
      for (int64_t r = 0; r < q.rows; ++r) s += (w.empty() ? 1.0 : w[r / per]) * inv2(r);
      return s * q.cols;
    }
  }
  return 0.0;
}

std::vector<VarianceRecord> measure_variance(Module& model, const std::vector<VarianceBatch>& batches,
                                             const std::vector<VarianceConfig>& configs,
                                             const VarianceOptions& opt) {
  FQT_INPUT_CHECK(opt.samples >= 2, "need at least 2 samples per batch to measure a variance (got {})", opt.samples);
  FQT_INPUT_CHECK(opt.breakdown_samples >= 1 && opt.breakdown_samples <= opt.samples,
                  "breakdown samples must be in 1..samples ({}), got {}", opt.samples, opt.breakdown_samples);
  FQT_INPUT_CHECK(!batches.empty(), "need at least one batch");
  for (const VarianceConfig& c : configs) {
    // An exact half's spec is ignored, so it is not checked.
    FQT_INPUT_CHECK((c.exact_dgrad || traits(c.dgrad.kind).rounding == Rounding::stochastic) &&
                        (c.exact_wgrad || traits(c.wgrad.kind).rounding == Rounding::stochastic),
                    "gradient quantizers must be stochastic (got dgrad {}, wgrad {})", traits(c.dgrad.kind).name,
                    traits(c.wgrad.kind).name);
    FQT_INPUT_CHECK(c.exact_wgrad || c.wgrad.kind != QuantizerKind::bhq, "wgrad bhq is not supported (BHQ transforms the rows "
                    "the wgrad GEMM reduces over); use ptq or column");
    FQT_INPUT_CHECK((c.exact_dgrad || (c.dgrad.bits >= 2 && c.dgrad.bits <= 8)) &&
                        (c.exact_wgrad || (c.wgrad.bits >= 2 && c.wgrad.bits <= 8)),
                    "bit widths must be 2..8");
  }
  ParamLayout L = layout_of(model);
  FQT_INPUT_CHECK(!L.layers.empty(), "the model has no quantized layers");
  for (QuantizedLayer* l : L.layers)
    FQT_INPUT_CHECK(l->recipe().mode != Mode::fp32, "layer {} is in fp32 mode: the variance tool needs a quantized "
                    "forward (qat or fqt recipe)", l->name());
  const size_t nseg = L.layers.size() + 1, nl = L.layers.size();
  const int K = opt.samples;
  const int64_t B = static_cast<int64_t>(batches.size());
  RecipeSnapshot recipes(L.layers);
  BufferSnapshot buffers(model);

  auto set_modes = [&](const VarianceConfig* c, size_t exact_below) {
    for (size_t i = 0; i < nl; ++i) {
      Recipe& r = L.layers[i]->recipe();
      if (c) r.dgrad = c->dgrad, r.wgrad = c->wgrad, r.dgrad_rows = c->dgrad_rows;
      r.exact_dgrad = c && c->exact_dgrad;
      r.exact_wgrad = c && c->exact_wgrad;
      r.mode = (c && i >= exact_below) ? Mode::fqt : Mode::qat;
    }
  };

  std::vector<Accum> acc(configs.size(), Accum(nseg));
  std::vector<double> qat_norm2(nseg, 0.0);
  std::vector<std::vector<float>> qat_grads(B);
  std::vector<float> g, f_prev, f_next;
  std::vector<double> sum, sumsq;
  SoftmaxCrossEntropy ce;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  for (int64_t b = 0; b < B; ++b) {
    set_modes(nullptr, 0);
    const StepContext fwd{true, opt.seed, 0};
    ce.forward(model.forward(batches[b].x, fwd), batches[b].y, opt.label_smoothing);
    const Tensor dlogits = ce.backward();
    backward_into(model, L, dlogits, fwd, qat_grads[b]);
    const std::vector<float>& qat = qat_grads[b];
    const std::vector<double> qn = segment_sums(L, [&](int64_t i) { return double(qat[i]) * qat[i]; });
    for (size_t s = 0; s < nseg; ++s) qat_norm2[s] += qn[s];

    for (size_t ci = 0; ci < configs.size(); ++ci) {
      const VarianceConfig& c = configs[ci];
      Accum& a = acc[ci];
      sum.assign(L.total, 0.0);
      sumsq.assign(L.total, 0.0);
      for (int k = 0; k < K; ++k) {
        const StepContext ctx{true, opt.seed, static_cast<uint64_t>(b * K + k)};
        set_modes(&c, 0);
        backward_into(model, L, dlogits, ctx, g);
        for (size_t l = 0; l < nl; ++l) {
          if (const QuantizedTensor* q = last_dgrad_q(L.layers[l])) a.bound[l] += grid_variance_bound(*q);
          if (const QuantizedTensor* q = last_wgrad_q(L.layers[l])) a.wbound[l] += grid_variance_bound(*q);
        }
        ++a.bound_n;
        for (int64_t i = 0; i < L.total; ++i) {
          const double e = static_cast<double>(g[i]) - qat[i];  // centred on qat: better conditioned
          sum[i] += e;
          sumsq[i] += e * e;
        }
        if (c.breakdown && k < opt.breakdown_samples) {
          // f_0 = g; f_l: layers 0..l-1 exact; f_L = qat. Same ctx = common random numbers.
          f_prev = g;
          for (size_t l = 0; l < nl; ++l) {
            if (l + 1 < nl) {
              set_modes(&c, l + 1);
              backward_into(model, L, dlogits, ctx, f_next);
            } else {
              f_next = qat;
            }
            a.increment[l] += dist2(f_prev, f_next);
            std::swap(f_prev, f_next);
          }
          ++a.increment_n;
        }
      }
      const std::vector<double> var =
          segment_sums(L, [&](int64_t i) { return std::max(0.0, (sumsq[i] - sum[i] * sum[i] / K) / (K - 1)); });
      const std::vector<double> bias2 = segment_sums(L, [&](int64_t i) { return sum[i] / K * (sum[i] / K); });
      for (size_t s = 0; s < nseg; ++s) {
        a.quant_var[s] += var[s], a.bias2[s] += bias2[s];
        a.quant_var_batches[s].push_back(var[s]);
      }
    }
    if (opt.progress) {
      const double secs = std::chrono::duration<double>(clock::now() - t0).count();
      opt.progress(fmt::format("batch {}/{} done, {:.1f} s", b + 1, B, secs));
    }
  }
  recipes.restore();
  buffers.restore();

  // Sampling variance across batches of the QAT gradient.
  std::vector<double> samp(nseg, 0.0);
  if (B >= 2) {
    std::vector<double> mean(L.total, 0.0);
    for (const auto& q : qat_grads)
      for (int64_t i = 0; i < L.total; ++i) mean[i] += q[i];
    for (double& m : mean) m /= B;
    for (const auto& q : qat_grads) {
      const std::vector<double> d = segment_sums(L, [&](int64_t i) { return (q[i] - mean[i]) * (q[i] - mean[i]); });
      for (size_t s = 0; s < nseg; ++s) samp[s] += d[s] / (B - 1);
    }
  }

  std::vector<VarianceRecord> out;
  for (size_t ci = 0; ci < configs.size(); ++ci) {
    const VarianceConfig& c = configs[ci];
    const Accum& a = acc[ci];
    double bound_total = 0, wbound_total = 0, inc_total = 0;
    for (size_t s = 0; s < nseg; ++s) {
      VarianceRecord r;
      r.quantizer = c.exact_dgrad ? "none" : traits(c.dgrad.kind).name;
      r.bits = c.exact_dgrad ? 0 : c.dgrad.bits;
      r.dgrad_rows = grad_rows_name(c.dgrad_rows);
      r.wgrad = c.exact_wgrad ? "exact" : traits(c.wgrad.kind).name;
      r.wgrad_bits = c.exact_wgrad ? 0 : c.wgrad.bits;
      r.samples = K;
      r.batches = static_cast<int>(B);
      const bool total = s == nl;
      r.layer = total ? "total" : L.layers[s]->name();
      r.layer_index = total ? -1 : static_cast<int>(s);
      if (total) {
        r.params = L.total;
      } else {
        for (auto [b0, e0] : L.ranges[s]) r.params += e0 - b0;
      }
      r.quant_variance = a.quant_var[s] / B;
      r.quant_variance_batches = a.quant_var_batches[s];
      r.quant_variance_se = standard_error(r.quant_variance_batches);
      r.sampling_variance = samp[s];
      r.ratio = r.sampling_variance > 0 ? r.quant_variance / r.sampling_variance
                                        : std::numeric_limits<double>::infinity();
      r.qat_norm2 = qat_norm2[s] / B;
      const double denom = r.qat_norm2 > 0 ? std::sqrt(r.qat_norm2) : 1.0;
      r.bias = std::sqrt(a.bias2[s] / B) / denom;
      r.bias_noise_floor = std::sqrt(r.quant_variance / K) / denom;
      if (!total) {
        r.bound = a.bound[s] / std::max<int64_t>(a.bound_n, 1);
        r.wgrad_bound = a.wbound[s] / std::max<int64_t>(a.bound_n, 1);
        r.increment = a.increment_n ? a.increment[s] / a.increment_n : -1;
        bound_total += r.bound, wbound_total += r.wgrad_bound, inc_total += std::max(0.0, r.increment);
      } else {
        r.bound = bound_total;
        r.wgrad_bound = wbound_total;
        r.increment = a.increment_n ? inc_total : -1;
      }
      out.push_back(std::move(r));
    }
  }
  return out;
}

std::vector<TrackedVariance> track_variance(Module& model, const Tensor& x, const Tensor& y, const Tensor& dlogits,
                                            const StepContext& ctx, int draws, int splits, float label_smoothing) {
  FQT_CHECK(draws >= 1 && splits >= 2, "track_variance: draws >= 1 and splits >= 2 needed");
  ParamLayout L = layout_of(model);
  const size_t nseg = L.layers.size() + 1;
  RecipeSnapshot recipes(L.layers);
  BufferSnapshot buffers(model);
  std::vector<float> g0, qat, g;
  read_grads(L, g0);  // the training step's gradient: put back at the end

  // Quantization variance on this batch: draws around the QAT gradient (their exact mean).
  for (QuantizedLayer* l : L.layers)
    if (l->recipe().mode == Mode::fqt) l->recipe().mode = Mode::qat;
  backward_into(model, L, dlogits, ctx, qat);
  recipes.restore();
  std::vector<double> qv(nseg, 0.0);
  // An independent stream: the training step's own draws stay untouched.
  const uint64_t seed = ctx.seed ^ 0x5eed5a3b1e0fULL;
  for (int k = 0; k < draws; ++k) {
    const StepContext c{true, seed, ctx.step * static_cast<uint64_t>(draws) + k};
    backward_into(model, L, dlogits, c, g);
    const std::vector<double> d = segment_sums(L, [&](int64_t i) { return (double(g[i]) - qat[i]) * (double(g[i]) - qat[i]); });
    for (size_t s = 0; s < nseg; ++s) qv[s] += d[s] / draws;
  }

  // Sampling variance: QAT gradients of `splits` parts of the batch.
  const int64_t n = x.size(0), part = n / splits;
  std::vector<double> sv(nseg, 0.0);
  if (part >= 1) {
    for (QuantizedLayer* l : L.layers)
      if (l->recipe().mode == Mode::fqt) l->recipe().mode = Mode::qat;
    const int64_t per_x = x.numel() / n;
    std::vector<std::vector<float>> parts(splits);
    SoftmaxCrossEntropy ce;
    for (int s = 0; s < splits; ++s) {
      Shape xs = x.shape();
      xs[0] = part;
      Tensor xp = Tensor::empty(xs), yp = Tensor::empty({part}, DType::i32);
      std::copy(x.data<float>() + s * part * per_x, x.data<float>() + (s + 1) * part * per_x, xp.data<float>());
      std::copy(y.data<int32_t>() + s * part, y.data<int32_t>() + (s + 1) * part, yp.data<int32_t>());
      ce.forward(model.forward(xp, ctx), yp, label_smoothing);
      backward_into(model, L, ce.backward(), ctx, parts[s]);
    }
    std::vector<double> mean(L.total, 0.0);
    for (const auto& p : parts)
      for (int64_t i = 0; i < L.total; ++i) mean[i] += p[i] / static_cast<double>(splits);
    for (const auto& p : parts) {
      const std::vector<double> d = segment_sums(L, [&](int64_t i) { return (p[i] - mean[i]) * (p[i] - mean[i]); });
      for (size_t s = 0; s < nseg; ++s) sv[s] += d[s] / (splits - 1) / splits;
    }
    recipes.restore();
    buffers.restore();
  }
  write_grads(L, g0);

  std::vector<TrackedVariance> out;
  for (size_t s = 0; s < nseg; ++s) {
    TrackedVariance t;
    t.layer = s + 1 == nseg ? "total" : L.layers[s]->name();
    t.quant_variance = qv[s];
    t.sampling_variance = sv[s];
    t.ratio = sv[s] > 0 ? qv[s] / sv[s] : std::numeric_limits<double>::infinity();
    out.push_back(t);
  }
  return out;
}

}  // namespace fqt
