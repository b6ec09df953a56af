// The GPU integer GEMM (cuda::igemm_s8s8s32 / s64, cuBLASLt INT8 tensor cores) against plain
// int64 loops on the host: every result must be equal, integer for integer. Shapes cover the
// aligned direct path and the zero-padded one (K not a multiple of 4/16, N = 1, odd strides,
// unaligned pointers, ldc > N), K = 0, and the worst case of the int32 bound (every product
// 128 x 128 over K = 200003, which only the chunked int64 entry point may take). Every test skips
// without a device. CudaGemm.Bench times int8 against cuBLAS fp32 (FQT_CUDA_BENCH=1).
// The quantized GEMM on the device (cuda::qgemm_device) must equal the CPU's qgemm() bit for bit.
#include "cuda_timing.hpp"
#include "fqt/cuda.hpp"
#include "fqt/igemm.hpp"
#include "fqt/stats.hpp"

#include <cublas_v2.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

using namespace fqt;

namespace {

class CudaGemm : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  }
};

std::vector<int8_t> random_s8(int64_t n, uint64_t seed, int lo = -128, int hi = 127) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<int8_t> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<int8_t>(d(g));
  return v;
}

// C[m][n] = sum_k A[m][k] B[n][k] in int64.
std::vector<int64_t> reference(int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda, const int8_t* B,
                               int64_t ldb) {
  std::vector<int64_t> c(static_cast<size_t>(M * N), 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int64_t(A[m * lda + k]) * B[n * ldb + k];
      c[m * N + n] = acc;
    }
  return c;
}

struct Case {
  int64_t M, N, K, lda_extra, ldb_extra, ldc_extra, a_off, b_off;
};

// Runs both entry points on device copies of A and B (placed at byte offsets a_off / b_off of
// their allocations) and returns "" or the first difference.
std::string run_case(const Case& t, uint64_t seed) {
  const int64_t lda = t.K + t.lda_extra, ldb = t.K + t.ldb_extra, ldc = t.N + t.ldc_extra;
  const auto a = random_s8(t.M * lda, seed), b = random_s8(t.N * ldb, seed + 1);
  const auto want = reference(t.M, t.N, t.K, a.data(), lda, b.data(), ldb);
  cuda::DeviceBuffer da(a.size() + t.a_off + 1), db(b.size() + t.b_off + 1);
  cuda::copy_to_device(da.as<int8_t>() + t.a_off, a.data(), a.size());
  cuda::copy_to_device(db.as<int8_t>() + t.b_off, b.data(), b.size());
  const int8_t* pa = da.as<int8_t>() + t.a_off;
  const int8_t* pb = db.as<int8_t>() + t.b_off;
  // C rows padded to ldc and prefilled with a sentinel: entries past N must stay untouched.
  const size_t nc = static_cast<size_t>(std::max<int64_t>(t.M * ldc, 1));
  std::vector<int32_t> c32(nc, -7);
  std::vector<int64_t> c64(nc, -7);
  cuda::DeviceBuffer dc32(nc * sizeof(int32_t)), dc64(nc * sizeof(int64_t));
  cuda::copy_to_device(dc32.data(), c32.data(), nc * sizeof(int32_t));
  cuda::copy_to_device(dc64.data(), c64.data(), nc * sizeof(int64_t));
  cuda::igemm_s8s8s32(t.M, t.N, t.K, pa, lda, pb, ldb, dc32.as<int32_t>(), ldc);
  cuda::igemm_s8s8s64(t.M, t.N, t.K, pa, lda, pb, ldb, dc64.as<int64_t>(), ldc);
  cuda::copy_to_host(c32.data(), dc32.data(), nc * sizeof(int32_t));
  cuda::copy_to_host(c64.data(), dc64.data(), nc * sizeof(int64_t));
  for (int64_t m = 0; m < t.M; ++m)
    for (int64_t n = 0; n < ldc; ++n) {
      const int64_t w = n < t.N ? want[m * t.N + n] : -7;
      if (c32[m * ldc + n] != w || c64[m * ldc + n] != w)
        return fmt::format("C({}, {}): want {} got s32 {} s64 {}", m, n, w, c32[m * ldc + n], c64[m * ldc + n]);
    }
  return "";
}

}  // namespace

