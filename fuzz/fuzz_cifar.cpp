// libFuzzer target: the CIFAR-10 binary reader (records of 1 label byte + 3072 pixel bytes).
#include "fqt/data.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  fqt_fuzz::expect_clean([&] { (void)fqt::parse_cifar10(bytes, "fuzz_batch.bin"); });
  return 0;
}
