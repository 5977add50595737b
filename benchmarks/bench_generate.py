"""Generation speed through lowbit's own path (lowbit.generate_tokens, what lowbit.generate and the CLI run),
every run forced to its full token count (Sampling.ignore_eos) and the count it produced recorded.

On the CPU: lowbit built exactly as `lowbit generate MODEL <flags>` builds it (the CLI's own parser and loader),
next to llama.cpp (llama-cpp-python, when importable: benchmarks/llama_cpp_peer.py) on the same token ids and
threads, in interleaved rounds. Decode: a short prompt and 128 forced new tokens; prefill: 512 tokens. Models:
SmolLM2-135M-Instruct (its float weights are the dequantized Q4_1 GGUF), or a TinyLlama-1.1B-shaped model with
random weights (kernel-bound).

    python benchmarks/bench_generate.py                           # writes benchmarks/results/generate_cpu.{json,md}
    python benchmarks/bench_generate.py --model tinyllama-random  # generate_cpu_tinyllama.{json,md}
    python benchmarks/bench_generate.py --quick
    python benchmarks/bench_generate.py --perplexity-tokens 4096  # and each row's perplexity (SmolLM2)

On a CUDA GPU (--device cuda): batch-1 decode of a LLaMA-2-7B-shaped model (float16, int4, int3.5) and a
LLaMA-70B-shaped model (int4, int3.5; when the GPU holds it), random weights (quantized layers made directly as
random codes in the CUDA tile layout, no float weights), output head float16. The decode step is the one
lowbit.generate runs on CUDA: one CUDA graph, captured in the first (warm-up) generation.

    python benchmarks/bench_generate.py --device cuda     # writes benchmarks/results/generate_cuda.{json,md}
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import lowbit
from lowbit.cli import build_parser, load_for_cli
from lowbit.eval import linear_stats, perplexity
from lowbit.generate import Sampling, Stats, generate_tokens
from lowbit.io.fetch import cache_dir
from lowbit.models.llama import rope_inv_freq
from lowbit.nn import QuantLinear, replace_linears

import llama_cpp_peer
from bench_kernels import random_tiled_weight  # the same random tile-layout weights as the kernel benchmark

# Rows: (name, `lowbit generate` flags after the model). The first is what a user gets with only --bits and
# --group-size; the others change one thing each.
SMOLLM2_VARIANTS = [
    ("lowbit generate --bits 4 --group-size 64 (defaults: int8 head, fused step)", ["--bits", "4", "--group-size", "64"]),
    ("int4 g64, float32 head", ["--bits", "4", "--group-size", "64", "--lm-head-bits", "none"]),
    ("int4 g64, int4 head", ["--bits", "4", "--group-size", "64", "--lm-head-bits", "4"]),
    ("int3.5 g64", ["--bits", "3.5", "--group-size", "64"]),
    ("int4 g64, PyTorch step (--no-fused)", ["--bits", "4", "--group-size", "64", "--no-fused"]),
    ("float32", []),
]
TINYLLAMA_VARIANTS = [
    ("lowbit generate --bits 4 (defaults: g128, int8 head, fused step)", ["--bits", "4"]),
    ("int4 g128, int4 head", ["--bits", "4", "--lm-head-bits", "4"]),
    ("int3.5 g128", ["--bits", "3.5"]),
    ("int3.5 g128, int3.5 head", ["--bits", "3.5", "--lm-head-bits", "3.5"]),
]
LLAMA_CPP_TYPES = {"smollm2": ["q4_0", "q4_k_m", "q4_1", "f32"], "tinyllama-random": ["q4_0", "q4_k_m", "f16"]}


def timed_generation(model, prompt_ids, new_tokens, compile=False, fused=True) -> Stats:
    """One generation of exactly new_tokens tokens, each read back to the host as a user's stream does."""
    stats = Stats()
    for nxt in generate_tokens(model, prompt_ids, Sampling(max_new_tokens=new_tokens, ignore_eos=True), stats,
                               compile, fused):
        int(nxt[0])
    return stats


def measure(model, prompt_ids, new_tokens, repeats, compile=False):
    """Stats with the best prefill and the best decode time over the repeats, after a warm-up generation (which
    also compiles or captures the decode step); its time is returned apart."""
    start = time.perf_counter()
    timed_generation(model, prompt_ids, 4, compile)
    warm_up = time.perf_counter() - start
    runs = [timed_generation(model, prompt_ids, new_tokens, compile) for _ in range(repeats)]
    best = min(runs, key=lambda r: r.decode_seconds)
    best.prefill_seconds = min(r.prefill_seconds for r in runs)
    return best, warm_up


