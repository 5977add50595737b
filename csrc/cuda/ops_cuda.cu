// CUDA implementations of the lowbit ops: argument checks (checks.h), tensors to kernel arguments
// (kernels.h), and the kernel for the number of activation rows M:
//   M <= 8                gemv (gemv.cu): decode, streams the weight once; tensor cores, float32 sums
//   8 < M < dense rows    gemm (gemm.cu): prefill, tensor-core tiles dequantized in registers
//   M >= dense rows       dequantize to x's dtype, then at::linear (cuBLAS): compute-bound, and the
//                         dequantization is a small fraction of the matmul. dense rows = 128 (the
//                         crossover measured on an H100, benchmarks/README.md), or the environment
//                         variable LOWBIT_CUDA_DENSE_MIN_ROWS (read once).
// The matmul kernels take float16 activations: float16 x is read as it is (without perm; with perm it is
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
    return value ? std::max<int64_t>(kMaxGemvRows + 1, std::atoll(value)) : int64_t{128};
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

// A weight as the kernels see it, and the tensor that holds its codes (an aligned copy, when needed).
struct Weight {
  PackedWeight packed;
  at::Tensor codes;
};

Weight view_weight(const WeightShape& s, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& zeros, bool for_matmul) {
  const int64_t row_bytes = packed_row_bytes(s.format, s.Kp);
  at::Tensor codes = qweight;
  int64_t stride = row_bytes;
  int vector_bytes = weight_vector_bytes(s.format, codes.data_ptr(), stride, s.Kp);
  if (for_matmul && vector_bytes == 0) {
    // int3.5 rows of an odd number of 2-byte units (Kp not a multiple of 64, e.g. K = 328 with groups of
    // 32), or a view at an odd address: the matmul kernels read an aligned copy with padded rows.
    stride = round_up(row_bytes, 16);
    codes = at::zeros({s.N, stride}, qweight.options());
    codes.narrow(1, 0, row_bytes).copy_(qweight);
    vector_bytes = weight_vector_bytes(s.format, codes.data_ptr(), stride, s.Kp);
    TORCH_INTERNAL_ASSERT(vector_bytes != 0);
  }
  const PackedWeight packed{s.format,
                            codes.data_ptr<uint8_t>(),
                            stride,
                            row_bytes,
                            vector_bytes,
                            reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                            reinterpret_cast<const uint16_t*>(zeros.data_ptr<at::Half>()),
                            s.N,
                            s.Kp,
                            s.group_size,
                            s.n_groups};
  return {packed, codes};
}

// Activations in the kernels' form, and the tensors that hold them when x cannot be read as it is.
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

// Large M: W in x's dtype and logical column order, then cuBLAS.
at::Tensor dense_linear(const WeightShape& s, const at::Tensor& x2, const at::Tensor& qweight,
                        const at::Tensor& scales, const at::Tensor& zeros, const std::optional<at::Tensor>& perm,
                        const std::optional<at::Tensor>& bias, cudaStream_t stream) {
  const Weight weight = view_weight(s, qweight, scales, zeros, /*for_matmul=*/false);
  at::Tensor w = at::empty({s.N, s.K}, x2.options());
  C10_CUDA_CHECK(dequantize(weight.packed, perm ? perm->data_ptr<int32_t>() : nullptr, s.K, w.data_ptr(),
                            dtype_of(x2.scalar_type()), stream));
  return at::linear(x2, w, bias);
}

at::Tensor linear_cuda(const char* op, Format format, const at::Tensor& x, const at::Tensor& qweight,
                       const at::Tensor& scales, const at::Tensor& zeros, const std::optional<at::Tensor>& perm,
                       const std::optional<at::Tensor>& bias, int64_t group_size, int64_t in_features) {
  const WeightShape s = check_weight(op, format, qweight, scales, zeros, perm, group_size, in_features);
  check_activation(op, s, x, bias, qweight);
  check_cuda_device(op, qweight);
  const c10::cuda::CUDAGuard guard(qweight.device());

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.N;
  const at::Tensor x2 = x.reshape({-1, s.K});
  const int64_t M = x2.size(0);
  if (M == 0 || s.N == 0) return at::zeros(out_shape, x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const std::optional<at::Tensor> bias_c = bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;

  if (M >= dense_min_rows()) return dense_linear(s, x2, qweight, scales, zeros, perm, bias_c, stream).view(out_shape);
  const Weight weight = view_weight(s, qweight, scales, zeros, /*for_matmul=*/true);
  GemmPlan plan{};
  if (M > kMaxGemvRows) {
    plan = plan_gemm(weight.packed, M, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    if (plan.config < 0) {  // the tiles do not fit this GPU's shared memory
      return dense_linear(s, x2, qweight, scales, zeros, perm, bias_c, stream).view(out_shape);
    }
  }
  const PreparedX prepared = prepare_x(x2, perm, s.K, stream);
  at::Tensor out = at::empty({M, s.N}, x.options());
  const Output y{out.data_ptr(), bias_c ? bias_c->data_ptr() : nullptr, dtype_of(x.scalar_type())};
  if (M <= kMaxGemvRows) {
    C10_CUDA_CHECK(gemv(weight.packed, prepared.x, y, stream));
  } else {
    at::Tensor workspace;
    if (plan.workspace_floats > 0) workspace = at::empty({plan.workspace_floats}, x.options().dtype(at::kFloat));
    C10_CUDA_CHECK(gemm(weight.packed, prepared.x, y, plan, workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                        stream));
  }
  return out.view(out_shape);
}

at::Tensor dequantize_cuda(const char* op, Format format, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, const std::optional<at::Tensor>& perm, int64_t group_size,
                           int64_t in_features) {
  const WeightShape s = check_weight(op, format, qweight, scales, zeros, perm, group_size, in_features);
  check_cuda_device(op, qweight);
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor out = at::empty({s.N, s.K}, qweight.options().dtype(at::kFloat));
  if (s.N == 0) return out;
  const Weight weight = view_weight(s, qweight, scales, zeros, /*for_matmul=*/false);
  C10_CUDA_CHECK(dequantize(weight.packed, perm ? perm->data_ptr<int32_t>() : nullptr, s.K, out.data_ptr(),
                            DType::kFloat32, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) { impl_ops<linear_cuda, dequantize_cuda>(m); }

}  // namespace cuda
}  // namespace lowbit
