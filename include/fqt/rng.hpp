// fqt/rng.hpp — counter-based random numbers (Philox4x32-10, Salmon et al. SC'11).
//
// Every random number in fqt is a pure function of (seed, stream, element index): no state is
// carried between calls, so results never depend on thread count, chunking or device.
// Mapping: key = seed (2 x 32 bits); counter = (index / 4 as 64 bits, stream as 64 bits);
// element `index` takes 32-bit word index % 4 of that block. The same mapping is used by the
// CUDA kernels, so CPU and GPU draw identical numbers.
#pragma once

#include <array>
#include <cstdint>

#if defined(__CUDACC__)
#define FQT_HD __host__ __device__ __forceinline__
#else
#define FQT_HD inline
#endif

namespace fqt {

struct RngKey {
  uint64_t seed = 0;
  uint64_t stream = 0;  // one stream per (tensor, step, role): see quant.hpp
};

namespace philox_detail {
FQT_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}
}  // namespace philox_detail

// One Philox4x32-10 block: 4 x 32 random bits for counter c under key k.
FQT_HD void philox4x32_10(const uint32_t c_in[4], const uint32_t k_in[2], uint32_t out[4]) {
  uint32_t c0 = c_in[0], c1 = c_in[1], c2 = c_in[2], c3 = c_in[3];
  uint32_t k0 = k_in[0], k1 = k_in[1];
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_detail::mulhilo(0xD2511F53u, c0, hi0, lo0);
    philox_detail::mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// The 4 words of block `block` (elements 4*block .. 4*block+3) for a key.
FQT_HD void philox_block(RngKey key, uint64_t block, uint32_t out[4]) {
  const uint32_t c[4] = {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                         static_cast<uint32_t>(key.stream), static_cast<uint32_t>(key.stream >> 32)};
  const uint32_t k[2] = {static_cast<uint32_t>(key.seed), static_cast<uint32_t>(key.seed >> 32)};
  philox4x32_10(c, k, out);
}

// 32 random bits -> float uniform in [0, 1) with 24 bits of resolution (exact in fp32).
FQT_HD float bits_to_uniform(uint32_t x) { return static_cast<float>(x >> 8) * (1.0f / 16777216.0f); }

// The uniform number of element `index` under `key`.
FQT_HD float uniform_at(RngKey key, uint64_t index) {
  uint32_t w[4];
  philox_block(key, index >> 2, w);
  return bits_to_uniform(w[index & 3]);
}

// Standard normal for element `index` (Box-Muller on words 0,1 / 2,3 of the block): used for
// initialisation and synthetic data, not on the quantization path.
float normal_at(RngKey key, uint64_t index);

}  // namespace fqt
