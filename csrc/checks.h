// Argument checks shared by every backend of the lowbit ops: each failure names the op, the argument
// and what was expected (c10::ValueError / c10::TypeError reach Python as ValueError / TypeError).
#pragma once
#include <ATen/ATen.h>

#include "format.h"

namespace lowbit {

// Shapes of one quantized weight, derived from its tensors and checked against each other.
struct WeightShape {
  Format format;
  int64_t N;           // out features
  int64_t K;           // in features
  int64_t Kp;          // K padded up to a multiple of group_size
  int64_t group_size;
  int64_t n_groups;    // Kp / group_size
};

// perm, when present: int32, contiguous [K], on qweight's device (its values are checked where the
// weight is built: lowbit.QuantizedWeight).
inline void check_perm(const char* op, const std::optional<at::Tensor>& perm, int64_t K, const at::Tensor& qweight) {
  if (!perm) return;
  TORCH_CHECK_TYPE(perm->scalar_type() == at::kInt, op, ": perm must be int32, got ", perm->scalar_type());
  TORCH_CHECK_VALUE(perm->dim() == 1 && perm->size(0) == K && perm->is_contiguous(), op,
                    ": perm must be a contiguous [", K, "] tensor, got ", perm->sizes());
  TORCH_CHECK_VALUE(perm->device() == qweight.device(), op, ": perm is on ", perm->device(), " but qweight is on ",
                    qweight.device());
}

inline WeightShape check_weight(const char* op, Format format, const at::Tensor& qweight,
                                const at::Tensor& scales, const at::Tensor& zeros,
                                const std::optional<at::Tensor>& perm, int64_t group_size, int64_t K) {
  TORCH_CHECK_VALUE(group_size == 32 || group_size == 64 || group_size == 128 || group_size == 256, op,
                    ": group_size must be one of 32, 64, 128, 256, got ", group_size);
  TORCH_CHECK_VALUE(K >= 1, op, ": in_features must be positive, got ", K);
  TORCH_CHECK_TYPE(qweight.scalar_type() == at::kByte, op, ": qweight must be uint8, got ", qweight.scalar_type());
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kHalf, op, ": scales must be float16, got ", scales.scalar_type());
  TORCH_CHECK_TYPE(zeros.scalar_type() == at::kHalf, op, ": zeros must be float16, got ", zeros.scalar_type());
  TORCH_CHECK_VALUE(qweight.dim() == 2 && scales.dim() == 2, op, ": qweight and scales must be 2-D, got ",
                    qweight.sizes(), " and ", scales.sizes());
  TORCH_CHECK_VALUE(zeros.sizes() == scales.sizes(), op, ": zeros shape ", zeros.sizes(),
                    " differs from scales shape ", scales.sizes());
  WeightShape s{format, qweight.size(0), K, 0, group_size, (K + group_size - 1) / group_size};
  s.Kp = s.n_groups * group_size;
  TORCH_CHECK_VALUE(scales.size(0) == s.N && scales.size(1) == s.n_groups, op, ": scales must be [", s.N, ", ",
                    s.n_groups, "] for ", s.N, " rows, in_features ", K, " and group_size ", group_size,
                    ", got ", scales.sizes());
  TORCH_CHECK_VALUE(qweight.size(1) == packed_row_bytes(format, s.Kp), op, ": qweight must be [", s.N, ", ",
                    packed_row_bytes(format, s.Kp), "] for in_features ", K, " padded to ", s.Kp, ", got ",
                    qweight.sizes());
  TORCH_CHECK_VALUE(qweight.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous(), op,
                    ": qweight, scales and zeros must be contiguous");
  TORCH_CHECK_VALUE(scales.device() == qweight.device() && zeros.device() == qweight.device(), op,
                    ": qweight, scales and zeros must be on one device, got ", qweight.device(), ", ",
                    scales.device(), ", ", zeros.device());
  check_perm(op, perm, K, qweight);
  return s;
}

inline void check_activation(const char* op, const WeightShape& s, const at::Tensor& x,
                             const std::optional<at::Tensor>& bias, const at::Tensor& qweight) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                       x.scalar_type() == at::kHalf,
                   op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.K, op, ": x must end in in_features = ", s.K,
                    ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == qweight.device(), op, ": x is on ", x.device(), " but the weight is on ",
                    qweight.device());
  if (bias) {
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                     " differs from x dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == s.N, op, ": bias must be [", s.N, "], got ",
                      bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ",
                      x.device());
  }
}

}  // namespace lowbit
