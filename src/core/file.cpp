#include "fqt/file.hpp"

#include "fqt/error.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace fqt {

InputFile::InputFile(const std::string& path) : path_(path) {
  // O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever (regular files ignore it).
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) throw InputError(fmt::format("{}: cannot open ({})", path, std::strerror(errno)));
  struct stat st {};
  std::string refused;
  if (::fstat(fd_, &st) != 0)
    refused = fmt::format("{}: cannot stat ({})", path, std::strerror(errno));
  else if (S_ISDIR(st.st_mode))
    refused = fmt::format("{}: is a folder, not a file", path);
  else if (!S_ISREG(st.st_mode))
    refused = fmt::format("{}: not a regular file", path);
  if (!refused.empty()) {
    ::close(fd_);  // (the destructor does not run when the constructor throws)
    throw InputError(refused);
  }
  size_ = static_cast<uint64_t>(st.st_size);
}

InputFile::~InputFile() { ::close(fd_); }

std::string InputFile::read(size_t n) {
  std::string out(n, '\0');
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::read(fd_, out.data() + got, n - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw InputError(fmt::format("{}: read failed ({})", path_, std::strerror(errno)));
    if (r == 0)
      throw InputError(fmt::format("{}: read failed (the file ends after {} of {} bytes; was it truncated while read?)",
                                   path_, got, n));
    got += static_cast<size_t>(r);
  }
  return out;
}

std::string InputFile::read_rest() {
  std::string out;
  out.reserve(static_cast<size_t>(size_));
  char buf[1 << 16];
  for (;;) {
    const ssize_t r = ::read(fd_, buf, sizeof buf);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) throw InputError(fmt::format("{}: read failed ({})", path_, std::strerror(errno)));
    if (r == 0) break;
    out.append(buf, static_cast<size_t>(r));
  }
  return out;
}

std::string read_whole_file(const std::string& path) { return InputFile(path).read_rest(); }

}  // namespace fqt
