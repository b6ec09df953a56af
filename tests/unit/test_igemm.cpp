// Integer GEMM front end: every backend == the int64 reference bit for bit on awkward shapes,
// no silent overflow on long reductions, and the quantized GEMMs (fprop, dgrad incl. BHQ and
// the folded per-channel weight case, wgrad) against the fp64 dequantized oracle.
#include "fqt/igemm.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

using namespace fqt;

namespace {

struct BackendGuard {
  IgemmBackend saved = igemm_backend();
  ~BackendGuard() { set_igemm_backend(saved); }
};

std::vector<IgemmBackend> available_backends() {
  std::vector<IgemmBackend> v;
  for (auto b : {IgemmBackend::automatic, IgemmBackend::reference, IgemmBackend::portable, IgemmBackend::vnni,
                 IgemmBackend::onednn, IgemmBackend::avx2})
    if (igemm_backend_available(b)) v.push_back(b);
  return v;
}

template <typename T>
std::vector<T> random_ints(size_t n, int lo, int hi, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> d(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>(d(gen));
  return v;
}

Tensor random_tensor(int64_t rows, int64_t cols, uint32_t seed, float offset = 0.0f, float spread = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  Tensor t = Tensor::empty({rows, cols});
  float* p = t.data<float>();
  for (int64_t i = 0; i < rows * cols; ++i) p[i] = offset + spread * d(gen);
  // A few outlier rows make BHQ form real groups.
  for (int64_t r = 0; r < rows; r += 7) p[r * cols] *= 20.0f;
  return t;
}

struct Shape3 {
  int64_t M, N, K, pad;  // pad: extra elements in each leading dimension
};

}  // namespace

// ---- raw integer GEMM -----------------------------------------------------------------------
TEST(igemm_raw, AllBackendsMatchReferenceBitForBit) {
  BackendGuard guard;
  const std::vector<Shape3> shapes = {{1, 1, 1, 0},    {1, 7, 3, 0},     {5, 1, 13, 2},   {13, 17, 67, 0},
                                      {37, 33, 129, 5}, {1, 40, 1000, 0}, {24, 16, 4, 0},  {50, 48, 515, 3},
                                      {25, 15, 63, 1},  {97, 65, 1031, 0}, {2, 3, 70001, 0}, {12, 32, 513, 0}, {600, 40, 3001, 0},
                                      // K % 4 == 0 with few column panels: A read in place (VNNI).
                                      {100, 20, 144, 3}, {49, 64, 576, 0}, {48, 16, 16, 1}, {30, 33, 8, 0}};
  uint32_t seed = 1;
  for (const auto& s : shapes) {
    const int64_t lda = s.K + s.pad, ldb = s.K + 2 * s.pad, ldc = s.N + s.pad;
    auto A = random_ints<uint8_t>(s.M * lda, 0, 255, seed++);
    auto B = random_ints<int8_t>(s.N * ldb, -128, 127, seed++);
    std::vector<int32_t> ref(s.M * ldc, -7);
    igemm_u8s8s32_ref(s.M, s.N, s.K, A.data(), lda, B.data(), ldb, ref.data(), ldc);
    std::vector<int64_t> ref64(s.M * s.N);
    igemm_u8s8s64_ref(s.M, s.N, s.K, A.data(), lda, B.data(), ldb, ref64.data(), s.N);
    for (auto be : available_backends()) {
      set_igemm_backend(be);
      std::vector<int32_t> c(s.M * ldc, -7);
      igemm_u8s8s32(s.M, s.N, s.K, A.data(), lda, B.data(), ldb, c.data(), ldc);
      std::vector<int64_t> c64(s.M * s.N);
      igemm_u8s8s64(s.M, s.N, s.K, A.data(), lda, B.data(), ldb, c64.data(), s.N);
      for (int64_t m = 0; m < s.M; ++m)
        for (int64_t n = 0; n < ldc; ++n) {
          // Entries past N (padding) must be untouched.
          ASSERT_EQ(c[m * ldc + n], ref[m * ldc + n])
              << igemm_backend_name(be) << " M=" << s.M << " N=" << s.N << " K=" << s.K << " at " << m << "," << n;
          if (n < s.N) {
            ASSERT_EQ(c64[m * s.N + n], ref64[m * s.N + n]) << igemm_backend_name(be);
          }
        }
    }
    // The layers' kernel with B packed once (VNNI) or passed through (other CPUs), used twice
    // with the same packing, and as the layers use it: from every thread of a parallel loop (the
    // kernel then runs on the calling thread, with no OpenMP construct of its own).
    if (s.K <= igemm_max_k(255, 128)) {
      const igemm_detail::LocalB packed(s.N, s.K, B.data(), ldb);
      std::vector<std::vector<int32_t>> c(4, std::vector<int32_t>(s.M * ldc, -7));
      packed.gemm(s.M, A.data(), lda, c[0].data(), ldc);
      packed.gemm(s.M, A.data(), lda, c[1].data(), ldc);
#pragma omp parallel for schedule(static, 1) num_threads(2)
      for (int t = 2; t < 4; ++t) packed.gemm(s.M, A.data(), lda, c[t].data(), ldc);
      for (int t = 0; t < 4; ++t)
        for (int64_t m = 0; m < s.M; ++m)
          for (int64_t n = 0; n < ldc; ++n)
            ASSERT_EQ(c[t][m * ldc + n], ref[m * ldc + n]) << "LocalB call " << t << " M=" << s.M << " N=" << s.N << " K=" << s.K;
    }
  }
}

// The AVX2 kernel picks vpmaddubsw (saturating int16 pairs) only when 2 max|a| max|b| <= 32767.
// Operands at and just past that edge, filled with the extreme values (the worst pairs), must
// equal the reference bit for bit on both inner loops, on shapes with K and N tails.
TEST(igemm_raw, Avx2BytePathChosenOnlyWhenExact) {
  if (!igemm_detail::avx2_available()) GTEST_SKIP() << "CPU/build without AVX2";
  struct Case {
    int a_lo, a_hi, b_lo, b_hi;
    bool bytes;
  };
  const std::vector<Case> cases = {
      {0, 127, -128, 127, true},   // 7-bit A (e.g. 7-bit codes): 2 * 127 * 128 = 32512
      {0, 255, -64, 64, true},     // |B| <= 64 (7-bit signed): 2 * 255 * 64 = 32640
      {0, 31, -128, 127, true},    // 5-bit gradient codes x 8-bit weights
      {0, 163, -100, 100, true},   // 2 * 163 * 100 = 32600 (narrow per-sample ranges)
      {0, 164, -100, 100, false},  // 2 * 164 * 100 = 32800
      {0, 255, -65, 64, false},    // 2 * 255 * 65 = 33150: would saturate
      {0, 128, -128, 127, false},  // 2 * 128 * 128 = 32768: would saturate by one
      {0, 255, -128, 127, false},  // full range
  };
  const std::vector<Shape3> shapes = {{7, 5, 3, 0}, {13, 17, 67, 1}, {100, 16, 144, 0}, {37, 145, 16, 2}, {30, 9, 785, 0}};
  uint32_t seed = 900;
  for (const auto& cs : cases)
    for (const auto& s : shapes) {
      const int64_t lda = s.K + s.pad, ldb = s.K + 2 * s.pad, ldc = s.N + s.pad;
      // Half the entries at the extremes (the products that could saturate), half random.
      auto A = random_ints<uint8_t>(s.M * lda, cs.a_lo, cs.a_hi, seed++);
      auto B = random_ints<int8_t>(s.N * ldb, cs.b_lo, cs.b_hi, seed++);
      for (size_t i = 0; i < A.size(); i += 2) A[i] = static_cast<uint8_t>(cs.a_hi);
      for (size_t i = 0; i < B.size(); i += 2) B[i] = static_cast<int8_t>((i / 2) % 2 ? cs.b_lo : cs.b_hi);
      EXPECT_EQ(igemm_detail::avx2_bytes_exact(s.M, s.N, s.K, A.data(), lda, B.data(), ldb), cs.bytes)
          << cs.a_hi << " " << cs.b_lo << " " << s.M << "x" << s.N << "x" << s.K;
      std::vector<int32_t> ref(s.M * ldc, -7), c(s.M * ldc, -7);
      igemm_u8s8s32_ref(s.M, s.N, s.K, A.data(), lda, B.data(), ldb, ref.data(), ldc);
      igemm_detail::s32_avx2(s.M, s.N, s.K, A.data(), lda, B.data(), ldb, c.data(), ldc);
      for (int64_t m = 0; m < s.M; ++m)
        for (int64_t n = 0; n < ldc; ++n)  // the padding columns stay untouched
          ASSERT_EQ(c[m * ldc + n], ref[m * ldc + n]) << "a<=" << cs.a_hi << " b>=" << cs.b_lo << " " << s.M << "x"
                                                      << s.N << "x" << s.K << " at " << m << "," << n;
    }
}

TEST(igemm_raw, ChunkBoundFromBitWidths) {
  EXPECT_EQ(igemm_max_k(255, 128), 65793);  // 2^31 - 1 = 65793 * 32640 + 127
  EXPECT_EQ(igemm_max_k(15, 8), (int64_t(1) << 31) / 120);
  EXPECT_GE(igemm_max_k(0, 128), int64_t(1) << 40);
}

TEST(igemm_overflow, WorstCaseLongReductionIsExact) {
  BackendGuard guard;
  const int64_t M = 2, N = 2, K = 200000;
  std::vector<uint8_t> A(M * K, 255);
  for (int8_t bval : {int8_t(-128), int8_t(127)}) {
    std::vector<int8_t> B(N * K, bval);
    std::vector<int64_t> ref(M * N);
    igemm_u8s8s64_ref(M, N, K, A.data(), K, B.data(), K, ref.data(), N);
    EXPECT_EQ(ref[0], int64_t(K) * 255 * bval);
    for (auto be : available_backends()) {
      set_igemm_backend(be);
      std::vector<int64_t> c(M * N);
      igemm_u8s8s64(M, N, K, A.data(), K, B.data(), K, c.data(), N);
      EXPECT_EQ(c, ref) << igemm_backend_name(be);
      // The int32 entry point refuses rather than wrapping.
      std::vector<int32_t> c32(M * N);
      EXPECT_THROW(igemm_u8s8s32(M, N, K, A.data(), K, B.data(), K, c32.data(), N), Error) << igemm_backend_name(be);
    }
    std::vector<int32_t> c32(M * N);
    EXPECT_THROW(igemm_u8s8s32_ref(M, N, K, A.data(), K, B.data(), K, c32.data(), N), Error);
  }
  // Long reduction whose result fits int32: chunked, exact.
  std::vector<int8_t> B(N * K);
  for (int64_t i = 0; i < N * K; ++i) B[i] = (i % 2) ? 127 : -128;
  std::vector<int32_t> ref(M * N), c(M * N);
  igemm_u8s8s32_ref(M, N, K, A.data(), K, B.data(), K, ref.data(), N);
  for (auto be : available_backends()) {
    set_igemm_backend(be);
    igemm_u8s8s32(M, N, K, A.data(), K, B.data(), K, c.data(), N);
    EXPECT_EQ(c, ref) << igemm_backend_name(be);
  }
}

TEST(igemm_raw, RejectsBadArguments) {
  std::vector<uint8_t> A(16);
  std::vector<int8_t> B(16);
  std::vector<int32_t> C(16);
  EXPECT_THROW(igemm_u8s8s32(2, 2, 4, A.data(), 3, B.data(), 4, C.data(), 2), Error);
  EXPECT_THROW(igemm_u8s8s32(2, 2, 4, A.data(), 4, B.data(), 4, C.data(), 1), Error);
}

// ---- quantized GEMMs vs the fp64 oracle -----------------------------------------------------
namespace {

// Value of code (r, c) on its grid, in fp64 (before any BHQ T^-1).
double grid_value(const QuantizedTensor& q, int64_t r, int64_t c) {
  const int64_t g = q.group(r, c);
  return double(q.codes.data<uint8_t>()[r * q.cols + c]) / double(q.scale[g]) + double(q.lo[g]);
}

struct Mat {
  int64_t rows = 0, cols = 0;
  std::vector<double> v;
  double& at(int64_t r, int64_t c) { return v[r * cols + c]; }
  double at(int64_t r, int64_t c) const { return v[r * cols + c]; }
};

Mat grid_values(const QuantizedTensor& q) {
  Mat m{q.rows, q.cols, std::vector<double>(q.rows * q.cols)};
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t c = 0; c < q.cols; ++c) m.at(r, c) = grid_value(q, r, c);
  return m;
}

// |q / s| + |lo| per element: the size of the parts the corrections are made of. Where a value
// q / s + lo nearly cancels (e.g. the zero code of a zero-aligned grid), the expanded algebra
// loses ~eps_f64 of these parts, not of the value.
Mat part_sizes(const QuantizedTensor& q) {
  Mat m{q.rows, q.cols, std::vector<double>(q.rows * q.cols)};
  for (int64_t r = 0; r < q.rows; ++r)
    for (int64_t c = 0; c < q.cols; ++c) {
      const int64_t g = q.group(r, c);
      m.at(r, c) = double(q.codes.data<uint8_t>()[r * q.cols + c]) / double(q.scale[g]) + std::fabs(double(q.lo[g]));
    }
  return m;
}

Mat transpose(const Mat& a) {
  Mat t{a.cols, a.rows, std::vector<double>(a.v.size())};
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t c = 0; c < a.cols; ++c) t.at(c, r) = a.at(r, c);
  return t;
}

