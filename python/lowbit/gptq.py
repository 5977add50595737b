"""GPTQ: error-compensating rounding of each linear layer on calibration inputs, block by block.

The method is Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv:2210.17323); this is lowbit's own implementation of it. For a linear layer with
calibration inputs X, the output error of a rounded weight is a quadratic form in the weight error with
Hessian H = 2 X^T X. GPTQ rounds the stored columns one at a time, left to right, and moves each column's
rounding error onto the columns not yet rounded in the proportions that minimise that quadratic form (the
rows of the upper Cholesky factor of H^-1). A group's scale and zero point are fixed from the current,
error-updated weights when the group's first column is reached, so the codes, scales and zeros are
exactly lowbit's formats: checkpoints and kernels are the same as for round-to-nearest.

Column order: groups are contiguous in the stored column order, so any processing order other than left to
right is expressed through the format's input permutation `perm`. int3.5 uses AWQ's saliency order (the most
salient channels on the 4-bit positions, roughly in decreasing saliency); `act_order=True` orders int4's
columns by decreasing diag(H) (costs 4 bytes per input feature for the stored permutation; off by default).

quantize_llama_gptq runs the decoder blocks one after another (memory: one block plus the calibration
activations). Within a block the linears are quantized in the order the data flows (q/k/v, o, gate/up,
down), each on the inputs the already quantized linears before it produce. method "awq+gptq" first folds
AWQ's per-channel scales into the block and searches AWQ's per-group clipping ratios (lowbit.awq), then
rounds with GPTQ on the clipped grids.
"""

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from . import formats
from .awq import BlockView, block_formats, block_inputs, run_block, saliency_perm, scale_block, search_clip, x_stats
from .nn import QuantLinear
from .quantize import check_clip, checked_weight, grid_values, group_grid, round_to_grid
from .weight import QuantizedWeight


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / rows for a linear layer's inputs x [..., K]: float32 [K, K]."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (2 / len(x)) * (x.T @ x)


def act_order_perm(h: torch.Tensor) -> torch.Tensor:
    """Input features by decreasing diag(H): the columns with the largest inputs are rounded first."""
    return torch.argsort(h.diagonal(), descending=True, stable=True).to(torch.int32)


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (U^T U = H^-1), float32."""
    h = h.to(torch.float64, copy=True)
    diag = h.diagonal()
    diag[diag == 0] = 1  # an input that is always zero: its column is rounded alone, no error to spread
    diag += damp * diag.mean()
    factor, info = torch.linalg.cholesky_ex(h)
    if info:
        raise ValueError(f"GPTQ: the damped Hessian is not positive definite (damp={damp}); use a larger damp")
    # cholesky_solve against I: the same H^-1 as cholesky_inverse, which is far slower on CPU (LAPACK potri).
    inverse = torch.cholesky_solve(torch.eye(len(h), dtype=h.dtype, device=h.device), factor)
    return torch.linalg.cholesky(inverse, upper=True).float()


@contextmanager
def one_thread():
    """GPTQ's column loop runs many small operations on one column each: handing them to a second thread
    costs more than it saves, and stalls for milliseconds per operation on a busy machine (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: float = 4, group_size: int = 128,
                  perm: torch.Tensor | None = None, clip: torch.Tensor | None = None, damp: float = 0.01,
                  block_size: int = 128, integer_zeros: bool = False) -> QuantizedWeight:
    """GPTQ of one weight W [N, K] (nn.Linear layout) with the Hessian h [K, K] of its inputs (see hessian).

    perm, clip and integer_zeros mean what they mean for quantize_weight; damp adds damp * mean(diag H) to
    H's diagonal; columns are updated lazily in blocks of block_size (rounded up to whole groups, so that
    a group's grid sees every earlier column's correction). With H diagonal this is round-to-nearest.
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
    n_groups = -(-k // group_size)
    check_clip(clip, n, n_groups)
    h = h.to(w.device)
    if perm is not None:
        order = perm.long()
        w, h = w[:, order], h[order][:, order]
    else:
        w = w.clone()
    u = inverse_cholesky(h, damp)

    kp = formats.padded_in_features(k, group_size)
    codes = torch.empty(n, kp, device=w.device)
    scales = torch.empty(n, n_groups, dtype=torch.float16, device=w.device)
    zeros = torch.empty_like(scales)
    block = -(-block_size // group_size) * group_size
    with one_thread():
        for b0 in range(0, k, block):
            b1 = min(b0 + block, k)
            wb = w[:, b0:b1]                     # rounded in place, column by column
            err = torch.empty(n, b1 - b0, device=w.device)
            for j in range(b1 - b0):
                col = b0 + j
                g = col // group_size
                if col % group_size == 0:
                    ratio = None if clip is None else clip[:, g]
                    scales[:, g], zeros[:, g] = group_grid(wb[:, j:j + group_size], bits, ratio, integer_zeros)
                s, z = scales[:, g], zeros[:, g]
                q = round_to_grid(wb[:, j:j + 1], s, z, bits, col)
                codes[:, col] = q[:, 0]
                err[:, j] = (wb[:, j] - grid_values(q, s, z, bits, col)[:, 0]) / u[col, col]
                wb[:, j + 1:].addmm_(err[:, j:j + 1], u[col:col + 1, col + 1:b1], alpha=-1)  # (addr_ is slow)
            w[:, b1:].addmm_(err, u[b0:b1, b1:], alpha=-1)   # the block's corrections to every later column
    # Padding columns hold the codes of 0.0 (docs/FORMAT.md).
    codes[:, k:] = round_to_grid(torch.zeros(n, kp - k, device=w.device), scales[:, -1], zeros[:, -1], bits, k)
    return QuantizedWeight(formats.pack(codes.to(torch.int32), bits), scales, zeros, perm, bits, group_size, k)


def capture_input(view: BlockView, x: torch.Tensor, name: str) -> torch.Tensor:
    """The input of the block's linear `name` when the block runs on x [n, T, H] (as it is now)."""
    parts = []
    hook = view.linear(name).register_forward_hook(lambda module, inputs, output: parts.append(inputs[0]))
    try:
        run_block(view, x)
    finally:
        hook.remove()
    return torch.cat(parts)


