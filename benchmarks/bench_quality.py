"""Quality of int4, int3.5 and int8 on SmolLM2-135M-Instruct against float: perplexity, per-layer RMSE, size, time.

Every method (RTN, AWQ, GPTQ, AWQ+GPTQ) x format (int4, int3.5, int8; the calibrated methods use the saliency
channel order for int3.5) x group size (128: SmolLM2's 576 columns padded to 640, as docs/FORMAT.md says; 64), the
output head float; beside them llama.cpp's K-quants and Q4_0/Q8_0 of the same float weights when llama_cpp
(llama-cpp-python) is importable (benchmarks/llama_cpp_peer.py). Perplexity on two held-out sets of lowbit.data's evaluation split, windows of 512: its first 4,097
tokens (the set of issue 19's targets) and its first --eval-tokens + 1 (default 16,385).

SmolLM2's "float" weights are the dequantized Q4_1 GGUF it ships as, so int4 with group size 32 (asymmetric)
reproduces them exactly; every table says so.

    python benchmarks/bench_quality.py             # writes benchmarks/results/quality_smollm2.{json,md}
    python benchmarks/bench_quality.py --quick     # int4 and int3.5, group size 64 only, 2048 tokens for the second set
    python benchmarks/bench_quality.py --ablations # GPTQ settings (damping, act-order, block size, calibration
                                                   # size, clipping) -> results/quality_smollm2_gptq_ablations.*
    python benchmarks/bench_quality.py --budgets 3.75 4 4.25 4.5 --methods rtn
                                                   # bits-per-weight budgets (lowbit.budget chooses each linear's
                                                   # format) -> results/quality_smollm2_budget.*
"""

import argparse
import copy
import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch

import lowbit
from lowbit import data, formats
from lowbit.budget import describe, format_table, model_formats
from lowbit.eval import model_bytes, perplexity, rmse_report
from lowbit.calibration import GPTQ, quantize_blocks
from lowbit.io.fetch import cache_dir

import llama_cpp_peer

TARGET_TOKENS = 4097  # issue 19's evaluation set: the first 4,097 tokens, 8 windows of 512
METHODS = {"rtn": "RTN", "awq": "AWQ", "gptq": "GPTQ", "awq+gptq": "AWQ+GPTQ"}
TARGETS = {4: 16.81, 3.5: 18.06}  # group size 64, best method: llama.cpp Q4_K_S and Q3_K_M (issue 19)
INT8_TARGET = 0.005               # int8 g128: perplexity within 0.5 % of float (issue 19)
# llama.cpp's quantizer on the same float weights (no importance matrix), when llama_cpp is importable.
LLAMA_CPP_TYPES = ["q4_k_m", "q4_k_s", "q3_k_m", "iq4_xs", "q4_0", "q3_k_s", "q8_0"]
CAVEAT = ("The float weights are SmolLM2's dequantized Q4_1 GGUF (group-32 asymmetric 4-bit), so int4 with group "
          "size 32 would reproduce them exactly: these numbers measure re-quantizing already 4-bit weights.")