def linear_bits_per_weight(model) -> float:
    """Bits per weight of the decoder linears and the head, scales and zeros included (the head counted as
    stored: float32 when not quantized)."""
    weights, nbytes = linear_stats(model)
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            weights, nbytes = weights + m.weight.numel(), nbytes + m.weight.numel() * m.weight.element_size()
    return 8 * nbytes / weights


class LowbitRow:
    """One lowbit variant, loaded once as the CLI loads it; each round times one decode run and one prefill."""

    def __init__(self, name, model_path, flags, threads):
        self.name = name
        self.args = build_parser().parse_args(["generate", str(model_path), "--threads", str(threads), *flags])
        start = time.perf_counter()
        self.model = load_for_cli(self.args)
        self.load_seconds = time.perf_counter() - start
        self.decode, self.prefill, self.stats = [], [], None

    def warm_up(self, prompt_ids) -> float:
        start = time.perf_counter()
        timed_generation(self.model, prompt_ids, 4, self.args.compile, self.args.fused)
        return time.perf_counter() - start

    def round(self, prompt_ids, prefill_ids, new_tokens):
        self.stats = timed_generation(self.model, prompt_ids, new_tokens, self.args.compile, self.args.fused)
        self.decode.append(self.stats.decode_tokens_per_s)
        prefill = timed_generation(self.model, prefill_ids, 1, self.args.compile, self.args.fused)
        self.prefill.append(prefill.prefill_tokens_per_s)

    def row(self) -> dict:
        return {"variant": self.name, "engine": "lowbit", "flags": self.args_flags(),
                "bits_per_weight": linear_bits_per_weight(self.model), "decode_path": self.stats.decode_path,
                "new_tokens": self.stats.new_tokens, "decode_tok_s": self.decode, "prefill_tok_s": self.prefill,
                "load_seconds": self.load_seconds}

    def args_flags(self) -> str:
        return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(self.args).items()
                        if k in ("bits", "group_size", "method", "lm_head_bits", "fused", "compile"))


def run_cpu(args):
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cache = cache_dir() / "llama_cpp"
    peer = llama_cpp_peer.available() and not args.no_llama_cpp
    new_tokens, rounds = (16, 1) if args.quick else (args.new_tokens, args.rounds)
    prefill_len = 64 if args.quick else args.prefill_tokens
    if args.model == "smollm2":
        model_dir = lowbit.fetch("smollm2")
        tok = lowbit.LlamaForCausalLM.from_pretrained(model_dir).tokenizer
        prompt = tok.encode("Explain, in a few paragraphs, why the sky is blue and why sunsets are red. " * 2)
        prefill_ids = lowbit.data.evaluation_tokens(tok)[0, :prefill_len].tolist()
        variants = SMOLLM2_VARIANTS
    else:
        source = llama_cpp_peer.llama_cpp_source(cache)
        model_dir = llama_cpp_peer.random_llama_dir(cache / "TinyLlama-1.1B-shaped-random",
                                                    source / llama_cpp_peer.LLAMA_SPM_VOCAB)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, llama_cpp_peer.TINYLLAMA_SHAPE["vocab_size"], (max(prefill_len, 32),), generator=g)
        prompt, prefill_ids = [1] + ids[:31].tolist(), ids[:prefill_len].tolist()
        variants = TINYLLAMA_VARIANTS
    if args.variants:
        variants = [v for v in variants if v[0] in args.variants]
    rows = [LowbitRow(name, model_dir, flags, threads) for name, flags in variants]
    prompt_t, prefill_t = torch.tensor([prompt]), torch.tensor([prefill_ids])
    warm_up = {r.name: r.warm_up(prompt_t) for r in rows}
    ggufs = {}
    if peer:
        source = llama_cpp_peer.llama_cpp_source(cache)
        for t in args.llama_cpp_types or (LLAMA_CPP_TYPES[args.model] if not args.quick else ["q4_0"]):
            ggufs[t] = llama_cpp_peer.gguf_file(model_dir, t, cache, source)
    peer_runs = {t: {"decode": [], "prefill": []} for t in ggufs}
    for i in range(rounds):  # interleaved: every engine and variant once per round
        for r in rows:
            r.round(prompt_t, prefill_t, new_tokens)
            print(f"round {i + 1}: {r.name}: decode {r.decode[-1]:.1f} tok/s ({r.stats.new_tokens} tokens, "
                  f"{r.stats.decode_path}), prefill {r.prefill[-1]:.1f} tok/s", flush=True)
        for t, path in ggufs.items():
            d = llama_cpp_peer.llama_cpp_decode(path, prompt, new_tokens, threads)
            p = llama_cpp_peer.llama_cpp_prefill(path, prefill_ids, threads)
            peer_runs[t]["decode"].append(d["decode_tok_s"])
            peer_runs[t]["prefill"].append(p["prefill_tok_s"])
            peer_runs[t]["new_tokens"] = d["new_tokens"]
            print(f"round {i + 1}: llama.cpp {t}: decode {d['decode_tok_s']:.1f} tok/s ({d['new_tokens']} tokens), "
                  f"prefill {p['prefill_tok_s']:.1f} tok/s", flush=True)
    results = [r.row() for r in rows]
    for t, path in ggufs.items():
        summary = llama_cpp_peer.gguf_summary(path)
        results.append({"variant": f"llama.cpp {t.upper()}", "engine": "llama.cpp", "gguf": str(path),
                        "bits_per_weight": summary["bits_per_weight"], "head_type": summary["head_type"],
                        "new_tokens": peer_runs[t]["new_tokens"], "decode_tok_s": peer_runs[t]["decode"],
                        "prefill_tok_s": peer_runs[t]["prefill"]})
    if args.perplexity_tokens and args.model == "smollm2":  # after the timing: the same evaluation tokens for all
        eval_ids = lowbit.data.evaluation_tokens(tok, args.perplexity_tokens + 1)
        for r, result in zip(rows, results):
            result["perplexity"] = perplexity(r.model, eval_ids, progress=False)
        for t, path in ggufs.items():
            next(x for x in results if x.get("gguf") == str(path))["perplexity"] = \
                llama_cpp_peer.llama_cpp_perplexity(path, eval_ids[0].tolist(), threads)
    write_cpu_results(args, results, warm_up, threads, len(prompt), len(prefill_ids), new_tokens, rounds)