// C = A B^T in fp64, and sum |terms| for the tolerance.
void gemm_abt(const Mat& a, const Mat& b, Mat& c, Mat& mag);

// The tolerance scale (in units of eps_f32) of a qgemm result: the fp32 rounding of the result,
// eps_f32 sum |a b|, plus the fp64 evaluation of the expansion, 64 eps_f64 sum parts(a) parts(b).
void add_expansion_error(const Mat& pa, const Mat& pb, Mat& mag) {
  Mat c, unused;
  gemm_abt(pa, pb, c, unused);
  const double f = 64.0 * std::numeric_limits<double>::epsilon() / std::numeric_limits<float>::epsilon();
  for (size_t i = 0; i < mag.v.size(); ++i) mag.v[i] += f * c.v[i];
}

void gemm_abt(const Mat& a, const Mat& b, Mat& c, Mat& mag) {
  c = {a.rows, b.rows, std::vector<double>(a.rows * b.rows)};
  mag = c;
  for (int64_t m = 0; m < a.rows; ++m)
    for (int64_t n = 0; n < b.rows; ++n) {
      double s = 0, t = 0;
      for (int64_t k = 0; k < a.cols; ++k) {
        const double p = a.at(m, k) * b.at(n, k);
        s += p;
        t += std::fabs(p);
      }
      c.at(m, n) = s;
      mag.at(m, n) = t;
    }
}

