"""Generation speed of SmolLM2-135M-Instruct on the CPU: float32, bfloat16, int4, int3.5, side by side.

Prefill and decode tokens/s from the same prompt, and where a decode step's time goes (lowbit kernels,
float matmuls, everything else) from torch.profiler.

    python benchmarks/bench_generate.py            # writes benchmarks/results/generate_cpu.{json,md}
    python benchmarks/bench_generate.py --quick
    python benchmarks/bench_generate.py --compile --variants float32 "int4 + int4 lm_head"
                                                   # torch.compile'd forward (about 2 minutes to compile each)

On a CUDA GPU (--device cuda): decode speed of a LLaMA-2-7B-shaped model (dim 4096, 32 layers, 32 heads,
ffn 11008, vocab 32000) with random weights, float16 vs int4 vs int3.5 (round to nearest, group size 128,
quantized layer by layer on the GPU; the output head stays float16). Each decode step is one CUDA graph
(static KV cache, attention over the whole cache with a mask), replayed token after token; with --compile
the step is torch.compile'd first (the norms, rotary embedding and activations fuse into a few kernels).

    python benchmarks/bench_generate.py --device cuda     # writes benchmarks/results/generate_cuda.{json,md}
    python benchmarks/bench_generate.py --device cuda --compile   # generate_cuda_compiled.{json,md}
"""

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

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
    """Stats with the best prefill and the best decode time over the repeats (the first run also warms up)."""
    runs = []
    for _ in range(repeats):
        stats = Stats()
        for _ in generate_tokens(model, prompt_ids, Sampling(max_new_tokens=new_tokens), stats):
            pass
        runs.append(stats)
    best = min(runs, key=lambda r: r.decode_seconds)
    best.prefill_seconds = min(r.prefill_seconds for r in runs)
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


# --- CUDA ---------------------------------------------------------------------------------------------

CUDA_VARIANTS = [("float16", None), ("int4", 4), ("int3.5", 3.5)]  # name, bits (output head stays float16)
CUDA_GROUP_SIZE = 128


LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "max_position_embeddings": 4096}


