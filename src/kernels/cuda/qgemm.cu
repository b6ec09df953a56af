// Quantized GEMM on the GPU: qgemm() of fqt/igemm.hpp (src/gemm/igemm_quant.cpp) on device
// codes, bit-identical to it.
//
// The CPU computes, per (m, n), the integer s = sum_k qa (qb - zb) (zb = 128 for 8-bit B codes,
// else 0) and A's code row sum ra, then one double expression rounded to fp32. Here both come
// out of an s8 x s8 cuBLASLt GEMM (cuda::igemm_*): A' = qa - za (za = 128 for 8-bit A codes; for
// fewer bits the u8 codes are valid s8 as they are and are used in place), B' = [qb - zb; ones; 0],
// so S' = A' B'^T gives ra = S'[m][N] + za K and s = S'[m][n] + za (rb[n] - zb K) exactly (rb:
// B's code row sums). The epilogue then evaluates the CPU's expression term for term in double
// (this target is built with --fmad=false, so nothing is contracted). The CPU's choices are
// mirrored too: with N > M (no BHQ, no accumulate) it multiplies B A^T and transposes, which
// changes which side is shifted and the order of the terms; a BHQ left operand gets T^-1 on the
// product's rows in block form.
#include "fqt/cuda.hpp"
#include "kernels/cuda/detail.hpp"

#include <algorithm>
#include <climits>
#include <cstdint>

namespace fqt::cuda {
namespace {

constexpr int kThreads = 256;

struct DSide {
  const uint8_t* codes;
  const float *scale, *lo;
  bool per_row;
  int max_code;
  int64_t rows;
};

DSide side(const DeviceQuantized& q) {
  return {q.codes.as<uint8_t>(), q.scale.as<float>(), q.lo.as<float>(), q.granularity() == Granularity::row,
          (1 << q.spec.bits) - 1, q.rows};
}

unsigned blocks(int64_t work) { return static_cast<unsigned>(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, 65535)); }

// B' [NS, K], NS = N + 1 rounded up to a multiple of 4 (cuBLASLt's int8 kernels then take it
// without a padded copy when K is a multiple of 16; other K are still copied): rows qb ^ flip (= qb - zb as s8), a row of ones, zero rows; rb[n] = sum_k qb.
__global__ void prep_b_kernel(const uint8_t* __restrict__ b, int64_t N, int64_t K, uint8_t flip, int8_t* __restrict__ out,
                              long long* __restrict__ rb) {
  const int64_t n = blockIdx.x;
  int8_t* d = out + n * K;
  if (n >= N) {
    const int8_t v = n == N ? 1 : 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) d[k] = v;
    return;
  }
  const uint8_t* p = b + n * K;
  long long s = 0;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const uint8_t v = p[k];
    s += v;
    d[k] = static_cast<int8_t>(v ^ flip);
  }
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  __shared__ long long part[32];
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long t = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) t += part[w];
    rb[n] = t;
  }
}

__global__ void flip_kernel(const uint8_t* __restrict__ in, int64_t n, int8_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<int8_t>(in[i] ^ 0x80);
}

// The CPU's epilogue (igemm_quant.cpp, core): C[m rs + n cs] (+)= fp32 of
//   sum iam ib[n] + lb[n] riam + lam rib[n] + klam lb[n],   sum = s + zb ra.
// Threads x over n, blocks y over m (grid-stride both ways): no 64-bit division per element.
template <typename T>
__global__ void epilogue_kernel(const T* __restrict__ S, int64_t NS, int64_t M, int64_t N, int64_t K, DSide a, DSide b,
                                int za, int zb, const long long* __restrict__ rb, float* C, int64_t rs, int64_t cs,
                                bool accumulate) {
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y)
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    const T* s = S + m * NS;
    const int64_t ra = static_cast<int64_t>(s[N]) + int64_t(za) * K;
    const int64_t sn = static_cast<int64_t>(s[n]) + int64_t(za) * (rb[n] - int64_t(zb) * K);
    const double iam = 1.0 / static_cast<double>(a.scale[a.per_row ? m : 0]);
    const double lam = a.lo[a.per_row ? m : 0];
    const double riam = static_cast<double>(ra) * iam, klam = static_cast<double>(K) * lam;
    const double zra = static_cast<double>(int64_t(zb) * ra);
    const double ib = 1.0 / static_cast<double>(b.scale[b.per_row ? n : 0]);
    const double lb = b.lo[b.per_row ? n : 0];
    const double rib = static_cast<double>(rb[n]) * ib;
    const double sum = static_cast<double>(sn) + zra;
    const double v = sum * iam * ib + lb * riam + lam * rib + klam * lb;
    float* c = C + m * rs + n * cs;
    *c = accumulate ? static_cast<float>(static_cast<double>(*c) + v) : static_cast<float>(v);
  }
}

__global__ void add_kernel(float* __restrict__ c, const float* __restrict__ x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    c[i] += x[i];
}

