"""`lowbit bench`: the quick versions of the benchmarks in benchmarks/, one after another, with their tables.

The benchmark scripts live in the source checkout (benchmarks/ is not part of the installed package), so this
runs them as `python benchmarks/bench_*.py --quick --out DIR/...` from the checkout lowbit is installed from
(an editable install) or from the current directory. Results go to a fresh directory, never over the committed
full results in benchmarks/results/.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (script, what it measures, arguments of its quick version, output file stem)
BENCHMARKS = {
    "kernels": ("bench_kernels.py", "lowbit.linear vs F.linear on LLaMA-7B layer shapes (about a minute)",
                ["--quick"], "kernels_cpu"),
    "generate": ("bench_generate.py", "SmolLM2 prefill/decode tokens/s, float32 vs int4 vs int3.5 (a few minutes)",
                 ["--quick"], "generate_cpu"),
    "quality": ("bench_quality.py", "SmolLM2 perplexity and error, RTN vs AWQ vs GPTQ vs AWQ+GPTQ (long: six "
                "calibrated runs)",
                ["--quick"], "quality_smollm2"),
    "convert": ("bench_convert.py", "converter time and peak memory on a LLaMA-2-7B-shaped checkpoint (2 of its "
                "layers; RTN and GPTQ on one calibration window)",
                ["--layers", "2", "--methods", "rtn,gptq", "--calib-samples", "1"], "convert_7b_cpu"),
    "serve": ("bench_serve.py", "lowbit serve with SmolLM2 int4 under 1-32 concurrent streaming clients (minutes)",
              ["--quick"], "serve_cpu"),
}
DEFAULT = ["kernels", "generate"]


def find_benchmarks() -> Path | None:
    """benchmarks/ of the source checkout: next to the package (editable install) or under the current directory."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd(), *Path.cwd().parents):
        if (root / "benchmarks" / "bench_kernels.py").is_file():
            return root / "benchmarks"
    return None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="run the quick benchmarks from a source checkout and print their tables",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: {' '.join(DEFAULT)})")
    p.add_argument("--all", action="store_true", help="run every benchmark")
    p.add_argument("--full", action="store_true", help="the full versions instead of the quick ones (much longer)")
    p.add_argument("--out-dir", type=Path, help="where results go (default: a new temporary directory)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    if args.list:
        for name, (script, what, _, _) in BENCHMARKS.items():
            print(f"{name:<9} benchmarks/{script}: {what}")
        return 0
    bench_dir = find_benchmarks()
    if bench_dir is None:
        print("lowbit bench: the benchmarks need a source checkout of lowbit (benchmarks/bench_*.py); run it from "
              "the checkout, or with lowbit installed from it (pip install -e .)", file=sys.stderr)
        return 2
    names = list(BENCHMARKS) if args.all else (args.names or DEFAULT)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"lowbit bench: unknown benchmark {', '.join(unknown)} (choose from {', '.join(BENCHMARKS)})",
              file=sys.stderr)
        return 2
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    done, failed = [], []
    for name in names:
        script_name, what, quick, stem = BENCHMARKS[name]
        script = bench_dir / script_name
        if not script.is_file():
            print(f"\n=== {name}: benchmarks/{script_name} not found, skipped", flush=True)
            continue
        extra = [] if args.full else quick
        cmd = [sys.executable, str(script), *extra, "--out", str(out_dir / stem)]
        print(f"\n=== {name}: {what}\n$ {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(cmd, cwd=bench_dir.parent)
        print(f"=== {name}: {'done' if code == 0 else f'failed (exit status {code})'} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        (done if code == 0 else failed).append((name, stem))
    if done:
        print("\n" + "=" * 100)
        for name, stem in done:
            table = out_dir / f"{stem}.md"
            if table.is_file():
                print(f"\n## {name} ({table})\n\n{table.read_text().rstrip()}")
        print(f"\nresults (.json and .md) in {out_dir}; the committed full runs are in {bench_dir / 'results'}")
    if failed:
        print(f"failed: {', '.join(name for name, _ in failed)}", file=sys.stderr)
        return 1
    return 0

