"""`lowbit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

POST /v1/chat/completions and /v1/completions (server-sent events with stream=true, ending in `data: [DONE]`),
GET /v1/models, GET /health, and a chat page at /. Errors are OpenAI-style objects
{"error": {"message", "type", "param", "code"}}. Needs the `serve` extra: pip install 'lowbit[serve]'.
"""

import asyncio
import json
import secrets
import signal
import threading
import time
import uuid
import weakref
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

import torch
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, EngineStopped, QueueFull, Sequence
from .eval import linear_stats, model_bytes
from .generate import Sampling
from .models.llama import LlamaForCausalLM

MAX_STOP_STRINGS = 4  # as OpenAI's API
CANCELLED = "cancelled"  # the client went away


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# Request bodies. Fields OpenAI defines and this server does not use (user, logprobs, ...) are ignored.

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)                      # not OpenAI's; as vLLM and llama.cpp
    repetition_penalty: float = Field(1.0, gt=0)               # likewise
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False                                   # as vLLM: always max_tokens (benchmarks)
    n: int = Field(1, ge=1, le=1)                              # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None

    def sampling(self, max_tokens: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS or not all(stop):
            raise APIError(400, f"stop: up to {MAX_STOP_STRINGS} non-empty strings", param="stop")
        return Sampling(max_new_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                        top_p=self.top_p, repetition_penalty=self.repetition_penalty, stop=stop, seed=self.seed,
                        ignore_eos=self.ignore_eos)


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(GenerationRequest):
    prompt: str | list[int]


def model_info(model: LlamaForCausalLM, name: str) -> dict:
    """What the chat page shows: the weight format, bits per weight of the quantized layers, size."""
    q = getattr(model, "quantization", None)
    weights, nbytes = linear_stats(model)
    return {"name": name,
            "format": (f"mixed formats for {q['bits_per_weight']['target']:g} bits/weight, {q['method'].upper()}"
                       if q and "bits_per_weight" in q else
                       f"int{q['bits']:g} {q['method'].upper()}, group size {q['group_size']}" if q
                       else f"{str(model.dtype).removeprefix('torch.')} (not quantized)"),
            "bits_per_weight": round(8 * nbytes / weights, 3) if weights else torch.finfo(model.dtype).bits,
            "size_mb": round(model_bytes(model) / 1e6, 1), "device": str(model.device)}


class EventRelay:
    """Hands the engine thread's events to one event loop's queues: a decode step's events (one per running
    request) go over in one wake-up of the loop, not one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple]] = []

    def send(self, queue: asyncio.Queue, event: tuple) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:  # a wake-up is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, event in pending:
            queue.put_nowait(event)


_relays: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, EventRelay]" = weakref.WeakKeyDictionary()


def relay_for(loop: asyncio.AbstractEventLoop) -> EventRelay:
    if loop not in _relays:
        _relays[loop] = EventRelay(loop)
    return _relays[loop]


class Run:
    """One request in the engine as the event loop sees it: the engine's events arrive in an asyncio queue, and a
    client that goes away cancels the request (its slot is free before the next decode step)."""

    def __init__(self, engine: Engine, request: Request, prompt_ids: list[int], sampling: Sampling, param: str):
        self.engine, self.prompt_tokens = engine, len(prompt_ids)
        self.relay = relay_for(asyncio.get_running_loop())
        self.events: asyncio.Queue = asyncio.Queue()
        try:
            self.seq: Sequence = engine.submit(prompt_ids, sampling, self._emit)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from e
        except EngineStopped as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from e
        except ValueError as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
        self.watcher = asyncio.create_task(self._watch(request))

    def _emit(self, text: str, finish_reason: str | None) -> None:
        self.relay.send(self.events, (text, finish_reason))

    async def _watch(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(self.seq)
        self.events.put_nowait(("", CANCELLED))  # the engine says nothing more about a cancelled request

    async def pieces(self):
        """(text, finish_reason) as they come, up to the one with a finish_reason; nothing more once the client
        has gone."""
        try:
            while True:
                text, finish_reason = await self.events.get()
                if finish_reason == CANCELLED:
                    return
                yield text, finish_reason
                if finish_reason is not None:
                    return
        finally:
            self.watcher.cancel()
            if self.seq.finish_reason is None:
                self.engine.cancel(self.seq)

    def usage(self) -> dict:
        n = len(self.seq.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def error(self) -> APIError:
        return APIError(500, f"generation failed: {self.seq.error}", "server_error")


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, model_name: str, api_key: str | None = None) -> FastAPI:
    model = engine.model
    info = {**model_info(model, model_name), "context": engine.max_seq_len, "max_batch": engine.max_batch,
            "kv_cache_dtype": str(model.cache_dtype).removeprefix("torch.")}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.stop()  # after uvicorn has let the open requests finish

    app = FastAPI(title="lowbit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        message = "the body is not valid JSON" if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
        return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "a valid API key is required (Authorization: Bearer KEY)", code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {model_name!r}", param="model",
                           code="model_not_found")

    def check_prompt(ids: list[int], param: str) -> None:
        if len(ids) >= engine.max_seq_len:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server's context is {engine.max_seq_len} "
                                f"tokens (prompt plus max_tokens)", param=param, code="context_length_exceeded")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return resources.files("lowbit").joinpath("web/chat.html").read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "lowbit", "lowbit": info}]}

    async def respond(request: Request, body: GenerationRequest, prompt_ids: list[int], max_tokens: int, chat: bool):
        run = Run(engine, request, prompt_ids, body.sampling(max_tokens), "messages" if chat else "prompt")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": model_name}

        def choice(text: str | None, finish_reason: str | None) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return {"index": 0, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish_reason}

        if not body.stream:
            parts, finish_reason = [], None
            async for text, finish_reason in run.pieces():
                parts.append(text)
            if finish_reason is None:  # the client went away: nobody reads this answer
                raise APIError(499, "the client closed the connection")
            if finish_reason == "error":
                raise run.error()
            text = "".join(parts)
            result = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": finish_reason} if chat else choice(text, finish_reason))
            return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [result],
                    "usage": run.usage()}

        async def events():
            if chat:
                yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            async for text, finish_reason in run.pieces():
                if finish_reason == "error":
                    yield sse(run.error().body())
                elif finish_reason is not None:
                    if text:
                        yield sse({**head, "choices": [choice(text, None)]})
                    yield sse({**head, "choices": [choice(None, finish_reason)]})
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse({**head, "choices": [], "usage": run.usage()})
                elif text:
                    yield sse({**head, "choices": [choice(text, None)]})
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request, body: ChatRequest):
        check_model(body.model)
        tok = model.tokenizer
        if not tok.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)
        except Exception as e:  # noqa: BLE001 (a template may reject a conversation, e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        check_prompt(ids, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or engine.max_seq_len - len(ids)
        return await respond(request, body, ids, max_tokens, chat=True)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request, body: CompletionRequest):
        check_model(body.model)
        ids = model.tokenizer.encode(body.prompt) if isinstance(body.prompt, str) else body.prompt
        check_prompt(ids, "prompt")
        return await respond(request, body, ids, body.max_tokens or 16, chat=False)  # 16: OpenAI's default

    return app


def serve(model: LlamaForCausalLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          max_seq_len: int = 2048, max_queue: int = 64, api_key: str | None = None,
          shutdown_timeout: float = 60.0, prefix_reuse: bool = True) -> None:
    """Serve until SIGINT or SIGTERM; open requests get up to shutdown_timeout seconds to finish.

    The engine runs in this (the main) thread, where the model was loaded (Engine.run says why), and uvicorn in
    a second one; the signals reach uvicorn's handler from here. The app's shutdown stops the engine once the
    open requests are done, and a server that could not start stops it too."""
    engine = Engine(model, max_batch=max_batch, max_seq_len=max_seq_len, max_queue=max_queue, start=False,
                    prefix_reuse=prefix_reuse)
    app = create_app(engine, model_name, api_key)
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=shutdown_timeout,
                            log_level="info")
    server = uvicorn.Server(config)

    def run_http() -> None:
        try:
            server.run()
        finally:
            engine.stop()

    http = threading.Thread(target=run_http, name="lowbit-http")
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        engine.run()
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise SystemExit(f"lowbit serve: the server did not start on {host}:{port} (see the log above)")
