// fqt bench: benchmarks, side by side in one run, medians.
//   fqt bench gemm: int8 GEMM (igemm_u8s8s32, automatic backend) against fp32 sgemm on the same
//                   shapes: MxNxK and, with --shapes MODEL, the GEMMs the model's layers run.
//   fqt bench step: full training steps (forward + both backward GEMMs + quantizers + SGD) of a
//                   model in several precision modes / dgrad quantizers / arithmetics; each
//                   configuration runs in its own fork()ed child so that its peak RSS is its own.
//   fqt bench memory: what the caches hold on this machine now: the latency of dependent random
//                   loads and the read bandwidth of one thread, by working-set size.
#include "commands.hpp"

#include "fqt/gemm.hpp"
#include "fqt/igemm.hpp"
#include "fqt/layers.hpp"
#include "fqt/models.hpp"
#include "fqt/optim.hpp"
#include "fqt/profile.hpp"
#include "fqt/stats.hpp"

#include <nlohmann/json.hpp>
#include <omp.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>

namespace fqt::cli {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void parse_input(const std::string& input, int& c, int& h, int& w) {
  int end = 0;
  FQT_INPUT_CHECK(std::sscanf(input.c_str(), "%dx%dx%d%n", &c, &h, &w, &end) == 3 &&
                      end == static_cast<int>(input.size()) && c > 0 && h > 0 && w > 0,
                  "--input must look like CxHxW, e.g. 1x28x28 (got '{}')", input);
  FQT_INPUT_CHECK(c <= 64 && h <= 1024 && w <= 1024, "--input {}: at most 64 channels and 1024 x 1024 pixels", input);
}

// ---- fqt bench gemm ---------------------------------------------------------------------------

struct GemmOptions {
  int64_t m = 1024, n = 1024, k = 1024;
  std::string shapes;  // model name: add the GEMM shapes of its layers
  int64_t batch = 128;
  std::string input = "1x28x28";
  int reps = 11, threads = 0;
  std::string backend = "auto";
  bool json = false;
};

// One GEMM shape as the layers run it: `count` independent M x N x K products per layer call
// (Conv2d runs one per sample, in parallel over samples, each on one thread; count 1: one
// product using all threads). `uses` lists "layer role" for every layer GEMM of this shape.
struct GemmShape {
  int64_t m, n, k, count;
  std::vector<std::string> uses;
  // The integer path's own layout of the same product (0: same as m, n, k). Operations are
  // counted from m, n, k: dgrad's extra correction column is not useful work.
  int64_t im = 0, in = 0, ik = 0;
  // How Conv2d's integer path runs the `count` products: fprop and dgrad with B (the weights)
  // packed once per layer call (shared_b); wgrad with `per_gemm` samples side by side along k in
  // each of `groups` groups (Conv2d::wgrad_int_plan). 0 / false: one product per sample.
  bool shared_b = false;
  int64_t per_gemm = 0, groups = 0;
};

// The GEMMs of a model's quantized layers at the given batch and input, derived from the layers
// themselves: a batch-1 fp32 training forward gives each Conv2d's saved input (C*H*W floats),
// hence its input size; the weight gives Cout, Cin, k; out_size() the output size. Shapes follow
// src/nn/conv2d.cpp (per sample, P = Ho*Wo, ckk = Cin*k*k):
//   fprop  Y_n [Cout, P]  = W [Cout, ckk] . cols_n [ckk, P]       M=Cout N=P   K=ckk
//   dgrad  dcols_n [ckk, P] = W^T [ckk, Cout] . G_n [Cout, P]     M=ckk  N=P   K=Cout
//   wgrad  dW [Cout, ckk] += G_n [Cout, P] . cols_n^T [P, ckk]    M=Cout N=ckk K=P
// and src/nn/linear.cpp (whole batch): fprop M=N_b N=out K=in, dgrad M=N_b N=in K=out,
// wgrad M=out N=in K=N_b. The integer path (src/nn/conv2d_int.cpp) computes the same conv
// products with the per-sample operand as A (C = A B^T):
//   fprop  [P, Cout] = patches [P, ckk] . W^T                      M=P    N=Cout   K=ckk
//   dgrad  [P, ckk] = G_n [P, Cout] . W^T (+ code row sums by a pass) M=P   N=ckk    K=Cout
//   wgrad  [ckk, Cout] = cols_n [ckk, P] . G_n^T                   M=ckk  N=Cout   K=P
// (fprop and dgrad with the weights packed once per layer call; wgrad a few samples per product,
// K = per_gemm * P, as Conv2d::wgrad_int_plan says.)
std::vector<GemmShape> model_gemm_shapes(const std::string& model, const std::string& input, int64_t batch) {
  int c = 0, h = 0, w = 0;
  parse_input(input, c, h, w);
  Recipe r;  // fp32: the layers keep their fp32 input
  FQT_INPUT_CHECK(h == w, "--shapes needs a square --input (got {})", input);
  ModulePtr net = make_model(model, c, h, w, 10, r, 0);
  const Tensor x = Tensor::zeros({2, c, h, w});  // (2 samples: batch norm needs more than one value)
  net->forward(x, StepContext{true, 0, 0});
  std::vector<QuantizedLayer*> layers;
  net->collect_quantized(layers);
  std::vector<GemmShape> out;
  auto add = [&](int64_t m, int64_t n, int64_t k, int64_t count, std::string use, int64_t im = 0, int64_t in = 0,
                 int64_t ik = 0, bool shared_b = false, Conv2d::WgradPlan plan = {0, 0}) {
    for (auto& s : out)
      if (s.m == m && s.n == n && s.k == k && s.count == count && s.im == im && s.in == in && s.ik == ik &&
          s.shared_b == shared_b && s.per_gemm == plan.per_gemm && s.groups == plan.groups) {
        s.uses.push_back(std::move(use));
        return;
      }
    out.push_back({m, n, k, count, {std::move(use)}, im, in, ik, shared_b, plan.per_gemm, plan.groups});
  };
  for (QuantizedLayer* l : layers) {
    if (auto* conv = dynamic_cast<Conv2d*>(l)) {
      const Shape& ws = conv->weight().value.shape();
      const int64_t cout = ws[0], cin = ws[1], kk = ws[2] * ws[3];
      std::vector<std::pair<const void*, size_t>> saved;
      conv->collect_saved(saved);
      size_t bytes = 0;
      for (auto& s : saved) bytes += s.second;
      const int64_t hw = static_cast<int64_t>(bytes / sizeof(float)) / (2 * cin);
      const auto hin = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(hw))));
      FQT_CHECK(hin * hin == hw && static_cast<int64_t>(bytes) == 2 * cin * hw * 4,
                "bench gemm: cannot infer the input size of {} (saved {} bytes, Cin {})", conv->name(), bytes, cin);
      const int64_t ho = conv->out_size(hin), P = ho * ho, ckk = cin * kk;
      add(cout, P, ckk, batch, conv->name() + " fprop", P, cout, ckk, true);
      add(ckk, P, cout, batch, conv->name() + " dgrad", P, ckk, cout, true);
      add(cout, ckk, P, batch, conv->name() + " wgrad", ckk, cout, P, false, Conv2d::wgrad_int_plan(batch, ckk, cout, P));
    } else if (auto* lin = dynamic_cast<Linear*>(l)) {
      const int64_t in = lin->in_features(), o = lin->out_features();
      add(batch, o, in, 1, lin->name() + " fprop");
      add(batch, in, o, 1, lin->name() + " dgrad");
      add(o, in, batch, 1, lin->name() + " wgrad");
    }
  }
  return out;
}

