// Core: tensors, errors, Philox.
#include "fqt/error.hpp"
#include "fqt/rng.hpp"
#include "fqt/tensor.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <set>

using namespace fqt;

TEST(CoreTensor, ShapeDtypeAlignment) {
  for (DType t : {DType::f32, DType::f64, DType::i8, DType::u8, DType::i32}) {
    Tensor a = Tensor::zeros({3, 5, 7}, t);
    EXPECT_EQ(a.numel(), 105);
    EXPECT_EQ(a.dim(), 3);
    EXPECT_EQ(a.size(-1), 7);
    EXPECT_EQ(a.nbytes(), 105 * dtype_size(t));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a.raw()) % 64, 0u) << dtype_name(t);
  }
  Tensor e = Tensor::empty({0, 4});
  EXPECT_EQ(e.numel(), 0);
  EXPECT_NE(e.raw(), nullptr);
}

TEST(CoreTensor, DtypeMismatchAndBadShapeThrow) {
  Tensor a = Tensor::zeros({2, 2});
  EXPECT_THROW(a.data<double>(), Error);
  EXPECT_THROW(a.reshape({3}), Error);
  EXPECT_THROW(Tensor::empty({-1, 2}), Error);
  EXPECT_THROW(Tensor::empty({int64_t{1} << 40, int64_t{1} << 40}), Error);  // overflows int64
  EXPECT_THROW(a.size(2), Error);
}

TEST(CoreTensor, CloneReshapeConvert) {
  Tensor a = Tensor::from<float>({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor b = a.reshape({3, 2});
  EXPECT_EQ(b.data<float>(), a.data<float>());  // shares storage
  Tensor c = a.clone();
  c.data<float>()[0] = 42;
  EXPECT_EQ(a.data<float>()[0], 1.0f);
  Tensor d = a.to(DType::i32);
  EXPECT_EQ(d.data<int32_t>()[5], 6);
}

TEST(CoreError, CheckCarriesMessageAndLocation) {
  try {
    FQT_CHECK(1 + 1 == 3, "arithmetic is broken: {}", 42);
    FAIL() << "FQT_CHECK did not throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("arithmetic is broken: 42"), std::string::npos) << m;
    EXPECT_NE(m.find("test_core.cpp"), std::string::npos) << m;
  }
  EXPECT_THROW(FQT_INPUT_CHECK(false, "bad {}", "input"), InputError);
}

// Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
TEST(CorePhilox, KnownAnswers) {
  struct Kat { uint32_t ctr[4], key[2], out[4]; };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    uint32_t out[4];
    philox4x32_10(k.ctr, k.key, out);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], k.out[i]) << "word " << i;
  }
}

TEST(CorePhilox, UniformsDependOnlyOnSeedStreamIndex) {
  RngKey a{7, 3}, b{7, 4}, c{8, 3};
  std::set<float> seen;
  int same_stream = 0, same_seed = 0;
  for (uint64_t i = 0; i < 4096; ++i) {
    float u = uniform_at(a, i);
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    EXPECT_EQ(u, uniform_at(a, i));  // pure function
    seen.insert(u);
    same_stream += u == uniform_at(b, i);
    same_seed += u == uniform_at(c, i);
  }
  EXPECT_GT(seen.size(), 4000u);  // 24-bit resolution: collisions among 4096 draws are rare
  EXPECT_LT(same_stream, 5);
  EXPECT_LT(same_seed, 5);
  // Mean of 4096 U[0,1): sd = sqrt(1/12/4096) = 0.0045; 6 sigma = 0.027.
  double sum = 0;
  for (uint64_t i = 0; i < 4096; ++i) sum += uniform_at(a, i);
  EXPECT_NEAR(sum / 4096, 0.5, 0.027);
}

