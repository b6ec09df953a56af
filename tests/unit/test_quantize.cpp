// Quantizers: code ranges, bracketing, fast path == reference bit for bit, thread-count and
// seed behaviour, deterministic grids, bad input.
#include "fqt/quant.hpp"
#include "fqt/stats.hpp"
#include "kernels/cpu/round_run.hpp"
#include "quant/grid.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <set>

using namespace fqt;

namespace {
std::vector<QuantizerKind> all_kinds() {
  std::vector<QuantizerKind> k;
  for (const auto& t : quantizer_table()) k.push_back(t.kind);
  return k;
}
bool is_stochastic(QuantizerKind k) { return traits(k).rounding == Rounding::stochastic; }

bool same_codes(const QuantizedTensor& a, const QuantizedTensor& b) {
  return a.codes.numel() == b.codes.numel() &&
         std::memcmp(a.codes.raw(), b.codes.raw(), a.codes.nbytes()) == 0 && a.scale == b.scale && a.lo == b.lo;
}

// Codes, grids and, for BHQ, the same transform (groups, members, scales).
bool same_quantization(const QuantizedTensor& a, const QuantizedTensor& b) {
  if (!same_codes(a, b) || a.transform.has_value() != b.transform.has_value()) return false;
  return !a.transform || (a.transform->offsets == b.transform->offsets && a.transform->members == b.transform->members &&
                          a.transform->row_scale == b.transform->row_scale);
}

// A convolution gradient's shape, and G's pixel rows of x [N, C, H, W]: g[(n P + p), c] = x[n, c, p].
struct Shape4 {
  int64_t n, c, h, w;
};
Tensor pixel_rows(const Tensor& x) {
  const int64_t N = x.size(0), C = x.size(1), P = x.numel() / (N * C);
  Tensor g = Tensor::empty({N * P, C});
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p) g.data<float>()[(n * P + p) * C + c] = x.data<float>()[(n * C + c) * P + p];
  return g;
}

// Grid position of each element before rounding (recomputed from the plan).
std::vector<float> positions(const QuantPlan& p) {
  std::vector<float> v(p.q.rows * p.q.cols);
  const float* s = p.source.data<float>();
  for (int64_t r = 0; r < p.q.rows; ++r)
    for (int64_t c = 0; c < p.q.cols; ++c) {
      int64_t g = p.q.group(r, c), i = r * p.q.cols + c;
      v[i] = (s[i] - p.q.lo[g]) * p.q.scale[g];
    }
  return v;
}
}  // namespace

TEST(Quantize, CodesInRangeAndStochasticBrackets) {
  Tensor x = synthetic_matrix(SynthKind::heavy_tailed, 37, 53, 1);
  for (QuantizerKind k : all_kinds())
    for (int bits = 2; bits <= 8; ++bits) {
      QuantizerSpec spec{k, bits};
      QuantizedTensor q = quantize(x, spec, {5, 9});
      const int B = (1 << bits) - 1;
      const uint8_t* c = q.codes.data<uint8_t>();
      std::vector<float> v = positions(quant_plan(x, spec));
      for (int64_t i = 0; i < q.codes.numel(); ++i) {
        ASSERT_LE(c[i], B) << traits(k).name << " bits " << bits;
        const float vc = std::min(std::max(v[i], 0.0f), static_cast<float>(B));
        if (is_stochastic(k)) {
          // One of the two bracketing grid points: floor(v) or floor(v) + 1 (v clamped).
          ASSERT_TRUE(c[i] == std::floor(vc) || c[i] == std::floor(vc) + 1)
              << traits(k).name << " bits " << bits << " v " << vc << " code " << int(c[i]);
        } else {
          ASSERT_LE(std::fabs(c[i] - vc), 0.5f) << traits(k).name;  // nearest
        }
      }
    }
}

TEST(Quantize, FastPathEqualsReferenceBitForBit) {
  // Awkward shapes: a single row, a single column, sizes not multiples of 4 (Philox blocks).
  // Row lengths 8, 9, 16, 17, 24, 31 cover the vector min/max's blocks of 16 and 8 and its
  // overlapping tail. 300 x 37: BHQ's fused pass takes 110-row chunks, so its second and third
  // chunks start inside a Philox block (element 4070 = 4 * 1017 + 2); 1000 x 37 (37000 values,
  // above kParallelMin) runs every pass on the threads. Rows of 16 take 16 rows per step with
  // AVX-512 (37 x 16: two steps and 5 rows after them; 1000 x 16 on the threads).
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 1},  {1, 7},  {7, 1},  {2, 3},  {3, 2}, {5, 129},
                                                           {64, 33}, {6, 8}, {6, 9}, {5, 16}, {5, 17}, {4, 24},
                                                           {4, 31}, {300, 37}, {1000, 37}, {37, 16}, {1000, 16}};
  for (auto [r, c] : shapes) {
    Tensor x = synthetic_matrix(SynthKind::heavy_tailed, r, c, 3);
    for (QuantizerKind k : all_kinds())
      for (int bits : {2, 3, 5, 8}) {
        QuantizerSpec spec{k, bits};
        EXPECT_TRUE(same_codes(quantize(x, spec, {11, 2}), quantize_ref(x, spec, {11, 2})))
            << traits(k).name << " bits " << bits << " shape " << r << "x" << c;
      }
  }
}

