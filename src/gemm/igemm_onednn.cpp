// oneDNN backend: int8 matmul (u8 src, s8 weights, s32 dst). C = A B_t^T is a matmul with
// weights B_t^T, i.e. a [K, N] weights matrix with strides {1, ldb}: no copy of B.
// One primitive per (M, N, K, lda, ldb, ldc), created on first use and cached.
#include "fqt/igemm.hpp"

#ifdef FQT_HAVE_DNNL
#include <oneapi/dnnl/dnnl.hpp>

#include <map>
#include <mutex>
#include <tuple>
#endif

namespace fqt::igemm_detail {

#ifdef FQT_HAVE_DNNL
namespace {

struct Dnnl {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  std::mutex mu;
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;
  std::map<Key, dnnl::matmul> cache;
};

Dnnl& dnnl_state() {
  static Dnnl d;
  return d;
}

}  // namespace

// Only on CPUs with VNNI (vpdpbusd, exact in int32): without it oneDNN's int8 matmul runs on
// vpmaddubsw, whose int16 pair sums saturate for full-range u8 x s8 codes (seen on a Zen 3 VM:
// -72576 instead of -76038 for K = 13), which would break the bit-exact contract.
bool onednn_available() {
  static const bool ok = __builtin_cpu_supports("avx512vnni") || __builtin_cpu_supports("avxvnni");
  return ok;
}

void s32_onednn(int64_t M, int64_t N, int64_t K, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
                int32_t* C, int64_t ldc) {
  using dt = dnnl::memory::data_type;
  Dnnl& d = dnnl_state();
  const dnnl::memory::desc src_md({M, K}, dt::u8, dnnl::memory::dims{lda, 1});
  const dnnl::memory::desc wei_md({K, N}, dt::s8, dnnl::memory::dims{1, ldb});
  const dnnl::memory::desc dst_md({M, N}, dt::s32, dnnl::memory::dims{ldc, 1});
  dnnl::matmul prim;
  {
    std::lock_guard<std::mutex> lock(d.mu);
    const Dnnl::Key key{M, N, K, lda, ldb, ldc};
    auto it = d.cache.find(key);
    if (it == d.cache.end()) {
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_md, dst_md), d.eng);
      it = d.cache.emplace(key, dnnl::matmul(pd)).first;
    }
    prim = it->second;
  }
  dnnl::memory src(src_md, d.eng, const_cast<uint8_t*>(A));
  dnnl::memory wei(wei_md, d.eng, const_cast<int8_t*>(B));
  dnnl::memory dst(dst_md, d.eng, C);
  dnnl::stream s(d.eng);
  prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
  s.wait();
}

#else

bool onednn_available() { return false; }
void s32_onednn(int64_t, int64_t, int64_t, const uint8_t*, int64_t, const int8_t*, int64_t, int32_t*, int64_t) {
  FQT_CHECK(false, "igemm: built without oneDNN");
}

#endif

}  // namespace fqt::igemm_detail
