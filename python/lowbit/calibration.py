"""The calibration pipeline: a model quantized one decoder block at a time, from memory or straight from disk.

    x = embed(calibration tokens)              # [n, T, H]: the activations entering the first block
    for each decoder block, in order:
        block = source.block(i)                # its float weights: the model's own, or read from the checkpoint
                                               # (memory-mapped, in the file's dtype, upcast for this block only)
        x = step(view(block), x)               # the method (RTN | AWQ | GPTQ | AWQ+GPTQ): the block's linears
                                               # become QuantLinears; x becomes the next block's input
        sink.add(i, block, x)                  # a checkpoint's block file (the run resumes after it), or nothing
                                               # for a model quantized in place

Memory: one float block, the calibration activations and what the method keeps for one block (GPTQ's Hessians),
never the whole model. A bits-per-weight budget measures its per-layer errors in a first pass over the float
blocks (keeping each block's input on disk) and its output sensitivities (the Fisher diagonal) in a backward pass
block by block, last to first, from those saved inputs; the chosen formats then go through the quantizing pass.

A block is seen through a BlockView: which linears it has, which norms and rows AWQ folds its scales into, and how
to run its attention, its MLP and the whole block. The methods (lowbit.awq, lowbit.gptq, lowbit.budget) work on
views and never walk a model themselves.
"""

import copy
import hashlib
import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from . import formats
from .awq import quantize_block, saliency_perm, scale_block, search_clip, x_stats
from .budget import Format, block_errors, check_budget, choose_formats
from .gptq import DAMP, act_order_perm, check_act_order, gptq_quantize, hessian
from .io.checkpoint import LAYER_LINEARS, ResumableCheckpoint, float_source, quantization_config
from .io.hf import checked_tensor, global_names, layer_tensors
from .models.llama import Block, LlamaConfig, LlamaForCausalLM, rope_inv_freq, rope_tables
from .nn import QuantLinear
from .quantize import quantize_weight

# --- block views: a decoder block as the methods see it ------------------------------------------------------


@dataclass
class BlockView:
    """One decoder block as the calibration methods see it. Linears are named by their path inside the block."""
    block: nn.Module
    attn_norm: nn.Module
    ffn_norm: nn.Module
    qkv: list[str]                            # linears reading the normed attention input
    o: str
    gate_up: list[str]                        # linears reading the normed MLP input
    down: str
    v_rows: tuple[str, slice]                 # the rows that compute o's input channels (v)
    up_rows: tuple[str, slice]                # the rows that multiply into down's input channels (up)
    clip_rows: dict[str, slice]               # rows whose range AWQ's clipping search may shrink
    grouped_query: bool                       # o's input channels are not v's rows one to one
    attention: Callable[[torch.Tensor], torch.Tensor]   # normed x [B, T, H] -> attention output
    mlp: Callable[[torch.Tensor], torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor]     # x -> block output

    def linear(self, name: str) -> nn.Module:
        return self.block.get_submodule(name)

    @property
    def linear_names(self) -> list[str]:
        """Every linear of the block, in data-flow order."""
        return self.qkv + [self.o] + self.gate_up + [self.down]


def lowbit_block_view(block: Block, cos, sin) -> BlockView:
    attn, ffn = block.attn, block.ffn
    q_dim, kv_dim, _ = attn.qkv_split
    v_rows = slice(q_dim + kv_dim, q_dim + 2 * kv_dim)
    return BlockView(block, block.attn_norm, block.ffn_norm, ["attn.wqkv"], "attn.wo", ["ffn.w_gate_up"], "ffn.w_down",
                     ("attn.wqkv", v_rows), ("ffn.w_gate_up", slice(ffn.intermediate_size, 2 * ffn.intermediate_size)),
                     # As in AWQ, q and k keep their full range (their errors are amplified by the softmax).
                     {"attn.wqkv": v_rows, "attn.wo": slice(None), "ffn.w_gate_up": slice(None),
                      "ffn.w_down": slice(None)},
                     attn.n_kv_heads != attn.n_heads, lambda h: attn(h, cos, sin, None, None), ffn,
                     lambda x: block(x, cos, sin, None, None))


