// Data pipeline: IDX / CIFAR-10 readers (real files and table-driven corrupt inputs),
// synthetic data, and the Loader's determinism, resume and background-thread guarantees.
#include "fqt/data.hpp"
#include "fqt/file.hpp"
#include "fqt/rng.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <tuple>

#include <sys/stat.h>
#include <unistd.h>
#include <map>
#include <set>
#include <thread>
#include <chrono>

namespace fs = std::filesystem;
using namespace fqt;

namespace {

const char* kFashionDir = "/usr/share/datasets/fashion-mnist";

// ---- byte builders ------------------------------------------------------------------------

void put_be32(std::string& s, uint32_t v) {
  for (int sh = 24; sh >= 0; sh -= 8) s.push_back(static_cast<char>((v >> sh) & 0xff));
}

// IDX images file: n images of h x w, pixel (i, y, x) = (i * 7 + y * 3 + x) % 256.
std::string idx_images(uint32_t n, uint32_t h, uint32_t w, uint32_t magic = 0x00000803) {
  std::string s;
  put_be32(s, magic);
  put_be32(s, n);
  put_be32(s, h);
  put_be32(s, w);
  for (uint32_t i = 0; i < n; ++i)
    for (uint32_t y = 0; y < h; ++y)
      for (uint32_t x = 0; x < w; ++x) s.push_back(static_cast<char>((i * 7 + y * 3 + x) % 256));
  return s;
}

// IDX labels file: label i = i % 10 unless overridden.
std::string idx_labels(uint32_t n, uint32_t magic = 0x00000801) {
  std::string s;
  put_be32(s, magic);
  put_be32(s, n);
  for (uint32_t i = 0; i < n; ++i) s.push_back(static_cast<char>(i % 10));
  return s;
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("WRONG EXCEPTION TYPE: ") + e.what();
  }
  return "NO EXCEPTION";
}

// A fresh temporary directory, removed at scope exit.
struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("fqt_test_data_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
};

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << path;
}

bool have_fashion() {
  return fs::exists(std::string(kFashionDir) + "/train-images-idx3-ubyte.gz");
}

// Loaded once: inflating 26 MB dominates the suite's run time.
const Dataset& fashion_train() {
  static Dataset ds = load_fashion_mnist("", true);
  return ds;
}

bool same_tensor(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// All batches of epochs [0, epochs) as produced by next().
std::vector<Batch> run_epochs(Loader& loader, uint64_t first, uint64_t epochs) {
  std::vector<Batch> out;
  for (uint64_t e = first; e < first + epochs; ++e) {
    loader.start_epoch(e);
    Batch b;
    while (loader.next(b)) out.push_back(b);
  }
  return out;
}

void expect_same_batches(const std::vector<Batch>& a, const std::vector<Batch>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].size, b[i].size) << "batch " << i;
    EXPECT_TRUE(same_tensor(a[i].x, b[i].x)) << "batch " << i;
    EXPECT_TRUE(same_tensor(a[i].y, b[i].y)) << "batch " << i;
  }
}

// Dataset whose sample i stores i in its pixels (1x2x2: i % 256, i / 256, 0, 255), label
// i % 7, and mean 0 / std 1 so that x = pixel / 255 can be decoded back to the index.
Dataset indexed_dataset(int64_t n) {
  Dataset ds;
  ds.images = Tensor::empty({n, 1, 2, 2}, DType::u8);
  ds.labels = Tensor::empty({n}, DType::i32);
  for (int64_t i = 0; i < n; ++i) {
    uint8_t* p = ds.images.data<uint8_t>() + i * 4;
    p[0] = static_cast<uint8_t>(i % 256);
    p[1] = static_cast<uint8_t>(i / 256);
    p[2] = 0;
    p[3] = 255;
    ds.labels.data<int32_t>()[i] = static_cast<int32_t>(i % 7);
  }
  ds.num_classes = 7;
  ds.name = "indexed";
  ds.mean = {0.0f};
  ds.stddev = {1.0f};
  return ds;
}

int64_t decode_index(const Batch& b, int64_t j) {
  const float* x = b.x.data<float>() + j * 4;
  return std::lround(x[0] * 255) + 256 * std::lround(x[1] * 255);
}

}  // namespace

// ==== IDX ====================================================================================

