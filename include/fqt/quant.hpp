// fqt/quant.hpp — quantizers: integer codes plus their grids, and the way back.
//
// Every quantizer maps a 2-D float matrix X (rows x cols; rows = samples for gradients) to
// u8 codes q in [0, B], B = 2^bits - 1, with one affine grid per group (tensor, row or column):
//     value = q / scale + lo
// BHQ quantizes T X per row instead of X and carries T: value = T^-1 (q / scale + lo).
// Arithmetic follows ../shared/SPEC.md section 2 exactly; see docs/QUANTIZERS.md.
//
// Two implementations share one contract and must give bit-identical codes:
//   quantize_ref — plain single-threaded loops, the oracle (src/kernels/cpu/quantize_ref.cpp)
//   quantize     — threaded fast path (src/kernels/cpu/quantize.cpp)
// Random numbers for stochastic rounding of element (r, c) are uniform_at(key, r * cols + c),
// so codes depend only on (input, spec, key): never on thread count.
#pragma once

#include "fqt/rng.hpp"
#include "fqt/tensor.hpp"

#include <algorithm>
#include <memory>
#include <new>
#include <optional>
#include <type_traits>
#include <utility>
#include <string>
#include <vector>

namespace fqt {

enum class Granularity : uint8_t { tensor, row, column };
enum class Rounding : uint8_t { nearest, stochastic };

enum class QuantizerKind : uint8_t {
  // Deterministic (nearest rounding): forward activations and weights.
  affine,         // per-tensor min/max grid
  symmetric,      // per-tensor symmetric grid, codes centred on 2^(b-1) - 1
  symmetric_row,  // symmetric, one grid per row (per output channel of a weight)
  zero_aligned,   // per-tensor, range widened to contain 0 and 0 exactly on a code
  // Stochastic (unbiased): gradients.
  ptq,       // per-tensor
  ptq_zero,  // per-tensor, zero-aligned grid (the authors' weight grid, stochastic)
  psq,       // per-sample: one grid per row
  column,    // per-column: one grid per column (wgrad operand)
  bhq,       // block Householder transform, then per row
};

// The table of quantizers (ggml-style type traits): tests and the CLI loop over it.
struct QuantizerTraits {
  QuantizerKind kind;
  const char* name;   // CLI / JSON name
  Granularity granularity;
  Rounding rounding;
  const char* description;
};
const std::vector<QuantizerTraits>& quantizer_table();
const QuantizerTraits& traits(QuantizerKind kind);
// Parses a name from the table; throws InputError listing the valid names otherwise.
QuantizerKind parse_quantizer(const std::string& name);

struct QuantizerSpec {
  QuantizerKind kind = QuantizerKind::psq;
  int bits = 8;  // 2..8
};

// BHQ's transform T = P^T Hblk P diag(s) (SPEC section 2), stored in block form.
// Group g consists of rows members[offsets[g] .. offsets[g+1]) (original row indices, the large
// row first); within a group T applies row scaling then the Householder reflection H_n that maps
// e1 to (1,...,1)/sqrt(n). Rows keep their original positions: P only gathers and scatters.
struct BhqTransform {
  int64_t rows = 0;
  std::vector<float> row_scale;      // s_r, indexed by original row
  std::vector<int64_t> offsets;      // groups + 1 entries
  std::vector<int64_t> members;      // rows entries
  // Row r's group g, indexed by original row, stored as ~g (< 0) when r is g's first (large)
  // row: the row-order view of members/offsets, so that a pass over the rows in order needs no
  // scattered lookups (bhq_transform_from_ranges fills it; fill_row_group() for a transform
  // assembled from members/offsets alone).
  std::vector<int32_t> row_group;
  int64_t num_groups() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t group_size(int64_t g) const { return offsets[g + 1] - offsets[g]; }
  int64_t group_of(int64_t r) const { return row_group[r] < 0 ? ~row_group[r] : row_group[r]; }
  bool leads_group(int64_t r) const { return row_group[r] < 0; }
  // Groups [first, second) holding about the t-th of nt equal slices of the members: for loops
  // over groups split between threads by rows, not by groups (the first groups, whose large rows
  // have the largest ranges, hold the most small rows; an equal number of groups per thread gave
  // the first thread most of the rows).
  std::pair<int64_t, int64_t> group_slice(int t, int nt) const {
    if (offsets.size() < 2) return {0, 0};
    auto at = [&](int u) {
      const int64_t i = rows * u / nt;
      return static_cast<int64_t>(std::lower_bound(offsets.begin(), offsets.end() - 1, i) - offsets.begin());
    };
    return {at(t), at(t + 1)};
  }
  void fill_row_group();
  // This transform when its row_group is filled, else `copy` made from it with fill_row_group().
  const BhqTransform& with_row_group(BhqTransform& copy) const;

