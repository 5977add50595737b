// Memory for the weights that the kernels stream once per token: the layouts repacked at load.
#pragma once
#include <ATen/ATen.h>

namespace lowbit {
namespace cpu {

// A zero-filled CPU tensor carved from large mappings that Linux may back with 2 MiB pages (transparent huge
// pages, granted on request where the system allows them; ordinary memory elsewhere). A decode step reads every
// weight once: on 4 KiB pages that is a TLB miss every 4 KiB of each stream. With 2 MiB pages TinyLlama's fused
// step ran 1.11x as fast on the 2-core VM while its memory was fast, 1.04x while slow (medians of 30 and 12
// interleaved rounds). Weights share mappings, so layers under 2 MiB (SmolLM2's) get them too, unpadded.
at::Tensor zeros_for_streaming(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace cpu
}  // namespace lowbit
