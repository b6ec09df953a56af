// BHQ: block Householder transform (SPEC section 2, steps 1-6), built and applied in block form.
#include "fqt/quant.hpp"
#include "quant/grid.hpp"

#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <utility>

namespace fqt {

namespace {
void householder_v_direct(int64_t n, float& v_first, float& v_rest) {
  if (n <= 1) {  // H_1 = I
    v_first = v_rest = 0.0f;
    return;
  }
  // v = (e1 - u) / ||e1 - u||, u = (1,...,1)/sqrt(n); ||e1 - u||^2 = 2 - 2/sqrt(n).
  double rs = 1.0 / std::sqrt(static_cast<double>(n));
  double norm = std::sqrt(2.0 - 2.0 * rs);
  v_first = static_cast<float>((1.0 - rs) / norm);
  v_rest = static_cast<float>(-rs / norm);
}

double householder_qmax_direct(int64_t n) {
  if (n <= 1) return 1.0;
  double rs = 1.0 / std::sqrt(static_cast<double>(n));
  double norm = std::sqrt(2.0 - 2.0 * rs);
  double vf = (1.0 - rs) / norm, vr = -rs / norm;
  // Entries of I - 2 v v^T: (1,1), (1,k), (k,k), (k,l).
  return std::max({std::fabs(1 - 2 * vf * vf), std::fabs(2 * vf * vr), std::fabs(1 - 2 * vr * vr),
                   std::fabs(2 * vr * vr)});
}

// The same numbers for the small group sizes, computed once: a conv layer's gradient has ~10^4
// groups of 2-3 rows, and the square roots and divisions per group showed in perf.
constexpr int64_t kTable = HouseholderV::kTable;
struct HouseholderTable {
  float vf[kTable], vr[kTable];
  double qmax[kTable];
};
const HouseholderTable& householder_table() {
  static const HouseholderTable table = [] {
    HouseholderTable t;
    for (int64_t n = 0; n < kTable; ++n) householder_v_direct(n, t.vf[n], t.vr[n]), t.qmax[n] = householder_qmax_direct(n);
    return t;
  }();
  return table;
}
}  // namespace

HouseholderV::HouseholderV() : vf_(householder_table().vf), vr_(householder_table().vr) {}

void householder_v(int64_t n, float& v_first, float& v_rest) {
  if (n >= 0 && n < kTable) {
    const HouseholderTable& t = householder_table();
    v_first = t.vf[n], v_rest = t.vr[n];
    return;
  }
  householder_v_direct(n, v_first, v_rest);
}

double householder_qmax(int64_t n) {
  return n >= 0 && n < kTable ? householder_table().qmax[n] : householder_qmax_direct(n);
}

// Row indices sorted by m descending, ties by index ascending (what std::stable_sort with `>` gives).
// An LSD radix sort (stable) on the complemented bit patterns of the positive doubles m, 16 bits
// per pass; passes whose digit is the same for every row are skipped. ~5x faster than
// stable_sort on the ~10^5 rows of a conv layer's gradient.
std::vector<int64_t> bhq_rank_descending(const std::vector<double>& m) {
  const auto n = static_cast<int64_t>(m.size());
  std::vector<uint64_t> key(n), key2(n);
  std::vector<int64_t> idx(n), idx2(n);
  for (int64_t i = 0; i < n; ++i) {
    FQT_CHECK(m[i] > 0, "BHQ: row range {} is not positive (non-finite gradient?)", m[i]);
    key[i] = ~std::bit_cast<uint64_t>(m[i]), idx[i] = i;
  }
  std::vector<int64_t> count(size_t{1} << 16);
  for (int shift = 0; shift < 64; shift += 16) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(key[i] >> shift) & 0xffff];
    if (n == 0 || count[(key[0] >> shift) & 0xffff] == n) continue;
    int64_t sum = 0;
    for (auto& c : count) sum += std::exchange(c, sum);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at = count[(key[i] >> shift) & 0xffff]++;
      key2[at] = key[i], idx2[at] = idx[i];
    }
    key.swap(key2), idx.swap(idx2);
  }
  return idx;
}