def random_model(bits, shape=LLAMA2_7B, device="cuda") -> lowbit.LlamaForCausalLM:
    """Random float16 weights made on the device (nothing big on the host); every decoder linear layer
    quantized one after the other (the float16 original is freed as soon as it is replaced)."""
    from lowbit.nn import QuantLinear
    config = lowbit.LlamaConfig(**shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        # Under torch.device, tensors the reference code makes without a device (formats.pack) are on the GPU too.
        with torch.device(device):
            model = lowbit.LlamaForCausalLM(config).eval()
            if bits is not None:
                for layer in model.layers:
                    for parent, name in ((layer.attn, "wqkv"), (layer.attn, "wo"), (layer.ffn, "w_gate_up"),
                                         (layer.ffn, "w_down")):
                        linear = getattr(parent, name)
                        setattr(parent, name, QuantLinear.from_linear(linear, bits, CUDA_GROUP_SIZE))
                        del linear
    finally:
        torch.set_default_dtype(previous)
    return model


def static_decode_step(model, token, position):
    """One decode step with static shapes, for CUDA graphs: token [B, 1], position [1] (int64, on the
    device) -> logits [B, vocab] float32. Writes k, v at `position` of the static cache and attends to
    the whole cache, positions after `position` masked out (the eager forward slices the cache instead,
    whose shape changes every step)."""
    angles = position.to(torch.float32)[:, None] * model.inv_freq  # [1, D/2]
    cos = torch.cat((angles, angles), dim=-1).cos()
    sin = torch.cat((angles, angles), dim=-1).sin()
    x = model.embed(token)
    b = token.shape[0]
    for layer in model.layers:
        attn = layer.attn
        cache = attn.kv_cache
        q_dim, kv_dim = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
        q, k, v = attn.wqkv(layer.attn_norm(x)).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(b, 1, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = k.view(b, 1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = v.view(b, 1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = lowbit.models.llama.apply_rope(q, cos, sin), lowbit.models.llama.apply_rope(k, cos, sin)
        cache.k.index_copy_(2, position, k)
        cache.v.index_copy_(2, position, v)
        visible = (torch.arange(cache.k.shape[2], device=token.device) <= position).view(1, 1, 1, -1)
        y = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=visible,
                                           enable_gqa=attn.n_kv_heads != attn.n_heads)
        x = x + attn.wo(y.transpose(1, 2).reshape(b, 1, q_dim))
        x = x + layer.ffn(layer.ffn_norm(x))
    return model.lm_head(model.norm(x)).float()[:, -1]


def cuda_decode_speed(model, prompt_len: int, new_tokens: int, compile: bool) -> dict:
    device = model.device
    step = torch.compile(static_decode_step, dynamic=False) if compile else static_decode_step
    max_len = -(-(prompt_len + new_tokens + 1) // 64) * 64
    model.setup_cache(1, max_len)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    position = torch.zeros(1, dtype=torch.long, device=device)
    with torch.inference_mode():
        token.copy_(model(prompt, start=0)[:, -1].argmax(-1, keepdim=True))
        # The static step agrees with the eager forward (which reads the same cache).
        position.fill_(prompt_len)
        eager = model(token, start=prompt_len)[:, -1]
        compile_start = time.perf_counter()
        static = step(model, token, position)
        compile_s = time.perf_counter() - compile_start
        agreement = ((static - eager).norm() / eager.norm()).item()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(model, token, position)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step(model, token, position)
        for _ in range(3):  # warm-up replays
            graph.replay()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(new_tokens):
            position.fill_(prompt_len + i)
            graph.replay()
            token.copy_(logits.argmax(-1, keepdim=True))  # greedy; stays on the GPU
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    model.drop_cache()
    return {"decode_tok_s": new_tokens / seconds, "ms_per_token": 1e3 * seconds / new_tokens,
            "static_vs_eager_rel_diff": agreement, "first_step_seconds": compile_s}


def weight_bytes(model) -> int:
    """Bytes of the parameters and buffers a decode step reads (weights; the KV cache excluded)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "kv_cache" not in name and name != "embed.weight":
            total += t.numel() * t.element_size()
    return total


def run_cuda(args):
    props = torch.cuda.get_device_properties(0)
    prompt_len, new_tokens = (16, 32) if args.quick else (16, 128)
    rows = []
    for name, bits in CUDA_VARIANTS:
        if args.variants and name not in args.variants:
            continue
        start = time.perf_counter()
        model = random_model(bits)
        build_s = time.perf_counter() - start
        torch.cuda.synchronize()
        row = {"variant": name, "build_seconds": build_s, "weights_GB": weight_bytes(model) / 1e9,
               **cuda_decode_speed(model, prompt_len, new_tokens, args.compile)}
        row["weights_GB_per_s"] = row["weights_GB"] * row["decode_tok_s"]
        rows.append(row)
        print(name, f"decode {row['decode_tok_s']:.1f} tok/s ({row['ms_per_token']:.2f} ms/token), weights "
              f"{row['weights_GB']:.2f} GB read at {row['weights_GB_per_s']:.0f} GB/s; static step vs eager "
              f"{row['static_vs_eager_rel_diff']:.1e}", flush=True)
        del model
        torch.cuda.empty_cache()
    base = rows[0]["decode_tok_s"]
    lines = [f"GPU: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}; LLaMA-2-7B-shaped model with "
             f"random weights, batch 1, {prompt_len}-token prompt, {new_tokens} new tokens, each decode step one "
             f"CUDA graph{', torch.compile' if args.compile else ''}; group size {CUDA_GROUP_SIZE}, "
             "output head float16", "",
             "| variant | decode tok/s | ms/token | vs float16 | weights GB | weights GB/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['decode_tok_s']:.1f} | {r['ms_per_token']:.2f} | "
                     f"{r['decode_tok_s'] / base:.2f}x | {r['weights_GB']:.2f} | {r['weights_GB_per_s']:.0f} |")
    table = "\n".join(lines) + "\n"
    stem = "generate_cuda_compiled" if args.compile else "generate_cuda"
    out = Path(args.out or Path(__file__).parent / "results" / stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"device": props.name, "compiled": args.compile,
                                                    "prompt_tokens": prompt_len,
                                                    "new_tokens": new_tokens, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print()
    print(table)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model's forward first")
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
