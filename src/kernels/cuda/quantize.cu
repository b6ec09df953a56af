// CUDA quantizers: per-group min/max, grids, nearest / stochastic rounding for every kind of the
// table, and BHQ (row ranges, stable descending sort, grouping, block transform) on the device.
//
// Contract: bit-identical codes, grids and BHQ transforms to quantize_ref
// (tests/cuda/test_cuda_quantize.cpp). How:
//   * grids come from src/quant/grid.hpp itself (FQT_HD: host+device), in double, from the same
//     per-group float min/max (min/max are exact, so reduction order does not matter);
//   * this target is compiled with --fmad=false: no a*b+c is contracted, like -ffp-contract=off;
//     float and double division and sqrt are IEEE (no fast-math);
//   * element (r, c) draws uniform_at(key, r*cols + c): thread t owns elements 4t..4t+3, which
//     are exactly the 4 words of Philox block t;
//   * BHQ's sequential double sums (prefix sums, the cumulative shares) run in one thread in the
//     CPU's order; independent terms are computed in parallel with the same expressions.
// CUDA sources are compiled with -DFMT_USE_CONSTEXPR=1 (fmt disables constexpr under nvcc, which
// then breaks its C++20 consteval format strings; g++ TUs use 1 as well).
#include "fqt/cuda.hpp"
#include "kernels/cuda/detail.hpp"
#include "quant/grid.hpp"

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <cstdint>
#include <limits>

namespace fqt::cuda {
using namespace quant_detail;

namespace {

using u64 = unsigned long long;
constexpr u64 kErrNonFinite = 1, kErrGrouping = 2;
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- small device helpers ------------------------------------------------------------------

__device__ __forceinline__ bool finite(float v) { return fabsf(v) <= 3.402823466e38f; }  // false for NaN

// Float atomics through the integer order of IEEE bits. -0 is first turned into +0: min/max of
// +-0 enter every grid formula as the same number.
__device__ __forceinline__ void atomic_min_f(float* addr, float v) {
  v = v + 0.0f;
  if (v >= 0.0f) atomicMin(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMax(reinterpret_cast<unsigned*>(addr), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_max_f(float* addr, float v) {
  v = v + 0.0f;
  if (v >= 0.0f) atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned*>(addr), __float_as_uint(v));
}

__device__ __forceinline__ void warp_minmax(float& a, float& b) {
  for (int o = 16; o > 0; o >>= 1) {
    a = fminf(a, __shfl_xor_sync(0xffffffffu, a, o));
    b = fmaxf(b, __shfl_xor_sync(0xffffffffu, b, o));
  }
}

// householder_v / householder_qmax of src/quant/bhq.cpp, same expressions (kept in step by the
// transform-structure tests).
__device__ __forceinline__ void householder_v_dev(int64_t n, float& v_first, float& v_rest) {
  if (n <= 1) {
    v_first = v_rest = 0.0f;
    return;
  }
  double rs = 1.0 / sqrt(static_cast<double>(n));
  double norm = sqrt(2.0 - 2.0 * rs);
  v_first = static_cast<float>((1.0 - rs) / norm);
  v_rest = static_cast<float>(-rs / norm);
}
__device__ __forceinline__ double householder_qmax_dev(int64_t n) {
  if (n <= 1) return 1.0;
  double rs = 1.0 / sqrt(static_cast<double>(n));
  double norm = sqrt(2.0 - 2.0 * rs);
  double vf = (1.0 - rs) / norm, vr = -rs / norm;
  return fmax(fmax(fabs(1 - 2 * vf * vf), fabs(2 * vf * vr)), fmax(fabs(1 - 2 * vr * vr), fabs(2 * vr * vr)));
}

// ---- min / max -----------------------------------------------------------------------------

__global__ void init_minmax_kernel(float* mn, float* mx, int64_t groups) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < groups; i += int64_t(gridDim.x) * blockDim.x)
    mn[i] = kInf, mx[i] = -kInf;
}

// Whole tensor: grid-stride, block reduction, one atomic pair per block.
__global__ void minmax_tensor_kernel(const float* __restrict__ x, int64_t n, bool vec, float* mn, float* mx,
                                     u64* status) {
  float a = kInf, b = -kInf;
  bool bad = false;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t t0 = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    const int64_t n4 = n / 4;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (int64_t i = t0; i < n4; i += stride) {
      float4 v = x4[i];
      a = fminf(fminf(a, v.x), fminf(v.y, fminf(v.z, v.w)));
      b = fmaxf(fmaxf(b, v.x), fmaxf(v.y, fmaxf(v.z, v.w)));
      bad |= !(finite(v.x) && finite(v.y) && finite(v.z) && finite(v.w));
    }
    done = n4 * 4;
  }
  for (int64_t i = done + t0; i < n; i += stride) {
    float v = x[i];
    a = fminf(a, v), b = fmaxf(b, v);
    bad |= !finite(v);
  }
  warp_minmax(a, b);
  __shared__ float sa[32], sb[32];
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) sa[w] = a, sb[w] = b;
  bad = __syncthreads_or(bad);
  if (w == 0) {
    const int nw = blockDim.x >> 5;
    a = lane < nw ? sa[lane] : kInf;
    b = lane < nw ? sb[lane] : -kInf;
    warp_minmax(a, b);
    if (lane == 0) {
      if (a <= b) atomic_min_f(mn, a), atomic_max_f(mx, b);
      if (bad && status) atomicOr(status + 1, kErrNonFinite);
    }
  }
}

