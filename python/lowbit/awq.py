"""Activation-aware weight quantization (AWQ, Lin et al. 2023) of one decoder block.

Works on a lowbit.calibration.BlockView, which names the parts of a block (lowbit's or transformers' LLaMA) that
AWQ needs; lowbit.calibration runs it over a model's blocks (calibration.AWQ).

Per decoder block, on the calibration activations entering it:
  1. for each set of linears sharing an input (q/k/v after the input norm, gate/up after the
     post-attention norm, down after up; o after v when there is no grouped-query attention), search
     per-input-channel scales s = x_mean^a / w_mean^(1-a) over a grid of a in [0, 1), minimising the
     error of the module the linears feed (attention, MLP, or the linear itself) with W·s quantized;
     fold 1/s into the preceding norm or linear and s into the linears (the float model is unchanged);
  2. for int3.5, order the input channels by saliency (activation × weight magnitude) so the most
     salient half takes the 4-bit positions (a stored permutation);
  3. search a clipping ratio per (row, group) minimising each linear's output error;
  4. quantize (the pipeline then passes the quantized block's output on as the next block's input).
"""

import torch
import torch.nn.functional as F

from .nn import QuantLinear
from .quantize import fake_quantize, group_range, grouped, quantize_weight, range_grid, round_in_place

CLIP_CHUNK_ELEMENTS = 1 << 20  # weights per chunk of rows in search_clip (4 MB in float32)


def x_stats(x: torch.Tensor) -> torch.Tensor:
    """Mean |activation| per input channel, x [..., K] -> [K]."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(0)


def w_stats(weights: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """Mean over the rows of all weights of |w| normalised by its group's max |w|, per input channel -> [K];
    weights: (W [N, K], its group size) pairs."""
    normed = []
    for w, group_size in weights:
        n, k = w.shape
        g = min(group_size, k)
        wg = F.pad(w.abs().float(), (0, (-k) % g)).view(n, -1, g)
        normed.append((wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).view(n, -1)[:, :k])
    return torch.cat(normed).mean(0)


def saliency_perm(x_mean: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int3.5 channel order: the more salient half (x_mean * mean |w|) on the even (4-bit) positions."""
    k = x_mean.shape[0]
    order = (x_mean * w.abs().float().mean(0)).argsort(descending=True)
    perm = torch.empty(k, dtype=torch.long)
    half = (k + 1) // 2
    perm[0::2] = order[:half]
    perm[1::2] = order[half:]
    return perm.to(torch.int32)


class _Swap:
    """Temporarily replace the weights of some linears (for trying a candidate quantization)."""

    def __init__(self, linears, weights):
        self.linears, self.weights = linears, weights

    def __enter__(self):
        self.saved = [lin.weight.data for lin in self.linears]
        for lin, w in zip(self.linears, self.weights):
            lin.weight.data = w.to(lin.weight.dtype)

    def __exit__(self, *exc):
        for lin, w in zip(self.linears, self.saved):
            lin.weight.data = w


@torch.inference_mode()
def search_scales(linears, x: torch.Tensor, inspect, layer_formats: list[tuple[float, int]], n_grid: int,
                  n_search: int | None = None, integer_zeros: bool = False) -> torch.Tensor:
    """Best per-channel scales for linears that share input x [n, T, K], each in its format (bits, group_size)
    of layer_formats; inspect(x) runs the module they feed. Activation statistics come from all of x, the loss
    from its first n_search sequences."""
    x_mean = x_stats(x)
    x = x[:n_search]
    reference = inspect(x)
    w_mean = w_stats([(lin.weight.data, group_size) for lin, (_, group_size) in zip(linears, layer_formats)])
    best, best_loss = torch.ones_like(x_mean), float("inf")
    for i in range(n_grid):
        ratio = i / n_grid
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        trial = [fake_quantize(lin.weight.data.float() * s, bits, group_size, integer_zeros=integer_zeros,
                               grid="minmax", in_place=True).div_(s)
                 for lin, (bits, group_size) in zip(linears, layer_formats)]
        with _Swap(linears, trial):
            loss = (inspect(x) - reference).float().pow(2).mean().item()
        if loss < best_loss:
            best, best_loss = s, loss
    return best


