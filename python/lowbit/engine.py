"""Continuous batching: concurrent generations share the model's decode steps.

The model's static KV cache has max_batch rows (slots); each running sequence holds one of them at its own
position. The engine loop (a background thread, or the caller's: Engine.run): take waiting requests into free
slots, then run one step for every running sequence and every new prompt at once, sample each sequence's row
with that request's own settings and random generator, and hand out the new text. With the fused CPU step that is
one call (a row per running sequence, the rows of each new prompt after them); on the PyTorch forward each new
prompt is prefilled on its own, then one decode step runs the others (decode_logits). Requests join and leave
between steps; a cancelled one gives its slot back before the next step.

Rows do not mix in the model (attention reads each sequence's own cache row, the kernels quantize activations
per row), so a request's tokens do not depend on what else is running.

Prefix reuse: a cache row keeps the keys and values of the last sequence that held it. A new request takes the
free row whose contents share the longest prefix with its prompt (chat requests share their template and
system prompt; a conversation's next turn extends the last one) and computes only the rest of its prompt. A
token's keys and values depend only on the tokens before it, and the CPU kernels compute each row alike
whatever else is in the step, so the output is the same as without reuse (test).
"""

import collections
import os
import threading
from typing import Callable

import torch

from .cpu_decode import FusedDecoder, unsupported
from .generate import Sampling, StopText, next_token
from .models.llama import LlamaForCausalLM


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's queue holds."""


class EngineStopped(RuntimeError):
    """The engine no longer takes requests (shutting down)."""


def decode_logits(model: LlamaForCausalLM, tokens: torch.Tensor, positions: torch.Tensor,
                  slots: torch.Tensor, fused: FusedDecoder | None = None) -> torch.Tensor:
    """One batched decode step, the engine's only call into the model while decoding: tokens [n] at positions
    [n] in cache rows slots [n] (int64, on the model's device) -> logits [n, vocab] of each one's next token.
    Through the fused CPU step when there is one (it runs each row independently of the others, as the model's
    forward does)."""
    if fused is not None:
        return fused(tokens, positions, slots)
    return model(tokens[:, None], positions[:, None], slots=slots)[:, 0]


# emit(text, finish_reason): a new piece of text (maybe ""), and finish_reason once at the end: "stop" (EOS or a
# stop string), "length" (max_new_tokens), "error" (Sequence.error says why). Called from the engine's thread;
# it must not raise.
Emit = Callable[[str, str | None], None]


class Sequence:
    """One request: its prompt, its sampling, its progress in the engine."""

    def __init__(self, prompt_ids: list[int], sampling: Sampling, emit: Emit, tokenizer, device: torch.device):
        self.prompt_ids, self.sampling, self.emit = prompt_ids, sampling, emit
        self.tokens: list[int] = []  # generated so far (without a final EOS)
        self.text = StopText(tokenizer, sampling.stop)
        self.generator = None if sampling.seed is None else torch.Generator(device).manual_seed(sampling.seed)
        self.slot: int | None = None
        self.reused = 0        # prompt tokens whose keys and values its cache row held already
        self.cached = 0        # positions of its cache row that hold its own tokens' keys and values
        self.cancelled = False
        self.finish_reason: str | None = None
        self.error: str | None = None

    @property
    def position(self) -> int:
        """Where the last sampled token goes in the cache."""
        return len(self.prompt_ids) + len(self.tokens) - 1


