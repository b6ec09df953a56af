// One table of corrupt inputs for every reader of files fqt did not write: IDX images and
// labels (raw and gzip), CIFAR-10 batches, .npy arrays, safetensors files, checkpoint metadata
// and run configurations. Each row is a truncation at some offset, a wrong magic number, a
// dimension product that would overflow a size computation, or a negative / absurd header
// value; each must be rejected with fqt::InputError (exit status 2 in the CLI) whose message
// names the file and contains the expected phrase. Also: every prefix of each valid file is
// rejected, never crashes, and never throws anything but InputError.
#include "fqt/checkpoint.hpp"
#include "fqt/data.hpp"
#include "fqt/npy.hpp"
#include "fqt/train.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace fqt {
namespace {

std::string be32(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
}
std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}
std::string filler(size_t n, int mod = 256) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>((i * 7 + 3) % mod);
  return s;
}

// ---- valid files, the starting points of the corruptions -----------------------------------
std::string idx_images(uint32_t n, uint32_t h, uint32_t w) {
  return be32(0x803) + be32(n) + be32(h) + be32(w) + filler(size_t{n} * h * w);
}
std::string idx_labels(uint32_t n) { return be32(0x801) + be32(n) + filler(n, 10); }
std::string cifar(int records) {
  std::string s;
  for (int r = 0; r < records; ++r) s += static_cast<char>(r % 10) + filler(3072);
  return s;
}
std::string npy_v1(const std::string& dict, const std::string& data) {
  std::string h = dict;
  while ((10 + h.size() + 1) % 64) h += ' ';
  h += '\n';
  return std::string("\x93NUMPY\x01\x00", 8) + static_cast<char>(h.size() & 0xff) + static_cast<char>(h.size() >> 8) +
         h + data;
}
std::string npy_f4(const std::string& shape, size_t numel) {
  return npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }", filler(4 * numel));
}
std::string safetensors(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}
std::string st_one(const std::string& dtype, const std::string& shape, const std::string& offsets, size_t data) {
  return safetensors(R"({"w":{"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}}",
                     filler(data));
}

// ---- the readers, by name ------------------------------------------------------------------
const char* kName = "corrupt.bin";

void parse(const std::string& reader, const std::string& bytes) {
  if (reader == "idx-images") (void)parse_idx_images(bytes, kName);
  else if (reader == "idx-labels") (void)parse_idx_labels(bytes, kName, 10);
  else if (reader == "idx-gz") (void)parse_idx_images(gunzip_if_gzip(bytes, kName, size_t{1} << 20), kName);
  else if (reader == "idx-pair") (void)parse_idx_pair(bytes, idx_labels(2), "pair", 10, kName, "labels");
  else if (reader == "cifar") (void)parse_cifar10(bytes, kName);
  else if (reader == "npy") (void)parse_npy(bytes, kName);
  else if (reader == "safetensors") (void)parse_safetensors(bytes, kName);
  else if (reader == "config") (void)TrainConfig::from_json(bytes);
  else FAIL() << "unknown reader " << reader;
}

struct Case {
  const char* reader;
  const char* what;
  std::string bytes;
  const char* expect;  // a phrase of the message
};

