// The argument checks of every op, then the call into one device's kernels.
//
// CheckedOps<Kernels> holds one entry point per op; Kernels says whose kernels run
// (CpuKernels, or CudaKernels: the nvcc build, or the emulated module). Kept thin on
// purpose: every op's semantics are documented on its pure-PyTorch twin in
// deq_ext/reference.py, and the schemas are in op_schemas.h.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <utility>
#include <vector>

#include "ops.h"

namespace deq_ext {

struct CpuKernels {
  static void residual_status(const ResidualArgs& t, const StatusParams& p) {
    residual_status_cpu(t, p);
  }
  static void reduce(const HistoryArgs& t) { broyden_reduce_cpu(t); }
  static void expand(const HistoryArgs& t) { broyden_expand_cpu(t); }
  static void fixed_point(const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                          double tau) {
    fixed_point_step_cpu(z, g, status, tau);
  }
  static void store(const AndersonArgs& t) { anderson_store_cpu(t); }
  static void mix(const AndersonArgs& t, double beta, double lam) { anderson_mix_cpu(t, beta, lam); }
};

struct CudaKernels {
  static void residual_status(const ResidualArgs& t, const StatusParams& p) {
    residual_status_cuda(t, p);
  }
  static void reduce(const HistoryArgs& t) { broyden_reduce_cuda(t); }
  static void expand(const HistoryArgs& t) { broyden_expand_cuda(t); }
  static void fixed_point(const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                          double tau) {
    fixed_point_step_cuda(z, g, status, tau);
  }
  static void store(const AndersonArgs& t) { anderson_store_cuda(t); }
  static void mix(const AndersonArgs& t, double beta, double lam) {
    anderson_mix_cuda(t, beta, lam);
  }
};

namespace checks {

using Named = std::vector<std::pair<const char*, const at::Tensor*>>;

inline void check_same_device(const Named& ts) {
  const auto& first = *ts.front().second;
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(t->device() == first.device(), "deq_ext: '", name, "' is on ", t->device(),
                " but '", ts.front().first, "' is on ", first.device());
    TORCH_CHECK(t->is_contiguous(), "deq_ext: '", name, "' must be contiguous");
  }
}

inline void check_state(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "deq_ext: '", name, "' has dtype ",
              t.scalar_type(), ", expected the state dtype ", like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "deq_ext: '", name, "' has shape ", t.sizes(),
              ", expected ", like.sizes());
}

inline void check_per_sample(const char* name, const at::Tensor& t, int64_t B,
                             at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "deq_ext: '", name, "' must have shape (", B,
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "deq_ext: '", name, "' must be ", dtype, ", got ",
              t.scalar_type());
}

inline void check_state_dtype(const at::Tensor& z) {
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "deq_ext: the solver state must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(z.dim() == 2, "deq_ext: the solver state must be (B, D), got ", z.sizes());
}

inline HistoryArgs check_history(const at::Tensor& U, const at::Tensor& V, const at::Tensor& dz,
                                 const at::Tensor& dg, const at::Tensor& g, const at::Tensor& z,
                                 const at::Tensor& proj, const at::Tensor& scal,
                                 const at::Tensor& status, const at::Tensor& npairs) {
  check_same_device({{"U", &U}, {"V", &V}, {"dz", &dz}, {"dg", &dg}, {"g", &g}, {"z", &z},
                     {"proj", &proj}, {"scal", &scal}, {"status", &status},
                     {"npairs", &npairs}});
  check_state_dtype(dz);
  TORCH_CHECK(U.dim() == 3 && U.size(0) == dz.size(0) && U.size(2) == dz.size(1) && U.size(1) >= 1,
              "deq_ext: 'U' must have shape (B, m, D) = (", dz.size(0), ", m >= 1, ", dz.size(1),
              "), got ", U.sizes());
  check_state("V", V, U);
  check_state("dg", dg, dz);
  check_state("g", g, dz);
  check_state("z", z, dz);
  // The history may be stored narrower than the state (see dispatch_history in ops.h).
  TORCH_CHECK(U.scalar_type() == dz.scalar_type() || U.scalar_type() == at::kHalf ||
                  U.scalar_type() == at::kBFloat16,
              "deq_ext: 'U' has dtype ", U.scalar_type(), ", expected ", dz.scalar_type(),
              " (the state dtype), float16 or bfloat16");
  const int64_t B = U.size(0), m = U.size(1);
  TORCH_CHECK(proj.scalar_type() == dz.scalar_type() && proj.dim() == 3 && proj.size(0) == B &&
                  proj.size(1) == 3 && proj.size(2) == m,
              "deq_ext: 'proj' must be (", B, ", 3, ", m, ") of the state dtype, got ",
              proj.sizes(), " ", proj.scalar_type());
  TORCH_CHECK(scal.scalar_type() == dz.scalar_type() && scal.dim() == 2 && scal.size(0) == B &&
                  scal.size(1) == kNumScalars,
              "deq_ext: 'scal' must be (", B, ", ", static_cast<int>(kNumScalars),
              ") of the state dtype, got ", scal.sizes(), " ", scal.scalar_type());
  check_per_sample("status", status, B, at::kLong);
  check_per_sample("npairs", npairs, B, at::kLong);
  return HistoryArgs{U, V, dz, dg, g, z, proj, scal, status, npairs};
}

