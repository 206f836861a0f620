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
  static void store(const AndersonArgs& t, double lam) { anderson_store_cpu(t, lam); }
  static void mix(const AndersonArgs& t, double beta) { anderson_mix_cpu(t, beta); }
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
  static void store(const AndersonArgs& t, double lam) { anderson_store_cuda(t, lam); }
  static void mix(const AndersonArgs& t, double beta) { anderson_mix_cuda(t, beta); }
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

// The CUDA kernels' scratch: a flat float64 buffer of partial sums (undefined for an op that
// needs none) and int32 block counters. Their sizes are checked by the CUDA host code, which
// knows its chunking.
inline void check_scratch(const at::Tensor& partials, const at::Tensor& tickets,
                          const at::Tensor& like) {
  check_same_device({{"tickets", &tickets}, {"state", &like}});
  if (partials.defined()) {
    check_same_device({{"partials", &partials}, {"state", &like}});
    TORCH_CHECK(partials.dim() == 1 && partials.scalar_type() == at::kDouble,
                "deq_ext: 'partials' must be a 1-d float64 tensor, got ", partials.sizes(), " ",
                partials.scalar_type());
  }
  TORCH_CHECK(tickets.dim() == 1 && tickets.scalar_type() == at::kInt,
              "deq_ext: 'tickets' must be a 1-d int32 tensor, got ", tickets.sizes(), " ",
              tickets.scalar_type());
}

// A history list: 1..kMaxHistoryChunks contiguous (B, C, D) chunks of one dtype, on the state's
// device. Returns the list as a vector.
inline std::vector<at::Tensor> check_chunks(const char* name, at::TensorList list,
                                            const at::Tensor& state) {
  TORCH_CHECK(!list.empty() && list.size() <= static_cast<size_t>(kMaxHistoryChunks),
              "deq_ext: '", name, "' must be a list of 1 to ", kMaxHistoryChunks,
              " history chunks, got ", list.size());
  const at::Tensor& first = list.front();
  const int64_t B = state.size(0), D = state.size(1);
  TORCH_CHECK(first.dim() == 3 && first.size(0) == B && first.size(1) >= 1 && first.size(2) == D,
              "deq_ext: every chunk of '", name, "' must have shape (B, C, D) = (", B,
              ", C >= 1, ", D, "), got ", first.sizes());
  TORCH_CHECK(first.scalar_type() == state.scalar_type() || first.scalar_type() == at::kHalf ||
                  first.scalar_type() == at::kBFloat16,
              "deq_ext: '", name, "' has dtype ", first.scalar_type(), ", expected ",
              state.scalar_type(), " (the state dtype), float16 or bfloat16");
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& c = list[i];
    // Every chunk has C slots but the last, which may have fewer (a ring of exactly m).
    const bool last = i + 1 == list.size();
    TORCH_CHECK(c.dim() == 3 && c.size(0) == B && c.size(2) == D && c.size(1) >= 1 &&
                    (last ? c.size(1) <= first.size(1) : c.size(1) == first.size(1)) &&
                    c.scalar_type() == first.scalar_type(),
                "deq_ext: the chunks of '", name, "' must be (B, C, D) of one dtype, the last "
                "one with at most C slots; got ", first.sizes(), " ", first.scalar_type(),
                " and ", c.sizes(), " ", c.scalar_type());
    TORCH_CHECK(c.device() == state.device(), "deq_ext: '", name, "' is on ", c.device(),
                " but the state is on ", state.device());
    TORCH_CHECK(c.is_contiguous(), "deq_ext: the chunks of '", name, "' must be contiguous");
  }
  return list.vec();
}

inline void check_ring_length(int64_t m) {
  TORCH_CHECK(m >= 1, "deq_ext: the ring length m must be >= 1, got ", m);
}

