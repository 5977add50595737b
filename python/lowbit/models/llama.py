"""A compact LLaMA (1/2/3/3.1/3.2, SmolLM2, TinyLlama) for inference, in the spirit of gpt-fast.

Plain modules, fused q/k/v and gate/up projections (one matmul each per step), a static preallocated
KV cache, and any nn.Linear swappable for a lowbit.QuantLinear.
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None      # grouped-query attention; None = num_attention_heads
    head_dim: int | None = None                 # None = hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None            # {"rope_type": "llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    extra: dict = field(default_factory=dict)   # other config.json keys, kept for round trips

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: 'llama3')")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if d.get("model_type", "llama") not in ("llama", "mistral") and "LlamaForCausalLM" not in d.get(
                "architectures", ["LlamaForCausalLM"]):
            raise ValueError(f"not a LLaMA config: model_type {d.get('model_type')!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r} (LLaMA uses 'silu')")
        d = dict(d)
        if "rope_parameters" in d:  # transformers >= 5 writes rope_theta and the scaling in one dict
            params = dict(d.pop("rope_parameters") or {})
            d.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
            if params.get("rope_type", "default") != "default":
                d["rope_scaling"] = params
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                **self.extra, **d}

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with LLaMA 3.1's long-context scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if not scaling or scaling.get("rope_type", scaling.get("type")) == "default":
        return inv_freq.float()
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_context / low, old_context / high
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    smooth = (old_context / wavelen - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, interpolated, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by position: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class KVCache(nn.Module):
    """Static cache: k, v [B, n_kv_heads, max_seq_len, head_dim], written in place at each step."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, D] at positions start..start+T-1; return the filled part [B, H, start+T, D]."""
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, q_dim + 2 * kv_dim, bias=config.attention_bias)  # [q; k; v]
        self.wo = nn.Linear(q_dim, config.hidden_size, bias=config.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int | None) -> torch.Tensor:
        b, t, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)      # [B, H, T, D]
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)   # [B, H_kv, T, D]
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if start is not None:
            k, v = self.kv_cache.update(start, k, v)
        # Causal within the new tokens; every cached (earlier) position is visible.
        mask = None
        if t > 1:
            mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - t)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, q_dim))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.w_gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)  # [gate; up]
        self.w_down = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_gate_up(x).split(self.intermediate_size, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, start)
        return x + self.ffn(self.ffn_norm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.tokenizer = None  # set by from_pretrained
        self.max_seq_len = 0

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu") -> "LlamaForCausalLM":
        """An HF directory (config.json, safetensors, tokenizer), a lowbit quantized checkpoint, or a .gguf file."""
        from ..io.loading import load_model
        return load_model(path, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def setup_cache(self, batch: int, max_seq_len: int) -> None:
        """Preallocate the KV cache for `batch` sequences of up to `max_seq_len` tokens."""
        c = self.config
        with torch.inference_mode(False):  # ordinary tensors, usable in and out of inference mode
            for layer in self.layers:
                layer.attn.kv_cache = KVCache(batch, c.num_key_value_heads, max_seq_len, c.head_dim, self.dtype,
                                              self.device)
        self.max_seq_len = max_seq_len

    def drop_cache(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.max_seq_len = 0

    def forward(self, tokens: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (float32).

        start=None: a stateless forward over the whole sequence (the KV cache is neither read nor written).
        start=int: the tokens sit at positions start..start+T-1; their keys and values go into the cache
        (setup_cache) and attention also sees the cached positions before start.
        """
        b, t = tokens.shape
        use_cache = start is not None
        if use_cache:
            if self.layers[0].attn.kv_cache is None:
                raise ValueError("forward with start needs a KV cache: call setup_cache() first")
            if start + t > self.max_seq_len:
                raise ValueError(f"sequence of {start + t} tokens exceeds the cache ({self.max_seq_len}); "
                                 f"call setup_cache() with a larger max_seq_len")
        first = start or 0
        positions = torch.arange(first, first + t, device=tokens.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)             # [T, D/2]
        cos = torch.cat((angles, angles), dim=-1).cos()             # [T, D]
        sin = torch.cat((angles, angles), dim=-1).sin()
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, start)
        return self.lm_head(self.norm(x)).float()
