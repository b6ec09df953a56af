// The `fqt` subcommands. Each registers its options on a CLI11 subcommand and returns the
// function that runs it. Errors: throw fqt::InputError for bad input (exit 2); main() maps.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

namespace fqt::cli {

using Runner = std::function<int()>;

Runner add_quantize(CLI::App& app);
Runner add_synth(CLI::App& app);
Runner add_train(CLI::App& app);
Runner add_eval(CLI::App& app);
Runner add_bench(CLI::App& app);
Runner add_variance(CLI::App& app);

// "a,b,c" -> {"a","b","c"}, items trimmed; an empty item ("4,,8", "4,") is an InputError.
std::vector<std::string> split_list(const std::string& s);
// "4,8" -> {4, 8} (never empty: split_list refuses empty items): each item a bit width 2..8,
// else an InputError naming `flag`.
std::vector<int> parse_bits(const std::string& s, const char* flag);
// Every integer option's check (main() adds it to each INT / UINT option): decimal digits only
// (CLI11 reads "010" as octal and "0x10" as hex), within the 64-bit range (CLI11 clamps
// 99999999999999999999 to the largest value without a word, and reads "-1" for an unsigned
// option such as --seed as 2^64 - 1); narrower types are range-checked by CLI11's conversion.
CLI::Validator whole_number_validator(bool is_unsigned);

}  // namespace fqt::cli