BhqTransform bhq_transform(const float* x, int64_t N, int64_t D) {
  // 1. Row ranges, sorted descending (ties by row index, so the order is deterministic).
  std::vector<double> m(N);
  for (int64_t i = 0; i < N; ++i) {
    float mn = D ? x[i * D] : 0.0f, mx = mn;
    for (int64_t j = 1; j < D; ++j) {
      mn = std::min(mn, x[i * D + j]);
      mx = std::max(mx, x[i * D + j]);
    }
    m[i] = quant_detail::bhq_row_range(mn, mx);
  }
  return bhq_transform_from_ranges(m, bhq_rank_descending(m));
}

// (GCC 12 warns inside its own AVX-512 headers here, on their `_mm512_undefined_*()`
// placeholders, once inlined: a known false positive, silenced for this function only.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
void quant_detail::bhq_inv_cbrt_batch(const double* w, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512d lo = _mm512_set1_pd(1e-30), hi = _mm512_set1_pd(1e30), one = _mm512_set1_pd(1.0),
                third = _mm512_set1_pd(1.0 / 3.0);
  const __m512i magic = _mm512_set1_epi64(0xAAAAAAABu);
  const __m256i base = _mm256_set1_epi32(0x54a2fa8c);
  for (; i + 8 <= n; i += 8) {
    const __m512d x = _mm512_loadu_pd(w + i);
    const __mmask8 ok = _mm512_cmp_pd_mask(x, lo, _CMP_GE_OQ) & _mm512_cmp_pd_mask(x, hi, _CMP_LE_OQ);
    if (ok != 0xff) {  // a value for pow: this vector by the scalar function
      for (int64_t k = i; k < i + 8; ++k) out[k] = bhq_inv_cbrt(w[k]);
      continue;
    }
    const __m256i u = _mm256_castps_si256(_mm512_cvtpd_ps(x));  // static_cast<float>(w)
    const __m512i q = _mm512_srli_epi64(_mm512_mul_epu32(_mm512_cvtepu32_epi64(u), magic), 33);  // u / 3
    __m512d y = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_sub_epi32(base, _mm512_cvtepi64_epi32(q))));
    for (int k = 0; k < 4; ++k) {
      const __m512d y3 = _mm512_mul_pd(_mm512_mul_pd(y, y), y);
      // fma(y * fma(-w, y3, 1), 1/3, y)
      y = _mm512_fmadd_pd(_mm512_mul_pd(y, _mm512_fnmadd_pd(x, y3, one)), third, y);
    }
    _mm256_storeu_ps(out + i, _mm512_cvtpd_ps(y));
  }
#endif
  for (; i < n; ++i) out[i] = bhq_inv_cbrt(w[i]);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

