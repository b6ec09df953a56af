// fqt/tensor.hpp — dense CPU tensors with a shape, a dtype and 64-byte aligned storage.
//
// A Tensor is a cheap handle: copies share storage (like a shared_ptr); clone() copies data.
// Layout is always contiguous row-major. Shapes use N,C,H,W letters by convention.
#pragma once

#include "fqt/error.hpp"

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace fqt {

enum class DType : uint8_t { f32, f64, i8, u8, i32 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<int8_t>() { return DType::i8; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::u8; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// Process-wide allocator setting for programs that train (the CLI and the benchmarks call it
// first thing): glibc keeps freed memory in the heap instead of handing large blocks back to the
// kernel (mmap/munmap), from where the next call would page-fault and zero-fill them afresh.
// The tensor block cache covers Tensors; this covers the std::vector scratch of quantizers and
// GEMM epilogues too. Returns false (and does nothing) when FQT_NO_MALLOPT=1 is set, so the
// effect can be measured, or when the C library refuses.
bool retain_freed_memory();

class Tensor {
 public:
  Tensor() = default;
  // Uninitialised storage of the given shape and dtype.
  static Tensor empty(Shape shape, DType dtype = DType::f32);
  static Tensor zeros(Shape shape, DType dtype = DType::f32);
  static Tensor full(Shape shape, double value, DType dtype = DType::f32);
  template <typename T>
  static Tensor from(Shape shape, const std::vector<T>& values) {
    Tensor t = empty(std::move(shape), dtype_of<T>());
    FQT_CHECK(static_cast<int64_t>(values.size()) == t.numel(), "Tensor::from: {} values for shape {}",
              values.size(), shape_str(t.shape()));
    std::copy(values.begin(), values.end(), t.data<T>());
    return t;
  }

  bool defined() const { return static_cast<bool>(storage_); }
  // Whether this is the only handle on its storage (no copy, reshape or view shares it): then
  // the holder may write over the data without anyone else seeing it change.
  bool sole_handle() const { return storage_ && storage_.use_count() == 1; }
  const Shape& shape() const { return shape_; }
  int64_t dim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return numel_; }
  DType dtype() const { return dtype_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }

  // Typed access; checks that T matches the dtype.
  template <typename T> T* data() {
    check_dtype(dtype_of<T>());
    return static_cast<T*>(ptr_);
  }
  template <typename T> const T* data() const {
    check_dtype(dtype_of<T>());
    return static_cast<const T*>(ptr_);
  }
  void* raw() { return ptr_; }
  const void* raw() const { return ptr_; }

  Tensor clone() const;
  // Same storage, new shape (numel must match).
  Tensor reshape(Shape shape) const;
  // Converted copy (or this tensor if the dtype already matches).
  Tensor to(DType dtype) const;
  void fill(double value);

 private:
  void check_dtype(DType want) const;
  std::shared_ptr<void> storage_;
  void* ptr_ = nullptr;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::f32;
};

}  // namespace fqt
