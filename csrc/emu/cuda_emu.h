// CPU emulation of the CUDA execution model, so that unchanged .cu kernels can be
// compiled as host C++ and executed (and checked) on a machine without a GPU.
//
// What it models:
// * Blocks run one after another on the calling OS thread, in the schedule's order (forward,
//   reverse or seeded random), so that any block can be the last of a launch. The threads of a block
//   are cooperative fibers with their own stacks; a fiber runs until it reaches a
//   synchronisation point (__syncthreads, a warp shuffle or vote, __syncwarp) or
//   returns, and the scheduler then runs the highest-priority runnable fiber.
// * The priority order is the schedule: forward (thread 0 first), reverse, or a
//   seeded random permutation per block. A race-free kernel gives the same bits
//   under every schedule; a race shows up as a difference between schedules.
// * __syncthreads is a real barrier of the block. Threads that wait at different
//   __syncthreads call sites, or threads that returned while others wait, are errors.
// * Warp intrinsics exchange values among the lanes named in the mask only: every
//   lane deposits its value, and when the last lane of the mask arrives each lane's
//   result is computed into its own slot. Lanes that returned, or that name another
//   mask, or that read a lane outside the mask, are errors.
// * Launch configurations are checked against the CUDA limits; a deadlock (no
//   runnable thread left while some have not returned) is reported with where
//   every thread waits.
// * __shared__ variables are function-local statics: one copy, shared by the
//   threads of the block that is running.
// The first error aborts the launch and is thrown as deq_emu::Error (a
// std::runtime_error, a RuntimeError in Python) naming the kernel, its launch
// site and the line of the offending call.
//
// What it cannot show: timing, the GPU memory model (only the interleavings of the
// schedules tried are run), and nvcc's floating-point contraction.
//
// Include this header before anything else in a translation unit compiled from a
// .cu file, and rewrite the launch syntax `k<<<grid, block, smem, stream>>>(args)`
// into `::deq_emu::launch(k, "k", __FILE__, __LINE__, grid, block, smem, stream)(args)`
// (csrc/emu/rewrite_launches.py does both). Launches are serialised process-wide.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#define DEQ_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DEQ_EMU_ASAN 1
#endif
#endif
#ifdef DEQ_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// The fast context switch is x86-64 System V assembly; elsewhere (or on request)
// the portable but slower ucontext is used.
#if !defined(__x86_64__) || defined(DEQ_EMU_USE_UCONTEXT)
#define DEQ_EMU_UCONTEXT 1
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------
// The CUDA surface: types, qualifiers, built-in variables
// ---------------------------------------------------------------------------

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

// Set by the scheduler before a fiber runs (launches are serialised, so plain globals).
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace deq_emu {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Schedule { kForward, kReverse, kRandom };

inline const char* schedule_name(Schedule s) {
  return s == Schedule::kForward ? "forward" : s == Schedule::kReverse ? "reverse" : "random";
}

// Counters a test reads to know that kernel code really ran.
struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, switches = 0;
};

namespace detail {

// CUDA limits checked at launch.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned long long kMaxGridDim[3] = {2147483647ull, 65535ull, 65535ull};
constexpr int kLanes = 32;
constexpr unsigned kFullMask = 0xffffffffu;

#ifdef DEQ_EMU_ASAN
constexpr size_t kStackBytes = 512 * 1024;  // instrumented frames are much larger
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

// ----- context switch -------------------------------------------------------

#ifndef DEQ_EMU_UCONTEXT
// switch(save, load): pushes the callee-saved registers on the current stack,
// stores the stack pointer in *save, loads `load` and pops the same from there. A
// new fiber's stack is prepared so that the final `ret` enters fiber_start, which
// calls entry(arg) from r12 and r13. The SSE and x87 control words are left alone:
// they belong to the OS thread, so every fiber runs with the caller's rounding and
// flush-to-zero settings (kernels do not change them).
extern "C" void deq_emu_switch_context(void** save, void* load);
extern "C" void deq_emu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .weak deq_emu_switch_context
  .hidden deq_emu_switch_context
  .type deq_emu_switch_context, @function
deq_emu_switch_context:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size deq_emu_switch_context, .-deq_emu_switch_context
  .p2align 4
  .weak deq_emu_fiber_start
  .hidden deq_emu_fiber_start
  .type deq_emu_fiber_start, @function
deq_emu_fiber_start:
  movq %r13, %rdi
  callq *%r12
  ud2
  .size deq_emu_fiber_start, .-deq_emu_fiber_start
)");
#endif