// T^-1 applied in fp64 (same Householder constants as the library), and a bound on how much
// fp32 arithmetic in the library's T^-1 can add: (n + 2) eps |T^-1| |y| per element.
void bhq_inverse(const BhqTransform& t, Mat& y, Mat& mag) {
  Mat out = y, outmag = mag;
  for (int64_t g = 0; g < t.num_groups(); ++g) {
    const int64_t* mem = t.members.data() + t.offsets[g];
    const int64_t n = t.group_size(g);
    float vf, vr;
    householder_v(n, vf, vr);
    for (int64_t c = 0; c < y.cols; ++c) {
      double dot = 0, dotmag = 0;
      for (int64_t k = 0; k < n; ++k) {
        const double vk = k == 0 ? vf : vr;
        dot += vk * y.at(mem[k], c);
        dotmag += std::fabs(vk) * mag.at(mem[k], c);
      }
      for (int64_t k = 0; k < n; ++k) {
        const double vk2 = 2.0 * (k == 0 ? vf : vr);
        const double s = t.row_scale[mem[k]];
        out.at(mem[k], c) = (y.at(mem[k], c) - vk2 * dot) / s;
        outmag.at(mem[k], c) = double(n + 2) * (mag.at(mem[k], c) + std::fabs(vk2) * dotmag) / s;
      }
    }
  }
  y = out;
  mag = outmag;
}

