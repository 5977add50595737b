"""HF-style model directories: config.json, model.safetensors (or a sharded index), tokenizer files.

Tensors are read through safetensors' memory map; nothing is unpickled.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..models.llama import LlamaConfig
from .safetensors_io import CHECKSUM_KEY, tensor_crc32

# HF LLaMA tensor names -> lowbit names. q/k/v and gate/up are fused (concatenated along rows).
FUSED = {
    "attn.wqkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "ffn.w_gate_up": ("mlp.gate_proj", "mlp.up_proj"),
}
SINGLE = {
    "attn.wo": "self_attn.o_proj",
    "ffn.w_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message names the file and the tensor."""


def read_config(directory: Path) -> LlamaConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        return LlamaConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: {e}") from e


class SafetensorsDir:
    """All tensors of a directory's safetensors files (one file or an index of shards), by name."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v
                                                               for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to file names in the directory")
                files = sorted(set(weight_map.values()))
            except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from e
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{directory}: no .safetensors files")
        self.handles = {}
        self.location = {}
        self.checksums: dict[str, int] = {}  # tensor name -> CRC-32 stored by lowbit's writer (if any)
        for name in files:
            try:
                handle = safe_open(str(directory / name), framework="pt")
                keys = list(handle.keys())
                stored = (handle.metadata() or {}).get(CHECKSUM_KEY)
                checksums = json.loads(stored) if stored is not None else {}
                if not isinstance(checksums, dict) or not all(isinstance(v, int) for v in checksums.values()):
                    raise ValueError(f"metadata {CHECKSUM_KEY} is not an object of integers")
            except Exception as e:  # safetensors raises SafetensorError, OSError, ... on bad files
                raise CheckpointError(f"{directory / name}: not a readable safetensors file "
                                      f"({type(e).__name__}: {e})") from e
            self.handles[name] = handle
            for key in keys:
                self.location[key] = name
            self.checksums |= {k: v for k, v in checksums.items() if k in keys}
        self.directory = directory

    def __contains__(self, key: str) -> bool:
        return key in self.location

    def keys(self) -> list[str]:
        return list(self.location)

    def file_of(self, key: str) -> Path:
        return self.directory / self.location[key]

    def nbytes(self, key: str) -> int:
        """Size of a tensor's data, from the header (nothing is read)."""
        sl = self.handles[self.location[key]].get_slice(key)
        if sl.get_dtype() not in ELEMENT_BYTES:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} has dtype {sl.get_dtype()}, which no lowbit "
                                  f"checkpoint holds")
        return math.prod(sl.get_shape()) * ELEMENT_BYTES[sl.get_dtype()]

    def verify(self, key: str) -> bool:
        """Check a tensor's bytes against its stored CRC-32: True if it matches, False if none is stored;
        CheckpointError naming the tensor if it differs."""
        if key not in self.checksums:
            return False
        computed = tensor_crc32(self.get(key))
        if computed != self.checksums[key]:
            raise CheckpointError(f"{self.file_of(key)}: tensor {key!r} is corrupted: CRC-32 {computed:08x}, "
                                  f"stored {self.checksums[key]:08x}")
        return True

    def get(self, key: str) -> torch.Tensor:
        if key not in self.location:
            raise CheckpointError(f"{self.directory}: missing tensor {key!r}")
        try:
            return self.handles[self.location[key]].get_tensor(key)
        except Exception as e:
            raise CheckpointError(
                f"{self.file_of(key)}: tensor {key!r} cannot be read ({type(e).__name__}: {e})") from e


def global_names(config: LlamaConfig) -> dict[str, str]:
    """lowbit name -> HF name of the tensors outside the decoder layers."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each HF tensor by its name with the decoder layer's prefix removed (and of the global ones)."""
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    rows = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    shapes = {f"{n}.weight": s for n, s in rows.items()} | {f"{n}.bias": s[:1] for n, s in rows.items()}
    shapes |= {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    return shapes | {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,),
                     "lm_head.weight": (config.vocab_size, h)}


def checked_tensor(st, key: str, config: LlamaConfig) -> torch.Tensor:
    """st.get(key), a float tensor of the shape the config implies; CheckpointError naming the file otherwise."""
    t = st.get(key)
    shape = expected_shapes(config)[key.split(".", 3)[3] if key.startswith("model.layers.") else key]
    where = st.file_of(key) if hasattr(st, "file_of") else st.path
    if not t.is_floating_point():
        raise CheckpointError(f"{where}: tensor {key!r} has dtype {t.dtype}, not a float weight")
    if tuple(t.shape) != shape:
        raise CheckpointError(f"{where}: tensor {key!r} has shape {list(t.shape)}, the config needs {list(shape)} "
                              f"(hidden_size {config.hidden_size}, intermediate_size {config.intermediate_size}, "
                              f"{config.num_attention_heads} heads, {config.num_key_value_heads} key/value heads)")
    return t


def layer_tensors(st, i: int, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Decoder layer i's float tensors under lowbit names (q/k/v and gate/up fused along rows), each checked
    against the config's shapes."""
    hf, ours, out = f"model.layers.{i}.", f"layers.{i}.", {}
    for name, parts in FUSED.items():
        for suffix in ("weight", "bias"):
            keys = [f"{hf}{p}.{suffix}" for p in parts]
            if suffix == "bias" and keys[0] not in st:
                continue
            out[f"{ours}{name}.{suffix}"] = torch.cat([checked_tensor(st, k, config) for k in keys])
    for name, hf_name in SINGLE.items():
        for suffix in ("weight", "bias"):
            key = f"{hf}{hf_name}.{suffix}"
            if suffix == "weight" or key in st:
                out[f"{ours}{name}.{suffix}"] = checked_tensor(st, key, config)
    return out


def to_lowbit_names(st, config: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF LLaMA tensors (a SafetensorsDir or GGUFFile) under lowbit's module names, fused projections."""
    out = {ours: checked_tensor(st, hf, config) for ours, hf in global_names(config).items()}
    for i in range(config.num_hidden_layers):
        out |= layer_tensors(st, i, config)
    return {k: v.to(dtype) for k, v in out.items()}
