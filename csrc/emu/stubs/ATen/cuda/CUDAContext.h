// Stub of ATen/cuda/CUDAContext.h for the CUDA emulation (csrc/emu/cuda_emu.h):
// the current stream is a null handle, since emulated launches run at once.
#pragma once

#include <ATen/ATen.h>

namespace at {
namespace cuda {

inline cudaStream_t getCurrentCUDAStream(c10::DeviceIndex = -1) { return nullptr; }

}  // namespace cuda
}  // namespace at
