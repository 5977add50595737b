#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace lowbit {
namespace cpu {

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#if defined(LOWBIT_X86)
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2");
    f.fma = __builtin_cpu_supports("fma");
    f.f16c = __builtin_cpu_supports("f16c");
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    f.avx512vl = __builtin_cpu_supports("avx512vl");
    f.avx512_vbmi = __builtin_cpu_supports("avx512vbmi");
    f.avx512_vnni = __builtin_cpu_supports("avx512vnni");
    f.avx_vnni = __builtin_cpu_supports("avxvnni");
    f.avx512_bf16 = __builtin_cpu_supports("avx512bf16");
    f.amx_bf16 = __builtin_cpu_supports("amx-bf16");
#endif
    return f;
  }();
  return features;
}

namespace {

struct IsaEntry {
  const char* name;
  const KernelTable& (*table)();
  bool (*supported)();
};

const std::vector<IsaEntry>& isa_entries() {  // lowest first
  static const std::vector<IsaEntry> entries = {
      {"scalar", scalar_kernels, [] { return true; }},
#if defined(LOWBIT_X86)
      {"avx2", avx2_kernels,
       [] { return cpu_features().avx2 && cpu_features().fma && cpu_features().f16c; }},
      {"avx512_vnni", avx512_vnni_kernels,
       [] {
         const CpuFeatures& f = cpu_features();
         return f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512vl && f.avx512bw && f.avx512_vbmi && f.avx512_vnni;
       }},
#endif
  };
  return entries;
}

const KernelTable* find_supported(const std::string& name) {
  for (const IsaEntry& e : isa_entries())
    if (name == e.name) {
      TORCH_CHECK_VALUE(e.supported(), "lowbit: CPU ISA '", name, "' is not supported by this CPU");
      return &e.table();
    }
  TORCH_CHECK_VALUE(false, "lowbit: unknown CPU ISA '", name, "' (compiled: ",
                    c10::Join(", ", compiled_isas()), ")");
  return nullptr;
}

const KernelTable* initial_kernels() {
  if (const char* env = std::getenv("LOWBIT_CPU_ISA"); env && *env) return find_supported(env);
  const KernelTable* best = nullptr;
  for (const IsaEntry& e : isa_entries())
    if (e.supported()) best = &e.table();
  return best;
}

std::atomic<const KernelTable*>& active() {
  static std::atomic<const KernelTable*> table{initial_kernels()};
  return table;
}

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const IsaEntry& e : isa_entries()) names.emplace_back(e.name);
  return names;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> names;
  for (const IsaEntry& e : isa_entries())
    if (e.supported()) names.emplace_back(e.name);
  return names;
}

const KernelTable& active_kernels() { return *active().load(std::memory_order_relaxed); }

void set_isa(const std::string& name) { active().store(find_supported(name)); }

bool native_bf16_gemm() { return cpu_features().avx512_bf16 || cpu_features().amx_bf16; }

int64_t int8_max_rows(bool bfloat16_activations) {
  const KernelTable& k = active_kernels();
  return bfloat16_activations && native_bf16_gemm() ? k.int8_max_rows_vs_bf16 : k.int8_max_rows;
}

}  // namespace cpu
}  // namespace lowbit
