// CUDA kernels: one block per (sample, chunk of D); every pass is bandwidth-bound.
//
// Each pass is a main kernel over (sample, chunk) blocks that writes
// per-(sample, chunk) partial sums, then a small per-sample kernel that sums
// them in a fixed order and applies the shared math of broyden_math.h. There
// are no floating-point atomics, so results are reproducible run to run.
// Samples whose status is not ACTIVE are skipped on device (no host sync):
// every block reads status[b] first and returns before touching anything else.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../ops.h"
#include "launch.cuh"

namespace deq_ext {
namespace {

using namespace cuda_launch;

constexpr int kFinalizeThreads = 256;
constexpr int kCountThreads = 128;

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

// Throughout, a thread first loads everything it needs for all its elements
// and only then computes and stores: the loads are then all in flight at once
// instead of one element's round trip at a time.

// ---------------------------------------------------------------------------
// residual_status
// ---------------------------------------------------------------------------

// g_new = f - z, dg = g_new - g, g = g_new; partial sums of g_new^2 and f^2.
// The sums are in double, like the reference and the CPU twin: in float a finite
// |g| above about 1e18 would overflow to inf and flag the sample as diverged.
template <typename scalar_t, typename fz_t>
__global__ void __launch_bounds__(kThreads)
    residual_kernel(const fz_t* __restrict__ fz, const scalar_t* __restrict__ z,
                    scalar_t* __restrict__ g, scalar_t* __restrict__ dg,
                    const int64_t* __restrict__ status, int64_t D, int64_t nch,
                    double* __restrict__ part) {
  using acc_t = accum_t;
  const ChunkPos pos = chunk_pos(nch, D);
  if (status[pos.b] != kActive) return;
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
}

// One warp per sample: norms, update_status, counters and best residuals.
// improved[b] tells the copy kernel whether z_best must take z; it is written
// for every sample, since status may leave ACTIVE here.
template <typename scalar_t>
__global__ void __launch_bounds__(kWarpSize)
    status_kernel(const double* __restrict__ part, int64_t nch, StatusParams p,
                  scalar_t* best_abs, scalar_t* best_rel, scalar_t* res_abs, scalar_t* res_rel,
                  int64_t* status, int64_t* nstep, int64_t* nfev, int64_t* stall,
                  int* improved) {
  const int64_t b = blockIdx.x;
  if (status[b] != kActive) {
    if (threadIdx.x == 0) improved[b] = 0;
    return;
  }
  const double* pb = part + b * nch * 2;
  double sg = 0, sf = 0;
  for (int64_t c = threadIdx.x; c < nch; c += kWarpSize) {
    sg += pb[c * 2 + 0];
    sf += pb[c * 2 + 1];
  }
  // The shuffles also order every lane's read of status[b] before lane 0
  // overwrites it.
  sg = warp_sum(sg);
  sf = warp_sum(sf);
  if (threadIdx.x != 0) return;

  const double best = static_cast<double>(p.use_rel ? best_rel[b] : best_abs[b]);
  const StatusUpdate r = update_status(sg, sf, best, stall[b], p);
  res_abs[b] = static_cast<scalar_t>(r.res_abs);
  res_rel[b] = static_cast<scalar_t>(r.res_rel);
  stall[b] = r.stall;
  nfev[b] += 1;
  if (p.count_step) nstep[b] += 1;
  if (r.improved) {
    best_abs[b] = static_cast<scalar_t>(r.res_abs);
    best_rel[b] = static_cast<scalar_t>(r.res_rel);
  }
  improved[b] = r.improved ? 1 : 0;
  status[b] = r.status;
}

// z_best = z for the samples that improved, including those that have just
// left ACTIVE (converged), hence the flag and not the status.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    copy_best_kernel(const scalar_t* __restrict__ z, scalar_t* __restrict__ z_best,
                     const int* __restrict__ improved, int64_t D, int64_t nch) {
  const ChunkPos pos = chunk_pos(nch, D);
  if (improved[pos.b] == 0) return;
  const int64_t row = pos.b * D;
  scalar_t zv[kEPT];
#pragma unroll
  for (int e = 0; e < kEPT; ++e) zv[e] = pos.in[e] ? z[row + pos.d[e]] : scalar_t(0);
#pragma unroll
  for (int e = 0; e < kEPT; ++e)
    if (pos.in[e]) z_best[row + pos.d[e]] = zv[e];
}

// ---------------------------------------------------------------------------
// broyden_reduce
// ---------------------------------------------------------------------------

// Pairs reduced per tile: their loads are all in flight together, and one
// __syncthreads serves 3 * kPairs block sums (of double accumulators, whatever the
// state dtype, so the register budget is the same for float and double).
constexpr int kReducePairs = 4;

// Partial sums over this chunk, out = part[b, chunk, :]:
//   out[j] = U_j.dz, out[m + j] = V_j.dg, out[2m + j] = V_j.g  for j < k,
//   out[3m] = dz.dg, out[3m + 1] = dz.g.
// Entries j >= k are left unwritten; the finalize kernel never reads them.
// Elements past D (last chunk) are loaded as 0 and add nothing.
template <typename scalar_t, typename hist_t, int kPairs>
__global__ void __launch_bounds__(kThreads, 2)
    reduce_kernel(const hist_t* __restrict__ U, const hist_t* __restrict__ V,
                  const scalar_t* __restrict__ dz, const scalar_t* __restrict__ dg,
                  const scalar_t* __restrict__ g, const int64_t* __restrict__ status,
                  const int64_t* __restrict__ npairs, int64_t m, int64_t D, int64_t nch,
                  accum_t* __restrict__ part) {
  using acc_t = accum_t;
  static_assert(3 * kPairs <= kThreads, "one tile total per thread");
  const ChunkPos pos = chunk_pos(nch, D);
  const int64_t st = status[pos.b], n = npairs[pos.b];  // both loads in flight at once
  if (st != kActive) return;
  const int64_t k = stored_pairs(n, m);
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
  const hist_t* Ub = U + pos.b * m * D;
  const hist_t* Vb = V + pos.b * m * D;
  int buf = 0;
  for (int64_t j0 = 0; j0 < k; j0 += kPairs, buf ^= 1) {
    // Pairs past k (last tile) re-read pair k - 1 rather than branch around
    // their loads; their sums are computed but not written out.
    hist_t ur[kPairs][kEPT], vr[kPairs][kEPT];
#pragma unroll
    for (int t = 0; t < kPairs; ++t) {
      const int64_t j = j0 + t < k ? j0 + t : k - 1;
#pragma unroll
      for (int e = 0; e < kEPT; ++e) {
        const int64_t i = j * D + pos.d[e];
        ur[t][e] = pos.in[e] ? Ub[i] : hist_t(0);
        vr[t][e] = pos.in[e] ? Vb[i] : hist_t(0);
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
}

// Per sample: totals over chunks (in chunk order), rounded into proj, then the
// Sherman-Morrison scalars from the unrounded totals into scal (as the CPU twin).
// The totals overwrite chunk 0's partial sums: each column q is read and written by
// its own thread only. proj entries j >= k are written as 0.
template <typename scalar_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    reduce_finalize_kernel(accum_t* __restrict__ part, const int64_t* __restrict__ status,
                           const int64_t* __restrict__ npairs, int64_t m, int64_t nch,
                           scalar_t* proj, scalar_t* scal) {
  using acc_t = accum_t;
  const int64_t b = blockIdx.x;
  if (status[b] != kActive) return;
  const int64_t k = stored_pairs(npairs[b], m);
  const int64_t Q = 3 * m + 2;
  acc_t* pb = part + b * nch * Q;
  scalar_t* pr = proj + b * 3 * m;
  for (int64_t q = threadIdx.x; q < Q; q += kFinalizeThreads) {
    acc_t tot = 0;
    if (q >= 3 * m || q % m < k) {
#pragma unroll 32
      for (int64_t c = 0; c < nch; ++c) tot += pb[c * Q + q];
    }
    pb[q] = tot;
    if (q < 3 * m) pr[q] = static_cast<scalar_t>(tot);
  }
  __syncthreads();  // makes every total visible to thread 0
  if (threadIdx.x != 0) return;
  acc_t den, vg, valid;
  sherman_morrison<acc_t>(pb, pb + m, pb + 2 * m, k, pb[3 * m], pb[3 * m + 1], &den, &vg,
                          &valid);
  scalar_t* s = scal + b * kNumScalars;
  s[kDzDg] = static_cast<scalar_t>(pb[3 * m]);
  s[kDzG] = static_cast<scalar_t>(pb[3 * m + 1]);
  s[kDen] = static_cast<scalar_t>(den);
  s[kVG] = static_cast<scalar_t>(vg);
  s[kValid] = static_cast<scalar_t>(valid);
}

// ---------------------------------------------------------------------------
// broyden_expand
// ---------------------------------------------------------------------------

// Pairs whose loads are issued together in the expansion.
constexpr int kExpandPairs = 4;

// Adds pairs j .. j + G - 1 into sUb = U b, sUc = U c and sVa = V a, where c
// leaves out pair `drop` (the slot the new pair is about to replace).
template <int G, typename scalar_t, typename hist_t, typename acc_t>
__device__ __forceinline__ void expand_accumulate(const hist_t* Ub, const hist_t* Vb,
                                                  const scalar_t* __restrict__ coef, int64_t j,
                                                  int64_t m, int64_t D, int64_t drop,
                                                  const ChunkPos& pos, acc_t (&sUb)[kEPT],
                                                  acc_t (&sUc)[kEPT], acc_t (&sVa)[kEPT]) {
  hist_t ur[G][kEPT], vr[G][kEPT];
#pragma unroll
  for (int t = 0; t < G; ++t) {
#pragma unroll
    for (int e = 0; e < kEPT; ++e) {
      const int64_t i = (j + t) * D + pos.d[e];
      ur[t][e] = pos.in[e] ? Ub[i] : hist_t(0);
      vr[t][e] = pos.in[e] ? Vb[i] : hist_t(0);
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
// ring slot (which is also read while the ring is full) needs no barrier.
template <typename scalar_t, typename hist_t>
__global__ void __launch_bounds__(kThreads, 2)
    expand_kernel(hist_t* U, hist_t* V, scalar_t* dz, const scalar_t* __restrict__ dg,
                  const scalar_t* __restrict__ g, scalar_t* z,
                  const scalar_t* __restrict__ proj, const scalar_t* __restrict__ scal,
                  const int64_t* __restrict__ status, const int64_t* __restrict__ npairs,
                  int64_t m, int64_t D, int64_t nch) {
  using acc_t = accum_t;
  const ChunkPos pos = chunk_pos(nch, D);
  const int64_t st = status[pos.b], n = npairs[pos.b];  // both loads in flight at once
  if (st != kActive) return;
  const int64_t k = stored_pairs(n, m), slot = next_slot(n, m);
  const scalar_t* s = scal + pos.b * kNumScalars;
  const bool valid = s[kValid] != scalar_t(0);
  const acc_t den = s[kDen], vg = s[kVG];
  const scalar_t* coef = proj + pos.b * 3 * m;
  // The pair in `slot` leaves the step only if the new pair replaces it.
  const int64_t drop = valid ? slot : -1;

  acc_t sUb[kEPT], sUc[kEPT], sVa[kEPT];
#pragma unroll
  for (int e = 0; e < kEPT; ++e) sUb[e] = sUc[e] = sVa[e] = acc_t(0);
  hist_t* Ub = U + pos.b * m * D;
  hist_t* Vb = V + pos.b * m * D;
  int64_t j = 0;
  for (; j + kExpandPairs <= k; j += kExpandPairs)
    expand_accumulate<kExpandPairs>(Ub, Vb, coef, j, m, D, drop, pos, sUb, sUc, sVa);
  for (; j < k; ++j) expand_accumulate<1>(Ub, Vb, coef, j, m, D, drop, pos, sUb, sUc, sVa);

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
  hist_t* un = Ub + slot * D;
  hist_t* vn = Vb + slot * D;
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
    const scalar_t st = static_cast<scalar_t>(step);
    const int64_t i = row + pos.d[e];
    dz[i] = st;
    z[i] = xz[e] + st;
  }
}

// Counts the stored pair; runs after expand_kernel (same stream), which reads
// npairs.
template <typename scalar_t>
__global__ void __launch_bounds__(kCountThreads)
    count_pair_kernel(const scalar_t* __restrict__ scal, const int64_t* __restrict__ status,
                      int64_t* npairs, int64_t B) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kCountThreads + threadIdx.x;
  if (b >= B || status[b] != kActive) return;
  if (scal[b * kNumScalars + kValid] != scalar_t(0)) npairs[b] += 1;
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

template <typename scalar_t, typename fz_t>
void residual_status_impl(const ResidualArgs& t, const StatusParams& p) {
  const int64_t B = t.z.size(0), D = t.z.size(1), nch = num_chunks(D);
  const dim3 grid = chunk_grid(B, nch);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor part = at::empty({B, nch, 2}, t.z.options().dtype(at::kDouble));
  const at::Tensor improved = at::empty({B}, t.z.options().dtype(at::kInt));

  residual_kernel<scalar_t, fz_t><<<grid, kThreads, 0, stream>>>(
      t.fz.data_ptr<fz_t>(), t.z.data_ptr<scalar_t>(), t.g.data_ptr<scalar_t>(),
      t.dg.data_ptr<scalar_t>(), t.status.data_ptr<int64_t>(), D, nch,
      part.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  status_kernel<scalar_t><<<static_cast<unsigned>(B), kWarpSize, 0, stream>>>(
      part.data_ptr<double>(), nch, p, t.best_abs.data_ptr<scalar_t>(),
      t.best_rel.data_ptr<scalar_t>(), t.res_abs.data_ptr<scalar_t>(),
      t.res_rel.data_ptr<scalar_t>(), t.status.data_ptr<int64_t>(),
      t.nstep.data_ptr<int64_t>(), t.nfev.data_ptr<int64_t>(), t.stall.data_ptr<int64_t>(),
      improved.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  copy_best_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      t.z.data_ptr<scalar_t>(), t.z_best.data_ptr<scalar_t>(), improved.data_ptr<int>(), D,
      nch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename hist_t>
void reduce_impl(const HistoryArgs& t) {
  using acc_t = accum_t;
  const int64_t B = t.U.size(0), m = t.U.size(1), D = t.U.size(2), nch = num_chunks(D);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor part = at::empty(
      {B, nch, 3 * m + 2}, t.U.options().dtype(c10::CppTypeToScalarType<acc_t>::value));

  reduce_kernel<scalar_t, hist_t, kReducePairs>
      <<<chunk_grid(B, nch), kThreads, 0, stream>>>(
          t.U.data_ptr<hist_t>(), t.V.data_ptr<hist_t>(), t.dz.data_ptr<scalar_t>(),
          t.dg.data_ptr<scalar_t>(), t.g.data_ptr<scalar_t>(), t.status.data_ptr<int64_t>(),
          t.npairs.data_ptr<int64_t>(), m, D, nch, part.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  reduce_finalize_kernel<scalar_t><<<static_cast<unsigned>(B), kFinalizeThreads, 0, stream>>>(
      part.data_ptr<acc_t>(), t.status.data_ptr<int64_t>(), t.npairs.data_ptr<int64_t>(), m,
      nch, t.proj.data_ptr<scalar_t>(), t.scal.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename hist_t>
void expand_impl(const HistoryArgs& t) {
  const int64_t B = t.U.size(0), m = t.U.size(1), D = t.U.size(2), nch = num_chunks(D);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  expand_kernel<scalar_t, hist_t><<<chunk_grid(B, nch), kThreads, 0, stream>>>(
      t.U.data_ptr<hist_t>(), t.V.data_ptr<hist_t>(), t.dz.data_ptr<scalar_t>(),
      t.dg.data_ptr<scalar_t>(), t.g.data_ptr<scalar_t>(), t.z.data_ptr<scalar_t>(),
      t.proj.data_ptr<scalar_t>(), t.scal.data_ptr<scalar_t>(), t.status.data_ptr<int64_t>(),
      t.npairs.data_ptr<int64_t>(), m, D, nch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  count_pair_kernel<scalar_t>
      <<<static_cast<unsigned>((B + kCountThreads - 1) / kCountThreads), kCountThreads, 0,
         stream>>>(t.scal.data_ptr<scalar_t>(), t.status.data_ptr<int64_t>(),
                   t.npairs.data_ptr<int64_t>(), B);
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

void broyden_reduce_cuda(const HistoryArgs& t) {
  const c10::cuda::CUDAGuard device_guard(t.U.device());
  AT_DISPATCH_FLOATING_TYPES(t.dz.scalar_type(), "broyden_reduce_cuda", [&] {
    dispatch_history<scalar_t>(t.U.scalar_type(), [&](auto h) {
      reduce_impl<scalar_t, typename decltype(h)::type>(t);
    });
  });
}

void broyden_expand_cuda(const HistoryArgs& t) {
  const c10::cuda::CUDAGuard device_guard(t.U.device());
  AT_DISPATCH_FLOATING_TYPES(t.dz.scalar_type(), "broyden_expand_cuda", [&] {
    dispatch_history<scalar_t>(t.U.scalar_type(), [&](auto h) {
      expand_impl<scalar_t, typename decltype(h)::type>(t);
    });
  });
}

}  // namespace deq_ext
