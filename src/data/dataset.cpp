// Named datasets (Fashion-MNIST, MNIST, CIFAR-10), synthetic data and normalisation statistics.
#include "data/permutation.hpp"
#include "fqt/data.hpp"
#include "fqt/file.hpp"
#include "fqt/rng.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>

namespace fqt {

std::string Dataset::describe_images() const {
  return fmt::format("the {}x{}x{} images of {}", channels(), height(), width(),
                     source.empty() ? (name.empty() ? std::string("the data") : name) : source);
}

namespace fs = std::filesystem;

namespace {

// Something at `p` that is not a readable regular file (a folder, a FIFO, a device, a dangling
// link): an InputError that says what it is. Nothing there: returns.
void refuse_non_file(const fs::path& p) {
  std::error_code ec;
  const fs::file_status link = fs::symlink_status(p, ec);
  if (ec || !fs::exists(link)) return;
  const fs::file_status st = fs::status(p, ec);
  if (fs::is_symlink(link) && (ec || !fs::exists(st)))
    throw InputError(fmt::format("{}: a link to '{}', which does not exist", p.string(),
                                 fs::read_symlink(p, ec).string()));
  if (fs::is_directory(st)) throw InputError(fmt::format("{}: is a folder, not a file", p.string()));
  if (!fs::is_regular_file(st))
    throw InputError(fmt::format("{}: not a regular file (a FIFO, socket or device); give the data file itself",
                                 p.string()));
}

// `dir/name.gz` if present, else `dir/name`; a missing file names both candidates and `hint`.
std::string find_file(const std::string& dir, const std::string& name, const std::string& hint) {
  fs::path gz = fs::path(dir) / (name + ".gz");
  fs::path raw = fs::path(dir) / name;
  std::error_code ec;
  if (fs::is_regular_file(gz, ec)) return gz.string();
  if (fs::is_regular_file(raw, ec)) return raw.string();
  refuse_non_file(gz);
  refuse_non_file(raw);
  throw InputError(fmt::format("{}: file not found (nor {}); {}", gz.string(), raw.string(), hint));
}

Dataset load_idx_dataset(const std::string& dir, bool train, const std::string& name,
                         const std::string& hint) {
  const std::string prefix = train ? "train" : "t10k";
  std::string images = find_file(dir, prefix + "-images-idx3-ubyte", hint);
  std::string labels = find_file(dir, prefix + "-labels-idx1-ubyte", hint);
  return load_idx_pair(images, labels, name, 10);
}

std::string resolve_dir(const std::string& name, const std::string& dir) {
  return dir.empty() ? default_data_dir(name) : dir;
}

}  // namespace

Dataset load_fashion_mnist(const std::string& dir, bool train) {
  Dataset ds = load_idx_dataset(
      resolve_dir("fashion-mnist", dir), train, "fashion-mnist",
      "install Debian's dataset-fashion-mnist (scripts/setup does) or pass --data-dir");
  ds.mean = {0.2860f};
  ds.stddev = {0.3530f};
  return ds;
}

Dataset load_mnist(const std::string& dir, bool train) {
  Dataset ds = load_idx_dataset(
      resolve_dir("mnist", dir), train, "mnist",
      "download the four MNIST files (train-images-idx3-ubyte.gz, ...) into a folder and pass "
      "--data-dir");
  ds.mean = {0.1307f};
  ds.stddev = {0.3081f};
  return ds;
}

// ---- CIFAR-10 -------------------------------------------------------------------------------

static constexpr int64_t kCifarPixels = 3 * 32 * 32;
static constexpr int64_t kCifarRecord = 1 + kCifarPixels;

static void set_cifar_stats(Dataset& ds) {
  ds.num_classes = 10;
  ds.name = "cifar10";
  ds.mean = {0.4914f, 0.4822f, 0.4465f};
  ds.stddev = {0.2470f, 0.2435f, 0.2616f};
}

// Copies the records of one file (size already validated) to images [n, 3072] / labels [n].
static void parse_cifar_records(const std::string& bytes, const std::string& what, uint8_t* images,
                                int32_t* labels) {
  const int64_t n = static_cast<int64_t>(bytes.size()) / kCifarRecord;
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  for (int64_t i = 0; i < n; ++i, p += kCifarRecord) {
    FQT_INPUT_CHECK(p[0] < 10, "{}: label {} of record {} is out of range [0, 10); "
                    "is this the CIFAR-10 binary version (not CIFAR-100)?",
                    what, p[0], i);
    labels[i] = p[0];
    std::memcpy(images + i * kCifarPixels, p + 1, kCifarPixels);
  }
}

static void check_cifar_size(const std::string& bytes, const std::string& what) {
  FQT_INPUT_CHECK(!bytes.empty(), "{}: empty file", what);
  FQT_INPUT_CHECK(bytes.size() % kCifarRecord == 0,
                  "{}: size {} bytes is not a multiple of the 3073-byte CIFAR-10 record "
                  "(truncated file? {} whole records + {} bytes); re-download the binary version",
                  what, bytes.size(), bytes.size() / kCifarRecord, bytes.size() % kCifarRecord);
}

Dataset parse_cifar10(const std::string& bytes, const std::string& what) {
  check_cifar_size(bytes, what);
  const int64_t n = static_cast<int64_t>(bytes.size()) / kCifarRecord;
  Dataset ds;
  ds.images = Tensor::empty({n, 3, 32, 32}, DType::u8);
  ds.labels = Tensor::empty({n}, DType::i32);
  parse_cifar_records(bytes, what, ds.images.data<uint8_t>(), ds.labels.data<int32_t>());
  set_cifar_stats(ds);
  return ds;
}

Dataset load_cifar10(const std::string& dir_in, bool train) {
  const std::string dir = resolve_dir("cifar10", dir_in);
  std::vector<std::string> names;
  if (train)
    for (int i = 1; i <= 5; ++i) names.push_back(fmt::format("data_batch_{}.bin", i));
  else
    names.push_back("test_batch.bin");
  // Read every file first (sizes validated), then copy into one tensor.
  std::vector<std::string> contents;
  std::vector<std::string> paths;
  int64_t n = 0;
  for (const std::string& name : names) {
    fs::path p = fs::path(dir) / name;
    std::error_code ec;
    if (!fs::is_regular_file(p, ec)) refuse_non_file(p);
    FQT_INPUT_CHECK(fs::is_regular_file(p, ec),
                    "{}: file not found; download the CIFAR-10 binary version "
                    "(cifar-10-binary.tar.gz), extract it and pass --data-dir <.../cifar-10-batches-bin>",
                    p.string());
    paths.push_back(p.string());
    contents.push_back(read_whole_file(p.string()));
    check_cifar_size(contents.back(), paths.back());
    n += static_cast<int64_t>(contents.back().size()) / kCifarRecord;
  }
  Dataset ds;
  ds.images = Tensor::empty({n, 3, 32, 32}, DType::u8);
  ds.labels = Tensor::empty({n}, DType::i32);
  int64_t at = 0;
  for (size_t f = 0; f < contents.size(); ++f) {
    parse_cifar_records(contents[f], paths[f], ds.images.data<uint8_t>() + at * kCifarPixels,
                        ds.labels.data<int32_t>() + at);
    at += static_cast<int64_t>(contents[f].size()) / kCifarRecord;
    std::string().swap(contents[f]);  // free as we go: the train set is 150 MB of strings
  }
  set_cifar_stats(ds);
  ds.source = paths.size() == 1 ? paths[0] : fmt::format("{} .. {}", paths.front(), paths.back());
  return ds;
}

// ---- by name --------------------------------------------------------------------------------

std::vector<std::string> dataset_names() { return {"fashion-mnist", "mnist", "cifar10"}; }

std::string default_data_dir(const std::string& name) {
  if (name == "fashion-mnist") return "/usr/share/datasets/fashion-mnist";
  if (name == "mnist") return "/usr/share/datasets/mnist";
  if (name == "cifar10") return "/usr/share/datasets/cifar10";
  throw InputError(fmt::format("unknown dataset '{}'; known datasets: fashion-mnist, mnist, cifar10",
                               name));
}

Dataset load_dataset(const std::string& name, const std::string& dir, bool train) {
  if (name == "fashion-mnist") return load_fashion_mnist(dir, train);
  if (name == "mnist") return load_mnist(dir, train);
  if (name == "cifar10") return load_cifar10(dir, train);
  throw InputError(fmt::format("unknown dataset '{}'; known datasets: fashion-mnist, mnist, cifar10",
                               name));
}

// ---- synthetic ------------------------------------------------------------------------------

Dataset synthetic_dataset(int64_t n, int c, int h, int w, int classes, uint64_t seed) {
  FQT_INPUT_CHECK(n > 0 && c > 0 && h > 0 && w > 0,
                  "synthetic dataset needs positive sizes, got n={} c={} h={} w={}", n, c, h, w);
  FQT_INPUT_CHECK(classes >= 2 && classes <= 256, "synthetic dataset needs 2..256 classes, got {}",
                  classes);
  const int64_t chw = int64_t{c} * h * w;
  // Streams: 0 = label order, 1 = prototypes, 2 = per-sample noise.
  // Prototype pixels ~ 128 + 50 z; noise 35 z: classes overlap a little but stay separable.
  std::vector<float> proto(static_cast<size_t>(classes * chw));
  for (int64_t k = 0; k < classes * chw; ++k)
    proto[k] = 128.0f + 50.0f * normal_at(RngKey{seed, 1}, static_cast<uint64_t>(k));
  std::vector<int64_t> perm = data_detail::philox_permutation(RngKey{seed, 0}, n);

  Dataset ds;
  ds.images = Tensor::empty({n, c, h, w}, DType::u8);
  ds.labels = Tensor::empty({n}, DType::i32);
  uint8_t* x = ds.images.data<uint8_t>();
  int32_t* y = ds.labels.data<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int32_t label = static_cast<int32_t>(perm[i] % classes);
    y[i] = label;
    const float* pr = proto.data() + label * chw;
    for (int64_t k = 0; k < chw; ++k) {
      float v = pr[k] + 35.0f * normal_at(RngKey{seed, 2}, static_cast<uint64_t>(i * chw + k));
      x[i * chw + k] = static_cast<uint8_t>(std::clamp(std::lround(v), 0L, 255L));
    }
  }
  ds.num_classes = classes;
  ds.name = "synthetic";
  Normalization nm = compute_normalization(ds.images);
  ds.mean = nm.mean;
  ds.stddev = nm.stddev;
  return ds;
}