std::vector<Case> cases() {
  const std::string img = idx_images(2, 3, 4);
  const std::string gz = gzip_compress(img);
  const std::string npy = npy_f4("(2, 3)", 6);
  const std::string st = st_one("F32", "[2,3]", "[0,24]", 24);
  std::string bad_gz_crc = gz;
  bad_gz_crc[bad_gz_crc.size() - 6] ^= 0x55;  // inside the CRC32 trailer
  std::string bad_deflate = gz;
  bad_deflate[10] = '\xff';  // first deflate block: reserved block type 3
  return {
      // IDX images: truncations at several offsets
      {"idx-images", "empty file", "", "truncated: 0 bytes"},
      {"idx-images", "cut inside the magic", img.substr(0, 3), "truncated: 3 bytes"},
      {"idx-images", "cut inside the dims", img.substr(0, 9), "truncated inside the header: 9 bytes"},
      {"idx-images", "cut after the header", img.substr(0, 16), "needs 24 data bytes but the file has 0"},
      {"idx-images", "cut inside the data", img.substr(0, 30), "needs 24 data bytes but the file has 14"},
      {"idx-images", "one byte short", img.substr(0, img.size() - 1), "needs 24 data bytes but the file has 23"},
      {"idx-images", "trailing garbage", img + "xy", "2 unexpected trailing bytes"},
      // wrong magic
      {"idx-images", "labels file as images", idx_labels(3), "are the images and labels files swapped"},
      {"idx-images", "text file", "hello, world, this is text", "not an IDX file"},
      {"idx-images", "int32 element type", be32(0x0c03) + img.substr(4), "only unsigned bytes"},
      {"idx-images", "still gzip", gz, "still gzip-compressed"},
      // huge / absurd dims
      {"idx-images", "dims product overflows 64 bits", be32(0x803) + be32(0xffffffff) + be32(0xffffffff) + be32(0xffffffff),
       "their product overflows"},
      {"idx-images", "dims product 2^48 with no data", be32(0x803) + be32(0x10000) + be32(0x10000) + be32(0x10000),
       "needs 281474976710656 data bytes"},
      {"idx-images", "zero images", be32(0x803) + be32(0) + be32(28) + be32(28), "dimension 0 is zero"},
      {"idx-images", "image 1 x 100000 pixels", be32(0x803) + be32(1) + be32(1) + be32(100000) + filler(100000),
       "implausible"},
      // IDX labels
      {"idx-labels", "cut inside the count", idx_labels(4).substr(0, 6), "truncated inside the header: 6 bytes"},
      {"idx-labels", "cut inside the data", idx_labels(4).substr(0, 10), "needs 4 data bytes but the file has 2"},
      {"idx-labels", "images file as labels", img, "are the images and labels files swapped"},
      {"idx-labels", "label 200 of 10 classes", be32(0x801) + be32(2) + "\x01\xc8", "label 200 at index 1 is out of range"},
      {"idx-labels", "count 2^32-1, no data", be32(0x801) + be32(0xffffffff), "needs 4294967295 data bytes"},
      // gzip layer
      {"idx-gz", "gzip cut in half", gz.substr(0, gz.size() / 2), "truncated gzip file"},
      {"idx-gz", "gzip cut before the trailer", gz.substr(0, gz.size() - 4), "truncated gzip file"},
      {"idx-gz", "gzip CRC wrong", bad_gz_crc, "corrupt gzip data"},
      {"idx-gz", "bad deflate block", bad_deflate, "corrupt gzip data"},
      {"idx-gz", "garbage after the member", gz + "garbage", "bytes of garbage after the gzip stream"},
      {"idx-gz", "gzip bomb over the cap", gzip_compress(std::string((size_t{1} << 20) + 1, '\0')),
       "inflates to more than 1048576 bytes"},
      {"idx-pair", "3 images, 2 labels", idx_images(3, 2, 2), "3 images but labels has 2 labels"},
      // CIFAR-10
      {"cifar", "empty file", "", "empty file"},
      {"cifar", "cut inside the first record", cifar(1).substr(0, 100), "not a multiple of the 3073-byte"},
      {"cifar", "cut inside the second record", cifar(2).substr(0, 3073 + 1), "1 whole records + 1 bytes"},
      {"cifar", "one byte too many", cifar(2) + "x", "2 whole records + 1 bytes"},
      {"cifar", "label 10 (CIFAR-100?)", std::string(1, '\x0a') + filler(3072), "label 10 of record 0 is out of range"},
      {"cifar", "label 255 in record 2", cifar(2) + std::string(1, '\xff') + filler(3072), "label 255 of record 2"},
      // .npy: truncations
      {"npy", "empty file", "", "missing the \\x93NUMPY magic"},
      {"npy", "cut inside the magic", npy.substr(0, 4), "missing the \\x93NUMPY magic"},
      {"npy", "cut inside the header", npy.substr(0, 40), "header of 118 bytes runs past the end of the 40-byte file"},
      {"npy", "cut inside the data", npy.substr(0, npy.size() - 5), "needs more data than the file holds"},
      {"npy", "one float too many", npy + "abcd", "needs 24 data bytes, the file has 28"},
      // wrong magic / version / dtype
      {"npy", "wrong magic", "\x93NUMPZ" + npy.substr(6), "missing the \\x93NUMPY magic"},
      {"npy", ".npz (zip) archive", "PK\x03\x04" + npy.substr(4), ".npz archives are not supported"},
      {"npy", "version 9.0", npy.substr(0, 6) + "\x09" + npy.substr(7), "unsupported format version 9.0"},
      {"npy", "dtype int64", npy_v1("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", filler(16)),
       "dtype '<i8' is not supported"},
      {"npy", "object array", npy_v1("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", filler(16)),
       "dtype '|O' is not supported"},
      {"npy", "header not a dict", npy_v1("descr <f4 shape 2", filler(8)), "not a Python dict literal"},
      {"npy", "no shape", npy_v1("{'descr': '<f4', 'fortran_order': False, }", filler(8)), "no 'shape' entry"},
      {"npy", "fortran_order maybe", npy_v1("{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,), }", filler(8)),
       "fortran_order is 'Maybe'"},
      {"npy", "unterminated shape", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3}", ""),
       "unterminated shape tuple"},
      // negative / absurd / overflowing shapes
      {"npy", "negative dimension", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }", filler(24)),
       "not a tuple of non-negative integers"},
      {"npy", "dimension past int64", npy_v1("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", ""),
       "is too large"},
      {"npy", "dims product overflows", npy_f4("(4294967296, 4294967296, 4294967296)", 0),
       "needs more data than the file holds"},
      {"npy", "2^62 elements, 24 bytes of data", npy_f4("(4611686018427387904,)", 6), "needs more data than the file holds"},
      {"npy", "9 dimensions", npy_f4("(1, 1, 1, 1, 1, 1, 1, 1, 1)", 1), "more than 8 dimensions"},
      {"npy", "v2 header length 4 GiB",
       std::string("\x93NUMPY\x02\x00", 8) + "\xff\xff\xff\xff" + "{'descr': '<f4'}", "runs past the end"},
      // safetensors: truncations
      {"safetensors", "empty file", "", "file is only 0 bytes"},
      {"safetensors", "cut inside the length", st.substr(0, 5), "file is only 5 bytes"},
      {"safetensors", "cut inside the header", st.substr(0, 20), "runs past the end of the 20-byte file"},
      {"safetensors", "cut inside the data", st.substr(0, st.size() - 1), "run past the 23-byte data buffer"},
      {"safetensors", "data left over", st + "zz", "belong to no tensor"},
      // wrong "magic" (header length / JSON)
      {"safetensors", "header length 2^63", le64(uint64_t{1} << 63) + st.substr(8), "is absurd"},
      {"safetensors", "header length -1", le64(~uint64_t{0}) + st.substr(8), "is absurd"},
      {"safetensors", "a .npy file", npy, "is absurd"},
      {"safetensors", "header not JSON", safetensors("{not json}", ""), "not valid JSON"},
      // Found by fuzz_safetensors: nlohmann::json throws out_of_range (not parse_error) for a
      // number beyond double range; it used to escape as an internal error (exit status 1).
      {"safetensors", "number 1e999 in the header", safetensors(R"({"__metadata__":{"a":"b"},"x":1e999})", ""),
       "header is not valid JSON"},
      {"safetensors", "header a JSON list", safetensors("[1,2,3]", ""), "does not start with '{'"},
      {"safetensors", "duplicate tensor name",
       safetensors(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                   "ab"),
       "names 'w' twice"},
      // dtypes
      {"safetensors", "dtype F16", st_one("F16", "[2,3]", "[0,12]", 12), "dtype F16, which fqt does not read"},
      {"safetensors", "dtype Q4", st_one("Q4", "[2,3]", "[0,12]", 12), "unknown dtype 'Q4'"},
      {"safetensors", "dtype a number", safetensors(R"({"w":{"dtype":32,"shape":[2],"data_offsets":[0,8]}})", filler(8)),
       "dtype is not a string"},
      // shapes and offsets: negative, absurd, overflowing
      {"safetensors", "negative dimension", st_one("F32", "[-2,3]", "[0,24]", 24), "not a list of non-negative integers"},
      {"safetensors", "fractional dimension", st_one("F32", "[2.5,3]", "[0,24]", 24), "not a list of non-negative integers"},
      {"safetensors", "dims product overflows", st_one("F32", "[4294967296,4294967296,4294967296]", "[0,24]", 24),
       "more elements than can be addressed"},
      {"safetensors", "numel x 4 overflows", st_one("F32", "[4611686018427387904]", "[0,24]", 24),
       "more elements than can be addressed"},
      {"safetensors", "shape/offsets disagree", st_one("F32", "[2,2]", "[0,24]", 24), "hold 24 bytes but shape [2, 2]"},
      {"safetensors", "negative offset", st_one("F32", "[2,3]", "[-8,16]", 24), "not a pair of non-negative integers"},
      {"safetensors", "offsets reversed", st_one("F32", "[2,3]", "[24,0]", 24), "end before they begin"},
      {"safetensors", "offset 2^64-1", st_one("F32", "[2,3]", "[0,18446744073709551615]", 24), "run past the"},
      {"safetensors", "three offsets", st_one("F32", "[2,3]", "[0,12,24]", 24), "not a pair"},
      {"safetensors", "overlapping tensors",
       safetensors(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}})",
                   "abc"),
       "overlap"},
      {"safetensors", "metadata not strings", safetensors(R"({"__metadata__":{"epoch":3}})", ""), "is not a string"},
      // run configuration (config.json / the checkpoint's fqt.config)
      {"config", "not JSON", "{model: cnn", "not valid JSON"},
      {"config", "missing keys", R"({"model": "cnn"})", "incomplete or has a wrong type"},
      {"config", "epochs a string", R"({"model":"cnn","data":"synthetic","mode":"fqt","epochs":"ten"})",
       "incomplete or has a wrong type"},
  };
}

