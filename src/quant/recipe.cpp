#include "fqt/recipe.hpp"

#include <fmt/format.h>

namespace fqt {

Mode parse_mode(const std::string& name) {
  if (name == "fp32") return Mode::fp32;
  if (name == "qat") return Mode::qat;
  if (name == "fqt") return Mode::fqt;
  throw InputError(fmt::format("unknown mode '{}' (valid: fp32, qat, fqt)", name));
}

Arith parse_arith(const std::string& name) {
  if (name == "int" || name == "integer") return Arith::integer;
  if (name == "sim") return Arith::sim;
  throw InputError(fmt::format("unknown arithmetic '{}' (valid: int, sim)", name));
}

const char* arith_name(Arith a) { return a == Arith::integer ? "int" : "sim"; }

GradRows parse_grad_rows(const std::string& name) {
  if (name == "pixel") return GradRows::pixel;
  if (name == "sample") return GradRows::sample;
  throw InputError(fmt::format("unknown dgrad rows '{}' (valid: pixel, sample)", name));
}

const char* grad_rows_name(GradRows r) { return r == GradRows::pixel ? "pixel" : "sample"; }

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::fp32: return "fp32";
    case Mode::qat: return "qat";
    case Mode::fqt: return "fqt";
  }
  return "?";
}

std::string recipe_summary(const Recipe& r) {
  if (r.mode == Mode::fp32) return "mode fp32";
  std::string s = fmt::format("mode {} ({}): act {} {}, weight {} {}", mode_name(r.mode), arith_name(r.arith),
                              traits(r.activation.kind).name, r.activation.bits, traits(r.weight.kind).name, r.weight.bits);
  if (r.mode == Mode::fqt) {
    s += r.exact_dgrad ? std::string(", dgrad exact") : fmt::format(", dgrad {} {}{}", traits(r.dgrad.kind).name, r.dgrad.bits,
                                                                      r.dgrad_rows == GradRows::sample ? " per sample" : "");
    s += r.exact_wgrad ? std::string(", wgrad exact") : fmt::format(", wgrad {} {}", traits(r.wgrad.kind).name, r.wgrad.bits);
  }
  return s;
}

}  // namespace fqt