// The vector rounding of a run (kernels::round_run_stochastic: AVX-512, AVX2 and the scalar tail)
// against grid.hpp's round_stochastic for positions no data-derived grid produces: below 0 (to
// -3), exactly on integers, one ulp either side of them, -0, at and above B (to B + 3), with
// uniforms 0, the smallest positive float, 1/2 and the largest below 1. The vector forms floor by
// truncating after the clamp at 0; a floor dropped or a clamp in the wrong order fails here.
TEST(Quantize, StochasticRunRoundingEqualsScalarFormulaEverywhere) {
  for (int bits : {2, 5, 8}) {
    const int B = (1 << bits) - 1;
    std::vector<float> pos;  // grid positions v (lo = 0, scale = 1: s = v exactly)
    for (int k = -3; k <= B + 3; ++k) {
      const float f = static_cast<float>(k);
      pos.insert(pos.end(), {f, std::nextafter(f, -1e9f), std::nextafter(f, 1e9f), f + 0.25f, f - 0.5f});
    }
    pos.push_back(-0.0f);
    const float us[] = {0.0f, std::numeric_limits<float>::denorm_min(), 0.5f, std::nextafter(1.0f, 0.0f)};
    for (float uv : us)
      for (size_t start = 0; start < 3; ++start)  // (shifts the 16- and 8-lane blocks across the values)
        for (const auto& [lo, scale] : {std::pair{0.0f, 1.0f}, std::pair{-1.5f, 0.75f}}) {
          std::vector<float> s, u;
          for (size_t i = start; i < pos.size(); ++i) s.push_back(pos[i] / scale + lo), u.push_back(uv);
          std::vector<uint8_t> out(s.size(), 0xAA);
          kernels::round_run_stochastic(s.data(), u.data(), static_cast<int64_t>(s.size()), lo, scale, B, out.data());
          for (size_t i = 0; i < s.size(); ++i)
            ASSERT_EQ(out[i], quant_detail::round_stochastic(quant_detail::grid_pos(s[i], lo, scale), u[i], B))
                << "bits " << bits << " s " << s[i] << " u " << u[i] << " lo " << lo << " scale " << scale;
        }
  }
}

TEST(Quantize, ThreadCountDoesNotChangeCodesSeedDoes) {
  Tensor x = synthetic_matrix(SynthKind::gaussian, 300, 130, 4);  // 39000 values: above kParallelMin
  const int saved = omp_get_max_threads();
  for (QuantizerKind k : all_kinds()) {
    QuantizerSpec spec{k, 4};
    omp_set_num_threads(1);
    QuantizedTensor one = quantize(x, spec, {1, 0});
    omp_set_num_threads(2);
    QuantizedTensor two = quantize(x, spec, {1, 0});
    EXPECT_TRUE(same_codes(one, two)) << traits(k).name;
    QuantizedTensor other_seed = quantize(x, spec, {2, 0});
    QuantizedTensor other_stream = quantize(x, spec, {1, 1});
    if (is_stochastic(k)) {
      EXPECT_FALSE(same_codes(one, other_seed)) << traits(k).name;
      EXPECT_FALSE(same_codes(one, other_stream)) << traits(k).name;
    } else {
      EXPECT_TRUE(same_codes(one, other_seed)) << traits(k).name << " is deterministic";
    }
  }
  omp_set_num_threads(saved);
}

TEST(Quantize, DeterministicGridsKeepZeroExactAndErrorsBounded) {
  Tensor x = synthetic_matrix(SynthKind::gaussian, 16, 40, 5);
  x.data<float>()[3] = 0.0f;
  for (QuantizerKind k : {QuantizerKind::symmetric, QuantizerKind::symmetric_row, QuantizerKind::zero_aligned})
    for (int bits = 2; bits <= 8; ++bits) {
      Tensor d = dequantize(quantize(x, {k, bits}));
      EXPECT_EQ(d.data<float>()[3], 0.0f) << traits(k).name << " bits " << bits;
    }
  // Nearest rounding error is at most half a step (plus fp32 slack) everywhere.
  for (QuantizerKind k : {QuantizerKind::affine, QuantizerKind::symmetric, QuantizerKind::symmetric_row,
                          QuantizerKind::zero_aligned}) {
    QuantizedTensor q = quantize(x, {k, 8});
    Tensor d = dequantize(q);
    for (int64_t r = 0; r < 16; ++r)
      for (int64_t c = 0; c < 40; ++c) {
        float step = 1.0f / q.scale[q.group(r, c)];
        EXPECT_LE(std::fabs(d.data<float>()[r * 40 + c] - x.data<float>()[r * 40 + c]), 0.5f * step * 1.001f + 1e-6f)
            << traits(k).name;
      }
  }
}

