// Which clones of the CPU loops (chunks.h) run on this machine, for build_info().
#include "../ops.h"
#include "chunks.h"

namespace deq_ext {

const char* cpu_kernel_isa() {
#ifdef DEQ_EXT_AVX2_CLONES
  if (cpu_has_avx2_fma()) return "avx2";
#endif
  return "baseline";
}

}  // namespace deq_ext
