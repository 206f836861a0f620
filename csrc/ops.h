// Declarations of the device-specific implementations behind the dispatcher ops.
// Argument checking happens once, in op_checks.h, before these are called.
#pragma once

#include <torch/extension.h>

#include <vector>

#include "common/anderson_math.h"
#include "common/broyden_math.h"
#include "common/history.h"
#include "common/status.h"

namespace deq_ext {

// Tensors of the residual/status op, grouped so the signatures stay readable. counts (2,)
// receives the pending and active counts after the update; partials and tickets are the
// CUDA kernels' persistent scratch (float64 partial sums, int32 block counters that every
// launch leaves at zero), unused by the CPU kernels.
struct ResidualArgs {
  at::Tensor fz, z, g, dg, z_best, best_abs, best_rel, res_abs, res_rel;
  at::Tensor status, nstep, nfev, stall, counts, partials, tickets;
};

// Broyden's history: U and V as lists of (B, C, D) chunks (common/history.h), ring length m.
struct HistoryArgs {
  std::vector<at::Tensor> U, V;
  at::Tensor dz, dg, g, z, proj, scal, status, npairs, partials, tickets;
  int64_t m;
  bool restart = false;  // a full ring starts over (live_pairs)
};

// Anderson's history: iterates X and residuals G as chunk lists, ring length m, their Gram
// matrix gram (B, m, m), mixing weights alpha (B, m), per-sample counters. The store op
// leaves nothing undefined; the mix op only reads X, G, alpha, status and nhist.
struct AndersonArgs {
  std::vector<at::Tensor> X, G;
  at::Tensor gram, z, g, alpha, fallback, status, nhist, partials, tickets;
  int64_t m;
};

// The chunk table of a history list, for kernels (T may be const-qualified).
template <typename T>
HistoryChunks<T> chunks_of(const std::vector<at::Tensor>& list) {
  HistoryChunks<T> h{};
  h.n_chunks = static_cast<int64_t>(list.size());
  h.C = list.front().size(1);
  h.last_C = list.back().size(1);
  h.D = list.front().size(2);
  for (size_t i = 0; i < list.size(); ++i)
    h.chunk[i] = list[i].data_ptr<std::remove_const_t<T>>();
  return h;
}

// The history is stored in the state dtype or, to halve the bytes the bandwidth-bound passes
// move, in float16 / bfloat16; the passes accumulate in double either way. Calls
// fn(HistoryType<hist_t>{}) for the history dtype of a state_t solve (op_checks.h has already
// rejected any other combination).
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
                  "deq_ext: unsupported history dtype ", history);
      fn(HistoryType<state_t>{});
  }
}

// Which clones of the CPU loops run here: "avx2" (AVX2 + FMA) or "baseline".
const char* cpu_kernel_isa();

void residual_status_cpu(const ResidualArgs& t, const StatusParams& p);
void broyden_reduce_cpu(const HistoryArgs& t);
void broyden_expand_cpu(const HistoryArgs& t);
void fixed_point_step_cpu(const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                          double tau);
void anderson_store_cpu(const AndersonArgs& t, double lam);
void anderson_mix_cpu(const AndersonArgs& t, double beta);

// Defined by csrc/cuda/*.cu: compiled by nvcc for the CUDA build, or as host C++
// for the emulated module (csrc/emu).
void residual_status_cuda(const ResidualArgs& t, const StatusParams& p);
void broyden_reduce_cuda(const HistoryArgs& t);
void broyden_expand_cuda(const HistoryArgs& t);
void fixed_point_step_cuda(const at::Tensor& z, const at::Tensor& g, const at::Tensor& status,
                           double tau);
void anderson_store_cuda(const AndersonArgs& t, double lam);
void anderson_mix_cuda(const AndersonArgs& t, double beta);

}  // namespace deq_ext
