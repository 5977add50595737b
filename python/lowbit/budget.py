"""A bits-per-weight budget: each decoder linear's format and group size, chosen to minimise the measured error on
calibration data within a size counted in real bytes.

Candidates: {int3.5, int4, int8} x {32, 64, 128, 256} per linear, each costing the bytes it will be saved in
(formats.quantized_nbytes: codes with the padding up to whole groups, float16 scales and zeros, int3.5's int32
channel permutation where the method stores one) - the count lowbit.eval.linear_stats reports as bits per weight.

Error of a candidate (block_errors; lowbit.calibration.measure_errors walks the blocks): each output feature's
squared error on the float model's calibration activations X (all calibration tokens, block by block) when the linear's weight is round-to-nearest
quantized in that format on the min-max grid (int3.5 in AWQ's saliency channel order where the method uses it),
weighted by that output's sensitivity f (lowbit.calibration.output_sensitivity: the diagonal of the Fisher
information of the float model's next-token distributions, from one backward pass per calibration sequence, taken
block by block), summed over the linears:
sum_o f_o ||X dW_o||^2 with dW = W - W_q, about twice the KL divergence from the float model's outputs that the
rounding adds. The unweighted sum (every output alike) gave the late blocks the bits; the early ones matter more
(on SmolLM2 the first block's outputs are ~100x as sensitive as the middle ones'). Measured on SmolLM2 (perplexity
on the 4,097-token set, unweighted -> weighted; benchmarks/README.md): at 4.25 bits per weight RTN 23.18 -> 18.90,
AWQ+GPTQ 18.25 -> 17.38, GPTQ act-order 17.48 -> 16.95; at 4.5 RTN 18.68 -> 17.08, GPTQ act-order 16.48 -> 16.41.
With the data's next tokens as the labels instead of samples from the model, GPTQ act-order measured the same
within noise (16.92 at 4.25); the model's samples measure the distance to the float model itself, also on models
whose data loss means nothing (random weights).

GPTQ's methods leave less error than round-to-nearest, and less in some layers than in others: a column's
rounding error is spread over the columns rounded after it, so what remains of it costs only the part of the
column's input energy those columns cannot reproduce, 1 / U_cc^2 (U the upper Cholesky factor of the damped H^-1
in rounding order, H = X^T X; gptq.inverse_cholesky) instead of H_cc: ||X dW_o||^2 becomes
sum_c dW_oc^2 / U_cc^2, GPTQ's per-column losses with the round-to-nearest errors in place of the compensated
ones. On three of SmolLM2's blocks this is within 0.8-1.5x of the error GPTQ really leaves for every candidate of
group size 64 and more, where ||X dW||^2 is 2.4-8.5x it, by a factor that differs between attention and
feed-forward linears (the g32 candidates' errors are tiny, int4 g32 reproducing SmolLM2's weights almost
exactly, and there this estimate is 0.25-0.85x of it).

With AWQ's methods the weights that get rounded are channel-scaled ones, on which the formats rank differently
(SmolLM2's weights, dequantized from group-32 4-bit, are exact in int4 g32 until AWQ scales their columns), so
there the errors are measured after each block's AWQ scales for int4 are folded into a copy of the block.

Choice (choose_formats): the multiple-choice knapsack, greedily. Every linear starts in its cheapest candidate;
the upgrades along each linear's lower convex hull of (bytes, error) are taken in decreasing order of error saved
per byte while they fit; then the bytes left buy the single best further upgrade, again and again, while one fits.
"""

import heapq
from collections import Counter

import torch

from . import formats
from .awq import saliency_perm, x_stats
from .gptq import DAMP, act_order_perm, inverse_cholesky
from .nn import QuantLinear
from .quantize import fake_quantize

Format = tuple[float, int]  # (bits, group_size)
CANDIDATES: tuple[Format, ...] = tuple((b, g) for b in formats.BITS for g in formats.GROUP_SIZES)


def candidates(group_size: int | None = None) -> list[Format]:
    """Every (bits, group_size) a linear may take: all of CANDIDATES, or those of one group size."""
    if group_size is None:
        return list(CANDIDATES)
    group_size = formats.check_group_size(group_size)
    return [f for f in CANDIDATES if f[1] == group_size]