TEST(data_idx, RealFashionMnistLoads) {
  if (!have_fashion()) GTEST_SKIP() << "dataset-fashion-mnist not installed";
  const Dataset& train = fashion_train();
  const Dataset test = load_dataset("fashion-mnist", "", false);
  EXPECT_EQ(train.images.shape(), (Shape{60000, 1, 28, 28}));
  EXPECT_EQ(train.labels.shape(), (Shape{60000}));
  EXPECT_EQ(test.images.shape(), (Shape{10000, 1, 28, 28}));
  EXPECT_EQ(test.labels.shape(), (Shape{10000}));
  EXPECT_EQ(train.num_classes, 10);
  EXPECT_EQ(train.name, "fashion-mnist");
  // Fashion-MNIST is exactly balanced: 6000 / 1000 per class.
  for (const auto& [ds, per_class] : {std::pair{&train, 6000}, std::pair{&test, 1000}}) {
    std::map<int, int> count;
    const int32_t* y = ds->labels.data<int32_t>();
    for (int64_t i = 0; i < ds->size(); ++i) {
      ASSERT_GE(y[i], 0);
      ASSERT_LT(y[i], 10);
      ++count[y[i]];
    }
    EXPECT_EQ(count.size(), 10u);
    for (auto [k, c] : count) EXPECT_EQ(c, per_class) << "class " << k;
  }
  // Not all-zero pixels, and the published statistics match the data.
  Normalization nm = compute_normalization(train.images);
  EXPECT_NEAR(nm.mean[0], 0.2860, 5e-4);
  EXPECT_NEAR(nm.stddev[0], 0.3530, 5e-4);
}

TEST(data_idx, ParsesValidBytes) {
  Dataset ds = parse_idx_pair(idx_images(12, 3, 5), idx_labels(12), "tiny");
  ASSERT_EQ(ds.images.shape(), (Shape{12, 1, 3, 5}));
  ASSERT_EQ(ds.labels.shape(), (Shape{12}));
  const uint8_t* x = ds.images.data<uint8_t>();
  for (int i = 0; i < 12; ++i) {
    EXPECT_EQ(ds.labels.data<int32_t>()[i], i % 10);
    for (int y = 0; y < 3; ++y)
      for (int xx = 0; xx < 5; ++xx) ASSERT_EQ(x[(i * 3 + y) * 5 + xx], (i * 7 + y * 3 + xx) % 256);
  }
  // Gzip-compressed bytes parse to the same thing.
  Dataset gz = parse_idx_pair(gzip_compress(idx_images(12, 3, 5)), gzip_compress(idx_labels(12)), "tiny");
  EXPECT_TRUE(same_tensor(ds.images, gz.images));
  EXPECT_TRUE(same_tensor(ds.labels, gz.labels));
}

TEST(data_idx, CorruptInputsAreRejected) {
  const std::string good_img = idx_images(4, 2, 3), good_lab = idx_labels(4);
  auto with_dims = [](uint32_t n, uint32_t h, uint32_t w) {
    std::string s;
    put_be32(s, 0x00000803);
    put_be32(s, n);
    put_be32(s, h);
    put_be32(s, w);
    return s + std::string(64, '\0');
  };
  std::string bad_label = good_lab;
  bad_label[8 + 2] = 10;
  std::string big_label = good_lab;
  big_label[8 + 3] = static_cast<char>(0xff);
  struct Case {
    const char* name;
    std::string images, labels, expect;
  };
  const std::vector<Case> cases = {
      {"wrong image magic", idx_images(4, 2, 3, 0x00000804), good_lab, "images: bad magic number 0x00000804"},
      {"non-IDX image", std::string("\x89PNG\r\n\x1a\n", 8) + std::string(40, 'x'), good_lab, "not an IDX file"},
      {"wrong label magic", good_img, idx_labels(4, 0x00000901), "labels: bad magic number 0x00000901"},
      {"float element type", idx_images(4, 2, 3, 0x00000d03), good_lab, "element type 0x0d"},
      {"files swapped", good_lab, good_img, "swapped"},
      {"empty images", "", good_lab, "images: truncated"},
      {"truncated in magic", good_img.substr(0, 2), good_lab, "images: truncated"},
      {"truncated in dims", good_img.substr(0, 6), good_lab, "truncated inside the header"},
      {"truncated in last dim", good_img.substr(0, 15), good_lab, "truncated inside the header"},
      {"header only", good_img.substr(0, 16), good_lab, "needs 24 data bytes but the file has 0"},
      {"truncated in data", good_img.substr(0, 16 + 5), good_lab, "needs 24 data bytes but the file has 5"},
      {"one byte short", good_img.substr(0, good_img.size() - 1), good_lab, "images: truncated"},
      {"labels truncated", good_img, good_lab.substr(0, 10), "labels: truncated"},
      {"labels header cut", good_img, good_lab.substr(0, 7), "labels: truncated inside the header"},
      {"trailing bytes", good_img + "xyz", good_lab, "3 unexpected trailing bytes"},
      {"dims overflow", with_dims(0xffffffffu, 0xffffffffu, 0xffffffffu), good_lab, "overflows"},
      {"dims overflow 2", with_dims(0x80000000u, 0x80000000u, 4), good_lab, "overflows"},
      {"huge but small file", with_dims(60000, 65536, 65536), good_lab, "images: truncated"},
      {"zero dimension", with_dims(0, 28, 28).substr(0, 16), good_lab, "is zero"},
      {"implausible size", with_dims(1, 1, 100000).substr(0, 16) + std::string(100000, '\0'), idx_labels(1),
       "implausible"},
      {"count mismatch", good_img, idx_labels(5), "4 images but labels has 5 labels"},
      {"label out of range", good_img, bad_label, "labels: label 10 at index 2 is out of range [0, 10)"},
      {"label 255", good_img, big_label, "label 255 at index 3"},
      {"gzip garbage", "\x1f\x8b" + std::string(30, 'z'), good_lab, "images: corrupt gzip"},
  };
  for (const Case& c : cases) {
    std::string msg = message_of([&] { parse_idx_pair(c.images, c.labels, "t"); });
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.name << ": got '" << msg << "'";
    EXPECT_EQ(msg.find('\n'), std::string::npos) << c.name << ": message is not one line";
  }
  // Parsers reached directly must also refuse still-compressed data.
  EXPECT_NE(message_of([&] { parse_idx_images(gzip_compress(good_img), "x"); }).find("gzip-compressed"),
            std::string::npos);
}

