"""Quality of a quantized model against float: per-layer RMSE report and perplexity."""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .nn import QuantLinear
from .quantize import fake_quantize


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 512, progress: bool = True) -> float:
    """exp(mean next-token NLL) over tokens [1, T] (or [T]) cut into windows of seq_len (no overlap)."""
    stream = tokens.reshape(-1)
    n_windows = (len(stream) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {len(stream)}")
    total, count = 0.0, 0
    for w in tqdm(range(n_windows), desc="perplexity", disable=not progress):
        window = stream[w * seq_len:(w + 1) * seq_len + 1].unsqueeze(0).to(model.device)
        logits = model(window[:, :-1])
        total += F.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum").item()
        count += seq_len
    return math.exp(total / count)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer, counting shared (tied) storage once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def linear_stats(model: nn.Module) -> tuple[int, int]:
    """(weights, bytes) over the quantized linear layers: 8 * bytes / weights is their bits per weight."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    return sum(m.in_features * m.out_features for m in layers), sum(m.weight.nbytes for m in layers)


def model_params(model: nn.Module) -> int:
    """Parameters of a float model, counting tied ones once."""
    return sum(p.numel() for p in {p.untyped_storage().data_ptr(): p for p in model.parameters()}.values())


@dataclass
class RMSEReport:
    """rmse_report's result: one row per quantized layer, and totals for the model.

    Row keys: layer, bits, group_size, shape [N, K], weight_rel_rmse ||W - W_q|| / ||W||, output_rel_rmse
    ||x W^T - x W_q^T|| / ||x W^T|| on the float model's own activations x, bits_per_weight, bytes, and
    output_rel_rmse_uniform{b} for every reference-only uniform b-bit baseline asked for.
    """
    rows: list[dict]
    totals: dict
    baselines: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict:
        return {"rows": self.rows, "totals": self.totals}

    def __str__(self) -> str:
        base = [f"uniform{b}" for b in self.baselines]
        head = (f"{'layer':<28} {'bits':>4} {'g':>4} {'shape':>11} {'bits/w':>6} {'KB':>8} {'W rel.RMSE':>10} "
                f"{'out rel.RMSE':>12}" + "".join(f" {'out ' + b:>14}" for b in base))
        lines = [head, "-" * len(head)]
        for r in self.rows:
            shape = f"{r['shape'][0]}x{r['shape'][1]}"
            lines.append(f"{r['layer']:<28} {r['bits']:>4g} {r['group_size']:>4} {shape:>11} "
                         f"{r['bits_per_weight']:>6.2f} {r['bytes'] / 1024:>8.1f} {r['weight_rel_rmse']:>10.4f} "
                         f"{r['output_rel_rmse']:>12.4f}"
                         + "".join(f" {r['output_rel_rmse_' + b]:>14.4f}" for b in base))
        t = self.totals
        lines += ["-" * len(head),
                  f"{'all quantized layers':<28} {'':>4} {'':>4} {t['quantized_weights']:>11} "
                  f"{t['bits_per_weight']:>6.2f} {t['quantized_bytes'] / 1024:>8.1f} {t['weight_rel_rmse']:>10.4f} "
                  f"{t['output_rel_rmse']:>12.4f}"
                  + "".join(f" {t['output_rel_rmse_' + b]:>14.4f}" for b in base),
                  f"model: {t['model_mb']:.1f} MB quantized vs {t['float16_mb']:.1f} MB in float16 "
                  f"({t['model_mb'] / t['float16_mb']:.1%}); rel. RMSE totals pool the squared errors of all layers"]
        return "\n".join(lines)

    __repr__ = __str__


@torch.inference_mode()
def rmse_report(ref: nn.Module, quantized: nn.Module, tokens: torch.Tensor, baselines: tuple[int, ...] = (),
                batch_size: int = 4, progress: bool = True) -> RMSEReport:
    """Per quantized layer of `quantized`, its error against the same-named nn.Linear of the float `ref`.

    Runs ref on tokens (ids [B, T] or [T]) once; each float layer's input x, as the float model computes it,
    also goes through the quantized layer (undoing AWQ's folded scales, which live outside the layer), so
    every layer's error is its own, not what earlier layers passed on. baselines: integer bit widths
    (e.g. (3, 4)) of reference-only uniform quantizers with the layer's group size, for comparison.
    """
    qlayers = {name: m for name, m in quantized.named_modules() if isinstance(m, QuantLinear)}
    if not qlayers:
        raise ValueError("rmse_report: the quantized model has no QuantLinear layers")
    if (getattr(quantized, "quantization", {}).get("method") in ("awq", "awq+gptq")
            and all(q.awq_scales is None for q in qlayers.values())):
        raise ValueError("rmse_report: AWQ folded per-channel scales into the norms and the layers before each "
                         "quantized one; checkpoints do not keep them, so a loaded AWQ model's layers cannot be "
                         "compared with the float model's one by one. Report on the model quantize_model returned, "
                         "or compare whole models (lowbit.eval.perplexity)")
    ref_modules = dict(ref.named_modules())
    for name, q in qlayers.items():
        r = ref_modules.get(name)
        if not isinstance(r, nn.Linear):
            raise ValueError(f"rmse_report: ref has no nn.Linear named {name!r} to compare the quantized layer with")
        if tuple(r.weight.shape) != (q.out_features, q.in_features):
            raise ValueError(f"rmse_report: {name} is {list(r.weight.shape)} in ref but "
                             f"[{q.out_features}, {q.in_features}] in the quantized model")
    sums = {name: torch.zeros(2 + len(baselines), dtype=torch.float64) for name in qlayers}  # err², ref², baselines
    baseline_w = {}

    def hook(name):
        q = qlayers[name]
        row, col = q.awq_scales if q.awq_scales is not None else (None, None)

        def record(module, inputs, output):
            x, y = inputs[0], output.double()
            xq = x if col is None else (x.float() / col.to(x.device)).to(x.dtype)
            yq = q(xq.to(q.scales.device)).double().to(y.device)
            if row is not None:
                yq = yq / row.to(y.device).double()
            s = sums[name]
            s[0] += (yq - y).pow(2).sum().item()
            s[1] += y.pow(2).sum().item()
            for i, b in enumerate(baselines):
                if (name, b) not in baseline_w:
                    baseline_w[name, b] = fake_quantize(module.weight.float(), b, q.group_size).to(module.weight.dtype)
                yb = F.linear(x, baseline_w[name, b], module.bias).double()
                s[2 + i] += (yb - y).pow(2).sum().item()
        return record

    handles = [ref_modules[name].register_forward_hook(hook(name)) for name in qlayers]
    try:
        ids = tokens.reshape(-1, tokens.shape[-1]).to(ref.device if hasattr(ref, "device") else "cpu")
        for i in tqdm(range(0, len(ids), batch_size), desc="rmse_report", disable=not progress):
            ref(ids[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()

    rows, pooled = [], torch.zeros(4 + len(baselines), dtype=torch.float64)
    for name, q in qlayers.items():
        w = ref_modules[name].weight.detach().double()
        wq = q.dequantize().double().to(w.device)
        if q.awq_scales is not None:
            row, col = (t.double().to(w.device) for t in q.awq_scales)
            wq = wq / row[:, None] / col[None, :]
        w_err, w_ref = (wq - w).pow(2).sum().item(), w.pow(2).sum().item()
        s = sums[name]
        row_ = {"layer": name, "bits": q.bits, "group_size": q.group_size, "shape": [q.out_features, q.in_features],
                "bits_per_weight": q.weight.bits_per_weight, "bytes": q.weight.nbytes,
                "weight_rel_rmse": math.sqrt(w_err / w_ref), "output_rel_rmse": math.sqrt(s[0] / s[1])}
        for i, b in enumerate(baselines):
            row_[f"output_rel_rmse_uniform{b}"] = math.sqrt(s[2 + i] / s[1])
        rows.append(row_)
        pooled += torch.tensor([w_err, w_ref, *s.tolist()], dtype=torch.float64)
    n_weights = sum(q.in_features * q.out_features for q in qlayers.values())
    n_bytes = sum(q.weight.nbytes for q in qlayers.values())
    totals = {"quantized_layers": len(rows), "quantized_weights": n_weights, "quantized_bytes": n_bytes,
              "bits_per_weight": 8 * n_bytes / n_weights,
              "weight_rel_rmse": math.sqrt(pooled[0] / pooled[1]), "output_rel_rmse": math.sqrt(pooled[2] / pooled[3]),
              "model_mb": model_bytes(quantized) / 1e6, "float16_mb": 2 * model_params(ref) / 1e6}
    for i, b in enumerate(baselines):
        totals[f"output_rel_rmse_uniform{b}"] = math.sqrt(pooled[4 + i] / pooled[3])
    return RMSEReport(rows, totals, tuple(baselines))
