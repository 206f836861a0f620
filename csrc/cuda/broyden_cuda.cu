// CUDA kernels of the Broyden solver's two passes over the history, one launch each.
//
// One block per (sample, chunk of D); every pass is bandwidth-bound. The reduction writes
// per-(sample, chunk) partial sums into the solve's scratch and the last block of each sample
// (launch.cuh, last_block_of) sums them in a fixed order and applies the shared math of
// broyden_math.h; the expansion's last block counts the stored pair. There are no
// floating-point atomics, so results are reproducible run to run. Samples whose status is not
// ACTIVE are skipped on device (no host sync): every block reads status[b] first and returns
// before touching anything else. The history is a list of chunks (common/history.h).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "launch.cuh"

namespace deq_ext {
namespace {

using namespace cuda_launch;

// ---------------------------------------------------------------------------
// broyden_reduce
// ---------------------------------------------------------------------------

// Pairs reduced per tile: their loads are all in flight together, and one
// __syncthreads serves 3 * kPairs block sums (of double accumulators, whatever the
// state dtype, so the register budget is the same for float and double).
constexpr int kReducePairs = 4;

// The per-sample end of the reduction, in the sample's last block: totals over chunks (in chunk
// order), rounded into proj, then the Sherman-Morrison scalars from the unrounded totals into
// scal (as the CPU twin). The totals overwrite chunk 0's partial sums: each column q is read and
// written by its own thread only. proj entries j >= k are written as 0.
template <typename scalar_t>
__device__ __forceinline__ void reduce_finish(accum_t* pb, int64_t k, int64_t m, int64_t nch,
                                              scalar_t* pr, scalar_t* s) {
  using acc_t = accum_t;
  const int64_t Q = 3 * m + 2;
  for (int64_t q = threadIdx.x; q < Q; q += kThreads) {
    acc_t tot = 0;
    if (q >= 3 * m || q % m < k) {
      for (int64_t c = 0; c < nch; ++c) tot += __ldcg(pb + c * Q + q);
    }
    pb[q] = tot;
    if (q < 3 * m) pr[q] = static_cast<scalar_t>(tot);
  }
  __syncthreads();  // makes every total visible to thread 0
  if (threadIdx.x != 0) return;
  acc_t den, vg, valid;
  sherman_morrison<acc_t>(pb, pb + m, pb + 2 * m, k, pb[3 * m], pb[3 * m + 1], &den, &vg, &valid);
  s[kDzDg] = static_cast<scalar_t>(pb[3 * m]);
  s[kDzG] = static_cast<scalar_t>(pb[3 * m + 1]);
  s[kDen] = static_cast<scalar_t>(den);
  s[kVG] = static_cast<scalar_t>(vg);
  s[kValid] = static_cast<scalar_t>(valid);
}

// Partial sums over this chunk, out = part[b, chunk, :]:
//   out[j] = U_j.dz, out[m + j] = V_j.dg, out[2m + j] = V_j.g  for j < k,
//   out[3m] = dz.dg, out[3m + 1] = dz.g.
// Entries j >= k are left unwritten; the finish never reads them.
// Elements past D (last chunk) are loaded as 0 and add nothing.
template <typename scalar_t, typename hist_t, int kPairs>
__global__ void __launch_bounds__(kThreads, 2)
    reduce_kernel(HistoryChunks<const hist_t> U, HistoryChunks<const hist_t> V,
                  const scalar_t* __restrict__ dz, const scalar_t* __restrict__ dg,
                  const scalar_t* __restrict__ g, const int64_t* __restrict__ status,
                  const int64_t* __restrict__ npairs, int64_t m, bool restart, int64_t D,
                  int64_t nch, accum_t* part, int* tickets, scalar_t* proj, scalar_t* scal) {
  using acc_t = accum_t;
  static_assert(3 * kPairs <= kThreads, "one tile total per thread");
  const ChunkPos pos = chunk_pos(nch, D);
  const int64_t st = status[pos.b], n = live_pairs(npairs[pos.b], m, restart);
  if (st != kActive) return;
  // (never past the allocated chunks, whatever the caller passed)
  const int64_t k = stored_pairs(stored_pairs(n, m), U.capacity());
  acc_t* out = part + (pos.b * nch + pos.chunk) * (3 * m + 2);

  // dz, dg, g stay in registers while the history streams past.
  const int64_t row = pos.b * D;
  acc_t xdz[kEPT], xdg[kEPT], xg[kEPT];
#pragma unroll
  for (int e = 0; e < kEPT; ++e) {
    const int64_t i = row + pos.d[e];
    xdz[e] = pos.in[e] ? static_cast<acc_t>(dz[i]) : acc_t(0);
    xdg[e] = pos.in[e] ? static_cast<acc_t>(dg[i]) : acc_t(0);
    xg[e] = pos.in[e] ? static_cast<acc_t>(g[i]) : acc_t(0);
  }

  __shared__ acc_t smem_tile[2][kWarps * 3 * kPairs];
  int buf = 0;
  for (int64_t j0 = 0; j0 < k; j0 += kPairs, buf ^= 1) {
    // Pairs past k (last tile) re-read pair k - 1 rather than branch around
    // their loads; their sums are computed but not written out.
    hist_t ur[kPairs][kEPT], vr[kPairs][kEPT];
#pragma unroll
    for (int t = 0; t < kPairs; ++t) {
      const int64_t j = j0 + t < k ? j0 + t : k - 1;
      const hist_t* uj = U.row(pos.b, j);
      const hist_t* vj = V.row(pos.b, j);
#pragma unroll
      for (int e = 0; e < kEPT; ++e) {
        ur[t][e] = pos.in[e] ? uj[pos.d[e]] : hist_t(0);
        vr[t][e] = pos.in[e] ? vj[pos.d[e]] : hist_t(0);
      }
    }
    acc_t s[3 * kPairs];
#pragma unroll
    for (int t = 0; t < kPairs; ++t) {
      acc_t sa = 0, sb = 0, sc = 0;
#pragma unroll
      for (int e = 0; e < kEPT; ++e) {
        const acc_t ue = static_cast<acc_t>(ur[t][e]);
        const acc_t ve = static_cast<acc_t>(vr[t][e]);
        sa += ue * xdz[e];
        sb += ve * xdg[e];
        sc += ve * xg[e];
      }
      s[3 * t + 0] = sa;
      s[3 * t + 1] = sb;
      s[3 * t + 2] = sc;
    }
    const acc_t tot = block_sum_scatter(s, smem_tile[buf]);
    const int64_t nq = 3 * (k - j0 < kPairs ? k - j0 : kPairs);
    if (threadIdx.x < nq) {
      const int t = threadIdx.x / 3, which = threadIdx.x % 3;
      out[which * m + j0 + t] = tot;
    }
  }

  // Own buffer, so no barrier is needed against the last tile's readers.
  __shared__ acc_t smem_dots[kWarps * 2];
  acc_t s[2] = {acc_t(0), acc_t(0)};
#pragma unroll
  for (int e = 0; e < kEPT; ++e) {
    s[0] += xdz[e] * xdg[e];
    s[1] += xdz[e] * xg[e];
  }
  const acc_t tot = block_sum_scatter(s, smem_dots);
  if (threadIdx.x < 2) out[3 * m + threadIdx.x] = tot;

  if (last_block_of(&tickets[pos.b], static_cast<int>(nch)))
    reduce_finish(part + pos.b * nch * (3 * m + 2), k, m, nch, proj + pos.b * 3 * m,
                  scal + pos.b * kNumScalars);
}

// ---------------------------------------------------------------------------
// broyden_expand
// ---------------------------------------------------------------------------

// Pairs whose loads are issued together in the expansion.
constexpr int kExpandPairs = 4;

// Adds pairs j .. j + G - 1 into sUb = U b, sUc = U c and sVa = V a, where c
// leaves out pair `drop` (the slot the new pair is about to replace).
template <int G, typename scalar_t, typename hist_t, typename acc_t>
__device__ __forceinline__ void expand_accumulate(const HistoryChunks<hist_t>& U,
                                                  const HistoryChunks<hist_t>& V,
                                                  const scalar_t* __restrict__ coef, int64_t j,
                                                  int64_t m, int64_t drop, const ChunkPos& pos,
                                                  acc_t (&sUb)[kEPT], acc_t (&sUc)[kEPT],
                                                  acc_t (&sVa)[kEPT]) {
  hist_t ur[G][kEPT], vr[G][kEPT];
#pragma unroll
  for (int t = 0; t < G; ++t) {
    const hist_t* uj = U.row(pos.b, j + t);
    const hist_t* vj = V.row(pos.b, j + t);
#pragma unroll
    for (int e = 0; e < kEPT; ++e) {
      ur[t][e] = pos.in[e] ? uj[pos.d[e]] : hist_t(0);
      vr[t][e] = pos.in[e] ? vj[pos.d[e]] : hist_t(0);
    }
  }
#pragma unroll
  for (int t = 0; t < G; ++t) {
    const acc_t aj = coef[j + t], bj = coef[m + j + t], c = coef[2 * m + j + t];
    const acc_t cj = j + t == drop ? acc_t(0) : c;
#pragma unroll
    for (int e = 0; e < kEPT; ++e) {
      const acc_t ue = static_cast<acc_t>(ur[t][e]);
      sUb[e] += ue * bj;
      sUc[e] += ue * cj;
      sVa[e] += static_cast<acc_t>(vr[t][e]) * aj;
    }
  }
}

// Mirrors expand_impl of the CPU code element by element. Each element of U,
// V, dz and z is read and then written by the same thread, so overwriting the
// ring slot (which is also read while the ring is full) needs no barrier. The
// sample's last block counts the stored pair, after every block has read npairs.
template <typename scalar_t, typename hist_t>
__global__ void __launch_bounds__(kThreads, 2)
    expand_kernel(HistoryChunks<hist_t> U, HistoryChunks<hist_t> V, scalar_t* dz,
                  const scalar_t* __restrict__ dg, const scalar_t* __restrict__ g, scalar_t* z,
                  const scalar_t* __restrict__ proj, const scalar_t* __restrict__ scal,
                  const int64_t* __restrict__ status, int64_t* npairs, int* tickets, int64_t m,
                  bool restart, int64_t D, int64_t nch) {
  using acc_t = accum_t;
  const ChunkPos pos = chunk_pos(nch, D);
  const int64_t st = status[pos.b], n = live_pairs(npairs[pos.b], m, restart);
  if (st != kActive) return;
  const int64_t k = stored_pairs(stored_pairs(n, m), U.capacity()), slot = next_slot(n, m);
  const scalar_t* s = scal + pos.b * kNumScalars;
  // (a slot past the allocated chunks is never written, whatever the caller passed)
  const bool valid = s[kValid] != scalar_t(0) && slot < U.capacity();
  const acc_t den = s[kDen], vg = s[kVG];
  const scalar_t* coef = proj + pos.b * 3 * m;
  // The pair in `slot` leaves the step only if the new pair replaces it.
  const int64_t drop = valid ? slot : -1;

  acc_t sUb[kEPT], sUc[kEPT], sVa[kEPT];
#pragma unroll
  for (int e = 0; e < kEPT; ++e) sUb[e] = sUc[e] = sVa[e] = acc_t(0);
  int64_t j = 0;
  for (; j + kExpandPairs <= k; j += kExpandPairs)
    expand_accumulate<kExpandPairs>(U, V, coef, j, m, drop, pos, sUb, sUc, sVa);
  for (; j < k; ++j) expand_accumulate<1>(U, V, coef, j, m, drop, pos, sUb, sUc, sVa);

  const int64_t row = pos.b * D;
  acc_t xdz[kEPT], xdg[kEPT], xg[kEPT];
  scalar_t xz[kEPT];
#pragma unroll
  for (int e = 0; e < kEPT; ++e) {
    const int64_t i = row + pos.d[e];
    xdz[e] = pos.in[e] ? static_cast<acc_t>(dz[i]) : acc_t(0);
    xdg[e] = pos.in[e] ? static_cast<acc_t>(dg[i]) : acc_t(0);
    xg[e] = pos.in[e] ? static_cast<acc_t>(g[i]) : acc_t(0);
    xz[e] = pos.in[e] ? z[i] : scalar_t(0);
  }
  hist_t* un = valid ? U.row(pos.b, slot) : nullptr;
  hist_t* vn = valid ? V.row(pos.b, slot) : nullptr;
#pragma unroll
  for (int e = 0; e < kEPT; ++e) {
    if (!pos.in[e]) continue;
    acc_t step = xg[e] - sUc[e];
    if (valid) {
      const acc_t uu = (xdz[e] + xdg[e] - sUb[e]) / den;
      un[pos.d[e]] = static_cast<hist_t>(uu);
      vn[pos.d[e]] = static_cast<hist_t>(sVa[e] - xdz[e]);
      step -= uu * vg;
    }
    const scalar_t stp = static_cast<scalar_t>(step);
    const int64_t i = row + pos.d[e];
    dz[i] = stp;
    z[i] = xz[e] + stp;
  }

  if (last_block_of(&tickets[pos.b], static_cast<int>(nch)) && threadIdx.x == 0 && valid)
    npairs[pos.b] = n + 1;
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

template <typename scalar_t, typename hist_t>
void reduce_impl(const HistoryArgs& t) {
  using acc_t = accum_t;
  const int64_t B = t.dz.size(0), m = t.m, D = t.dz.size(1), nch = num_chunks(D);
  check_scratch_size(t.partials, B * nch * (3 * m + 2), "partials", "broyden_reduce");
  check_scratch_size(t.tickets, B, "tickets", "broyden_reduce");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  reduce_kernel<scalar_t, hist_t, kReducePairs><<<chunk_grid(B, nch), kThreads, 0, stream>>>(
      chunks_of<const hist_t>(t.U), chunks_of<const hist_t>(t.V), t.dz.data_ptr<scalar_t>(),
      t.dg.data_ptr<scalar_t>(), t.g.data_ptr<scalar_t>(), t.status.data_ptr<int64_t>(),
      t.npairs.data_ptr<int64_t>(), m, t.restart, D, nch, t.partials.data_ptr<acc_t>(),
      t.tickets.data_ptr<int>(), t.proj.data_ptr<scalar_t>(), t.scal.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename hist_t>
void expand_impl(const HistoryArgs& t) {
  const int64_t B = t.dz.size(0), m = t.m, D = t.dz.size(1), nch = num_chunks(D);
  check_scratch_size(t.tickets, B, "tickets", "broyden_expand_");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  expand_kernel<scalar_t, hist_t><<<chunk_grid(B, nch), kThreads, 0, stream>>>(
      chunks_of<hist_t>(t.U), chunks_of<hist_t>(t.V), t.dz.data_ptr<scalar_t>(),
      t.dg.data_ptr<scalar_t>(), t.g.data_ptr<scalar_t>(), t.z.data_ptr<scalar_t>(),
      t.proj.data_ptr<scalar_t>(), t.scal.data_ptr<scalar_t>(), t.status.data_ptr<int64_t>(),
      t.npairs.data_ptr<int64_t>(), t.tickets.data_ptr<int>(), m, t.restart, D, nch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void broyden_reduce_cuda(const HistoryArgs& t) {
  const c10::cuda::CUDAGuard device_guard(t.dz.device());
  AT_DISPATCH_FLOATING_TYPES(t.dz.scalar_type(), "broyden_reduce_cuda", [&] {
    dispatch_history<scalar_t>(t.U.front().scalar_type(), [&](auto h) {
      reduce_impl<scalar_t, typename decltype(h)::type>(t);
    });
  });
}

void broyden_expand_cuda(const HistoryArgs& t) {
  const c10::cuda::CUDAGuard device_guard(t.dz.device());
  AT_DISPATCH_FLOATING_TYPES(t.dz.scalar_type(), "broyden_expand_cuda", [&] {
    dispatch_history<scalar_t>(t.U.front().scalar_type(), [&](auto h) {
      expand_impl<scalar_t, typename decltype(h)::type>(t);
    });
  });
}

}  // namespace deq_ext
