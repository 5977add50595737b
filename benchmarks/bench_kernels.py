"""Kernel benchmark: lowbit int4 / int3.5 / int8 linear vs F.linear, on the CPU (float32, bfloat16) or a CUDA GPU
(float16, cuBLAS; int4 and int3.5, the formats with a CUDA tile layout).

LLaMA-7B layer shapes, several activation row counts M. Decode configurations (on the CPU M <= 8; on
CUDA every M) rotate through enough distinct weight matrices that the working set is at least 4x the
last-level cache (the GPU's L2), as in a real decode step where every layer's weights come from DRAM.
The machine's copy bandwidth is measured in the same run; effective bandwidth counts the bytes the kernel
must read (weights + activations).

    python benchmarks/bench_kernels.py            # full run, writes benchmarks/results/kernels_cpu.{json,md}
    python benchmarks/bench_kernels.py --quick    # one shape, three M values, under a minute
    python benchmarks/bench_kernels.py --device cuda [--quick]   # writes benchmarks/results/kernels_cuda.*

On CUDA, calls are timed with CUDA events around replays of a CUDA graph of the rotating calls, after
warm-up, so that the time is the kernels' and not the Python launch overhead; bytes also count the
output, and the reference is F.linear in float16 (cuBLAS) on the same rotation of float16 weights.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lowbit
from lowbit import formats, tiled

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N out, K in): q/k/v/o, gate/up, down
CUDA_SHAPES = SHAPES + [(8192, 8192), (28672, 8192), (8192, 28672)]  # and LLaMA-70B's
M_VALUES = [1, 4, 16, 64, 512]
CUDA_M_VALUES = [1, 4, 16, 64, 256, 2048]
GROUP_SIZE = 128


def last_level_cache_bytes() -> int:
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
            level = int((index / "level").read_text())
        except (OSError, ValueError):
            continue
        value = int(size[:-1]) * {"K": 1024, "M": 1024 ** 2}.get(size[-1], 1) if size[-1].isalpha() else int(size)
        if level >= 2:
            best = max(best, value)
    return best or 32 * 1024 ** 2


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_per_call(fn, count: int, min_seconds: float) -> float:
    """Seconds per call, cycling fn(i) over i = 0..count-1 (distinct weights), after one warm cycle."""
    for i in range(count):
        fn(i)
    calls, start = 0, time.perf_counter()
    while True:
        fn(calls % count)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= count:
            return elapsed / calls


def copy_bandwidth(nbytes: int, min_seconds: float) -> float:
    """Bytes moved (read + written) per second by a large tensor copy."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda _: dst.copy_(src), 1, min_seconds)
    return 2 * nbytes / seconds


