"""QuantLinear: a drop-in nn.Linear replacement holding a quantized weight; replace_linears, the module swap."""

from typing import Callable, Iterable

import torch
from torch import nn

from .ops import OPS, TILED_OPS
from .quantize import quantize_weight
from .weight import QuantizedWeight, device_layout


class QuantLinear(nn.Module):
    """y = x @ W.T + b with W in int4, int3.5 or int8; the quantized tensors are buffers (state_dict, .to()).
    Inference only: no gradient flows through the quantized weight or to x.

    On a CUDA device int4 and int3.5 buffers hold the tile layout (lowbit.tiled), made once when the module
    moves there; elsewhere, and for int8, the canonical layout. state_dict() and load_state_dict() always
    speak canonical.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = weight.bits, weight.group_size
        self._set_weight(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        # Set by AWQ, not saved: (row [N], col [K]) with this weight ~ diag(row) W_float diag(col), so that
        # lowbit.eval.rmse_report can compare it with the float layer it came from.
        self.awq_scales: tuple[torch.Tensor, torch.Tensor] | None = None

    def _set_weight(self, weight: QuantizedWeight) -> None:
        self.layout = weight.layout
        for name in ("qweight", "scales", "zeros", "perm"):
            t = getattr(weight, name)
            if name in self._buffers:
                self._buffers[name] = t
            else:
                self.register_buffer(name, t)

    @classmethod
    def from_linear(cls, linear_: nn.Linear, bits: float = 4, group_size: int = 128,
                    perm: torch.Tensor | None = None) -> "QuantLinear":
        if not isinstance(linear_, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear_).__name__}")
        return cls(quantize_weight(linear_.weight, bits, group_size, perm), linear_.bias)

    @property
    def weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.perm, self.bits, self.group_size,
                               self.in_features, self.layout, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.layout == "tiled":
            linear_op, _ = TILED_OPS[self.bits]
            return linear_op(x, self.qweight, self.scales, self.zeros, self.perm, bias, self.group_size,
                             self.in_features, self.out_features)
        linear_op, _ = OPS[self.bits]
        return linear_op(x, self.qweight, self.scales, self.zeros, self.perm, bias, self.group_size, self.in_features)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not change the format: scales and zeros stay float16, they only follow
        # the module to its device (the integer buffers show where fn moved it). A move onto or off a
        # CUDA device changes the layout.
        scales, zeros = self.scales, self.zeros
        super()._apply(fn, recurse)
        self.scales, self.zeros = scales.to(self.qweight.device), zeros.to(self.qweight.device)
        layout = device_layout(self.bits, self.qweight.device)
        if layout != self.layout:
            self._set_weight(self.weight.to_layout(layout))
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "canonical":
            destination.update({prefix + name: t for name, t in self.weight.tensors().items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints hold the canonical layout: repack what is loaded into this module's layout.
        names = [prefix + n for n in ("qweight", "scales", "zeros", "perm")]
        if self.layout != "canonical" and names[0] in state_dict:
            w = QuantizedWeight(*(state_dict.get(n) for n in names), self.bits, self.group_size, self.in_features)
            w = w.to(self.qweight.device).to_layout(self.layout)
            state_dict.update({n: t for n, t in zip(names, (w.qweight, w.scales, w.zeros, w.perm)) if t is not None})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits:g}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, perm={self.perm is not None}, "
                f"layout={self.layout}")


def replace_linears(model: nn.Module, make: Callable[[str, nn.Linear], nn.Module],
                    skip: Iterable[str] = ()) -> list[str]:
    """Replace every nn.Linear of `model` by make(qualified name, linear), except those whose qualified name
    equals or ends with ("." + entry) an entry of skip. Returns the names replaced."""
    skip = list(skip)
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not any(name == k or name.endswith("." + k) for k in skip)]
    for name in names:
        model.set_submodule(name, make(name, model.get_submodule(name)))
    return names
