// pybind11 bindings: argument checks, then dispatch to the CPU or CUDA code.
// Kept thin on purpose: every op's semantics are documented on its pure-PyTorch
// twin in deq_ext/reference.py.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "ops.h"

namespace deq_ext {
namespace {

void check_same_device(const std::vector<std::pair<const char*, const at::Tensor*>>& ts) {
  const auto& first = *ts.front().second;
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(t->device() == first.device(), "deq_ext: '", name, "' is on ", t->device(),
                " but '", ts.front().first, "' is on ", first.device());
    TORCH_CHECK(t->is_contiguous(), "deq_ext: '", name, "' must be contiguous");
  }
}

void check_state(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "deq_ext: '", name, "' has dtype ",
              t.scalar_type(), ", expected the state dtype ", like.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), "deq_ext: '", name, "' has shape ", t.sizes(),
              ", expected ", like.sizes());
}

void check_per_sample(const char* name, const at::Tensor& t, int64_t B, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "deq_ext: '", name, "' must have shape (", B,
              ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "deq_ext: '", name, "' must be ", dtype, ", got ",
              t.scalar_type());
}

void check_state_dtype(const at::Tensor& z) {
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
              "deq_ext: the solver state must be float32 or float64, got ", z.scalar_type());
  TORCH_CHECK(z.dim() == 2, "deq_ext: the solver state must be (B, D), got ", z.sizes());
}

void residual_status_(const at::Tensor& fz, const at::Tensor& z, const at::Tensor& g,
                      const at::Tensor& dg, const at::Tensor& z_best, const at::Tensor& best_abs,
                      const at::Tensor& best_rel, const at::Tensor& res_abs,
                      const at::Tensor& res_rel, const at::Tensor& status,
                      const at::Tensor& nstep, const at::Tensor& nfev, const at::Tensor& stall,
                      double tol, bool use_rel, int64_t stall_patience, double diverge_ratio,
                      bool count_step, bool freeze_converged) {
  check_same_device({{"fz", &fz}, {"z", &z}, {"g", &g}, {"dg", &dg}, {"z_best", &z_best},
                     {"best_abs", &best_abs}, {"best_rel", &best_rel}, {"res_abs", &res_abs},
                     {"res_rel", &res_rel}, {"status", &status}, {"nstep", &nstep},
                     {"nfev", &nfev}, {"stall", &stall}});
  check_state_dtype(z);
  TORCH_CHECK(at::isFloatingType(fz.scalar_type()), "deq_ext: 'fz' must be floating point, got ",
              fz.scalar_type());
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
  TORCH_CHECK(diverge_ratio > 0, "deq_ext: diverge_ratio must be positive, got ", diverge_ratio);

  const ResidualArgs t{fz,      z,       g,      dg,   z_best, best_abs, best_rel,
                       res_abs, res_rel, status, nstep, nfev,  stall};
  const StatusParams p{tol, use_rel, stall_patience, diverge_ratio, count_step, freeze_converged};
  if (B == 0 || z.size(1) == 0) return;
  if (z.is_cuda()) {
#ifdef DEQ_EXT_WITH_CUDA
    residual_status_cuda(t, p);
#else
    TORCH_CHECK(false, "deq_ext was built without CUDA kernels (deq_ext.build_info())");
#endif
  } else {
    residual_status_cpu(t, p);
  }
}

HistoryArgs check_history(const at::Tensor& U, const at::Tensor& V, const at::Tensor& dz,
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
  TORCH_CHECK(U.scalar_type() == dz.scalar_type(), "deq_ext: 'U' has dtype ", U.scalar_type(),
              ", expected ", dz.scalar_type());
  const int64_t B = U.size(0), m = U.size(1);
  TORCH_CHECK(proj.scalar_type() == U.scalar_type() && proj.dim() == 3 && proj.size(0) == B &&
                  proj.size(1) == 3 && proj.size(2) == m,
              "deq_ext: 'proj' must be (", B, ", 3, ", m, ") of the state dtype, got ",
              proj.sizes(), " ", proj.scalar_type());
  TORCH_CHECK(scal.scalar_type() == U.scalar_type() && scal.dim() == 2 && scal.size(0) == B &&
                  scal.size(1) == kNumScalars,
              "deq_ext: 'scal' must be (", B, ", ", static_cast<int>(kNumScalars),
              ") of the state dtype, got ", scal.sizes(), " ", scal.scalar_type());
  check_per_sample("status", status, B, at::kLong);
  check_per_sample("npairs", npairs, B, at::kLong);
  return HistoryArgs{U, V, dz, dg, g, z, proj, scal, status, npairs};
}