// One warp per row. Rows with no columns get (inf, -inf): an empty group.
__global__ void minmax_rows_kernel(const float* __restrict__ x, int64_t rows, int64_t cols, bool vec, float* mn,
                                   float* mx, u64* status) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // whole warps leave together
  const float* p = x + row * cols;
  float a = kInf, b = -kInf;
  bool bad = false;
  if (vec) {  // cols % 4 == 0 and x 16-byte aligned
    const float4* p4 = reinterpret_cast<const float4*>(p);
    for (int64_t j = lane; j < cols / 4; j += 32) {
      float4 v = p4[j];
      a = fminf(fminf(a, v.x), fminf(v.y, fminf(v.z, v.w)));
      b = fmaxf(fmaxf(b, v.x), fmaxf(v.y, fmaxf(v.z, v.w)));
      bad |= !(finite(v.x) && finite(v.y) && finite(v.z) && finite(v.w));
    }
  } else {
    for (int64_t j = lane; j < cols; j += 32) {
      float v = p[j];
      a = fminf(a, v), b = fmaxf(b, v);
      bad |= !finite(v);
    }
  }
  warp_minmax(a, b);
  bad = __any_sync(0xffffffffu, bad);
  if (lane == 0) {
    mn[row] = a, mx[row] = b;
    if (bad && status) atomicOr(status + 1, kErrNonFinite);
  }
}

// Columns: block (32, 8) covers 32 columns of `chunk` rows; one atomic pair per column per block.
__global__ void minmax_cols_kernel(const float* __restrict__ x, int64_t rows, int64_t cols, int64_t chunk, float* mn,
                                   float* mx, u64* status) {
  const int64_t c = blockIdx.x * 32ll + threadIdx.x;
  const int64_t r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
  float a = kInf, b = -kInf;
  bool bad = false;
  if (c < cols)
    for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) {
      float v = x[r * cols + c];
      a = fminf(a, v), b = fmaxf(b, v);
      bad |= !finite(v);
    }
  __shared__ float sa[8][33], sb[8][33];
  sa[threadIdx.y][threadIdx.x] = a, sb[threadIdx.y][threadIdx.x] = b;
  bad = __syncthreads_or(bad);
  if (threadIdx.y == 0 && c < cols) {
    for (int k = 1; k < 8; ++k) a = fminf(a, sa[k][threadIdx.x]), b = fmaxf(b, sb[k][threadIdx.x]);
    if (a <= b) atomic_min_f(mn + c, a), atomic_max_f(mx + c, b);
  }
  if (bad && status && threadIdx.x == 0 && threadIdx.y == 0) atomicOr(status + 1, kErrNonFinite);
}

// ---- grids and rounding --------------------------------------------------------------------

