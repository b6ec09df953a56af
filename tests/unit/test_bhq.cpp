// BHQ transform: exact inverse, group structure per SPEC section 2, degenerate inputs.
#include "fqt/quant.hpp"
#include "fqt/stats.hpp"
#include "kernels/cpu/bhq_fast.hpp"
#include "quant/grid.hpp"

#include <gtest/gtest.h>

#include <bit>
#include <limits>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <set>
#include <tuple>

using namespace fqt;

namespace {
// Independent re-statement of SPEC section 2 steps 1-3: the groups BHQ must form.
std::vector<std::vector<int64_t>> spec_groups(const Tensor& x) {
  const int64_t N = x.size(0), D = x.size(1);
  const float* p = x.data<float>();
  std::vector<double> m(N);
  for (int64_t i = 0; i < N; ++i) {
    auto [mn, mx] = std::minmax_element(p + i * D, p + (i + 1) * D);
    m[i] = double(*mx) - double(*mn) + 1e-8;
  }
  std::vector<int64_t> rank(N);
  std::iota(rank.begin(), rank.end(), 0);
  std::stable_sort(rank.begin(), rank.end(), [&](int64_t a, int64_t b) { return m[a] > m[b]; });
  int64_t G = 0;
  for (;; ++G) {
    double sum = 0;
    for (int64_t k = 0; k < N - G; ++k) sum += m[rank[k]];
    if (G * m[rank[N - G - 1]] / sum > 1) break;
  }
  const int64_t NL = N - G;
  double total = 0;
  for (int64_t k = 0; k < NL; ++k) total += m[rank[k]];
  std::vector<std::vector<int64_t>> groups;
  double cum = 0;
  int64_t prev = 0;
  for (int64_t i = 0; i < NL; ++i) {
    cum += G * m[rank[i]] / total;
    int64_t num = i == NL - 1 ? G : static_cast<int64_t>(std::round(cum));
    std::vector<int64_t> g{rank[i]};
    for (int64_t k = NL + prev; k < NL + num; ++k) g.push_back(rank[k]);
    groups.push_back(g);
    prev = num;
  }
  return groups;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  double d = 0;
  for (int64_t i = 0; i < a.numel(); ++i) d = std::max(d, double(std::fabs(a.data<float>()[i] - b.data<float>()[i])));
  return d;
}
}  // namespace

TEST(Bhq, InverseUndoesTransform) {
  for (SynthKind kind : {SynthKind::heavy_tailed, SynthKind::gaussian}) {
    Tensor x = synthetic_matrix(kind, 128, 64, 7);
    BhqTransform t = bhq_transform(x.data<float>(), 128, 64);
    Tensor y = Tensor::empty({128, 64}), back = Tensor::empty({128, 64});
    t.apply(x.data<float>(), y.data<float>(), 64);
    t.apply_inverse(y.data<float>(), back.data<float>(), 64);
    // T^-1 T = I in fp32: relative to each row's magnitude, within 1e-5.
    for (int64_t r = 0; r < 128; ++r) {
      double amax = 0, err = 0;
      for (int64_t c = 0; c < 64; ++c) {
        amax = std::max(amax, double(std::fabs(x.data<float>()[r * 64 + c])));
        err = std::max(err, double(std::fabs(back.data<float>()[r * 64 + c] - x.data<float>()[r * 64 + c])));
      }
      EXPECT_LE(err, 1e-5 * std::max(amax, 1.0)) << "row " << r;
    }
    // And T T^-1 = I on an arbitrary matrix.
    Tensor z = synthetic_matrix(SynthKind::gaussian, 128, 64, 8);
    t.apply_inverse(z.data<float>(), y.data<float>(), 64);
    t.apply(y.data<float>(), back.data<float>(), 64);
    EXPECT_LE(max_abs_diff(back, z), 1e-5 * 5);  // |z| <= ~5 for 8192 N(0,1) draws
  }
}

