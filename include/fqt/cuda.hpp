// fqt/cuda.hpp — the CUDA component (target fqt_cuda, defines FQT_HAVE_CUDA=1): device
// detection, errors, device memory, the quantizers and the integer GEMM (cuBLASLt) on the GPU.
//
// Only code that links fqt_cuda may include this header; the CPU library never depends on CUDA.
// The quantizer kernels run the grid formulas of src/quant/grid.hpp (compiled host+device with
// --fmad=false) and the same Philox mapping as the CPU, so codes, grids and BHQ transforms are
// bit-identical to quantize_ref (tests/cuda/test_cuda_quantize.cpp). See docs/CUDA.md.
#pragma once

#include "fqt/error.hpp"
#include "fqt/quant.hpp"
#include "fqt/rng.hpp"
#include "fqt/tensor.hpp"

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

namespace fqt {

// True when a CUDA device is present and usable. Never throws (no driver: false).
bool cuda_available();

namespace cuda {
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);
}  // namespace cuda
}  // namespace fqt

// CUDA_CHECK(expr): throws fqt::Error naming the expression, file, line and CUDA's error string.
#define CUDA_CHECK(expr)                                                                  \
  do {                                                                                    \
    const cudaError_t fqt_cuda_err_ = (expr);                                             \
    if (fqt_cuda_err_ != cudaSuccess) [[unlikely]]                                        \
      ::fqt::cuda::throw_cuda_error(fqt_cuda_err_, #expr, __FILE__, __LINE__);            \
  } while (0)

namespace fqt::cuda {

int device_count();  // 0 without a driver or device
std::string device_name(int device = 0);

// Owning device allocation (cudaMalloc / cudaFree), move-only. Freed memory is returned at once:
// hot paths keep their buffers (reserve() grows, never shrinks) instead of reallocating.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { reserve(bytes); }
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr, o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      ptr_ = o.ptr_, bytes_ = o.bytes_;
      o.ptr_ = nullptr, o.bytes_ = 0;
    }
    return *this;
  }

  void* data() { return ptr_; }
  const void* data() const { return ptr_; }
  template <typename T> T* as() { return static_cast<T*>(ptr_); }
  template <typename T> const T* as() const { return static_cast<const T*>(ptr_); }
  size_t bytes() const { return bytes_; }  // capacity
  bool empty() const { return ptr_ == nullptr; }

  // Ensures a capacity of at least `bytes` (contents are not kept when it grows).
  void reserve(size_t bytes);
  void reset() noexcept;

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// A dense row-major tensor in device memory.
struct DeviceTensor {
  DeviceBuffer buffer;
  Shape shape;
  DType dtype = DType::f32;
  int64_t numel() const { return shape_numel(shape); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  template <typename T> T* data() {
    FQT_CHECK(dtype_of<T>() == dtype, "DeviceTensor holds {}", dtype_name(dtype));
    return buffer.as<T>();
  }
  template <typename T> const T* data() const {
    FQT_CHECK(dtype_of<T>() == dtype, "DeviceTensor holds {}", dtype_name(dtype));
    return buffer.as<T>();
  }
};

// Synchronous copies (the stream is synchronised before returning).
DeviceTensor upload(const Tensor& t, cudaStream_t stream = nullptr);
Tensor download(const DeviceTensor& t, cudaStream_t stream = nullptr);
void copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream = nullptr);
void copy_to_host(void* dst, const void* src, size_t bytes, cudaStream_t stream = nullptr);

// ---- quantizers ----------------------------------------------------------------------------

// A quantized matrix resident on the device (QuantizedTensor's layout). Buffers are reused
// across calls of quantize_device with the same object.
struct DeviceQuantized {
  QuantizerSpec spec;
  int64_t rows = 0, cols = 0;
  DeviceBuffer codes;      // u8 [rows, cols]
  DeviceBuffer scale, lo;  // f32 [groups]
  // BHQ only: the transform in BhqTransform's layout. The number of groups is computed on the
  // device and stays there (status[0]); offsets has room for rows + 1 entries.
  DeviceBuffer row_scale;  // f32 [rows]
  DeviceBuffer offsets;    // i64 [groups + 1]
  DeviceBuffer members;    // i64 [rows]
  DeviceBuffer status;     // i64 [2]: BHQ group count; error bits (1: non-finite input, 2: BHQ grouping)

  Granularity granularity() const { return traits(spec.kind).granularity; }
  int64_t num_groups() const;  // grids: 1, rows or cols
  // Synchronises, then throws NonFiniteError / Error if the device flagged a problem.
  void check(cudaStream_t stream = nullptr) const;
  // BHQ: the number of transform groups (synchronises). 0 for other kinds.
  int64_t bhq_groups(cudaStream_t stream = nullptr) const;
};