// The backend igemm_u8s8s32 runs for this shape (automatic sends small products to the own kernel).
const char* int8_backend_for(int64_t m, int64_t n, int64_t k) {
  const IgemmBackend be = igemm_resolved_backend();
  if (be == IgemmBackend::onednn && igemm_backend() == IgemmBackend::automatic && m * n * k < (int64_t(1) << 20) &&
      igemm_backend_available(IgemmBackend::vnni))
    return igemm_backend_name(IgemmBackend::vnni);
  return igemm_backend_name(be);
}

int run_gemm_bench(const GemmOptions& o) {
  FQT_INPUT_CHECK(o.m >= 1 && o.n >= 1 && o.k >= 1 && o.m <= (int64_t(1) << 28) && o.n <= (int64_t(1) << 28) &&
                      o.k <= (int64_t(1) << 28) && o.m * o.n <= (int64_t(1) << 28) &&
                      o.m * o.k <= (int64_t(1) << 28) && o.n * o.k <= (int64_t(1) << 28),
                  "--m, --n, --k must be >= 1 and each operand at most 2^28 elements");
  FQT_INPUT_CHECK(o.reps >= 1 && o.reps <= 10000, "--reps must be in 1..10000");
  FQT_INPUT_CHECK(o.batch >= 1 && o.batch <= 4096, "--batch must be in 1..4096");
  if (o.backend == "auto" || o.backend == "automatic") set_igemm_backend(IgemmBackend::automatic);
  else {
    IgemmBackend be = IgemmBackend::automatic;
    for (auto b : {IgemmBackend::reference, IgemmBackend::portable, IgemmBackend::vnni, IgemmBackend::onednn,
                   IgemmBackend::avx2})
      if (o.backend == igemm_backend_name(b)) be = b;
    FQT_INPUT_CHECK(be != IgemmBackend::automatic,
                    "unknown --backend '{}'; valid: auto, reference, portable, avx2, vnni, onednn",
                    o.backend);
    FQT_INPUT_CHECK(igemm_backend_available(be), "--backend {} is not available on this machine/build", o.backend);
    set_igemm_backend(be);
  }
  set_num_threads(o.threads);
  std::vector<GemmShape> shapes = {{o.m, o.n, o.k, 1, {"square"}}};
  if (!o.shapes.empty()) {
    auto more = model_gemm_shapes(o.shapes, o.input, o.batch);
    shapes.insert(shapes.end(), more.begin(), more.end());
  }
  nlohmann::json records = nlohmann::json::array();
  if (!o.json) {
    std::printf("threads %d, reps %d (medians of alternated int8/fp32 repetitions), int8 backend %s\n", num_threads(),
                o.reps, igemm_backend_name(igemm_resolved_backend()));
    std::printf("%7s %6s %7s %5s  %-8s %10s %10s %10s %10s %8s  %s\n", "M", "N", "K", "count", "backend", "int8_ms",
                "int8_GOPS", "fp32_ms", "fp32_GFLOP", "speedup", "used by");
  }
  std::mt19937 gen(1234);
  for (const GemmShape& s : shapes) {
    const int64_t M = s.m, N = s.n, K = s.k, cnt = s.count;
    const int64_t IM = s.im ? s.im : M, IN = s.in ? s.in : N, IK = s.ik ? s.ik : K;  // int8 layout
    // Operands shared by all `count` products (in the layers one operand is the weight and the
    // other a cache-resident per-thread im2col buffer); each product writes its own output.
    const int64_t per_gemm = std::max<int64_t>(1, s.per_gemm), ldk = per_gemm * IK;  // wgrad: samples along k
    std::vector<uint8_t> A(IM * ldk);
    std::vector<int8_t> B(IN * ldk);
    std::vector<float> Af(M * K), Bf(N * K);
    std::uniform_int_distribution<int> du(0, 255), ds(-128, 127);
    std::normal_distribution<float> dn;
    for (auto& v : A) v = static_cast<uint8_t>(du(gen));
    for (auto& v : B) v = static_cast<int8_t>(ds(gen));
    for (auto& v : Af) v = dn(gen);
    for (auto& v : Bf) v = dn(gen);
    std::vector<int32_t> C(cnt * IM * IN);
    std::vector<float> Cf(cnt * M * N);
    // Conv products run as in Conv2d's integer path: fqt's kernel on the calling thread (VNNI when
    // the CPU has it, else AVX2, else the portable one), not the automatic dispatcher; the weights
    // packed once per layer call (fprop, dgrad), the wgrad samples batched along k per group.
    const bool conv_kernel = s.im != 0;
    auto int8 = [&] {
      if (conv_kernel && s.shared_b) {
        const igemm_detail::LocalB packed(IN, IK, B.data(), IK);
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < cnt; ++i) packed.gemm(IM, A.data(), IK, C.data() + i * IM * IN, IN);
        return;
      }
      if (conv_kernel && s.groups > 0) {
#pragma omp parallel for schedule(static)
        for (int64_t g = 0; g < s.groups; ++g)
          for (int64_t n0 = g * cnt / s.groups, n1 = (g + 1) * cnt / s.groups; n0 < n1; n0 += per_gemm) {
            const int64_t k = std::min(per_gemm, n1 - n0) * IK;
            igemm_detail::s32_local(IM, IN, k, A.data(), ldk, B.data(), ldk, C.data() + n0 * IM * IN, IN);
          }
        return;
      }
      if (conv_kernel) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < cnt; ++i)
          igemm_detail::s32_local(IM, IN, IK, A.data(), IK, B.data(), IK, C.data() + i * IM * IN, IN);
        return;
      }
      if (cnt == 1) return igemm_u8s8s32(IM, IN, IK, A.data(), IK, B.data(), IK, C.data(), IN);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < cnt; ++i) igemm_u8s8s32(IM, IN, IK, A.data(), IK, B.data(), IK, C.data() + i * IM * IN, IN);
    };
    auto fp32 = [&] {
      if (cnt == 1) return sgemm(false, true, M, N, K, 1.0f, Af.data(), K, Bf.data(), K, 0.0f, Cf.data(), N);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < cnt; ++i)
        sgemm(false, true, M, N, K, 1.0f, Af.data(), K, Bf.data(), K, 0.0f, Cf.data() + i * M * N, N);
    };
    auto timed = [](auto& f) {
      const double t0 = now_ms();
      f();
      return now_ms() - t0;
    };
    int8();  // warm-up: page faults, oneDNN primitive creation, thread pools
    fp32();
    std::vector<double> ti, tf;
    for (int r = 0; r < o.reps; ++r) {
      if (r % 2 == 0) ti.push_back(timed(int8)), tf.push_back(timed(fp32));
      else tf.push_back(timed(fp32)), ti.push_back(timed(int8));
    }
    const double mi = median(ti), mf = median(tf), ops = 2.0 * double(M) * double(N) * double(K) * double(cnt);
    const double gi = ops / (mi * 1e6), gf = ops / (mf * 1e6);
    const char* backend = conv_kernel ? igemm_detail::local_kernel_name() : int8_backend_for(IM, IN, IK);
    std::string uses = s.uses[0];
    if (s.uses.size() > 1) uses += fmt::format(" (+{} more)", s.uses.size() - 1);
    if (o.json) {
      records.push_back({{"m", M},
                         {"n", N},
                         {"k", K},
                         {"count", cnt},
                         {"int8_m", IM},
                         {"int8_n", IN},
                         {"int8_k", IK},
                         {"int8_samples_per_gemm", conv_kernel ? per_gemm : 1},
                         {"backend", backend},
                         {"threads", num_threads()},
                         {"reps", o.reps},
                         {"int8_ms", mi},
                         {"fp32_ms", mf},
                         {"int8_gops", gi},
                         {"fp32_gflops", gf},
                         {"speedup", mf / mi},
                         {"model", o.shapes.empty() || s.uses[0] == "square" ? "" : o.shapes},
                         {"uses", s.uses}});
    } else {
      std::printf("%7lld %6lld %7lld %5lld  %-8s %10.3f %10.1f %10.3f %10.1f %7.2fx  %s\n", static_cast<long long>(M),
                  static_cast<long long>(N), static_cast<long long>(K), static_cast<long long>(cnt), backend, mi, gi,
                  mf, gf, mf / mi, uses.c_str());
      std::fflush(stdout);
    }
  }
  if (o.json) std::printf("%s\n", records.dump(2).c_str());
  return 0;
}