// The in-place T^-1 of the per-sample dgrad, one group at a time as the dgrad calls it, equals
// apply_inverse bit for bit whatever order the groups come in (threads take them in any order):
// widths around the 512-column block, groups of 1 to many rows, apply_inverse on 1 and 2 threads.
TEST(Bhq, InPlaceInverseEqualsApplyInverse) {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{1, 7}, {2, 512}, {3, 513}, {17, 1000}, {128, 1568}}) {
      const Tensor x = synthetic_matrix(SynthKind::heavy_tailed, rows, cols, 9);
      const BhqTransform t = bhq_transform(x.data<float>(), rows, cols);
      const Tensor y = synthetic_matrix(SynthKind::gaussian, rows, cols, 10);
      Tensor want = Tensor::empty({rows, cols});
      t.apply_inverse(y.data<float>(), want.data<float>(), cols);
      Tensor a = y.clone(), b = y.clone();
      std::vector<float> dot(static_cast<size_t>(kernels::kInverseBlock));
      for (int64_t g = 0; g < t.num_groups(); ++g) kernels::bhq_apply_inverse_group(t, g, a.data<float>(), cols, dot.data());
      for (int64_t g = t.num_groups() - 1; g >= 0; --g) kernels::bhq_apply_inverse_group(t, g, b.data<float>(), cols, dot.data());
      EXPECT_EQ(std::memcmp(a.raw(), want.raw(), want.nbytes()), 0) << rows << "x" << cols << " threads " << threads;
      EXPECT_EQ(std::memcmp(b.raw(), want.raw(), want.nbytes()), 0) << rows << "x" << cols << " groups in reverse order";
    }
  }
  omp_set_num_threads(saved);
}

TEST(Bhq, GroupsFollowSpecAllocation) {
  // Heavy-tailed rows (few large rows) and gaussian ones (about half the rows lead a group: the
  // split point G far from either end, where bhq_transform's bisection must land on the same G
  // as the linear scan restated in spec_groups).
  for (auto [kind, seed, n] : std::vector<std::tuple<SynthKind, uint64_t, int64_t>>{
           {SynthKind::heavy_tailed, 1, 3},    {SynthKind::heavy_tailed, 1, 4}, {SynthKind::heavy_tailed, 1, 17},
           {SynthKind::heavy_tailed, 1, 128},  {SynthKind::heavy_tailed, 2, 3}, {SynthKind::heavy_tailed, 2, 17},
           {SynthKind::heavy_tailed, 3, 128},  {SynthKind::gaussian, 1, 5},     {SynthKind::gaussian, 2, 129},
           {SynthKind::heavy_tailed, 4, 2000}, {SynthKind::gaussian, 3, 2000}}) {
    {
      Tensor x = synthetic_matrix(kind, n, 50, seed);
      BhqTransform t = bhq_transform(x.data<float>(), n, 50);
      auto want = spec_groups(x);
      ASSERT_EQ(t.num_groups(), static_cast<int64_t>(want.size())) << "N=" << n;
      std::set<int64_t> seen;
      for (int64_t g = 0; g < t.num_groups(); ++g) {
        EXPECT_GE(t.group_size(g), 2) << "every group has a large row and at least one small row";
        std::vector<int64_t> got(t.members.begin() + t.offsets[g], t.members.begin() + t.offsets[g + 1]);
        EXPECT_EQ(got, want[g]) << "group " << g << " N=" << n;
        seen.insert(got.begin(), got.end());
      }
      EXPECT_EQ(static_cast<int64_t>(seen.size()), n) << "every row in exactly one group";
    }
  }
}

TEST(Bhq, RowScalesMinimiseTheBound) {
  // s1 = w1^(-1/3), s2 = (w2/(n-1))^(-1/3) with w1 = lambda1/sqrt(n), w2 = lambda2 Qmax(n).
  Tensor x = synthetic_matrix(SynthKind::heavy_tailed, 32, 40, 4);
  BhqTransform t = bhq_transform(x.data<float>(), 32, 40);
  auto range = [&](int64_t r) {
    auto [mn, mx] = std::minmax_element(x.data<float>() + r * 40, x.data<float>() + (r + 1) * 40);
    return double(*mx) - double(*mn) + 1e-8;
  };
  for (int64_t g = 0; g < t.num_groups(); ++g) {
    const int64_t n = t.group_size(g), large = t.members[t.offsets[g]], small = t.members[t.offsets[g] + 1];
    double lambda2 = 0;
    for (int64_t k = 1; k < n; ++k) lambda2 = std::max(lambda2, range(t.members[t.offsets[g] + k]));
    EXPECT_NEAR(t.row_scale[large], std::pow(range(large) / std::sqrt(double(n)), -1.0 / 3), 1e-5 * t.row_scale[large]);
    EXPECT_NEAR(t.row_scale[small], std::pow(lambda2 * householder_qmax(n) / (n - 1), -1.0 / 3),
                1e-5 * t.row_scale[small]);
  }
}

