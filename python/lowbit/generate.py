"""Text generation: sampling, streaming and chat on top of LlamaForCausalLM's static KV cache.

The prompt runs as one forward; every further token runs the model's decode step, whose shapes do not change
from token to token: on the CPU it is the fused C++ step (lowbit.cpu_decode) where the model allows it, on CUDA
it is captured once in a CUDA graph and replayed, and with compile=True it is torch.compile'd once (no
recompilation as the position advances).
"""

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .cpu_decode import FusedDecoder, model_signature, unsupported
from .models.llama import LlamaForCausalLM


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 means greedy (argmax)."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)   # stop strings (text), besides the model's EOS tokens
    seed: int | None = None
    ignore_eos: bool = False  # always produce max_new_tokens (benchmarks)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    warm_up_seconds: float = 0.0  # compiling or capturing the decode step, before the clock of the others starts
    decode_path: str = ""         # which decode step ran: DecodeStep.path

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes from the prefill; the decode loop makes the rest.
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds and self.new_tokens > 1 else 0.0

    def __str__(self) -> str:
        warm_up = f"; decode step prepared in {self.warm_up_seconds:.1f} s" if self.warm_up_seconds else ""
        path = f" ({self.decode_path})" if self.decode_path else ""
        return (f"prefill {self.prompt_tokens} tokens at {self.prefill_tokens_per_s:.1f} tok/s, "
                f"decode {self.new_tokens} tokens at {self.decode_tokens_per_s:.1f} tok/s{path}{warm_up}")