// make_header of src/quant/quantizer.cpp: an empty group (min > max) gets the grid of [0, 0].
__global__ void grids_kernel(QuantizerKind kind, int bits, const float* mn, const float* mx, int64_t groups,
                             float* scale, float* lo) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const double a0 = mn[g], b0 = mx[g];
    const double a = a0 <= b0 ? a0 : 0.0, b = a0 <= b0 ? b0 : 0.0;
    const Grid grid = make_grid(kind, a, b, bits);
    scale[g] = grid.scale;
    lo[g] = grid.lo;
  }
}

// Thread t rounds elements 4t .. 4t+3 (row-major flat index), i.e. Philox block t.
template <Granularity G, bool Stochastic>
__global__ void round_kernel(const float* __restrict__ x, int64_t rows, int64_t cols, bool vec,
                             const float* __restrict__ scale, const float* __restrict__ lo, int B, RngKey key,
                             uint8_t* __restrict__ codes) {
  const int64_t n = rows * cols, nb = (n + 3) / 4;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < nb; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i0 = 4 * t;
    const bool full = i0 + 3 < n;
    float xv[4];
    if (vec && full) {
      const float4 v = reinterpret_cast<const float4*>(x)[t];
      xv[0] = v.x, xv[1] = v.y, xv[2] = v.z, xv[3] = v.w;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) xv[k] = i0 + k < n ? x[i0 + k] : 0.0f;
    }
    uint32_t w[4] = {0, 0, 0, 0};
    if constexpr (Stochastic) philox_block(key, static_cast<uint64_t>(t), w);
    int64_t r = 0, c = 0;
    if constexpr (G != Granularity::tensor) {
      r = i0 / cols;
      c = i0 - r * cols;
    }
    uint8_t q[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      // The last block's lanes past n have no group (row n / cols does not exist): read no grid.
      if (!full && i0 + k >= n) break;
      const int64_t gi = G == Granularity::tensor ? 0 : G == Granularity::row ? r : c;
      const float v = grid_pos(xv[k], lo[gi], scale[gi]);
      if constexpr (Stochastic) q[k] = round_stochastic(v, bits_to_uniform(w[k]), B);
      else q[k] = round_nearest(v, B);
      if constexpr (G != Granularity::tensor)
        if (++c == cols) c = 0, ++r;
    }
    if (full) {
      reinterpret_cast<uchar4*>(codes)[t] = make_uchar4(q[0], q[1], q[2], q[3]);
    } else {
      for (int k = 0; k < 4; ++k)
        if (i0 + k < n) codes[i0 + k] = q[k];
    }
  }
}

template <Granularity G>
__global__ void dequant_kernel(const uint8_t* __restrict__ codes, int64_t rows, int64_t cols,
                               const float* __restrict__ scale, const float* __restrict__ lo, float* __restrict__ out) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t gi = 0;
    if constexpr (G == Granularity::row) gi = i / cols;
    if constexpr (G == Granularity::column) gi = i % cols;
    out[i] = dequant_value(codes[i], scale[gi], lo[gi]);
  }
}

// ---- BHQ -----------------------------------------------------------------------------------

// m[i] = bhq_row_range(min, max) (a row with no columns has min = max = 0); idx = iota.
__global__ void bhq_ranges_kernel(const float* mn, const float* mx, int64_t rows, int64_t cols, double* m,
                                  int64_t* idx) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows; i += int64_t(gridDim.x) * blockDim.x) {
    const float a = cols ? mn[i] : 0.0f, b = cols ? mx[i] : 0.0f;
    m[i] = bhq_row_range(a, b);
    idx[i] = i;
  }
}

