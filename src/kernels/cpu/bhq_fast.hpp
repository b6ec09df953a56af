// Internal: BHQ's transform for the fast CPU quantizer. The same transform as bhq_transform
// (src/quant/bhq.cpp, plain loops: the reference), with its two row passes made parallel: the row
// ranges on vectors, the stable descending order by a parallel LSD radix sort. Equal to the
// reference member for member and scale for scale (tests/unit/test_bhq.cpp).
#pragma once

#include "fqt/quant.hpp"

#include <cstdint>
#include <vector>

namespace fqt::kernels {
// m[r] = max - min + 1e-8 of row r (in double, as the reference computes it).
std::vector<double> bhq_row_ranges(const float* x, int64_t rows, int64_t cols);
// bhq_rank_descending(m), on all threads from min_parallel rows on (one below).
constexpr int64_t kRankParallelMin = int64_t{1} << 22;
std::vector<int64_t> bhq_rank_descending_parallel(const std::vector<double>& m, int64_t min_parallel = kRankParallelMin);
BhqTransform bhq_transform_fast(const float* x, int64_t rows, int64_t cols);
// out = T x (what BhqTransform::apply computes, bit for bit), and each row's min and max of out.
// Two passes instead of apply's one over the groups, which read and wrote rows from all over the
// matrix: the groups' v^T diag(s) x in group order (reads only), then the rows in row order
// (sequential reads and writes; only the small per-group sums are fetched out of order).
void bhq_apply_rows(const BhqTransform& t, const float* x, int64_t cols, float* out, double* row_min, double* row_max);
}  // namespace fqt::kernels
