"""Converter benchmark on real LLaMA-2 sizes: wall time, peak memory and output size of `lowbit convert`, the
command users run, for each quantization method, on a random-weight bfloat16 checkpoint of LLaMA-2's layer shapes.

The checkpoint is written here, sharded like an HF checkpoint (model-0000i-of-0000n.safetensors of at most
--shard-gb, model.safetensors.index.json, config.json) with SmolLM2's tokenizer (from `lowbit fetch smollm2`), so its
vocabulary has SmolLM2's 49,152 tokens instead of LLaMA-2's 32,000. It is kept under --workdir and reused by later
runs with the same configuration (--clean removes it at the end). Every conversion runs in its own child process:
its wall time, its peak RSS (ru_maxrss from os.wait4: the lowbit CLI process itself), the output's size on disk and
its exit status are recorded; a failed conversion is recorded with the tail of its stderr and the next one runs.
Where llama.cpp is installed (llama-quantize, or the llama_cpp Python package), the same checkpoint also goes
through its HF-to-GGUF converter and its Q4_0 quantizer, timed the same way.

    python benchmarks/bench_convert.py                                  # LLaMA-2-7B shapes: rtn, gptq, awq
    python benchmarks/bench_convert.py --shape 13b --methods rtn,awq+gptq
    python benchmarks/bench_convert.py --shape 7b --layers 2 --methods rtn --calib-samples 1    # a smoke run
    python benchmarks/bench_convert.py --bits 3.5 --group-size 64 --load       # also time lowbit.load_quantized
    python benchmarks/bench_convert.py --bits-per-weight 4.25 --methods gptq --convert-args="--act-order"
    python benchmarks/bench_convert.py --llama-quantize ~/llama.cpp/build/bin/llama-quantize \\
        --convert-script ~/llama.cpp/convert_hf_to_gguf.py --workdir /big/disk/tmp

Results: benchmarks/results/convert_<shape>_cpu.{json,md} (--out PATH: PATH.json and PATH.md), rewritten after
every row, so a long run that stops keeps what it measured.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# No torch here: a child's ru_maxrss starts from this process's own peak (the child is forked from it), so this
# process stays small and the checkpoint is written by a child of its own (write_checkpoint).
REPO = Path(__file__).resolve().parent.parent
VOCAB_SIZE = 49152  # SmolLM2's tokenizer
SHAPES = {  # LLaMA-2's layer shapes
    "7b": dict(name="LLaMA-2-7B", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32),
    "13b": dict(name="LLaMA-2-13B", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40),
    "70b": dict(name="LLaMA-2-70B", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8),
}
METHODS = ("rtn", "awq", "gptq", "awq+gptq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MARKER = "bench_convert.json"  # written last: the checkpoint's configuration, for reuse
STD = 0.02
GGUF_Q4_0 = 2  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_0 of llama.h


# --- the checkpoint ------------------------------------------------------------------------------------------

def model_config(shape: str, layers: int | None) -> dict:
    s = SHAPES[shape]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": VOCAB_SIZE, "hidden_size": s["hidden_size"], "intermediate_size": s["intermediate_size"],
            "num_hidden_layers": layers or s["num_hidden_layers"], "num_attention_heads": s["num_attention_heads"],
            "num_key_value_heads": s["num_key_value_heads"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def tensor_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor's HF name and shape, in the order HF checkpoints store them."""
    h, f = c["hidden_size"], c["intermediate_size"]
    head_dim = h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    out = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]