// Steps 2-5 of bhq_transform (src/quant/bhq.cpp) in one block: v = sorted ranges, rank = their
// rows. Writes row_scale, offsets, members, status[0] = number of groups.
constexpr int kGroupThreads = 1024;
__global__ void __launch_bounds__(kGroupThreads) bhq_group_kernel(const double* __restrict__ v,
                                                                  const int64_t* __restrict__ rank, int64_t N,
                                                                  double* prefix, int64_t* nums, float* row_scale,
                                                                  int64_t* offsets, int64_t* members, u64* status) {
  __shared__ double buf[kGroupThreads];
  __shared__ unsigned long long sG;
  const int tid = threadIdx.x, nt = blockDim.x;
  if (status[1] != 0) {  // non-finite input: leave an empty transform, the caller throws
    if (tid == 0) status[0] = 0, offsets[0] = 0;
    return;
  }
  for (int64_t i = tid; i < N; i += nt) row_scale[i] = 1.0f;
  if (N == 1) {
    if (tid == 0) offsets[0] = 0, offsets[1] = 1, members[0] = 0, status[0] = 1;
    return;
  }
  // prefix[i + 1] = prefix[i] + v[i], in order, by thread 0 (v staged through shared memory).
  double acc = 0.0;
  if (tid == 0) prefix[0] = 0.0;
  for (int64_t c0 = 0; c0 < N; c0 += nt) {
    const int64_t len = min(int64_t(nt), N - c0);
    if (tid < len) buf[tid] = v[c0 + tid];
    __syncthreads();
    if (tid == 0)
      for (int64_t k = 0; k < len; ++k) {
        acc = acc + buf[k];
        prefix[c0 + k + 1] = acc;
      }
    __syncthreads();
  }
  // G = the first G with G * v[N-G-1] / prefix[N-G] > 1 (true at G = N-1 for N >= 3); 1 for N == 2.
  if (tid == 0) sG = static_cast<unsigned long long>(N >= 3 ? N - 1 : 1);
  __syncthreads();
  if (N >= 3)
    for (int64_t g = tid; g < N - 1; g += nt)
      if (static_cast<double>(g) * v[N - g - 1] / prefix[N - g] > 1.0) atomicMin(&sG, static_cast<unsigned long long>(g));
  __syncthreads();
  const int64_t G = static_cast<int64_t>(sG), NL = N - G;
  const double total = prefix[NL];  // = sum of v[0..NL) in the CPU's order
  // nums[i] = round(cum), cum += G * v[i] / total: terms in parallel, the sum in order.
  double cum = 0.0;
  for (int64_t c0 = 0; c0 < NL; c0 += nt) {
    const int64_t len = min(int64_t(nt), NL - c0);
    if (tid < len) buf[tid] = static_cast<double>(G) * v[c0 + tid] / total;
    __syncthreads();
    if (tid == 0)
      for (int64_t k = 0; k < len; ++k) {
        cum = cum + buf[k];
        nums[c0 + k] = static_cast<int64_t>(round(cum));
      }
    __syncthreads();
  }
  if (tid == 0) nums[NL - 1] = G;
  __syncthreads();
  // Groups: large row i with small rows [NL + nums[i-1], NL + nums[i]); members of group i start
  // at i + nums[i-1] (each earlier group holds 1 + its small rows).
  for (int64_t i = tid; i < NL; i += nt) {
    const int64_t prev = i ? nums[i - 1] : 0;
    const int64_t begin = NL + prev, end = NL + nums[i];
    if (!(end > begin) || begin < NL || end > N) {
      atomicOr(status + 1, kErrGrouping);
      continue;
    }
    const int64_t n = 1 + (end - begin), off = i + prev;
    offsets[i + 1] = off + n;
    members[off] = rank[i];
    for (int64_t k = begin; k < end; ++k) members[off + 1 + (k - begin)] = rank[k];
    const double lambda1 = v[i], lambda2 = v[begin];
    const double w1 = lambda1 / sqrt(static_cast<double>(n));
    const double w2 = lambda2 * householder_qmax_dev(n);
    row_scale[rank[i]] = bhq_inv_cbrt(w1);
    const float s2 = bhq_inv_cbrt(w2 / static_cast<double>(n - 1));
    for (int64_t k = begin; k < end; ++k) row_scale[rank[k]] = s2;
  }
  if (tid == 0) offsets[0] = 0, status[0] = static_cast<u64>(NL);
}

