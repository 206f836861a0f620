// CPU kernel of the damped fixed-point step z += tau * g, active samples only.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include "../ops.h"
#include "chunks.h"

namespace deq_ext {
namespace {

template <typename scalar_t>
void fixed_point_impl(const at::Tensor& zt, const at::Tensor& gt, const at::Tensor& status,
                      double tau) {
  using acc_t = at::acc_type<scalar_t, false>;
  const auto act = active_samples(status);
  const int64_t D = zt.size(1);
  scalar_t* z = zt.data_ptr<scalar_t>();
  const scalar_t* g = gt.data_ptr<scalar_t>();
  for_each_chunk(act, D, [&](int64_t, int64_t b, int64_t, int64_t lo, int64_t hi) {
    for (int64_t d = b * D + lo; d < b * D + hi; ++d)
      z[d] = z[d] + static_cast<scalar_t>(static_cast<acc_t>(tau) * g[d]);
  });
}

}  // namespace

void fixed_point_step_cpu(const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                          double tau) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fixed_point_step_cpu",
                             [&] { fixed_point_impl<scalar_t>(z, g, status, tau); });
}

}  // namespace deq_ext
