"""Orchestration: quantize a model (RTN, AWQ, GPTQ, a size budget), convert a checkpoint, load any supported source.

Both quantize_model (a model in memory) and convert (a checkpoint on disk) run the calibration pipeline
(lowbit.calibration), one decoder block at a time; this module adds the options' checks, the calibration data and
what lies outside the blocks (the output head, the quantization record).
"""

import copy
import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from . import data, formats
from .calibration import ModelSource, choose_for_budget, make_method, quantize_blocks, quantize_checkpoint
from .eval import linear_stats
from .gptq import check_act_order
from .io.autoawq import import_awq
from .io.checkpoint import float_source
from .io.hf import CheckpointError
from .io.loading import load_model
from .models.llama import LlamaForCausalLM
from .nn import QuantLinear, replace_linears
from .quantize import quantize_weight


def _head(bits: float, group_size: int, quantize_lm_head: bool, lm_head_bits, lm_head_group_size):
    """(whether the output head is quantized, its (bits, group_size)): giving its format quantizes it."""
    head_format = (formats.check_bits(bits if lm_head_bits is None else lm_head_bits),
                   formats.check_group_size(group_size if lm_head_group_size is None else lm_head_group_size))
    return quantize_lm_head or lm_head_bits is not None or lm_head_group_size is not None, head_format


DEFAULT_FORMAT = (4.0, 128)  # (bits, group_size) when neither they nor a bits-per-weight budget are given


def quantize_model(model: nn.Module, bits: float | None = None, group_size: int | None = None, method: str = "rtn",
                   calib=None, modules_to_not_convert: list[str] | None = None, quantize_lm_head: bool = False,
                   inplace: bool = True, integer_zeros: bool = False, lm_head_bits: float | None = None,
                   lm_head_group_size: int | None = None, bits_per_weight: float | None = None,
                   progress: bool = True, grid: str = "mse", act_order: bool | str = False) -> nn.Module:
    """Replace every nn.Linear of `model` by a QuantLinear (lowbit's LLaMA or transformers' LlamaForCausalLM).

    Every linear in one format, bits (default 4) and group_size (default 128); or, with bits_per_weight instead
    of bits, each decoder linear in the format and group size of {int3.5, int4, int8} x {32, 64, 128, 256} that
    lowbit.budget chooses to minimise the error measured on calib (needed, also for "rtn") within that many bits
    per weight, counted as lowbit.eval.linear_stats counts them (a quantized head counts, in its own fixed format:
    lm_head_bits, default 4, and lm_head_group_size, default group_size or 128). A group_size given with
    bits_per_weight restricts the choice to that group size.

    Modules whose qualified name equals or ends with an entry of modules_to_not_convert stay float, and so
    does the output head (lm_head) unless quantize_lm_head or its own format is given: lm_head_bits and
    lm_head_group_size (default: bits and group_size; e.g. an int8 head on int4 layers). method "rtn" is
    round-to-nearest per group; "awq" is activation-aware (lowbit.awq), "gptq" error-compensating rounding
    (lowbit.gptq), "awq+gptq" both (AWQ's scales and clipping, then GPTQ's rounding), each on calib, token ids
    [n_samples, seq_len], for the decoder blocks (remaining linears, such as a quantized lm_head, use RTN).
    integer_zeros, grid: see quantize_weight (grid: how layers rounded to nearest choose each group's scale and
    zero point; AWQ's layers keep its clipped ranges). The choices are kept in model.quantization (save_quantized
    writes them to config.json): "bits" and "group_size" are the most common format, "module_formats" lists the
    linears in another one, and with a budget "bits_per_weight" holds {"target": bits_per_weight, "achieved": ...}.
    act_order (GPTQ's methods): round each layer's columns in decreasing order of their inputs' energy
    (lowbit.gptq): "order" (or True) with the format and its size unchanged, "perm" with that order stored as
    each int4/int8 layer's input permutation (4 bytes per input feature).
    """
    check_method(method)
    check_act_order(act_order, method, budget=bits_per_weight is not None)
    given_group_size = group_size is not None
    if bits_per_weight is not None:
        if bits is not None:
            raise ValueError(f"give bits_per_weight (a budget; each layer's format is chosen) or bits (one format), "
                             f"not both: got bits_per_weight={bits_per_weight!r}, bits={bits!r}")
        if modules_to_not_convert:
            raise ValueError("modules_to_not_convert is not supported with bits_per_weight")
    bits = formats.check_bits(DEFAULT_FORMAT[0] if bits is None else bits)
    group_size = formats.check_group_size(DEFAULT_FORMAT[1] if group_size is None else group_size)
    quantize_lm_head, head_format = _head(bits, group_size, quantize_lm_head, lm_head_bits, lm_head_group_size)
    if method != "rtn" and modules_to_not_convert:
        raise ValueError(f"modules_to_not_convert is not supported with method={method!r}")
    if not inplace:
        model = copy.deepcopy(model)
    module_formats = {}
    if bits_per_weight is not None:
        head = model.get_submodule("lm_head")
        fixed = (head.weight.numel(), formats.quantized_nbytes(*head.weight.shape, *head_format, has_perm=False)) \
            if quantize_lm_head else (0, 0)
        # int3.5 stores AWQ's saliency order (a permutation) with every calibrated method.
        # AWQ's methods round channel-scaled weights: the errors are measured on them (scales searched for int4).
        awq_format = (4.0, group_size if given_group_size else 64) if method in ("awq", "awq+gptq") else None
        module_formats = choose_for_budget(model, bits_per_weight, calib, saliency_order=method != "rtn",
                                           group_size=group_size if given_group_size else None, fixed=fixed,
                                           progress=progress, awq_format=awq_format,
                                           gptq=method in formats.GPTQ_METHODS, act_order=bool(act_order))
        (bits, group_size), _ = Counter(module_formats.values()).most_common(1)[0]
    keep = list(modules_to_not_convert or []) + ([] if quantize_lm_head else ["lm_head"])
    step = make_method(method, bits, group_size, module_formats, integer_zeros, grid, act_order, skip=keep)
    if step.calibrated or ModelSource.supports(model):  # RTN also takes any module's linears (below)
        quantize_blocks(ModelSource(model, step.name), step, calib if step.calibrated else None, progress)

    def layer_format(name: str) -> tuple[float, int]:
        if name.rpartition(".")[2] == "lm_head":
            return head_format
        return module_formats.get(name, (bits, group_size))

    replace_linears(model, lambda name, linear: QuantLinear(
        quantize_weight(linear.weight, *layer_format(name), integer_zeros=integer_zeros, grid=grid), linear.bias),
        skip=keep)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    model.quantization = {"bits": bits, "group_size": group_size, "method": method,
                          "modules_not_converted": [name for name, m in model.named_modules()
                                                    if isinstance(m, nn.Linear)],
                          "module_formats": {name: {"bits": m.bits, "group_size": m.group_size}
                                             for name, m in layers.items()
                                             if (m.bits, m.group_size) != (bits, group_size)}}
    if bits_per_weight is not None:
        weights, nbytes = linear_stats(model)
        model.quantization["bits_per_weight"] = {"target": float(bits_per_weight), "achieved": 8 * nbytes / weights}
    return model


