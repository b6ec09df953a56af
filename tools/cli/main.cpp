// fqt — fully quantized training. Entry point: subcommand dispatch and error-to-exit-code
// mapping (0 ok, 2 bad input or flags, 1 internal error).
#include "commands.hpp"

#include "fqt/error.hpp"
#include "fqt/tensor.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <new>
#include <string>
#include <vector>

namespace {

// "fqt", "fqt bench", "fqt bench step": the command a parse got to (its parsed subcommands).
CLI::App* deepest_parsed(CLI::App* a) {
  for (CLI::App* s : a->get_subcommands())
    if (s->parsed()) return deepest_parsed(s);
  return a;
}
std::string command_path(const CLI::App* a) {
  std::string path = a->get_name();
  for (const CLI::App* p = a->get_parent(); p; p = p->get_parent()) path = p->get_name() + " " + path;
  return path;
}

// what == prefix + name + sep + value (sep's first occurrence after the prefix): name and value.
bool split_cli11_message(const std::string& what, const std::string& prefix, const std::string& sep,
                         std::string& name, std::string& value) {
  if (what.rfind(prefix, 0) != 0) return false;
  const size_t at = what.find(sep, prefix.size());
  if (at == std::string::npos) return false;
  name = what.substr(prefix.size(), at - prefix.size());
  value = what.substr(at + sep.size());
  return true;
}

// An option name as CLI11 prints it: non-empty, no white space.
bool is_word(const std::string& s) { return !s.empty() && s.find_first_of(" \t\n") == std::string::npos; }

// One line for a command-line error, naming the command whose --help lists the options; an
// unknown subcommand word (CLI11 only says "A subcommand is required") is named with the valid ones.
std::string parse_error_line(CLI::App& app, const CLI::ParseError& e, int argc, char** argv) {
  CLI::App* at = deepest_parsed(&app);
  const std::string where = command_path(at);
  std::string what = e.what();
  if (what.find("subcommand is required") != std::string::npos) {
    std::vector<std::string> names;
    for (const CLI::App* s : at->get_subcommands({})) names.push_back(s->get_name());
    std::string unknown;
    for (int i = 1; i < argc && unknown.empty(); ++i) {
      const std::string w = argv[i];
      if (w.empty() || w[0] == '-') continue;
      bool known = false;
      for (const CLI::App* a = at; a && !known; a = a->get_parent()) known = a->get_name() == w;
      for (const std::string& n : names) known = known || n == w;
      if (!known) unknown = w;
    }
    for (int i = 1; i < argc && unknown.empty(); ++i) {  // an option before the command: `fqt --frob`
      const std::string w = argv[i];
      if (w.size() > 1 && w[0] == '-' && !at->get_option_no_throw(w.substr(0, w.find('=')))) {
        what = fmt::format("unknown option '{}' for `{}`; a command comes first", w, where);
        return fmt::format("fqt: error: {} (see `{} --help`)", what, where);
      }
    }
    what = (unknown.empty() ? fmt::format("`{}` needs a command", where)
                            : fmt::format("unknown command '{}' for `{}`", unknown, where)) +
           fmt::format(" (one of: {})", fmt::join(names, ", "));
  }
  // CLI11's wording for a value its conversion rejects and for a repeated option.
  std::string name, value;
  if (split_cli11_message(what, "Could not convert: ", " = ", name, value) && is_word(name)) {
    const CLI::Option* o = at->get_option_no_throw(name);
    const std::string type = o ? o->get_type_name() : "";
    what = type.rfind("INT", 0) == 0 || type.rfind("UINT", 0) == 0
               ? fmt::format("{}: '{}' is out of this option's range", name, value)
           : type.rfind("FLOAT", 0) == 0 ? fmt::format("{}: '{}' is not a number", name, value)
                                         : fmt::format("{}: cannot read '{}'", name, value);
  } else if (split_cli11_message(what, "", ": At Most 1 required but received ", name, value) && is_word(name) &&
             !value.empty() && value.find_first_not_of("0123456789") == std::string::npos) {
    const CLI::Option* o = at->get_option_no_throw(name);
    std::string names = o ? o->get_name(false, true) : name;  // "-k,--samples": either counts
    std::replace(names.begin(), names.end(), ',', '/');
    what = fmt::format("{} was given {} times; give it once", names, value);
  }
  return fmt::format("fqt: error: {} (see `{} --help`)", what, where);
}

// An empty value ("--momentum ''" or "--seed=") would be read as 0 by CLI11's conversions, and an
// empty list item dropped.
bool reject_empty_values(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    std::string opt;
    if (a.empty()) opt = i > 1 && argv[i - 1][0] == '-' ? argv[i - 1] : "";
    else if (a.size() > 2 && a.rfind("--", 0) == 0 && a.back() == '=') opt = a.substr(0, a.size() - 1);
    else {
      // A list with an empty item ("4,,8", "0.25,", ","): CLI11's own list options drop it.
      const std::string v = a.rfind("--", 0) == 0 && a.find('=') != std::string::npos ? a.substr(a.find('=') + 1) : a;
      if (v.find(',') != std::string::npos && (v.front() == ',' || v.back() == ',' || v.find(",,") != std::string::npos)) {
        std::fprintf(stderr, "fqt: error: the list '%s' has an empty item\n", v.c_str());
        return true;
      }
      continue;
    }
    if (opt.empty()) std::fprintf(stderr, "fqt: error: argument %d is an empty string\n", i);
    else std::fprintf(stderr, "fqt: error: %s was given an empty value\n", opt.c_str());
    return true;
  }
  return false;
}