def hf_block_view(layer: nn.Module, cos, sin, mask) -> BlockView:
    """transformers' LlamaDecoderLayer (q/k/v/o_proj, gate/up/down_proj, two RMSNorms)."""
    attn, cfg = layer.self_attn, layer.self_attn.config

    def attention(h):
        return attn(h, position_embeddings=(cos, sin), attention_mask=mask)[0]

    def forward(x):
        out = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out

    all_rows = slice(None)
    return BlockView(layer, layer.input_layernorm, layer.post_attention_layernorm,
                     ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "self_attn.o_proj",
                     ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", ("self_attn.v_proj", all_rows),
                     ("mlp.up_proj", all_rows),
                     {"self_attn.v_proj": all_rows, "self_attn.o_proj": all_rows, "mlp.gate_proj": all_rows,
                      "mlp.up_proj": all_rows, "mlp.down_proj": all_rows},
                     cfg.num_key_value_heads != cfg.num_attention_heads, attention, layer.mlp, forward)


def run_block(view: BlockView, x: torch.Tensor) -> torch.Tensor:
    """The block's output on x [n, T, H], eight sequences at a time (bounded attention memory)."""
    return torch.cat([view.forward(x[i:i + 8]) for i in range(0, len(x), 8)])


def block_formats(view: BlockView, block_name: str, fmt: Format, module_formats: dict[str, Format] | None
                  ) -> dict[str, Format]:
    """Each linear's (bits, group_size) by its name in the block: its entry in module_formats (qualified module
    names, e.g. "layers.3.attn.wo"), else fmt."""
    module_formats = module_formats or {}
    return {n: tuple(module_formats.get(f"{block_name}.{n}", fmt)) for n in view.linear_names}


# --- sources: where the float blocks come from ----------------------------------------------------------------


class ModelSource:
    """An in-memory lowbit or transformers LlamaForCausalLM: its own blocks, quantized in place."""

    def __init__(self, model: nn.Module, method: str = "calibration"):
        self.is_hf = self.is_transformers(model)
        if not self.supports(model):
            raise TypeError(f"{method} works on lowbit.LlamaForCausalLM and transformers.LlamaForCausalLM, "
                            f"got {type(model).__name__}")
        self.model = model
        self.blocks = model.model.layers if self.is_hf else model.layers
        self.prefix = "model.layers" if self.is_hf else "layers"
        self.device = model.device

    @staticmethod
    def is_transformers(model: nn.Module) -> bool:
        return type(model).__name__ == "LlamaForCausalLM" and hasattr(model, "model")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, LlamaForCausalLM) or cls.is_transformers(model)

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def block(self, i: int, scratch: bool = False) -> nn.Module:
        """Block i; scratch: a copy the caller may change (the model's own stays as it is)."""
        return copy.deepcopy(self.blocks[i]) if scratch else self.blocks[i]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return token_embedding(self.model)(ids.to(self.device))

    def views(self, seq_len: int) -> Callable[[nn.Module], BlockView]:
        positions = torch.arange(seq_len, device=self.device)
        if not self.is_hf:
            cos, sin = rope_tables(self.model.inv_freq, positions)
            return lambda b: lowbit_block_view(b, cos, sin)
        dtype = self.model.dtype
        cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=dtype, device=self.device), positions[None])
        mask = torch.full((seq_len, seq_len), float("-inf"), dtype=dtype, device=self.device).triu(1)[None, None]
        return lambda layer: hf_block_view(layer, cos, sin, mask)

    def head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """x [.., H] leaving the last block -> logits, float32."""
        norm = self.model.model.norm if self.is_hf else self.model.norm
        return lambda x: self.model.lm_head(norm(x)).float()

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """{qualified name: [N, K]} of every linear but the output head."""
        return {n: tuple(m.weight.shape) for n, m in self.model.named_modules()
                if isinstance(m, nn.Linear) and n.rpartition(".")[2] != "lm_head"}