def convert(src, out, bits: float | None = None, group_size: int | None = None, method: str = "rtn", calib_file=None,
            align: int | None = None, force: bool = False, integer_zeros: bool = False, quantize_lm_head: bool = False,
            float_dtype: torch.dtype = torch.float16, progress: bool = True, lm_head_bits: float | None = None,
            lm_head_group_size: int | None = None, bits_per_weight: float | None = None, grid: str = "mse",
            act_order: bool | str = False, calib_samples: int = 8, device="cpu") -> Path:
    """Quantize an HF float directory or a .gguf file into a lowbit checkpoint; or import an AutoAWQ one.

    Every method streams the model one decoder block at a time from the source (lowbit.calibration: memory is one
    float block, the calibration activations and one output shard, whatever the depth), on device ("cpu" or
    "cuda": each block moves there in turn). AWQ, GPTQ and budgets calibrate on calib_samples windows of 512
    tokens (of calib_file, or lowbit.data). An interrupted run, started again with the same arguments, continues
    after its last finished block. bits, group_size, bits_per_weight, grid, act_order and the head options are
    quantize_model's."""
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    if bits_per_weight is not None and bits is not None:
        raise ValueError(f"give bits_per_weight or bits, not both: got bits_per_weight={bits_per_weight!r}, "
                         f"bits={bits!r}")
    requested_group_size = group_size  # with a budget: the only group size allowed, if given
    bits = formats.check_bits(DEFAULT_FORMAT[0] if bits is None else bits)
    group_size = formats.check_group_size(DEFAULT_FORMAT[1] if group_size is None else group_size)
    quantize_lm_head, head_format = _head(bits, group_size, quantize_lm_head, lm_head_bits, lm_head_group_size)
    if align is not None and (not isinstance(align, int) or align < 8 or align & (align - 1)):
        raise ValueError(f"align must be a power of two >= 8, got {align!r}")
    check_method(method)
    check_calib_samples(calib_samples)
    check_act_order(act_order, method, budget=bits_per_weight is not None)
    device = check_device(device)
    if src.is_dir() and (src / "config.json").is_file():
        raw = json.loads((src / "config.json").read_text())
        qm = (raw.get("quantization_config") or {}).get("quant_method")
        if qm == "awq":
            return import_awq(src, out, align=align, force=force, progress=progress)
        if qm is not None:
            raise CheckpointError(f"{src}: already quantized ({qm}); lowbit converts float checkpoints and "
                                  "AutoAWQ ones")
    calib = None
    if method != "rtn" or bits_per_weight is not None:
        _, config, tokenizer = float_source(src)
        if tokenizer is None:
            raise CheckpointError(f"{src}: no tokenizer files; {method} calibrates on text, which needs the model's "
                                  f"tokenizer (tokenizer.json)")
        text = Path(calib_file).read_text() if calib_file else None
        calib = data.calibration_tokens(tokenizer, n_samples=calib_samples, seq_len=512, text=text)
    return quantize_checkpoint(src, out, method, bits, group_size, calib, bits_per_weight,
                               requested_group_size if bits_per_weight is not None else None, quantize_lm_head,
                               head_format, integer_zeros, grid, act_order, float_dtype, align, force, progress,
                               device)


def check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    return device


def check_calib_samples(n) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"calib_samples must be a positive number of 512-token windows, got {n!r}")
    return n


def check_method(method) -> str:
    if method not in formats.METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, formats.METHODS))}, got {method!r}")
    return method


def load(path, dtype: torch.dtype = torch.float32, device="cpu") -> LlamaForCausalLM:
    """Any supported source: an HF float directory, a lowbit checkpoint, an AutoAWQ directory or a .gguf file
    (the same as LlamaForCausalLM.from_pretrained)."""
    return load_model(path, dtype=dtype, device=device)
