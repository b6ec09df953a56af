// Conv2d's integer path (Recipe::arith == integer; SPEC section 4): all three GEMMs run on 8-bit
// codes (fqt's AVX-512 VNNI kernel), one sample at a time per thread, and the scales and
// offsets are applied afterwards as row / column / rank-1 corrections.
//
// For operands a = qa / sa + la (u8 codes) and b = qb / sb + lb (qb shifted into s8 when it has
// 8 bits),
//     sum_k a b = S / (sa sb) + (lb / sa) ra + (la / sb) rb + K la lb,
// with S the integer GEMM and ra, rb the code sums of the two operands along k. Everything after
// S is evaluated in double and rounded once to fp32, so each result equals the GEMM of the
// dequantized values (the simulated path) to fp32 rounding.
//
// The kernel computes C = A B^T and reads A in place (rows of 4-byte groups) while it packs B;
// so the large per-sample operand (the patches) is A and the small one (weights, gradient
// codes) is B:
//   fprop  Y_n^T [P, Cout] = im2row(xq_n) [P, Ckk] . Wq^T       A = patch codes (u8)
//          ra = patch code sums (a byte-sum pass), rb = weight code sums; then [P, Cout] is
//          transposed to Y_n [Cout, P]; Cout = 16 or a multiple of 32 (every PreAct-ResNet-20
//          conv): no im2row, the patches read in place from the padded HWC image by the fused
//          kernels (fprop_fused_sample, fprop_fused_sample32), finished in registers
//   dgrad  dcols_n [P, Ckk] = Gq_n [P, Cout] . Wq                 A = gradient codes (rows of G)
//          B = W^T; the row sums of G's codes by a byte-sum pass (not a GEMM column of
//          ones: that column made N = Ckk + 1, a 16-column panel of the kernel for one column);
//          each row summed at once onto dx_n (the adjoint of im2row);
//          BHQ: each row combined from its group's members' rows (T^-1, see dgrad_int);
//          layers with Ckk <= 144 and Cout <= 16 (the 16-channel 3x3 ones): a row's products in
//          registers, finished and summed from there (dgrad_fused_row, bhq_fused_row); the
//          others (not BHQ) finish the GEMM's rows in whole vectors (fused_value)
//   wgrad  dW^T [Ckk, Cout] = sum_n im2col(xq_n) [Ckk, P] . Gq_n  A = im2col codes (u8)
//          B = G_n^T codes (s8), a few samples side by side along k per GEMM; code sums per tap
//          row and per gradient column, and the integer partial sums, in int64 (exact, so any
//          grouping gives the same result); stride-1 layers with 16, or a multiple of 16 from
//          32, input channels (and 16 / a multiple of 16 output channels) and the one-channel
//          first layer: no im2col, the products straight from the padded HWC image
//          (wgrad_direct_sample, wgrad_direct_sample_wide, wgrad_direct_c1_sample)
//
// im2col runs on the codes: padding is the activation grid's code for 0 (zero-aligned grids have
// one by construction), so nothing is dequantized and the saved input stays 1 byte per value.
#include "common.hpp"
#include "kernels/cpu/bhq_fast.hpp"
#include "kernels/cpu/transpose.hpp"
#include "fqt/gemm.hpp"
#include "fqt/igemm.hpp"
#include "fqt/profile.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <numeric>
#include <optional>

#if defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#include <omp.h>
#endif

namespace fqt {
using namespace nn_detail;

namespace {

// b-bit codes as s8: 8-bit codes are shifted by 128, narrower ones fit as they are.
int s8_shift(int bits) { return bits == 8 ? 128 : 0; }

// Patches are built from a padded copy of one sample's codes, so every inner step is a
// contiguous copy. Fprop orders a patch's taps (kh, kw, c) — channels last — so that a patch
// row is k runs of k*C contiguous bytes of the HWC image; wgrad uses the usual (c, kh, kw) rows
// over output positions. The weight codes are reordered to match (once per call).

// x codes C,H,W -> out [(H+2p), (W+2p), C]: the codes inside, pad_code on the border.
void pad_hwc(const uint8_t* x, const Geom& g, uint8_t pad_code, uint8_t* out) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad, C = g.C;
  std::memset(out, pad_code, static_cast<size_t>(Hp * Wp * C));
#if defined(FQT_ROW_TO_HWC)
  if (C % 16 == 0 && g.W <= 64) {  // (16-channel groups of a row in registers)
    // The next sample's codes, while this one's are transposed and run through a kernel
    // (callers go through samples in order; a prefetch past the tensor's end is harmless).
    for (int64_t i = 0; i < C * g.H * g.W; i += 64) __builtin_prefetch(x + C * g.H * g.W + i);
    for (int64_t h = 0; h < g.H; ++h) kernels::row_to_hwc(x + h * g.W, g.H * g.W, g.W, C, out + ((h + g.pad) * Wp + g.pad) * C);
    return;
  }
#endif
  // Image row h: the [C, W] slab (row stride H*W) transposed into W pixels of C bytes, by 8x8
  // byte tiles (a strided byte loop was a third of forward_int's own time in perf).
  for (int64_t h = 0; h < g.H; ++h)
    kernels::transpose_bytes(x + h * g.W, C, g.W, g.H * g.W, out + ((h + g.pad) * Wp + g.pad) * C, C, 0x00);
}

// Copy of n bytes for the short runs of im2row / im2col (a library call per 28-byte run costs
// more than the copy): one masked 64-byte load and store when n <= 64.
// (Not under AddressSanitizer, which may treat a masked access as a full 64-byte one.)
inline void copy_bytes(uint8_t* dst, const uint8_t* src, int64_t n) {
#if defined(__AVX512BW__) && !defined(__SANITIZE_ADDRESS__)
  if (n <= 64) {
    const __mmask64 m = n == 64 ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
    _mm512_mask_storeu_epi8(dst, m, _mm512_maskz_loadu_epi8(m, src));
    return;
  }
#elif defined(__AVX2__)
  // Overlapping head and tail moves (src and dst never overlap): no library call for short runs.
  if (n >= 16 && n <= 32) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + n - 16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), a);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + n - 16), b);
    return;
  }
  if (n > 32 && n <= 64) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + n - 32));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), a);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + n - 32), b);
    return;
  }
  if (n >= 8 && n < 16) {
    uint64_t a, b;
    std::memcpy(&a, src, 8);
    std::memcpy(&b, src + n - 8, 8);
    std::memcpy(dst, &a, 8);
    std::memcpy(dst + n - 8, &b, 8);
    return;
  }
#endif
  std::memcpy(dst, src, static_cast<size_t>(n));
}

// Patch rows [P, k*k*C] in (kh, kw, c) order from the padded HWC image.
void im2row_hwc(const uint8_t* img, const Geom& g, uint8_t* out) {
  const int64_t Wp = g.W + 2 * g.pad, C = g.C, run = g.k * C, ckk = g.rows();
  for (int64_t oh = 0; oh < g.Ho; ++oh)
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      uint8_t* row = out + (oh * g.Wo + ow) * ckk;
      for (int64_t kh = 0; kh < g.k; ++kh)
        copy_bytes(row + kh * run, img + ((oh * g.stride + kh) * Wp + ow * g.stride) * C, run);
    }
}

// x codes C,H,W -> out [C, (H+2p), (W+2p)] (padded with pad_code).
void pad_chw(const uint8_t* x, const Geom& g, uint8_t pad_code, uint8_t* out) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
  std::memset(out, pad_code, static_cast<size_t>(g.C * Hp * Wp));
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t h = 0; h < g.H; ++h)
      copy_bytes(out + (c * Hp + h + g.pad) * Wp + g.pad, x + (c * g.H + h) * g.W, g.W);
}

// im2col rows [(c, kh, kw), P] from the padded CHW image (row stride ld >= P). The image buffer
// carries 128 bytes of slack after the image (the strided rows below read whole 64-byte windows).
void im2col_chw(const uint8_t* img, const Geom& g, uint8_t* out, int64_t ld) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad, k = g.k;
#if defined(__AVX512VBMI__) && !defined(__SANITIZE_ADDRESS__)
  // Strided rows (stride 2 layers: Wo bytes every stride-th of a 64-byte window) by one byte
  // permute each instead of a scalar loop of Wo byte moves (~10% of wgrad_int in perf, session 12).
  if (g.stride > 1 && (g.Wo - 1) * g.stride < 64) {
    alignas(64) uint8_t idx[64] = {};
    for (int64_t j = 0; j < g.Wo; ++j) idx[j] = static_cast<uint8_t>(j * g.stride);
    const __m512i vi = _mm512_load_si512(idx);
    const __mmask64 m = g.Wo == 64 ? ~__mmask64{0} : (__mmask64{1} << g.Wo) - 1;
    for (int64_t r = 0; r < g.rows(); ++r) {
      const int64_t c = r / (k * k), kh = (r / k) % k, kw = r % k;
      uint8_t* row = out + r * ld;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const uint8_t* src = img + (c * Hp + oh * g.stride + kh) * Wp + kw;
        _mm512_mask_storeu_epi8(row + oh * g.Wo, m, _mm512_maskz_permutexvar_epi8(m, vi, _mm512_loadu_si512(src)));
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < g.rows(); ++r) {
    const int64_t c = r / (k * k), kh = (r / k) % k, kw = r % k;
    uint8_t* row = out + r * ld;
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const uint8_t* src = img + (c * Hp + oh * g.stride + kh) * Wp + kw;
      uint8_t* o = row + oh * g.Wo;
      if (g.stride == 1) copy_bytes(o, src, g.Wo);
      else
        for (int64_t ow = 0; ow < g.Wo; ++ow) o[ow] = src[ow * g.stride];
    }
  }
}

#if defined(__AVX512VBMI__)
// im2col of a stride-1 geometry by byte permutes: an im2col row (c, kh, kw) is the padded image
// rows kh.. of channel c, Wo bytes from column kw of each, so 64 bytes of it come from a window
// of at most 64 + (k - 1) * ceil(64 / Wo) bytes of the image; one two-register byte permute
// (vpermt2b) per 64 output bytes replaces a short copy per output row (the 28-byte copies were
// ~5% of the PSQ step in perf, session 9). The permute indices depend on the geometry only.
struct Im2colPermute {
  int64_t blocks = 0;             // 64-byte blocks per im2col row (the last one partial)
  std::vector<int64_t> start;     // per block: its first byte's offset in the row's image window
  std::vector<uint8_t> index;     // per block: 64 indices into the 128 bytes from `start`
  bool usable = false;
};

Im2colPermute im2col_permute_plan(const Geom& g) {
  Im2colPermute pl;
  if (g.stride != 1) return pl;
  const int64_t P = g.P(), Wp = g.W + 2 * g.pad;
  auto src = [&](int64_t q) { return (q / g.Wo) * Wp + q % g.Wo; };  // output byte q -> window offset
  pl.blocks = (P + 63) / 64;
  pl.start.resize(static_cast<size_t>(pl.blocks));
  pl.index.assign(static_cast<size_t>(pl.blocks * 64), 0);
  for (int64_t b = 0; b < pl.blocks; ++b) {
    pl.start[b] = src(64 * b);
    for (int64_t j = 0; j < 64 && 64 * b + j < P; ++j) {
      const int64_t d = src(64 * b + j) - pl.start[b];
      if (d >= 128) return pl;  // (very narrow outputs: the window outgrows two registers)
      pl.index[b * 64 + j] = static_cast<uint8_t>(d);
    }
  }
  pl.usable = true;
  return pl;
}

// The rows of im2col_chw through the plan. Reads up to 128 bytes from each block's start: the
// image buffer carries 128 bytes of slack after the image.
void im2col_chw_permute(const uint8_t* img, const Geom& g, const Im2colPermute& pl, uint8_t* out, int64_t ld) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad, k = g.k, P = g.P();
  const __mmask64 tail = P % 64 == 0 ? ~__mmask64{0} : (__mmask64{1} << (P % 64)) - 1;
  for (int64_t r = 0; r < g.rows(); ++r) {
    const int64_t c = r / (k * k), kh = (r / k) % k, kw = r % k;
    const uint8_t* base = img + (c * Hp + kh) * Wp + kw;
    uint8_t* row = out + r * ld;
    for (int64_t b = 0; b < pl.blocks; ++b) {
      const uint8_t* sb = base + pl.start[b];
      const __m512i v = _mm512_permutex2var_epi8(_mm512_loadu_si512(sb),
                                                 _mm512_loadu_si512(pl.index.data() + 64 * b),
                                                 _mm512_loadu_si512(sb + 64));
      if (b + 1 < pl.blocks) _mm512_storeu_si512(row + 64 * b, v);
      else _mm512_mask_storeu_epi8(row + 64 * b, tail, v);
    }
  }
}
#endif

// Sum of n bytes, each xor-ed with x first (exact in int64); x = 0x80 sums s8 codes stored as
// q ^ 0x80 back as the u8 codes q.
inline int64_t byte_sum(const uint8_t* p, int64_t n, uint8_t x = 0) {
  int64_t i = 0, s = 0;
#if defined(__AVX512BW__)
  const __m512i vx = _mm512_set1_epi8(static_cast<char>(x));
  __m512i acc = _mm512_setzero_si512();
  for (; i + 64 <= n; i += 64)
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512(p + i), vx), _mm512_setzero_si512()));
#if !defined(__SANITIZE_ADDRESS__)  // (a masked load may look like a full 64-byte one to ASan)
  if (i < n) {  // the tail (< 64 bytes) through a masked load; bytes past n count as 0
    const __mmask64 m = (uint64_t{1} << (n - i)) - 1;  // n - i in 1..63
    const __m512i v = _mm512_maskz_mov_epi8(m, _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, p + i), vx));
    acc = _mm512_add_epi64(acc, _mm512_sad_epu8(v, _mm512_setzero_si512()));
    i = n;
  }
#endif
  alignas(64) int64_t lanes[8];
  _mm512_store_si512(lanes, acc);
  for (int64_t l : lanes) s += l;
#elif defined(__AVX2__)
  const __m256i vx = _mm256_set1_epi8(static_cast<char>(x));
  __m256i acc = _mm256_setzero_si256();
  for (; i + 32 <= n; i += 32)
    acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)), vx),
                                                _mm256_setzero_si256()));
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  for (int64_t l : lanes) s += l;
  if (i + 16 <= n) {  // a 16-byte rest (dgrad's gradient rows of Cout = 16 are one)
    const __m128i v = _mm_sad_epu8(_mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)), _mm256_castsi256_si128(vx)),
                                   _mm_setzero_si128());
    s += _mm_cvtsi128_si64(v) + _mm_extract_epi64(v, 1);
    i += 16;
  }
#endif
  for (; i < n; ++i) s += p[i] ^ x;
  return s;
}

// Tap index of (c, kh, kw) in the (kh, kw, c) order.
inline int64_t hwc_tap(int64_t r, int64_t k, int64_t C) {
  const int64_t c = r / (k * k), kh = (r / k) % k, kw = r % k;
  return (kh * k + kw) * C + c;
}

// The per-sample GEMMs run inside the layer's own OpenMP loop over samples, one GEMM per thread:
// they call fqt's kernels directly (AVX-512 VNNI, else AVX2, else portable), which run on the calling thread
// there. (oneDNN is not re-entered from several threads at once.) K stays within the int32 chunk
// bound, so no reduction is split here.
void igemm_worker(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                  int32_t* C, int64_t ldc) {
  FQT_CHECK(K <= igemm_max_k(255, 128), "conv integer GEMM: reduction of {} terms exceeds the int32 bound", K);
  profile::Scope timer(profile::gemm_int);
  igemm_detail::s32_local(M, N, K, A, lda, B, ldb, C, ldc);
}
// The same with a B shared by every sample (the weights), packed once per layer call.
void igemm_worker(int64_t M, const uint8_t* A, int64_t lda, const igemm_detail::LocalB& B, int32_t* C, int64_t ldc) {
  FQT_CHECK(B.k() <= igemm_max_k(255, 128), "conv integer GEMM: reduction of {} terms exceeds the int32 bound", B.k());
  profile::Scope timer(profile::gemm_int);
  B.gemm(M, A, lda, C, ldc);
}

