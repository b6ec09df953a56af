// CUDA quantizers against the CPU oracle (quantize_ref): codes, grids and BHQ transforms must be
// bit-identical; dequantization on the device must equal the CPU's. Every test skips when no
// CUDA device is present, so CPU-only CI builds this file and stays green.
//
// Cuda.Bench times the kernels; it runs only when FQT_CUDA_BENCH is set
// (scripts/gpu_check sets it).
#include "cuda_timing.hpp"
#include "fqt/cuda.hpp"
#include "fqt/quant.hpp"
#include "fqt/stats.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

using namespace fqt;

namespace {

class Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

std::string label(QuantizerSpec s, int64_t r, int64_t c, const char* data) {
  return fmt::format("{} {}b {}x{} {}", traits(s.kind).name, s.bits, r, c, data);
}

// First differing position of two arrays of the same bit pattern type, or -1.
template <typename T> int64_t first_bit_diff(const T* a, const T* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::memcmp(a + i, b + i, sizeof(T)) != 0) return i;
  return -1;
}

// Bit-identical QuantizedTensors (codes, grids, BHQ transform). Returns "" or a description.
std::string compare(const QuantizedTensor& ref, const QuantizedTensor& got) {
  if (ref.rows != got.rows || ref.cols != got.cols) return "shape differs";
  const int64_t n = ref.rows * ref.cols;
  if (int64_t i = first_bit_diff(ref.codes.data<uint8_t>(), got.codes.data<uint8_t>(), n); i >= 0)
    return fmt::format("code ({}, {}): ref {} got {}", i / ref.cols, i % ref.cols, ref.codes.data<uint8_t>()[i],
                       got.codes.data<uint8_t>()[i]);
  if (ref.scale.size() != got.scale.size()) return "group count differs";
  const int64_t g = static_cast<int64_t>(ref.scale.size());
  if (int64_t i = first_bit_diff(ref.scale.data(), got.scale.data(), g); i >= 0)
    return fmt::format("scale[{}]: ref {:a} got {:a}", i, ref.scale[i], got.scale[i]);
  if (int64_t i = first_bit_diff(ref.lo.data(), got.lo.data(), g); i >= 0)
    return fmt::format("lo[{}]: ref {:a} got {:a}", i, ref.lo[i], got.lo[i]);
  if (ref.transform.has_value() != got.transform.has_value()) return "transform presence differs";
  if (ref.transform) {
    const BhqTransform &a = *ref.transform, &b = *got.transform;
    if (a.offsets != b.offsets) return fmt::format("BHQ offsets differ ({} vs {} groups)", a.num_groups(), b.num_groups());
    if (a.members != b.members) return "BHQ members differ";
    if (a.row_scale.size() != b.row_scale.size()) return "BHQ row_scale size differs";
    if (int64_t i = first_bit_diff(a.row_scale.data(), b.row_scale.data(), a.rows); i >= 0)
      return fmt::format("BHQ row_scale[{}]: ref {:a} got {:a}", i, a.row_scale[i], b.row_scale[i]);
  }
  return "";
}

struct Shape2 {
  int64_t rows, cols;
};
const std::vector<Shape2> kShapes = {{1, 1}, {1, 7}, {7, 1}, {5, 129}, {64, 33}, {128, 1024}, {1000, 3}};

}  // namespace

TEST_F(Cuda, DeviceInfo) {
  std::printf("device 0: %s (%d device(s))\n", cuda::device_name(0).c_str(), cuda::device_count());
  cuda::DeviceBuffer a(1000), b;
  EXPECT_EQ(a.bytes(), 1000u);
  b = std::move(a);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(b.bytes(), 1000u);
  Tensor t = synthetic_matrix(SynthKind::gaussian, 3, 5, 1);
  Tensor back = cuda::download(cuda::upload(t));
  ASSERT_EQ(back.shape(), t.shape());
  EXPECT_EQ(std::memcmp(back.raw(), t.raw(), t.nbytes()), 0);
}

TEST_F(Cuda, CudaCheckThrowsWithLocation) {
  try {
    CUDA_CHECK(cudaErrorInvalidValue);
    FAIL() << "no throw";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("test_cuda_quantize.cpp"), std::string::npos) << m;
    EXPECT_NE(m.find("cudaErrorInvalidValue"), std::string::npos) << m;
  }
}