// Checks the history shared by both Anderson ops; z and g are (B, D) state.
inline void check_anderson(const at::Tensor& X, const at::Tensor& G, const at::Tensor& gram,
                           const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                           const at::Tensor& nhist) {
  check_same_device({{"X", &X}, {"G", &G}, {"gram", &gram}, {"z", &z}, {"g", &g},
                     {"status", &status}, {"nhist", &nhist}});
  check_state_dtype(z);
  check_state("g", g, z);
  TORCH_CHECK(X.dim() == 3 && X.size(0) == z.size(0) && X.size(2) == z.size(1) && X.size(1) >= 1,
              "deq_ext: 'X' must have shape (B, m, D) = (", z.size(0), ", m >= 1, ", z.size(1),
              "), got ", X.sizes());
  TORCH_CHECK(X.scalar_type() == z.scalar_type() || X.scalar_type() == at::kHalf ||
                  X.scalar_type() == at::kBFloat16,
              "deq_ext: 'X' has dtype ", X.scalar_type(), ", expected ", z.scalar_type(),
              " (the state dtype), float16 or bfloat16");
  check_state("G", G, X);
  const int64_t B = X.size(0), m = X.size(1);
  TORCH_CHECK(gram.scalar_type() == z.scalar_type() && gram.dim() == 3 && gram.size(0) == B &&
                  gram.size(1) == m && gram.size(2) == m,
              "deq_ext: 'gram' must be (", B, ", ", m, ", ", m, ") of the state dtype, got ",
              gram.sizes(), " ", gram.scalar_type());
  check_per_sample("status", status, B, at::kLong);
  check_per_sample("nhist", nhist, B, at::kLong);
}

}  // namespace checks

template <class Kernels>
struct CheckedOps {
  static void residual_status_(const at::Tensor& fz, const at::Tensor& z, const at::Tensor& g,
                               const at::Tensor& dg, const at::Tensor& z_best,
                               const at::Tensor& best_abs, const at::Tensor& best_rel,
                               const at::Tensor& res_abs, const at::Tensor& res_rel,
                               const at::Tensor& status, const at::Tensor& nstep,
                               const at::Tensor& nfev, const at::Tensor& stall, double tol,
                               bool use_rel, int64_t stall_patience, double diverge_ratio,
                               bool count_step, bool freeze_converged) {
    using namespace checks;
    check_same_device({{"fz", &fz}, {"z", &z}, {"g", &g}, {"dg", &dg}, {"z_best", &z_best},
                       {"best_abs", &best_abs}, {"best_rel", &best_rel}, {"res_abs", &res_abs},
                       {"res_rel", &res_rel}, {"status", &status}, {"nstep", &nstep},
                       {"nfev", &nfev}, {"stall", &stall}});
    check_state_dtype(z);
    TORCH_CHECK(at::isFloatingType(fz.scalar_type()),
                "deq_ext: 'fz' must be floating point, got ", fz.scalar_type());
    TORCH_CHECK(fz.sizes() == z.sizes(), "deq_ext: 'fz' has shape ", fz.sizes(), ", expected ",
                z.sizes());
    check_state("g", g, z);
    check_state("dg", dg, z);
    check_state("z_best", z_best, z);
    const int64_t B = z.size(0);
    for (auto [name, t] : {std::pair{"best_abs", &best_abs}, {"best_rel", &best_rel},
                           {"res_abs", &res_abs}, {"res_rel", &res_rel}})
      check_per_sample(name, *t, B, z.scalar_type());
    for (auto [name, t] :
         {std::pair{"status", &status}, {"nstep", &nstep}, {"nfev", &nfev}, {"stall", &stall}})
      check_per_sample(name, *t, B, at::kLong);
    TORCH_CHECK(tol > 0 && std::isfinite(tol), "deq_ext: tol must be positive and finite, got ",
                tol);
    TORCH_CHECK(diverge_ratio > 0, "deq_ext: diverge_ratio must be positive, got ",
                diverge_ratio);
    if (B == 0 || z.size(1) == 0) return;
    Kernels::residual_status(
        ResidualArgs{fz, z, g, dg, z_best, best_abs, best_rel, res_abs, res_rel, status, nstep,
                     nfev, stall},
        StatusParams{tol, use_rel, stall_patience, diverge_ratio, count_step, freeze_converged});
  }

