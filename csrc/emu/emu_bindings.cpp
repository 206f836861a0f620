// deq_ext._C_emu (test-only): the CUDA kernels of csrc/cuda, compiled as host C++ on
// the CUDA emulation (cuda_emu.h), registered as torch.ops.deq_ext_emu.* for CPU
// tensors with the same schemas and argument checks as torch.ops.deq_ext.*.
// Never used by the solvers unless a test asks for it.
#include "cuda_emu.h"

#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../op_schemas.h"

TORCH_LIBRARY(deq_ext_emu, m) { deq_ext::define_ops(m); }

TORCH_LIBRARY_IMPL(deq_ext_emu, CPU, m) { deq_ext::impl_ops<deq_ext::CudaKernels>(m); }

namespace {

// Two deliberately broken kernels, so that a test can see an emulation error arrive in
// Python as a RuntimeError (the kernels of csrc/cuda have no such bug to show it with).
__global__ void too_wide(float* out) { out[threadIdx.x] = 1.0f; }

__global__ void return_before_barrier(float* out) {
  if (threadIdx.x >= 16) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

void launch_broken_kernel(const std::string& name) {
  std::vector<float> out(2048);
  if (name == "too_wide") {
    deq_emu::launch(too_wide, "too_wide", __FILE__, __LINE__, 1, 2048)(out.data());
  } else if (name == "return_before_barrier") {
    deq_emu::launch(return_before_barrier, "return_before_barrier", __FILE__, __LINE__, 1, 64)(
        out.data());
  } else {
    TORCH_CHECK(false, "unknown broken kernel '", name, "'");
  }
}

void set_schedule(const std::string& name, uint64_t seed) {
  deq_emu::Schedule s;
  if (name == "forward") {
    s = deq_emu::Schedule::kForward;
  } else if (name == "reverse") {
    s = deq_emu::Schedule::kReverse;
  } else if (name == "random") {
    s = deq_emu::Schedule::kRandom;
  } else {
    TORCH_CHECK(false, "deq_ext emulation: schedule must be 'forward', 'reverse' or 'random', got '",
                name, "'");
  }
  deq_emu::set_schedule(s, seed);
}

pybind11::dict stats() {
  const deq_emu::Stats s = deq_emu::stats();
  pybind11::dict d;
  d["launches"] = s.launches;
  d["blocks"] = s.blocks;
  d["threads"] = s.threads;
  d["switches"] = s.switches;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace pybind11::literals;
  m.doc() = "deq_ext CUDA kernels on the CPU emulation (tests only): registers "
            "torch.ops.deq_ext_emu.*";
  m.def("set_schedule", &set_schedule, "name"_a, "seed"_a = 0,
        "Order in which the threads of a block run: 'forward', 'reverse' or 'random' (seeded); "
        "the launch counter of the random schedule restarts.");
  m.def(
      "schedule",
      [] {
        return pybind11::make_tuple(deq_emu::schedule_name(deq_emu::runtime().schedule()),
                                    deq_emu::runtime().seed());
      },
      "The current schedule and seed.");
  m.def("stats", &stats, "Kernel launches, blocks, threads and context switches emulated so far.");
  m.def("launch_broken_kernel", &launch_broken_kernel, "name"_a,
        "Tests only: launch 'too_wide' (2048 threads per block) or 'return_before_barrier'.");
}