def write_cpu_results(args, results, warm_up, threads, prompt_len, prefill_len, new_tokens, rounds):
    med = statistics.median
    base = next((r for r in results if r["variant"] == "llama.cpp Q4_0"), None)
    machine = (f"{platform.processor() or platform.machine()}, {threads} threads, lowbit kernels {lowbit.cpu_isa()}, "
               f"torch {torch.__version__}"
               + (f", llama.cpp {llama_cpp_peer.import_llama_cpp().__version__}" if base else ", no llama.cpp"))
    lines = [f"{args.model}: {machine}. Decode: a {prompt_len}-token prompt, {new_tokens} new tokens forced (EOS "
             f"ignored); prefill: {prefill_len} tokens; the same token ids for every engine; median of {rounds} "
             "interleaved rounds (each value in the JSON). lowbit rows are built by the CLI's own parser and loader "
             "(`lowbit generate MODEL <flags>`) and timed through lowbit.generate_tokens.", "",
             "| variant | bits/weight | decode tok/s | tokens | prefill tok/s | decode vs llama.cpp Q4_0 "
             "| prefill vs Q4_0 | decode path | perplexity |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        d, p = med(r["decode_tok_s"]), med(r["prefill_tok_s"])
        vs = (f"{d / med(base['decode_tok_s']):.2f}x | {p / med(base['prefill_tok_s']):.2f}x" if base else "– | –")
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "–"
        lines.append(f"| {r['variant']} | {r['bits_per_weight']:.2f} | {d:.1f} | {r['new_tokens']} | {p:.1f} | {vs} "
                     f"| {r.get('decode_path', 'llama.cpp')} | {ppl} |")
    lines += ["", "bits/weight: the decoder linears and the output head together, scales and zeros included "
              "(llama.cpp: its file's, embeddings included). perplexity (with --perplexity-tokens): on the first "
              "N + 1 tokens of lowbit.data's evaluation split, windows of 512, each engine as it runs (SmolLM2's "
              "float weights are its dequantized Q4_1 GGUF). Warm-up (first generation, s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in warm_up.items())]
    table = "\n".join(lines) + "\n"
    stem = "generate_cpu" if args.model == "smollm2" else "generate_cpu_tinyllama"
    out = Path(args.out or Path(__file__).parent / "results" / stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model": args.model, "machine": machine, "rows": results,
                                                    "warm_up_seconds": warm_up}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print()
    print(table)


# --- CUDA ---------------------------------------------------------------------------------------------

CUDA_GROUP_SIZE = 128
LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "max_position_embeddings": 4096}
LLAMA_70B = {"vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 4096}
CUDA_VARIANTS = [  # name, shape, bits (output head float16), GPU memory needed in GiB
    ("7B float16", LLAMA2_7B, None, 16), ("7B int4", LLAMA2_7B, 4, 6), ("7B int3.5", LLAMA2_7B, 3.5, 6),
    ("70B int4", LLAMA_70B, 4, 45), ("70B int3.5", LLAMA_70B, 3.5, 42)]


def random_model(shape: dict, bits, device="cuda") -> lowbit.LlamaForCausalLM:
    """Float16 embeddings, norms and head; decoder linears float16 or random quantized codes. Built on the meta
    device and materialized layer by layer on the GPU."""
    with torch.device("meta"):
        model = lowbit.LlamaForCausalLM(lowbit.LlamaConfig(**shape)).eval().half()
    def make(name: str, linear: torch.nn.Linear) -> torch.nn.Module:
        if bits is not None:
            # Small scales keep activations in range through 80 layers of random weights.
            return QuantLinear(random_tiled_weight(linear.out_features, linear.in_features, bits, CUDA_GROUP_SIZE,
                                                   (0.0005, 0.0025), device))
        new = torch.nn.Linear(linear.in_features, linear.out_features, bias=False, device=device, dtype=torch.float16)
        torch.nn.init.normal_(new.weight.requires_grad_(False), std=0.02)
        return new

    replace_linears(model, make, skip=["lm_head"])
    for name, p in list(model.named_parameters()):
        if p.is_meta:  # embeddings, norms, head
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            value = torch.ones(p.shape) if "norm" in name else torch.randn(p.shape) * 0.02
            setattr(module, attr, torch.nn.Parameter(value.to(device, torch.float16), requires_grad=False))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(model.config).to(device)
    return model


def weight_bytes(model) -> int:
    """Bytes a decode step reads: parameters and buffers (quantized weights in their GPU layout), not the
    embedding table (one row per token) or the KV cache."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "kv_cache" not in name and name != "embed.weight":
            total += t.numel() * t.element_size()
    return total


def run_cuda(args):
    props = torch.cuda.get_device_properties(0)
    prompt_len, new_tokens = (16, 32) if args.quick else (16, 128)
    prompt = torch.randint(0, 32000, (1, prompt_len), device="cuda")
    rows = []
    for name, shape, bits, gib in CUDA_VARIANTS:
        if (args.variants and name not in args.variants) or gib > 0.9 * props.total_memory / 1024 ** 3:
            continue
        start = time.perf_counter()
        model = random_model(shape, bits)
        torch.cuda.synchronize()
        build_s = time.perf_counter() - start
        stats, warm_up = measure(model, prompt, new_tokens, 1 if args.quick else 3)
        row = {"variant": name, "build_seconds": build_s, "warm_up_seconds": warm_up,
               "weights_GB": weight_bytes(model) / 1e9, "new_tokens": stats.new_tokens,
               "decode_tok_s": stats.decode_tokens_per_s, "ms_per_token": 1e3 / stats.decode_tokens_per_s}
        row["weights_GB_per_s"] = row["weights_GB"] * row["decode_tok_s"]
        rows.append(row)
        print(name, f"decode {row['decode_tok_s']:.1f} tok/s ({row['ms_per_token']:.2f} ms/token, "
              f"{row['new_tokens']} tokens), weights {row['weights_GB']:.2f} GB read at "
              f"{row['weights_GB_per_s']:.0f} GB/s", flush=True)
        del model
        torch.cuda.empty_cache()
    lines = [f"GPU: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}; random weights, batch 1, "
             f"{prompt_len}-token prompt, {new_tokens} new tokens forced (EOS ignored) through "
             f"lowbit.generate_tokens (decode step: one CUDA graph); group size {CUDA_GROUP_SIZE}, output head "
             "float16", "",
             "| variant | decode tok/s | ms/token | tokens | weights GB | weights GB/s | warm-up s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['decode_tok_s']:.1f} | {r['ms_per_token']:.2f} | {r['new_tokens']} | "
                     f"{r['weights_GB']:.2f} | {r['weights_GB_per_s']:.0f} | {r['warm_up_seconds']:.1f} |")
    table = "\n".join(lines) + "\n"
    out = Path(args.out or Path(__file__).parent / "results" / "generate_cuda")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"device": props.name, "prompt_tokens": prompt_len,
                                                    "new_tokens": new_tokens, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print()
    print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=["smollm2", "tinyllama-random"], default="smollm2")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even when importable")
    parser.add_argument("--llama-cpp-types", nargs="+", choices=llama_cpp_peer.TYPES,
                        help="llama.cpp GGUF types to run (default: Q4_0, Q4_K_M and a float file; Q4_1 for SmolLM2)")
    parser.add_argument("--variants", nargs="+", help="only these variants (names as in the table)")
    parser.add_argument("--perplexity-tokens", type=int, default=0,
                        help="smollm2: also each row's perplexity on this many evaluation tokens (e.g. 4096)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    run_cuda(args) if args.device == "cuda" else run_cpu(args)


if __name__ == "__main__":
    main()
