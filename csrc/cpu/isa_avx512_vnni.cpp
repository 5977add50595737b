// AVX-512 VNNI kernels: the AVX2 kernels with the integer dot product done by one vpdpbusd
// (u8 x s8, four products summed into each int32 lane) instead of vpmaddubsw + vpmaddwd.
// Compiled with -mavx512f -mavx512vl -mavx512vnni (and the AVX2 set); called only when the CPU has them.
#include <immintrin.h>

#include "kernels.h"

namespace lowbit {
namespace cpu {
namespace avx512_vnni_isa {

#include "avx2_isa.h"

struct Isa : Avx2Isa {
  using IntAcc = __m256i;  // int32 partial sums
  static IntAcc dot_acc(IntAcc acc, Codes q, const int8_t* x) {
    return _mm256_dpbusd_epi32(acc, q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
  static Vec to_float(IntAcc acc) { return _mm256_cvtepi32_ps(acc); }
};

#include "kernel_body.h"

}  // namespace avx512_vnni_isa

const KernelTable& avx512_vnni_kernels() {
  static const KernelTable table = avx512_vnni_isa::make_table("avx512_vnni");
  return table;
}

}  // namespace cpu
}  // namespace lowbit
