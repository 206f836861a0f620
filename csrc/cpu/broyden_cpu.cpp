// CPU kernels of the Broyden solver's two passes over the history: parallel over (active
// sample, fixed-size chunk of D); see chunks.h. Accumulation is in double (at::acc_type on
// CPU), like the reference twin. The history is a list of chunks (common/history.h).
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "chunks.h"

namespace deq_ext {
namespace {

// Pairs accumulated together in the expansion pass.
constexpr int64_t kPairGroup = 4;

template <typename scalar_t, typename hist_t>
void reduce_impl(const HistoryArgs& t) {
  using acc_t = at::acc_type<scalar_t, false>;
  const auto act = active_samples(t.status);
  if (act.empty()) return;
  const int64_t m = t.m, D = t.dz.size(1), nch = num_chunks(D);
  const int64_t Q = 3 * m + 2;  // a, b, c per pair, then dz.dg and dz.g
  std::vector<acc_t> part(act.size() * nch * Q, acc_t(0));

  const auto U = chunks_of<const hist_t>(t.U);
  const auto V = chunks_of<const hist_t>(t.V);
  const scalar_t* dz = t.dz.data_ptr<scalar_t>();
  const scalar_t* dg = t.dg.data_ptr<scalar_t>();
  const scalar_t* g = t.g.data_ptr<scalar_t>();
  const int64_t* npairs = t.npairs.data_ptr<int64_t>();
  for_each_chunk(act, D, [&](int64_t i, int64_t b, int64_t c, int64_t lo, int64_t hi) {
    acc_t* out = part.data() + (i * nch + c) * Q;
    const scalar_t* dzb = dz + b * D;
    const scalar_t* dgb = dg + b * D;
    const scalar_t* gb = g + b * D;
    const int64_t k = stored_pairs(live_pairs(npairs[b], m, t.restart), m);
    for (int64_t j = 0; j < k; ++j) {
      dot3(U.row(b, j), V.row(b, j), dzb, dgb, gb, lo, hi, &out[j], &out[m + j], &out[2 * m + j]);
    }
    acc_t s1, s2, unused;  // dz.dg and dz.g (the third product repeats dz.g)
    dot3(dzb, dzb, dgb, gb, gb, lo, hi, &s1, &s2, &unused);
    out[3 * m] = s1;
    out[3 * m + 1] = s2;
  });

  scalar_t* proj = t.proj.data_ptr<scalar_t>();
  scalar_t* scal = t.scal.data_ptr<scalar_t>();
  for (size_t i = 0; i < act.size(); ++i) {
    const int64_t b = static_cast<int64_t>(act[i]);
    std::vector<acc_t> tot(Q, acc_t(0));
    for (int64_t c = 0; c < nch; ++c)
      for (int64_t q = 0; q < Q; ++q) tot[q] += part[(i * nch + c) * Q + q];
    const int64_t k = stored_pairs(live_pairs(npairs[b], m, t.restart), m);
    acc_t den, vg, valid;
    sherman_morrison<acc_t>(tot.data(), tot.data() + m, tot.data() + 2 * m, k, tot[3 * m],
                            tot[3 * m + 1], &den, &vg, &valid);
    for (int64_t q = 0; q < 3 * m; ++q) proj[b * 3 * m + q] = static_cast<scalar_t>(tot[q]);
    scalar_t* s = scal + b * kNumScalars;
    s[kDzDg] = static_cast<scalar_t>(tot[3 * m]);
    s[kDzG] = static_cast<scalar_t>(tot[3 * m + 1]);
    s[kDen] = static_cast<scalar_t>(den);
    s[kVG] = static_cast<scalar_t>(vg);
    s[kValid] = static_cast<scalar_t>(valid);
  }
}

// One group of kPairGroup pairs into a sub-block's accumulators: sUb += U b, sUc += U c,
// sVa += V a over its len elements (u[t], v[t]: the rows of pair t at the sub-block).
template <typename hist_t, typename acc_t>
DEQ_EXT_INLINE_BODY void accumulate_pairs_body(const hist_t* const* u, const hist_t* const* v,
                                               const acc_t* aj, const acc_t* bj,
                                               const acc_t* cj, int64_t len,
                                               acc_t* __restrict__ sUb, acc_t* __restrict__ sUc,
                                               acc_t* __restrict__ sVa) {
  for (int64_t d = 0; d < len; ++d) {
    acc_t ub = sUb[d], uc = sUc[d], va = sVa[d];
    for (int64_t t = 0; t < kPairGroup; ++t) {
      const acc_t ud = static_cast<acc_t>(u[t][d]);
      ub += ud * bj[t];
      uc += ud * cj[t];
      va += static_cast<acc_t>(v[t][d]) * aj[t];
    }
    sUb[d] = ub;
    sUc[d] = uc;
    sVa[d] = va;
  }
}
DEQ_EXT_CPU_CLONES(template <typename hist_t DEQ_EXT_COMMA typename acc_t>, accumulate_pairs,
                   (const hist_t* const* u, const hist_t* const* v, const acc_t* aj,
                    const acc_t* bj, const acc_t* cj, int64_t len, acc_t* __restrict__ sUb,
                    acc_t* __restrict__ sUc, acc_t* __restrict__ sVa),
                   (u, v, aj, bj, cj, len, sUb, sUc, sVa))

// The end of the expansion over one sub-block: the new pair (un, vn) when it is valid,
// then the step -H'g into dz and z.
template <typename scalar_t, typename hist_t, typename acc_t>
DEQ_EXT_INLINE_BODY void finish_step_body(hist_t* __restrict__ un, hist_t* __restrict__ vn,
                                          scalar_t* __restrict__ dz,
                                          const scalar_t* __restrict__ dg,
                                          const scalar_t* __restrict__ g,
                                          scalar_t* __restrict__ z, const acc_t* sUb,
                                          const acc_t* sUc, const acc_t* sVa, acc_t den,
                                          acc_t vg, bool valid, int64_t len) {
  for (int64_t d = 0; d < len; ++d) {
    const acc_t dzd = dz[d], dgd = dg[d];
    acc_t step = static_cast<acc_t>(g[d]) - sUc[d];
    if (valid) {
      const acc_t uu = (dzd + dgd - sUb[d]) / den;
      un[d] = static_cast<hist_t>(uu);
      vn[d] = static_cast<hist_t>(sVa[d] - dzd);
      step -= uu * vg;
    }
    const scalar_t st = static_cast<scalar_t>(step);
    dz[d] = st;
    z[d] = z[d] + st;
  }
}
DEQ_EXT_CPU_CLONES(template <typename scalar_t DEQ_EXT_COMMA typename hist_t DEQ_EXT_COMMA
                   typename acc_t>, finish_step,
                   (hist_t* __restrict__ un, hist_t* __restrict__ vn, scalar_t* __restrict__ dz,
                    const scalar_t* __restrict__ dg, const scalar_t* __restrict__ g,
                    scalar_t* __restrict__ z, const acc_t* sUb, const acc_t* sUc,
                    const acc_t* sVa, acc_t den, acc_t vg, bool valid, int64_t len),
                   (un, vn, dz, dg, g, z, sUb, sUc, sVa, den, vg, valid, len))

template <typename scalar_t, typename hist_t>
void expand_impl(const HistoryArgs& t) {
  using acc_t = at::acc_type<scalar_t, false>;
  const auto act = active_samples(t.status);
  if (act.empty()) return;
  const int64_t m = t.m, D = t.dz.size(1);

  const auto U = chunks_of<hist_t>(t.U);
  const auto V = chunks_of<hist_t>(t.V);
  scalar_t* dz = t.dz.data_ptr<scalar_t>();
  const scalar_t* dg = t.dg.data_ptr<scalar_t>();
  const scalar_t* g = t.g.data_ptr<scalar_t>();
  scalar_t* z = t.z.data_ptr<scalar_t>();
  const scalar_t* proj = t.proj.data_ptr<scalar_t>();
  const scalar_t* scal = t.scal.data_ptr<scalar_t>();
  int64_t* npairs = t.npairs.data_ptr<int64_t>();
  for_each_chunk(act, D, [&](int64_t, int64_t b, int64_t, int64_t lo, int64_t hi) {
    const int64_t n = live_pairs(npairs[b], m, t.restart), k = stored_pairs(n, m),
                  slot = next_slot(n, m);
    const scalar_t* s = scal + b * kNumScalars;
    const bool valid = s[kValid] != scalar_t(0);
    const acc_t den = s[kDen], vg = s[kVG];
    const scalar_t* a = proj + b * 3 * m;
    // Sub-blocks small enough that the three accumulators stay in L1.
    acc_t sUb[kSubBlock], sUc[kSubBlock], sVa[kSubBlock];
    for (int64_t lo2 = lo; lo2 < hi; lo2 += kSubBlock) {
      const int64_t len = std::min(kSubBlock, hi - lo2);
      std::fill(sUb, sUb + len, acc_t(0));
      std::fill(sUc, sUc + len, acc_t(0));
      std::fill(sVa, sVa + len, acc_t(0));
      // Pairs are taken kPairGroup at a time so each accumulator is loaded and
      // stored once per group rather than once per pair.
      for (int64_t j0 = 0; j0 < k; j0 += kPairGroup) {
        const int64_t nj = std::min(kPairGroup, k - j0);
        const hist_t* u[kPairGroup];
        const hist_t* v[kPairGroup];
        acc_t aj[kPairGroup], bj[kPairGroup], cj[kPairGroup];
        for (int64_t t = 0; t < kPairGroup; ++t) {
          // Missing pairs of the last group read pair j0 with zero weights.
          const int64_t j = t < nj ? j0 + t : j0;
          const bool real = t < nj;
          u[t] = U.row(b, j) + lo2;
          v[t] = V.row(b, j) + lo2;
          aj[t] = real ? acc_t(a[j]) : acc_t(0);
          bj[t] = real ? acc_t(a[m + j]) : acc_t(0);
          // The pair in `slot` is replaced by the new one, so it leaves the step.
          cj[t] = (real && !(valid && j == slot)) ? acc_t(a[2 * m + j]) : acc_t(0);
        }
        accumulate_pairs(u, v, aj, bj, cj, len, sUb, sUc, sVa);
      }
      const int64_t o = b * D + lo2;
      finish_step(U.row(b, slot) + lo2, V.row(b, slot) + lo2, dz + o, dg + o, g + o, z + o, sUb,
                  sUc, sVa, den, vg, valid, len);
    }
  });
  const scalar_t* sc = scal;
  for (int64_t b : act)
    if (sc[b * kNumScalars + kValid] != scalar_t(0))
      npairs[b] = live_pairs(npairs[b], m, t.restart) + 1;
}

}  // namespace

void broyden_reduce_cpu(const HistoryArgs& t) {
  AT_DISPATCH_FLOATING_TYPES(t.dz.scalar_type(), "broyden_reduce_cpu", [&] {
    dispatch_history<scalar_t>(t.U.front().scalar_type(), [&](auto h) {
      reduce_impl<scalar_t, typename decltype(h)::type>(t);
    });
  });
}

void broyden_expand_cpu(const HistoryArgs& t) {
  AT_DISPATCH_FLOATING_TYPES(t.dz.scalar_type(), "broyden_expand_cpu", [&] {
    dispatch_history<scalar_t>(t.U.front().scalar_type(), [&](auto h) {
      expand_impl<scalar_t, typename decltype(h)::type>(t);
    });
  });
}

}  // namespace deq_ext
