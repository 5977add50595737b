// Host interface of the lowbit CUDA kernels: plain structs of device pointers, sizes and a stream.
// No torch here, so the kernel files (gemv.cu, gemm.cu, elementwise.cu) compile, and are checked in CI,
// without a CUDA build of torch; ops_cuda.cu turns tensors into these structs.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../format.h"

namespace lowbit {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A quantized weight [N, Kp] in the canonical layout of docs/FORMAT.md, on the device.
struct PackedWeight {
  Format format;
  const uint8_t* codes;    // row n starts at codes + n * row_stride
  int64_t row_stride;      // bytes between rows: row_bytes, or more for a padded copy (ops_cuda.cu)
  int64_t row_bytes;       // packed bytes of one row's Kp columns
  int vector_bytes;        // widest load the rows allow: 16, 8 or 4 bytes (int3.5 only for 8 and 4);
                           // see weight_vector_bytes
  const uint16_t* scales;  // [N, n_groups] float16 bits
  const uint16_t* zeros;   // [N, n_groups] float16 bits
  int64_t N;               // out features
  int64_t Kp;              // in features padded up to a multiple of group_size
  int64_t group_size;      // 32, 64, 128 or 256
  int64_t n_groups;        // Kp / group_size
};

// The widest load the matmul kernels may use for a weight whose rows start at `codes` every
// `row_stride` bytes, or 0 when the rows are too badly aligned for them (the caller then makes an
// aligned copy). int4 rows are always a multiple of 16 bytes; int3.5 rows (7 bytes per 16 columns) are
// a multiple of 16 bytes when Kp is a multiple of 256, of 8 bytes for 128, of 4 bytes for 64.
inline int weight_vector_bytes(Format format, const void* codes, int64_t row_stride, int64_t Kp) {
  const auto address = reinterpret_cast<uintptr_t>(codes);
  const auto aligned = [&](int64_t bytes) { return address % bytes == 0 && row_stride % bytes == 0; };
  if (format == Format::kInt4) return aligned(16) ? 16 : 0;
  if (aligned(16) && Kp % 256 == 0) return 16;
  if (aligned(8) && Kp % 128 == 0) return 8;
  return aligned(4) ? 4 : 0;
}

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

// Decode: tensor-core GEMV for M <= kMaxGemvRows, streaming the weight once with wide loads.
constexpr int64_t kMaxGemvRows = 8;
cudaError_t gemv(const PackedWeight& w, const Activations& x, const Output& y, cudaStream_t stream);

// Prefill: tiled tensor-core GEMM with the weight dequantized in registers as the tiles arrive. Split
// over K when there are too few output tiles to fill the GPU; the partial sums then go through a
// float32 workspace of workspace_floats elements.
struct GemmPlan {
  int config;     // tile shape (gemm.cu)
  int splits;     // K ranges computed by separate blocks
  int64_t stages_per_split;
  int64_t workspace_floats;
};
GemmPlan plan_gemm(const PackedWeight& w, int64_t M, int num_sms);
cudaError_t gemm(const PackedWeight& w, const Activations& x, const Output& y, const GemmPlan& plan,
                 float* workspace, cudaStream_t stream);

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