TEST(Quantize, ZeroAlignedGridCoversDataAndGuardsOneSidedRanges) {
  for (auto values : {std::vector<float>{0.5f, 1.0f, 2.0f, 3.0f},       // all positive (authors divide by 0)
                      std::vector<float>{-3.0f, -1.0f, -0.25f, -2.0f},   // all negative
                      std::vector<float>{0.0f, 0.0f, 0.0f, 0.0f},        // all zero
                      std::vector<float>{-0.001f, 5.0f, 2.0f, 1.0f}}) {  // tiny negative side
    Tensor x = Tensor::from<float>({1, 4}, values);
    for (int bits : {2, 4, 8}) {
      QuantizedTensor q = quantize(x, {QuantizerKind::ptq_zero, bits}, {0, 0});
      const float lo = q.lo[0], hi = lo + ((1 << bits) - 1) / q.scale[0];
      EXPECT_TRUE(std::isfinite(q.scale[0]) && q.scale[0] > 0);
      float zero_pos = -lo * q.scale[0];
      EXPECT_NEAR(zero_pos, std::round(zero_pos), 1e-3) << "0 is not on a code";
      for (float v : values) {
        EXPECT_GE(v, lo - 1e-6f);
        EXPECT_LE(v, hi + 1e-5f * std::fabs(hi) + 1e-6f);
      }
    }
  }
}

TEST(Quantize, NonFiniteInputIsAClearError) {
  // The fast path finds non-finite values inside its min/max pass: small (serial, scalar tails)
  // and large (vector lanes, threads) shapes, NaN and both infinities.
  const float inf = std::numeric_limits<float>::infinity();
  struct Case { int64_t rows, cols, r, c; };
  for (const Case& cs : {Case{4, 6, 2, 5}, Case{300, 70, 211, 37}}) {
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), inf, -inf}) {
      Tensor x = synthetic_matrix(SynthKind::gaussian, cs.rows, cs.cols, 1);
      x.data<float>()[cs.r * cs.cols + cs.c] = bad;
      const std::string where = fmt::format("row {}, column {}", cs.r, cs.c);
      for (QuantizerKind k : all_kinds()) {
        try {
          quantize(x, {k, 4}, {0, 0});
          FAIL() << "no error for non-finite input " << bad << ", " << traits(k).name;
        } catch (const NonFiniteError& e) {
          EXPECT_NE(std::string(e.what()).find(where), std::string::npos) << e.what();
        }
        EXPECT_THROW(quantize_ref(x, {k, 4}, {0, 0}), NonFiniteError);
      }
    }
  }
}

// quantize_in_range with the data's exact min and max is quantize(): every kind (those without a
// per-tensor deterministic grid ignore the range), bit widths, shapes above and below the
// parallel threshold, one-sided data (the zero-aligned guard). A non-finite range is the
// non-finite data's error.
TEST(Quantize, InRangeEqualsQuantizeWithTheDataRange) {
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{3, 5}, {128, 784}})
    for (float shift : {0.0f, 5.0f, -5.0f})
      for (QuantizerKind k : all_kinds())
        for (int bits : {2, 5, 8}) {
          Tensor x = synthetic_matrix(SynthKind::gaussian, rows, cols, 7);
          float* p = x.data<float>();
          for (int64_t i = 0; i < x.numel(); ++i) p[i] += shift;
          const float mn = *std::min_element(p, p + x.numel()), mx = *std::max_element(p, p + x.numel());
          const QuantizedTensor a = quantize(x, {k, bits}), b = quantize_in_range(x, {k, bits}, mn, mx);
          EXPECT_TRUE(same_quantization(a, b)) << traits(k).name << " " << bits << " bits, " << rows << "x" << cols
                                               << " shift " << shift;
        }
  for (float v : {0.0f, 7.0f, -3.0f}) {  // constant tensors (a dead ReLU layer: all zeros), mn == mx
    const Tensor c = Tensor::full({30, 40}, v);
    for (QuantizerKind k : {QuantizerKind::zero_aligned, QuantizerKind::affine, QuantizerKind::symmetric})
      EXPECT_TRUE(same_quantization(quantize(c, {k, 8}), quantize_in_range(c, {k, 8}, v, v))) << traits(k).name << " " << v;
  }
  Tensor x = synthetic_matrix(SynthKind::gaussian, 40, 50, 2);
  x.data<float>()[123] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(quantize_in_range(x, {QuantizerKind::zero_aligned, 8}, -1.0f, std::numeric_limits<float>::infinity()),
               NonFiniteError);
  // A non-finite range over finite data is the caller's bug: an error, not codes.
  const Tensor ok = synthetic_matrix(SynthKind::gaussian, 40, 50, 2);
  EXPECT_THROW(quantize_in_range(ok, {QuantizerKind::zero_aligned, 8}, -1.0f, std::numeric_limits<float>::infinity()),
               std::exception);
  EXPECT_THROW(quantize_in_range(ok, {QuantizerKind::zero_aligned, 8}, std::nanf(""), 1.0f), std::exception);
}