TEST_F(CudaGemm, EqualsIntegerReferenceOnEveryShape) {
  const std::vector<Case> cases = {
      // M, N, K, lda+, ldb+, ldc+, A offset, B offset
      {1, 1, 1, 0, 0, 0, 0, 0},          {1, 7, 3, 0, 0, 0, 0, 0},        {7, 1, 13, 0, 0, 0, 0, 0},
      {5, 129, 64, 0, 0, 0, 0, 0},       {64, 33, 100, 0, 0, 0, 0, 0},    {128, 256, 1024, 0, 0, 0, 0, 0},
      {1000, 3, 17, 0, 0, 0, 0, 0},      {256, 128, 5000, 0, 0, 0, 0, 0}, {33, 65, 4096, 0, 0, 0, 0, 0},
      {64, 64, 64, 16, 32, 4, 0, 0},     {64, 64, 64, 3, 5, 1, 0, 0},     {40, 24, 96, 0, 0, 0, 1, 3},
      {128, 16, 1152, 0, 0, 0, 0, 0},    {16, 144, 1568, 0, 0, 0, 0, 0},  {1, 1000, 512, 0, 0, 7, 0, 0},
      // (added after the H200 runs of 2026-12-04, not yet run on a device:) K = 0, M = 0
      {3, 5, 0, 1, 1, 2, 0, 0},          {0, 4, 8, 0, 0, 0, 0, 0},
  };
  uint64_t seed = 100;
  for (const Case& t : cases)
    EXPECT_EQ(run_case(t, seed += 2), "") << t.M << "x" << t.N << "x" << t.K << " lda+" << t.lda_extra << " ldb+"
                                          << t.ldb_extra << " ldc+" << t.ldc_extra << " offsets " << t.a_off << "/"
                                          << t.b_off;
}

// Worst case of the int32 bound: every product is (-128)(-128) = 2^14, K = 200003, so each sum is
// 3.28e9 > 2^31 - 1. igemm_s8s8s32 must refuse; igemm_s8s8s64 must sum its chunks exactly.
TEST_F(CudaGemm, LongReductionSplitsAndNeverOverflows) {
  const int64_t M = 3, N = 5, K = 200003;
  std::vector<int8_t> a(M * K, -128), b(N * K, -128);
  for (int64_t k = 0; k < K; k += 977) a[k] = 127, b[2 * K + k] = 127;  // rows that differ a little
  const auto want = reference(M, N, K, a.data(), K, b.data(), K);
  ASSERT_GT(want[0], int64_t(INT32_MAX));
  cuda::DeviceBuffer da(a.size()), db(b.size()), dc32(M * N * sizeof(int32_t)), dc64(M * N * sizeof(int64_t));
  cuda::copy_to_device(da.data(), a.data(), a.size());
  cuda::copy_to_device(db.data(), b.data(), b.size());
  EXPECT_THROW(cuda::igemm_s8s8s32(M, N, K, da.as<int8_t>(), K, db.as<int8_t>(), K, dc32.as<int32_t>(), N), Error);
  cuda::igemm_s8s8s64(M, N, K, da.as<int8_t>(), K, db.as<int8_t>(), K, dc64.as<int64_t>(), N);
  std::vector<int64_t> got(M * N);
  cuda::copy_to_host(got.data(), dc64.data(), got.size() * sizeof(int64_t));
  EXPECT_EQ(got, want);
  EXPECT_EQ(cuda::igemm_chunk_k(128, 128) % 16, 0);
  EXPECT_LE(cuda::igemm_chunk_k(128, 128) * 128 * 128, int64_t(INT32_MAX));
  EXPECT_GT((cuda::igemm_chunk_k(128, 128) + 16) * 128 * 128, int64_t(INT32_MAX));
  // 7-bit codes (0..127) on both sides: the bound allows K = 133144 in int32.
  const int64_t K7 = 133144;
  std::vector<int8_t> a7(K7, 127), b7(K7, 127);
  cuda::DeviceBuffer da7(K7), db7(K7);
  cuda::copy_to_device(da7.data(), a7.data(), K7);
  cuda::copy_to_device(db7.data(), b7.data(), K7);
  cuda::igemm_s8s8s32(1, 1, K7, da7.as<int8_t>(), K7, db7.as<int8_t>(), K7, dc32.as<int32_t>(), 1, nullptr, 127, 127);
  int32_t one = 0;
  cuda::copy_to_host(&one, dc32.data(), sizeof one);
  EXPECT_EQ(one, int64_t(K7) * 127 * 127);
  EXPECT_THROW(cuda::igemm_s8s8s32(1, 1, K7 + 1, da7.as<int8_t>(), K7 + 1, db7.as<int8_t>(), K7 + 1,
                                   dc32.as<int32_t>(), 1, nullptr, 127, 127),
               Error);
}

