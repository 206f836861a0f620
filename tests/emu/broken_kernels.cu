// Deliberately broken CUDA kernels (and their fixed twins) that the CUDA emulation
// (csrc/emu/cuda_emu.h) must catch. Compiled and run by tests/test_emu_catches_bugs.py
// as a small host program, without torch:
//
//   broken_kernels CASE SCHEDULE [SEED]
//
// prints one line "ok <the output: hex words, or integers>" when the kernel ran, or
// "error <message>" when the emulation reported it (exit code 0 either way;
// anything else is a crash).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Block sum whose result is valid in every thread < 1 ... read from smem after the
// barrier, with no barrier after the read: back-to-back calls on one buffer race.
__device__ __forceinline__ float block_sum_no_tail(float v, float* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float tot = 0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kWarps; ++w) tot += smem[w];
  return tot;
}

// (1) Two block sums back to back on one shared buffer: a fast warp's second write
// can land before thread 0 has read the first sum.
__global__ void two_sums_one_buffer(const float* x, float* out) {
  __shared__ float smem[kWarps];
  const float a = block_sum_no_tail(x[threadIdx.x], smem);
  const float b = block_sum_no_tail(2.0f * x[threadIdx.x] + 1.0f, smem);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = a;
    out[2 * blockIdx.x + 1] = b;
  }
}

__global__ void two_sums_two_buffers(const float* x, float* out) {
  __shared__ float smem[2][kWarps];
  const float a = block_sum_no_tail(x[threadIdx.x], smem[0]);
  const float b = block_sum_no_tail(2.0f * x[threadIdx.x] + 1.0f, smem[1]);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = a;
    out[2 * blockIdx.x + 1] = b;
  }
}

// (2) Half of each warp returns before the shuffle that names all 32 lanes.
__global__ void return_before_shuffle(const float* x, float* out) {
  const int lane = threadIdx.x % 32;
  float v = x[threadIdx.x];
  if (lane >= 16) return;
  v = warp_sum(v);
  if (lane == 0) out[threadIdx.x / 32] = v;
}

__global__ void shuffle_then_return(const float* x, float* out) {
  const int lane = threadIdx.x % 32;
  float v = lane < 16 ? x[threadIdx.x] : 0.0f;
  v = warp_sum(v);
  if (lane >= 16) return;
  if (lane == 0) out[threadIdx.x / 32] = v;
}

// (3) Shared memory written by every thread and read by another without a barrier.
__global__ void missing_barrier(const float* x, float* out) {
  __shared__ float tile[kThreads];
  tile[threadIdx.x] = x[threadIdx.x] * 3.0f;
  out[threadIdx.x] = tile[(threadIdx.x + 37) % kThreads];
}

__global__ void with_barrier(const float* x, float* out) {
  __shared__ float tile[kThreads];
  tile[threadIdx.x] = x[threadIdx.x] * 3.0f;
  __syncthreads();
  out[threadIdx.x] = tile[(threadIdx.x + 37) % kThreads];
}

// (4) An index one past the end: the last thread reads x[n].
__global__ void index_past_end(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 2.0f * x[i];
}

__global__ void index_in_bounds(const float* x, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 2.0f * x[i];
}

