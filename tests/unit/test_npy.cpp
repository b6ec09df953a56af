// .npy reader: valid files of both dtypes and byte orders load; malformed ones are rejected.
#include "fqt/npy.hpp"

#include "fqt/checkpoint.hpp"  // the write fault hook
#include "fqt/error.hpp"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>

#include <unistd.h>

using namespace fqt;

namespace {
// A .npy image with the given header dict and raw data bytes (format 1.0, padded to 64).
std::string npy_bytes(const std::string& dict, const std::string& data, int version = 1) {
  std::string h = dict;
  const size_t pre = version == 1 ? 10 : 12;
  while ((pre + h.size() + 1) % 64) h += ' ';
  h += '\n';
  std::string out = "\x93NUMPY";
  out += static_cast<char>(version);
  out += '\0';
  if (version == 1) {
    out += static_cast<char>(h.size() & 0xff);
    out += static_cast<char>(h.size() >> 8);
  } else {
    for (int i = 0; i < 4; ++i) out += static_cast<char>((h.size() >> (8 * i)) & 0xff);
  }
  return out + h + data;
}
template <typename T> std::string raw(std::vector<T> v, bool big_endian) {
  std::string s(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  if (big_endian)
    for (size_t i = 0; i < v.size(); ++i) std::reverse(s.begin() + i * sizeof(T), s.begin() + (i + 1) * sizeof(T));
  return s;
}
}  // namespace

TEST(Npy, LoadsBothDtypesAndByteOrders) {
  for (bool be : {false, true}) {
    std::string d32 = npy_bytes(fmt::format("{{'descr': '{}f4', 'fortran_order': False, 'shape': (2, 3), }}", be ? '>' : '<'),
                                raw<float>({1, 2, 3, 4, 5, -6.5f}, be));
    Tensor a = parse_npy(d32, "a.npy");
    ASSERT_EQ(a.dtype(), DType::f32);
    ASSERT_EQ(a.shape(), (Shape{2, 3}));
    EXPECT_EQ(a.data<float>()[5], -6.5f);
    std::string d64 = npy_bytes(fmt::format("{{'descr': '{}f8', 'fortran_order': False, 'shape': (3, 1), }}", be ? '>' : '<'),
                                raw<double>({0.25, -1e300, 7}, be), 2);
    Tensor b = parse_npy(d64, "b.npy");
    ASSERT_EQ(b.dtype(), DType::f64);
    EXPECT_EQ(b.data<double>()[1], -1e300);
  }
}

TEST(Npy, FortranOrderIsTransposedIntoRowMajor) {
  // Column-major [[1, 2, 3], [4, 5, 6]] is stored 1 4 2 5 3 6.
  Tensor a = parse_npy(npy_bytes("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", raw<float>({1, 4, 2, 5, 3, 6}, false)), "f");
  for (int i = 0; i < 6; ++i) EXPECT_EQ(a.data<float>()[i], float(i + 1));
}

TEST(Npy, WriteThenReadRoundTrips) {
  auto path = (std::filesystem::temp_directory_path() / ("fqt_test_roundtrip_" + std::to_string(::getpid()) + ".npy")).string();
  Tensor a = Tensor::from<float>({2, 2}, {1.5f, -2, 3, 1e-30f});
  write_npy(path, a);
  Tensor b = read_npy(path);
  ASSERT_EQ(b.shape(), a.shape());
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0);
  std::remove(path.c_str());
}

// write_npy is atomic like the checkpoints: a write that fails part way (the disk-full hook)
// leaves the previous file byte for byte and no temporary file in the folder.
TEST(Npy, FailedWriteKeepsThePreviousFile) {
  const auto dir = std::filesystem::temp_directory_path() / ("fqt_test_npy_fault_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string path = (dir / "a.npy").string();
  write_npy(path, Tensor::from<float>({2, 2}, {1, 2, 3, 4}));
  const Tensor before = read_npy(path);
  for (int64_t after : {0, 9, 70, 130}) {
    detail::set_write_fault_for_testing(after);
    try {
      write_npy(path, Tensor::from<float>({2, 3}, {5, 6, 7, 8, 9, 10}));
      ADD_FAILURE() << "fault after " << after << " bytes did not fire";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find("unchanged"), std::string::npos) << e.what();
    }
    const Tensor now = read_npy(path);
    ASSERT_EQ(now.shape(), before.shape());
    EXPECT_EQ(std::memcmp(now.raw(), before.raw(), before.nbytes()), 0);
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(dir)) names.push_back(e.path().filename().string());
    EXPECT_EQ(names, std::vector<std::string>{"a.npy"}) << "temporary file left behind";
  }
  write_npy(path, Tensor::from<float>({2, 3}, {5, 6, 7, 8, 9, 10}));  // the hook is one-shot
  EXPECT_EQ(read_npy(path).shape(), (std::vector<int64_t>{2, 3}));
  std::filesystem::remove_all(dir);
}

TEST(Npy, MalformedFilesAreRejectedWithAMessage) {
  const std::string good = npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }", raw<float>({1, 2, 3, 4}, false));
  struct Case { std::string name, bytes, expect; };
  std::vector<Case> cases = {
      {"empty file", "", "magic"},
      {"wrong magic", "\x93NUMPX" + good.substr(6), "magic"},
      {"truncated in magic", good.substr(0, 5), "magic"},
      {"truncated in header", good.substr(0, 40), "header"},
      {"truncated in data", good.substr(0, good.size() - 3), "truncated"},
      {"extra data", good + "xxxx", "needs 16 data bytes"},
      {"bad version", std::string("\x93NUMPY\x07\x00", 8) + good.substr(8), "version"},
      {"int dtype", npy_bytes("{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }", raw<int>({1}, false)), "float32 or float64"},
      {"no shape", npy_bytes("{'descr': '<f4', 'fortran_order': False, }", raw<float>({1}, false)), "shape"},
      {"negative dim", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 2), }", ""), "non-negative"},
      {"huge dims overflow", npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 4294967296), }", raw<double>({1}, false)), "more data"},
      {"bad fortran flag", npy_bytes("{'descr': '<f4', 'fortran_order': maybe, 'shape': (1,), }", raw<float>({1}, false)), "fortran_order"},
      {"not a dict", npy_bytes("descr <f4", ""), "dict"},
      {"unterminated shape", npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1, }", ""), "shape"},
  };
  for (const auto& c : cases) {
    try {
      parse_npy(c.bytes, "bad.npy");
      ADD_FAILURE() << c.name << ": accepted";
    } catch (const InputError& e) {
      std::string m = e.what();
      EXPECT_NE(m.find("bad.npy"), std::string::npos) << c.name << ": " << m;
      EXPECT_NE(m.find(c.expect), std::string::npos) << c.name << ": " << m;
    }
  }
  EXPECT_THROW(read_npy("/nonexistent/dir/x.npy"), InputError);
}