TEST(Bhq, InverseCubeRootEqualsPow) {
  // The row scales' w^(-1/3) (Newton steps from a bit guess, quant_detail::bhq_inv_cbrt) is the
  // float that (float)pow(w, -1/3.) gives, bit for bit: a geometric sweep of 400001 values over
  // 10^-30 .. 10^30 (ratio ~1.00035 between neighbours), each also nudged one double ulp either
  // way, plus the edges of the Newton range and values outside it (pow itself).
  auto want = [](double w) { return static_cast<float>(std::pow(w, -1.0 / 3.0)); };
  for (int64_t i = 0; i <= 400000; ++i) {
    const double w = std::pow(10.0, -30.0 + 60.0 * static_cast<double>(i) / 400000.0);
    for (double v : {w, std::nextafter(w, 0.0), std::nextafter(w, 1e300)})
      ASSERT_EQ(quant_detail::bhq_inv_cbrt(v), want(v)) << "w = " << v;
  }
  for (double v : {1e-30, 1e30, 1e-31, 1e31, 1e-300, 1e300, 1.0, 8.0, 0.125, 27.0})
    EXPECT_EQ(quant_detail::bhq_inv_cbrt(v), want(v)) << "w = " << v;
  EXPECT_EQ(quant_detail::bhq_inv_cbrt(8.0), 0.5f);
}

TEST(Bhq, BatchedInverseCubeRootEqualsScalar) {
  // bhq_inv_cbrt_batch (8 lanes at a time where the CPU has AVX-512) against bhq_inv_cbrt, bit
  // for bit: the geometric sweep above with its ulp neighbours, in an order that puts values
  // outside the Newton range (and NaN, infinities, 0, negatives) inside vectors and tails.
  std::vector<double> w;
  for (int64_t i = 0; i <= 200000; ++i) {
    const double x = std::pow(10.0, -31.0 + 62.0 * static_cast<double>(i) / 200000.0);
    w.insert(w.end(), {x, std::nextafter(x, 0.0), std::nextafter(x, 1e300)});
  }
  for (double v : {1e-30, 1e30, 1e-31, 1e31, 0.0, -1.0, std::numeric_limits<double>::infinity(),
                   std::numeric_limits<double>::quiet_NaN(), 1e-300, 1e300})
    w.insert(w.begin() + 13, v);
  for (int64_t n : {static_cast<int64_t>(w.size()), int64_t{7}, int64_t{8}, int64_t{9}, int64_t{0}}) {
    std::vector<float> got(static_cast<size_t>(n) + 1, -1.0f);
    quant_detail::bhq_inv_cbrt_batch(w.data(), n, got.data());
    for (int64_t i = 0; i < n; ++i) {
      const float want = quant_detail::bhq_inv_cbrt(w[i]);
      ASSERT_EQ(std::bit_cast<uint32_t>(got[i]), std::bit_cast<uint32_t>(want)) << "w = " << w[i] << " at " << i;
    }
    EXPECT_EQ(got[n], -1.0f) << "wrote past n = " << n;
  }
}

TEST(Bhq, RoundNonnegEqualsStdRound) {
  // The share loop's inline rounding against std::round: halves, their double neighbours, and a
  // sweep of cumulative-share-like values up to 2^31.
  std::vector<double> xs = {0.0, 0.25, 0.5, 1.5, 2.5, 1e6 + 0.5, 2147483647.5};
  for (double h : {0.5, 1.5, 2.5, 7.5, 1e6 + 0.5, 123456.5})
    xs.insert(xs.end(), {std::nextafter(h, 0.0), std::nextafter(h, 1e300)});
  uint64_t s = 12345;
  for (int i = 0; i < 1000000; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    xs.push_back(std::ldexp(static_cast<double>(s >> 11), -53 + static_cast<int>(s % 32)));  // [0, 2^31)
  }
  for (double x : xs) ASSERT_EQ(quant_detail::round_nonneg(x), static_cast<int64_t>(std::round(x))) << x;
}

