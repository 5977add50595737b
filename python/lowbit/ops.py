"""The lowbit custom ops (torch.ops.lowbit.*) and their fake kernels for torch.compile.

Schemas live in C++ (csrc/lowbit.cpp); backends register with TORCH_LIBRARY_IMPL.
"""

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)

OPS = {
    4: (torch.ops.lowbit.int4_linear, torch.ops.lowbit.int4_dequantize),
    3.5: (torch.ops.lowbit.int35_linear, torch.ops.lowbit.int35_dequantize),
    8: (torch.ops.lowbit.int8_linear, torch.ops.lowbit.int8_dequantize),
}
# The same on the CUDA tile layout (lowbit.tiled), which int8 does not have; they take out_features after
# in_features.
TILED_OPS = {
    4: (torch.ops.lowbit.int4_tiled_linear, torch.ops.lowbit.int4_tiled_dequantize),
    3.5: (torch.ops.lowbit.int35_tiled_linear, torch.ops.lowbit.int35_tiled_dequantize),
}


def _register(linear_name: str, dequantize_name: str) -> None:
    @torch.library.register_fake(linear_name)
    def _(x, qweight, scales, zeros, perm, bias, group_size, in_features):
        torch._check(x.shape[-1] == in_features, lambda: f"x must end in in_features = {in_features}")
        for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("perm", perm), ("bias", bias)):
            torch._check(t is None or t.device == x.device,
                         lambda: f"{linear_name}: x is on {x.device} but {name} is on {t.device}")
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    @torch.library.register_fake(dequantize_name)
    def _(qweight, scales, zeros, perm, group_size, in_features):
        return qweight.new_empty((qweight.shape[0], in_features), dtype=torch.float32)


def _register_tiled(linear_name: str, dequantize_name: str) -> None:
    @torch.library.register_fake(linear_name)
    def _(x, qweight, scales, zeros, perm, bias, group_size, in_features, out_features):
        torch._check(x.shape[-1] == in_features, lambda: f"x must end in in_features = {in_features}")
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake(dequantize_name)
    def _(qweight, scales, zeros, perm, group_size, in_features, out_features):
        return qweight.new_empty((out_features, in_features), dtype=torch.float32)


@torch.library.register_fake("lowbit::mse_grid")
def _(groups, weight, bits, ratios, refits, integer_zeros):
    return (groups.new_empty(groups.shape[:-1], dtype=torch.float16),
            groups.new_empty(groups.shape[:-1], dtype=torch.float16))


_register("lowbit::int4_linear", "lowbit::int4_dequantize")
_register("lowbit::int35_linear", "lowbit::int35_dequantize")
_register("lowbit::int8_linear", "lowbit::int8_dequantize")
_register_tiled("lowbit::int4_tiled_linear", "lowbit::int4_tiled_dequantize")
_register_tiled("lowbit::int35_tiled_linear", "lowbit::int35_tiled_dequantize")