# GPTQ settings tried against the defaults (damp 0.01, 8 x 512 calibration, AWQ's clipping, the grid search weighted
# by the inputs' energy, no act-order), at group size 64, most telling first: name, bits, calibration sequences,
# lowbit.calibration.GPTQ options (and the calibration windows' seed, default 0).
ABLATIONS = [("GPTQ act-order", 4, 8, {"act_order": "order"}),
             ("GPTQ act-order", 4, 32, {"act_order": "order"}),
             ("GPTQ act-order", 3.5, 8, {"act_order": "order"}),
             ("GPTQ act-order", 3.5, 32, {"act_order": "order"}),
             ("AWQ+GPTQ no clipping", 4, 8, {"awq": True, "clip": False}),
             # Other calibration windows of the same size (calib_seed: lowbit.data.calibration_tokens's seed): how
             # far the result moves with nothing but the sample.
             ("GPTQ act-order", 4, 8, {"act_order": "order", "calib_seed": 1}),
             ("GPTQ act-order", 4, 8, {"act_order": "order", "calib_seed": 2}),
             # Before the weighted grid (measured with the grid search of round-to-nearest): act-order with and
             # without a stored permutation, damping, clipping, calibration size and sample.
             ("AWQ+GPTQ act-order perm, unweighted grid", 4, 8,
              {"awq": True, "act_order": "perm", "weighted_grid": False}),
             ("AWQ+GPTQ act-order perm, unweighted grid", 4, 32,
              {"awq": True, "act_order": "perm", "weighted_grid": False}),
             ("GPTQ act-order perm, unweighted grid", 4, 8, {"act_order": "perm", "weighted_grid": False}),
             ("AWQ+GPTQ act-order, unweighted grid", 4, 8,
              {"awq": True, "act_order": "order", "weighted_grid": False}),
             ("AWQ+GPTQ act-order, unweighted grid", 4, 32,
              {"awq": True, "act_order": "order", "weighted_grid": False}),
             ("GPTQ act-order, unweighted grid", 4, 8, {"act_order": "order", "weighted_grid": False}),
             ("GPTQ act-order, unweighted grid", 4, 32, {"act_order": "order", "weighted_grid": False}),
             ("GPTQ act-order, unweighted grid", 3.5, 8, {"act_order": "order", "weighted_grid": False}),
             ("AWQ+GPTQ damp 0.1, unweighted grid", 4, 8, {"awq": True, "damp": 0.1, "weighted_grid": False}),
             ("GPTQ, unweighted grid", 3.5, 32, {"weighted_grid": False}),
             ("AWQ+GPTQ, unweighted grid", 3.5, 32, {"awq": True, "weighted_grid": False}),
             ("AWQ+GPTQ no clipping, unweighted grid", 3.5, 8, {"awq": True, "clip": False, "weighted_grid": False}),
             ("AWQ+GPTQ, unweighted grid", 4, 8, {"awq": True, "weighted_grid": False, "calib_seed": 1}),
             ("AWQ+GPTQ, unweighted grid", 4, 8, {"awq": True, "weighted_grid": False, "calib_seed": 2}),
             ("GPTQ, unweighted grid", 3.5, 8, {"weighted_grid": False, "calib_seed": 1}),
             ("GPTQ, unweighted grid", 3.5, 8, {"weighted_grid": False, "calib_seed": 2})]


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, lowbit CPU kernels "
            f"'{lowbit.cpu_isa()}', torch {torch.__version__}")


def evaluate(model, q, sets, rmse_ids) -> dict:
    report = rmse_report(model, q, rmse_ids, progress=False).totals
    return {"bits_per_weight": report["bits_per_weight"], "model_mb": report["model_mb"],
            "weight_rel_rmse": report["weight_rel_rmse"], "output_rel_rmse": report["output_rel_rmse"]} | {
        f"perplexity_{n}": perplexity(q, ids, progress=False) for n, ids in sets.items()}


def method_table(rows: list[dict], group_sizes, bits_list, methods, big: str) -> list[str]:
    float_row, small = rows[0], f"perplexity_{TARGET_TOKENS}"
    n_big = big.split("_")[1]
    sets = [small] + ([big] if big != small else [])  # --eval-tokens 4096: the target set only
    columns = " | ".join(f"perplexity ({k.split('_')[1]})" for k in sets)
    lines = [f"| variant | group | bits/weight (linears) | {columns} | increase vs float ({n_big}) | model MB | "
             "out rel. RMSE | quantize s |",
             "|---" * (7 + len(sets)) + "|"]
    order = {key: i for i, key in enumerate((g, b, m) for g in group_sizes for b in bits_list for m in METHODS)}
    for r in rows[:1] + sorted(rows[1:], key=lambda r: order[r["group_size"], r["bits"], r["method"]]):
        rmse = f"{r['output_rel_rmse']:.4f}" if "output_rel_rmse" in r else ""
        lines.append(f"| {r['variant']} | {r['group_size'] or ''} | {r['bits_per_weight']:.2f} | "
                     + " | ".join(f"{r[k]:.2f}" for k in sets) + f" | {r[big] - float_row[big]:+.2f} | "
                     f"{r['model_mb']:.1f} | {rmse} | {r['quantize_seconds']:.0f} |")
    lines += ["", "bits/weight: bytes of the quantized linear layers (codes, float16 scales and zeros, int3.5's "
              "permutation) x 8 / their weights. out rel. RMSE: every quantized layer on the float model's "
              "activations (1024 held-out tokens), squared errors pooled over layers. model MB: the in-memory model "
              "(the embedding, tied to the output head, stays float32)."]
    by = {(r["bits"], r["method"], r["group_size"]): r for r in rows[1:]}
    for group_size in group_sizes:
        for bits in bits_list:
            found = {m: by[bits, m, group_size] for m in methods if (bits, m, group_size) in by}
            if not found:
                continue
            best = min(found, key=lambda m: found[m][small])
            line = (f"\nint{bits:g} g{group_size}: best method {METHODS[best]}, {found[best][small]:.2f} on the "
                    f"{TARGET_TOKENS}-token set")
            if bits == 8:
                increase = found[best][small] / float_row[small] - 1
                line += (f", {100 * increase:+.2f} % vs float" + (
                    f" (target <= {100 * INT8_TARGET:g} % at g128: {'met' if increase <= INT8_TARGET else 'missed'})"
                    if group_size == 128 else ""))
            elif group_size == 64:
                target = TARGETS[bits]
                line += (f" (target <= {target}: {'met' if found[best][small] <= target else 'missed'} by "
                         f"{abs(found[best][small] - target):.2f})")
            if "awq" in found and "awq+gptq" in found:
                a, b = found["awq"], found["awq+gptq"]
                line += (f"; AWQ+GPTQ vs AWQ {b[small] - a[small]:+.2f} ({TARGET_TOKENS} tokens), "
                         f"{b[big] - a[big]:+.2f} ({n_big} tokens)")
            lines.append(line + ".")
    return lines