TEST(Bhq, TwoStageGroupingEqualsOneCall) {
  // bhq_shares + bhq_transform_from_shares (how quantize_pair splits the grouping across threads)
  // against bhq_transform_from_ranges, with one BhqShares reused across shapes; shares whose
  // offsets were already taken are refused.
  BhqShares sh;
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{0, 4}, {1, 4}, {2, 3}, {300, 16}, {20000, 9}, {5, 2}}) {
    const Tensor x = synthetic_matrix(SynthKind::heavy_tailed, rows, cols, 11);
    const std::vector<double> m = kernels::bhq_row_ranges(x.data<float>(), rows, cols);
    const std::vector<int64_t> rank = bhq_rank_descending(m);
    const BhqTransform want = bhq_transform_from_ranges(m, rank);
    bhq_shares(m, rank, sh);
    for (bool batched : {false, true}) {
      BhqShares copy = sh;
      const BhqTransform got = bhq_transform_from_shares(copy, rank, batched);
      EXPECT_EQ(got.offsets, want.offsets) << rows << "x" << cols;
      EXPECT_EQ(got.members, want.members) << rows << "x" << cols;
      EXPECT_EQ(got.row_scale, want.row_scale) << rows << "x" << cols;
      EXPECT_EQ(got.row_group, want.row_group) << rows << "x" << cols;
      if (rows >= 2) {
        EXPECT_THROW(bhq_transform_from_shares(copy, rank, batched), Error) << "offsets taken twice";
      }
    }
  }
}

TEST(Bhq, GroupSlicesSplitTheRowsEvenly) {
  // Heavy-tailed rows: the first groups (largest ranges) hold many small rows. The nt slices are
  // consecutive, cover every group once, and each holds rows/nt rows to within one group.
  Tensor x = synthetic_matrix(SynthKind::heavy_tailed, 3000, 16, 9);
  BhqTransform t = bhq_transform(x.data<float>(), 3000, 16);
  ASSERT_GT(t.group_size(0), 4 * t.group_size(t.num_groups() - 1)) << "the first group should be the larger";
  for (int nt : {1, 2, 3, 7}) {
    int64_t next = 0, largest = 0;
    for (int64_t g = 0; g < t.num_groups(); ++g) largest = std::max(largest, t.group_size(g));
    for (int u = 0; u < nt; ++u) {
      const auto [g0, g1] = t.group_slice(u, nt);
      EXPECT_EQ(g0, next) << "slice " << u << " of " << nt;
      ASSERT_LE(g0, g1);
      const int64_t rows = t.offsets[g1] - t.offsets[g0];
      EXPECT_LE(std::abs(rows - 3000 / nt), largest) << "slice " << u << " of " << nt;
      next = g1;
    }
    EXPECT_EQ(next, t.num_groups());
  }
  EXPECT_EQ(BhqTransform{}.group_slice(0, 2), (std::pair<int64_t, int64_t>{0, 0}));
}

TEST(Bhq, HouseholderMapsE1ToUniformVector) {
  for (int64_t n : {2, 3, 5, 64}) {
    float vf, vr;
    householder_v(n, vf, vr);
    EXPECT_NEAR(vf * vf + (n - 1) * vr * vr, 1.0, 1e-6);  // unit vector
    // H e1 = e1 - 2 v v1 = (1,...,1)/sqrt(n)
    EXPECT_NEAR(1 - 2 * vf * vf, 1 / std::sqrt(double(n)), 1e-6);
    EXPECT_NEAR(-2 * vr * vf, 1 / std::sqrt(double(n)), 1e-6);
  }
}