// ---- normalisation --------------------------------------------------------------------------

Normalization compute_normalization(const Tensor& images) {
  FQT_CHECK(images.dim() == 4 && images.dtype() == DType::u8,
            "compute_normalization wants u8 [N, C, H, W], got {} {}", dtype_name(images.dtype()),
            shape_str(images.shape()));
  const int64_t n = images.size(0), c = images.size(1), hw = images.size(2) * images.size(3);
  // Exact integer sums (u8 values; 2^63 / 255^2 is far above any dataset size).
  std::vector<uint64_t> s1(c, 0), s2(c, 0);
  const uint8_t* p = images.data<uint8_t>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t ch = 0; ch < c; ++ch) {
      uint64_t a = 0, b = 0;
      for (int64_t k = 0; k < hw; ++k, ++p) {
        a += *p;
        b += uint64_t{*p} * *p;
      }
      s1[ch] += a;
      s2[ch] += b;
    }
  Normalization nm;
  const double count = static_cast<double>(n * hw);
  for (int64_t ch = 0; ch < c; ++ch) {
    double mean = static_cast<double>(s1[ch]) / count / 255.0;
    double var = static_cast<double>(s2[ch]) / count / (255.0 * 255.0) - mean * mean;
    nm.mean.push_back(static_cast<float>(mean));
    // A constant channel would divide by zero: fall back to std 1 (values stay centred).
    nm.stddev.push_back(var > 1e-12 ? static_cast<float>(std::sqrt(var)) : 1.0f);
  }
  return nm;
}

Normalization normalization_of(const Dataset& ds) {
  const size_t c = static_cast<size_t>(ds.channels());
  if (!ds.mean.empty() || !ds.stddev.empty()) {
    FQT_INPUT_CHECK(ds.mean.size() == c && ds.stddev.size() == c,
                    "dataset '{}': {} means and {} stddevs for {} channels", ds.name, ds.mean.size(),
                    ds.stddev.size(), c);
    for (size_t i = 0; i < c; ++i)
      FQT_INPUT_CHECK(ds.stddev[i] > 0, "dataset '{}': stddev of channel {} is {}, must be > 0",
                      ds.name, i, ds.stddev[i]);
    return {ds.mean, ds.stddev};
  }
  return compute_normalization(ds.images);
}

}  // namespace fqt
