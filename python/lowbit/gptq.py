"""GPTQ: error-compensating rounding of each linear layer on calibration inputs, block by block.

The method is Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv:2210.17323); this is lowbit's own implementation of it. For a linear layer with
calibration inputs X, the output error of a rounded weight is a quadratic form in the weight error with
Hessian H = 2 X^T X. GPTQ rounds the stored columns one at a time, left to right, and moves each column's
rounding error onto the columns not yet rounded in the proportions that minimise that quadratic form (the
rows of the upper Cholesky factor of H^-1). A group's scale and zero point are fixed from the current,
error-updated weights when the group's first column is reached, so the codes, scales and zeros are
exactly lowbit's formats: checkpoints and kernels are the same as for round-to-nearest. The grid is the one
with the least squared error of the group's weights, each column's error weighted by its input energy
diag(H) (the weighting llama.cpp's importance matrix applies to its grid searches), unless AWQ's clipping
ratios fix it.

Column order: columns are rounded left to right in the stored order unless an order is given. int3.5's
stored order is AWQ's saliency order (the most salient channels on the 4-bit positions; the format's input
permutation `perm`). Act-order rounds the columns in decreasing diag(H) instead, so that the largest inputs
are rounded while most columns can still absorb their error, in one of two ways. act_order="order" (or True)
keeps the groups contiguous in the stored order (no bytes added): a group's grid is fixed when the first of its
columns is reached, from the group's error-updated weights at that moment (the columns not yet rounded hold
every correction made so far). act_order="perm" stores the order as the layer's input permutation (int4/int8;
4 bytes per input feature), so that the groups are runs of columns of similar input size.

lowbit.calibration.GPTQ runs it over a model's decoder blocks, one after another: within a block the linears are
quantized in the order the data flows (q/k/v, o, gate/up, down), each on the inputs the already quantized linears
before it produce. Method "awq+gptq" first folds AWQ's per-channel scales into the block and searches AWQ's
per-group clipping ratios (lowbit.awq), then rounds with GPTQ on the clipped grids.
"""

from contextlib import contextmanager

import torch

from . import formats
from .quantize import check_clip, checked_weight, grid_values, group_grid, round_to_grid
from .weight import QuantizedWeight


ACT_ORDERS = (False, True, "order", "perm")
DAMP = 0.01  # added to H's diagonal, times mean(diag H): the damping of GPTQ's paper


def check_act_order(act_order, method: str, budget: bool = False):
    """budget: a bits-per-weight budget chooses the formats (it does not count a stored permutation)."""
    if act_order not in ACT_ORDERS or (act_order and method not in formats.GPTQ_METHODS):
        raise ValueError(f"act_order must be False, 'order' (or True) or 'perm', and needs method 'gptq' or "
                         f"'awq+gptq': got act_order={act_order!r}, method={method!r}")
    if act_order == "perm" and budget:
        raise ValueError("act_order='perm' adds a permutation to the layers that a bits_per_weight budget does not "
                         "count: use act_order='order' with a budget")


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / rows for a linear layer's inputs x [..., K]: float32 [K, K]."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (2 / len(x)) * (x.T @ x)


