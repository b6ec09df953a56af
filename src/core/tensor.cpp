#include "fqt/tensor.hpp"

#include <malloc.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace fqt {

namespace {
// A caching allocator: a training step allocates the same sizes every step, and large blocks
// returned to glibc go back to the kernel (mmap/munmap), so each step would page-fault its
// activations in again (measured: ~10% of a PreAct-ResNet-20 step on an idle machine, several
// times that under load). Freed blocks are kept per exact size and reused; at most
// kCacheLimit bytes are kept.
class BlockCache {
 public:
  void* get(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
        return p;
      }
    }
    return std::aligned_alloc(64, bytes);
  }
  void put(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + bytes <= kCacheLimit) {
        free_[bytes].push_back(p);
        cached_ += bytes;
        return;
      }
    }
    std::free(p);
  }

 private:
  static constexpr size_t kCacheLimit = size_t{1} << 30;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache;  // never destroyed: tensors may outlive statics
  return *cache;
}
}  // namespace

bool retain_freed_memory() {
  const char* off = std::getenv("FQT_NO_MALLOPT");
  if (off && std::strcmp(off, "1") == 0) return false;
  // Requests of up to 1 GiB come from the heap (not mmap), and the heap's top is never trimmed.
  return mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 && mallopt(M_TRIM_THRESHOLD, -1) == 1;
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::i8: return 1;
    case DType::u8: return 1;
    case DType::i32: return 4;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::i8: return "i8";
    case DType::u8: return "u8";
    case DType::i32: return "i32";
  }
  return "?";
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    FQT_CHECK(d >= 0, "negative dimension in shape {}", shape_str(s));
    FQT_CHECK(d == 0 || n <= INT64_MAX / d, "shape {} overflows int64", shape_str(s));
    n *= d;
  }
  return n;
}

Tensor Tensor::empty(Shape shape, DType dtype) {
  Tensor t;
  t.numel_ = shape_numel(shape);
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  // 64-byte alignment: one cache line, one AVX-512 register. Round the size up as
  // aligned_alloc requires; allocate at least one line so data() is never null.
  size_t bytes = (t.nbytes() + 63) / 64 * 64;
  if (bytes == 0) bytes = 64;
  void* p = block_cache().get(bytes);
  FQT_INPUT_CHECK(p != nullptr, "out of memory: a tensor of shape {} needs {} bytes (lower --batch or the input size)",
                  shape_str(t.shape_), bytes);
  t.storage_ = std::shared_ptr<void>(p, [bytes](void* q) { block_cache().put(q, bytes); });
  t.ptr_ = p;
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  Tensor t = empty(std::move(shape), dtype);
  std::memset(t.ptr_, 0, t.nbytes());
  return t;
}

Tensor Tensor::full(Shape shape, double value, DType dtype) {
  Tensor t = empty(std::move(shape), dtype);
  t.fill(value);
  return t;
}

int64_t Tensor::size(int64_t d) const {
  int64_t n = dim();
  if (d < 0) d += n;
  FQT_CHECK(d >= 0 && d < n, "dimension {} out of range for shape {}", d, shape_str(shape_));
  return shape_[d];
}

void Tensor::check_dtype(DType want) const {
  FQT_CHECK(defined(), "access to an undefined tensor");
  FQT_CHECK(dtype_ == want, "tensor has dtype {}, accessed as {}", dtype_name(dtype_), dtype_name(want));
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_);
  if (numel_) std::memcpy(t.ptr_, ptr_, nbytes());
  return t;
}

Tensor Tensor::reshape(Shape shape) const {
  FQT_CHECK(shape_numel(shape) == numel_, "cannot reshape {} to {}", shape_str(shape_), shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

namespace {
template <typename T> double load(const void* p, int64_t i) { return static_cast<double>(static_cast<const T*>(p)[i]); }
template <typename T> void store(void* p, int64_t i, double v) { static_cast<T*>(p)[i] = static_cast<T>(v); }
double load_any(DType t, const void* p, int64_t i) {
  switch (t) {
    case DType::f32: return load<float>(p, i);
    case DType::f64: return load<double>(p, i);
    case DType::i8: return load<int8_t>(p, i);
    case DType::u8: return load<uint8_t>(p, i);
    case DType::i32: return load<int32_t>(p, i);
  }
  return 0;
}
void store_any(DType t, void* p, int64_t i, double v) {
  switch (t) {
    case DType::f32: store<float>(p, i, v); break;
    case DType::f64: store<double>(p, i, v); break;
    case DType::i8: store<int8_t>(p, i, v); break;
    case DType::u8: store<uint8_t>(p, i, v); break;
    case DType::i32: store<int32_t>(p, i, v); break;
  }
}
}  // namespace

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return *this;
  Tensor t = empty(shape_, dtype);
  for (int64_t i = 0; i < numel_; ++i) store_any(dtype, t.ptr_, i, load_any(dtype_, ptr_, i));
  return t;
}

void Tensor::fill(double value) {
  for (int64_t i = 0; i < numel_; ++i) store_any(dtype_, ptr_, i, value);
}

}  // namespace fqt
