// fqt/npy.hpp — NumPy .npy arrays (format versions 1.0, 2.0, 3.0).
//
// read_npy accepts float32 and float64 in either byte order and C or Fortran order, and returns
// a native-endian, C-order tensor of the same dtype. Anything else — wrong magic, malformed or
// truncated header, unsupported dtype, a shape whose size overflows, too little or too much
// data — throws InputError with a one-line message that starts with the file name.
#pragma once

#include "fqt/tensor.hpp"

#include <string>

namespace fqt {

Tensor read_npy(const std::string& path);
// Parses an in-memory .npy image (what read_npy does after reading the file); `name` is used
// in messages. Exposed for tests and fuzzing.
Tensor parse_npy(const std::string& bytes, const std::string& name);
// Writes f32, f64, u8, i8 or i32 (little-endian, C order, version 1.0) atomically: a temporary
// file in the same folder, then rename.
void write_npy(const std::string& path, const Tensor& t);

}  // namespace fqt