// A gradient row's finishing terms in dgrad_int (see there): its dgrad value k before any T^-1
// is ((s_k + Of rb_k) + df rb_k) inv + cr, s the integer products, rb the weight code sums.
struct RowTerms {
  float Of, df, inv, cr;
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define FQT_DGRAD_FUSED 1
// dgrad of a layer with few taps x channels (Ckk = NV * 16 <= 144: the 16-channel 3x3 layers)
// and a short reduction (K = Cout): one gradient row's integer products with all Ckk columns of
// W^T in NV registers (vpdpbusd; B = W^T packed as [K4][NV][16 columns][4 bytes]), finished
// and summed onto the sample's padded accumulator straight from the registers. The general path
// wrote the [P, Ckk] int32 product (451 KB per sample at 28x28) and read it back: with K = 16
// its kernel spent more on those stores than on the products (~200 GOPS). One row at a time:
// two or three rows per call (18 or 27 accumulators) measured slower, the three spilling.
// The row's columns are finished in order with the scalar epilogue's operations (no
// contraction), rows in order, so the accumulator gets the same sums in the same order: the
// same bits as the general path.
// acc[j] = the row's integer products with columns 16j .. 16j + 15. B's NV vectors of one k4
// are adjacent (one pointer, constant offsets): with [NV][K4] (offsets j K4 64 for a run-time
// K4) GCC kept the NV offsets on the stack and copied the accumulators around each step.
// KK > 0: K4 = KK known at compile time, the k4 loop unrolled (with a run-time K4, GCC copied the
// 9 accumulators between registers every k4 step of the 3x3 kernel below).
template <int NV, int KK = 0>
inline void fused_products(const uint8_t* a, int64_t K4, const int8_t* bv, __m512i* acc) {
  if constexpr (KK > 0) K4 = KK;
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int64_t k4 = 0; k4 < K4; ++k4, bv += NV * 64) {
    int32_t w;
    std::memcpy(&w, a + 4 * k4, 4);
    const __m512i bc = _mm512_set1_epi32(w);  // the row's 4 bytes at k4
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], bc, _mm512_loadu_si512(bv + j * 64));
  }
}
// The row's dgrad values before any T^-1 (vector j): ((s + O rb) + d rb) inv + cr, the scalar
// epilogue's operations in its order (masked convert: GCC 12 warns on the plain one).
inline __m512 fused_value(__m512i acc, const float* rb16, RowTerms t) {
  const __m512 rb = _mm512_loadu_ps(rb16);
  __m512 v = _mm512_add_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, acc), _mm512_mul_ps(_mm512_set1_ps(t.Of), rb));
  v = _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(t.df), rb));
  return _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(t.inv)), _mm512_set1_ps(t.cr));
}
template <int NV>
inline void dgrad_fused_row(const uint8_t* a, int64_t K4, const int8_t* bv, RowTerms t, float* base,
                            const int64_t* off, const float* rbk) {
  __m512i acc[NV];
  fused_products<NV>(a, K4, bv, acc);
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) {
    float* d = base + off[j];
    _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), fused_value(acc[j], rbk + 16 * j, t)));
  }
}
// BHQ, a row r of a small group (ng <= 4 members, codes a[i], terms t[i], weights w[i]):
// dx_r = sum_i w_i Y_i, summed from 0 in member order as finish<NG> in dgrad_int does; or of a
// large group (ng = 0): dx_r = (Y_r - c2 M_g) is, Y_r from a[0] and t[0].
template <int NV>
inline void bhq_fused_row(int ng, const uint8_t* const* a, const RowTerms* t, const float* w, float c2,
                          const float* mg, float is, int64_t K4, const int8_t* bv, float* base, const int64_t* off,
                          const float* rbk) {
  __m512i acc[NV];
  if (ng == 0) {
    fused_products<NV>(a[0], K4, bv, acc);
    const __m512 vc2 = _mm512_set1_ps(c2), vis = _mm512_set1_ps(is);
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      const __m512 y = fused_value(acc[j], rbk + 16 * j, t[0]);
      float* d = base + off[j];
      const __m512 v = _mm512_mul_ps(_mm512_sub_ps(y, _mm512_mul_ps(vc2, _mm512_loadu_ps(mg + 16 * j))), vis);
      _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), v));
    }
    return;
  }
  __m512 sum[NV];
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) sum[j] = _mm512_setzero_ps();
  for (int i = 0; i < ng; ++i) {
    fused_products<NV>(a[i], K4, bv, acc);
    const __m512 wi = _mm512_set1_ps(w[i]);
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) sum[j] = _mm512_add_ps(sum[j], _mm512_mul_ps(wi, fused_value(acc[j], rbk + 16 * j, t[i])));
  }
#pragma GCC unroll 16
  for (int j = 0; j < NV; ++j) {
    float* d = base + off[j];
    _mm512_storeu_ps(d, _mm512_add_ps(_mm512_loadu_ps(d), sum[j]));
  }
}
// The accumulator's pixels of a 3x3 stride-1 layer with 16 input channels (vector j of a row =
// tap (j / 3, j % 3)) held in registers while a row of output positions passes them: position
// (oh, ow) adds onto pixel columns ow .. ow + 2 of padded rows oh .. oh + 2, so a column is
// loaded when its first contributor comes (ow = column - 2, or the row's start), gets its three
// additions in the order the position-by-position form makes them, and is stored after its last
// (ow = column): 3 loads and 3 stores per position instead of 9 each, the same sums in the same
// order, so the same bits. Padded rows from kFresh on have had no contribution yet (all three at
// oh = 0, row oh + 2 after): their columns start from +0 in the register instead of a load, so the
// accumulator needs no zeroing between samples (every padded pixel has a contributor: Ho = Hp - 2,
// Wo = Wp - 2) and the values are those of adding onto zeroed memory.
struct AccWindow3x3 {
  __m512 w[3][3];  // [kh][column ow + i]
  float* base;     // padded row oh, column 0
  int64_t rs;      // floats per padded row
  template <int kFresh>
  void start(float* row, int64_t row_stride) {
    base = row, rs = row_stride;
#pragma GCC unroll 3
    for (int kh = 0; kh < 3; ++kh)
#pragma GCC unroll 3
      for (int i = 0; i < 2; ++i) w[kh][i] = kh >= kFresh ? _mm512_setzero_ps() : _mm512_loadu_ps(base + kh * rs + i * 16);
  }
  template <int kFresh>
  void add(int64_t ow, const __m512* v) {
    float* const col = base + ow * 16;
#pragma GCC unroll 3
    for (int kh = 0; kh < 3; ++kh) {
      w[kh][2] = kh >= kFresh ? _mm512_setzero_ps() : _mm512_loadu_ps(col + kh * rs + 32);
#pragma GCC unroll 3
      for (int kw = 0; kw < 3; ++kw) w[kh][kw] = _mm512_add_ps(w[kh][kw], v[kh * 3 + kw]);
      _mm512_storeu_ps(col + kh * rs, w[kh][0]);
      w[kh][0] = w[kh][1], w[kh][1] = w[kh][2];
    }
  }
  void finish(int64_t Wo) {  // the row's last two columns
#pragma GCC unroll 3
    for (int kh = 0; kh < 3; ++kh)
#pragma GCC unroll 3
      for (int i = 0; i < 2; ++i) _mm512_storeu_ps(base + Wo * 16 + kh * rs + i * 16, w[kh][i]);
  }
};
// One sample's P rows in order (NV = Ckk / 16 vectors per row, K4 = Cout / 4): (oh, ow) of row p
// counted along, its finishing terms from terms(p).
constexpr int64_t kFusedMaxNV = 9, kFusedMaxK = 16;  // beyond: the general path measured faster
template <int NV, typename Terms>
void dgrad_fused_sample(const uint8_t* a, int64_t lda, int64_t P, int64_t Wo, int64_t step, int64_t row_step, int64_t K4,
                        const int8_t* bv, const int64_t* off, const float* rbk, Terms&& terms, float* acc) {
  for (int64_t p = 0, oh = 0, ow = 0; p < P; ++p, ow = ow + 1 == Wo ? (++oh, 0) : ow + 1)
    dgrad_fused_row<NV>(a + p * lda, K4, bv, terms(p), acc + oh * row_step + ow * step, off, rbk);
}

// The same for a 3x3 stride-1 layer with 16 input channels, through AccWindow3x3.
// KK: fused_products' compile-time K4 (0: run time).
template <int KK, typename Terms>
void dgrad_fused_sample_3x3(const uint8_t* a, int64_t lda, int64_t Ho, int64_t Wo, int64_t Wp, int64_t K4,
                            const int8_t* bv, const float* rbk, Terms&& terms, float* acc) {
  AccWindow3x3 win;
  auto row = [&]<int kFresh>(int64_t oh, int64_t p) {
    win.start<kFresh>(acc + oh * Wp * 16, Wp * 16);
    for (int64_t ow = 0; ow < Wo; ++ow, ++p) {
      __m512i s[9];
      fused_products<9, KK>(a + p * lda, K4, bv, s);
      const RowTerms t = terms(p);
      __m512 v[9];
#pragma GCC unroll 9
      for (int j = 0; j < 9; ++j) v[j] = fused_value(s[j], rbk + 16 * j, t);
      win.add<kFresh>(ow, v);
    }
    win.finish(Wo);
  };
  for (int64_t oh = 0; oh < Ho; ++oh) {
    if (oh == 0) row.template operator()<0>(oh, 0);
    else row.template operator()<2>(oh, oh * Wo);
  }
}

// fprop of a layer with Cout = 16 (one register of outputs per position): no im2row. R
// consecutive positions of one output row at a time, their patches read in place from the padded
// HWC image (kernel row kh of position i: k Cin bytes at base + kh Wp Cin + i stride Cin, read as
// seg4 = ceil(k Cin / 4) groups of 4 bytes: past k Cin they are the next pixels' bytes, whose
// weights are 0, and the image buffer has 3 bytes of slack after it), B = the weight codes packed
// as [K4 = k seg4][16 outputs][4 bytes] in the patch's (kh, kw, c) order, zero in the gaps; each
// position's 16 integer products finished from the registers with the scalar epilogue's
// operations in its order (no contraction) into a [P, 16] buffer. The general path wrote the
// patches (113 KB per sample at 28x28), summed them, wrote the products and transposed them
// first; the integer products and the patch sums are the same integers, so the same bits.
struct FpropTerms {
  __m512 O, d, inv, crow, bias;
  bool has_bias;
};
// The integer products of R positions (patches `step` bytes apart from `base`, kernel rows `row`
// bytes apart, k of them, seg4 4-byte groups each) with one 16-output slice of packed weight
// codes bv [k seg4][16][4]: acc[i] lane c = position i's sum for output c. Shared by the fused
// fprop and the direct dgrad (dgrad_direct_run).
template <int R>
[[gnu::always_inline]] inline void fused_products16(const uint8_t* base, int64_t step, int64_t row, int64_t k, int64_t seg4,
                                                    const int8_t* bv, __m512i (&acc)[R]) {
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t kh = 0; kh < k; ++kh) {
    const uint8_t* a = base + kh * row;
    const int8_t* b = bv + kh * seg4 * 64;
    for (int64_t j = 0; j < seg4; ++j) {
      const __m512i bj = _mm512_loadu_si512(b + j * 64);
#pragma GCC unroll 32
      for (int i = 0; i < R; ++i) {
        int32_t w;
        std::memcpy(&w, a + i * step + 4 * j, 4);
        acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_set1_epi32(w), bj);
      }
    }
  }
}
template <int R>
inline void fprop_fused_run(const uint8_t* base, int64_t step, int64_t row, int64_t k, int64_t seg4, const int8_t* bv,
                            const float* rx, const FpropTerms& t, float* out) {
  __m512i acc[R];
  fused_products16<R>(base, step, row, k, seg4, bv, acc);
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i) {  // ((s + O rx) + d rx) inv + crow (+ bias), as the scalar epilogue
    const __m512 r = _mm512_set1_ps(rx[i]);
    __m512 v = _mm512_add_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, acc[i]), _mm512_mul_ps(t.O, r));
    v = _mm512_add_ps(v, _mm512_mul_ps(t.d, r));
    v = _mm512_add_ps(_mm512_mul_ps(v, t.inv), t.crow);
    if (t.has_bias) v = _mm512_add_ps(v, t.bias);
    _mm512_storeu_ps(out + 16 * i, v);
  }
}
// Positions per call: a 28-wide row in one (28 accumulators, each weight vector loaded once for
// 28 positions; 14 per call measured 5-7% slower in bench_conv_layer 16 16 28 forward on codes).
constexpr int kFpropRun = 28;
// The cases of a switch over a run's length (X(r): case r), up to kFpropRun / kFpropRun32.
#define FQT_RUNS_1_14(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14)
#define FQT_RUNS_1_28(X) \
  FQT_RUNS_1_14(X) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23) X(24) X(25) X(26) X(27) X(28)
// out[i] = the code sum of pixel i of n consecutive C-byte pixels: one sum of absolute
// differences per 16 channels (a byte_sum call per pixel cost ~1 ms a stage-1 dgrad layer).
inline void pixel_code_sums(const uint8_t* px, int64_t n, int64_t C, int32_t* out) {
  if (C % 16 != 0) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(byte_sum(px + i * C, C));
    return;
  }
  const __m128i z = _mm_setzero_si128();
  for (int64_t i = 0; i < n; ++i) {
    __m128i acc = _mm_setzero_si128();
    for (int64_t c = 0; c < C; c += 16)
      acc = _mm_add_epi64(acc, _mm_sad_epu8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(px + i * C + c)), z));
    out[i] = _mm_cvtsi128_si32(_mm_add_epi64(acc, _mm_unpackhi_epi64(acc, acc)));
  }
}
// rx [P] = the patch code sums of one padded HWC image (pix [Hp (Wp + Wo) + Wo] scratch).
inline void fprop_patch_sums(const uint8_t* img, const Geom& g, int32_t* pix, float* rx) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad, C = g.C, k = g.k, s = g.stride;
  // Pixel sums, then the k x k box sums of the patches, separably: across each image row at the
  // output columns, then down.
  pixel_code_sums(img, Hp * Wp, C, pix);
  int32_t* hs = pix + Hp * Wp;  // [Hp][Wo], then one output row's sums (loops over ow innermost)
  const int64_t Wo = g.Wo;
  for (int64_t h = 0; h < Hp; ++h) {
    int32_t* __restrict d = hs + h * Wo;
    const int32_t* __restrict src = pix + h * Wp;
    for (int64_t ow = 0; ow < Wo; ++ow) d[ow] = src[ow * s];
    for (int64_t kw = 1; kw < k; ++kw)
      for (int64_t ow = 0; ow < Wo; ++ow) d[ow] += src[ow * s + kw];
  }
  int32_t* __restrict acc = hs + Hp * Wo;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    for (int64_t ow = 0; ow < Wo; ++ow) acc[ow] = hs[oh * s * Wo + ow];
    for (int64_t kh = 1; kh < k; ++kh)
      for (int64_t ow = 0; ow < Wo; ++ow) acc[ow] += hs[(oh * s + kh) * Wo + ow];
    for (int64_t ow = 0; ow < Wo; ++ow) rx[oh * Wo + ow] = static_cast<float>(acc[ow]);  // <= Ckk * 255: exact
  }
}
// One sample: out [P, 16] finished values; rx [P] the patch code sums (filled here from the
// image's pixel sums: the same integers as summing the patch rows); pix [Hp (Wp + Wo) + Wo] scratch.
inline void fprop_fused_sample(const uint8_t* img, const Geom& g, const int8_t* bv, const FpropTerms& t, int32_t* pix,
                               float* rx, float* out) {
  fprop_patch_sums(img, g, pix, rx);
  const int64_t Wp = g.W + 2 * g.pad, C = g.C, k = g.k, s = g.stride;
  const int64_t seg4 = (k * C + 3) / 4, step = s * C, row = Wp * C;
  for (int64_t oh = 0; oh < g.Ho; ++oh)
    for (int64_t ow = 0; ow < g.Wo; ow += kFpropRun) {
      const int64_t p = oh * g.Wo + ow;
      const uint8_t* base = img + (oh * s * Wp + ow * s) * C;
      switch (std::min<int64_t>(kFpropRun, g.Wo - ow)) {
#define FQT_FPROP_RUN(r) \
  case r: fprop_fused_run<r>(base, step, row, k, seg4, bv, rx + p, t, out + 16 * p); break;
        FQT_RUNS_1_28(FQT_FPROP_RUN)
#undef FQT_FPROP_RUN
      }
    }
}

