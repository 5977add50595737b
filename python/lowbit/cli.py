"""The `lowbit` command line: fetch, generate, serve, convert, export, inspect, bench."""

import argparse
import os
import sys
from pathlib import Path

import torch

from .bench import add_parser as add_bench_parser

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_quantization_args(p: argparse.ArgumentParser, converts: bool) -> None:
    """The quantization options; converts: the command always quantizes (default int4), else only when asked."""
    from .formats import BITS, GROUP_SIZES, METHODS
    p.add_argument("--bits", type=float, choices=BITS,
                   help="weight format of every linear layer" + (" (default 4)" if converts else
                                                                " (quantize the linear layers first)"))
    p.add_argument("--bits-per-weight", type=float, metavar="X",
                   help="instead of --bits: choose each decoder linear's format and group size (int3.5/int4/int8, "
                        "32..256) for the least error on calibration text within X bits per weight (real bytes; a "
                        "quantized head counts)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES,
                   help="default 128; with --bits-per-weight: the only group size to choose from")
    p.add_argument("--method", default="rtn", choices=list(METHODS),
                   help="awq, gptq, awq+gptq: calibrate (minutes on a CPU)")
    p.add_argument("--act-order", nargs="?", const="order", default=False, choices=["order", "perm"],
                   help="gptq, awq+gptq: round each layer's columns in decreasing order of their inputs' size; "
                        "order (default): the format and its size unchanged; perm: the order stored as each "
                        "int4/int8 layer's input permutation (4 bytes per input feature)")
    p.add_argument("--calib-samples", type=int, default=8, metavar="N",
                   help="calibrate on N windows of 512 tokens (default 8; more: slower, often better GPTQ)")
    p.add_argument("--grid", default="mse", choices=["mse", "minmax"],
                   help="how round to nearest picks each group's scale and zero point: mse searches for the least "
                        "squared error (default), minmax takes the group's range (about 10x faster)")
    p.add_argument("--quantize-lm-head", action="store_true", help="also quantize the output head (in --bits)")
    p.add_argument("--lm-head-bits", choices=[f"{b:g}" for b in BITS] + ["none"],
                   help="the output head's format, none: float (default: --bits with --quantize-lm-head; "
                        "generate on the CPU: 8, where it pays: a float32 head is the largest tensor a small "
                        "model reads per token; otherwise none)")
    p.add_argument("--lm-head-group-size", type=int, choices=GROUP_SIZES,
                   help="the output head's group size (default: --group-size); quantizes the head")


def head_format(args, default: str = "none") -> dict:
    """quantize_model's output-head arguments from --quantize-lm-head, --lm-head-bits, --lm-head-group-size."""
    bits = args.lm_head_bits or (f"{args.bits or 4:g}" if args.quantize_lm_head else default)
    if bits == "none":
        if args.lm_head_group_size is not None:
            raise ValueError("--lm-head-group-size needs a quantized head (--lm-head-bits)")
        return {"quantize_lm_head": False}
    return {"quantize_lm_head": True, "lm_head_bits": float(bits), "lm_head_group_size": args.lm_head_group_size}


def add_runtime_args(p, device_help: str) -> None:
    p.add_argument("--device", default="cpu", help=device_help)
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="of the float parts and activations")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", *DTYPES],
                   help="of the KV cache (auto: float16 for a float32 model on the CPU, as llama.cpp's default "
                   "cache, which halves the bytes attention reads; else the model's dtype)")


def kv_cache_dtype(name: str, model) -> torch.dtype | None:
    """The KV cache dtype --kv-cache-dtype asks for (None: the model's own)."""
    if name != "auto":
        return DTYPES[name]
    return torch.float16 if model.device.type == "cpu" and model.dtype == torch.float32 else None


def load_for_cli(args):
    from . import data, fetch, quantize_model
    from .io.fetch import MODELS
    from .pipeline import check_calib_samples
    from .models.llama import LlamaForCausalLM
    path = fetch(args.model) if args.model in MODELS else args.model
    model = LlamaForCausalLM.from_pretrained(path)
    if args.bits is not None or args.bits_per_weight is not None:
        calibrates = args.method != "rtn" or args.bits_per_weight is not None
        calib = data.calibration_tokens(model.tokenizer, n_samples=check_calib_samples(args.calib_samples),
                                        seq_len=512) if calibrates else None
        quantize_model(model, args.bits, args.group_size, method=args.method, calib=calib, grid=args.grid,
                       bits_per_weight=args.bits_per_weight, act_order=args.act_order,
                       **head_format(args, default="8" if args.device == "cpu" else "none"))
        if args.bits_per_weight is not None:
            print_budget(model)
    model = model.to(args.device, DTYPES[args.dtype])
    model.kv_cache_dtype = kv_cache_dtype(args.kv_cache_dtype, model)
    return model


def print_budget(model) -> None:
    """The formats a bits-per-weight budget chose, on stderr."""
    from .budget import format_table, model_formats
    achieved = model.quantization["bits_per_weight"]
    print(f"formats for {achieved['target']:g} bits/weight ({achieved['achieved']:.4f} achieved):\n"
          f"{format_table(model_formats(model))}", file=sys.stderr)


