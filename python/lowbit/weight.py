"""QuantizedWeight: the tensors of one quantized matrix, with its metadata.

Two layouts of the same codes: "canonical" (docs/FORMAT.md; what is saved, and what the CPU kernels read)
and "tiled" (the CUDA tile layout of lowbit.tiled, made once when an int4 or int3.5 weight moves to a GPU;
int8 has no tile layout and stays canonical there).
"""

from dataclasses import dataclass

import torch

from . import formats, tiled
from .ops import OPS, TILED_OPS

LAYOUTS = ("canonical", "tiled")


def device_layout(bits: float, device: torch.device) -> str:
    """The layout a weight of this format holds on `device`: tiled on CUDA where the format has a tile layout."""
    return "tiled" if device.type == "cuda" and bits in TILED_OPS else "canonical"


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor        # canonical: uint8 [N, Kp/2] (int4), [N, Kp/16*7] (int3.5) or [N, Kp] (int8);
                                 # tiled: uint8 [ceil(N/16), Kt/128, 1024 or 896]
    scales: torch.Tensor         # canonical: float16 [N, Kp/group_size]; tiled: [ceil(N/16), Kt/group_size, 16]
    zeros: torch.Tensor          # as scales
    perm: torch.Tensor | None    # int32 [K]: stored column j holds input feature perm[j]
    bits: float                  # 4, 3.5 or 8
    group_size: int              # 32, 64, 128 or 256
    in_features: int             # K
    layout: str = "canonical"
    out_features: int | None = None  # N; required for the tiled layout (its rows are padded to 16)

    def __post_init__(self):
        self.bits = formats.check_bits(self.bits)
        self.group_size = formats.check_group_size(self.group_size)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        k, g = self.in_features, self.group_size
        if self.layout == "canonical":
            n = self.qweight.shape[0]
            if self.out_features not in (None, n):
                raise ValueError(f"out_features {self.out_features} differs from qweight's {n} rows")
            kp = formats.padded_in_features(k, g)
            shapes = {"qweight": (n, formats.packed_row_bytes(self.bits, kp)), "scales": (n, kp // g),
                      "zeros": (n, kp // g)}
        else:
            if self.bits not in TILED_OPS:
                raise ValueError(f"int{self.bits:g} has no tiled layout")
            if self.out_features is None:
                raise ValueError("the tiled layout needs out_features")
            n = self.out_features
            shapes = tiled.tiled_shapes(self.bits, g, k, n)
        self.out_features = int(n)
        expected = {name: (torch.uint8 if name == "qweight" else torch.float16, shape)
                    for name, shape in shapes.items()}
        if self.perm is not None:
            expected["perm"] = (torch.int32, (k,))
        for name, (dtype, shape) in expected.items():
            t = getattr(self, name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(
                    f"{name} must be {dtype} {list(shape)} for a {self.bits:g}-bit [{n}, {k}] weight with "
                    f"group_size {g} in the {self.layout} layout, got {t.dtype} {list(t.shape)}")
            if t.device != self.qweight.device:
                raise ValueError(f"{name} is on {t.device} but qweight is on {self.qweight.device}")
        if self.perm is not None and not torch.equal(self.perm.sort().values.cpu(), torch.arange(k, dtype=torch.int32)):
            raise ValueError(f"perm must be a permutation of range({k})")

    @property
    def shape(self) -> torch.Size:
        """Logical shape [N, K], as the nn.Linear weight it replaces."""
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes of the saved (canonical) tensors: codes, scales, zeros and the permutation."""
        return formats.quantized_nbytes(*self.shape, self.bits, self.group_size, self.perm is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.shape.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The saved tensors by name (the names used in checkpoints), in the canonical layout."""
        w = self.to_layout("canonical")
        out = {"qweight": w.qweight, "scales": w.scales, "zeros": w.zeros}
        if w.perm is not None:
            out["perm"] = w.perm
        return out

    def layout_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as they are held, in this weight's layout."""
        out = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.perm is not None:
            out["perm"] = self.perm
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], bits: float, group_size: int, in_features: int,
                     layout: str = "canonical", out_features: int | None = None):
        return cls(tensors["qweight"], tensors["scales"], tensors["zeros"], tensors.get("perm"),
                   bits, group_size, in_features, layout, out_features)

    def to_layout(self, layout: str) -> "QuantizedWeight":
        """The same weight in `layout`, on the same device (self when it is already there). Exact both ways."""
        if layout == self.layout:
            return self
        n, k, g = self.out_features, self.in_features, self.group_size
        if layout == "tiled":
            codes = formats.unpack(self.qweight, self.bits)
            q, s, z = tiled.pack(codes, self.scales, self.zeros, self.bits, g)
            return QuantizedWeight(q, s, z, self.perm, self.bits, g, k, "tiled", n)
        if layout == "canonical":
            codes, s, z = tiled.unpack(self.qweight, self.scales, self.zeros, self.bits, g,
                                       formats.padded_in_features(k, g), n)
            return QuantizedWeight(formats.pack(codes, self.bits), s, z, self.perm, self.bits, g, k)
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")

    def to(self, device) -> "QuantizedWeight":
        """On `device` in its layout (device_layout): tiled on CUDA devices for int4 and int3.5 (repacked once, on
        the GPU), canonical elsewhere."""
        device = torch.device(device)
        layout = device_layout(self.bits, device)
        w = self if layout == "tiled" else self.to_layout("canonical")  # repack on the GPU, never on the host
        moved = QuantizedWeight.from_tensors({name: t.to(device) for name, t in w.layout_tensors().items()},
                                             w.bits, w.group_size, w.in_features, w.layout, w.out_features)
        return moved.to_layout(layout)

    def op_args(self) -> tuple:
        """Leading arguments of this layout's ops (OPS, or TILED_OPS with out_features after in_features)."""
        return self.qweight, self.scales, self.zeros, self.perm

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in logical column order, through the kernels of the weight's device."""
        if self.layout == "tiled":
            _, op = TILED_OPS[self.bits]
            return op(*self.op_args(), self.group_size, self.in_features, self.out_features).to(dtype)
        _, op = OPS[self.bits]
        return op(*self.op_args(), self.group_size, self.in_features).to(dtype)

    def __repr__(self) -> str:
        n, k = self.shape
        return (f"QuantizedWeight(bits={self.bits:g}, group_size={self.group_size}, shape=[{n}, {k}], "
                f"perm={self.perm is not None}, nbytes={self.nbytes}, layout={self.layout}, device={self.device})")


def check_no_grad(*tensors) -> None:
    """The lowbit ops are inference-only: refuse, rather than silently drop, a gradient that is asked for."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError("lowbit's quantized linear layers are inference-only (no gradient): run under "
                           "torch.no_grad() or torch.inference_mode(), or detach the input")


def linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias with W quantized: x [..., K] float32/bfloat16/float16 -> y [..., N] same dtype.
    Inference only: the ops have no gradient."""
    check_no_grad(x, bias)
    if weight.layout == "tiled":
        op, _ = TILED_OPS[weight.bits]
        return op(x, *weight.op_args(), bias, weight.group_size, weight.in_features, weight.out_features)
    op, _ = OPS[weight.bits]
    return op(x, *weight.op_args(), bias, weight.group_size, weight.in_features)
