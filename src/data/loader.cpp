// Loader: deterministic shuffling, augmentation, normalisation and background batch preparation.
//
// Random streams (key.seed = seed ^ kDataSalt so that a data seed equal to the model seed does
// not replay the weight-init numbers): stream (epoch << 8) | 0 drives the epoch permutation,
// stream (epoch << 8) | 1 gives each sample position p one Philox block:
// word 0 -> crop row offset, word 1 -> crop column offset, word 2 -> flip bit.
#include "data/permutation.hpp"
#include "fqt/data.hpp"
#include "fqt/rng.hpp"

#include <algorithm>
#include <cstring>

namespace fqt {

namespace {
constexpr uint64_t kDataSalt = 0xDA7A5EEDC0FFEE11ull;
constexpr uint64_t kStreamShuffle = 0, kStreamAugment = 1;

RngKey data_key(uint64_t seed, uint64_t epoch, uint64_t purpose) {
  return RngKey{seed ^ kDataSalt, (epoch << 8) | purpose};
}
}  // namespace

Loader::Loader(const Dataset& ds, int64_t batch_size, bool shuffle, Augment augment, uint64_t seed,
               bool drop_last, bool background)
    : ds_(ds),
      batch_size_(batch_size),
      shuffle_(shuffle),
      augment_(augment),
      seed_(seed),
      drop_last_(drop_last),
      background_(background) {
  FQT_INPUT_CHECK(ds_.images.defined() && ds_.images.dim() == 4 && ds_.images.dtype() == DType::u8,
                  "dataset '{}': images must be u8 [N, C, H, W]", ds_.name);
  FQT_INPUT_CHECK(ds_.labels.defined() && ds_.labels.dim() == 1 && ds_.labels.dtype() == DType::i32 &&
                      ds_.labels.size(0) == ds_.images.size(0),
                  "dataset '{}': labels must be i32 [N] with N = {} images", ds_.name,
                  ds_.images.size(0));
  FQT_INPUT_CHECK(ds_.num_classes > 0, "dataset '{}': num_classes must be positive", ds_.name);
  const int64_t n = ds_.size();
  FQT_INPUT_CHECK(n > 0, "dataset '{}' is empty", ds_.name);
  FQT_INPUT_CHECK(n < (int64_t{1} << 32), "dataset '{}' has {} samples; at most 2^32 - 1 supported",
                  ds_.name, n);
  FQT_INPUT_CHECK(batch_size > 0, "batch size must be positive, got {}", batch_size);
  FQT_INPUT_CHECK(!augment.random_crop || (augment.pad >= 0 && augment.pad <= 1024),
                  "crop padding must be in [0, 1024], got {}", augment.pad);
  batches_per_epoch_ = drop_last ? n / batch_size : (n + batch_size - 1) / batch_size;
  FQT_INPUT_CHECK(batches_per_epoch_ > 0,
                  "batch size {} is larger than dataset '{}' ({} samples) with drop_last: an epoch "
                  "would have no batch; use a smaller batch size",
                  batch_size, ds_.name, n);

  norm_ = normalization_of(ds_);
  // Normalisation table: lut[c * 256 + v] = (v / 255 - mean_c) / std_c, so a batch costs one
  // load per pixel and results do not depend on the order of float operations.
  const int c = ds_.channels();
  lut_.resize(static_cast<size_t>(c) * 256);
  for (int ch = 0; ch < c; ++ch)
    for (int v = 0; v < 256; ++v)
      lut_[ch * 256 + v] = static_cast<float>((v / 255.0 - norm_.mean[ch]) / norm_.stddev[ch]);

  if (background_) worker_ = std::thread([this] { worker_loop(); });
}

Loader::~Loader() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

std::vector<int64_t> Loader::epoch_order(uint64_t epoch) const {
  if (!shuffle_) {
    std::vector<int64_t> p(static_cast<size_t>(ds_.size()));
    for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<int64_t>(i);
    return p;
  }
  return data_detail::philox_permutation(data_key(seed_, epoch, kStreamShuffle), ds_.size());
}

Batch Loader::make_batch(uint64_t epoch, const std::vector<int64_t>& order, int64_t b) const {
  FQT_CHECK(b >= 0 && b < batches_per_epoch_, "batch {} out of range [0, {})", b, batches_per_epoch_);
  const int64_t n = ds_.size();
  const int64_t begin = b * batch_size_;
  const int64_t bs = std::min(batch_size_, n - begin);
  const int64_t c = ds_.channels(), h = ds_.height(), w = ds_.width(), hw = h * w;

  Batch out;
  out.size = bs;
  out.x = Tensor::empty({bs, c, h, w}, DType::f32);
  out.y = Tensor::empty({bs}, DType::i32);
  float* x = out.x.data<float>();
  int32_t* y = out.y.data<int32_t>();
  const uint8_t* images = ds_.images.data<uint8_t>();
  const int32_t* labels = ds_.labels.data<int32_t>();
  const RngKey aug_key = data_key(seed_, epoch, kStreamAugment);
  const bool crop = augment_.random_crop && augment_.pad > 0;
  const int64_t pad = crop ? augment_.pad : 0;

  for (int64_t j = 0; j < bs; ++j) {
    const int64_t pos = begin + j;  // position in the epoch: the augmentation counter
    const int64_t idx = order[pos];
    // Re-checked per sample: the dataset's tensors are shared handles and could have been
    // changed after construction; a bad label must not reach the loss as an index.
    FQT_INPUT_CHECK(labels[idx] >= 0 && labels[idx] < ds_.num_classes,
                    "dataset '{}': label {} of sample {} is out of range [0, {})", ds_.name,
                    labels[idx], idx, ds_.num_classes);
    y[j] = labels[idx];
    int64_t dy = 0, dx = 0;  // crop offsets relative to the unpadded image, in [-pad, pad]
    bool flip = false;
    if (crop || augment_.hflip) {
      uint32_t r[4];
      philox_block(aug_key, static_cast<uint64_t>(pos), r);
      if (crop) {
        const uint64_t range = static_cast<uint64_t>(2 * pad + 1);
        dy = static_cast<int64_t>((uint64_t{r[0]} * range) >> 32) - pad;
        dx = static_cast<int64_t>((uint64_t{r[1]} * range) >> 32) - pad;
      }
      flip = augment_.hflip && (r[2] >> 31);
    }
    const uint8_t* src = images + idx * c * hw;
    float* dst = x + j * c * hw;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* lut = lut_.data() + ch * 256;
      const uint8_t* s = src + ch * hw;
      float* d = dst + ch * hw;
      if (dy == 0 && dx == 0 && !flip) {  // the common fast path: plain normalisation
        for (int64_t k = 0; k < hw; ++k) d[k] = lut[s[k]];
        continue;
      }
      // out[yy][xx] = padded[yy + dy][xx' + dx] with xx' = W-1-xx when flipped (crop, then
      // flip, as torchvision); outside the image the padding is pixel value 0.
      for (int64_t yy = 0; yy < h; ++yy) {
        const int64_t sy = yy + dy;
        float* drow = d + yy * w;
        if (sy < 0 || sy >= h) {
          std::fill(drow, drow + w, lut[0]);
          continue;
        }
        const uint8_t* srow = s + sy * w;
        for (int64_t xx = 0; xx < w; ++xx) {
          const int64_t sx = (flip ? w - 1 - xx : xx) + dx;
          drow[xx] = (sx >= 0 && sx < w) ? lut[srow[sx]] : lut[0];
        }
      }
    }
  }
  return out;
}