std::string message_of(const Case& c) {
  try {
    parse(c.reader, c.bytes);
  } catch (const InputError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not an InputError> ") + e.what();
  }
  return "<accepted>";
}

}  // namespace

TEST(corruptInputs, EveryRowIsRejectedWithItsMessage) {
  int n = 0;
  for (const Case& c : cases()) {
    SCOPED_TRACE(std::string(c.reader) + ": " + c.what);
    const std::string msg = message_of(c);
    EXPECT_NE(msg.find(c.expect), std::string::npos) << "message: " << msg << "\nexpected to contain: " << c.expect;
    // One line, naming the file (the run configuration has no file name of its own).
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    if (std::string(c.reader) != "config") {
      EXPECT_EQ(msg.rfind(kName, 0), 0u) << msg;
    }
    ++n;
  }
  EXPECT_GE(n, 70);
}

// Every prefix of every valid file (truncation at each offset) is an InputError, never a crash
// or another exception; the complete file parses.
TEST(corruptInputs, EveryTruncationOfAValidFileIsAnInputError) {
  const std::vector<std::pair<const char*, std::string>> valid = {
      {"idx-images", idx_images(2, 3, 4)},
      {"idx-labels", idx_labels(5)},
      {"idx-gz", gzip_compress(idx_images(2, 3, 4))},
      {"cifar", cifar(2)},
      {"npy", npy_f4("(2, 3)", 6)},
      {"npy", npy_v1("{'descr': '>f8', 'fortran_order': True, 'shape': (3, 2), }", filler(48))},
      {"safetensors", st_one("F32", "[2,3]", "[0,24]", 24)},
      {"safetensors", safetensors(R"({"__metadata__":{"k":"v"},"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},)"
                                  R"("b":{"dtype":"U8","shape":[],"data_offsets":[16,17]}})",
                                  filler(17))},
  };
  for (const auto& [reader, bytes] : valid) {
    SCOPED_TRACE(reader);
    EXPECT_NO_THROW(parse(reader, bytes));
    size_t step = bytes.size() > 800 ? 37 : 1;  // CIFAR: every 37th offset
    for (size_t cut = 0; cut < bytes.size(); cut += step) {
      const std::string msg = message_of({reader, "prefix", bytes.substr(0, cut), ""});
      EXPECT_EQ(msg.find("<"), std::string::npos) << reader << " cut at " << cut << ": " << msg;
    }
  }
}