// group_apply of bhq.cpp: block x = group, threads = columns. Same float operation order:
//   forward: dot = sum_k v_k (s_k x_k) in member order; y_k = s_k x_k - 2 v_k dot
//   inverse: dot = sum_k v_k (1 * y_k);                  x_k = (y_k - 2 v_k dot) / s_k
template <bool Inverse>
__global__ void bhq_apply_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t cols,
                                 const float* __restrict__ row_scale, const int64_t* __restrict__ offsets,
                                 const int64_t* __restrict__ members, const u64* __restrict__ status) {
  const int64_t g = blockIdx.x;
  if (status[1] != 0 || g >= static_cast<int64_t>(status[0])) return;
  const int64_t j = blockIdx.y * int64_t(blockDim.x) + threadIdx.x;
  if (j >= cols) return;
  const int64_t* mem = members + offsets[g];
  const int64_t n = offsets[g + 1] - offsets[g];
  float vf, vr;
  householder_v_dev(n, vf, vr);
  float dot = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    const float vk = k == 0 ? vf : vr;
    const float s = Inverse ? 1.0f : row_scale[mem[k]];
    dot += vk * (s * in[mem[k] * cols + j]);
  }
  for (int64_t k = 0; k < n; ++k) {
    const float vk2 = 2.0f * (k == 0 ? vf : vr);
    const float s = row_scale[mem[k]];
    const float xv = in[mem[k] * cols + j];
    out[mem[k] * cols + j] = Inverse ? (xv - vk2 * dot) / s : s * xv - vk2 * dot;
  }
}

// ---- host side -----------------------------------------------------------------------------

constexpr int kThreads = 256;

int sm_count() {
  thread_local int cached = 0;
  if (!cached) {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&cached, cudaDevAttrMultiProcessorCount, dev));
  }
  return cached;
}

// Grid-stride launches: enough blocks to fill the machine a few times over, never more than needed.
unsigned blocks_for(int64_t work, int threads = kThreads) {
  const int64_t need = (work + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(need, int64_t(sm_count()) * 16)));
}

void check_launch() { CUDA_CHECK(cudaGetLastError()); }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// Scratch memory of one host thread, reused across calls (grown, never shrunk).
struct Workspace {
  DeviceBuffer mn, mx, ranges, ranges_sorted, idx, idx_sorted, sort_tmp, prefix, nums, source;
};
Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

template <typename T> T* reserve(DeviceBuffer& b, int64_t count) {
  b.reserve(static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T));
  return b.as<T>();
}

// Per-group min/max of x into mn/mx (float, `groups` entries); flags non-finite input.
void group_minmax(const float* x, int64_t rows, int64_t cols, Granularity g, float* mn, float* mx, u64* status,
                  cudaStream_t stream) {
  const int64_t groups = num_groups(g, rows, cols);
  const bool vec_ok = aligned16(x);
  if (g == Granularity::row) {
    if (rows == 0) return;
    const unsigned blocks = static_cast<unsigned>((rows * 32 + kThreads - 1) / kThreads);
    minmax_rows_kernel<<<blocks, kThreads, 0, stream>>>(x, rows, cols, vec_ok && cols % 4 == 0, mn, mx, status);
    check_launch();
    return;
  }
  if (groups == 0) return;
  init_minmax_kernel<<<blocks_for(groups), kThreads, 0, stream>>>(mn, mx, groups);
  check_launch();
  if (rows * cols == 0) return;
  if (g == Granularity::tensor) {
    minmax_tensor_kernel<<<blocks_for(rows * cols / 4 + 1), kThreads, 0, stream>>>(x, rows * cols, vec_ok, mn, mx,
                                                                                    status);
  } else {
    const int64_t chunk = std::max<int64_t>(256, (rows + 65534) / 65535);
    const dim3 grid(static_cast<unsigned>((cols + 31) / 32), static_cast<unsigned>((rows + chunk - 1) / chunk));
    minmax_cols_kernel<<<grid, dim3(32, 8), 0, stream>>>(x, rows, cols, chunk, mn, mx, status);
  }
  check_launch();
}

template <Granularity G>
void launch_round(const float* x, int64_t rows, int64_t cols, const float* scale, const float* lo, int B, bool stochastic,
                  RngKey key, uint8_t* codes, cudaStream_t stream) {
  const int64_t nb = (rows * cols + 3) / 4;
  const bool vec = aligned16(x);
  if (stochastic)
    round_kernel<G, true><<<blocks_for(nb), kThreads, 0, stream>>>(x, rows, cols, vec, scale, lo, B, key, codes);
  else
    round_kernel<G, false><<<blocks_for(nb), kThreads, 0, stream>>>(x, rows, cols, vec, scale, lo, B, key, codes);
  check_launch();
}