// ---- fqt bench step ---------------------------------------------------------------------------

// --breakdown: the step's time outside every layer region (loss, optimizer, pooling, residual
// adds, the time between regions).
constexpr const char* kOtherRegion = "(outside the layers: loss, SGD, pooling, adds)";

struct StepOptions {
  std::string model = "preact_resnet20";
  std::string modes = "fp32,qat,fqt";
  std::string dgrads = "psq";
  std::string dgrad_rows = "pixel";
  std::string ariths = "int";
  std::string recompute = "auto";
  int dgrad_bits = 8;
  int64_t batch = 128;
  std::string input = "1x28x28";
  int steps = 20, warmup = 3, threads = 0;
  bool json = false, no_fork = false, breakdown = false;
};

struct StepConfig {
  Mode mode;
  QuantizerKind dgrad;
  Arith arith;
  Recompute recompute = Recompute::automatic;
  GradRows rows = GradRows::pixel;  // fqt: the dgrad quantizer's rows in convolutions
};

// The dgrad column of the table: "bhq", or "bhq/s" with a row per sample.
std::string dgrad_label(const nlohmann::json& rec) {
  std::string d = rec["dgrad"].get<std::string>();
  if (rec.value("dgrad_rows", std::string("pixel")) == "sample") d += "/s";
  return d;
}

