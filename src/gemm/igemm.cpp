// Raw integer GEMM: backend selection, the reference, the portable kernel and the chunking of
// long reductions (int32 per chunk, int64 across chunks).
#include "fqt/igemm.hpp"
#include "fqt/profile.hpp"

#include <algorithm>
#include <atomic>
#include <climits>
#include <vector>

namespace fqt {
namespace {

std::atomic<IgemmBackend> g_backend{IgemmBackend::automatic};

// Full-range chunk bound: 255 * 128 per term.
constexpr int64_t kFullA = 255, kFullB = 128;

void check_args(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
  FQT_CHECK(M >= 0 && N >= 0 && K >= 0, "igemm: negative size M={} N={} K={}", M, N, K);
  FQT_CHECK(lda >= K && ldb >= K && ldc >= N, "igemm: leading dimensions lda={} ldb={} ldc={} for K={} N={}", lda,
            ldb, ldc, K, N);
}

}  // namespace

const char* igemm_backend_name(IgemmBackend b) {
  switch (b) {
    case IgemmBackend::automatic: return "automatic";
    case IgemmBackend::reference: return "reference";
    case IgemmBackend::portable: return "portable";
    case IgemmBackend::vnni: return "vnni";
    case IgemmBackend::onednn: return "onednn";
    case IgemmBackend::avx2: return "avx2";
  }
  return "?";
}

bool igemm_backend_available(IgemmBackend b) {
  switch (b) {
    case IgemmBackend::vnni: return igemm_detail::vnni_available();
    case IgemmBackend::avx2: return igemm_detail::avx2_available();
    case IgemmBackend::onednn: return igemm_detail::onednn_available();
    default: return true;
  }
}

void set_igemm_backend(IgemmBackend b) {
  FQT_CHECK(igemm_backend_available(b), "igemm backend '{}' is not available in this build/CPU",
            igemm_backend_name(b));
  g_backend.store(b);
}
IgemmBackend igemm_backend() { return g_backend.load(); }

IgemmBackend igemm_resolved_backend() {
  IgemmBackend b = g_backend.load();
  if (b != IgemmBackend::automatic) return b;
  // Measured on Zen 4 (bench/gemm_bench.cpp, 1024^3, 1 thread): oneDNN ~420 GOPS, own VNNI
  // kernel ~325 GOPS, portable ~45 GOPS. Hence oneDNN first, then VNNI, then portable.
  // Without VNNI, oneDNN's int8 kernels go through vpmaddubsw, whose s16 pair sums saturate
  // (255 * 127 * 2 > 32767; oneDNN documents this): not exact, so it is never chosen there.
  if (igemm_detail::vnni_available())
    return igemm_detail::onednn_available() ? IgemmBackend::onednn : IgemmBackend::vnni;
  if (igemm_detail::avx2_available()) return IgemmBackend::avx2;
  return IgemmBackend::portable;
}

int64_t igemm_max_k(int64_t a_max, int64_t b_absmax) {
  FQT_CHECK(a_max >= 0 && b_absmax >= 0, "igemm_max_k: negative bound");
  const int64_t per = a_max * b_absmax;
  return per == 0 ? INT64_MAX : INT32_MAX / per;
}

// ---- reference ------------------------------------------------------------------------------
void igemm_u8s8s64_ref(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B_t,
                       int64_t ldb, int64_t* C, int64_t ldc) {
  check_args(M, N, K, lda, ldb, ldc);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int64_t(A[m * lda + k]) * int64_t(B_t[n * ldb + k]);
      C[m * ldc + n] = s;
    }
}

void igemm_u8s8s32_ref(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B_t,
                       int64_t ldb, int32_t* C, int64_t ldc) {
  check_args(M, N, K, lda, ldb, ldc);
  // The int64 reference, then a checked narrowing.
  std::vector<int64_t> wide(static_cast<size_t>(M * N));
  igemm_u8s8s64_ref(M, N, K, A, lda, B_t, ldb, wide.data(), N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t s = wide[m * N + n];
      FQT_CHECK(s >= INT32_MIN && s <= INT32_MAX, "igemm_u8s8s32_ref: C[{}][{}] = {} does not fit in int32", m, n, s);
      C[m * ldc + n] = static_cast<int32_t>(s);
    }
}

// ---- portable kernel ------------------------------------------------------------------------
namespace igemm_detail {

void s32_portable(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                  int32_t* C, int64_t ldc) {
  // 4 x 4 register tiles of dot products; the inner loop over k is contiguous for both operands
  // and vectorises. Exact: K is within the int32 bound (caller's contract).
  const int64_t work = M * N * std::max<int64_t>(K, 1);
#pragma omp parallel for schedule(dynamic, 1) collapse(2) if (work > (1 << 20))
  for (int64_t m0 = 0; m0 < M; m0 += 4)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
      const int64_t mr = std::min<int64_t>(4, M - m0), nr = std::min<int64_t>(4, N - n0);
      if (mr == 4 && nr == 4) {
        int32_t acc[4][4] = {};
        for (int i = 0; i < 4; ++i) {
          const uint8_t* a = A + (m0 + i) * lda;
          for (int j = 0; j < 4; ++j) {
            const int8_t* b = B + (n0 + j) * ldb;
            int32_t s = 0;
            for (int64_t k = 0; k < K; ++k) s += int32_t(a[k]) * int32_t(b[k]);
            acc[i][j] = s;
          }
        }
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) C[(m0 + i) * ldc + n0 + j] = acc[i][j];
      } else {
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < nr; ++j) {
            const uint8_t* a = A + (m0 + i) * lda;
            const int8_t* b = B + (n0 + j) * ldb;
            int32_t s = 0;
            for (int64_t k = 0; k < K; ++k) s += int32_t(a[k]) * int32_t(b[k]);
            C[(m0 + i) * ldc + n0 + j] = s;
          }
      }
    }
}