// Every kind, bits 2..8, awkward shapes, Gaussian and heavy-tailed data: bit-identical to the
// CPU oracle, and the device's dequantization equals the CPU's.
TEST_F(Cuda, QuantizeMatchesReferenceEverywhere) {
  int checked = 0, deq_exact = 0, deq_total = 0;
  uint64_t seed = 100;
  for (SynthKind data : {SynthKind::gaussian, SynthKind::heavy_tailed})
    for (const Shape2& sh : kShapes) {
      const Tensor x = synthetic_matrix(data, sh.rows, sh.cols, ++seed);
      const char* dname = data == SynthKind::gaussian ? "gaussian" : "heavy";
      for (const QuantizerTraits& tr : quantizer_table())
        for (int bits = 2; bits <= 8; ++bits) {
          const QuantizerSpec spec{tr.kind, bits};
          const RngKey key{seed * 7 + bits, static_cast<uint64_t>(tr.kind)};
          const QuantizedTensor ref = quantize_ref(x, spec, key);
          const QuantizedTensor got = quantize_cuda(x, spec, key);
          const std::string diff = compare(ref, got);
          ASSERT_EQ(diff, "") << label(spec, sh.rows, sh.cols, dname);
          ++checked;
          // Dequantization: the CPU's dequantize vs the device's, from the same codes.
          const Tensor a = dequantize(ref), b = dequantize_cuda(got);
          const float* pa = a.data<float>();
          const float* pb = b.data<float>();
          double num = 0, den = 0;
          for (int64_t i = 0; i < a.numel(); ++i) {
            num += (double(pa[i]) - pb[i]) * (double(pa[i]) - pb[i]);
            den += double(pa[i]) * pa[i];
          }
          ASSERT_LE(std::sqrt(num), 1e-6 * std::sqrt(den) + 1e-30) << "dequantize " << label(spec, sh.rows, sh.cols, dname);
          ++deq_total;
          deq_exact += std::memcmp(pa, pb, a.nbytes()) == 0;
        }
    }
  std::printf("%d quantizations bit-identical; dequantize bit-identical in %d of %d\n", checked, deq_exact, deq_total);
  EXPECT_EQ(deq_exact, deq_total) << "dequantize differs in the last bits somewhere (within tolerance)";
}

// Larger matrices: several column chunks and row blocks (atomics across blocks), BHQ with
// thousands of rows.
TEST_F(Cuda, LargerMatrices) {
  for (auto [rows, cols] : std::vector<Shape2>{{2048, 512}, {4099, 65}, {300, 5000}}) {
    const Tensor x = synthetic_matrix(SynthKind::heavy_tailed, rows, cols, rows + cols);
    for (QuantizerKind k : {QuantizerKind::psq, QuantizerKind::bhq, QuantizerKind::column, QuantizerKind::ptq,
                            QuantizerKind::symmetric_row, QuantizerKind::zero_aligned}) {
      const QuantizerSpec spec{k, 4};
      const RngKey key{42, 7};
      EXPECT_EQ(compare(quantize_ref(x, spec, key), quantize_cuda(x, spec, key)), "") << label(spec, rows, cols, "heavy");
    }
  }
}

