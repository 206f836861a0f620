// deq_ext._C: the ops in the dispatcher (torch.ops.deq_ext.*) with CPU kernels, and
// CUDA kernels when built with them; pybind11 only for build_info.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

#include "op_schemas.h"
#include "ops.h"

TORCH_LIBRARY(deq_ext, m) { deq_ext::define_ops(m); }

TORCH_LIBRARY_IMPL(deq_ext, CPU, m) { deq_ext::impl_ops<deq_ext::CpuKernels>(m); }

#ifdef DEQ_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(deq_ext, CUDA, m) { deq_ext::impl_ops<deq_ext::CudaKernels>(m); }
#endif

namespace {

#define DEQ_EXT_STR2(x) #x
#define DEQ_EXT_STR(x) DEQ_EXT_STR2(x)

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef DEQ_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(DEQ_EXT_STR(DEQ_EXT_CUDA_ARCHS));
#else
  info["cuda"] = false;
  info["cuda_archs"] = std::string();
#endif
  info["torch_version"] = std::string(DEQ_EXT_STR(DEQ_EXT_TORCH_VERSION));
  info["cpu_kernels"] = std::string(deq_ext::cpu_kernel_isa());
#ifdef _OPENMP
  info["openmp"] = true;  // at::parallel_for in the CPU kernels uses torch's threads
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deq_ext compiled ops: importing this module registers torch.ops.deq_ext.* "
            "(their semantics: deq_ext/reference.py)";
  m.def("build_info", &build_info, "What was compiled: CPU, CUDA, architectures.");
}
