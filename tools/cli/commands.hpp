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

// "a,b,c" -> {"a","b","c"} (empty items dropped).
std::vector<std::string> split_list(const std::string& s);

}  // namespace fqt::cli