// Every active sample's live slots (the first `live(count)` of the ring) must be allocated.
// Read where the counters live on the host (CPU kernels, the emulation); on a GPU the solver
// guarantees it and the kernels never index past the allocated chunks.
template <typename Live>
inline void check_capacity(const char* what, const at::Tensor& count, const at::Tensor& status,
                           int64_t capacity, const Live& live) {
  if (!count.is_cpu()) return;
  const int64_t* n = count.data_ptr<int64_t>();
  const int64_t* s = status.data_ptr<int64_t>();
  for (int64_t b = 0; b < count.size(0); ++b)
    TORCH_CHECK(s[b] != kActive || live(n[b]) <= capacity, "deq_ext: sample ", b, " has ", what,
                " = ", n[b], ", which needs ", live(n[b]), " history slots, but only ",
                capacity, " are allocated");
}

inline HistoryArgs check_history(at::TensorList U, at::TensorList V, const at::Tensor& dz,
                                 const at::Tensor& dg, const at::Tensor& g, const at::Tensor& z,
                                 const at::Tensor& proj, const at::Tensor& scal,
                                 const at::Tensor& status, const at::Tensor& npairs,
                                 const at::Tensor& partials, const at::Tensor& tickets,
                                 int64_t m) {
  check_same_device({{"dz", &dz}, {"dg", &dg}, {"g", &g}, {"z", &z}, {"proj", &proj},
                     {"scal", &scal}, {"status", &status}, {"npairs", &npairs}});
  check_state_dtype(dz);
  check_ring_length(m);
  std::vector<at::Tensor> u = check_chunks("U", U, dz), v = check_chunks("V", V, dz);
  TORCH_CHECK(u.size() == v.size() && u.front().sizes() == v.front().sizes() &&
                  u.back().sizes() == v.back().sizes() &&
                  u.front().scalar_type() == v.front().scalar_type(),
              "deq_ext: 'U' and 'V' must have the same chunks (number, shape, dtype)");
  check_state("dg", dg, dz);
  check_state("g", g, dz);
  check_state("z", z, dz);
  const int64_t B = dz.size(0);
  TORCH_CHECK(proj.scalar_type() == dz.scalar_type() && proj.dim() == 3 && proj.size(0) == B &&
                  proj.size(1) == 3 && proj.size(2) == m,
              "deq_ext: 'proj' must be (", B, ", 3, m=", m, ") of the state dtype, got ",
              proj.sizes(), " ", proj.scalar_type());
  TORCH_CHECK(scal.scalar_type() == dz.scalar_type() && scal.dim() == 2 && scal.size(0) == B &&
                  scal.size(1) == kNumScalars,
              "deq_ext: 'scal' must be (", B, ", ", static_cast<int>(kNumScalars),
              ") of the state dtype, got ", scal.sizes(), " ", scal.scalar_type());
  check_per_sample("status", status, B, at::kLong);
  check_per_sample("npairs", npairs, B, at::kLong);
  check_scratch(partials, tickets, dz);
  return HistoryArgs{std::move(u), std::move(v), dz, dg, g, z, proj, scal, status, npairs,
                     partials, tickets, m};
}

// Checks the history shared by both Anderson ops; z (and g, when given) are (B, D) state.
inline AndersonArgs check_anderson(at::TensorList X, at::TensorList G, const at::Tensor& z,
                                   const at::Tensor& status, const at::Tensor& nhist,
                                   const at::Tensor& alpha, int64_t m) {
  check_same_device({{"z", &z}, {"status", &status}, {"nhist", &nhist}, {"alpha", &alpha}});
  check_state_dtype(z);
  check_ring_length(m);
  std::vector<at::Tensor> x = check_chunks("X", X, z), gs = check_chunks("G", G, z);
  TORCH_CHECK(x.size() == gs.size() && x.front().sizes() == gs.front().sizes() &&
                  x.back().sizes() == gs.back().sizes() &&
                  x.front().scalar_type() == gs.front().scalar_type(),
              "deq_ext: 'X' and 'G' must have the same chunks (number, shape, dtype)");
  const int64_t B = z.size(0);
  TORCH_CHECK(alpha.scalar_type() == z.scalar_type() && alpha.dim() == 2 && alpha.size(0) == B &&
                  alpha.size(1) == m,
              "deq_ext: 'alpha' must be (", B, ", m=", m, ") of the state dtype, got ",
              alpha.sizes(), " ", alpha.scalar_type());
  check_per_sample("status", status, B, at::kLong);
  check_per_sample("nhist", nhist, B, at::kLong);
  AndersonArgs t;
  t.X = std::move(x);
  t.G = std::move(gs);
  t.z = z;
  t.alpha = alpha;
  t.status = status;
  t.nhist = nhist;
  t.m = m;
  return t;
}

