// Internal: Philox4x32-10 on 16 counters per AVX-512 vector, in registers. Used by fill_uniforms
// (philox_batch.cpp: consecutive blocks, stored in element order) and by the stochastic rounding
// kernels that take the words straight from registers (quantize_pair_nchw's channel-major pass,
// quantize.cpp). Bit-identical to philox_block (include/fqt/rng.hpp): tests/unit/test_core.cpp.
// Only with AVX-512F; callers guard their use.
#pragma once

#include "fqt/rng.hpp"

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace fqt::kernels::philox512 {

// 16 lanes of 32-bit a * m: low and high halves.
// The halves are put in place by masked 32-bit swaps within each 64-bit lane (one instruction
// each, where a shift and a blend took two).
[[gnu::always_inline]] inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                                   // lanes 0,2,..: 64-bit products
  const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(a, _MM_PERM_CDAB), m);  // lanes 1,3,..
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);  // odd lanes: odd's low words
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);  // even lanes: even's high words
}

// The counter words of 16 blocks: lane i holds block `base + off[i]` (off[i] < 2^32, e.g. i or
// i * stride): c0 its low word, c1 its high word (with the carry of the low addition), c2 / c3 the
// key's stream.
[[gnu::always_inline]] inline void counters(RngKey key, uint64_t base, __m512i off, __m512i& c0, __m512i& c1,
                                            __m512i& c2, __m512i& c3) {
  const __m512i blo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
  c0 = _mm512_add_epi32(blo, off);
  const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, blo);
  const __m512i bhi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
  c1 = _mm512_mask_add_epi32(bhi, carry, bhi, _mm512_set1_epi32(1));
  c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(key.stream)));
  c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(key.stream >> 32)));
}

// The ten rounds on S sets of 16 blocks together, in place: one set's rounds are a dependency
// chain of multiplies, more chains fill the pipeline (fill_uniforms, 1 thread: 2 sets 0.436 ms,
// 3 sets 0.367, 4 sets 0.345, 6 sets 0.38 with spills). Afterwards c_w[q] = word w of set q's blocks.
// kUnroll: the ten rounds unrolled (no register rotation between rounds). bench_quantizers, 1
// thread: the NCHW pair pass 1.32 -> 1.25 ms with it, but fill_uniforms 0.34 -> 0.53 ms.
// rounds<S, kUnroll, R>(k0, k1, ...): the last R rounds, k0 / k1 the first of them's key words.
template <int S, bool kUnroll = false, int R = 10>
[[gnu::always_inline]] inline void rounds(uint32_t k0, uint32_t k1, __m512i (&c0)[S], __m512i (&c1)[S], __m512i (&c2)[S],
                                          __m512i (&c3)[S]) {
  const __m512i M0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i M1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  auto round = [&] [[gnu::always_inline]] {
    const __m512i K0 = _mm512_set1_epi32(static_cast<int>(k0)), K1 = _mm512_set1_epi32(static_cast<int>(k1));
#pragma GCC unroll 4
    for (int q = 0; q < S; ++q) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0[q], M0, hi0, lo0);
      mulhilo16(c2[q], M1, hi1, lo1);
      const __m512i n0 = _mm512_ternarylogic_epi32(hi1, c1[q], K0, 0x96);  // hi1 ^ c1 ^ K0 in one op
      const __m512i n2 = _mm512_ternarylogic_epi32(hi0, c3[q], K1, 0x96);
      c0[q] = n0, c1[q] = lo1, c2[q] = n2, c3[q] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  };
  if constexpr (kUnroll) {
#pragma GCC unroll 10
    for (int r = 0; r < R; ++r) round();
  } else {
    for (int r = 0; r < R; ++r) round();
  }
}

template <int S, bool kUnroll = false>
[[gnu::always_inline]] inline void rounds(RngKey key, __m512i (&c0)[S], __m512i (&c1)[S], __m512i (&c2)[S],
                                          __m512i (&c3)[S]) {
  rounds<S, kUnroll, 10>(static_cast<uint32_t>(key.seed), static_cast<uint32_t>(key.seed >> 32), c0, c1, c2, c3);
}