// One fiber's machine context.
struct Context {
#ifdef DEQ_EMU_UCONTEXT
  ucontext_t uc;
#else
  void* sp = nullptr;
#endif
};

// A stack with a PROT_NONE guard page below it, so an overflow faults at once.
class Stack {
 public:
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    map_bytes_ = kStackBytes + page;
    void* p = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw Error("deq_emu: cannot map a fiber stack");
    mprotect(p, page, PROT_NONE);
    base_ = static_cast<char*>(p);
    lo_ = base_ + page;
  }
  ~Stack() {
    if (base_) munmap(base_, map_bytes_);
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* lo() const { return lo_; }
  size_t size() const { return kStackBytes; }

 private:
  char* base_ = nullptr;
  char* lo_ = nullptr;
  size_t map_bytes_ = 0;
};

enum class FiberState { kRunnable, kBarrier, kWarp, kDone };

enum class WarpOp { kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "?";
}

struct Site {
  const char* file = "";
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  bool operator!=(const Site& o) const { return !(*this == o); }
};

inline std::string str(const Site& s) { return std::string(s.file) + ":" + std::to_string(s.line); }

struct Fiber {
  Context ctx;
  std::unique_ptr<Stack> stack;
  uint3 idx{0, 0, 0};
  int tid = 0, warp = 0, lane = 0;
  FiberState state = FiberState::kRunnable;
  Site site;  // where it waits
  // The warp operation it waits in: its own operand and, once complete, its result.
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  int arg = 0, width = kLanes;
  size_t bytes = 0;
  uint64_t value = 0, result = 0;
};

// The lanes of one warp that have arrived at the same warp operation.
struct WarpGroup {
  WarpOp op;
  unsigned mask, arrived;
  size_t bytes;
  Site site;
};

struct Launch {
  const char* kernel;
  Site site;
};

class Runtime {
 public:
  // Runs body(ctx) once per thread of every block of the grid.
  void run(const Launch& launch, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
           void* ctx) {
    std::lock_guard<std::mutex> lock(mutex_);
    launch_ = launch;
    check_config(grid, block, smem);
    body_ = body;
    body_ctx_ = ctx;
    const int nthreads = static_cast<int>(block.x * block.y * block.z);
    while (static_cast<int>(fibers_.size()) < nthreads) {
      fibers_.emplace_back();
      fibers_.back().stack = std::make_unique<Stack>();
    }
    nthreads_ = nthreads;
    nwarps_ = (nthreads + kLanes - 1) / kLanes;
    gridDim = grid;
    blockDim = block;
    ++stats_.launches;
    for (const uint3& b : block_order(grid)) run_block(b);
    ++launch_index_;
  }

