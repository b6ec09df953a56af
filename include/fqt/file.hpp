// fqt/file.hpp — reading files, the one way every reader of fqt does it.
//
// The dataset readers (IDX, CIFAR-10), the .npy reader, the safetensors / checkpoint reader
// (whole, or only its header through InputFile) and the run folder's save all read through here;
// the atomic writers are in fqt/checkpoint.hpp (write_file_atomic, StagedFile).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fqt {

// A regular file open for reading; closed when destroyed. Only a regular file opens: a folder is
// "<path>: is a folder, not a file", a FIFO, device or socket "<path>: not a regular file"
// (opened without blocking, so a FIFO with no writer cannot hang the reader, and /dev/zero is not
// read until memory runs out); a file that cannot be opened or read is an InputError naming it
// and the system's reason.
class InputFile {
 public:
  explicit InputFile(const std::string& path);
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  uint64_t size() const { return size_; }  // when opened
  // The next n bytes; "<path>: read failed (...)" if the file ends before them.
  std::string read(size_t n);
  // Everything from here to the end.
  std::string read_rest();

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// The whole file's bytes (InputFile(path).read_rest()).
std::string read_whole_file(const std::string& path);

}  // namespace fqt
