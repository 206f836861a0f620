// CPU kernel of the residual/status op shared by every method: parallel over (active sample,
// fixed-size chunk of D), see chunks.h. Accumulation is in double, like the reference twin; the
// per-sample decision and its write-back are common/status.h's, as on the GPU.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "chunks.h"

namespace deq_ext {
namespace {

template <typename scalar_t, typename fz_t>
void residual_status_impl(const ResidualArgs& t, const StatusParams& p) {
  using acc_t = at::acc_type<scalar_t, false>;
  const auto act = active_samples(t.status);
  const int64_t B = t.z.size(0), D = t.z.size(1), nch = num_chunks(D);
  std::vector<double> part(act.size() * nch * 2, 0.0);

  const fz_t* fz = t.fz.data_ptr<fz_t>();
  const scalar_t* z = t.z.data_ptr<scalar_t>();
  scalar_t* g = t.g.data_ptr<scalar_t>();
  scalar_t* dg = t.dg.data_ptr<scalar_t>();
  for_each_chunk(act, D, [&](int64_t i, int64_t b, int64_t c, int64_t lo, int64_t hi) {
    acc_t sg[kLanes] = {}, sf[kLanes] = {};
    const int64_t o = b * D;
    for (int64_t d0 = lo; d0 < hi; d0 += kLanes) {
      const int64_t n = std::min(kLanes, hi - d0);
      for (int64_t l = 0; l < n; ++l) {
        const int64_t d = o + d0 + l;
        const scalar_t f = static_cast<scalar_t>(fz[d]);
        const scalar_t gn = f - z[d];
        dg[d] = gn - g[d];
        g[d] = gn;
        sg[l] += static_cast<acc_t>(gn) * gn;
        sf[l] += static_cast<acc_t>(f) * f;
      }
    }
    part[(i * nch + c) * 2 + 0] = sum_lanes(sg);
    part[(i * nch + c) * 2 + 1] = sum_lanes(sf);
  });

  const StatusVectors<scalar_t> v{
      t.best_abs.data_ptr<scalar_t>(), t.best_rel.data_ptr<scalar_t>(),
      t.res_abs.data_ptr<scalar_t>(),  t.res_rel.data_ptr<scalar_t>(),
      t.status.data_ptr<int64_t>(),    t.nstep.data_ptr<int64_t>(),
      t.nfev.data_ptr<int64_t>(),      t.stall.data_ptr<int64_t>()};
  scalar_t* z_best = t.z_best.data_ptr<scalar_t>();
  at::parallel_for(0, static_cast<int64_t>(act.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = act[i];
      double sg = 0, sf = 0;
      for (int64_t c = 0; c < nch; ++c) {
        sg += part[(i * nch + c) * 2 + 0];
        sf += part[(i * nch + c) * 2 + 1];
      }
      if (write_back_status(v, b, sg, sf, p)) std::copy(z + b * D, z + (b + 1) * D, z_best + b * D);
    }
  });

  int64_t counts[kNumCounts] = {0, 0};
  for (int64_t b = 0; b < B; ++b) {
    counts[kActiveCount] += v.status[b] == kActive;
    counts[kPendingCount] += is_pending(v.status[b], v.res_abs[b], v.res_rel[b], p);
  }
  std::copy(counts, counts + kNumCounts, t.counts.data_ptr<int64_t>());
}

}  // namespace

void residual_status_cpu(const ResidualArgs& t, const StatusParams& p) {
  AT_DISPATCH_FLOATING_TYPES(t.z.scalar_type(), "residual_status_cpu", [&] {
    using state_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.fz.scalar_type(),
                                    "residual_status_cpu_fz", [&] {
                                      residual_status_impl<state_t, scalar_t>(t, p);
                                    });
  });
}

}  // namespace deq_ext