void expect_close(const Tensor& got, const Mat& want, const Mat& mag, const std::string& what) {
  ASSERT_EQ(got.shape(), (Shape{want.rows, want.cols})) << what;
  const double eps = std::numeric_limits<float>::epsilon();
  const float* g = got.data<float>();
  int bad = 0;
  for (int64_t i = 0; i < want.rows * want.cols; ++i) {
    const double tol = eps * mag.v[i] + 1e-30;
    if (!(std::fabs(double(g[i]) - want.v[i]) <= tol) && bad++ < 3)
      ADD_FAILURE() << what << ": element " << i << " got " << g[i] << " want " << want.v[i] << " tol " << tol;
  }
}

QuantizedTensor q_of(const Tensor& x, QuantizerKind kind, int bits, uint64_t seed) {
  return quantize(x, {kind, bits}, RngKey{seed, 3});
}

std::string name(QuantizerKind a, QuantizerKind b, int bits, IgemmBackend be) {
  return std::string(traits(a).name) + " x " + traits(b).name + " b" + std::to_string(bits) + " " +
         igemm_backend_name(be);
}

}  // namespace

TEST(igemm_quant, FpropAllGridCombinations) {
  BackendGuard guard;
  // Both orientations: qgemm computes (B A^T)^T when B has more rows.
  for (auto [N, Dout] : {std::pair<int64_t, int64_t>{19, 21}, {29, 7}}) {
    const int64_t Din = 67;
    const Tensor x = random_tensor(N, Din, 11, 0.5f), w = random_tensor(Dout, Din, 12, 0.0f, 0.1f);
    for (auto be : available_backends()) {
      set_igemm_backend(be);
      for (int bits = 2; bits <= 8; ++bits)
        for (auto xk : {QuantizerKind::affine, QuantizerKind::zero_aligned, QuantizerKind::symmetric, QuantizerKind::psq})
          for (auto wk : {QuantizerKind::symmetric, QuantizerKind::symmetric_row, QuantizerKind::zero_aligned,
                          QuantizerKind::ptq_zero, QuantizerKind::affine}) {
            const auto xq = q_of(x, xk, bits, 1), wq = q_of(w, wk, bits, 2);
            Mat want, mag;
            gemm_abt(grid_values(xq), grid_values(wq), want, mag);
            add_expansion_error(part_sizes(xq), part_sizes(wq), mag);
            expect_close(qgemm_fprop(xq, wq), want, mag, "fprop " + name(xk, wk, bits, be));
          }
    }
  }
}