  // The order in which the blocks of a launch run follows the schedule too (forward, reverse,
  // or a seeded permutation per launch): on a GPU any block may finish last, and the last-block
  // pattern must hand the finishing work to whichever one does.
  std::vector<uint3> block_order(dim3 grid) const {
    std::vector<uint3> order;
    order.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) order.push_back(uint3{x, y, z});
    if (schedule_ == Schedule::kReverse) {
      std::reverse(order.begin(), order.end());
    } else if (schedule_ == Schedule::kRandom) {
      std::seed_seq seq{static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32),
                        static_cast<uint32_t>(launch_index_), 0xb10c5u};
      std::mt19937_64 rng(seq);
      std::shuffle(order.begin(), order.end(), rng);
    }
    return order;
  }

  void set_schedule(Schedule s, uint64_t seed) {
    std::lock_guard<std::mutex> lock(mutex_);
    schedule_ = s;
    seed_ = seed;
    launch_index_ = 0;
  }
  Schedule schedule() const { return schedule_; }
  uint64_t seed() const { return seed_; }
  Stats stats() const { return stats_; }

  // --- called from inside a fiber -----------------------------------------
  void syncthreads(Site site) {
    Fiber& f = *current_;
    if (barrier_waiting_ > 0 && site != barrier_site_) {
      fail("thread " + who(f) + " waits at __syncthreads " + str(site) + " while " +
           std::to_string(barrier_waiting_) + " thread(s) wait at __syncthreads " +
           str(barrier_site_) + " (every thread must reach the same barrier)");
    }
    barrier_site_ = site;
    ++barrier_waiting_;
    block_on(f, FiberState::kBarrier, site);
    if (barrier_waiting_ + done_ == nthreads_) {
      if (done_ > 0) barrier_with_returned();
      for (int t = 0; t < nthreads_; ++t)
        if (fibers_[t].state == FiberState::kBarrier) make_runnable(fibers_[t]);
      barrier_waiting_ = 0;
    }
    yield(f);
  }

  // A warp operation: deposits `value` (bytes long) and returns this lane's result.
  uint64_t warp_op(WarpOp op, unsigned mask, uint64_t value, size_t bytes, int arg, int width,
                   Site site) {
    Fiber& f = *current_;
    auto at = [&] { return std::string(warp_op_name(op)) + " " + str(site); };
    if (!(mask >> f.lane & 1u))
      fail("thread " + who(f) + " calls " + at() + " with mask 0x" + hex(mask) +
           ", which does not name its own lane " + std::to_string(f.lane));
    if (width < 1 || width > kLanes || (width & (width - 1)) != 0)
      fail("thread " + who(f) + " calls " + at() + " with width " + std::to_string(width) +
           " (must be a power of 2 up to 32)");
    const unsigned gone = gone_[f.warp] & mask;
    if (gone)
      fail(lanes_text(gone) + " of warp " + std::to_string(f.warp) +
           " returned (or do not exist) but are named in the mask 0x" + hex(mask) + " of " + at() +
           " reached by thread " + who(f));
    std::vector<WarpGroup>& groups = warp_groups_[f.warp];
    WarpGroup* g = nullptr;
    for (WarpGroup& w : groups) {
      if (!(w.mask & mask)) continue;
      if (w.mask != mask || w.op != op || w.bytes != bytes)
        fail("lanes of warp " + std::to_string(f.warp) + " disagree: thread " + who(f) +
             " reaches " + at() + " with mask 0x" + hex(mask) + " while " + lanes_text(w.arrived) +
             " wait at " + warp_op_name(w.op) + " " + str(w.site) + " with mask 0x" +
             hex(w.mask));
      g = &w;
    }
    if (!g) {
      groups.push_back(WarpGroup{op, mask, 0u, bytes, site});
      g = &groups.back();
    }
    f.op = op;
    f.mask = mask;
    f.value = value;
    f.bytes = bytes;
    f.arg = arg;
    f.width = width;
    g->arrived |= 1u << f.lane;
    block_on(f, FiberState::kWarp, site);
    if (g->arrived == g->mask) {
      complete(f.warp, *g);
      groups.erase(groups.begin() + (g - groups.data()));
    }
    yield(f);
    return f.result;
  }

  // Entry of every fiber (never returns: the last switch leaves for good).
  static void fiber_main(void* self) {
    Runtime& rt = *static_cast<Runtime*>(self);
#ifdef DEQ_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &rt.main_stack_lo_, &rt.main_stack_size_);
#endif
    rt.body_(rt.body_ctx_);
    rt.on_return(*rt.current_);
  }

 private:
  // ----- scheduling ---------------------------------------------------------
  void run_block(uint3 b) {
    blockIdx = b;
    const uint64_t linear = (static_cast<uint64_t>(b.z) * gridDim.y + b.y) * gridDim.x + b.x;
    set_priorities(linear);
    ready_.assign((nthreads_ + 63) / 64, 0);
    warp_groups_.assign(nwarps_, {});
    // Lanes past the end of the block count as returned from the start.
    gone_.assign(nwarps_, 0u);
    for (int t = nthreads_; t < nwarps_ * kLanes; ++t) gone_[t / kLanes] |= 1u << (t % kLanes);
    barrier_waiting_ = 0;
    done_ = 0;
    failed_ = false;
    for (int t = 0; t < nthreads_; ++t) {
      Fiber& f = fibers_[t];
      f.tid = t;
      f.idx = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
      f.warp = t / kLanes;
      f.lane = t % kLanes;
      f.state = FiberState::kRunnable;
      f.site = Site{};
      prepare(f);
      ready_[rank_[t] / 64] |= 1ull << (rank_[t] % 64);
    }
    ++stats_.blocks;
    stats_.threads += static_cast<uint64_t>(nthreads_);
    for (;;) {
      const int r = first_ready();
      if (r < 0) break;
      Fiber& f = fibers_[order_[r]];
      current_ = &f;
      threadIdx = f.idx;
      enter(f);
      if (failed_) throw Error(message_);
    }
    if (done_ != nthreads_) deadlock();
  }

  void set_priorities(uint64_t block_linear) {
    order_.resize(nthreads_);
    rank_.resize(nthreads_);
    for (int i = 0; i < nthreads_; ++i) order_[i] = schedule_ == Schedule::kReverse ? nthreads_ - 1 - i : i;
    if (schedule_ == Schedule::kRandom) {
      std::seed_seq seq{static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32),
                        static_cast<uint32_t>(launch_index_), static_cast<uint32_t>(block_linear),
                        static_cast<uint32_t>(block_linear >> 32)};
      std::mt19937_64 rng(seq);
      for (int i = nthreads_ - 1; i > 0; --i) {
        std::uniform_int_distribution<int> pick(0, i);
        std::swap(order_[i], order_[pick(rng)]);
      }
    }
    for (int i = 0; i < nthreads_; ++i) rank_[order_[i]] = i;
  }

  int first_ready() const {
    for (size_t w = 0; w < ready_.size(); ++w)
      if (ready_[w]) return static_cast<int>(w * 64 + __builtin_ctzll(ready_[w]));
    return -1;
  }

  void make_runnable(Fiber& f) {
    f.state = FiberState::kRunnable;
    ready_[rank_[f.tid] / 64] |= 1ull << (rank_[f.tid] % 64);
  }

  void block_on(Fiber& f, FiberState s, Site site) {
    f.state = s;
    f.site = site;
    ready_[rank_[f.tid] / 64] &= ~(1ull << (rank_[f.tid] % 64));
  }

  // ----- fibers ------------------------------------------------------------
  void prepare(Fiber& f) {
    char* lo = f.stack->lo();
#ifdef DEQ_EMU_ASAN
    // Frames abandoned by an aborted launch may have left their redzones poisoned.
    __asan_unpoison_memory_region(lo, f.stack->size());
#endif
#ifdef DEQ_EMU_UCONTEXT
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = lo;
    f.ctx.uc.uc_stack.ss_size = f.stack->size();
    f.ctx.uc.uc_link = nullptr;
    // makecontext passes int arguments: the pointer travels as two halves.
    const uintptr_t p = reinterpret_cast<uintptr_t>(this);
    makecontext(&f.ctx.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2,
                static_cast<unsigned>(p & 0xffffffffu), static_cast<unsigned>(p >> 32));
#else
    // Initial frame, popped by deq_emu_switch_context: r15..r12, rbx, rbp, then
    // the return address deq_emu_fiber_start. After the `ret` the stack pointer
    // is 16-byte aligned, as fiber_start's call needs.
    // Staggered tops: stacks are a multiple of the page size apart, and hot frames
    // at the same page offset would all compete for the same cache sets.
    uintptr_t top = reinterpret_cast<uintptr_t>(lo + f.stack->size()) - (f.tid % 61) * 64;
    top &= ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top - 128 + 8);
    std::memset(sp, 0, 7 * sizeof(uint64_t));
    sp[2] = reinterpret_cast<uint64_t>(this);                   // r13: the argument
    sp[3] = reinterpret_cast<uint64_t>(&Runtime::fiber_main);   // r12: the entry
    sp[6] = reinterpret_cast<uint64_t>(&deq_emu_fiber_start);  // return address
    f.ctx.sp = sp;
