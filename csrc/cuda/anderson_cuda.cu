// CUDA kernels of Anderson acceleration, one launch per op.
//
// Same conventions as broyden_cuda.cu: (sample, chunk) blocks on a flattened grid, masks read on
// device, deterministic two-stage reductions finished by each sample's last block
// (launch.cuh, last_block_of), scratch from the solve's state, the current stream, every launch
// checked. The store op's last block also solves for the next mixing weights (the Gram matrix
// is complete once the new entry's row is in), so that mixing is one pass over the history.
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

// In sample b's last block: the Gram row and column of the new entry from the partial dots
// (chunk order), nhist += 1, then (thread 0) the next mixing weights from the stored Gram
// matrix, as reference.anderson_store_ and the CPU twin.
template <typename scalar_t>
__device__ __forceinline__ void store_finish(const accum_t* part_b, int64_t b, int64_t slot,
                                             int64_t n, int64_t m, int64_t nch, scalar_t* gram,
                                             scalar_t* alpha, int64_t* fallback, int64_t* nhist,
                                             double lam, double* weights) {
  using acc_t = accum_t;
  scalar_t* gb = gram + b * m * m;
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    acc_t tot = 0;
    for (int64_t c = 0; c < nch; ++c) tot += __ldcg(part_b + c * m + j);
    gb[slot * m + j] = static_cast<scalar_t>(tot);
    gb[j * m + slot] = static_cast<scalar_t>(tot);
  }
  __syncthreads();  // the new row and column are visible to thread 0
  if (threadIdx.x != 0) return;
  nhist[b] += 1;
  double* K = weights + b * (2 * m * m + m);
  double* work = K + m * m;
  double* w = work + m * m;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) K[i * n + j] = gb[i * m + j];
  if (!anderson_weights<double>(K, n, n, slot, lam, work, w)) fallback[b] += 1;
  for (int64_t i = 0; i < m; ++i) alpha[b * m + i] = static_cast<scalar_t>(i < n ? w[i] : 0.0);
}

// Partial dots G_slot . G_j over this chunk, with G_slot the new entry g as stored
// (rounded to the history dtype; the old entry of the slot is being replaced), and
// the chunk of X[slot] = z, G[slot] = g; the sample's last block finishes the store.
template <typename scalar_t, typename hist_t>
__global__ void __launch_bounds__(kThreads)
    store_kernel(HistoryChunks<hist_t> X, HistoryChunks<hist_t> G, const scalar_t* __restrict__ z,
                 const scalar_t* __restrict__ g, const int64_t* __restrict__ status,
                 int64_t* nhist, int64_t m, int64_t D, int64_t nch, accum_t* part,
                 double* weights, int* tickets, scalar_t* gram, scalar_t* alpha,
                 int64_t* fallback, double lam) {
  using acc_t = accum_t;
  const int64_t b = blockIdx.x / nch, chunk = blockIdx.x % nch;
  if (status[b] != kActive) return;
  const int64_t h = nhist[b], slot = h % m;
  const int64_t n = h + 1 < m ? h + 1 : m;
  if (n > X.capacity()) return;  // never past the allocated chunks, whatever the caller passed
  acc_t xg[kEPT];
  for (int e = 0; e < kEPT; ++e) {
    const int64_t d = chunk * kChunk + threadIdx.x + e * kThreads;
    xg[e] = d < D ? static_cast<acc_t>(static_cast<hist_t>(g[b * D + d])) : acc_t(0);
  }
  __shared__ acc_t smem[kWarps];
  acc_t* out = part + (b * nch + chunk) * m;
  for (int64_t j = 0; j < n; ++j) {
    acc_t s = 0;
    const hist_t* gj = G.row(b, j);
    for (int e = 0; e < kEPT; ++e) {
      const int64_t d = chunk * kChunk + threadIdx.x + e * kThreads;
      if (d < D) s += (j == slot ? xg[e] : static_cast<acc_t>(gj[d])) * xg[e];
    }
    const acc_t tot = block_sum(s, smem);
    if (threadIdx.x == 0) out[j] = tot;
  }
  // Written after every read of G in this block; other blocks own other chunks.
  hist_t* xs = X.row(b, slot);
  hist_t* gs = G.row(b, slot);
  for (int e = 0; e < kEPT; ++e) {
    const int64_t d = chunk * kChunk + threadIdx.x + e * kThreads;
    if (d < D) {
      xs[d] = static_cast<hist_t>(z[b * D + d]);
      gs[d] = static_cast<hist_t>(g[b * D + d]);
    }
  }
  if (last_block_of(&tickets[b], static_cast<int>(nch)))
    store_finish(part + b * nch * m, b, slot, n, m, nch, gram, alpha, fallback, nhist, lam,
                 weights);
}