TEST_F(CudaGemm, EmptyShapesAndBadArguments) {
  cuda::DeviceBuffer d(1024);
  std::vector<int32_t> c(6, -7);
  cuda::copy_to_device(d.data(), c.data(), c.size() * sizeof(int32_t));
  // K = 0: C = 0 in the M x N block, the rest of each ldc row untouched.
  cuda::igemm_s8s8s32(2, 2, 0, nullptr, 1, nullptr, 1, d.as<int32_t>(), 3);
  cuda::copy_to_host(c.data(), d.data(), c.size() * sizeof(int32_t));
  EXPECT_EQ(c, (std::vector<int32_t>{0, 0, -7, 0, 0, -7}));
  cuda::igemm_s8s8s32(0, 5, 7, nullptr, 7, nullptr, 7, nullptr, 5);  // nothing to do
  const auto* p = d.as<int8_t>();
  EXPECT_THROW(cuda::igemm_s8s8s32(2, 2, 8, p, 4, p, 8, d.as<int32_t>(), 2), Error);         // lda < K
  EXPECT_THROW(cuda::igemm_s8s8s32(2, 2, 8, p, 8, p, 8, d.as<int32_t>(), 1), Error);         // ldc < N
  EXPECT_THROW(cuda::igemm_s8s8s32(-1, 2, 8, p, 8, p, 8, d.as<int32_t>(), 2), Error);        // negative
  EXPECT_THROW(cuda::igemm_s8s8s64(2, 2, 8, p, 8, p, 8, d.as<int64_t>(), 2, nullptr, 200, 1), Error);  // bound
}