#endif
  }

#ifdef DEQ_EMU_UCONTEXT
  static void ucontext_entry(unsigned lo, unsigned hi) {
    fiber_main(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
  }
#endif

  // Scheduler -> fiber f, until f blocks, returns or fails.
  void enter(Fiber& f) {
    ++stats_.switches;
#ifdef DEQ_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack->lo(), f.stack->size());
#endif
#ifdef DEQ_EMU_UCONTEXT
    swapcontext(&main_.uc, &f.ctx.uc);
#else
    deq_emu_switch_context(&main_.sp, f.ctx.sp);
#endif
#ifdef DEQ_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  }

  // Fiber f -> scheduler. `final` when f will never run again.
  void leave(Fiber& f, bool final) {
#ifdef DEQ_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(final ? nullptr : &fake, main_stack_lo_, main_stack_size_);
#endif
#ifdef DEQ_EMU_UCONTEXT
    swapcontext(&f.ctx.uc, &main_.uc);
#else
    deq_emu_switch_context(&f.ctx.sp, main_.sp);
#endif
#ifdef DEQ_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, &main_stack_lo_, &main_stack_size_);
#endif
    (void)final;
  }

  void yield(Fiber& f) { leave(f, false); }

  void on_return(Fiber& f) {
    f.state = FiberState::kDone;
    ready_[rank_[f.tid] / 64] &= ~(1ull << (rank_[f.tid] % 64));
    gone_[f.warp] |= 1u << f.lane;
    ++done_;
    if (!failed_ && barrier_waiting_ > 0 && barrier_waiting_ + done_ == nthreads_)
      barrier_with_returned();
    if (!failed_) {
      for (const WarpGroup& g : warp_groups_[f.warp]) {
        if (g.mask >> f.lane & 1u)
          fail_noyield("thread " + who(f) + " returned while " + lanes_text(g.arrived) +
                       " of its warp wait for it at " + warp_op_name(g.op) + " " + str(g.site) +
                       " (mask 0x" + hex(g.mask) + ")");
      }
    }
    for (;;) leave(f, true);
  }

  // ----- warp operations -----------------------------------------------------
  void complete(int warp, const WarpGroup& g) {
    Fiber* lane[kLanes] = {};
    for (int l = 0; l < kLanes; ++l)
      if (g.mask >> l & 1u) lane[l] = &fibers_[warp * kLanes + l];
    unsigned votes = 0;
    for (int l = 0; l < kLanes; ++l)
      if (lane[l] && lane[l]->value != 0) votes |= 1u << l;
    for (int l = 0; l < kLanes; ++l) {
      Fiber* f = lane[l];
      if (!f) continue;
      const int w = f->width, seg = l & ~(w - 1);
      int src = l;
      switch (g.op) {
        case WarpOp::kSync: break;
        case WarpOp::kShflIdx: src = seg + (f->arg & (w - 1)); break;
        case WarpOp::kShflUp: src = l - f->arg >= seg ? l - f->arg : l; break;
        case WarpOp::kShflDown: src = l + f->arg < seg + w ? l + f->arg : l; break;
        case WarpOp::kShflXor: {
          const int x = l ^ f->arg;
          src = (x & ~(w - 1)) > seg ? l : x;  // later segments are out of reach
          break;
        }
        case WarpOp::kBallot: f->result = votes & g.mask; break;
        case WarpOp::kAny: f->result = (votes & g.mask) != 0; break;
        case WarpOp::kAll: f->result = (votes & g.mask) == g.mask; break;
      }
      if (g.op == WarpOp::kShflIdx || g.op == WarpOp::kShflUp || g.op == WarpOp::kShflDown ||
          g.op == WarpOp::kShflXor) {
        if (src < 0 || src >= kLanes || !lane[src])
          fail_noyield("thread " + who(*f) + " reads lane " + std::to_string(src) + " in " +
                       warp_op_name(g.op) + " " + str(g.site) + ", which is not in the mask 0x" +
                       hex(g.mask));
        else
          f->result = lane[src]->value;
      }
    }
    for (int l = 0; l < kLanes; ++l)
      if (lane[l]) make_runnable(*lane[l]);
  }

  // ----- errors -------------------------------------------------------------
  void check_config(dim3 grid, dim3 block, size_t smem) {
    const unsigned g[3] = {grid.x, grid.y, grid.z}, b[3] = {block.x, block.y, block.z};
    for (int i = 0; i < 3; ++i) {
      if (g[i] == 0 || b[i] == 0)
        throw Error(prefix() + "invalid launch configuration: grid (" + dims(grid) +
                    "), block (" + dims(block) + ") has a zero dimension");
      if (g[i] > kMaxGridDim[i])
        throw Error(prefix() + "grid (" + dims(grid) + ") exceeds the CUDA limit in dimension " +
                    "xyz"[i]);
      if (b[i] > kMaxBlockDim[i])
        throw Error(prefix() + "block (" + dims(block) + ") exceeds the CUDA limit in dimension " +
                    "xyz"[i]);
    }
    if (static_cast<unsigned long long>(block.x) * block.y * block.z > kMaxThreadsPerBlock)
      throw Error(prefix() + "block (" + dims(block) + ") has more than 1024 threads");
    if (smem != 0)
      throw Error(prefix() + "dynamic shared memory (" + std::to_string(smem) +
                  " bytes) is not emulated");
  }

  void barrier_with_returned() {
    std::vector<int> gone;
    for (int t = 0; t < nthreads_; ++t)
      if (fibers_[t].state == FiberState::kDone) gone.push_back(t);
    fail_noyield(std::to_string(done_) + " thread(s) of block (" + dims(blockIdx) +
                 ") returned (first: thread " + std::to_string(gone.front()) + ") while " +
                 std::to_string(barrier_waiting_) + " wait at __syncthreads " +
                 str(barrier_site_));
  }

  [[noreturn]] void deadlock() {
    std::ostringstream os;
    os << "deadlock in block (" << dims(blockIdx) << "): " << (nthreads_ - done_)
       << " thread(s) wait and none can run;";
    int shown = 0;
    for (int t = 0; t < nthreads_ && shown < 8; ++t) {
      const Fiber& f = fibers_[t];
      if (f.state == FiberState::kDone) continue;
      os << " thread " << t << " at "
         << (f.state == FiberState::kBarrier ? "__syncthreads" : warp_op_name(f.op)) << " "
         << str(f.site) << ";";
      ++shown;
    }
    throw Error(prefix() + os.str());
  }

  // Records the first error and leaves the fiber for good (the launch is aborted).
  [[noreturn]] void fail(const std::string& what) {
    fail_noyield(what);
    for (;;) leave(*current_, true);
  }

  void fail_noyield(const std::string& what) {
    if (failed_) return;
    failed_ = true;
    message_ = prefix() + what;
  }

  std::string prefix() const {
    return std::string("CUDA emulation: kernel ") + launch_.kernel + " launched at " +
           str(launch_.site) + ": ";
  }

  std::string who(const Fiber& f) const {
    return std::to_string(f.tid) + " (warp " + std::to_string(f.warp) + ", lane " +
           std::to_string(f.lane) + ") of block (" + dims(blockIdx) + ")";
  }

  static std::string dims(uint3 d) { return dims(dim3(d.x, d.y, d.z)); }
  static std::string dims(dim3 d) {
    return std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z);
  }
  static std::string hex(unsigned v) {
    std::ostringstream os;
    os << std::hex << v;
    return os.str();
  }
  static std::string lanes_text(unsigned lanes) {
    std::string s = "lanes";
    for (int l = 0; l < kLanes; ++l)
      if (lanes >> l & 1u) s += " " + std::to_string(l);
    return s;
  }

  std::mutex mutex_;
  Launch launch_{"", {}};
  void (*body_)(void*) = nullptr;
  void* body_ctx_ = nullptr;
  std::vector<Fiber> fibers_;
  std::vector<int> order_, rank_;  // order_[rank] = thread, rank_[thread] = rank
  std::vector<uint64_t> ready_;    // bit r: the thread of rank r can run
  std::vector<std::vector<WarpGroup>> warp_groups_;
  std::vector<unsigned> gone_;     // per warp: lanes that returned (or do not exist)
  Fiber* current_ = nullptr;
  Context main_;
#ifdef DEQ_EMU_ASAN
  const void* main_stack_lo_ = nullptr;
  size_t main_stack_size_ = 0;
#endif
  int nthreads_ = 0, nwarps_ = 0, barrier_waiting_ = 0, done_ = 0;
  Site barrier_site_;
  bool failed_ = false;
  std::string message_;
  Schedule schedule_ = Schedule::kForward;
  uint64_t seed_ = 0, launch_index_ = 0;
  Stats stats_;
};

