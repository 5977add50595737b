"""Test-side models of what the kernels compute, built on the format reference (lowbit.formats)."""

import torch

import lowbit
from lowbit import formats
from lowbit.weight import QuantizedWeight

# The int8 path (decode rows, and more: docs/FORMAT.md) quantizes activations to int8 per block of this many
# columns.
X_BLOCK = 64


def reference_linear(x: torch.Tensor, qw: QuantizedWeight, bias=None) -> torch.Tensor:
    """Exact: x @ dequantize(W).T in float64."""
    w = formats.dequantize(*qw.op_args(), qw.bits, qw.group_size, qw.in_features).double()
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def int8_activation_linear(x: torch.Tensor, qw: QuantizedWeight, bias=None) -> torch.Tensor:
    """What the int8 kernels compute, step by step: int8 activations per block, integer dot products,
    then y = sum_g s * (sum_b xscale_b * dot_b - z * sum_g x'), in float64, where x' are the
    dequantized int8 activations (odd columns of int3.5 divided back by 15/7)."""
    k, g = qw.in_features, qw.group_size
    kp = formats.padded_in_features(k, g)
    xb = min(X_BLOCK, g)
    x2 = x.reshape(-1, k).float()
    if qw.perm is not None:
        x2 = x2[:, qw.perm.long()]
    xs = torch.nn.functional.pad(x2, (0, kp - k))  # [M, Kp] stored column order
    lane = torch.ones(kp)
    if qw.bits == 3.5:
        lane[1::2] = torch.tensor(15.0) / torch.tensor(7.0)
    xl = (xs * lane).view(-1, kp // xb, xb)
    amax = xl.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    t = xl * inv
    xq = torch.trunc(t + torch.copysign(torch.tensor(0.5), t)).to(torch.int64)   # [M, B, xb]
    xscale = (amax / 127.0).double().squeeze(-1)                                   # [M, B]
    codes = formats.unpack(qw.qweight, qw.bits).to(torch.int64).view(-1, kp // xb, xb)  # [N, B, xb]
    dots = torch.einsum("mbk,nbk->mnb", xq, codes).double()                        # exact integers
    per_block = (dots * xscale[:, None, :]).view(x2.shape[0], -1, kp // g, g // xb).sum(-1)  # [M, N, G]
    x_deq = (xq.double() * xscale[..., None]).view(-1, kp) / lane.double()
    xsum = x_deq.view(-1, kp // g, g).sum(-1)                                      # [M, G]
    s, z = qw.scales.double(), qw.zeros.double()
    y = (s * per_block).sum(-1) - (xsum[:, None, :] * s * z).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.reshape(*x.shape[:-1], -1)


def check_non_finite_rows(x: torch.Tensor, qw: QuantizedWeight) -> None:
    """A NaN (row 0) or inf (last row) activation makes that row's outputs of lowbit.linear non-finite, as with
    F.linear; the other rows are exactly those of the clean input."""
    m = x.shape[0]
    clean = lowbit.linear(x, qw)
    bad = x.clone()
    bad[0, 5] = float("nan")
    if m > 1:
        bad[m - 1, 200] = float("inf")
    y = lowbit.linear(bad, qw)
    rows = [0] + ([m - 1] if m > 1 else [])
    assert not torch.isfinite(y[rows]).any()
    others = [i for i in range(m) if i not in rows]
    assert torch.equal(y[others], clean[others])
