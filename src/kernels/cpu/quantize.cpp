// Fast CPU quantizers: threaded min/max and rounding; stochastic rounding draws its uniforms 16
// Philox blocks at a time (philox_batch.hpp).
// Contract: bit-identical codes to quantize_ref (tests/unit/test_quantize.cpp).
#include "fqt/profile.hpp"
#include "bhq_fast.hpp"
#include "minmax.hpp"
#include "philox_avx512.hpp"
#include "philox_batch.hpp"
#include "round_run.hpp"
#include "transpose.hpp"
#include "quant/grid.hpp"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fqt {
using namespace quant_detail;
using kernels::minmax_lanes;
using kernels::round_run_nearest;
using kernels::round_run_stochastic;
#if defined(__AVX512F__)
using kernels::kAll16;
#endif

namespace {

// Per-group min and max; returns true when the data hold a NaN or an Inf (then the caller
// reports where, through check_finite).
// Row granularity: with `whole`, also the tensor's min and max (whole[0], whole[1]), reduced
// in the same parallel loop (a serial loop over the row ranges afterwards took ~0.16 ms per
// stage-1 gradient while the other thread waited).
bool group_minmax(const float* x, int64_t rows, int64_t cols, Granularity g, std::vector<double>& mn,
                  std::vector<double>& mx, double* whole = nullptr) {
  uint32_t nan = 0;
  const int64_t groups = num_groups(g, rows, cols);
  mn.assign(groups, std::numeric_limits<double>::infinity());
  mx.assign(groups, -std::numeric_limits<double>::infinity());
  if (g == Granularity::row) {
    float tlo = std::numeric_limits<float>::infinity(), thi = -tlo;
    constexpr int64_t kBlock = 64;  // rows per step of kernels::minmax_rows (16 at a time for rows of 16)
#pragma omp parallel for reduction(| : nan) reduction(min : tlo) reduction(max : thi) schedule(static) \
    if (rows * cols > kParallelMin)
    for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
      const int64_t n = std::min(kBlock, rows - r0);
      float a[kBlock], b[kBlock];
      kernels::minmax_rows(x + r0 * cols, n, cols, a, b, nan);
      for (int64_t i = 0; i < n; ++i) {
        if (cols) mn[r0 + i] = a[i], mx[r0 + i] = b[i];
        tlo = std::min(tlo, a[i]), thi = std::max(thi, b[i]);
      }
    }
    if (whole) whole[0] = tlo, whole[1] = thi;
  } else if (g == Granularity::column) {
    // Each thread owns a slice of columns and walks all rows (row-major friendly).
#pragma omp parallel reduction(| : nan) if (rows * cols > kParallelMin)
    {
      std::vector<float> a(cols, std::numeric_limits<float>::infinity()), b(cols, -std::numeric_limits<float>::infinity());
#pragma omp for schedule(static)
      for (int64_t c0 = 0; c0 < cols; c0 += 256) {
        const int64_t c1 = std::min(cols, c0 + 256);
        for (int64_t r = 0; r < rows; ++r) {
          const float* p = x + r * cols;
          for (int64_t c = c0; c < c1; ++c) {
            a[c] = std::min(a[c], p[c]);
            b[c] = std::max(b[c], p[c]);
            nan |= static_cast<uint32_t>(p[c] != p[c]);
          }
        }
        if (rows)
          for (int64_t c = c0; c < c1; ++c) mn[c] = a[c], mx[c] = b[c];
      }
    }
  } else {
    float a = std::numeric_limits<float>::infinity(), b = -a;
    const int64_t n = rows * cols, chunk = 1 << 14, chunks = (n + chunk - 1) / chunk;
#pragma omp parallel for reduction(min : a) reduction(max : b) reduction(| : nan) schedule(static) if (n > kParallelMin)
    for (int64_t ch = 0; ch < chunks; ++ch)
      minmax_lanes(x + ch * chunk, std::min(chunk, n - ch * chunk), a, b, nan);
    if (n) mn[0] = a, mx[0] = b;
  }
  if (nan) return true;
  for (size_t i = 0; i < mn.size(); ++i)
    if (!std::isfinite(mn[i]) || !std::isfinite(mx[i])) return true;
  return false;
}

// The stochastic rounding pass over a rows x cols matrix, for one or more independent draws:
// the flat element range in fixed chunks of kChunk elements (a multiple of 4, so each chunk
// starts on a Philox block); the uniforms of a chunk come 16 blocks at a time
// (kernels::fill_uniforms), one buffer per key, then `piece(e, run, r, c, u)` rounds each row
// piece of the chunk: elements e .. e+run-1 (row r, from column c), u[k] = key k's uniforms for
// element e. Element e gets the same uniform whatever the chunking or thread count.
// `whole(e0, e1, u)`, when given, is called once per chunk after its row pieces, with the
// chunk's uniforms (u[k] = key k's uniform for element e0): for a draw on one per-tensor grid,
// which needs no row boundaries.
struct NoWhole {
  void operator()(int64_t, int64_t, const float* const*) const {}
};
template <int K, typename Piece, typename Whole = NoWhole>
void stochastic_pass(int64_t rows, int64_t cols, const RngKey (&keys)[K], Piece&& piece, Whole&& whole = {}) {
  constexpr int64_t kChunk = 4096;
  const int64_t total = rows * cols, chunks = (total + kChunk - 1) / kChunk;
#pragma omp parallel if (total > kParallelMin)
  {
    std::vector<float> buf(static_cast<size_t>(K * kChunk));
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t e0 = ch * kChunk, e1 = std::min(total, e0 + kChunk);
      for (int k = 0; k < K; ++k)
        kernels::fill_uniforms(keys[k], static_cast<uint64_t>(e0) >> 2, (e1 - e0 + 3) / 4, buf.data() + k * kChunk);
      int64_t r = e0 / cols, c = e0 % cols;
      for (int64_t e = e0; e < e1;) {
        const int64_t run = std::min(e1 - e, cols - c);
        const float* u[K];
        for (int k = 0; k < K; ++k) u[k] = buf.data() + k * kChunk + (e - e0);
        piece(e, run, r, c, u);
        e += run, ++r, c = 0;
      }
      const float* u0[K];
      for (int k = 0; k < K; ++k) u0[k] = buf.data() + k * kChunk;
      whole(e0, e1, u0);
    }
  }
}

