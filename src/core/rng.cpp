#include "fqt/rng.hpp"

#include <cmath>

namespace fqt {

float normal_at(RngKey key, uint64_t index) {
  // Element i uses block i/2: words (0,1) for even i, (2,3) for odd i.
  uint32_t w[4];
  philox_block(key, index >> 1, w);
  int o = static_cast<int>(index & 1) * 2;
  // u1 in (0, 1] so that log is finite; u2 in [0, 1).
  double u1 = (static_cast<double>(w[o]) + 1.0) / 4294967296.0;
  double u2 = static_cast<double>(w[o + 1]) / 4294967296.0;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

}  // namespace fqt