class CheckpointSource:
    """An HF float directory or a .gguf file, read one decoder block at a time (as lowbit's Block) on device."""

    def __init__(self, path: Path, device="cpu"):
        self.path = Path(path)
        self.open, self.config, self.tokenizer = float_source(self.path)
        self.device = torch.device(device)
        self.inv_freq = rope_inv_freq(self.config).to(self.device)
        self.prefix = "layers"

    def __len__(self) -> int:
        return self.config.num_hidden_layers

    def block_name(self, i: int) -> str:
        return f"layers.{i}"

    def block(self, i: int, scratch: bool = True) -> Block:
        # Read through a fresh mapping: its pages are released when the block's tensors are.
        tensors = layer_tensors(self.open(), i, self.config)
        with torch.device("meta"):
            block = Block(self.config)
        prefix = f"layers.{i}."
        with torch.inference_mode(False):  # ordinary tensors: the budget's backward pass runs through them
            state = {k[len(prefix):]: t.to(self.device, torch.float32) for k, t in tensors.items()}
        del tensors
        block.load_state_dict(state, assign=True, strict=True)
        return block.eval()

    def tensor(self, lowbit_name: str) -> torch.Tensor:
        """A tensor outside the blocks (embed.weight, norm.weight, lm_head.weight), as stored."""
        return checked_tensor(self.open(), global_names(self.config)[lowbit_name], self.config)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.tensor("embed.weight")
        vocab = table.shape[0]
        if int(ids.max()) >= vocab:
            raise ValueError(f"calibration token id {int(ids.max())} is outside the model's vocabulary of {vocab}: "
                             f"the tokenizer does not belong to this model")
        return table[ids.cpu()].to(self.device, torch.float32)

    def views(self, seq_len: int) -> Callable[[nn.Module], BlockView]:
        cos, sin = rope_tables(self.inv_freq, torch.arange(seq_len, device=self.device))
        return lambda b: lowbit_block_view(b, cos, sin)

    def head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        name = "embed.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        weight = self.tensor(name).to(self.device, torch.float32)
        norm_weight = self.tensor("norm.weight").to(self.device, torch.float32)
        eps = self.config.rms_norm_eps

        def head(x):
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return (norm_weight * normed) @ weight.T
        return head

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        with torch.device("meta"):
            block = Block(self.config)
        return {f"layers.{i}.{n}": tuple(block.get_submodule(n).weight.shape)
                for i in range(len(self)) for n in LAYER_LINEARS}