// qgemm on the device against qgemm on the CPU, float for float: left grids per tensor, per row
// (stochastic PSQ included) and BHQ; right grids per tensor and per row; bit widths 2..8 on each
// side (8 bits: the shifted operands); N > M (the CPU's swapped product); accumulate.
TEST_F(CudaGemm, QuantizedEqualsCpuQgemmBitForBit) {
  struct Shape3 {
    int64_t M, N, K;
  };
  const std::vector<Shape3> shapes = {{1, 1, 1}, {64, 33, 100}, {5, 129, 64}, {128, 16, 1152}, {300, 7, 17}};
  const std::vector<QuantizerKind> left = {QuantizerKind::affine, QuantizerKind::psq, QuantizerKind::bhq,
                                           QuantizerKind::symmetric_row, QuantizerKind::ptq};
  const std::vector<QuantizerKind> right = {QuantizerKind::affine, QuantizerKind::symmetric_row, QuantizerKind::psq};
  const std::vector<std::pair<int, int>> bits = {{8, 8}, {8, 4}, {4, 8}, {2, 7}, {7, 2}};
  int checked = 0, differing = 0;
  uint64_t seed = 500;
  for (const Shape3& sh : shapes)
    for (QuantizerKind ka : left)
      for (QuantizerKind kb : right)
        for (auto [ba, bb] : bits) {
          const Tensor x = synthetic_matrix(SynthKind::gaussian, sh.M, sh.K, ++seed);
          const Tensor w = synthetic_matrix(SynthKind::heavy_tailed, sh.N, sh.K, ++seed);
          const QuantizedTensor qa = quantize(x, {ka, ba}, {seed, 1});
          const QuantizedTensor qb = quantize(w, {kb, bb}, {seed, 2});
          for (bool acc : {false, true}) {
            const Tensor c0 = synthetic_matrix(SynthKind::gaussian, sh.M, sh.N, seed + 7);
            Tensor want = acc ? c0.clone() : Tensor();
            qgemm(qa, qb, want, acc);
            const Tensor got = qgemm_cuda(qa, qb, acc ? &c0 : nullptr);
            ++checked;
            if (std::memcmp(want.raw(), got.raw(), static_cast<size_t>(sh.M * sh.N) * sizeof(float)) != 0) {
              if (++differing <= 5) {
                int64_t i = 0;  // the first differing bit pattern (+0 / -0 and NaN included)
                while (i + 1 < sh.M * sh.N &&
                       std::memcmp(want.data<float>() + i, got.data<float>() + i, sizeof(float)) == 0)
                  ++i;
                ADD_FAILURE() << traits(ka).name << " " << ba << "b x " << traits(kb).name << " " << bb << "b "
                              << sh.M << "x" << sh.N << "x" << sh.K << (acc ? " acc" : "") << ": element " << i
                              << " cpu " << want.data<float>()[i] << " gpu " << got.data<float>()[i];
              }
            }
          }
        }
  // (Added after the H200 runs of 2026-12-04, not yet run on a device:) 8-bit codes on both
  // sides over K = 131088, past the int32 bound of 128 x 128 products: the int64 path.
  {
    const int64_t K = 131088;
    const QuantizedTensor qa = quantize(synthetic_matrix(SynthKind::gaussian, 2, K, 77), {QuantizerKind::psq, 8}, {7, 1});
    const QuantizedTensor qb = quantize(synthetic_matrix(SynthKind::gaussian, 3, K, 78), {QuantizerKind::affine, 8}, {});
    Tensor want;
    qgemm(qa, qb, want, false);
    const Tensor got = qgemm_cuda(qa, qb);
    ++checked;
    if (std::memcmp(want.raw(), got.raw(), 6 * sizeof(float)) != 0) {
      ++differing;
      ADD_FAILURE() << "psq 8b x affine 8b 2x3x" << K << " (int64 path) differs from the CPU";
    }
  }
  std::printf("qgemm: %d of %d products bit-identical to the CPU\n", checked - differing, checked);
  EXPECT_EQ(differing, 0);
  // What the CPU refuses, the device refuses too.
  const QuantizedTensor col = quantize(synthetic_matrix(SynthKind::gaussian, 8, 16, 1), {QuantizerKind::column, 8}, {});
  const QuantizedTensor row = quantize(synthetic_matrix(SynthKind::gaussian, 8, 16, 2), {QuantizerKind::psq, 8}, {3, 4});
  const QuantizedTensor bhq = quantize(synthetic_matrix(SynthKind::gaussian, 8, 16, 3), {QuantizerKind::bhq, 8}, {3, 4});
  const QuantizedTensor short_k = quantize(synthetic_matrix(SynthKind::gaussian, 8, 15, 4), {QuantizerKind::psq, 8}, {3, 4});
  // Uploaded first, so that only qgemm_device itself can throw.
  const cuda::DeviceQuantized dcol = cuda::upload(col), drow = cuda::upload(row), dbhq = cuda::upload(bhq),
                              dshort = cuda::upload(short_k);
  cuda::DeviceBuffer out(64 * sizeof(float));
  EXPECT_THROW(cuda::qgemm_device(dcol, drow, out.as<float>()), Error);
  EXPECT_THROW(cuda::qgemm_device(drow, dcol, out.as<float>()), Error);
  EXPECT_THROW(cuda::qgemm_device(drow, dbhq, out.as<float>()), Error);
  EXPECT_THROW(cuda::qgemm_device(drow, dshort, out.as<float>()), Error);
}

