"""GGUF (llama.cpp) LLaMA files: config, dequantized float tensors under HF names, tokenizer and chat template.

The `gguf` package parses the file and dequantizes its tensors; here they are renamed, llama.cpp's
rotary row permutation of the q/k projections is undone, and the tokenizer is rebuilt for the HF
`tokenizers` library.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..tokenizer import Tokenizer
from .atomic import atomic_directory
from .hf import CheckpointError

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Pre-tokenizers of byte-level BPE vocabularies, by llama.cpp's tokenizer.ggml.pre name.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(name: str):
    if name in ("smollm",):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if name in ("gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise CheckpointError(f"unsupported GGUF pre-tokenizer {name!r} (supported: smollm, llama-bpe, gpt2)")


class GGUFFile:
    def __init__(self, path: str | Path):
        import gguf
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the gguf package raises ValueError, struct.error, IndexError ... on bad files
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.fields = {name: f for name, f in self.reader.fields.items()}
        arch = self.value("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{self.path}: architecture {arch!r} is not supported (only 'llama')")

    def value(self, key: str, default=None):
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def config(self) -> dict:
        v = self.value
        n_heads = v("llama.attention.head_count")
        hidden = v("llama.embedding_length")
        head_dim = v("llama.attention.key_length", hidden // n_heads)
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise CheckpointError(f"{self.path}: per-frequency rope factors (rope_freqs, LLaMA 3.1 scaling) are "
                                  f"not supported for GGUF input; use the HF checkpoint")
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": v("llama.vocab_size", len(self.fields["tokenizer.ggml.tokens"].data)),
            "hidden_size": hidden,
            "intermediate_size": v("llama.feed_forward_length"),
            "num_hidden_layers": v("llama.block_count"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": v("llama.attention.head_count_kv", n_heads),
            "head_dim": head_dim,
            "max_position_embeddings": v("llama.context_length", 4096),
            "rms_norm_eps": float(v("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": float(v("llama.rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": v("tokenizer.ggml.bos_token_id"),
            "eos_token_id": v("tokenizer.ggml.eos_token_id"),
            "torch_dtype": "float32",
        }

    def _by_hf_name(self) -> dict:
        if not hasattr(self, "_index"):
            self._index = {}
            for t in self.reader.tensors:
                name = hf_name(t.name)
                if name is None:
                    raise CheckpointError(f"{self.path}: unexpected tensor {t.name!r}")
                self._index[name] = t
        return self._index

    def __contains__(self, name: str) -> bool:
        return name in self._by_hf_name()

    def get(self, name: str) -> torch.Tensor:
        """One tensor dequantized to float32, under its HF LLaMA name, q/k rows in HF order."""
        import gguf
        t = self._by_hf_name().get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: missing tensor for {name!r}")
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which "
                                  f"cannot be read ({e})") from e
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dimension first
        w = torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))  # a writable copy
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, self.value("llama.attention.head_count"))
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, self.value("llama.attention.head_count_kv", self.value("llama.attention.head_count")))
        return w

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor dequantized to float32, under HF LLaMA names (see get)."""
        return {name: self.get(name) for name in self._by_hf_name()}

    def tokenizer(self) -> Tokenizer:
        v = self.value
        kind = v("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(f"{self.path}: tokenizer model {kind!r} is not supported (only byte-level "
                                  f"BPE, 'gpt2'); use the HF checkpoint's tokenizer.json")
        tokens = v("tokenizer.ggml.tokens")
        types = v("tokenizer.ggml.token_type")
        merges = [tuple(m.split(" ", 1)) for m in v("tokenizer.ggml.merges")]
        pre = v("tokenizer.ggml.pre", "default")
        bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                         ignore_merges=pre in ("llama-bpe", "llama3"))
        backend = HFTokenizer(bpe)
        backend.pre_tokenizer = _pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        # llama.cpp token types: 3 = control (special), 4 = user defined.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, kind in zip(tokens, types) if kind == 3])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, kind in zip(tokens, types) if kind == 4])
        bos_id, eos_id = v("tokenizer.ggml.bos_token_id"), v("tokenizer.ggml.eos_token_id")
        bos = tokens[bos_id] if bos_id is not None else None
        eos = tokens[eos_id] if eos_id is not None else None
        add_bos = bool(v("tokenizer.ggml.add_bos_token", False)) and bos is not None
        if add_bos:
            backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                   special_tokens=[(bos, bos_id)])
        else:
            backend.post_processor = processors.ByteLevel(trim_offsets=False)
        config = {"add_bos_token": add_bos, "model_max_length": v("llama.context_length", 4096)}
        return Tokenizer(backend, v("tokenizer.chat_template"), bos, eos, config)


def hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (each head's two rotary halves interleaved) back to HF's."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_to_hf(gguf_path: Path, out: Path, force: bool = False, quiet: bool = False) -> Path:
    """Dequantize a LLaMA GGUF file into an HF-style float32 directory that transformers can load too."""
    if not quiet:
        print(f"converting {gguf_path.name} to {out} ...", file=sys.stderr)
    gguf = GGUFFile(gguf_path)
    config = gguf.config()
    tensors = {name: t.contiguous() for name, t in gguf.tensors().items()}
    tokenizer = gguf.tokenizer()
    with atomic_directory(out, force) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2) + "\n")
        tokenizer.save(tmp)
    return out
