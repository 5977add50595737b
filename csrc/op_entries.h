// The lowbit ops of one backend, bound to that backend's format-generic linear and dequantize:
// int4, int3.5 and int8 differ only in the op name and the format passed on. The *_tiled_* ops take the
// CUDA tile layout (docs/FORMAT.md), which int4 and int3.5 have, and exist on CUDA only.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include "format.h"

namespace lowbit {

// Op names (as error messages give them), by format.
constexpr const char* kLinearNames[kFormats] = {"lowbit.int4_linear", "lowbit.int35_linear", "lowbit.int8_linear"};
constexpr const char* kDequantizeNames[kFormats] = {"lowbit.int4_dequantize", "lowbit.int35_dequantize",
                                                    "lowbit.int8_dequantize"};

using LinearImpl = at::Tensor (*)(const char* op, Format format, const at::Tensor& x, const at::Tensor& qweight,
                                  const at::Tensor& scales, const at::Tensor& zeros,
                                  const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                                  int64_t group_size, int64_t in_features);
using DequantizeImpl = at::Tensor (*)(const char* op, Format format, const at::Tensor& qweight,
                                      const at::Tensor& scales, const at::Tensor& zeros,
                                      const std::optional<at::Tensor>& perm, int64_t group_size,
                                      int64_t in_features);

template <LinearImpl kLinear, Format F>
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, const std::optional<at::Tensor>& perm,
                     const std::optional<at::Tensor>& bias, int64_t group_size, int64_t in_features) {
  return kLinear(kLinearNames[static_cast<int>(F)], F, x, qweight, scales, zeros, perm, bias, group_size,
                 in_features);
}

template <DequantizeImpl kDequantize, Format F>
at::Tensor dequantize_op(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                         const std::optional<at::Tensor>& perm, int64_t group_size, int64_t in_features) {
  return kDequantize(kDequantizeNames[static_cast<int>(F)], F, qweight, scales, zeros, perm, group_size,
                     in_features);
}

using TiledLinearImpl = at::Tensor (*)(const char* op, Format format, const at::Tensor& x, const at::Tensor& qweight,
                                       const at::Tensor& scales, const at::Tensor& zeros,
                                       const std::optional<at::Tensor>& perm, const std::optional<at::Tensor>& bias,
                                       int64_t group_size, int64_t in_features, int64_t out_features);
using TiledDequantizeImpl = at::Tensor (*)(const char* op, Format format, const at::Tensor& qweight,
                                           const at::Tensor& scales, const at::Tensor& zeros,
                                           const std::optional<at::Tensor>& perm, int64_t group_size,
                                           int64_t in_features, int64_t out_features);

template <TiledLinearImpl kLinear, Format F>
at::Tensor tiled_linear_op(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, const std::optional<at::Tensor>& perm,
                           const std::optional<at::Tensor>& bias, int64_t group_size, int64_t in_features,
                           int64_t out_features) {
  return kLinear(F == Format::kInt4 ? "lowbit.int4_tiled_linear" : "lowbit.int35_tiled_linear", F, x, qweight,
                 scales, zeros, perm, bias, group_size, in_features, out_features);
}

template <TiledDequantizeImpl kDequantize, Format F>
at::Tensor tiled_dequantize_op(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                               const std::optional<at::Tensor>& perm, int64_t group_size, int64_t in_features,
                               int64_t out_features) {
  return kDequantize(F == Format::kInt4 ? "lowbit.int4_tiled_dequantize" : "lowbit.int35_tiled_dequantize", F,
                     qweight, scales, zeros, perm, group_size, in_features, out_features);
}

template <TiledLinearImpl kLinear, TiledDequantizeImpl kDequantize>
void impl_tiled_ops(torch::Library& m) {
  m.impl("int4_tiled_linear", &tiled_linear_op<kLinear, Format::kInt4>);
  m.impl("int35_tiled_linear", &tiled_linear_op<kLinear, Format::kInt35>);
  m.impl("int4_tiled_dequantize", &tiled_dequantize_op<kDequantize, Format::kInt4>);
  m.impl("int35_tiled_dequantize", &tiled_dequantize_op<kDequantize, Format::kInt35>);
}

// Called from a backend's TORCH_LIBRARY_IMPL block.
template <LinearImpl kLinear, DequantizeImpl kDequantize>
void impl_ops(torch::Library& m) {
  m.impl("int4_linear", &linear_op<kLinear, Format::kInt4>);
  m.impl("int35_linear", &linear_op<kLinear, Format::kInt35>);
  m.impl("int8_linear", &linear_op<kLinear, Format::kInt8>);
  m.impl("int4_dequantize", &dequantize_op<kDequantize, Format::kInt4>);
  m.impl("int35_dequantize", &dequantize_op<kDequantize, Format::kInt35>);
  m.impl("int8_dequantize", &dequantize_op<kDequantize, Format::kInt8>);
}

}  // namespace lowbit
