"""Quality of int4 and int3.5 on SmolLM2-135M-Instruct against float: perplexity, per-layer RMSE, size, time.

Evaluation perplexity on held-out text (lowbit.data, evaluation split) for float32, int4 RTN / AWQ and
int3.5 RTN / AWQ (plain alternating layout and saliency order), at group sizes 128 (576 columns padded
to 640, as docs/FORMAT.md says) and 64.

    python benchmarks/bench_quality.py           # writes benchmarks/results/quality_smollm2.{json,md}
    python benchmarks/bench_quality.py --quick   # group size 64 only, fewer tokens
"""

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

import lowbit
from lowbit import data
from lowbit.awq import quantize_llama_awq
from lowbit.eval import model_bytes, perplexity, rmse_report

VARIANTS = [  # name, bits, method, saliency order
    ("int4 RTN", 4, "rtn", False),
    ("int4 AWQ", 4, "awq", False),
    ("int3.5 RTN", 3.5, "rtn", False),
    ("int3.5 AWQ", 3.5, "awq", False),
    ("int3.5 AWQ + saliency order", 3.5, "awq", True),
]


def quantize(model, bits, group_size, method, saliency, calib):
    if method == "rtn":
        return lowbit.quantize_model(model, bits, group_size, inplace=False)
    return quantize_llama_awq(copy.deepcopy(model), bits, group_size, calib, saliency_order=saliency, progress=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--calib-samples", type=int, default=8, help="calibration sequences of 512 tokens")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quality_smollm2")
    args = parser.parse_args()
    group_sizes = [64] if args.quick else [128, 64]
    eval_tokens = 2048 if args.quick else args.eval_tokens

    torch.manual_seed(0)
    model = lowbit.LlamaForCausalLM.from_pretrained(lowbit.fetch("smollm2"))
    tok = model.tokenizer
    calib = data.calibration_tokens(tok, n_samples=args.calib_samples, seq_len=512)
    ids = data.evaluation_tokens(tok, max_tokens=eval_tokens + 1)
    rmse_ids = data.evaluation_tokens(tok, max_tokens=1024).view(2, 512)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, lowbit CPU kernels " \
              f"'{lowbit.cpu_isa()}', torch {torch.__version__}"
    float_ppl = perplexity(model, ids, progress=False)
    rows = [{"variant": "float32", "group_size": None, "perplexity": float_ppl, "ppl_increase": 0.0,
             "model_mb": model_bytes(model) / 1e6, "bits_per_weight": 32.0, "quantize_seconds": 0.0}]
    print(f"float32: perplexity {float_ppl:.3f} on {eval_tokens} tokens")
    for group_size in group_sizes:
        for name, bits, method, saliency in VARIANTS:
            start = time.perf_counter()
            q = quantize(model, bits, group_size, method, saliency, calib)
            seconds = time.perf_counter() - start
            report = rmse_report(model, q, rmse_ids, baselines=(3, 4), progress=False).totals
            ppl = perplexity(q, ids, progress=False)
            rows.append({"variant": name, "group_size": group_size, "perplexity": ppl, "ppl_increase": ppl - float_ppl,
                         "model_mb": report["model_mb"], "bits_per_weight": report["bits_per_weight"],
                         "quantize_seconds": seconds, "weight_rel_rmse": report["weight_rel_rmse"],
                         "output_rel_rmse": report["output_rel_rmse"],
                         "output_rel_rmse_uniform3": report["output_rel_rmse_uniform3"],
                         "output_rel_rmse_uniform4": report["output_rel_rmse_uniform4"]})
            print(f"{name} g{group_size}: perplexity {ppl:.3f}, {report['bits_per_weight']:.2f} bits/weight, "
                  f"output rel. RMSE {report['output_rel_rmse']:.4f}, {seconds:.1f} s", flush=True)

    lines = [f"SmolLM2-135M-Instruct, perplexity on {eval_tokens} held-out tokens (lowbit.data evaluation split, "
             f"windows of 512); AWQ calibration {args.calib_samples} x 512 tokens. Machine: {machine}.", "",
             "| variant | group | perplexity | increase vs float | model MB | bits/weight (linears) | "
             "out rel. RMSE | uniform 3-bit | uniform 4-bit | quantize s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = [f"{r[k]:.4f}" if k in r else "" for k in ("output_rel_rmse", "output_rel_rmse_uniform3",
                                                            "output_rel_rmse_uniform4")]
        lines.append(f"| {r['variant']} | {r['group_size'] or ''} | {r['perplexity']:.2f} | {r['ppl_increase']:+.2f} | "
                     f"{r['model_mb']:.1f} | {r['bits_per_weight']:.2f} | {' | '.join(extra)} | "
                     f"{r['quantize_seconds']:.0f} |")
    lines += ["", "out rel. RMSE: every quantized layer on the float model's activations (1024 held-out tokens), "
              "squared errors pooled over layers; uniform 3/4-bit: reference-only quantizers with the same groups. "
              "model MB: the in-memory model (embeddings, tied to the output head, stay float32)."]
    for group_size in group_sizes:
        inc = {r["variant"]: r["ppl_increase"] for r in rows if r["group_size"] == group_size}
        lines.append(f"\nGroup size {group_size}: int4 AWQ's perplexity increase is "
                     f"{100 * inc['int4 AWQ'] / inc['int4 RTN']:.0f}% of int4 RTN's (target <= 50%); int3.5 AWQ with "
                     f"saliency order {inc['int3.5 AWQ + saliency order']:+.2f} vs int4 RTN {inc['int4 RTN']:+.2f} "
                     f"(target: not more); saliency order vs plain int3.5 AWQ "
                     f"{inc['int3.5 AWQ + saliency order'] - inc['int3.5 AWQ']:+.2f} perplexity.")
    table = "\n".join(lines)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "eval_tokens": eval_tokens,
                                                         "calib_samples": args.calib_samples, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
