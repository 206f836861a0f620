// CUDA kernel of the damped fixed-point step z += tau * g, active samples only, one launch.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "launch.cuh"

namespace deq_ext {
namespace {

using namespace cuda_launch;

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

}  // namespace deq_ext
