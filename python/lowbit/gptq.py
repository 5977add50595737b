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
SLICE = 16  # columns per slice of the column loop (see gptq_quantize)
DAMP = 0.01  # added to H's diagonal, times mean(diag H): the damping of GPTQ's paper


def check_act_order(act_order, method: str, budget: bool = False):
    """budget: a bits-per-weight budget chooses the formats (it does not count a stored permutation)."""
    if act_order not in ACT_ORDERS or (act_order and method not in formats.GPTQ_METHODS):
        raise ValueError(f"act_order must be False, 'order' (or True) or 'perm', and needs method 'gptq' or "
                         f"'awq+gptq': got act_order={act_order!r}, method={method!r}")
    if act_order == "perm" and budget:
        raise ValueError("act_order='perm' adds a permutation to the layers that a bits_per_weight budget does not "
                         "count: use act_order='order' with a budget")


def hessian(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """H = 2 X^T X / rows for a linear layer's inputs x [..., K]: float32 [K, K]. H is symmetric: the blocks of
    rows below and on the diagonal are products, those above are their transposes (about half the work)."""
    x = x.reshape(-1, x.shape[-1]).float()
    k = x.shape[1]
    h = torch.empty(k, k, device=x.device)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        h[i0:i1, :i1].addmm_(x[:, i0:i1].T, x[:, :i1], beta=0, alpha=2 / len(x))
        h[:i0, i0:i1] = h[i0:i1, :i0].T
    return h


def act_order_perm(h: torch.Tensor) -> torch.Tensor:
    """Input features by decreasing diag(H): the columns with the largest inputs are rounded first."""
    return torch.argsort(h.diagonal(), descending=True, stable=True).to(torch.int32)


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = H^-1), float32.

    With P the reversal of the rows (or columns), P H P = L L^T (L lower triangular, the Cholesky factor of H
    with rows and columns reversed), so H^-1 = (P L^-T P)(P L^-1 P) and U = P L^-1 P: one factorisation, one
    triangular inverse (in place) and one reversal, about a third of the work of inverting H and factorising the
    inverse, and at most three [K, K] tensors alive (the caller's H among them). In float32, as GPTQ's
    reference: the damping keeps H well conditioned, and at K = 11008 float64 needed twice the memory and time."""
    lower = h.float().flip(0, 1)  # a copy: the caller's H is not changed
    diag = lower.diagonal()
    diag[diag == 0] = 1  # an input that is always zero: its column is rounded alone, no error to spread
    diag += damp * diag.mean()
    _, info = torch.linalg.cholesky_ex(lower, out=(lower, torch.empty((), dtype=torch.int32, device=h.device)))
    if info:
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); use a larger damp")
    _invert_lower_in_place(lower.tril_())
    return lower.flip(0, 1)


def _invert_lower_in_place(a: torch.Tensor) -> torch.Tensor:
    """a (lower triangular [K, K]) <- a^-1, by halves: [[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]
    (K^3 / 3 multiply-adds in matrix products, against K^3 / 2 for a triangular solve with the identity)."""
    k = len(a)
    if k <= 256:
        a.copy_(torch.linalg.solve_triangular(a, torch.eye(k, dtype=a.dtype, device=a.device), upper=False))
        return a
    m = k // 2
    top, bottom = a[:m, :m], a[m:, m:]
    _invert_lower_in_place(top)
    _invert_lower_in_place(bottom)
    a[m:, :m] = torch.linalg.matmul(bottom, a[m:, :m] @ top).neg_()
    return a


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
    H's diagonal; columns are updated lazily in blocks of block_size (rounded up to whole groups), and within a
    block in slices of SLICE columns (the rounding of one column touches only the rest of its slice). order
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
    if not isinstance(h, torch.Tensor) or tuple(h.shape) != (k, k) or not formats.all_finite(h):
        raise ValueError(f"GPTQ: the Hessian must be a finite [{k}, {k}] tensor for a weight with {k} input "
                         f"features, got {list(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}")
    if not (isinstance(damp, (int, float)) and 0 < damp < float("inf")
            and isinstance(block_size, int) and block_size > 0):
        raise ValueError(f"GPTQ: damp must be a positive number and block_size a positive integer, got "
                         f"damp={damp!r}, block_size={block_size!r}")
    if order is not None and not (isinstance(order, torch.Tensor) and order.dim() == 1 and len(order) == k
              and torch.equal(torch.sort(order.cpu().long()).values, torch.arange(k))):
        raise ValueError(f"GPTQ: order must be a permutation of the {k} input features (a 1-d integer tensor)")
    n_groups = -(-k // group_size)
    check_clip(clip, n, n_groups)
    h = h.to(w.device)
    if perm is not None:
        w, h = w[:, perm.long()], h[perm.long()][:, perm.long()]
    importance = h.diagonal().clone()               # the stored columns' input energy (weighted_grid)
    if order is None:
        order = torch.arange(k, device=w.device)
        wt = w.t().contiguous()
    else:
        order = order.to(w.device).long()
        wt, h = w.t()[order], h[order][:, order]
    # wt [K, N]: the weight's columns as rows, in rounding order (each column's update below is a contiguous row).
    u = inverse_cholesky(h, damp)
    del h
    position = torch.empty_like(order)
    position[order] = torch.arange(k, device=w.device)  # where each stored column is rounded
    columns = order.tolist()

    kp = formats.padded_in_features(k, group_size)
    codes = torch.empty(kp, n, dtype=torch.uint8, device=w.device)  # transposed, stored column order
    scales = torch.empty(n_groups, n, dtype=torch.float16, device=w.device)
    zeros = torch.empty_like(scales)
    has_grid = [False] * n_groups
    block = -(-block_size // group_size) * group_size
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        err = torch.empty(b1 - b0, n, device=w.device)  # each rounded column's error, over its U diagonal
        with one_thread():
            # Within a block, columns go in slices of SLICE: each rounded column corrects the rest of its slice
            # (rows that stay in the CPU's cache), each finished slice the rest of the block in one product.
            for s0 in range(b0, b1, SLICE):
                s1 = min(s0 + SLICE, b1)
                for j in range(s0, s1):
                    col = columns[j]
                    g = col // group_size
                    if not has_grid[g]:
                        # The group's columns (stored order), none rounded yet; those after this slice still
                        # lack this slice's corrections so far, those after this block all of the block's.
                        at = position[g * group_size:min(g * group_size + group_size, k)]
                        current = wt[at]
                        in_block = (at >= s1) & (at < b1)
                        if bool(in_block.any()):
                            current[in_block] -= u[s0:j, at[in_block]].T @ err[s0 - b0:j - b0]
                        later = at >= b1
                        if bool(later.any()):
                            current[later] -= u[b0:j, at[later]].T @ err[:j - b0]
                        ratio = None if clip is None else clip[:, g]
                        weight = importance[g * group_size:g * group_size + group_size] if weighted_grid else None
                        scales[g], zeros[g] = group_grid(current.T.contiguous(), bits, ratio, integer_zeros,
                                                         columns=weight)
                        has_grid[g] = True
                    s, z, row = scales[g], zeros[g], wt[j].unsqueeze(-1)
                    q = round_to_grid(row, s, z, bits, col)
                    codes[col] = q[:, 0].to(torch.uint8)
                    err[j - b0] = (row - grid_values(q, s, z, bits, col))[:, 0] / u[j, j]
                    wt[j + 1:s1].addmm_(u[j, j + 1:s1].unsqueeze(-1), err[j - b0:j - b0 + 1], alpha=-1)
                wt[s1:b1].addmm_(u[s0:s1, s1:b1].T, err[s0 - b0:s1 - b0], alpha=-1)
        wt[b1:].addmm_(u[b0:b1, b1:].T, err, alpha=-1)   # the block's corrections to every later column
    # Padding columns hold the codes of 0.0 (docs/FORMAT.md).
    codes[k:] = round_to_grid(torch.zeros(n, kp - k, device=w.device), scales[-1], zeros[-1], bits, k).T
    scales, zeros = scales.T.contiguous(), zeros.T.contiguous()
    return QuantizedWeight(formats.pack(codes.T.contiguous(), bits), scales, zeros, perm, bits, group_size, k)