// The emulator's own checks.
__global__ void barriers_at_two_sites(float* out) {
  if (threadIdx.x < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void barrier_never_reached(float* out) {
  if (threadIdx.x == 0) {
    out[0] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);  // lanes 1..31 never come
  }
  __syncthreads();
}

__global__ void mask_mismatch(float* out) {
  const unsigned mask = threadIdx.x % 2 == 0 ? 0xffffffffu : 0x0000ffffu;
  out[threadIdx.x] = __shfl_xor_sync(mask, 1.0f, 1);
}

// A per-lane result slot: lane l must get exactly its partner's value, in any order.
__global__ void shuffle_patterns(const int* x, int* out) {
  const int v = x[threadIdx.x];
  const int t = threadIdx.x;
  out[8 * t + 0] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[8 * t + 1] = __shfl_down_sync(0xffffffffu, v, 3);
  out[8 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2);
  out[8 * t + 3] = __shfl_sync(0xffffffffu, v, 7);
  out[8 * t + 4] = __shfl_down_sync(0xffffffffu, v, 1, 8);
  out[8 * t + 5] = static_cast<int>(__ballot_sync(0xffffffffu, v % 3 == 0));
  out[8 * t + 6] = __shfl_xor_sync(0xffffffffu, v, 4, 16);
  __syncwarp();
  out[8 * t + 7] = __all_sync(0xffffffffu, v >= 0);
}

namespace {

std::string hex_words(const void* p, size_t n) {
  std::string s;
  const auto* w = static_cast<const uint32_t*>(p);
  char buf[16];
  for (size_t i = 0; i < n; ++i) {
    std::snprintf(buf, sizeof buf, "%08x", w[i]);
    s += buf;
  }
  return s;
}

std::vector<float> inputs(size_t n) {
  std::vector<float> x(n);
  uint32_t state = 12345;
  for (auto& v : x) {
    state = state * 1664525u + 1013904223u;
    v = static_cast<float>(state >> 8) / static_cast<float>(1u << 24) - 0.5f;
  }
  return x;
}

int run_case(const std::string& name) {
  const int blocks = 3;
  std::vector<float> x = inputs(blocks * kThreads);
  std::vector<float> out(blocks * kThreads, 0.0f);
  size_t nout = out.size();
  if (name == "two_sums_one_buffer") {
    two_sums_one_buffer<<<blocks, kThreads>>>(x.data(), out.data());
    nout = 2 * blocks;
  } else if (name == "two_sums_two_buffers") {
    two_sums_two_buffers<<<blocks, kThreads>>>(x.data(), out.data());
    nout = 2 * blocks;
  } else if (name == "return_before_shuffle") {
    return_before_shuffle<<<1, kThreads>>>(x.data(), out.data());
    nout = kWarps;
  } else if (name == "shuffle_then_return") {
    shuffle_then_return<<<1, kThreads>>>(x.data(), out.data());
    nout = kWarps;
  } else if (name == "missing_barrier") {
    missing_barrier<<<1, kThreads>>>(x.data(), out.data());
    nout = kThreads;
  } else if (name == "with_barrier") {
    with_barrier<<<1, kThreads>>>(x.data(), out.data());
    nout = kThreads;
  } else if (name == "index_past_end" || name == "index_in_bounds") {
    const int n = 700;  // not a multiple of the block: the last block has idle threads
    // Exactly n floats on the heap, so that x[n] is outside the allocation.
    float* xs = static_cast<float*>(std::malloc(n * sizeof(float)));
    std::memcpy(xs, x.data(), n * sizeof(float));
    const int nblocks = (n + kThreads - 1) / kThreads;
    if (name == "index_past_end")
      index_past_end<<<nblocks, kThreads>>>(xs, out.data(), n);
    else
      index_in_bounds<<<nblocks, kThreads>>>(xs, out.data(), n);
    std::free(xs);
    nout = n;
  } else if (name == "barriers_at_two_sites") {
    barriers_at_two_sites<<<1, kThreads>>>(out.data());
  } else if (name == "barrier_never_reached") {
    barrier_never_reached<<<1, kThreads>>>(out.data());
  } else if (name == "mask_mismatch") {
    mask_mismatch<<<1, kThreads>>>(out.data());
  } else if (name == "too_many_threads") {
    with_barrier<<<1, 2048>>>(x.data(), out.data());
  } else if (name == "shuffle_patterns") {
    std::vector<int> xi(64), res(8 * 64);
    for (int i = 0; i < 64; ++i) xi[i] = 100 + 7 * i;
    shuffle_patterns<<<1, 64>>>(xi.data(), res.data());
    std::printf("ok");
    for (int v : res) std::printf(" %d", v);
    std::printf("\n");
    return 0;
  } else {
    std::fprintf(stderr, "unknown case %s\n", name.c_str());
    return 2;
  }
  std::printf("ok %s\n", hex_words(out.data(), nout).c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s CASE forward|reverse|random [SEED]\n", argv[0]);
    return 2;
  }
  const std::string sched = argv[2];
  const uint64_t seed = argc > 3 ? std::strtoull(argv[3], nullptr, 10) : 0;
  deq_emu::set_schedule(sched == "reverse"  ? deq_emu::Schedule::kReverse
                        : sched == "random" ? deq_emu::Schedule::kRandom
                                            : deq_emu::Schedule::kForward,
                        seed);
  try {
    return run_case(argv[1]);
  } catch (const deq_emu::Error& e) {
    std::printf("error %s\n", e.what());
    return 0;
  }
}