// fprop of a layer with Cout a multiple of 32 (the 32- and 64-channel stages): the same kernel
// 32 outputs (two registers) at a time, R <= 14 positions of one output row per call (28
// accumulators, B's two vectors and the broadcast in the 32 registers), so each B vector serves
// R positions and each broadcast two vpdpbusd. B = one 32-output slice of the weight codes,
// [K4][32 outputs][4 bytes]; tm = that slice's [5][32] finishing terms (O, d, inv, crow, bias);
// out: rows of ldo floats. The general path wrote the patches (im2row), summed each of them,
// ran the GEMM kernel and transposed its integer products before the epilogue: the same
// integers, and the finishing is the scalar epilogue's operations in its order, so the same bits.
// fused_products16 for a 32-output slice bv [k seg4][32][4]: acc[i][v] = outputs 16 v .. 16 v + 15.
template <int R>
[[gnu::always_inline]] inline void fused_products32(const uint8_t* base, int64_t step, int64_t row, int64_t k, int64_t seg4,
                                                    const int8_t* bv, __m512i (&acc)[R][2]) {
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
  for (int64_t kh = 0; kh < k; ++kh) {
    const uint8_t* a = base + kh * row;
    const int8_t* b = bv + kh * seg4 * 128;
    for (int64_t j = 0; j < seg4; ++j) {
      const __m512i b0 = _mm512_loadu_si512(b + j * 128), b1 = _mm512_loadu_si512(b + j * 128 + 64);
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        int32_t w;
        std::memcpy(&w, a + i * step + 4 * j, 4);
        const __m512i bc = _mm512_set1_epi32(w);
        acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], bc, b0);
        acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], bc, b1);
      }
    }
  }
}
template <int R>
inline void fprop_fused_run32(const uint8_t* base, int64_t step, int64_t row, int64_t k, int64_t seg4, const int8_t* bv,
                              const float* rx, const float* tm, bool has_bias, float* out, int64_t ldo) {
  __m512i acc[R][2];
  fused_products32<R>(base, step, row, k, seg4, bv, acc);
#pragma GCC unroll 2
  for (int v = 0; v < 2; ++v) {  // ((s + O rx) + d rx) inv + crow (+ bias), as the scalar epilogue
    const __m512 O = _mm512_loadu_ps(tm + 16 * v), d = _mm512_loadu_ps(tm + 32 + 16 * v),
                 inv = _mm512_loadu_ps(tm + 64 + 16 * v), crow = _mm512_loadu_ps(tm + 96 + 16 * v),
                 bias = _mm512_loadu_ps(tm + 128 + 16 * v);
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      const __m512 r = _mm512_set1_ps(rx[i]);
      __m512 y = _mm512_add_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, acc[i][v]), _mm512_mul_ps(O, r));
      y = _mm512_add_ps(y, _mm512_mul_ps(d, r));
      y = _mm512_add_ps(_mm512_mul_ps(y, inv), crow);
      if (has_bias) y = _mm512_add_ps(y, bias);
      _mm512_storeu_ps(out + i * ldo + 16 * v, y);
    }
  }
}
constexpr int kFpropRun32 = 14;
// One sample, Cout = 32 nh: out [P, Cout] finished values; bv = nh slices of [K4][32][4]; tm = nh
// slices of [5][32] terms; rx, pix as fprop_fused_sample.
inline void fprop_fused_sample32(const uint8_t* img, const Geom& g, int64_t nh, const int8_t* bv, const float* tm,
                                 bool has_bias, int32_t* pix, float* rx, float* out) {
  fprop_patch_sums(img, g, pix, rx);
  const int64_t Wp = g.W + 2 * g.pad, C = g.C, k = g.k, s = g.stride, cout = 32 * nh;
  const int64_t seg4 = (k * C + 3) / 4, step = s * C, row = Wp * C, slice = k * seg4 * 128;
  for (int64_t oh = 0; oh < g.Ho; ++oh)
    for (int64_t ow = 0; ow < g.Wo; ow += kFpropRun32) {
      const int64_t p = oh * g.Wo + ow;
      const uint8_t* base = img + (oh * s * Wp + ow * s) * C;
      for (int64_t h = 0; h < nh; ++h) {
        const int8_t* bh = bv + h * slice;
        const float* th = tm + h * 160;
        float* o = out + p * cout + 32 * h;
        switch (std::min<int64_t>(kFpropRun32, g.Wo - ow)) {
#define FQT_FPROP_RUN(r) \
  case r: fprop_fused_run32<r>(base, step, row, k, seg4, bh, rx + p, th, has_bias, o, cout); break;
          FQT_RUNS_1_14(FQT_FPROP_RUN)
#undef FQT_FPROP_RUN
        }
      }
    }
}

// dgrad of a layer whose gradient has one grid per sample (rows per sample, PSQ or BHQ: value =
// (c + Lz) / s, Lz = lo s, the same for all of the sample's positions), computed as the
// convolution it is: each input position's dx is a sum over the (kernel tap, output channel)
// pairs that reach it, of gradient codes times weight codes, with Cin outputs, run by the fused
// fprop's products (the gradient codes are the u8 image, HWC as G's pixel rows already are).
// Stride s > 1 splits the input positions into s x s phases (ih = s m + a, iw = s n + b); each
// phase is a stride-1 convolution of G with its own taps (kernel rows kh = (a + pad) mod s + s j,
// columns alike), flipped (DirectPhase). The gradient image is padded with code 0, so the
// integer products S and the patch code sums rx cover the valid taps only; the terms of the
// offsets over the valid taps depend on how many of a position's taps fall inside the gradient
// image, so they come per border class (a range of valid kernel rows times one of columns):
//   dx = ((float(S + Oz Zb) + O rx) + d rx + E) inv,   inv = 1 / (s sw),
// Zb = the weight codes (s8) summed over the class's valid taps and Cout, Oz = round(Lz) so that
// S + Oz Zb, where a gradient centred on 0 cancels, is an exact integer; O + d = Lwc, the weight
// offset in code units (as fprop); E = (Lz - Oz) Zb + Lz Lwc nv, nv = the class's valid terms.
// The per-pixel-row form (G W, then col2im) makes Cout-term products for all k k Cin columns of
// every output position and finishes and scatters each of them; this one finishes Cin values per
// input position. Not the same bits as that form (another order of the fp32 finishing): both
// equal the simulated dgrad to fp32 rounding (set_conv_direct_dgrad(false) keeps the other).
struct DirectTerms {
  __m512 O, d, inv;
  const int32_t* Z;    // this output row's classes: [column class][Cin] Oz Zb
  const float* E;      // [ .. ][Cin]
  const int32_t* cls;  // column class of each output column
  int64_t cin;
};
// R positions of one phase row: out + i ldo gets position i's 16 outputs.
template <int R>
inline void dgrad_direct_run(const uint8_t* base, int64_t step, int64_t row, int64_t k, int64_t seg4, const int8_t* bv,
                             const float* rx, const DirectTerms& t, int64_t n0, float* out, int64_t ldo) {
  __m512i acc[R];
  fused_products16<R>(base, step, row, k, seg4, bv, acc);
#pragma GCC unroll 32
  for (int i = 0; i < R; ++i) {
    const int64_t c = t.cls[n0 + i] * t.cin;
    const __m512 r = _mm512_set1_ps(rx[i]);
    __m512 v = _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_add_epi32(acc[i], _mm512_loadu_si512(t.Z + c)));
    v = _mm512_add_ps(v, _mm512_mul_ps(t.O, r));
    v = _mm512_add_ps(v, _mm512_mul_ps(t.d, r));
    v = _mm512_add_ps(v, _mm512_loadu_ps(t.E + c));
    _mm512_storeu_ps(out + i * ldo, _mm512_mul_ps(v, t.inv));
  }
}
// The same for a 32-output slice (outputs off .. off + 31 of Cin).
template <int R>
inline void dgrad_direct_run32(const uint8_t* base, int64_t step, int64_t row, int64_t k, int64_t seg4, const int8_t* bv,
                               const float* rx, const DirectTerms& t, int64_t n0, int64_t off, float* out, int64_t ldo) {
  __m512i acc[R][2];
  fused_products32<R>(base, step, row, k, seg4, bv, acc);
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) {
    const __m512 r = _mm512_set1_ps(rx[i]);
#pragma GCC unroll 2
    for (int v = 0; v < 2; ++v) {
      const int64_t c = t.cls[n0 + i] * t.cin + off + 16 * v;
      __m512 y = _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_add_epi32(acc[i][v], _mm512_loadu_si512(t.Z + c)));
      y = _mm512_add_ps(y, _mm512_mul_ps(t.O, r));
      y = _mm512_add_ps(y, _mm512_mul_ps(t.d, r));
      y = _mm512_add_ps(y, _mm512_loadu_ps(t.E + c));
      _mm512_storeu_ps(out + i * ldo + 16 * v, _mm512_mul_ps(y, t.inv));
    }
  }
}
// One phase of the direct dgrad (see above): outputs (m, n) < (Ma, Mb) at input positions
// (s m + a, s n + b); its patch for output (m, n) is the ka x kb window of the gradient image from
// row m + ra, column n + rb (they may lie in the padding), its taps (j, l) the kernel's
// (kh0 + s (ka - 1 - j), kw0 + s (kb - 1 - l)). bv: Cin / W slices of [ka seg4][W][4 bytes]
// (W = 16 for Cin = 16, else 32); rcls / ccls the border class of each output row / column;
// Z, E: [row class][column class][Cin] terms of the sample (zoff into its arrays).
struct DirectPhase {
  int64_t a = 0, b = 0, ka = 0, kb = 0, kh0 = 0, kw0 = 0, ra = 0, rb = 0, Ma = 0, Mb = 0, seg4 = 0, nrc = 0, ncc = 0;
  std::vector<int8_t> bv;
  std::vector<int32_t> rcls, ccls;
  std::vector<int64_t> Zb, nv;  // [class][Cin], [class]
  int64_t zoff = 0;
};
// One sample's phase: img the padded gradient image (pad rows / columns of zero code around the
// Ho x Wo gradient, C channels, Wp wide), pix its pixel code sums (Wp wide) and hs scratch of
// (Ma + ka) x Mb; rx scratch of Ma x Mb; out [H W][Cin], position (ih, iw) at (ih W + iw) Cin.
[[gnu::noinline]] void dgrad_direct_phase(const DirectPhase& ph, const uint8_t* img, const int32_t* pix, int64_t Wp,
                                          int64_t pad, int64_t C, int64_t s, int64_t W, DirectTerms t, const int32_t* Z,
                                          const float* E, int32_t* hs, float* rx, float* out) {
  const int64_t cin = t.cin, ldo = s * cin;
  // Patch code sums: ka x kb box sums of the pixel sums, across (the rows the patches use) then
  // down, the columns innermost (vector loops).
  const int64_t h0 = ph.ra + pad, h1 = ph.Ma - 1 + ph.ra + pad + ph.ka;  // pixel rows [h0, h1)
  for (int64_t h = h0; h < h1; ++h) {
    int32_t* __restrict d = hs + (h - h0) * ph.Mb;
    const int32_t* __restrict src = pix + h * Wp + ph.rb + pad;
    for (int64_t n = 0; n < ph.Mb; ++n) d[n] = src[n];
    for (int64_t l = 1; l < ph.kb; ++l)
      for (int64_t n = 0; n < ph.Mb; ++n) d[n] += src[n + l];
  }
  for (int64_t m = 0; m < ph.Ma; ++m) {
    int32_t* __restrict acc = hs + (h1 - h0) * ph.Mb;  // (scratch after the rows)
    for (int64_t n = 0; n < ph.Mb; ++n) acc[n] = hs[m * ph.Mb + n];
    for (int64_t j = 1; j < ph.ka; ++j)
      for (int64_t n = 0; n < ph.Mb; ++n) acc[n] += hs[(m + j) * ph.Mb + n];
    for (int64_t n = 0; n < ph.Mb; ++n) rx[m * ph.Mb + n] = static_cast<float>(acc[n]);  // <= k k Cout 255: exact
  }
  const int64_t row = Wp * C;
  t.cls = ph.ccls.data();
  for (int64_t m = 0; m < ph.Ma; ++m) {
    t.Z = Z + ph.zoff + ph.rcls[m] * ph.ncc * cin, t.E = E + ph.zoff + ph.rcls[m] * ph.ncc * cin;
    float* orow = out + ((s * m + ph.a) * W + ph.b) * cin;
    const uint8_t* prow = img + ((m + ph.ra + pad) * Wp + ph.rb + pad) * C;
    if (cin == 16) {
      for (int64_t n0 = 0; n0 < ph.Mb; n0 += kFpropRun) {
        const uint8_t* base = prow + n0 * C;
        const float* r = rx + m * ph.Mb + n0;
        float* o = orow + n0 * ldo;
        switch (std::min<int64_t>(kFpropRun, ph.Mb - n0)) {
#define FQT_DIRECT_RUN(q) \
  case q: dgrad_direct_run<q>(base, C, row, ph.ka, ph.seg4, ph.bv.data(), r, t, n0, o, ldo); break;
          FQT_RUNS_1_28(FQT_DIRECT_RUN)
#undef FQT_DIRECT_RUN
        }
      }
      continue;
    }
    const int64_t slice = ph.ka * ph.seg4 * 128;
    for (int64_t n0 = 0; n0 < ph.Mb; n0 += kFpropRun32) {
      const uint8_t* base = prow + n0 * C;
      const float* r = rx + m * ph.Mb + n0;
      for (int64_t h = 0; h < cin / 32; ++h) {
        const int8_t* bh = ph.bv.data() + h * slice;
        float* o = orow + n0 * ldo + 32 * h;
        switch (std::min<int64_t>(kFpropRun32, ph.Mb - n0)) {
#define FQT_DIRECT_RUN(q) \
  case q: dgrad_direct_run32<q>(base, C, row, ph.ka, ph.seg4, bh, r, t, n0, 32 * h, o, ldo); break;
          FQT_RUNS_1_14(FQT_DIRECT_RUN)
#undef FQT_DIRECT_RUN
        }
      }
    }
  }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
#define FQT_WGRAD_DIRECT 1
// wgrad of a stride-1 layer with 16 input and 16 output channels, straight from the padded HWC
// image (no im2col, no GEMM packing). Output positions go 4 at a time along each output row
// (a "group"; a row's last group may be short). For tap (kh, kw), a group reads 4 consecutive
// pixels, 64 contiguous bytes of the image, which one vpermb turns into the u8 operand
// [16 input channels][4 positions]; the s8 operands are the group's gradient codes, prepared
// once per sample in the same form, [16 output channels][4 positions] (wgrad_groups), so output
// channel c's 4 bytes are a broadcast at offset 4c. 17 accumulators per tap: the 16 output
// channels (lanes = input channels: dW^T's rows (c, kh, kw) of this tap) and a 17th with a
// broadcast of ones, the patch code sums of the tap's rows. A short group's missing positions
// are zero bytes on both sides. The sums are those of the im2col GEMM, exact integers, added in
// int32 per sample and widened into int64 at most every `flush` samples (the int32 bound).
// (Masked vpermb: GCC 12 warns on the plain one.)
constexpr int kWgradAcc = 17;  // per tap: 16 output channels + the code sums
inline __m512i four_pixels(const uint8_t* p, int64_t n) {  // n <= 4 pixels of 16 bytes, zero after
  if (n >= 4) return _mm512_loadu_si512(p);
#if defined(__SANITIZE_ADDRESS__)
  alignas(64) uint8_t buf[64] = {};
  std::memcpy(buf, p, static_cast<size_t>(16 * n));
  return _mm512_load_si512(buf);
#else
  return _mm512_maskz_loadu_epi8((uint64_t{1} << (16 * n)) - 1, p);
#endif
}
inline __m512i pixel_major_to_channel_major(__m512i v) {  // [4 pixels][16 bytes] -> [16][4]
  alignas(64) uint8_t idx[64];  // out byte 4c + i = pixel i's byte c = in byte 16 i + c
  for (int c = 0; c < 16; ++c)
    for (int i = 0; i < 4; ++i) idx[4 * c + i] = static_cast<uint8_t>(16 * i + c);
  return _mm512_maskz_permutexvar_epi8(~uint64_t{0}, _mm512_load_si512(idx), v);
}
// One sample's gradient codes gc [P][16] -> groups [Ho][ceil(Wo / 4)][16 channels][4 positions]
// as s8 (xor flip: 8-bit codes - 128); returns the per-channel sums of those s8 values in lanes
// 0..15 (int32, < 2^31 within the int32 bound).
inline __m512i wgrad_groups(const uint8_t* gc, int64_t Ho, int64_t Wo, uint8_t flip, int8_t* out) {
  const __m512i vflip = _mm512_set1_epi8(static_cast<char>(flip)), ones = _mm512_set1_epi8(1);
  __m512i sums = _mm512_setzero_si512();
  for (int64_t oh = 0; oh < Ho; ++oh)
    for (int64_t ow = 0; ow < Wo; ow += 4, out += 64) {
      const int64_t n = std::min<int64_t>(4, Wo - ow);
      const __m512i v = pixel_major_to_channel_major(_mm512_maskz_xor_epi32(
          static_cast<__mmask16>((1u << (4 * n)) - 1), four_pixels(gc + (oh * Wo + ow) * 16, n), vflip));
      _mm512_storeu_si512(out, v);
      sums = _mm512_dpbusd_epi32(sums, ones, v);
    }
  return sums;
}
// One group's step of a pass: acc[t][c] += x[t] (u8, tap t's operand) against output channel
// c's 4 gradient bytes (g + 4c, broadcast), t < NT, c < 8.
template <int NT>
[[gnu::always_inline]] inline void wgrad_taps8(const __m512i* x, const int8_t* g, __m512i (*acc)[8]) {
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) {
    int32_t w;
    std::memcpy(&w, g + 4 * c, 4);
    const __m512i wv = _mm512_set1_epi32(w);
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) acc[t][c] = _mm512_dpbusd_epi32(acc[t][c], x[t], wv);
  }
}
// NT taps (t0 .. t0 + NT - 1, t = kh k + kw) and 8 output channels (from c0) at a time: each
// gradient broadcast serves NT taps (with 16 channels x 1 tap, every vpdpbusd had its own load).
template <int NT, bool kSums>
inline void wgrad_direct_block(const uint8_t* img, int64_t Wp, int64_t Ho, int64_t Wo, int64_t k, const int8_t* grp,
                               int64_t t0, int c0, int32_t* acc32) {
  const __m512i ones = _mm512_set1_epi32(0x01010101);
  const int64_t G4 = (Wo + 3) / 4;
  __m512i acc[NT][8], sums[NT];
  int64_t off[NT];  // tap t's pixel offset in the image, in bytes
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    off[t] = (((t0 + t) / k) * Wp + (t0 + t) % k) * 16;
    sums[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) acc[t][c] = _mm512_setzero_si512();
  }
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const uint8_t* row = img + oh * Wp * 16;
    const int8_t* g = grp + oh * G4 * 64 + 4 * c0;
    for (int64_t ow = 0; ow < Wo; ow += 4, g += 64) {
      __m512i x[NT];
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) x[t] = pixel_major_to_channel_major(four_pixels(row + off[t] + ow * 16, Wo - ow));
      wgrad_taps8<NT>(x, g, acc);
      if constexpr (kSums)
