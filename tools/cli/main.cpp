// fqt — fully quantized training. Entry point: subcommand dispatch and error-to-exit-code
// mapping (0 ok, 2 bad input or flags, 1 internal error).
#include "commands.hpp"

#include "fqt/error.hpp"
#include "fqt/tensor.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>

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

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "fqt: error: %s\n", e.what());
    std::fprintf(stderr, "Run with --help for the options.\n");
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
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fqt: internal error: %s\n", e.what());
    return 1;
  }
  return 1;
}
