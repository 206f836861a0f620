// Launch geometry and warp-level helpers shared by every CUDA kernel file.
//
// Every bandwidth-bound pass runs one block per (sample, chunk of D): kThreads
// threads each handle kEPT elements strided by kThreads, so every access is
// coalesced. The (sample, chunk) pairs are flattened into a 1-D grid so that B
// is not limited by the 65535 cap of gridDim.y.
#pragma once

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

// Butterfly sum: every lane ends with the same total, in a fixed order.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace cuda_launch
}  // namespace deq_ext