def next_token(logits: torch.Tensor, history: torch.Tensor, s: Sampling, generator) -> torch.Tensor:
    """logits [B, V] (float32), history [B, T] token ids so far -> next token ids [B]."""
    if s.repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(seen > 0, seen / s.repetition_penalty,
                                                        seen * s.repetition_penalty))
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k is not None and s.top_k < logits.shape[-1]:
        kth = logits.topk(s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p is not None and s.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # tokens after the nucleus already holds top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class DecodeStep:
    """logits [B, vocab] of one new token per sequence at one position, from fixed buffers. One of:
    "fused": the fused C++ step on the CPU (lowbit.cpu_decode), unless fused=False or the model needs another;
    "compiled": torch.compile'd once for these shapes (compile=True); "cuda graph": on CUDA, captured at the
    first call and replayed after it; "eager": the model's forward. The returned logits may be overwritten
    by the next call."""

    def __init__(self, model: LlamaForCausalLM, batch: int, compile: bool = False, fused: bool = True):
        self.model, self.compile, self.fused = model, compile, fused
        self.cache = model.layers[0].attn.kv_cache  # the graph writes into these tensors
        self.signature = model_signature(model)
        with torch.inference_mode(False):  # buffers usable in and out of inference mode
            self.token = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
            self.position = torch.zeros(1, dtype=torch.long, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.decoder = FusedDecoder(model) if fused and not compile and unsupported(model) is None else None
        if self.decoder is not None:
            self.path = "fused"
            self.positions = torch.zeros(batch, dtype=torch.long)
            self.slots = torch.arange(batch)
        else:
            self.path = "compiled" if compile else "cuda graph" if model.device.type == "cuda" else "eager"
        self.forward = torch.compile(model, dynamic=False, fullgraph=True) if compile else model
        self.ready = self.path in ("fused", "eager")  # nothing to compile or capture

    def warm_up(self, position: int) -> float:
        """Compile or capture now (one step with a dummy token at `position`, which the real step at that
        position overwrites in the cache); returns the seconds it took, 0 when there was nothing to do."""
        if self.ready:
            return 0.0
        start = time.perf_counter()
        self(torch.zeros(self.token.shape[0], dtype=torch.long, device=self.token.device), position)
        if self.token.device.type == "cuda":
            torch.cuda.synchronize(self.token.device)
        self.ready = True
        return time.perf_counter() - start

    def fits(self, model: LlamaForCausalLM, batch: int, compile: bool, fused: bool) -> bool:
        return (model.layers[0].attn.kv_cache is self.cache and self.token.shape[0] == batch
                and self.compile == compile and self.fused == fused and model_signature(model) == self.signature)

    def __call__(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if self.decoder is not None:
            self.positions.fill_(position)
            return self.decoder(token.view(-1), self.positions, self.slots)
        self.token.copy_(token.view(-1, 1))
        self.position.fill_(position)
        if self.token.device.type != "cuda":
            return self.forward(self.token, self.position)[:, -1]
        if self.graph is None:
            with torch.cuda.device(self.token.device):  # captured on the model's GPU, not the current one
                side = torch.cuda.Stream()  # warm-up (and compilation) off the capture
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self.forward(self.token, self.position)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = self.forward(self.token, self.position)[:, -1]
        self.graph.replay()
        return self.logits


def decode_step(model: LlamaForCausalLM, batch: int, compile: bool = False, fused: bool = True) -> DecodeStep:
    """The model's decode step for its current cache and weights, made (and captured or compiled) once and then
    reused. It is kept on the model (model.decode_step), so it goes when the model does."""
    step = model.decode_step
    if step is None or not step.fits(model, batch, compile, fused):
        model.decode_step = None  # the old step (a CUDA graph's memory) goes before the new one is made
        step = model.decode_step = DecodeStep(model, batch, compile, fused)
    return step


@torch.inference_mode()
def generate_tokens(model: LlamaForCausalLM, tokens: torch.Tensor, sampling: Sampling,
                    stats: Stats | None = None, compile: bool = False, fused: bool = True) -> Iterator[torch.Tensor]:
    """tokens [B, T] (equal-length prompts) -> yields the next token ids [B] step by step.

    Stops after max_new_tokens, or once every sequence has produced an EOS token (sequences that
    finished earlier keep yielding EOS) unless sampling.ignore_eos.
    """
    stats = stats if stats is not None else Stats()
    b, t = tokens.shape
    if t == 0:
        raise ValueError("the prompt is empty")
    total = t + sampling.max_new_tokens
    cache = model.layers[0].attn.kv_cache
    if (cache is None or model.max_seq_len < total or cache.k.shape[0] != b
            or cache.k.dtype != model.cache_dtype):
        model.setup_cache(b, max(-(-total // 256) * 256, 256))
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    eos = torch.tensor(model.config.eos_token_ids or [-1], device=model.device)
    history = tokens.to(model.device)
    finished = torch.zeros(b, dtype=torch.bool, device=history.device)
    stats.prompt_tokens = t * b
    step_fn = decode_step(model, b, compile, fused)
    stats.decode_path = step_fn.path
    if sampling.max_new_tokens > 1:  # before the prefill: position t is the first the decode step writes
        stats.warm_up_seconds = step_fn.warm_up(t)
    start = time.perf_counter()
    if step_fn.decoder is not None:  # the fused step runs the prompt too, all its tokens in one call
        logits = step_fn.decoder.prefill(history)
    else:
        logits = model(history, torch.arange(t, device=model.device))[:, -1]
    for step in range(sampling.max_new_tokens):
        nxt = next_token(logits, history, sampling, generator)
        if not sampling.ignore_eos:
            nxt = torch.where(finished, eos[0], nxt)
            finished |= torch.isin(nxt, eos)
        now = time.perf_counter()
        if step == 0:
            stats.prefill_seconds = now - start
            start = now
        else:
            stats.decode_seconds = now - start
        stats.new_tokens = step + 1
        yield nxt
        if step + 1 == sampling.max_new_tokens or (not sampling.ignore_eos and bool(finished.all())):
            return
        history = torch.cat([history, nxt[:, None]], dim=1)
        logits = step_fn(nxt, history.shape[1] - 1)


def prompt_ids(model: LlamaForCausalLM, prompt: str | list[dict]) -> list[int]:
    """A text prompt, or a chat (list of {"role", "content"} messages) through the model's chat template."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the model has no tokenizer")
    if isinstance(prompt, str):
        return tok.encode(prompt)
    return tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True), add_special_tokens=False)


class StopText:
    """Token ids -> text pieces, never splitting a character, and holding back text that may still become the
    start of a stop string; once a stop string appears, the text before it is the last piece and .stopped is set."""

    def __init__(self, tokenizer, stop: list[str]):
        self.decoder = tokenizer.stream()
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.pending += self.decoder.push(token)
        return self._release(self.hold)

    def flush(self) -> str:
        """The text still held back, at the end of generation."""
        self.pending += self.decoder.flush()
        return self._release(0)

    def _release(self, hold: int) -> str:
        cut = min((self.pending.find(s) for s in self.stop if s in self.pending), default=-1)
        if cut >= 0:
            self.stopped = True
            piece, self.pending = self.pending[:cut], ""
            return piece
        piece = self.pending[:max(len(self.pending) - hold, 0)]
        self.pending = self.pending[len(piece):]
        return piece


class TextStream:
    """Iterates over the text pieces of one generation as they are produced; .stats after the end."""

    def __init__(self, model: LlamaForCausalLM, prompt: str | list[dict], sampling: Sampling,
                 compile: bool = False, fused: bool = True):
        self.model, self.sampling, self.compile, self.fused = model, sampling, compile, fused
        self.ids = prompt_ids(model, prompt)
        self.stats = Stats()
        self.tokens: list[int] = []

    def __iter__(self) -> Iterator[str]:
        text = StopText(self.model.tokenizer, self.sampling.stop)
        eos = set(self.model.config.eos_token_ids)
        prompt = torch.tensor([self.ids], device=self.model.device)
        for nxt in generate_tokens(self.model, prompt, self.sampling, self.stats, self.compile, self.fused):
            token = int(nxt[0])
            if token in eos and not self.sampling.ignore_eos:
                break
            self.tokens.append(token)
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                return
        piece = text.flush()
        if piece:
            yield piece


def stream(model: LlamaForCausalLM, prompt: str | list[dict], compile: bool = False, fused: bool = True,
           **sampling) -> TextStream:
    """Text pieces as they are generated: `for piece in stream(model, "Once upon a time"): print(piece, end="")`.
    sampling: the fields of Sampling. The decode step (DecodeStep): the fused C++ step on the CPU where the model
    allows it (fused=False: the model's forward); compile=True torch.compiles it (once per model and cache)."""
    return TextStream(model, prompt, Sampling(**sampling), compile, fused)


def generate(model: LlamaForCausalLM, prompt: str | list[dict], compile: bool = False, fused: bool = True,
             **sampling) -> str:
    """The whole completion of a text prompt or a chat, as one string."""
    return "".join(stream(model, prompt, compile, fused, **sampling))
