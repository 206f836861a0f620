// The schema of every op, and their registration for one device's kernels.
//
// Each schema marks the tensors the op writes (Tensor(x!)), so that the dispatcher,
// torch.compile and functionalization know what every call mutates; the ops return
// nothing. The fake (meta) implementations are registered from Python
// (deq_ext/_fake.py). Schemas here must match deq_ext/reference.py argument for argument.
#pragma once

#include <torch/library.h>

#include "op_checks.h"

namespace deq_ext {

inline void define_ops(torch::Library& m) {
  m.def(
      "residual_status_(Tensor fz, Tensor z, Tensor(a!) g, Tensor(b!) dg, Tensor(c!) z_best, "
      "Tensor(d!) best_abs, Tensor(e!) best_rel, Tensor(f!) res_abs, Tensor(g!) res_rel, "
      "Tensor(h!) status, Tensor(i!) nstep, Tensor(j!) nfev, Tensor(k!) stall, "
      "Tensor(l!) counts, Tensor(m!) partials, Tensor(n!) tickets, float tol, bool use_rel, "
      "int stall_patience, float diverge_ratio, bool count_step, bool freeze_converged) -> ()");
  m.def(
      "broyden_reduce(Tensor[] U, Tensor[] V, Tensor dz, Tensor dg, Tensor g, Tensor status, "
      "Tensor npairs, Tensor(a!) proj, Tensor(b!) scal, Tensor(c!) partials, "
      "Tensor(d!) tickets, int m, bool restart=False) -> ()");
  m.def(
      "broyden_expand_(Tensor(a!)[] U, Tensor(b!)[] V, Tensor(c!) dz, Tensor dg, Tensor g, "
      "Tensor(d!) z, Tensor proj, Tensor scal, Tensor status, Tensor(e!) npairs, "
      "Tensor(f!) tickets, int m, bool restart=False) -> ()");
  m.def("fixed_point_step_(Tensor(a!) z, Tensor g, Tensor status, float tau) -> ()");
  m.def(
      "anderson_store_(Tensor(a!)[] X, Tensor(b!)[] G, Tensor(c!) gram, Tensor z, Tensor g, "
      "Tensor(d!) alpha, Tensor(e!) fallback, Tensor status, Tensor(f!) nhist, "
      "Tensor(g!) partials, Tensor(h!) tickets, int m, float lam) -> ()");
  m.def(
      "anderson_mix_(Tensor[] X, Tensor[] G, Tensor(a!) z, Tensor alpha, Tensor status, "
      "Tensor nhist, int m, float beta) -> ()");
}

template <class Kernels>
void impl_ops(torch::Library& m) {
  using Ops = CheckedOps<Kernels>;
  m.impl("residual_status_", &Ops::residual_status_);
  m.impl("broyden_reduce", &Ops::broyden_reduce);
  m.impl("broyden_expand_", &Ops::broyden_expand_);
  m.impl("fixed_point_step_", &Ops::fixed_point_step_);
  m.impl("anderson_store_", &Ops::anderson_store_);
  m.impl("anderson_mix_", &Ops::anderson_mix_);
}

}  // namespace deq_ext
