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

}  // namespace cpu
}  // namespace lowbit
