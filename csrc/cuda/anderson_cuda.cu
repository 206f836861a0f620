// CUDA kernels of Anderson acceleration and damped fixed-point iteration.
// Same conventions as broyden_cuda.cu: (sample, chunk) blocks on a flattened
// grid, masks read on device, two-stage deterministic reductions, the current
// stream, every launch checked.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common/anderson_math.h"
#include "../ops.h"
#include "launch.cuh"

namespace deq_ext {
namespace {

using namespace cuda_launch;

// Block sum of one value per thread; the result is valid in thread 0. The
// trailing barrier lets callers reuse smem in the next call.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T tot = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) tot += smem[w];
  __syncthreads();
  return tot;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fixed_point_kernel(scalar_t* z, const scalar_t* __restrict__ g,
                       const int64_t* __restrict__ status, double tau, int64_t D, int64_t nch) {
  const int64_t b = blockIdx.x / nch, chunk = blockIdx.x % nch;
  if (status[b] != kActive) return;
  for (int e = 0; e < kEPT; ++e) {
    const int64_t d = chunk * kChunk + threadIdx.x + e * kThreads;
    if (d < D) {
      const int64_t i = b * D + d;
      // tau * g in double, rounded once: the same bits as the reference and the CPU twin.
      z[i] = z[i] + static_cast<scalar_t>(tau * static_cast<double>(g[i]));
    }
  }
}

// Partial dots G_slot . G_j over this chunk, with G_slot the new entry g as stored
// (rounded to the history dtype; the old entry of the slot is being replaced), and
// the chunk of X[slot] = z, G[slot] = g.
template <typename scalar_t, typename hist_t>
__global__ void __launch_bounds__(kThreads)
    store_kernel(hist_t* X, hist_t* G, const scalar_t* __restrict__ z,
                 const scalar_t* __restrict__ g, const int64_t* __restrict__ status,
                 const int64_t* __restrict__ nhist, int64_t m, int64_t D, int64_t nch,
                 accum_t* __restrict__ part) {
  using acc_t = accum_t;
  const int64_t b = blockIdx.x / nch, chunk = blockIdx.x % nch;
  if (status[b] != kActive) return;
  const int64_t slot = nhist[b] % m;
  const int64_t n = nhist[b] + 1 < m ? nhist[b] + 1 : m;
  acc_t xg[kEPT];
  for (int e = 0; e < kEPT; ++e) {
    const int64_t d = chunk * kChunk + threadIdx.x + e * kThreads;
    xg[e] = d < D ? static_cast<acc_t>(static_cast<hist_t>(g[b * D + d])) : acc_t(0);
  }
  __shared__ acc_t smem[kWarps];
  acc_t* out = part + (b * nch + chunk) * m;
  for (int64_t j = 0; j < n; ++j) {
    acc_t s = 0;
    const hist_t* gj = G + (b * m + j) * D;
    for (int e = 0; e < kEPT; ++e) {
      const int64_t d = chunk * kChunk + threadIdx.x + e * kThreads;
      if (d < D) s += (j == slot ? xg[e] : static_cast<acc_t>(gj[d])) * xg[e];
    }
    const acc_t tot = block_sum(s, smem);
    if (threadIdx.x == 0) out[j] = tot;
  }
  // Written after every read of G in this block; other blocks own other chunks.
  for (int e = 0; e < kEPT; ++e) {
    const int64_t d = chunk * kChunk + threadIdx.x + e * kThreads;
    if (d < D) {
      X[(b * m + slot) * D + d] = static_cast<hist_t>(z[b * D + d]);
      G[(b * m + slot) * D + d] = static_cast<hist_t>(g[b * D + d]);
    }
  }
}

// Per sample: totals over chunks in order into the Gram row/column, nhist += 1.
template <typename scalar_t>
__global__ void store_finalize_kernel(const accum_t* __restrict__ part,
                                      scalar_t* gram, const int64_t* __restrict__ status,
                                      int64_t* nhist, int64_t m, int64_t nch, int64_t B) {
  using acc_t = accum_t;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B || status[b] != kActive) return;
  const int64_t slot = nhist[b] % m;
  const int64_t n = nhist[b] + 1 < m ? nhist[b] + 1 : m;
  for (int64_t j = 0; j < n; ++j) {
    acc_t tot = 0;
    for (int64_t c = 0; c < nch; ++c) tot += part[(b * nch + c) * m + j];
    gram[(b * m + slot) * m + j] = static_cast<scalar_t>(tot);
    gram[(b * m + j) * m + slot] = static_cast<scalar_t>(tot);
  }
  nhist[b] += 1;
}

// One thread per sample: the mixing weights (shared math), alpha and fallback.
template <typename scalar_t>
__global__ void weights_kernel(const scalar_t* __restrict__ gram, scalar_t* alpha,
                               int64_t* fallback, const int64_t* __restrict__ status,
                               const int64_t* __restrict__ nhist, int64_t m, double lam,
                               double* scratch, int64_t B) {
  using acc_t = double;  // a float64 solve, like reference.anderson_weights and the CPU twin
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B || status[b] != kActive) return;
  const int64_t n = nhist[b] < m ? nhist[b] : m, newest = (nhist[b] - 1) % m;
  acc_t* K = scratch + b * (2 * m * m + m);
  acc_t* work = K + m * m;
  acc_t* w = work + m * m;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) K[i * n + j] = gram[(b * m + i) * m + j];
  if (!anderson_weights<acc_t>(K, n, n, newest, lam, work, w)) fallback[b] += 1;
  for (int64_t i = 0; i < m; ++i) alpha[b * m + i] = static_cast<scalar_t>(i < n ? w[i] : acc_t(0));
}