void bhq_apply(bool inverse, const float* in, float* out, int64_t rows, int64_t cols, const DeviceQuantized& q,
               cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const int64_t max_groups = rows == 1 ? 1 : rows / 2;  // every group of N >= 2 rows has >= 2 members
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, (cols + 31) / 32 * 32));
  const int64_t yblocks = (cols + threads - 1) / threads;
  FQT_CHECK(yblocks <= 65535 && max_groups < (int64_t(1) << 31), "BHQ on the device: {} x {} is too large", rows,
            cols);
  const dim3 grid(static_cast<unsigned>(max_groups), static_cast<unsigned>(yblocks));
  const auto* st = q.status.as<u64>();
  if (inverse)
    bhq_apply_kernel<true><<<grid, threads, 0, stream>>>(in, out, cols, q.row_scale.as<float>(), q.offsets.as<int64_t>(),
                                                         q.members.as<int64_t>(), st);
  else
    bhq_apply_kernel<false><<<grid, threads, 0, stream>>>(in, out, cols, q.row_scale.as<float>(), q.offsets.as<int64_t>(),
                                                          q.members.as<int64_t>(), st);
  check_launch();
}

// Builds the BHQ transform of x into q (row_scale, offsets, members, status[0]).
void bhq_build(const float* x, int64_t rows, int64_t cols, DeviceQuantized& q, Workspace& ws, cudaStream_t stream) {
  auto* st = q.status.as<u64>();
  if (rows == 0) {
    CUDA_CHECK(cudaMemsetAsync(q.offsets.data(), 0, sizeof(int64_t), stream));
    return;
  }
  FQT_CHECK(rows < (int64_t(1) << 31), "BHQ on the device: {} rows is too many", rows);
  float* mn = reserve<float>(ws.mn, rows);
  float* mx = reserve<float>(ws.mx, rows);
  group_minmax(x, rows, cols, Granularity::row, mn, mx, st, stream);
  double* m = reserve<double>(ws.ranges, rows);
  double* v = reserve<double>(ws.ranges_sorted, rows);
  int64_t* idx = reserve<int64_t>(ws.idx, rows);
  int64_t* rank = reserve<int64_t>(ws.idx_sorted, rows);
  bhq_ranges_kernel<<<blocks_for(rows), kThreads, 0, stream>>>(mn, mx, rows, cols, m, idx);
  check_launch();
  // Stable descending sort (LSD radix sort is stable): ties keep ascending row order, as
  // std::stable_sort with `m[a] > m[b]` does. Ranges are > 0, so no +-0 or NaN keys.
  size_t tmp = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(nullptr, tmp, m, v, idx, rank, static_cast<int>(rows), 0, 64,
                                                       stream));
  ws.sort_tmp.reserve(std::max<size_t>(tmp, 1));
  CUDA_CHECK(cub::DeviceRadixSort::SortPairsDescending(ws.sort_tmp.data(), tmp, m, v, idx, rank,
                                                       static_cast<int>(rows), 0, 64, stream));
  double* prefix = reserve<double>(ws.prefix, rows + 1);
  int64_t* nums = reserve<int64_t>(ws.nums, rows);
  bhq_group_kernel<<<1, kGroupThreads, 0, stream>>>(v, rank, rows, prefix, nums, q.row_scale.as<float>(),
                                                     q.offsets.as<int64_t>(), q.members.as<int64_t>(), st);
  check_launch();
}

}  // namespace

void detail::bhq_apply_device(bool inverse, const float* in, float* out, int64_t rows, int64_t cols,
                              const DeviceQuantized& q, cudaStream_t stream) {
  bhq_apply(inverse, in, out, rows, cols, q, stream);
}

int64_t DeviceQuantized::num_groups() const { return quant_detail::num_groups(granularity(), rows, cols); }

void DeviceQuantized::check(cudaStream_t stream) const {
  u64 st[2] = {0, 0};
  copy_to_host(st, status.data(), sizeof st, stream);
  if (st[1] & kErrNonFinite) throw NonFiniteError("quantizer input contains NaN or Inf (detected on the device)");
  FQT_CHECK(!(st[1] & kErrGrouping), "BHQ grouping on the device gave a large row no small rows ({} rows)", rows);
}