size_t read_status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, n, key) == 0) return std::strtoull(line.c_str() + n + 1, nullptr, 10);
  return 0;
}

// Runs one configuration in this process and returns its record.
nlohmann::json run_step_config(const StepOptions& o, const StepConfig& cfg) {
  int c = 0, h = 0, w = 0;
  parse_input(o.input, c, h, w);
  const size_t rss_start = read_status_kb("VmRSS:") * 1024;
  set_num_threads(o.threads);
  // One fixed batch of N(0,1) inputs and random labels.
  Tensor x = synthetic_matrix(SynthKind::gaussian, o.batch, int64_t{c} * h * w, 1).reshape({o.batch, c, h, w});
  Tensor y = Tensor::empty({o.batch}, DType::i32);
  for (int64_t i = 0; i < o.batch; ++i) y.data<int32_t>()[i] = static_cast<int32_t>(uniform_at({2, 0}, i) * 10) % 10;

  Recipe r;
  r.mode = cfg.mode;
  r.dgrad = {cfg.dgrad, o.dgrad_bits};
  r.arith = cfg.arith;
  r.dgrad_rows = cfg.rows;
  ModulePtr net = make_model(o.model, c, h, w, 10, r, 0);
  set_recompute(*net, cfg.recompute, cfg.mode);
  std::vector<Param*> params;
  net->collect_params(params);
  int64_t nparams = 0;
  for (const Param* p : params) nparams += p->value.numel();
  SGD opt(params, SGDOptions{0.9f, 5e-4f, false});
  SoftmaxCrossEntropy ce;
  std::vector<double> ms, qms, gfs, gis;
  std::map<std::string, std::vector<double>> region_ms;  // --breakdown: per region, ms per timed step
  std::map<std::string, std::vector<double>> phase_ms;   // --breakdown: per phase (inside the regions)
  size_t saved = 0;
  for (int s = 0; s < o.warmup + o.steps; ++s) {
    StepContext ctx{true, 0, static_cast<uint64_t>(s)};
    profile::reset();
    profile::enable(true);
    profile::enable_regions(o.breakdown);
    const auto t0 = std::chrono::steady_clock::now();
    opt.zero_grad();
    Tensor logits = net->forward(x, ctx);
    ce.forward(logits, y);
    saved = saved_bytes(*net);
    net->backward(ce.backward(), ctx);
    opt.step(0.01f);
    const double dt = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    profile::enable(false);
    profile::enable_regions(false);
    if (s >= o.warmup) {
      if (o.breakdown) {
        double in_regions = 0.0;
        for (const auto& [name, sec] : profile::region_seconds()) region_ms[name].push_back(1e3 * sec), in_regions += 1e3 * sec;
        region_ms[kOtherRegion].push_back(dt - in_regions);
        for (const auto& [name, sec] : profile::phase_seconds()) phase_ms[name].push_back(1e3 * sec);
      }
      ms.push_back(dt);
      qms.push_back(1e3 * (profile::seconds(profile::quantize) + profile::seconds(profile::dequantize)));
      gfs.push_back(1e3 * profile::seconds(profile::gemm_f32));
      gis.push_back(1e3 * profile::seconds(profile::gemm_int));
    }
  }
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  const double med = median(ms), qmed = median(qms), mn = *std::min_element(ms.begin(), ms.end());
  const bool quantized = cfg.mode != Mode::fp32;
  nlohmann::json breakdown = nlohmann::json::object();
  for (auto& [name, v] : region_ms) {
    v.resize(ms.size(), 0.0);  // (a region missing from some steps counts 0 there)
    breakdown[name] = median(v);
  }
  nlohmann::json phases = nlohmann::json::object();
  for (auto& [name, v] : phase_ms) {
    v.resize(ms.size(), 0.0);
    phases[name] = median(v);
  }
  return {{"model", o.model},
          {"framework", "fqt"},
          {"mode", mode_name(cfg.mode)},
          {"dgrad", cfg.mode == Mode::fqt ? traits(cfg.dgrad).name : "-"},
          {"dgrad_bits", o.dgrad_bits},
          {"dgrad_rows", cfg.mode == Mode::fqt ? grad_rows_name(cfg.rows) : "-"},
          {"arith", quantized ? arith_name(cfg.arith) : "-"},
          {"recompute", recompute_name(cfg.recompute)},
          {"batch", o.batch},
          {"input", o.input},
          {"steps", o.steps},
          {"warmup", o.warmup},
          {"threads", num_threads()},
          {"params", nparams},
          {"median_ms", med},
          {"min_ms", mn},
          {"quantizer_ms", qmed},
          {"quantizer_share", med > 0 ? qmed / med : 0},
          {"gemm_f32_ms", median(gfs)},
          {"gemm_int_ms", median(gis)},
          {"images_per_s", o.batch / (med / 1e3)},
          {"saved_activation_bytes", saved},
          {"peak_rss_bytes", static_cast<int64_t>(ru.ru_maxrss) * 1024},
          {"start_rss_bytes", rss_start},
          {"forked", !o.no_fork},
          {"breakdown", breakdown},
          {"phases", phases}};
}

