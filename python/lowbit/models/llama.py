"""A compact LLaMA (1/2/3/3.1/3.2, SmolLM2, TinyLlama) for inference, in the spirit of gpt-fast.

Plain modules, fused q/k/v and gate/up projections (one matmul each per step), and a static KV cache:
`forward(tokens, input_pos)` writes keys and values at the positions in the tensor `input_pos` and attends over
the whole cache through a mask, so a decode step has the same shapes at every position (one torch.compile,
one CUDA graph). `forward(tokens, input_pos, slots)` is the batched serving form: each row is a sequence in its
own row (slot) of the cache at its own positions. Any nn.Linear is swappable for a lowbit.QuantLinear.
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

    # Upper bounds of the sizes: far above any LLaMA, low enough that a corrupt config.json cannot make the
    # loader allocate without limit before a tensor is read.
    LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
              "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 10,
              "head_dim": 1 << 10, "max_position_embeddings": 1 << 24}

    def __post_init__(self):
        """Every field checked for type and range: a bad config.json fails here, naming the key."""
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for key, limit in self.LIMITS.items():
            v = getattr(self, key)
            if v is None and key in ("num_key_value_heads", "head_dim"):
                continue
            if not is_int(v) or not 1 <= v <= limit:
                raise ValueError(f"{key} must be an integer in [1, {limit}], got {v!r}")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and at least 2 (rotary embedding), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        for key, lo, hi in (("rms_norm_eps", 0.0, 1.0), ("rope_theta", 1.0, 1e12)):  # open below, open above
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo < v < hi:
                raise ValueError(f"{key} must be a number in ({lo:g}, {hi:g}), got {v!r}")
        for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        ids = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for key, values in (("bos_token_id", [self.bos_token_id]), ("eos_token_id", ids)):
            if any(v is not None and (not is_int(v) or v < 0) for v in values):
                raise ValueError(f"{key} must be a token id (or null), got {getattr(self, key)!r}")
        self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            raise ValueError(f"rope_scaling must be an object (or null), got {rs!r}")
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ("llama3", "default"):
            raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: 'llama3')")
        if kind == "llama3":
            for key, default in (("factor", None), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                                 ("original_max_position_embeddings", 8192)):
                v = rs.get(key, default)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                    raise ValueError(f"rope_scaling.{key} must be a finite positive number, got {v!r}")
            if not rs.get("high_freq_factor", 4.0) > rs.get("low_freq_factor", 1.0):
                raise ValueError("rope_scaling.high_freq_factor must exceed low_freq_factor")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, got {type(d).__name__}")
        architectures = d.get("architectures", ["LlamaForCausalLM"])
        if not isinstance(architectures, list):
            raise ValueError(f"architectures must be a list, got {architectures!r}")
        if d.get("model_type", "llama") not in ("llama", "mistral") and "LlamaForCausalLM" not in architectures:
            raise ValueError(f"not a LLaMA config: model_type {d.get('model_type')!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r} (LLaMA uses 'silu')")
        d = dict(d)
        if "rope_parameters" in d:  # transformers >= 5 writes rope_theta and the scaling in one dict
            params = d.pop("rope_parameters") or {}
            if not isinstance(params, dict):
                raise ValueError(f"rope_parameters must be an object, got {params!r}")
            params = dict(params)
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

    def fused_splits(self) -> dict[str, list[int]]:
        """Row counts of the parts of the fused linears: wqkv = [q; k; v], w_gate_up = [gate; up]."""
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {"attn.wqkv": [q, kv, kv], "ffn.w_gate_up": [self.intermediate_size] * 2}

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


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] float32 for the given positions [T]."""
    angles = torch.outer(positions.to(torch.float32), inv_freq)  # [T, D/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


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
    """Static cache: k, v [B, n_kv_heads, max_seq_len, head_dim], written in place at each step. Its dtype may be
    narrower than the model's (float16 under a float32 model: half the memory, and half the bytes attention reads);
    keys and values are rounded to it when written and read back in the dtype of the queries."""

    def __init__(self, batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
                 device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, D] at positions input_pos [T]; return the whole cache [B, H, max_seq_len, D] in
        k's dtype."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k.to(k.dtype), self.v.to(v.dtype)

    def write(self, slots: torch.Tensor, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, H, T, D] at (slots [B], input_pos [B, T])."""
        b, h, t, d = k.shape
        # Each (slot, head, position) is one row of the cache seen as [rows * H * max_seq_len, D].
        heads = torch.arange(h, device=k.device)[None, :, None]
        index = ((slots[:, None, None] * h + heads) * self.k.shape[2] + input_pos[:, None, :]).reshape(-1)
        self.k.view(-1, d).index_copy_(0, index, k.reshape(-1, d).to(self.k.dtype))
        self.v.view(-1, d).index_copy_(0, index, v.reshape(-1, d).to(self.v.dtype))

    def read(self, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of cache rows slots [n]: k, v [n, H, length, D], a view when the rows are
        consecutive and in order, else a copy."""
        first, n = int(slots[0]), slots.shape[0]
        if torch.equal(slots, torch.arange(first, first + n, device=slots.device)):
            return self.k[first:first + n, :, :length], self.v[first:first + n, :, :length]
        return self.k[:, :, :length].index_select(0, slots), self.v[:, :, :length].index_select(0, slots)


