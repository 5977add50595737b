// Which CPU kernels run: the best the running CPU supports, unless LOWBIT_CPU_ISA or set_cpu_isa()
// asks for a lower one (tests run every ISA the machine has).
#pragma once
#include <string>
#include <vector>

#include "kernels.h"

namespace lowbit {
namespace cpu {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512_vbmi = false;
  bool avx512_vnni = false, avx_vnni = false;
  bool avx512_bf16 = false, amx_bf16 = false;  // native bfloat16 dot products (the GEMM path's choice)
};

const CpuFeatures& cpu_features();
std::vector<std::string> available_isas();  // lowest first
std::vector<std::string> compiled_isas();
const KernelTable& active_kernels();
void set_isa(const std::string& name);  // throws c10::ValueError when unknown or not supported here

// Whether the CPU has native bfloat16 dot products: then bfloat16 activations multiply in bfloat16 on
// the BLAS path (oneDNN's bfloat16 GEMM runs several times faster than the float32 one there).
bool native_bf16_gemm();
// Activation rows up to which linear runs the active int8 kernels rather than dequantize + BLAS.
int64_t int8_max_rows(bool bfloat16_activations);

}  // namespace cpu
}  // namespace lowbit