// BHQ in one pass over the rows after the transform is built: each row of T x is formed in a
// small buffer (bhq_row), its range gives the row's grid, and it is rounded at once, so the
// [rows, cols] matrix T x is never stored and read back (bench_quantizers, session 8). With `sb`,
// a second draw of x on a per-tensor grid (the wgrad operand: quantize_pair) is rounded while the
// rank sort runs; its range comes from the row-range pass. Element e of each draw gets its key's
// uniform e (fill_uniforms from e's Philox block), so the codes are those of the separate passes
// bit for bit, on any thread count (tests/unit/test_quantize.cpp).
QuantizedTensor quantize_bhq(const Tensor& x, QuantizerSpec sa, RngKey ka, const QuantizerSpec* sb, RngKey kb,
                             QuantizedTensor* qb_out) {
  profile::PhaseScope phase("bhq quantizer: row ranges");
  const int64_t rows = x.size(0), cols = x.size(1);
  const float* src = x.data<float>();
  float tmn = 0.0f, tmx = 0.0f;
  bool nan = false;
  // The input is checked by the range pass itself (a NaN flagged, an Inf in the range); only then
  // does check_finite scan it, to throw with the place.
  const std::vector<double> m = kernels::bhq_row_ranges(src, rows, cols, &tmn, &tmx, &nan);
  if (nan || (rows * cols > 0 && !(std::isfinite(tmn) && std::isfinite(tmx)))) {
    check_finite(x, "quantizer input");  // throws, naming the element
    FQT_CHECK(false, "quantizer input: the range pass saw a non-finite value that check_finite did not find");
  }
  QuantizedTensor qa;
  qa.spec = sa, qa.rows = rows, qa.cols = cols;
  QuantizedTensor qb;
  if (sb) {
    const double a = tmn, b = tmx;
    qb = make_header(*sb, rows, cols, &a, &b);
    qb.codes = Tensor::empty({rows, cols}, DType::u8);
  }
  const int Bb = sb ? qb.max_code() : 0;
  uint8_t* cb = sb ? qb.codes.data<uint8_t>() : nullptr;
  // The rank sort runs on one thread (bhq_rank_descending_parallel: two were slower); the second
  // draw (one per-tensor grid, from the range pass) needs no rank, so another thread rounds it
  // meanwhile, chunk by chunk from each chunk's first Philox block (element e: uniform e of kb,
  // as in the one-pass form). Sections: each runs once whatever the number of threads.
  std::vector<int64_t> rank;
  auto second_draw = [&] {
    constexpr int64_t kChunk = 4096;  // a multiple of 4: each chunk starts on a Philox block
    std::vector<float> u(static_cast<size_t>(kChunk));
    const float lo = qb.lo[0], scale = qb.scale[0];
    for (int64_t e0 = 0; e0 < rows * cols; e0 += kChunk) {
      const int64_t n = std::min(kChunk, rows * cols - e0);
      kernels::fill_uniforms(kb, static_cast<uint64_t>(e0) >> 2, (n + 3) / 4, u.data());
      round_run_stochastic(src + e0, u.data(), n, lo, scale, Bb, cb + e0);
    }
  };
  // The grouping's serial part (shares, offsets) follows the sort on its thread, also hidden
  // behind the second draw; the groups' members and scales are filled on all threads after.
  // (By reference: inside the sections `shares_tl` would name the running thread's own copy.)
  static thread_local BhqShares shares_tl;
  BhqShares& shares = shares_tl;
  BhqTransform storage;
  std::exception_ptr err1, err2;  // an exception may not leave a section
  phase.next("bhq quantizer: rank sort, shares (beside the wgrad draw)");
#pragma omp parallel sections num_threads(std::min(2, omp_get_max_threads())) if (sb && rows * cols > kParallelMin)
  {
#pragma omp section
    try {
      rank = kernels::bhq_rank_descending_parallel(m);
      bhq_shares(m, rank, shares);
    } catch (...) {
      err1 = std::current_exception();
    }
#pragma omp section
    try {
      if (sb) second_draw();
      // Then, while the sort still runs, the arrays the grouping and the row pass fill whole
      // (~2 MB in stage 1 that value-initializing wrote on one thread after the sections).
      qa.scale.resize(static_cast<size_t>(rows)), qa.lo.resize(static_cast<size_t>(rows));
      storage.row_scale.resize(static_cast<size_t>(rows));
      storage.row_group.resize(static_cast<size_t>(rows));
      storage.members.resize(static_cast<size_t>(rows));
    } catch (...) {
      err2 = std::current_exception();
    }
  }
  if (err1) std::rethrow_exception(err1);
  if (err2) std::rethrow_exception(err2);
  phase.next("bhq quantizer: groups (members, scales)");
  qa.transform = bhq_transform_from_shares(shares, rank, true, &storage);
  const BhqTransform& t = *qa.transform;
  qa.codes = Tensor::empty({rows, cols}, DType::u8);
  phase.next("bhq quantizer: group sums");
  const float* dots = kernels::bhq_group_dots(t, src, cols);
  phase.next("bhq quantizer: rows transformed, rounded");
  const int Ba = qa.max_code();
  uint8_t* ca = qa.codes.data<uint8_t>();
  const int64_t R = std::max<int64_t>(1, 4096 / cols), chunks = (rows + R - 1) / R;
  const int64_t ubuf = R * cols + 8;  // a chunk's elements from its first Philox block on
  uint32_t tx_bad = 0;
#pragma omp parallel reduction(| : tx_bad) if (rows * cols > kParallelMin)
  {
    // Per chunk, three short passes over L1-resident buffers: the rows of T x and their ranges,
    // the rows' grids (independent divisions that overlap: one row at a time waited on each),
    // then the rounding.
    std::vector<float> buf(static_cast<size_t>(ubuf)), tx(static_cast<size_t>(R * cols));
    std::vector<float> mn(static_cast<size_t>(R)), mx(static_cast<size_t>(R));
    std::vector<double> dlo(static_cast<size_t>(R)), dhi(static_cast<size_t>(R));
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t r0 = ch * R, r1 = std::min(rows, r0 + R), e0 = r0 * cols, e1 = r1 * cols;
      const uint64_t b0 = static_cast<uint64_t>(e0) >> 2;
      const int64_t base = static_cast<int64_t>(b0 * 4), nblocks = (e1 - base + 3) / 4;
      for (int64_t r = r0; r < r1; ++r) kernels::bhq_row(t, dots, src, cols, r, tx.data() + (r - r0) * cols);
      uint32_t nan = 0;  // (finite input, checked above; T x can still overflow: bad)
      kernels::minmax_rows(tx.data(), r1 - r0, cols, mn.data(), mx.data(), nan);
      for (int64_t i = 0; i < r1 - r0; ++i) nan |= static_cast<uint32_t>(!std::isfinite(mn[i]) || !std::isfinite(mx[i]));
      tx_bad |= nan;
      float* __restrict sc = qa.scale.data();
      float* __restrict lo = qa.lo.data();
      for (int64_t i = 0; i < r1 - r0; ++i) dlo[i] = mn[i], dhi[i] = mx[i];
      make_grids(sa, dlo.data(), dhi.data(), r1 - r0, sc + r0, lo + r0);  // make_header's grids of these rows
      kernels::fill_uniforms(ka, b0, nblocks, buf.data());
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t e = r * cols;
        round_run_stochastic(tx.data() + (r - r0) * cols, buf.data() + (e - base), cols, lo[r], sc[r], Ba, ca + e);
      }
    }
  }
  if (tx_bad) quant_detail::throw_transformed_not_finite();
  if (qb_out) *qb_out = std::move(qb);
  return qa;
}

// The deterministic rounding pass: every element on its group's grid (q holds the grids; its
// codes are written).
void nearest_pass(const float* src, int64_t rows, int64_t cols, QuantizedTensor& q) {
  const Granularity gran = q.granularity();
  const int B = q.max_code();
  uint8_t* codes = q.codes.data<uint8_t>();
  const float* scale = q.scale.data();
  const float* lo = q.lo.data();
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict s = src + r * cols;
    uint8_t* __restrict o = codes + r * cols;
    if (gran == Granularity::column) {
      for (int64_t c = 0; c < cols; ++c) o[c] = round_nearest(grid_pos(s[c], lo[c], scale[c]), B);
    } else {
      const int64_t gi = gran == Granularity::tensor ? 0 : r;
      round_run_nearest(s, cols, lo[gi], scale[gi], B, o);
    }
  }
}

// A quantize_pair draw's header with its codes allocated: a per-tensor grid from [tmn, tmx]; per-row
// grids from rmn / rmx, or, when rmn is null, sized for the caller to fill.
QuantizedTensor pair_header(QuantizerSpec s, int64_t rows, int64_t cols, const double* rmn, const double* rmx,
                            double tmn, double tmx) {
  QuantizedTensor q;
  if (traits(s.kind).granularity != Granularity::row) {
    q = make_header(s, rows, cols, &tmn, &tmx);
  } else if (rmn) {
    q = make_header(s, rows, cols, rmn, rmx);
  } else {
    q.spec = s, q.rows = rows, q.cols = cols;
    q.scale.resize(static_cast<size_t>(rows)), q.lo.resize(static_cast<size_t>(rows));
  }
  q.codes = Tensor::empty({rows, cols}, DType::u8);
  return q;
}

