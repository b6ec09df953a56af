// fqt/profile.hpp — where the time of a training step goes, for benchmarks.
//
// Scoped timers around the quantizers and the GEMMs add wall time to per-category counters.
// Off by default (one relaxed atomic load per scope); `fqt bench` switches it on. Nested scopes
// of the same category are not double counted only if callers avoid nesting them — quantize()
// and dequantize() are leaves.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace fqt::profile {

enum Category : int { quantize = 0, dequantize, gemm_f32, gemm_int, kCount };
const char* category_name(int c);

void enable(bool on);
bool enabled();
void reset();
double seconds(Category c);

namespace detail {
extern std::atomic<bool> g_enabled;
void add(Category c, int64_t ns);
}  // namespace detail

class Scope {
 public:
  explicit Scope(Category c) : c_(c), on_(detail::g_enabled.load(std::memory_order_relaxed)) {
    if (on_) t0_ = std::chrono::steady_clock::now();
  }
  ~Scope() {
    if (on_)
      detail::add(c_, std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0_).count());
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  Category c_;
  bool on_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace fqt::profile
