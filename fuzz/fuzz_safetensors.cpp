// libFuzzer target: the safetensors reader (checkpoints and weight files), and the checkpoint
// metadata layer on top of it when the file parses.
#include "fqt/checkpoint.hpp"
#include "fuzz_common.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  fqt_fuzz::expect_clean([&] {
    fqt::SafeTensors st = fqt::parse_safetensors(bytes, "fuzz.safetensors");
    // Whatever parsed must serialize again (names, metadata strings, shapes round-trip).
    fqt::NamedTensors named(st.tensors.begin(), st.tensors.end());
    fqt::NamedI64Tensors named64(st.int64s.begin(), st.int64s.end());
    (void)fqt::serialize_safetensors(named, st.metadata, named64);
  });
  return 0;
}
