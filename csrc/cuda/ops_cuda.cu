// CUDA implementations of the lowbit ops: argument checks, tensors to kernel arguments (kernels.h), and
// the kernel for the number of activation rows M.
//   Tile layout (the *_tiled_* ops; what QuantizedWeight.to("cuda") holds for int4 and int3.5):
//     M <= 16          tiled_matmul (tiled.cu): tensor cores, the weight streamed once per call
//     M >= dense rows  dequantize to x's dtype, then at::linear (cuBLAS). dense rows = 17, or the
//                      environment variable LOWBIT_CUDA_DENSE_MIN_ROWS (read once; at most 17).
//   Canonical layout (int4_linear, int35_linear with CUDA tensors; int8_linear, as int8 stays canonical on
//   CUDA): dequantize + cuBLAS for every M.
// The matmul kernel takes float16 activations: float16 x is read as it is (without perm; with perm it is
// gathered once per call into a small buffer); bfloat16 and float32 x are converted to float16 with a
// per-row power-of-two scale (exact for bfloat16, float16 rounding for float32), undone in the epilogue.
// Accumulation is float32, the output is in x's dtype. Every launch goes to the current stream and
// nothing synchronizes with the host, so the ops can be captured in CUDA graphs; perm values are
// therefore not validated here (QuantizedWeight validates them): an entry outside [0, K) reads as 0
// and is never used to address memory.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "../checks.h"
#include "../op_entries.h"
#include "kernels.h"

namespace lowbit {
namespace cuda {
namespace {

constexpr int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

int64_t dense_min_rows() {
  static const int64_t rows = [] {
    const char* value = std::getenv("LOWBIT_CUDA_DENSE_MIN_ROWS");
    const int64_t rows = value ? std::atoll(value) : kMaxTiledRows + 1;
    return std::min<int64_t>(std::max<int64_t>(rows, 1), kMaxTiledRows + 1);
  }();
  return rows;
}

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

void check_cuda_device(const char* op, const at::Tensor& qweight) {
  TORCH_CHECK_VALUE(qweight.is_cuda(), op, ": expected the weight on a CUDA device, got ", qweight.device());
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(qweight.get_device());
  TORCH_CHECK_NOT_IMPLEMENTED(prop->major >= 8, op, ": lowbit's CUDA kernels need compute capability 8.0 or ",
                              "newer (mma.sync, cp.async); ", prop->name, " has ", prop->major, ".", prop->minor);
}

PackedWeight canonical_weight(const WeightShape& s, const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros) {
  return {s.format,
          qweight.data_ptr<uint8_t>(),
          packed_row_bytes(s.format, s.Kp),
          reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
          reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::Half>()),
          s.N,
          s.Kp,
          s.group_size,
          s.n_groups};
}

// The tile layout's tensors against the shapes of docs/FORMAT.md ("CUDA tile layout").
TiledWeight tiled_weight(const char* op, Format format, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& zeros, const std::optional<at::Tensor>& perm, int64_t group_size,
                         int64_t K, int64_t N) {
  TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256, op,
                    ": group_size must be one of 32, 64, 128, 256, got ", group_size);
  TORCH_CHECK_VALUE(K >= 1 && N >= 1, op, ": in_features and out_features must be positive, got ", K, " and ", N);
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, op, ": qweight must be uint8, got ", qweight.scalar_type());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kHalf && zeros.scalar_type() == at::kHalf, op,
                   ": scales and zeros must be float16, got ", scales.scalar_type(), " and ", zeros.scalar_type());
  const int64_t Kt = round_up(round_up(K, group_size), 128);
  const int64_t n_tiles = (N + 15) / 16, n_units = Kt / 128, n_groups = Kt / group_size;
  const int64_t unit_bytes = format == Format::kInt4 ? 1024 : 896;
  const std::vector<int64_t> codes_shape{n_tiles, n_units, unit_bytes}, params_shape{n_tiles, n_groups, 16};
  TORCH_CHECK_VALUE(qweight.sizes().vec() == codes_shape, op, ": tiled qweight must be [", n_tiles, ", ", n_units,
                    ", ", unit_bytes, "] for out_features ", N, ", in_features ", K, " and group_size ", group_size,
                    ", got ", qweight.sizes());
  TORCH_CHECK_VALUE(scales.sizes().vec() == params_shape && zeros.sizes().vec() == params_shape, op,
                    ": tiled scales and zeros must be [", n_tiles, ", ", n_groups, ", 16], got ", scales.sizes(),
                    " and ", zeros.sizes());
  TORCH_CHECK_VALUE(qweight.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous(), op,
                    ": qweight, scales and zeros must be contiguous");
  TORCH_CHECK_VALUE(scales.device() == qweight.device() && zeros.device() == qweight.device(), op,
                    ": qweight, scales and zeros must be on one device, got ", qweight.device(), ", ",
                    scales.device(), ", ", zeros.device());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0, op,
                    ": tiled qweight must start at a 16-byte aligned address");
  check_perm(op, perm, K, qweight);
  check_cuda_device(op, qweight);
  return {format,
          qweight.data_ptr<uint8_t>(),
          reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
          reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::Half>()),
          N,
          n_tiles,
          n_units,
          unit_bytes,
          group_size,
          n_groups};
}