namespace {
template <bool Batched>
BhqTransform from_shares(BhqShares& sh, const std::vector<int64_t>& rank, BhqTransform* storage) {
  const int64_t N = sh.rows;
  FQT_CHECK(static_cast<int64_t>(rank.size()) == N, "BHQ: {} ranks for {} rows", rank.size(), N);
  BhqTransform t = storage ? std::move(*storage) : BhqTransform();
  t.rows = N;
  // Every row's scale, group and member slot is written below: arrays of the right size (from
  // `storage`) are used as they are.
  auto sized = [N](auto& a) {
    if (static_cast<int64_t>(a.size()) != N) a.assign(static_cast<size_t>(N), {});
  };
  sized(t.row_scale);
  sized(t.row_group);
  if (N == 0) {
    t.offsets = {0};
    t.members.clear();
    return t;
  }
  if (N == 1) {  // nothing to share with: plain per-row quantization
    t.offsets = {0, 1};
    t.members = {0};
    t.row_group = {~0};
    t.row_scale = {1.0f};
    return t;
  }
  const int64_t NL = sh.large;
  const double* v = sh.v.data();
  const int64_t* nums = sh.nums.data();
  // 4-5. Groups and their scales. Group i = large row i, then small rows NL + nums[i-1] ..
  // NL + nums[i] - 1 (sorted positions), so it starts at member i + nums[i-1]; the groups are
  // independent from here on (a parallel loop).
  FQT_CHECK(static_cast<int64_t>(sh.offsets.size()) == NL + 1,
            "bhq_transform_from_shares: the shares hold no offsets (used twice, or not from bhq_shares)");
  t.offsets = std::move(sh.offsets);
  sh.offsets.clear();
  sized(t.members);
#pragma omp parallel if (NL > 4096)
  {
    const auto [i0, i1] = t.group_slice(omp_get_thread_num(), omp_get_num_threads());
    // Batched: the groups' two scales for kB groups at a time (bhq_inv_cbrt_batch), then their
    // members; the same expressions, so the same floats as one group at a time.
    constexpr int64_t kB = Batched ? 256 : 1;
    double w1[kB], w2[kB];
    float s1[kB], s2[kB];
    for (int64_t b0 = i0; b0 < i1; b0 += kB) {
      const int64_t nb = std::min(kB, i1 - b0);
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t i = b0 + j;
        const int64_t begin = NL + (i ? nums[i - 1] : 0), n = 1 + (NL + nums[i] - begin);
        const double lambda1 = v[i], lambda2 = v[begin];
        w1[j] = lambda1 / std::sqrt(static_cast<double>(n));
        w2[j] = lambda2 * householder_qmax(n) / static_cast<double>(n - 1);
      }
      if constexpr (Batched) {
        quant_detail::bhq_inv_cbrt_batch(w1, nb, s1);
        quant_detail::bhq_inv_cbrt_batch(w2, nb, s2);
      } else {
        s1[0] = quant_detail::bhq_inv_cbrt(w1[0]);
        s2[0] = quant_detail::bhq_inv_cbrt(w2[0]);
      }
      for (int64_t j = 0; j < nb; ++j) {
        const int64_t i = b0 + j;
        const int64_t begin = NL + (i ? nums[i - 1] : 0), end = NL + nums[i];
        int64_t* mem = t.members.data() + t.offsets[i];
        mem[0] = rank[i];
        t.row_group[rank[i]] = ~static_cast<int32_t>(i);
        t.row_scale[rank[i]] = s1[j];
        for (int64_t k = begin; k < end; ++k) {
          mem[1 + k - begin] = rank[k];
          t.row_group[rank[k]] = static_cast<int32_t>(i);
          t.row_scale[rank[k]] = s2[j];
        }
      }
    }
  }
  return t;
}
}  // namespace

void bhq_shares(const std::vector<double>& m, const std::vector<int64_t>& rank, BhqShares& sh) {
  const auto N = static_cast<int64_t>(m.size());
  FQT_CHECK(static_cast<int64_t>(rank.size()) == N, "BHQ: {} ranks for {} rows", rank.size(), N);
  FQT_CHECK(N <= INT32_MAX, "BHQ: {} rows (at most 2^31 - 1)", N);
  sh.rows = N;
  sh.large = 0;
  sh.offsets.clear();
  if (N <= 1) return;
  // The working arrays keep their capacity from call to call (the largest layer's size): fresh
  // ones were zero-filled and page-faulted every call. Their contents are all written before
  // being read.
  if (static_cast<int64_t>(sh.v.size()) < N + 1) sh.v.resize(N + 1), sh.prefix.resize(N + 1), sh.nums.resize(N + 1);
  double* v = sh.v.data();
  double* prefix = sh.prefix.data();
  // (Inside quantize_bhq's sections this region is nested and runs on the section's thread.)
#pragma omp parallel for schedule(static) if (N > (int64_t{1} << 15))
  for (int64_t i = 0; i < N; ++i) v[i] = m[rank[i]];
  // 2. Split into large and small rows. G grows until G * v[N-G-1] / sum(v[0..N-G-1]) > 1,
  //    i.e. until every large row would receive more than one small row. For N >= 3 this stops
  //    at G <= N - 1 (G = N - 1 gives (N - 1) v[0] / v[0] > 1); N == 2 (where the authors' loop
  //    reads out of bounds) is one group of two. The test is monotone in G, in floating point
  //    too (v[N-G-1] can only grow and the prefix sum of positive terms only shrink as G grows,
  //    and rounding is monotone), so the first G that passes is found by bisection: the same G
  //    as the authors' linear scan.
  int64_t G = 1;
  prefix[0] = 0.0;
  for (int64_t i = 0; i < N; ++i) prefix[i + 1] = prefix[i] + v[i];
  if (N >= 3) {
    auto passes = [&](int64_t g) { return static_cast<double>(g) * v[N - g - 1] / prefix[N - g] > 1.0; };
    int64_t lo = 0, hi = N - 1;  // passes(hi)
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (passes(mid)) hi = mid;
      else lo = mid + 1;
    }
    G = lo;
  }
  const int64_t NL = N - G;
  const double total = prefix[NL];  // v[0] + ... + v[NL-1], summed in that order
  // 3. Small rows shared in proportion to range: nums[i] = roundf(sum_{k<=i} G v_k / total).
  int64_t* nums = sh.nums.data();
  double cum = 0;
  for (int64_t i = 0; i < NL; ++i) {
    cum += static_cast<double>(G) * v[i] / total;
    nums[i] = quant_detail::round_nonneg(cum);
  }
  nums[NL - 1] = G;  // the cumulative share of all large rows is G (guards rounding of cum)
  sh.offsets.resize(NL + 1);
  sh.offsets[0] = 0;
  for (int64_t i = 0; i < NL; ++i) {
    const int64_t prev = i ? nums[i - 1] : 0;
    FQT_CHECK(nums[i] > prev, "BHQ grouping gave large row {} no small rows (G={}, NL={})", i, G, NL);
    sh.offsets[i + 1] = i + 1 + nums[i];
  }
  FQT_CHECK(sh.offsets[NL] == N, "BHQ grouping lost rows");
  sh.large = NL;
}

