// Own AVX-512 VNNI kernel for C = A B_t^T (u8 x s8 -> s32), vpdpbusd on packed panels.
//
// Packing (per K block of at most KC, K padded with zeros to a multiple of 4):
//   A: panels of MR rows, [k4][MR] int32 words, each the 4 bytes A[m][4 k4 .. 4 k4 + 3]
//      (broadcast to all 16 lanes);
//   B: panels of NR = 16 NZ columns, [k4][NR][4] bytes: one zmm per 16 columns and k4.
// Micro-kernel: MR x NZ zmm accumulators, acc[i][j] += dpbusd(bcast(A[i]), B[j]).
// Exact as long as K stays within the int32 bound (the caller chunks longer reductions).
#include "fqt/igemm.hpp"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FQT_IGEMM_VNNI 1
#endif

namespace fqt::igemm_detail {

#ifdef FQT_IGEMM_VNNI
namespace {

// K block (bytes of a packed row; multiple of 4): 512 for large M and N; longer when M and N
// are small (tall-K reductions such as wgrad) so that the packed blocks stay ~2 MiB and the
// number of parallel regions (and barriers, costly on a shared machine) stays small.
int64_t k_block(int64_t M, int64_t N, int64_t K) {
  int64_t kc = std::max<int64_t>(512, (int64_t(1) << 21) / (M + N + 64));
  kc = std::min(kc, (K + 3) / 4 * 4);
  return (kc + 3) / 4 * 4;
}
constexpr int64_t MC = 96;   // rows per A block handled by one task

template <int MR, int NZ>
inline void ukernel(int64_t k4n, const uint8_t* __restrict Ab, int64_t a_rs, int64_t a_cs,
                    const int8_t* __restrict Bp, int32_t* C, int64_t ldc, int64_t mr, int64_t nr, bool accumulate) {
  __m512i acc[MR][NZ];
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NZ; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t k4 = 0; k4 < k4n; ++k4) {
    __m512i b[NZ];
#pragma GCC unroll 4
    for (int j = 0; j < NZ; ++j) b[j] = _mm512_loadu_si512(Bp + (k4 * NZ + j) * 64);
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      int32_t w;
      std::memcpy(&w, Ab + i * a_rs + k4 * a_cs, 4);
      const __m512i a = _mm512_set1_epi32(w);
#pragma GCC unroll 4
      for (int j = 0; j < NZ; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], a, b[j]);
    }
  }
  if (mr == MR && nr == NZ * 16) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NZ; ++j) {
        int32_t* c = C + i * ldc + j * 16;
        __m512i v = acc[i][j];
        if (accumulate) v = _mm512_add_epi32(v, _mm512_loadu_si512(c));
        _mm512_storeu_si512(c, v);
      }
  } else {
    // Partial tile (mr < MR rows, or nr < 16 NZ columns), with compile-time indices into acc only
    // (a runtime index would force the accumulators into memory in the main loop too): whole
    // 16-column vectors stored as they are, a last part of a vector through a buffer. (N = 144,
    // the dgrad of the 16-channel 3x3 layers, ends in a panel of 16 of 32 columns: their
    // element-by-element copy made that the slowest GEMM of the step.)
    alignas(64) int32_t part[16];
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i) {
      if (i >= mr) break;
#pragma GCC unroll 4
      for (int j = 0; j < NZ; ++j) {
        const int64_t cols = std::min<int64_t>(16, nr - 16 * j);
        if (cols <= 0) break;
        int32_t* c = C + i * ldc + j * 16;
        if (cols == 16) {
          __m512i v = acc[i][j];
          if (accumulate) v = _mm512_add_epi32(v, _mm512_loadu_si512(c));
          _mm512_storeu_si512(c, v);
        } else {
          _mm512_store_si512(part, acc[i][j]);
          for (int64_t e = 0; e < cols; ++e) c[e] = (accumulate ? c[e] : 0) + part[e];
        }
      }
    }
  }
}

