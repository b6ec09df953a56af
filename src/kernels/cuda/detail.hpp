// Internal to the CUDA component (src/kernels/cuda/): helpers one .cu file lends another.
#pragma once

#include "fqt/cuda.hpp"

namespace fqt::cuda::detail {

// BHQ's block transform of quantize.cu on rows x cols device floats: forward (T x) or inverse
// (T^-1 y), with the float operation order of BhqTransform::apply / apply_inverse. Asynchronous.
void bhq_apply_device(bool inverse, const float* in, float* out, int64_t rows, int64_t cols, const DeviceQuantized& q,
                      cudaStream_t stream);

}  // namespace fqt::cuda::detail