  static void broyden_reduce(const at::Tensor& U, const at::Tensor& V, const at::Tensor& dz,
                             const at::Tensor& dg, const at::Tensor& g, const at::Tensor& status,
                             const at::Tensor& npairs, const at::Tensor& proj,
                             const at::Tensor& scal) {
    const HistoryArgs t = checks::check_history(U, V, dz, dg, g, g, proj, scal, status, npairs);
    if (U.size(0) == 0 || U.size(2) == 0) return;
    Kernels::reduce(t);
  }

  static void broyden_expand_(const at::Tensor& U, const at::Tensor& V, const at::Tensor& dz,
                              const at::Tensor& dg, const at::Tensor& g, const at::Tensor& z,
                              const at::Tensor& proj, const at::Tensor& scal,
                              const at::Tensor& status, const at::Tensor& npairs) {
    const HistoryArgs t = checks::check_history(U, V, dz, dg, g, z, proj, scal, status, npairs);
    if (U.size(0) == 0 || U.size(2) == 0) return;
    Kernels::expand(t);
  }

  static void fixed_point_step_(const at::Tensor& z, const at::Tensor& g,
                                const at::Tensor& status, double tau) {
    using namespace checks;
    check_same_device({{"z", &z}, {"g", &g}, {"status", &status}});
    check_state_dtype(z);
    check_state("g", g, z);
    check_per_sample("status", status, z.size(0), at::kLong);
    TORCH_CHECK(std::isfinite(tau) && tau > 0, "deq_ext: tau must be positive and finite, got ",
                tau);
    if (z.size(0) == 0 || z.size(1) == 0) return;
    Kernels::fixed_point(z, g, status, tau);
  }

  static void anderson_store_(const at::Tensor& X, const at::Tensor& G, const at::Tensor& gram,
                              const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                              const at::Tensor& nhist) {
    checks::check_anderson(X, G, gram, z, g, status, nhist);
    if (X.size(0) == 0 || X.size(2) == 0) return;
    Kernels::store(AndersonArgs{X, G, gram, z, g, at::Tensor(), at::Tensor(), status, nhist});
  }

  static void anderson_mix_(const at::Tensor& X, const at::Tensor& G, const at::Tensor& gram,
                            const at::Tensor& z, const at::Tensor& alpha,
                            const at::Tensor& fallback, const at::Tensor& status,
                            const at::Tensor& nhist, double beta, double lam) {
    using namespace checks;
    check_anderson(X, G, gram, z, z, status, nhist);
    check_same_device({{"z", &z}, {"alpha", &alpha}, {"fallback", &fallback}});
    const int64_t B = X.size(0), m = X.size(1);
    TORCH_CHECK(alpha.scalar_type() == z.scalar_type() && alpha.dim() == 2 &&
                    alpha.size(0) == B && alpha.size(1) == m,
                "deq_ext: 'alpha' must be (", B, ", ", m, ") of the state dtype, got ",
                alpha.sizes(), " ", alpha.scalar_type());
    check_per_sample("fallback", fallback, B, at::kLong);
    TORCH_CHECK(std::isfinite(beta) && beta > 0,
                "deq_ext: beta must be positive and finite, got ", beta);
    TORCH_CHECK(std::isfinite(lam) && lam >= 0, "deq_ext: lam must be >= 0 and finite, got ",
                lam);
    if (X.size(0) == 0 || X.size(2) == 0) return;
    Kernels::mix(AndersonArgs{X, G, gram, z, at::Tensor(), alpha, fallback, status, nhist}, beta,
                 lam);
  }
};

}  // namespace deq_ext
