// Transpose of 4-byte elements (float, int32) for layout changes (NCHW <-> rows, HWC -> CHW,
// [P, Cout] -> [Cout, P]): dst[c][r] = src[r][c]. Pure data movement (bit-exact); 8x8 AVX tiles
// where the CPU has them (the float load/store intrinsics may alias any type and move bits
// unchanged), plain loops for the edges and elsewhere.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)  // (AVX implies it)
#include <immintrin.h>
#endif

namespace fqt::kernels {

#if defined(__AVX__)
// One 8x8 tile in registers: r[i] = row i in, o[j] = column j out. (Forced inline, as the two
// below: out of line, each tile paid a call and a vzeroupper, 2.6% of a 1-thread PSQ step.)
[[gnu::always_inline]] inline void transpose8x8_regs(const __m256* r, __m256* o) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  o[0] = _mm256_permute2f128_ps(u0, u4, 0x20), o[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  o[2] = _mm256_permute2f128_ps(u2, u6, 0x20), o[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  o[4] = _mm256_permute2f128_ps(u0, u4, 0x31), o[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  o[6] = _mm256_permute2f128_ps(u2, u6, 0x31), o[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
// One 8x8 tile: rows of src (stride lds) become columns of dst (stride ldd).
[[gnu::always_inline]] inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], o[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  transpose8x8_regs(r, o);
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + j * ldd, o[j]);
}
#endif
#if defined(__AVX512F__) && defined(__AVX512VL__) && !defined(__SANITIZE_ADDRESS__)
#define FQT_TRANSPOSE_MASKED 1
// A partial tile, nr <= 8 rows by nc <= 8 columns, under masks (rows loaded, columns stored):
// the short image rows of dgrad's samples (W = 7, 14, 28) are mostly such edges.
// (Not under AddressSanitizer, which may count a masked access as a full one.)
[[gnu::always_inline]] inline void transpose8x8_partial(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t nr, int64_t nc) {
  const auto mc = static_cast<__mmask8>((1u << nc) - 1), mr = static_cast<__mmask8>((1u << nr) - 1);
  __m256 r[8], o[8];
  for (int64_t i = 0; i < 8; ++i) r[i] = i < nr ? _mm256_maskz_loadu_ps(mc, src + i * lds) : _mm256_setzero_ps();
  transpose8x8_regs(r, o);
  for (int64_t j = 0; j < nc; ++j) _mm256_mask_storeu_ps(dst + j * ldd, mr, o[j]);
}
#endif

// src [rows, cols] (row stride lds) -> dst [cols, rows] (row stride ldd). T: float or int32.
template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  static_assert(sizeof(T) == 4, "transpose moves 4-byte elements");
  int64_t r0 = 0;
#if defined(__AVX__)
  auto fs = [&](int64_t r, int64_t c) { return reinterpret_cast<const float*>(src + r * lds + c); };
  auto fd = [&](int64_t c, int64_t r) { return reinterpret_cast<float*>(dst + c * ldd + r); };
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) transpose8x8(fs(r0, c0), lds, fd(c0, r0), ldd);
#if defined(FQT_TRANSPOSE_MASKED)
    if (c0 < cols) transpose8x8_partial(fs(r0, c0), lds, fd(c0, r0), ldd, 8, cols - c0);
#else
    for (int64_t c = c0; c < cols; ++c)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[c * ldd + r] = src[r * lds + c];
#endif
  }
#if defined(FQT_TRANSPOSE_MASKED)
  if (r0 < rows) {
    for (int64_t c0 = 0; c0 < cols; c0 += 8) transpose8x8_partial(fs(r0, c0), lds, fd(c0, r0), ldd, rows - r0, std::min<int64_t>(8, cols - c0));
    return;
  }
#endif
#endif
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// Bytes: src [rows, cols] (row stride lds) -> dst [cols, rows] (row stride ldd), each byte XOR
// `flip` (0x80 turns an 8-bit code q into the int8 q - 128). 8x8 SSE2 tiles, plain loops for the
// edges.
inline void transpose_bytes(const uint8_t* src, int64_t rows, int64_t cols, int64_t lds, uint8_t* dst, int64_t ldd,
                            uint8_t flip) {
  int64_t r0 = 0;
#if defined(__SSE2__)
  const __m128i f = _mm_set1_epi8(static_cast<char>(flip));
  // One 8x8 tile from 8 rows of 8 bytes (r[i]): columns c, c + 1 of it per register after the
  // unpacks, handed to store2(v, c).
  auto tile8 = [&](const __m128i* r, auto&& store2) {
    const __m128i a0 = _mm_unpacklo_epi8(r[0], r[1]), a1 = _mm_unpacklo_epi8(r[2], r[3]);
    const __m128i a2 = _mm_unpacklo_epi8(r[4], r[5]), a3 = _mm_unpacklo_epi8(r[6], r[7]);
    const __m128i b0 = _mm_unpacklo_epi16(a0, a1), b1 = _mm_unpackhi_epi16(a0, a1);
    const __m128i b2 = _mm_unpacklo_epi16(a2, a3), b3 = _mm_unpackhi_epi16(a2, a3);
    store2(_mm_xor_si128(_mm_unpacklo_epi32(b0, b2), f), 0);
    store2(_mm_xor_si128(_mm_unpackhi_epi32(b0, b2), f), 2);
    store2(_mm_xor_si128(_mm_unpacklo_epi32(b1, b3), f), 4);
    store2(_mm_xor_si128(_mm_unpackhi_epi32(b1, b3), f), 6);
  };
#if defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(__SANITIZE_ADDRESS__)
  // A partial tile (nr < 8 rows or nc < 8 columns left over) through the same transpose: its
  // rows loaded and its columns stored under byte masks. The scalar tails they replace were
  // most of pad_hwc's work for 14- and 7-pixel image rows and a seventh of it for 28 (perf,
  // session 15). (Not under AddressSanitizer, which may count a masked access as a full one.)
  auto partial = [&](int64_t rr, int64_t nr, int64_t c0, int64_t nc) {
    const auto mc = static_cast<__mmask16>((1u << nc) - 1), mr = static_cast<__mmask16>((1u << nr) - 1);
    __m128i r[8];
    for (int64_t i = 0; i < 8; ++i) r[i] = i < nr ? _mm_maskz_loadu_epi8(mc, src + (rr + i) * lds + c0) : _mm_setzero_si128();
    tile8(r, [&](__m128i v, int64_t c) {
      if (c < nc) _mm_mask_storeu_epi8(dst + (c0 + c) * ldd + rr, mr, v);
      if (c + 1 < nc) _mm_mask_storeu_epi8(dst + (c0 + c + 1) * ldd + rr, mr, _mm_srli_si128(v, 8));
    });
  };
  constexpr bool kMasked = true;
#else
  constexpr bool kMasked = false;
#endif
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {
      __m128i r[8];
      for (int64_t i = 0; i < 8; ++i) r[i] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + (r0 + i) * lds + c0));
      tile8(r, [&](__m128i v, int64_t c) {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (c0 + c) * ldd + r0), v);
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (c0 + c + 1) * ldd + r0), _mm_srli_si128(v, 8));
      });
    }
    if constexpr (kMasked) {
#if defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(__SANITIZE_ADDRESS__)
      if (c0 < cols) partial(r0, 8, c0, cols - c0);
#endif
    } else {
      for (int64_t c = c0; c < cols; ++c)
        for (int64_t r = r0; r < r0 + 8; ++r) dst[c * ldd + r] = src[r * lds + c] ^ flip;
    }
  }