// Runs one configuration in a fork()ed child (its own peak RSS) and reads back its record
// through a pipe. The parent runs no OpenMP code before forking (libgomp's pool does not
// survive fork), so the child starts clean.
nlohmann::json run_step_config_forked(const StepOptions& o, const StepConfig& cfg) {
  int fd[2];
  FQT_CHECK(pipe(fd) == 0, "bench step: pipe failed: {}", std::strerror(errno));
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  FQT_CHECK(pid >= 0, "bench step: fork failed: {}", std::strerror(errno));
  if (pid == 0) {
    close(fd[0]);
    std::string msg;
    int rc = 0;
    try {
      msg = run_step_config(o, cfg).dump();
    } catch (const InputError& e) {  // (the parent exits 2, as for bad input in the parent)
      msg = nlohmann::json{{"error", e.what()}, {"input_error", true}}.dump();
      rc = 1;
    } catch (const std::exception& e) {
      msg = nlohmann::json{{"error", e.what()}}.dump();
      rc = 1;
    }
    for (size_t off = 0; off < msg.size();) {
      const ssize_t n = write(fd[1], msg.data() + off, msg.size() - off);
      if (n <= 0) break;
      off += static_cast<size_t>(n);
    }
    close(fd[1]);
    _exit(rc);  // no atexit handlers / static destructors of the parent's state in the child
  }
  close(fd[1]);
  std::string msg;
  char buf[4096];
  for (ssize_t n; (n = read(fd[0], buf, sizeof buf)) > 0;) msg.append(buf, static_cast<size_t>(n));
  close(fd[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  nlohmann::json rec = nlohmann::json::parse(msg, nullptr, false);
  if (rec.is_discarded() || !rec.is_object()) {
    const std::string why = WIFSIGNALED(status) ? fmt::format("killed by signal {}", WTERMSIG(status))
                                                : fmt::format("exit status {}", WEXITSTATUS(status));
    return {{"error", "benchmark child died (" + why + ")"}};
  }
  return rec;
}

// --breakdown in the table: each region's median ms per step and share of the median step,
// largest first.
// Then the phases timed inside them (summed over the step's calls), apart.
void print_breakdown(const nlohmann::json& b, const nlohmann::json& phases, double step_ms) {
  auto print = [&](const nlohmann::json& table) {
    std::vector<std::pair<double, std::string>> rows;
    for (auto it = table.begin(); it != table.end(); ++it) rows.emplace_back(it.value().get<double>(), it.key());
    std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& c) { return a.first > c.first; });
    for (const auto& [ms, name] : rows)
      std::printf("    %-52s %8.2f ms  %5.1f%%\n", name.c_str(), ms, step_ms > 0 ? 100 * ms / step_ms : 0.0);
  };
  print(b);
  if (!phases.empty()) {
    std::printf("    phases inside the regions above (all calls of the step; not added to them):\n");
    print(phases);
  }
}