void s32_local(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
               int32_t* C, int64_t ldc) {
  if (vnni_available()) s32_vnni(M, N, K, A, lda, B, ldb, C, ldc);
  else if (avx2_available()) s32_avx2(M, N, K, A, lda, B, ldb, C, ldc);
  else s32_portable(M, N, K, A, lda, B, ldb, C, ldc);
}

LocalB::LocalB(int64_t N, int64_t K, const int8_t* B, int64_t ldb) : n_(N), k_(K), ldb_(ldb), b_(B) {
  if (vnni_available() && N > 0 && K > 0) pack_b_vnni(N, K, B, ldb, packed_);
}

void LocalB::gemm(int64_t M, const uint8_t* A, int64_t lda, int32_t* C, int64_t ldc) const {
  if (!packed_.empty()) s32_vnni_packed(M, n_, k_, A, lda, packed_.data(), C, ldc);
  else s32_local(M, n_, k_, A, lda, b_, ldb_, C, ldc);
}

const char* local_kernel_name() { return vnni_available() ? "vnni" : avx2_available() ? "avx2" : "portable"; }

void s32_dispatch(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                  int32_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  profile::Scope timer(profile::gemm_int);  // fqt bench step: time in integer GEMM kernels
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0);
    return;
  }
  IgemmBackend be = igemm_resolved_backend();
  // Small products (< 2^20 MACs, e.g. per-layer GEMMs of tiny models): oneDNN's per-call cost
  // (stream, parallel region: a scheduler slice on a busy machine) dominates; the own kernel
  // runs them on the calling thread. Only when the backend was left on automatic.
  if (be == IgemmBackend::onednn && igemm_backend() == IgemmBackend::automatic && M * N * K < (int64_t(1) << 20) &&
      vnni_available())
    be = IgemmBackend::vnni;
  switch (be) {
    case IgemmBackend::reference: {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          int64_t s = 0;
          for (int64_t k = 0; k < K; ++k) s += int64_t(A[m * lda + k]) * int64_t(B[n * ldb + k]);
          C[m * ldc + n] = static_cast<int32_t>(s);
        }
      return;
    }
    case IgemmBackend::vnni: s32_vnni(M, N, K, A, lda, B, ldb, C, ldc); return;
    case IgemmBackend::onednn: s32_onednn(M, N, K, A, lda, B, ldb, C, ldc); return;
    case IgemmBackend::avx2: s32_avx2(M, N, K, A, lda, B, ldb, C, ldc); return;
    default: s32_portable(M, N, K, A, lda, B, ldb, C, ldc); return;
  }
}

}  // namespace igemm_detail

// ---- chunked entry points -------------------------------------------------------------------
namespace {
// Chunk length: the int32 bound, rounded down to a multiple of 64 (keeps chunk starts aligned
// for the kernels' K blocking) when it is that large.
int64_t chunk_len(int64_t a_max, int64_t b_absmax) {
  int64_t c = igemm_max_k(a_max, b_absmax);
  if (c >= 128) c -= c % 64;
  return std::max<int64_t>(c, 1);
}
}  // namespace

void igemm_u8s8s64(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B_t,
                   int64_t ldb, int64_t* C, int64_t ldc, int64_t a_max, int64_t b_absmax) {
  check_args(M, N, K, lda, ldb, ldc);
  FQT_CHECK(a_max <= 255 && b_absmax <= 128, "igemm_u8s8s64: bounds a_max={} b_absmax={}", a_max, b_absmax);
  for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0);
  if (M == 0 || N == 0 || K == 0) return;
  const int64_t chunk = chunk_len(a_max, b_absmax);
  std::vector<int32_t> tmp(static_cast<size_t>(M * N));
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t kc = std::min(chunk, K - k0);
    igemm_detail::s32_dispatch(M, N, kc, A + k0, lda, B_t + k0, ldb, tmp.data(), N);
#pragma omp parallel for schedule(static) if (M * N > (1 << 16))
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] += tmp[m * N + n];
  }
}

void igemm_u8s8s32(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B_t,
                   int64_t ldb, int32_t* C, int64_t ldc) {
  check_args(M, N, K, lda, ldb, ldc);
  if (K <= igemm_max_k(kFullA, kFullB)) {
    igemm_detail::s32_dispatch(M, N, K, A, lda, B_t, ldb, C, ldc);
    return;
  }
  std::vector<int64_t> wide(static_cast<size_t>(M * N));
  igemm_u8s8s64(M, N, K, A, lda, B_t, ldb, wide.data(), N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      const int64_t s = wide[m * N + n];
      FQT_CHECK(s >= INT32_MIN && s <= INT32_MAX, "igemm_u8s8s32: C[{}][{}] = {} does not fit in int32 (K = {})", m,
                n, s, K);
      C[m * ldc + n] = static_cast<int32_t>(s);
    }
}

}  // namespace fqt