TEST(igemm_quant, DgradAllGridCombinationsIncludingBhq) {
  BackendGuard guard;
  const int64_t N = 23, Dout = 37, Din = 29;
  const Tensor g = random_tensor(N, Dout, 21, 0.0f, 1e-3f), w = random_tensor(Dout, Din, 22, 0.0f, 0.1f);
  for (auto be : available_backends()) {
    set_igemm_backend(be);
    for (int bits = 2; bits <= 8; ++bits)
      for (auto gk : {QuantizerKind::ptq, QuantizerKind::psq, QuantizerKind::bhq})
        for (auto wk : {QuantizerKind::symmetric, QuantizerKind::zero_aligned, QuantizerKind::ptq_zero,
                        QuantizerKind::affine, QuantizerKind::column}) {
          const auto gq = q_of(g, gk, bits, 3), wq = q_of(w, wk, bits, 4);
          Mat want, mag;
          gemm_abt(grid_values(gq), transpose(grid_values(wq)), want, mag);
          add_expansion_error(part_sizes(gq), transpose(part_sizes(wq)), mag);
          if (gq.transform) bhq_inverse(*gq.transform, want, mag);
          expect_close(qgemm_dgrad(gq, wq), want, mag, "dgrad " + name(gk, wk, bits, be));
        }
  }
}

