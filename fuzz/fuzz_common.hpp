// Shared harness of the libFuzzer targets: a parser may accept the bytes or reject them with
// fqt::InputError (a clear, one-line message for the user). Anything else is a bug: another
// exception type (fqt::Error = a broken invariant, std::bad_alloc, std::out_of_range, ...),
// a crash, or a sanitizer report (the targets are built with -fsanitize=fuzzer,address,undefined).
#pragma once

#include "fqt/error.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

namespace fqt_fuzz {

template <typename F>
void expect_clean(F&& parse) {
  try {
    parse();
  } catch (const fqt::InputError& e) {
    // Fine: rejected with a message. It must be a real message, not an empty string.
    if (e.what()[0] == '\0') {
      std::fprintf(stderr, "fuzz: InputError with an empty message\n");
      std::abort();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz: unexpected exception (not fqt::InputError): %s\n", e.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "fuzz: unexpected non-std exception\n");
    std::abort();
  }
}

}  // namespace fqt_fuzz