struct Scratch {
  DeviceBuffer a8, b8, rb, s, y, x;
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// C (strides rs, cs) (+)= deq(A) deq(B)^T for A [M, K], B [N, K] (the CPU's core()).
void core(int64_t M, int64_t N, int64_t K, const DSide& a, const DSide& b, float* C, int64_t rs, int64_t cs,
          bool accumulate, cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  Scratch& sc = scratch();
  const int za = a.max_code > 127 ? 128 : 0, zb = b.max_code > 127 ? 128 : 0;
  const int64_t NS = (N + 1 + 3) / 4 * 4;
  sc.b8.reserve(static_cast<size_t>(std::max<int64_t>(NS * K, 1)));
  sc.rb.reserve(static_cast<size_t>(NS) * sizeof(long long));
  auto* b8 = sc.b8.as<int8_t>();
  auto* rb = sc.rb.as<long long>();
  prep_b_kernel<<<static_cast<unsigned>(NS), kThreads, 0, stream>>>(b.codes, N, K, zb ? 0x80 : 0x00, b8, rb);
  CUDA_CHECK(cudaGetLastError());
  const int8_t* a8 = reinterpret_cast<const int8_t*>(a.codes);  // codes <= 127: valid s8 in place
  if (za) {
    sc.a8.reserve(static_cast<size_t>(std::max<int64_t>(M * K, 1)));
    flip_kernel<<<blocks(M * K), kThreads, 0, stream>>>(a.codes, M * K, sc.a8.as<int8_t>());
    CUDA_CHECK(cudaGetLastError());
    a8 = sc.a8.as<int8_t>();
  }
  const int64_t a_abs = za ? 128 : a.max_code, b_abs = std::max(zb, b.max_code - zb);
  const int et = static_cast<int>(std::clamp<int64_t>((N + 31) / 32 * 32, 32, kThreads));  // narrow N: narrow blocks
  const dim3 eb(static_cast<unsigned>(std::clamp<int64_t>((N + et - 1) / et, 1, 65535)),
                static_cast<unsigned>(std::min<int64_t>(M, 65535)));
  const int64_t ld = std::max<int64_t>(K, 1);  // K = 0: an empty sum, C = the K-free terms
  if (K * a_abs * b_abs <= INT32_MAX) {
    sc.s.reserve(static_cast<size_t>(M * NS) * sizeof(int32_t));
    igemm_s8s8s32(M, NS, K, a8, ld, b8, ld, sc.s.as<int32_t>(), NS, stream, a_abs, b_abs);
    epilogue_kernel<int32_t><<<eb, et, 0, stream>>>(sc.s.as<int32_t>(), NS, M, N, K, a, b, za, zb, rb, C, rs, cs,
                                                          accumulate);
  } else {
    sc.s.reserve(static_cast<size_t>(M * NS) * sizeof(int64_t));
    igemm_s8s8s64(M, NS, K, a8, ld, b8, ld, sc.s.as<int64_t>(), NS, stream, a_abs, b_abs);
    epilogue_kernel<int64_t><<<eb, et, 0, stream>>>(sc.s.as<int64_t>(), NS, M, N, K, a, b, za, zb, rb, C, rs, cs,
                                                          accumulate);
  }
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void qgemm_device(const DeviceQuantized& a, const DeviceQuantized& b, float* c, bool accumulate, cudaStream_t stream) {
  FQT_CHECK(a.cols == b.cols, "cuda::qgemm_device: A is [{}, {}] and B is [{}, {}]: reduction sizes differ", a.rows,
            a.cols, b.rows, b.cols);
  FQT_CHECK(a.spec.bits >= 1 && a.spec.bits <= 8 && b.spec.bits >= 1 && b.spec.bits <= 8,
            "cuda::qgemm_device: bits {} / {} (1..8)", a.spec.bits, b.spec.bits);
  FQT_CHECK(a.granularity() != Granularity::column && b.granularity() != Granularity::column,
            "cuda::qgemm_device: a per-column grid varies along the reduction dimension and cannot be factored "
            "out of the integer sum");
  FQT_CHECK(b.spec.kind != QuantizerKind::bhq, "cuda::qgemm_device: B with a BHQ transform is not supported");
  const int64_t M = a.rows, N = b.rows, K = a.cols;
  if (M == 0 || N == 0) return;
  FQT_CHECK(c, "cuda::qgemm_device: null C");
  const DSide sa = side(a), sb = side(b);
  if (a.spec.kind != QuantizerKind::bhq) {
    if (!accumulate && N > M)  // as the CPU: the smaller operand is the one copied, C = (B A^T)^T
      core(N, M, K, sb, sa, c, 1, N, false, stream);
    else
      core(M, N, K, sa, sb, c, N, 1, accumulate, stream);
    return;
  }
  Scratch& sc = scratch();
  sc.y.reserve(static_cast<size_t>(M * N) * sizeof(float));
  core(M, N, K, sa, sb, sc.y.as<float>(), N, 1, false, stream);
  if (!accumulate) {
    detail::bhq_apply_device(true, sc.y.as<float>(), c, M, N, a, stream);
    return;
  }
  sc.x.reserve(static_cast<size_t>(M * N) * sizeof(float));
  detail::bhq_apply_device(true, sc.y.as<float>(), sc.x.as<float>(), M, N, a, stream);
  add_kernel<<<blocks(M * N), kThreads, 0, stream>>>(c, sc.x.as<float>(), M * N);
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace fqt::cuda

namespace fqt {

Tensor qgemm_cuda(const QuantizedTensor& a, const QuantizedTensor& b, const Tensor* c_in) {
  cuda::DeviceQuantized da = cuda::upload(a), db = cuda::upload(b);
  cuda::DeviceTensor dc;
  dc.shape = {a.rows, b.rows};
  dc.buffer.reserve(std::max<size_t>(dc.nbytes(), 1));
  if (c_in) {
    FQT_CHECK(c_in->dtype() == DType::f32 && c_in->shape() == dc.shape, "qgemm_cuda: C must be f32 [{}, {}]", a.rows,
              b.rows);
    cuda::copy_to_device(dc.buffer.data(), c_in->raw(), dc.nbytes());
  }
  cuda::qgemm_device(da, db, dc.data<float>(), c_in != nullptr);
  CUDA_CHECK(cudaDeviceSynchronize());
  da.check();
  return cuda::download(dc);
}

}  // namespace fqt
