// CPU kernels of Anderson acceleration. Same structure as broyden_cpu.cpp: parallel over
// (active sample, fixed chunk of D), partial sums combined in chunk order, accumulation in
// double. The store op also solves for the next mixing weights (the Gram matrix is complete
// once the new entry's row is in), so that the mixing op is one pass over the history.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/anderson_math.h"
#include "../ops.h"
#include "chunks.h"

namespace deq_ext {
namespace {

template <typename scalar_t, typename hist_t>
void store_impl(const AndersonArgs& t, double lam) {
  using acc_t = at::acc_type<scalar_t, false>;
  const auto act = active_samples(t.status);
  if (act.empty()) return;
  const int64_t m = t.m, D = t.z.size(1), nch = num_chunks(D);
  const auto X = chunks_of<hist_t>(t.X);
  const auto G = chunks_of<hist_t>(t.G);
  const scalar_t* z = t.z.data_ptr<scalar_t>();
  const scalar_t* g = t.g.data_ptr<scalar_t>();
  int64_t* nhist = t.nhist.data_ptr<int64_t>();
  // part[i, c, j] = G_slot . G_j over chunk c, for the entries j kept after the store:
  // the new entry is stored first, so the products are of the stored (possibly rounded) rows.
  std::vector<acc_t> part(act.size() * nch * m, acc_t(0));
  for_each_chunk(act, D, [&](int64_t i, int64_t b, int64_t c, int64_t lo, int64_t hi) {
    const int64_t slot = nhist[b] % m, n = std::min(nhist[b] + 1, m);
    hist_t* xs = X.row(b, slot);
    hist_t* gs = G.row(b, slot);
    for (int64_t d = lo; d < hi; ++d) {
      xs[d] = static_cast<hist_t>(z[b * D + d]);
      gs[d] = static_cast<hist_t>(g[b * D + d]);
    }
    acc_t* out = part.data() + (i * nch + c) * m;
    for (int64_t j = 0; j < n; ++j) out[j] = dot<hist_t, acc_t>(G.row(b, j), gs, lo, hi);
  });
  scalar_t* gram = t.gram.data_ptr<scalar_t>();
  scalar_t* alpha = t.alpha.data_ptr<scalar_t>();
  int64_t* fallback = t.fallback.data_ptr<int64_t>();
  std::vector<acc_t> K(m * m), work(m * m), w(m);
  for (size_t i = 0; i < act.size(); ++i) {
    const int64_t b = act[i], slot = nhist[b] % m, n = std::min(nhist[b] + 1, m);
    for (int64_t j = 0; j < n; ++j) {
      acc_t tot = 0;
      for (int64_t c = 0; c < static_cast<int64_t>(nch); ++c) tot += part[(i * nch + c) * m + j];
      gram[(b * m + slot) * m + j] = static_cast<scalar_t>(tot);
      gram[(b * m + j) * m + slot] = static_cast<scalar_t>(tot);
    }
    nhist[b] += 1;
    // The next mixing weights, from the stored (rounded) Gram matrix; the newest is `slot`.
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < n; ++c) K[r * n + c] = gram[(b * m + r) * m + c];
    if (!anderson_weights<acc_t>(K.data(), n, n, slot, lam, work.data(), w.data()))
      fallback[b] += 1;
    for (int64_t j = 0; j < m; ++j) alpha[b * m + j] = static_cast<scalar_t>(j < n ? w[j] : 0);
  }
}

// acc += a * (x + bt * r) over len elements: one history entry into the mixed iterate.
template <typename hist_t, typename acc_t>
DEQ_EXT_INLINE_BODY void mix_accumulate_body(const hist_t* x, const hist_t* r, acc_t a, acc_t bt,
                                             int64_t len, acc_t* __restrict__ acc) {
  for (int64_t d = 0; d < len; ++d)
    acc[d] += a * (static_cast<acc_t>(x[d]) + bt * static_cast<acc_t>(r[d]));
}
DEQ_EXT_CPU_CLONES(template <typename hist_t DEQ_EXT_COMMA typename acc_t>, mix_accumulate,
                   (const hist_t* x, const hist_t* r, acc_t a, acc_t bt, int64_t len,
                    acc_t* __restrict__ acc),
                   (x, r, a, bt, len, acc))

template <typename scalar_t, typename hist_t>
void mix_impl(const AndersonArgs& t, double beta) {
  using acc_t = at::acc_type<scalar_t, false>;
  const auto act = active_samples(t.status);
  if (act.empty()) return;
  const int64_t m = t.m, D = t.z.size(1);
  const scalar_t* alpha = t.alpha.data_ptr<scalar_t>();
  const int64_t* nhist = t.nhist.data_ptr<int64_t>();
  const auto X = chunks_of<const hist_t>(t.X);
  const auto G = chunks_of<const hist_t>(t.G);
  scalar_t* z = t.z.data_ptr<scalar_t>();
  const acc_t bt = static_cast<acc_t>(beta);
  for_each_chunk(act, D, [&](int64_t, int64_t b, int64_t, int64_t lo, int64_t hi) {
    const int64_t n = std::min(nhist[b], m);
    acc_t acc[kSubBlock];
    for (int64_t lo2 = lo; lo2 < hi; lo2 += kSubBlock) {
      const int64_t len = std::min(kSubBlock, hi - lo2);
      std::fill(acc, acc + len, acc_t(0));
      for (int64_t j = 0; j < n; ++j) {
        const acc_t a = alpha[b * m + j];
        mix_accumulate(X.row(b, j) + lo2, G.row(b, j) + lo2, a, bt, len, acc);
      }
      for (int64_t d = 0; d < len; ++d) z[b * D + lo2 + d] = static_cast<scalar_t>(acc[d]);
    }
  });
}

}  // namespace

void anderson_store_cpu(const AndersonArgs& t, double lam) {
  AT_DISPATCH_FLOATING_TYPES(t.z.scalar_type(), "anderson_store_cpu", [&] {
    dispatch_history<scalar_t>(t.X.front().scalar_type(), [&](auto h) {
      store_impl<scalar_t, typename decltype(h)::type>(t, lam);
    });
  });
}

void anderson_mix_cpu(const AndersonArgs& t, double beta) {
  AT_DISPATCH_FLOATING_TYPES(t.z.scalar_type(), "anderson_mix_cpu", [&] {
    dispatch_history<scalar_t>(t.X.front().scalar_type(), [&](auto h) {
      mix_impl<scalar_t, typename decltype(h)::type>(t, beta);
    });
  });
}

}  // namespace deq_ext