// Activations in the kernel's form, and the tensors that hold them when x cannot be read as it is.
struct PreparedX {
  Activations x;
  at::Tensor values, row_scale;
};

PreparedX prepare_x(const at::Tensor& x2, const std::optional<at::Tensor>& perm, int64_t K, cudaStream_t stream) {
  const int64_t M = x2.size(0);
  const bool direct = x2.scalar_type() == at::kHalf && !perm && K % 8 == 0 && x2.stride(1) == 1 &&
                      (M == 1 || x2.stride(0) % 8 == 0) && reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16 == 0;
  if (direct) {
    const auto* values = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::Half>());
    return {{values, M == 1 ? K : x2.stride(0), K, nullptr, M}, {}, {}};
  }
  const int64_t cols = round_up(K, 8);
  const bool scale_rows = x2.scalar_type() != at::kHalf;
  at::Tensor values = at::empty({M, cols}, x2.options().dtype(at::kHalf));
  at::Tensor row_scale = scale_rows ? at::empty({M}, x2.options().dtype(at::kFloat)) : at::Tensor();
  auto* out = reinterpret_cast<uint16_t*>(values.data_ptr<at::Half>());
  float* scale = scale_rows ? row_scale.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(prepare_activations(x2.data_ptr(), dtype_of(x2.scalar_type()), M, K, x2.stride(0), x2.stride(1),
                                     perm ? perm->data_ptr<int32_t>() : nullptr, scale_rows, out, cols, scale,
                                     stream));
  return {{out, cols, cols, scale, M}, values, row_scale};
}

// x [..., K] -> x2 [M, K], and the output's shape.
std::vector<int64_t> output_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// Canonical layout on CUDA: W dequantized to x's dtype, then cuBLAS. The fast kernels read the tile
// layout that QuantizedWeight.to("cuda") makes; this path serves tensors passed to the ops directly.
at::Tensor linear_cuda(const char* op, Format format, const at::Tensor& x, const at::Tensor& qweight,
                       const at::Tensor& scales, const at::Tensor& zeros, const std::optional<at::Tensor>& perm,
                       const std::optional<at::Tensor>& bias, int64_t group_size, int64_t in_features) {
  const WeightShape s = check_weight(op, format, qweight, scales, zeros, perm, group_size, in_features);
  check_activation(op, s, x, bias, qweight);
  check_cuda_device(op, qweight);
  const c10::cuda::CUDAGuard guard(qweight.device());
  if (x.numel() == 0 || s.N == 0) return at::zeros(output_shape(x, s.N), x.options());
  at::Tensor w = at::empty({s.N, s.K}, x.options());
  C10_CUDA_CHECK(dequantize(canonical_weight(s, qweight, scales, zeros), perm ? perm->data_ptr<int32_t>() : nullptr,
                            s.K, w.data_ptr(), dtype_of(x.scalar_type()), at::cuda::getCurrentCUDAStream()));
  return at::linear(x, w, bias);
}