#pragma GCC unroll 4
        for (int t = 0; t < NT; ++t) sums[t] = _mm512_dpbusd_epi32(sums[t], x[t], ones);
    }
  }
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    int32_t* a32 = acc32 + (t0 + t) * kWgradAcc * 16;
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      int32_t* d = a32 + 16 * (c0 + c);
      _mm512_storeu_si512(d, _mm512_add_epi32(_mm512_loadu_si512(d), acc[t][c]));
    }
    if constexpr (kSums) {
      int32_t* d = a32 + 16 * 16;
      _mm512_storeu_si512(d, _mm512_add_epi32(_mm512_loadu_si512(d), sums[t]));
    }
  }
}
// One sample: img the padded HWC image [Hp][Wp][16], grp its gradient groups (wgrad_groups),
// acc32 [k k][17][16] int32 sums, added to. Taps 3 at a time; k k is 0 or 1 modulo 3, so at
// most one tap is left for a single pass.
inline void wgrad_direct_sample(const uint8_t* img, int64_t Wp, int64_t Ho, int64_t Wo, int64_t k, const int8_t* grp,
                                int32_t* acc32) {
  const int64_t kk = k * k;
  int64_t t = 0;
  for (; t + 3 <= kk; t += 3) {
    wgrad_direct_block<3, true>(img, Wp, Ho, Wo, k, grp, t, 0, acc32);
    wgrad_direct_block<3, false>(img, Wp, Ho, Wo, k, grp, t, 8, acc32);
  }
  if (t < kk) {
    wgrad_direct_block<1, true>(img, Wp, Ho, Wo, k, grp, t, 0, acc32);
    wgrad_direct_block<1, false>(img, Wp, Ho, Wo, k, grp, t, 8, acc32);
  }
}

// The same for the wider stride-1 layers (Cin a multiple of 16, at least 32; Cout a multiple of
// 16: the 32- and 64-channel stages). Their u8 operands, [16 input channels of slice s][4
// positions], are made once per sample for every 4 consecutive pixels of the image
// (wgrad_pixel_groups: T [Hp Wp][Cin / 16][64]; a group's operand for tap (kh, kw) is the one
// starting at pixel (oh + kh, ow + kw)), the gradient codes as [Cout][4 positions] per group
// (wgrad_groups_wide). A pass takes NT <= 3 taps of one kernel row, one input slice and 8
// output channels: 24 accumulators (and the passes of channels 0..7 the taps' patch code sums).
// Exact integer sums, as the im2col GEMM's.
inline void wgrad_pixel_groups(const uint8_t* img, int64_t npix, int64_t cin, uint8_t* T) {
  const int64_t S = cin / 16;
  for (int64_t i = 0; i < npix; ++i)
    for (int64_t sl = 0; sl < S; ++sl) {
      const uint8_t* p = img + i * cin + 16 * sl;
      __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + cin)), 1);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * cin)), 2);
      v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * cin)), 3);
      _mm512_storeu_si512(T + (i * S + sl) * 64, pixel_major_to_channel_major(v));
    }
}
// One sample's gradient codes gc [P][Cout] -> groups [Ho][G4][Cout][4 positions] as s8 (xor
// flip; zero bytes for a short group's missing positions); adds the per-channel sums of those s8
// values to rg.
inline void wgrad_groups_wide(const uint8_t* gc, int64_t Ho, int64_t Wo, int64_t cout, uint8_t flip, int8_t* out,
                              int64_t* rg) {
  const __m512i vflip = _mm512_set1_epi8(static_cast<char>(flip)), ones = _mm512_set1_epi8(1);
  const int64_t S = cout / 16;
  for (int64_t sl = 0; sl < S; ++sl) {
    __m512i sums = _mm512_setzero_si512();
    for (int64_t oh = 0; oh < Ho; ++oh)
      for (int64_t ow = 0, gi = 0; ow < Wo; ow += 4, ++gi) {
        const int64_t n = std::min<int64_t>(4, Wo - ow);
        const uint8_t* p = gc + (oh * Wo + ow) * cout + 16 * sl;
        __m512i v = _mm512_setzero_si512();
        // Position i's 16 bytes into lanes 4i .. 4i + 3 (masked broadcast: GCC 12 warns on the plain one).
        for (int64_t i = 0; i < n; ++i)
          v = _mm512_mask_xor_epi32(
              v, static_cast<__mmask16>(0xFu << (4 * i)),
              _mm512_maskz_broadcast_i32x4(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i * cout))), vflip);
        v = pixel_major_to_channel_major(v);
        _mm512_storeu_si512(out + ((oh * ((Wo + 3) / 4) + gi) * cout + 16 * sl) * 4, v);
        sums = _mm512_dpbusd_epi32(sums, ones, v);
      }
    alignas(64) int32_t s16[16];
    _mm512_store_si512(s16, sums);
    for (int c = 0; c < 16; ++c) rg[16 * sl + c] += s16[c];
  }
}
// kSums (the passes of output channels 0..7): also the taps' patch code sums, an accumulator
// per tap against ones, with a short group's missing positions masked off the image bytes
// (there they are the next pixels'; their gradient bytes are 0, so the products need no mask).
template <int NT, bool kSums>
inline void wgrad_direct_block_wide(const uint8_t* T, int64_t Wp, int64_t S, int64_t Ho, int64_t Wo, int64_t cout,
                                    const int8_t* grp, int64_t kh, int64_t kw0, int64_t sl, int64_t c0, int64_t k,
                                    int64_t cin, int32_t* acc32, int32_t* sums32) {
  const int64_t G4 = (Wo + 3) / 4, rest = Wo - 4 * (G4 - 1);  // positions in a row's last group
  // [16 channels][4 positions]: bytes 4c + i of the positions i < rest
  const __mmask64 last = rest == 4 ? ~uint64_t{0} : uint64_t{0x1111111111111111} * ((uint64_t{1} << rest) - 1);
  const __m512i ones = _mm512_set1_epi32(0x01010101);
  __m512i acc[NT][8], sums[NT];
#pragma GCC unroll 3
  for (int t = 0; t < NT; ++t) {
    if constexpr (kSums) sums[t] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) acc[t][c] = _mm512_setzero_si512();
  }
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const uint8_t* trow = T + (((oh + kh) * Wp + kw0) * S + sl) * 64;
    const int8_t* g = grp + (oh * G4 * cout + c0) * 4;
    for (int64_t gi = 0; gi < G4; ++gi, trow += 4 * S * 64, g += cout * 4) {
      __m512i x[NT];
#pragma GCC unroll 3
      for (int t = 0; t < NT; ++t) x[t] = _mm512_loadu_si512(trow + t * S * 64);
      wgrad_taps8<NT>(x, g, acc);
      if constexpr (kSums) {
        const __mmask64 m = gi + 1 == G4 ? last : ~uint64_t{0};
#pragma GCC unroll 3
        for (int t = 0; t < NT; ++t) sums[t] = _mm512_dpbusd_epi32(sums[t], _mm512_maskz_mov_epi8(m, x[t]), ones);
      }
    }
  }
#pragma GCC unroll 3
  for (int t = 0; t < NT; ++t) {
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) {
      int32_t* d = acc32 + ((kh * k + kw0 + t) * cout + c0 + c) * cin + 16 * sl;
      _mm512_storeu_si512(d, _mm512_add_epi32(_mm512_loadu_si512(d), acc[t][c]));
    }
    if constexpr (kSums) {
      int32_t* d = sums32 + (kh * k + kw0 + t) * cin + 16 * sl;
      _mm512_storeu_si512(d, _mm512_add_epi32(_mm512_loadu_si512(d), sums[t]));
    }
  }
}
// acc32 [k k][Cout][Cin] int32 sums of one sample's products, sums32 [k k][Cin] its patch code
// sums, added to.
inline void wgrad_direct_sample_wide(const uint8_t* T, int64_t Wp, int64_t Ho, int64_t Wo, int64_t k, int64_t cin,
                                     int64_t cout, const int8_t* grp, int32_t* acc32, int32_t* sums32) {
  const int64_t S = cin / 16;
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t kw0 = 0; kw0 < k; kw0 += 3)
      for (int64_t sl = 0; sl < S; ++sl)
        for (int64_t c0 = 0; c0 < cout; c0 += 8) {
#define FQT_WIDE(nt, sums) \
  wgrad_direct_block_wide<nt, sums>(T, Wp, S, Ho, Wo, cout, grp, kh, kw0, sl, c0, k, cin, acc32, sums32)
          const int64_t nt = std::min<int64_t>(3, k - kw0);
          if (c0 == 0) {
            if (nt == 3) FQT_WIDE(3, true);
            else if (nt == 2) FQT_WIDE(2, true);
            else FQT_WIDE(1, true);
          } else {
            if (nt == 3) FQT_WIDE(3, false);
            else if (nt == 2) FQT_WIDE(2, false);
            else FQT_WIDE(1, false);
          }
#undef FQT_WIDE
        }
}
// The same for one input channel (a first layer on grayscale images) and 16 output channels,
// lanes = the output channels: per group of 4 output positions and per tap, the 4 input codes
// under the tap are 4 consecutive bytes of the padded image row, one 32-bit broadcast against
// the group's gradient codes [16 output channels][4 positions]: one vpdpbusd per tap and group,
// NT taps per pass (each group's gradient vector loaded once for them). The im2col path made a
// [k k, 16] GEMM of it (k k = 9 rows: most of each kernel tile idle) plus an im2col per sample:
// 0.95 ms for the 1 -> 16 layer at batch 128 against 1.08 ms for the 16 -> 16 layer's 16 times
// the products. A short group's missing positions have zero gradient bytes, so the image bytes
// read past a row's end (up to 3; the image buffer has slack) add nothing. The code sums of the
// taps' rows are taken from the image by row (wgrad_direct_c1_sums).
template <int NT>
inline void wgrad_direct_c1_block(const uint8_t* img, int64_t Wp, int64_t Ho, int64_t Wo, int64_t k, const int8_t* grp,
                                  int64_t t0, int32_t* acc32) {
  const int64_t G4 = (Wo + 3) / 4;
  __m512i acc[NT];
  int64_t off[NT];  // tap t's byte offset in the image
#pragma GCC unroll 9
  for (int t = 0; t < NT; ++t) off[t] = ((t0 + t) / k) * Wp + (t0 + t) % k, acc[t] = _mm512_setzero_si512();
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const uint8_t* row = img + oh * Wp;
    const int8_t* g = grp + oh * G4 * 64;
    for (int64_t ow = 0; ow < Wo; ow += 4, g += 64) {
      const __m512i gv = _mm512_loadu_si512(g);
#pragma GCC unroll 9
      for (int t = 0; t < NT; ++t) {
        int32_t w;
        std::memcpy(&w, row + off[t] + ow, 4);
        acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_set1_epi32(w), gv);
      }
    }
  }
#pragma GCC unroll 9
  for (int t = 0; t < NT; ++t) {
    int32_t* d = acc32 + (t0 + t) * 16;
    _mm512_storeu_si512(d, _mm512_add_epi32(_mm512_loadu_si512(d), acc[t]));
  }
}
// One sample, one input channel: img the padded image [Hp][Wp] (with slack after it: up to 3
// bytes are read past its end), grp its
// gradient groups (wgrad_groups), acc32 [k k][16] int32 sums, added to; taps 9 at a time.
inline void wgrad_direct_c1_sample(const uint8_t* img, int64_t Wp, int64_t Ho, int64_t Wo, int64_t k,
                                   const int8_t* grp, int32_t* acc32) {
  const int64_t kk = k * k;
  for (int64_t t = 0; t < kk; t += 9) {
    switch (std::min<int64_t>(9, kk - t)) {
#define FQT_NT(v) \
  case v: wgrad_direct_c1_block<v>(img, Wp, Ho, Wo, k, grp, t, acc32); break;
      FQT_NT(1) FQT_NT(2) FQT_NT(3) FQT_NT(4) FQT_NT(5) FQT_NT(6) FQT_NT(7) FQT_NT(8) FQT_NT(9)
#undef FQT_NT
    }
  }
}
// rx[tap] += the code sum of the tap's im2col row (one input channel): the Ho x Wo window of the
// padded image at (kh, kw), from per-row sums of each row's Wo bytes from column kw.
inline void wgrad_direct_c1_sums(const uint8_t* img, int64_t Hp, int64_t Wp, int64_t Ho, int64_t Wo, int64_t k,
                                 int64_t* rs, int64_t* rx) {
  for (int64_t r = 0; r < Hp; ++r)
    for (int64_t kw = 0; kw < k; ++kw) rs[r * k + kw] = byte_sum(img + r * Wp + kw, Wo);
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t kw = 0; kw < k; ++kw) {
      int64_t s = 0;
      for (int64_t oh = 0; oh < Ho; ++oh) s += rs[(oh + kh) * k + kw];
      rx[kh * k + kw] += s;
    }
}
#endif

std::atomic<bool> g_fused_fprop{true};  // set_conv_fused_fprop
std::atomic<bool> g_direct_wgrad{true};  // set_conv_direct_wgrad
std::atomic<bool> g_fused_dgrad{true};  // set_conv_fused_dgrad
std::atomic<bool> g_direct_dgrad{true};  // set_conv_direct_dgrad

double scale_of(const QuantizedTensor& q, int64_t group) { return q.scale[q.scale.size() == 1 ? 0 : group]; }
double lo_of(const QuantizedTensor& q, int64_t group) { return q.lo[q.lo.size() == 1 ? 0 : group]; }

// The samples of a dgrad in the order the threads take them (WorkSplit: a lagging thread's are
// taken over). Plain: a sample per unit. With `across` (per-sample BHQ: a transform over the N
// samples), a group per unit: its member samples, then T^-1 over their rows of dX while they are
// still in cache (kernels::bhq_apply_inverse_group: apply_inverse's operations, so the same bits
// as the separate pass over dX, which read and wrote it all again). The groups (members from
// anywhere in the batch) go in the order of their members' mean sample index, so that WorkSplit's
// contiguous halves give each thread groups mostly from its half of the batch, the half that
// batch norm's backward (a static split over the samples in memory order) then reads on that
// thread (bhq/s, 3 alternated breakdowns: batchnorm 16 backward 8.17 -> 7.80 ms, batchnorm 32
// 3.56 -> 3.39 ms; ab_step 1.010 over 10 rounds; session 23).
class SampleUnits {
 public:
  SampleUnits(int64_t N, const BhqTransform* across, float* dx, int64_t chw)
      : t_(across), dx_(dx), chw_(chw), n_(across ? across->num_groups() : N), split_(n_) {
    if (!across) return;
    order_.resize(static_cast<size_t>(n_));
    std::iota(order_.begin(), order_.end(), int64_t{0});
    std::vector<double> mean(static_cast<size_t>(n_));
    for (int64_t g = 0; g < n_; ++g) {
      double s = 0;
      for (int64_t i = across->offsets[g]; i < across->offsets[g + 1]; ++i) s += static_cast<double>(across->members[i]);
      mean[g] = s / static_cast<double>(across->group_size(g));
    }
    std::stable_sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return mean[a] < mean[b]; });
  }
  // sample(n, next): next = the sample this thread most likely takes after n (for prefetching;
  // -1: none known).
  template <class F>
  void run(F&& sample) {
    alignas(64) float dot[kernels::kInverseBlock];
    split_.run([&](int64_t v) {
      if (!t_) return sample(v, v + 1 < n_ ? v + 1 : -1);
      const int64_t u = order_[v], after = v + 1 < n_ ? t_->members[t_->offsets[order_[v + 1]]] : -1;
      const int64_t end = t_->offsets[u + 1];
      for (int64_t i = t_->offsets[u]; i < end; ++i)
        sample(t_->members[i], i + 1 < end ? t_->members[i + 1] : after);  // (then the next group's first)
      profile::PhaseScope phase("per-sample bhq dgrad: T^-1 on the groups' rows (thread time)");
      kernels::bhq_apply_inverse_group(*t_, u, dx_, chw_, dot);
    });
  }

 private:
  const BhqTransform* t_;
  float* dx_;
  int64_t chw_;
  int64_t n_;  // units
  WorkSplit split_;
  std::vector<int64_t> order_;
};

}  // namespace

void set_conv_fused_fprop(bool on) { g_fused_fprop.store(on, std::memory_order_relaxed); }
void set_conv_fused_dgrad(bool on) { g_fused_dgrad.store(on, std::memory_order_relaxed); }
void set_conv_direct_wgrad(bool on) { g_direct_wgrad.store(on, std::memory_order_relaxed); }
void set_conv_direct_dgrad(bool on) { g_direct_dgrad.store(on, std::memory_order_relaxed); }

ConvIntKernels conv_int_kernels() {
  ConvIntKernels k;
#if defined(FQT_DGRAD_FUSED)
  k.fused_fprop = k.fused_dgrad = k.direct_dgrad = igemm_detail::vnni_available();
#endif
#if defined(FQT_WGRAD_DIRECT)
  k.direct_wgrad = igemm_detail::vnni_available();
#endif
  return k;
}

