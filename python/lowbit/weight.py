"""QuantizedWeight: the tensors of one quantized matrix in the canonical layout, with its metadata."""

from dataclasses import dataclass

import torch

from . import formats
from .ops import OPS


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor        # uint8 [N, Kp/2] (int4) or [N, Kp/16*7] (int3.5)
    scales: torch.Tensor         # float16 [N, Kp/group_size]
    zeros: torch.Tensor          # float16 [N, Kp/group_size]
    perm: torch.Tensor | None    # int32 [K]: stored column j holds input feature perm[j]
    bits: float                  # 4 or 3.5
    group_size: int              # 32, 64, 128 or 256
    in_features: int             # K

    def __post_init__(self):
        self.bits = formats.check_bits(self.bits)
        self.group_size = formats.check_group_size(self.group_size)
        n, k, g = self.qweight.shape[0], self.in_features, self.group_size
        kp = formats.padded_in_features(k, g)
        expected = {
            "qweight": (torch.uint8, (n, formats.packed_row_bytes(self.bits, kp))),
            "scales": (torch.float16, (n, kp // g)),
            "zeros": (torch.float16, (n, kp // g)),
        }
        if self.perm is not None:
            expected["perm"] = (torch.int32, (k,))
        for name, (dtype, shape) in expected.items():
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(
                    f"{name} must be {dtype} {list(shape)} for a {self.bits}-bit [{n}, {k}] weight with "
                    f"group_size {g}, got {t.dtype} {list(t.shape)}")
            if t.device != self.qweight.device:
                raise ValueError(f"{name} is on {t.device} but qweight is on {self.qweight.device}")
        if self.perm is not None and not torch.equal(self.perm.sort().values.cpu(), torch.arange(k, dtype=torch.int32)):
            raise ValueError(f"perm must be a permutation of range({k})")

    @property
    def shape(self) -> torch.Size:
        """Logical shape [N, K], as the nn.Linear weight it replaces."""
        return torch.Size((self.qweight.shape[0], self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor: codes, scales, zeros and the permutation."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.shape.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (the names used in checkpoints)."""
        out = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: float, group_size: int, in_features: int):
        return cls(tensors["qweight"], tensors["scales"], tensors["zeros"], tensors.get("perm"),
                   bits, group_size, in_features)

    def to(self, device) -> "QuantizedWeight":
        moved = {name: t.to(device) for name, t in self.tensors().items()}
        return QuantizedWeight.from_tensors(moved, self.bits, self.group_size, self.in_features)

    def op_args(self) -> tuple:
        return self.qweight, self.scales, self.zeros, self.perm

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in logical column order, through the kernels of the weight's device."""
        _, dequantize_op = OPS[self.bits]
        return dequantize_op(*self.op_args(), self.group_size, self.in_features).to(dtype)

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"QuantizedWeight(bits={self.bits:g}, group_size={self.group_size}, shape=[{n}, {k}], "
                f"perm={self.perm is not None}, nbytes={self.nbytes}, device={self.device})")


def linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias with W quantized: x [..., K] float32/bfloat16/float16 -> y [..., N] same dtype."""
    linear_op, _ = OPS[weight.bits]
    return linear_op(x, *weight.op_args(), bias, weight.group_size, weight.in_features)
