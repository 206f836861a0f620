// CUDA kernel of the residual/status op shared by every method, in one launch.
//
// One block per (sample, chunk of D) forms g = f(z) - z, dg and the chunk's partial sums of
// |g|^2 and |f(z)|^2. The last block of a sample to finish (launch.cuh, last_block_of) sums the
// partials in chunk order, applies the shared status rules (common/status.h) and, when the
// iterate is the sample's best so far, copies z into z_best. The last block of the whole grid
// then counts the pending and active samples into `counts`, which the solver copies to the host
// without waiting for it. No floating-point atomics: results are the same bits run to run.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "launch.cuh"

namespace deq_ext {
namespace {

using namespace cuda_launch;

constexpr int kCountSlots = 2;  // pending, active: summed together

// The sums are in double, like the reference and the CPU twin: in float a finite |g| above
// about 1e18 would overflow to inf and flag the sample as diverged.
template <typename scalar_t, typename fz_t>
__global__ void __launch_bounds__(kThreads)
    residual_status_kernel(const fz_t* __restrict__ fz, const scalar_t* __restrict__ z,
                           scalar_t* __restrict__ g, scalar_t* __restrict__ dg, scalar_t* z_best,
                           StatusVectors<scalar_t> v, StatusParams p, int64_t B, int64_t D,
                           int64_t nch, double* part, int* tickets, int64_t* counts) {
  using acc_t = accum_t;
  const ChunkPos pos = chunk_pos(nch, D);
  // Every block of sample b reads its status before the sample's last block can change it.
  if (v.status[pos.b] == kActive) {
    const int64_t row = pos.b * D;
    scalar_t f[kEPT], zv[kEPT], gv[kEPT];
#pragma unroll
    for (int e = 0; e < kEPT; ++e) {
      const int64_t i = row + pos.d[e];
      f[e] = pos.in[e] ? static_cast<scalar_t>(fz[i]) : scalar_t(0);
      zv[e] = pos.in[e] ? z[i] : scalar_t(0);
      gv[e] = pos.in[e] ? g[i] : scalar_t(0);
    }
    acc_t s[2] = {acc_t(0), acc_t(0)};
#pragma unroll
    for (int e = 0; e < kEPT; ++e) {
      if (!pos.in[e]) continue;
      const int64_t i = row + pos.d[e];
      const scalar_t gn = f[e] - zv[e];
      dg[i] = gn - gv[e];
      g[i] = gn;
      s[0] += static_cast<acc_t>(gn) * gn;
      s[1] += static_cast<acc_t>(f[e]) * f[e];
    }
    __shared__ acc_t smem[kWarps * 2];
    const acc_t tot = block_sum_scatter(s, smem);
    if (threadIdx.x < 2) part[(pos.b * nch + pos.chunk) * 2 + threadIdx.x] = tot;

    if (last_block_of(&tickets[pos.b], static_cast<int>(nch))) {
      __shared__ int improved;
      if (threadIdx.x < kWarpSize) {
        const double* pb = part + pos.b * nch * 2;
        double sg = 0, sf = 0;
        for (int64_t c = threadIdx.x; c < nch; c += kWarpSize) {
          sg += __ldcg(pb + c * 2 + 0);
          sf += __ldcg(pb + c * 2 + 1);
        }
        sg = warp_sum(sg);
        sf = warp_sum(sf);
        if (threadIdx.x == 0) improved = write_back_status(v, pos.b, sg, sf, p) ? 1 : 0;
      }
      __syncthreads();
      if (improved) {
        for (int64_t d = threadIdx.x; d < D; d += kThreads) z_best[row + d] = z[row + d];
      }
    }
  }

  // Every block, finished sample or not, announces on the grid's ticket.
  if (last_block_of(&tickets[B], static_cast<int>(B * nch))) {
    int64_t c[kCountSlots] = {0, 0};
    for (int64_t b = threadIdx.x; b < B; b += kThreads) {
      const int64_t st = __ldcg(v.status + b);
      c[kActiveCount] += st == kActive;
      c[kPendingCount] += is_pending(st, __ldcg(v.res_abs + b), __ldcg(v.res_rel + b), p);
    }
    __shared__ int64_t smem_counts[kWarps * kCountSlots];
    const int64_t tot = block_sum_scatter(c, smem_counts);
    if (threadIdx.x < kCountSlots) counts[threadIdx.x] = tot;
  }
}

template <typename scalar_t, typename fz_t>
void residual_status_impl(const ResidualArgs& t, const StatusParams& p) {
  const int64_t B = t.z.size(0), D = t.z.size(1), nch = num_chunks(D);
  check_scratch_size(t.partials, B * nch * 2, "partials", "residual_status_");
  check_scratch_size(t.tickets, B + 1, "tickets", "residual_status_");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const StatusVectors<scalar_t> v{
      t.best_abs.data_ptr<scalar_t>(), t.best_rel.data_ptr<scalar_t>(),
      t.res_abs.data_ptr<scalar_t>(),  t.res_rel.data_ptr<scalar_t>(),
      t.status.data_ptr<int64_t>(),    t.nstep.data_ptr<int64_t>(),
      t.nfev.data_ptr<int64_t>(),      t.stall.data_ptr<int64_t>()};
  residual_status_kernel<scalar_t, fz_t><<<chunk_grid(B, nch), kThreads, 0, stream>>>(
      t.fz.data_ptr<fz_t>(), t.z.data_ptr<scalar_t>(), t.g.data_ptr<scalar_t>(),
      t.dg.data_ptr<scalar_t>(), t.z_best.data_ptr<scalar_t>(), v, p, B, D, nch,
      t.partials.data_ptr<double>(), t.tickets.data_ptr<int>(), t.counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void residual_status_cuda(const ResidualArgs& t, const StatusParams& p) {
  const c10::cuda::CUDAGuard device_guard(t.z.device());
  AT_DISPATCH_FLOATING_TYPES(t.z.scalar_type(), "residual_status_cuda", [&] {
    using state_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.fz.scalar_type(),
                                    "residual_status_cuda_fz", [&] {
                                      residual_status_impl<state_t, scalar_t>(t, p);
                                    });
  });
}

}  // namespace deq_ext