def random_quantized(n: int, k: int, bits: float) -> lowbit.QuantizedWeight:
    """A valid weight with random codes: every byte pattern is a valid code block in every format."""
    kp = formats.padded_in_features(k, GROUP_SIZE)
    qweight = torch.randint(0, 256, (n, formats.packed_row_bytes(bits, kp)), dtype=torch.uint8)
    scales = (torch.rand(n, kp // GROUP_SIZE) * 0.01 + 0.001).half()
    zeros = torch.full((n, kp // GROUP_SIZE), formats.code_max(bits)[0].item() / 2).half()
    return lowbit.QuantizedWeight(qweight, scales, zeros, None, bits, GROUP_SIZE, k)


def copies_for(bytes_each: int, working_set: int) -> int:
    return max(1, -(-working_set // bytes_each))


def interleaved_times(candidates: dict, min_seconds: float, rounds: int) -> dict:
    """Seconds per call of each candidate (name: (fn, count)), the candidates taking turns: a round runs
    one rotation (count calls) of each; rounds repeat until every candidate has had min_seconds and at
    least `rounds` rotations. The median rotation counts, so that a slow spell of a shared machine falls
    on all candidates alike and a lucky one does not decide."""
    samples = {name: [] for name in candidates}
    spent = dict.fromkeys(candidates, 0.0)
    for fn, count in candidates.values():  # warm-up rotation
        for i in range(count):
            fn(i)
    while min(len(v) for v in samples.values()) < rounds or min(spent.values()) < min_seconds:
        for name, (fn, count) in candidates.items():
            start = time.perf_counter()
            for i in range(count):
                fn(i)
            elapsed = time.perf_counter() - start
            spent[name] += elapsed
            samples[name].append(elapsed / count)
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


def run(shapes, m_values, min_seconds: float, rounds: int) -> dict:
    llc = last_level_cache_bytes()
    working_set = 4 * llc
    copy_bw = sorted(copy_bandwidth(max(256 * 1024 ** 2, 4 * working_set), min_seconds) for _ in range(5))[2]
    rows = []
    for n, k in shapes:
        fp32 = [torch.randn(n, k) for _ in range(copies_for(4 * n * k, working_set))]
        bf16 = [w.bfloat16() for w in fp32[:copies_for(2 * n * k, working_set)]]
        quantized = {bits: [random_quantized(n, k, bits)
                            for _ in range(copies_for(int(n * k * bits / 8), working_set))] for bits in formats.BITS}
        for m in m_values:
            x32, x16 = torch.randn(m, k), torch.randn(m, k).bfloat16()

            def rotation(weights):  # beyond the decode rows the calls are compute-bound: two weights will do
                return len(weights) if m <= 8 else min(2, len(weights))
            candidates = {"fp32": (lambda i: F.linear(x32, fp32[i % len(fp32)]), rotation(fp32)),
                          "bf16": (lambda i: F.linear(x16, bf16[i % len(bf16)]), rotation(bf16))}
            for bits, ws in quantized.items():
                candidates |= {
                    (bits, "x32"): (lambda i, ws=ws: lowbit.linear(x32, ws[i % len(ws)]), rotation(ws)),
                    (bits, "x16"): (lambda i, ws=ws: lowbit.linear(x16, ws[i % len(ws)]), rotation(ws)),
                    (bits, "dequantize"): (lambda i, ws=ws: F.linear(x32, ws[i % len(ws)].dequantize()),
                                           rotation(ws)),
                }
            best = interleaved_times(candidates, min_seconds, rounds)
            t_fp32, t_bf16 = best["fp32"], best["bf16"]
            for bits, weights in quantized.items():
                t, t_x16, t_deq = best[bits, "x32"], best[bits, "x16"], best[bits, "dequantize"]
                bytes_read = weights[0].nbytes + 4 * m * k + 4 * m * n
                rows.append({
                    "N": n, "K": k, "M": m, "format": f"int{bits:g}",
                    "time_ms": t * 1e3,
                    "GB_per_s": bytes_read / t / 1e9,
                    "fraction_of_copy_bw": bytes_read / t / copy_bw,
                    "speedup_vs_fp32": t_fp32 / t,
                    "speedup_vs_dequantize_then_fp32": t_deq / t,
                    "bf16_x_time_ms": t_x16 * 1e3,
                    "bf16_x_speedup_vs_bf16": t_bf16 / t_x16,
                    "best_speedup_vs_best_F_linear": min(t_fp32, t_bf16) / min(t, t_x16),
                    "fp32_ms": t_fp32 * 1e3,
                    "bf16_ms": t_bf16 * 1e3,
                    "GFLOP_per_s": 2 * m * n * k / t / 1e9,
                })
                print(format_row(rows[-1]), flush=True)
    return {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "last_level_cache_MiB": llc / 1024 ** 2,
            "copy_bandwidth_GB_per_s": copy_bw / 1e9,
            "torch": torch.__version__,
            "lowbit_cpu_isa": lowbit.cpu_isa(),
        },
        "group_size": GROUP_SIZE,
        "rounds": rounds,
        "rows": rows,
    }


HEADER = ("| N x K | M | format | ms (fp32 x) | GB/s | of copy BW | vs fp32 F.linear | vs dequantize + fp32 F.linear "
          "| ms (bf16 x) | vs bf16 F.linear | best vs best |\n|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['N']}x{r['K']} | {r['M']} | {r['format']} | {r['time_ms']:.3f} | {r['GB_per_s']:.1f} | "
            f"{100 * r['fraction_of_copy_bw']:.0f}% | {r['speedup_vs_fp32']:.2f}x | "
            f"{r['speedup_vs_dequantize_then_fp32']:.2f}x | {r['bf16_x_time_ms']:.3f} | "
            f"{r['bf16_x_speedup_vs_bf16']:.2f}x | {r['best_speedup_vs_best_F_linear']:.2f}x |")


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"CPU: {m['cpu']}, {m['threads']} threads, LLC {m['last_level_cache_MiB']:.0f} MiB, "
             f"copy bandwidth {m['copy_bandwidth_GB_per_s']:.1f} GB/s (read + write), kernels: {m['lowbit_cpu_isa']}, "
             f"torch {m['torch']}, group size {result['group_size']}, median of >= {result.get('rounds', 1)} "
             "interleaved rounds. "
             "GB/s and copy-bandwidth fraction are for "
             "float32 activations; bf16 x: lowbit with bfloat16 activations against F.linear with bfloat16 weights "
             "and activations; best vs best: the faster lowbit call against the faster F.linear.", "", HEADER]
    lines += [format_row(r) for r in result["rows"]]
    return "\n".join(lines) + "\n"


# --- CUDA ---------------------------------------------------------------------------------------------


def random_tiled_weight(n: int, k: int, bits: float, group_size: int = GROUP_SIZE, scale_range=(0.001, 0.011),
                        device="cuda") -> lowbit.QuantizedWeight:
    """A weight of random codes in the CUDA tile layout, made directly on the device (any byte is a valid code
    in both formats), so that even 70B shapes are ready at once; scales uniform in scale_range, zeros in [0, 15)."""
    shapes = tiled.tiled_shapes(bits, group_size, k, n)
    lo, hi = scale_range
    qweight = torch.randint(0, 256, shapes["qweight"], dtype=torch.uint8, device=device)
    scales = (torch.rand(shapes["scales"], device=device) * (hi - lo) + lo).half()
    zeros = (torch.rand(shapes["zeros"], device=device) * 15).half()
    return lowbit.QuantizedWeight(qweight, scales, zeros, None, bits, group_size, k, "tiled", n)


def torch_int4_weight(n: int, k: int):
    """PyTorch's own int4 kernel (what torchao's int4 weight-only path runs): packed weight and bfloat16
    scales/zeros, or None where this torch lacks it."""
    try:
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda")
        packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
        sz = torch.rand(k // GROUP_SIZE, n, 2, device="cuda").bfloat16()
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm(x, packed, GROUP_SIZE, sz)
        return packed, sz
    except (RuntimeError, AttributeError) as e:
        print(f"torch int4 kernel unavailable: {e}", flush=True)
        return None


def cuda_time_per_call(fn, count: int, min_seconds: float) -> float:
    """Seconds per call of fn(i), i cycling over 0..count-1, from replays of one CUDA graph of all count calls
    (captured after a warm-up on a side stream), timed with CUDA events."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(count):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(count):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 1
    while True:
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
        if seconds >= min_seconds or replays >= 1 << 16:
            return seconds / (replays * count)
        replays = max(2 * replays, int(replays * min_seconds / max(seconds, 1e-6)) + 1)


def cuda_copy_bandwidth(nbytes: int, min_seconds: float) -> float:
    """Bytes moved (read + written) per second by a device-to-device copy of nbytes."""
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_time_per_call(lambda _: dst.copy_(src), 1, min_seconds)
    return 2 * nbytes / seconds


def run_cuda(shapes, m_values, min_seconds: float) -> dict:
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 1024 ** 2)
    working_set = 4 * l2
    copy_bw = cuda_copy_bandwidth(1024 ** 3, min_seconds)
    rows = []
    for n, k in shapes:
        fp16 = [torch.randn(n, k, device="cuda", dtype=torch.float16)
                for _ in range(copies_for(2 * n * k, working_set))]
        quantized = {bits: [random_tiled_weight(n, k, bits)
                            for _ in range(copies_for(int(n * k * bits / 8), working_set))] for bits in (4, 3.5)}
        int4pack = [torch_int4_weight(n, k) for _ in range(copies_for(n * k // 2, working_set))]
        int4pack = None if None in int4pack else int4pack
        for m in m_values:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            xb = x.bfloat16()
            io_bytes = 2 * m * k + 2 * m * n
            t_fp16 = cuda_time_per_call(lambda i: F.linear(x, fp16[i % len(fp16)]), len(fp16), min_seconds)
            t_torch4 = None if int4pack is None else cuda_time_per_call(
                lambda i: torch.ops.aten._weight_int4pack_mm(xb, int4pack[i % len(int4pack)][0], GROUP_SIZE,
                                                             int4pack[i % len(int4pack)][1]),
                len(int4pack), min_seconds)
            for bits, weights in quantized.items():
                t = cuda_time_per_call(lambda i: lowbit.linear(x, weights[i % len(weights)]), len(weights),
                                       min_seconds)
                bytes_moved = weights[0].nbytes + io_bytes
                rows.append({
                    "N": n, "K": k, "M": m, "format": "int4" if bits == 4 else "int3.5",
                    "time_us": t * 1e6,
                    "GB_per_s": bytes_moved / t / 1e9,
                    "fraction_of_copy_bw": bytes_moved / t / copy_bw,
                    "speedup_vs_fp16": t_fp16 / t,
                    "fp16_us": t_fp16 * 1e6,
                    "fp16_GB_per_s": (2 * n * k + io_bytes) / t_fp16 / 1e9,
                    "torch_int4_us": None if t_torch4 is None else t_torch4 * 1e6,
                    "speedup_vs_torch_int4": None if t_torch4 is None else t_torch4 / t,
                    "TFLOP_per_s": 2 * m * n * k / t / 1e12,
                })
                print(format_cuda_row(rows[-1]), flush=True)
    return {
        "machine": {
            "device": props.name,
            "multiprocessors": props.multi_processor_count,
            "memory_GiB": props.total_memory / 1024 ** 3,
            "L2_MiB": l2 / 1024 ** 2,
            "copy_bandwidth_GB_per_s": copy_bw / 1e9,
            "best_fp16_GB_per_s": max(r["fp16_GB_per_s"] for r in rows),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "group_size": GROUP_SIZE,
        "rows": rows,
    }


def sweep_cuda(shapes, m_values, min_seconds: float) -> None:
    """Times the tiled kernel at each k_warps (LOWBIT_CUDA_TILED_K_WARPS) next to the default plan."""
    for n, k in shapes:
        for bits in (4, 3.5):
            weights = [random_tiled_weight(n, k, bits) for _ in range(copies_for(int(n * k * bits / 8), 240 << 20))]
            for m in m_values:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                times = {}
                for kw in ("default", "1", "2", "4", "8"):
                    os.environ.pop("LOWBIT_CUDA_TILED_K_WARPS", None)
                    if kw != "default":
                        os.environ["LOWBIT_CUDA_TILED_K_WARPS"] = kw
                    times[kw] = cuda_time_per_call(lambda i: lowbit.linear(x, weights[i % len(weights)]),
                                                   len(weights), min_seconds) * 1e6
                os.environ.pop("LOWBIT_CUDA_TILED_K_WARPS", None)
                gbs = {kw: weights[0].nbytes / t / 1e3 for kw, t in times.items()}
                print(f"sweep {n}x{k} int{bits:g} M={m}: " + ", ".join(f"{kw} {t:.1f} us ({gbs[kw]:.0f} GB/s)"
                                                                     for kw, t in times.items()), flush=True)


CUDA_HEADER = ("| N x K | M | format | time us | GB/s | of copy BW | vs fp16 F.linear | fp16 F.linear us "
               "| fp16 GB/s | vs torch int4 | torch int4 us | TFLOP/s |\n" + "|---" * 12 + "|")


def format_cuda_row(r: dict) -> str:
    return (f"| {r['N']}x{r['K']} | {r['M']} | {r['format']} | {r['time_us']:.1f} | {r['GB_per_s']:.0f} | "
            f"{100 * r['fraction_of_copy_bw']:.0f}% | {r['speedup_vs_fp16']:.2f}x | {r['fp16_us']:.1f} | "
            f"{r['fp16_GB_per_s']:.0f} | "
            + ("n/a | n/a" if r["torch_int4_us"] is None
               else f"{r['speedup_vs_torch_int4']:.2f}x | {r['torch_int4_us']:.1f}")
            + f" | {r['TFLOP_per_s']:.1f} |")


def cuda_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"GPU: {m['device']}, {m['multiprocessors']} SMs, L2 {m['L2_MiB']:.0f} MiB, copy bandwidth "
             f"{m['copy_bandwidth_GB_per_s']:.0f} GB/s (read + write), torch {m['torch']}, CUDA {m['cuda']}, "
             f"group size {result['group_size']}; best float16 cuBLAS read rate in this run "
             f"{m['best_fp16_GB_per_s']:.0f} GB/s. torch int4: torch.ops.aten._weight_int4pack_mm with bfloat16 "
             "activations (torchao's int4 weight-only kernel).", "", CUDA_HEADER]
    lines += [format_cuda_row(r) for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one shape and three M values (under a minute)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sweep", action="store_true", help="CUDA: time the tiled kernel's K splits at M = 1 "
                        "and 16 on every shape (printed only)")
    parser.add_argument("--out", default=None, help="output path without extension (.json and .md are written); "
                        "default benchmarks/results/kernels_cpu or kernels_cuda")
    parser.add_argument("--min-seconds", type=float, default=None, help="timing per configuration and round")
    parser.add_argument("--rounds", type=int, default=None, help="CPU: least interleaved rounds per configuration "
                        "(default 5; 3 with --quick); the median counts")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    shapes = SHAPES[:1] if args.quick else SHAPES
    out = Path(args.out or Path(__file__).parent / "results" / f"kernels_{args.device}")
    if args.device == "cuda" and args.sweep:
        sweep_cuda(CUDA_SHAPES, [1, 16], 0.03)
        return
    if args.device == "cuda":
        shapes = CUDA_SHAPES[:1] if args.quick else CUDA_SHAPES
        m_values = [1, 16, 256] if args.quick else CUDA_M_VALUES
        min_seconds = args.min_seconds or (0.05 if args.quick else 0.2)
        print(CUDA_HEADER)
        result = run_cuda(shapes, m_values, min_seconds)
        table = cuda_markdown(result)
    else:
        m_values = [1, 16, 512] if args.quick else M_VALUES
        min_seconds = args.min_seconds or (0.1 if args.quick else 0.5)
        print(HEADER)
        result = run(shapes, m_values, min_seconds, args.rounds or (3 if args.quick else 5))
        table = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
