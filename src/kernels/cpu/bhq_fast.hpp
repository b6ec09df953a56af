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
// With tmin / tmax: also the matrix's min and max (+-inf when it is empty). With has_nan: set
// when x holds a NaN (an Inf shows in tmin / tmax), so that a finite input needs no pass of its
// own to be checked; m is then meaningless.
std::vector<double> bhq_row_ranges(const float* x, int64_t rows, int64_t cols, float* tmin = nullptr,
                                   float* tmax = nullptr, bool* has_nan = nullptr);
// bhq_rank_descending(m), on all threads from min_parallel rows on (one below). Up to
// kRankSortMax rows a comparison sort: the radix sort's 3 x 4096 digit counts cost 7.8 us for the
// 128 rows of a per-sample BHQ, std::stable_sort ~1 us (session 23).
constexpr int64_t kRankParallelMin = int64_t{1} << 22;
constexpr int64_t kRankSortMax = 1024;
std::vector<int64_t> bhq_rank_descending_parallel(const std::vector<double>& m, int64_t min_parallel = kRankParallelMin);
BhqTransform bhq_transform_fast(const float* x, int64_t rows, int64_t cols);
// out = T x (what BhqTransform::apply computes, bit for bit), and each row's min and max of out.
// (quantize() now forms T x row by row from the two parts below and never stores it; this whole
// pass stays for the tests and bench_quantizers.)
// Two passes instead of apply's one over the groups, which read and wrote rows from all over the
// matrix: the groups' v^T diag(s) x in group order (reads only), then the rows in row order
// (sequential reads and writes; only the small per-group sums are fetched out of order).
void bhq_apply_rows(const BhqTransform& t, const float* x, int64_t cols, float* out, double* row_min, double* row_max);

// Group g's rows of y <- T^-1 y, in place (what BhqTransform::apply_inverse computes for them, bit
// for bit: per column, the members' v_k y_k summed in member order, then (y_k - 2 v_k dot) / s_k),
// on the calling thread, kInverseBlock columns at a time (`dot`: that many floats of scratch):
// for a caller that has just written those rows and still has them in cache (the per-sample
// BHQ dgrad, Conv2d).
constexpr int64_t kInverseBlock = 512;
void bhq_apply_inverse_group(const BhqTransform& t, int64_t g, float* y, int64_t cols, float* dot);

// Group g's d = sum_k v_k (s_k x_k) over its members in member order (cols floats), with v_first /
// v_rest its Householder entries: what apply sums (bhq_group_dots'; the per-sample quantizer of
// quantize.cpp does the same operations in 16-lane intrinsics).
inline void bhq_group_sum(const BhqTransform& t, int64_t g, float vf, float vr, const float* x, int64_t cols,
                          float* __restrict d) {
  const int64_t* mem = t.members.data() + t.offsets[g];
  const int64_t n = t.group_size(g);
  for (int64_t j = 0; j < cols; ++j) d[j] = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    const float vk = k == 0 ? vf : vr, s = t.row_scale[mem[k]];
    const float* __restrict row = x + mem[k] * cols;
    for (int64_t j = 0; j < cols; ++j) d[j] += vk * (s * row[j]);
  }
}
// A row of T x from its group's sum d: s_r x_r - (2 v_r) d (vk2 = 2 v_r).
inline void bhq_transformed_row(float s, float vk2, const float* __restrict row, const float* __restrict d,
                                int64_t cols, float* __restrict out) {
  for (int64_t j = 0; j < cols; ++j) out[j] = s * row[j] - vk2 * d[j];
}

// The two passes of bhq_apply_rows as parts, for callers that use each row of T x at once (the
// fused quantizer of quantize.cpp). bhq_group_dots: per group g, d_g = sum_k v_k (s_k x_k) in
// member order, in a row of ld = cols + 2 floats that ends with 2 v_first and 2 v_rest (so the
// row pass finds everything about its group in one record: 72 bytes for rows of 16, two
// adjacent lines; 64-byte records with 2 v d_g precomputed for both kinds of row, 128 bytes a
// group, measured no faster, session 19); the buffer belongs to
// the calling thread and is reused by its next call. bhq_row: row r of T x from those sums
// (t.row_group required).
const float* bhq_group_dots(const BhqTransform& t, const float* x, int64_t cols);
inline void bhq_row(const BhqTransform& t, const float* dots, const float* x, int64_t cols, int64_t r,
                    float* __restrict out) {
  const int64_t ld = cols + 2;
  constexpr int64_t kAhead = 8;  // the groups are in range order, not row order
  if (r + kAhead < t.rows) {
    const float* ahead = dots + t.group_of(r + kAhead) * ld;
    for (int64_t j = 0; j < ld; j += 16) __builtin_prefetch(ahead + j);
  }
  const float* __restrict d = dots + t.group_of(r) * ld;
  bhq_transformed_row(t.row_scale[r], d[t.leads_group(r) ? cols : cols + 1], x + r * cols, d, cols, out);
}
}  // namespace fqt::kernels