def llama_cpp_table(rows: list[dict], float_row: dict, big: str) -> list[str]:
    small = f"perplexity_{TARGET_TOKENS}"
    sets = [small] + ([big] if big != small else [])
    columns = " | ".join(f"perplexity ({k.split('_')[1]})" for k in sets)
    lines = ["", f"llama.cpp {rows[0]['version']} on the same float weights (its converter to F32, then its quantizer, "
             "no importance matrix), the same evaluation tokens and windows:", "",
             f"| llama.cpp | bits/weight (linears) | {columns} | increase vs float ({big.split('_')[1]}) | "
             "linear tensor types | quantize s |", "|---" * (5 + len(sets)) + "|"]
    for r in rows:
        types = ", ".join(f"{t} x{c}" for t, c in r["linear_types"].items())
        lines.append(f"| {r['variant']} | {r['bits_per_weight']:.2f} | " + " | ".join(f"{r[k]:.2f}" for k in sets)
                     + f" | {r[big] - float_row[big]:+.2f} | {types} | {r['quantize_seconds']:.0f} |")
    return lines + ["", "bits/weight (linears): the bytes of the decoder blocks' q/k/v/o/gate/up/down tensors in the "
                    "GGUF file x 8 / their weights, as lowbit's rows count them. SmolLM2's 576-wide rows are not a "
                    "multiple of the K-quants' 256-column super-blocks, so llama.cpp stores many tensors in a "
                    "fallback type (the types column)."]


def run_llama_cpp(types: list[str], sets: dict) -> list[dict]:
    """llama.cpp rows: each GGUF type made from SmolLM2's float directory, perplexity on the same token sets."""
    cache = cache_dir() / "llama_cpp"
    source = llama_cpp_peer.llama_cpp_source(cache)
    model_dir = lowbit.fetch("smollm2")
    rows = []
    for t in types:
        start = time.perf_counter()
        path = llama_cpp_peer.gguf_file(model_dir, t, cache, source)
        seconds = time.perf_counter() - start  # 0 when the file was cached
        summary = llama_cpp_peer.gguf_summary(path)
        rows.append({"variant": t.upper(), "gguf": str(path), "version": llama_cpp_peer.import_llama_cpp().__version__,
                     "bits_per_weight": summary["linear_bits_per_weight"], "linear_types": summary["linear_types"],
                     "quantize_seconds": seconds}
                    | {f"perplexity_{n}": llama_cpp_peer.llama_cpp_perplexity(path, ids[0].tolist(),
                                                                             torch.get_num_threads())
                       for n, ids in sets.items()})
        print(f"llama.cpp {t}: perplexity " + " / ".join(f"{v:.3f}" for k, v in rows[-1].items()
                                                       if k.startswith("perplexity")), flush=True)
    return rows