def token_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding of lowbit's or transformers' LlamaForCausalLM."""
    return model.embed if isinstance(model, LlamaForCausalLM) else model.model.embed_tokens


def as_source(model_or_source, method: str = "calibration"):
    return model_or_source if isinstance(model_or_source, (ModelSource, CheckpointSource)) \
        else ModelSource(model_or_source, method)


def check_calibration(calib, method: str) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0 or calib.is_floating_point():
        raise ValueError(f"{method} needs calibration tokens [n_samples, seq_len] (see lowbit.data.calibration_tokens)")
    return calib


# --- methods: what happens to one block ------------------------------------------------------------------------


class RTN:
    """Round-to-nearest: no calibration; each linear on its own (quantize_weight's grid)."""
    name, calibrated = "RTN", False

    def __init__(self, bits: float, group_size: int, module_formats: dict[str, Format] | None = None,
                 integer_zeros: bool = False, grid: str = "mse", skip: list[str] = ()):
        self.fmt, self.module_formats = (bits, group_size), module_formats
        self.integer_zeros, self.grid, self.skip = integer_zeros, grid, list(skip)

    def __call__(self, view: BlockView, block_name: str, x):
        for name, fmt in block_formats(view, block_name, self.fmt, self.module_formats).items():
            qualified = f"{block_name}.{name}"
            linear = view.linear(name)
            if not isinstance(linear, nn.Linear) or any(qualified == k or qualified.endswith("." + k)
                                                        for k in self.skip):
                continue  # (an already quantized linear stays as it is, as replace_linears leaves it)
            qw = quantize_weight(linear.weight, *fmt, integer_zeros=self.integer_zeros, grid=self.grid)
            view.block.set_submodule(name, QuantLinear(qw, linear.bias))
        return x


class AWQ:
    """Activation-aware scales and clipping (lowbit.awq), then round-to-nearest; the quantized block's output is
    the next block's input. Activation statistics come from every sequence; the scale search's loss, whose CPU
    time grows with them, from the first n_search."""
    name, calibrated = "AWQ", True

    def __init__(self, bits: float, group_size: int, module_formats: dict[str, Format] | None = None,
                 n_grid: int = 20, clip: bool = True, saliency_order: bool = True, n_search: int = 2,
                 integer_zeros: bool = False):
        self.fmt, self.module_formats = (bits, group_size), module_formats
        self.n_grid, self.clip, self.saliency_order, self.n_search = n_grid, clip, saliency_order, n_search
        self.integer_zeros = integer_zeros

    def __call__(self, view: BlockView, block_name: str, x: torch.Tensor) -> torch.Tensor:
        layer_formats = block_formats(view, block_name, self.fmt, self.module_formats)
        inputs = scale_block(view, x, layer_formats, self.n_grid, self.n_search, self.integer_zeros)
        quantize_block(view, inputs, layer_formats, self.clip, self.saliency_order, self.integer_zeros)
        return run_block(view, x)


class GPTQ:
    """Error-compensating rounding (lowbit.gptq) of each linear on the inputs the already quantized linears before
    it produce; awq: AWQ's scales (folded first) and clipping ratios, then GPTQ on the clipped grids.

    One forward pass per block: every linear is stood in for by a module that, when the block's forward reaches it,
    quantizes it from the inputs it receives (all calibration sequences at once), puts the QuantLinear in its
    place and returns that QuantLinear's output. damp, block_size, weighted_grid: gptq_quantize's; act_order:
    False, "order" (or True) or "perm" (lowbit.gptq); saliency_order: int3.5's stored channel order (AWQ's);
    clip, n_grid, n_search: AWQ's clipping and scale searches (awq only)."""
    calibrated = True

    def __init__(self, bits: float, group_size: int, module_formats: dict[str, Format] | None = None,
                 awq: bool = False, damp: float = DAMP, block_size: int = 128, act_order: bool | str = False,
                 saliency_order: bool = True, clip: bool = True, n_grid: int = 20, n_search: int = 2,
                 integer_zeros: bool = False, weighted_grid: bool = True):
        check_act_order(act_order, "awq+gptq" if awq else "gptq")
        self.name = "AWQ+GPTQ" if awq else "GPTQ"
        self.fmt = (formats.check_bits(bits), formats.check_group_size(group_size))
        self.module_formats, self.awq, self.damp, self.block_size = module_formats, awq, damp, block_size
        self.act_order, self.saliency_order, self.clip = act_order, saliency_order, clip
        self.n_grid, self.n_search, self.integer_zeros, self.weighted_grid = n_grid, n_search, integer_zeros, \
            weighted_grid

    def __call__(self, view: BlockView, block_name: str, x: torch.Tensor) -> torch.Tensor:
        layer_formats = block_formats(view, block_name, self.fmt, self.module_formats)
        folded = {}
        if self.awq:
            folded = {n: scales for n, (_, scales) in
                      scale_block(view, x, layer_formats, self.n_grid, self.n_search, self.integer_zeros).items()}
        shared = {}  # the last input seen and its Hessian: q/k/v (gate/up) share theirs

        def quantize(name: str, linear: nn.Linear, x_in: torch.Tensor) -> QuantLinear:
            if shared.get("input") is not x_in:
                shared.update(input=x_in, h=hessian(x_in))
            h, w, fmt = shared["h"], linear.weight.data, layer_formats[name]
            perm = order = None
            if fmt[0] == 3.5 and self.saliency_order:
                perm = saliency_perm(x_stats(x_in), w)
            if self.act_order == "perm" and perm is None:
                perm = act_order_perm(h)
            elif self.act_order:
                order = act_order_perm(h if perm is None else h[perm.long()][:, perm.long()])
            ratio = None
            if self.awq and self.clip and name in view.clip_rows:
                ratio = search_clip(w, x_in, *fmt, perm, rows=view.clip_rows[name], integer_zeros=self.integer_zeros)
            qlinear = QuantLinear(gptq_quantize(w, h, *fmt, perm, ratio, self.damp, self.block_size,
                                                self.integer_zeros, order, self.weighted_grid), linear.bias)
            qlinear.awq_scales = folded.get(name)
            return qlinear

        for name in view.linear_names:
            view.block.set_submodule(name, _QuantizeOnForward(view.block, name, view.linear(name), quantize))
        try:
            return view.forward(x)
        finally:  # a failed forward leaves the float linears
            for name in view.linear_names:
                module = view.linear(name)
                if isinstance(module, _QuantizeOnForward):
                    view.block.set_submodule(name, module.linear)


class _QuantizeOnForward(nn.Module):
    """Stands in for a float linear during one forward: quantizes it from its inputs, then is replaced by the
    QuantLinear, whose output it returns."""

    def __init__(self, block: nn.Module, name: str, linear: nn.Linear, quantize):
        super().__init__()
        self.name, self.linear, self.quantize = name, linear, quantize
        self.__dict__["block"] = block  # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qlinear = self.quantize(self.name, self.linear, x)
        self.block.set_submodule(self.name, qlinear)
        return qlinear(x)


def make_method(method: str, bits: float, group_size: int, module_formats: dict[str, Format] | None = None,
                integer_zeros: bool = False, grid: str = "mse", act_order: bool | str = False,
                skip: list[str] = ()):
    """The block step of a method name (formats.METHODS) with its default options."""
    if method == "rtn":
        return RTN(bits, group_size, module_formats, integer_zeros, grid, skip)
    if method == "awq":
        return AWQ(bits, group_size, module_formats, integer_zeros=integer_zeros)
    if method in formats.GPTQ_METHODS:
        return GPTQ(bits, group_size, module_formats, awq=method == "awq+gptq", act_order=act_order,
                    integer_zeros=integer_zeros)
    raise ValueError(f"method must be one of {', '.join(map(repr, formats.METHODS))}, got {method!r}")


# --- the pipeline ----------------------------------------------------------------------------------------------


def quantize_blocks(model_or_source, step, calib: torch.Tensor | None = None, progress: bool = True,
                    sink=None) -> nn.Module | None:
    """Run `step` (RTN, AWQ, GPTQ) over every decoder block of an in-memory model (in place; returns it) or a
    CheckpointSource (each block handed to sink.add, which keeps it). calib: token ids [n_samples, seq_len], needed
    by the calibrated methods. sink (optional): resume_point() -> (first block, its input or None) and
    add(i, block, x); see lowbit.io.checkpoint.ResumableCheckpoint."""
    source = as_source(model_or_source, step.name)
    if step.calibrated:
        check_calibration(calib, step.name)
    start, x = sink.resume_point() if sink is not None else (0, None)
    views = source.views(calib.shape[1]) if calib is not None else None
    with torch.no_grad():  # (not inference mode: the quantized model's tensors stay ordinary ones)
        if step.calibrated and x is None:
            x = source.embed(calib)
        if x is not None:
            x = x.to(source.device)
        for i in tqdm(range(start, len(source)), initial=start, total=len(source), desc=step.name,
                      disable=not progress):
            with memory_errors(source, calib, step.name, i):
                block = source.block(i)
                view = views(block) if views is not None else _linears_view(block)
                x = step(view, source.block_name(i), x)
                if sink is not None:
                    sink.add(i, block, x)
                del block, view
    return model_or_source if not isinstance(model_or_source, CheckpointSource) else None


def _linears_view(block: nn.Module) -> BlockView:
    """A view for steps that never run the block (RTN without calibration tokens)."""
    if isinstance(block, Block):
        return lowbit_block_view(block, None, None)
    return hf_block_view(block, None, None, None)


# --- memory -----------------------------------------------------------------------------------------------------


class NotEnoughMemoryError(MemoryError):
    """A block of the model, with its calibration activations, does not fit the memory of the device."""


def block_bytes(config: LlamaConfig, n_tokens: int, method: str) -> int:
    """About the most memory one block's step needs: the float32 block and its source tensors, the activations
    entering and leaving it, the widest intermediate activations, and for GPTQ the Hessian of the widest input
    and the factors made from it (lowbit.gptq.inverse_cholesky: at most three [K, K] float32 tensors at once)."""
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    weights = h * (q + 2 * kv) + q * h + 3 * h * f
    total = weights * 6 + n_tokens * (6 * h + 4 * f) * 4
    if method in formats.GPTQ_METHODS:
        total += max(h, f) ** 2 * 4 * 3
    return total


def available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(config: LlamaConfig, n_tokens: int, method: str, device: torch.device) -> None:
    """NotEnoughMemoryError, before anything runs, when one block's step will not fit the memory available."""
    needed, available = block_bytes(config, n_tokens, method), available_bytes(device)
    if available is not None and needed > available:
        raise NotEnoughMemoryError(
            f"{method} needs about {needed / 1e9:.1f} GB for one decoder block with {n_tokens} calibration tokens, "
            f"but {device.type} has {available / 1e9:.1f} GB available: use fewer calibration samples "
            f"(--calib-samples), another device (--device cuda), or free memory")


class memory_errors:
    """Turns an allocator failure inside one block's step into NotEnoughMemoryError saying what to change."""

    def __init__(self, source, calib, method: str, i: int):
        self.source, self.calib, self.method, self.i = source, calib, method, i

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        out_of_memory = isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
            isinstance(error, RuntimeError) and "can't allocate memory" in str(error))
        if not out_of_memory or isinstance(error, NotEnoughMemoryError):
            return False
        tokens = 0 if self.calib is None else self.calib.numel()
        raise NotEnoughMemoryError(
            f"{self.method}: out of memory in decoder block {self.i} with {tokens} calibration tokens on "
            f"{self.source.device} ({type(error).__name__}: {str(error).splitlines()[0][:200]}): use fewer "
            f"calibration samples (--calib-samples), another device (--device cuda), or free memory") from error