// Checkpoint metadata: a well-formed safetensors file whose fqt.* values are wrong.
TEST(corruptInputs, CheckpointMetadataValues) {
  const std::string dir = ::testing::TempDir();
  const std::map<std::string, std::string> good = {
      {"fqt.format", "fqt-checkpoint"}, {"fqt.version", "1"}, {"fqt.epoch", "1"}, {"fqt.step", "10"},
      {"fqt.seed", "0"},  {"fqt.config", "{}"}};
  struct Row {
    const char* key;
    const char* value;  // nullptr: remove the key
    const char* expect;
  };
  const std::vector<Row> rows = {
      {"fqt.format", "something-else", "not an fqt checkpoint"},
      {"fqt.version", "99", "version"},
      {"fqt.version", nullptr, "no 'fqt.version'"},
      {"fqt.step", "-5", "fqt.step = -5 is impossible"},
      {"fqt.epoch", "11", "fqt.epoch = 11, fqt.step = 10 is impossible"},
      {"fqt.step", "12abc", "'fqt.step' is '12abc', not an integer"},
      {"fqt.epoch", "99999999999999999999999", "not an integer"},
  };
  for (const Row& r : rows) {
    SCOPED_TRACE(std::string(r.key) + "=" + (r.value ? r.value : "<missing>"));
    auto meta = good;
    if (r.value) meta[r.key] = r.value;
    else meta.erase(r.key);
    const std::string path = dir + "/corrupt_meta.safetensors";
    write_safetensors(path, {{"param/w", Tensor::zeros({2}, DType::f32)}}, meta);
    std::string msg = "<accepted>";
    try {
      (void)read_checkpoint_state(path);
    } catch (const InputError& e) {
      msg = e.what();
    }
    EXPECT_NE(msg.find(r.expect), std::string::npos) << msg;
    EXPECT_EQ(msg.rfind(path, 0), 0u) << msg;
    std::remove(path.c_str());
  }
}

}  // namespace fqt