def budget_table(rows: list[dict], big: str, uniform: list[dict]) -> list[str]:
    """The budget rows, each with the uniform group-size-64 rows of its method (from quality_smollm2.json) to
    compare with, and the formats each budget chose."""
    float_row, small = rows[0], f"perplexity_{TARGET_TOKENS}"
    sets = [small] + ([big] if big != small else [])
    columns = " | ".join(f"perplexity ({k.split('_')[1]})" for k in sets)
    lines = [f"| variant | group | bits/weight (linears) | {columns} | increase vs float ({big.split('_')[1]}) | "
             "model MB | out rel. RMSE | quantize s | linears per format |", "|---" * (8 + len(sets)) + "|"]
    for r in rows:
        counts = ", ".join(f"{f} x{c}" for f, c in r.get("formats", {}).items())
        rmse = f"{r['output_rel_rmse']:.4f}" if "output_rel_rmse" in r else ""
        lines.append(f"| {r['variant']} | {r.get('group_size') or ('chosen' if counts else '')} | "
                     f"{r['bits_per_weight']:.2f} | " + " | ".join(f"{r[k]:.2f}" for k in sets)
                     + f" | {r[big] - float_row[big]:+.2f} | {r['model_mb']:.1f} | {rmse} | "
                     f"{r['quantize_seconds']:.0f} | {counts} |")
    lines += ["", "bits/weight: as in quality_smollm2.md (real bytes of the quantized linears: codes, float16 scales "
              "and zeros, int3.5's permutation; the head is float and outside the budget). Budget rows: lowbit.budget "
              "chose each decoder linear's format and group size from {int3.5, int4, int8} x {32, 64, 128, 256} on "
              "the calibration tokens; int3.5 uses the saliency channel order with the calibrated methods. "
              "Uniform rows: quality_smollm2.json (same calibration and evaluation tokens)."]
    by = {(r["bits"], r["method"]): r for r in uniform if r.get("group_size") == 64}
    for r in rows[1:]:
        if r.get("budget") is None:
            continue
        line = f"\n{r['variant']}: {r[small]:.2f} at {r['bits_per_weight']:.2f} bits/weight"
        for bits in (4, 3.5):
            u = by.get((bits, r["method"]))
            if u:
                line += (f"; uniform int{bits:g} g64 {METHODS[r['method']]} {u[small]:.2f} at "
                         f"{u['bits_per_weight']:.2f} ({r[small] - u[small]:+.2f})")
        low, high = by.get((3.5, r["method"])), by.get((4, r["method"]))
        if low and high and low["bits_per_weight"] < r["bits_per_weight"] < high["bits_per_weight"]:
            # Equal size: the straight line between the two uniform formats, which mixing them layer by layer
            # would follow if each layer's share of the error were the same.
            t = (r["bits_per_weight"] - low["bits_per_weight"]) / (high["bits_per_weight"] - low["bits_per_weight"])
            line_value = low[small] + t * (high[small] - low[small])
            line += (f"; the line between them at {r['bits_per_weight']:.2f}: {line_value:.2f} "
                     f"({r[small] - line_value:+.2f})")
        if r["budget"] == 4.25:
            line += (f"; issue 19's target <= {TARGETS[3.5]}: {'met' if r[small] <= TARGETS[3.5] else 'missed'} by "
                     f"{abs(r[small] - TARGETS[3.5]):.2f}")
        lines.append(line + ".")
    for r in rows[1:]:
        if "format_map" in r:
            lines += ["", f"Formats chosen for {r['variant']}:", "",
                      format_table({n: (f["bits"], f["group_size"]) for n, f in r["format_map"].items()})]
    return lines


