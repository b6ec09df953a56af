#include "bhq_fast.hpp"

#include "minmax.hpp"
#include "quant/grid.hpp"

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <numeric>
#include <utility>

namespace fqt::kernels {

std::vector<double> bhq_row_ranges(const float* x, int64_t rows, int64_t cols, float* tmin, float* tmax,
                                   bool* has_nan) {
  std::vector<double> m(static_cast<size_t>(rows));
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  uint32_t nan = 0;
  // Blocks of 64 rows (minmax_rows takes 16 at a time for rows of 16 values).
  constexpr int64_t kBlock = 64;
#pragma omp parallel for schedule(static) reduction(min : lo) reduction(max : hi) reduction(| : nan) \
    if (rows * cols > quant_detail::kParallelMin)
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t n = std::min(kBlock, rows - r0);
    float mn[kBlock], mx[kBlock];
    minmax_rows(x + r0 * cols, n, cols, mn, mx, nan);
    for (int64_t i = 0; i < n; ++i) {
      lo = std::min(lo, mn[i]), hi = std::max(hi, mx[i]);
      if (cols == 0) mn[i] = mx[i] = 0.0f;
      m[r0 + i] = quant_detail::bhq_row_range(mn[i], mx[i]);
    }
  }
  if (tmin) *tmin = lo;
  if (tmax) *tmax = hi;
  if (has_nan) *has_nan = nan != 0;
  return m;
}

