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
//          transposed to Y_n [Cout, P]
//   dgrad  dcols_n [P, Ckk] = Gq_n [P, Cout] . Wq                 A = gradient codes (rows of G)
//          B = W^T; the row sums of G's codes by a byte-sum pass (not a GEMM column of
//          ones: that column made N = Ckk + 1, a 16-column panel of the kernel for one column);
//          each row summed at once onto dx_n (the adjoint of im2row);
//          BHQ: T^-1 fused row by row (see dgrad_int)
//   wgrad  dW^T [Ckk, Cout] = sum_n im2col(xq_n) [Ckk, P] . Gq_n  A = im2col codes (u8)
//          B = G_n^T codes (s8), a few samples side by side along k per GEMM; code sums per tap
//          row and per gradient column, and the integer partial sums, in int64 (exact, so any
//          grouping gives the same result)
//
// im2col runs on the codes: padding is the activation grid's code for 0 (zero-aligned grids have
// one by construction), so nothing is dequantized and the saved input stays 1 byte per value.
#include "common.hpp"
#include "kernels/cpu/transpose.hpp"
#include "fqt/gemm.hpp"
#include "fqt/igemm.hpp"
#include "fqt/profile.hpp"

#include <algorithm>
#include <cstring>

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
      std::memcpy(out + (c * Hp + h + g.pad) * Wp + g.pad, x + (c * g.H + h) * g.W, static_cast<size_t>(g.W));
}

// im2col rows [(c, kh, kw), P] from the padded CHW image (row stride ld >= P).
void im2col_chw(const uint8_t* img, const Geom& g, uint8_t* out, int64_t ld) {
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad, k = g.k;
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

// o[0:n) = sum_c u[c] W[c, 0:n) for one BHQ group (W: rows of ldw >= n floats). With AVX-512:
// 32 outputs at a time (two registers, the last ones masked), each summed over c in four
// interleaved chains (c mod 4) of fused multiply-adds: eight independent chains keep both FMA
// pipes busy (one chain per register was bound by the FMA latency in perf), and each output is
// stored once.
void uw_row(const float* __restrict u, int64_t cout, const float* __restrict w, int64_t ldw, int64_t n,
            float* __restrict o) {
#if defined(__AVX512F__)
  auto mask = [&](int64_t k) {
    return k >= n ? __mmask16{0} : n - k >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << (n - k)) - 1);
  };
  for (int64_t k0 = 0; k0 < n; k0 += 32) {
    const __mmask16 m0 = mask(k0), m1 = mask(k0 + 16);
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const float* wk = w + k0;
    int64_t c = 0;
    for (; c + 4 <= cout; c += 4) {
      const float* w0 = wk + c * ldw;
      const __m512 u0 = _mm512_set1_ps(u[c]), u1 = _mm512_set1_ps(u[c + 1]), u2 = _mm512_set1_ps(u[c + 2]),
                   u3 = _mm512_set1_ps(u[c + 3]);
      a0 = _mm512_fmadd_ps(u0, _mm512_maskz_loadu_ps(m0, w0), a0);
      b0 = _mm512_fmadd_ps(u0, _mm512_maskz_loadu_ps(m1, w0 + 16), b0);
      a1 = _mm512_fmadd_ps(u1, _mm512_maskz_loadu_ps(m0, w0 + ldw), a1);
      b1 = _mm512_fmadd_ps(u1, _mm512_maskz_loadu_ps(m1, w0 + ldw + 16), b1);
      a2 = _mm512_fmadd_ps(u2, _mm512_maskz_loadu_ps(m0, w0 + 2 * ldw), a2);
      b2 = _mm512_fmadd_ps(u2, _mm512_maskz_loadu_ps(m1, w0 + 2 * ldw + 16), b2);
      a3 = _mm512_fmadd_ps(u3, _mm512_maskz_loadu_ps(m0, w0 + 3 * ldw), a3);
      b3 = _mm512_fmadd_ps(u3, _mm512_maskz_loadu_ps(m1, w0 + 3 * ldw + 16), b3);
    }
    for (; c < cout; ++c) {
      const __m512 uc = _mm512_set1_ps(u[c]);
      a0 = _mm512_fmadd_ps(uc, _mm512_maskz_loadu_ps(m0, wk + c * ldw), a0);
      b0 = _mm512_fmadd_ps(uc, _mm512_maskz_loadu_ps(m1, wk + c * ldw + 16), b0);
    }
    _mm512_mask_storeu_ps(o + k0, m0, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    if (m1) _mm512_mask_storeu_ps(o + k0 + 16, m1, _mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3)));
  }