// A NaN or Inf anywhere in a row of any length is found by the min/max pass (row granularity:
// per-row ranges of the vector path, its 16- and 8-value blocks and the overlapping tail; BHQ's
// row-range pass, which is also its only finiteness check, alone and with the wgrad draw).
TEST(Quantize, NonFiniteFoundAtEveryPositionOfShortRows) {
  // 40 rows of 16 (the AVX-512 16-row step, then 8 rows alone): every row, every column.
  for (int64_t r = 0; r < 40; ++r)
    for (int64_t c = 0; c < 16; ++c) {
      Tensor x = synthetic_matrix(SynthKind::gaussian, 40, 16, 2);
      x.data<float>()[r * 16 + c] = (r + c) % 2 ? std::numeric_limits<float>::quiet_NaN() : -std::numeric_limits<float>::infinity();
      EXPECT_THROW(quantize(x, {QuantizerKind::psq, 8}, {0, 0}), NonFiniteError) << r << " " << c;
      EXPECT_THROW(quantize(x, {QuantizerKind::bhq, 8}, {0, 0}), NonFiniteError) << r << " " << c;
      EXPECT_THROW(quantize_pair(x, {QuantizerKind::bhq, 8}, {0, 0}, {QuantizerKind::ptq, 8}, {0, 1}), NonFiniteError)
          << r << " " << c;
    }
  for (int64_t cols : {7, 8, 9, 16, 17, 24, 31})
    for (int64_t c = 0; c < cols; ++c)
      for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
        Tensor x = synthetic_matrix(SynthKind::gaussian, 3, cols, 2);
        x.data<float>()[1 * cols + c] = bad;
        for (QuantizerKind k : {QuantizerKind::psq, QuantizerKind::ptq, QuantizerKind::bhq})
          EXPECT_THROW(quantize(x, {k, 8}, {0, 0}), NonFiniteError) << cols << " " << c << " " << traits(k).name;
      }
}

TEST(Quantize, BadSpecsAreRejected) {
  Tensor x = synthetic_matrix(SynthKind::gaussian, 2, 2, 1);
  EXPECT_THROW(quantize(x, {QuantizerKind::psq, 1}), InputError);
  EXPECT_THROW(quantize(x, {QuantizerKind::psq, 9}), InputError);
  EXPECT_THROW(parse_quantizer("pqs"), InputError);
  EXPECT_EQ(parse_quantizer("bhq"), QuantizerKind::bhq);
  EXPECT_THROW(quantize(x.to(DType::f64), {QuantizerKind::psq, 4}), Error);
}

TEST(Quantize, ConstantAndZeroRowsStayFinite) {
  Tensor x = Tensor::zeros({6, 10});
  for (int c = 0; c < 10; ++c) x.data<float>()[10 + c] = 1000.0f;  // a constant row
  for (int c = 0; c < 10; ++c) x.data<float>()[20 + c] = -3.5f;
  for (QuantizerKind k : all_kinds()) {
    Tensor d = dequantize(quantize(x, {k, 4}, {1, 1}));
    for (int64_t i = 0; i < d.numel(); ++i) {
      ASSERT_TRUE(std::isfinite(d.data<float>()[i])) << traits(k).name;
      // Per-row grids: a constant row dequantizes to (almost) its value.
      if (k == QuantizerKind::psq || k == QuantizerKind::symmetric_row) {
        EXPECT_NEAR(d.data<float>()[i], x.data<float>()[i], 1e-3f * std::max(1.0f, std::fabs(x.data<float>()[i])) + 1e-5f)
          << traits(k).name << " element " << i;
      }
    }
  }
}