// z = sum_j alpha_j (X_j + beta G_j), alpha read back as stored (like the CPU code).
template <typename scalar_t, typename hist_t>
__global__ void __launch_bounds__(kThreads)
    mix_kernel(HistoryChunks<const hist_t> X, HistoryChunks<const hist_t> G,
               const scalar_t* __restrict__ alpha, scalar_t* z,
               const int64_t* __restrict__ status, const int64_t* __restrict__ nhist,
               double beta, int64_t m, int64_t D, int64_t nch) {
  using acc_t = accum_t;
  const int64_t b = blockIdx.x / nch, chunk = blockIdx.x % nch;
  if (status[b] != kActive) return;
  const int64_t h = nhist[b] < m ? nhist[b] : m;
  const int64_t n = h < X.capacity() ? h : X.capacity();
  const acc_t bt = static_cast<acc_t>(beta);
  acc_t acc[kEPT];
  for (int e = 0; e < kEPT; ++e) acc[e] = 0;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t a = static_cast<acc_t>(alpha[b * m + j]);
    const hist_t* x = X.row(b, j);
    const hist_t* r = G.row(b, j);
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

}  // namespace

void anderson_store_cuda(const AndersonArgs& t, double lam) {
  const c10::cuda::CUDAGuard device_guard(t.z.device());
  const int64_t B = t.z.size(0), m = t.m, D = t.z.size(1), nch = num_chunks(D);
  // Partial dots, then per sample the weights' scratch (K, the factor, the solution).
  const int64_t dots = B * nch * m;
  check_scratch_size(t.partials, dots + B * (2 * m * m + m), "partials", "anderson_store_");
  check_scratch_size(t.tickets, B, "tickets", "anderson_store_");
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(t.z.scalar_type(), "anderson_store_cuda", [&] {
    using state_t = scalar_t;
    dispatch_history<state_t>(t.X.front().scalar_type(), [&](auto h) {
      using hist_t = typename decltype(h)::type;
      double* partials = t.partials.data_ptr<double>();
      store_kernel<state_t, hist_t><<<chunk_grid(B, nch), kThreads, 0, stream>>>(
          chunks_of<hist_t>(t.X), chunks_of<hist_t>(t.G), t.z.data_ptr<state_t>(),
          t.g.data_ptr<state_t>(), t.status.data_ptr<int64_t>(), t.nhist.data_ptr<int64_t>(), m,
          D, nch, partials, partials + dots, t.tickets.data_ptr<int>(),
          t.gram.data_ptr<state_t>(), t.alpha.data_ptr<state_t>(),
          t.fallback.data_ptr<int64_t>(), lam);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void anderson_mix_cuda(const AndersonArgs& t, double beta) {
  const c10::cuda::CUDAGuard device_guard(t.z.device());
  const int64_t B = t.z.size(0), m = t.m, D = t.z.size(1), nch = num_chunks(D);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(t.z.scalar_type(), "anderson_mix_cuda", [&] {
    using state_t = scalar_t;
    dispatch_history<state_t>(t.X.front().scalar_type(), [&](auto h) {
      using hist_t = typename decltype(h)::type;
      mix_kernel<state_t, hist_t><<<chunk_grid(B, nch), kThreads, 0, stream>>>(
          chunks_of<const hist_t>(t.X), chunks_of<const hist_t>(t.G),
          t.alpha.data_ptr<state_t>(), t.z.data_ptr<state_t>(), t.status.data_ptr<int64_t>(),
          t.nhist.data_ptr<int64_t>(), beta, m, D, nch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace deq_ext
