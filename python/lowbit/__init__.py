"""lowbit: 4-bit and 3.5-bit weights for LLaMA-family models, with fast CPU and CUDA kernels."""

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, data, eval, formats, ops
from .generate import Sampling, generate, stream
from .io.checkpoint import load_quantized, save_quantized
from .io.fetch import fetch
from .models.llama import LlamaConfig, LlamaForCausalLM
from .nn import QuantLinear
from .pipeline import convert, load, quantize_model
from .quantize import quantize_weight
from .weight import QuantizedWeight, linear

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built and what this CPU offers: compiler, ISAs, CUDA."""
    info = _C.build_info()
    info["cpu_isa"] = _C.cpu_isa()
    return info


def set_cpu_isa(name: str) -> None:
    """Select the CPU kernel set ('scalar', 'avx2', 'avx512_vnni'); the default is the best this CPU supports."""
    _C.set_cpu_isa(name)


def cpu_isa() -> str:
    return _C.cpu_isa()


__all__ = ["LlamaConfig", "LlamaForCausalLM", "QuantLinear", "QuantizedWeight", "Sampling", "build_info", "convert",
           "cpu_isa", "data", "eval", "fetch", "formats", "generate", "linear", "load", "load_quantized", "ops",
           "quantize_model", "quantize_weight", "save_quantized", "set_cpu_isa", "stream"]
