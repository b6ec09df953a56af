// Internal: many Philox4x32-10 uniforms at once (the stochastic-rounding hot loop).
// fill_uniforms(key, block0, nblocks, out) writes out[4*j + w] = bits_to_uniform(word w of block
// block0 + j), i.e. exactly uniform_at(key, 4*(block0 + j) + w), for j < nblocks. With AVX-512 it
// runs 16 blocks per vector (the 32x32->64 products on even/odd lanes), with AVX2 8; otherwise
// plain loops.
// Bit-identical either way: tests/unit/test_core.cpp compares it with uniform_at.
#pragma once

#include "fqt/rng.hpp"

#include <cstdint>

namespace fqt::kernels {
void fill_uniforms(RngKey key, uint64_t block0, int64_t nblocks, float* out);
}  // namespace fqt::kernels
