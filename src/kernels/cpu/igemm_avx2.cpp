// Own AVX2 kernel for C = A B_t^T (u8 x s8 -> s32) on CPUs without AVX-512 VNNI (Zen 2/3,
// Haswell..Ice Lake client parts).
//
// Exactness decides the instruction. AVX2's byte multiply, vpmaddubsw, adds two u8 x s8
// products into a *saturating* int16: 255 * (-128) * 2 = -65280 does not fit, so it is only
// exact when one operand has at most 7 bits (then |pair| <= 2 * 255 * 64 or 2 * 127 * 128 <
// 2^15). The kernel therefore has two inner loops:
//   wide  — both operands widened to int16 while packing, vpmaddwd (int16 x int16 pairs summed
//           into int32, exact for any u8 / s8 values), vpaddd into the accumulators;
//   bytes — when the operands allow it (max A <= 127, or max |B| <= 64, so 2 max|a| max|b| <=
//           32767): vpmaddubsw on 4-byte groups, vpmaddwd with ones, vpaddd. Twice the
//           products per multiply instruction. s32_avx2 measures both maxima first (one cheap
//           pass over A and B), so the choice is exact by construction, never by luck: codes of
//           up to 7 bits on either side (e.g. 5-bit BHQ gradients in dgrad) take it.
// Peak rates from registers (build/bench/bench_isa_madd, one core of the Zen 3 development VM):
// vpmaddwd + vpaddd 1.08x the fp32 FMA rate, vpmaddubsw + vpmaddwd + vpaddd 2.1x. So on AVX2 an
// exact full-range 8-bit x 8-bit GEMM is about as fast as fp32 — the integer speed-up of SPEC
// claim 4 needs VNNI (vpdpbusd: 64 MACs per instruction on zmm, exact in int32).
//
// Packing (per call, K padded with zeros to the group size):
//   B: panels of NR = 8 NZ columns, [kg][NR] 32-bit words (wide: two int16 of k = 2kg, 2kg+1;
//      bytes: four int8 of k = 4kg..4kg+3);
//   A: per thread and row block, rows of kg 32-bit words of the same kind (row-major), each
//      word broadcast to all 8 lanes.
// Micro-kernel: MR x NZ ymm accumulators.
#include "fqt/igemm.hpp"
#include "transpose.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#define FQT_IGEMM_AVX2 1
#endif

namespace fqt::igemm_detail {

#ifdef FQT_IGEMM_AVX2
namespace {

constexpr int64_t MC = 96;  // rows per A block (one task)

// A packed word whose default construction does nothing: std::vector<Word>(n) allocates without
// the zero fill of std::vector<int32_t>(n) (every word read is written by the packing first; the
// fill was ~100 KB per wgrad call, 3.9% of the instructions of a BHQ step in callgrind).
struct Word {
  int32_t v;
  Word() {}  // NOLINT: intentionally leaves v uninitialized
};
static_assert(sizeof(Word) == sizeof(int32_t));
inline int32_t* words(std::vector<Word>& w) { return reinterpret_cast<int32_t*>(w.data()); }

// K block in elements (a multiple of 4): the packed B block of a panel stays in L1/L2.
int64_t k_block(int64_t K) { return std::min<int64_t>(512, (K + 3) / 4 * 4); }

// Rows [0, rows) of src (row stride ld, elements k0..k0+kc) as 32-bit words, row-major: dst row
// r = kg words (wide: two int16 of k = 2g, 2g+1; bytes: four int8 of k = 4g..4g+3), zero padded;
// rows [rows, rows_padded) are zero. Contiguous stores (a strided word scatter was 12% of the
// kernel's time in perf).
template <bool Bytes, typename T>
void pack_rowmajor(const T* src, int64_t ld, int64_t rows, int64_t rows_padded, int64_t k0, int64_t kc, int32_t* dst) {
  constexpr int64_t G = Bytes ? 4 : 2;
  const int64_t kg = (kc + G - 1) / G;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * ld + k0;
    int32_t* d = dst + r * kg;
    if constexpr (Bytes) {
      std::memcpy(d, s, static_cast<size_t>(kc));
      std::memset(reinterpret_cast<uint8_t*>(d) + kc, 0, static_cast<size_t>(kg * 4 - kc));
    } else {
      auto* d16 = reinterpret_cast<int16_t*>(d);
      int64_t k = 0;
      for (; k + 16 <= kc; k += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k));
        const __m256i w = std::is_same_v<T, uint8_t> ? _mm256_cvtepu8_epi16(v) : _mm256_cvtepi8_epi16(v);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d16 + k), w);
      }
      for (; k < kc; ++k) d16[k] = static_cast<int16_t>(s[k]);
      if (kc % 2) d16[kc] = 0;
    }
  }
  if (rows_padded > rows) std::memset(dst + rows * kg, 0, sizeof(int32_t) * static_cast<size_t>((rows_padded - rows) * kg));
}