TEST(Bhq, DegenerateInputsNeitherCrashNorNaN) {
  std::vector<Tensor> inputs = {
      synthetic_matrix(SynthKind::gaussian, 1, 16, 1),  // N = 1
      synthetic_matrix(SynthKind::gaussian, 2, 16, 1),  // N = 2 (authors' code reads out of bounds)
      Tensor::zeros({8, 16}),                           // all zero
      Tensor::full({8, 16}, 3.25),                      // all rows constant
      Tensor::zeros({3, 1}),                            // one column
  };
  for (const Tensor& x : inputs) {
    for (int bits : {2, 4, 8}) {
      QuantizedTensor q = quantize(x, {QuantizerKind::bhq, bits}, {1, 2});
      ASSERT_TRUE(q.transform.has_value());
      for (int64_t g = 0; g < q.transform->num_groups(); ++g)
        if (x.size(0) >= 2) {
          EXPECT_GE(q.transform->group_size(g), 2);
        }
      Tensor d = dequantize(q);
      // Each element of T x is rounded by less than one grid step 1/scale, so an element of
      // T^-1 Q(T x) moves by less than ||T^-1||_inf max(1/scale) (plus fp32 rounding); constant
      // and zero inputs come back (almost) exactly.
      double step = 0;
      for (float sc : q.scale) step = std::max(step, 1.0 / sc);
      const double tol = x.size(0) <= 2 ? 1.001 * q.transform->inverse_inf_norm() * step + 1e-5 : 1e-3;
      for (int64_t i = 0; i < d.numel(); ++i) {
        ASSERT_TRUE(std::isfinite(d.data<float>()[i])) << "shape " << shape_str(x.shape());
        EXPECT_NEAR(d.data<float>()[i], x.data<float>()[i], tol) << "shape " << shape_str(x.shape()) << " bits " << bits;
      }
    }
  }
}

TEST(Bhq, RankIsTheStableDescendingOrder) {
  // The radix sort must give exactly what std::stable_sort with `>` gives, ties (many, here: values
  // drawn from 50 levels) in index order, across several magnitudes (exponents differ).
  for (int64_t n : {1, 2, 3, 17, 1000, 70000}) {
    std::vector<double> m(n);
    for (int64_t i = 0; i < n; ++i)
      m[i] = std::ldexp(1.0 + static_cast<double>((i * 7919) % 50), static_cast<int>((i * 31) % 9) - 4) + 1e-8;
    std::vector<int64_t> want(n);
    std::iota(want.begin(), want.end(), 0);
    std::stable_sort(want.begin(), want.end(), [&](int64_t a, int64_t b) { return m[a] > m[b]; });
    EXPECT_EQ(bhq_rank_descending(m), want) << "n = " << n;
  }
}