int run_step_bench(const StepOptions& o) {
  int c = 0, h = 0, w = 0;
  parse_input(o.input, c, h, w);
  FQT_INPUT_CHECK(o.steps >= 1 && o.steps <= 100000 && o.warmup >= 0 && o.warmup <= 100000,
                  "--steps must be in 1..100000 and --warmup in 0..100000");
  FQT_INPUT_CHECK(o.batch >= 1 && o.batch <= 65536, "--batch must be in 1..65536");
  FQT_INPUT_CHECK(o.dgrad_bits >= 2 && o.dgrad_bits <= 8, "--dgrad-bits must be 2..8");
  const auto& names = model_names();
  FQT_INPUT_CHECK(std::find(names.begin(), names.end(), o.model) != names.end(), "unknown model '{}'; valid models: {}",
                  o.model, fmt::join(names, ", "));
  std::vector<Arith> ariths;
  for (const auto& a : split_list(o.ariths)) ariths.push_back(parse_arith(a));
  FQT_INPUT_CHECK(!ariths.empty(), "--arith needs at least one of int, sim");
  std::vector<Recompute> recomputes;
  for (const auto& v : split_list(o.recompute)) recomputes.push_back(parse_recompute(v));
  FQT_INPUT_CHECK(!recomputes.empty(), "--recompute needs one or more of off, auto, on");
  std::vector<GradRows> rows_list;
  for (const auto& v : split_list(o.dgrad_rows)) rows_list.push_back(parse_grad_rows(v));
  FQT_INPUT_CHECK(!rows_list.empty(), "--dgrad-rows needs one or more of pixel, sample");
  std::vector<StepConfig> configs;
  for (const auto& m : split_list(o.modes)) {
    const Mode mode = parse_mode(m);
    for (Recompute rc : recomputes) {
      if (mode == Mode::fp32) {  // (auto is off in fp32: one configuration)
        const StepConfig c{mode, QuantizerKind::psq, Arith::integer, effective_recompute(rc, mode)};
        if (std::none_of(configs.begin(), configs.end(),
                         [&](const StepConfig& d) { return d.mode == mode && d.recompute == c.recompute; }))
          configs.push_back(c);
      } else if (mode == Mode::qat)
        for (Arith a : ariths) configs.push_back({mode, QuantizerKind::psq, a, rc});
      else
        for (const auto& d : split_list(o.dgrads)) {
          const QuantizerKind q = parse_quantizer(d);
          FQT_INPUT_CHECK(traits(q).rounding == Rounding::stochastic,
                          "--dgrad must be a stochastic quantizer (ptq, ptq-zero, psq, column, bhq), got {}", d);
          for (GradRows gr : rows_list)
            for (Arith a : ariths) configs.push_back({mode, q, a, rc, gr});
        }
    }
  }
  FQT_INPUT_CHECK(!configs.empty(), "--mode needs at least one of fp32, qat, fqt");
  make_model(o.model, c, h, w, 10, Recipe{}, 0);  // the model's own checks of --input (cnn: >= 4x4), here and not in a child

  set_num_threads(o.threads);  // (its check, before any child)
  nlohmann::json records = nlohmann::json::array();
  bool header = o.json;  // the table's header, printed with its first row
  auto print_header = [&] {
    if (header) return;
    header = true;
    std::printf("%-16s %-5s %-6s %-5s %-6s %5s  %10s  %10s  %10s  %8s  %9s  %12s  %11s\n", "model", "mode", "dgrad",
                "arith", "recomp", "batch", "median_ms", "min_ms", "quant_ms", "quant_%", "images/s", "saved_act_MB",
                "peak_RSS_MB");
  };
  int failures = 0, input_failures = 0;
  for (const StepConfig& cfg : configs) {
    nlohmann::json rec = o.no_fork ? run_step_config(o, cfg) : run_step_config_forked(o, cfg);
    if (rec.contains("error")) {
      const std::string label = cfg.mode == Mode::fp32 ? "fp32"
                                : cfg.mode == Mode::qat
                                    ? fmt::format("qat {}", arith_name(cfg.arith))
                                    : fmt::format("fqt {}{} {}", traits(cfg.dgrad).name,
                                                  cfg.rows == GradRows::sample ? "/s" : "", arith_name(cfg.arith));
      std::fprintf(stderr, "fqt: error: bench step %s: %s\n", label.c_str(), rec["error"].get<std::string>().c_str());
      ++failures;
      input_failures += rec.value("input_error", false) ? 1 : 0;
      continue;
    }
    if (o.json) {
      records.push_back(rec);
    } else {
      print_header();
      const double med = rec["median_ms"];
      std::printf("%-16s %-5s %-6s %-5s %-6s %5lld  %10.1f  %10.1f  %10.1f  %7.1f%%  %9.0f  %12.2f  %11.1f\n",
                  o.model.c_str(), rec["mode"].get<std::string>().c_str(), dgrad_label(rec).c_str(),
                  rec["arith"].get<std::string>().c_str(), recompute_name(cfg.recompute), static_cast<long long>(o.batch), med,
                  rec["min_ms"].get<double>(), rec["quantizer_ms"].get<double>(),
                  100 * rec["quantizer_share"].get<double>(), rec["images_per_s"].get<double>(),
                  rec["saved_activation_bytes"].get<double>() / 1048576.0,
                  rec["peak_rss_bytes"].get<double>() / 1048576.0);
      if (o.breakdown) print_breakdown(rec["breakdown"], rec.value("phases", nlohmann::json::object()), med);
      std::fflush(stdout);
    }
  }
  if (o.json) std::printf("%s\n", records.dump(2).c_str());
  return failures == 0 ? 0 : failures == input_failures ? 2 : 1;  // (bad input: 2; a crash or bug: 1)
}

// ---- fqt bench memory -------------------------------------------------------------------------

struct MemoryOptions {
  std::vector<double> sizes_mb{0.25, 0.5, 1, 2, 4, 8, 16, 32, 64};
  int reps = 5;
  bool json = false;
};

