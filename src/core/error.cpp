#include "fqt/error.hpp"

namespace fqt::detail {

void throw_check(const char* cond, const char* file, int line, const std::string& msg) {
  throw Error(fmt::format("{} (check `{}` failed at {}:{})", msg, cond, file, line));
}

}  // namespace fqt::detail