// quantize_pair (the two gradient draws in one pass) gives, code for code and grid for grid (and
// BHQ transform for transform), what two separate quantize() calls give: every pair of
// quantizers (fused or not), bit widths,
// small and threaded shapes, 1 and 2 threads; without and with X's range given (the one-pass
// form: rows longer than its 4096-value blocks, blocks that split no row, a threaded shape).
// Also equal to the plain-loop reference.
TEST(Quantize, PairEqualsTwoSeparateCalls) {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 7}, {2, 3}, {3, 5}, {129, 16}, {1000, 37}, {3000, 16},
                              {9, 5000}}) {
      const Tensor x = synthetic_matrix(SynthKind::heavy_tailed, rows, cols, 7);
      const auto [lo, hi] = std::minmax_element(x.data<float>(), x.data<float>() + x.numel());
      const float range[2] = {*lo, *hi};
      for (QuantizerKind a : all_kinds()) {
        if (!is_stochastic(a)) continue;
        for (QuantizerKind b : all_kinds()) {
          if (!is_stochastic(b)) continue;
          for (auto [ba, bb] : {std::pair<int, int>{8, 8}, {4, 8}, {2, 5}})
          for (const float* given : {static_cast<const float*>(nullptr), range}) {
            if (given == nullptr && rows * cols > 40000 && !(ba == 8 && bb == 8)) continue;  // (time)
            const RngKey ka{11, 3}, kb{11, 4};
            auto [qa, qb] = quantize_pair(x, {a, ba}, ka, {b, bb}, kb, given);
            const QuantizedTensor ra = quantize(x, {a, ba}, ka), rb = quantize(x, {b, bb}, kb);
            ASSERT_TRUE(same_quantization(qa, ra)) << traits(a).name << ba << "/" << traits(b).name << bb << " " << rows << "x" << cols << (given ? " (range given)" : "");
            ASSERT_TRUE(same_quantization(qb, rb)) << traits(a).name << ba << "/" << traits(b).name << bb << " " << rows << "x" << cols << (given ? " (range given)" : "");
            if (threads == 1 && rows == 129) {
              ASSERT_TRUE(same_codes(qa, quantize_ref(x, {a, ba}, ka))) << traits(a).name;
              ASSERT_TRUE(same_codes(qb, quantize_ref(x, {b, bb}, kb))) << traits(b).name;
            }
          }
        }
      }
    }
  }
  omp_set_num_threads(saved);
  Tensor bad = synthetic_matrix(SynthKind::gaussian, 200, 40, 1);
  bad.data<float>()[150 * 40 + 3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(quantize_pair(bad, {QuantizerKind::psq, 8}, {1, 1}, {QuantizerKind::ptq, 8}, {1, 2}), NonFiniteError);
  EXPECT_THROW(quantize_pair(bad, {QuantizerKind::bhq, 8}, {1, 1}, {QuantizerKind::ptq, 8}, {1, 2}), NonFiniteError);
  // The one-pass form finds a NaN that a given (finite) range does not show, and refuses a
  // non-finite range or one that is not a range.
  const float finite[2] = {-3.0f, 3.0f};
  EXPECT_THROW(quantize_pair(bad, {QuantizerKind::psq, 8}, {1, 1}, {QuantizerKind::ptq, 8}, {1, 2}, finite), NonFiniteError);
  bad.data<float>()[150 * 40 + 3] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(quantize_pair(bad, {QuantizerKind::bhq, 8}, {1, 1}, {QuantizerKind::psq, 8}, {1, 2}), NonFiniteError);
  const float inf[2] = {-3.0f, std::numeric_limits<float>::infinity()};
  EXPECT_THROW(quantize_pair(bad, {QuantizerKind::psq, 8}, {1, 1}, {QuantizerKind::ptq, 8}, {1, 2}, inf), NonFiniteError);
  const Tensor good = synthetic_matrix(SynthKind::gaussian, 200, 40, 1);
  const float reversed[2] = {1.0f, -1.0f};
  EXPECT_THROW(quantize_pair(good, {QuantizerKind::psq, 8}, {1, 1}, {QuantizerKind::ptq, 8}, {1, 2}, reversed), Error);
}

// quantize_pair_nchw (the two draws straight from an N,C,H,W gradient, its rows of G formed block
// by block in cache) against quantize_pair on G's rows laid out by plain loops ([(N*H*W), C]):
// code for code and grid for grid, for the pairs it takes, bit widths, channel counts that split
// the 4096-value blocks unevenly (3, 17), blocks that run across samples (28 x 28 = 784 rows per
// sample against blocks of 256 rows), channel counts of 16, 32, 48, 64 (the channel-major pass)
// with and without a short last run per sample, 1 and 2 threads. Pairs it does not take are
// refused; a NaN or an Inf anywhere throws NonFiniteError.
TEST(Quantize, PairNchwEqualsPairOfRows) {
  // (Channel counts that are multiples of 16 take the channel-major AVX-512 pass; 14 x 14 and
  // 7 x 7 positions end each sample in a short run of 4 and 1.)
  const Shape4 shapes[] = {{1, 1, 1, 1},   {2, 3, 5, 7},   {3, 16, 28, 28}, {5, 17, 9, 9},  {4, 64, 7, 7},
                           {3, 32, 14, 14}, {2, 48, 3, 5}, {1, 16, 1, 1},   {64, 16, 28, 28}};
  const std::pair<QuantizerKind, QuantizerKind> pairs[] = {{QuantizerKind::psq, QuantizerKind::ptq},
                                                           {QuantizerKind::ptq, QuantizerKind::ptq},
                                                           {QuantizerKind::psq, QuantizerKind::psq},
                                                           {QuantizerKind::ptq, QuantizerKind::psq},
                                                           {QuantizerKind::psq, QuantizerKind::ptq_zero}};
  const int saved = omp_get_max_threads();
  uint64_t seed = 40;
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    for (const Shape4& sh : shapes) {
      const int64_t P = sh.h * sh.w, rows = sh.n * P;
      const Tensor flat = synthetic_matrix(SynthKind::heavy_tailed, sh.n * sh.c, P, ++seed);
      const Tensor x = flat.reshape({sh.n, sh.c, sh.h, sh.w});
      const Tensor g = pixel_rows(x);
      for (auto [a, b] : pairs)
        for (auto [ba, bb] : {std::pair<int, int>{8, 8}, {4, 8}, {2, 5}}) {
          if (sh.n == 64 && !(ba == 8 && bb == 8)) continue;  // (time)
          const RngKey ka{11, 3}, kb{11, 4};
          const std::string what = std::string(traits(a).name) + std::to_string(ba) + "/" + traits(b).name +
                                   std::to_string(bb) + " " + std::to_string(sh.n) + "x" + std::to_string(sh.c) + "x" +
                                   std::to_string(sh.h) + "x" + std::to_string(sh.w) + " threads " + std::to_string(threads);
          ASSERT_TRUE(quantize_pair_fuses({a, ba}, {b, bb})) << what;
          auto [qa, qb] = quantize_pair_nchw(x, {a, ba}, ka, {b, bb}, kb);
          auto [ra, rb] = quantize_pair(g, {a, ba}, ka, {b, bb}, kb);
          EXPECT_EQ(qa.rows, rows) << what;
          EXPECT_EQ(qa.cols, sh.c) << what;
          ASSERT_TRUE(same_quantization(qa, ra)) << what;
          ASSERT_TRUE(same_quantization(qb, rb)) << what;
        }
    }
  }
  omp_set_num_threads(saved);
  const Tensor x = synthetic_matrix(SynthKind::gaussian, 2 * 16, 49, 3).reshape({2, 16, 7, 7});
  EXPECT_FALSE(quantize_pair_fuses({QuantizerKind::bhq, 8}, {QuantizerKind::ptq, 8}));
  EXPECT_FALSE(quantize_pair_fuses({QuantizerKind::psq, 8}, {QuantizerKind::column, 8}));
  EXPECT_FALSE(quantize_pair_fuses({QuantizerKind::affine, 8}, {QuantizerKind::ptq, 8}));
  EXPECT_THROW(quantize_pair_nchw(x, {QuantizerKind::bhq, 8}, {1, 1}, {QuantizerKind::ptq, 8}, {1, 2}), Error);
  for (float v : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Tensor bad = x.clone();
    bad.data<float>()[16 * 49 + 5 * 49 + 30] = v;  // sample 1, channel 5
    EXPECT_THROW(quantize_pair_nchw(bad, {QuantizerKind::psq, 8}, {1, 1}, {QuantizerKind::ptq, 8}, {1, 2}), NonFiniteError) << v;
  }
}