// Equal row ranges: the device sort must break ties by row index like std::stable_sort.
TEST_F(Cuda, BhqTiesKeepRowOrder) {
  for (int64_t rows : {2, 3, 4, 17, 256, 1001}) {
    const int64_t cols = 9;
    std::vector<float> v(rows * cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        v[r * cols + c] = static_cast<float>((r % 3 + 1) * ((c * 7 + r) % 5) - 2 * (r % 3 + 1));  // 3 distinct ranges
    const Tensor x = Tensor::from<float>({rows, cols}, v);
    const QuantizerSpec spec{QuantizerKind::bhq, 3};
    EXPECT_EQ(compare(quantize_ref(x, spec, {1, 2}), quantize_cuda(x, spec, {1, 2})), "") << rows << " rows";
  }
  // All rows constant (every range is 1e-8) and all-zero data.
  for (double fill : {0.0, 3.5}) {
    const Tensor x = Tensor::full({50, 20}, fill);
    for (const QuantizerTraits& tr : quantizer_table()) {
      const QuantizerSpec spec{tr.kind, 5};
      EXPECT_EQ(compare(quantize_ref(x, spec, {3, 4}), quantize_cuda(x, spec, {3, 4})), "") << label(spec, 50, 20, "const");
    }
  }
}

TEST_F(Cuda, EmptyTensor) {
  const Tensor x = Tensor::empty({0, 5});
  for (const QuantizerTraits& tr : quantizer_table()) {
    const QuantizerSpec spec{tr.kind, 8};
    EXPECT_EQ(compare(quantize_ref(x, spec), quantize_cuda(x, spec)), "") << tr.name;
  }
}

// Device-resident path: buffers reused across calls of different sizes; an input pointer that is
// not 16-byte aligned (scalar loads instead of float4).
TEST_F(Cuda, DeviceResidentReuseAndUnalignedInput) {
  cuda::DeviceQuantized dq;
  for (auto [rows, cols] : std::vector<Shape2>{{300, 256}, {3, 5}, {513, 129}, {64, 64}})
    for (QuantizerKind k : {QuantizerKind::bhq, QuantizerKind::psq, QuantizerKind::column, QuantizerKind::affine}) {
      const Tensor x = synthetic_matrix(SynthKind::heavy_tailed, rows, cols, rows * 31 + cols);
      const QuantizerSpec spec{k, 6};
      const RngKey key{9, 10};
      // Copy into a buffer at an offset of one float.
      cuda::DeviceBuffer buf((rows * cols + 1) * sizeof(float));
      cuda::copy_to_device(buf.as<float>() + 1, x.raw(), x.nbytes());
      cuda::quantize_device(buf.as<float>() + 1, rows, cols, spec, key, dq);
      dq.check();
      EXPECT_EQ(compare(quantize_ref(x, spec, key), cuda::download(dq)), "") << label(spec, rows, cols, "unaligned");
      // Device dequantization into device memory.
      cuda::DeviceBuffer out(rows * cols * sizeof(float));
      cuda::dequantize_device(dq, out.as<float>());
      std::vector<float> got(rows * cols);
      cuda::copy_to_host(got.data(), out.data(), got.size() * sizeof(float));
      const Tensor want = dequantize(quantize_ref(x, spec, key));
      EXPECT_EQ(std::memcmp(got.data(), want.raw(), want.nbytes()), 0) << label(spec, rows, cols, "dequantize_device");
    }
}

TEST_F(Cuda, NonFiniteInputThrows) {
  Tensor x = synthetic_matrix(SynthKind::gaussian, 8, 8, 5);
  x.data<float>()[19] = std::nanf("");
  EXPECT_THROW(quantize_cuda(x, {QuantizerKind::psq, 8}), NonFiniteError);
  x.data<float>()[19] = INFINITY;
  for (QuantizerKind k : {QuantizerKind::bhq, QuantizerKind::column, QuantizerKind::ptq, QuantizerKind::psq}) {
    cuda::DeviceTensor d = cuda::upload(x);
    cuda::DeviceQuantized dq;
    cuda::quantize_device(d.data<float>(), 8, 8, {k, 8}, {}, dq);
    EXPECT_THROW(dq.check(), NonFiniteError) << traits(k).name;
  }
}

// Timing of the kernels on 8192 x 4096 f32 (heavy-tailed): median of 50 runs with CUDA events,
// after a bit-identity check against the CPU at this size. Only with FQT_CUDA_BENCH set.
TEST_F(Cuda, Bench) {
  if (!std::getenv("FQT_CUDA_BENCH")) GTEST_SKIP() << "set FQT_CUDA_BENCH=1 to time the kernels";
  const int64_t rows = 8192, cols = 4096, n = rows * cols;
  const Tensor x = synthetic_matrix(SynthKind::heavy_tailed, rows, cols, 2024);
  cuda::DeviceTensor dx = cuda::upload(x);
  cuda::DeviceQuantized dq;
  cuda::DeviceBuffer deq(n * sizeof(float)), copy(n * sizeof(float));
  auto time_ms = [](auto&& fn) {
    const cuda_test::EventTimes t = cuda_test::time_events(50, fn);
    return std::pair<float, float>{t.median, t.min};
  };
  struct Row {
    std::string what;
    float med, min;
    double bytes;
  };
  std::vector<Row> table;
  {
    auto [med, mn] = time_ms([&] {
      CUDA_CHECK(cudaMemcpyAsync(copy.data(), dx.buffer.data(), n * sizeof(float), cudaMemcpyDeviceToDevice));
    });
    table.push_back({"device copy (f32, read+write)", med, mn, 8.0 * n});
  }
  for (QuantizerKind k : {QuantizerKind::psq, QuantizerKind::bhq, QuantizerKind::ptq, QuantizerKind::column,
                          QuantizerKind::symmetric_row}) {
    const QuantizerSpec spec{k, 4};
    const RngKey key{11, 12};
    cuda::quantize_device(dx.data<float>(), rows, cols, spec, key, dq);
    if (k == QuantizerKind::psq || k == QuantizerKind::bhq) {  // bit-identity at this size (fast CPU path)
      const QuantizedTensor want = quantize(x, spec, key);
      EXPECT_EQ(compare(want, cuda::download(dq)), "") << traits(k).name << " 8192x4096";
    }
    auto [med, mn] = time_ms([&] { cuda::quantize_device(dx.data<float>(), rows, cols, spec, key, dq); });
    table.push_back({fmt::format("quantize {} 4b", traits(k).name), med, mn, 5.0 * n});
    if (k == QuantizerKind::psq || k == QuantizerKind::bhq) {
      auto [dmed, dmn] = time_ms([&] { cuda::dequantize_device(dq, deq.as<float>()); });
      table.push_back({fmt::format("dequantize {}", traits(k).name), dmed, dmn, 5.0 * n});
    }
  }
  std::string out = fmt::format("\n{} , 8192 x 4096 f32 heavy-tailed, 50 runs (CUDA events)\n",
                                cuda::device_name(0));
  out += "| operation | median ms | min ms | GB/s (min. traffic, median) |\n|---|---:|---:|---:|\n";
  for (const Row& r : table)
    out += fmt::format("| {} | {:.3f} | {:.3f} | {:.0f} |\n", r.what, r.med, r.min, r.bytes / (r.med * 1e-3) / 1e9);
  out += "min. traffic: quantize/dequantize 5 B per element (f32 in, u8 out or back), copy 8 B\n";
  std::printf("%s", out.c_str());
  if (const char* path = std::getenv("FQT_CUDA_BENCH_OUT"))
    if (FILE* f = std::fopen(path, "a")) {
      std::fputs(out.c_str(), f);
      std::fclose(f);
    }
}