inline int64_t capacity_of(const std::vector<at::Tensor>& chunks) {
  return static_cast<int64_t>(chunks.size() - 1) * chunks.front().size(1) + chunks.back().size(1);
}

}  // namespace checks

template <class Kernels>
struct CheckedOps {
  static void residual_status_(const at::Tensor& fz, const at::Tensor& z, const at::Tensor& g,
                               const at::Tensor& dg, const at::Tensor& z_best,
                               const at::Tensor& best_abs, const at::Tensor& best_rel,
                               const at::Tensor& res_abs, const at::Tensor& res_rel,
                               const at::Tensor& status, const at::Tensor& nstep,
                               const at::Tensor& nfev, const at::Tensor& stall,
                               const at::Tensor& counts, const at::Tensor& partials,
                               const at::Tensor& tickets, double tol, bool use_rel,
                               int64_t stall_patience, double diverge_ratio, bool count_step,
                               bool freeze_converged) {
    using namespace checks;
    check_same_device({{"fz", &fz}, {"z", &z}, {"g", &g}, {"dg", &dg}, {"z_best", &z_best},
                       {"best_abs", &best_abs}, {"best_rel", &best_rel}, {"res_abs", &res_abs},
                       {"res_rel", &res_rel}, {"status", &status}, {"nstep", &nstep},
                       {"nfev", &nfev}, {"stall", &stall}, {"counts", &counts}});
    check_state_dtype(z);
    TORCH_CHECK(at::isFloatingType(fz.scalar_type()),
                "deq_ext: 'fz' must be floating point, got ", fz.scalar_type());
    // Any (B, ...) shape with D values per sample: f's output is passed as it comes.
    TORCH_CHECK(fz.dim() >= 1 && fz.size(0) == z.size(0) && fz.numel() == z.numel(),
                "deq_ext: 'fz' has shape ", fz.sizes(), ", expected (", z.size(0),
                ", ...) with ", z.size(1), " values per sample");
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
    check_per_sample("counts", counts, kNumCounts, at::kLong);
    check_scratch(partials, tickets, z);
    TORCH_CHECK(tol > 0 && std::isfinite(tol), "deq_ext: tol must be positive and finite, got ",
                tol);
    TORCH_CHECK(diverge_ratio > 0, "deq_ext: diverge_ratio must be positive, got ",
                diverge_ratio);
    if (B == 0 || z.size(1) == 0) {
      counts.zero_();
      return;
    }
    Kernels::residual_status(
        ResidualArgs{fz, z, g, dg, z_best, best_abs, best_rel, res_abs, res_rel, status, nstep,
                     nfev, stall, counts, partials, tickets},
        StatusParams{tol, use_rel, stall_patience, diverge_ratio, count_step, freeze_converged});
  }

