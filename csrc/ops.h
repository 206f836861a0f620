// Declarations of the device-specific implementations behind the dispatcher ops.
// Argument checking happens once, in op_checks.h, before these are called.
#pragma once

#include <torch/extension.h>

#include "common/broyden_math.h"

namespace deq_ext {

// Tensors of the residual/status op, grouped so the signatures stay readable.
struct ResidualArgs {
  at::Tensor fz, z, g, dg, z_best, best_abs, best_rel, res_abs, res_rel;
  at::Tensor status, nstep, nfev, stall;
};

struct HistoryArgs {
  at::Tensor U, V, dz, dg, g, z, proj, scal, status, npairs;
};

// The Broyden history (U, V) is stored in the state dtype or, to halve the bytes the
// bandwidth-bound passes move, in float16 / bfloat16; the passes accumulate in double
// either way. Calls fn(HistoryType<hist_t>{}) for the history dtype of a state_t solve
// (op_checks.h has already rejected any other combination).
template <typename T>
struct HistoryType {
  using type = T;
};

template <typename state_t, typename Fn>
void dispatch_history(at::ScalarType history, const Fn& fn) {
  switch (history) {
    case at::kHalf:
      fn(HistoryType<at::Half>{});
      return;
    case at::kBFloat16:
      fn(HistoryType<at::BFloat16>{});
      return;
    default:
      TORCH_CHECK(history == c10::CppTypeToScalarType<state_t>::value,
                  "deq_ext: unsupported Broyden history dtype ", history);
      fn(HistoryType<state_t>{});
  }
}

// Anderson history: iterates X and residuals G (B, m, D), their Gram matrix
// gram (B, m, m), mixing weights alpha (B, m), per-sample counters. The store
// op leaves alpha and fallback undefined; the mix op leaves g undefined.
struct AndersonArgs {
  at::Tensor X, G, gram, z, g, alpha, fallback, status, nhist;
};

// Which clones of the CPU loops run here: "avx2" (AVX2 + FMA) or "baseline".
const char* cpu_kernel_isa();

void residual_status_cpu(const ResidualArgs& t, const StatusParams& p);
void broyden_reduce_cpu(const HistoryArgs& t);
void broyden_expand_cpu(const HistoryArgs& t);
void fixed_point_step_cpu(const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                          double tau);
void anderson_store_cpu(const AndersonArgs& t);
void anderson_mix_cpu(const AndersonArgs& t, double beta, double lam);

// Defined by csrc/cuda/*.cu: compiled by nvcc for the CUDA build, or as host C++
// for the emulated module (csrc/emu).
void residual_status_cuda(const ResidualArgs& t, const StatusParams& p);
void broyden_reduce_cuda(const HistoryArgs& t);
void broyden_expand_cuda(const HistoryArgs& t);
void fixed_point_step_cuda(const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                           double tau);
void anderson_store_cuda(const AndersonArgs& t);
void anderson_mix_cuda(const AndersonArgs& t, double beta, double lam);

}  // namespace deq_ext
