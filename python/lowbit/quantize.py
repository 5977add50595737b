"""Round-to-nearest quantization of one weight matrix into the lowbit formats (and its fake-quantized float)."""

import torch

from . import formats
from . import ops  # noqa: F401  (registers torch.ops.lowbit.mse_grid)
from .weight import QuantizedWeight


def quantize_weight(w: torch.Tensor, bits: float = 4, group_size: int = 128, perm: torch.Tensor | None = None,
                    clip: torch.Tensor | None = None, integer_zeros: bool = False,
                    grid: str = "mse") -> QuantizedWeight:
    """Round-to-nearest quantization of W [N, K] (nn.Linear layout), per group of input columns.

    bits is 4, 3.5 or 8. Each group's weights round onto codes 0..15 (int4, and the 4-bit positions of int3.5),
    0..7 (3-bit positions of int3.5) or 0..255 (int8) of a grid given by a float16 scale and a float16 zero
    point, chosen by `grid` (see group_grid): "mse" (default) the grid with the least squared error found,
    "minmax" the group's range [min(w, 0), max(w, 0)]. perm (int32 [K], optional) reorders the input columns
    before grouping: stored column j holds input feature perm[j]. clip ([N, groups] ratios in (0, 1],
    optional; AWQ's) fixes each group's range instead: the min-max range shrunk by its ratio.
    integer_zeros rounds the zero points to integers (as AutoAWQ stores them, for `lowbit export`).
    Rows are quantized in chunks, so memory stays near a few times the size of W in float32.
    """
    bits = formats.check_bits(bits)
    group_size = formats.check_group_size(group_size)
    check_grid(grid)
    n, k = w.shape if isinstance(w, torch.Tensor) and w.dim() == 2 else (0, 0)
    check_clip(clip, n, -(-k // group_size))
    rows = max(1, (1 << 22) // max(k, 1))
    parts = []
    for start in range(0, max(n, 1), rows):
        chunk, perm = checked_weight(w[start:start + rows] if n else w, perm)
        ratio = None if clip is None else clip[start:start + rows]
        codes, scales, zeros = _round_to_nearest(grouped(chunk, perm, group_size), k, bits, ratio, integer_zeros,
                                                 grid)
        parts.append((formats.pack(codes.view(chunk.shape[0], -1).to(torch.int32), bits), scales, zeros))
    qweight, scales, zeros = (torch.cat(t) for t in zip(*parts))
    return QuantizedWeight(qweight, scales, zeros, perm, bits, group_size, k)


def fake_quantize(w: torch.Tensor, bits: float, group_size: int, perm: torch.Tensor | None = None,
                  clip: torch.Tensor | None = None, integer_zeros: bool = False, grid: str = "mse",
                  in_place: bool = False) -> torch.Tensor:
    """quantize_weight(...).dequantize() without packing: W [N, K] as the quantized model will see it.

    bits is 3.5 or an integer 2..8: 4 and 8 are lowbit formats; the other integers, for reference only, are
    uniform `bits`-bit codes with the same grouping, range and float16 scale/zero (no packed format or kernel
    exists for those; they place 3.5 bits between 3 and 4 in error reports). in_place: w (float32, without perm)
    is rounded in its own memory and returned (for searches that make a fresh W per trial).
    """
    if bits not in (3.5, 2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"fake_quantize: bits must be 3.5 or an integer 2..8, got {bits!r}")
    check_grid(grid)
    n, k = w.shape
    check_clip(clip, n, -(-k // group_size))
    groups = grouped(w.float(), perm, group_size)
    n_groups = groups.shape[1]
    columns = (torch.arange(n_groups * group_size, device=groups.device) < k).view(n_groups, group_size)
    scales, zeros = group_grid(groups, bits, clip, integer_zeros, grid, columns)
    if not in_place and groups.untyped_storage().data_ptr() == w.untyped_storage().data_ptr():
        groups = groups.clone()  # rounded in place below
    elif in_place and (w.dtype != torch.float32 or perm is not None or not w.is_contiguous()):
        raise ValueError("fake_quantize: in_place needs a contiguous float32 w without perm")
    stored = round_in_place(groups, scales, zeros, bits).view(n, -1)[:, :k]
    if in_place:  # (a padded copy was rounded where K is not a multiple of group_size)
        return w.copy_(stored) if k % group_size else w
    if perm is None:
        return stored
    out = torch.empty_like(stored)
    out[:, perm.long()] = stored
    return out


def round_in_place(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: float) -> torch.Tensor:
    """grid_values(round_to_grid(w, ...), ...) computed in w's own memory (the same operations in the same order,
    so the same numbers, without a tensor of codes and steps beside it): w [..., group_size] -> w."""
    s, z = scales.float().unsqueeze(-1), zeros.float().unsqueeze(-1)
    w.div_(s).add_(z)
    if bits == 3.5:
        w[..., 0::2].round_().clamp_(0, _top_code(bits))
        w[..., 1::2].div_(formats.STEP3).round_().clamp_(0, 7).mul_(formats.STEP3)
    else:
        w.round_().clamp_(0, _top_code(bits))
    return w.sub_(z).mul_(s)


def checked_weight(w, perm):
    """(W as float32, perm as int32 or None), after checking both; a clear ValueError otherwise."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D floating-point tensor [out_features, in_features], got "
                         f"{getattr(w, 'dtype', type(w))} {list(getattr(w, 'shape', []))}")
    n, k = w.shape
    if n == 0 or k == 0:
        raise ValueError(f"w must not be empty, got shape {list(w.shape)}")
    w = w.detach().to(torch.float32)
    if not formats.all_finite(w):
        bad = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise ValueError(f"w has non-finite values (first at {bad}); cannot quantize")
    if perm is not None:
        perm = perm.to(device=w.device, dtype=torch.int32)
        identity = torch.arange(k, device=w.device, dtype=torch.int32)
        if perm.shape != (k,) or not torch.equal(perm.sort().values, identity):
            raise ValueError(f"perm must be a permutation of range({k})")
    return w, perm


def grouped(w: torch.Tensor, perm, group_size: int) -> torch.Tensor:
    """W [N, K] -> [N, groups, group_size]: columns permuted, zero-padded up to a multiple of group_size."""
    n, k = w.shape
    if perm is not None:
        w = w[:, perm.long()]
    kp = formats.padded_in_features(k, group_size)
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    return w.view(n, kp // group_size, group_size)


def check_grid(grid) -> None:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")


def check_clip(clip, n: int, groups: int) -> None:
    if clip is None:
        return
    if not isinstance(clip, torch.Tensor) or tuple(clip.shape) != (n, groups):
        raise ValueError(f"clip must be a tensor of ratios [{n}, {groups}] (rows x groups), got "
                         f"{list(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__}")
    if not bool(((clip > 0) & (clip <= 1)).all()):
        raise ValueError("clip ratios must lie in (0, 1]")


def _round_to_nearest(groups: torch.Tensor, k: int, bits: float, clip=None, integer_zeros: bool = False,
                      grid: str = "mse"):
    """groups [N, G, group_size] of k columns and zero padding -> (codes float [N, G, group_size],
    scales fp16 [N, G], zeros fp16 [N, G])."""
    n_groups, group_size = groups.shape[1:]
    columns = (torch.arange(n_groups * group_size, device=groups.device) < k).view(n_groups, group_size)
    scales, zeros = group_grid(groups, bits, clip, integer_zeros, grid, columns)
    return round_to_grid(groups, scales, zeros, bits), scales, zeros


# The per-format grid, in three functions that also serve error-compensating quantizers (lowbit.gptq), which
# fix a group's grid when they reach it and then round its columns one at a time.

def _top_code(bits: float) -> int:
    return 15 if bits == 3.5 else 2 ** int(bits) - 1  # int3.5 counts in 4-bit steps (see STEP3)


GRIDS = ("mse", "minmax")
# The "mse" grid's candidates: the min-max range shrunk by each ratio, then refit twice. Measured on SmolLM2
# int4 g64 (perplexity on 4,097 held-out tokens, min-max 21.15): refits alone 20.39, ratios alone 21.10, three
# ratios x three refits 19.83, these 19.28 (19.33 with the min-max grid among the candidates, as now: it never
# loses in squared error, but perplexity is not squared error).
MSE_RATIOS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79)
MSE_REFITS = 2
MSE_SLICE_ELEMENTS = 1 << 20


def group_grid(groups: torch.Tensor, bits: float, clip=None, integer_zeros: bool = False, grid: str = "mse",
               columns: torch.Tensor | None = None):
    """The grid of each group: groups [..., group_size] -> (scales fp16 [...], zeros fp16 [...]).

    "minmax", or clip ([...] ratios) given: the range [min(w, 0), max(w, 0)], shrunk by clip. "mse": of the
    candidates MSE_RATIOS (the range shrunk by each), each refined MSE_REFITS times by a least-squares fit of
    scale and offset to the codes it rounds to (w ~ s * step + c, the codes rounded again after each fit), the
    one with the least squared error of the group's weights (data-free, like llama.cpp's k-quant searches), or
    the min-max grid where none is better.
    columns (broadcasting to groups, optional): each column's weight in the "mse" search's squared error, e.g.
    0 for padding (bool: the real columns) or the size of its inputs (lowbit.gptq).
    float32 groups on the CPU take the search as a kernel (lowbit::mse_grid), which reproduces _mse_grid (the
    reference, and the path elsewhere) bit for bit where torch sums as its x86 kernels do.
    """
    if grid == "mse" and clip is None:
        weight = None if columns is None else columns.float()
        kernel = groups.device.type == "cpu" and groups.dtype == torch.float32
        if kernel and (weight is None or weight.dim() <= groups.dim()):
            if weight is not None:  # the op takes the trailing dimensions of groups
                weight = weight.broadcast_to(groups.shape[groups.dim() - weight.dim():])
            return torch.ops.lowbit.mse_grid(groups, weight, float(bits), MSE_RATIOS, MSE_REFITS, integer_zeros)
        weight = 1.0 if weight is None else weight
        # Slices of leading rows small enough for the many passes over them to stay in the CPU's caches.
        rows = max(1, MSE_SLICE_ELEMENTS // max(groups[0].numel(), 1))
        parts = [_mse_grid(part, bits, integer_zeros, weight) for part in groups.split(rows)]
        return tuple(torch.cat(t) for t in zip(*parts))
    return _minmax_grid(groups, bits, clip, integer_zeros)


def _mse_grid(groups: torch.Tensor, bits: float, integer_zeros: bool, weight):
    def error(scales, zeros):
        diff = grid_values(round_to_grid(groups, scales, zeros, bits), scales, zeros, bits) - groups
        return (diff.square() * weight).sum(-1)

    scales, zeros = _minmax_grid(groups, bits, None, integer_zeros)
    best = (error(scales, zeros), scales, zeros)  # the min-max grid itself: never worse than it
    for ratio in MSE_RATIOS:
        scales, zeros = _minmax_grid(groups, bits, ratio, integer_zeros)
        for _ in range(MSE_REFITS):
            scales, zeros = _refit(groups, weight, grid_steps(round_to_grid(groups, scales, zeros, bits), bits),
                                   scales, zeros, bits, integer_zeros)
        err = error(scales, zeros)
        better = err < best[0]
        best = tuple(torch.where(better, new, old) for new, old in zip((err, scales, zeros), best))
    return best[1], best[2]


def _refit(groups, weight, steps, scales, zeros, bits, integer_zeros):
    """Weighted least-squares scale and zero point of w ~ (steps - z) * s over each group's columns (weight: a
    column's weight in the squared error, 0 for padding); groups whose codes are all equal (or whose fit is not a
    positive float16 scale or a finite float16 zero point) keep theirs."""
    weighted = steps * weight
    n = torch.broadcast_to(torch.as_tensor(weight, device=groups.device), groups.shape).sum(-1)
    sum_x, sum_w = weighted.sum(-1), (groups * weight).sum(-1)
    det = n * (weighted * steps).sum(-1) - sum_x.square()
    slope = (n * (weighted * groups).sum(-1) - sum_x * sum_w) / torch.where(det > 0, det, 1.0)
    new_scales = slope.to(torch.float16)
    new_scales = torch.where((det > 0) & (new_scales > 0) & torch.isfinite(new_scales), new_scales, scales)
    new_zeros = (sum_x - sum_w / new_scales.float()) / n  # the offset c = -z * s, with the float16 scale
    if integer_zeros:
        new_zeros = new_zeros.round().clamp(0, _top_code(bits))
    new_zeros = new_zeros.to(torch.float16)
    ok = torch.isfinite(new_zeros)
    return torch.where(ok, new_scales, scales), torch.where(ok, new_zeros, zeros)


def _minmax_grid(groups: torch.Tensor, bits: float, clip, integer_zeros: bool):
    lo, hi = group_range(groups)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    return range_grid(lo, hi, bits, integer_zeros)


def group_range(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[min(w, 0), max(w, 0)] of each group [..., group_size] -> (lo [...], hi [...])."""
    return groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)


def range_grid(lo: torch.Tensor, hi: torch.Tensor, bits: float, integer_zeros: bool = False):
    """The grid (scales fp16, zeros fp16) that spans [lo, hi] (lo <= 0 <= hi)."""
    top = _top_code(bits)
    scales = ((hi - lo) / top).to(torch.float16)
    if torch.isinf(scales).any():
        raise ValueError("w has groups whose range exceeds float16 scales (|w| > ~9e5); cannot quantize")
    # All-zero groups (and ranges below float16's smallest step) still get a usable scale.
    scales = scales.clamp(min=torch.finfo(torch.float16).smallest_normal * 2 ** -10)
    zeros = -lo / scales.float()
    zeros = (zeros.round().clamp(0, top) if integer_zeros else zeros).to(torch.float16)
    return scales, zeros


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: float,
                  first_column: int = 0) -> torch.Tensor:
    """Codes (float) of w [..., c], stored columns first_column .. first_column + c - 1 of one group, on the
    grid scales, zeros [...]; int3.5's odd stored columns take 3-bit codes."""
    top = _top_code(bits)
    # Quantize with the stored float16 values so codes match what decoders will compute.
    t = w / scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)  # position in steps
    codes = t.round().clamp(0, top)
    if bits == 3.5:
        odd = slice(1 - first_column % 2, None, 2)
        codes[..., odd] = (t[..., odd] / formats.STEP3).round().clamp(0, 7)
    return codes


def grid_values(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: float,
                first_column: int = 0) -> torch.Tensor:
    """The weights that codes [..., c] (as round_to_grid numbers them) stand for: float32."""
    return (grid_steps(codes, bits, first_column) - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)


def grid_steps(codes: torch.Tensor, bits: float, first_column: int = 0) -> torch.Tensor:
    """Codes [..., c] as positions on the grid in 4-bit steps (int3.5's 3-bit codes are 15/7 steps apart)."""
    steps = codes.to(torch.float32, copy=True)
    if bits == 3.5:
        steps[..., 1 - first_column % 2::2] *= formats.STEP3
    return steps