Tensor Conv2d::forward_int(const QuantizedTensor& xq, const QuantizedTensor& wq, int zero_code,
                           const Tensor* residual) const {
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W;
  // B = weight codes [Cout, Ckk] as s8, taps in (kh, kw, c) order.
  const int shw = s8_shift(wq.spec.bits);
  std::vector<int8_t> Bw(static_cast<size_t>(cout_ * ckk));
  const uint8_t* wc = wq.codes.data<uint8_t>();
  const double sx = xq.scale[0], lx = xq.lo[0];  // value = code / sx + lx
  // y_pc = sum_k (x_k / sx + lx)(v_kc / sw + Lw) = (s_pc + Lwc rx_p) / (sx sw) + crow_c, with
  // s = the integer products, rx_p = the patch's code sum and Lwc = Lw sw the weight offset in code
  // units, split into an integer O (added to the integer products exactly) and a remainder
  // <= 1/2, as in dgrad_int: the finishing then runs in fp32 on 8 lanes without losing the
  // offset term's cancellation.
  std::vector<float> inv(cout_), wo(cout_), wd(cout_), crow(cout_);
  // from[t]: the (c, kh, kw) tap that lands at (kh, kw, c) tap t, once per call; Bw's rows are
  // written in order, gathering from the weight row in cache (the scatter was serial time in perf).
  std::vector<int32_t> from(static_cast<size_t>(ckk));
  for (int64_t r = 0; r < ckk; ++r) from[hwc_tap(r, k_, cin_)] = static_cast<int32_t>(r);
  for (int64_t c = 0; c < cout_; ++c) {
    int64_t rbw = 0;
    const uint8_t* __restrict wr = wc + c * ckk;
    int8_t* __restrict br = Bw.data() + c * ckk;
    for (int64_t t = 0; t < ckk; ++t) {
      const int v = wr[from[t]] - shw;
      br[t] = static_cast<int8_t>(v), rbw += v;
    }
    const double sw = scale_of(wq, c), Lw = lo_of(wq, c) + shw / sw;  // weight = (code - shw) / sw + Lw
    const double Lwc = Lw * sw, O = std::nearbyint(Lwc);
    inv[c] = static_cast<float>(1.0 / (sx * sw)), wo[c] = static_cast<float>(O), wd[c] = static_cast<float>(Lwc - O);
    crow[c] = static_cast<float>(lx / sw * static_cast<double>(rbw) + static_cast<double>(ckk) * lx * Lw);
  }
  FQT_CHECK(zero_code >= 0 && zero_code <= 255, "Conv2d {}: padding code {} out of range", name_, zero_code);
  const auto pad_code = static_cast<uint8_t>(zero_code);
  const uint8_t* xc = xq.codes.data<uint8_t>();
  const float* b = has_bias_ ? bias_.value.data<float>() : nullptr;
  Tensor y = Tensor::empty({N, cout_, g.Ho, g.Wo});
  float* yp = y.data<float>();
  const float* res = residual ? residual->data<float>() : nullptr;
  WorkSplit split(N);
#if defined(FQT_DGRAD_FUSED)
  if (g_fused_fprop.load(std::memory_order_relaxed) && igemm_detail::vnni_available() &&
      (cout_ == 16 || cout_ % 32 == 0)) {
    FQT_CHECK(ckk <= igemm_max_k(255, 128), "conv integer GEMM: reduction of {} terms exceeds the int32 bound", ckk);
    // Slices of W = 16 outputs (fprop_fused_sample: one register per position) or 32
    // (fprop_fused_sample32: two): nh x [K4][W][4 bytes] of weight codes, zero in the gaps, and
    // nh x [O, d, inv, crow, bias][W] finishing terms.
    const int64_t W = cout_ == 16 ? 16 : 32, nh = cout_ / W;
    const int64_t kc = k_ * cin_, seg4 = (kc + 3) / 4, K4 = k_ * seg4;  // a kernel row's bytes, in groups of 4
    std::vector<int8_t> bv(static_cast<size_t>(nh * K4 * W * 4));
    std::vector<float> tm(static_cast<size_t>(nh * 5 * W));
    for (int64_t c = 0; c < cout_; ++c) {
      const int64_t h = c / W, l = c % W;
      // Tap r = j kc + t (kernel row j) goes to byte t of kernel row j's groups: group j seg4 +
      // t / 4, byte t % 4 (no division per tap: it was a serial millisecond a step in perf).
      // Whole groups of 4 as one 32-bit move.
      const int8_t* __restrict src = Bw.data() + c * ckk;
      for (int64_t j = 0; j < k_; ++j) {
        int8_t* __restrict dst = bv.data() + ((h * K4 + j * seg4) * W + l) * 4;
        const int8_t* __restrict sj = src + j * kc;
        int64_t t = 0;
        for (; t + 4 <= kc; t += 4) std::memcpy(dst + t * W, sj + t, 4);
        for (; t < kc; ++t) dst[(t >> 2) * W * 4 + (t & 3)] = sj[t];
      }
      float* th = tm.data() + h * 5 * W;
      th[l] = wo[c], th[W + l] = wd[c], th[2 * W + l] = inv[c], th[3 * W + l] = crow[c], th[4 * W + l] = b ? b[c] : 0.0f;
    }
    FpropTerms t;  // (W = 16: the terms in registers)
    t.O = _mm512_loadu_ps(tm.data()), t.d = _mm512_loadu_ps(tm.data() + 16), t.inv = _mm512_loadu_ps(tm.data() + 32);
    t.crow = _mm512_loadu_ps(tm.data() + 48), t.bias = _mm512_loadu_ps(tm.data() + 64);
    t.has_bias = b != nullptr;
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
    {
      const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
      std::vector<uint8_t> img(static_cast<size_t>(Hp * Wp * cin_ + 3));  // (+3: the last group's gap)
      std::vector<int32_t> pix(static_cast<size_t>(Hp * (Wp + g.Wo) + g.Wo));
      std::vector<float> rx(static_cast<size_t>(P)), out(static_cast<size_t>(P * cout_));
      split.run([&](int64_t n) {
        pad_hwc(xc + n * chw, g, pad_code, img.data());
        {
          profile::Scope timer(profile::gemm_int);
          if (W == 16) fprop_fused_sample(img.data(), g, bv.data(), t, pix.data(), rx.data(), out.data());
          else fprop_fused_sample32(img.data(), g, nh, bv.data(), tm.data(), b != nullptr, pix.data(), rx.data(), out.data());
        }
        float* yn = yp + n * cout_ * P;
        kernels::transpose(out.data(), P, cout_, cout_, yn, P);  // [P, Cout] -> [Cout, P]
        if (res) {  // the residual added as add_inplace would add it to the finished value
          const float* __restrict rs = res + n * cout_ * P;
          for (int64_t i = 0; i < cout_ * P; ++i) yn[i] += rs[i];
        }
      });
    }
    return y;
  }
#endif
  const igemm_detail::LocalB Bpk(cout_, ckk, Bw.data(), ckk);
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<uint8_t> img(static_cast<size_t>((g.H + 2 * g.pad) * (g.W + 2 * g.pad) * cin_));
    std::vector<uint8_t> A(static_cast<size_t>(P * ckk));
    std::vector<int32_t> C(static_cast<size_t>(P * cout_)), Ct(static_cast<size_t>(cout_ * P));
    std::vector<float> rx(static_cast<size_t>(P));  // code sums <= Ckk * 255: exact in fp32
    split.run([&](int64_t n) {
      pad_hwc(xc + n * chw, g, pad_code, img.data());
      im2row_hwc(img.data(), g, A.data());
      for (int64_t p = 0; p < P; ++p) rx[p] = static_cast<float>(byte_sum(A.data() + p * ckk, ckk));
      igemm_worker(P, A.data(), ckk, Bpk, C.data(), cout_);
      kernels::transpose(C.data(), P, cout_, cout_, Ct.data(), P);  // [P, Cout] -> [Cout, P]
      float* yn = yp + n * cout_ * P;
      const float* __restrict rxp = rx.data();
      for (int64_t c = 0; c < cout_; ++c) {
        const int32_t* __restrict s = Ct.data() + c * P;
        float* __restrict o = yn + c * P;
        const float ic = inv[c], O = wo[c], d = wd[c], rc = crow[c], bc = b ? b[c] : 0.0f;
        if (b)
          for (int64_t p = 0; p < P; ++p) o[p] = (((static_cast<float>(s[p]) + O * rxp[p]) + d * rxp[p]) * ic + rc) + bc;
        else
          for (int64_t p = 0; p < P; ++p) o[p] = ((static_cast<float>(s[p]) + O * rxp[p]) + d * rxp[p]) * ic + rc;
        if (res) {  // the residual added as add_inplace would add it to the finished value
          const float* __restrict rs = res + (n * cout_ + c) * P;
          for (int64_t p = 0; p < P; ++p) o[p] += rs[p];
        }
      }
    });
  }
  return y;
}

Tensor Conv2d::dgrad_int_samples(const QuantizedTensor& gq) const {
  const int64_t N = in_shape_[0], P = geom(in_shape_, k_, stride_, pad_).P();
  FQT_CHECK(gq.granularity() == Granularity::row && gq.rows == N * P && gq.cols == cout_ &&
                (!gq.transform || gq.transform->rows == N),
            "Conv2d {}: per-sample gradient codes [{}, {}] (transform over {} rows), expected [{}, {}] over {} samples",
            name_, gq.rows, gq.cols, gq.transform ? gq.transform->rows : 0, N * P, cout_, N);
  // Each sample's grid on its pixel rows; T^-1 group by group as their samples finish.
  const BhqTransform* across = gq.transform ? &*gq.transform : nullptr;
  if (direct_dgrad_applies()) return dgrad_int_direct(gq, across);
  return dgrad_int(gq, across);
}

bool Conv2d::direct_dgrad_applies() const {
#if defined(FQT_DGRAD_FUSED)
  // 16 or a multiple of 32 input channels (the fused fprop kernels' outputs): as a convolution
  // of the gradient codes (dgrad_direct_phase).
  // (K = k k Cout within half the int32 bound: S + Oz Zb below, |Oz| <= 255, stays in int32.)
  return g_direct_dgrad.load(std::memory_order_relaxed) && igemm_detail::vnni_available() && pad_ < k_ &&
         (cin_ == 16 || cin_ % 32 == 0) && 2 * k_ * k_ * cout_ <= igemm_max_k(255, 128);
#else
  return false;
#endif
}

Tensor Conv2d::dgrad_int_direct(const QuantizedTensor& gq, const BhqTransform* across) const {
#if defined(FQT_DGRAD_FUSED)
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), HW = g.H * g.W, chw = cin_ * HW, k = k_, kk = k_ * k_, s = stride_;
  const int shw = s8_shift(wq_.spec.bits);
  const double sw = wq_.scale[0], lw = wq_.lo[0] + shw / sw, Lwc = lw * sw, Ow = std::nearbyint(Lwc);
  const int64_t W = cin_ == 16 ? 16 : 32;  // outputs per weight slice (the fused fprop kernels')
  const uint8_t* wc = wq_.codes.data<uint8_t>();
  // Border classes along one axis of a phase: output i's valid taps j are those with gradient
  // row i + r + j in [0, m): [max(0, -(i + r)), min(kn - 1, m - 1 - i - r)]; each range numbered.
  auto classes = [](int64_t n, int64_t r, int64_t kn, int64_t m, std::vector<int32_t>& cls,
                    std::vector<std::array<int64_t, 2>>& ranges) {
    cls.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const std::array<int64_t, 2> v{std::max<int64_t>(0, -(i + r)), std::min<int64_t>(kn - 1, m - 1 - i - r)};
      const auto at = std::find(ranges.begin(), ranges.end(), v);
      cls[i] = static_cast<int32_t>(at - ranges.begin());
      if (at == ranges.end()) ranges.push_back(v);
    }
  };
  // The s x s phases (one for stride 1): input rows ih = s m + a take kernel rows kh = kh0 + s j'
  // (kh0 = (a + pad) mod s), from gradient rows (ih + pad - kh) / s = m + e - j' (e = (a + pad -
  // kh0) / s); flipped, tap j = ka - 1 - j' reads gradient row m + ra + j, ra = e - ka + 1.
  std::vector<DirectPhase> phases;
  int64_t zsize = 0;
  for (int64_t a = 0; a < s; ++a)
    for (int64_t b = 0; b < s; ++b) {
      DirectPhase ph;
      ph.a = a, ph.b = b;
      ph.kh0 = (a + pad_) % s, ph.kw0 = (b + pad_) % s;
      ph.ka = ph.kh0 < k ? (k - ph.kh0 + s - 1) / s : 0, ph.kb = ph.kw0 < k ? (k - ph.kw0 + s - 1) / s : 0;
      ph.ra = (a + pad_ - ph.kh0) / s - ph.ka + 1, ph.rb = (b + pad_ - ph.kw0) / s - ph.kb + 1;
      ph.Ma = a < g.H ? (g.H - a + s - 1) / s : 0, ph.Mb = b < g.W ? (g.W - b + s - 1) / s : 0;
      if (ph.ka == 0 || ph.kb == 0 || ph.Ma == 0 || ph.Mb == 0) {  // no taps reach these positions: dx = 0
        ph.Ma = ph.ka == 0 ? 0 : ph.Ma, ph.Mb = ph.kb == 0 ? 0 : ph.Mb;
        phases.push_back(std::move(ph));
        continue;
      }
      const int64_t kc = ph.kb * cout_;
      ph.seg4 = (kc + 3) / 4;
      const int64_t K4 = ph.ka * ph.seg4;
      ph.bv.assign(static_cast<size_t>(cin_ / W * K4 * W * 4), 0);
      std::vector<int64_t> tapsum(static_cast<size_t>(cin_ * ph.ka * ph.kb));  // [ci][j][l]
      // Tap (j, l, o) is byte t = l Cout + o of kernel row j's groups: group j seg4 + t / 4, byte
      // t % 4 (no division per tap: it was a serial millisecond a step in perf).
      const int64_t ka = ph.ka, kb = ph.kb, seg4 = ph.seg4, cin = cin_, cout = cout_;
      for (int64_t ci = 0; ci < cin; ++ci) {
        int8_t* __restrict bci = ph.bv.data() + ((ci / W) * K4 * W + ci % W) * 4;
        for (int64_t j = 0; j < ka; ++j)
          for (int64_t l = 0; l < kb; ++l) {
            const int64_t kh = ph.kh0 + s * (ka - 1 - j), kw = ph.kw0 + s * (kb - 1 - l);
            const uint8_t* __restrict wp = wc + ci * kk + kh * k + kw;  // output channel o at o Cin kk
            int8_t* __restrict dst = bci + j * seg4 * W * 4;
            int64_t sum = 0, o = 0;
            if (cout % 4 == 0)  // whole groups of 4 output channels: one 32-bit store each
              for (; o < cout; o += 4) {
                int8_t b4[4];
                for (int64_t i = 0; i < 4; ++i) {
                  const int v = wp[(o + i) * cin * kk] - shw;
                  b4[i] = static_cast<int8_t>(v), sum += v;
                }
                std::memcpy(dst + (l * cout + o) * W, b4, 4);
              }
            for (; o < cout; ++o) {
              const int v = wp[o * cin * kk] - shw;
              const int64_t t = l * cout + o;
              dst[(t >> 2) * W * 4 + (t & 3)] = static_cast<int8_t>(v);
              sum += v;
            }
            tapsum[(ci * ka + j) * kb + l] = sum;
          }
      }
      std::vector<std::array<int64_t, 2>> rr, cr;
      classes(ph.Ma, ph.ra, ph.ka, g.Ho, ph.rcls, rr);
      classes(ph.Mb, ph.rb, ph.kb, g.Wo, ph.ccls, cr);
      ph.nrc = static_cast<int64_t>(rr.size()), ph.ncc = static_cast<int64_t>(cr.size());
      ph.Zb.assign(static_cast<size_t>(ph.nrc * ph.ncc * cin_), 0), ph.nv.assign(static_cast<size_t>(ph.nrc * ph.ncc), 0);
      for (int64_t x = 0; x < ph.nrc; ++x)
        for (int64_t y = 0; y < ph.ncc; ++y) {
          const int64_t c = x * ph.ncc + y;
          ph.nv[c] = cout_ * std::max<int64_t>(0, rr[x][1] - rr[x][0] + 1) * std::max<int64_t>(0, cr[y][1] - cr[y][0] + 1);
          for (int64_t ci = 0; ci < cin_; ++ci)
            for (int64_t j = rr[x][0]; j <= rr[x][1]; ++j)
              for (int64_t l = cr[y][0]; l <= cr[y][1]; ++l) ph.Zb[c * cin_ + ci] += tapsum[(ci * ph.ka + j) * ph.kb + l];
        }
      ph.zoff = zsize;
      zsize += ph.nrc * ph.ncc * cin_;
      phases.push_back(std::move(ph));
    }
  Tensor dx = Tensor::empty(in_shape_);
  float* dxp = dx.data<float>();
  const uint8_t* gc = gq.codes.data<uint8_t>();
  // The gradient image's padding: as much as any phase's patches reach past its edges.
  int64_t pad = 0, mb = 1, mab = 1;
  for (const DirectPhase& ph : phases) {
    mb = std::max(mb, ph.Mb), mab = std::max(mab, ph.Ma * ph.Mb);
    if (ph.bv.empty()) continue;
    pad = std::max({pad, -ph.ra, -ph.rb, ph.Ma - 1 + ph.ra + ph.ka - g.Ho, ph.Mb - 1 + ph.rb + ph.kb - g.Wo});
  }
  const int64_t Hp = g.Ho + 2 * pad, Wp = g.Wo + 2 * pad, row = g.Wo * cout_;
  const __m512 vO = _mm512_set1_ps(static_cast<float>(Ow)), vd = _mm512_set1_ps(static_cast<float>(Lwc - Ow));
  SampleUnits split(N, across, dxp, chw);
