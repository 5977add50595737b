"""Activation-aware weight quantization (AWQ, Lin et al. 2023) of lowbit's LLaMA, block by block.

Per decoder block, on the calibration activations entering it:
  1. for each set of linears sharing an input (q/k/v after the input norm, gate/up after the
     post-attention norm, down after up; o after v when there is no grouped-query attention), search
     per-input-channel scales s = x_mean^a / w_mean^(1-a) over a grid of a in [0, 1), minimising the
     error of the module the linears feed (attention, MLP, or the linear itself) with W·s quantized;
     fold 1/s into the preceding norm or linear and s into the linears (the float model is unchanged);
  2. for int3.5, order the input channels by saliency (activation × weight magnitude) so the most
     salient half takes the 4-bit positions (a stored permutation);
  3. search a clipping ratio per (row, group) minimising each linear's output error;
  4. quantize, and pass the quantized block's output on as the next block's input.
Memory stays near one block plus the calibration activations.
"""

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .models.llama import Block, LlamaForCausalLM
from .nn import QuantLinear
from .quantize import fake_quantize, quantize_weight


def x_stats(x: torch.Tensor) -> torch.Tensor:
    """Mean |activation| per input channel, x [..., K] -> [K]."""
    return x.reshape(-1, x.shape[-1]).abs().float().mean(0)


def w_stats(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over rows of |w| normalised by its group's max |w|, per input channel -> [K]."""
    w = torch.cat(weights).float()
    n, k = w.shape
    g = min(group_size, k)
    pad = (-k) % g
    wg = F.pad(w.abs(), (0, pad)).view(n, -1, g)
    normed = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).view(n, -1)[:, :k]
    return normed.mean(0)


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
def search_scales(linears, x: torch.Tensor, inspect, bits: float, group_size: int, n_grid: int) -> torch.Tensor:
    """Best per-channel scales for linears that share input x; inspect(x) runs the module they feed."""
    reference = inspect(x)
    x_mean = x_stats(x)
    w_mean = w_stats([lin.weight.data for lin in linears], group_size)
    best, best_loss = torch.ones_like(x_mean), float("inf")
    for i in range(n_grid):
        ratio = i / n_grid
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        trial = [fake_quantize(lin.weight.data.float() * s, bits, group_size) / s for lin in linears]
        with _Swap(linears, trial):
            loss = (inspect(x) - reference).float().pow(2).mean().item()
        if loss < best_loss:
            best, best_loss = s, loss
    return best