# --- the bits-per-weight budget: measuring block by block -------------------------------------------------------


class Boundaries:
    """Each block's input activations [n, T, H] (float32), kept on disk in `directory` between the budget's
    forward and backward passes."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def path(self, i: int) -> Path:
        return self.directory / f"boundary-{i:05d}.safetensors"

    def save(self, i: int, x: torch.Tensor) -> None:
        save_file({"x": x.float().cpu().contiguous()}, str(self.path(i)))

    def load(self, i: int, device) -> torch.Tensor:
        with safe_open(str(self.path(i)), framework="pt") as f:
            return f.get_tensor("x").to(device)


@torch.inference_mode()
def measure_errors(model_or_source, calib: torch.Tensor, fmts: list[Format], saliency_order: bool,
                   progress: bool = True, awq_format: Format | None = None, gptq: bool = False,
                   act_order: bool = False, weighted: bool = True, boundaries: Boundaries | None = None
                   ) -> tuple[dict[str, dict[Format, float]], dict[str, tuple[int, int]]]:
    """({qualified linear name: {format: output squared error}}, {name: weight shape [N, K]}) for every decoder
    linear (lowbit.budget explains the error), one float block at a time. calib: token ids [n_samples, seq_len].
    awq_format: for the methods that scale channels first (AWQ, AWQ+GPTQ), each block's AWQ scales are searched for
    this format and folded into a scratch copy of the block, and the errors measured on the scaled weights and
    inputs. gptq, act_order: lowbit.budget.block_errors'. weighted: each output's error times its Fisher weight
    (output_sensitivity: a backward pass block by block), else every output alike. boundaries: where the blocks'
    inputs are kept for that pass (default: a temporary directory)."""
    source = as_source(model_or_source, "the bits-per-weight budget")
    check_calibration(calib, "the bits-per-weight budget")
    views = source.views(calib.shape[1])
    with tempfile.TemporaryDirectory() as tmp:
        boundaries = boundaries or Boundaries(Path(tmp))
        x = source.embed(calib)
        row_errors, shapes = {}, {}
        for i in tqdm(range(len(source)), desc="budget: measuring", disable=not progress):
            with memory_errors(source, calib, "the bits-per-weight budget", i):
                if weighted:
                    boundaries.save(i, x)
                view = views(source.block(i, scratch=awq_format is not None))
                if awq_format is not None:
                    scaled = scale_block(view, x, {n: awq_format for n in view.linear_names}, n_grid=20, n_search=2)
                    inputs = {n: [x_in] for n, (x_in, _) in scaled.items()}
                    x = run_block(view, x)  # the folded block computes what the float one does
                else:
                    inputs = {}
                    hooks = [view.linear(n).register_forward_hook(
                             lambda module, args, output, n=n: inputs.setdefault(n, []).append(args[0]))
                             for n in view.linear_names]
                    try:
                        x = run_block(view, x)  # the float block: the next block's input
                    finally:
                        for h in hooks:
                            h.remove()
                for name in view.linear_names:
                    qualified = f"{source.block_name(i)}.{name}"
                    w = view.linear(name).weight.data.float()
                    x_in = torch.cat(inputs.pop(name)).reshape(-1, w.shape[1]).float()
                    row_errors[qualified] = block_errors(w, x_in, fmts, saliency_order, gptq, act_order)
                    shapes[qualified] = tuple(w.shape)
                del view
        sensitivity = None
        if weighted:
            boundaries.save(len(source), x)
            sensitivity = output_sensitivity(source, calib, boundaries, progress)
    errors = {n: {f: (e.sum() if sensitivity is None else e @ sensitivity[n].to(e.device)).item()
                  for f, e in errs.items()} for n, errs in row_errors.items()}
    return errors, shapes


def output_sensitivity(model_or_source, calib: torch.Tensor, boundaries: Boundaries | None = None,
                       progress: bool = False) -> dict[str, torch.Tensor]:
    """{qualified decoder linear name: f [N]}: each output feature's diagonal of the Fisher information of the
    float model's next-token distributions on calib, summed over the calibration tokens (the squared gradient of
    the log-likelihood of a token sampled from the model, seed 0): an error e in that output at every token moves
    the summed KL divergence from the float model's outputs by about f e^2 / 2.

    Block by block: the gradient at the last block's output comes from the head; then each block, last to first,
    is loaded again and run forward and backward from its saved input (boundaries, which measure_errors fills; a
    forward pass fills them when not given), one sequence at a time. Memory: one block and one sequence's graph."""
    source = as_source(model_or_source, "the bits-per-weight budget")
    check_calibration(calib, "the bits-per-weight budget")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode(False), torch.enable_grad():
        views = source.views(calib.shape[1])  # (RoPE tables outside inference mode: autograd saves them)
        if boundaries is None:
            boundaries = Boundaries(Path(tmp))
            with torch.no_grad():
                x = source.embed(calib).clone()
                for i in range(len(source)):
                    boundaries.save(i, x)
                    x = run_block(views(source.block(i)), x)
                boundaries.save(len(source), x)
        head = source.head()
        generator = torch.Generator(source.device).manual_seed(0)
        last = boundaries.load(len(source), source.device)
        grads = torch.empty_like(last)
        for s in range(len(last)):
            x = last[s:s + 1].clone().requires_grad_()
            logits = head(x)[0]
            # Labels drawn from the model's own next-token distribution: the gradients' squares then average to
            # the Fisher information, the curvature of the KL divergence from the float model's outputs.
            labels = torch.multinomial(logits.detach().float().softmax(-1), 1, generator=generator)[:, 0]
            loss = F.cross_entropy(logits.float(), labels, reduction="sum")
            grads[s] = torch.autograd.grad(loss, x)[0][0]
        del last
        sums: dict[str, torch.Tensor] = {}
        for i in tqdm(reversed(range(len(source))), total=len(source), desc="budget: sensitivities",
                      disable=not progress):
            view = views(source.block(i))
            inputs = boundaries.load(i, source.device)

            def add(name, grad):
                g = grad.float().reshape(-1, grad.shape[-1]).square().sum(0)
                sums[name] = sums[name] + g if name in sums else g

            def watch(name):
                def hook(module, args, output):
                    output.register_hook(lambda grad: add(name, grad))
                return hook
            hooks = [view.linear(n).register_forward_hook(watch(f"{source.block_name(i)}.{n}"))
                     for n in view.linear_names]
            try:
                for s in range(len(inputs)):
                    x = inputs[s:s + 1].clone().to(_dtype_of(view.block)).requires_grad_()
                    out = view.forward(x)
                    grads[s] = torch.autograd.grad(out, x, grads[s:s + 1].to(out.dtype))[0][0]
            finally:
                for h in hooks:
                    h.remove()
            del view, inputs
    return sums