TEST(igemm_quant, DgradFoldedPerChannelWeights) {
  BackendGuard guard;
  const int64_t N = 23, Dout = 37, Din = 29;
  const Tensor g = random_tensor(N, Dout, 31, 0.0f, 1e-3f), w = random_tensor(Dout, Din, 32, 0.0f, 0.1f);
  for (auto be : available_backends()) {
    set_igemm_backend(be);
    for (int bits = 2; bits <= 8; ++bits) {
      const auto wq = q_of(w, QuantizerKind::symmetric_row, bits, 5);
      const int z = (1 << (bits - 1)) - 1;
      const Tensor gf = dgrad_fold_weight_scales(g, wq);
      for (auto gk : {QuantizerKind::ptq, QuantizerKind::psq, QuantizerKind::bhq}) {
        const auto gq = q_of(gf, gk, bits, 6);
        // Oracle: deq(G') (q_w - z) == deq(G') diag(s_w) deq(W).
        Mat wint{Din, Dout, std::vector<double>(Din * Dout)};
        for (int64_t o = 0; o < Dout; ++o)
          for (int64_t i = 0; i < Din; ++i) wint.at(i, o) = double(wq.codes.data<uint8_t>()[o * Din + i]) - z;
        Mat want, mag;
        gemm_abt(grid_values(gq), wint, want, mag);
        Mat wabs = wint;
        for (auto& v : wabs.v) v = std::fabs(v);
        add_expansion_error(part_sizes(gq), wabs, mag);
        if (gq.transform) bhq_inverse(*gq.transform, want, mag);
        const Tensor dx = qgemm_dgrad_folded(gq, wq);
        expect_close(dx, want, mag, "dgrad_folded " + name(gk, QuantizerKind::symmetric_row, bits, be));
        // And it is G' diag(s_w) deq(W) up to the fp32 lo of W's grids.
        Mat scaled = grid_values(gq);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t o = 0; o < Dout; ++o) scaled.at(n, o) *= wq.scale[o];
        Mat want2, mag2;
        gemm_abt(scaled, transpose(grid_values(wq)), want2, mag2);
        if (!gq.transform) {
          for (size_t i = 0; i < want2.v.size(); ++i)
            EXPECT_NEAR(dx.data<float>()[i], want2.v[i], 1e-5 * mag2.v[i] + 1e-30);
        }
      }
    }
  }
}

TEST(igemm_quant, WgradAllGridCombinations) {
  BackendGuard guard;
  for (auto [Dout, Din] : {std::pair<int64_t, int64_t>{13, 18}, {17, 5}}) {
    const int64_t N = 131;
    const Tensor g = random_tensor(N, Dout, 41, 0.0f, 1e-3f), x = random_tensor(N, Din, 42, 0.5f);
    for (auto be : available_backends()) {
      set_igemm_backend(be);
      for (int bits = 2; bits <= 8; ++bits)
        for (auto gk : {QuantizerKind::ptq, QuantizerKind::column})
          for (auto xk : {QuantizerKind::affine, QuantizerKind::zero_aligned, QuantizerKind::column}) {
            const auto gq = q_of(g, gk, bits, 7), xq = q_of(x, xk, bits, 8);
            Mat want, mag;
            gemm_abt(transpose(grid_values(gq)), transpose(grid_values(xq)), want, mag);
            add_expansion_error(transpose(part_sizes(gq)), transpose(part_sizes(xq)), mag);
            expect_close(qgemm_wgrad(gq, xq), want, mag, "wgrad " + name(gk, xk, bits, be));
          }
    }
  }
}

