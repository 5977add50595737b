// The pieces of the CPU linear op (ops_cpu.cpp) that the fused decode step (decode.cpp) calls directly:
// weight views, the activation layout and the int8 path, on raw buffers.
#pragma once
#include <algorithm>
#include <optional>

#include <ATen/ATen.h>

#include "../checks.h"
#include "kernels.h"

namespace lowbit {
namespace cpu {

QWeight view_weight(const WeightShape& s, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros);

// The kernels index x with perm, so it must be a permutation of [0, K).
void check_perm_values(const char* op, const std::optional<at::Tensor>& perm, int64_t K);

// Where activations go: x [M, K] is laid out per 32-column chunk in the kernels' x-order, with perm
// applied and zero padding up to Kp. src[j] is the element offset within a row of x (column stride
// `stride`) that lands at position j, or -1 for padding.
void source_offsets(int64_t K, int64_t Kp, const int32_t* perm, const int* x_order, int64_t stride, int64_t* src);

// Rows per parallel task for row-wise work of row_values values a row (activation quantization, the decode
// step's norms, RoPE, SwiGLU, residuals): about 4096 values each, so that a batch of a few rows is split (the
// other thread would only wait for it) while one row runs inline.
inline int64_t rows_per_task(int64_t row_values) { return std::max<int64_t>(1, 4096 / row_values); }

// Activation block of the int8 path: kXBlock columns, or the group when it is smaller.
inline int64_t int8_xblock(const QWeight& w) { return std::min(kXBlock, w.group_size); }

// The int8 path's buffers: xq [M, Kp], xscale [M, Kp / xblock], xsum [M, n_groups], y [M, N] (float32
// results, unless they go straight into the output).
struct Int8Buffers {
  int8_t* xq;
  float *xscale, *xsum, *y;
  at::Tensor storage;  // owns them when they are not someone's reusable scratch
};

// x rows [M, K] (row stride row_stride, element offsets src) as int8 codes for kernels of this x-order.
template <typename T>
void quantize_x(const KernelTable& kernels, const int* x_order, const QWeight& w, const int64_t* src, const T* x,
                int64_t row_stride, int64_t M, const Int8Buffers& buf);

// y [M, N] = the quantized activations in buf @ W.T (+ bias), on kernels' GEMV.
void int8_gemv(const KernelTable& kernels, const QWeight& w, int64_t M, const float* bias, const Int8Buffers& buf,
               float* y);

// A quantized weight in the interleaved layout (kernels.h), made from the canonical one at load by kernels
// that run from it. Its own buffers; view has the canonical weight's format, N, Kp and group size.
struct InterleavedWeight {
  at::Tensor codes;          // uint8, every block's chunks, then kInterleavedTailBytes
  at::Tensor scales, zeros;  // float16 [blocks, n_groups, kInterleave], 0 on the rows past N
  QWeight view;
};
InterleavedWeight interleave(const QWeight& w);

// The x-order of interleaved kernels, as KernelTable::x_order holds it for the canonical ones.
struct InterleavedOrder {
  int x_order[kFormats][kChunk];
  constexpr InterleavedOrder() : x_order{} {
    for (int f = 0; f < kFormats; ++f)
      for (int i = 0; i < kChunk; ++i) x_order[f][i] = interleaved_x_order(static_cast<Format>(f), i);
  }
};
inline constexpr InterleavedOrder kInterleavedOrder{};

// int8_gemv over an interleaved weight (kernels.interleaved_gemv must exist).
void interleaved_gemv(const KernelTable& kernels, const QWeight& w, int64_t M, const float* bias,
                      const Int8Buffers& buf, float* y);

}  // namespace cpu
}  // namespace lowbit
