#include "fqt/stats.hpp"

#include <cmath>

namespace fqt {

SynthKind parse_synth_kind(const std::string& name) {
  if (name == "gaussian") return SynthKind::gaussian;
  if (name == "uniform") return SynthKind::uniform;
  if (name == "heavy-tailed") return SynthKind::heavy_tailed;
  throw InputError(fmt::format("unknown matrix kind '{}' (valid: gaussian, uniform, heavy-tailed)", name));
}

Tensor synthetic_matrix(SynthKind kind, int64_t rows, int64_t cols, uint64_t seed) {
  Tensor t = Tensor::empty({rows, cols});
  float* p = t.data<float>();
  const RngKey elems{seed, 0x5157'0001}, row_key{seed, 0x5157'0002};
  for (int64_t r = 0; r < rows; ++r) {
    const float row_scale = kind == SynthKind::heavy_tailed ? std::exp(2.0f * normal_at(row_key, r)) : 1.0f;
    for (int64_t c = 0; c < cols; ++c) {
      const uint64_t i = static_cast<uint64_t>(r * cols + c);
      p[r * cols + c] = kind == SynthKind::uniform ? 2.0f * uniform_at(elems, i) - 1.0f
                                                   : row_scale * normal_at(elems, i);
    }
  }
  return t;
}

}  // namespace fqt