def _dtype_of(block: nn.Module) -> torch.dtype:
    return next(block.parameters()).dtype


def choose_for_budget(model_or_source, bits_per_weight: float, calib: torch.Tensor, saliency_order: bool,
                      group_size: int | None = None, fixed: tuple[int, int] = (0, 0), progress: bool = True,
                      awq_format: Format | None = None, gptq: bool = False, act_order: bool = False,
                      weighted: bool = True, boundaries: Boundaries | None = None) -> dict[str, Format]:
    """{qualified decoder linear name: (bits, group_size)} within bits_per_weight over the quantized linears
    (lowbit.budget): the limits checked first (ValueError naming them), then the errors measured block by block
    and the formats chosen. fixed: (weights, bytes) of quantized linears outside the choice (a quantized head).
    group_size: only candidates of this group size. The rest: measure_errors'."""
    source = as_source(model_or_source, "the bits-per-weight budget")
    shapes = source.linear_shapes()
    fmts, nbytes, budget_bytes = check_budget(shapes, bits_per_weight, saliency_order, group_size, fixed)
    errors, measured = measure_errors(source, calib, fmts, saliency_order, progress, awq_format, gptq, act_order,
                                      weighted, boundaries)
    if measured != shapes:
        raise ValueError(f"the budget chooses formats for the decoder blocks' linears only, but this model has other "
                         f"linears besides its output head: {sorted(set(shapes) - set(measured))[:3]}")
    return choose_formats(errors, nbytes, budget_bytes)