def candidate_bytes(shape: tuple[int, int], fmt: Format, saliency_order: bool) -> int:
    """Saved bytes of a [N, K] linear in fmt; int3.5 stores a channel permutation when saliency_order."""
    bits, group_size = fmt
    return formats.quantized_nbytes(*shape, bits, group_size, has_perm=saliency_order and bits == 3.5)


def block_errors(w: torch.Tensor, x_in: torch.Tensor, fmts: list[Format], saliency_order: bool, gptq: bool = False,
                 act_order: bool = False) -> dict[Format, torch.Tensor]:
    """{format: each output feature's squared error [N]} of one linear W [N, K] on its inputs x_in [tokens, K] (see
    the module docstring), rounded to nearest on the min-max grid: a ranking of the formats, ten times cheaper than
    on the searched grid. saliency_order: int3.5 in AWQ's saliency channel order. gptq: the error GPTQ leaves, its
    columns rounded in the stored order (int3.5: the saliency order) or, with act_order, by decreasing input
    energy. lowbit.calibration.measure_errors walks the blocks and weights these by the outputs' sensitivities."""
    h = x_in.T @ x_in
    perm = saliency_perm(x_stats(x_in), w) if saliency_order else None
    energy = {}  # {rounded in the saliency order: each column's weight in GPTQ's error [K]}
    errors = {}
    for bits, group_size in fmts:
        p = perm if bits == 3.5 else None
        dw = w - fake_quantize(w, bits, group_size, p, grid="minmax")
        if gptq:
            by_saliency = p is not None and not act_order
            if by_saliency not in energy:
                order = p if by_saliency else act_order_perm(h) if act_order else torch.arange(len(h))
                energy[by_saliency] = residual_energy(h, order.long())
            errors[bits, group_size] = dw.square() @ energy[by_saliency]
        else:
            errors[bits, group_size] = ((dw @ h) * dw).sum(1)  # each output's ||x_in dw_o||^2
    return errors


def residual_energy(h: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """1 / U_cc^2 for each input feature c (stored order) of a linear with input Gram matrix h [K, K], its columns
    rounded by GPTQ in `order`: the input energy a column's rounding error still costs after GPTQ has spread it
    over the columns rounded after it."""
    u = inverse_cholesky(h[order][:, order], DAMP)
    energy = torch.empty(len(order), device=h.device)
    energy[order] = u.diagonal().double().square().reciprocal().float()
    return energy


def _hull(points: list[tuple[int, float, Format]]) -> list[tuple[int, float, Format]]:
    """The lower convex hull of (bytes, error, format) points with error falling as bytes grow."""
    front = []
    for p in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or p[1] < front[-1][1]:  # drops the points a cheaper one beats
            front.append(p)
    hull = []
    for p in front:
        # Pop the last point while it lies on or above the segment from the one before it to p.
        while len(hull) >= 2 and ((hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])
                                  >= (p[1] - hull[-2][1]) * (hull[-1][0] - hull[-2][0])):
            hull.pop()
        hull.append(p)
    return hull


def choose_formats(errors: dict[str, dict[Format, float]], nbytes: dict[str, dict[Format, int]],
                   budget_bytes: int) -> dict[str, Format]:
    """Each layer's format (keys of errors[name]) minimising the summed error with summed bytes <= budget_bytes
    (see the module docstring). ValueError if even the cheapest choice does not fit."""
    points = {n: [(nbytes[n][f], e, f) for f, e in errs.items()] for n, errs in errors.items()}
    hulls = {n: _hull(p) for n, p in points.items()}
    step = {n: 0 for n in hulls}
    used = sum(h[0][0] for h in hulls.values())
    if used > budget_bytes:
        raise ValueError(f"a budget of {budget_bytes} bytes is below the cheapest choice, {used} bytes")

    def push(heap, n):
        if step[n] + 1 < len(hulls[n]):
            (b0, e0, _), (b1, e1, _) = hulls[n][step[n]], hulls[n][step[n] + 1]
            heapq.heappush(heap, (-(e0 - e1) / (b1 - b0), n))

    heap = []
    for n in hulls:
        push(heap, n)
    while heap:
        _, n = heapq.heappop(heap)
        extra = hulls[n][step[n] + 1][0] - hulls[n][step[n]][0]
        if used + extra <= budget_bytes:  # else this layer's later upgrades cost more still: it stops here
            used += extra
            step[n] += 1
            push(heap, n)
    choice = {n: hulls[n][step[n]] for n in hulls}
    while True:  # the bytes left: the best single upgrade that fits, off the hulls too
        best = max(((c[1] - p[1], n, p) for n, c in choice.items() for p in points[n]
                    if p[1] < c[1] and p[0] - c[0] <= budget_bytes - used), default=None, key=lambda t: t[0])
        if best is None:
            break
        _, n, p = best
        used += p[0] - choice[n][0]
        choice[n] = p
    return {n: c[2] for n, c in choice.items()}