// Per working-set size: a random cyclic order over its 64-byte lines (Sattolo's shuffle, fixed
// seed) walked by dependent loads (each load's value is the next address: the latency of
// whatever level holds the set), and a read of the whole set by one thread (8 independent sums).
// Medians of `reps` timings. On a shared VM the share of the last-level cache varies with the
// neighbours: this says where a working set of a given size is served from at the moment.
int run_memory_bench(const MemoryOptions& o) {
  FQT_INPUT_CHECK(!o.sizes_mb.empty(), "bench memory: --sizes is empty");
  FQT_INPUT_CHECK(o.reps >= 1 && o.reps <= 10000, "bench memory: --reps must be in 1..10000 (got {})", o.reps);
  for (double mb : o.sizes_mb) FQT_INPUT_CHECK(mb > 0 && mb <= 4096, "bench memory: size {} MB out of (0, 4096]", mb);
  nlohmann::json records = nlohmann::json::array();
  if (!o.json) std::printf("%12s %14s %12s\n", "working set", "latency_ns", "read_GB/s");
  for (double mb : o.sizes_mb) {
    const auto lines = std::max<int64_t>(2, static_cast<int64_t>(mb * 1048576.0 / 64));
    std::vector<uint64_t> buf(static_cast<size_t>(lines * 8));
    std::vector<int64_t> order(static_cast<size_t>(lines));
    for (int64_t i = 0; i < lines; ++i) order[i] = i;
    std::mt19937_64 rng(12345);
    for (int64_t i = lines - 1; i > 0; --i) std::swap(order[i], order[std::uniform_int_distribution<int64_t>(0, i - 1)(rng)]);
    for (int64_t i = 0; i < lines; ++i) buf[order[i] * 8] = static_cast<uint64_t>(order[(i + 1) % lines] * 8);
    const int64_t steps = std::max<int64_t>(1 << 21, 2 * lines);
    std::vector<double> lat, bw;
    uint64_t sink = 0;
    for (int r = 0; r < o.reps; ++r) {
      uint64_t p = 0;
      for (int64_t i = 0; i < lines; ++i) p = buf[p];  // (bring the set in)
      double t0 = now_ms();
      for (int64_t i = 0; i < steps; ++i) p = buf[p];
      lat.push_back((now_ms() - t0) * 1e6 / static_cast<double>(steps));
      sink += p;
      const int64_t passes = std::max<int64_t>(2, (int64_t{256} << 20) / (lines * 64));
      t0 = now_ms();
      for (int64_t q = 0; q < passes; ++q) {
        asm volatile("" : : "r"(buf.data()) : "memory");  // (each pass reads the set again)
        uint64_t s[8] = {};
        for (int64_t i = 0; i < lines * 8; i += 8)
          for (int j = 0; j < 8; ++j) s[j] += buf[i + j];
        for (uint64_t v : s) sink += v;
      }
      bw.push_back(static_cast<double>(passes * lines * 64) / ((now_ms() - t0) * 1e6));
    }
    const double l = median(lat), b = median(bw);
    records.push_back({{"bytes", lines * 64}, {"latency_ns", l}, {"read_gbps", b}});
    if (!o.json) std::printf("%9.2f MB %14.1f %12.1f\n", static_cast<double>(lines * 64) / 1048576.0, l, b);
    if (sink == 42) std::printf(" ");  // (keeps the loads)
    std::fflush(stdout);
  }
  if (o.json) std::printf("%s\n", records.dump(2).c_str());
  return 0;
}

}  // namespace