// whole_number_validator on every integer option of `a` and its subcommands.
void check_integer_options(CLI::App* a) {
  for (CLI::Option* o : a->get_options()) {
    const std::string t = o->get_type_name();
    const bool is_unsigned = t.rfind("UINT", 0) == 0;
    if (is_unsigned || t.rfind("INT", 0) == 0) o->transform(fqt::cli::whole_number_validator(is_unsigned));
  }
  for (CLI::App* s : a->get_subcommands({})) check_integer_options(s);
}

}  // namespace

int main(int argc, char** argv) {
  // OpenMP threads that spin while waiting stall every barrier when another process holds the
  // core (measured: a 0.35 s training step took 3-4 s at load 4). But threads that go to sleep at
  // once pay a wake-up at each of the few hundred parallel regions of a step: a short spin first
  // (GOMP_SPINCOUNT 10000, ~0.1 ms) catches the next region. Measured on the 2-core Zen 3 VM,
  // PreAct-ResNet-20 FQT-PSQ step, 2 threads: 3-19% faster than no spin in each of 4 rounds
  // (fp32: 2-4%), and with two busy processes on the cores 733 ms against 790-857 (no spin) and
  // 912-965 (OMP_WAIT_POLICY=active). libgomp reads both when it loads, before main, so set them
  // and re-execute once unless the user chose a policy.
  if (!std::getenv("OMP_WAIT_POLICY")) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    if (!std::getenv("GOMP_SPINCOUNT")) setenv("GOMP_SPINCOUNT", "10000", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: then carry on as we are
  }
  // Freed scratch stays in the heap instead of going back to the kernel (tensor.hpp). The
  // training step was already steady (~90 page faults per step); single calls of the quantizers
  // were not (bench_quantizers: quantize psq 6.9 -> 2.2 ms; docs/profiles/README.md, session 7).
  fqt::retain_freed_memory();
  CLI::App app{
      "fqt: fully quantized training — forward and both backward GEMMs on low-bitwidth integers,\n"
      "with unbiased stochastic gradient quantizers (PTQ, PSQ, BHQ; Chen et al., NeurIPS 2020).\n"
      "Run `fqt <command> --help` for a command's options."};
  app.name("fqt");
  app.require_subcommand(1);
  app.set_version_flag("--version", "fqt 0.1.0");
  std::map<CLI::App*, fqt::cli::Runner> runners;
  auto add = [&](const char* name, const char* desc, auto adder) {
    CLI::App* sub = app.add_subcommand(name, desc);
    runners[sub] = adder(*sub);
  };
  add("train", "Train a model in fp32, QAT or FQT on Fashion-MNIST, MNIST or CIFAR-10", fqt::cli::add_train);
  add("eval", "Test accuracy of a training checkpoint", fqt::cli::add_eval);
  add("bench", "Benchmarks: int8 vs fp32 GEMM throughput, training step time per precision mode", fqt::cli::add_bench);
  add("quantize", "Measure bias and variance of gradient quantizers on a matrix (.npy)", fqt::cli::add_quantize);
  add("variance", "Bias and variance of the FQT gradient of a network, per layer and in total (PTQ/PSQ/BHQ)",
      fqt::cli::add_variance);
  add("synth", "Write a synthetic gradient-like matrix (.npy) to try the quantizers on", fqt::cli::add_synth);

  check_integer_options(&app);
  if (reject_empty_values(argc, argv)) return 2;
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "%s\n", parse_error_line(app, e, argc, argv).c_str());
    return 2;
  }
  try {
    for (auto& [sub, run] : runners)
      if (sub->parsed()) return run();
  } catch (const fqt::InputError& e) {
    std::fprintf(stderr, "fqt: error: %s\n", e.what());
    return 2;
  } catch (const fqt::NonFiniteError& e) {
    std::fprintf(stderr, "fqt: error: %s\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "fqt: error: out of memory (lower --batch or the sizes asked for)\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fqt: internal error: %s\n", e.what());
    return 1;
  }
  return 1;
}
