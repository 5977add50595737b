// CPU kernel interface: plain structs of raw pointers, shared by the per-ISA kernel files
// (isa_*.cpp, compiled with different -m flags) and the op layer (ops_cpu.cpp).
//
// The ISA files include no torch or std headers with inline code: an inline function compiled with
// -mavx512f in one file could be picked by the linker for every caller and crash on older CPUs.
#pragma once
#include <cstdint>

#include "../format.h"

namespace lowbit {
namespace cpu {

// Columns are processed in chunks of 32 (every group size is a multiple of 32).
constexpr int kChunk = 32;
// Bytes of packed codes per 32-column chunk: int4 = 32 x 4 bits, int3.5 = two 7-byte blocks, int8 = 32.
constexpr int64_t chunk_bytes(Format f) { return packed_row_bytes(f, kChunk); }

// One quantized weight in the canonical layout of docs/FORMAT.md.
struct QWeight {
  Format format;
  const uint8_t* codes;    // [N, Kp * bits / 8] packed codes
  const uint16_t* scales;  // [N, Kp / group_size] float16 bits
  const uint16_t* zeros;   // [N, Kp / group_size] float16 bits
  int64_t N;               // out features
  int64_t Kp;              // in features padded up to a multiple of group_size
  int64_t group_size;
};

// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for rows n in [n_begin, n_end), M <= kMaxGemvRows.
// Activations come quantized to int8 in blocks of xblock columns (dot products run on integer units):
//   x[m, block b] ~= xscale[m, b] * xq[m, block b]
struct GemvArgs {
  QWeight w;
  const int8_t* xq;     // [M, Kp] in the ISA's x-order (below); 3-bit columns pre-scaled by 15/7
  const float* xscale;  // [M, Kp / xblock]
  const float* xsum;    // [M, Kp / group_size] per-group sums of the exact (unscaled) activations
  const float* bias;    // [N] or nullptr
  float* y;             // [M, N]
  int64_t M;
  int64_t xblock;       // kXBlock, or group_size when smaller
};
constexpr int64_t kMaxGemvRows = 8;
constexpr int64_t kXBlock = 64;

// Dequantized rows for the GEMM path: out[n - n_begin, :] = W[n, :] in x-order, [n_end - n_begin, Kp],
// as float32 (out) or as bfloat16 rounded to nearest even (out_bf16); the other pointer is null.
struct DequantArgs {
  QWeight w;
  float* out;
  uint16_t* out_bf16;
};

// Attention of one new token per (sequence, head) over a static KV cache (the fused decode step):
// item i = r * H + h attends with query q[r, h] over positions 0 .. lengths[r] - 1 of cache slot slots[r],
// key/value head h / (H / Hkv); softmax(q . k * scale) . v goes to out[r, h].
struct AttendArgs {
  const float* q;          // [n, H, D]
  const float* k;          // [B, Hkv, S, D] the cache
  const float* v;          // [B, Hkv, S, D]
  const int64_t* slots;    // [n] cache rows
  const int64_t* lengths;  // [n] positions attended, 1 .. S
  float* scores;           // [max(lengths)] scratch, one item's scores at a time
  float* out;              // [n, H, D]
  int64_t H, Hkv, S, D;
  float scale;
};

// Each ISA decodes a 32-column chunk into registers in whatever lane order is cheapest for it.
// x_order[format][i] is the chunk column held by lane position i; activations are laid out to match,
// so no shuffle is needed in the inner loop.
struct KernelTable {
  const char* name;
  int x_order[kFormats][kChunk];
  // Activation rows up to which linear runs gemv (in blocks of kMaxGemvRows rows) rather than dequant
  // and BLAS: against a float32 GEMM, and against a native bfloat16 GEMM (measured crossovers).
  int64_t int8_max_rows, int8_max_rows_vs_bf16;
  void (*gemv)(const GemvArgs& args, int64_t n_begin, int64_t n_end);
  void (*dequant)(const DequantArgs& args, int64_t n_begin, int64_t n_end);
  void (*attend)(const AttendArgs& args, int64_t item_begin, int64_t item_end);
};

const KernelTable& scalar_kernels();
#if defined(LOWBIT_X86)
const KernelTable& avx2_kernels();
const KernelTable& avx512_vnni_kernels();
#endif

}  // namespace cpu
}  // namespace lowbit
