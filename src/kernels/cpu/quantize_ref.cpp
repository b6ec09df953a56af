// Reference quantizers: plain single-threaded loops, written to be read against SPEC section 2.
// The oracle for the fast path (quantize.cpp) and for the CUDA kernels: codes must match bit
// for bit.
#include "quant/grid.hpp"

#include <limits>

namespace fqt {
using namespace quant_detail;

namespace {
// Per-group min/max of a [rows, cols] matrix, in plain loops.
void group_minmax_ref(const float* x, int64_t rows, int64_t cols, Granularity g,
                      std::vector<double>& mn, std::vector<double>& mx) {
  int64_t groups = num_groups(g, rows, cols);
  mn.assign(groups, std::numeric_limits<double>::infinity());
  mx.assign(groups, -std::numeric_limits<double>::infinity());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      int64_t gi = g == Granularity::tensor ? 0 : g == Granularity::row ? r : c;
      double v = x[r * cols + c];
      mn[gi] = std::min(mn[gi], v);
      mx[gi] = std::max(mx[gi], v);
    }
}
}  // namespace

QuantPlan quant_plan(const Tensor& x_in, QuantizerSpec spec) {
  check_spec(spec);
  Tensor x = as_matrix(x_in);
  check_finite(x, "quantizer input");
  const int64_t rows = x.size(0), cols = x.size(1);
  Tensor source = x;
  std::optional<BhqTransform> transform;
  if (spec.kind == QuantizerKind::bhq) {
    transform = bhq_transform(x.data<float>(), rows, cols);
    source = Tensor::empty({rows, cols});
    transform->apply(x.data<float>(), source.data<float>(), cols);
  }
  std::vector<double> mn, mx;
  group_minmax_ref(source.data<float>(), rows, cols, traits(spec.kind).granularity, mn, mx);
  QuantPlan plan{make_header(spec, rows, cols, mn.data(), mx.data()), source};
  plan.q.transform = std::move(transform);
  return plan;
}

QuantizedTensor quantize_ref(const Tensor& x, QuantizerSpec spec, RngKey key) {
  QuantPlan plan = quant_plan(x, spec);
  QuantizedTensor q = std::move(plan.q);
  const int64_t rows = q.rows, cols = q.cols;
  const int B = q.max_code();
  const bool stochastic = traits(spec.kind).rounding == Rounding::stochastic;
  q.codes = Tensor::empty({rows, cols}, DType::u8);
  uint8_t* codes = q.codes.data<uint8_t>();
  const float* src = plan.source.data<float>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      const int64_t gi = q.group(r, c);
      const float v = grid_pos(src[i], q.lo[gi], q.scale[gi]);
      codes[i] = stochastic ? round_stochastic(v, uniform_at(key, static_cast<uint64_t>(i)), B)
                            : round_nearest(v, B);
    }
  return q;
}

QuantizedTensor quantize_samples_nchw_ref(const Tensor& x, QuantizerSpec a, RngKey ka) {
  FQT_CHECK(x.dim() >= 2 && x.dtype() == DType::f32, "quantize_samples_nchw_ref: input {} is not an N,C,... f32 tensor",
            shape_str(x.shape()));
  FQT_CHECK(traits(a.kind).granularity == Granularity::row, "quantize_samples_nchw_ref: {} has no grid per row",
            traits(a.kind).name);
  const int64_t N = x.size(0), C = x.size(1), P = N * C > 0 ? x.numel() / (N * C) : 0;
  return samples_as_pixel_rows(quantize_ref(x.reshape({N, C * P}), a, ka), N, C, P);
}

}  // namespace fqt