void Loader::start_epoch(uint64_t epoch, int64_t skip_batches) {
  FQT_INPUT_CHECK(skip_batches >= 0 && skip_batches <= batches_per_epoch_,
                  "cannot skip {} batches of an epoch of {} batches; is the checkpoint from a run "
                  "with another batch size or dataset?",
                  skip_batches, batches_per_epoch_);
  FQT_INPUT_CHECK(epoch < (uint64_t{1} << 56), "epoch {} too large", epoch);
  auto order = std::make_shared<const std::vector<int64_t>>(epoch_order(epoch));
  {
    std::lock_guard<std::mutex> lk(mu_);
    ++generation_;
    started_ = true;
    epoch_ = epoch;
    order_ = std::move(order);
    next_prepare_ = skip_batches;
    next_return_ = skip_batches;
    ready_.reset();
    error_ = nullptr;
  }
  cv_.notify_all();
}

bool Loader::next(Batch& out) {
  std::unique_lock<std::mutex> lk(mu_);
  FQT_CHECK(started_, "Loader::next called before start_epoch");
  if (next_return_ >= batches_per_epoch_) return false;
  if (!background_) {
    out = make_batch(epoch_, *order_, next_return_);
    ++next_return_;
    return true;
  }
  cv_.wait(lk, [&] { return ready_.has_value() || error_ != nullptr; });
  if (error_) std::rethrow_exception(error_);  // stays set: the epoch cannot continue
  out = std::move(*ready_);
  ready_.reset();
  ++next_return_;
  lk.unlock();
  cv_.notify_all();  // the slot is free: the worker may start the following batch
  return true;
}

void Loader::worker_loop() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    // Work exists when the ready slot is empty and the epoch has batches left to make.
    cv_.wait(lk, [&] {
      return stop_ || (started_ && !ready_ && !error_ && next_prepare_ < batches_per_epoch_);
    });
    if (stop_) return;
    const uint64_t gen = generation_, epoch = epoch_;
    const int64_t b = next_prepare_;
    std::shared_ptr<const std::vector<int64_t>> order = order_;
    lk.unlock();
    std::optional<Batch> made;
    std::exception_ptr err;
    try {
      made = make_batch(epoch, *order, b);
    } catch (...) {
      err = std::current_exception();
    }
    lk.lock();
    if (gen != generation_) continue;  // start_epoch came in meanwhile: discard
    if (err) {
      error_ = err;
    } else {
      ready_ = std::move(made);
      ++next_prepare_;
    }
    cv_.notify_all();
  }
}

}  // namespace fqt
