// libFuzzer target: the IDX readers (MNIST / Fashion-MNIST) and the gzip layer under them.
// The first byte selects the entry point, the rest is the file:
//   0: parse_idx_images    1: parse_idx_labels (10 classes)    2: gunzip_if_gzip + images
//   3: parse_idx_pair, the rest split in two halves at the position given by the next byte
#include "fqt/data.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const int which = data[0] % 4;
  const std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  fqt_fuzz::expect_clean([&] {
    switch (which) {
      case 0: (void)fqt::parse_idx_images(bytes, "fuzz.idx3"); break;
      case 1: (void)fqt::parse_idx_labels(bytes, "fuzz.idx1", 10); break;
      case 2:
        // A small output cap keeps gzip bombs inside libFuzzer's memory limit; the cap is
        // itself a checked error path.
        (void)fqt::parse_idx_images(fqt::gunzip_if_gzip(bytes, "fuzz.idx3.gz", size_t{64} << 20), "fuzz.idx3.gz");
        break;
      case 3: {
        if (bytes.empty()) return;
        const size_t cut = bytes.size() > 1 ? (static_cast<uint8_t>(bytes[0]) * (bytes.size() - 1)) / 255 + 1 : 1;
        (void)fqt::parse_idx_pair(bytes.substr(1, cut - 1), bytes.substr(cut), "fuzz");
        break;
      }
    }
  });
  return 0;
}
