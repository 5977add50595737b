"""Writing HF-style float directories (config.json, model.safetensors, tokenizer files), atomically."""

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file


@contextmanager
def atomic_directory(out: Path, force: bool = False):
    """Yields a temporary directory beside `out` that becomes `out` only if the block completes."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def gguf_to_hf(gguf_path: Path, out: Path, force: bool = False, quiet: bool = False) -> Path:
    """Dequantize a LLaMA GGUF file into an HF-style float32 directory that transformers can load too."""
    from .gguf import GGUFFile
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


def save_float_model(model, out: Path, force: bool = False) -> Path:
    """A lowbit LlamaForCausalLM (float) back to an HF-style directory."""
    from .hf import FUSED, SINGLE
    c = model.config
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        ours = dict(layer.named_parameters())
        for name, parts in FUSED.items():
            sizes = ([c.num_attention_heads * c.head_dim] + 2 * [c.num_key_value_heads * c.head_dim]
                     if name == "attn.wqkv" else 2 * [c.intermediate_size])
            for suffix in ("weight", "bias"):
                if f"{name}.{suffix}" in ours:
                    for part, t in zip(parts, ours[f"{name}.{suffix}"].split(sizes)):
                        state[f"model.layers.{i}.{part}.{suffix}"] = t
        for name, hf_name in SINGLE.items():
            for suffix in ("weight", "bias"):
                if f"{name}.{suffix}" in ours:
                    state[f"model.layers.{i}.{hf_name}.{suffix}"] = ours[f"{name}.{suffix}"]
    with atomic_directory(out, force) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(c.to_dict(), indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
    return out