// LSD radix sort on 32-bit keys, 12 bits per pass: the complemented bits of float(m), which
// orders as m does (rounding to float is monotone) except that nearby doubles may round to the
// same float; runs of equal keys are then put in order by the doubles themselves (a stable sort
// of each run, which the radix passes left in index order). Four passes over 8-byte items
// instead of six over 16-byte ones (the double's bits with an int64 index): bench_quantizers,
// 100352 ranges, 1 thread: 1.19 -> 0.65-0.70 ms with three passes of 11 bits; 0.60-0.65 ms
// with four of 8 (256 buckets; 16, 10 and 7 bits measured 0.60-0.65, 0.63 and 0.79-0.88).
// Since the counts of every pass come with the keys (one thread, below), a pass is one scatter:
// 12 bits (4096 buckets) then measured 0.51-0.54 ms against 8 bits' 0.56-0.60 (session 15): the
// top pass (bits 24-31: sign and high exponent bits) is mostly skipped, leaving two scatters.
// Each thread owns a fixed slice of the current order: it counts its slice's digits, the offsets
// are laid out digit by digit and, within a digit, thread by thread (so the order of equal digits
// is kept: stable), then each thread scatters its slice. Passes whose digit is the same for every
// row are skipped. The result is the unique stable order, whatever the thread count.
// (Two threads were slower than one on the 2-core AVX-512 VM at every size measured, 1.09 against
// 0.93 ms for 100352 ranges and 4.0 against 2.2 ms for 401408: the scatters of the two threads
// interleave in the same lines. Hence the default min_parallel, kRankParallelMin.)
std::vector<int64_t> bhq_rank_descending_parallel(const std::vector<double>& m, int64_t min_parallel) {
  const auto n = static_cast<int64_t>(m.size());
  FQT_CHECK(n <= INT32_MAX, "BHQ: {} rows (at most 2^31 - 1)", n);
  if (n <= kRankSortMax) {  // a few rows (a row per sample): the reference's own stable sort
    for (int64_t i = 0; i < n; ++i) FQT_CHECK(m[i] > 0, "BHQ: row range {} is not positive (non-finite gradient?)", m[i]);
    std::vector<int64_t> rank(static_cast<size_t>(n));
    std::iota(rank.begin(), rank.end(), int64_t{0});
    std::stable_sort(rank.begin(), rank.end(), [&](int64_t a, int64_t b) { return m[a] > m[b]; });
    return rank;
  }
  constexpr int kBits = 12, kPasses = (32 + kBits - 1) / kBits;
  constexpr int64_t kDigits = int64_t{1} << kBits;
  constexpr uint32_t kMask = kDigits - 1;
  // Key and row index in one 8-byte item (key in the high half); two buffers kept per thread and
  // grown to the largest layer (fresh multi-MB vectors every call page-faulted and zero-filled).
  static thread_local std::vector<uint64_t> buf;
  if (static_cast<int64_t>(buf.size()) < 2 * n) buf.resize(2 * n);
  uint64_t *item = buf.data(), *item2 = item + n;
  const int T = n >= min_parallel ? omp_get_max_threads() : 1;
  // One thread (the usual case, below min_parallel): an LSD pass's digit counts depend on the
  // keys only, not on their order, so every pass's counts are taken in the pass that builds the
  // keys (a separate counting pass per radix pass, its increments chained through memory when
  // digits repeat, was ~40% of the sort in perf, session 15).
  const bool counted = T == 1;
  std::vector<int64_t> count(static_cast<size_t>(T * kDigits)), all(counted ? kPasses * kDigits : 0);
  uint32_t differ = 0;  // bits that are not the same in every key
  int bad = 0;          // a range that is not positive (checked after the pass, as before it)
  const uint32_t first = n ? ~std::bit_cast<uint32_t>(static_cast<float>(m[0])) : 0;
  int64_t* const c_all = all.data();  // (counted: one thread, so no race on the counts)
#pragma omp parallel for schedule(static) num_threads(T) reduction(| : differ, bad)
  for (int64_t i = 0; i < n; ++i) {
    bad |= !(m[i] > 0);
    const uint32_t key = ~std::bit_cast<uint32_t>(static_cast<float>(m[i]));
    item[i] = static_cast<uint64_t>(key) << 32 | static_cast<uint64_t>(i);
    differ |= key ^ first;
    if (counted)
      for (int p = 0; p < kPasses; ++p) ++c_all[p * kDigits + ((key >> (p * kBits)) & kMask)];
  }
  if (bad)
    for (int64_t i = 0; i < n; ++i) FQT_CHECK(m[i] > 0, "BHQ: row range {} is not positive (non-finite gradient?)", m[i]);
  for (int p = 0; p < kPasses; ++p) {
    const int shift = 32 + p * kBits;
    if (((differ >> (shift - 32)) & kMask) == 0) continue;
    if (counted) {  // offsets from the counts taken with the keys; one scatter
      int64_t* c = count.data();
      int64_t sum = 0;
      for (int64_t d = 0; d < kDigits; ++d) c[d] = std::exchange(sum, sum + all[p * kDigits + d]);
      for (int64_t i = 0; i < n; ++i) item2[c[(item[i] >> shift) & kMask]++] = item[i];
      std::swap(item, item2);
      continue;
    }
#pragma omp parallel num_threads(T)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t i0 = n * t / nt, i1 = n * (t + 1) / nt;
      int64_t* c = count.data() + t * kDigits;
      std::fill(c, c + kDigits, 0);
      for (int64_t i = i0; i < i1; ++i) ++c[(item[i] >> shift) & kMask];
#pragma omp barrier
#pragma omp single
      {
        int64_t sum = 0;
        for (int64_t d = 0; d < kDigits; ++d)
          for (int u = 0; u < nt; ++u) sum += std::exchange(count[u * kDigits + d], sum);
      }  // (implicit barrier)
      for (int64_t i = i0; i < i1; ++i) item2[c[(item[i] >> shift) & kMask]++] = item[i];
    }
    std::swap(item, item2);
  }
  std::vector<int64_t> rank(static_cast<size_t>(n));
#pragma omp parallel for schedule(static) num_threads(T)
  for (int64_t i = 0; i < n; ++i) rank[i] = static_cast<int64_t>(item[i] & 0xffffffffu);
  // Runs of one float key: by the doubles, descending; equal doubles keep index order (stable).
  // Such runs are rare (doubles within a float's rounding of each other, or rows of one range):
  // the scan for a key equal to its successor goes 8 items at a time.
  auto key_of = [&](int64_t i) { return item[i] >> 32; };
  for (int64_t i = 0; i + 1 < n;) {
#if defined(__AVX512F__)
    bool hit = false;
    for (; i + 9 <= n; i += 8) {
      const __m512i a = _mm512_maskz_srli_epi64(0xFF, _mm512_loadu_si512(item + i), 32);  // (masked: GCC 12 warns on the plain one)
      const __m512i b = _mm512_maskz_srli_epi64(0xFF, _mm512_loadu_si512(item + i + 1), 32);
      if (const __mmask8 eq = _mm512_cmpeq_epi64_mask(a, b)) {
        i += std::countr_zero(static_cast<unsigned>(eq));
        hit = true;
        break;
      }
    }
    if (!hit)
#endif
      while (i + 1 < n && key_of(i + 1) != key_of(i)) ++i;
    if (i + 1 >= n) break;
    int64_t j = i + 1;  // key_of(i) == key_of(i + 1), and i starts the run
    while (j < n && key_of(j) == key_of(i)) ++j;
    std::stable_sort(rank.begin() + i, rank.begin() + j, [&](int64_t a, int64_t b) { return m[a] > m[b]; });
    i = j;
  }
  return rank;
}