def shard_plan(shapes: list, max_bytes: int) -> list[list]:
    """Consecutive tensors in shards of at most max_bytes (a larger tensor gets a shard of its own), as HF does."""
    shards, size = [[]], 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def fetch_tokenizer(lowbit: str) -> Path:
    """SmolLM2's directory, from `lowbit fetch smollm2` (downloads and converts it on first use)."""
    result = subprocess.run([lowbit, "fetch", "smollm2"], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines or not (Path(lines[-1]) / "tokenizer.json").is_file():
        sys.exit(f"`{lowbit} fetch smollm2` failed (exit {result.returncode}):\n{result.stderr.strip()[-2000:]}")
    return Path(lines[-1])


def tokenizer_size(directory: Path) -> int:
    """1 + the largest token id of a tokenizer.json (its vocabulary and added tokens)."""
    t = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    ids = list(t["model"]["vocab"].values()) + [a["id"] for a in t.get("added_tokens", [])]
    return max(ids) + 1


def write_checkpoint(out: Path, config: dict, tokenizer_dir: Path, shard_bytes: int, seed: int) -> None:
    """The shards one at a time (each tensor drawn from its own seeded generator), then the index, config and
    tokenizer: memory for one shard, whatever the model's size. Runs in a child process (WRITE_CODE)."""
    import torch
    from safetensors.torch import save_file
    out.mkdir(parents=True)
    shards = shard_plan(tensor_shapes(config), shard_bytes)
    weight_map, total, index = {}, 0, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(seed + index)
                tensors[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, STD, generator=g)
            index += 1
            total += tensors[name].numel() * 2
            weight_map[name] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
        print(f"  {file}: {len(shard)} tensors, {(out / file).stat().st_size / 1e9:.2f} GB", file=sys.stderr,
              flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)


WRITE_CODE = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_convert as b; "
              "a = json.loads(sys.argv[2]); b.write_checkpoint(b.Path(a['out']), a['config'], "
              "b.Path(a['tokenizer_dir']), a['shard_bytes'], a['seed'])")


