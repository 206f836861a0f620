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
  m.def("build_info", &deq_ext::build_info, "What was compiled: CPU, CUDA, architectures.");
}
