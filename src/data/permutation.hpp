// Internal: Philox-driven Fisher-Yates permutation shared by the loader and synthetic data.
#pragma once

#include "fqt/rng.hpp"

#include <cstddef>
#include <cstdint>
#include <numeric>
#include <vector>

namespace fqt::data_detail {

// A uniformly random permutation of [0, n), a pure function of (key, n).
// Step i (from n-1 down to 1) swaps element i with j = floor(u * (i + 1)), u the 32-bit word
// `i` of the Philox stream (Lemire's multiply-shift; its bias is < n / 2^32, negligible here).
inline std::vector<int64_t> philox_permutation(RngKey key, int64_t n) {
  std::vector<int64_t> p(static_cast<std::size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  uint32_t w[4];
  uint64_t have_block = UINT64_MAX;
  for (int64_t i = n - 1; i > 0; --i) {
    uint64_t block = static_cast<uint64_t>(i) >> 2;
    if (block != have_block) {
      philox_block(key, block, w);
      have_block = block;
    }
    uint64_t j = (static_cast<uint64_t>(w[i & 3]) * static_cast<uint64_t>(i + 1)) >> 32;
    std::swap(p[i], p[j]);
  }
  return p;
}

}  // namespace fqt::data_detail
