// Stub of c10/cuda/CUDAGuard.h for the CUDA emulation (csrc/emu/cuda_emu.h): emulated
// kernels read and write CPU tensors, so the guard checks that and otherwise does nothing.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10 {
namespace cuda {

class CUDAGuard {
 public:
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "CUDA emulation: kernels run on CPU tensors, got a tensor on ",
                device);
  }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

}  // namespace cuda
}  // namespace c10