#pragma omp parallel if (N > 1 && parallel_worth(N * P * cout_ * kk))
  {
    std::vector<uint8_t> img(static_cast<size_t>(Hp * Wp * cout_ + 3));  // zero: its padding stays so
    std::vector<int32_t> pix(static_cast<size_t>(Hp * Wp)), hs(static_cast<size_t>((Hp + 1) * mb)), Z(static_cast<size_t>(zsize));
    std::vector<float> rx(static_cast<size_t>(mab)), E(static_cast<size_t>(zsize));
    std::vector<float> out(static_cast<size_t>(HW * cin_));  // [H W][Cin]; positions no tap reaches stay 0
    split.run([&](int64_t n, int64_t next) {
      const uint8_t* an = gc + n * P * cout_;
      if (next >= 0)
        for (int64_t i = 0; i < P * cout_; i += 64) __builtin_prefetch(gc + next * P * cout_ + i);
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        std::memcpy(img.data() + ((oh + pad) * Wp + pad) * cout_, an + oh * row, static_cast<size_t>(row));
      // Pixel code sums (the patch sums' box sums start from them; the padding's are 0).
      for (int64_t oh = 0; oh < g.Ho; ++oh) pixel_code_sums(an + oh * row, g.Wo, cout_, pix.data() + (oh + pad) * Wp + pad);
      // Oz: Lz's integer part, |Oz| <= B when the grid covers 0 (a gradient's does, unless all of
      // it lies on one side of 0); clamped to 255 (then the offset dominates the value, and dz Zb
      // in E carries the rest to fp32 rounding of that value).
      const double sg = scale_of(gq, n * P), lg = lo_of(gq, n * P), Lz = lg * sg;
      const double Oz = std::clamp(std::nearbyint(Lz), -255.0, 255.0);
      const DirectTerms t{vO, vd, _mm512_set1_ps(static_cast<float>(1.0 / (sg * sw))), nullptr, nullptr, nullptr, cin_};
      {
        profile::Scope timer(profile::gemm_int);  // (its finishing included)
        for (const DirectPhase& ph : phases) {
          if (ph.bv.empty()) continue;
          for (size_t c = 0; c < ph.nv.size(); ++c)
            for (int64_t ci = 0; ci < cin_; ++ci) {
              const int64_t zb = ph.Zb[c * cin_ + ci], i = ph.zoff + static_cast<int64_t>(c) * cin_ + ci;
              Z[i] = static_cast<int32_t>(static_cast<int64_t>(Oz) * zb);
              E[i] = static_cast<float>((Lz - Oz) * static_cast<double>(zb) + Lz * Lwc * static_cast<double>(ph.nv[c]));
            }
          dgrad_direct_phase(ph, img.data(), pix.data(), Wp, pad, cout_, s, g.W, t, Z.data(), E.data(), hs.data(),
                             rx.data(), out.data());
        }
      }
      kernels::transpose(out.data(), HW, cin_, cin_, dxp + n * chw, HW);  // [H W, Cin] -> [Cin, H W]
    });
  }
  return dx;
#else
  return dgrad_int(gq, across);
#endif
}

Tensor Conv2d::dgrad_int(const QuantizedTensor& gq, const BhqTransform* across) const {
  // One grid for the whole gradient (PTQ): the direct form as for per-sample grids.
  if (!across && !gq.transform && gq.granularity() == Granularity::tensor && direct_dgrad_applies())
    return dgrad_int_direct(gq, nullptr);
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W;
  // B = W^T codes [Ckk, Cout] as s8 (G's code row sums come from byte_sum, per row).
  const int shw = s8_shift(wq_.spec.bits);
  const double sw = wq_.scale[0], lw = wq_.lo[0] + shw / sw;
  const int64_t ldc = ckk;
  std::vector<int8_t> Bt(static_cast<size_t>(ckk * cout_));
  std::vector<float> rb(ckk, 0.0f);  // weight code sums per tap, |rb_k| <= Cout * 128: exact in fp32
  const uint8_t* wc = wq_.codes.data<uint8_t>();
  {
    // W^T as s8 by a byte transpose (code - 128 = code ^ 0x80 for 8 bits; s8_shift is 0 below), its
    // rows then moved to (kh, kw, c) tap order (a strided scalar loop here was serial time in perf).
    std::vector<uint8_t> wt(static_cast<size_t>(ckk * cout_));
    kernels::transpose_bytes(wc, cout_, ckk, ckk, wt.data(), cout_, shw == 128 ? 0x80 : 0x00);
    for (int64_t r = 0; r < ckk; ++r) {  // row r of W^T -> row k of Bt
      const int64_t k = hwc_tap(r, k_, cin_);
      const int8_t* __restrict src = reinterpret_cast<const int8_t*>(wt.data()) + r * cout_;
      int8_t* __restrict dst = Bt.data() + k * cout_;
      int32_t s = 0;
      for (int64_t c = 0; c < cout_; ++c) dst[c] = src[c], s += src[c];
      rb[k] = static_cast<float>(s);
    }
  }
  // BHQ's T over G's rows (pixel rows), or with `across` over the samples (applied to dX by
  // SampleUnits; with one position per sample, P = 1, its rows are also G's, and `across` takes it).
  const bool bhq = gq.transform.has_value() && !across;
  FQT_CHECK(across ? across->rows == N : !bhq || gq.rows_per_transform_row() == 1,
            "Conv2d {}: a BHQ transform over {} rows for {} gradient rows of {} samples", name_,
            across ? across->rows : gq.transform ? gq.transform->rows : 0, gq.rows, N);
  const bool per_row = gq.granularity() == Granularity::row;
  const igemm_detail::LocalB Bpk(ldc, cout_, Bt.data(), cout_);
  Tensor dx = Tensor::empty(in_shape_);
  float* dxp = dx.data<float>();
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad, run = k_ * cin_, acc_size = Hp * Wp * cin_;
  const uint8_t* gc = gq.codes.data<uint8_t>();
  // Row r's dgrad row before T^-1: Y_k = sum_c (z_c / sg + lg) W_ck = (s_k + Lz rb_k) / (sg sw) + cr,
  // Lz = lg sg the row's offset in code units. Lz rb_k nearly cancels s_k when the codes sit
  // around -Lz (a gradient row centred on 0: Lz ~ -B/2), so it is split into an integer part,
  // added first (s_k + O rb_k: integers, exact in fp32 while |O| <= B, i.e. when the row's range
  // covers 0; a larger offset dominates the value, which then only takes a relative 2^-24), and a
  // remainder |Lz - O| <= 1/2. So fp32 loses nothing that matters against the value itself (int
  // vs sim deviation 2.1-2.6e-7 of max |dx|, as with the fp64 form), and the finishing runs on
  // 8-lane fp32 vectors instead of 4-lane fp64 (dgrad's epilogue was the largest non-GEMM item of
  // the step in perf).
  auto row_terms = [&](int64_t r, const uint8_t* codes) {  // codes: row r's (Cout bytes)
    const double sg = scale_of(gq, per_row ? r : 0), lg = lo_of(gq, per_row ? r : 0);
    const double Lz = lg * sg, O = std::nearbyint(Lz);
    const auto zs = static_cast<double>(byte_sum(codes, cout_));  // row sum of G's codes
    return RowTerms{static_cast<float>(O), static_cast<float>(Lz - O), static_cast<float>(1.0 / (sg * sw)),
                    static_cast<float>(lw / sg * zs + static_cast<double>(cout_) * lg * lw)};
  };
  // Rows r0 .. r0 + m - 1 (consecutive code rows from `codes`) into out: row_terms' double
  // operations in its order on 8 rows per vector (no contraction: -ffp-contract=off), so the
  // same floats; per row, the scalar form was two divisions, a rounding and a byte sum between
  // the fused dgrad kernel's products (perf: a fifth of that kernel's samples).
  auto row_terms_block = [&](int64_t r0, int64_t m, const uint8_t* codes, RowTerms* __restrict out) {
    int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
    const __m512d vsw = _mm512_set1_pd(sw), vlw = _mm512_set1_pd(lw), one = _mm512_set1_pd(1.0),
                  vcout = _mm512_set1_pd(static_cast<double>(cout_));
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
    for (; i + 8 <= m; i += 8) {
      const int64_t r = r0 + i;
      __m512d zs;
      if (cout_ == 16) {  // 4 rows per 64 bytes: two 8-byte sums per row
        const __m512i z = _mm512_setzero_si512();
        const __m512i s0 = _mm512_sad_epu8(_mm512_loadu_si512(codes + i * 16), z);
        const __m512i s1 = _mm512_sad_epu8(_mm512_loadu_si512(codes + i * 16 + 64), z);
        zs = _mm512_maskz_cvtepi64_pd(
            0xFF, _mm512_add_epi64(_mm512_permutex2var_epi64(s0, even, s1), _mm512_permutex2var_epi64(s0, odd, s1)));
      } else {
        alignas(64) double z8[8];
        for (int j = 0; j < 8; ++j) z8[j] = static_cast<double>(byte_sum(codes + (i + j) * cout_, cout_));
        zs = _mm512_load_pd(z8);
      }
      const __m512d sg =
          per_row ? _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(gq.scale.data() + r)) : _mm512_set1_pd(gq.scale[0]);
      const __m512d lg =
          per_row ? _mm512_maskz_cvtps_pd(0xFF, _mm256_loadu_ps(gq.lo.data() + r)) : _mm512_set1_pd(gq.lo[0]);
      const __m512d Lz = _mm512_mul_pd(lg, sg);
      const __m512d O = _mm512_maskz_roundscale_pd(0xFF, Lz, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      alignas(32) float f[4][8];
      _mm256_store_ps(f[0], _mm512_maskz_cvtpd_ps(0xFF, O));
      _mm256_store_ps(f[1], _mm512_maskz_cvtpd_ps(0xFF, _mm512_sub_pd(Lz, O)));
      _mm256_store_ps(f[2], _mm512_maskz_cvtpd_ps(0xFF, _mm512_div_pd(one, _mm512_mul_pd(sg, vsw))));
      _mm256_store_ps(f[3], _mm512_maskz_cvtpd_ps(0xFF, _mm512_add_pd(_mm512_mul_pd(_mm512_div_pd(vlw, sg), zs),
                                                                      _mm512_mul_pd(_mm512_mul_pd(vcout, lg), vlw))));
      for (int j = 0; j < 8; ++j) out[i + j] = RowTerms{f[0][j], f[1][j], f[2][j], f[3][j]};
    }
#endif
    for (; i < m; ++i) out[i] = row_terms(r0 + i, codes + i * cout_);
  };
  const float* __restrict rbk = rb.data();
  // The padded HWC accumulator [Hp*Wp, C] of sample n into dx_n: each image row's W x C interior
  // transposed straight into the C rows of W floats it belongs to (the tiles' edges under masks),
  // and each padded row zeroed behind it while its lines are in L1, so the accumulator is zero
  // again for the thread's next sample. (Before: one transpose of the whole padded accumulator
  // into a second buffer, copies of its interior rows, and a memset of the accumulator before
  // every sample.) The accumulators start zero (std::vector) and every sample ends here.
  // (zero false: the 3x3 kernel below starts every padded pixel itself: AccWindow3x3.)
  auto store_sample = [&](float* acc, int64_t n, bool zero = true) {
    float* xn = dxp + n * chw;
    const int64_t row = Wp * cin_;
    if (zero) std::memset(acc, 0, sizeof(float) * static_cast<size_t>(g.pad * row));  // the top padding rows
    for (int64_t h = 0; h < g.H; ++h) {
      float* a = acc + (h + g.pad) * row;
      kernels::transpose(a + g.pad * cin_, g.W, cin_, cin_, xn + h * g.W, g.H * g.W);
      if (zero) std::memset(a, 0, sizeof(float) * static_cast<size_t>(row));
    }
    const int64_t below = (g.H + g.pad) * row;
    if (zero) std::memset(acc + below, 0, sizeof(float) * static_cast<size_t>(acc_size - below));  // the rest
  };
  // Small layers (Ckk <= 144 in whole vectors that each stay within one kernel row of taps, run =
  // k Cin a multiple of 16; K = Cout <= 16, a multiple of 4): products and finishing fused
  // (dgrad_fused_row, bhq_fused_row).
#if defined(FQT_DGRAD_FUSED)
  const int64_t NV = ckk / 16, K4 = cout_ / 4;
  const bool fused = g_fused_dgrad.load(std::memory_order_relaxed) && igemm_detail::vnni_available() &&
                     ckk % 16 == 0 && NV <= kFusedMaxNV && run % 16 == 0 && cout_ % 4 == 0 && cout_ <= kFusedMaxK;
  std::vector<int8_t> bv;    // [K4][NV][16 columns][4 bytes] of Bt
  std::vector<int64_t> off;  // vector j of a row: taps 16j.. = kernel row kh, from i0 of its run
  if (fused) {
    bv.resize(static_cast<size_t>(NV * K4 * 64));
    for (int64_t j = 0; j < NV; ++j)
      for (int64_t k4 = 0; k4 < K4; ++k4)
        for (int64_t col = 0; col < 16; ++col)
          for (int64_t b = 0; b < 4; ++b) bv[((k4 * NV + j) * 16 + col) * 4 + b] = Bt[(16 * j + col) * cout_ + 4 * k4 + b];
    off.resize(static_cast<size_t>(NV));
    for (int64_t j = 0; j < NV; ++j) off[j] = (16 * j / run) * Wp * cin_ + (16 * j) % run;
  }
#endif
  if (bhq) {
    // BHQ: dx rows = T^-1 Y with T^-1 = diag(1/s) H and H = I - 2 v v^T within each group, so
    //   dx_r = (Y_r - 2 v_r M_g) / s_r,   M_g = sum_{j in g} v_j Y_j   (g = r's group, members in order).
    // The groups pair rows of any samples (by range). Samples still run one per thread, their
    // rows in order into the sample's own padded accumulator (L1/L2), and each row brings the
    // code rows of its whole group into the integer GEMM: a tile of rows gathers its groups'
    // members (most groups are pairs: twice the GEMM rows, and the GEMM is the cheap part); a row
    // of a group of up to kGather rows is then one combination of its members' integer rows,
    // formed in one pass (no Y or M row stored). Groups larger than kGather (heavy-tailed rows:
    // one large row with many small ones) get M_g computed once beforehand, in group order, kept
    // per group, and their rows are finished from their own Y row and that M_g.
    // Every row's value is computed by one fixed sequence of operations wherever its sample
    // runs, so dx has the same bits on any thread count. (Before, the correction went through
    // U = V^T Z per group and U W [groups, Ckk] in fp32, read back per row: ~46K groups x 576 B =
    // 27 MB per stage-1 layer, fetched out of order; a pass in group order that scattered the
    // finished rows into all samples' accumulators stalled on those scattered writes instead:
    // docs/profiles/README.md, session 10.)
    profile::PhaseScope phase("bhq dgrad: row terms, members");
    constexpr int64_t kGather = 4;
    const HouseholderV householder;  // v of each group size, looked up per group and per row
    const BhqTransform& t = *gq.transform;
    const int64_t G = t.num_groups();
    const int64_t tile_own = std::clamp<int64_t>((int64_t{8} << 10) / ckk, 8, 64);  // own rows per GEMM
    const int64_t cap = std::max(tile_own * kGather, int64_t{64});                   // gathered rows per GEMM
    // m = sum_j v_j Y_j over one group's Y rows (ldc apart, the large row first), in order; a
    // group longer than a GEMM chunk continues its sum (first_part false).
    auto group_sum = [&](const float* y0, int64_t n_g, float vf, float vr, float* __restrict m, bool first_part) {
      for (int64_t j = 0; j < n_g; ++j) {
        const float* __restrict y = y0 + j * ldc;
        if (j == 0 && first_part)
          for (int64_t k = 0; k < ckk; ++k) m[k] = vf * y[k];
        else
          for (int64_t k = 0; k < ckk; ++k) m[k] += vr * y[k];
      }
    };
    // Per row, in row order (written group by group): the code row's finishing terms, and its
    // group's members (small groups, member order, -1 after the last) or ~its large group. The
    // per-sample pass then reads these in order and fetches only the members' codes and terms,
    // independent loads (looking the members up through offsets and members was a chain of
    // three dependent cache misses per row in perf).
    std::vector<int32_t> large_of(static_cast<size_t>(G), -1);
    std::vector<int64_t> large;
    for (int64_t gi = 0; gi < G; ++gi)
      if (t.group_size(gi) > kGather) large_of[gi] = static_cast<int32_t>(large.size()), large.push_back(gi);
    static thread_local std::vector<RowTerms> terms_scratch;
    static thread_local std::vector<std::array<int32_t, kGather>> mates_scratch;
    if (static_cast<int64_t>(terms_scratch.size()) < N * P) terms_scratch.resize(static_cast<size_t>(N * P)), mates_scratch.resize(static_cast<size_t>(N * P));
    RowTerms* const terms = terms_scratch.data();
    std::array<int32_t, kGather>* const mates = mates_scratch.data();
#pragma omp parallel if (parallel_worth(N * P * cout_))
    {
#pragma omp for schedule(static) nowait
      for (int64_t b = 0; b < N * P; b += 256) row_terms_block(b, std::min<int64_t>(256, N * P - b), gc + b * cout_, terms + b);
      const auto [g0, g1] = t.group_slice(omp_get_thread_num(), omp_get_num_threads());  // equal rows per thread
      for (int64_t gi = g0; gi < g1; ++gi) {
        const int64_t* mem = t.members.data() + t.offsets[gi];
        const int64_t n_g = t.group_size(gi);
        std::array<int32_t, kGather> list;
        list.fill(-1);
        if (large_of[gi] >= 0) list[0] = ~large_of[gi];
        else
          for (int64_t j = 0; j < n_g; ++j) list[j] = static_cast<int32_t>(mem[j]);
        for (int64_t j = 0; j < n_g; ++j) mates[mem[j]] = list;
      }
    }
    // Y rows of gathered code rows: A [m, Cout] codes of rows idx[0..m) -> Y [m, Ckk] (over C).
    // (idx[j] < 0: row ~idx[j] stays integer, for the fused finishing of small groups below.)
    auto y_rows = [&](int64_t m, const int64_t* idx, const uint8_t* A, int32_t* C) {
      igemm_worker(m, A, cout_, Bpk, C, ldc);
      for (int64_t j = 0; j < m; ++j) {
        if (idx[j] < 0) continue;
        const RowTerms rt = terms[idx[j]];
        const int32_t* s = C + j * ldc;
        float* y = reinterpret_cast<float*>(C + j * ldc);
        for (int64_t k = 0; k < ckk; ++k) y[k] = ((static_cast<float>(s[k]) + rt.Of * rbk[k]) + rt.df * rbk[k]) * rt.inv + rt.cr;
      }
    };
    // Large groups: M_g once per group, in member order, a chunk of members per GEMM.
    phase.next("bhq dgrad: large groups' M_g");
    std::vector<float> Mlarge(large.size() * static_cast<size_t>(ckk));
#pragma omp parallel if (large.size() > 1 && parallel_worth(static_cast<int64_t>(large.size()) * cap * ckk))
    {
      std::vector<uint8_t> A(static_cast<size_t>(cap * cout_));
      std::vector<int32_t> C(static_cast<size_t>(cap * ldc));
#pragma omp for schedule(dynamic)
      for (size_t li = 0; li < large.size(); ++li) {
        const int64_t gi = large[li], n_g = t.group_size(gi);
        const int64_t* mem = t.members.data() + t.offsets[gi];
        float vf, vr;
        householder(n_g, vf, vr);
        for (int64_t j0 = 0; j0 < n_g; j0 += cap) {
          const int64_t m = std::min(cap, n_g - j0);
          for (int64_t j = 0; j < m; ++j) copy_bytes(A.data() + j * cout_, gc + mem[j0 + j] * cout_, cout_);
          y_rows(m, mem + j0, A.data(), C.data());
          group_sum(reinterpret_cast<const float*>(C.data()), m, vf, vr, Mlarge.data() + li * ckk, j0 == 0);
        }
      }
    }
    phase.next("bhq dgrad: rows (members' products, T^-1, col2im)");
#if defined(FQT_DGRAD_FUSED)
    if (fused) {  // each row's members' products in registers, combined and summed from there
      WorkSplit split(N);  // (as the other per-sample loops: a lagging vCPU's samples are taken over)
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
      {
        std::vector<float> acc(static_cast<size_t>(acc_size));  // zero; store_sample leaves it zero
        split.run([&](int64_t n) {
          std::optional<profile::Scope> timer(profile::gemm_int);  // (the finishing included)
          for (int64_t p = 0, oh = 0, ow = 0; p < P; ++p, ow = ow + 1 == g.Wo ? (++oh, 0) : ow + 1) {
            const int64_t r = n * P + p;
            constexpr int64_t kAhead = 8;  // the members of a later row: scattered over the batch
            if (p + kAhead < P)
              for (int32_t mr : mates[r + kAhead])
                if (mr >= 0) __builtin_prefetch(gc + static_cast<int64_t>(mr) * cout_), __builtin_prefetch(terms + mr);
            const std::array<int32_t, kGather>& mt = mates[r];
            float* const base = acc.data() + (oh * stride_ * Wp + ow * stride_) * cin_;
            const float is = 1.0f / t.row_scale[r];
            const uint8_t* a[kGather];
            RowTerms tm[kGather];
            float w[kGather];
            int ng = 0;
            float c2 = 0.0f;
            const float* mg = nullptr;
            if (mt[0] < 0) {  // a large group's row: its Y row and M_g from beforehand
              float vf, vr;
              householder(t.group_size(large[~mt[0]]), vf, vr);
              c2 = 2.0f * (t.leads_group(r) ? vf : vr);
              mg = Mlarge.data() + ~mt[0] * ckk;
              a[0] = gc + r * cout_;
              tm[0] = terms[r];
            } else {  // a small group: w_j = ([j = r] - 2 v_r v_j) / s_r, as finish<NG> below
              while (ng < kGather && mt[ng] >= 0) ++ng;
              float vf, vr;
              householder(ng, vf, vr);
              c2 = 2.0f * (t.leads_group(r) ? vf : vr);
              for (int j = 0; j < ng; ++j) {
                a[j] = gc + static_cast<int64_t>(mt[j]) * cout_, tm[j] = terms[mt[j]];
                w[j] = ((mt[j] == r ? 1.0f : 0.0f) - c2 * (j == 0 ? vf : vr)) * is;
              }
            }
            switch (NV) {
#define FQT_NV(v) \
  case v: bhq_fused_row<v>(ng, a, tm, w, c2, mg, is, K4, bv.data(), base, off.data(), rbk); break;
              FQT_NV(1) FQT_NV(2) FQT_NV(3) FQT_NV(4) FQT_NV(5) FQT_NV(6) FQT_NV(7) FQT_NV(8) FQT_NV(9)
#undef FQT_NV
            }
          }
          timer.reset();
          store_sample(acc.data(), n);
        });
      }
      return dx;
    }
    const bool bhq_vector_epilogue = run % 16 == 0 && g_fused_dgrad.load(std::memory_order_relaxed);
#endif
    WorkSplit split(N);
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
    {
      std::vector<uint8_t> A(static_cast<size_t>(cap * cout_));
      std::vector<int32_t> C(static_cast<size_t>(cap * ldc));
      std::vector<int64_t> idx(static_cast<size_t>(cap)), first(static_cast<size_t>(tile_own));
      std::vector<float> acc(static_cast<size_t>(acc_size));  // zero; store_sample leaves it zero
      split.run([&](int64_t n) {
        for (int64_t p0 = 0; p0 < P; p0 += tile_own) {
          const int64_t p1 = std::min(P, p0 + tile_own);
          // Gather: each own row's group members (small groups), or only the row itself.
          int64_t m = 0;
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t r = n * P + p;
            const std::array<int32_t, kGather>& mt = mates[r];
            first[p - p0] = m;
            if (mt[0] < 0) {
              idx[m] = r, copy_bytes(A.data() + m * cout_, gc + r * cout_, cout_), ++m;
              continue;
            }
            for (int64_t j = 0; j < kGather && mt[j] >= 0; ++j)
              idx[m] = ~int64_t{mt[j]}, copy_bytes(A.data() + m * cout_, gc + static_cast<int64_t>(mt[j]) * cout_, cout_), ++m;
          }
          // The next tile's members are scattered over the batch: fetch their codes and terms
          // while this tile runs.
          for (int64_t p = p1, pe = std::min(P, p1 + tile_own); p < pe; ++p)
            for (int32_t mr : mates[n * P + p])
              if (mr >= 0) __builtin_prefetch(gc + static_cast<int64_t>(mr) * cout_), __builtin_prefetch(terms + mr);
          y_rows(m, idx.data(), A.data(), C.data());
          const float* Yf = reinterpret_cast<const float*>(C.data());
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t r = n * P + p, oh = p / g.Wo, ow = p - oh * g.Wo;
            const std::array<int32_t, kGather>& mt = mates[r];
            float* const base = acc.data() + (oh * stride_ * Wp + ow * stride_) * cin_;
            const float is = 1.0f / t.row_scale[r];
            if (mt[0] < 0) {  // a large group's row: its Y row, and M_g from beforehand
              float vf, vr;
              householder(t.group_size(large[~mt[0]]), vf, vr);
              const float c2 = 2.0f * (t.leads_group(r) ? vf : vr);
              const float* y = Yf + first[p - p0] * ldc;
              const float* mg = Mlarge.data() + ~mt[0] * ckk;
              for (int64_t kh = 0; kh < k_; ++kh) {
                float* __restrict dst = base + kh * Wp * cin_;
                const float* __restrict yk = y + kh * run;
                const float* __restrict mk = mg + kh * run;
                for (int64_t i = 0; i < run; ++i) dst[i] += (yk[i] - c2 * mk[i]) * is;
              }
              continue;
            }
            // A small group (most are pairs and triples): the row of T^-1 is a combination of
            // the members' Y rows, dx_r = sum_j w_j Y_j with w_j = ([j = r] - 2 v_r v_j) / s_r,
            // formed in one pass over their integer rows (no Y row stored).
            const int32_t* s0 = C.data() + first[p - p0] * ldc;
            auto finish = [&]<int NG>() {
              float vf, vr;
              householder(NG, vf, vr);
              RowTerms tm[NG];
              float w[NG];
              const float c2 = 2.0f * (t.leads_group(r) ? vf : vr);
              for (int j = 0; j < NG; ++j)
                tm[j] = terms[mt[j]], w[j] = ((mt[j] == r ? 1.0f : 0.0f) - c2 * (j == 0 ? vf : vr)) * is;
#if defined(FQT_DGRAD_FUSED)
              // Whole vectors, the same operations in the same order (fused_value, as the other
              // paths' vector epilogue; GCC's own vectorization of the loop below was slower).
              if (bhq_vector_epilogue) {
                __m512 wv[NG];
                for (int j = 0; j < NG; ++j) wv[j] = _mm512_set1_ps(w[j]);
                for (int64_t kh = 0; kh < k_; ++kh) {
                  float* dst = base + kh * Wp * cin_;
                  for (int64_t i = 0, k = kh * run; i < run; i += 16, k += 16) {
                    __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 4
                    for (int j = 0; j < NG; ++j)
                      sum = _mm512_add_ps(sum, _mm512_mul_ps(wv[j], fused_value(_mm512_loadu_si512(s0 + j * ldc + k), rbk + k, tm[j])));
                    _mm512_storeu_ps(dst + i, _mm512_add_ps(_mm512_loadu_ps(dst + i), sum));
                  }
                }
                return;
              }
#endif
              for (int64_t kh = 0; kh < k_; ++kh) {
                float* __restrict dst = base + kh * Wp * cin_;
                for (int64_t i = 0, k = kh * run; i < run; ++i, ++k) {
                  float sum = 0.0f;
                  for (int j = 0; j < NG; ++j)
                    sum += w[j] * (((static_cast<float>(s0[j * ldc + k]) + tm[j].Of * rbk[k]) + tm[j].df * rbk[k]) * tm[j].inv + tm[j].cr);
                  dst[i] += sum;
                }
              }
            };
            static_assert(kGather == 4, "one finishing per small group size");
            if (mt[1] < 0) finish.template operator()<1>();
            else if (mt[2] < 0) finish.template operator()<2>();
            else if (mt[3] < 0) finish.template operator()<3>();
            else finish.template operator()<4>();
          }
        }
        store_sample(acc.data(), n);
      });
    }
    return dx;
  }