#else
  for (int64_t k = 0; k < n; ++k) o[k] = 0.0f;
  for (int64_t c = 0; c < cout; ++c)
    for (int64_t k = 0; k < n; ++k) o[k] += u[c] * w[c * ldw + k];
#endif
}

// y[0:n) += a z[0:n) + b for u8 codes z (BHQ's U rows): 16 lanes at a time, the last masked.
void axpb_u8(float* __restrict y, const uint8_t* __restrict z, int64_t n, float a, float b) {
#if defined(__AVX512F__)
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? __mmask16{0xffff} : static_cast<__mmask16>((1u << (n - c)) - 1);
    const __m512 zf = _mm512_maskz_cvtepi32_ps(m, _mm512_maskz_cvtepu8_epi32(m, _mm_maskz_loadu_epi8(m, z + c)));
    _mm512_mask_storeu_ps(y + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + c), _mm512_add_ps(_mm512_mul_ps(va, zf), vb)));
  }
#else
  for (int64_t c = 0; c < n; ++c) y[c] += a * static_cast<float>(z[c]) + b;
#endif
}

double scale_of(const QuantizedTensor& q, int64_t group) { return q.scale[q.scale.size() == 1 ? 0 : group]; }
double lo_of(const QuantizedTensor& q, int64_t group) { return q.lo[q.lo.size() == 1 ? 0 : group]; }

}  // namespace

Tensor Conv2d::forward_int(const QuantizedTensor& xq, const QuantizedTensor& wq, int zero_code) const {
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
  std::vector<int32_t> tap(static_cast<size_t>(ckk));  // (c, kh, kw) -> (kh, kw, c), once per call
  for (int64_t r = 0; r < ckk; ++r) tap[r] = static_cast<int32_t>(hwc_tap(r, k_, cin_));
  for (int64_t c = 0; c < cout_; ++c) {
    int64_t rbw = 0;
    for (int64_t r = 0; r < ckk; ++r) {
      const int v = wc[c * ckk + r] - shw;
      Bw[c * ckk + tap[r]] = static_cast<int8_t>(v), rbw += v;
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
  const igemm_detail::LocalB Bpk(cout_, ckk, Bw.data(), ckk);
  Tensor y = Tensor::empty({N, cout_, g.Ho, g.Wo});
  float* yp = y.data<float>();
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<uint8_t> img(static_cast<size_t>((g.H + 2 * g.pad) * (g.W + 2 * g.pad) * cin_));
    std::vector<uint8_t> A(static_cast<size_t>(P * ckk));
    std::vector<int32_t> C(static_cast<size_t>(P * cout_)), Ct(static_cast<size_t>(cout_ * P));
    std::vector<float> rx(static_cast<size_t>(P));  // code sums <= Ckk * 255: exact in fp32
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
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
      }
    }
  }
  return y;
}