def check_budget(shapes: dict[str, tuple[int, int]], bits_per_weight: float, saliency_order: bool,
                 group_size: int | None = None, fixed: tuple[int, int] = (0, 0)
                 ) -> tuple[list[Format], dict[str, dict[Format, int]], int]:
    """(candidate formats, each linear's bytes in each, the bytes the linears may take) for a budget of
    bits_per_weight over the linears of shapes ({name: [N, K]}) and fixed: (weights, bytes) of quantized linears
    outside the choice (a quantized output head), which count in the budget. group_size: only candidates of this
    group size. ValueError naming the limits when the budget is below the cheapest choice or above every linear in
    int8 at the smallest group size (the most precise)."""
    if not isinstance(bits_per_weight, (int, float)) or isinstance(bits_per_weight, bool):
        raise ValueError(f"bits_per_weight must be a number, got {bits_per_weight!r}")
    fmts = candidates(group_size)
    nbytes = {n: {f: candidate_bytes(shape, f, saliency_order) for f in fmts} for n, shape in shapes.items()}
    weights = fixed[0] + sum(n * k for n, k in shapes.values())
    low = (fixed[1] + sum(min(b.values()) for b in nbytes.values())) * 8 / weights
    most_precise = min(fmts, key=lambda f: (-f[0], f[1]))
    high = (fixed[1] + sum(b[most_precise] for b in nbytes.values())) * 8 / weights
    if not low <= bits_per_weight <= high:
        raise ValueError(f"bits_per_weight must lie in [{low:.4f}, {high:.4f}] for this model (every linear in its "
                         f"cheapest format of {', '.join(map(describe, fmts))}; every linear in "
                         f"{describe(most_precise)}), got {bits_per_weight}")
    return fmts, nbytes, int(bits_per_weight * weights / 8) - fixed[1]


def model_formats(model) -> dict[str, Format]:
    """{qualified name: (bits, group_size)} of every quantized linear of model."""
    return {name: (m.bits, m.group_size) for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def describe(fmt: Format) -> str:
    return f"int{fmt[0]:g} g{fmt[1]}"


def format_table(layer_formats: dict[str, Format]) -> str:
    """Per-layer formats as a markdown table, one row per decoder block and one column per linear in a block; then
    the linears outside the blocks (a quantized head) and the count of linears per format."""
    blocks, kinds, others = {}, [], []
    for name, fmt in layer_formats.items():
        parts = name.split(".")
        i = next((j for j, p in enumerate(parts) if p.isdigit()), None)
        if i is None:
            others.append(f"{name} {describe(fmt)}")
            continue
        kind = ".".join(parts[i + 1:])
        blocks.setdefault(".".join(parts[:i + 1]), {})[kind] = fmt
        if kind not in kinds:
            kinds.append(kind)
    lines = ["| block | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    lines += [f"| {block} | " + " | ".join(describe(row[k]) if k in row else "" for k in kinds) + " |"
              for block, row in blocks.items()]
    lines += [""] + (["outside the blocks: " + ", ".join(others)] if others else [])
    return "\n".join(lines + ["linears per format: " + format_counts(layer_formats.values())])


def format_counts(fmts) -> str:
    """How many linears take each format, the most common first: "int4 g64 x3, int8 g128 x1"."""
    counts = Counter(fmts)
    return ", ".join(f"{describe(f)} x{c}" for f, c in sorted(counts.items(), key=lambda t: (-t[1], t[0])))
