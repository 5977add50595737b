"""QuantLinear: a drop-in nn.Linear replacement holding a quantized weight."""

import torch
from torch import nn

from .ops import OPS
from .quantize import quantize_weight
from .weight import QuantizedWeight


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W in int4 or int3.5; the quantized tensors are buffers (state_dict, .to())."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = weight.bits, weight.group_size
        for name, t in weight.tensors().items():
            self.register_buffer(name, t)
        if "perm" not in weight.tensors():
            self.perm = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Set by AWQ, not saved: (row [N], col [K]) with this weight ~ diag(row) W_float diag(col), so that
        # lowbit.eval.rmse_report can compare it with the float layer it came from.
        self.awq_scales: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear_: nn.Linear, bits: float = 4, group_size: int = 128,
                    perm: torch.Tensor | None = None) -> "QuantLinear":
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear_).__name__}")
        return cls(quantize_weight(linear_.weight, bits, group_size, perm), linear_.bias)

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.perm,
                               self.bits, self.group_size, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        linear_op, _ = OPS[self.bits]
        return linear_op(x, self.qweight, self.scales, self.zeros, self.perm, bias, self.group_size, self.in_features)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not change the format: scales and zeros stay float16, they only follow
        # the module to its device (the integer buffers show where fn moved it).
        scales, zeros = self.scales, self.zeros
        super()._apply(fn, recurse)
        self.scales, self.zeros = scales.to(self.qweight.device), zeros.to(self.qweight.device)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits:g}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, perm={self.perm is not None}")