int64_t DeviceQuantized::bhq_groups(cudaStream_t stream) const {
  if (spec.kind != QuantizerKind::bhq) return 0;
  u64 st[2] = {0, 0};
  copy_to_host(st, status.data(), sizeof st, stream);
  return static_cast<int64_t>(st[0]);
}

void quantize_device(const float* x, int64_t rows, int64_t cols, QuantizerSpec spec, RngKey key, DeviceQuantized& out,
                     cudaStream_t stream) {
  check_spec(spec);
  FQT_CHECK(rows >= 0 && cols >= 0, "quantize_device: bad shape {} x {}", rows, cols);
  const QuantizerTraits& tr = traits(spec.kind);
  const Granularity g = tr.granularity;
  const int64_t n = rows * cols, groups = quant_detail::num_groups(g, rows, cols);
  out.spec = spec;
  out.rows = rows;
  out.cols = cols;
  reserve<uint8_t>(out.codes, n);
  float* scale = reserve<float>(out.scale, groups);
  float* lo = reserve<float>(out.lo, groups);
  u64* st = reserve<u64>(out.status, 2);
  CUDA_CHECK(cudaMemsetAsync(st, 0, 2 * sizeof(u64), stream));
  Workspace& ws = workspace();

  const float* src = x;
  if (spec.kind == QuantizerKind::bhq) {
    reserve<float>(out.row_scale, rows);
    reserve<int64_t>(out.offsets, rows + 1);
    reserve<int64_t>(out.members, rows);
    bhq_build(x, rows, cols, out, ws, stream);
    float* tx = reserve<float>(ws.source, n);
    bhq_apply(false, x, tx, rows, cols, out, stream);
    src = tx;
  }
  float* mn = reserve<float>(ws.mn, groups);
  float* mx = reserve<float>(ws.mx, groups);
  // BHQ: x itself was checked (the CPU checks x, not T X).
  group_minmax(src, rows, cols, g, mn, mx, spec.kind == QuantizerKind::bhq ? nullptr : st, stream);
  if (groups > 0) {
    grids_kernel<<<blocks_for(groups), kThreads, 0, stream>>>(spec.kind, spec.bits, mn, mx, groups, scale, lo);
    check_launch();
  }
  if (n == 0) return;
  const int B = max_code(spec.bits);
  const bool stochastic = tr.rounding == Rounding::stochastic;
  uint8_t* codes = out.codes.as<uint8_t>();
  switch (g) {
    case Granularity::tensor: launch_round<Granularity::tensor>(src, rows, cols, scale, lo, B, stochastic, key, codes, stream); break;
    case Granularity::row: launch_round<Granularity::row>(src, rows, cols, scale, lo, B, stochastic, key, codes, stream); break;
    case Granularity::column: launch_round<Granularity::column>(src, rows, cols, scale, lo, B, stochastic, key, codes, stream); break;
  }
}

void dequantize_device(const DeviceQuantized& q, float* out, cudaStream_t stream) {
  const int64_t n = q.rows * q.cols;
  if (n == 0) return;
  const bool bhq = q.spec.kind == QuantizerKind::bhq;
  float* dst = out;
  if (bhq) dst = reserve<float>(workspace().source, n);
  const auto* codes = q.codes.as<uint8_t>();
  const auto* scale = q.scale.as<float>();
  const auto* lo = q.lo.as<float>();
  switch (q.granularity()) {
    case Granularity::tensor: dequant_kernel<Granularity::tensor><<<blocks_for(n), kThreads, 0, stream>>>(codes, q.rows, q.cols, scale, lo, dst); break;
    case Granularity::row: dequant_kernel<Granularity::row><<<blocks_for(n), kThreads, 0, stream>>>(codes, q.rows, q.cols, scale, lo, dst); break;
    case Granularity::column: dequant_kernel<Granularity::column><<<blocks_for(n), kThreads, 0, stream>>>(codes, q.rows, q.cols, scale, lo, dst); break;
  }
  check_launch();
  if (bhq) bhq_apply(true, dst, out, q.rows, q.cols, q, stream);
}