  // out = T x, x and out are rows x cols (may not alias). Plain loops.
  void apply(const float* x, float* out, int64_t cols) const;
  // out = T^-1 y (may not alias). Plain loops.
  void apply_inverse(const float* y, float* out, int64_t cols) const;
  // ||T^-1 e_r||^2: how much variance added to row r of T x shows up after T^-1.
  std::vector<double> inverse_column_norms2() const;
  // ||T^-1||_inf, the largest row sum of |T^-1|: how far an error of at most 1 in each element of
  // T x can move an element of T^-1 (T x) (tests bound the integer dgrad and the rounding by it).
  double inverse_inf_norm() const;
};

// Builds the transform for X (rows x cols) exactly as SPEC section 2 describes.
BhqTransform bhq_transform(const float* x, int64_t rows, int64_t cols);
// Steps 2-5 from the row ranges m (row r: max - min + 1e-8, in double) and their order
// rank = bhq_rank_descending(m). bhq_transform is this on plain-loop ranges and rank; the fast
// CPU quantizer computes both in parallel (src/kernels/cpu/bhq_fast.cpp) and calls it too.
BhqTransform bhq_transform_from_ranges(const std::vector<double>& m, const std::vector<int64_t>& rank);
// The same transform, member for member and float for float, with the groups' scales computed
// 8 at a time (quant_detail::bhq_inv_cbrt_batch): what the fast CPU quantizer calls.
BhqTransform bhq_transform_from_ranges_batched(const std::vector<double>& m, const std::vector<int64_t>& rank);
// The same in two stages, for a caller that overlaps the first (one thread: the ranges in rank
// order, the large/small split, the shares and the group offsets) with other work:
// bhq_transform_from_ranges(m, rank) = bhq_shares(m, rank, s), then bhq_transform_from_shares(s,
// rank, false) (which takes s.offsets; s keeps its buffers for the next call).
struct BhqShares {
  int64_t rows = 0, large = 0;    // N and the number of groups (large rows)
  std::vector<double> v, prefix;  // ranges in rank order, their prefix sums
  std::vector<int64_t> nums;      // cumulative small-row counts of the large rows
  std::vector<int64_t> offsets;   // the groups' member offsets (large + 1)
};
void bhq_shares(const std::vector<double>& m, const std::vector<int64_t>& rank, BhqShares& s);
// storage: a transform whose row_scale, row_group and members already hold s.rows elements (any
// values: every one is written) is filled in place, e.g. sized by a thread with time to spare.
BhqTransform bhq_transform_from_shares(BhqShares& s, const std::vector<int64_t>& rank, bool batched,
                                       BhqTransform* storage = nullptr);
// BHQ's row order (step 1): indices by range m descending, ties by index (a stable radix sort;
// every m must be > 0).
std::vector<int64_t> bhq_rank_descending(const std::vector<double>& m);
// Householder helpers: H_n = I - 2 v v^T with v = (e1 - u) / ||e1 - u||, u = 1/sqrt(n).
// v_1 and v_k (k > 1) for group size n; and Qmax(n) = max |H_n entry|.
void householder_v(int64_t n, float& v_first, float& v_rest);
double householder_qmax(int64_t n);
// householder_v for loops over many groups or rows: the small sizes' table fetched once, then
// an inline lookup (the same floats; a call per group or row was ~0.5% of the BHQ step in perf).
class HouseholderV {
 public:
  HouseholderV();
  void operator()(int64_t n, float& v_first, float& v_rest) const {
    if (n >= 0 && n < kTable) {
      v_first = vf_[n], v_rest = vr_[n];
      return;
    }
    householder_v(n, v_first, v_rest);
  }
  static constexpr int64_t kTable = 64;