TEST(igemm_quant, WgradLongReductionAtMaxCodes) {
  // 8-bit codes all at 255 over 200,000 samples: the integer sums leave int32 and must be chunked.
  BackendGuard guard;
  const int64_t N = 200000;
  Tensor g = Tensor::full({N, 2}, 1.0), x = Tensor::full({N, 3}, 2.0);
  g.data<float>()[0] = -1.0f;  // grid [-1, 1]; every other code is 255
  x.data<float>()[0] = 0.0f;
  const auto gq = q_of(g, QuantizerKind::ptq, 8, 9), xq = q_of(x, QuantizerKind::affine, 8, 10);
  ASSERT_EQ(gq.codes.data<uint8_t>()[5], 255);
  ASSERT_EQ(xq.codes.data<uint8_t>()[5], 255);
  Mat want, mag;
  gemm_abt(transpose(grid_values(gq)), transpose(grid_values(xq)), want, mag);
  add_expansion_error(transpose(part_sizes(gq)), transpose(part_sizes(xq)), mag);
  for (auto be : available_backends()) {
    set_igemm_backend(be);
    expect_close(qgemm_wgrad(gq, xq), want, mag, std::string("wgrad long ") + igemm_backend_name(be));
  }
}

// Shapes past the layout passes' blocks and tiles: fprop with more outputs than rows (the product
// is computed transposed, then turned back in 64-row blocks of 8x8 tiles: 200 = 3 x 64 + 8,
// 150 rows = 18 x 8 + 6), and wgrad whose operands are transposed as codes (600 x 130 bytes:
// above the threshold where the byte transpose runs in parallel blocks).
TEST(igemm_quant, LargeShapesCrossTileAndBlockEdges) {
  BackendGuard guard;
  const Tensor x = random_tensor(150, 67, 61, 0.5f), w = random_tensor(200, 67, 62, 0.0f, 0.1f);
  const Tensor g = random_tensor(600, 130, 63, 0.0f, 1e-3f), xw = random_tensor(600, 70, 64, 0.5f);
  for (auto be : available_backends()) {
    set_igemm_backend(be);
    const auto xq = q_of(x, QuantizerKind::zero_aligned, 8, 1), wq = q_of(w, QuantizerKind::symmetric, 8, 2);
    Mat want, mag;
    gemm_abt(grid_values(xq), grid_values(wq), want, mag);
    add_expansion_error(part_sizes(xq), part_sizes(wq), mag);
    expect_close(qgemm_fprop(xq, wq), want, mag, std::string("fprop 150x200 ") + igemm_backend_name(be));
    const auto gq = q_of(g, QuantizerKind::ptq, 8, 3), xwq = q_of(xw, QuantizerKind::zero_aligned, 8, 4);
    Mat want2, mag2;
    gemm_abt(transpose(grid_values(gq)), transpose(grid_values(xwq)), want2, mag2);
    add_expansion_error(transpose(part_sizes(gq)), transpose(part_sizes(xwq)), mag2);
    expect_close(qgemm_wgrad(gq, xwq), want2, mag2, std::string("wgrad 130x70 over 600 ") + igemm_backend_name(be));
  }
}

