// Per-sample scalar algebra of the batched limited-memory Broyden solver.
//
// Written once and compiled into both the CPU kernels and the CUDA kernels, so
// that every per-sample decision (Sherman-Morrison coefficients, convergence,
// divergence, stagnation) is made by the same code on every device. The
// pure-PyTorch twin lives in deq_ext/reference.py.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DEQ_HD __host__ __device__ __forceinline__
#else
#define DEQ_HD inline
#endif

namespace deq_ext {

// Per-sample solver status; the values are mirrored in deq_ext/status.py.
enum Status : int64_t {
  kActive = 0,
  kConverged = 1,
  kDiverged = 2,
  kStalled = 3,
  kMaxIter = 4,
};

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

// Added to ||f(z)|| in the relative residual, as torchdeq and locuslab/deq do.
constexpr double kRelEps = 1e-9;

template <typename T>
DEQ_HD bool is_finite(T x) {
  return !(x != x) && x - x == T(0);  // NaN fails the first, +-inf the second
}

template <typename T>
DEQ_HD T smallest_normal();
template <>
DEQ_HD float smallest_normal<float>() { return 1.17549435e-38f; }
template <>
DEQ_HD double smallest_normal<double>() { return 2.2250738585072014e-308; }

template <typename T>
DEQ_HD T unit_roundoff();
template <>
DEQ_HD float unit_roundoff<float>() { return 1.1920929e-07f; }
template <>
DEQ_HD double unit_roundoff<double>() { return 2.220446049250313e-16; }

// Number of stored pairs and the ring slot the next pair goes to.
DEQ_HD int64_t stored_pairs(int64_t npairs, int64_t m) { return npairs < m ? npairs : m; }
DEQ_HD int64_t next_slot(int64_t npairs, int64_t m) { return npairs % m; }

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

struct StatusParams {
  double tol;             // stop when the objective falls below it
  bool use_rel;           // objective: relative (true) or absolute residual
  int64_t stall_patience; // iterations without a new best before STALLED; <= 0 disables
  double diverge_ratio;   // DIVERGED when objective > diverge_ratio * best so far
  bool count_step;        // this evaluation follows a solver step (nstep += 1)
  bool freeze_converged;  // per-sample stopping: a converged sample leaves the active set
};

struct StatusUpdate {
  double res_abs;
  double res_rel;
  int64_t status;
  int64_t stall;
  bool improved;  // the new iterate is the lowest-residual one so far
};

// Decides one sample's fate from the squared norms of g = f(z) - z and f(z).
DEQ_HD StatusUpdate update_status(double sq_g, double sq_fz, double best_obj, int64_t stall,
                                  const StatusParams& p) {
  StatusUpdate r;
  r.res_abs = sqrt(sq_g);
  r.res_rel = r.res_abs / (sqrt(sq_fz) + kRelEps);
  const double obj = p.use_rel ? r.res_rel : r.res_abs;
  r.improved = false;
  r.stall = stall;
  if (!is_finite(r.res_abs) || !is_finite(r.res_rel)) {
    r.status = kDiverged;
    return r;
  }
  r.improved = obj < best_obj;
  r.stall = r.improved ? 0 : stall + 1;
  if (p.freeze_converged && obj < p.tol) {
    r.status = kConverged;
  } else if (is_finite(best_obj) && obj > p.diverge_ratio * best_obj && !(obj < p.tol)) {
    // (below tol is never a blow-up: with per_sample=False converged samples keep iterating)
    r.status = kDiverged;
  } else if (p.stall_patience > 0 && r.stall >= p.stall_patience) {
    r.status = kStalled;
  } else {
    r.status = kActive;
  }
  return r;
}

}  // namespace deq_ext
