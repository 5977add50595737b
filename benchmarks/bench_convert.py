"""Converter time and memory: a LLaMA-7B-shaped float16 checkpoint (random weights, written to disk
here) converted to int4 and int3.5 with RTN, then loaded. Each step runs in its own process, so peak
RSS (ru_maxrss) is that step's own.

    python benchmarks/bench_convert.py                 # writes benchmarks/results/convert_cpu.{json,md}
    python benchmarks/bench_convert.py --layers 4      # a shorter model, same layer shapes
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", torch_dtype="float16")


def write_random_checkpoint(out: Path, config: dict) -> None:
    """One safetensors shard per decoder layer, so that writing needs one layer of memory."""
    out.mkdir(parents=True)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()
    weight_map = {}

    def shard(name, tensors):
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    shard("embed.safetensors", {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": torch.ones(h).half(),
                                "lm_head.weight": rand(v, h)})
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shard(f"layer-{i:03d}.safetensors", {
            **{f"{p}self_attn.{n}_proj.weight": rand(h, h) for n in "qkvo"},
            f"{p}mlp.gate_proj.weight": rand(f, h), f"{p}mlp.up_proj.weight": rand(f, h),
            f"{p}mlp.down_proj.weight": rand(h, f),
            f"{p}input_layernorm.weight": torch.ones(h).half(),
            f"{p}post_attention_layernorm.weight": torch.ones(h).half()})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))


def run_measured(code: str) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of `python -c code` in a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        raise RuntimeError(f"child failed ({status}): {code}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024 / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lowbit-bench-convert"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "convert_cpu")
    args = parser.parse_args()
    config = LLAMA_7B | {"num_hidden_layers": args.layers}
    shutil.rmtree(args.workdir, ignore_errors=True)
    src = args.workdir / "float16"
    start = time.perf_counter()
    write_random_checkpoint(src, config)
    src_gb = sum(p.stat().st_size for p in src.iterdir()) / 1e9
    print(f"wrote a {args.layers}-layer LLaMA-7B-shaped float16 checkpoint ({src_gb:.2f} GB) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    rows = []
    for bits in (4, 3.5):
        out = args.workdir / f"int{bits:g}"
        seconds, rss = run_measured(f"import lowbit; lowbit.convert({str(src)!r}, {str(out)!r}, bits={bits}, "
                                    f"group_size=128, progress=False)")
        out_gb = sum(p.stat().st_size for p in out.iterdir()) / 1e9
        load = f"import lowbit; lowbit.load_quantized({str(out)!r}, dtype=__import__('torch').float16"
        load_s, load_rss = run_measured(load + ")")
        verify_s, _ = run_measured(load + ", verify=True)")
        rows.append({"format": f"int{bits:g}", "group_size": 128, "convert_seconds": seconds,
                     "convert_peak_rss_gb": rss,
                     "output_gb": out_gb, "load_seconds": load_s, "load_peak_rss_gb": load_rss,
                     "load_verify_seconds": verify_s})
        print(rows[-1], flush=True)
        shutil.rmtree(out)
    shutil.rmtree(args.workdir, ignore_errors=True)
    lines = [f"Converter, LLaMA-7B-shaped float16 checkpoint ({args.layers} layers, {src_gb:.2f} GB, random weights), "
             f"RTN, group size 128. Machine: {machine}. Each step in its own process; peak RSS = ru_maxrss.", "",
             "| format | convert s | convert peak RSS GB | output GB | load s (float16) | load peak RSS GB "
             "| load s (verify=True) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['convert_seconds']:.0f} | {r['convert_peak_rss_gb']:.2f} | {r['output_gb']:.2f} | "
              f"{r['load_seconds']:.1f} | {r['load_peak_rss_gb']:.2f} | {r['load_verify_seconds']:.1f} |" for r in rows]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "layers": args.layers,
                                                         "source_gb": src_gb, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