@torch.inference_mode()
def search_clip(w: torch.Tensor, x: torch.Tensor, bits: float, group_size: int, perm, n_grid: int = 20,
                max_shrink: float = 0.5, n_tokens: int = 512, rows: slice | None = None) -> torch.Tensor:
    """Per (row, group) range shrink in [1 - max_shrink, 1] minimising |x w^T - x w_q^T|^2 on sample tokens."""
    x = x.reshape(-1, x.shape[-1]).float()
    x = x[torch.linspace(0, len(x) - 1, min(n_tokens, len(x))).long()]
    n, k = w.shape
    kp = -(-k // group_size) * group_size
    order = perm.long() if perm is not None else torch.arange(k)
    xg = F.pad(x[:, order], (0, kp - k)).view(len(x), -1, group_size)          # [T, G, g] stored order
    best = torch.ones(n, kp // group_size)
    best_err = torch.full_like(best, float("inf"))
    for i in range(n_grid + 1):
        ratio = 1 - max_shrink * i / n_grid
        clip = torch.full_like(best, ratio)
        diff = w.float() - fake_quantize(w, bits, group_size, perm, clip)
        dg = F.pad(diff[:, order], (0, kp - k)).view(n, -1, group_size)        # [N, G, g]
        err = torch.einsum("ngk,tgk->ngt", dg, xg).pow(2).sum(-1)                # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    if rows is not None:  # rows outside the slice keep their full range
        keep = torch.ones_like(best, dtype=torch.bool)
        keep[rows] = False
        best[keep] = 1.0
    return best


def _fold_into_norm(norm, s):
    norm.weight.data = (norm.weight.data.float() / s).to(norm.weight.dtype)


def _fold_into_rows(linear, rows: slice, s):
    linear.weight.data[rows] = (linear.weight.data[rows].float() / s[:, None]).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data[rows] = (linear.bias.data[rows].float() / s).to(linear.bias.dtype)


def _scale_columns(linear, s):
    linear.weight.data = (linear.weight.data.float() * s).to(linear.weight.dtype)


@torch.inference_mode()
def scale_block(block: Block, x: torch.Tensor, cos, sin, bits: float, group_size: int, n_grid: int) -> dict:
    """Step 1: search the AWQ scales of one float block and fold them in (its output stays the same).

    Returns the inputs each linear now sees, for the clipping search."""
    attn, ffn = block.attn, block.ffn
    captured = {}

    def keep_input(name):
        return lambda module, inputs, output: captured.__setitem__(name, inputs[0])

    hooks = [m.register_forward_hook(keep_input(n)) for n, m in (("wo", attn.wo), ("w_down", ffn.w_down))]
    h_attn = block.attn_norm(x)
    block(x, cos, sin, None)
    for hook in hooks:
        hook.remove()
    resid = x + attn(h_attn, cos, sin, None)   # the MLP's residual input; unchanged by the folding below

    s = search_scales([attn.wqkv], h_attn, lambda h: attn(h, cos, sin, None), bits, group_size, n_grid)
    _fold_into_norm(block.attn_norm, s)
    _scale_columns(attn.wqkv, s)
    q_dim, kv_dim = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    if attn.n_kv_heads == attn.n_heads:  # o_proj's input channels are v's output channels
        s = search_scales([attn.wo], captured["wo"], attn.wo, bits, group_size, n_grid)
        _fold_into_rows(attn.wqkv, slice(q_dim + kv_dim, q_dim + 2 * kv_dim), s)
        _scale_columns(attn.wo, s)
        captured["wo"] = captured["wo"] / s
    s = search_scales([ffn.w_gate_up], block.ffn_norm(resid), ffn, bits, group_size, n_grid)
    _fold_into_norm(block.ffn_norm, s)
    _scale_columns(ffn.w_gate_up, s)
    s = search_scales([ffn.w_down], captured["w_down"], ffn.w_down, bits, group_size, n_grid)
    _fold_into_rows(ffn.w_gate_up, slice(ffn.intermediate_size, 2 * ffn.intermediate_size), s)
    _scale_columns(ffn.w_down, s)
    captured["w_down"] = captured["w_down"] / s
    return {"wqkv": block.attn_norm(x), "wo": captured["wo"], "w_gate_up": block.ffn_norm(resid),
            "w_down": captured["w_down"]}


@torch.inference_mode()
def quantize_block(block: Block, inputs: dict, bits: float, group_size: int, clip: bool, saliency_order: bool):
    """Steps 2-4: channel order (int3.5), clipping search, and QuantLinear in place of each linear."""
    attn, ffn = block.attn, block.ffn
    q_dim, kv_dim = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    targets = {"wqkv": (attn, "wqkv"), "wo": (attn, "wo"), "w_gate_up": (ffn, "w_gate_up"), "w_down": (ffn, "w_down")}
    for name, (parent, attr) in targets.items():
        linear = getattr(parent, attr)
        x_in = inputs[name]
        perm = saliency_perm(x_stats(x_in), linear.weight.data) if saliency_order and bits == 3.5 else None
        ratio = None
        if clip:
            # As in AWQ, q and k keep their full range (their errors are amplified by the softmax).
            rows = slice(q_dim + kv_dim, q_dim + 2 * kv_dim) if name == "wqkv" else None
            ratio = search_clip(linear.weight.data, x_in, bits, group_size, perm, rows=rows)
        qw = quantize_weight(linear.weight.data, bits, group_size, perm=perm, clip=ratio)
        setattr(parent, attr, QuantLinear(qw, linear.bias))


def quantize_llama_awq(model: LlamaForCausalLM, bits: float, group_size: int, calib: torch.Tensor,
                       n_grid: int = 20, clip: bool = True, saliency_order: bool = True, n_search: int = 2,
                       progress: bool = True) -> LlamaForCausalLM:
    """AWQ of every decoder block's linears, in place. calib: token ids [n_samples, seq_len].

    The scale and clipping searches run on the first n_search calibration sequences (CPU time grows with
    them); every sequence flows through the quantized blocks."""
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"AWQ works on lowbit.LlamaForCausalLM (load transformers checkpoints with "
                        f"lowbit.LlamaForCausalLM.from_pretrained), got {type(model).__name__}")
    if calib is None or calib.dim() != 2 or calib.numel() == 0:
        raise ValueError("AWQ needs calibration tokens [n_samples, seq_len] (see lowbit.data.calibration_tokens)")
    with torch.inference_mode():
        x = model.embed(calib.to(model.device))                     # [n, T, H]: the activations entering block 0
        positions = torch.arange(calib.shape[1], dtype=torch.float32, device=model.device)
        angles = torch.outer(positions, model.inv_freq)
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        for block in tqdm(model.layers, desc=f"AWQ int{bits:g}", disable=not progress):
            inputs = scale_block(block, x[:n_search], cos, sin, bits, group_size, n_grid)
            quantize_block(block, inputs, bits, group_size, clip, saliency_order)
            x = torch.cat([block(x[i:i + 8], cos, sin, None) for i in range(0, len(x), 8)])
    return model