def ablation_table(rows: list[dict], big: str) -> list[str]:
    float_row, small = rows[0], f"perplexity_{TARGET_TOKENS}"
    lines = [f"| format | variant | group | calibration | bits/weight | perplexity ({TARGET_TOKENS}) | "
             f"perplexity ({big.split('_')[1]}) | out rel. RMSE | quantize s |", "|---" * 9 + "|"]
    for r in rows[1:]:
        seed = f" (seed {r['calib_seed']})" if r.get("calib_seed") else ""
        lines.append(f"| int{r['bits']:g} | {r['variant']} | {r['group_size']} | {r['calib_samples']} x 512{seed} | "
                     f"{r['bits_per_weight']:.3f} | {r[small]:.2f} | {r[big]:.2f} | {r['output_rel_rmse']:.4f} | "
                     f"{r['quantize_seconds']:.0f} |")
    return lines + [f"\nfloat32: {float_row[small]:.2f} / {float_row[big]:.2f}. The defaults' rows are in "
                    "quality_smollm2.md (same calibration and evaluation tokens)."]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="tokens of the second (larger) set")
    parser.add_argument("--calib-samples", type=int, default=8, help="calibration sequences of 512 tokens")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--bits", nargs="+", type=float, choices=[4, 3.5, 8],
                        help="formats (default: 4 3.5 8; with --quick 4 3.5)")
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[64, 128], choices=[32, 64, 128, 256])
    parser.add_argument("--ablations", nargs="*", type=int, help="GPTQ settings instead of the method table: "
                        "all of ABLATIONS, or those of the given indices")
    parser.add_argument("--merge", nargs="+", type=Path, help="merge the JSON results of parallel runs (same "
                        "calibration and evaluation tokens, one float row) into --out, instead of measuring")
    parser.add_argument("--budgets", nargs="+", type=float, help="bits-per-weight budgets (with each of --methods) "
                        "instead of the method table")
    parser.add_argument("--act-order", action="store_true", help="budgets: GPTQ's methods round in act-order")
    parser.add_argument("--llama-cpp-types", nargs="+", default=LLAMA_CPP_TYPES,
                        help="llama.cpp GGUF types of the same float weights (method table, when llama_cpp is "
                        "importable)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out even when importable")
    parser.add_argument("--out", type=Path, help="output path without extension (default: benchmarks/results/...)")
    args = parser.parse_args()
    group_sizes = [64] if args.quick else args.group_sizes
    args.bits = args.bits or ([4, 3.5] if args.quick else [4, 3.5, 8])
    eval_tokens = 2048 if args.quick else args.eval_tokens
    results = Path(__file__).parent / "results"
    ablating = args.ablations is not None
    out = args.out or results / ("quality_smollm2_gptq_ablations" if ablating else
                                 "quality_smollm2_budget" if args.budgets else "quality_smollm2")

    kind = "ablations" if ablating else "budgets" if args.budgets else "methods"
    uniform = json.loads((results / "quality_smollm2.json").read_text())["rows"] if args.budgets else []
    if args.merge:
        return merge(args.merge, out, uniform)

    torch.manual_seed(0)
    model = lowbit.LlamaForCausalLM.from_pretrained(lowbit.fetch("smollm2"))
    tok = model.tokenizer
    ablations = [(name, bits, n, options.get("calib_seed", 0),
                  {k: v for k, v in options.items() if k != "calib_seed"})
                 for i, (name, bits, n, options) in enumerate(ABLATIONS) if not args.ablations or i in args.ablations]
    calib = {(n, seed): data.calibration_tokens(tok, n_samples=n, seq_len=512, seed=seed)
             for n, seed in {(args.calib_samples, 0)} | {(a[2], a[3]) for a in ablations if ablating}}
    sets = {n: data.evaluation_tokens(tok, max_tokens=n) for n in sorted({TARGET_TOKENS, eval_tokens + 1})}
    rmse_ids = data.evaluation_tokens(tok, max_tokens=1024).view(2, 512)
    small, big = f"perplexity_{TARGET_TOKENS}", f"perplexity_{eval_tokens + 1}"
    rows = [{"variant": "float32", "bits": None, "method": None, "group_size": None, "bits_per_weight": 32.0,
             "model_mb": model_bytes(model) / 1e6, "quantize_seconds": 0.0}
            | {f"perplexity_{n}": perplexity(model, ids, progress=False) for n, ids in sets.items()}]
    print(f"float32: perplexity {rows[0][small]:.3f} / {rows[0][big]:.3f}", flush=True)
    head = [f"SmolLM2-135M-Instruct; perplexity on lowbit.data's held-out evaluation split, windows of 512: its first "
            f"{TARGET_TOKENS} tokens (issue 19's set) and its first {eval_tokens + 1}. Calibration: "
            f"{args.calib_samples} x 512 tokens of the calibration split unless a row says otherwise; output head "
            f"float; int3.5 with AWQ and GPTQ in the saliency channel order. Machine: {machine()}.", "", CAVEAT, ""]

    if ablating:  # name, bits, calibration sequences, GPTQ options; group size 64
        jobs = [(name, bits, 64, n, lambda bits, g, key=(n, seed), options=options: quantize_blocks(
                    copy.deepcopy(model), GPTQ(bits, g, **options), calib[key], progress=False),
                 {"options": options, "calib_seed": seed})
                for name, bits, n, seed, options in ablations]
    elif args.budgets:  # the budget in the bits column, no group size: each linear's format is chosen
        ordered = {m: args.act_order and m in formats.GPTQ_METHODS for m in args.methods}
        jobs = [(f"budget {b:g} {METHODS[m]}" + (" act-order" if ordered[m] else ""), b, None, args.calib_samples,
                 lambda b, _, m=m: lowbit.quantize_model(
                    model, bits_per_weight=b, method=m, calib=calib[args.calib_samples, 0],
                    inplace=False, progress=False, act_order=ordered[m]),
                 {"method": m, "budget": b, "act_order": ordered[m]})
                for b in args.budgets for m in args.methods]
    else:
        jobs = [(f"int{bits:g} {METHODS[m]}", bits, g, args.calib_samples, lambda bits, g, m=m: lowbit.quantize_model(
                    model, bits, g, method=m, calib=calib[args.calib_samples, 0], inplace=False),
                 {"method": m})
                for g in group_sizes for bits in args.bits for m in args.methods]
    peer = []
    if not (ablating or args.budgets or args.no_llama_cpp) and llama_cpp_peer.available():
        peer = run_llama_cpp(args.llama_cpp_types, sets)
    for name, bits, group_size, n_calib, quantize, extra in jobs:
        start = time.perf_counter()
        q = quantize(bits, group_size)
        seconds = time.perf_counter() - start
        rows.append({"variant": name, "bits": bits, "group_size": group_size, "calib_samples": n_calib,
                     "quantize_seconds": seconds} | extra | evaluate(model, q, sets, rmse_ids))
        if args.budgets:
            chosen = model_formats(q)
            rows[-1] |= {"bits": None, "formats": {describe(f): c for f, c in Counter(chosen.values()).most_common()},
                         "format_map": {n: {"bits": b, "group_size": g} for n, (b, g) in chosen.items()}}
        r = rows[-1]
        print(f"{name} g{group_size}: perplexity {r[small]:.3f} / {r[big]:.3f}, {r['bits_per_weight']:.3f} "
              f"bits/weight, output rel. RMSE {r['output_rel_rmse']:.4f}, {seconds:.1f} s", flush=True)
        # Written after every row, so that an interrupted run keeps what it measured.
        write_results(out, {"machine": machine(), "eval_tokens": eval_tokens, "caveat": CAVEAT, "kind": kind,
                            "head": head, "rows": rows, "llama_cpp": peer}, uniform)
    print("\n" + out.with_suffix(".md").read_text())


