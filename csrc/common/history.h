// The (B, m, D) history of a method (Broyden's U, V; Anderson's X, G) as the kernels see it.
//
// The history grows with the steps a solve takes (deq_ext/solvers/_history.py): it is a list of
// chunks, each a (B, C, D) tensor holding C more ring slots (the last one possibly fewer, so that
// a full ring holds exactly m), allocated as the ring fills. A chunk
// is never moved or copied once allocated, so growing costs no copy and no transient second
// buffer. The kernels get the chunks' base pointers by value (this struct is a kernel parameter)
// and the ring length m explicitly: m is what the method uses, the capacity (chunks x C) only what
// is allocated so far, and every live slot (j < min(npairs, m), and the next slot npairs % m) lies
// below the capacity (checked on the CPU side before a call, guaranteed by the solver).
#pragma once

#include <cstdint>

#include "status.h"

namespace deq_ext {

// At most this many chunks per history (C grows with m so that m <= kMaxHistoryChunks * C).
constexpr int kMaxHistoryChunks = 64;

template <typename T>
struct HistoryChunks {
  T* chunk[kMaxHistoryChunks];
  int64_t n_chunks;  // chunks allocated
  int64_t C;         // ring slots per chunk
  int64_t last_C;    // ring slots of the last chunk (<= C)
  int64_t D;         // values per row

  // Row of ring slot j of sample b.
  DEQ_HD T* row(int64_t b, int64_t j) const {
    const int64_t c = j / C, slots = c == n_chunks - 1 ? last_C : C;
    return chunk[c] + (b * slots + j % C) * D;
  }
  DEQ_HD int64_t capacity() const { return (n_chunks - 1) * C + last_C; }
};

// Number of stored entries and the ring slot the next one goes to.
DEQ_HD int64_t stored_pairs(int64_t npairs, int64_t m) { return npairs < m ? npairs : m; }
DEQ_HD int64_t next_slot(int64_t npairs, int64_t m) { return npairs % m; }

// The pair count an active sample's step starts from. With restart (restarted Broyden) a full
// ring starts over as if empty, and the step's valid pair makes the count 1; the count itself
// only changes when a pair is stored, so a finished sample keeps its m pairs (SHINE reads them).
DEQ_HD int64_t live_pairs(int64_t npairs, int64_t m, bool restart) {
  return restart && npairs >= m ? 0 : npairs;
}

}  // namespace deq_ext