# --- a float checkpoint on disk -> a lowbit checkpoint -----------------------------------------------------------


def quantize_checkpoint(src, out, method: str, bits: float, group_size: int, calib: torch.Tensor | None = None,
                        bits_per_weight: float | None = None, budget_group_size: int | None = None,
                        quantize_lm_head: bool = False, head_format: Format | None = None,
                        integer_zeros: bool = False, grid: str = "mse", act_order: bool | str = False,
                        float_dtype: torch.dtype = torch.float16, align: int | None = None, force: bool = False,
                        progress: bool = True, device="cpu") -> Path:
    """An HF float directory or a .gguf file -> a lowbit checkpoint at out, one decoder block in memory at a time.

    method, bits, group_size: as quantize_model's; calib: token ids [n_samples, seq_len] for the calibrated methods
    and budgets. bits_per_weight: a budget (lowbit.budget): a first pass measures, block by block, and chooses each
    linear's format (only of budget_group_size, if given); then the quantizing pass. head_format: (bits,
    group_size) of a quantized head (quantize_lm_head). device: where each block and the activations are computed.

    The run works in a directory beside out (.<name>.partial) that keeps every finished block (and a budget's
    choice): interrupted (Ctrl-C, a kill, a power cut) and started again with the same arguments, it continues after
    the last finished block and writes the same checkpoint, bit for bit. out appears only when complete."""
    src, out = Path(src), Path(out)
    device = torch.device(device)
    source = CheckpointSource(src, device)
    config = source.config
    calibrates = method != "rtn" or bits_per_weight is not None
    if calibrates:
        check_calibration(calib, method)
        check_memory(config, calib.numel(), method, device)
    head_format = tuple(head_format or (bits, group_size))
    fingerprint = _fingerprint(src, dict(
        method=method, bits=bits, group_size=group_size, bits_per_weight=bits_per_weight,
        budget_group_size=budget_group_size, quantize_lm_head=quantize_lm_head, head_format=head_format,
        integer_zeros=integer_zeros, grid=grid, act_order=act_order, float_dtype=str(float_dtype), align=align,
        device=device.type, calib=None if calib is None else hashlib.sha256(calib.numpy().tobytes()).hexdigest()))
    head_stats = (config.vocab_size * config.hidden_size,
                  formats.quantized_nbytes(config.vocab_size, config.hidden_size, *head_format, has_perm=False)) \
        if quantize_lm_head else (0, 0)
    with ResumableCheckpoint(out, fingerprint, force, align, float_dtype) as ckpt:
        module_formats = {}
        if bits_per_weight is not None:
            chosen = ckpt.load_json("formats.json")
            if chosen is None:
                awq_format = (4.0, budget_group_size or 64) if method in ("awq", "awq+gptq") else None
                chosen = choose_for_budget(source, bits_per_weight, calib, saliency_order=method != "rtn",
                                           group_size=budget_group_size, fixed=head_stats, progress=progress,
                                           awq_format=awq_format, gptq=method in formats.GPTQ_METHODS,
                                           act_order=bool(act_order), boundaries=Boundaries(ckpt.directory))
                ckpt.save_json("formats.json", chosen)
                ckpt.remove_matching("boundary-*.safetensors")
            module_formats = {n: tuple(f) for n, f in chosen.items()}
            (bits, group_size), _ = Counter(module_formats.values()).most_common(1)[0]
        step = make_method(method, bits, group_size, module_formats, integer_zeros, grid, act_order)
        if not ckpt.has_globals():
            ckpt.add_globals(_global_tensors(source, quantize_lm_head, head_format, integer_zeros, grid, float_dtype),
                             head_stats)
        quantize_blocks(source, step, calib if step.calibrated else None, progress, sink=ckpt)
        listed = {n: {"bits": f[0], "group_size": f[1]} for n, f in module_formats.items() if f != (bits, group_size)}
        if quantize_lm_head and head_format != (bits, group_size):
            listed["lm_head"] = {"bits": head_format[0], "group_size": head_format[1]}
        budget = None
        if bits_per_weight is not None:
            weights, nbytes = ckpt.quantized_stats()
            budget = {"target": float(bits_per_weight), "achieved": 8 * nbytes / weights}
        qconfig = quantization_config(bits, group_size, method, [] if quantize_lm_head else ["lm_head"], listed,
                                      budget)
        out_config = copy.deepcopy(config)
        if quantize_lm_head and config.tie_word_embeddings:
            out_config.tie_word_embeddings = False  # the head is quantized, the embedding stays float
        ckpt.finish(out_config, qconfig, source.tokenizer)
    return out