// int8 (cuBLASLt, int32 compute) against fp32 (cuBLAS sgemm, no TF32) on the same shapes and
// layout, medians of 20 runs with CUDA events. Only with FQT_CUDA_BENCH set.
TEST_F(CudaGemm, Bench) {
  if (!std::getenv("FQT_CUDA_BENCH")) GTEST_SKIP() << "set FQT_CUDA_BENCH=1 to time the GEMMs";
  cublasHandle_t h = nullptr;
  ASSERT_EQ(cublasCreate(&h), CUBLAS_STATUS_SUCCESS);
  ASSERT_EQ(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH), CUBLAS_STATUS_SUCCESS);
  auto median_ms = [](auto&& fn) { return cuda_test::time_events(20, fn).median; };
  std::string out = fmt::format("\n{}, C = A B^T (row-major), medians of 20 runs (CUDA events)\n", cuda::device_name(0));
  out += "| M x N x K | int8 ms | int8 TOPS | fp32 ms | fp32 TFLOPS | int8 / fp32 |\n|---|---:|---:|---:|---:|---:|\n";
  // Square shapes, then the im2col GEMMs of a PreAct-ResNet-20 stage-1 layer over a batch of 128
  // (16 channels, 28 x 28, 3 x 3: fprop M = 128*784, N = 16, K = 144).
  for (auto [M, N, K] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1024, 1024, 1024}, {4096, 4096, 4096}, {8192, 8192, 8192}, {100352, 16, 144}, {100352, 64, 576}}) {
    const auto a = random_s8(M * K, 1), b = random_s8(N * K, 2);
    cuda::DeviceBuffer da(a.size()), db(b.size()), dc(M * N * sizeof(int32_t));
    cuda::DeviceBuffer fa(a.size() * 4), fb(b.size() * 4), fc(M * N * sizeof(float));
    cuda::copy_to_device(da.data(), a.data(), a.size());
    cuda::copy_to_device(db.data(), b.data(), b.size());
    CUDA_CHECK(cudaMemset(fa.data(), 0, fa.bytes()));
    CUDA_CHECK(cudaMemset(fb.data(), 0, fb.bytes()));
    const float i8 = median_ms(
        [&] { cuda::igemm_s8s8s32(M, N, K, da.as<int8_t>(), K, db.as<int8_t>(), K, dc.as<int32_t>(), N); });
    const float one = 1.0f, zero = 0.0f;
    const float f32 = median_ms([&] {
      ASSERT_EQ(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K),
                            &one, fb.as<float>(), static_cast<int>(K), fa.as<float>(), static_cast<int>(K), &zero,
                            fc.as<float>(), static_cast<int>(N)),
                CUBLAS_STATUS_SUCCESS);
    });
    const double ops = 2.0 * M * N * K;
    out += fmt::format("| {} x {} x {} | {:.3f} | {:.1f} | {:.3f} | {:.1f} | {:.2f}x |\n", M, N, K, i8,
                       ops / (i8 * 1e-3) / 1e12, f32, ops / (f32 * 1e-3) / 1e12, f32 / i8);
  }
  // The quantized GEMM (8-bit PSQ codes x 8-bit per-row weight codes: both operands shifted,
  // the rank-1 epilogue) against the raw int8 GEMM of the same shape above.
  out += "\n| qgemm_device (psq 8b x symmetric_row 8b) M x N x K | ms | effective TOPS |\n|---|---:|---:|\n";
  for (auto [M, N, K] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{4096, 4096, 4096}, {100352, 16, 144}}) {
    cuda::DeviceTensor dx = cuda::upload(synthetic_matrix(SynthKind::gaussian, M, K, 5));
    cuda::DeviceTensor dw = cuda::upload(synthetic_matrix(SynthKind::gaussian, N, K, 6));
    cuda::DeviceQuantized qa, qb;
    cuda::quantize_device(dx.data<float>(), M, K, {QuantizerKind::psq, 8}, {1, 2}, qa);
    cuda::quantize_device(dw.data<float>(), N, K, {QuantizerKind::symmetric_row, 8}, {}, qb);
    cuda::DeviceBuffer dc(M * N * sizeof(float));
    const float ms = median_ms([&] { cuda::qgemm_device(qa, qb, dc.as<float>()); });
    out += fmt::format("| {} x {} x {} | {:.3f} | {:.1f} |\n", M, N, K, ms, 2.0 * M * N * K / (ms * 1e-3) / 1e12);
  }
  cublasDestroy(h);
  std::printf("%s", out.c_str());
  if (const char* path = std::getenv("FQT_CUDA_BENCH_OUT"))
    if (FILE* f = std::fopen(path, "a")) {
      std::fputs(out.c_str(), f);
      std::fclose(f);
    }
}