// quantize_samples_nchw (a grid per sample, the paper's rows; codes stored as G's pixel rows):
//  * fast path == plain-loop oracle bit for bit (codes, grids, BHQ's transform), on 1 and 2
//    threads, for channel counts that take the AVX-512 per-sample pass (multiples of 16; P with
//    and without a short last run of positions) and those that do not;
//  * the oracle is quantize_ref on [N, C*P] itself: code (n*P + p, c) is its element (n, c*P + p),
//    each sample's grid is repeated on its P rows, the same transform;
//  * dequantize on the pixel rows (T^-1 across samples on [N, P*C]) is the transposed
//    dequantize of [N, C*P], bit for bit;
//  * the second draw equals quantize() of G's rows (fused: per tensor / per row; not fused: per
//    column), with and without the given range;
//  * NaN / Inf anywhere throws NonFiniteError.
TEST(Quantize, SamplesNchwEqualsReferenceAndPerSampleRows) {
  const Shape4 shapes[] = {{4, 16, 5, 5}, {3, 32, 4, 4}, {2, 16, 1, 1}, {5, 3, 3, 3},
                           {1, 16, 7, 7}, {6, 64, 7, 7}, {9, 16, 14, 14}, {4, 17, 2, 3}, {40, 16, 2, 2}};
  const int saved = omp_get_max_threads();
  uint64_t seed = 70;
  std::set<int64_t> group_sizes;  // BHQ's: the fast path has kernels for 2, 3 and 4 members, a loop for more
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    for (const Shape4& sh : shapes) {
      const int64_t P = sh.h * sh.w, D = sh.c * P;
      // Heavy-tailed rows of [N*C, P]: the samples' ranges differ a lot, so BHQ forms real groups.
      const Tensor x = synthetic_matrix(SynthKind::heavy_tailed, sh.n * sh.c, P, ++seed).reshape({sh.n, sh.c, sh.h, sh.w});
      const float* xp = x.data<float>();
      const Tensor g = pixel_rows(x);
      for (QuantizerKind a : {QuantizerKind::psq, QuantizerKind::bhq})
        for (int bits : {2, 5, 8}) {
          const RngKey ka{21, static_cast<uint64_t>(bits)}, kb{21, 100};
          const std::string what = std::string(traits(a).name) + std::to_string(bits) + " " + std::to_string(sh.n) + "x" +
                                   std::to_string(sh.c) + "x" + std::to_string(sh.h) + "x" + std::to_string(sh.w) +
                                   " threads " + std::to_string(threads);
          const QuantizedTensor ref = quantize_samples_nchw_ref(x, {a, bits}, ka);
          const QuantizedTensor flat = quantize_ref(x.reshape({sh.n, D}), {a, bits}, ka);
          ASSERT_EQ(ref.rows, sh.n * P) << what;
          ASSERT_EQ(ref.cols, sh.c) << what;
          for (int64_t n = 0; n < sh.n; ++n)
            for (int64_t p = 0; p < P; ++p) {
              ASSERT_EQ(ref.scale[n * P + p], flat.scale[n]) << what;
              ASSERT_EQ(ref.lo[n * P + p], flat.lo[n]) << what;
              for (int64_t c = 0; c < sh.c; ++c)
                ASSERT_EQ(ref.codes.data<uint8_t>()[(n * P + p) * sh.c + c], flat.codes.data<uint8_t>()[n * D + c * P + p]) << what;
            }
          ASSERT_EQ(ref.transform.has_value(), a == QuantizerKind::bhq) << what;
          if (ref.transform) {
            for (int64_t gi = 0; gi < ref.transform->num_groups(); ++gi) group_sizes.insert(ref.transform->group_size(gi));
            EXPECT_EQ(ref.rows_per_transform_row(), P) << what;
            EXPECT_EQ(ref.transform->members, flat.transform->members) << what;
            EXPECT_EQ(ref.transform->row_scale, flat.transform->row_scale) << what;
          }
          // Dequantized: the same values, transposed.
          const Tensor dv = dequantize(ref), fv = dequantize(flat);
          for (int64_t n = 0; n < sh.n; ++n)
            for (int64_t p = 0; p < P; ++p)
              for (int64_t c = 0; c < sh.c; ++c) {
                const float u = dv.data<float>()[(n * P + p) * sh.c + c], v = fv.data<float>()[n * D + c * P + p];
                ASSERT_EQ(std::bit_cast<uint32_t>(u), std::bit_cast<uint32_t>(v)) << what << " n " << n << " p " << p << " c " << c;
              }
          // Fast path, alone and with a second draw of each kind; with the samples' ranges given.
          ASSERT_TRUE(same_quantization(quantize_samples_nchw(x, {a, bits}, ka).first, ref)) << what;
          std::vector<float> slo(sh.n), shi(sh.n);
          for (int64_t n = 0; n < sh.n; ++n)
            slo[n] = *std::min_element(xp + n * D, xp + (n + 1) * D), shi[n] = *std::max_element(xp + n * D, xp + (n + 1) * D);
          ASSERT_TRUE(same_quantization(quantize_samples_nchw(x, {a, bits}, ka, nullptr, {}, nullptr, slo.data(), shi.data()).first, ref))
              << what << " (sample ranges given)";
          for (QuantizerKind b : {QuantizerKind::ptq, QuantizerKind::psq, QuantizerKind::column})
            for (bool given : {false, true}) {
              if (given && b != QuantizerKind::ptq) continue;
              float range[2] = {std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
              for (int64_t i = 0; i < x.numel(); ++i) range[0] = std::min(range[0], xp[i]), range[1] = std::max(range[1], xp[i]);
              const QuantizerSpec sb{b, 8};
              auto [qa, qb] = quantize_samples_nchw(x, {a, bits}, ka, &sb, kb, given ? range : nullptr);
              ASSERT_TRUE(same_quantization(qa, ref)) << what << " with " << traits(b).name;
              ASSERT_TRUE(same_quantization(qb, quantize_ref(g, sb, kb))) << what << " second draw " << traits(b).name;
              auto [sa2, sb2] = quantize_samples_nchw(x, {a, bits}, ka, &sb, kb, given ? range : nullptr, slo.data(), shi.data());
              ASSERT_TRUE(same_quantization(sa2, ref)) << what << " with " << traits(b).name << ", sample ranges given";
              ASSERT_TRUE(same_quantization(sb2, qb)) << what << " second draw " << traits(b).name << ", sample ranges given";
            }
        }
    }
  }
  omp_set_num_threads(saved);
  for (int64_t n : {2, 3, 4}) EXPECT_TRUE(group_sizes.count(n)) << "no BHQ group of " << n << " samples";
  EXPECT_GT(*group_sizes.rbegin(), 4) << "no BHQ group of more than 4 samples";
  const Tensor x = synthetic_matrix(SynthKind::gaussian, 2 * 16, 49, 3).reshape({2, 16, 7, 7});
  EXPECT_THROW(quantize_samples_nchw(x, {QuantizerKind::ptq, 8}, {1, 1}), Error);     // no grid per row
  EXPECT_THROW(quantize_samples_nchw(x, {QuantizerKind::column, 8}, {1, 1}), Error);  // per column
  EXPECT_THROW(quantize_samples_nchw(x, {QuantizerKind::psq, 9}, {1, 1}), Error);     // bits
  const QuantizerSpec ptq{QuantizerKind::ptq, 8};
  for (QuantizerKind a : {QuantizerKind::psq, QuantizerKind::bhq})
    for (float v : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()})
      for (int64_t at : {int64_t{5}, int64_t{16 * 49 + 5 * 49 + 30}, int64_t{2 * 16 * 49 - 1}}) {
        Tensor bad = x.clone();
        bad.data<float>()[at] = v;
        EXPECT_THROW(quantize_samples_nchw(bad, {a, 8}, {1, 1}), NonFiniteError) << traits(a).name << " " << v << " at " << at;
        EXPECT_THROW(quantize_samples_nchw(bad, {a, 8}, {1, 1}, &ptq, {1, 2}), NonFiniteError) << traits(a).name << " " << v;
      }
}