// counters() + rounds() for S sets of 16 blocks: lane i of set q holds block base + q * set_stride
// + off[i] (0 <= off[i] <= off_max). Where no lane's low word carries into the high word (all but
// 1 in 2^32 / 64 calls), words 1-3 of the counter are the same in every lane, and so are the
// inputs of one of the two multiplies in rounds 1 and 2 (round 1: c2, the stream; round 2: c0 =
// hi(M1 c2) ^ c1 ^ k0): those are computed once as scalars, 2 of the 20 16-lane multiply pairs
// fewer. Same words as philox_block. The rounds as fill_uniforms runs them, 1 thread
// (docs/profiles/philox_rounds.cpp): 0.205 -> 0.184 ns a uniform. Not in Nchw16::draw: inlined into the
// per-sample quantizer's loop, the per-sample BHQ pass took 0.8 ms a step longer (3 alternated
// breakdowns, session 27; the call to the carry path inside that loop, or the larger body, not
// told apart). The carry path is out of line so that callers inline one copy of the rounds.
// (GCC 12 warns inside its own AVX-512 intrinsics in this out-of-line copy: the placeholder
// `__m512i __Y = __Y;` of `_mm512_undefined_epi32()` seen as uninitialized, a false positive of that
// header, as in philox_batch.cpp's fill_uniforms.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
template <int S>
[[gnu::noinline]] void blocks_carrying(RngKey key, uint64_t base, uint64_t set_stride, __m512i off, __m512i (&c0)[S],
                                       __m512i (&c1)[S], __m512i (&c2)[S], __m512i (&c3)[S]) {
  for (int q = 0; q < S; ++q) counters(key, base + q * set_stride, off, c0[q], c1[q], c2[q], c3[q]);
  rounds<S>(key, c0, c1, c2, c3);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <int S, bool kUnroll = false>
[[gnu::always_inline]] inline void blocks(RngKey key, uint64_t base, uint64_t set_stride, __m512i off, uint32_t off_max,
                                          __m512i (&c0)[S], __m512i (&c1)[S], __m512i (&c2)[S], __m512i (&c3)[S]) {
  const uint64_t last = base + (S - 1) * set_stride + off_max;
  if ((base >> 32) != (last >> 32) || last < base) [[unlikely]] {  // a carry somewhere: the general rounds
    blocks_carrying<S>(key, base, set_stride, off, c0, c1, c2, c3);
    return;
  }
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  const uint32_t hi = static_cast<uint32_t>(base >> 32);
  const uint32_t s0 = static_cast<uint32_t>(key.stream), s1 = static_cast<uint32_t>(key.stream >> 32);
  uint32_t k0 = static_cast<uint32_t>(key.seed), k1 = static_cast<uint32_t>(key.seed >> 32);
  const __m512i M0 = _mm512_set1_epi32(static_cast<int>(kM0)), M1 = _mm512_set1_epi32(static_cast<int>(kM1));
  auto set1 = [](uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); };
  // Round 1: c0 varies; c1 = hi, c2 = s0, c3 = s1 do not.
  const uint64_t p1 = static_cast<uint64_t>(kM1) * s0;
  const uint32_t r1c0 = static_cast<uint32_t>(p1 >> 32) ^ hi ^ k0, r1c1 = static_cast<uint32_t>(p1);
  const __m512i K1a = set1(s1 ^ k1);
  k0 += kW0, k1 += kW1;
  // Round 2: c0 (r1c0) and c1 (r1c1) do not vary; c2 = hi(M0 c0) ^ s1 ^ k1 and c3 = lo(M0 c0) do.
  const uint64_t p0 = static_cast<uint64_t>(kM0) * r1c0;
  const __m512i K0b = set1(r1c1 ^ k0), H0b = set1(static_cast<uint32_t>(p0 >> 32) ^ k1);
  const __m512i L0b = set1(static_cast<uint32_t>(p0));
  k0 += kW0, k1 += kW1;
#pragma GCC unroll 4
  for (int q = 0; q < S; ++q) {
    __m512i hi0, lo0, hi1, lo1;
    const __m512i x0 = _mm512_add_epi32(set1(static_cast<uint32_t>(base + q * set_stride)), off);
    mulhilo16(x0, M0, hi0, lo0);                        // round 1
    const __m512i r1c2 = _mm512_xor_si512(hi0, K1a);  // hi0 ^ s1 ^ k1
    mulhilo16(r1c2, M1, hi1, lo1);                      // round 2
    c0[q] = _mm512_xor_si512(hi1, K0b);                 // hi1 ^ c1 ^ k0
    c1[q] = lo1;
    c2[q] = _mm512_xor_si512(lo0, H0b);                 // hi(M0 c0) ^ c3 ^ k1, c3 = lo0 of round 1
    c3[q] = L0b;
  }
  rounds<S, kUnroll, 8>(k0, k1, c0, c1, c2, c3);
}

// bits_to_uniform on 16 words.
[[gnu::always_inline]] inline __m512 to_uniform(__m512i w) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)), _mm512_set1_ps(1.0f / 16777216.0f));
}

}  // namespace fqt::kernels::philox512
#endif
