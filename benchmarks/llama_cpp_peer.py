"""llama.cpp, through llama-cpp-python, as a side-by-side peer of lowbit's generation benchmark.

- GGUF files made by llama.cpp itself from a lowbit/HF float directory: F32 or F16 by its converter
  (convert_hf_to_gguf.py from the llama-cpp-python source distribution of the installed version), Q4_0, Q4_1, Q8_0
  and K-quants (Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, IQ4_XS; no importance matrix) by its quantizer (llama_model_quantize with llama.cpp's default parameters); cached by (directory, type).
- A random-weight TinyLlama-1.1B-shaped float directory that lowbit and llama.cpp both load, with the LLaMA
  SentencePiece tokenizer (32000 tokens, rebuilt from the vocabulary file llama.cpp ships for its tokenizer tests).
- Timing by bench_generate.py's rules: the same prompt ids, every token forced (EOS never stops the loop: greedy
  tokens go through llama_decode one by one), a 4-token warm-up generation first and model load timed apart,
  prefill = prompt evaluation plus the first token's argmax, decode tok/s = (new tokens - 1) / decode time.

Optional: nothing in lowbit or its tests needs llama_cpp (install: benchmarks/README.md, "llama.cpp peer").

    python benchmarks/llama_cpp_peer.py --model smollm2 --types q4_0 q4_k_m f32 --threads 2
    python benchmarks/llama_cpp_peer.py --model tinyllama-random --types q4_0 q4_k_m f16 --threads 2
"""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import lowbit
from lowbit.io.atomic import atomic_directory
from lowbit.io.fetch import cache_dir
from lowbit.tokenizer import Tokenizer

FLOAT_TYPES = ("f32", "f16")                                          # written by the converter
QUANT_FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q3_k_s": 11, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15,
                "iq4_xs": 30}                                          # llama_ftype values of llama.h
TYPES = FLOAT_TYPES + tuple(QUANT_FTYPES)

# The parts of llama.cpp's source used here (inside the sdist's vendor/llama.cpp).
CONVERTER = "convert_hf_to_gguf.py"
LLAMA_SPM_VOCAB = "models/ggml-vocab-llama-spm.gguf"
SOURCE_PARTS = (CONVERTER, "conversion/", "gguf-py/", LLAMA_SPM_VOCAB)

TINYLLAMA_SHAPE = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                   "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048,
                   "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}


def available() -> bool:
    """Whether llama_cpp (llama-cpp-python) is importable: bench_generate.py adds its column only then."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError("the llama.cpp peer needs llama-cpp-python (see benchmarks/README.md, 'llama.cpp peer'): "
                          f"{e}") from e
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own log: errors only
    return llama_cpp


@contextlib.contextmanager
def atomic_file(target: Path):
    """Yields a temporary path beside target that becomes target only if the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


# --- llama.cpp's source: converter and test vocabulary -------------------------------------------------------

