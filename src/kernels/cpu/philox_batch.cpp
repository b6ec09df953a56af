#include "philox_batch.hpp"

#include "philox_avx512.hpp"

#include <algorithm>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fqt::kernels {

namespace {
void fill_scalar(RngKey key, uint64_t block0, int64_t nblocks, float* out) {
  for (int64_t j = 0; j < nblocks; ++j) {
    uint32_t w[4];
    philox_block(key, block0 + static_cast<uint64_t>(j), w);
    for (int k = 0; k < 4; ++k) out[4 * j + k] = bits_to_uniform(w[k]);
  }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// 8 lanes of 32-bit a * m: low and high halves.
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
#endif
}  // namespace

// GCC 12 warns inside its own AVX-512 intrinsics here (their `_mm512_undefined_epi32()`
// placeholder, `__m512i __Y = __Y;`, seen as maybe-uninitialized once inlined into the lambda):
// a known false positive of that header, silenced for this function only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
void fill_uniforms(RngKey key, uint64_t block0, int64_t nblocks, float* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  using namespace philox512;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // Four sets of 16 blocks go through the rounds together (philox512::rounds), and each set's
  // 4 x 16 words are put in block order in registers (they went through a scalar loop over a
  // staging array before: 64 loads and stores per 16 blocks).
  constexpr int S = 4;
  auto run = [&](int64_t j0, int sets) {
    __m512i c0[S], c1[S], c2[S], c3[S];
    blocks<S>(key, block0 + static_cast<uint64_t>(j0), 16, lane, 15, c0, c1, c2, c3);  // (unused sets: never stored)
    for (int q = 0; q < sets; ++q) {
      const __m512 v0 = to_uniform(c0[q]), v1 = to_uniform(c1[q]), v2 = to_uniform(c2[q]), v3 = to_uniform(c3[q]);
      // [word][block] -> [block][word]: within each 128-bit lane as in the AVX2 path (e: blocks
      // 0, 4, 8, 12 in lanes 0-3; f: 1, 5, 9, 13; g: 2, 6, ..; h: 3, 7, ..), then the 4 x 4
      // transpose of the 128-bit lanes.
      const __m512 a = _mm512_unpacklo_ps(v0, v1), b = _mm512_unpackhi_ps(v0, v1);
      const __m512 c = _mm512_unpacklo_ps(v2, v3), d = _mm512_unpackhi_ps(v2, v3);
      const __m512 e = _mm512_shuffle_ps(a, c, 0x44), f = _mm512_shuffle_ps(a, c, 0xEE);
      const __m512 g = _mm512_shuffle_ps(b, d, 0x44), h = _mm512_shuffle_ps(b, d, 0xEE);
      const __m512 t0 = _mm512_shuffle_f32x4(e, f, 0x44), t1 = _mm512_shuffle_f32x4(g, h, 0x44);
      const __m512 t2 = _mm512_shuffle_f32x4(e, f, 0xEE), t3 = _mm512_shuffle_f32x4(g, h, 0xEE);
      float* o = out + 4 * (j0 + 16 * q);
      _mm512_storeu_ps(o + 0, _mm512_shuffle_f32x4(t0, t1, 0x88));   // blocks 0-3
      _mm512_storeu_ps(o + 16, _mm512_shuffle_f32x4(t0, t1, 0xDD));  // blocks 4-7
      _mm512_storeu_ps(o + 32, _mm512_shuffle_f32x4(t2, t3, 0x88));  // blocks 8-11
      _mm512_storeu_ps(o + 48, _mm512_shuffle_f32x4(t2, t3, 0xDD));  // blocks 12-15
    }
  };
  for (int sets; (sets = static_cast<int>(std::min<int64_t>(S, (nblocks - j) / 16))) > 0; j += 16 * sets) run(j, sets);
#elif defined(__AVX2__)
  // The same rounds on 8 lanes (CPUs without AVX-512): bit-identical to philox_block. Two sets of
  // 8 blocks go through the rounds together (the rounds of one set are a dependency chain of
  // multiplies; two chains fill the pipeline), and each set's 4 x 8 words are transposed into
  // block order in registers.
  const __m256i M0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i M1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i s_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(key.stream)));
  const __m256i s_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(key.stream >> 32)));
  const __m256i sign = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256 inv = _mm256_set1_ps(1.0f / 16777216.0f);
  constexpr int S = 2;  // sets of 8 blocks per iteration
  auto run = [&](int64_t j0, int sets) {
    __m256i c0[S], c1[S], c2[S], c3[S];
    for (int q = sets; q < S; ++q) c0[q] = c1[q] = c2[q] = c3[q] = _mm256_setzero_si256();  // unused set
    for (int q = 0; q < sets; ++q) {
      const uint64_t b = block0 + static_cast<uint64_t>(j0 + 8 * q);
      const __m256i blo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(b)));
      c0[q] = _mm256_add_epi32(blo, lane);
      // Unsigned c0 < blo (the carry into the high word): compare with the sign bits flipped.
      const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(blo, sign), _mm256_xor_si256(c0[q], sign));
      c1[q] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(b >> 32))), carry);
      c2[q] = s_lo, c3[q] = s_hi;
    }
    uint32_t k0 = static_cast<uint32_t>(key.seed), k1 = static_cast<uint32_t>(key.seed >> 32);
    for (int r = 0; r < 10; ++r) {
      const __m256i K0 = _mm256_set1_epi32(static_cast<int>(k0)), K1 = _mm256_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 2
      for (int q = 0; q < S; ++q) {
        __m256i hi0, lo0, hi1, lo1;
        mulhilo8(c0[q], M0, hi0, lo0);
        mulhilo8(c2[q], M1, hi1, lo1);
        const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[q]), K0);
        const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[q]), K1);
        c0[q] = n0, c1[q] = lo1, c2[q] = n2, c3[q] = lo0;
      }
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int q = 0; q < sets; ++q) {
      auto uni = [&](__m256i w) { return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), inv); };
      const __m256 v0 = uni(c0[q]), v1 = uni(c1[q]), v2 = uni(c2[q]), v3 = uni(c3[q]);
      // [word][block] -> [block][word]
      const __m256 a = _mm256_unpacklo_ps(v0, v1), b = _mm256_unpackhi_ps(v0, v1);
      const __m256 c = _mm256_unpacklo_ps(v2, v3), d = _mm256_unpackhi_ps(v2, v3);
      const __m256 e = _mm256_shuffle_ps(a, c, 0x44), f = _mm256_shuffle_ps(a, c, 0xEE);  // blocks 0|4, 1|5
      const __m256 g = _mm256_shuffle_ps(b, d, 0x44), h = _mm256_shuffle_ps(b, d, 0xEE);  // blocks 2|6, 3|7
      float* o = out + 4 * (j0 + 8 * q);
      _mm256_storeu_ps(o + 0, _mm256_permute2f128_ps(e, f, 0x20));
      _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(g, h, 0x20));
      _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(e, f, 0x31));
      _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(g, h, 0x31));
    }
  };
  for (; j + 8 * S <= nblocks; j += 8 * S) run(j, S);
  for (; j + 8 <= nblocks; j += 8) run(j, 1);
#endif
  fill_scalar(key, block0 + static_cast<uint64_t>(j), nblocks - j, out + 4 * j);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

}  // namespace fqt::kernels