// quantize_pair's two stochastic draws (per-row or per-tensor grids) in one pass over X, given X's
// exact range [tmn, tmx]: per block of R rows (R * cols ~ 4096 values, in L1), the rows' ranges
// (minmax_rows) and grids (make_grids: make_header's), then both draws' uniforms from the block's
// first Philox block and the rounding. Element e of each draw gets its key's uniform e, and the
// grids are make_header's, so the codes are those of the two-pass form bit for bit.
// (The two-pass form read X once for the row ranges and once to round; X is the layer's gradient,
// 6.4 MB in stage 1, written just before by nchw_to_rows, which now also reports its range.)
// The rows come from load(r0, n, buf): a pointer to rows r0 .. r0 + n of X ([n, cols], contiguous),
// X itself or a block of it laid out in buf (R * cols floats, the thread's own): quantize_pair
// passes X's rows, quantize_pair_nchw a block transposed from an N,C,H,W tensor into cache.
template <typename Load>
std::pair<QuantizedTensor, QuantizedTensor> pair_one_pass(const Tensor& x, int64_t rows, int64_t cols, Load&& load,
                                                          QuantizerSpec sa, RngKey ka, QuantizerSpec sb, RngKey kb,
                                                          float tmn, float tmx) {
  if (!std::isfinite(tmn) || !std::isfinite(tmx)) check_finite(x, "quantizer input");
  FQT_CHECK(std::isfinite(tmn) && std::isfinite(tmx) && tmn <= tmx,
            "quantize_pair: range [{}, {}] is not that of finite data", tmn, tmx);
  QuantizedTensor qa = pair_header(sa, rows, cols, nullptr, nullptr, tmn, tmx);  // row grids: block by block below
  QuantizedTensor qb = pair_header(sb, rows, cols, nullptr, nullptr, tmn, tmx);
  const bool row_a = qa.granularity() == Granularity::row, row_b = qb.granularity() == Granularity::row;
  const int Ba = qa.max_code(), Bb = qb.max_code();
  uint8_t* ca = qa.codes.data<uint8_t>();
  uint8_t* cb = qb.codes.data<uint8_t>();
  const int64_t R = std::max<int64_t>(1, 4096 / cols), chunks = (rows + R - 1) / R;
  const int64_t ubuf = R * cols + 8;  // a block's elements from its first Philox block on
  uint32_t bad = 0;
#pragma omp parallel reduction(| : bad) if (rows * cols > kParallelMin)
  {
    std::vector<float> u(static_cast<size_t>(2 * ubuf)), mn(static_cast<size_t>(R)), mx(static_cast<size_t>(R));
    std::vector<float> blk(static_cast<size_t>(R * cols));
    std::vector<double> dlo(static_cast<size_t>(R)), dhi(static_cast<size_t>(R));
#pragma omp for schedule(static)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t r0 = ch * R, r1 = std::min(rows, r0 + R), n = r1 - r0, e0 = r0 * cols, e1 = r1 * cols;
      const uint64_t b0 = static_cast<uint64_t>(e0) >> 2;
      const int64_t base = static_cast<int64_t>(b0 * 4), nblocks = (e1 - base + 3) / 4;
      const float* const src = load(r0, n, blk.data());  // element e0 + i at src[i]
      if (row_a || row_b) {
        uint32_t nan = 0;
        kernels::minmax_rows(src, n, cols, mn.data(), mx.data(), nan);
        bad |= nan;
        for (int64_t i = 0; i < n; ++i) dlo[i] = mn[i], dhi[i] = mx[i];
        if (row_a) make_grids(sa, dlo.data(), dhi.data(), n, qa.scale.data() + r0, qa.lo.data() + r0);
        if (row_b) make_grids(sb, dlo.data(), dhi.data(), n, qb.scale.data() + r0, qb.lo.data() + r0);
      }
      float* ua = u.data();
      float* ub = u.data() + ubuf;
      kernels::fill_uniforms(ka, b0, nblocks, ua);
      kernels::fill_uniforms(kb, b0, nblocks, ub);
      auto round = [&](bool row, const QuantizedTensor& q, const float* uu, int B, uint8_t* c) {
        if (!row) {
          round_run_stochastic(src, uu + (e0 - base), e1 - e0, q.lo[0], q.scale[0], B, c + e0);
          return;
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t e = r * cols;
          round_run_stochastic(src + (e - e0), uu + (e - base), cols, q.lo[r], q.scale[r], B, c + e);
        }
      };
      round(row_a, qa, ua, Ba, ca);
      round(row_b, qb, ub, Bb, cb);
    }
  }
  if (bad) check_finite(x, "quantizer input");  // throws: NaN the range did not show
  return {std::move(qa), std::move(qb)};
}