at::Tensor dequantize_cuda(const char* op, Format format, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, const std::optional<at::Tensor>& perm, int64_t group_size,
                           int64_t in_features) {
  const WeightShape s = check_weight(op, format, qweight, scales, zeros, perm, group_size, in_features);
  check_cuda_device(op, qweight);
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor out = at::empty({s.N, s.K}, qweight.options().dtype(at::kFloat));
  if (s.N == 0) return out;
  C10_CUDA_CHECK(dequantize(canonical_weight(s, qweight, scales, zeros), perm ? perm->data_ptr<int32_t>() : nullptr,
                            s.K, out.data_ptr(), DType::kFloat32, at::cuda::getCurrentCUDAStream()));
  return out;
}

// Tile layout: up to kMaxTiledRows rows (or LOWBIT_CUDA_DENSE_MIN_ROWS - 1) through tiled_matmul, more
// through cuBLAS on the weight dequantized to x's dtype.
at::Tensor tiled_linear_cuda(const char* op, Format format, const at::Tensor& x, const at::Tensor& qweight,
                             const at::Tensor& scales, const at::Tensor& zeros, const std::optional<at::Tensor>& perm,
                             const std::optional<at::Tensor>& bias, int64_t group_size, int64_t in_features,
                             int64_t out_features) {
  const TiledWeight w = tiled_weight(op, format, qweight, scales, zeros, perm, group_size, in_features, out_features);
  const WeightShape s{format, out_features, in_features, round_up(in_features, group_size), group_size, 0};
  check_activation(op, s, x, bias, qweight);
  const c10::cuda::CUDAGuard guard(qweight.device());
  const std::vector<int64_t> out_shape = output_shape(x, s.N);
  const at::Tensor x2 = x.reshape({-1, s.K});
  const int64_t M = x2.size(0);
  if (M == 0) return at::zeros(out_shape, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::optional<at::Tensor> bias_c = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  if (M >= dense_min_rows()) {
    at::Tensor dense = at::empty({s.N, s.K}, x.options());
    C10_CUDA_CHECK(tiled_dequantize(w, perm ? perm->data_ptr<int32_t>() : nullptr, s.K, dense.data_ptr(),
                                    dtype_of(x.scalar_type()), stream));
    return at::linear(x2, dense, bias_c).view(out_shape);
  }
  const PreparedX prepared = prepare_x(x2, perm, s.K, stream);
  at::Tensor out = at::empty({M, s.N}, x.options());
  const Output y{out.data_ptr(), bias_c ? bias_c->data_ptr() : nullptr, dtype_of(x.scalar_type())};
  const TiledPlan plan = plan_tiled(w, M, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  C10_CUDA_CHECK(tiled_matmul(w, prepared.x, y, plan, stream));
  return out.view(out_shape);
}

at::Tensor tiled_dequantize_cuda(const char* op, Format format, const at::Tensor& qweight, const at::Tensor& scales,
                                 const at::Tensor& zeros, const std::optional<at::Tensor>& perm, int64_t group_size,
                                 int64_t in_features, int64_t out_features) {
  const TiledWeight w = tiled_weight(op, format, qweight, scales, zeros, perm, group_size, in_features, out_features);
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor out = at::empty({out_features, in_features}, qweight.options().dtype(at::kFloat));
  C10_CUDA_CHECK(tiled_dequantize(w, perm ? perm->data_ptr<int32_t>() : nullptr, in_features, out.data_ptr(),
                                  DType::kFloat32, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  impl_ops<linear_cuda, dequantize_cuda>(m);
  impl_tiled_ops<tiled_linear_cuda, tiled_dequantize_cuda>(m);
}

}  // namespace cuda
}  // namespace lowbit
