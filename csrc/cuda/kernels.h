// Host interface of the lowbit CUDA kernels: plain structs of device pointers, sizes and a stream.
// No torch here, so the kernel files (tiled.cu, elementwise.cu) compile, and are checked in CI,
// without a CUDA build of torch; ops_cuda.cu turns tensors into these structs.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../format.h"

namespace lowbit {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A quantized weight [N, Kp] in the canonical layout of docs/FORMAT.md, on the device (any alignment).
struct PackedWeight {
  Format format;
  const uint8_t* codes;    // [N, row_bytes]
  int64_t row_bytes;       // packed bytes of one row's Kp columns
  const uint16_t* scales;  // [N, n_groups] float16 bits
  const uint16_t* zeros;   // [N, n_groups] float16 bits
  int64_t N;               // out features
  int64_t Kp;              // in features padded up to a multiple of group_size
  int64_t group_size;      // 32, 64, 128 or 256
  int64_t n_groups;        // Kp / group_size
};

// A quantized weight in the CUDA tile layout (python/lowbit/tiled.py, docs/FORMAT.md), on the device.
struct TiledWeight {
  Format format;
  const uint8_t* codes;    // [n_tiles, n_units, unit_bytes], 16-byte aligned
  const uint16_t* scales;  // [n_tiles, n_groups, 16] float16 bits, entry 2 g + j: row 16 t + g + 8 j
  const uint16_t* zeros;   // [n_tiles, n_groups, 16]
  int64_t N;               // out features (rows past N in the last tile are padding)
  int64_t n_tiles;         // ceil(N / 16)
  int64_t n_units;         // Kt / 128, Kt = Kp rounded up to 128
  int64_t unit_bytes;      // 1024 (int4) or 896 (int3.5)
  int64_t group_size;      // 32, 64, 128 or 256
  int64_t n_groups;        // Kt / group_size
};

// Activations of a matmul: float16 [M, cols] with row m at x + m * row_stride, in stored-column order
// (perm applied). Row m holds the input divided by row_scale[m] (nullptr: no scaling), a power of two
// that brings bfloat16 and float32 inputs into float16 range without rounding bfloat16 values.
struct Activations {
  const uint16_t* x;       // float16 bits, 16-byte aligned
  int64_t row_stride;      // elements, a multiple of 8
  int64_t cols;            // columns present, a multiple of 8; the kernels read columns >= cols as 0
  const float* row_scale;  // [M] or nullptr
  int64_t M;
};

// y [M, N] = x W^T * row_scale (+ bias), contiguous, float32 accumulation rounded once to dtype.
struct Output {
  void* y;
  const void* bias;  // [N] in dtype, or nullptr
  DType dtype;
};

// Up to kMaxTiledRows activation rows: the tensor-core kernel on the tile layout (tiled.cu), which
// streams the weight once per call. token_tiles tiles of 8 rows (1 or 2); k_warps warps of a block
// split K for the same 16-row tile.
constexpr int64_t kMaxTiledRows = 16;
struct TiledPlan {
  int token_tiles;
  int k_warps;
};
TiledPlan plan_tiled(const TiledWeight& w, int64_t M, int num_sms);
cudaError_t tiled_matmul(const TiledWeight& w, const Activations& x, const Output& y, const TiledPlan& plan,
                         cudaStream_t stream);

// W [N, K] in logical column order from the tile layout, as tiled_dequantize computes it: the float32
// operations of lowbit.formats.dequantize, in the same order.
cudaError_t tiled_dequantize(const TiledWeight& w, const int32_t* perm, int64_t K, void* out, DType dtype,
                             cudaStream_t stream);

// x [M, K] (element strides stride0, stride1; float32, float16 or bfloat16) -> Activations storage
// out [M, out_stride] float16: column j holds x[:, perm[j]] (x[:, j] without perm), zero from K on.
// With scale_rows, row m is divided by a power of two row_scale[m] that puts max |x[m]| in
// [2^14, 2^15). perm entries outside [0, K) read as 0 (values are not validated on the device).
cudaError_t prepare_activations(const void* x, DType dtype, int64_t M, int64_t K, int64_t stride0,
                                int64_t stride1, const int32_t* perm, bool scale_rows, uint16_t* out,
                                int64_t out_stride, float* row_scale, cudaStream_t stream);

// W [N, K] in logical column order (out[n, perm[j]] = stored column j) as dtype, computed in float32
// exactly as the reference (lowbit.formats.dequantize). Any alignment of codes.
cudaError_t dequantize(const PackedWeight& w, const int32_t* perm, int64_t K, void* out, DType dtype,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace lowbit