  static void broyden_reduce(at::TensorList U, at::TensorList V, const at::Tensor& dz,
                             const at::Tensor& dg, const at::Tensor& g, const at::Tensor& status,
                             const at::Tensor& npairs, const at::Tensor& proj,
                             const at::Tensor& scal, const at::Tensor& partials,
                             const at::Tensor& tickets, int64_t m, bool restart) {
    HistoryArgs t = checks::check_history(U, V, dz, dg, g, g, proj, scal, status, npairs,
                                          partials, tickets, m);
    t.restart = restart;
    checks::check_capacity("npairs", npairs, status, checks::capacity_of(t.U),
                           [m, restart](int64_t n) {
                             return stored_pairs(live_pairs(n, m, restart), m);
                           });
    if (dz.size(0) == 0 || dz.size(1) == 0) return;
    Kernels::reduce(t);
  }

  static void broyden_expand_(at::TensorList U, at::TensorList V, const at::Tensor& dz,
                              const at::Tensor& dg, const at::Tensor& g, const at::Tensor& z,
                              const at::Tensor& proj, const at::Tensor& scal,
                              const at::Tensor& status, const at::Tensor& npairs,
                              const at::Tensor& tickets, int64_t m, bool restart) {
    // expand needs no partial sums (an undefined tensor stands in for them).
    HistoryArgs t = checks::check_history(U, V, dz, dg, g, z, proj, scal, status, npairs,
                                          at::Tensor(), tickets, m);
    t.restart = restart;
    // The new pair goes into the next ring slot: it must be allocated too.
    checks::check_capacity("npairs", npairs, status, checks::capacity_of(t.U),
                           [m, restart](int64_t n) {
                             const int64_t live = live_pairs(n, m, restart);
                             return live < m ? live + 1 : m;
                           });
    if (dz.size(0) == 0 || dz.size(1) == 0) return;
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

  static void anderson_store_(at::TensorList X, at::TensorList G, const at::Tensor& gram,
                              const at::Tensor& z, const at::Tensor& g, const at::Tensor& alpha,
                              const at::Tensor& fallback, const at::Tensor& status,
                              const at::Tensor& nhist, const at::Tensor& partials,
                              const at::Tensor& tickets, int64_t m, double lam) {
    using namespace checks;
    AndersonArgs t = check_anderson(X, G, z, status, nhist, alpha, m);
    check_same_device({{"z", &z}, {"g", &g}, {"gram", &gram}, {"fallback", &fallback}});
    check_state("g", g, z);
    const int64_t B = z.size(0);
    TORCH_CHECK(gram.scalar_type() == z.scalar_type() && gram.dim() == 3 && gram.size(0) == B &&
                    gram.size(1) == m && gram.size(2) == m,
                "deq_ext: 'gram' must be (", B, ", m=", m, ", m=", m, ") of the state dtype, got ",
                gram.sizes(), " ", gram.scalar_type());
    check_per_sample("fallback", fallback, B, at::kLong);
    check_scratch(partials, tickets, z);
    TORCH_CHECK(std::isfinite(lam) && lam >= 0, "deq_ext: lam must be >= 0 and finite, got ",
                lam);
    check_capacity("nhist", nhist, status, capacity_of(t.X),
                   [m](int64_t n) { return n < m ? n + 1 : m; });
    if (B == 0 || z.size(1) == 0) return;
    t.gram = gram;
    t.g = g;
    t.fallback = fallback;
    t.partials = partials;
    t.tickets = tickets;
    Kernels::store(t, lam);
  }

  static void anderson_mix_(at::TensorList X, at::TensorList G, const at::Tensor& z,
                            const at::Tensor& alpha, const at::Tensor& status,
                            const at::Tensor& nhist, int64_t m, double beta) {
    using namespace checks;
    const AndersonArgs t = check_anderson(X, G, z, status, nhist, alpha, m);
    TORCH_CHECK(std::isfinite(beta) && beta > 0,
                "deq_ext: beta must be positive and finite, got ", beta);
    check_capacity("nhist", nhist, status, capacity_of(t.X),
                   [m](int64_t n) { return n < m ? n : m; });
    if (z.size(0) == 0 || z.size(1) == 0) return;
    Kernels::mix(t, beta);
  }
};

}  // namespace deq_ext