BhqTransform bhq_transform_from_shares(BhqShares& sh, const std::vector<int64_t>& rank, bool batched,
                                       BhqTransform* storage) {
  return batched ? from_shares<true>(sh, rank, storage) : from_shares<false>(sh, rank, storage);
}

namespace {
BhqTransform from_ranges(const std::vector<double>& m, const std::vector<int64_t>& rank, bool batched) {
  static thread_local BhqShares sh;  // its buffers, kept from call to call
  bhq_shares(m, rank, sh);
  return bhq_transform_from_shares(sh, rank, batched);
}
}  // namespace

BhqTransform bhq_transform_from_ranges(const std::vector<double>& m, const std::vector<int64_t>& rank) {
  return from_ranges(m, rank, false);
}
BhqTransform bhq_transform_from_ranges_batched(const std::vector<double>& m, const std::vector<int64_t>& rank) {
  return from_ranges(m, rank, true);
}

namespace {
// Shared by apply and apply_inverse for one group; `dot` is scratch of `cols` floats.
//   forward:  x_k <- s_k x_k, then y = x - 2 v (v^T x)
//   inverse:  y = x - 2 v (v^T x), then y_k <- y_k / s_k
void group_apply(const BhqTransform& t, int64_t g, const float* in, float* out, int64_t cols,
                 bool inverse, std::vector<float>& dot) {
  const int64_t* mem = t.members.data() + t.offsets[g];
  const int64_t n = t.group_size(g);
  float vf, vr;
  householder_v(n, vf, vr);
  std::fill(dot.begin(), dot.end(), 0.0f);
  for (int64_t k = 0; k < n; ++k) {
    const float vk = k == 0 ? vf : vr;
    const float s = inverse ? 1.0f : t.row_scale[mem[k]];
    const float* row = in + mem[k] * cols;
    for (int64_t j = 0; j < cols; ++j) dot[j] += vk * (s * row[j]);
  }
  for (int64_t k = 0; k < n; ++k) {
    const float vk2 = 2.0f * (k == 0 ? vf : vr);
    const float s = t.row_scale[mem[k]];
    const float* row = in + mem[k] * cols;
    float* o = out + mem[k] * cols;
    if (inverse)
      for (int64_t j = 0; j < cols; ++j) o[j] = (row[j] - vk2 * dot[j]) / s;
    else
      for (int64_t j = 0; j < cols; ++j) o[j] = s * row[j] - vk2 * dot[j];
  }
}

void apply_all(const BhqTransform& t, const float* in, float* out, int64_t cols, bool inverse) {
#pragma omp parallel if (t.rows * cols > quant_detail::kParallelMin)
  {
    std::vector<float> dot(cols);
#pragma omp for schedule(dynamic, 4)
    for (int64_t g = 0; g < t.num_groups(); ++g) group_apply(t, g, in, out, cols, inverse, dot);
  }
}
}  // namespace

