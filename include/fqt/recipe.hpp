// fqt/recipe.hpp — which quantizer and bit width each role of a layer uses (SPEC section 1).
//
//   role        GEMM                         default
//   activation  fprop operand X              zero-aligned (per tensor), 8 bits, nearest
//   weight      fprop/dgrad operand W        symmetric (per tensor), 8 bits, nearest
//   dgrad       dX = Q(G) W                  psq, 8 bits, stochastic      (fqt mode only)
//   wgrad       dW = Q(G)^T X                ptq, 8 bits, stochastic      (fqt mode only)
//
// Modes: fp32 (no quantization), qat (forward quantized, backward exact on the quantized
// operands), fqt (qat + both gradient GEMMs on independently drawn stochastic quantizations).
//
// Arithmetic of the quantized GEMMs (SPEC section 4): `integer` multiplies the 8-bit codes
// (u8 x s8 -> s32, include/fqt/igemm.hpp) and applies scales/offsets afterwards; `sim`
// dequantizes and multiplies in fp32. Same codes, same random numbers: the two agree to fp32
// rounding. Integer is the default; fp32 mode ignores it.
//
// Why these forward grids: both must factor out of all three GEMMs. The activation grid has 0 as
// an exact code, so convolution padding can be written as codes (im2col runs on 8-bit codes).
// The weight grid is per tensor because the dgrad GEMM (G W) reduces over W's output channels:
// a per-output-channel weight scale would sit inside that sum. Per-channel weights
// (symmetric-row) still work: fprop runs on integers, dgrad then falls back to an fp32 GEMM on
// the dequantized operands.
#pragma once

#include "fqt/quant.hpp"

#include <string>

namespace fqt {

enum class Mode : uint8_t { fp32, qat, fqt };
Mode parse_mode(const std::string& name);
const char* mode_name(Mode m);

enum class Arith : uint8_t { integer, sim };
Arith parse_arith(const std::string& name);  // "int" or "sim"
const char* arith_name(Arith a);             // "int" / "sim"

// What a row of a convolution's dgrad operand G is, for the row-wise gradient quantizers (PSQ's
// one grid per row, BHQ's transform across rows). SPEC section 2 quantizes "per row of G" without
// saying which matrix a convolution's G is:
//   pixel   fqt's default: G in the im2col GEMM's layout [(N*H*W), C], a row per output
//           position of each sample (each position gets its own grid: the finest, lowest variance)
//   sample  the paper's code (its Preconditioner views grad_output as [N, C*H*W]): a row per
//           sample, so PSQ has N grids and BHQ's Householder groups mix whole samples
// Linear layers' rows are samples either way. Per-tensor and per-column quantizers ignore it.
enum class GradRows : uint8_t { pixel, sample };
GradRows parse_grad_rows(const std::string& name);  // "pixel" or "sample"
const char* grad_rows_name(GradRows r);

struct Recipe {
  Mode mode = Mode::fp32;
  QuantizerSpec activation{QuantizerKind::zero_aligned, 8};
  QuantizerSpec weight{QuantizerKind::symmetric, 8};
  QuantizerSpec dgrad{QuantizerKind::psq, 8};
  QuantizerSpec wgrad{QuantizerKind::ptq, 8};
  Arith arith = Arith::integer;
  GradRows dgrad_rows = GradRows::pixel;  // fqt mode, Conv2d's dgrad quantizer only
  // fqt mode only: compute dgrad exactly as in qat mode (fp32 GEMM of the unquantized G with the
  // quantized W; `dgrad` is ignored) while wgrad stays quantized. The "wgrad-only floor" of
  // `fqt variance` (variance.hpp): the variance the wgrad quantizers alone add.
  bool exact_dgrad = false;
  // fqt mode only: compute wgrad exactly as in qat mode (fp32 GEMM of the unquantized G with the
  // quantized activations; `wgrad` is ignored) while dgrad stays quantized: `fqt variance
  // --wgrad exact` measures the variance the dgrad quantizers alone add.
  bool exact_wgrad = false;
};

// One line for logs: "mode fqt (int): act zero-aligned 8, weight symmetric 8, dgrad bhq 5, wgrad ptq 8"
// ("dgrad exact" / "wgrad exact" with exact_dgrad / exact_wgrad; "dgrad bhq 5 per sample" with dgrad_rows = sample).
std::string recipe_summary(const Recipe& r);

// Random-number streams for the two gradient quantizations of one layer at one step: two
// independent draws (the "bifurcated" gradient). Stream = step * 2^20 + layer * 4 + role.
enum class GradRole : uint8_t { dgrad = 1, wgrad = 2 };
inline RngKey grad_key(uint64_t seed, uint64_t step, uint32_t layer, GradRole role) {
  return RngKey{seed, (step << 20) | (static_cast<uint64_t>(layer & 0x3ffff) << 2) | static_cast<uint64_t>(role)};
}

}  // namespace fqt
