#include "fqt/profile.hpp"

#include <map>
#include <mutex>

namespace fqt::profile {

namespace detail {
std::atomic<bool> g_enabled{false};
// One cache line of counters per thread slot: the scopes close thousands of times per step on
// every thread (one per sample and GEMM), and one shared counter per category made each close a
// contended atomic add (`detail::add` 0.4-0.9% of a 2-thread FQT step in perf). Threads take
// slots round robin; two threads sharing a slot (more than kSlots threads) still add atomically.
constexpr int kSlots = 64;
struct alignas(64) Slot {
  std::atomic<int64_t> ns[kCount];
};
Slot g_slots[kSlots];
std::atomic<int> g_next_slot{0};
std::atomic<bool> g_regions{false};
std::mutex g_region_mu;
std::map<std::string, int64_t>& region_ns() {
  static std::map<std::string, int64_t> m;
  return m;
}
std::map<std::string, int64_t>& phase_ns() {
  static std::map<std::string, int64_t> m;
  return m;
}
void add(Category c, int64_t ns) {
  thread_local const int slot = g_next_slot.fetch_add(1, std::memory_order_relaxed) % kSlots;
  g_slots[slot].ns[c].fetch_add(ns, std::memory_order_relaxed);
}
}  // namespace detail

const char* category_name(int c) {
  static const char* names[] = {"quantize", "dequantize", "gemm_f32", "gemm_int"};
  return c >= 0 && c < kCount ? names[c] : "?";
}
void enable(bool on) { detail::g_enabled.store(on); }
bool enabled() { return detail::g_enabled.load(); }
void reset() {
  for (auto& s : detail::g_slots)
    for (auto& a : s.ns) a.store(0);
  std::lock_guard<std::mutex> lock(detail::g_region_mu);
  detail::region_ns().clear();
  detail::phase_ns().clear();
}
double seconds(Category c) {
  int64_t ns = 0;
  for (const auto& s : detail::g_slots) ns += s.ns[c].load();
  return ns * 1e-9;
}

void enable_regions(bool on) { detail::g_regions.store(on); }
void add_region(const std::string& name, int64_t ns) {
  std::lock_guard<std::mutex> lock(detail::g_region_mu);
  detail::region_ns()[name] += ns;
}
namespace {
// A map's entries in seconds, read under the regions' lock.
std::vector<std::pair<std::string, double>> seconds_of(const std::map<std::string, int64_t>& m) {
  std::lock_guard<std::mutex> lock(detail::g_region_mu);
  std::vector<std::pair<std::string, double>> out;
  for (const auto& [name, ns] : m) out.emplace_back(name, ns * 1e-9);
  return out;
}
}  // namespace
std::vector<std::pair<std::string, double>> region_seconds() { return seconds_of(detail::region_ns()); }

void add_phase(const char* name, int64_t ns) {
  std::lock_guard<std::mutex> lock(detail::g_region_mu);
  detail::phase_ns()[name] += ns;
}
std::vector<std::pair<std::string, double>> phase_seconds() { return seconds_of(detail::phase_ns()); }

}  // namespace fqt::profile