def llama_cpp_source(cache: Path) -> Path:
    """llama.cpp's source tree of the installed llama-cpp-python: $LLAMA_CPP_SOURCE if set, else the parts used here
    extracted once from its sdist (`pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`)."""
    if "LLAMA_CPP_SOURCE" in os.environ:
        source = Path(os.environ["LLAMA_CPP_SOURCE"])
        if not (source / CONVERTER).is_file():
            raise FileNotFoundError(f"LLAMA_CPP_SOURCE={source}: no {CONVERTER} there (it should name the llama.cpp "
                                    "source tree, e.g. vendor/llama.cpp of the llama-cpp-python sdist)")
        return source
    version = import_llama_cpp().__version__
    source = cache / f"llama.cpp-{version}"
    if (source / CONVERTER).is_file():
        return source
    with tempfile.TemporaryDirectory(dir=cache) as tmp, atomic_directory(source, force=True) as out:
        print(f"downloading the llama-cpp-python {version} sdist for llama.cpp's converter ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--dest", tmp, f"llama-cpp-python=={version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise RuntimeError(f"pip download llama-cpp-python=={version} failed:\n{result.stderr.strip()[-2000:]}")
        with tarfile.open(sdists[0]) as sdist:
            prefix = f"{sdists[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            for member in sdist.getmembers():
                relative = member.name.removeprefix(prefix)
                if member.name.startswith(prefix) and relative.startswith(SOURCE_PARTS) and member.isfile():
                    member.name = relative
                    sdist.extract(member, out, filter="data")
    return source


# --- GGUF files ---------------------------------------------------------------------------------------------

def source_digest(model_dir: Path) -> str:
    """Names a float directory's state: its path and every file's name, size and modification time."""
    h = hashlib.sha256(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


def lossless_float_type(model_dir: Path) -> str:
    """f16 when the directory's weights are all float16 (the random model), else f32: quantization starts from it."""
    config = json.loads((model_dir / "config.json").read_text())
    return "f16" if config.get("torch_dtype") == "float16" else "f32"


def gguf_file(model_dir: str | Path, gguf_type: str, cache: str | Path, source: Path | None = None) -> Path:
    """The GGUF file of type gguf_type ('f32', 'f16', 'q4_0', 'q4_1', 'q4_k_m', 'q8_0') of an HF float directory,
    made by llama.cpp (converter, then quantizer) once and cached under cache by (directory, type)."""
    model_dir, cache = Path(model_dir), Path(cache)
    if gguf_type not in TYPES:
        raise ValueError(f"unknown GGUF type {gguf_type!r} (known: {', '.join(TYPES)})")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (an HF float directory is expected)")
    target = cache / f"{model_dir.name}-{source_digest(model_dir)}.{gguf_type}.gguf"
    if target.is_file():
        return target
    source = source or llama_cpp_source(cache)
    if gguf_type in FLOAT_TYPES:
        with atomic_file(target) as tmp:
            cmd = [sys.executable, str(source / CONVERTER), str(model_dir), "--outtype", gguf_type, "--outfile",
                   str(tmp)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"llama.cpp's converter failed on {model_dir}:\n{result.stderr.strip()[-3000:]}")
        return target
    base = gguf_file(model_dir, lossless_float_type(model_dir), cache, source)
    llama_cpp = import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[gguf_type]
    with atomic_file(target) as tmp:
        if llama_cpp.llama_model_quantize(str(base).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {base} to {gguf_type} (its log above says why)")
    return target


# The decoder blocks' linear layers in llama.cpp's tensor names: what lowbit's bits/weight (linears) counts.
LINEAR_SUFFIXES = tuple(f".{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                                  "ffn_down"))


def gguf_summary(path: Path) -> dict:
    """File size, bits per weight over all tensors and over the decoder linears (with their types), and the output
    head's type (token_embd when tied)."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    elements = sum(int(t.n_elements) for t in reader.tensors)
    size = sum(int(t.n_bytes) for t in reader.tensors)
    linears = [t for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith(LINEAR_SUFFIXES)]
    return {"file_MB": path.stat().st_size / 1e6, "bits_per_weight": 8 * size / elements,
            "linear_bits_per_weight": 8 * sum(int(t.n_bytes) for t in linears) / sum(int(t.n_elements) for t in linears),
            "linear_types": dict(Counter(t.tensor_type.name for t in linears).most_common()),
            "head_type": types.get("output.weight", types.get("token_embd.weight"))}


# --- a random TinyLlama-1.1B-shaped directory ------------------------------------------------------------------

def protobuf_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 64-bit two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def protobuf_field(number: int, value) -> bytes:
    """One field of a protobuf message: int -> varint, float -> 32-bit, bytes -> length-delimited."""
    if isinstance(value, float):
        return protobuf_varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, bytes):
        return protobuf_varint(number << 3 | 2) + protobuf_varint(len(value)) + value
    return protobuf_varint(number << 3) + protobuf_varint(value)


def sentencepiece_model(tokens: list[str], scores: list[float], types: list[int]) -> bytes:
    """A SentencePiece tokenizer.model (ModelProto of sentencepiece_model.proto) for a LLaMA-style BPE vocabulary:
    <unk>, <s>, </s> at 0, 1, 2, byte fallback, a dummy prefix, no whitespace folding. Types are SentencePiece's
    (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte), which are also llama.cpp's."""
    pieces = b"".join(protobuf_field(1, protobuf_field(1, t.encode()) + protobuf_field(2, float(s))
                                     + protobuf_field(3, int(k))) for t, s, k in zip(tokens, scores, types))
    trainer = b"".join(protobuf_field(n, v) for n, v in ((3, 2), (4, len(tokens)), (35, 1),  # BPE, vocab, bytes
                                                         (40, 0), (41, 1), (42, 2), (43, -1)))  # unk bos eos pad
    normalizer = b"".join(protobuf_field(n, v) for n, v in ((1, b"identity"), (3, 1), (4, 0), (5, 1)))
    return pieces + protobuf_field(2, trainer) + protobuf_field(3, normalizer)


def write_llama_tokenizer(directory: Path, vocab_gguf: Path) -> None:
    """tokenizer.model and tokenizer_config.json of the LLaMA SentencePiece tokenizer, from a GGUF vocabulary."""
    import gguf
    fields = gguf.GGUFReader(str(vocab_gguf)).fields
    value = {k: fields[f"tokenizer.ggml.{k}"].contents() for k in ("tokens", "scores", "token_type")}
    (directory / "tokenizer.model").write_bytes(sentencepiece_model(value["tokens"], value["scores"],
                                                                    value["token_type"]))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "model_max_length": 2048}, indent=2) + "\n")


def random_llama_dir(out: str | Path, vocab_gguf: Path, shape: dict = TINYLLAMA_SHAPE, std: float = 0.02,
                     seed: int = 0) -> Path:
    """An HF float16 directory of a LLaMA model with random normal weights (std: small, so activations stay finite
    through the layers; norms 1), made once. The tokenizer comes from vocab_gguf and must match shape's vocab."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    config = lowbit.LlamaConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                           "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
                                           "torch_dtype": "float16", **shape})
    c = shape | {"head_dim": config.head_dim}
    kv_rows = c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"]),
              "model.norm.weight": (c["hidden_size"],)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], c["hidden_size"])
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (c["num_attention_heads"] * c["head_dim"], c["hidden_size"]),
                   p + "self_attn.k_proj.weight": (kv_rows, c["hidden_size"]),
                   p + "self_attn.v_proj.weight": (kv_rows, c["hidden_size"]),
                   p + "self_attn.o_proj.weight": (c["hidden_size"], c["num_attention_heads"] * c["head_dim"]),
                   p + "mlp.gate_proj.weight": (c["intermediate_size"], c["hidden_size"]),
                   p + "mlp.up_proj.weight": (c["intermediate_size"], c["hidden_size"]),
                   p + "mlp.down_proj.weight": (c["hidden_size"], c["intermediate_size"]),
                   p + "input_layernorm.weight": (c["hidden_size"],),
                   p + "post_attention_layernorm.weight": (c["hidden_size"],)}
    g = torch.Generator().manual_seed(seed)
    tensors = {name: torch.ones(s, dtype=torch.float16) if name.endswith("norm.weight")
               else (torch.randn(s, generator=g) * std).half() for name, s in shapes.items()}
    with atomic_directory(out, force=True) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_llama_tokenizer(tmp, vocab_gguf)
        (tmp / "config.json").write_text(json.dumps(
            {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", **c,
             "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"}, indent=2) + "\n")
    return out


# --- timing ------------------------------------------------------------------------------------------------------

def load(gguf_path: Path, threads: int, n_ctx: int, logits_all: bool = False, flash_attn: bool = False):
    """(llama_cpp.Llama, seconds to load it): CPU only, `threads` threads for decode and batches."""
    llama_cpp = import_llama_cpp()
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                          logits_all=logits_all, flash_attn=flash_attn, verbose=False)
    return llm, time.perf_counter() - start


def context_length(tokens: int) -> int:
    return max(-(-tokens // 256) * 256, 256)  # as lowbit.generate sizes its cache


def greedy_run(llm, prompt_ids: list[int], new_tokens: int) -> dict:
    """One forced greedy generation from an empty cache, clocked as lowbit.generate_tokens clocks its own."""
    llama_cpp = import_llama_cpp()
    n_vocab = llm.n_vocab()

    def argmax_last() -> int:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_ids)
    tokens = [argmax_last()]
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval(tokens[-1:])
        tokens.append(argmax_last())
    return {"prefill_seconds": prefill, "decode_seconds": time.perf_counter() - start, "tokens": tokens}


def check_ids(ids: list[int], n_vocab: int, what: str) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids or min(ids) < 0 or max(ids) >= n_vocab:
        raise ValueError(f"{what}: token ids must be a non-empty list in [0, {n_vocab}), got "
                         f"{len(ids)} ids in [{min(ids, default=None)}, {max(ids, default=None)}]")
    return ids


def llama_cpp_decode(gguf_path, prompt_ids: list[int], new_tokens: int, threads: int, repeats: int = 1,
                     flash_attn: bool = False) -> dict:
    """Prefill and decode tokens/s of llama.cpp on the given prompt ids, every one of new_tokens forced: the best
    prefill and the best decode over `repeats` runs after a 4-token warm-up generation (as bench_generate.py's
    measure), with load and warm-up seconds apart and the tokens it produced."""
    if new_tokens < 2 or repeats < 1:
        raise ValueError(f"new_tokens must be at least 2 (the first comes from the prefill) and repeats at least 1, "
                         f"got {new_tokens} and {repeats}")
    llm, load_seconds = load(gguf_path, threads, context_length(len(prompt_ids) + new_tokens),
                             flash_attn=flash_attn)
    try:
        prompt_ids = check_ids(prompt_ids, llm.n_vocab(), "prompt_ids")
        start = time.perf_counter()
        greedy_run(llm, prompt_ids, 4)
        warm_up = time.perf_counter() - start
        runs = [greedy_run(llm, prompt_ids, new_tokens) for _ in range(repeats)]
    finally:
        llm.close()
    prefill = min(r["prefill_seconds"] for r in runs)
    decode = min(r["decode_seconds"] for r in runs)
    return {"prompt_tokens": len(prompt_ids), "new_tokens": len(runs[0]["tokens"]), "threads": threads,
            "prefill_tok_s": len(prompt_ids) / prefill, "decode_tok_s": (new_tokens - 1) / decode,
            "load_seconds": load_seconds, "warm_up_seconds": warm_up, "flash_attn": flash_attn,
            "tokens": runs[0]["tokens"]}


def llama_cpp_prefill(gguf_path, ids: list[int], threads: int, repeats: int = 1, flash_attn: bool = False) -> dict:
    """Tokens/s of evaluating ids (e.g. 512 of them) from an empty cache, best of `repeats` after one warm-up."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    llm, load_seconds = load(gguf_path, threads, context_length(len(ids)), flash_attn=flash_attn)
    try:
        ids = check_ids(ids, llm.n_vocab(), "ids")
        start = time.perf_counter()
        greedy_run(llm, ids, 1)
        warm_up = time.perf_counter() - start
        best = min(greedy_run(llm, ids, 1)["prefill_seconds"] for _ in range(repeats))
    finally:
        llm.close()
    return {"prompt_tokens": len(ids), "threads": threads, "prefill_tok_s": len(ids) / best,
            "load_seconds": load_seconds, "warm_up_seconds": warm_up, "flash_attn": flash_attn}


def llama_cpp_perplexity(gguf_path, ids: list[int], threads: int, seq_len: int = 512) -> float:
    """exp(mean next-token NLL) over ids cut into windows of seq_len predictions, as lowbit.eval.perplexity."""
    n_windows = (len(ids) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {len(ids)}")
    llm, _ = load(gguf_path, threads, seq_len, logits_all=True)
    try:
        ids = check_ids(ids, llm.n_vocab(), "ids")
        total = 0.0
        for w in range(n_windows):
            window = ids[w * seq_len:(w + 1) * seq_len + 1]
            llm.reset()
            llm.eval(window[:-1])
            logits = torch.from_numpy(np.asarray(llm.scores[:seq_len], dtype=np.float32))
            total += F.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
    finally:
        llm.close()
    return float(np.exp(total / (n_windows * seq_len)))


# --- script ----------------------------------------------------------------------------------------------------

def model_and_prompts(name: str, cache: Path, source: Path, prefill_tokens: int, eval_tokens: int):
    """(float directory, prompt ids, prefill ids, evaluation ids or None) for --model."""
    if name == "smollm2":
        model_dir = lowbit.fetch("smollm2")
        tok = Tokenizer.from_dir(model_dir)
        prompt = tok.encode("Explain, in a few paragraphs, why the sky is blue and why sunsets are red. " * 2)
        stream = lowbit.data.evaluation_tokens(tok)[0].tolist()
        return model_dir, prompt, stream[:prefill_tokens], stream[:eval_tokens + 1] if eval_tokens else None
    model_dir = random_llama_dir(cache / "TinyLlama-1.1B-shaped-random", source / LLAMA_SPM_VOCAB)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, TINYLLAMA_SHAPE["vocab_size"], (max(prefill_tokens, 32),), generator=g).tolist()
    return model_dir, [1] + ids[:31], ids[:prefill_tokens], None  # perplexity of random weights says nothing


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tinyllama-random"], default="smollm2")
    parser.add_argument("--types", nargs="+", choices=TYPES, default=["q4_0", "q4_k_m", "f32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512, help="0: no prefill row")
    parser.add_argument("--perplexity-tokens", type=int, default=0,
                        help="smollm2: perplexity on this many of lowbit.data's evaluation tokens (e.g. 4096)")
    parser.add_argument("--flash-attn", action="store_true", help="llama.cpp's flash attention (default: off)")
    parser.add_argument("--cache", type=Path, default=cache_dir() / "llama_cpp",
                        help="GGUF files, the random model and llama.cpp's converter (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write every number to this .json")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    source = llama_cpp_source(args.cache)
    model_dir, prompt, prefill_ids, eval_ids = model_and_prompts(args.model, args.cache, source,
                                                                 args.prefill_tokens, args.perplexity_tokens)
    rows = []
    for gguf_type in args.types:
        start = time.perf_counter()
        path = gguf_file(model_dir, gguf_type, args.cache, source)
        row = {"type": gguf_type, "gguf": str(path), "make_seconds": time.perf_counter() - start,
               **gguf_summary(path)}
        row |= llama_cpp_decode(path, prompt, args.new_tokens, args.threads, args.repeats, args.flash_attn)
        if args.prefill_tokens:
            row["prefill_512"] = llama_cpp_prefill(path, prefill_ids, args.threads, args.repeats, args.flash_attn)
        if eval_ids:
            row["perplexity"] = llama_cpp_perplexity(path, eval_ids, args.threads)
        rows.append(row)
        print(f"{gguf_type}: {row['file_MB']:.0f} MB, {row['bits_per_weight']:.2f} bits/weight, head "
              f"{row['head_type']}; load {row['load_seconds']:.2f} s, warm-up {row['warm_up_seconds']:.2f} s; "
              f"prefill {row['prompt_tokens']} tokens {row['prefill_tok_s']:.1f} tok/s, decode {row['new_tokens']} "
              f"tokens {row['decode_tok_s']:.1f} tok/s"
              + (f"; prefill {len(prefill_ids)} tokens {row['prefill_512']['prefill_tok_s']:.1f} tok/s"
                 if args.prefill_tokens else "")
              + (f"; perplexity {row['perplexity']:.2f} on {len(eval_ids)} tokens" if eval_ids else ""), flush=True)
    print(f"llama.cpp {import_llama_cpp().__version__}, {args.model}, {args.threads} threads, best of "
          f"{args.repeats}; timings on a shared machine are noisy: compare only runs made side by side")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
