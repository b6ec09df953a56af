#include "commands.hpp"

#include "fqt/error.hpp"

#include <charconv>
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

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

std::vector<int> parse_bits(const std::string& s, const char* flag) {
  std::vector<int> bits;
  for (const auto& b : split_list(s)) {
    int v = 0;
    size_t used = 0;
    try {
      v = std::stoi(b, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    FQT_INPUT_CHECK(used == b.size() && v >= 2 && v <= 8, "{}: '{}' is not a bit width from 2 to 8", flag, b);
    bits.push_back(v);
  }
  return bits;
}

CLI::Validator whole_number_validator(bool is_unsigned) {
  return CLI::Validator(
      [is_unsigned](std::string& v) -> std::string {
        size_t i = 0;
        const bool negative = !v.empty() && v[0] == '-';
        if (!v.empty() && (v[0] == '+' || v[0] == '-')) i = 1;
        if (i == v.size() || v.find_first_not_of("0123456789", i) != std::string::npos)
          return "'" + v + "' is not a whole number in decimal digits";
        if (negative && is_unsigned && v.find_first_not_of('0', 1) != std::string::npos)
          return "'" + v + "' is negative; it must be >= 0";
        const char* first = v.data() + (v[0] == '+' || (negative && is_unsigned) ? 1 : 0);  // "-0": 0
        const char* last = v.data() + v.size();
        std::string canonical;
        std::errc ec{};
        if (is_unsigned) {
          uint64_t x = 0;
          ec = std::from_chars(first, last, x).ec;
          canonical = std::to_string(x);
        } else {
          int64_t x = 0;
          ec = std::from_chars(first, last, x).ec;
          canonical = std::to_string(x);
        }
        // (the option's own check names its range; a 32-bit option's overflow reads the same)
        if (ec == std::errc::result_out_of_range) return "'" + v + "' is out of this option's range";
        if (ec != std::errc()) return "'" + v + "' is not a whole number in decimal digits";
        v = canonical;  // CLI11 would read "010" as octal 8 and "0x10" as 16
        return {};
      },
      "");
}

}  // namespace fqt::cli