// z = sum_j alpha_j (X_j + beta G_j), alpha read back as stored (like the CPU code).
template <typename scalar_t, typename hist_t>
__global__ void __launch_bounds__(kThreads)
    mix_kernel(const hist_t* __restrict__ X, const hist_t* __restrict__ G,
               const scalar_t* __restrict__ alpha, scalar_t* z,
               const int64_t* __restrict__ status, const int64_t* __restrict__ nhist,
               double beta, int64_t m, int64_t D, int64_t nch) {
  using acc_t = accum_t;
  const int64_t b = blockIdx.x / nch, chunk = blockIdx.x % nch;
  if (status[b] != kActive) return;
  const int64_t n = nhist[b] < m ? nhist[b] : m;
  const acc_t bt = static_cast<acc_t>(beta);
  acc_t acc[kEPT];
  for (int e = 0; e < kEPT; ++e) acc[e] = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t a = static_cast<acc_t>(alpha[b * m + j]);
    const hist_t* x = X + (b * m + j) * D;
    const hist_t* r = G + (b * m + j) * D;
#pragma unroll
    for (int e = 0; e < kEPT; ++e) {
      const int64_t d = chunk * kChunk + threadIdx.x + e * kThreads;
      if (d < D) acc[e] += a * (static_cast<acc_t>(x[d]) + bt * static_cast<acc_t>(r[d]));
    }
  }
  for (int e = 0; e < kEPT; ++e) {
    const int64_t d = chunk * kChunk + threadIdx.x + e * kThreads;
    if (d < D) z[b * D + d] = static_cast<scalar_t>(acc[e]);
  }
}

constexpr int kSampleThreads = 128;

unsigned sample_blocks(int64_t B) {
  return static_cast<unsigned>((B + kSampleThreads - 1) / kSampleThreads);
}

}  // namespace

void fixed_point_step_cuda(const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                           double tau) {
  const c10::cuda::CUDAGuard device_guard(z.device());
  const int64_t B = z.size(0), D = z.size(1), nch = num_chunks(D);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fixed_point_step_cuda", [&] {
    fixed_point_kernel<scalar_t><<<chunk_grid(B, nch), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), status.data_ptr<int64_t>(), tau, D, nch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void anderson_store_cuda(const AndersonArgs& t) {
  const c10::cuda::CUDAGuard device_guard(t.X.device());
  const int64_t B = t.X.size(0), m = t.X.size(1), D = t.X.size(2), nch = num_chunks(D);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(t.z.scalar_type(), "anderson_store_cuda", [&] {
    using acc_t = accum_t;
    using state_t = scalar_t;
    at::Tensor part =
        at::empty({B, nch, m}, t.z.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    dispatch_history<state_t>(t.X.scalar_type(), [&](auto h) {
      using hist_t = typename decltype(h)::type;
      store_kernel<state_t, hist_t><<<chunk_grid(B, nch), kThreads, 0, stream>>>(
          t.X.data_ptr<hist_t>(), t.G.data_ptr<hist_t>(), t.z.data_ptr<state_t>(),
          t.g.data_ptr<state_t>(), t.status.data_ptr<int64_t>(), t.nhist.data_ptr<int64_t>(),
          m, D, nch, part.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    store_finalize_kernel<state_t><<<sample_blocks(B), kSampleThreads, 0, stream>>>(
        part.data_ptr<acc_t>(), t.gram.data_ptr<state_t>(), t.status.data_ptr<int64_t>(),
        t.nhist.data_ptr<int64_t>(), m, nch, B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void anderson_mix_cuda(const AndersonArgs& t, double beta, double lam) {
  const c10::cuda::CUDAGuard device_guard(t.X.device());
  const int64_t B = t.X.size(0), m = t.X.size(1), D = t.X.size(2), nch = num_chunks(D);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(t.z.scalar_type(), "anderson_mix_cuda", [&] {
    using state_t = scalar_t;
    at::Tensor scratch = at::empty({B, 2 * m * m + m}, t.z.options().dtype(at::kDouble));
    weights_kernel<scalar_t><<<sample_blocks(B), kSampleThreads, 0, stream>>>(
        t.gram.data_ptr<scalar_t>(), t.alpha.data_ptr<scalar_t>(),
        t.fallback.data_ptr<int64_t>(), t.status.data_ptr<int64_t>(),
        t.nhist.data_ptr<int64_t>(), m, lam, scratch.data_ptr<double>(), B);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_history<state_t>(t.X.scalar_type(), [&](auto h) {
      using hist_t = typename decltype(h)::type;
      mix_kernel<state_t, hist_t><<<chunk_grid(B, nch), kThreads, 0, stream>>>(
          t.X.data_ptr<hist_t>(), t.G.data_ptr<hist_t>(), t.alpha.data_ptr<state_t>(),
          t.z.data_ptr<state_t>(), t.status.data_ptr<int64_t>(), t.nhist.data_ptr<int64_t>(),
          beta, m, D, nch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace deq_ext
