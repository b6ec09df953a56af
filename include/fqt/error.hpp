// fqt/error.hpp — the one error mechanism of fqt.
//
// FQT_CHECK(cond, fmt, args...) throws fqt::Error with a formatted message that names the
// failed condition, the file and the line. User-facing errors (bad files, bad flags) throw
// fqt::InputError instead: the CLI prints its message on one line and exits with status 2.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace fqt {

// An internal invariant or API contract was violated (a bug or a misuse of the library).
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The user gave something unusable: a malformed file, a wrong shape, a nonsense flag.
// The message says what was wrong and, where possible, how to fix it.
class InputError : public Error {
 public:
  using Error::Error;
};

namespace detail {
[[noreturn]] void throw_check(const char* cond, const char* file, int line, const std::string& msg);
}  // namespace detail

}  // namespace fqt

#define FQT_CHECK(cond, ...)                                                              \
  do {                                                                                    \
    if (!(cond)) [[unlikely]]                                                             \
      ::fqt::detail::throw_check(#cond, __FILE__, __LINE__, ::fmt::format(__VA_ARGS__)); \
  } while (0)

// Input validation: throws InputError with just the message (no file/line: it is for users).
#define FQT_INPUT_CHECK(cond, ...)                                    \
  do {                                                                \
    if (!(cond)) [[unlikely]]                                         \
      throw ::fqt::InputError(::fmt::format(__VA_ARGS__));            \
  } while (0)

namespace fqt {
// A NaN or Inf where finite numbers are required (quantizer input, loss, gradients).
class NonFiniteError : public Error {
 public:
  using Error::Error;
};
}  // namespace fqt
