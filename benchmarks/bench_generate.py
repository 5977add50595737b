"""Generation speed through lowbit's own path (lowbit.generate_tokens, what lowbit.generate and the CLI run),
every run forced to its full token count (Sampling.ignore_eos) and the count it produced recorded.

On the CPU: SmolLM2-135M-Instruct in float32, bfloat16, int4, int3.5, side by side, prefill and decode tokens/s,
and where a decode step's time goes (lowbit kernels, float matmuls, attention, everything else) from
torch.profiler. --compile: the decode step torch.compile'd (compile time reported apart).

    python benchmarks/bench_generate.py            # writes benchmarks/results/generate_cpu.{json,md}
    python benchmarks/bench_generate.py --quick
    python benchmarks/bench_generate.py --compile  # generate_cpu_compiled.{json,md}

On a CUDA GPU (--device cuda): batch-1 decode of a LLaMA-2-7B-shaped model (float16, int4, int3.5) and a
LLaMA-70B-shaped model (int4, int3.5; when the GPU holds it), random weights (quantized layers made directly as
random codes in the CUDA tile layout, no float weights), output head float16. The decode step is the one
lowbit.generate runs on CUDA: one CUDA graph, captured in the first (warm-up) generation.

    python benchmarks/bench_generate.py --device cuda     # writes benchmarks/results/generate_cuda.{json,md}
"""

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch

import lowbit
from lowbit.generate import Sampling, Stats, generate_tokens
from lowbit.models.llama import rope_inv_freq
from lowbit.nn import QuantLinear, replace_linears

from bench_kernels import random_tiled_weight  # the same random tile-layout weights as the kernel benchmark

VARIANTS = [  # name, dtype, bits, quantize lm_head
    ("float32", torch.float32, None, False),
    ("bfloat16", torch.bfloat16, None, False),
    ("int4", torch.float32, 4, False),
    ("int4 + int4 lm_head", torch.float32, 4, True),
    ("int3.5", torch.float32, 3.5, False),
    ("int3.5 + int3.5 lm_head", torch.float32, 3.5, True),
]


def build(path, dtype, bits, lm_head):
    model = lowbit.LlamaForCausalLM.from_pretrained(path)
    if bits is not None:
        lowbit.quantize_model(model, bits, 64, quantize_lm_head=lm_head)
    return model.to(dtype)


def timed_generation(model, prompt_ids, new_tokens, compile=False) -> Stats:
    """One generation of exactly new_tokens tokens, each read back to the host as a user's stream does."""
    stats = Stats()
    for nxt in generate_tokens(model, prompt_ids, Sampling(max_new_tokens=new_tokens, ignore_eos=True), stats,
                               compile):
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


def decode_breakdown(model, prompt_ids, steps=16):
    """Share of one decode step's CPU time: lowbit ops, float matmuls, the rest (norms, rope, attention,
    Python and dispatch overhead)."""
    from torch.profiler import ProfilerActivity, profile
    t = prompt_ids.shape[1]
    model.setup_cache(1, t + steps + 1)
    with torch.inference_mode():
        model(prompt_ids, torch.arange(t))
        token = prompt_ids[:, -1:]
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                model(token, torch.tensor([t + i]))
        wall = (time.perf_counter() - start) / steps
    buckets = defaultdict(float)
    for event in prof.key_averages():
        name = event.key
        if name.startswith("lowbit::"):
            buckets["lowbit kernels"] += event.self_cpu_time_total
        elif name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
            buckets["float matmul"] += event.self_cpu_time_total
        elif name == "aten::_scaled_dot_product_flash_attention_for_cpu":
            buckets["attention"] += event.self_cpu_time_total
    measured = wall * 1e6 * steps  # profiled per-step times are in microseconds
    shares = {k: v / measured for k, v in buckets.items()}
    shares["everything else"] = max(0.0, 1 - sum(shares.values()))
    return {"ms_per_token_profiled": wall * 1e3, "shares": shares}


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
    parser.add_argument("--compile", action="store_true", help="CPU: torch.compile the decode step")
    parser.add_argument("--variants", nargs="+", help="only these variants (names as in the table)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    if args.device == "cuda":
        run_cuda(args)
        return
    stem = "generate_cpu_compiled" if args.compile else "generate_cpu"
    out = Path(args.out or Path(__file__).parent / "results" / stem)
    new_tokens, repeats = (32, 1) if args.quick else (128, 3)
    path = lowbit.fetch("smollm2")
    tok = lowbit.LlamaForCausalLM.from_pretrained(path).tokenizer
    prompt = "Explain, in a few paragraphs, why the sky is blue and why sunsets are red. " * 2
    prompt_ids = torch.tensor([tok.encode(prompt)])
    rows = []
    for name, dtype, bits, lm_head in VARIANTS:
        if args.variants and name not in args.variants:
            continue
        model = build(path, dtype, bits, lm_head)
        stats, warm_up = measure(model, prompt_ids, new_tokens, repeats, args.compile)
        row = {"variant": name, "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
               "prefill_tok_s": stats.prefill_tokens_per_s, "decode_tok_s": stats.decode_tokens_per_s,
               "warm_up_seconds": warm_up, **decode_breakdown(model, prompt_ids)}
        rows.append(row)
        print(name, f"prefill {row['prefill_tok_s']:.1f} tok/s, decode {row['decode_tok_s']:.1f} tok/s",
              {k: f"{100 * v:.0f}%" for k, v in row["shares"].items()}, flush=True)
    base = rows[0]["decode_tok_s"]
    lines = [f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"kernels {lowbit.cpu_isa()}, torch {torch.__version__}"
             f"{', decode step torch.compile' if args.compile else ''}; SmolLM2-135M-Instruct, "
             f"{rows[0]['prompt_tokens']}-token prompt, {new_tokens} new tokens forced (EOS ignored) through "
             "lowbit.generate_tokens, group size 64; warm-up: a first 4-token generation (compiles the step)", "",
             "| variant | prefill tok/s | decode tok/s | tokens | decode vs float32 | lowbit kernels | float matmul "
             "| attention | everything else | warm-up s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shares"]
        lines.append(f"| {r['variant']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['new_tokens']} | "
                     f"{r['decode_tok_s'] / base:.2f}x | {100 * s.get('lowbit kernels', 0):.0f}% | "
                     f"{100 * s.get('float matmul', 0):.0f}% | {100 * s.get('attention', 0):.0f}% | "
                     f"{100 * s['everything else']:.0f}% | {r['warm_up_seconds']:.1f} |")
    table = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "new_tokens": new_tokens}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