def checkpoint(workdir: Path, config: dict, args, lowbit: str) -> tuple[Path, dict]:
    """The checkpoint directory for config under workdir: reused if its marker says it was written for the same
    configuration, else (re)written. Returns it and what happened (written or reused, seconds, peak RSS)."""
    marker = {"config": config, "shard_bytes": int(args.shard_gb * 1e9), "seed": args.seed, "std": STD,
              "tokenizer": "SmolLM2's, from lowbit fetch smollm2"}
    src = workdir / f"llama2-{args.shape}-{config['num_hidden_layers']}layers-bf16"
    if (src / MARKER).is_file() and json.loads((src / MARKER).read_text()) == marker:
        print(f"reusing {src} (written earlier with the same configuration)", flush=True)
        return src, {"source": "reused"}
    tokenizer_dir = fetch_tokenizer(lowbit)
    n_tokens = tokenizer_size(tokenizer_dir)
    if n_tokens > VOCAB_SIZE:
        sys.exit(f"{tokenizer_dir}: the tokenizer has {n_tokens} tokens, more than the checkpoint's {VOCAB_SIZE}")
    need = 2 * sum(math.prod(s) for _, s in tensor_shapes(config))
    shutil.rmtree(src, ignore_errors=True)
    partial = src.with_name(src.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(workdir).free
    if free < need * 1.05:
        sys.exit(f"{workdir}: {free / 1e9:.1f} GB free, the checkpoint needs {need / 1e9:.1f} GB (and the outputs "
                 "about a third of that): give --workdir on a larger disk")
    print(f"writing {src} ({need / 1e9:.2f} GB) ...", flush=True)
    spec = {"out": str(partial), "config": config, "tokenizer_dir": str(tokenizer_dir),
            "shard_bytes": marker["shard_bytes"], "seed": args.seed}
    written = run_measured([sys.executable, "-c", WRITE_CODE, str(Path(__file__).resolve().parent),
                            json.dumps(spec)], echo=True, timeout=None)
    if written["exit_code"] != 0:
        shutil.rmtree(partial, ignore_errors=True)
        sys.exit(f"writing the checkpoint {written['status']}")
    (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    partial.rename(src)
    print(f"wrote it in {written['seconds']:.0f} s (peak RSS {written['peak_rss_gb']:.2f} GB)", flush=True)
    return src, {"source": "written", "write_seconds": written["seconds"],
                 "write_peak_rss_gb": written["peak_rss_gb"]}


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# --- measured child processes --------------------------------------------------------------------------------

def run_measured(cmd: list[str], echo: bool, timeout: float | None) -> dict:
    """Runs cmd as a child process: wall seconds, its peak RSS (ru_maxrss of os.wait4), exit status, and the tails
    of its stdout and stderr (stderr passes through to ours as it comes when echo)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tails = {"stdout": bytearray(), "stderr": bytearray()}

    def pump(stream, key, passthrough):
        while chunk := os.read(stream.fileno(), 65536):
            if passthrough:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            tails[key] += chunk
            del tails[key][:-16384]
    threads = [threading.Thread(target=pump, args=(proc.stdout, "stdout", False)),
               threading.Thread(target=pump, args=(proc.stderr, "stderr", echo))]
    for t in threads:
        t.start()
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if timer:
        timer.cancel()
    for t in threads:
        t.join()
    proc.stdout.close()
    proc.stderr.close()
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code == 0:
        state = "ok"
    elif timeout and code == -signal.SIGKILL and seconds >= timeout:
        state = f"timed out ({timeout:g} s)"
    elif code < 0:
        state = f"killed by {signal.Signals(-code).name}" + (" (out of memory?)" if code == -signal.SIGKILL else "")
    else:
        state = f"failed (exit {code})"
    return {"status": state, "exit_code": code, "seconds": seconds,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "stdout_tail": tails["stdout"].decode(errors="replace")[-2000:],
            "stderr_tail": tails["stderr"].decode(errors="replace")[-4000:]}


def convert_command(lowbit: str, src: Path, out: Path, method: str, args) -> list[str]:
    cmd = [lowbit, "convert", str(src), str(out)]
    if args.bits_per_weight is not None:
        cmd += ["--bits-per-weight", f"{args.bits_per_weight:g}"]
    else:
        cmd += ["--bits", f"{args.bits:g}"]
    cmd += ["--group-size", str(args.group_size), "--method", method]
    if method != "rtn" or args.bits_per_weight is not None:  # the calibrated methods and the budget's choice
        cmd += ["--calib-samples", str(args.calib_samples)]
    return cmd + shlex.split(args.convert_args)


def fresh_output(args, name: str) -> Path:
    """--workdir/out/name, not there yet; without --keep-outputs also nothing else in --workdir/out (such as the
    partial output of a conversion killed before)."""
    out = args.workdir / "out" / name
    shutil.rmtree(out if args.keep_outputs else out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


LOAD_CODE = "import sys, torch, lowbit; lowbit.load_quantized(sys.argv[1], dtype=torch.float16)"


def bench_lowbit(method: str, src: Path, lowbit: str, args) -> dict:
    out = fresh_output(args, method)
    cmd = convert_command(lowbit, src, out, method, args)
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    fmt = (f"{args.bits_per_weight:g} bits/weight budget" if args.bits_per_weight is not None
           else f"int{args.bits:g}") + f", g{args.group_size}"
    calib = f"{args.calib_samples} x 512" if "--calib-samples" in cmd else "-"
    row = {"tool": "lowbit", "method": method, "format": fmt, "calibration": calib, "command": shlex.join(cmd),
           **run_measured(cmd, not args.quiet, args.timeout)}
    row["output_gb"] = dir_bytes(out) / 1e9 if out.exists() and row["exit_code"] == 0 else None
    if args.load and row["exit_code"] == 0:
        load_cmd = [sys.executable, "-c", LOAD_CODE, str(out)]
        print(f"$ {shlex.join(load_cmd)}", flush=True)
        load = run_measured(load_cmd, not args.quiet, args.timeout)
        row |= {"load_command": shlex.join(load_cmd), "load_status": load["status"],
                "load_seconds": load["seconds"], "load_peak_rss_gb": load["peak_rss_gb"],
                "load_stderr_tail": load["stderr_tail"] if load["exit_code"] else ""}
    if not args.keep_outputs:
        shutil.rmtree(out.parent, ignore_errors=True)
    return row


# --- llama.cpp ------------------------------------------------------------------------------------------------

def find_llama_cpp(args) -> tuple[list[str] | None, Path | None, str]:
    """(the quantizer's command prefix, convert_hf_to_gguf.py, where they came from); None where absent."""
    quantize, origin = None, ""
    if args.llama_quantize:
        quantize, origin = [str(args.llama_quantize)], "--llama-quantize"
    elif shutil.which("llama-quantize"):
        quantize, origin = [shutil.which("llama-quantize")], "llama-quantize on PATH"
    else:
        spec = importlib.util.find_spec("llama_cpp")
        if spec and spec.origin:
            package = Path(spec.origin).parent
            binaries = sorted(package.glob("**/llama-quantize"))
            if binaries:
                quantize, origin = [str(binaries[0])], "llama_cpp package's llama-quantize"
            else:  # llama-cpp-python's own binding of llama_model_quantize, in a child process
                quantize = [sys.executable, "-c", "import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_"
                            "params(); p.ftype = int(sys.argv[3]); p.nthread = int(sys.argv[4]); sys.exit(llama_cpp."
                            "llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))"]
                origin = f"llama_cpp {importlib.metadata.version('llama_cpp_python')} (llama_model_quantize)"
    script = args.convert_script
    candidates = [Path(os.environ["LLAMA_CPP_SOURCE"]) / "convert_hf_to_gguf.py"] if "LLAMA_CPP_SOURCE" in \
        os.environ else []
    if quantize and len(quantize) == 1:  # a llama.cpp build tree: build/bin/llama-quantize
        candidates += [p / "convert_hf_to_gguf.py" for p in Path(quantize[0]).resolve().parents[:3]]
    if script is None:
        script = next((p for p in candidates if p.is_file()), None)
    return quantize, script, origin


def bench_llama_cpp(src: Path, args) -> list[dict]:
    quantize, script, origin = find_llama_cpp(args)
    base = {"tool": "llama.cpp", "calibration": "-"}
    q4_0 = base | {"method": "llama.cpp Q4_0", "format": "Q4_0 (block 32)"}
    if quantize is None:
        return [q4_0 | {"status": "not installed", "command": ""}]
    if script is None:
        return [q4_0 | {"status": "no convert_hf_to_gguf.py (give --convert-script)", "command": "",
                        "quantizer": origin}]
    out = fresh_output(args, "gguf")
    out.mkdir()
    gguf = out / f"model-{args.gguf_outtype}.gguf"
    cmd = [sys.executable, str(script), str(src), "--outtype", args.gguf_outtype, "--outfile", str(gguf)]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    convert = base | {"method": "llama.cpp convert_hf_to_gguf.py", "format": f"GGUF {args.gguf_outtype}",
                      "command": shlex.join(cmd), **run_measured(cmd, not args.quiet, args.timeout)}
    convert["output_gb"] = dir_bytes(gguf) / 1e9 if convert["exit_code"] == 0 and gguf.is_file() else None
    rows = [convert]
    if convert["exit_code"] == 0:
        target = out / "model-Q4_0.gguf"
        threads = str(len(os.sched_getaffinity(0)))
        cmd = quantize + ([str(gguf), str(target), "Q4_0", threads] if len(quantize) == 1
                          else [str(gguf), str(target), str(GGUF_Q4_0), threads])
        print(f"\n$ {shlex.join(cmd)}", flush=True)
        row = q4_0 | {"command": shlex.join(cmd), "quantizer": origin,
                      **run_measured(cmd, not args.quiet, args.timeout)}
        row["output_gb"] = dir_bytes(target) / 1e9 if row["exit_code"] == 0 and target.is_file() else None
        rows.append(row)
    else:
        rows.append(q4_0 | {"status": "not run (the GGUF conversion failed)", "command": ""})
    if not args.keep_outputs:
        shutil.rmtree(out.parent, ignore_errors=True)
    return rows


# --- the report -----------------------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = None
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
        ram = kb * 1024 / 2**30
    except (OSError, StopIteration):
        pass
    try:
        lowbit_version = importlib.metadata.version("lowbit")
    except importlib.metadata.PackageNotFoundError:
        lowbit_version = None
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    commit = git.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "") \
        if git.returncode == 0 else None
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_available": len(os.sched_getaffinity(0)),
            "ram_gib": ram, "torch": importlib.metadata.version("torch"),
            "lowbit": lowbit_version, "lowbit_commit": commit, "python": platform.python_version()}


def fmt(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def report(result: dict, load: bool) -> str:
    m, c = result["machine"], result["config"]
    layers = c["num_hidden_layers"]
    full = SHAPES[result["shape"]]["num_hidden_layers"]
    lines = [f"Converter: `lowbit convert` on {SHAPES[result['shape']]['name']} layer shapes "
             f"({layers} of {full} layers) with SmolLM2's 49,152-token vocabulary, random bfloat16 weights (std "
             f"{STD}, norms 1), {result['source_gb']:.2f} GB in {result['source_shards']} shard"
             f"{'s' if result['source_shards'] > 1 else ''}. Machine: {m['cpu']}, "
             f"{m['cores']} cores ({m['cores_available']} available), {fmt(m['ram_gib'], 1)} GiB RAM, torch "
             f"{m['torch']}, lowbit {m['lowbit']} ({m['lowbit_commit']}). Each command in its own process: wall "
             "time of the process; peak RSS = its ru_maxrss (which counts the pages of memory-mapped files it "
             f"touched; `true` measures {result['child_rss_floor_gb'] * 1e3:.0f} MB this way); output = size on "
             "disk.", ""]
    head = "| method | format | calibration | status | wall s | peak RSS GB | output GB |"
    rule = "|---|---|---|---|---|---|---|"
    if load:
        head += " load s (float16) | load peak RSS GB |"
        rule += "---|---|"
    lines += [head, rule]
    for r in result["rows"]:
        line = (f"| {r['method']} | {r['format']} | {r['calibration']} | {r['status']} | {fmt(r.get('seconds'), 0)} "
                f"| {fmt(r.get('peak_rss_gb'), 2)} | {fmt(r.get('output_gb'), 2)} |")
        if load:
            status = r.get("load_status", "ok")
            line += (f" {fmt(r.get('load_seconds'), 1)} | {fmt(r.get('load_peak_rss_gb'), 2)} |" if status == "ok"
                     else f" {status} | – |")
        lines.append(line)
    lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in result["rows"] if r["command"]]
    for r in result["rows"]:
        if r.get("exit_code") or r.get("load_stderr_tail"):
            tail = (r.get("stderr_tail") or r.get("load_stderr_tail") or "").strip().splitlines()[-12:]
            lines += ["", f"{r['method']}: {r['status']}; the end of its stderr:", ""]
            lines += [f"    {line[-200:]}" for line in tail] or ["    (empty)"]
    return "\n".join(lines) + "\n"


def save(result: dict, out: Path, load: bool) -> str:
    table = report(result, load)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_name(out.name + ".md").write_text(table)
    return table


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="7b",
                   help="LLaMA-2's layer shapes (default 7b; 70b only on a machine with the disk and memory)")
    p.add_argument("--layers", type=int, help="decoder layers (default: the model's); fewer: same layer shapes")
    p.add_argument("--methods", default="rtn,gptq,awq", help=f"comma-separated, of {', '.join(METHODS)} "
                   "(default rtn,gptq,awq)")
    p.add_argument("--bits", type=float, choices=[4, 3.5, 8], default=4, help="lowbit convert --bits (default 4)")
    p.add_argument("--bits-per-weight", type=float, metavar="X",
                   help="lowbit convert --bits-per-weight X instead of --bits")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=128, help="default 128")
    p.add_argument("--calib-samples", type=int, default=8,
                   help="calibration windows of 512 tokens for awq/gptq/awq+gptq and budgets (default 8)")
    p.add_argument("--convert-args", default="", metavar="ARGS",
                   help="more arguments for every lowbit convert, e.g. --convert-args=\"--act-order --grid minmax\" "
                   "(with =, as they start with --)")
    p.add_argument("--load", action="store_true",
                   help="also time lowbit.load_quantized(out, dtype=torch.float16) of each output, in a child")
    p.add_argument("--llama-quantize", type=Path, metavar="PATH",
                   help="llama.cpp's llama-quantize (default: on PATH, or from the llama_cpp package)")
    p.add_argument("--convert-script", type=Path, metavar="PATH",
                   help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_SOURCE's, or the llama-quantize "
                   "build tree's)")
    p.add_argument("--gguf-outtype", choices=["bf16", "f16", "f32"], default="bf16",
                   help="the GGUF that llama.cpp quantizes from (default bf16, as the checkpoint)")
    p.add_argument("--lowbit", default=None, metavar="PATH",
                   help="the lowbit command (default: next to this Python, else on PATH)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lowbit-bench-convert"),
                   help="checkpoint (kept for reuse) and outputs (removed after each row); default "
                   "/tmp/lowbit-bench-convert")
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard of the checkpoint (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, metavar="S", help="kill a conversion after S seconds (default: none)")
    p.add_argument("--keep-outputs", action="store_true", help="keep the converted outputs under --workdir/out")
    p.add_argument("--clean", action="store_true", help="remove the checkpoint at the end (default: keep it)")
    p.add_argument("--quiet", action="store_true", help="do not pass the children's stderr (progress) through")
    p.add_argument("--out", type=Path, help="results PATH.json and PATH.md (default: "
                   "benchmarks/results/convert_<shape>_cpu)")
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {', '.join(unknown) or '(none given)'} (choose from {', '.join(METHODS)})")
    full = SHAPES[args.shape]["num_hidden_layers"]
    if args.layers is not None and not 1 <= args.layers <= full:
        p.error(f"--layers: 1 to {full} for {args.shape}")
    if args.calib_samples < 1:
        p.error("--calib-samples: at least 1")
    if args.llama_quantize and not os.access(args.llama_quantize, os.X_OK):
        p.error(f"--llama-quantize {args.llama_quantize}: not an executable")
    if args.convert_script and not args.convert_script.is_file():
        p.error(f"--convert-script {args.convert_script}: no such file")
    args.out = args.out or REPO / "benchmarks" / "results" / f"convert_{args.shape}_cpu"
    return args


