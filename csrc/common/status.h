// Per-sample status rules shared by every method's kernels (CPU and CUDA): the status codes,
// the decision of one sample's fate from its residual, and the write-back of that decision into
// the per-sample vectors. Written once and compiled into both the CPU and the CUDA kernels, so
// that every device decides every sample with the same code. The pure-PyTorch twin is
// deq_ext/reference.py (residual_status_).
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

// Layout of the (2,) counts the residual/status op writes after every update: how many samples
// the loop still waits for, and how many are still iterating (mirrored in deq_ext/status.py).
enum CountSlot : int { kPendingCount = 0, kActiveCount = 1, kNumCounts = 2 };

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

// The per-sample vectors the residual/status op updates, as raw pointers.
template <typename scalar_t>
struct StatusVectors {
  scalar_t* best_abs;
  scalar_t* best_rel;
  scalar_t* res_abs;
  scalar_t* res_rel;
  int64_t* status;
  int64_t* nstep;
  int64_t* nfev;
  int64_t* stall;
};

// Applies the update of active sample b, given the squared norms of its g and f(z); returns
// whether the new iterate is its best so far (the caller then copies z into z_best).
template <typename scalar_t>
DEQ_HD bool write_back_status(const StatusVectors<scalar_t>& v, int64_t b, double sq_g,
                              double sq_fz, const StatusParams& p) {
  const double best = static_cast<double>(p.use_rel ? v.best_rel[b] : v.best_abs[b]);
  const StatusUpdate r = update_status(sq_g, sq_fz, best, v.stall[b], p);
  v.res_abs[b] = static_cast<scalar_t>(r.res_abs);
  v.res_rel[b] = static_cast<scalar_t>(r.res_rel);
  v.stall[b] = r.stall;
  v.nfev[b] += 1;
  if (p.count_step) v.nstep[b] += 1;
  if (r.improved) {
    v.best_abs[b] = static_cast<scalar_t>(r.res_abs);
    v.best_rel[b] = static_cast<scalar_t>(r.res_rel);
  }
  v.status[b] = r.status;
  return r.improved;
}

// Whether sample b still holds the loop up after the update: it is active and, under batch-wide
// stopping (freeze_converged false, where converged samples stay active), not yet below tol.
template <typename scalar_t>
DEQ_HD bool is_pending(int64_t status, scalar_t res_abs, scalar_t res_rel, const StatusParams& p) {
  if (status != kActive) return false;
  if (p.freeze_converged) return true;
  const double obj = static_cast<double>(p.use_rel ? res_rel : res_abs);
  return !(obj < p.tol);
}

}  // namespace deq_ext