#if defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(__SANITIZE_ADDRESS__)
  if (r0 < rows) {
    for (int64_t c0 = 0; c0 < cols; c0 += 8) partial(r0, rows - r0, c0, std::min<int64_t>(8, cols - c0));
    return;
  }
#endif
#endif
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c] ^ flip;
}

#if defined(__AVX512BW__) && defined(__AVX512VBMI__) && !defined(__SANITIZE_ADDRESS__)
#define FQT_ROW_TO_HWC 1
// One image row to pixel-major order: channel c's w bytes at src + c lds (c < C, C a multiple of
// 16, w <= 64 pixels) -> dst [w][C] (w C contiguous bytes), each byte once (dst beyond w C
// untouched). Per 16 channels: 4 rows of channels (one 64-byte masked load each) give, by lane
// shuffles and one vpermb per 16-pixel segment, [16 pixels][4 channels]; four of those interleave
// by dwords and lanes into [pixel][16 channels]. ~150 instructions per 16 channels x 64 pixels
// where transpose_bytes' 8x8 tiles took ~500 (pad_hwc: ~6% of a PreAct-ResNet-20 FQT step).
// (Not under AddressSanitizer, which may count a masked access as a full one. GCC 12 warns
// inside its own AVX-512 unpack intrinsics, on their `_mm512_undefined_*()` placeholders: a
// known false positive, silenced for this function only.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
inline void row_to_hwc(const uint8_t* src, int64_t lds, int64_t w, int64_t C, uint8_t* dst) {
  struct Idx {  // vpermb: [4 channels][16 pixels] -> [16 pixels][4 channels]
    alignas(64) uint8_t b[64];
    Idx() {
      for (int p = 0; p < 16; ++p)
        for (int c = 0; c < 4; ++c) b[4 * p + c] = static_cast<uint8_t>(16 * c + p);
    }
  };
  static const Idx idx;
  const __m512i vi = _mm512_load_si512(idx.b);
  const __mmask64 mw = w >= 64 ? ~uint64_t{0} : (uint64_t{1} << w) - 1;
  const int64_t nseg = (w + 15) / 16;
  for (int64_t sl = 0; sl < C / 16; ++sl) {
    __m512i v[4][4];  // [channel group][segment]: [16 pixels][4 channels]
    for (int g = 0; g < 4; ++g) {
      const uint8_t* r = src + (16 * sl + 4 * g) * lds;
      const __m512i r0 = _mm512_maskz_loadu_epi8(mw, r), r1 = _mm512_maskz_loadu_epi8(mw, r + lds);
      const __m512i r2 = _mm512_maskz_loadu_epi8(mw, r + 2 * lds), r3 = _mm512_maskz_loadu_epi8(mw, r + 3 * lds);
      const __m512i a = _mm512_shuffle_i32x4(r0, r1, 0x44), b = _mm512_shuffle_i32x4(r2, r3, 0x44);
      const __m512i c = _mm512_shuffle_i32x4(r0, r1, 0xEE), d = _mm512_shuffle_i32x4(r2, r3, 0xEE);
      v[g][0] = _mm512_permutexvar_epi8(vi, _mm512_shuffle_i32x4(a, b, 0x88));  // lane i: channel 4g + i
      v[g][1] = _mm512_permutexvar_epi8(vi, _mm512_shuffle_i32x4(a, b, 0xDD));
      v[g][2] = _mm512_permutexvar_epi8(vi, _mm512_shuffle_i32x4(c, d, 0x88));
      v[g][3] = _mm512_permutexvar_epi8(vi, _mm512_shuffle_i32x4(c, d, 0xDD));
    }
    for (int64_t sg = 0; sg < nseg; ++sg) {
      // lane q of o[i]: pixel 4q + i of the segment, 16 channels
      const __m512i t0 = _mm512_unpacklo_epi32(v[0][sg], v[1][sg]), t1 = _mm512_unpackhi_epi32(v[0][sg], v[1][sg]);
      const __m512i t2 = _mm512_unpacklo_epi32(v[2][sg], v[3][sg]), t3 = _mm512_unpackhi_epi32(v[2][sg], v[3][sg]);
      const __m512i o0 = _mm512_unpacklo_epi64(t0, t2), o1 = _mm512_unpackhi_epi64(t0, t2);
      const __m512i o2 = _mm512_unpacklo_epi64(t1, t3), o3 = _mm512_unpackhi_epi64(t1, t3);
      const __m512i u0 = _mm512_shuffle_i32x4(o0, o1, 0x44), u1 = _mm512_shuffle_i32x4(o2, o3, 0x44);
      const __m512i u2 = _mm512_shuffle_i32x4(o0, o1, 0xEE), u3 = _mm512_shuffle_i32x4(o2, o3, 0xEE);
      const __m512i out[4] = {_mm512_shuffle_i32x4(u0, u1, 0x88), _mm512_shuffle_i32x4(u0, u1, 0xDD),
                              _mm512_shuffle_i32x4(u2, u3, 0x88), _mm512_shuffle_i32x4(u2, u3, 0xDD)};
      for (int k = 0; k < 4; ++k) {  // pixels p0 .. p0 + 3
        const int64_t p0 = 16 * sg + 4 * k, n = std::min<int64_t>(4, w - p0);
        if (n <= 0) break;
        if (C == 16) {
          _mm512_mask_storeu_epi8(dst + p0 * 16, n == 4 ? ~uint64_t{0} : (uint64_t{1} << (16 * n)) - 1, out[k]);
        } else {
          alignas(64) uint8_t buf[64];
          _mm512_store_si512(buf, out[k]);
          for (int64_t i = 0; i < n; ++i) std::memcpy(dst + (p0 + i) * C + 16 * sl, buf + 16 * i, 16);
        }
      }
    }
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

}  // namespace fqt::kernels