void broyden_reduce(const at::Tensor& U, const at::Tensor& V, const at::Tensor& dz,
                    const at::Tensor& dg, const at::Tensor& g, const at::Tensor& status,
                    const at::Tensor& npairs, const at::Tensor& proj, const at::Tensor& scal) {
  const HistoryArgs t = check_history(U, V, dz, dg, g, g, proj, scal, status, npairs);
  if (U.size(0) == 0 || U.size(2) == 0) return;
  if (U.is_cuda()) {
#ifdef DEQ_EXT_WITH_CUDA
    broyden_reduce_cuda(t);
#else
    TORCH_CHECK(false, "deq_ext was built without CUDA kernels (deq_ext.build_info())");
#endif
  } else {
    broyden_reduce_cpu(t);
  }
}

void broyden_expand_(const at::Tensor& U, const at::Tensor& V, const at::Tensor& dz,
                     const at::Tensor& dg, const at::Tensor& g, const at::Tensor& z,
                     const at::Tensor& proj, const at::Tensor& scal, const at::Tensor& status,
                     const at::Tensor& npairs) {
  const HistoryArgs t = check_history(U, V, dz, dg, g, z, proj, scal, status, npairs);
  if (U.size(0) == 0 || U.size(2) == 0) return;
  if (U.is_cuda()) {
#ifdef DEQ_EXT_WITH_CUDA
    broyden_expand_cuda(t);
#else
    TORCH_CHECK(false, "deq_ext was built without CUDA kernels (deq_ext.build_info())");
#endif
  } else {
    broyden_expand_cpu(t);
  }
}

void fixed_point_step_(const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                       double tau) {
  check_same_device({{"z", &z}, {"g", &g}, {"status", &status}});
  check_state_dtype(z);
  check_state("g", g, z);
  check_per_sample("status", status, z.size(0), at::kLong);
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "deq_ext: tau must be positive and finite, got ", tau);
  if (z.size(0) == 0 || z.size(1) == 0) return;
  if (z.is_cuda()) {
#ifdef DEQ_EXT_WITH_CUDA
    fixed_point_step_cuda(z, g, status, tau);
#else
    TORCH_CHECK(false, "deq_ext was built without CUDA kernels (deq_ext.build_info())");
#endif
  } else {
    fixed_point_step_cpu(z, g, status, tau);
  }
}

// Checks the history shared by both Anderson ops; z and g are (B, D) state.
void check_anderson(const at::Tensor& X, const at::Tensor& G, const at::Tensor& gram,
                    const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                    const at::Tensor& nhist) {
  check_same_device({{"X", &X}, {"G", &G}, {"gram", &gram}, {"z", &z}, {"g", &g},
                     {"status", &status}, {"nhist", &nhist}});
  check_state_dtype(z);
  check_state("g", g, z);
  TORCH_CHECK(X.dim() == 3 && X.size(0) == z.size(0) && X.size(2) == z.size(1) && X.size(1) >= 1,
              "deq_ext: 'X' must have shape (B, m, D) = (", z.size(0), ", m >= 1, ", z.size(1),
              "), got ", X.sizes());
  TORCH_CHECK(X.scalar_type() == z.scalar_type(), "deq_ext: 'X' has dtype ", X.scalar_type(),
              ", expected ", z.scalar_type());
  check_state("G", G, X);
  const int64_t B = X.size(0), m = X.size(1);
  TORCH_CHECK(gram.scalar_type() == z.scalar_type() && gram.dim() == 3 && gram.size(0) == B &&
                  gram.size(1) == m && gram.size(2) == m,
              "deq_ext: 'gram' must be (", B, ", ", m, ", ", m, ") of the state dtype, got ",
              gram.sizes(), " ", gram.scalar_type());
  check_per_sample("status", status, B, at::kLong);
  check_per_sample("nhist", nhist, B, at::kLong);
}

void anderson_store_(const at::Tensor& X, const at::Tensor& G, const at::Tensor& gram,
                     const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                     const at::Tensor& nhist) {
  check_anderson(X, G, gram, z, g, status, nhist);
  const AndersonArgs t{X, G, gram, z, g, at::Tensor(), at::Tensor(), status, nhist};
  if (X.size(0) == 0 || X.size(2) == 0) return;
  if (X.is_cuda()) {
#ifdef DEQ_EXT_WITH_CUDA
    anderson_store_cuda(t);
#else
    TORCH_CHECK(false, "deq_ext was built without CUDA kernels (deq_ext.build_info())");
#endif
  } else {
    anderson_store_cpu(t);
  }
}