#if defined(FQT_DGRAD_FUSED)
  if (fused) {
    SampleUnits split(N, across, dxp, chw);
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
    {
      std::vector<float> acc(static_cast<size_t>(acc_size));  // zero; store_sample leaves it zero
      std::vector<RowTerms> tb(static_cast<size_t>(P));       // the sample's rows' terms
      const bool window = cin_ == 16 && k_ == 3 && stride_ == 1;  // (then it needs no zeroing)
      split.run([&](int64_t n, int64_t next) {
        const uint8_t* an = gc + n * P * cout_;
        // The next sample's gradient codes, while this one runs: the kernel ran ~1.8x slower in
        // the step than on cached data.
        if (next >= 0)
          for (int64_t i = 0; i < P * cout_; i += 64) __builtin_prefetch(gc + next * P * cout_ + i);
        row_terms_block(n * P, P, an, tb.data());
        auto terms = [&](int64_t p) { return tb[p]; };
        {
          profile::Scope timer(profile::gemm_int);  // (its finishing included)
          if (window) {  // (NV = 9) AccWindow3x3
            if (K4 == 4) dgrad_fused_sample_3x3<4>(an, cout_, g.Ho, g.Wo, Wp, K4, bv.data(), rbk, terms, acc.data());
            else dgrad_fused_sample_3x3<0>(an, cout_, g.Ho, g.Wo, Wp, K4, bv.data(), rbk, terms, acc.data());
          } else
          switch (NV) {
#define FQT_NV(v)                                                                                                    \
  case v:                                                                                                            \
    dgrad_fused_sample<v>(an, cout_, P, g.Wo, stride_ * cin_, stride_ * Wp * cin_, K4, bv.data(), off.data(), rbk, \
                          terms, acc.data());                                                                      \
    break;
            FQT_NV(1) FQT_NV(2) FQT_NV(3) FQT_NV(4) FQT_NV(5) FQT_NV(6) FQT_NV(7) FQT_NV(8) FQT_NV(9)
#undef FQT_NV
          }
        }
        store_sample(acc.data(), n, !window);
      });
    }
    return dx;
  }
#endif
  SampleUnits split(N, across, dxp, chw);
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<int32_t> C(static_cast<size_t>(P * ldc));
    std::vector<float> acc(static_cast<size_t>(acc_size));  // zero; store_sample leaves it zero
    std::vector<RowTerms> tb(static_cast<size_t>(P));       // the sample's rows' terms
#if defined(FQT_DGRAD_FUSED)
    const bool vector_epilogue = run % 16 == 0 && g_fused_dgrad.load(std::memory_order_relaxed);
    const bool window_epilogue = vector_epilogue && k_ == 3 && stride_ == 1 && (cin_ == 32 || cin_ == 48 || cin_ == 64);