// B panel: R rows as [kg][R] words (one vector load per 8 columns and group): the row-major
// words, then a word transpose (8x8 AVX tiles).
template <bool Bytes, typename T>
void pack_panel(const T* src, int64_t ld, int64_t rows, int64_t k0, int64_t kc, int64_t R, int32_t* tmp, int32_t* dst) {
  constexpr int64_t G = Bytes ? 4 : 2;
  const int64_t kg = (kc + G - 1) / G;
  pack_rowmajor<Bytes>(src, ld, rows, R, k0, kc, tmp);
  for (int64_t r0 = 0; r0 < R; r0 += 8) {  // R = 8 NZ
    int64_t g0 = 0;
    for (; g0 + 8 <= kg; g0 += 8)
      kernels::transpose8x8(reinterpret_cast<const float*>(tmp + r0 * kg + g0), kg,
                            reinterpret_cast<float*>(dst + g0 * R + r0), R);
    for (int64_t g = g0; g < kg; ++g)
      for (int64_t r = r0; r < r0 + 8; ++r) dst[g * R + r] = tmp[r * kg + g];
  }
}

template <bool Bytes>
inline __m256i product(__m256i a, __m256i b, __m256i ones) {
  if constexpr (Bytes) return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones);
  else return _mm256_madd_epi16(a, b);
}

template <int MR, int NZ, bool Bytes>
void ukernel(int64_t kg, const int32_t* __restrict Ap, const int32_t* __restrict Bp, int32_t* C, int64_t ldc,
             int64_t mr, int64_t nr, bool accumulate) {
  __m256i acc[MR][NZ];
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NZ; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t g = 0; g < kg; ++g) {
    __m256i b[NZ];
#pragma GCC unroll 4
    for (int j = 0; j < NZ; ++j) b[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Bp + (g * NZ + j) * 8));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m256i a = _mm256_set1_epi32(Ap[i * kg + g]);
#pragma GCC unroll 4
      for (int j = 0; j < NZ; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], product<Bytes>(a, b[j], ones));
    }
  }
  if (mr == MR && nr == NZ * 8) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NZ; ++j) {
        auto* c = reinterpret_cast<__m256i*>(C + i * ldc + j * 8);
        __m256i v = acc[i][j];
        if (accumulate) v = _mm256_add_epi32(v, _mm256_loadu_si256(c));
        _mm256_storeu_si256(c, v);
      }
  } else {
    alignas(32) int32_t tile[MR][NZ * 8];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NZ; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(&tile[i][j * 8]), acc[i][j]);
    for (int64_t i = 0; i < mr; ++i)
      for (int64_t j = 0; j < nr; ++j) C[i * ldc + j] = (accumulate ? C[i * ldc + j] : 0) + tile[i][j];
  }
}

template <int MR, int NZ, bool Bytes>
void driver(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
            int32_t* C, int64_t ldc) {
  constexpr int64_t NR = 8 * NZ, G = Bytes ? 4 : 2;
  const int64_t np = (N + NR - 1) / NR;
  const int64_t KC = k_block(K);
  const int64_t kblocks = (K + KC - 1) / KC, kgc = KC / G;  // words per row per K block
  const int64_t mcb = (M + MC - 1) / MC;
  // Packed B: [k block][panel][kg][NR] words (each K block padded to KC).
  static thread_local std::vector<int32_t> bbuf;
  const auto bsize = static_cast<size_t>(kblocks * np * NR * kgc);
  if (bbuf.size() < bsize) bbuf.resize(bsize);
  int32_t* Bpk = bbuf.data();
  const bool par = (mcb >= 2 || np >= 2) && M * N * K > (1 << 20);
  auto pack_b = [&](int64_t t, int32_t* tmp) {  // K block t / np of panel t % np
    const int64_t kb = t / np, p = t % np, k0 = kb * KC;
    pack_panel<Bytes>(B + p * NR * ldb, ldb, std::min(NR, N - p * NR), k0, std::min(KC, K - k0), NR, tmp,
                      Bpk + t * NR * kgc);
  };
  // Row block mb: MC rows (padded to whole panels) of kg words each, row-major, in abuf.
  auto row_block = [&](int64_t mb, int32_t* abuf) {
    const int64_t m0 = mb * MC, m1 = std::min(M, m0 + MC), panels = (m1 - m0 + MR - 1) / MR;
    for (int64_t kb = 0; kb < kblocks; ++kb) {
      const int64_t k0 = kb * KC, kc = std::min(KC, K - k0), kg = (kc + G - 1) / G;
      pack_rowmajor<Bytes>(A + m0 * lda, lda, m1 - m0, panels * MR, k0, kc, abuf);
      for (int64_t pn = 0; pn < np; ++pn) {
        const int64_t nr = std::min(NR, N - pn * NR);
        const int32_t* bp = Bpk + (kb * np + pn) * NR * kgc;
        for (int64_t pm = 0; pm < panels; ++pm) {
          const int64_t mr = std::min<int64_t>(MR, m1 - m0 - pm * MR);
          ukernel<MR, NZ, Bytes>(kg, abuf + pm * MR * kg, bp, C + (m0 + pm * MR) * ldc + pn * NR, ldc, mr, nr, kb > 0);
        }
      }
    }
  };
  const auto tmp_words = static_cast<size_t>(NR * kgc), abuf_words = static_cast<size_t>(((MC + MR - 1) / MR) * MR * kgc);
  if (par && !omp_in_parallel()) {
#pragma omp parallel
    {
      std::vector<Word> tmp(tmp_words);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < kblocks * np; ++t) pack_b(t, words(tmp));
      std::vector<Word> abuf(abuf_words);
#pragma omp for schedule(dynamic, 1)
      for (int64_t mb = 0; mb < mcb; ++mb) row_block(mb, words(abuf));
    }
  } else {
    // On the calling thread with no OpenMP construct (see the VNNI driver: an inactive nested
    // region inside the layers' per-sample loops cost ~3 futex system calls per GEMM).
    static thread_local std::vector<Word> tmp, abuf;
    if (tmp.size() < tmp_words) tmp.resize(tmp_words);
    if (abuf.size() < abuf_words) abuf.resize(abuf_words);
    for (int64_t t = 0; t < kblocks * np; ++t) pack_b(t, words(tmp));
    for (int64_t mb = 0; mb < mcb; ++mb) row_block(mb, words(abuf));
  }
}