void anderson_mix_(const at::Tensor& X, const at::Tensor& G, const at::Tensor& gram,
                   const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& fallback,
                   const at::Tensor& status, const at::Tensor& nhist, double beta, double lam) {
  check_anderson(X, G, gram, z, z, status, nhist);
  check_same_device({{"z", &z}, {"alpha", &alpha}, {"fallback", &fallback}});
  const int64_t B = X.size(0), m = X.size(1);
  TORCH_CHECK(alpha.scalar_type() == z.scalar_type() && alpha.dim() == 2 && alpha.size(0) == B &&
                  alpha.size(1) == m,
              "deq_ext: 'alpha' must be (", B, ", ", m, ") of the state dtype, got ",
              alpha.sizes(), " ", alpha.scalar_type());
  check_per_sample("fallback", fallback, B, at::kLong);
  const AndersonArgs t{X, G, gram, z, at::Tensor(), alpha, fallback, status, nhist};
  TORCH_CHECK(std::isfinite(beta) && beta > 0, "deq_ext: beta must be positive and finite, got ",
              beta);
  TORCH_CHECK(std::isfinite(lam) && lam >= 0, "deq_ext: lam must be >= 0 and finite, got ", lam);
  if (X.size(0) == 0 || X.size(2) == 0) return;
  if (X.is_cuda()) {
#ifdef DEQ_EXT_WITH_CUDA
    anderson_mix_cuda(t, beta, lam);
#else
    TORCH_CHECK(false, "deq_ext was built without CUDA kernels (deq_ext.build_info())");
#endif
  } else {
    anderson_mix_cpu(t, beta, lam);
  }
}

#define DEQ_EXT_STR2(x) #x
#define DEQ_EXT_STR(x) DEQ_EXT_STR2(x)

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef DEQ_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(DEQ_EXT_STR(DEQ_EXT_CUDA_ARCHS));
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
  info["torch_version"] = std::string(DEQ_EXT_STR(DEQ_EXT_TORCH_VERSION));
#ifdef _OPENMP
  info["openmp"] = true;  // at::parallel_for in the CPU kernels uses torch's threads
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace
}  // namespace deq_ext

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "deq_ext compiled ops (see deq_ext/reference.py for their semantics)";
  m.def("residual_status_", &deq_ext::residual_status_, "fz"_a, "z"_a, "g"_a, "dg"_a,
        "z_best"_a, "best_abs"_a, "best_rel"_a, "res_abs"_a, "res_rel"_a, "status"_a, "nstep"_a,
        "nfev"_a, "stall"_a, "tol"_a, "use_rel"_a, "stall_patience"_a, "diverge_ratio"_a,
        "count_step"_a, "freeze_converged"_a,
        "Residual, norms, lowest-residual tracking and status update (in place).");
  m.def("broyden_reduce", &deq_ext::broyden_reduce, "U"_a, "V"_a, "dz"_a, "dg"_a, "g"_a,
        "status"_a, "npairs"_a, "proj"_a, "scal"_a,
        "Fused reduction pass over the history; writes proj and scal.");
  m.def("broyden_expand_", &deq_ext::broyden_expand_, "U"_a, "V"_a, "dz"_a, "dg"_a, "g"_a,
        "z"_a, "proj"_a, "scal"_a, "status"_a, "npairs"_a,
        "Fused expansion pass: store the new pair, form the next step, move z (in place).");
  m.def("fixed_point_step_", &deq_ext::fixed_point_step_, "z"_a, "g"_a, "status"_a, "tau"_a,
        "Damped fixed-point step z += tau * g (in place).");
  m.def("anderson_store_", &deq_ext::anderson_store_, "X"_a, "G"_a, "gram"_a, "z"_a, "g"_a,
        "status"_a, "nhist"_a,
        "Store the newest iterate and residual and their Gram row (in place).");
  m.def("anderson_mix_", &deq_ext::anderson_mix_, "X"_a, "G"_a, "gram"_a, "z"_a, "alpha"_a,
        "fallback"_a, "status"_a, "nhist"_a, "beta"_a, "lam"_a,
        "Anderson weights per sample, then z = sum_i alpha_i (X_i + beta G_i) (in place).");
  m.def("build_info", &deq_ext::build_info, "What was compiled: CPU, CUDA, architectures.");
}
