// fqt/file.hpp — reading a whole file, the one way every reader of fqt does it.
//
// The dataset readers (IDX, CIFAR-10), the .npy reader, the safetensors / checkpoint reader and
// the run folder's save all read through read_whole_file; the atomic writers are in
// fqt/checkpoint.hpp (write_file_atomic, StagedFile).
#pragma once

#include <string>

namespace fqt {

// The whole file's bytes. Only a regular file is read: a folder is "<path>: is a folder, not a
// file", a FIFO, device or socket "<path>: not a regular file" (opened without blocking, so a
// FIFO with no writer cannot hang the reader, and /dev/zero is not read until memory runs out);
// a file that cannot be opened or read is an InputError naming it and the system's reason.
std::string read_whole_file(const std::string& path);

}  // namespace fqt
