// fqt/data.hpp — datasets (IDX / CIFAR-10 / synthetic), augmentation and a batch loader.
//
// A Dataset keeps raw u8 pixels [N, C, H, W] (memory-light: Fashion-MNIST train is 47 MB);
// pixels become normalised f32 only per batch, inside the Loader.
//
// Determinism: everything random in the pipeline is a pure function of counters, drawn with
// Philox (rng.hpp). The sample order of an epoch depends only on (seed, epoch); the crop/flip
// of a sample depends only on (seed, epoch, position of the sample in the epoch). A run resumed
// at any (epoch, batch) therefore sees exactly the batches of an uninterrupted run, whether
// the loader prepares batches on its background thread or synchronously.
#pragma once

#include "fqt/tensor.hpp"

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace fqt {

struct Dataset {
  Tensor images;  // u8 [N, C, H, W]
  Tensor labels;  // i32 [N], each in [0, num_classes)
  int num_classes = 0;
  std::string name;
  // The file(s) the images came from (the images file of an IDX pair, the CIFAR-10 batch files),
  // for messages that must name them; empty for data made in memory (synthetic).
  std::string source;
  // Per-channel mean / stddev of pixel/255, used by the Loader to normalise. The loaders fill in
  // the customary constants; empty means "compute from `images`" (see normalization_of).
  std::vector<float> mean;
  std::vector<float> stddev;

  int64_t size() const { return images.defined() ? images.size(0) : 0; }
  int channels() const { return static_cast<int>(images.size(1)); }
  int height() const { return static_cast<int>(images.size(2)); }
  int width() const { return static_cast<int>(images.size(3)); }
  // "the CxHxW images of <source>" (or "of <name>" for data made in memory), for messages.
  std::string describe_images() const;
};

// ---- byte-level helpers (public so that tests and fuzzers can feed bytes directly) ---------

// If `bytes` starts with the gzip magic (1f 8b), the inflated content (concatenated members
// allowed); otherwise `bytes` unchanged. Truncated or corrupt streams, and outputs larger than
// `max_output` bytes, throw InputError("<what>: ...").
std::string gunzip_if_gzip(const std::string& bytes, const std::string& what,
                           size_t max_output = size_t{1} << 32);
// gzip-compress `bytes` (a single member). Used to write test fixtures and caches.
std::string gzip_compress(const std::string& bytes, int level = 6);

// ---- IDX (MNIST / Fashion-MNIST) ------------------------------------------------------------

// Parse an uncompressed IDX images file (magic 0x00000803): u8 [N, 1, H, W].
// `what` (normally the path) prefixes every error message.
Tensor parse_idx_images(const std::string& bytes, const std::string& what);
// Parse an uncompressed IDX labels file (magic 0x00000801): i32 [N], values in [0, num_classes).
Tensor parse_idx_labels(const std::string& bytes, const std::string& what, int num_classes);
// Both files of a split; image and label counts must agree. Bytes may be gzip-compressed.
Dataset parse_idx_pair(const std::string& images_bytes, const std::string& labels_bytes,
                       const std::string& name, int num_classes = 10,
                       const std::string& images_what = "images",
                       const std::string& labels_what = "labels");
// Read and parse two IDX files (each gzip-compressed or raw).
Dataset load_idx_pair(const std::string& images_path, const std::string& labels_path,
                      const std::string& name, int num_classes = 10);

// The standard file names {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] in `dir`
// ("" = default_data_dir). 60000 / 10000 samples of 1x28x28.
Dataset load_fashion_mnist(const std::string& dir, bool train);
Dataset load_mnist(const std::string& dir, bool train);

// ---- CIFAR-10 binary version -----------------------------------------------------------------

// Records of 1 label byte + 3072 pixel bytes (3x32x32, channel-major): u8 [N, 3, 32, 32].
Dataset parse_cifar10(const std::string& bytes, const std::string& what);
// data_batch_1.bin .. data_batch_5.bin (train) or test_batch.bin (test) in `dir`.
Dataset load_cifar10(const std::string& dir, bool train);

// ---- by name -------------------------------------------------------------------------------

// Names: "fashion-mnist", "mnist", "cifar10".
std::vector<std::string> dataset_names();
// Where the dataset is looked for when no directory is given.
std::string default_data_dir(const std::string& name);
// `dir` "" = default_data_dir(name). Unknown names throw InputError listing the known ones.
Dataset load_dataset(const std::string& name, const std::string& dir, bool train);

// A small learnable dataset: each class has a fixed random prototype image; a sample is its
// class prototype plus Gaussian noise, clamped to u8. A pure function of its arguments.
// Labels are balanced (sample i has class i % classes, then the order is shuffled by seed).
Dataset synthetic_dataset(int64_t n, int c, int h, int w, int classes, uint64_t seed);

// ---- normalisation, augmentation, batches ------------------------------------------------

struct Normalization {
  std::vector<float> mean;  // [C], of pixel/255
  std::vector<float> stddev;  // [C]
};
// The dataset's own mean/std if set, otherwise computed from its images (f64 accumulation).
Normalization normalization_of(const Dataset& ds);
Normalization compute_normalization(const Tensor& images_u8);

struct Augment {
  bool random_crop = false;  // pad by `pad` zero pixels on each side, crop back to H x W
  int pad = 4;
  bool hflip = false;  // mirror left-right with probability 1/2
};

struct Batch {
  Tensor x;  // f32 [B, C, H, W], normalised
  Tensor y;  // i32 [B]
  int64_t size = 0;  // B (the last batch of an epoch may be short when drop_last is false)
};

// Epoch-based batch loader.
//
//   Loader loader(ds, 128, /*shuffle=*/true, Augment{...}, seed, /*drop_last=*/true);
//   for (uint64_t e = 0; e < epochs; ++e) {
//     loader.start_epoch(e);               // or start_epoch(e, k) to resume at batch k
//     Batch b;
//     while (loader.next(b)) train_step(b);
//   }
//
// With `background` (the default) a worker thread prepares the next batch while the caller
// works on the current one (two slots in flight: the one handed out and the one being made).
// Every batch is freshly allocated, so a caller may keep a Batch across next() calls.
// The loader holds handles on the dataset's tensors (shared storage, no copy): the Dataset
// object itself may go away, but its pixels must not be modified while the loader runs.
// Exceptions thrown while preparing a batch are rethrown by next().
class Loader {
 public:
  Loader(const Dataset& ds, int64_t batch_size, bool shuffle, Augment augment, uint64_t seed,
         bool drop_last, bool background = true);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // Begin `epoch`, skipping its first `skip_batches` batches (to resume mid-epoch).
  void start_epoch(uint64_t epoch, int64_t skip_batches = 0);
  // The next batch of the current epoch into `out`; false when the epoch is exhausted.
  bool next(Batch& out);
  int64_t batches_per_epoch() const { return batches_per_epoch_; }
  int64_t batch_size() const { return batch_size_; }
  const Normalization& normalization() const { return norm_; }

  // The sample order of an epoch: a permutation of [0, N) (identity without shuffle).
  std::vector<int64_t> epoch_order(uint64_t epoch) const;
  // Batch `batch_index` of an epoch given that epoch's order, computed synchronously.
  // A pure function: next() returns exactly this.
  Batch make_batch(uint64_t epoch, const std::vector<int64_t>& order, int64_t batch_index) const;

 private:
  void worker_loop();

  Dataset ds_;
  int64_t batch_size_;
  bool shuffle_;
  Augment augment_;
  uint64_t seed_;
  bool drop_last_;
  bool background_;
  int64_t batches_per_epoch_ = 0;
  Normalization norm_;
  std::vector<float> lut_;  // [C * 256]: normalised value of each u8 pixel per channel

  // Epoch state, shared with the worker under mu_.
  std::mutex mu_;
  std::condition_variable cv_;
  bool started_ = false;
  bool stop_ = false;
  uint64_t generation_ = 0;  // bumped by start_epoch: in-flight work of older epochs is dropped
  uint64_t epoch_ = 0;
  std::shared_ptr<const std::vector<int64_t>> order_;
  int64_t next_prepare_ = 0;  // batch the worker makes next
  int64_t next_return_ = 0;   // batch next() hands out next
  std::optional<Batch> ready_;
  std::exception_ptr error_;
  std::thread worker_;
};

}  // namespace fqt