// The batched Philox (AVX-512 when built for it) gives exactly uniform_at, element by element,
// across carries of the 64-bit block counter and for lengths that are not multiples of 16 (the
// AVX-512 path takes 32 blocks at a time, then 16, then the rest one by one).
#include "kernels/cpu/philox_batch.hpp"
TEST(Rng, FillUniformsEqualsUniformAt) {
  for (uint64_t block0 : {uint64_t{0}, uint64_t{5}, uint64_t{0xFFFFFFF8ull}, uint64_t{0x1234FFFFFFFAull}})
    for (int64_t n : {1, 15, 16, 17, 31, 32, 53, 64, 100, 129, 300}) {  // partial and whole sets of 16 blocks
      const RngKey key{0x9876543210ull + block0, 0xABCDEF01234ull ^ static_cast<uint64_t>(n)};
      std::vector<float> got(static_cast<size_t>(4 * n));
      kernels::fill_uniforms(key, block0, n, got.data());
      for (int64_t i = 0; i < 4 * n; ++i)
        ASSERT_EQ(got[i], uniform_at(key, 4 * block0 + static_cast<uint64_t>(i))) << "block0 " << block0 << " i " << i;
    }
}

#include "kernels/cpu/philox_avx512.hpp"
#if defined(__AVX512F__)
// philox512::blocks: sets of 16 blocks at base + q * set_stride + off[i], equal to philox_block
// word for word, on its lane-uniform path (no carry of the low word: rounds 1 and 2 partly
// scalar) and its general one (a carry inside the sets, or a high word above 0), for the strides
// fill_uniforms (16 consecutive blocks a set) and the channel-major draws (lane i at i * C / 4,
// sets one block apart) use. (GCC 12's false maybe-uninitialized in its own AVX-512 header, as in
// philox_batch.cpp, silenced here.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
TEST(Rng, Philox512BlocksEqualPhiloxBlock) {
  using namespace fqt::kernels::philox512;
  const RngKey key{0xFEDCBA9876543210ull, 0x0123456789ABCDEFull};
  for (uint64_t base : {uint64_t{0}, uint64_t{77}, uint64_t{0xFFFFFFC0ull}, uint64_t{0xFFFFFFFEull},
                        uint64_t{0x500000003ull}, uint64_t{0x12345FFFFFFF0ull}, ~uint64_t{0} - 40})
    for (uint32_t lane_step : {1u, 4u, 16u}) {
      const uint64_t set_stride = lane_step == 1 ? 16 : 1;  // as fill_uniforms / Nchw16::draw
      alignas(64) uint32_t off[16];
      for (uint32_t i = 0; i < 16; ++i) off[i] = i * lane_step;
      __m512i c0[4], c1[4], c2[4], c3[4];
      blocks<4>(key, base, set_stride, _mm512_load_si512(off), 15 * lane_step, c0, c1, c2, c3);
      __m512i d0[4], d1[4], d2[4], d3[4];
      blocks<4, true>(key, base, set_stride, _mm512_load_si512(off), 15 * lane_step, d0, d1, d2, d3);
      for (int q = 0; q < 4; ++q) {
        alignas(64) uint32_t w[2][4][16];
        _mm512_store_si512(w[0][0], c0[q]), _mm512_store_si512(w[0][1], c1[q]);
        _mm512_store_si512(w[0][2], c2[q]), _mm512_store_si512(w[0][3], c3[q]);
        _mm512_store_si512(w[1][0], d0[q]), _mm512_store_si512(w[1][1], d1[q]);
        _mm512_store_si512(w[1][2], d2[q]), _mm512_store_si512(w[1][3], d3[q]);
        for (int i = 0; i < 16; ++i) {
          uint32_t want[4];
          philox_block(key, base + q * set_stride + off[i], want);
          for (int u = 0; u < 2; ++u)
            for (int k = 0; k < 4; ++k)
              ASSERT_EQ(w[u][k][i], want[k]) << "base " << base << " lane step " << lane_step << " set " << q << " lane " << i
                                             << " word " << k << (u ? " (unrolled)" : "");
        }
      }
    }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

#include "kernels/cpu/transpose.hpp"

// The layout transpose is pure data movement: every shape (8x8 tiles, edges, strides) bit-exact.
TEST(Transpose, EveryShapeAndStrideIsExact) {
  for (int64_t rows : {1, 7, 8, 9, 16, 17, 49, 784}) {
    for (int64_t cols : {1, 3, 8, 15, 16, 64}) {
      const int64_t lds = cols + 3, ldd = rows + 5;
      std::vector<float> src(static_cast<size_t>(rows * lds)), dst(static_cast<size_t>(cols * ldd), -1.0f);
      for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<float>(i) * 0.5f - 7.0f;
      fqt::kernels::transpose(src.data(), rows, cols, lds, dst.data(), ldd);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          ASSERT_EQ(dst[c * ldd + r], src[r * lds + c]) << rows << "x" << cols << " at " << r << "," << c;
      for (int64_t c = 0; c < cols; ++c)  // the padding between rows of dst is untouched
        for (int64_t r = rows; r < ldd; ++r) ASSERT_EQ(dst[c * ldd + r], -1.0f);
    }
  }
}

// The byte transpose (wgrad's G_n^T codes) with and without the 0x80 flip (q -> q - 128 as int8).
TEST(Transpose, BytesEveryShapeAndFlipIsExact) {
  for (uint8_t flip : {uint8_t{0}, uint8_t{0x80}})
    for (int64_t rows : {1, 7, 8, 9, 16, 49, 784})
      for (int64_t cols : {1, 3, 8, 10, 16, 17, 64}) {
        const int64_t lds = cols + 2, ldd = rows + 3;
        std::vector<uint8_t> src(static_cast<size_t>(rows * lds)), dst(static_cast<size_t>(cols * ldd), 0x5A);
        for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 37 + 11);
        fqt::kernels::transpose_bytes(src.data(), rows, cols, lds, dst.data(), ldd, flip);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c)
            ASSERT_EQ(dst[c * ldd + r], src[r * lds + c] ^ flip) << rows << "x" << cols << " at " << r << "," << c;
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t r = rows; r < ldd; ++r) ASSERT_EQ(dst[c * ldd + r], 0x5A);
      }
}