// The per-sample quantizer's given ranges are used only when they can be a writer's exact ranges
// (finite, lo <= hi); otherwise it takes them from x, so a NaN range changes nothing and a NaN in
// x is still found. And BHQ's T x overflowing float for a finite x throws NonFiniteError in both
// fast quantizers instead of rounding on a non-finite grid.
TEST(Quantize, SamplesNchwGivenRangesCheckedAndTransformOverflowThrows) {
  const Tensor x = synthetic_matrix(SynthKind::gaussian, 4 * 16, 16, 8).reshape({4, 16, 4, 4});
  const int64_t D = 16 * 16;
  for (QuantizerKind a : {QuantizerKind::psq, QuantizerKind::bhq}) {
    const QuantizedTensor ref = quantize_samples_nchw_ref(x, {a, 8}, {3, 4});
    std::vector<float> slo(4, -1.0f), shi(4, 1.0f);
    slo[2] = std::numeric_limits<float>::quiet_NaN();
    EXPECT_TRUE(same_quantization(quantize_samples_nchw(x, {a, 8}, {3, 4}, nullptr, {}, nullptr, slo.data(), shi.data()).first, ref))
        << traits(a).name << ": a NaN range is not used";
    slo[2] = 2.0f;  // lo > hi
    EXPECT_TRUE(same_quantization(quantize_samples_nchw(x, {a, 8}, {3, 4}, nullptr, {}, nullptr, slo.data(), shi.data()).first, ref))
        << traits(a).name << ": an empty range is not used";
    Tensor bad = x.clone();
    bad.data<float>()[2 * D + 7] = std::numeric_limits<float>::quiet_NaN();
    slo[2] = std::numeric_limits<float>::infinity();
    EXPECT_THROW(quantize_samples_nchw(bad, {a, 8}, {3, 4}, nullptr, {}, nullptr, slo.data(), shi.data()), NonFiniteError)
        << traits(a).name;
  }
  // Sample 0 / row 0: 3.3e38 everywhere (finite; its range 1e-8, BHQ's floor): its row scale is
  // 1.046 and its group's Householder mixes it into every row, so T x exceeds float's 3.4e38 (the
  // reference rounds such rows on NaN grids).
  Tensor huge = x.clone();
  float* hp = huge.data<float>();
  for (int64_t i = 0; i < D; ++i) hp[i] = 3.3e38f;
  EXPECT_THROW(quantize_samples_nchw(huge, {QuantizerKind::bhq, 8}, {3, 4}), NonFiniteError);
  Tensor rows = huge.reshape({4, D}).clone();
  EXPECT_THROW(quantize(rows, {QuantizerKind::bhq, 8}, {3, 4}), NonFiniteError);
}

