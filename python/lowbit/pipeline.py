"""Orchestration: quantize a model (RTN, AWQ, GPTQ), convert a checkpoint, load any supported source.

The one module that combines the quantizers (lowbit.quantize, lowbit.awq, lowbit.gptq), the calibration data and the
checkpoint readers and writers (lowbit.io); everything it uses sits below it.
"""

import copy
import json
from pathlib import Path

import torch
from torch import nn

from . import data, formats
from .awq import quantize_llama_awq
from .gptq import quantize_llama_gptq
from .io.autoawq import import_awq
from .io.checkpoint import quantize_checkpoint_rtn, save_quantized
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


def quantize_model(model: nn.Module, bits: float = 4, group_size: int = 128, method: str = "rtn",
                   calib=None, modules_to_not_convert: list[str] | None = None, quantize_lm_head: bool = False,
                   inplace: bool = True, integer_zeros: bool = False, lm_head_bits: float | None = None,
                   lm_head_group_size: int | None = None, grid: str = "mse") -> nn.Module:
    """Replace every nn.Linear of `model` by a QuantLinear (lowbit's LLaMA or transformers' LlamaForCausalLM).

    Modules whose qualified name equals or ends with an entry of modules_to_not_convert stay float, and so
    does the output head (lm_head) unless quantize_lm_head or its own format is given: lm_head_bits and
    lm_head_group_size (default: bits and group_size; e.g. an int8 head on int4 layers). method "rtn" is
    round-to-nearest per group; "awq" is activation-aware (lowbit.awq), "gptq" error-compensating rounding
    (lowbit.gptq), "awq+gptq" both (AWQ's scales and clipping, then GPTQ's rounding), each on calib, token ids
    [n_samples, seq_len], for the decoder blocks (remaining linears, such as a quantized lm_head, use RTN).
    integer_zeros, grid: see quantize_weight (grid: how layers rounded to nearest choose each group's scale and
    zero point; AWQ's layers keep its clipped ranges). The choices are kept in model.quantization (save_quantized writes them
    to config.json).
    """
    bits = formats.check_bits(bits)
    group_size = formats.check_group_size(group_size)
    quantize_lm_head, head_format = _head(bits, group_size, quantize_lm_head, lm_head_bits, lm_head_group_size)
    check_method(method)
    if method != "rtn" and modules_to_not_convert:
        raise ValueError(f"modules_to_not_convert is not supported with method={method!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if method == "awq":
        quantize_llama_awq(model, bits, group_size, calib, integer_zeros=integer_zeros)
    elif method in ("gptq", "awq+gptq"):
        quantize_llama_gptq(model, bits, group_size, calib, awq=method == "awq+gptq", integer_zeros=integer_zeros)
    keep = list(modules_to_not_convert or []) + ([] if quantize_lm_head else ["lm_head"])

    def layer_format(name: str) -> tuple[float, int]:
        return head_format if name.rpartition(".")[2] == "lm_head" else (bits, group_size)

    replaced = replace_linears(model, lambda name, linear: QuantLinear(
        quantize_weight(linear.weight, *layer_format(name), integer_zeros=integer_zeros, grid=grid), linear.bias),
        skip=keep)
    other_formats = {name: layer_format(name) for name in replaced if layer_format(name) != (bits, group_size)}
    model.quantization = {"bits": bits, "group_size": group_size, "method": method,
                          "modules_not_converted": [name for name, m in model.named_modules()
                                                    if isinstance(m, nn.Linear)],
                          "module_formats": {name: {"bits": b, "group_size": g}
                                             for name, (b, g) in other_formats.items()}}
    return model


def convert(src, out, bits: float = 4, group_size: int = 128, method: str = "rtn", calib_file=None,
            align: int | None = None, force: bool = False, integer_zeros: bool = False, quantize_lm_head: bool = False,
            float_dtype: torch.dtype = torch.float16, progress: bool = True, lm_head_bits: float | None = None,
            lm_head_group_size: int | None = None, grid: str = "mse") -> Path:
    """Quantize an HF float directory or a .gguf file into a lowbit checkpoint; or import an AutoAWQ one.

    RTN streams layer by layer (memory: one decoder layer plus one output shard). AWQ and GPTQ need
    calibration forward passes through the whole float model, so they load the model first. The head options and
    grid are quantize_model's."""
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    bits, group_size = formats.check_bits(bits), formats.check_group_size(group_size)
    quantize_lm_head, head_format = _head(bits, group_size, quantize_lm_head, lm_head_bits, lm_head_group_size)
    if align is not None and (not isinstance(align, int) or align < 8 or align & (align - 1)):
        raise ValueError(f"align must be a power of two >= 8, got {align!r}")
    check_method(method)
    if src.is_dir() and (src / "config.json").is_file():
        raw = json.loads((src / "config.json").read_text())
        qm = (raw.get("quantization_config") or {}).get("quant_method")
        if qm == "awq":
            return import_awq(src, out, align=align, force=force, progress=progress)
        if qm is not None:
            raise CheckpointError(f"{src}: already quantized ({qm}); lowbit converts float checkpoints and "
                                  "AutoAWQ ones")
    if method != "rtn":
        model = load_model(src)
        text = Path(calib_file).read_text() if calib_file else None
        calib = data.calibration_tokens(model.tokenizer, n_samples=8, seq_len=512, text=text)
        quantize_model(model, bits, group_size, method, calib, quantize_lm_head=quantize_lm_head,
                       integer_zeros=integer_zeros, lm_head_bits=lm_head_bits, lm_head_group_size=lm_head_group_size,
                       grid=grid)
        return save_quantized(model, out, force, align, float_dtype)
    return quantize_checkpoint_rtn(src, out, bits, group_size, align, force, integer_zeros, quantize_lm_head,
                                   float_dtype, progress, lm_head_format=head_format, grid=grid)


def check_method(method) -> str:
    if method not in formats.METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, formats.METHODS))}, got {method!r}")
    return method


def load(path, dtype: torch.dtype = torch.float32, device="cpu") -> LlamaForCausalLM:
    """Any supported source: an HF float directory, a lowbit checkpoint, an AutoAWQ directory or a .gguf file
    (the same as LlamaForCausalLM.from_pretrained)."""
    return load_model(path, dtype=dtype, device=device)