// The fast CPU path (parallel row ranges and radix sort) builds the reference transform exactly:
// the same order on keys that differ in every bit position (random doubles over 40 binades, with
// ties), and the same groups, members and scales, on 1 and 2 threads, small and threaded sizes.
TEST(Bhq, FastTransformEqualsReference) {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2}) {
    omp_set_num_threads(threads);
    // (up to kRankSortMax rows a comparison sort, above it the radix sort)
    for (int64_t n : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{128}, kernels::kRankSortMax, kernels::kRankSortMax + 1,
                      int64_t{5000}, int64_t{70000}}) {
      std::vector<double> m(n);
      uint64_t s = 0x9E3779B97F4A7C15ull;
      for (int64_t i = 0; i < n; ++i) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        const double frac = static_cast<double>(s >> 11) * 0x1.0p-53;  // 53 random bits
        m[i] = i % 7 == 3 ? m[i - 1] : std::ldexp(1.0 + frac, static_cast<int>((s >> 3) % 40) - 30);
      }
      ASSERT_EQ(kernels::bhq_rank_descending_parallel(m, 1), bhq_rank_descending(m)) << n << " rows, " << threads << " threads";
      // Doubles that round to the same float (the fast sort's keys; it orders such runs by the
      // doubles), and long runs of one value, as zero gradient rows give (range 1e-8).
      for (int64_t i = 0; i < n; ++i) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        m[i] = i % 5 == 1 ? 1e-8 : 1.0 + static_cast<double>(s >> 44) * 0x1.0p-40;  // 20 random bits below float's
      }
      ASSERT_EQ(kernels::bhq_rank_descending_parallel(m, 1), bhq_rank_descending(m)) << n << " rows (float ties), " << threads << " threads";
    }
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 4}, {2, 3}, {7, 1}, {300, 16}, {40000, 17}}) {
      const Tensor x = synthetic_matrix(SynthKind::heavy_tailed, rows, cols, 5);
      const BhqTransform want = bhq_transform(x.data<float>(), rows, cols);
      const BhqTransform got = kernels::bhq_transform_fast(x.data<float>(), rows, cols);
      EXPECT_EQ(got.offsets, want.offsets) << rows << "x" << cols;
      EXPECT_EQ(got.members, want.members) << rows << "x" << cols;
      EXPECT_EQ(got.row_scale, want.row_scale) << rows << "x" << cols;
      // The row-order view: row r names its group, negated (~g) exactly for the group's first row.
      ASSERT_EQ(static_cast<int64_t>(got.row_group.size()), rows);
      for (int64_t g = 0; g < got.num_groups(); ++g)
        for (int64_t i = got.offsets[g]; i < got.offsets[g + 1]; ++i) {
          const int64_t r = got.members[i];
          ASSERT_EQ(got.group_of(r), g) << "row " << r;
          ASSERT_EQ(got.leads_group(r), i == got.offsets[g]) << "row " << r;
        }
      BhqTransform rebuilt = want;  // as the CUDA download assembles one: members and offsets only
      rebuilt.row_group.clear();
      rebuilt.fill_row_group();
      EXPECT_EQ(rebuilt.row_group, got.row_group) << rows << "x" << cols;
      if (rows >= 3) {  // a corrupt transform (a row twice, another in no group) is refused
        BhqTransform bad = want;
        bad.members[1] = bad.members[0];
        EXPECT_THROW(bad.fill_row_group(), Error) << rows << "x" << cols;
      }
      // T x in row order with the row ranges: apply's values bit for bit.
      Tensor a = Tensor::empty({rows, cols}), b = Tensor::empty({rows, cols});
      want.apply(x.data<float>(), a.data<float>(), cols);
      std::vector<double> mn(rows), mx(rows);
      kernels::bhq_apply_rows(want, x.data<float>(), cols, b.data<float>(), mn.data(), mx.data());
      ASSERT_EQ(0, std::memcmp(a.data<float>(), b.data<float>(), sizeof(float) * rows * cols)) << rows << "x" << cols;
      BhqTransform bare = want;  // without row_group (built from members/offsets on the way)
      bare.row_group.clear();
      Tensor c = Tensor::empty({rows, cols});
      kernels::bhq_apply_rows(bare, x.data<float>(), cols, c.data<float>(), mn.data(), mx.data());
      ASSERT_EQ(0, std::memcmp(a.data<float>(), c.data<float>(), sizeof(float) * rows * cols)) << rows << "x" << cols;
      for (int64_t r = 0; r < rows; ++r) {
        const float* p = a.data<float>() + r * cols;
        ASSERT_EQ(mn[r], *std::min_element(p, p + cols)) << "row " << r;
        ASSERT_EQ(mx[r], *std::max_element(p, p + cols)) << "row " << r;
      }
    }
  }
  omp_set_num_threads(saved);
}

// The fast rank sort refuses a range that is not positive (0, negative, NaN: what a non-finite
// gradient row would give), on its one-thread path (counts taken with the keys) and threaded.
TEST(Bhq, FastRankRejectsNonPositiveRanges) {
  const int saved = omp_get_max_threads();
  for (int threads : {1, 2})
    for (double badv : {0.0, -1.0, std::numeric_limits<double>::quiet_NaN()})
      for (int64_t at : {int64_t{0}, int64_t{4999}}) {
        omp_set_num_threads(threads);
        std::vector<double> m(5000, 1.5);
        m[at] = badv;
        try {
          (void)kernels::bhq_rank_descending_parallel(m, threads == 1 ? kernels::kRankParallelMin : 1);
          ADD_FAILURE() << "accepted range " << badv << " at " << at << ", " << threads << " threads";
        } catch (const Error& e) {
          EXPECT_NE(std::string(e.what()).find("is not positive"), std::string::npos) << e.what();
        }
      }
  omp_set_num_threads(saved);
}