def write_results(out: Path, result: dict, uniform: list[dict]):
    """out.json (result) and out.md, the table of result["kind"]: "methods", "ablations" or "budgets"."""
    rows, peer, kind = result["rows"], result["llama_cpp"], result["kind"]
    big = f"perplexity_{result['eval_tokens'] + 1}"
    if kind == "ablations":
        table = ablation_table(rows, big)
    elif kind == "budgets":
        table = budget_table(rows, big, uniform)
    else:
        present = rows[1:]
        table = method_table(rows, sorted({r["group_size"] for r in present}, key=lambda g: (g != 64, g)),
                             [b for b in (4, 3.5, 8) if any(r["bits"] == b for r in present)],
                             [m for m in METHODS if any(r["method"] == m for r in present)], big)
        table += llama_cpp_table(peer, rows[0], big) if peer else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text("\n".join(result["head"] + table) + "\n")


def merge(paths: list[Path], out: Path, uniform: list[dict]):
    """One table from the JSON results of parallel runs of this script on the same tokens (their float rows agree)."""
    parts = [json.loads(p.read_text()) for p in paths]
    first = parts[0]
    for p, part in zip(paths, parts):
        if part["kind"] != first["kind"] or part["eval_tokens"] != first["eval_tokens"] or \
                part["rows"][0] != first["rows"][0]:
            raise ValueError(f"{p}: not a parallel run of {paths[0]} (kind, evaluation tokens or float row differ)")
    # A part may itself be a merge: its own parts are listed, and its note replaced by the new one.
    sources = [s for p, part in zip(paths, parts) for s in part.get("merged_from", [str(p)])]
    note = (f"Merged from {len(sources)} parallel runs of this script on the same calibration and evaluation tokens "
            f"({', '.join(Path(s).stem for s in sources)}).")
    head = first["head"]
    if "merged_from" in first:  # drop the first part's note and the blank line after it
        i = next(i for i, line in enumerate(head) if line.startswith("Merged from"))
        head = head[:i] + head[i + 2:]
    result = first | {"head": head + [note, ""],
                      "rows": first["rows"][:1] + [r for part in parts for r in part["rows"][1:]],
                      "llama_cpp": [r for part in parts for r in part["llama_cpp"]], "merged_from": sources}
    write_results(out, result, uniform)
    print(out.with_suffix(".md").read_text())

if __name__ == "__main__":
    main()