inline Runtime& runtime() {
  static Runtime rt;
  return rt;
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles of values up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
T shuffle(WarpOp op, unsigned mask, T v, int arg, int width, Site site) {
  return from_bits<T>(runtime().warp_op(op, mask, to_bits(v), sizeof(T), arg, width, site));
}

}  // namespace detail

using detail::Runtime;
using detail::runtime;

// Launch object returned by launch(); calling it with the kernel's arguments runs the grid.
template <typename... P>
class Launcher {
 public:
  Launcher(void (*kernel)(P...), const char* name, const char* file, int line, dim3 grid,
           dim3 block, size_t smem, cudaStream_t)
      : kernel_(kernel), launch_{name, {file, line}}, grid_(grid), block_(block), smem_(smem) {}

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    // Arguments are converted to the parameter types once, as a launch does; each
    // thread then receives its own copy.
    struct Bound {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } bound{kernel_, std::tuple<std::decay_t<P>...>(static_cast<P>(std::forward<A>(args))...)};
    runtime().run(launch_, grid_, block_, smem_,
                  [](void* ctx) {
                    auto* b = static_cast<Bound*>(ctx);
                    std::apply(b->kernel, b->params);
                  },
                  &bound);
  }

 private:
  void (*kernel_)(P...);
  detail::Launch launch_;
  dim3 grid_, block_;
  size_t smem_;
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), const char* name, const char* file, int line,
                      dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = nullptr) {
  return Launcher<P...>(kernel, name, file, line, grid, block, smem, stream);
}