TEST(data_idx, RandomMutationsOnlyEverThrowInputError) {
  // A cheap in-test fuzzer: flip, cut or extend valid (and gzipped) files at random; the
  // parsers must either succeed or throw InputError, never crash or throw anything else.
  const std::string img = idx_images(6, 3, 4), lab = idx_labels(6);
  const std::string img_gz = gzip_compress(img), lab_gz = gzip_compress(lab);
  int rejected = 0, accepted = 0;
  for (uint64_t it = 0; it < 3000; ++it) {
    auto rnd = [&](uint64_t k) {
      uint32_t w[4];
      philox_block(RngKey{12345, it}, k, w);
      return w[0];
    };
    const bool gz = it % 2;
    std::string a = gz ? img_gz : img, b = gz ? lab_gz : lab;
    std::string& target = rnd(0) % 2 ? a : b;
    switch (rnd(1) % 3) {
      case 0:  // flip 1-3 bytes
        for (uint32_t k = 0, n = 1 + rnd(2) % 3; k < n; ++k)
          target[rnd(3 + k) % target.size()] ^= static_cast<char>(1 + rnd(10 + k) % 255);
        break;
      case 1:  // cut
        target.resize(rnd(2) % target.size());
        break;
      default:  // extend
        target += std::string(1 + rnd(2) % 8, static_cast<char>(rnd(3)));
    }
    try {
      Dataset ds = parse_idx_pair(a, b, "fuzz");
      ++accepted;
      ASSERT_EQ(ds.images.size(0), ds.labels.size(0));
      for (int64_t i = 0; i < ds.size(); ++i) ASSERT_LT(ds.labels.data<int32_t>()[i], 10);
    } catch (const InputError&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 2000);  // most mutations must be caught...
  EXPECT_GT(accepted, 10);    // ...but pixel flips in raw files are legitimately fine
}

TEST(data_idx, GzipAndRawFiles) {
  TempDir dir;
  const std::string img = idx_images(20, 4, 4), lab = idx_labels(20);
  const std::string gz = gzip_compress(img);
  write_file(dir.file("img.gz"), gz);
  write_file(dir.file("lab.raw"), lab);
  Dataset ds = load_idx_pair(dir.file("img.gz"), dir.file("lab.raw"), "t");
  EXPECT_EQ(ds.images.shape(), (Shape{20, 1, 4, 4}));
  EXPECT_EQ(std::memcmp(ds.images.data<uint8_t>(), img.data() + 16, 320), 0);

  // Concatenated gzip members form one stream (gzip -c a b).
  write_file(dir.file("two.gz"), gzip_compress(img.substr(0, 100)) + gzip_compress(img.substr(100)));
  EXPECT_TRUE(same_tensor(load_idx_pair(dir.file("two.gz"), dir.file("lab.raw"), "t").images, ds.images));

  struct Case {
    const char* name;
    std::string bytes, expect;
  };
  std::string flipped = gz;
  for (size_t i = 12; i < gz.size() - 8; i += 3) flipped[i] = static_cast<char>(flipped[i] ^ 0x5a);
  std::string bad_crc = gz;
  bad_crc[gz.size() - 6] = static_cast<char>(bad_crc[gz.size() - 6] ^ 1);
  const std::vector<Case> cases = {
      {"truncated half", gz.substr(0, gz.size() / 2), "truncated gzip file"},
      {"truncated trailer", gz.substr(0, gz.size() - 4), "truncated gzip file"},
      {"truncated header", gz.substr(0, 5), "truncated gzip file"},
      {"corrupt data", flipped, "corrupt gzip data"},
      {"bad crc", bad_crc, "corrupt gzip data"},
      {"garbage after", gz + "junk", "4 bytes of garbage after the gzip stream"},
      {"gzip of truncated IDX", gzip_compress(img.substr(0, 100)), "truncated: header [20, 4, 4] needs 320"},
  };
  for (const Case& c : cases) {
    write_file(dir.file("bad.gz"), c.bytes);
    std::string msg = message_of([&] { load_idx_pair(dir.file("bad.gz"), dir.file("lab.raw"), "t"); });
    EXPECT_EQ(msg.rfind(dir.file("bad.gz") + ": ", 0), 0u) << c.name << ": message must start with the path: " << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.name << ": got '" << msg << "'";
  }
  // A decompression bomb is bounded.
  EXPECT_NE(message_of([&] { gunzip_if_gzip(gzip_compress(std::string(1 << 20, 'a')), "bomb", 1000); })
                .find("bomb: gzip data inflates to more than 1000 bytes"),
            std::string::npos);
  // Missing file.
  EXPECT_NE(message_of([&] { load_idx_pair(dir.file("nope.gz"), dir.file("lab.raw"), "t"); })
                .find("nope.gz: cannot open (No such file"),
            std::string::npos);
}

TEST(data_idx, TruncatedRealGzip) {
  if (!have_fashion()) GTEST_SKIP() << "dataset-fashion-mnist not installed";
  TempDir dir;
  std::string gz = read_whole_file(std::string(kFashionDir) + "/t10k-labels-idx1-ubyte.gz");
  write_file(dir.file("t10k-labels-idx1-ubyte.gz"), gz.substr(0, gz.size() - 1000));
  write_file(dir.file("t10k-images-idx3-ubyte.gz"), gzip_compress(idx_images(10000, 1, 1)));
  std::string msg = message_of([&] { load_fashion_mnist(dir.path.string(), false); });
  EXPECT_NE(msg.find("t10k-labels-idx1-ubyte.gz: truncated gzip file"), std::string::npos) << msg;
}

TEST(data_idx, StandardNamesRawAndMissing) {
  TempDir dir;
  // Without .gz: raw files under the standard names.
  write_file(dir.file("t10k-images-idx3-ubyte"), idx_images(30, 28, 28));
  write_file(dir.file("t10k-labels-idx1-ubyte"), idx_labels(30));
  Dataset ds = load_mnist(dir.path.string(), false);
  EXPECT_EQ(ds.images.shape(), (Shape{30, 1, 28, 28}));
  EXPECT_EQ(ds.name, "mnist");
  EXPECT_FLOAT_EQ(ds.mean[0], 0.1307f);
  // Train files missing: the message names the file and says how to get it.
  std::string msg = message_of([&] { load_fashion_mnist(dir.path.string(), true); });
  EXPECT_NE(msg.find("train-images-idx3-ubyte.gz: file not found"), std::string::npos) << msg;
  EXPECT_NE(msg.find("dataset-fashion-mnist"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--data-dir"), std::string::npos) << msg;

  // The dataset knows the file its images came from (messages comparing two splits name it).
  EXPECT_EQ(ds.source, dir.file("t10k-images-idx3-ubyte"));

  msg = message_of([&] { read_whole_file(dir.path.string()); });
  EXPECT_NE(msg.find(": is a folder, not a file"), std::string::npos) << msg;

  msg = message_of([&] { load_dataset("imagenet", "", true); });
  EXPECT_NE(msg.find("unknown dataset 'imagenet'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("fashion-mnist, mnist, cifar10"), std::string::npos) << msg;
}

// InputFile, under every reader: pieces in order, a short read named with the counts, and only
// regular files opened (a FIFO without a writer is refused at once instead of blocking).
TEST(File, InputFileReadsPiecesAndNamesAShortRead) {
  TempDir dir;
  write_file(dir.file("ten"), "abcdefghij");
  {
    InputFile f(dir.file("ten"));
    EXPECT_EQ(f.size(), 10u);
    EXPECT_EQ(f.read(3), "abc");
    EXPECT_EQ(f.read(0), "");
    EXPECT_EQ(f.read(4), "defg");
    const std::string msg = message_of([&] { f.read(5); });
    EXPECT_EQ(msg, dir.file("ten") + ": read failed (the file ends after 3 of 5 bytes; was it truncated while read?)");
  }
  {
    InputFile f(dir.file("ten"));
    EXPECT_EQ(f.read(2), "ab");
    EXPECT_EQ(f.read_rest(), "cdefghij");
    EXPECT_EQ(f.read_rest(), "");
  }
  EXPECT_EQ(read_whole_file(dir.file("ten")), "abcdefghij");
  std::string msg = message_of([&] { InputFile f(dir.path.string()); });
  EXPECT_EQ(msg, dir.path.string() + ": is a folder, not a file");
  msg = message_of([&] { InputFile f(dir.file("missing")); });
  EXPECT_EQ(msg.rfind(dir.file("missing") + ": cannot open (", 0), 0u) << msg;
  ASSERT_EQ(::mkfifo(dir.file("fifo").c_str(), 0600), 0);
  msg = message_of([&] { InputFile f(dir.file("fifo")); });
  EXPECT_EQ(msg, dir.file("fifo") + ": not a regular file");
}

// ==== CIFAR-10 ===============================================================================

namespace {
// Record r of file f: label (f * 3 + r) % 10, pixel k = (f * 31 + r * 17 + k) % 256.
std::string cifar_file(int f, int records) {
  std::string s;
  for (int r = 0; r < records; ++r) {
    s.push_back(static_cast<char>((f * 3 + r) % 10));
    for (int k = 0; k < 3072; ++k) s.push_back(static_cast<char>((f * 31 + r * 17 + k) % 256));
  }
  return s;
}
}  // namespace

TEST(data_cifar, FakeFolderLoads) {
  TempDir dir;
  for (int f = 1; f <= 5; ++f) write_file(dir.file(fmt::format("data_batch_{}.bin", f)), cifar_file(f, 5));
  write_file(dir.file("test_batch.bin"), cifar_file(0, 3));
  Dataset train = load_dataset("cifar10", dir.path.string(), true);
  Dataset test = load_cifar10(dir.path.string(), false);
  ASSERT_EQ(train.images.shape(), (Shape{25, 3, 32, 32}));
  ASSERT_EQ(test.images.shape(), (Shape{3, 3, 32, 32}));
  EXPECT_EQ(train.num_classes, 10);
  EXPECT_EQ(train.mean.size(), 3u);
  for (int f = 1; f <= 5; ++f)
    for (int r = 0; r < 5; ++r) {
      int64_t i = (f - 1) * 5 + r;
      ASSERT_EQ(train.labels.data<int32_t>()[i], (f * 3 + r) % 10);
      const uint8_t* p = train.images.data<uint8_t>() + i * 3072;
      // Channel-major: channel 2, row 5, column 7 is byte 2*1024 + 5*32 + 7 of the record.
      for (int k : {0, 1023, 1024, 2 * 1024 + 5 * 32 + 7, 3071}) ASSERT_EQ(p[k], (f * 31 + r * 17 + k) % 256);
    }
  EXPECT_EQ(test.labels.data<int32_t>()[2], 2);
}

TEST(data_cifar, BadFilesRejected) {
  TempDir dir;
  for (int f = 1; f <= 5; ++f) write_file(dir.file(fmt::format("data_batch_{}.bin", f)), cifar_file(f, 5));
  std::string msg = message_of([&] { load_cifar10(dir.path.string(), false); });
  EXPECT_NE(msg.find("test_batch.bin: file not found"), std::string::npos) << msg;

  std::string truncated = cifar_file(3, 5);
  truncated.pop_back();
  write_file(dir.file("data_batch_3.bin"), truncated);
  msg = message_of([&] { load_cifar10(dir.path.string(), true); });
  EXPECT_NE(msg.find("data_batch_3.bin: size 15364 bytes is not a multiple of the 3073-byte"),
            std::string::npos) << msg;

  std::string bad = cifar_file(3, 5);
  bad[2 * 3073] = 10;
  write_file(dir.file("data_batch_3.bin"), bad);
  msg = message_of([&] { load_cifar10(dir.path.string(), true); });
  EXPECT_NE(msg.find("data_batch_3.bin: label 10 of record 2 is out of range"), std::string::npos) << msg;

  EXPECT_NE(message_of([&] { parse_cifar10("", "empty.bin"); }).find("empty.bin: empty file"), std::string::npos);
}

// ==== synthetic ==============================================================================

TEST(data_synthetic, DeterministicBalancedLearnable) {
  Dataset a = synthetic_dataset(400, 2, 6, 6, 4, 7);
  Dataset b = synthetic_dataset(400, 2, 6, 6, 4, 7);
  Dataset c = synthetic_dataset(400, 2, 6, 6, 4, 8);
  EXPECT_EQ(a.images.shape(), (Shape{400, 2, 6, 6}));
  EXPECT_TRUE(same_tensor(a.images, b.images) && same_tensor(a.labels, b.labels));
  EXPECT_FALSE(same_tensor(a.images, c.images));
  std::vector<int> count(4, 0);
  for (int64_t i = 0; i < 400; ++i) ++count[a.labels.data<int32_t>()[i]];
  for (int k = 0; k < 4; ++k) EXPECT_EQ(count[k], 100);
  // Learnable: nearest class mean fitted on the first half classifies the second half.
  const int64_t d = 72;
  std::vector<double> mean(4 * d, 0.0);
  std::vector<int> half_count(4, 0);
  for (int64_t i = 0; i < 200; ++i) {
    ++half_count[a.labels.data<int32_t>()[i]];
    for (int64_t k = 0; k < d; ++k)
      mean[a.labels.data<int32_t>()[i] * d + k] += a.images.data<uint8_t>()[i * d + k];
  }
  for (int cl = 0; cl < 4; ++cl) {
    ASSERT_GT(half_count[cl], 0);
    for (int64_t k = 0; k < d; ++k) mean[cl * d + k] /= half_count[cl];
  }
  int correct = 0;
  for (int64_t i = 200; i < 400; ++i) {
    int best = -1;
    double best_d = 1e300;
    for (int cl = 0; cl < 4; ++cl) {
      double dist = 0;
      for (int64_t k = 0; k < d; ++k) {
        double diff = a.images.data<uint8_t>()[i * d + k] - mean[cl * d + k];
        dist += diff * diff;
      }
      if (dist < best_d) best_d = dist, best = cl;
    }
    correct += best == a.labels.data<int32_t>()[i];
  }
  EXPECT_GT(correct, 180);
}

// ==== Loader =================================================================================

TEST(data_loader, EpochIsPermutation) {
  Dataset ds = indexed_dataset(103);
  Loader loader(ds, 10, /*shuffle=*/true, Augment{}, 5, /*drop_last=*/false);
  ASSERT_EQ(loader.batches_per_epoch(), 11);
  for (uint64_t e : {0u, 1u, 9u}) {
    loader.start_epoch(e);
    std::vector<int> seen(103, 0);
    std::vector<int64_t> order;
    Batch b;
    int64_t batches = 0;
    while (loader.next(b)) {
      ASSERT_EQ(b.size, batches == 10 ? 3 : 10);
      ASSERT_EQ(b.x.shape(), (Shape{b.size, 1, 2, 2}));
      ASSERT_EQ(b.y.shape(), (Shape{b.size}));
      for (int64_t j = 0; j < b.size; ++j) {
        int64_t idx = decode_index(b, j);
        ASSERT_GE(idx, 0);
        ASSERT_LT(idx, 103);
        ++seen[idx];
        order.push_back(idx);
        EXPECT_EQ(b.y.data<int32_t>()[j], idx % 7);
      }
      ++batches;
    }
    EXPECT_EQ(batches, 11);
    for (int i = 0; i < 103; ++i) EXPECT_EQ(seen[i], 1) << "sample " << i << " epoch " << e;
    EXPECT_EQ(order, loader.epoch_order(e));
    std::vector<int64_t> identity(103);
    std::iota(identity.begin(), identity.end(), 0);
    EXPECT_NE(order, identity) << "shuffle left the order unchanged";
    EXPECT_FALSE(loader.next(b)) << "exhausted epoch keeps returning false";
  }
  EXPECT_NE(loader.epoch_order(0), loader.epoch_order(1));
  // Without shuffle: identity; with drop_last: only full batches.
  Loader plain(ds, 10, false, Augment{}, 5, /*drop_last=*/true);
  EXPECT_EQ(plain.batches_per_epoch(), 10);
  std::vector<Batch> all = run_epochs(plain, 0, 1);
  ASSERT_EQ(all.size(), 10u);
  for (size_t i = 0; i < all.size(); ++i)
    for (int64_t j = 0; j < 10; ++j) ASSERT_EQ(decode_index(all[i], j), static_cast<int64_t>(i * 10 + j));
}

TEST(data_loader, SameSeedSameBatchesOtherSeedOrEpochDiffers) {
  Dataset ds = synthetic_dataset(150, 3, 8, 8, 5, 1);
  Augment aug{true, 2, true};
  Loader a(ds, 16, true, aug, 42, false), b(ds, 16, true, aug, 42, false), c(ds, 16, true, aug, 43, false);
  std::vector<Batch> ra = run_epochs(a, 0, 2), rb = run_epochs(b, 0, 2), rc = run_epochs(c, 0, 2);
  expect_same_batches(ra, rb);
  ASSERT_EQ(ra.size(), rc.size());
  EXPECT_FALSE(same_tensor(ra[0].x, rc[0].x));
  // Epoch 1 differs from epoch 0 (order and augmentation).
  const size_t per = static_cast<size_t>(a.batches_per_epoch());
  EXPECT_FALSE(same_tensor(ra[0].y, ra[per].y) && same_tensor(ra[0].x, ra[per].x));
  EXPECT_NE(a.epoch_order(0), a.epoch_order(1));
  EXPECT_NE(a.epoch_order(0), c.epoch_order(0));
}

TEST(data_loader, BackgroundEqualsSynchronous) {
  Dataset ds = synthetic_dataset(300, 3, 12, 12, 10, 3);
  Augment aug{true, 3, true};
  Loader bg(ds, 32, true, aug, 9, false, /*background=*/true);
  Loader sync(ds, 32, true, aug, 9, false, /*background=*/false);
  std::vector<Batch> rb = run_epochs(bg, 0, 3), rs = run_epochs(sync, 0, 3);
  expect_same_batches(rb, rs);
  // And equal to the pure function make_batch.
  std::vector<int64_t> order = sync.epoch_order(2);
  for (int64_t i = 0; i < sync.batches_per_epoch(); ++i) {
    Batch m = sync.make_batch(2, order, i);
    const Batch& got = rb[static_cast<size_t>(2 * bg.batches_per_epoch() + i)];
    EXPECT_TRUE(same_tensor(m.x, got.x) && same_tensor(m.y, got.y)) << "batch " << i;
  }
  // Batches are independent allocations: keeping one across next() is safe.
  EXPECT_NE(rb[0].x.raw(), rb[1].x.raw());
  EXPECT_NE(rb[0].x.raw(), rb[2].x.raw());
}

TEST(data_loader, ResumeMidEpochMatchesUninterrupted) {
  Dataset ds = synthetic_dataset(200, 1, 10, 10, 4, 11);
  Augment aug{true, 2, true};
  Loader full(ds, 24, true, aug, 77, true);
  std::vector<Batch> ref = run_epochs(full, 0, 3);
  const int64_t per = full.batches_per_epoch();
  ASSERT_EQ(per, 8);
  for (bool background : {true, false}) {
    // A fresh process resumes at epoch 1, batch 3 and runs to the end of epoch 2.
    Loader resumed(ds, 24, true, aug, 77, true, background);
    std::vector<Batch> got;
    Batch b;
    resumed.start_epoch(1, 3);
    while (resumed.next(b)) got.push_back(b);
    resumed.start_epoch(2);
    while (resumed.next(b)) got.push_back(b);
    expect_same_batches(got, std::vector<Batch>(ref.begin() + per + 3, ref.end()));
    // Skipping the whole epoch yields nothing; beyond it is an error.
    resumed.start_epoch(0, per);
    EXPECT_FALSE(resumed.next(b));
    EXPECT_THROW(resumed.start_epoch(0, per + 1), InputError);
  }
}

TEST(data_loader, RestartWhileWorkerBusyDiscardsInFlightBatch) {
  // Batches big enough (~1 ms to make) that start_epoch usually lands while the worker is
  // inside make_batch for the old epoch; its result must be dropped, never handed out.
  Dataset ds = synthetic_dataset(1024, 3, 32, 32, 10, 4);
  Augment aug{true, 4, true};
  Loader l(ds, 256, true, aug, 8, true);
  Loader sync(ds, 256, true, aug, 8, true, /*background=*/false);
  std::vector<int64_t> order2 = sync.epoch_order(2);
  Batch want2 = sync.make_batch(2, order2, 2), want3 = sync.make_batch(2, order2, 3);
  for (int rep = 0; rep < 30; ++rep) {
    Batch b;
    l.start_epoch(0);
    ASSERT_TRUE(l.next(b));
    // Let the worker wake up and get into batch 1 of epoch 0 (it takes a few ms).
    std::this_thread::sleep_for(std::chrono::microseconds(500 + 100 * rep));
    l.start_epoch(2, 2);
    ASSERT_TRUE(l.next(b));
    ASSERT_TRUE(same_tensor(b.x, want2.x) && same_tensor(b.y, want2.y)) << "rep " << rep;
    ASSERT_TRUE(l.next(b));
    ASSERT_TRUE(same_tensor(b.x, want3.x) && same_tensor(b.y, want3.y)) << "rep " << rep;
    ASSERT_FALSE(l.next(b));
  }
}

TEST(data_loader, DestructorMidEpochAndErrorsPropagate) {
  Dataset ds = synthetic_dataset(100, 1, 4, 4, 3, 2);
  {
    Loader never_started(ds, 10, true, Augment{}, 1, false);
  }
  {
    Loader mid(ds, 10, true, Augment{}, 1, false);
    mid.start_epoch(0);
    Batch b;
    ASSERT_TRUE(mid.next(b));  // the worker is now preparing (or holding) batch 1
  }
  // A bad label that appears after construction (shared storage) fails the batch that holds
  // it; the worker's exception reaches next().
  Dataset bad = synthetic_dataset(100, 1, 4, 4, 3, 2);
  Loader loader(bad, 10, false, Augment{}, 1, false);
  bad.labels.data<int32_t>()[55] = 99;
  loader.start_epoch(0);
  Batch b;
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(loader.next(b));
  std::string msg = message_of([&] { loader.next(b); });
  EXPECT_NE(msg.find("label 99 of sample 55 is out of range [0, 3)"), std::string::npos) << msg;
  EXPECT_THROW(loader.next(b), InputError);  // the epoch stays failed
  bad.labels.data<int32_t>()[55] = 1;
  loader.start_epoch(0, 5);  // a new start clears the error
  EXPECT_TRUE(loader.next(b));

  // Constructor validation.
  EXPECT_THROW(Loader(ds, 0, true, Augment{}, 1, false), InputError);
  EXPECT_NE(message_of([&] { Loader(ds, 101, true, Augment{}, 1, true); }).find("larger than dataset"),
            std::string::npos);
}

TEST(data_loader, NormalisationOnFashionMnist) {
  if (!have_fashion()) GTEST_SKIP() << "dataset-fashion-mnist not installed";
  Loader loader(fashion_train(), 1000, true, Augment{}, 3, false);
  loader.start_epoch(0);
  Batch b;
  double s1 = 0, s2 = 0, count = 0;
  while (loader.next(b)) {
    ASSERT_EQ(b.x.shape(), (Shape{1000, 1, 28, 28}));
    const float* x = b.x.data<float>();
    for (int64_t i = 0; i < b.x.numel(); ++i) s1 += x[i], s2 += double{x[i]} * x[i];
    count += static_cast<double>(b.x.numel());
  }
  const double mean = s1 / count, sd = std::sqrt(s2 / count - mean * mean);
  EXPECT_NEAR(mean, 0.0, 0.01);
  EXPECT_NEAR(sd, 1.0, 0.01);
}

TEST(data_loader, CropAndFlipAreShiftsDeterministicBySeed) {
  Dataset ds = synthetic_dataset(64, 3, 8, 8, 4, 5);
  const int pad = 2;
  Loader aug(ds, 16, true, Augment{true, pad, true}, 21, false);
  Loader plain(ds, 16, true, Augment{}, 21, false);  // same order, no augmentation
  std::vector<Batch> ra = run_epochs(aug, 0, 2), rp = run_epochs(plain, 0, 2);
  Loader aug2(ds, 16, true, Augment{true, pad, true}, 21, false);
  Loader aug3(ds, 16, true, Augment{true, pad, true}, 22, false);
  expect_same_batches(ra, run_epochs(aug2, 0, 2));
  EXPECT_FALSE(same_tensor(ra[0].x, run_epochs(aug3, 0, 1)[0].x));

  // Every augmented image must equal its plain image shifted by (dy, dx) in [-pad, pad] and
  // optionally mirrored, with padding = the normalised value of pixel 0.
  std::vector<float> pad_value(3);
  for (int ch = 0; ch < 3; ++ch)
    pad_value[ch] = static_cast<float>((0.0 - aug.normalization().mean[ch]) / aug.normalization().stddev[ch]);
  std::set<std::tuple<int, int, int>> transforms;
  int flips = 0, total = 0;
  for (size_t bi = 0; bi < ra.size(); ++bi) {
    ASSERT_EQ(ra[bi].x.shape(), rp[bi].x.shape());
    EXPECT_TRUE(same_tensor(ra[bi].y, rp[bi].y));
    for (int64_t j = 0; j < ra[bi].size; ++j) {
      const float* a = ra[bi].x.data<float>() + j * 192;
      const float* p = rp[bi].x.data<float>() + j * 192;
      int matches = 0;
      for (int flip = 0; flip < 2; ++flip)
        for (int dy = -pad; dy <= pad; ++dy)
          for (int dx = -pad; dx <= pad; ++dx) {
            bool ok = true;
            for (int ch = 0; ch < 3 && ok; ++ch)
              for (int y = 0; y < 8 && ok; ++y)
                for (int x = 0; x < 8 && ok; ++x) {
                  int sy = y + dy, sx = (flip ? 7 - x : x) + dx;
                  float want = (sy >= 0 && sy < 8 && sx >= 0 && sx < 8) ? p[ch * 64 + sy * 8 + sx] : pad_value[ch];
                  ok = a[ch * 64 + y * 8 + x] == want;
                }
            if (ok) {
              ++matches;
              transforms.insert({flip, dy, dx});
              flips += flip;
            }
          }
      EXPECT_EQ(matches, 1) << "batch " << bi << " sample " << j;
      ++total;
    }
  }
  // The draws cover the transform space: 128 samples over 50 possible transforms.
  EXPECT_GT(transforms.size(), 25u);
  EXPECT_GT(flips, total / 4);
  EXPECT_LT(flips, 3 * total / 4);
}