// B [N, K] (rows of ldb) packed for panels of 16 NZ columns: panel p = columns [p NR, p NR + NR),
// all of K, [k4][NR][4] bytes (zero-padded in n and k).
template <int NZ>
int64_t packed_b_bytes(int64_t N, int64_t K) {
  constexpr int64_t NR = 16 * NZ;
  return (N + NR - 1) / NR * NR * ((K + 3) / 4) * 4;
}
template <int NZ>
void pack_b_panel(int64_t p, int64_t N, int64_t K, const int8_t* B, int64_t ldb, int8_t* Bpk) {
  constexpr int64_t NR = 16 * NZ;
  const int64_t K4 = (K + 3) / 4;
  int8_t* dst = Bpk + p * NR * K4 * 4;
  std::memset(dst, 0, NR * K4 * 4);
  int32_t* d32 = reinterpret_cast<int32_t*>(dst);
  for (int64_t nn = 0; nn < NR && p * NR + nn < N; ++nn) {
    const int8_t* src = B + (p * NR + nn) * ldb;
    const int64_t kfull = K & ~int64_t(3);
    for (int64_t k4 = 0; k4 < kfull / 4; ++k4) std::memcpy(d32 + k4 * NR + nn, src + 4 * k4, 4);
    for (int64_t k = kfull; k < K; ++k) dst[((k >> 2) * NR + nn) * 4 + (k & 3)] = src[k];
  }
}

// C = A B^T; B packed here, or given packed (`prepacked`, from pack_b_panel for every panel).
template <int MR, int NZ>
void driver(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
            int32_t* C, int64_t ldc, const int8_t* prepacked = nullptr) {
  // One parallel region with a single barrier (after packing B): on a shared, oversubscribed
  // machine every barrier can cost a scheduler time slice, so K blocks must not add barriers.
  constexpr int64_t NR = 16 * NZ;
  const int64_t np = (N + NR - 1) / NR;
  const int64_t K4 = (K + 3) / 4;            // packed k4 steps over all of K
  const int64_t KC = k_block(M, N, K);       // multiple of 4
  const int64_t mcb = (M + MC - 1) / MC;
  static thread_local std::vector<int8_t> bbuf;
  if (!prepacked && static_cast<int64_t>(bbuf.size()) < packed_b_bytes<NZ>(N, K)) bbuf.resize(packed_b_bytes<NZ>(N, K));
  // (thread_local: the pointer is taken here, on the calling thread, before the parallel region)
  int8_t* own = bbuf.data();
  const int8_t* Bpk = prepacked ? prepacked : own;
  const bool par = (mcb >= 2 || np >= 2) && M * N * K > (1 << 20);
  // Measured (1 thread): in place A doubles tall-skinny shapes (N = 16: 112 -> 216 GOPS) and
  // is neutral at 64 columns.
  const bool direct = K % 4 == 0 && np <= 4;
  // Row block mb (MC rows) over all of K, with a scratch of abuf_words for its packed A panels.
  auto row_block = [&](int64_t mb, int32_t* abuf) {
    const int64_t m0 = mb * MC, m1 = std::min(M, m0 + MC);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0), k4n = (kc + 3) / 4;
      // Full panels are read in place when rows are 4-byte groups (K % 4 == 0) and A is used by
      // few column panels (packing would not pay off); otherwise, and for the partial last
      // panel, A is packed.
      const int64_t panels = (m1 - m0 + MR - 1) / MR;
      const int64_t full = (m1 - m0) / MR;
      const int64_t first_packed = direct ? full : 0;
      uint8_t* d8 = reinterpret_cast<uint8_t*>(abuf);
      if (panels > first_packed) std::memset(d8, 0, (panels - first_packed) * MR * k4n * 4);
      const int64_t kfull = kc & ~int64_t(3);
      for (int64_t i = first_packed * MR; i < m1 - m0; ++i) {
        const uint8_t* src = A + (m0 + i) * lda + k0;
        int32_t* d32 = abuf + (i / MR - first_packed) * MR * k4n + (i % MR);
        for (int64_t k4 = 0; k4 < kfull / 4; ++k4) std::memcpy(d32 + k4 * MR, src + 4 * k4, 4);
        uint8_t* dst = reinterpret_cast<uint8_t*>(d32);
        for (int64_t k = kfull; k < kc; ++k) dst[(k >> 2) * MR * 4 + (k & 3)] = src[k];
      }
      const bool accumulate = k0 > 0;
      for (int64_t pn = 0; pn < np; ++pn) {
        const int64_t nr = std::min(NR, N - pn * NR);
        const int8_t* bp = Bpk + (pn * K4 + k0 / 4) * NR * 4;
        for (int64_t pm = 0; pm < panels; ++pm) {
          const int64_t mr = std::min<int64_t>(MR, m1 - m0 - pm * MR);
          int32_t* c = C + (m0 + pm * MR) * ldc + pn * NR;
          if (pm < first_packed)
            ukernel<MR, NZ>(k4n, A + (m0 + pm * MR) * lda + k0, lda, 4, bp, c, ldc, mr, nr, accumulate);
          else
            ukernel<MR, NZ>(k4n, d8 + (pm - first_packed) * MR * k4n * 4, 4, MR * 4, bp, c, ldc, mr, nr, accumulate);
        }
      }
    }
  };
  const auto abuf_words = static_cast<size_t>(((MC + MR - 1) / MR) * MR * (KC / 4));
  if (par && !omp_in_parallel()) {
#pragma omp parallel
    {
      if (!prepacked) {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < np; ++p) pack_b_panel<NZ>(p, N, K, B, ldb, own);
      }
      // Row blocks: each thread packs its own A block per K block ([k4][MR] words per panel).
      std::vector<int32_t> abuf(abuf_words);
#pragma omp for schedule(dynamic, 1)
      for (int64_t mb = 0; mb < mcb; ++mb) row_block(mb, abuf.data());
    }
  } else {
    // On the calling thread, with no OpenMP construct at all: the layers call this from inside
    // their own parallel loop over samples, where even an inactive nested region cost ~3 futex
    // system calls per GEMM (24000 per PreAct-ResNet-20 step; perf: 9% of the step in the kernel).
    if (!prepacked)
      for (int64_t p = 0; p < np; ++p) pack_b_panel<NZ>(p, N, K, B, ldb, own);
    static thread_local std::vector<int32_t> abuf;
    if (abuf.size() < abuf_words) abuf.resize(abuf_words);
    for (int64_t mb = 0; mb < mcb; ++mb) row_block(mb, abuf.data());
  }
}

}  // namespace