TEST(igemm_quant, GenericQgemmAccumulates) {
  const Tensor a = random_tensor(9, 40, 51, 0.2f), b = random_tensor(11, 40, 52);
  const auto aq = q_of(a, QuantizerKind::psq, 6, 1), bq = q_of(b, QuantizerKind::symmetric_row, 5, 2);
  Tensor c;
  qgemm(aq, bq, c, false);
  Tensor c2 = c.clone();
  qgemm(aq, bq, c2, true);
  for (int64_t i = 0; i < c.numel(); ++i) EXPECT_FLOAT_EQ(c2.data<float>()[i], 2.0f * c.data<float>()[i]);
  // BHQ on the left operand: T^-1 applied to the rows.
  const auto hq = q_of(a, QuantizerKind::bhq, 8, 3);
  Mat want, mag;
  gemm_abt(grid_values(hq), grid_values(bq), want, mag);
  add_expansion_error(part_sizes(hq), part_sizes(bq), mag);
  bhq_inverse(*hq.transform, want, mag);
  Tensor ch;
  qgemm(hq, bq, ch, false);
  expect_close(ch, want, mag, "qgemm bhq");
}

TEST(igemm_quant, RejectsGridsAlongTheReduction) {
  const Tensor x = random_tensor(8, 16, 61), w = random_tensor(4, 16, 62), g = random_tensor(8, 4, 63);
  const auto xq = q_of(x, QuantizerKind::affine, 8, 1), gq = q_of(g, QuantizerKind::psq, 8, 2);
  EXPECT_THROW(qgemm_fprop(xq, q_of(w, QuantizerKind::column, 8, 3)), Error);
  EXPECT_THROW(qgemm_fprop(q_of(x, QuantizerKind::column, 8, 3), q_of(w, QuantizerKind::symmetric, 8, 3)), Error);
  EXPECT_THROW(qgemm_dgrad(gq, q_of(w, QuantizerKind::symmetric_row, 8, 3)), Error);
  EXPECT_THROW(qgemm_dgrad(q_of(g, QuantizerKind::column, 8, 3), q_of(w, QuantizerKind::symmetric, 8, 3)), Error);
  EXPECT_THROW(qgemm_wgrad(gq, xq), Error);
  EXPECT_THROW(qgemm_wgrad(q_of(g, QuantizerKind::bhq, 8, 3), xq), Error);
  EXPECT_THROW(qgemm_wgrad(q_of(g, QuantizerKind::ptq, 8, 3), q_of(x, QuantizerKind::psq, 8, 3)), Error);
  // Per-row min/max weight grids have no common integer zero code: folding is refused.
  EXPECT_THROW(qgemm_dgrad_folded(gq, q_of(w, QuantizerKind::psq, 8, 3)), Error);
}

TEST(igemm_quant, ConcurrentCallersAndThreadCountsAgree) {
  // Per-thread scratch and the oneDNN primitive cache must be safe for concurrent callers, and
  // results (integers, then one rounding) must not depend on the thread count.
  const Tensor x1 = random_tensor(150, 72, 71, 0.3f), w1 = random_tensor(40, 72, 72);
  const Tensor x2 = random_tensor(64, 200, 73), w2 = random_tensor(24, 200, 74);
  const auto x1q = q_of(x1, QuantizerKind::affine, 8, 1), w1q = q_of(w1, QuantizerKind::symmetric_row, 8, 2);
  const auto x2q = q_of(x2, QuantizerKind::psq, 7, 3), w2q = q_of(w2, QuantizerKind::symmetric, 4, 4);
  const Tensor r1 = qgemm_fprop(x1q, w1q), r2 = qgemm_fprop(x2q, w2q);
  auto same = [](const Tensor& a, const Tensor& b) {
    return a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
  };
  const int saved = num_threads();
  set_num_threads(1);
  EXPECT_TRUE(same(qgemm_fprop(x1q, w1q), r1));
  set_num_threads(saved);
  bool ok1 = true, ok2 = true;
  std::thread t1([&] {
    for (int i = 0; i < 20; ++i) ok1 = ok1 && same(qgemm_fprop(x1q, w1q), r1);
  });
  std::thread t2([&] {
    for (int i = 0; i < 20; ++i) ok2 = ok2 && same(qgemm_fprop(x2q, w2q), r2);
  });
  t1.join();
  t2.join();
  EXPECT_TRUE(ok1);
  EXPECT_TRUE(ok2);
}
