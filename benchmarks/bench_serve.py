"""`lowbit serve` under load: 1, 4, 16 and 32 concurrent streaming clients against SmolLM2-135M-Instruct int4.

Starts the real server (`python -m lowbit.cli serve smollm2 --bits 4 ...`) as a child process, then in interleaved
rounds runs each concurrency level's clients at once; each sends its requests one after another (chat prompts that
share the chat template's system prompt and differ in the question, none sent twice; greedy, a fixed number of new
tokens: ignore_eos) and reads the server-sent events as they come. Per level:
total generated tokens per second (all tokens over the level's wall time), time to first token (request sent to
first text) and inter-token latency (gaps between text chunks) p50 and p99, the failed requests, and the share of
prompt tokens the server did not compute (its prefix reuse, from /health); tokens/s is the median over the rounds.

    python benchmarks/bench_serve.py                   # writes benchmarks/results/serve_cpu.{json,md}
    python benchmarks/bench_serve.py --quick           # fewer tokens and requests
    python benchmarks/bench_serve.py --device cuda     # serve_cuda.{json,md}
    python benchmarks/bench_serve.py --no-prefix-reuse # every prompt computed in full
"""

import argparse
import asyncio
import itertools
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

PROMPTS = ["Give me three tips for staying focused while studying.", "Explain what a prime number is.",
           "Write a short poem about the sea.", "What are the planets of the solar system?",
           "Describe how a bicycle works.", "Why is the sky blue?", "Suggest a name for a small bakery.",
           "How do plants make their food?"]
QUESTION_IDS = itertools.count()  # numbers the questions: no prompt is sent twice


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, new_tokens: int) -> dict:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunk_times, tokens, done = [], 0, False
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return {"ok": False, "error": event["error"]["message"]}
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["delta"].get("content"):
                    chunk_times.append(time.perf_counter())
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if not done or tokens != new_tokens or not chunk_times:
        return {"ok": False, "error": f"incomplete: done={done}, {tokens} of {new_tokens} tokens"}
    return {"ok": True, "tokens": tokens, "ttft": chunk_times[0] - start,
            "gaps": [b - a for a, b in zip(chunk_times, chunk_times[1:])]}


async def run_level(url: str, clients: int, requests_per_client: int, new_tokens: int) -> tuple[list[dict], float]:
    """One level: every request's result, and the level's wall time."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=clients)) as http:
        async def client(i: int) -> list[dict]:
            return [await one_request(http, url, f"Question {k}: {PROMPTS[k % len(PROMPTS)]}", new_tokens)
                    for k in (next(QUESTION_IDS) for _ in range(requests_per_client))]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        return results, time.perf_counter() - start


def prompt_counts(url: str) -> tuple[int, int]:
    """(prompt tokens admitted, of them reused) since the server started."""
    health = httpx.get(url + "/health", timeout=10).json()
    return health["prompt_tokens"], health["prompt_tokens_reused"]


def level_row(clients: int, rounds: list[tuple[list[dict], float]], prompt_tokens: tuple[int, int]) -> dict:
    """A level over its rounds: tokens/s of each round (the median reported), latencies pooled."""
    results = [r for rs, _ in rounds for r in rs]
    good = [r for r in results if r["ok"]]
    ttft = [r["ttft"] for r in good]
    gaps = [g for r in good for g in r["gaps"]]
    per_round = [sum(r["tokens"] for r in rs if r["ok"]) / wall for rs, wall in rounds]
    return {"clients": clients, "requests": len(results), "failed": len(results) - len(good),
            "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
            "tokens": sum(r["tokens"] for r in good), "seconds": sum(wall for _, wall in rounds),
            "tokens_per_s": statistics.median(per_round), "tokens_per_s_rounds": per_round,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99),
            "prompt_tokens": prompt_tokens[0], "prompt_tokens_reused": prompt_tokens[1]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lowbit.cli", "serve", "smollm2", "--bits", "4", "--group-size", str(args.group_size),
           "--device", args.device, "--port", str(port), "--max-batch", str(args.max_batch),
           "--max-seq-len", str(args.max_seq_len), "--max-queue", "256", "--model-name", "smollm2"]
    if not args.prefix_reuse:
        cmd += ["--no-prefix-reuse"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not come up in 10 minutes")


def table(result: dict) -> str:
    rows = result["levels"]
    base = rows[0]["tokens_per_s"]
    lines = [f"{result['machine']}; torch {result['torch']}, {result['threads']}; SmolLM2-135M-Instruct int4 (RTN, "
             f"group size {result['group_size']}) on {result['device']}, `lowbit serve --max-batch "
             f"{result['max_batch']}{'' if result['prefix_reuse'] else ' --no-prefix-reuse'}`; streaming chat "
             f"requests (a shared system prompt, distinct questions), greedy, {result['new_tokens']} new tokens each "
             f"(ignore_eos), {result['requests_per_client']} requests per client one after another; total tok/s: "
             f"median of {result['rounds']} interleaved rounds (each in the JSON), latencies over all rounds", "",
             "| clients | requests | failed | total tok/s | vs 1 client | TTFT p50 s | TTFT p99 s | ITL p50 ms "
             "| ITL p99 ms | prompt tokens reused |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.1f} | "
                     f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                     f"{r['itl_p50_ms']:.0f} | {r['itl_p99_ms']:.0f} | "
                     f"{r['prompt_tokens_reused'] / max(r['prompt_tokens'], 1):.0%} of {r['prompt_tokens']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 new tokens, one request per client")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every level (median tok/s)")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--max-seq-len", type=int, default=512, help="the server's --max-seq-len")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    parser.add_argument("--no-prefix-reuse", dest="prefix_reuse", action="store_false",
                        help="the server computes every prompt in full (lowbit serve --no-prefix-reuse)")
    parser.add_argument("--out", default=None, help="output path without extension")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.requests_per_client, args.rounds = 16, 1, 1
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        asyncio.run(run_level(url, max(args.clients), 1, 8))  # warm-up: every cache row and buffer size once
        runs = {clients: [] for clients in args.clients}
        prompts = {clients: [0, 0] for clients in args.clients}  # prompt tokens, reused
        for i in range(args.rounds):  # interleaved: every level once per round
            for clients in args.clients:
                before = prompt_counts(url)
                results, wall = asyncio.run(run_level(url, clients, args.requests_per_client, args.new_tokens))
                prompts[clients] = [a + b - c for a, b, c in zip(prompts[clients], prompt_counts(url), before)]
                runs[clients].append((results, wall))
                tokens = sum(r["tokens"] for r in results if r["ok"])
                print(f"round {i + 1}: {clients:>3} clients: {tokens / wall:.1f} tok/s, "
                      f"{sum(not r['ok'] for r in results)} failed of {len(results)}", flush=True)
        levels = [level_row(clients, rounds, prompts[clients]) for clients, rounds in runs.items()]
    finally:
        proc.terminate()
        proc.wait(60)
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda"
               else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} cores seen by torch")
    result = {"machine": machine, "torch": torch.__version__, "device": args.device,
              "threads": f"server threads {args.threads or 'default'}", "group_size": args.group_size,
              "max_batch": args.max_batch, "max_seq_len": args.max_seq_len, "prefix_reuse": args.prefix_reuse,
              "new_tokens": args.new_tokens,
              "requests_per_client": args.requests_per_client, "rounds": args.rounds, "levels": levels}
    out = Path(args.out or Path(__file__).parent / "results" / f"serve_{args.device}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print()
    print(table(result))


if __name__ == "__main__":
    main()