// make_grids (the batched per-row / per-column grids of the fast quantizers: 8 at a time on
// AVX-512) gives make_grid's grid bit for bit for every group: ranges of all magnitudes and
// signs, single values, empty groups (min > max) and NaN ends, every affine kind and bit width,
// and counts that leave a tail after the 8-wide steps.
TEST(makeGrids, EqualMakeGridForEveryGroup) {
  std::vector<double> mn, mx;
  uint64_t s = 12345;
  auto next = [&] { return (s = s * 6364136223846793005ull + 1442695040888963407ull) >> 11; };
  for (int i = 0; i < 4000; ++i) {
    const double e = std::ldexp(1.0, static_cast<int>(next() % 60) - 40);  // 2^-40 .. 2^19
    const double a = (static_cast<double>(next() % 2000001) / 1e6 - 1.0) * e;
    const double w = static_cast<double>(next() % 1000001) / 1e6 * e;
    switch (i % 11) {
      case 0: mn.push_back(a), mx.push_back(a); break;                  // one value
      case 1: mn.push_back(a + w + 1.0), mx.push_back(a); break;        // empty: min > max
      case 2: mn.push_back(std::nan("")), mx.push_back(a); break;       // NaN end
      case 3: mn.push_back(static_cast<float>(a)), mx.push_back(static_cast<float>(a + w)); break;  // fp32 ends
      default: mn.push_back(a), mx.push_back(a + w);
    }
  }
  for (QuantizerKind kind : {QuantizerKind::ptq, QuantizerKind::psq, QuantizerKind::column, QuantizerKind::bhq,
                             QuantizerKind::affine, QuantizerKind::symmetric, QuantizerKind::zero_aligned})
    for (int bits = 2; bits <= 8; ++bits)
      for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{8}, int64_t{263}, static_cast<int64_t>(mn.size())}) {
        std::vector<float> scale(static_cast<size_t>(n)), lo(static_cast<size_t>(n));
        quant_detail::make_grids({kind, bits}, mn.data(), mx.data(), n, scale.data(), lo.data());
        for (int64_t g = 0; g < n; ++g) {
          const bool full = mn[g] <= mx[g];
          const quant_detail::Grid ref = quant_detail::make_grid(kind, full ? mn[g] : 0.0, full ? mx[g] : 0.0, bits);
          ASSERT_EQ(std::bit_cast<uint32_t>(scale[g]), std::bit_cast<uint32_t>(ref.scale))
              << traits(kind).name << bits << " group " << g << " [" << mn[g] << ", " << mx[g] << "]";
          ASSERT_EQ(std::bit_cast<uint32_t>(lo[g]), std::bit_cast<uint32_t>(ref.lo))
              << traits(kind).name << bits << " group " << g << " [" << mn[g] << ", " << mx[g] << "]";
        }
      }
}
