// CUDA runtime helpers: device detection, errors, device buffers, host <-> device copies.
#include "fqt/cuda.hpp"

namespace fqt {

bool cuda_available() { return cuda::device_count() > 0; }

namespace cuda {

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw Error(fmt::format("CUDA error {} ({}): {} [{}] at {}:{}", static_cast<int>(err), cudaGetErrorName(err),
                          cudaGetErrorString(err), expr, file, line));
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string device_name(int device) {
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

void DeviceBuffer::reserve(size_t bytes) {
  if (bytes <= bytes_ && ptr_) return;
  reset();
  if (bytes == 0) return;
  CUDA_CHECK(cudaMalloc(&ptr_, bytes));
  bytes_ = bytes;
}

void DeviceBuffer::reset() noexcept {
  if (ptr_) cudaFree(ptr_);  // errors here (a dead context at exit) cannot be reported usefully
  ptr_ = nullptr;
  bytes_ = 0;
}

void copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

void copy_to_host(void* dst, const void* src, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

DeviceTensor upload(const Tensor& t, cudaStream_t stream) {
  FQT_CHECK(t.defined(), "cuda::upload: undefined tensor");
  DeviceTensor d;
  d.shape = t.shape();
  d.dtype = t.dtype();
  d.buffer.reserve(d.nbytes());
  copy_to_device(d.buffer.data(), t.raw(), d.nbytes(), stream);
  return d;
}

Tensor download(const DeviceTensor& d, cudaStream_t stream) {
  Tensor t = Tensor::empty(d.shape, d.dtype);
  copy_to_host(t.raw(), d.buffer.data(), d.nbytes(), stream);
  return t;
}

}  // namespace cuda
}  // namespace fqt
