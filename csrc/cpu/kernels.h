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

// The interleaved layout (interleave.h), which ISAs with 16-lane integer dot products run from instead of the
// canonical one: rows in blocks of kInterleave, so that each 32-bit lane of a dot product belongs to one row and
// a block's 16 outputs come out as one vector, without a reduction per row. The GEMV over it takes GemvArgs
// whose QWeight views the interleaved buffers and writes rows [16 b_begin, 16 b_end) (clipped to N).
//
// Per block of 16 rows, each 32-column chunk's codes are steps of 64 bytes; 32-bit lane r of a step holds row
// r's codes of 4 columns (int8), 8 columns (int4: column j in the low nibble of byte j, j + 4 in the high
// one), or, for int3.5, steps of 16 columns in 112 bytes: 64 bytes of the 8 even columns' 4-bit codes (as
// int4, columns 0, 2, 4, 6 low and 8 .. 14 high) and 48 of the 8 odd columns' 3-bit codes (row r's 24 bits at
// byte 3r, odd column 2c + 1 at bit 3c). Scales and zeros: float16 [blocks, groups, 16].
constexpr int64_t kInterleave = 16;
// Activation rows per pass of the interleaved GEMV (GemvArgs::M <= this): eight rows' accumulators and running
// sums fill the 32 vector registers, with one integer accumulator per row.
constexpr int64_t kInterleavedRows = 8;
// Lane position i of a chunk holds column interleaved_x_order(f, i): in order, but int3.5's evens, then
// odds, per 16 columns (each 4-column run of x feeds one dot product).
constexpr int interleaved_x_order(Format f, int i) {
  return f == Format::kInt35 ? i / 16 * 16 + (i % 16 < 8 ? 2 * (i % 8) : 2 * (i % 8) + 1) : i;
}
// Bytes of one block's chunk, and of the buffer past the last block that a kernel may read (int3.5's
// 48-byte odd part is loaded as 64 bytes).
constexpr int64_t interleaved_chunk_bytes(Format f) { return kInterleave * chunk_bytes(f); }
constexpr int64_t kInterleavedTailBytes = 64;

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
  const float* k;          // [B, Hkv, S, D] the cache, float32 ...
  const float* v;          // [B, Hkv, S, D]
  const uint16_t* k_half;  // ... or float16 (then k and v are null, else these)
  const uint16_t* v_half;
  const int64_t* slots;    // [n] cache rows
  const int64_t* lengths;  // [n] positions attended, 1 .. S
  float* scores;           // [H / Hkv, max(lengths)] scratch: the scores of up to one key/value head's items
  float* out;              // [n, H, D]
  int64_t H, Hkv, S, D;
  float scale;
};

// One activation block quantized to int8 (quantize_block): its scale (max |v| / 127, or NaN when a value is
// not finite: then every code is 0) and the sums of its codes, all of them and those on odd lanes.
struct XBlockCodes {
  float scale;
  int32_t all, odd;
};

// The "mse" grid search of lowbit.quantize (its reference: _mse_grid) over n groups of L columns: per group the
// min-max grid, and the min-max range shrunk by each ratio then refit `refits` times by weighted least squares;
// the float16 scale and zero point with the least weighted squared error are kept.
struct GridArgs {
  const float* groups;   // [n, L]
  const float* weight;   // [P, L]: group i's column weights are row i % P; nullptr: every column weighs 1
  const float* ratios;   // [n_ratios]
  uint16_t* scales;      // [n] float16 bits
  uint16_t* zeros;       // [n] float16 bits
  int64_t n, L, P, n_ratios, refits;
  float top;             // the largest code (of int3.5's 4-bit positions)
  bool int35;            // odd columns take 3-bit codes, 15/7 steps apart
  bool integer_zeros;    // zero points rounded to integers in [0, top]
};
// Threads take the groups in blocks of kGridBlock, a multiple of every ISA's lanes (so that only the last vector
// of groups can be part empty); a kernel call's scratch holds kGridScratchPerColumn floats per column.
constexpr int64_t kGridBlock = 16;
constexpr int64_t kGridScratchPerColumn = 2 * kGridBlock;

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
  // RoPE of one head x [d] with the tables of its position, cos, sin [d], as models.llama.apply_rope computes it:
  // halves (a, b) -> (a cos - b sin, b cos + a sin), into out [d].
  void (*rope)(const float* x, const float* cos, const float* sin, int64_t d, float* out);
  // out [n] = x [n] as float16 bits, rounded to nearest even (as torch converts).
  void (*to_half)(const float* x, int64_t n, uint16_t* out);
  // out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i], i < n (SwiGLU).
  void (*silu_mul)(const float* gate, const float* up, int64_t n, float* out);
  // v [n] (n <= kXBlock) -> q [n], codes round(v / scale) rounded half away from zero; lane_odd [n]: 0 or 1.
  XBlockCodes (*quantize_block)(const float* v, int64_t n, const int32_t* lane_odd, int8_t* q);
  // Groups [begin, end) of the grid search; scratch: L * kGridScratchPerColumn floats. False when some group's
  // min-max range overflows a float16 scale (the results are then meaningless).
  bool (*mse_grid)(const GridArgs& args, int64_t begin, int64_t end, float* scratch);
  // nullptr when the ISA has no kernel for the interleaved layout (whose x-order is interleaved_x_order).
  void (*interleaved_gemv)(const GemvArgs& args, int64_t b_begin, int64_t b_end);
};

const KernelTable& scalar_kernels();
#if defined(LOWBIT_X86)
const KernelTable& avx2_kernels();
const KernelTable& avx512_vnni_kernels();
#endif

}  // namespace cpu
}  // namespace lowbit