#if defined(__AVX512F__)
// quantize_pair_nchw's two draws for C a multiple of 16, straight from the N,C,H,W gradient in
// channel-major form: no rows of G are formed. Per 16 positions p0.. of one sample (rows r0 ..
// r0 + 15 of G), channel c's 16 values are one vector (x[n, c, p0 ..]), so
//  * the rows' ranges are a vertical min / max over the C vectors (no transposing tree),
//  * the uniforms come out of Philox already channel-major: lane i of set j computes block
//    (r0 + i) C/4 + j, whose word w is the uniform of element (r0 + i) C + 4j + w, i.e. of row
//    r0 + i, channel 4j + w (fill_uniforms computes the same blocks in order and transposes them
//    to element order; here nothing is stored or transposed),
//  * the codes, rounded as round_run_stochastic does (the same IEEE operations), are packed four
//    channels to a 32-bit lane and transposed as 4 x 4 blocks of lanes into G's row layout.
// Element e gets its key's uniform e and every grid is make_grids', so the codes are
// pair_one_pass's bit for bit (tests/unit/test_quantize.cpp, PairNchwEqualsPairOfRows).
// A sample's last positions (P not a multiple of 16) go through small zero-padded buffers.
// (GCC 12's false maybe-uninitialized warning inside its AVX-512 headers, as in philox_batch.cpp.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The pieces of pair_nchw16, shared with quantize_samples_nchw's per-sample kernel.
struct Nchw16 {
  // The 4 x 4 transpose of 32-bit lanes: level 1 interleaves two packed vectors' first / last 8
  // lanes, level 2 two of those pairs' 4-lane runs.
  __m512i i1lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  __m512i i1hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  __m512i i2lo = _mm512_setr_epi32(0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23);
  __m512i i2hi = _mm512_setr_epi32(8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31);
  // One code per lane: x on the grid (vlo, vsc) with uniform u, rounded as round_run_stochastic does.
  [[gnu::always_inline]] __m512i code(__m512 x, __m512 u, __m512 vlo, __m512 vsc, __m512 vB) const {
    return kernels::stochastic_codes16(_mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(x, vlo), vsc), u), vB);
  }
  // code[j][t]: lane i = row r0 + i's code of channel k + 4j + t. Packed four channels to a
  // 32-bit lane, transposed as 4 x 4 blocks of lanes into G's row layout: rows r0 .. r0 + n - 1,
  // channels k .. k + 15, at `codes` (row r0, channel k; row stride C).
  [[gnu::always_inline]] void store(const __m512i (&code)[4][4], int64_t C, int64_t n, uint8_t* codes,
                                    uint8_t* out16) const {
    __m512i packed[4];  // lane i of packed[j]: row r0 + i's codes of channels k + 4j .. k + 4j + 3
    for (int j = 0; j < 4; ++j) {
      packed[j] = _mm512_ternarylogic_epi32(code[j][0], _mm512_slli_epi32(code[j][1], 8),
                                            _mm512_slli_epi32(code[j][2], 16), 0xFE);  // a | b | c
      packed[j] = _mm512_or_si512(packed[j], _mm512_slli_epi32(code[j][3], 24));
    }
    const __m512i b01lo = _mm512_permutex2var_epi32(packed[0], i1lo, packed[1]);
    const __m512i b01hi = _mm512_permutex2var_epi32(packed[0], i1hi, packed[1]);
    const __m512i b23lo = _mm512_permutex2var_epi32(packed[2], i1lo, packed[3]);
    const __m512i b23hi = _mm512_permutex2var_epi32(packed[2], i1hi, packed[3]);
    const __m512i o[4] = {_mm512_permutex2var_epi32(b01lo, i2lo, b23lo), _mm512_permutex2var_epi32(b01lo, i2hi, b23lo),
                          _mm512_permutex2var_epi32(b01hi, i2lo, b23hi), _mm512_permutex2var_epi32(b01hi, i2hi, b23hi)};
    if (C == 16 && n == 16) {  // rows r0 .. r0 + 15 are 256 contiguous codes
      for (int m = 0; m < 4; ++m) _mm512_storeu_si512(codes + 64 * m, o[m]);
    } else {  // each row's 16 codes at its place (row stride C)
      for (int m = 0; m < 4; ++m) _mm512_store_si512(out16 + 64 * m, o[m]);
      for (int64_t i = 0; i < n; ++i) std::memcpy(codes + i * C, out16 + 16 * i, 16);
    }
  }
  // Rows r0 .. r0 + 15's ranges (a vertical min / max over the C channel vectors of src, row
  // stride ld) and, for a draw with a grid per row, their grids (make_grids') into gsc / glo and
  // q's scale / lo of the unit's n rows.
  [[gnu::always_inline]] static void row_grids(const float* src, int64_t ld, int64_t C, int64_t n, int64_t r0,
                                               QuantizedTensor& q, float* gsc, float* glo) {
    __m512 mn = _mm512_loadu_ps(src), mx = mn;
    for (int64_t c = 1; c < C; ++c) {
      const __m512 v = _mm512_loadu_ps(src + c * ld);
      mn = _mm512_min_ps(mn, v), mx = _mm512_max_ps(mx, v);
    }
    const __m512d mn8[2] = {_mm512_cvtps_pd(_mm512_castps512_ps256(mn)), _mm512_cvtps_pd(_mm512_extractf32x8_ps(mn, 1))};
    const __m512d mx8[2] = {_mm512_cvtps_pd(_mm512_castps512_ps256(mx)), _mm512_cvtps_pd(_mm512_extractf32x8_ps(mx, 1))};
    const QuantizerSpec sp = q.spec;
    if (affine_grid_kind(sp.kind)) {  // make_grids' vector step inline (called per 16 rows it was ~20% of this pass)
      affine_grids8(mn8[0], mx8[0], sp.bits, gsc, glo);
      affine_grids8(mn8[1], mx8[1], sp.bits, gsc + 8, glo + 8);
    } else {
      double dlo[16], dhi[16];
      _mm512_storeu_pd(dlo, mn8[0]), _mm512_storeu_pd(dlo + 8, mn8[1]);
      _mm512_storeu_pd(dhi, mx8[0]), _mm512_storeu_pd(dhi + 8, mx8[1]);
      make_grids(sp, dlo, dhi, 16, gsc, glo);
    }
    std::copy(gsc, gsc + n, q.scale.data() + r0);
    std::copy(glo, glo + n, q.lo.data() + r0);
  }
  // One draw of rows r0 .. r0 + n - 1 of G (src: channel c's 16 values at src + c * ld) on the
  // grids (vlo, vsc) per lane, its uniforms from Philox in registers: lane i of set j computes
  // block (r0 + i) C/4 + k/4 + j, whose word w is the uniform of row r0 + i, channel k + 4j + w.
  [[gnu::always_inline]] void draw(const float* src, int64_t ld, int64_t C, int64_t n, int64_t r0, RngKey key,
                                   __m512 vlo, __m512 vsc, __m512 vB, uint8_t* codes, uint8_t* out16) const {
    using namespace kernels::philox512;
    const int64_t C4 = C / 4;
    const __m512i step = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(C4)));
    for (int64_t k = 0; k < C; k += 16) {  // channels k .. k + 15: Philox blocks (r0 + i) C/4 + k/4 + j
      __m512i c0[4], c1[4], c2[4], c3[4];
      for (int j = 0; j < 4; ++j) counters(key, static_cast<uint64_t>(r0 * C4 + k / 4 + j), step, c0[j], c1[j], c2[j], c3[j]);
      rounds<4, true>(key, c0, c1, c2, c3);
      __m512i cd[4][4];
      for (int j = 0; j < 4; ++j) {
        const __m512i w[4] = {c0[j], c1[j], c2[j], c3[j]};
        for (int t = 0; t < 4; ++t) cd[j][t] = code(_mm512_loadu_ps(src + (k + 4 * j + t) * ld), to_uniform(w[t]), vlo, vsc, vB);
      }
      store(cd, C, n, codes + k, out16);
    }
  }
};