Tensor Conv2d::dgrad_int(const QuantizedTensor& gq) const {
  const Geom g = geom(in_shape_, k_, stride_, pad_);
  const int64_t N = in_shape_[0], P = g.P(), ckk = g.rows(), chw = cin_ * g.H * g.W;
  // B = W^T codes [Ckk, Cout] as s8 (G's code row sums come from byte_sum, per row).
  const int shw = s8_shift(wq_.spec.bits);
  const double sw = wq_.scale[0], lw = wq_.lo[0] + shw / sw;
  const int64_t ldc = ckk;
  std::vector<int8_t> Bt(static_cast<size_t>(ckk * cout_));
  std::vector<float> rb(ckk, 0.0f);  // weight code sums per tap, |rb_k| <= Cout * 128: exact in fp32
  const uint8_t* wc = wq_.codes.data<uint8_t>();
  for (int64_t r = 0; r < ckk; ++r) {  // row of Bt in (kh, kw, c) tap order
    const int64_t k = hwc_tap(r, k_, cin_);
    int64_t s = 0;
    for (int64_t c = 0; c < cout_; ++c) {
      const int v = wc[c * ckk + r] - shw;
      Bt[k * cout_ + c] = static_cast<int8_t>(v), s += v;
    }
    rb[k] = static_cast<float>(s);
  }
  const bool bhq = gq.transform.has_value();
  const bool per_row = gq.granularity() == Granularity::row;
  // BHQ: dx rows = T^-1 (Z W) with T^-1 = diag(1/s) H and H = I - 2 v v^T within each group, so
  //   (T^-1 Z W)_r = (Z_r W - 2 v_r (v^T Z)_g(r) W) / s_r.
  // (v^T Z)_g is a Cout-vector per group: U [groups, Cout]; UW [groups, Ckk] = U W carries the
  // whole correction, and the inverse is applied row by row inside the per-sample loop (no
  // [N*P, Ckk] product is materialised, and the groups may mix samples freely); the row pass
  // finds its group through row_group. While W (fp32) fits in L1 (stages 1-2: 9 and 36 KB), the
  // rows of UW come from uw_row, group by group (bench_conv_layer 16 16 28, BHQ dgrad: 24-32 ms
  // against 33-35 with OpenBLAS, which clears UW first and runs short-K blocks); a larger W
  // (stage 3: 147 KB) goes through one fp32 GEMM (7.8 ms against 9.7-10.5 with uw_row for
  // 64 64 7: the GEMM keeps a W panel in registers over many groups). Computing u W per row
  // instead (no UW) costs Cout Ckk per row, as much as the fp32 GEMM itself: 25-30% slower at all
  // three stages. (Each alternative was timed by changing the 40 KB threshold below or this
  // code: docs/profiles/README.md, session 7.)
  // U and UW are scratch shared by all layers of the thread that runs backward, grown to the
  // largest layer and kept: a fresh buffer would page-fault and zero-fill ~30 MB per stage-1
  // layer, and the number of groups changes every step, so the tensor block cache (exact sizes)
  // would not reuse it.
  // (thread_local: take the pointers here, in the calling thread, before any parallel region)
  static thread_local std::vector<float> uw_scratch, u_scratch;
  const bool use_sgemm = cout_ * ckk * static_cast<int64_t>(sizeof(float)) > 40 * 1024;
  float *UW = nullptr, *U = nullptr;
  BhqTransform copy;  // only for a transform assembled without row_group
  const BhqTransform* tr = bhq ? &gq.transform->with_row_group(copy) : nullptr;
  std::vector<float> Wd;  // dequantized W [Cout, Ckk] in tap order
  const uint8_t* gc = gq.codes.data<uint8_t>();
  if (bhq) {
    const BhqTransform& t = *tr;
    const int64_t G = t.num_groups();
    if (static_cast<int64_t>(uw_scratch.size()) < G * ckk) uw_scratch.resize(static_cast<size_t>(G * ckk));
    UW = uw_scratch.data();
    if (static_cast<int64_t>(u_scratch.size()) < G * cout_) u_scratch.resize(static_cast<size_t>(G * cout_));
    U = u_scratch.data();
    Wd.resize(static_cast<size_t>(cout_ * ckk));
    for (int64_t k = 0; k < ckk; ++k)
      for (int64_t c = 0; c < cout_; ++c) Wd[c * ckk + k] = static_cast<float>(Bt[k * cout_ + c] / sw + lw);
    // U row by row, in row order: each row's codes, times a = v_k / s_g plus b = v_k l_g (fp64,
    // rounded once to fp32), added onto its group's row of U. Each thread owns a range of groups
    // and passes over all rows, adding only those of its groups, so every U row is summed by one
    // thread in row order: the same bits on any thread count. (Gathering each group's members
    // instead, as before, measured the same in the step: docs/profiles/README.md, session 7.)
    const int64_t rows = N * P;
#pragma omp parallel if (parallel_worth(rows * cout_))
    {
      const int nt = omp_get_num_threads(), th = omp_get_thread_num();
      const int64_t g0 = G * th / nt, g1 = G * (th + 1) / nt;
      std::fill(U + g0 * cout_, U + g1 * cout_, 0.0f);
      for (int64_t r = 0; r < rows; ++r) {
        if (r + 16 < rows) {  // its group's U row and offsets are scattered: fetch them early
          const int64_t ga = t.group_of(r + 16);
          if (ga >= g0 && ga < g1) __builtin_prefetch(U + ga * cout_, 1), __builtin_prefetch(&t.offsets[ga]);
        }
        const int64_t gi = t.group_of(r);
        if (gi < g0 || gi >= g1) continue;
        float vf, vr;
        householder_v(t.group_size(gi), vf, vr);
        const double vk = t.leads_group(r) ? vf : vr;
        const double sg = scale_of(gq, per_row ? r : 0), lg = lo_of(gq, per_row ? r : 0);
        const auto a = static_cast<float>(vk / sg), b = static_cast<float>(vk * lg);
        axpb_u8(U + gi * cout_, gc + r * cout_, cout_, a, b);
      }
      if (!use_sgemm)
        for (int64_t gi = g0; gi < g1; ++gi) uw_row(U + gi * cout_, cout_, Wd.data(), ckk, ckk, UW + gi * ckk);
    }
  }
  if (bhq && use_sgemm) {
    const int64_t G = tr->num_groups();
    constexpr int64_t kGB = 1024;
#pragma omp parallel for schedule(static) if (parallel_worth(G * cout_ * ckk))
    for (int64_t g0 = 0; g0 < G; g0 += kGB)
      sgemm(false, false, std::min(kGB, G - g0), ckk, cout_, 1.0f, U + g0 * cout_, cout_, Wd.data(), ckk, 0.0f,
            UW + g0 * ckk, ckk);
  }
  const igemm_detail::LocalB Bpk(ldc, cout_, Bt.data(), cout_);
  Tensor dx = Tensor::empty(in_shape_);
  float* dxp = dx.data<float>();
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad, run = k_ * cin_;
#pragma omp parallel if (N > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<int32_t> C(static_cast<size_t>(P * ldc));
    std::vector<float> acc(static_cast<size_t>(Hp * Wp * cin_)), acct(acc.size());
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      igemm_worker(P, gc + n * P * cout_, cout_, Bpk, C.data(), ldc);
      // Each dgrad row is finished (scales, offsets, BHQ's T^-1) and summed straight onto the
      // padded HWC accumulator (the adjoint of im2row_hwc), so the [P, Ckk] fp32 rows are never
      // stored.
      std::memset(acc.data(), 0, sizeof(float) * acc.size());
      for (int64_t p = 0, oh = 0, ow = 0; p < P; ++p, ow = ow + 1 == g.Wo ? (++oh, 0) : ow + 1) {
        const int64_t r = n * P + p;
        const double sg = scale_of(gq, per_row ? r : 0), lg = lo_of(gq, per_row ? r : 0);
        const int32_t* __restrict s = C.data() + p * ldc;
        // Y_k = sum_c (z_c / sg + lg) W_ck = (s_k + Lz rb_k) / (sg sw) + cr, Lz = lg sg the row's
        // offset in code units. Lz rb_k nearly cancels s_k when the codes sit around -Lz (a
        // gradient row centred on 0: Lz ~ -B/2), so it is split into an integer part, added first
        // (s_k + O rb_k: integers, exact in fp32 while |O| <= B, i.e. when the row's range covers
        // 0; a larger offset dominates the value, which then only takes a relative 2^-24), and a
        // remainder |Lz - O| <= 1/2. So fp32 loses nothing that matters against the value itself
        // (int vs sim deviation 2.1-2.6e-7 of max |dx|, as with the fp64 form), and the finishing
        // runs on 8-lane fp32 vectors instead of 4-lane fp64 (dgrad's epilogue was the largest
        // non-GEMM item of the step in perf).
        const double Lz = lg * sg, O = std::nearbyint(Lz);
        const float Of = static_cast<float>(O), df = static_cast<float>(Lz - O);
        const float inv = static_cast<float>(1.0 / (sg * sw));
        const auto zs = static_cast<double>(byte_sum(gc + r * cout_, cout_));  // row sum of G's codes
        const float cr = static_cast<float>(lw / sg * zs + static_cast<double>(cout_) * lg * lw);
        // Each value is added straight onto the accumulator (no row buffer written and read back).
        // (oh, ow) = (p / Wo, p % Wo), counted along (an integer division per row showed in perf)
        const float* __restrict rbk = rb.data();
        float* const base = acc.data() + (oh * stride_ * Wp + ow * stride_) * cin_;
        if (bhq) {
          const BhqTransform& t = *tr;
          const int64_t gi = t.group_of(r);
          if (p + 4 < P) {  // the groups are in range order, not row order: fetch a later row's early
            const int64_t ga = t.group_of(r + 4);
            const char* ahead = reinterpret_cast<const char*>(UW + ga * ckk);
            for (int64_t off = 0; off < ckk * 4; off += 64) __builtin_prefetch(ahead + off);
            __builtin_prefetch(&t.offsets[ga]);
          }
          float vf, vr;
          householder_v(t.group_size(gi), vf, vr);
          const float c2 = 2.0f * (t.leads_group(r) ? vf : vr), is = 1.0f / t.row_scale[r];
          const float* __restrict uwk = UW + gi * ckk;
          for (int64_t kh = 0; kh < k_; ++kh) {
            float* __restrict dst = base + kh * Wp * cin_;
            for (int64_t i = 0, k = kh * run; i < run; ++i, ++k)
              dst[i] += (((static_cast<float>(s[k]) + Of * rbk[k]) + df * rbk[k]) * inv + cr - c2 * uwk[k]) * is;
          }
        } else {
          for (int64_t kh = 0; kh < k_; ++kh) {
            float* __restrict dst = base + kh * Wp * cin_;
            for (int64_t i = 0, k = kh * run; i < run; ++i, ++k)
              dst[i] += ((static_cast<float>(s[k]) + Of * rbk[k]) + df * rbk[k]) * inv + cr;
          }
        }
      }
      // The padded HWC accumulator [Hp*Wp, C] -> [C, Hp*Wp] in one transpose (8x8 tiles cover
      // it better than the short image rows), then the interior rows into dx_n.
      float* xn = dxp + n * chw;
      kernels::transpose(acc.data(), Hp * Wp, cin_, cin_, acct.data(), Hp * Wp);
      for (int64_t c = 0; c < cin_; ++c)
        for (int64_t h = 0; h < g.H; ++h)
          std::memcpy(xn + (c * g.H + h) * g.W, acct.data() + (c * Hp + h + g.pad) * Wp + g.pad, sizeof(float) * static_cast<size_t>(g.W));
    }
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
  // Integer partial sums per fixed group of samples (exact: the grouping cannot change them).
  // (checked here, not only inside the parallel region, where a failed check cannot be caught)
  FQT_CHECK(P <= igemm_max_k(255, 128), "Conv2d {}: {} output positions per sample exceed the int32 bound of "
            "the integer wgrad ({})", name_, P, igemm_max_k(255, 128));
  const WgradPlan plan = wgrad_int_plan(N, ckk, cout_, P);
  const int64_t groups = plan.groups, ns = plan.per_gemm;
  const int64_t ldk = ns * P;
  std::vector<int64_t> part(static_cast<size_t>(groups * wsize), 0);
