// Transpose of 4-byte elements (float, int32) for layout changes (NCHW <-> rows, HWC -> CHW,
// [P, Cout] -> [Cout, P]): dst[c][r] = src[r][c]. Pure data movement (bit-exact); 8x8 AVX tiles
// where the CPU has them (the float load/store intrinsics may alias any type and move bits
// unchanged), plain loops for the edges and elsewhere.
#pragma once

#include <cstdint>

#if defined(__SSE2__)  // (AVX implies it)
#include <immintrin.h>
#endif

namespace fqt::kernels {

#if defined(__AVX__)
// One 8x8 tile: rows of src (stride lds) become columns of dst (stride ldd).
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  const __m256 r0 = _mm256_loadu_ps(src + 0 * lds), r1 = _mm256_loadu_ps(src + 1 * lds);
  const __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
  const __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
  const __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

// src [rows, cols] (row stride lds) -> dst [cols, rows] (row stride ldd). T: float or int32.
template <typename T>
inline void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  static_assert(sizeof(T) == 4, "transpose moves 4-byte elements");
  int64_t r0 = 0;
#if defined(__AVX__)
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8)
      transpose8x8(reinterpret_cast<const float*>(src + r0 * lds + c0), lds, reinterpret_cast<float*>(dst + c0 * ldd + r0), ldd);
    for (int64_t c = c0; c < cols; ++c)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[c * ldd + r] = src[r * lds + c];
  }
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
  auto row = [&](int64_t r, int64_t c) { return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + r * lds + c)); };
  auto store2 = [&](__m128i v, int64_t c, int64_t r) {  // columns c, c + 1 (8 rows each)
    v = _mm_xor_si128(v, f);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + c * ldd + r), v);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (c + 1) * ldd + r), _mm_srli_si128(v, 8));
  };
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t c0 = 0;
    for (; c0 + 8 <= cols; c0 += 8) {
      const __m128i a0 = _mm_unpacklo_epi8(row(r0 + 0, c0), row(r0 + 1, c0));
      const __m128i a1 = _mm_unpacklo_epi8(row(r0 + 2, c0), row(r0 + 3, c0));
      const __m128i a2 = _mm_unpacklo_epi8(row(r0 + 4, c0), row(r0 + 5, c0));
      const __m128i a3 = _mm_unpacklo_epi8(row(r0 + 6, c0), row(r0 + 7, c0));
      const __m128i b0 = _mm_unpacklo_epi16(a0, a1), b1 = _mm_unpackhi_epi16(a0, a1);
      const __m128i b2 = _mm_unpacklo_epi16(a2, a3), b3 = _mm_unpackhi_epi16(a2, a3);
      store2(_mm_unpacklo_epi32(b0, b2), c0 + 0, r0);
      store2(_mm_unpackhi_epi32(b0, b2), c0 + 2, r0);
      store2(_mm_unpacklo_epi32(b1, b3), c0 + 4, r0);
      store2(_mm_unpackhi_epi32(b1, b3), c0 + 6, r0);
    }
    for (int64_t c = c0; c < cols; ++c)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[c * ldd + r] = src[r * lds + c] ^ flip;
  }
#endif
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c] ^ flip;
}

}  // namespace fqt::kernels