@torch.inference_mode()
def search_clip(w: torch.Tensor, x: torch.Tensor, bits: float, group_size: int, perm, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, rows: slice | None = None,
                integer_zeros: bool = False) -> torch.Tensor:
    """Per (row, group) range shrink in [1 - max_shrink, 1] minimising |x w^T - x w_q^T|^2 on sample tokens; only
    `rows` are searched (the others keep their full range). A group's error is d^T (X_g^T X_g) d for its weight
    error d, with each group's Gram matrix X_g^T X_g of the sample tokens computed once. Rows go in chunks small
    enough for every candidate's passes over them to stay in the CPU's caches."""
    x = x.reshape(-1, x.shape[-1]).float()
    x = x[torch.linspace(0, len(x) - 1, min(n_tokens, len(x))).long()]
    n_all, k = w.shape
    searched = w[rows] if rows is not None else w
    n = len(searched)
    kp = -(-k // group_size) * group_size
    xg = grouped(x, perm, group_size).transpose(0, 1)                         # [G, T, g] in stored order
    gram = xg.transpose(1, 2) @ xg                                              # [G, g, g]
    ratios = [1 - max_shrink * i / n_grid for i in range(n_grid + 1)]
    best = torch.ones(n, kp // group_size)
    chunk = max(1, CLIP_CHUNK_ELEMENTS // kp)
    for r0 in range(0, n, chunk):
        stored = grouped(searched[r0:r0 + chunk].float(), perm, group_size)  # [c, G, g]
        lo, hi = group_range(stored)
        best_err = torch.full(lo.shape, float("inf"))
        for ratio in ratios:
            scales, zeros = range_grid(lo * ratio, hi * ratio, bits, integer_zeros)
            diff = stored - round_in_place(stored.clone(), scales, zeros, bits)
            dg = diff.transpose(0, 1)                                           # [G, c, g]
            err = ((dg @ gram) * dg).sum(-1).T                                  # [c, G]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[r0:r0 + chunk][better] = ratio
    if rows is None:
        return best
    full = torch.ones(n_all, kp // group_size)
    full[rows] = best
    return full


def _fold_into_norm(norm, s):
    norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)


def _fold_into_rows(linear, rows: slice, s):
    linear.weight.data[rows] = (linear.weight.data[rows].float() / s[:, None]).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data[rows] = (linear.bias.data[rows].float() / s).to(linear.bias.dtype)


def _scale_columns(linear, s):
    linear.weight.data = (linear.weight.data.float() * s).to(linear.weight.dtype)


@torch.inference_mode()
def scale_block(view, x: torch.Tensor, layer_formats: dict[str, tuple[float, int]], n_grid: int,
                n_search: int | None = None, integer_zeros: bool = False) -> dict:
    """Step 1: search the AWQ scales of one float block and fold them in (its output stays the same).
    layer_formats: each linear's (bits, group_size) by its name in the block (see block_formats).

    Returns, per linear name, the input it now sees (for the clipping search) and how its weight relates
    to the original float one: W_now = diag(row_scale) W diag(col_scale)."""
    lin = view.linear
    captured = {}

    def keep_input(name):
        return lambda module, inputs, output: captured.__setitem__(name, inputs[0])

    hooks = [lin(n).register_forward_hook(keep_input(n)) for n in (view.o, view.down)]
    h_attn = view.attn_norm(x)
    view.forward(x)
    for hook in hooks:
        hook.remove()
    resid = x + view.attention(h_attn)   # the MLP's residual input; unchanged by the folding below

    names = view.linear_names
    row_scale = {n: torch.ones(lin(n).out_features) for n in names}
    col_scale = {n: torch.ones(lin(n).in_features) for n in names}

    def apply(targets, s, fold):
        fold(s)
        for n in targets:
            _scale_columns(lin(n), s)
            col_scale[n] = s

    def fold_rows(rows_of):
        def fold(s):
            name, rows = rows_of
            _fold_into_rows(lin(name), rows, s)
            row_scale[name][rows] = 1 / s
        return fold

    def search(targets, x_in, inspect):
        return search_scales([lin(n) for n in targets], x_in, inspect, [layer_formats[n] for n in targets], n_grid,
                             n_search, integer_zeros)

    s = search(view.qkv, h_attn, view.attention)
    apply(view.qkv, s, lambda s: _fold_into_norm(view.attn_norm, s))
    if not view.grouped_query:  # o_proj's input channels are v's output channels
        s = search([view.o], captured[view.o], lin(view.o))
        apply([view.o], s, fold_rows(view.v_rows))
        captured[view.o] = captured[view.o] / s
    h_ffn = view.ffn_norm(resid)
    s = search(view.gate_up, h_ffn, view.mlp)
    apply(view.gate_up, s, lambda s: _fold_into_norm(view.ffn_norm, s))
    s = search([view.down], captured[view.down], lin(view.down))
    apply([view.down], s, fold_rows(view.up_rows))
    captured[view.down] = captured[view.down] / s

    inputs = {n: view.attn_norm(x) for n in view.qkv} | {n: view.ffn_norm(resid) for n in view.gate_up}
    inputs |= {view.o: captured[view.o], view.down: captured[view.down]}
    return {n: (inputs[n], (row_scale[n], col_scale[n])) for n in names}


@torch.inference_mode()
def quantize_block(view, inputs: dict, layer_formats: dict[str, tuple[float, int]], clip: bool,
                   saliency_order: bool, integer_zeros: bool = False):
    """Steps 2-4: channel order (int3.5), clipping search, and QuantLinear in place of each linear.

    inputs: scale_block's result, {linear name: (its input, (row_scale, col_scale))}; layer_formats: as
    scale_block's."""
    for name, (x_in, awq_scales) in inputs.items():
        linear = view.linear(name)
        bits, group_size = layer_formats[name]
        perm = saliency_perm(x_stats(x_in), linear.weight.data) if saliency_order and bits == 3.5 else None
        ratio = None
        if clip and name in view.clip_rows:
            ratio = search_clip(linear.weight.data, x_in, bits, group_size, perm, rows=view.clip_rows[name],
                                integer_zeros=integer_zeros)
        qw = quantize_weight(linear.weight.data, bits, group_size, perm=perm, clip=ratio, integer_zeros=integer_zeros)
        qlinear = QuantLinear(qw, linear.bias)
        qlinear.awq_scales = awq_scales
        view.block.set_submodule(name, qlinear)