def quantize_llama_gptq(model, bits: float, group_size: int, calib: torch.Tensor, awq: bool = False,
                        damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                        saliency_order: bool = True, clip: bool = True, n_grid: int = 20, n_search: int = 2,
                        integer_zeros: bool = False, progress: bool = True,
                        module_formats: dict[str, tuple[float, int]] | None = None):
    """GPTQ (awq=True: AWQ scales and clipping, then GPTQ) of every decoder block's linears, in place, for
    lowbit's or transformers' LlamaForCausalLM.

    calib: token ids [n_samples, seq_len]. damp, block_size: see gptq_quantize. act_order: columns in
    decreasing diag(H) order (a stored permutation; int3.5 takes the saliency order instead unless
    saliency_order=False). saliency_order: int3.5's channel order (lowbit.awq).
    clip, n_grid, n_search: AWQ's clipping search and scale search (awq=True only). module_formats: as
    lowbit.awq.quantize_llama_awq's."""
    bits = formats.check_bits(bits)
    group_size = formats.check_group_size(group_size)
    name = "AWQ+GPTQ" if awq else "GPTQ"
    with torch.inference_mode():
        x, blocks, views = block_inputs(model, calib, name)
        for block_name, block in tqdm(blocks, desc=f"{name} int{bits:g}", disable=not progress):
            view = views(block)
            layer_formats = block_formats(view, block_name, bits, group_size, module_formats)
            folded = {}
            if awq:
                folded = {n: scales for n, (_, scales) in
                          scale_block(view, x, layer_formats, n_grid, n_search, integer_zeros).items()}
            # Each set of linears sharing an input, in data-flow order, on what the quantized ones before give it.
            for stage in (view.qkv, [view.o], view.gate_up, [view.down]):
                x_in = capture_input(view, x, stage[0])
                h = hessian(x_in)
                for lin_name in stage:
                    linear = view.linear(lin_name)
                    w = linear.weight.data
                    fmt = layer_formats[lin_name]
                    perm = None
                    if fmt[0] == 3.5 and saliency_order:
                        perm = saliency_perm(x_stats(x_in), w)
                    elif act_order:
                        perm = act_order_perm(h)
                    ratio = None
                    if awq and clip and lin_name in view.clip_rows:
                        ratio = search_clip(w, x_in, *fmt, perm,
                                            rows=view.clip_rows[lin_name], integer_zeros=integer_zeros)
                    qlinear = QuantLinear(gptq_quantize(w, h, *fmt, perm, ratio, damp, block_size,
                                                        integer_zeros), linear.bias)
                    qlinear.awq_scales = folded.get(lin_name)
                    view.block.set_submodule(lin_name, qlinear)
            x = run_block(view, x)
    return model