QuantizedTensor download(const DeviceQuantized& d, cudaStream_t stream) {
  d.check(stream);
  QuantizedTensor q;
  q.spec = d.spec;
  q.rows = d.rows;
  q.cols = d.cols;
  q.codes = Tensor::empty({d.rows, d.cols}, DType::u8);
  copy_to_host(q.codes.raw(), d.codes.data(), static_cast<size_t>(d.rows * d.cols), stream);
  const int64_t groups = d.num_groups();
  q.scale.resize(groups);
  q.lo.resize(groups);
  copy_to_host(q.scale.data(), d.scale.data(), groups * sizeof(float), stream);
  copy_to_host(q.lo.data(), d.lo.data(), groups * sizeof(float), stream);
  if (d.spec.kind == QuantizerKind::bhq) {
    BhqTransform t;
    t.rows = d.rows;
    const int64_t ng = d.bhq_groups(stream);
    t.row_scale.resize(d.rows);
    t.offsets.resize(ng + 1);
    t.members.resize(d.rows);
    copy_to_host(t.row_scale.data(), d.row_scale.data(), d.rows * sizeof(float), stream);
    copy_to_host(t.offsets.data(), d.offsets.data(), (ng + 1) * sizeof(int64_t), stream);
    copy_to_host(t.members.data(), d.members.data(), d.rows * sizeof(int64_t), stream);
    t.fill_row_group();
    q.transform = std::move(t);
  }
  return q;
}

DeviceQuantized upload(const QuantizedTensor& q, cudaStream_t stream) {
  DeviceQuantized d;
  d.spec = q.spec;
  d.rows = q.rows;
  d.cols = q.cols;
  const int64_t n = q.rows * q.cols;
  FQT_CHECK(q.codes.defined() && q.codes.numel() == n && q.codes.dtype() == DType::u8, "cuda::upload: bad codes");
  const int64_t groups = d.num_groups();
  FQT_CHECK(static_cast<int64_t>(q.scale.size()) == groups && static_cast<int64_t>(q.lo.size()) == groups,
            "cuda::upload: {} grids for {} groups", q.scale.size(), groups);
  copy_to_device(reserve<uint8_t>(d.codes, n), q.codes.raw(), static_cast<size_t>(n), stream);
  copy_to_device(reserve<float>(d.scale, groups), q.scale.data(), groups * sizeof(float), stream);
  copy_to_device(reserve<float>(d.lo, groups), q.lo.data(), groups * sizeof(float), stream);
  u64 st[2] = {0, 0};
  if (q.spec.kind == QuantizerKind::bhq) {
    FQT_CHECK(q.transform.has_value(), "cuda::upload: BHQ tensor without its transform");
    const BhqTransform& t = *q.transform;
    st[0] = static_cast<u64>(t.num_groups());
    copy_to_device(reserve<float>(d.row_scale, q.rows), t.row_scale.data(), t.row_scale.size() * sizeof(float), stream);
    copy_to_device(reserve<int64_t>(d.offsets, q.rows + 1), t.offsets.data(), t.offsets.size() * sizeof(int64_t), stream);
    copy_to_device(reserve<int64_t>(d.members, q.rows), t.members.data(), t.members.size() * sizeof(int64_t), stream);
  }
  copy_to_device(reserve<u64>(d.status, 2), st, sizeof st, stream);
  return d;
}

}  // namespace fqt::cuda

namespace fqt {

QuantizedTensor quantize_cuda(const Tensor& x_in, QuantizerSpec spec, RngKey key) {
  quant_detail::check_spec(spec);
  Tensor x = quant_detail::as_matrix(x_in);
  check_finite(x, "quantizer input");
  cuda::DeviceTensor dx = cuda::upload(x);
  cuda::DeviceQuantized dq;
  cuda::quantize_device(dx.data<float>(), x.size(0), x.size(1), spec, key, dq);
  return cuda::download(dq);
}

Tensor dequantize_cuda(const QuantizedTensor& q) {
  cuda::DeviceQuantized dq = cuda::upload(q);
  cuda::DeviceTensor out;
  out.shape = {q.rows, q.cols};
  out.buffer.reserve(std::max<size_t>(out.nbytes(), 1));
  cuda::dequantize_device(dq, out.data<float>());
  return cuda::download(out);
}

}  // namespace fqt