class Engine:
    """Runs requests (prompt token ids + Sampling) in continuous batches on one model: in a background thread, or
    with start=False in whichever thread calls run() (lowbit serve runs it in the main thread: see run()).

    max_batch: rows of the KV cache (sequences decoded together); max_seq_len: tokens per sequence, prompt
    and completion (capped at the model's max_position_embeddings); max_queue: requests that may wait for a
    slot before submit raises QueueFull; prefix_reuse: a new prompt starts from the longest prefix of it that a
    free cache row holds (the module docstring).
    """

    def __init__(self, model: LlamaForCausalLM, max_batch: int = 8, max_seq_len: int = 2048, max_queue: int = 64,
                 start: bool = True, prefix_reuse: bool = True):
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer")
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len), ("max_queue", max_queue)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.model = model
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_seq_len = min(max_seq_len, model.config.max_position_embeddings)
        model.setup_cache(max_batch, self.max_seq_len)
        # The fused C++ step where the model allows it (lowbit.cpu_decode), else the model's forward.
        self.fused = FusedDecoder(model) if unsupported(model) is None else None
        self.eos = set(model.config.eos_token_ids)
        self.prefix_reuse = prefix_reuse
        self.free_slots = list(range(max_batch))
        self.row_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # a free row's cached tokens, from 0
        self.running: list[Sequence] = []                      # the engine thread's alone
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.lock = threading.Condition()                      # guards waiting and stopping
        self.stopping = False
        self.steps = 0                                         # decode steps run (for tests and stats)
        self.prompt_tokens = self.reused_tokens = 0            # prompts admitted, and their tokens reused
        self.thread = threading.Thread(target=self.run, name="lowbit-engine", daemon=True) if start else None
        if self.thread is not None:
            self.thread.start()

    def submit(self, prompt_ids: list[int], sampling: Sampling, emit: Emit) -> Sequence:
        """Queue a request; its text comes through emit. Raises ValueError for a prompt that does not fit,
        QueueFull when the queue is full, EngineStopped after stop()."""
        n, m = len(prompt_ids), sampling.max_new_tokens
        if n == 0:
            raise ValueError("the prompt is empty")
        if m < 1:
            raise ValueError(f"max_tokens must be at least 1, got {m}")
        if n + m > self.max_seq_len:
            raise ValueError(f"the prompt ({n} tokens) plus max_tokens ({m}) is {n + m} tokens, beyond this "
                             f"server's context of {self.max_seq_len} tokens")
        if max(prompt_ids) >= self.model.config.vocab_size or min(prompt_ids) < 0:
            raise ValueError(f"token ids must be in 0..{self.model.config.vocab_size - 1}")
        seq = Sequence(list(prompt_ids), sampling, emit, self.model.tokenizer, self.model.device)
        with self.lock:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the queue holds "
                                f"{self.max_queue}); retry later")
            self.waiting.append(seq)
            self.lock.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Drop a request (its client went away): out of the queue now, out of its slot before the next step."""
        with self.lock:
            seq.cancelled = True
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.lock.notify()

    def load(self) -> dict:
        with self.lock:
            return {"running": len(self.running), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "decode_steps": self.steps, "prompt_tokens": self.prompt_tokens,
                    "prompt_tokens_reused": self.reused_tokens}

    def stop(self, timeout: float = 30.0) -> None:
        """Take no more requests, end the ones still waiting or running (finish_reason "error"), join the thread
        (with start=False: run() returns once it has done so)."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def run(self) -> None:
        """The engine loop, until stop(). The fused CPU step is fastest on the thread that loaded the model:
        OpenMP keeps a pool of workers per calling thread, and once a process holds more of them than it has
        cores, libgomp stops spinning between parallel regions and every region waits on a futex (SmolLM2's
        step on 2 cores: 3.5 ms from the main thread, 11 ms from a second one)."""
        with torch.inference_mode():
            while True:
                for seq in [s for s in self.running if s.cancelled]:
                    self._release(seq)
                with self.lock:
                    while not self.stopping and not self.waiting and not self.running:
                        self.lock.wait()
                    if self.stopping:
                        left = list(self.waiting) + self.running
                        self.waiting.clear()
                        break
                    admitted = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(self.free_slots)))]
                admitted = [seq for seq in admitted if not seq.cancelled]
                if self.fused is not None:
                    # One call for the running sequences' next tokens and the new prompts: the fused step
                    # computes every row on its own, and reads the weights once for all of them.
                    if admitted or self.running:
                        self._guarded(self.running + admitted, self._fused_step, list(self.running), admitted)
                    continue
                for seq in admitted:
                    self._guarded([seq], self._prefill, seq)
                if self.running:
                    # In slot order: low rows are taken first, so the rows are often consecutive and the model
                    # reads them from the cache in place.
                    seqs = sorted(self.running, key=lambda s: s.slot)
                    self._guarded(seqs, self._decode, seqs)
        for seq in left:
            self._finish(seq, "error", error="the server is shutting down")

    def _guarded(self, seqs: list[Sequence], step, *args) -> None:
        """Run a prefill or decode step; an exception ends those sequences with an error, not the engine."""
        try:
            step(*args)
        except Exception as e:  # noqa: BLE001 (reported to the requests concerned)
            for seq in seqs:
                if seq.finish_reason is None:
                    self._finish(seq, "error", error=f"{type(e).__name__}: {e}")

    def _take_slot(self, seq: Sequence) -> None:
        """Give seq the free cache row holding the longest prefix of its prompt (the lowest row on ties, so that
        rows are often consecutive and the PyTorch forward reads them in place); at least the prompt's last
        token is computed (its logits give the first new token)."""
        lengths = {slot: len(os.path.commonprefix([self.row_tokens[slot], seq.prompt_ids])) if self.prefix_reuse
                   else 0 for slot in self.free_slots}
        seq.slot = max(self.free_slots, key=lambda slot: (lengths[slot], -slot))
        self.free_slots.remove(seq.slot)
        self.row_tokens[seq.slot] = []
        seq.reused = seq.cached = min(lengths[seq.slot], len(seq.prompt_ids) - 1)
        self.prompt_tokens += len(seq.prompt_ids)
        self.reused_tokens += seq.reused
        self.running.append(seq)

    def _prefill(self, seq: Sequence) -> None:
        self._take_slot(seq)
        device, n, start = self.model.device, len(seq.prompt_ids), seq.reused
        prompt = torch.tensor([seq.prompt_ids[start:]], device=device)
        logits = self.model(prompt, torch.arange(start, n, device=device),
                            slots=torch.tensor([seq.slot], device=device))
        seq.cached = n
        self._advance_all([seq], logits[:, -1])

    def _fused_step(self, decoding: list[Sequence], prompts: list[Sequence]) -> None:
        """One fused call: a row per decoding sequence (its last token), then every row of each new prompt."""
        tokens = [s.tokens[-1] for s in decoding]
        positions = [s.position for s in decoding]
        slots = [s.slot for s in decoding]
        logit_rows = list(range(len(decoding)))
        for seq in prompts:
            self._take_slot(seq)
            n = len(seq.prompt_ids)
            tokens += seq.prompt_ids[seq.reused:]
            positions += range(seq.reused, n)
            slots += [seq.slot] * (n - seq.reused)
            logit_rows.append(len(tokens) - 1)
        logits = self.fused(torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots),
                            torch.tensor(logit_rows))
        if decoding:
            self.steps += 1
        for seq, position in zip(decoding, positions):
            seq.cached = position + 1
        for seq in prompts:
            seq.cached = len(seq.prompt_ids)
        self._advance_all(decoding + prompts, logits)

    def _decode(self, seqs: list[Sequence]) -> None:
        device = self.model.device
        tokens = torch.tensor([s.tokens[-1] for s in seqs], device=device)
        positions = torch.tensor([s.position for s in seqs], device=device)
        slots = torch.tensor([s.slot for s in seqs], device=device)
        logits = decode_logits(self.model, tokens, positions, slots, self.fused)
        self.steps += 1
        for seq in seqs:
            seq.cached = seq.position + 1
        self._advance_all(seqs, logits)

    def _advance_all(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Each sequence's next token from its row of logits [len(seqs), vocab]: the greedy ones' argmax in one
        call (a call per row took ~5 % of a 16-row step, profiled), the others sampled one by one."""
        greedy = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            s = seq.sampling
            plain_greedy = s.temperature == 0 and s.repetition_penalty == 1.0
            self._advance(seq, greedy[i] if plain_greedy else self._sample(seq, logits[i:i + 1]))

    @staticmethod
    def _sample(seq: Sequence, logits: torch.Tensor) -> int:
        s = seq.sampling
        # The history matters only to the repetition penalty: built only then.
        history = (torch.tensor([seq.prompt_ids + seq.tokens], device=logits.device)
                   if s.repetition_penalty != 1.0 else None)
        return int(next_token(logits, history, s, seq.generator)[0])

    def _advance(self, seq: Sequence, token: int) -> None:
        """Take seq's next token and pass on its text; finish it when it is done."""
        s = seq.sampling
        if token in self.eos and not s.ignore_eos:
            self._finish(seq, "stop", seq.text.flush())
            return
        seq.tokens.append(token)
        piece = seq.text.push(token)
        if seq.text.stopped:
            self._finish(seq, "stop", piece)
        elif len(seq.tokens) == s.max_new_tokens:
            self._finish(seq, "length", piece + seq.text.flush())
        elif piece:
            seq.emit(piece, None)

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
            # What the row holds now: a failed step leaves seq.cached where it was, and wrote only beyond it.
            self.row_tokens[seq.slot] = (seq.prompt_ids + seq.tokens)[:seq.cached]

    def _finish(self, seq: Sequence, reason: str, piece: str = "", error: str | None = None) -> None:
        self._release(seq)
        seq.finish_reason, seq.error = reason, error
        seq.emit(piece, reason)
