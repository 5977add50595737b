// AVX2 + FMA + F16C kernels. Compiled with -mavx2 -mfma -mf16c; called only when the CPU has them.
#include <immintrin.h>

#include "kernels.h"

namespace lowbit {
namespace cpu {
namespace avx2_isa {

#include "avx2_isa.h"
using Isa = Avx2Isa;
#include "kernel_body.h"

}  // namespace avx2_isa

const KernelTable& avx2_kernels() {
  static const KernelTable table = avx2_isa::make_table("avx2");
  return table;
}

}  // namespace cpu
}  // namespace lowbit
