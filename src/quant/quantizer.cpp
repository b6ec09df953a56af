// The quantizer table, spec validation, headers and dequantization.
#include "fqt/profile.hpp"
#include "quant/grid.hpp"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fqt {

const std::vector<QuantizerTraits>& quantizer_table() {
  static const std::vector<QuantizerTraits> table = {
      {QuantizerKind::affine, "affine", Granularity::tensor, Rounding::nearest,
       "per-tensor min/max grid, nearest rounding (activations)"},
      {QuantizerKind::symmetric, "symmetric", Granularity::tensor, Rounding::nearest,
       "per-tensor symmetric grid, nearest rounding"},
      {QuantizerKind::symmetric_row, "symmetric-row", Granularity::row, Rounding::nearest,
       "symmetric grid per row / output channel, nearest rounding (weights)"},
      {QuantizerKind::zero_aligned, "zero-aligned", Granularity::tensor, Rounding::nearest,
       "per-tensor grid with 0 on a code, nearest rounding (the paper's weights)"},
      {QuantizerKind::ptq, "ptq", Granularity::tensor, Rounding::stochastic,
       "per-tensor, stochastic rounding"},
      {QuantizerKind::ptq_zero, "ptq-zero", Granularity::tensor, Rounding::stochastic,
       "per-tensor zero-aligned grid, stochastic rounding"},
      {QuantizerKind::psq, "psq", Granularity::row, Rounding::stochastic,
       "per-sample (one grid per row), stochastic rounding"},
      {QuantizerKind::column, "column", Granularity::column, Rounding::stochastic,
       "per-column (one grid per column), stochastic rounding (wgrad)"},
      {QuantizerKind::bhq, "bhq", Granularity::row, Rounding::stochastic,
       "block Householder transform, then per row, stochastic rounding"},
  };
  return table;
}

const QuantizerTraits& traits(QuantizerKind kind) {
  for (const auto& t : quantizer_table())
    if (t.kind == kind) return t;
  FQT_CHECK(false, "unknown quantizer kind {}", static_cast<int>(kind));
  __builtin_unreachable();
}

QuantizerKind parse_quantizer(const std::string& name) {
  std::string names;
  for (const auto& t : quantizer_table()) {
    if (name == t.name) return t.kind;
    names += (names.empty() ? "" : ", ") + std::string(t.name);
  }
  throw InputError(fmt::format("unknown quantizer '{}' (valid: {})", name, names));
}

void check_finite(const Tensor& x, const char* what) {
  FQT_CHECK(x.dtype() == DType::f32, "check_finite expects f32");
  const float* p = x.data<float>();
  const int64_t n = x.numel();
  // NaN and Inf are the values whose exponent bits are all ones: an integer OR-reduction that
  // vectorizes (a float sum would be a serial dependency chain under strict fp semantics).
  const auto* bits = reinterpret_cast<const uint32_t*>(p);
  uint32_t bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static) if (n > quant_detail::kParallelMin)
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<uint32_t>((bits[i] & 0x7f800000u) == 0x7f800000u);
  if (!bad) return;
  int64_t cols = x.dim() >= 2 ? x.numel() / x.size(0) : 1;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i]))
      throw NonFiniteError(fmt::format("{} contains {} at row {}, column {} (shape {})", what,
                                       std::isnan(p[i]) ? "NaN" : "Inf", i / cols, i % cols,
                                       shape_str(x.shape())));
}

void set_num_threads(int n) {
  static const int initial = omp_get_max_threads();  // what 0 restores (read before any change)
  FQT_INPUT_CHECK(n >= 0 && n <= kMaxThreads, "--threads must be in 0..{} (0 = all cores), got {}", kMaxThreads, n);
  omp_set_num_threads(n > 0 ? n : initial);
}
int num_threads() { return omp_get_max_threads(); }

Tensor dequantize(const QuantizedTensor& q) {
  profile::Scope timer(profile::dequantize);
  using namespace quant_detail;
  Tensor out = Tensor::empty({q.rows, q.cols});
  float* o = out.data<float>();
  const uint8_t* c = q.codes.data<uint8_t>();
  const Granularity g = q.granularity();
#pragma omp parallel for schedule(static) if (q.rows * q.cols > kParallelMin)
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t j = 0; j < q.cols; ++j) {
      int64_t gi = g == Granularity::tensor ? 0 : g == Granularity::row ? r : j;
      o[r * q.cols + j] = dequant_value(c[r * q.cols + j], q.scale[gi], q.lo[gi]);
    }
  if (q.transform) {
    Tensor back = Tensor::empty({q.rows, q.cols});
    q.transform->apply_inverse(o, back.data<float>(), q.cols * q.rows_per_transform_row());
    return back;
  }
  return out;
}