bool vnni_available() {
  static const bool ok = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  return ok;
}

void s32_vnni(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
              int32_t* C, int64_t ldc) {
  static_assert(MC % 12 == 0 && MC % 24 == 0);
  if (N <= 16)
    driver<24, 1>(M, N, K, A, lda, B, ldb, C, ldc);
  else
    driver<12, 2>(M, N, K, A, lda, B, ldb, C, ldc);
}

void pack_b_vnni(int64_t N, int64_t K, const int8_t* B, int64_t ldb, std::vector<int8_t>& out) {
  if (N <= 16) {
    out.resize(static_cast<size_t>(packed_b_bytes<1>(N, K)));
    for (int64_t p = 0; p < (N + 15) / 16; ++p) pack_b_panel<1>(p, N, K, B, ldb, out.data());
  } else {
    out.resize(static_cast<size_t>(packed_b_bytes<2>(N, K)));
    for (int64_t p = 0; p < (N + 31) / 32; ++p) pack_b_panel<2>(p, N, K, B, ldb, out.data());
  }
}

void s32_vnni_packed(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* Bpk, int32_t* C,
                     int64_t ldc) {
  if (N <= 16)
    driver<24, 1>(M, N, K, A, lda, nullptr, 0, C, ldc, Bpk);
  else
    driver<12, 2>(M, N, K, A, lda, nullptr, 0, C, ldc, Bpk);
}

#else

bool vnni_available() { return false; }
void s32_vnni(int64_t, int64_t, int64_t, const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*, int64_t) {
  FQT_CHECK(false, "igemm: built without AVX512-VNNI");
}
void pack_b_vnni(int64_t, int64_t, const int8_t*, int64_t, std::vector<int8_t>&) {
  FQT_CHECK(false, "igemm: built without AVX512-VNNI");
}
void s32_vnni_packed(int64_t, int64_t, int64_t, const uint8_t*, int64_t, const int8_t*, int32_t*, int64_t) {
  FQT_CHECK(false, "igemm: built without AVX512-VNNI");
}

#endif

}  // namespace fqt::igemm_detail