def act_order_perm(h: torch.Tensor) -> torch.Tensor:
    """Input features by decreasing diag(H): the columns with the largest inputs are rounded first."""
    return torch.argsort(h.diagonal(), descending=True, stable=True).to(torch.int32)


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = H^-1), float32.

    H = R R^T with R upper triangular (the lower Cholesky factor of H with rows and columns reversed), so
    H^-1 = R^-T R^-1 and U = R^-1: one factorisation and one triangular inverse, about a third of the work of
    inverting H and factorising the inverse. In float32, as GPTQ's reference: the damping keeps H well
    conditioned, and at K = 11008 float64 needed 4.8 GB and twice the time."""
    h = h.float().flip(0, 1)  # a copy: the caller's H is not changed
    diag = h.diagonal()
    diag[diag == 0] = 1  # an input that is always zero: its column is rounded alone, no error to spread
    diag += damp * diag.mean()
    lower, info = torch.linalg.cholesky_ex(h)
    del h
    if info:
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); use a larger damp")
    upper = lower.flip(0, 1)
    del lower
    identity = torch.eye(len(upper), dtype=upper.dtype, device=upper.device)
    return torch.linalg.solve_triangular(upper, identity, upper=True)


@contextmanager
def one_thread():
    """GPTQ's column loop runs many small operations on one column each: handing them to a second thread
    costs more than it saves, and stalls for milliseconds per operation on a busy machine (10x slower). (The
    update of the later columns after each block of columns is one large product: it keeps every thread.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: float = 4, group_size: int = 128,
                  perm: torch.Tensor | None = None, clip: torch.Tensor | None = None, damp: float = DAMP,
                  block_size: int = 128, integer_zeros: bool = False,
                  order: torch.Tensor | None = None, weighted_grid: bool = True) -> QuantizedWeight:
    """GPTQ of one weight W [N, K] (nn.Linear layout) with the Hessian h [K, K] of its inputs (see hessian).

    perm, clip and integer_zeros mean what they mean for quantize_weight; damp adds damp * mean(diag H) to
    H's diagonal; columns are updated lazily in blocks of block_size (rounded up to whole groups). order
    (optional, e.g. act_order_perm of the Hessian in the stored order): the order in which the stored columns
    are rounded, default left to right; a group's grid is fixed when its first column in this order is reached.
    weighted_grid (groups without clip ratios): each group's grid is quantize_weight's "mse" search with each
    column's squared error weighted by its input energy diag(H) (off: unweighted, as round-to-nearest). With H
    diagonal, this is round-to-nearest on that weighted grid, whatever the order.
    """
    bits = formats.check_bits(bits)
    group_size = formats.check_group_size(group_size)
    w, perm = checked_weight(w, perm)
    n, k = w.shape
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (k, k) or not bool(torch.isfinite(h).all()):
        raise ValueError(f"GPTQ: the Hessian must be a finite [{k}, {k}] tensor for a weight with {k} input "
                         f"features, got {list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    if not (isinstance(damp, (int, float)) and 0 < damp < float("inf")
            and isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"GPTQ: damp must be a positive number and block_size a positive integer, got "
                         f"damp={damp!r}, block_size={block_size!r}")
    if order is None:
        order = torch.arange(k)
    elif not (isinstance(order, torch.Tensor) and order.dim() == 1 and len(order) == k
              and torch.equal(torch.sort(order.cpu().long()).values, torch.arange(k))):
        raise ValueError(f"GPTQ: order must be a permutation of the {k} input features (a 1-d integer tensor)")
    n_groups = -(-k // group_size)
    check_clip(clip, n, n_groups)
    h = h.to(w.device)
    if perm is not None:
        w, h = w[:, perm.long()], h[perm.long()][:, perm.long()]
    order = order.to(w.device).long()
    importance = h.diagonal().clone()               # the stored columns' input energy (weighted_grid)
    w, h = w[:, order], h[order][:, order]          # in rounding order from here on
    u = inverse_cholesky(h, damp)
    position = torch.empty_like(order)
    position[order] = torch.arange(k, device=w.device)  # where each stored column is rounded
    columns = order.tolist()

    kp = formats.padded_in_features(k, group_size)
    codes = torch.empty(n, kp, device=w.device)
    scales = torch.empty(n, n_groups, dtype=torch.float16, device=w.device)
    zeros = torch.empty_like(scales)
    has_grid = [False] * n_groups
    block = -(-block_size // group_size) * group_size
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1]                     # rounded in place, column by column
        err = torch.empty(n, b1 - b0, device=w.device)
        with one_thread():
            for j in range(b1 - b0):
                col = columns[b0 + j]
                g = col // group_size
                if not has_grid[g]:
                    # The group's columns (stored order), none rounded yet: those in later blocks still lack
                    # this block's corrections so far.
                    at = position[g * group_size:min(g * group_size + group_size, k)]
                    current = w[:, at]
                    later = at >= b1
                    if bool(later.any()):
                        current[:, later] -= err[:, :j] @ u[b0:b0 + j][:, at[later]]
                    ratio = None if clip is None else clip[:, g]
                    weight = importance[g * group_size:g * group_size + group_size] if weighted_grid else None
                    scales[:, g], zeros[:, g] = group_grid(current, bits, ratio, integer_zeros, columns=weight)
                    has_grid[g] = True
                s, z = scales[:, g], zeros[:, g]
                q = round_to_grid(wb[:, j:j + 1], s, z, bits, col)
                codes[:, col] = q[:, 0]
                err[:, j] = (wb[:, j] - grid_values(q, s, z, bits, col)[:, 0]) / u[b0 + j, b0 + j]
                wb[:, j + 1:].addmm_(err[:, j:j + 1], u[b0 + j:b0 + j + 1, b0 + j + 1:b1], alpha=-1)  # (addr_ is slow)
        w[:, b1:].addmm_(err, u[b0:b1, b1:], alpha=-1)   # the block's corrections to every later column
    # Padding columns hold the codes of 0.0 (docs/FORMAT.md).
    codes[:, k:] = round_to_grid(torch.zeros(n, kp - k, device=w.device), scales[:, -1], zeros[:, -1], bits, k)
    return QuantizedWeight(formats.pack(codes.to(torch.int32), bits), scales, zeros, perm, bits, group_size, k)