@dataclass
class ServingStep:
    """A batched serving forward (slots given): where each row's keys and values go, and what its attention reads.

    Rows are grouped by span, the number of cached positions they attend over: the power of two (at least
    MIN_SPAN, at most the cache length) above the row's last position. A row's span depends on its own position
    only, so its attention, and its output, are the same whatever other rows run in the step (attending over a
    longer padded span would change the rounding of the softmax sums, and int8 activations amplify that).
    """
    MIN_SPAN = 128  # short sequences share one span: fewer groups, and consecutive rows read in place
    slots: torch.Tensor                                          # [B] cache rows
    input_pos: torch.Tensor                                      # [B, T]
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (rows [n], their slots [n], mask [n, 1, T, span])

    @classmethod
    def make(cls, slots: torch.Tensor, input_pos: torch.Tensor, causal_mask: torch.Tensor) -> "ServingStep":
        by_span: dict[int, list[int]] = {}
        for row, last in enumerate(input_pos.max(dim=1).values.tolist()):
            span = min(max(cls.MIN_SPAN, 1 << last.bit_length()), causal_mask.shape[0])
            by_span.setdefault(span, []).append(row)
        groups = []
        for span, rows in sorted(by_span.items()):
            rows = torch.tensor(rows, device=slots.device)
            groups.append((rows, slots[rows], causal_mask[input_pos[rows], :span][:, None]))
        return cls(slots, input_pos, groups)

    def attend(self, q: torch.Tensor, cache: KVCache, gqa: bool) -> torch.Tensor:
        """q [B, H, T, D] -> attention over each row's cache row [B, H, T, D]. Decode rows (T = 1) use
        rowwise_attention; longer inputs (a prompt, which the engine prefills alone) the fused kernel."""
        def attention(q, k, v, mask):
            k, v = k.to(q.dtype), v.to(q.dtype)
            if q.shape[2] == 1:
                return rowwise_attention(q, k, v, mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

        if len(self.groups) == 1:  # rows 0..B-1 in order
            _, slots, mask = self.groups[0]
            return attention(q, *cache.read(slots, mask.shape[-1]), mask)
        y = torch.empty_like(q)
        for rows, slots, mask in self.groups:
            y[rows] = attention(q[rows], *cache.read(slots, mask.shape[-1]), mask)
        return y


def rowwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of one query per row, q [B, H, 1, D] over k, v [B, H_kv, L, D] with mask [B, 1, 1, L], in plain
    matmuls and a softmax: each row's result is the same in any batch (the CPU kernel of
    F.scaled_dot_product_attention divides its work by the batch size, which changes the rounding)."""
    b, h, _, d = q.shape
    grouped = q.reshape(b, k.shape[1], h // k.shape[1], d)  # the query heads that share a key/value head
    scores = (grouped @ k.transpose(-1, -2)) * d ** -0.5
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).reshape(b, h, 1, d)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        self.qkv_split = config.fused_splits()["attn.wqkv"]                                        # [q, k, v] rows
        self.wqkv = nn.Linear(config.hidden_size, sum(self.qkv_split), bias=config.attention_bias)
        self.wo = nn.Linear(self.qkv_split[0], config.hidden_size, bias=config.attention_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                input_pos: torch.Tensor | None, serving: ServingStep | None = None) -> torch.Tensor:
        """x [B, T, dim]; cos, sin [T, D]; with input_pos [T]: mask [1, 1, T, max_seq_len] over the cache.
        Serving: cos, sin [B, 1, T, D], the cache rows and masks in `serving`."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split(self.qkv_split, dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)      # [B, H, T, D]
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)   # [B, H_kv, T, D]
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if input_pos is None:  # stateless: the sequence alone, causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=gqa)
        elif serving is not None:
            self.kv_cache.write(serving.slots, serving.input_pos, k, v)
            y = serving.attend(q, self.kv_cache, gqa)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, t, self.qkv_split[0]))


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                input_pos: torch.Tensor | None, serving: ServingStep | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, input_pos, serving)
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
        self.kv_cache_dtype: torch.dtype | None = None  # the KV cache's dtype (setup_cache); None: the model's
        # Set by setup_cache: the cache length, RoPE tables [S, D] and causal mask [S, S] for it.
        self.max_seq_len = 0
        self.rope_cos = self.rope_sin = self.causal_mask = None
        self.decode_step = None  # lowbit.generate's step for this cache (fused, compiled or a CUDA graph)

    # path, dtype, device -> model: set by lowbit.io.loading, which knows the file formats (imported with lowbit).
    loader = None

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device="cpu") -> "LlamaForCausalLM":
        """An HF directory (config.json, safetensors, tokenizer), a lowbit or AutoAWQ checkpoint, or a .gguf file."""
        if LlamaForCausalLM.loader is None:
            raise RuntimeError("no model loader registered: import lowbit (lowbit.io.loading provides it)")
        return LlamaForCausalLM.loader(path, dtype=dtype, device=device)

    def __getstate__(self):
        """Copies (copy.deepcopy, pickling) leave the decode step behind: it belongs to this model's cache."""
        return {**self.__dict__, "decode_step": None}

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), .half() and the like: the RoPE frequencies stay float32 (in half precision the angles
        drift with position), and the RoPE tables and causal mask of setup_cache (plain attributes) follow the
        model's device."""
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.device)
        if self.rope_cos is not None:
            self.rope_cos, self.rope_sin, self.causal_mask = (t.to(self.device) for t in
                                                              (self.rope_cos, self.rope_sin, self.causal_mask))
        return self

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype setup_cache gives the KV cache: kv_cache_dtype, else the model's."""
        return self.kv_cache_dtype or self.dtype

    def setup_cache(self, batch: int, max_seq_len: int) -> None:
        """Preallocate the KV cache for `batch` sequences of up to `max_seq_len` tokens, with the RoPE tables and
        the causal mask of that length. The cache holds self.kv_cache_dtype (default: the model's dtype)."""
        c = self.config
        kv_dtype = self.cache_dtype
        if not kv_dtype.is_floating_point or kv_dtype.itemsize > self.dtype.itemsize:
            raise ValueError(f"kv_cache_dtype must be a floating dtype no wider than the model's {self.dtype}, "
                             f"got {kv_dtype}")
        with torch.inference_mode(False):  # ordinary tensors, usable in and out of inference mode
            for layer in self.layers:
                layer.attn.kv_cache = KVCache(batch, c.num_key_value_heads, max_seq_len, c.head_dim, kv_dtype,
                                              self.device)
            positions = torch.arange(max_seq_len, device=self.device)
            self.rope_cos, self.rope_sin = rope_tables(self.inv_freq, positions)         # [S, D] each
            self.causal_mask = positions[None, :] <= positions[:, None]                  # [S, S]: row i sees 0..i
        self.max_seq_len = max_seq_len

    def drop_cache(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None
        self.rope_cos = self.rope_sin = self.causal_mask = self.decode_step = None
        self.max_seq_len = 0

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (float32).

        input_pos=None: a stateless forward over the whole sequence (the KV cache is neither read nor written).
        input_pos [T] (int64, on the model's device): the tokens sit at these positions; their keys and values
        go into the cache (setup_cache) and attention sees every cached position up to each token's own.
        Batched serving: with slots [B] (int64: rows of the cache, distinct) or input_pos [B, T] (each row its own
        positions), row i is the sequence in cache row slots[i] (default: row i) and attends over that row up to
        its own positions; its result does not depend on the other rows (ServingStep). This form's shapes follow
        the positions: it is meant for eager decoding of many sequences, not for compiling.
        """
        b, t = tokens.shape
        serving = None
        if input_pos is None:
            cos, sin = rope_tables(self.inv_freq, torch.arange(t, device=tokens.device))
            mask = None
        elif self._check_input_pos(input_pos, b, t, slots):  # the static form: one position list, every cache row
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
            mask = self.causal_mask[input_pos][None, None]                              # [1, 1, T, S]
        else:  # batched serving: rows of the cache named by slots, positions per row
            if t == 0:
                raise ValueError("a forward with slots needs at least one token per sequence")
            slots = torch.arange(b, device=tokens.device) if slots is None else slots
            input_pos = input_pos.expand(b, t)
            cos, sin = self.rope_cos[input_pos][:, None], self.rope_sin[input_pos][:, None]  # [B, 1, T, D]
            mask, serving = None, ServingStep.make(slots, input_pos, self.causal_mask)
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, serving)
        return self.lm_head(self.norm(x)).float()

    def _check_input_pos(self, input_pos: torch.Tensor, b: int, t: int, slots: torch.Tensor | None) -> bool:
        """Checks input_pos and slots; True for the static form (no slots, input_pos [T], B = the cache's rows)."""
        cache = self.layers[0].attn.kv_cache
        if cache is None:
            raise ValueError("forward with input_pos needs a KV cache: call setup_cache() first")
        if (not isinstance(input_pos, torch.Tensor) or input_pos.dtype != torch.long
                or input_pos.shape not in ((t,), (b, t))):
            raise ValueError(f"input_pos must be an int64 tensor of {t} positions (one per token) or [{b}, {t}] "
                             f"(one row per sequence), got {getattr(input_pos, 'dtype', type(input_pos).__name__)} "
                             f"{list(getattr(input_pos, 'shape', []))}")
        if input_pos.device != self.device:
            raise ValueError(f"input_pos is on {input_pos.device} but the model is on {self.device}")
        rows = cache.k.shape[0]
        if slots is None and b > rows:
            raise ValueError(f"{b} sequences but the cache has {rows} rows; call setup_cache() with batch >= {b}")
        if slots is not None:
            if not isinstance(slots, torch.Tensor) or slots.dtype != torch.long or slots.shape != (b,):
                raise ValueError(f"slots must be an int64 tensor of {b} cache rows (one per sequence), got "
                                 f"{getattr(slots, 'dtype', type(slots).__name__)} {list(getattr(slots, 'shape', []))}")
            if slots.device != self.device:
                raise ValueError(f"slots is on {slots.device} but the model is on {self.device}")
        # Values are checked where that costs no device synchronization (CPU tensors, not while compiling).
        if input_pos.device.type == "cpu" and not torch.compiler.is_compiling() and t:
            lo, hi = int(input_pos.min()), int(input_pos.max())
            if lo < 0 or hi >= self.max_seq_len:
                raise ValueError(f"positions {lo}..{hi} are outside the cache of {self.max_seq_len}; call "
                                 f"setup_cache() with a larger max_seq_len")
            if slots is not None and (int(slots.min()) < 0 or int(slots.max()) >= rows
                                      or len(set(slots.tolist())) != b):
                raise ValueError(f"slots must be distinct cache rows in 0..{rows - 1}, got {slots.tolist()}")
        return slots is None and input_pos.dim() == 1 and b == rows