inline void set_schedule(Schedule s, uint64_t seed = 0) { runtime().set_schedule(s, seed); }
inline Stats stats() { return runtime().stats(); }

}  // namespace deq_emu

// ---------------------------------------------------------------------------
// Synchronisation and warp intrinsics (the call site is recorded for errors)
// ---------------------------------------------------------------------------

// Atomics, fences and cache-hinted loads. Blocks run one after another and a thread only yields
// at a synchronisation point, so a read-modify-write is atomic as written and a fence has
// nothing left to order; which block finishes last is varied by the block order instead.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline void __threadfence() {}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  deq_emu::runtime().syncthreads({file, line});
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  deq_emu::runtime().warp_op(deq_emu::detail::WarpOp::kSync, mask, 0, 0, 0, 32, {file, line});
}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return deq_emu::detail::shuffle(deq_emu::detail::WarpOp::kShflIdx, mask, v, src_lane, width,
                                  {file, line});
}

template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return deq_emu::detail::shuffle(deq_emu::detail::WarpOp::kShflUp, mask, v,
                                  static_cast<int>(delta), width, {file, line});
}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return deq_emu::detail::shuffle(deq_emu::detail::WarpOp::kShflDown, mask, v,
                                  static_cast<int>(delta), width, {file, line});
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return deq_emu::detail::shuffle(deq_emu::detail::WarpOp::kShflXor, mask, v, lane_mask, width,
                                  {file, line});
}

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(deq_emu::runtime().warp_op(
      deq_emu::detail::WarpOp::kBallot, mask, pred != 0, 4, 0, 32, {file, line}));
}

inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(deq_emu::runtime().warp_op(deq_emu::detail::WarpOp::kAny, mask,
                                                     pred != 0, 4, 0, 32, {file, line}));
}

inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(deq_emu::runtime().warp_op(deq_emu::detail::WarpOp::kAll, mask,
                                                     pred != 0, 4, 0, 32, {file, line}));
}
