"""One entry point for every model source: HF float directories, lowbit and AutoAWQ checkpoints, GGUF files.

Importing this module makes it LlamaForCausalLM.from_pretrained's loader (the model file imports no IO).
"""

import json
import tempfile
from pathlib import Path

import torch

from ..models.llama import LlamaConfig, LlamaForCausalLM, rope_inv_freq
from ..tokenizer import Tokenizer
from .autoawq import import_awq
from .checkpoint import load_quantized
from .gguf import GGUFFile
from .hf import CheckpointError, SafetensorsDir, read_config, to_lowbit_names


def build_model(config: LlamaConfig, state: dict[str, torch.Tensor], device="cpu") -> LlamaForCausalLM:
    """A model holding exactly `state` (no random initialisation first; tensors are used as given)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(f"weights do not match the config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    for name, tensor in state.items():
        target = model.get_parameter(name) if name.endswith(("weight", "bias")) else None
        if target is not None and tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(tensor.shape)}, the config needs "
                                  f"{list(target.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(config)
    return model.to(device)


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu") -> LlamaForCausalLM:
    """The model at `path` with float parts in dtype, on device; quantized layers as QuantLinear."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        gguf = GGUFFile(path)
        config = LlamaConfig.from_dict(gguf.config())
        state = to_lowbit_names(gguf, config, dtype)
        model = build_model(config, state, device)
        model.tokenizer = gguf.tokenizer()
        return model.eval()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory or .gguf file")
    quant_method = _quant_method(path)
    if quant_method == "lowbit":
        return load_quantized(path, dtype, device)
    if quant_method == "awq":  # AutoAWQ: converted in memory (the same numbers, lowbit's layout)
        with tempfile.TemporaryDirectory() as tmp:
            return load_quantized(import_awq(path, Path(tmp) / "lowbit", progress=False), dtype, device)
    if quant_method is not None:
        raise CheckpointError(f"{path}: quantization method {quant_method!r} is not supported (lowbit, awq)")
    config = read_config(path)
    model = build_model(config, to_lowbit_names(SafetensorsDir(path), config, dtype), device)
    model.tokenizer = Tokenizer.from_dir_if_present(path)
    return model.eval()


def _quant_method(directory: Path) -> str | None:
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # read_config reports it
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return qc.get("quant_method") if isinstance(qc, dict) else None


LlamaForCausalLM.loader = staticmethod(load_model)