def main():
    args = parse_args()
    lowbit = args.lowbit or (str(Path(sys.executable).with_name("lowbit"))
                             if Path(sys.executable).with_name("lowbit").is_file() else shutil.which("lowbit"))
    if not lowbit:
        sys.exit("no lowbit command next to this Python or on PATH (install lowbit, or give --lowbit PATH)")
    config = model_config(args.shape, args.layers)
    name = SHAPES[args.shape]["name"]
    print(f"{name} layer shapes, {config['num_hidden_layers']} layers, SmolLM2's 49,152-token vocabulary "
          f"(LLaMA-2 has 32,000), bfloat16, random weights", flush=True)
    src, written = checkpoint(args.workdir, config, args, lowbit)
    source_gb = dir_bytes(src) / 1e9
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "shape": args.shape,
              "layers": config["num_hidden_layers"], "source_dir": str(src), "source_gb": source_gb,
              "source_shards": len(list(src.glob("model-*.safetensors"))), **written, "config": config,
              "vocabulary": "SmolLM2's tokenizer (49,152 tokens)",
              "settings": {"methods": args.methods, "bits": None if args.bits_per_weight is not None else args.bits,
                           "bits_per_weight": args.bits_per_weight, "group_size": args.group_size,
                           "calib_samples": args.calib_samples, "calib_seq_len": 512,
                           "convert_args": args.convert_args},
              "command_line": shlex.join([Path(sys.executable).name, *sys.argv]),
              "child_rss_floor_gb": run_measured(["true"], False, None)["peak_rss_gb"], "rows": []}
    print(f"checkpoint: {src} ({source_gb:.2f} GB in {result['source_shards']} shard"
          f"{'s' if result['source_shards'] > 1 else ''})", flush=True)
    for method in args.methods:
        row = bench_lowbit(method, src, lowbit, args)
        result["rows"].append(row)
        print(f"{method}: {row['status']}, {row['seconds']:.1f} s, peak RSS {row['peak_rss_gb']:.2f} GB, "
              f"output {fmt(row['output_gb'], 2)} GB", flush=True)
        save(result, args.out, args.load)
    result["rows"] += bench_llama_cpp(src, args)
    table = save(result, args.out, args.load)
    print("\n" + table)
    print(f"results: {args.out}.json, {args.out}.md")
    if args.clean:
        shutil.rmtree(src, ignore_errors=True)
        print(f"removed {src}")
    else:
        print(f"the checkpoint stays in {src} for the next run (--clean removes it)")


if __name__ == "__main__":
    main()