#if defined(__AVX512VBMI__)
  const Im2colPermute perm = im2col_permute_plan(g);
#endif
#pragma omp parallel if (groups > 1 && parallel_worth(N * P * ckk))
  {
    std::vector<int8_t> Bg(static_cast<size_t>(cout_ * ldk));  // [G_n^T ...] codes [Cout, ns * P], s8
    // (+128 bytes: the permuting im2col reads two registers from a block's start; +64: its last
    // masked store, which a sanitizer may count as a full one)
    std::vector<uint8_t> img(static_cast<size_t>((g.H + 2 * g.pad) * (g.W + 2 * g.pad) * cin_ + 128));
    std::vector<uint8_t> A(static_cast<size_t>(ckk * ldk + 64));
    std::vector<int32_t> C(static_cast<size_t>(ssize));
#pragma omp for schedule(static)
    for (int64_t gi = 0; gi < groups; ++gi) {
      int64_t* acc = part.data() + gi * wsize;
      int64_t* rx = acc + ssize;
      int64_t* rg = rx + ckk;
      const int64_t n_end = (gi + 1) * N / groups;
      for (int64_t n0 = gi * N / groups; n0 < n_end; n0 += ns) {
        const int64_t m = std::min(ns, n_end - n0), K = m * P;
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
      }
    }
  }
  for (int64_t gi = 1; gi < groups; ++gi)
    for (int64_t i = 0; i < wsize; ++i) part[i] += part[gi * wsize + i];
  const bool per_col = gq.granularity() == Granularity::column;
  const int64_t* S = part.data();
  const int64_t* rx = S + ssize;
  const int64_t* rg = rx + ckk;
  const double K = static_cast<double>(N * P);
  float* dw = weight_.grad.data<float>();
  for (int64_t c = 0; c < cout_; ++c) {
    const double sg = scale_of(gq, per_col ? c : 0), Lg = lo_of(gq, per_col ? c : 0) + shg / sg;
    const double inv = 1.0 / (sg * sx), cb = Lg / sx, cr = lx / sg * static_cast<double>(rg[c]) + K * lx * Lg;
    for (int64_t k = 0; k < ckk; ++k)
      dw[c * ckk + k] += static_cast<float>(static_cast<double>(S[k * cout_ + c]) * inv + cb * static_cast<double>(rx[k]) + cr);
  }
}

}  // namespace fqt