BhqTransform bhq_transform_fast(const float* x, int64_t rows, int64_t cols) {
  const std::vector<double> m = bhq_row_ranges(x, rows, cols);
  return bhq_transform_from_ranges_batched(m, bhq_rank_descending_parallel(m));
}

const float* bhq_group_dots(const BhqTransform& t, const float* x, int64_t cols) {
  const int64_t G = t.num_groups(), ld = cols + 2;
  static thread_local std::vector<float> dot;
  dot.resize(static_cast<size_t>(G * ld));
  float* dp = dot.data();
  const HouseholderV householder;
#pragma omp parallel if (t.rows * cols > quant_detail::kParallelMin)
  {
    const auto [g0, g1] = t.group_slice(omp_get_thread_num(), omp_get_num_threads());
    for (int64_t g = g0; g < g1; ++g) {
      constexpr int64_t kAhead = 4;  // prefetch the rows of a later group: they are scattered
      if (g + kAhead < g1)
        for (int64_t i = t.offsets[g + kAhead]; i < t.offsets[g + kAhead + 1]; ++i)
          for (int64_t j = 0; j < cols; j += 16) __builtin_prefetch(x + t.members[i] * cols + j);
      float vf, vr;
      householder(t.group_size(g), vf, vr);
      float* d = dp + g * ld;
      bhq_group_sum(t, g, vf, vr, x, cols, d);
      d[cols] = 2.0f * vf, d[cols + 1] = 2.0f * vr;
    }
  }
  return dp;
}

namespace {
// Group g's T^-1 on columns j0 .. j0 + w of y: per column, the members' v_k y_k summed in member
// order, then (y_k - 2 v_k dot) / s_k (BhqTransform::apply_inverse's operations).
inline void inverse_group_block(const BhqTransform& t, int64_t g, float vf, float vr, float* y, int64_t cols,
                                int64_t j0, int64_t w, float* __restrict dot) {
  const int64_t* mem = t.members.data() + t.offsets[g];
  const int64_t n = t.group_size(g);
  for (int64_t j = 0; j < w; ++j) dot[j] = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    const float vk = k == 0 ? vf : vr;
    const float* __restrict row = y + mem[k] * cols + j0;
    for (int64_t j = 0; j < w; ++j) dot[j] += vk * row[j];  // apply_inverse's vk * (1.0f * row[j])
  }
  for (int64_t k = 0; k < n; ++k) {
    const float vk2 = 2.0f * (k == 0 ? vf : vr), s = t.row_scale[mem[k]];
    float* __restrict row = y + mem[k] * cols + j0;
    for (int64_t j = 0; j < w; ++j) row[j] = (row[j] - vk2 * dot[j]) / s;
  }
}
}  // namespace

void bhq_apply_inverse_group(const BhqTransform& t, int64_t g, float* y, int64_t cols, float* dot) {
  float vf, vr;
  HouseholderV()(t.group_size(g), vf, vr);
  for (int64_t j0 = 0; j0 < cols; j0 += kInverseBlock)
    inverse_group_block(t, g, vf, vr, y, cols, j0, std::min(kInverseBlock, cols - j0), dot);
}

void bhq_apply_rows(const BhqTransform& t_in, const float* x, int64_t cols, float* out, double* row_min,
                    double* row_max) {
  BhqTransform copy;  // only for a transform assembled without row_group
  const BhqTransform& t = t_in.with_row_group(copy);
  const int64_t rows = t.rows;
  // Per group: dot = sum_k v_k (s_k x_k), summed in member order exactly as group_apply does;
  // then per row, in row order, its group's dot from row_group (no per-row scatter of group ids
  // and v_k here: those scattered writes cost as much as the sums in bench_quantizers).
  const float* dp = bhq_group_dots(t, x, cols);
#pragma omp parallel for schedule(static) if (rows * cols > quant_detail::kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    bhq_row(t, dp, x, cols, r, out + r * cols);
    float mn = std::numeric_limits<float>::infinity(), mx = -mn;
    uint32_t nan = 0;
    minmax_lanes(out + r * cols, cols, mn, mx, nan);
    row_min[r] = mn, row_max[r] = mx;
  }
}

}  // namespace fqt::kernels
