"""Generation speed of SmolLM2-135M-Instruct on the CPU: float32, bfloat16, int4, int3.5, side by side.

Prefill and decode tokens/s from the same prompt, and where a decode step's time goes (lowbit kernels,
float matmuls, everything else) from torch.profiler.

    python benchmarks/bench_generate.py            # writes benchmarks/results/generate_cpu.{json,md}
    python benchmarks/bench_generate.py --quick
    python benchmarks/bench_generate.py --compile --variants float32 "int4 + int4 lm_head"
                                                   # torch.compile'd forward (about 2 minutes to compile each)
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


def measure(model, prompt_ids, new_tokens, repeats):
    best = None
    for _ in range(repeats):
        stats = Stats()
        for _ in generate_tokens(model, prompt_ids, Sampling(max_new_tokens=new_tokens), stats):
            pass
        if best is None or stats.decode_seconds < best.decode_seconds:
            best = stats
    return best


def decode_breakdown(model, prompt_ids, steps=16):
    """Share of one decode step's CPU time: lowbit ops, float matmuls, the rest (norms, rope, attention,
    Python and dispatch overhead)."""
    from torch.profiler import ProfilerActivity, profile
    model.setup_cache(1, prompt_ids.shape[1] + steps + 1)
    with torch.inference_mode():
        model(prompt_ids, start=0)
        token = prompt_ids[:, -1:]
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                model(token, start=prompt_ids.shape[1] + i)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's forward first")
    parser.add_argument("--variants", nargs="+", help="only these variants (names as in the table)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or Path(__file__).parent / "results" / ("generate_cpu_compiled" if args.compile else "generate_cpu"))
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
        if args.compile:
            model.compile()
            measure(model, prompt_ids, 4, 1)  # compiles for the prefill and the (dynamic) decode step
        stats = measure(model, prompt_ids, new_tokens, repeats)
        row = {"variant": name, "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
               "prefill_tok_s": stats.prefill_tokens_per_s, "decode_tok_s": stats.decode_tokens_per_s,
               **decode_breakdown(model, prompt_ids)}
        rows.append(row)
        print(name, f"prefill {row['prefill_tok_s']:.1f} tok/s, decode {row['decode_tok_s']:.1f} tok/s",
              {k: f"{100 * v:.0f}%" for k, v in row["shares"].items()}, flush=True)
    base = rows[0]["decode_tok_s"]
    lines = [f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"kernels {lowbit.cpu_isa()}, torch {torch.__version__}{', torch.compile' if args.compile else ''}; "
             f"SmolLM2-135M-Instruct, "
             f"{rows[0]['prompt_tokens']}-token prompt, {new_tokens} new tokens, group size 64", "",
             "| variant | prefill tok/s | decode tok/s | decode vs float32 | lowbit kernels | float matmul "
             "| attention | everything else |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shares"]
        lines.append(f"| {r['variant']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] / base:.2f}x | {100 * s.get('lowbit kernels', 0):.0f}% | "
                     f"{100 * s.get('float matmul', 0):.0f}% | {100 * s.get('attention', 0):.0f}% | "
                     f"{100 * s['everything else']:.0f}% |")
    table = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "new_tokens": new_tokens}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