Runner add_bench(CLI::App& app) {
  app.description(
      "Benchmarks, side by side in one run, medians.\n"
      "  fqt bench gemm: int8 GEMM vs fp32 GEMM (GOPS / GFLOPS) at MxNxK and at a model's layer shapes.\n"
      "  fqt bench step: full training step time per precision mode, quantizer share, memory.\n"
      "  fqt bench memory: latency and read bandwidth by working-set size (where the caches end now).");
  app.require_subcommand(1);

  auto g = std::make_shared<GemmOptions>();
  CLI::App* gemm = app.add_subcommand(
      "gemm",
      "int8 GEMM (igemm_u8s8s32: u8 x s8 -> s32, automatic backend) vs fp32 sgemm on the same shapes and layout\n"
      "(C = A B^T, A [M,K], B [N,K] row-major); medians of alternated int8/fp32 repetitions.\n"
      "JSON fields (one record per shape):\n"
      "  m, n, k       GEMM shape; count: samples (or products) per layer call, run in parallel, each\n"
      "                single-threaded as Conv2d runs them; count 1 = one product on all threads\n"
      "  int8_m, int8_n, int8_k  the same product as the integer path lays it out (conv: per-sample operand first)\n"
      "  int8_samples_per_gemm   conv wgrad: samples side by side along k per product (Conv2d::wgrad_int_plan);\n"
      "                conv fprop/dgrad pack the weights once per layer call, as Conv2d does\n"
      "  backend       the int8 backend that ran (automatic sends < 2^20 MACs to the own VNNI kernel)\n"
      "  int8_ms, fp32_ms       median wall time of all `count` products\n"
      "  int8_gops, fp32_gflops 2 M N K count / time\n"
      "  speedup       fp32_ms / int8_ms\n"
      "  uses          the layer GEMMs of --shapes MODEL with this shape (\"square\" for MxNxK)");
  gemm->add_option("--m", g->m, "rows of C")->capture_default_str();
  gemm->add_option("--n", g->n, "columns of C")->capture_default_str();
  gemm->add_option("--k", g->k, "reduction length")->capture_default_str();
  gemm->add_option("--shapes,--model", g->shapes,
                   "also bench the GEMMs of this model's layers (e.g. preact_resnet20): fprop, dgrad, wgrad per "
                   "conv/linear layer, as src/nn runs them (conv: per sample), identical shapes merged");
  gemm->add_option("--batch", g->batch, "batch size for --shapes")->capture_default_str();
  gemm->add_option("--input", g->input, "input shape CxHxW for --shapes")->capture_default_str();
  gemm->add_option("--reps", g->reps, "timed repetitions per contender (alternated)")->capture_default_str();
  gemm->add_option("--threads", g->threads, "CPU threads (0 = all)")->capture_default_str();
  gemm->add_option("--backend", g->backend, "int8 backend: auto, vnni, onednn, avx2, portable, reference")
      ->capture_default_str();
  gemm->add_flag("--json", g->json, "JSON records instead of a table");

  auto o = std::make_shared<StepOptions>();
  CLI::App* step = app.add_subcommand(
      "step",
      "Median time of a full training step (forward, both backward GEMMs, quantizers, SGD momentum 0.9,\n"
      "wd 5e-4) on one fixed random batch. Configurations = (fp32 + qat x arith + fqt x dgrad x dgrad-rows x arith)\n"
      "x recompute;\n"
      "each runs in its own fork()ed child process (--no-fork: all in this one) so peak RSS is per config.\n"
      "JSON fields (one record per configuration):\n"
      "  model, mode, dgrad, dgrad_bits, dgrad_rows, arith, recompute, batch, input, threads, steps, warmup\n"
      "                  (the table's dgrad column shows bhq/s, psq/s for dgrad_rows sample)\n"
      "  params          number of trainable parameters\n"
      "  median_ms, min_ms  median / fastest of the timed steps (wall time)\n"
      "  quantizer_ms    median time inside quantize() + dequantize() per step (profile scopes; the\n"
      "                  activation rounding that PreAct blocks fuse into batch norm's pass is not in it)\n"
      "  quantizer_share quantizer_ms / median_ms\n"
      "  gemm_f32_ms, gemm_int_ms  median time per step inside sgemm() / the integer GEMM kernels, summed\n"
      "                  over calling threads (Conv2d calls them from every thread, one sample each; the\n"
      "                  dgrad of layers with Ckk <= 144 and Cout <= 16 fuses its finishing into the\n"
      "                  kernel, which is counted whole)\n"
      "  images_per_s    batch / median step time\n"
      "  saved_activation_bytes  bytes kept from forward for backward (activations and their codes,\n"
      "                  shared storage counted once; weights not counted)\n"
      "  peak_rss_bytes  peak resident set size of the child process (getrusage ru_maxrss): the model,\n"
      "                  optimizer, one step's working memory, plus the process baseline\n"
      "  start_rss_bytes resident set size when the child started (the baseline)\n"
      "  breakdown       with --breakdown: {region: median ms per step} (see --breakdown), else {}\n"
      "  phases          with --breakdown: {phase: median ms per step}, steps timed inside the regions\n"
      "                  (BHQ's quantizer and dgrad passes), all calls summed; not part of breakdown's sum");
  step->add_option("--model", o->model, "model name")->capture_default_str();
  step->add_option("--mode", o->modes, "comma-separated modes: fp32, qat, fqt")->capture_default_str();
  step->add_option("--dgrad", o->dgrads, "comma-separated dgrad quantizers for fqt: ptq, ptq-zero, psq, column, bhq (stochastic)")->capture_default_str();
  step->add_option("--dgrad-bits", o->dgrad_bits, "dgrad bits")->capture_default_str();
  step->add_option("--dgrad-rows", o->dgrad_rows,
                   "comma-separated rows of the convolutions' dgrad quantizer for fqt: pixel, sample (see fqt train "
                   "--help)")
      ->capture_default_str();
  step->add_option("--arith", o->ariths, "comma-separated arithmetic of the quantized GEMMs for qat/fqt: int, sim")
      ->capture_default_str();
  step->add_option("--recompute", o->recompute,
                   "comma-separated off, auto, on: which batch norms keep no fp32 input, backward recomputing "
                   "it from the saved codes (see fqt train --help; auto is off in fp32)")
      ->capture_default_str();
  step->add_option("--batch", o->batch, "batch size")->capture_default_str();
  step->add_option("--input", o->input, "input shape CxHxW")->capture_default_str();
  step->add_option("--steps", o->steps, "timed steps")->capture_default_str();
  step->add_option("--warmup", o->warmup, "untimed warm-up steps")->capture_default_str();
  step->add_option("--threads", o->threads, "CPU threads (0 = all)")->capture_default_str();
  step->add_flag("--no-fork", o->no_fork, "run all configurations in this process (peak RSS is then cumulative)");
  step->add_flag("--json", o->json, "JSON records instead of a table");
  step->add_flag("--breakdown", o->breakdown,
                 "also time each layer call and its phases (wall time on the calling thread; medians per step):\n"
                 "conv forward; conv backward as dY layout, quantize dY (both draws), wgrad, dgrad; batch norm\n"
                 "forward and backward, its recomputed input apart; linear forward, dgrad, wgrad; the rest of the\n"
                 "step as one region. Keyed by layer shape, so a model's stages show apart. JSON field breakdown.\n"
                 "Then the phases timed inside those regions (BHQ's quantizer and dgrad passes), all calls of a\n"
                 "step summed: JSON field phases");
  auto mo = std::make_shared<MemoryOptions>();
  CLI::App* memory = app.add_subcommand(
      "memory",
      "Latency of dependent random 64-byte loads and one thread's read bandwidth, by working-set size:\n"
      "where this machine's caches end at the moment (on a shared VM the last-level cache share varies).\n"
      "JSON fields (one record per size): bytes, latency_ns (per load), read_gbps (GB/s); medians of --reps.");
  memory->add_option("--sizes", mo->sizes_mb, "working-set sizes in MB (comma-separated)")->delimiter(',')->capture_default_str();
  memory->add_option("--reps", mo->reps, "timings per size (median)")->capture_default_str();
  memory->add_flag("--json", mo->json, "JSON records instead of a table");
  return [o, g, mo, step, gemm, memory] {
    if (step->parsed()) return run_step_bench(*o);
    if (gemm->parsed()) return run_gemm_bench(*g);
    if (memory->parsed()) return run_memory_bench(*mo);
    return 2;
  };
}

}  // namespace fqt::cli