void pair_nchw16(const float* xp, int64_t N, int64_t C, int64_t P, QuantizedTensor& qa, RngKey ka,
                 QuantizedTensor& qb, RngKey kb) {
  const int64_t per_sample = (P + 15) / 16, units = N * per_sample;
  QuantizedTensor* const qs[2] = {&qa, &qb};
  const RngKey keys[2] = {ka, kb};
  const bool rows_of[2] = {qa.granularity() == Granularity::row, qb.granularity() == Granularity::row};
  const Nchw16 k16;
#pragma omp parallel if (N * C * P > kParallelMin)
  {
    std::vector<float> tail(static_cast<size_t>(P % 16 ? C * 16 : 0));  // a short run's values, [C][16], zero-padded
    alignas(64) uint8_t out16[256];                         // 16 rows x 16 channels of codes
    alignas(64) float gsc[2][16], glo[2][16];
#pragma omp for schedule(static)
    for (int64_t unit = 0; unit < units; ++unit) {
      const int64_t s = unit / per_sample, p0 = (unit - s * per_sample) * 16, n = std::min<int64_t>(16, P - p0);
      const int64_t r0 = s * P + p0;
      const float* src = xp + s * C * P + p0;
      int64_t ld = P;
      if (n < 16) {
        for (int64_t c = 0; c < C; ++c) {
          std::fill(tail.begin() + c * 16, tail.begin() + c * 16 + 16, 0.0f);
          std::copy(src + c * P, src + c * P + n, tail.begin() + c * 16);
        }
        src = tail.data(), ld = 16;
      }
      for (int d = 0; d < 2; ++d)  // the rows' ranges, then their grids (make_grids)
        if (rows_of[d]) Nchw16::row_grids(src, ld, C, n, r0, *qs[d], gsc[d], glo[d]);
      for (int d = 0; d < 2; ++d) {
        QuantizedTensor& q = *qs[d];
        const __m512 vlo = rows_of[d] ? _mm512_load_ps(glo[d]) : _mm512_set1_ps(q.lo[0]);
        const __m512 vsc = rows_of[d] ? _mm512_load_ps(gsc[d]) : _mm512_set1_ps(q.scale[0]);
        const __m512 vB = _mm512_set1_ps(static_cast<float>(q.max_code()));
        k16.draw(src, ld, C, n, r0, keys[d], vlo, vsc, vB, q.codes.data<uint8_t>() + r0 * C, out16);
      }
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

}  // namespace

QuantizedTensor quantize(const Tensor& x_in, QuantizerSpec spec, RngKey key) {
  profile::Scope timer(profile::quantize);
  check_spec(spec);
  Tensor x = as_matrix(x_in);
  const int64_t rows = x.size(0), cols = x.size(1);
  const Granularity gran = traits(spec.kind).granularity;
  if (spec.kind == QuantizerKind::bhq && cols > 0) return quantize_bhq(x, spec, key, nullptr, {}, nullptr);
  // Non-finite input is found by the min/max pass below (one pass less). A BHQ matrix that
  // gets here has no columns: its transform is built (and checks nothing) as before.
  std::optional<BhqTransform> transform;
  std::vector<double> mn, mx;
  if (spec.kind == QuantizerKind::bhq) transform = kernels::bhq_transform_fast(x.data<float>(), rows, cols);
  if (group_minmax(x.data<float>(), rows, cols, gran, mn, mx)) check_finite(x, "quantizer input");
  QuantizedTensor q = make_header(spec, rows, cols, mn.data(), mx.data());
  q.transform = std::move(transform);

  const int B = q.max_code();
  const bool stochastic = traits(spec.kind).rounding == Rounding::stochastic;
  q.codes = Tensor::empty({rows, cols}, DType::u8);
  uint8_t* codes = q.codes.data<uint8_t>();
  const float* src = x.data<float>();
  const float* scale = q.scale.data();
  const float* lo = q.lo.data();
  if (!stochastic) {
    nearest_pass(src, rows, cols, q);
    return q;
  }
  // Stochastic: each row piece rounded with its group's grid.
  const RngKey keys[1] = {key};
  stochastic_pass(rows, cols, keys, [&](int64_t e, int64_t run, int64_t r, int64_t c, const float* const* u) {
    const float* __restrict s = src + e;
    const float* __restrict uu = u[0];
    uint8_t* __restrict o = codes + e;  // u8 stores may alias anything: say they do not
    if (gran == Granularity::column) {
      for (int64_t i = 0; i < run; ++i) o[i] = round_stochastic(grid_pos(s[i], lo[c + i], scale[c + i]), uu[i], B);
    } else {
      const int64_t gi = gran == Granularity::tensor ? 0 : r;
      round_run_stochastic(s, uu, run, lo[gi], scale[gi], B, o);
    }
  });
  return q;
}

bool quantize_uses_range(QuantizerSpec spec) {
  const QuantizerTraits& t = traits(spec.kind);
  return t.granularity == Granularity::tensor && t.rounding == Rounding::nearest;
}

QuantizedTensor quantize_in_range(const Tensor& x_in, QuantizerSpec spec, float mn, float mx) {
  if (!quantize_uses_range(spec) || x_in.numel() == 0) return quantize(x_in, spec);
  profile::Scope timer(profile::quantize);
  check_spec(spec);
  Tensor x = as_matrix(x_in);
  const int64_t rows = x.size(0), cols = x.size(1);
  // The range the min/max pass would have found; a non-finite one means non-finite data, which
  // check_finite reports (position and all) as quantize() does.
  if (!std::isfinite(mn) || !std::isfinite(mx)) check_finite(x, "quantizer input");
  FQT_CHECK(std::isfinite(mn) && std::isfinite(mx) && mn <= mx, "quantize_in_range: range [{}, {}] is not that of finite data",
            mn, mx);
  const double dmn = mn, dmx = mx;
  QuantizedTensor q = make_header(spec, rows, cols, &dmn, &dmx);
  q.codes = Tensor::empty({rows, cols}, DType::u8);
  nearest_pass(x.data<float>(), rows, cols, q);
  return q;
}

namespace {
// A draw pair_one_pass / stochastic_pass can take: stochastic, per row or per tensor, not BHQ.
bool fusable(QuantizerSpec s) {
  const QuantizerTraits& t = traits(s.kind);
  return t.rounding == Rounding::stochastic && s.kind != QuantizerKind::bhq &&
         (t.granularity == Granularity::row || t.granularity == Granularity::tensor);
}
}  // namespace

bool quantize_pair_fuses(QuantizerSpec a, QuantizerSpec b) { return fusable(a) && fusable(b); }

std::pair<QuantizedTensor, QuantizedTensor> quantize_pair_nchw(const Tensor& x, QuantizerSpec sa, RngKey ka,
                                                               QuantizerSpec sb, RngKey kb, const float* range) {
  FQT_CHECK(x.dim() >= 2 && x.dtype() == DType::f32, "quantize_pair_nchw: input {} is not an N,C,... f32 tensor",
            shape_str(x.shape()));
  FQT_CHECK(quantize_pair_fuses(sa, sb), "quantize_pair_nchw: {} / {} draws are not both per-row or per-tensor stochastic",
            traits(sa.kind).name, traits(sb.kind).name);
  profile::Scope timer(profile::quantize);
  check_spec(sa);
  check_spec(sb);
  const int64_t N = x.size(0), C = x.size(1), P = N * C > 0 ? x.numel() / (N * C) : 0, rows = N * P;
  const float* xp = x.data<float>();
  // X's range: given (from the pass that wrote X), else per sample, over threads.
  float lo = range ? range[0] : std::numeric_limits<float>::infinity(), hi = range ? range[1] : -lo;
  uint32_t nan = 0;
  if (!range) {
#pragma omp parallel for schedule(static) reduction(min : lo) reduction(max : hi) reduction(| : nan) \
    if (x.numel() > kParallelMin)
    for (int64_t n = 0; n < N; ++n) minmax_lanes(xp + n * C * P, C * P, lo, hi, nan);
  }
  if (nan) check_finite(x, "quantizer input");  // throws, naming the element
  if (rows * C == 0) return quantize_pair(Tensor::empty({rows, C}), sa, ka, sb, kb);
#if defined(__AVX512F__)
  if (C % 16 == 0) {  // channel-major, no rows of G formed (pair_nchw16)
    if (!std::isfinite(lo) || !std::isfinite(hi)) check_finite(x, "quantizer input");  // throws, naming the element
    QuantizedTensor qa = pair_header(sa, rows, C, nullptr, nullptr, lo, hi);  // row grids: filled by pair_nchw16
    QuantizedTensor qb = pair_header(sb, rows, C, nullptr, nullptr, lo, hi);
    pair_nchw16(xp, N, C, P, qa, ka, qb, kb);
    return {std::move(qa), std::move(qb)};
  }
#endif
  // Rows r0 .. r0 + n: sample s's positions p0.. of each channel, [C, len] (row stride P)
  // transposed into [len, C].
  auto load = [&](int64_t r0, int64_t n, float* buf) {
    for (int64_t r = r0; r < r0 + n;) {
      const int64_t s = r / P, p0 = r - s * P, len = std::min(P - p0, r0 + n - r);
      kernels::transpose(xp + s * C * P + p0, C, len, P, buf + (r - r0) * C, C);
      r += len;
    }
    return static_cast<const float*>(buf);
  };
  return pair_one_pass(x, rows, C, load, sa, ka, sb, kb, lo, hi);
}

namespace {
// The second draw of quantize_samples_nchw when it is not rounded in the first's pass: from G's
// rows, laid out here.
QuantizedTensor draw_of_rows(const Tensor& x, int64_t N, int64_t C, int64_t P, QuantizerSpec sb, RngKey kb) {
  Tensor rows = Tensor::empty({N * P, C});
  {
    profile::Scope timer(profile::quantize);
    const float* xp = x.data<float>();
    float* rp = rows.data<float>();
#pragma omp parallel for schedule(static) if (N * C * P > kParallelMin)
    for (int64_t n = 0; n < N; ++n) kernels::transpose(xp + n * C * P, C, P, P, rp + n * P * C, C);
  }
  return quantize(rows, sb, kb);
}

#if defined(__AVX512F__)
// quantize_samples_nchw for C a multiple of 16 (and a non-empty x). Each sample's row S (x's, or
// for BHQ its row of T x) gets its range and grid, its uniforms in element order (fill_uniforms
// from the sample's first Philox block: element (n, c*P + p) of [N, C*P] is uniform n*C*P + c*P
// + p), and is rounded 16 positions x 16 channels at a time into G's pixel rows (Nchw16::store);
// the second draw, when fused, is pair_nchw16's, on the same 16 positions of x while they are in
// cache. PSQ: one sample per step of a thread. BHQ: one group per step (claimed dynamically, one
// ahead, see below): one pass over the members' rows (a vector of columns at a time for groups of
// 2-4, kInverseBlock columns at a time for larger ones) forms the group's sum d = sum_k v_k (s_k
// x_k) in member order and each member's range of s_n x_n - 2 v_n d (bhq_group_dots' and bhq_row's
// operations, so T x as BhqTransform::apply has it, bit for bit); then each member is rounded with
// its row of T x formed again from x_n and d where it is read (no row of T x stored: 0.845 ->
// 0.792 ms a call, bench_quantizers 100352 16 2 heavy-tailed, alternated, session 23).
std::pair<QuantizedTensor, QuantizedTensor> samples_nchw16(const Tensor& x, int64_t N, int64_t C, int64_t P,
                                                           QuantizerSpec sa, RngKey ka, const QuantizerSpec* sb,
                                                           RngKey kb, const float* range, const float* slo,
                                                           const float* shi) {
  const int64_t D = C * P;
  const float* xp = x.data<float>();
  const bool bhq = sa.kind == QuantizerKind::bhq, fuse_b = sb && fusable(*sb);
  const bool row_b = fuse_b && traits(sb->kind).granularity == Granularity::row;
  float tlo = std::numeric_limits<float>::infinity(), thi = -tlo;
  uint32_t nan = 0;
  std::optional<BhqTransform> t;
  std::optional<profile::PhaseScope> phase;  // BHQ's passes, for fqt bench step --breakdown
  if (bhq) {
    phase.emplace("per-sample bhq: row ranges, transform");
    bool has_nan = false;
    std::vector<double> m;
    if (slo) {  // (given: exact, finite)
      m.resize(static_cast<size_t>(N));
      for (int64_t n = 0; n < N; ++n)
        m[n] = quant_detail::bhq_row_range(slo[n], shi[n]), tlo = std::min(tlo, slo[n]), thi = std::max(thi, shi[n]);
    } else {
      m = kernels::bhq_row_ranges(xp, N, D, &tlo, &thi, &has_nan);
    }
    nan = has_nan;
    if (!nan && std::isfinite(tlo) && std::isfinite(thi))
      t = bhq_transform_from_ranges_batched(m, kernels::bhq_rank_descending_parallel(m));
  } else if (fuse_b && !row_b) {  // the second draw's per-tensor grid needs x's range first
    if (range) {
      tlo = range[0], thi = range[1];
    } else if (slo) {
      for (int64_t n = 0; n < N; ++n) tlo = std::min(tlo, slo[n]), thi = std::max(thi, shi[n]);
    } else {
#pragma omp parallel for schedule(static) reduction(min : tlo) reduction(max : thi) reduction(| : nan) \
    if (N * D > kParallelMin)
      for (int64_t n = 0; n < N; ++n) minmax_lanes(xp + n * D, D, tlo, thi, nan);
    }
  } else {
    tlo = thi = 0.0f;  // (unused: each sample's range is taken in the pass below)
  }
  if (nan || !std::isfinite(tlo) || !std::isfinite(thi)) {
    check_finite(x, "quantizer input");  // throws, naming the element
    FQT_CHECK(false, "quantizer input: the range pass saw a non-finite value that check_finite did not find");
  }
  if (phase) phase->next("per-sample bhq: groups summed, rows transformed and rounded");
  QuantizedTensor qa;
  qa.spec = sa, qa.rows = N * P, qa.cols = C;
  qa.scale.resize(static_cast<size_t>(N * P)), qa.lo.resize(static_cast<size_t>(N * P));
  qa.codes = Tensor::empty({N * P, C}, DType::u8);
  qa.transform = std::move(t);
  QuantizedTensor qb;
  if (fuse_b) qb = pair_header(*sb, N * P, C, nullptr, nullptr, tlo, thi);
  const int Ba = qa.max_code();
  const int Bb = fuse_b ? qb.max_code() : 0;
  uint8_t* ca = qa.codes.data<uint8_t>();
  uint8_t* cb = fuse_b ? qb.codes.data<uint8_t>() : nullptr;
  const BhqTransform* tp = qa.transform ? &*qa.transform : nullptr;
  const Nchw16 k16;
  uint32_t bad = 0;
  std::atomic<int64_t> claim{0};  // BHQ: the next group to take
#pragma omp parallel reduction(| : bad) if (N * D > kParallelMin)
  {
    GridValues dot(static_cast<size_t>(bhq ? D : 0)), u(static_cast<size_t>(D));  // (left unset: written before read)
    // A sample's last positions (P not a multiple of 16): S, its uniforms and x as [C][16], zero-padded.
    std::vector<float> tail(static_cast<size_t>(P % 16 ? 3 * C * 16 : 0));
    alignas(64) uint8_t out16[256];
    alignas(64) float gsc[16], glo[16];
    // Sample n's draws from its row: x's own (Tr false; its range given in slo / shi, else
    // taken here), or (Tr true) its row of T x, s x_n - vk2 d formed where it is read (from its
    // group's sum d, range [lo, hi] found by the group's pass).
    // pf, npf: rows of x (sample indices) to bring into L2 while this one is rounded, spread over
    // its steps (the next group's, for BHQ's pass over them).
    auto sample = [&](int64_t n, auto Tr, const float* d, float s, float vk2, float lo, float hi,
                      const int64_t* pf = nullptr, int64_t npf = 0) {
      constexpr bool kTr = decltype(Tr)::value;
      const float* xn = xp + n * D;
      if (!kTr) {
        if (slo) {
          lo = slo[n], hi = shi[n];  // (given)
        } else {
          uint32_t nn = 0;
          lo = std::numeric_limits<float>::infinity(), hi = -lo;
          minmax_lanes(xn, D, lo, hi, nn);
          bad |= nn | static_cast<uint32_t>(!std::isfinite(lo) || !std::isfinite(hi));
        }
      }
      const __m512 vs = _mm512_set1_ps(s), vk2v = _mm512_set1_ps(vk2);
      const double dlo = lo, dhi = hi;
      float sc = 0.0f, gl = 0.0f;
      make_grids(sa, &dlo, &dhi, 1, &sc, &gl);
      std::fill_n(qa.scale.data() + n * P, P, sc);
      std::fill_n(qa.lo.data() + n * P, P, gl);
      kernels::fill_uniforms(ka, static_cast<uint64_t>(n * D) >> 2, D / 4, u.data());  // (D % 16 == 0)
      const __m512 vlo = _mm512_set1_ps(gl), vsc = _mm512_set1_ps(sc), vBa = _mm512_set1_ps(static_cast<float>(Ba));
      const __m512 vBb = _mm512_set1_ps(static_cast<float>(Bb));
      const int64_t lines = D / 16, steps = (P + 15) / 16;
      for (int64_t p0 = 0; p0 < P; p0 += 16) {
        const int64_t m = std::min<int64_t>(16, P - p0), r0 = n * P + p0;
        for (int64_t i = 0; i < npf; ++i) {
          const float* row = xp + pf[i] * D;
          for (int64_t l = p0 / 16 * lines / steps, l1 = (p0 / 16 + 1) * lines / steps; l < l1; ++l)
            _mm_prefetch(reinterpret_cast<const char*>(row + 16 * l), _MM_HINT_T1);
        }
        const float* sp = xn + p0;
        const float* dp = kTr ? d + p0 : nullptr;
        const float* up = u.data() + p0;
        const float* xs = xn + p0;
        int64_t ld = P;
        bool formed = !kTr;  // sp holds the values to round (else s sp - vk2 dp)
        if (m < 16) {
          float* ts = tail.data();
          float* tu = ts + C * 16;
          float* tx2 = tu + C * 16;
          std::fill(tail.begin(), tail.end(), 0.0f);
          for (int64_t c = 0; c < C; ++c) {
            if (kTr) {
              for (int64_t i = 0; i < m; ++i) ts[c * 16 + i] = s * sp[c * P + i] - vk2 * dp[c * P + i];
            } else {
              std::copy(sp + c * P, sp + c * P + m, ts + c * 16);
            }
            std::copy(up + c * P, up + c * P + m, tu + c * 16);
            std::copy(xs + c * P, xs + c * P + m, tx2 + c * 16);
          }
          sp = ts, up = tu, xs = tx2, ld = 16, formed = true;
        }
        for (int64_t k = 0; k < C; k += 16) {
          __m512i cd[4][4];
          for (int j = 0; j < 4; ++j)
            for (int tt = 0; tt < 4; ++tt) {
              const int64_t c = k + 4 * j + tt;
              __m512 v = _mm512_loadu_ps(sp + c * ld);
              if (kTr && !formed) v = _mm512_sub_ps(_mm512_mul_ps(vs, v), _mm512_mul_ps(vk2v, _mm512_loadu_ps(dp + c * ld)));
              cd[j][tt] = k16.code(v, _mm512_loadu_ps(up + c * ld), vlo, vsc, vBa);
            }
          k16.store(cd, C, m, ca + r0 * C + k, out16);
        }
        if (fuse_b) {
          __m512 blo = _mm512_set1_ps(qb.lo[0]), bsc = _mm512_set1_ps(qb.scale[0]);
          if (row_b) {
            Nchw16::row_grids(xs, ld, C, m, r0, qb, gsc, glo);
            blo = _mm512_load_ps(glo), bsc = _mm512_load_ps(gsc);
          }
          k16.draw(xs, ld, C, m, r0, kb, blo, bsc, vBb, cb + r0 * C, out16);
        }
      }
    };
    if (!bhq) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) sample(n, std::false_type{}, nullptr, 0.0f, 0.0f, 0.0f, 0.0f);
    } else {
      const HouseholderV householder;
      std::vector<float> lanes;  // each member's 16 running minima, then 16 maxima
      // Groups claimed dynamically, one ahead: the next group's rows are prefetched while this
      // one's are rounded (a compute-bound pass), so that its first pass, which only streams its
      // rows in, finds them in L2 (fqt bench step, PreAct-ResNet-20 bhq/s, 8 alternated runs:
      // quantizer time 12.7 -> 12.2 ms a step, session 23).
      const int64_t G = tp->num_groups();
      for (int64_t g = claim.fetch_add(1, std::memory_order_relaxed), gn; g < G; g = gn) {
        gn = claim.fetch_add(1, std::memory_order_relaxed);
        const int64_t* nmem = gn < G ? tp->members.data() + tp->offsets[gn] : nullptr;
        const int64_t nng = gn < G ? tp->group_size(gn) : 0;
        const int64_t* mem = tp->members.data() + tp->offsets[g];
        const int64_t ng = tp->group_size(g);
        float vf, vr;
        householder(ng, vf, vr);
        // The group's pass: d = sum_k v_k (s_k x_k) (bhq_group_sum's operations, in member order)
        // and each member's range of s_k x_k - 2 v_k d; T x itself is formed again where it is
        // rounded. (In 16-lane intrinsics: bhq_group_sum, bhq_transformed_row and minmax_lanes on
        // blocks of columns, which the compiler vectorizes 8 lanes wide, took 0.91 ms a call
        // against 0.80, bench_quantizers 100352 16 2 heavy-tailed, session 23.)
        lanes.resize(static_cast<size_t>(32 * ng));
        __mmask16 nanm = 0;
        float* dp = dot.data();
        // Groups of 2-4 members (nearly all): a vector of columns at a time with the members'
        // values, d and their running ranges in registers; d stored once for the rounding below
        // (the blocked loop after it loads and stores d once per member, and reads each member
        // twice). The same operations in the same order, so the same bits. bench_quantizers,
        // ranges given, no wgrad draw, warm, 2 threads: 100352 x 16 0.51 -> 0.45 ms (psq 0.28),
        // 6272 x 64 0.147 -> 0.127 ms (psq 0.080).
        auto small = [&]<int NG>() {
          __m512 sk[NG], vk[NG], vk2[NG], mn[NG], mx[NG];
          const float* row[NG];
          for (int k = 0; k < NG; ++k) {
            sk[k] = _mm512_set1_ps(tp->row_scale[mem[k]]);
            vk[k] = _mm512_set1_ps(k == 0 ? vf : vr), vk2[k] = _mm512_set1_ps(2.0f * (k == 0 ? vf : vr));
            mn[k] = _mm512_set1_ps(std::numeric_limits<float>::infinity()), mx[k] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
            row[k] = xp + mem[k] * D;
          }
          for (int64_t j = 0; j < D; j += 16) {  // (D % 16 == 0)
            __m512 xv[NG];
            __m512 d = _mm512_setzero_ps();
            for (int k = 0; k < NG; ++k) {
              xv[k] = _mm512_loadu_ps(row[k] + j);
              d = _mm512_add_ps(d, _mm512_mul_ps(vk[k], _mm512_mul_ps(sk[k], xv[k])));
            }
            _mm512_storeu_ps(dp + j, d);
            for (int k = 0; k < NG; ++k) {
              const __m512 v = _mm512_sub_ps(_mm512_mul_ps(sk[k], xv[k]), _mm512_mul_ps(vk2[k], d));
              mn[k] = _mm512_mask_min_ps(mn[k], kAll16, v, mn[k]), mx[k] = _mm512_mask_max_ps(mx[k], kAll16, v, mx[k]);
              nanm |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            }
          }
          for (int k = 0; k < NG; ++k)
            _mm512_storeu_ps(lanes.data() + 32 * k, mn[k]), _mm512_storeu_ps(lanes.data() + 32 * k + 16, mx[k]);
        };
        // Larger groups: a block of columns at a time while the members' blocks are in L1, d in
        // memory.
        auto blocked = [&] {
          for (int64_t k = 0; k < ng; ++k) {
            _mm512_storeu_ps(lanes.data() + 32 * k, _mm512_set1_ps(std::numeric_limits<float>::infinity()));
            _mm512_storeu_ps(lanes.data() + 32 * k + 16, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
          }
          for (int64_t j0 = 0; j0 < D; j0 += kernels::kInverseBlock) {
            const int64_t j1 = std::min(D, j0 + kernels::kInverseBlock);  // (D % 16 == 0)
            for (int64_t j = j0; j < j1; j += 16) _mm512_storeu_ps(dp + j, _mm512_setzero_ps());
            for (int64_t k = 0; k < ng; ++k) {
              const __m512 vk = _mm512_set1_ps(k == 0 ? vf : vr), sk = _mm512_set1_ps(tp->row_scale[mem[k]]);
              const float* row = xp + mem[k] * D;
              for (int64_t j = j0; j < j1; j += 16)
                _mm512_storeu_ps(dp + j, _mm512_add_ps(_mm512_loadu_ps(dp + j),
                                                       _mm512_mul_ps(vk, _mm512_mul_ps(sk, _mm512_loadu_ps(row + j)))));
            }
            for (int64_t k = 0; k < ng; ++k) {
              const __m512 vk2 = _mm512_set1_ps(2.0f * (k == 0 ? vf : vr)), sk = _mm512_set1_ps(tp->row_scale[mem[k]]);
              const float* row = xp + mem[k] * D;
              __m512 mn = _mm512_loadu_ps(lanes.data() + 32 * k), mx = _mm512_loadu_ps(lanes.data() + 32 * k + 16);
              for (int64_t j = j0; j < j1; j += 16) {
                const __m512 v = _mm512_sub_ps(_mm512_mul_ps(sk, _mm512_loadu_ps(row + j)), _mm512_mul_ps(vk2, _mm512_loadu_ps(dp + j)));
                // (masked all-lanes forms: GCC 12 warns that the plain ones' pass-through is undefined)
                mn = _mm512_mask_min_ps(mn, kAll16, v, mn), mx = _mm512_mask_max_ps(mx, kAll16, v, mx);
                nanm |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
              }
              _mm512_storeu_ps(lanes.data() + 32 * k, mn), _mm512_storeu_ps(lanes.data() + 32 * k + 16, mx);
            }
          }
        };
        switch (ng) {
          case 2: small.template operator()<2>(); break;
          case 3: small.template operator()<3>(); break;
          case 4: small.template operator()<4>(); break;
          default: blocked();
        }
        bad |= static_cast<uint32_t>(nanm != 0);
        for (int64_t k = 0; k < ng; ++k) {
          const int64_t n = mem[k];
          const float* ml = lanes.data() + 32 * k;
          float lo = ml[0], hi = ml[16];
          for (int i = 1; i < 16; ++i) lo = std::min(lo, ml[i]), hi = std::max(hi, ml[16 + i]);
          bad |= static_cast<uint32_t>(!std::isfinite(lo) || !std::isfinite(hi));
          // (member k prefetches the next group's member k; the last, those left)
          const int64_t a = std::min(k, nng), b = k + 1 == ng ? nng : std::min(k + 1, nng);
          sample(n, std::true_type{}, dp, tp->row_scale[n], 2.0f * (k == 0 ? vf : vr), lo, hi, nmem + a, b - a);
        }
      }
    }
  }
  if (bad) {
    check_finite(x, "quantizer input");  // throws: NaN or Inf the range did not show
    if (bhq) quant_detail::throw_transformed_not_finite();  // x finite: T x overflowed
    FQT_CHECK(false, "quantizer input: a sample's range is not finite, yet check_finite found no such value");
  }
  return {std::move(qa), std::move(qb)};
}
#endif
}  // namespace

std::pair<QuantizedTensor, QuantizedTensor> quantize_samples_nchw(const Tensor& x, QuantizerSpec sa, RngKey ka,
                                                                  const QuantizerSpec* sb, RngKey kb, const float* range,
                                                                  const float* sample_lo, const float* sample_hi) {
  FQT_CHECK(x.dim() >= 2 && x.dtype() == DType::f32, "quantize_samples_nchw: input {} is not an N,C,... f32 tensor",
            shape_str(x.shape()));
  check_spec(sa);
  if (sb) check_spec(*sb);
  FQT_CHECK(traits(sa.kind).granularity == Granularity::row && traits(sa.kind).rounding == Rounding::stochastic,
            "quantize_samples_nchw: {} is not a stochastic quantizer with a grid per row", traits(sa.kind).name);
  const int64_t N = x.size(0), C = x.size(1), P = N * C > 0 ? x.numel() / (N * C) : 0;
#if defined(__AVX512F__)
  if (C % 16 == 0 && N * C * P > 0) {
    auto [qa, qb] = [&] {
      profile::Scope timer(profile::quantize);
      // (both or neither; not finite or lo > hi anywhere: not a range x's writer found, ignored)
      bool given = sample_lo && sample_hi;
      for (int64_t n = 0; given && n < N; ++n)
        given = std::isfinite(sample_lo[n]) && std::isfinite(sample_hi[n]) && sample_lo[n] <= sample_hi[n];
      return samples_nchw16(x, N, C, P, sa, ka, sb, kb, range, given ? sample_lo : nullptr, given ? sample_hi : nullptr);
    }();
    if (sb && !qb.codes.defined()) qb = draw_of_rows(x, N, C, P, *sb, kb);  // (not fused: e.g. per column)
    return {std::move(qa), std::move(qb)};
  }
#endif
  (void)range, (void)sample_lo, (void)sample_hi;
  // Elsewhere: the draw on [N, C*P], then its codes laid out as pixel rows.
  QuantizedTensor q = quantize(x.reshape({N, C * P}), sa, ka);
  QuantizedTensor qa = [&] {
    profile::Scope timer(profile::quantize);
    return samples_as_pixel_rows(std::move(q), N, C, P);
  }();
  QuantizedTensor qb = sb ? draw_of_rows(x, N, C, P, *sb, kb) : QuantizedTensor{};
  return {std::move(qa), std::move(qb)};
}

std::pair<QuantizedTensor, QuantizedTensor> quantize_pair(const Tensor& x_in, QuantizerSpec sa, RngKey ka,
                                                          QuantizerSpec sb, RngKey kb, const float* range) {
  if (x_in.numel() > 0 && sa.kind == QuantizerKind::bhq && fusable(sb) &&
      traits(sb.kind).granularity == Granularity::tensor) {  // BHQ's dgrad draw + a per-tensor wgrad draw
    profile::Scope timer(profile::quantize);
    check_spec(sa);
    check_spec(sb);
    QuantizedTensor qb;
    QuantizedTensor qa = quantize_bhq(as_matrix(x_in), sa, ka, &sb, kb, &qb);
    return {std::move(qa), std::move(qb)};
  }
  if (!fusable(sa) || !fusable(sb) || x_in.numel() == 0) return {quantize(x_in, sa, ka), quantize(x_in, sb, kb)};
  profile::Scope timer(profile::quantize);
  check_spec(sa);
  check_spec(sb);
  Tensor x = as_matrix(x_in);
  const int64_t rows = x.size(0), cols = x.size(1);
  const float* src = x.data<float>();
  if (range)
    return pair_one_pass(x, rows, cols, [&](int64_t r0, int64_t, float*) { return src + r0 * cols; }, sa, ka, sb, kb,
                         range[0], range[1]);
  // Row ranges in one pass; the tensor range is their range (min and max are exact).
  std::vector<double> rmn, rmx;
  double whole[2];
  if (group_minmax(src, rows, cols, Granularity::row, rmn, rmx, whole)) check_finite(x, "quantizer input");
  QuantizedTensor qa = pair_header(sa, rows, cols, rmn.data(), rmx.data(), whole[0], whole[1]);
  QuantizedTensor qb = pair_header(sb, rows, cols, rmn.data(), rmx.data(), whole[0], whole[1]);
  const bool row_a = qa.granularity() == Granularity::row, row_b = qb.granularity() == Granularity::row;
  const int Ba = qa.max_code(), Bb = qb.max_code();
  uint8_t* ca = qa.codes.data<uint8_t>();
  uint8_t* cb = qb.codes.data<uint8_t>();
  // The rounding pass of quantize(), both draws at once (element e of each gets its key's u).
  const RngKey keys[2] = {ka, kb};
  // A per-tensor draw is rounded a chunk at a time (the row pieces of PSQ are 16 values long in
  // stage 1: per-run overhead), a per-row one piece by piece.
  stochastic_pass(
      rows, cols, keys,
      [&](int64_t e, int64_t run, int64_t r, int64_t, const float* const* u) {
        if (row_a) round_run_stochastic(src + e, u[0], run, qa.lo[r], qa.scale[r], Ba, ca + e);
        if (row_b) round_run_stochastic(src + e, u[1], run, qb.lo[r], qb.scale[r], Bb, cb + e);
      },
      [&](int64_t e0, int64_t e1, const float* const* u) {
        if (!row_a) round_run_stochastic(src + e0, u[0], e1 - e0, qa.lo[0], qa.scale[0], Ba, ca + e0);
        if (!row_b) round_run_stochastic(src + e0, u[1], e1 - e0, qb.lo[0], qb.scale[0], Bb, cb + e0);
      });
  return {std::move(qa), std::move(qb)};
}

}  // namespace fqt
