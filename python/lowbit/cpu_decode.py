"""The fused CPU decode step: a LLaMA model's forward for one new token per sequence as one C++ call
(torch.classes.lowbit.LlamaDecoder, csrc/cpu/decode.h) over lowbit's kernels.

On a small model the per-token work is hundreds of small operators, and in eager PyTorch their dispatch,
not the weight stream, sets the speed. The fused step runs the same computation (models.llama is the
definition; the tests hold the two together) on the model's own weights and KV cache, nothing copied.
"""

import itertools

import torch
from torch import nn

from .models.llama import LlamaForCausalLM
from .nn import QuantLinear


def _linears(model: LlamaForCausalLM) -> list[tuple[str, nn.Module]]:
    """The linears in the order LlamaDecoder takes them: per layer wqkv, wo, w_gate_up, w_down; then lm_head."""
    out = []
    for i, layer in enumerate(model.layers):
        out += [(f"layers.{i}.attn.wqkv", layer.attn.wqkv), (f"layers.{i}.attn.wo", layer.attn.wo),
                (f"layers.{i}.ffn.w_gate_up", layer.ffn.w_gate_up), (f"layers.{i}.ffn.w_down", layer.ffn.w_down)]
    return out + [("lm_head", model.lm_head)]


def unsupported(model: LlamaForCausalLM) -> str | None:
    """Why the fused step cannot run this model as it is now, or None when it can."""
    if model.device.type != "cpu":
        return f"the model is on {model.device}, the fused step runs on the CPU"
    if model.dtype != torch.float32:
        return f"the model is {model.dtype}, the fused step runs float32"
    cache = model.layers[0].attn.kv_cache
    if cache is None:
        return "the model has no KV cache (setup_cache)"
    if cache.k.dtype not in (torch.float32, torch.float16):
        return f"the KV cache is {cache.k.dtype}, the fused step keeps it in float32 or float16"
    for name, m in _linears(model):
        if isinstance(m, QuantLinear):
            if m.layout != "canonical":
                return f"{name} is in the {m.layout} layout"
        elif type(m) is not nn.Linear or m.weight.dtype != torch.float32:
            return f"{name} is a {type(m).__name__} ({getattr(getattr(m, 'weight', None), 'dtype', None)})"
    return None


def model_signature(model: LlamaForCausalLM) -> tuple:
    """Identity of every tensor the fused step reads or writes: a step built for one signature is stale once
    a weight, the cache or the RoPE tables are replaced."""
    tensors = itertools.chain(model.parameters(), model.buffers(), (model.rope_cos, model.rope_sin))
    return tuple(t.data_ptr() for t in tensors if t is not None)


class FusedDecoder:
    """The model's forward for tokens [n] at positions [n] of cache rows slots [n] (int64 CPU tensors), one row
    per token: keys and values go into the model's KV cache as forward() writes them, and each row attends over
    its cache row up to its own position. Returns the logits [m, vocab] of the rows logit_rows [m] (default all).

    One new token per sequence is a decode step; a prompt's tokens at consecutive positions of one cache row
    (logit_rows: its last row) is its prefill (prefill()). Runs the CPU kernel set active when it was built.
    Inference only; float32 models on the CPU with QuantLinear (int4, int3.5, int8) or float32 nn.Linear layers (see
    unsupported()).
    """

    def __init__(self, model: LlamaForCausalLM):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the fused CPU decode step cannot run this model: {reason}")
        c = model.config
        self.signature = model_signature(model)
        self.decoder = torch.classes.lowbit.LlamaDecoder(
            c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps, model.embed.weight.detach(),
            model.norm.weight.detach(), model.rope_cos, model.rope_sin)
        for layer in model.layers:
            cache = layer.attn.kv_cache
            self.decoder.add_layer(layer.attn_norm.weight.detach(), layer.ffn_norm.weight.detach(), cache.k, cache.v)
        for _, m in _linears(model):
            bias = None if m.bias is None else m.bias.detach()
            if isinstance(m, QuantLinear):
                self.decoder.add_quantized_linear(float(m.bits), m.qweight, m.scales, m.zeros, m.perm, bias,
                                                  m.group_size, m.in_features)
            else:
                self.decoder.add_float_linear(m.weight.detach(), bias)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder.step(tokens, positions, slots, logit_rows)

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """prompts [B, T] into cache rows 0..B-1 at positions 0..T-1 -> the logits [B, vocab] of their last tokens."""
        b, t = prompts.shape
        rows = torch.arange(b)
        return self(prompts.reshape(-1), torch.arange(t).repeat(b), rows.repeat_interleave(t), rows * t + t - 1)
