// libFuzzer target: the NumPy .npy reader (versions 1.0-3.0, f4/f8, both byte orders, C and
// Fortran order).
#include "fqt/npy.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  fqt_fuzz::expect_clean([&] { (void)fqt::parse_npy(bytes, "fuzz.npy"); });
  return 0;
}