def cmd_fetch(args) -> int:
    from . import fetch
    print(fetch(args.name))
    return 0


def cmd_generate(args) -> int:
    from .generate import Sampling, TextStream
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lowbit generate: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    model = load_for_cli(args)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop or [],
                        seed=args.seed)

    def run(prompt) -> list[int]:
        stream = TextStream(model, prompt, sampling, compile=args.compile, fused=args.fused)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        print(f"[{stream.stats}]", file=sys.stderr)
        return stream.tokens

    if not args.chat:
        if args.prompt is None:
            print("lowbit generate: give --prompt TEXT, or --chat", file=sys.stderr)
            return 2
        run(args.prompt)
        return 0
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:  # one turn
        run(messages + [{"role": "user", "content": args.prompt}])
        return 0
    print("chat: type a message, empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        reply = model.tokenizer.decode(run(messages))
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_serve(args) -> int:
    try:
        from .server import serve
    except ImportError as e:
        print(f"lowbit serve: needs FastAPI and uvicorn (pip install 'lowbit[serve]'): {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lowbit serve: --device cuda, but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    model = load_for_cli(args)
    serve(model, args.model_name or Path(str(args.model)).name, host=args.host, port=args.port,
          max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=args.max_queue, api_key=args.api_key,
          shutdown_timeout=args.shutdown_timeout, prefix_reuse=args.prefix_reuse)
    return 0


def cmd_convert(args) -> int:
    from .pipeline import convert
    out = convert(args.src, args.out, bits=args.bits, group_size=args.group_size, method=args.method,
                  calib_file=args.calib_file, align=args.align, force=args.force, integer_zeros=args.integer_zeros,
                  grid=args.grid, float_dtype=getattr(torch, args.float_dtype), bits_per_weight=args.bits_per_weight,
                  act_order=args.act_order, calib_samples=args.calib_samples, device=args.device, **head_format(args))
    if args.bits_per_weight is not None:
        from .io.checkpoint import load_quantized
        print_budget(load_quantized(out))
    print(out)
    return 0


def cmd_export(args) -> int:
    from .io.autoawq import export_awq
    print(export_awq(args.src, args.out, force=args.force))
    return 0


def cmd_inspect(args) -> int:
    from .io.inspect import inspect_checkpoint
    return 0 if inspect_checkpoint(args.path) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description="4-bit, 3.5-bit and 8-bit LLaMA inference")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and convert a bundled model (smollm2); prints its directory")
    p.add_argument("name", nargs="?", default="smollm2")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("generate", help="stream a completion or a chat reply")
    p.add_argument("model", help="HF directory, .gguf file, or a bundled model name (smollm2)")
    p.add_argument("--prompt", help="prompt text (with --chat: one user message)")
    p.add_argument("--chat", action="store_true", help="use the chat template; without --prompt, read turns from stdin")
    p.add_argument("--system", help="system message for --chat")
    add_quantization_args(p, converts=False)
    add_runtime_args(p, "cpu or cuda (on CUDA each decode step is one CUDA graph)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="CPU threads for prefill and decode (default: torch's, one per core)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model's decode step instead of "
                   "running the fused CPU step or a CUDA graph (slow first start)")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="on the CPU, run the model's PyTorch forward per token instead of the fused C++ step")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with batched decoding and a chat page")
    p.add_argument("model", help="HF directory, lowbit checkpoint, .gguf file, or a bundled model name (smollm2)")
    add_quantization_args(p, converts=False)
    add_runtime_args(p, "cpu or cuda")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV cache rows)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per sequence, prompt and reply")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot (more get 429)")
    p.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                   help="compute every prompt in full instead of reusing the longest prefix a free cache row holds")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: $LOWBIT_API_KEY)",
                   default=os.environ.get("LOWBIT_API_KEY"))
    p.add_argument("--model-name", help="the model's id in the API (default: the MODEL argument's last part)")
    p.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds open requests get to finish after SIGTERM or Ctrl-C")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="quantize an HF directory or .gguf file (or import an AutoAWQ checkpoint) "
                                       "into a lowbit checkpoint")
    p.add_argument("src", help="HF float directory, .gguf file, or AutoAWQ GEMM directory")
    p.add_argument("out", help="output directory (written atomically; an interrupted run continues where it "
                               "stopped when the same command runs again)")
    add_quantization_args(p, converts=True)
    p.add_argument("--device", default="cpu", help="where each block is calibrated: cpu (default) or cuda (one "
                                                   "block and its activations on the GPU at a time)")
    p.add_argument("--calib-file", help="text file to calibrate AWQ/GPTQ on (default: lowbit.data)")
    p.add_argument("--align", type=int, help="start every tensor's data on this byte boundary (e.g. 1024)")
    p.add_argument("--integer-zeros", action="store_true", help="integer zero points (needed by export --format awq)")
    p.add_argument("--float-dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the tensors that stay float (embeddings, norms)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write a lowbit int4 checkpoint in another tool's layout")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--format", default="awq", choices=["awq"], help="awq: AutoAWQ GEMM (transformers, vLLM)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="tensors, sizes, formats and integrity checks of a lowbit checkpoint")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)

    add_bench_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; OSError: files, permissions
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
