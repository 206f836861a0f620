// Launch geometry and warp-level helpers shared by every CUDA kernel file.
//
// Every bandwidth-bound pass runs one block per (sample, chunk of D): kThreads
// threads each handle kEPT elements strided by kThreads, so every access is
// coalesced. The (sample, chunk) pairs are flattened into a 1-D grid so that B
// is not limited by the 65535 cap of gridDim.y.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cstdint>

namespace deq_ext {
namespace cuda_launch {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kEPT = 4;  // elements per thread
constexpr int64_t kChunk = kThreads * kEPT;

// Accumulation type of every reduction: double for float32 and float64 state, as in the
// CPU twin and the reference, so that every per-sample decision (is the Broyden
// denominator usable, which iterate is best) is taken from the same sums on every
// device. The passes are bandwidth-bound: the wider adds cost no memory traffic.
using accum_t = double;

inline int64_t num_chunks(int64_t D) { return (D + kChunk - 1) / kChunk; }

inline dim3 chunk_grid(int64_t B, int64_t nch) {
  TORCH_CHECK(B * nch <= INT_MAX, "deq_ext: batch too large for the CUDA grid (", B, " x ",
              nch, " blocks)");
  return dim3(static_cast<unsigned>(B * nch));
}

// The persistent scratch a launch needs (partial sums, block counters) comes from the solve's
// state: an op allocates nothing, so a solve's loop allocates nothing and a captured CUDA graph
// replays against the same buffers.
inline void check_scratch_size(const at::Tensor& t, int64_t needed, const char* what,
                               const char* op) {
  TORCH_CHECK(t.numel() >= needed, "deq_ext: ", op, " needs '", what, "' of at least ", needed,
              " elements here, got ", t.numel());
}

// The last-block pattern: each of `blocks` blocks announces on `ticket` that it is done; the one
// that announces last sees every other block's writes (read them with __ldcg, past the
// incoherent L1) and finishes the group's work in the same launch. It resets the ticket, which
// is zero again for the next launch or graph replay. Every thread of a block must call it.
__device__ __forceinline__ bool last_block_of(int* ticket, int blocks) {
  __shared__ int last;
  __threadfence();  // this thread's writes are visible device-wide before the block announces
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(ticket, 1) == blocks - 1;
    if (last) *ticket = 0;
  }
  __syncthreads();
  return last != 0;
}

// Butterfly sum: every lane ends with the same total, in a fixed order.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// This thread's place: sample b, chunk, and its kEPT elements d[e] of the
// sample's row (in[e]: d[e] < D, false only in the last chunk).
struct ChunkPos {
  int64_t b;
  int64_t chunk;
  int64_t d[kEPT];
  bool in[kEPT];
};

__device__ __forceinline__ ChunkPos chunk_pos(int64_t nch, int64_t D) {
  ChunkPos p;
  const int64_t blk = blockIdx.x;
  p.b = blk / nch;
  p.chunk = blk % nch;
#pragma unroll
  for (int e = 0; e < kEPT; ++e) {
    p.d[e] = p.chunk * kChunk + e * kThreads + threadIdx.x;
    p.in[e] = p.d[e] < D;
  }
  return p;
}

// Block-wide sums of N per-thread values: thread i < N returns the total of
// value i (warps combined in order). smem holds kWarps * N values and is read
// after the internal __syncthreads, so back-to-back calls must alternate
// between two buffers.
template <typename T, int N>
__device__ __forceinline__ T block_sum_scatter(T (&v)[N], T* smem) {
  static_assert(N <= kThreads, "one result per thread");
  const int tid = threadIdx.x, lane = tid % kWarpSize, warp = tid / kWarpSize;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) smem[warp * N + i] = v[i];
  }
  __syncthreads();
  T tot = 0;
  if (tid < N) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) tot += smem[w * N + tid];
  }
  return tot;
}

}  // namespace cuda_launch
}  // namespace deq_ext