// Quantizes x (f32 [rows, cols], device memory) into `out`, asynchronously on `stream`: no host
// synchronisation; call out.check() to turn device-side errors (non-finite input) into
// exceptions. Codes, grids and transform equal quantize_ref's on the same input and key.
// Not reentrant per host thread with several streams at once (one scratch workspace per thread).
void quantize_device(const float* x, int64_t rows, int64_t cols, QuantizerSpec spec, RngKey key,
                     DeviceQuantized& out, cudaStream_t stream = nullptr);
// out (f32 [rows, cols], device) = dequantized values, applying T^-1 for BHQ. Asynchronous.
void dequantize_device(const DeviceQuantized& q, float* out, cudaStream_t stream = nullptr);

// Host <-> device copies of a quantized tensor (synchronous).
QuantizedTensor download(const DeviceQuantized& q, cudaStream_t stream = nullptr);
DeviceQuantized upload(const QuantizedTensor& q, cudaStream_t stream = nullptr);

// ---- integer GEMM (cuBLASLt, INT8 tensor cores) --------------------------------------------

// C = A B_t^T on the device, the CPU's "A B^T" layout (fqt/igemm.hpp), all row-major device
// pointers: A s8 [M, K] (row stride lda), B_t s8 [N, K] (ldb), C [M, N] (ldc). Exact: cuBLASLt
// with int32 compute (CUBLAS_COMPUTE_32I) on the INT8 tensor cores.
//
// cuBLASLt's int8 kernels need the "TN" form with m, k and the leading dimensions multiples of 4
// (16-byte aligned pointers for speed). Row-major A B^T is exactly that form (cuBLASLt's A is
// our B_t, its B our A). Shapes or strides that do not fit are copied into zero-padded scratch
// (K up to a multiple of 16, N of 4; zeros add nothing), so any shape works.
//
// No silent overflow: an int32 sum of K products is exact while K a_absmax b_absmax < 2^31.
// igemm_s8s8s32 throws fqt::Error past that bound; igemm_s8s8s64 splits K into chunks within it
// and sums the chunks in int64. a_absmax / b_absmax bound |A| and |B| (default: full s8 range;
// 7-bit codes 0..127 may pass 127). Asynchronous on `stream`; scratch (padded copies, the
// cuBLASLt workspace) is per host thread: not reentrant per host thread with several streams at once.
void igemm_s8s8s32(int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda, const int8_t* B_t, int64_t ldb,
                   int32_t* C, int64_t ldc, cudaStream_t stream = nullptr, int64_t a_absmax = 128,
                   int64_t b_absmax = 128);
void igemm_s8s8s64(int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda, const int8_t* B_t, int64_t ldb,
                   int64_t* C, int64_t ldc, cudaStream_t stream = nullptr, int64_t a_absmax = 128,
                   int64_t b_absmax = 128);
// The K chunk igemm_s8s8s64 uses for these bounds (a multiple of 16; the s32 bound rounded down).
int64_t igemm_chunk_k(int64_t a_absmax, int64_t b_absmax);

// C (f32 [a.rows, b.rows], device, row-major, contiguous) = deq(A) deq(B)^T, or += with
// accumulate: qgemm() of fqt/igemm.hpp on the device, bit-identical to it (same integer sums
// from igemm_s8s8s*, the same double epilogue term for term, the same operand swap for N > M,
// BHQ's T^-1 on a BHQ left operand). Grids per tensor or per row on both sides; a per-column
// grid or a BHQ right operand throws fqt::Error. Asynchronous on `stream`; scratch per host
// thread (not reentrant per host thread with several streams at once).
void qgemm_device(const DeviceQuantized& a, const DeviceQuantized& b, float* c, bool accumulate = false,
                  cudaStream_t stream = nullptr);

}  // namespace fqt::cuda

namespace fqt {
// Host convenience: upload x (validated like quantize_ref: NonFiniteError names the position),
// quantize on the device, copy everything back. Same result as quantize_ref(x, spec, key).
QuantizedTensor quantize_cuda(const Tensor& x, QuantizerSpec spec, RngKey key = {});
// dequantize() on the device: upload, dequantize (and T^-1), download.
Tensor dequantize_cuda(const QuantizedTensor& q);
// qgemm() on the device: upload both operands (and C when accumulating onto *c), multiply, download.
Tensor qgemm_cuda(const QuantizedTensor& a, const QuantizedTensor& b, const Tensor* c = nullptr);
}  // namespace fqt
