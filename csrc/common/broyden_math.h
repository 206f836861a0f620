// Per-sample scalar algebra of the batched limited-memory Broyden solver.
//
// Written once and compiled into both the CPU kernels and the CUDA kernels, so
// that every per-sample decision (the Sherman-Morrison coefficients) is made by
// the same code on every device. The pure-PyTorch twin lives in deq_ext/reference.py.
#pragma once

#include "history.h"
#include "status.h"

namespace deq_ext {

// Layout of the per-sample scalars written by the reduction pass: the two dot
// products it measured and the Sherman-Morrison quantities derived from them.
enum ScalarSlot : int {
  kDzDg = 0,   // dz . dg
  kDzG = 1,    // dz . g
  kDen = 2,    // v . dg, the Sherman-Morrison denominator
  kVG = 3,     // v . g, weight of the new pair in the next step
  kValid = 4,  // 1 if the new pair may be stored, 0 if the update is skipped
  kNumScalars = 5,
};

// With H = -I + sum_j u_j v_j^T, dz the last step and dg the change of the
// residual it caused, Broyden's good update adds the pair
//   v = H^T dz = -dz + V a,         a_j = u_j . dz
//   u = (dz - H dg) / (v . dg)  = (dz + dg - U b) / den,   b_j = v_j . dg
// and the next step is -H' g = g - U c - u (v . g),  c_j = v_j . g.
// Both denominators follow from the reduced dot products alone:
//   den = v . dg = -dz.dg + a.b,    vg = v . g = -dz.g + a.c.
// The pair is skipped (valid = 0) when den is zero, tiny or non-finite, which
// would otherwise put inf/NaN into the history of this sample.
template <typename acc_t>
DEQ_HD void sherman_morrison(const acc_t* a, const acc_t* b, const acc_t* c, int64_t k,
                             acc_t dz_dg, acc_t dz_g, acc_t* den_out, acc_t* vg_out,
                             acc_t* valid_out) {
  acc_t ab = 0, ac = 0;
  for (int64_t j = 0; j < k; ++j) {
    ab += a[j] * b[j];
    ac += a[j] * c[j];
  }
  const acc_t den = ab - dz_dg;
  const acc_t vg = ac - dz_g;
  const bool ok = is_finite(den) && is_finite(vg) &&
                  (den > smallest_normal<acc_t>() || den < -smallest_normal<acc_t>());
  *den_out = den;
  *vg_out = vg;
  *valid_out = ok ? acc_t(1) : acc_t(0);
}

}  // namespace deq_ext
