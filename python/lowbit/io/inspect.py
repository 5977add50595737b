"""Inspecting a lowbit checkpoint: its tensors, sizes and formats per layer, and its integrity checks."""

import sys
from pathlib import Path

import torch
from torch import nn

from ..budget import format_counts
from ..models.llama import LlamaForCausalLM
from .checkpoint import QUANT_TENSORS, checked_quantization_config, load_quantized, module_format, quantized_weight
from .hf import CheckpointError, SafetensorsDir, read_config
from .safetensors_io import PAD_PREFIX


def inspect_checkpoint(path, out=None) -> bool:
    """Print a lowbit checkpoint's tensors, sizes and formats per layer, and run its integrity checks.

    Returns True when every check passes."""
    path, out = Path(path), out or sys.stdout
    problems = []
    try:
        config = read_config(path)
        qc = checked_quantization_config(config.extra, path)
        st = SafetensorsDir(path)
    except CheckpointError as e:
        print(f"FAILED: {e}", file=out)
        return False
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    not_converted = set(qc["modules_not_converted"])
    rows, seen, logical, total_bytes = [], set(), 0, 0
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params or (name == "lm_head" and config.tie_word_embeddings and "lm_head" in not_converted):
            continue
        shape = tuple(params["weight"].shape)
        n_logical = sum(p.numel() for p in params.values())
        if isinstance(module, nn.Linear) and name not in not_converted:
            names = [f"{name}.{k}" for k in (*QUANT_TENSORS, "perm", "bias") if f"{name}.{k}" in st]
            bits, group_size = module_format(qc, name)
            try:
                w = quantized_weight(st, name, bits, group_size, module.in_features)
                if w.shape != shape:
                    raise CheckpointError(f"{name}: shape {list(w.shape)} but the config needs {list(shape)}")
                fmt = f"int{bits:g} g{group_size}" + (" perm" if w.perm is not None else "")
            except CheckpointError as e:
                problems.append(str(e))
                fmt = "INVALID"
        else:
            names = [f"{name}.{k}" for k in params]
            fmt = "float"
            for k in names:
                if k not in st:
                    problems.append(f"{path}: missing tensor {k!r}")
                    continue
                t = st.get(k)
                if tuple(t.shape) != tuple(params[k.rpartition('.')[2]].shape):
                    problems.append(f"{st.file_of(k)}: tensor {k!r} has shape {list(t.shape)}, the config needs "
                                    f"{list(params[k.rpartition('.')[2]].shape)}")
                elif not (t.is_floating_point() and torch.isfinite(t).all()):
                    problems.append(f"{st.file_of(k)}: tensor {k!r} is not finite floating point ({t.dtype})")
                fmt = f"{t.dtype}".replace("torch.", "")
        nbytes = sum(st.nbytes(k) for k in names if k in st)
        seen |= set(names)
        logical += n_logical
        total_bytes += nbytes
        rows.append((name, fmt, "x".join(map(str, shape)), n_logical, nbytes))
    try:  # the loader's own checks, so that inspect and load_quantized never disagree
        load_quantized(path)
    except CheckpointError as e:
        if str(e) not in problems:
            problems.append(str(e))
    checked = 0
    for k in st.keys():
        if not k.startswith(PAD_PREFIX):
            try:
                checked += st.verify(k)
            except CheckpointError as e:
                problems.append(str(e))
    extra = sorted(k for k in st.keys() if k not in seen and not k.startswith(PAD_PREFIX))
    if extra:
        problems.append(f"{path}: {len(extra)} unexpected tensors, e.g. {extra[:3]}")
    n_tensors = sum(1 for k in st.keys() if not k.startswith(PAD_PREFIX))
    quantized = [name for name, fmt, *_ in rows if fmt.startswith("int")]
    if "bits_per_weight" in qc:  # a budget's choice: the formats counted, the per-layer map is the table below
        budget = qc["bits_per_weight"]
        summary = (f"bits/weight budget {budget['target']:g} ({budget['achieved']:.4f} achieved), linears per format: "
                   + format_counts(module_format(qc, name) for name in quantized))
    else:
        summary = f"int{qc['bits']:g}, group size {qc['group_size']}" + "".join(
            "; {}: int{:g} g{}".format(name, *module_format(qc, name)) for name in qc.get("module_formats", {}))
    print(f"{path}: lowbit format v{qc['format_version']}, {summary}, method {qc.get('method')}, "
          f"{config.num_hidden_layers} layers", file=out)
    print(f"{'module':<28} {'format':<14} {'shape':>12} {'params':>11} {'bytes':>11} {'bits/w':>7}", file=out)
    for name, fmt, shape, n, nbytes in rows:
        print(f"{name:<28} {fmt:<14} {shape:>12} {n:>11} {nbytes:>11} {8 * nbytes / n:>7.2f}", file=out)
    q_rows = [r for r in rows if r[1].startswith("int")]
    q_params, q_bytes = sum(r[3] for r in q_rows), sum(r[4] for r in q_rows)
    print(f"tensors: {n_tensors} (expected {len(seen)}); logical parameters: {logical}; bytes: {total_bytes} "
          f"({total_bytes / 1e6:.1f} MB); bits/weight: {8 * total_bytes / logical:.2f} overall, "
          f"{8 * q_bytes / max(q_params, 1):.2f} in quantized layers", file=out)
    print(f"checksums: {checked} tensors verified" if checked else
          "checksums: none stored (written before lowbit stored them)", file=out)
    for p in problems:
        print(f"FAILED: {p}", file=out)
    print("checks: " + ("all passed" if not problems else f"{len(problems)} failed"), file=out)
    return not problems
