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
#include <string>
#include <utility>
#include <vector>

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

// Named regions: wall time per layer call and its phases (`fqt bench step --breakdown`), e.g.
// "conv 16->16 3x3 s1: forward". Opened by the layers on the calling (main) thread; they do not
// overlap (a batch norm's backward region starts after its recomputed input's), so a step's
// regions add up to at most the step. Off by default: a RegionScope then costs one relaxed load
// and builds no name.
void enable_regions(bool on);
void add_region(const std::string& name, int64_t ns);
std::vector<std::pair<std::string, double>> region_seconds();  // by name; cleared by reset()

namespace detail {
extern std::atomic<bool> g_regions;
}  // namespace detail

class RegionScope {
 public:
  // name() is called only when regions are on.
  template <class Name>
  explicit RegionScope(Name&& name) : on_(detail::g_regions.load(std::memory_order_relaxed)) {
    if (on_) name_ = name(), t0_ = std::chrono::steady_clock::now();
  }
  ~RegionScope() { close(); }
  void close() {  // end the region early (idempotent)
    if (!on_) return;
    on_ = false;
    add_region(name_, std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0_).count());
  }
  RegionScope(const RegionScope&) = delete;
  RegionScope& operator=(const RegionScope&) = delete;

 private:
  bool on_;
  std::string name_;
  std::chrono::steady_clock::time_point t0_;
};

// Phases: named steps inside a region, e.g. the parts of BHQ's quantizer or of its dgrad, timed
// on the calling thread around their parallel passes (`fqt bench step --breakdown` lists them
// apart: they lie inside the regions and are not added to them). `name` is a string literal.
// On and off with the regions; when off a PhaseScope costs one relaxed load.
void add_phase(const char* name, int64_t ns);
std::vector<std::pair<std::string, double>> phase_seconds();  // by name; cleared by reset()

class PhaseScope {
 public:
  explicit PhaseScope(const char* name) : name_(name), on_(detail::g_regions.load(std::memory_order_relaxed)) {
    if (on_) t0_ = std::chrono::steady_clock::now();
  }
  ~PhaseScope() { next(nullptr); }
  // Ends this phase and, with a name, starts the next one at the same instant.
  void next(const char* name) {
    if (!on_) return;
    const auto t = std::chrono::steady_clock::now();
    add_phase(name_, std::chrono::duration_cast<std::chrono::nanoseconds>(t - t0_).count());
    name_ = name, t0_ = t, on_ = name != nullptr;
  }
  PhaseScope(const PhaseScope&) = delete;
  PhaseScope& operator=(const PhaseScope&) = delete;

 private:
  const char* name_;
  bool on_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace fqt::profile