def _global_tensors(source: CheckpointSource, quantize_lm_head: bool, head_format: Format, integer_zeros: bool,
                    grid: str, float_dtype: torch.dtype):
    """The tensors outside the blocks, one at a time: embedding, final norm, output head (quantized when asked;
    a tied head is quantized from the embedding)."""
    config = source.config
    for name in global_names(config):
        t = source.tensor(name)
        if name == "lm_head.weight" and quantize_lm_head:
            yield from _quantized_head(t, head_format, integer_zeros, grid)
        else:
            yield name, t.to(float_dtype, copy=True)
        if name == "embed.weight" and quantize_lm_head and config.tie_word_embeddings:
            yield from _quantized_head(t, head_format, integer_zeros, grid)
        del t


def _quantized_head(weight, head_format, integer_zeros, grid):
    qw = quantize_weight(weight, *head_format, integer_zeros=integer_zeros, grid=grid)
    yield from ((f"lm_head.{k}", t) for k, t in qw.tensors().items())


def _fingerprint(src: Path, options: dict) -> str:
    """What makes two runs the same run: the source files (names, sizes, modification times) and the options."""
    files = sorted(src.iterdir()) if src.is_dir() else [src]
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()]
    return hashlib.sha256(json.dumps([stats, options, os.fspath(src.resolve())], sort_keys=True,
                                     default=str).encode()).hexdigest()