#endif
    split.run([&](int64_t n, int64_t) {
      igemm_worker(P, gc + n * P * cout_, cout_, Bpk, C.data(), ldc);
      row_terms_block(n * P, P, gc + n * P * cout_, tb.data());
#if defined(FQT_DGRAD_FUSED)
      // 3x3 stride 1, Cin = 16 V (V <= 4): per output row and kernel row kh, the three pixel
      // columns a position adds onto held in registers while the positions pass them (as
      // AccWindow3x3 does for 16 channels): 3 V loads and stores per position instead of 9 V.
      // A pixel of padded row oh + kh gets its additions from positions ow = x - 2, x - 1, x of
      // output row oh in that order, and the output rows in order: the same sums in the same
      // order as the row-by-row form below, so the same bits.
      if (window_epilogue) {
        auto rows = [&]<int V>() {
          const int64_t rs = Wp * cin_;
          for (int64_t oh = 0; oh < g.Ho; ++oh)
            for (int64_t kh = 0; kh < 3; ++kh) {
              float* const prow = acc.data() + (oh + kh) * rs;
              const float* rk = rbk + kh * run;
              __m512 w[3][V];
#pragma GCC unroll 4
              for (int v = 0; v < V; ++v) w[0][v] = _mm512_loadu_ps(prow + 16 * v), w[1][v] = _mm512_loadu_ps(prow + cin_ + 16 * v);
              for (int64_t ow = 0; ow < g.Wo; ++ow) {
                const int64_t p = oh * g.Wo + ow;
                const int32_t* sk = C.data() + p * ldc + kh * run;
                const RowTerms t = tb[p];
                float* const col = prow + ow * cin_;
#pragma GCC unroll 4
                for (int v = 0; v < V; ++v) w[2][v] = _mm512_loadu_ps(col + 2 * cin_ + 16 * v);
#pragma GCC unroll 3
                for (int kw = 0; kw < 3; ++kw)
#pragma GCC unroll 4
                  for (int v = 0; v < V; ++v) {
                    const int64_t i = kw * cin_ + 16 * v;
                    w[kw][v] = _mm512_add_ps(w[kw][v], fused_value(_mm512_loadu_si512(sk + i), rk + i, t));
                  }
#pragma GCC unroll 4
                for (int v = 0; v < V; ++v) _mm512_storeu_ps(col + 16 * v, w[0][v]), w[0][v] = w[1][v], w[1][v] = w[2][v];
              }
#pragma GCC unroll 4
              for (int v = 0; v < V; ++v)
                _mm512_storeu_ps(prow + g.Wo * cin_ + 16 * v, w[0][v]), _mm512_storeu_ps(prow + (g.Wo + 1) * cin_ + 16 * v, w[1][v]);
            }
        };
        if (cin_ == 32) rows.template operator()<2>();
        else if (cin_ == 48) rows.template operator()<3>();
        else rows.template operator()<4>();
        store_sample(acc.data(), n);
        return;
      }
#endif
      // Each dgrad row is finished (scales, offsets) and summed straight onto the padded HWC
      // accumulator (the adjoint of im2row_hwc), so the [P, Ckk] fp32 rows are never stored.
      for (int64_t p = 0, oh = 0, ow = 0; p < P; ++p, ow = ow + 1 == g.Wo ? (++oh, 0) : ow + 1) {
        const int32_t* __restrict s = C.data() + p * ldc;
        const RowTerms t = tb[p];
        // Each value is added straight onto the accumulator (no row buffer written and read back).
        // (oh, ow) = (p / Wo, p % Wo), counted along (an integer division per row showed in perf)
        float* const base = acc.data() + (oh * stride_ * Wp + ow * stride_) * cin_;
#if defined(FQT_DGRAD_FUSED)
        // Whole vectors through fused_value, the same operations (GCC's own vector loop reloaded
        // its pointers from the stack every 16 values); set_conv_fused_dgrad(false) keeps the
        // scalar loop below, the reference the fused forms are tested against.
        if (vector_epilogue) {
          for (int64_t kh = 0; kh < k_; ++kh) {
            float* d = base + kh * Wp * cin_;
            const int32_t* sk = s + kh * run;
            const float* rk = rbk + kh * run;
            for (int64_t i = 0; i < run; i += 16)
              _mm512_storeu_ps(d + i, _mm512_add_ps(_mm512_loadu_ps(d + i),
                                                    fused_value(_mm512_loadu_si512(sk + i), rk + i, t)));
          }
          continue;
        }
#endif
        for (int64_t kh = 0; kh < k_; ++kh) {
          float* __restrict dst = base + kh * Wp * cin_;
          for (int64_t i = 0, k = kh * run; i < run; ++i, ++k)
            dst[i] += ((static_cast<float>(s[k]) + t.Of * rbk[k]) + t.df * rbk[k]) * t.inv + t.cr;
        }
      }
      store_sample(acc.data(), n);
    });
  }
  return dx;
}

Conv2d::WgradPlan Conv2d::wgrad_int_plan(int64_t N, int64_t ckk, int64_t cout, int64_t P) {
  const int64_t wsize = ckk * cout + ckk + cout;  // int64 words of one group's partial sums
  const int64_t groups = std::clamp<int64_t>(std::min<int64_t>(8, (int64_t{1} << 23) / wsize), 1, std::max<int64_t>(N, 1));
  // Within a group, samples side by side along k (A = [im2col(x_n) ...], B = [G_n^T ...]): one
  // int32 product [Ckk, Cout] and one widening into the int64 sums per batch instead of per
  // sample (with P = 49 in stage 3, that widening of 37K products per sample was a third of
  // wgrad_int's own time in perf), and a longer k for the kernel. The patch bytes of a batch stay
  // within 512 KB (half this machine's L2; bench_conv_layer wgrad, 1 thread: 64 KB -> 256 KB
  // took stage 2 from 1 to 4 samples per GEMM and its time down ~20%, stage 3 ~20%; on 2 threads
  // 1 MB measured the same as 512 KB: docs/profiles/README.md, session 8) and K within the exact
  // int32 bound.
  const int64_t per_gemm = std::max<int64_t>(1, std::min((int64_t{512} << 10) / std::max<int64_t>(ckk * P, 1),
                                                         igemm_max_k(255, 128) / std::max<int64_t>(P, 1)));
  return {groups, per_gemm};
}

void Conv2d::wgrad_int(const QuantizedTensor& gq) {
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W;
  // Per group of samples, in int64: S [Ckk, Cout] (the GEMMs), then the im2col code sums per tap
  // row (Ckk) and the shifted gradient code sums per column (Cout).
  const int64_t ssize = ckk * cout_, wsize = ssize + ckk + cout_;
  const int shg = s8_shift(gq.spec.bits);
  const double sx = xq_.scale[0], lx = xq_.lo[0];  // value = code / sx + lx
  const int zero_code = saved_zero_code();
  FQT_CHECK(zero_code >= 0 && zero_code <= 255, "Conv2d {}: padding code {} out of range", name_, zero_code);
  const auto pad_code = static_cast<uint8_t>(zero_code);
  const uint8_t* gc = gq.codes.data<uint8_t>();
  const uint8_t* xc = xq_.codes.data<uint8_t>();
  // Integer partial sums (exact: the grouping of the samples cannot change them).
  // (checked here, not only inside the parallel region, where a failed check cannot be caught)
  FQT_CHECK(P <= igemm_max_k(255, 128), "Conv2d {}: {} output positions per sample exceed the int32 bound of "
            "the integer wgrad ({})", name_, P, igemm_max_k(255, 128));
  const int T = omp_get_max_threads();
  // Thread t's partials at t wsize, zeroed by that thread inside its region (a serial memset of
  // T x wsize int64 here was a tenth of a millisecond per 64-channel layer, the other thread idle);
  // used[t]: thread t ran (a region may run on fewer threads than T). Every region below calls
  // partials() on each of its threads: a path that did not would leave its slice unset.
  std::unique_ptr<int64_t[]> part(new int64_t[static_cast<size_t>(T * wsize)]);
  std::vector<uint8_t> used(static_cast<size_t>(T), 0);
  auto partials = [&] {
    const int t = omp_get_thread_num();
    int64_t* a = part.get() + t * wsize;
    std::fill(a, a + wsize, int64_t{0});
    used[t] = 1;
    return a;
  };
#if defined(FQT_WGRAD_DIRECT)
  if (g_direct_wgrad.load(std::memory_order_relaxed) && igemm_detail::vnni_available() && (cin_ == 16 || cin_ == 1) &&
      cout_ == 16 && stride_ == 1) {
    // 16 input channels (wgrad_direct_sample: per tap, lanes = the input channels, 16 output
    // channels and the code sums), or one (wgrad_direct_c1_sample: S rows (0, kh, kw) = the taps,
    // lanes = the output channels; the code sums from the image by row).
    const bool c1 = cin_ == 1;
    const int64_t kk = k_ * k_, G4 = (g.Wo + 3) / 4, Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
    // samples per int32 partial: |one lane's sum| <= 255 * 128 * P per sample
    const int64_t flush = std::max<int64_t>(1, igemm_max_k(255, 128) / P);
    WorkSplit split(N, T);
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
    {
      std::vector<uint8_t> img(static_cast<size_t>(Hp * Wp * cin_ + 64));  // (+ the slack c1's broadcasts read)
      std::vector<int8_t> grp(static_cast<size_t>(g.Ho * G4 * 64));
      std::vector<int32_t> acc32(static_cast<size_t>(kk * (c1 ? 1 : kWgradAcc) * 16));
      std::vector<int64_t> rs(static_cast<size_t>(c1 ? Hp * k_ : 0));
      int64_t* acc = partials();
      int64_t* rx = acc + ssize;
      int64_t* rg = rx + ckk;
      const auto flip = static_cast<uint8_t>(shg == 128 ? 0x80 : 0x00);
      auto widen = [&] {  // acc32 -> S [(channel, tap) row][c] (and rx, 16 channels)
        if (c1) {
          for (int64_t i = 0; i < kk * 16; ++i) acc[i] += acc32[i];  // [tap][c]: S's layout
        } else {
          for (int64_t tap = 0; tap < kk; ++tap) {  // [tap][c or sums][input channel]
            const int32_t* a = acc32.data() + tap * kWgradAcc * 16;
            for (int64_t c = 0; c < 16; ++c)
              for (int64_t ci = 0; ci < 16; ++ci) acc[(ci * kk + tap) * cout_ + c] += a[c * 16 + ci];
            for (int64_t ci = 0; ci < 16; ++ci) rx[ci * kk + tap] += a[16 * 16 + ci];
          }
        }
        std::fill(acc32.begin(), acc32.end(), 0);
      };
      int64_t pending = 0;
      split.run([&](int64_t n) {
        alignas(64) int32_t gsum[16];
        _mm512_store_si512(gsum, wgrad_groups(gc + n * P * cout_, g.Ho, g.Wo, flip, grp.data()));
        for (int64_t c = 0; c < 16; ++c) rg[c] += gsum[c];
        if (c1) {
          pad_chw(xc + n * chw, g, pad_code, img.data());
          wgrad_direct_c1_sums(img.data(), Hp, Wp, g.Ho, g.Wo, k_, rs.data(), rx);
        } else {
          pad_hwc(xc + n * chw, g, pad_code, img.data());
        }
        {
          profile::Scope timer(profile::gemm_int);
          if (c1) wgrad_direct_c1_sample(img.data(), Wp, g.Ho, g.Wo, k_, grp.data(), acc32.data());
          else wgrad_direct_sample(img.data(), Wp, g.Ho, g.Wo, k_, grp.data(), acc32.data());
        }
        if (++pending == flush) widen(), pending = 0;
      });
      if (pending) widen();
    }
  } else if (g_direct_wgrad.load(std::memory_order_relaxed) && igemm_detail::vnni_available() && cin_ % 16 == 0 &&
             cin_ >= 32 && cout_ % 16 == 0 && stride_ == 1) {
    // The wider layers (wgrad_direct_sample_wide).
    const int64_t kk = k_ * k_, G4 = (g.Wo + 3) / 4, Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad;
    const int64_t flush = std::max<int64_t>(1, igemm_max_k(255, 128) / P);  // samples per int32 partial
    WorkSplit split(N, T);
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
    {
      // (+3 pixels: the groups of the last pixels read past the image; their gradient bytes are 0)
      std::vector<uint8_t> img(static_cast<size_t>((Hp * Wp + 3) * cin_));
      std::vector<uint8_t> tg(static_cast<size_t>(Hp * Wp * cin_ * 4));
      std::vector<int8_t> grp(static_cast<size_t>(g.Ho * G4 * cout_ * 4));
      std::vector<int32_t> acc32(static_cast<size_t>(kk * cout_ * cin_)), sums32(static_cast<size_t>(kk * cin_));
      int64_t* acc = partials();
      int64_t* rx = acc + ssize;
      int64_t* rg = rx + ckk;
      const auto flip = static_cast<uint8_t>(shg == 128 ? 0x80 : 0x00);
      auto widen = [&] {  // acc32 [tap][c][ci] -> S [(ci, tap) row][c] (written in order), sums32 -> rx
        for (int64_t ci = 0; ci < cin_; ++ci)
          for (int64_t tap = 0; tap < kk; ++tap) {
            int64_t* __restrict s = acc + (ci * kk + tap) * cout_;
            const int32_t* __restrict a = acc32.data() + tap * cout_ * cin_ + ci;
            for (int64_t c = 0; c < cout_; ++c) s[c] += a[c * cin_];
            rx[ci * kk + tap] += sums32[tap * cin_ + ci];
          }
        std::fill(acc32.begin(), acc32.end(), 0);
        std::fill(sums32.begin(), sums32.end(), 0);
      };
      int64_t pending = 0;
      split.run([&](int64_t n) {
        wgrad_groups_wide(gc + n * P * cout_, g.Ho, g.Wo, cout_, flip, grp.data(), rg);
        pad_hwc(xc + n * chw, g, pad_code, img.data());
        {
          profile::Scope timer(profile::gemm_int);
          wgrad_pixel_groups(img.data(), Hp * Wp, cin_, tg.data());
          wgrad_direct_sample_wide(tg.data(), Wp, g.Ho, g.Wo, k_, cin_, cout_, grp.data(), acc32.data(), sums32.data());
        }
        if (++pending == flush) widen(), pending = 0;
      });
      if (pending) widen();
    }
  } else  // the general path: im2col rows, the GEMM kernel
#endif
  {
    const WgradPlan plan = wgrad_int_plan(N, ckk, cout_, P);
    const int64_t groups = plan.groups, ns = plan.per_gemm;
    const int64_t ldk = ns * P;
    // The plan's batches (each group's samples, ns at a time) claimed through WorkSplit, each thread
    // summing into its own int64 partials: the sums are exact, so which thread takes a batch
    // changes nothing (a static split over the 8 groups left the faster vCPU waiting on the other).
    std::vector<std::pair<int64_t, int64_t>> batches;  // [n0, n1)
    for (int64_t gi = 0; gi < groups; ++gi)
      for (int64_t n0 = gi * N / groups, n_end = (gi + 1) * N / groups; n0 < n_end; n0 += ns)
        batches.emplace_back(n0, std::min(n_end, n0 + ns));
    WorkSplit split(static_cast<int64_t>(batches.size()), T);
#if defined(__AVX512VBMI__)
    const Im2colPermute perm = im2col_permute_plan(g);
#endif
#pragma omp parallel if (batches.size() > 1 && parallel_worth(N * P * ckk))
    {
      std::vector<int8_t> Bg(static_cast<size_t>(cout_ * ldk));  // [G_n^T ...] codes [Cout, ns * P], s8
      // (+128 bytes: the permuting im2col reads two registers from a block's start; +64: its last
      // masked store, which a sanitizer may count as a full one)
      std::vector<uint8_t> img(static_cast<size_t>((g.H + 2 * g.pad) * (g.W + 2 * g.pad) * cin_ + 128));
      std::vector<uint8_t> A(static_cast<size_t>(ckk * ldk + 64));
      std::vector<int32_t> C(static_cast<size_t>(ssize));
      int64_t* acc = partials();
      int64_t* rx = acc + ssize;
      int64_t* rg = rx + ckk;
      split.run([&](int64_t bi) {
        const int64_t n0 = batches[bi].first, m = batches[bi].second - n0, K = m * P;
        for (int64_t j = 0; j < m; ++j) {
          // G_n^T as s8 (8-bit codes: q - 128 = q ^ 0x80) into columns j*P.. of the batch.
          kernels::transpose_bytes(gc + (n0 + j) * P * cout_, P, cout_, cout_,
                                   reinterpret_cast<uint8_t*>(Bg.data()) + j * P, K, shg == 128 ? 0x80 : 0x00);
          pad_chw(xc + (n0 + j) * chw, g, pad_code, img.data());
#if defined(__AVX512VBMI__)
          if (perm.usable) im2col_chw_permute(img.data(), g, perm, A.data() + j * P, K);
          else
#endif
            im2col_chw(img.data(), g, A.data() + j * P, K);
        }
        // The column sums of the gradient codes are the row sums of the transposed bytes, xor-ed
        // back (a vector pass over the cache-resident copy: the scalar loop over G_n's columns
        // was ~20% of wgrad_int's own time in perf).
        const auto flip = static_cast<uint8_t>(shg == 128 ? 0x80 : 0x00);
        const uint8_t* bg = reinterpret_cast<const uint8_t*>(Bg.data());
        for (int64_t c = 0; c < cout_; ++c) rg[c] += byte_sum(bg + c * K, K, flip) - K * shg;
        for (int64_t k = 0; k < ckk; ++k) rx[k] += byte_sum(A.data() + k * K, K);
        igemm_worker(ckk, cout_, K, A.data(), K, Bg.data(), K, C.data(), cout_);
        for (int64_t i = 0; i < ssize; ++i) acc[i] += C[i];
      });
    }
  }
  // The partials summed (exact integers: any order) and finished, rows of S (taps) split over
  // the threads; each weight's fp64 formula as before.
  std::vector<const int64_t*> parts;
  for (int t = 0; t < T; ++t)
    if (used[t]) parts.push_back(part.get() + t * wsize);
  const auto np = static_cast<int64_t>(parts.size());
  const bool per_col = gq.granularity() == Granularity::column;
  const double K = static_cast<double>(N * P);
  std::vector<double> inv(static_cast<size_t>(cout_)), cb(inv.size()), cr(inv.size());
  for (int64_t c = 0; c < cout_; ++c) {
    int64_t rg = 0;
    for (int64_t t = 0; t < np; ++t) rg += parts[t][ssize + ckk + c];
    const double sg = scale_of(gq, per_col ? c : 0), Lg = lo_of(gq, per_col ? c : 0) + shg / sg;
    inv[c] = 1.0 / (sg * sx), cb[c] = Lg / sx, cr[c] = lx / sg * static_cast<double>(rg) + K * lx * Lg;
  }
  float* dw = weight_.grad.data<float>();
#pragma omp parallel for schedule(static) if (parallel_worth(ssize * np * 8))  // (bytes of partials read)
  for (int64_t k = 0; k < ckk; ++k) {
    int64_t rx = 0;
    for (int64_t t = 0; t < np; ++t) rx += parts[t][ssize + k];
    for (int64_t c = 0; c < cout_; ++c) {
      int64_t s = 0;
      for (int64_t t = 0; t < np; ++t) s += parts[t][k * cout_ + c];
      dw[c * ckk + k] += static_cast<float>(static_cast<double>(s) * inv[c] + cb[c] * static_cast<double>(rx) + cr[c]);
    }
  }
}

}  // namespace fqt