template <bool Bytes>
void dispatch_tile(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                   int32_t* C, int64_t ldc) {
  static_assert(MC % 6 == 0 && MC % 12 == 0);
  if (N <= 8) driver<12, 1, Bytes>(M, N, K, A, lda, B, ldb, C, ldc);
  else driver<6, 2, Bytes>(M, N, K, A, lda, B, ldb, C, ldc);
}

}  // namespace

bool avx2_available() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

namespace {
// max |b| of rows x n int8 (row stride ld).
int max_abs_s8(const int8_t* p, int64_t rows, int64_t n, int64_t ld) {
  __m256i mx = _mm256_setzero_si256();
  int tail = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* row = p + r * ld;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)  // |-128| stays 0x80 = 128 as unsigned
      mx = _mm256_max_epu8(mx, _mm256_abs_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i))));
    if (i + 16 <= n) {  // rows of K = Cout = 16 (dgrad) would otherwise be all tail
      const __m128i v = _mm_abs_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));
      mx = _mm256_max_epu8(mx, _mm256_zextsi128_si256(v));
      i += 16;
    }
    for (; i < n; ++i) tail = std::max(tail, std::abs(static_cast<int>(row[i])));
  }
  alignas(32) uint8_t b[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(b), mx);
  for (uint8_t v : b) tail = std::max<int>(tail, v);
  return tail;
}

// Whether every byte of rows x n u8 (row stride ld) is <= limit; stops at the first row that
// has a larger one (full-range data is rejected after a row or two).
bool all_within_u8(const uint8_t* p, int64_t rows, int64_t n, int64_t ld, int limit) {
  if (limit >= 255) return true;
  const __m256i lim = _mm256_set1_epi8(static_cast<char>(limit));
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = p + r * ld;
    __m256i mx = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) mx = _mm256_max_epu8(mx, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + i)));
    if (i + 16 <= n) {  // (dgrad's gradient rows of Cout = 16)
      mx = _mm256_max_epu8(mx, _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i))));
      i += 16;
    }
    // max(mx, lim) == lim in every byte <=> every byte <= limit (unsigned)
    if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_max_epu8(mx, lim), lim)) != -1) return false;
    for (; i < n; ++i)
      if (row[i] > limit) return false;
  }
  return true;
}
}  // namespace

bool avx2_bytes_exact(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb) {
  // vpmaddubsw is exact when |a1 b1 + a2 b2| <= 32767 for every pair: 2 max|a| max|b| <= 32767.
  // max |B| first (B is the smaller operand in the layers), then A against the bound it leaves.
  const int bmax = max_abs_s8(B, N, K, ldb);
  return bmax == 0 || all_within_u8(A, M, K, lda, std::min(255, 32767 / (2 * bmax)));
}

void s32_avx2(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
              int32_t* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (avx2_bytes_exact(M, N, K, A, lda, B, ldb)) dispatch_tile<true>(M, N, K, A, lda, B, ldb, C, ldc);
  else dispatch_tile<false>(M, N, K, A, lda, B, ldb, C, ldc);
}

#else

bool avx2_available() { return false; }
bool avx2_bytes_exact(int64_t, int64_t, int64_t, const uint8_t*, int64_t, const int8_t*, int64_t) { return false; }
void s32_avx2(int64_t, int64_t, int64_t, const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*, int64_t) {
  FQT_CHECK(false, "igemm: built without AVX2");
}

#endif

}  // namespace fqt::igemm_detail