 private:
  const float* vf_;
  const float* vr_;
};

// std::allocator, except that value-initialization (resize(n), vector(n)) leaves the values
// unset: the grids of a per-row quantizer (10^5 of them for a conv layer's gradient, written by
// the parallel pass that rounds the rows) were first zeroed on the calling thread (~0.5% of a
// PreAct-ResNet-20 step, perf, session 23). resize(n, value) and the other constructors initialize
// as usual.
template <class T>
struct DefaultInitAllocator : std::allocator<T> {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = DefaultInitAllocator<U>;
  };
  DefaultInitAllocator() noexcept = default;
  template <class U>
  DefaultInitAllocator(const DefaultInitAllocator<U>&) noexcept {}
  template <class U>
  void construct(U* p) noexcept(std::is_nothrow_default_constructible_v<U>) {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using GridValues = std::vector<float, DefaultInitAllocator<float>>;

struct QuantizedTensor {
  QuantizerSpec spec;
  int64_t rows = 0, cols = 0;
  Tensor codes;                           // u8 [rows, cols], each in [0, 2^bits - 1]
  GridValues scale;                       // per group: codes per unit (resize leaves them unset)
  GridValues lo;                          // per group: the value of code 0
  std::optional<BhqTransform> transform;  // BHQ only

  // BHQ's T acts on the values viewed as [transform->rows, rows * cols / transform->rows]: a row
  // of the codes per row of T, or (quantize_samples_nchw) each sample's P pixel rows per row of T.
  int64_t rows_per_transform_row() const { return transform && transform->rows > 0 ? rows / transform->rows : 1; }

  Granularity granularity() const { return traits(spec.kind).granularity; }
  int max_code() const { return (1 << spec.bits) - 1; }
  // Group index of element (r, c).
  int64_t group(int64_t r, int64_t c) const {
    switch (granularity()) {
      case Granularity::tensor: return 0;
      case Granularity::row: return r;
      case Granularity::column: return c;
    }
    return 0;
  }
};

// X must be a 2-D f32 tensor (a tensor of higher rank is viewed as [size(0), rest]) with only
// finite values (NonFiniteError otherwise). `key` is ignored by deterministic quantizers.
QuantizedTensor quantize(const Tensor& x, QuantizerSpec spec, RngKey key = {});
QuantizedTensor quantize_ref(const Tensor& x, QuantizerSpec spec, RngKey key = {});
// quantize(x, spec) when [mn, mx] is already known to be X's exact min and max (a producer that
// wrote X computed them on the way): the same codes and grid, one pass over X instead of two.
// Only deterministic per-tensor quantizers use the range; any other spec quantizes as quantize().
// A non-finite range throws as quantize() does on non-finite data.
QuantizedTensor quantize_in_range(const Tensor& x, QuantizerSpec spec, float mn, float mx);
// Whether quantize_in_range uses the range for `spec` (deterministic per-tensor quantizers).
bool quantize_uses_range(QuantizerSpec spec);
// Two independent quantizations of the same X (the bifurcated gradient: the dgrad and the wgrad
// draw), equal code for code to {quantize(x, a, ka), quantize(x, b, kb)}. When both are
// stochastic per-row or per-tensor quantizers (not BHQ), it reads X twice instead of four
// times: one min/max pass gives the row ranges and, from them, the tensor range; one rounding
// pass writes both codes. With `range` = {min, max}, X's exact range known from whoever wrote X
// (nchw_to_rows), it reads X once: each block of rows gets its row ranges, grids and both
// roundings while in cache. Otherwise it makes the two calls. (BHQ's dgrad draw with a per-tensor
// wgrad draw: the wgrad draw is rounded while BHQ's rank sort runs; `range` is not needed.)
std::pair<QuantizedTensor, QuantizedTensor> quantize_pair(const Tensor& x, QuantizerSpec a, RngKey ka, QuantizerSpec b,
                                                          RngKey kb, const float* range = nullptr);
// quantize_pair(nchw_to_rows(x), ...) for x of shape N, C, H, W (or N, C, ...): the rows of G in
// the SPEC's layout [(N*H*W), C], code for code, without writing that fp32 copy: one min/max pass
// over x for its range, then each block of rows is transposed from x into cache and both draws
// rounded there. For the pairs quantize_pair reads once (quantize_pair_fuses: both draws
// stochastic, per row or per tensor, not BHQ). With `range` ({min, max} of x, exact, taken by the
// pass that wrote x, which also found no NaN: BatchNorm2d's backward) the min/max pass is skipped.
bool quantize_pair_fuses(QuantizerSpec a, QuantizerSpec b);
std::pair<QuantizedTensor, QuantizedTensor> quantize_pair_nchw(const Tensor& x, QuantizerSpec a, RngKey ka,
                                                               QuantizerSpec b, RngKey kb, const float* range = nullptr);
// A convolution gradient x [N, C, H, W] (or N, C, ...) with a row per sample (Recipe::dgrad_rows
// = sample, the paper's code): the row-wise stochastic quantizer `a` (psq, bhq) on x viewed as
// [N, C*P], P = H*W, i.e. quantize(x, a, ka) code for code (a grid per sample; BHQ's T across
// the N samples), but with the codes stored as G's pixel rows [(N*P), C] (the integer dgrad's
// layout): code (n*P + p, c) is element (n, c*P + p) of quantize(x, a, ka). Each sample's grid is
// repeated on its P rows (scale, lo: N*P entries); BHQ's transform has N rows and acts on the
// values viewed as [N, P*C] (rows_per_transform_row() = P; dequantize applies it so).
// With `b`: a second, independent draw of x on G's pixel rows, code for code
// quantize(rows of G, b, kb) as quantize_pair_nchw makes it; a per-tensor or per-row stochastic
// `b` (not BHQ) is rounded in the same pass over x, with `range` = x's {min, max} when known
// (as quantize_pair_nchw). The second result is empty without `b`.
// With `sample_lo` / `sample_hi` (N each: every sample's exact min and max, from the pass that
// wrote x and found it finite, BatchNorm2d's backward): the same codes without taking them again
// (BHQ's range pass over x; PSQ's per-sample min / max). Given ranges that cannot be such (one not
// finite, or lo > hi) are ignored and taken from x. BHQ's T x overflowing float for a finite x
// throws NonFiniteError, as a non-finite x does.
std::pair<QuantizedTensor, QuantizedTensor> quantize_samples_nchw(const Tensor& x, QuantizerSpec a, RngKey ka,
                                                                  const QuantizerSpec* b = nullptr, RngKey kb = {},
                                                                  const float* range = nullptr,
                                                                  const float* sample_lo = nullptr,
                                                                  const float* sample_hi = nullptr);
// The plain-loop oracle of quantize_samples_nchw's first draw: quantize_ref(x viewed [N, C*P])
// with its codes and grids laid out as pixel rows.
QuantizedTensor quantize_samples_nchw_ref(const Tensor& x, QuantizerSpec a, RngKey ka);
// f32 [rows, cols]; applies T^-1 for BHQ.
Tensor dequantize(const QuantizedTensor& q);

// The deterministic half of quantization: the grids (and BHQ transform) for X, and the
// matrix the grids apply to (X itself, or T X for BHQ). quantize = prepare + rounding.
struct QuantPlan {
  QuantizedTensor q;  // everything but the codes
  Tensor source;      // f32 [rows, cols]: what gets rounded
};
QuantPlan quant_plan(const Tensor& x, QuantizerSpec spec);

// Throws NonFiniteError naming the first NaN/Inf position, if any. `what` names the tensor.
void check_finite(const Tensor& x, const char* what);

// Sets the number of threads of fqt's CPU kernels: 1..kMaxThreads, or 0 for the process's
// initial default (OMP_NUM_THREADS, else all cores). Anything else is an InputError naming
// --threads (libgomp crashes or fails on tens of thousands of threads).
inline constexpr int kMaxThreads = 1024;
void set_num_threads(int n);
int num_threads();

}  // namespace fqt
