// The `fqt` subcommands. Each registers its options on a CLI11 subcommand and returns the
// function that runs it. Errors: throw fqt::InputError for bad input (exit 2); main() maps.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

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
// --seed's check: a decimal integer 0..2^64-1 (CLI11 would read "-1" as 2^64 - 1).
CLI::Validator seed_validator();

}  // namespace fqt::cli
