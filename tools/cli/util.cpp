#include "commands.hpp"

#include "fqt/error.hpp"

#include <cstdint>

namespace fqt::cli {

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t b = 0;
  while (b <= s.size()) {
    size_t e = s.find(',', b);
    if (e == std::string::npos) e = s.size();
    std::string item = s.substr(b, e - b);
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    while (!item.empty() && item.back() == ' ') item.pop_back();
    FQT_INPUT_CHECK(!item.empty(), "the list '{}' has an empty item", s);
    out.push_back(item);
    b = e + 1;
  }
  return out;
}

CLI::Validator seed_validator() {
  return CLI::Validator(
      [](std::string& v) -> std::string {
        if (v.empty() || v.size() > 20 || v.find_first_not_of("0123456789") != std::string::npos)
          return "a seed is an integer from 0 to 2^64 - 1, got '" + v + "'";
        if (v.size() == 20 && v > "18446744073709551615") return "a seed is at most 2^64 - 1, got " + v;
        return {};
      },
      "SEED");
}

}  // namespace fqt::cli
