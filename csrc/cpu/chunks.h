// Shared machinery of the CPU kernels: work is split into (active sample,
// fixed-size chunk of D) items run in parallel. Partial sums are taken per
// fixed chunk and combined in chunk order, so results do not depend on the
// number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "../common/status.h"

// The hot loops are compiled twice: for the x86-64 baseline (SSE2) and for AVX2 + FMA,
// chosen at run time. With double accumulators the baseline's two-lane vectors, not memory,
// limit the passes; AVX2 doubles the lanes. Each loop's body is written once (always
// inlined into both clones); the clones have their own names, so nothing compiled for AVX2
// is shared with, or merged into, the baseline code.
// DEQ_EXT_CPU_BASELINE=1 in the environment (read once) keeps the baseline clones: for
// testing them on a machine that has AVX2.
#if defined(__x86_64__) && defined(__GNUC__)
#define DEQ_EXT_AVX2_CLONES 1
#define DEQ_EXT_TARGET_AVX2 __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("DEQ_EXT_CPU_BASELINE") == nullptr;
  return yes;
}
#endif
#define DEQ_EXT_INLINE_BODY inline __attribute__((always_inline))
#define DEQ_EXT_COMMA ,

// Defines NAME(args) that calls NAME##_body(args) through the AVX2 clone where the CPU has it.
// PARAMS and ARGS are parenthesised lists; the template parameters come first.
#ifdef DEQ_EXT_AVX2_CLONES
#define DEQ_EXT_CPU_CLONES(TEMPLATE, NAME, PARAMS, ARGS)                \
  TEMPLATE void NAME##_base PARAMS { NAME##_body ARGS; }                \
  TEMPLATE DEQ_EXT_TARGET_AVX2 void NAME##_avx2 PARAMS { NAME##_body ARGS; } \
  TEMPLATE void NAME PARAMS {                                           \
    if (cpu_has_avx2_fma()) {                                           \
      NAME##_avx2 ARGS;                                                 \
    } else {                                                            \
      NAME##_base ARGS;                                                 \
    }                                                                   \
  }
#else
#define DEQ_EXT_CPU_CLONES(TEMPLATE, NAME, PARAMS, ARGS) \
  TEMPLATE void NAME PARAMS { NAME##_body ARGS; }
#endif

namespace deq_ext {

inline std::vector<int64_t> active_samples(const at::Tensor& status) {
  const int64_t* s = status.data_ptr<int64_t>();
  std::vector<int64_t> act;
  for (int64_t b = 0; b < status.size(0); ++b)
    if (s[b] == kActive) act.push_back(b);
  return act;
}

constexpr int64_t kChunk = 4096;
// Independent partial sums per dot product: they break the add dependency
// chain so the compiler can vectorize, in a fixed order (deterministic).
constexpr int64_t kLanes = 8;
// Elements per sub-block of a chunk whose accumulators must stay in L1.
constexpr int64_t kSubBlock = 512;

template <typename acc_t>
DEQ_EXT_INLINE_BODY acc_t sum_lanes(const acc_t (&lanes)[kLanes]) {
  acc_t s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// Three dot products over [lo, hi) in one read of x, y, p, q, r:
// x.p, y.q and y.r (the reduction pass reads each history row once; x and y may be
// history rows of a narrower dtype than the state vectors p, q, r).
template <typename x_t, typename p_t, typename acc_t>
DEQ_EXT_INLINE_BODY void dot3_body(const x_t* x, const x_t* y, const p_t* p, const p_t* q,
                                   const p_t* r, int64_t lo, int64_t hi, acc_t* xp, acc_t* yq,
                                   acc_t* yr) {
  acc_t a[kLanes] = {}, b[kLanes] = {}, c[kLanes] = {};
  int64_t d = lo;
  for (; d + kLanes <= hi; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      a[l] += static_cast<acc_t>(x[d + l]) * static_cast<acc_t>(p[d + l]);
      b[l] += static_cast<acc_t>(y[d + l]) * static_cast<acc_t>(q[d + l]);
      c[l] += static_cast<acc_t>(y[d + l]) * static_cast<acc_t>(r[d + l]);
    }
  }
  for (int64_t l = 0; d < hi; ++d, ++l) {
    a[l] += static_cast<acc_t>(x[d]) * static_cast<acc_t>(p[d]);
    b[l] += static_cast<acc_t>(y[d]) * static_cast<acc_t>(q[d]);
    c[l] += static_cast<acc_t>(y[d]) * static_cast<acc_t>(r[d]);
  }
  *xp = sum_lanes(a);
  *yq = sum_lanes(b);
  *yr = sum_lanes(c);
}
DEQ_EXT_CPU_CLONES(template <typename x_t DEQ_EXT_COMMA typename p_t DEQ_EXT_COMMA typename acc_t>, dot3,
                   (const x_t* x, const x_t* y, const p_t* p, const p_t* q, const p_t* r,
                    int64_t lo, int64_t hi, acc_t* xp, acc_t* yq, acc_t* yr),
                   (x, y, p, q, r, lo, hi, xp, yq, yr))

inline int64_t num_chunks(int64_t D) { return std::max<int64_t>(1, (D + kChunk - 1) / kChunk); }

// Runs body(i, sample, chunk, lo, hi) over every (active sample, chunk) pair in
// parallel; i is the sample's position in `act`, [lo, hi) the chunk's range of D.
template <typename Body>
void for_each_chunk(const std::vector<int64_t>& act, int64_t D, const Body& body) {
  const int64_t nch = num_chunks(D);
  const int64_t items = static_cast<int64_t>(act.size()) * nch;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t i = it / nch, c = it % nch;
      body(i, act[i], c, c * kChunk, std::min(D, (c + 1) * kChunk));
    }
  });
}

// *out = x . y over [lo, hi).
template <typename scalar_t, typename acc_t>
DEQ_EXT_INLINE_BODY void dot_into_body(const scalar_t* x, const scalar_t* y, int64_t lo, int64_t hi,
                                  acc_t* out) {
  acc_t a[kLanes] = {};
  int64_t d = lo;
  for (; d + kLanes <= hi; d += kLanes)
    for (int64_t l = 0; l < kLanes; ++l)
      a[l] += static_cast<acc_t>(x[d + l]) * static_cast<acc_t>(y[d + l]);
  for (int64_t l = 0; d < hi; ++d, ++l) a[l] += static_cast<acc_t>(x[d]) * static_cast<acc_t>(y[d]);
  *out = sum_lanes(a);
}
DEQ_EXT_CPU_CLONES(template <typename scalar_t DEQ_EXT_COMMA typename acc_t>, dot_into,
                   (const scalar_t* x, const scalar_t* y, int64_t lo, int64_t hi, acc_t* out),
                   (x, y, lo, hi, out))

template <typename scalar_t, typename acc_t>
acc_t dot(const scalar_t* x, const scalar_t* y, int64_t lo, int64_t hi) {
  acc_t out;
  dot_into(x, y, lo, hi, &out);
  return out;
}

}  // namespace deq_ext