void BhqTransform::fill_row_group() {
  FQT_CHECK(rows <= INT32_MAX && num_groups() <= INT32_MAX, "BHQ: {} rows", rows);
  FQT_CHECK(static_cast<int64_t>(members.size()) == rows && (rows == 0 || offsets.back() == rows),
            "BHQ: {} members and {} offsets for {} rows", members.size(), offsets.size(), rows);
  constexpr int32_t kUnset = INT32_MIN;  // ~g for g < 2^31 - 1 is never INT32_MIN
  row_group.assign(static_cast<size_t>(rows), kUnset);
  for (int64_t g = 0; g < num_groups(); ++g)
    for (int64_t i = offsets[g]; i < offsets[g + 1]; ++i) {
      const int64_t r = members[i];
      FQT_CHECK(r >= 0 && r < rows && row_group[r] == kUnset, "BHQ: member {} of group {} is out of range or repeated", r, g);
      row_group[r] = i == offsets[g] ? ~static_cast<int32_t>(g) : static_cast<int32_t>(g);
    }
  for (int64_t r = 0; r < rows; ++r) FQT_CHECK(row_group[r] != kUnset, "BHQ: row {} is in no group", r);
}

const BhqTransform& BhqTransform::with_row_group(BhqTransform& copy) const {
  if (static_cast<int64_t>(row_group.size()) == rows) return *this;
  copy = *this;
  copy.fill_row_group();
  return copy;
}

void BhqTransform::apply(const float* x, float* out, int64_t cols) const { apply_all(*this, x, out, cols, false); }

void BhqTransform::apply_inverse(const float* y, float* out, int64_t cols) const { apply_all(*this, y, out, cols, true); }

std::vector<double> BhqTransform::inverse_column_norms2() const {
  // T^-1 e_r = diag(1/s) H e_r (within r's group): sum over the group of (H_{m,r} / s_m)^2.
  std::vector<double> out(rows, 0.0);
  for (int64_t g = 0; g < num_groups(); ++g) {
    const int64_t* mem = members.data() + offsets[g];
    const int64_t n = group_size(g);
    float vf, vr;
    householder_v(n, vf, vr);
    for (int64_t k = 0; k < n; ++k) {
      double acc = 0;
      for (int64_t l = 0; l < n; ++l) {
        double vk = k == 0 ? vf : vr, vl = l == 0 ? vf : vr;
        double h = (k == l ? 1.0 : 0.0) - 2.0 * vl * vk;
        double e = h / row_scale[mem[l]];
        acc += e * e;
      }
      out[mem[k]] = acc;
    }
  }
  return out;
}

double BhqTransform::inverse_inf_norm() const {
  // Row m of T^-1 within its group: (I - 2 v v^T)_{m,k} / s_m, whose |.| sums to
  // |1 - 2 v_m^2| / s_m + 2 |v_m| (sum_k |v_k| - |v_m|) / s_m.
  double worst = 0;
  for (int64_t g = 0; g < num_groups(); ++g) {
    const int64_t n = group_size(g);
    float vf, vr;
    householder_v(n, vf, vr);
    const double s1 = std::fabs(static_cast<double>(vf)) + static_cast<double>(n - 1) * std::fabs(static_cast<double>(vr));
    for (int64_t k = 0; k < n; ++k) {
      const double v = k == 0 ? vf : vr;
      const double row = std::fabs(1.0 - 2.0 * v * v) + 2.0 * std::fabs(v) * (s1 - std::fabs(v));
      worst = std::max(worst, row / static_cast<double>(row_scale[members[offsets[g] + k]]));
    }
  }
  return worst;
}

}  // namespace fqt