#if defined(FQT_ROW_TO_HWC)
// One image row from channel-major to pixel-major bytes (pad_hwc's AVX-512 VBMI form): every
// width up to 64 (whole and partial 16-pixel segments and 4-pixel stores), 16 / 32 / 64 channels,
// a channel stride wider than the row; bytes past the row's w C untouched.
TEST(Transpose, RowToHwcEqualsPlainLoop) {
  for (int64_t C : {16, 32, 64})
    for (int64_t w = 1; w <= 64; ++w) {
      const int64_t lds = w + 5;
      std::vector<uint8_t> src(static_cast<size_t>(C * lds)), dst(static_cast<size_t>(64 * C + 64), 0x5A);
      for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 37 + 11);
      fqt::kernels::row_to_hwc(src.data(), lds, w, C, dst.data());
      for (int64_t p = 0; p < w; ++p)
        for (int64_t c = 0; c < C; ++c) ASSERT_EQ(dst[p * C + c], src[c * lds + p]) << C << " channels, w " << w << " at " << p << "," << c;
      for (size_t i = static_cast<size_t>(w * C); i < dst.size(); ++i) ASSERT_EQ(dst[i], 0x5A) << C << " channels, w " << w;
    }
}
#endif

#include "fqt/profile.hpp"

#include <cmath>
#include <thread>
#include <vector>
// The profile counters sum every thread's scopes, also with more threads than counter slots (80
// threads over 64 slots: some share one), and reset clears them all.
TEST(CoreProfile, CountsEveryThreadsTime) {
  fqt::profile::reset();
  std::vector<std::thread> threads;
  for (int t = 0; t < 80; ++t)
    threads.emplace_back([t] {
      for (int i = 0; i < 10; ++i) fqt::profile::detail::add(fqt::profile::gemm_int, 1000 + t);
      fqt::profile::detail::add(fqt::profile::quantize, 7);
    });
  for (auto& th : threads) th.join();
  int64_t want = 0;
  for (int t = 0; t < 80; ++t) want += 10 * (1000 + t);
  EXPECT_EQ(std::llround(fqt::profile::seconds(fqt::profile::gemm_int) * 1e9), want);
  EXPECT_EQ(std::llround(fqt::profile::seconds(fqt::profile::quantize) * 1e9), 80 * 7);
  EXPECT_EQ(fqt::profile::seconds(fqt::profile::gemm_f32), 0.0);
  fqt::profile::reset();
  EXPECT_EQ(fqt::profile::seconds(fqt::profile::gemm_int), 0.0);
  EXPECT_EQ(fqt::profile::seconds(fqt::profile::quantize), 0.0);
}
