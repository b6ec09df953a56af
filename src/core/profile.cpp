#include "fqt/profile.hpp"

namespace fqt::profile {

namespace detail {
std::atomic<bool> g_enabled{false};
std::atomic<int64_t> g_ns[kCount];
void add(Category c, int64_t ns) { g_ns[c].fetch_add(ns, std::memory_order_relaxed); }
}  // namespace detail

const char* category_name(int c) {
  static const char* names[] = {"quantize", "dequantize", "gemm_f32", "gemm_int"};
  return c >= 0 && c < kCount ? names[c] : "?";
}
void enable(bool on) { detail::g_enabled.store(on); }
bool enabled() { return detail::g_enabled.load(); }
void reset() {
  for (auto& a : detail::g_ns) a.store(0);
}
double seconds(Category c) { return detail::g_ns[c].load() * 1e-9; }

}  // namespace fqt::profile