namespace quant_detail {

QuantizedTensor samples_as_pixel_rows(QuantizedTensor q, int64_t N, int64_t C, int64_t P) {
  FQT_CHECK(q.rows == N && q.cols == C * P && q.granularity() == Granularity::row,
            "samples_as_pixel_rows: [{}, {}] codes with a grid per row for N {}, C {}, P {}", q.rows, q.cols, N, C, P);
  QuantizedTensor out;
  out.spec = q.spec, out.rows = N * P, out.cols = C;
  out.codes = Tensor::empty({N * P, C}, DType::u8);
  out.scale.resize(static_cast<size_t>(N * P)), out.lo.resize(static_cast<size_t>(N * P));
  const uint8_t* src = q.codes.data<uint8_t>();
  uint8_t* dst = out.codes.data<uint8_t>();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = 0; c < C; ++c) dst[(n * P + p) * C + c] = src[n * C * P + c * P + p];
    std::fill_n(out.scale.begin() + n * P, P, q.scale[n]);
    std::fill_n(out.lo.begin() + n * P, P, q.lo[n]);
  }
  out.transform = std::move(q.transform);
  return out;
}

void check_spec(QuantizerSpec spec) {
  FQT_INPUT_CHECK(spec.bits >= 2 && spec.bits <= 8, "bit width {} is out of range: fqt supports 2 to 8 bits",
                  spec.bits);
  (void)traits(spec.kind);
}

Tensor as_matrix(const Tensor& x) {
  FQT_CHECK(x.defined(), "quantize: undefined tensor");
  FQT_CHECK(x.dtype() == DType::f32, "quantize expects an f32 tensor, got {}", dtype_name(x.dtype()));
  FQT_CHECK(x.dim() >= 1, "quantize expects a tensor of rank >= 1");
  int64_t rows = x.size(0);
  int64_t cols = rows ? x.numel() / rows : 0;
  return x.reshape({rows, cols});
}

void make_grids(QuantizerSpec spec, const double* mn, const double* mx, int64_t n, float* scale, float* lo) {
  const QuantizerKind kind = spec.kind;
  const bool affine = affine_grid_kind(kind);
  const double B = max_code(spec.bits);
  const float Bf = static_cast<float>(B);
  for (int64_t g0 = 0; g0 < n; g0 += 256) {
    const int64_t g1 = std::min(n, g0 + 256);
    // Affine grids (SPEC section 2) 8 at a time with make_grid's coverage fix (affine_grids8);
    // in the scalar tail, a grid that fails the check (an ulp short after rounding to fp32) is
    // made again by make_grid itself below, so every grid is make_grid's. Bit g - g0 of `redo`:
    // group g needs make_grid (every group of the other kinds). (The per-row grids of PSQ:
    // ~10^5 per conv gradient; make_grid's scalar loop was 1.3% of the step in perf, session 9;
    // this loop, scalar, a division and a branch per grid, and a branch per grid over a byte
    // array of redo flags, ~1%, session 15.)
    uint64_t redo[4] = {~uint64_t{0}, ~uint64_t{0}, ~uint64_t{0}, ~uint64_t{0}};
    if (affine) {
      std::fill(redo, redo + 4, uint64_t{0});
      int64_t g = g0;
#if defined(__AVX512F__) && defined(__AVX512VL__)
      for (; g + 8 <= g1; g += 8) affine_grids8(_mm512_loadu_pd(mn + g), _mm512_loadu_pd(mx + g), spec.bits, scale + g, lo + g);
#endif
      for (; g < g1; ++g) {
        const bool empty = !(mn[g] <= mx[g]);
        const double a = empty ? 0.0 : mn[g], b = empty ? 0.0 : mx[g];
        const double l = a - 1e-8, h = b + 1e-8;
        const float sc = static_cast<float>(B / (h - l)), lf = static_cast<float>(l);
        scale[g] = sc, lo[g] = lf;
        const bool bad = !((static_cast<float>(a) - lf) * sc >= 0.0f && (static_cast<float>(b) - lf) * sc <= Bf);
        redo[(g - g0) >> 6] |= static_cast<uint64_t>(bad) << ((g - g0) & 63);
      }
    }
    for (int w = 0; w < 4; ++w)
      for (uint64_t bits = redo[w]; bits; bits &= bits - 1) {
        const int64_t g = g0 + 64 * w + std::countr_zero(bits);
        if (g >= g1) break;
        // An empty group (0 rows or 0 columns) has min > max: give it a harmless grid.
        double a = mn[g] <= mx[g] ? mn[g] : 0.0, b = mn[g] <= mx[g] ? mx[g] : 0.0;
        Grid grid = make_grid(kind, a, b, spec.bits);
        scale[g] = grid.scale;
        lo[g] = grid.lo;
      }
  }
}

QuantizedTensor make_header(QuantizerSpec spec, int64_t rows, int64_t cols, const double* mn,
                            const double* mx) {
  QuantizedTensor q;
  q.spec = spec;
  q.rows = rows;
  q.cols = cols;
  int64_t groups = num_groups(traits(spec.kind).granularity, rows, cols);
  q.scale.resize(groups);
  q.lo.resize(groups);
  // One grid per row for the per-sample quantizers: ~10^5 grids for a conv layer's gradient
  // (a serial loop was half of PSQ's quantizer time on 2 threads).
#pragma omp parallel for schedule(static) if (groups > 4096)
  for (int64_t g0 = 0; g0 < groups; g0 += 256)
    make_grids(spec, mn + g0, mx + g0, std::min<int64_t>(256, groups - g0), q.scale.data() + g0, q.lo.data() + g0);
  return q;
}

}  // namespace quant_detail
}  // namespace fqt
