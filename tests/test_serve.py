"""`lowbit serve`: the continuous-batching engine, the OpenAI-compatible API (through the real `openai` client
and plain HTTP), faults (disconnects, a full queue, SIGTERM, API keys) and the chat page in a real browser.

Most tests use a tiny random-weight model with SmolLM2's tokenizer and chat template (fast, real text
handling); the browser test uses SmolLM2 int4 itself for a readable screenshot.
"""

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.engine import Engine, EngineStopped, QueueFull
from lowbit.generate import Sampling
from lowbit.models.llama import LlamaConfig, LlamaForCausalLM
from lowbit.tokenizer import Tokenizer

fastapi = pytest.importorskip("fastapi", reason="lowbit serve needs the serve extra (make install installs it)")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from lowbit.server import create_app  # noqa: E402  (after the skips: it imports fastapi)

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "serve_chat.png"
NAME = "tiny"


@pytest.fixture(scope="module")
def tiny(smollm2_dir):
    """Random int4 weights (the output head too), SmolLM2's vocabulary, tokenizer and chat template; a float16 KV
    cache, as `lowbit serve` keeps it on the CPU."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    model.tokenizer = Tokenizer.from_dir(smollm2_dir)
    model.kv_cache_dtype = torch.float16
    return lowbit.quantize_model(model, 4, 128, quantize_lm_head=True)


@contextlib.contextmanager
def serving(model, api_key=None, name=NAME, **engine_args):
    """An engine and the app on a free port, uvicorn in a thread; yields (base URL, engine)."""
    engine = Engine(model, **engine_args)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name, api_key), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(30)
        assert not engine.thread.is_alive(), "the engine did not stop with the server"


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tiny):
    with serving(tiny, max_batch=16, max_seq_len=256, max_queue=64) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a colour."}]


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME]
    info = models[0].model_extra["lowbit"]
    assert info["format"] == "int4 RTN, group size 128" and 4 < info["bits_per_weight"] < 5
    assert info["context"] == 256 and info["size_mb"] > 0 and info["kv_cache_dtype"] == "float16"
    health = httpx.get(server[0] + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16


def test_chat_with_the_openai_client(tiny, client):
    reply = client.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=12)
    text = reply.choices[0].message.content
    prompt = tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(CHAT), add_special_tokens=False)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.total_tokens == len(prompt) + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.choices[0].message.role == "assistant"
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 12
    # Streaming gives the same text in pieces, a finish reason, then the usage (stream_options).
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, temperature=0, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text and sum(1 for p in pieces if p) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_match_the_library(tiny, client):
    # The engine's batched path gives what lowbit.generate gives on its own (greedy, same tokens).
    prompt = "The three primary colours are"
    completion = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=10)
    expected = lowbit.generate(copy.deepcopy(tiny), prompt, max_new_tokens=10)  # a copy: the engine owns the cache
    assert completion.choices[0].text == expected
    streamed = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    # A stop string cuts the text before it; finish_reason "stop".
    stop = expected[len(expected) // 2:len(expected) // 2 + 3]
    cut = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=10, stop=[stop])
    assert cut.choices[0].text == expected[:expected.index(stop)] and cut.choices[0].finish_reason == "stop"
    # Token ids as the prompt.
    ids = tiny.tokenizer.encode(prompt)
    assert client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=10).choices[0].text == expected


def test_sampling_seed_is_reproducible(client):
    kw = dict(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.9,
              extra_body={"top_k": 50})  # top_k: an extension, as in vLLM and llama.cpp
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert a == client.completions.create(seed=7, **kw).choices[0].text
    assert a != client.completions.create(seed=8, **kw).choices[0].text


def test_greedy_output_does_not_depend_on_concurrency(server, client):
    prompts = [f"Request {i}: tell me about the number {i * 7}." for i in range(16)]

    def complete(prompt):
        return client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12).choices[0].text

    engine = server[1]
    steps = engine.load()["decode_steps"]
    alone = [complete(p) for p in prompts]
    steps_alone = engine.load()["decode_steps"] - steps
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(complete, prompts))
    steps_together = engine.load()["decode_steps"] - steps - steps_alone
    assert together == alone
    assert len(set(alone)) > 1                 # the prompts really differ in their outputs
    assert steps_together < steps_alone / 2    # and the requests really shared decode steps


def test_http_errors_are_openai_error_objects(server):
    url = server[0] + "/v1/chat/completions"
    good = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def error(status, **kw):
        response = httpx.post(kw.pop("to", url), **kw)
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert set(body) == {"message", "type", "param", "code"} and body["message"]
        return body

    assert "JSON" in error(400, content=b'{"model": ', headers={"Content-Type": "application/json"})["message"]
    assert error(400, json={**good, "messages": "hi"})["param"] == "messages"
    assert error(400, json={**good, "temperature": "hot"})["param"] == "temperature"
    assert error(400, json={**good, "max_tokens": 0})["param"] == "max_tokens"
    assert error(400, json={**good, "n": 2})["param"] == "n"
    assert error(400, json={**good, "stop": ["a"] * 5})["param"] == "stop"
    assert error(400, json={**good, "messages": [{"role": "wizard", "content": "hi"}]})["param"].startswith("messages")
    assert error(400, json={k: v for k, v in good.items() if k != "model"})["param"] == "model"
    assert error(404, json={**good, "model": "gpt-4"})["code"] == "model_not_found"
    too_long = error(400, to=server[0] + "/v1/completions", json={"model": NAME, "prompt": "word " * 300})
    assert "256" in too_long["message"] and too_long["code"] == "context_length_exceeded"
    beyond = error(400, json={**good, "max_tokens": 1000})
    assert "256" in beyond["message"] and "max_tokens" in beyond["message"]
    error(404, to=server[0] + "/v1/nothing", json=good)
    # And the server still serves.
    assert httpx.post(url, json=good).json()["choices"][0]["message"]["role"] == "assistant"


def test_api_key(tiny):
    with serving(tiny, api_key="s3cret", max_batch=1, max_seq_len=64) as (url, _):
        assert httpx.get(url + "/v1/models").status_code == 401
        wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=NAME, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200


def test_disconnect_frees_the_slot_and_a_full_queue_gives_429(tiny):
    long = {"model": NAME, "prompt": "Tell me a long story.", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}  # the random model might say EOS early
    with serving(tiny, max_batch=1, max_seq_len=4096, max_queue=1) as (url, engine), httpx.Client() as http:
        with http.stream("POST", url + "/v1/completions", json=long) as first:
            events = first.iter_lines()
            assert next(events).startswith("data: ")  # generating: holds the only slot
            assert engine.load()["running"] == 1
            with http.stream("POST", url + "/v1/completions", json=long):
                wait_for(lambda: engine.load()["waiting"] == 1)
                third = httpx.post(url + "/v1/completions", json=long)
                assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
            wait_for(lambda: engine.load()["waiting"] == 0)  # the second client left the queue
        # The first client hung up mid-stream: its slot is free at once, its decoding stopped.
        start = time.monotonic()
        wait_for(lambda: engine.load()["running"] == 0)
        assert time.monotonic() - start < 2.0
        steps = engine.load()["decode_steps"]
        time.sleep(0.3)
        assert engine.load()["decode_steps"] == steps < 4000
        # And the slot serves the next request.
        reply = http.post(url + "/v1/completions", json={**long, "stream": False, "max_tokens": 3}).json()
        assert reply["usage"]["completion_tokens"] >= 1
        # A client of a non-streaming request that gives up frees the slot too.
        with pytest.raises(httpx.ReadTimeout):
            http.post(url + "/v1/completions", json={**long, "stream": False}, timeout=0.5)
        wait_for(lambda: engine.load()["running"] == 0, timeout=2.0)


def test_engine_limits_queue_and_cancel(tiny):
    engine = Engine(tiny, max_batch=1, max_seq_len=512, max_queue=1)
    finished = []

    def emit(text, finish_reason):
        if finish_reason:
            finished.append(finish_reason)

    try:
        with pytest.raises(ValueError, match="empty"):
            engine.submit([], Sampling(max_new_tokens=4), emit)
        with pytest.raises(ValueError, match="context of 512 tokens"):
            engine.submit([1] * 510, Sampling(max_new_tokens=4), emit)
        with pytest.raises(ValueError, match="token ids"):
            engine.submit([49152], Sampling(max_new_tokens=4), emit)
        long = Sampling(max_new_tokens=500, ignore_eos=True)
        running = engine.submit([1, 2, 3], long, emit)
        wait_for(lambda: engine.load()["running"] == 1)
        waiting = engine.submit([1, 2, 3], long, emit)
        with pytest.raises(QueueFull):
            engine.submit([1, 2, 3], long, emit)
        engine.cancel(waiting)
        assert engine.load()["waiting"] == 0
        engine.cancel(running)
        wait_for(lambda: engine.load()["running"] == 0)
        assert len(running.tokens) < 500 and not waiting.tokens and not finished  # cancelled: no finish event
        short = Sampling(max_new_tokens=20, ignore_eos=True)
        seqs = []
        for _ in range(2):  # the queue holds one
            seqs.append(engine.submit([1, 2, 3], short, emit))
            wait_for(lambda: engine.load()["waiting"] == 0)
        wait_for(lambda: len(finished) == 2)
        assert finished == ["length", "length"] and [len(s.tokens) for s in seqs] == [20, 20]
        assert seqs[0].tokens == seqs[1].tokens  # one after the other in the same slot, over stale cache contents
    finally:
        engine.stop()
    with pytest.raises(EngineStopped):
        engine.submit([1, 2, 3], Sampling(max_new_tokens=2), emit)


def _run_alone(engine: Engine, prompt: list[int], new_tokens: int = 12):
    """One greedy request on its own: its sequence once finished."""
    done = threading.Event()
    seq = engine.submit(prompt, Sampling(max_new_tokens=new_tokens, ignore_eos=True),
                        lambda text, finish_reason: finish_reason and done.set())
    assert done.wait(60), "the request did not finish"
    assert seq.finish_reason == "length", seq.error
    return seq


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "pytorch-forward"])
def test_prefix_reuse_gives_the_tokens_of_a_full_prefill(tiny, fused):
    tok = tiny.tokenizer

    def chat(messages):
        return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)

    first = chat(CHAT)
    engine = Engine(copy.deepcopy(tiny), max_batch=4, max_seq_len=256)
    fresh = Engine(copy.deepcopy(tiny), max_batch=4, max_seq_len=256, prefix_reuse=False)
    if not fused:
        engine.fused = fresh.fused = None
    try:
        one = _run_alone(engine, first)
        assert one.reused == 0 and one.slot == 0
        # The next turn: the first prompt, its reply and a new question. Its row holds all but the reply's last
        # token (sampled, never fed back).
        reply = tok.decode(one.tokens)
        second = chat(CHAT + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And another?"}])
        shared = len(os.path.commonprefix([second, first + one.tokens]))
        two = _run_alone(engine, second)
        assert two.slot == 0 and two.reused == min(shared, len(first) + len(one.tokens) - 1) > len(first) // 2
        # Another conversation shares the chat template's start with it, and takes that row too.
        other = chat([{"role": "user", "content": "What is a prime number?"}])
        three = _run_alone(engine, other)
        assert three.slot == 0 and 0 < three.reused < len(other) - 1
        load = engine.load()
        assert load["prompt_tokens"] == len(first) + len(second) + len(other)
        assert load["prompt_tokens_reused"] == two.reused + three.reused
        # The same prompts computed in full on a copy of the model: the same tokens.
        assert [_run_alone(fresh, p).tokens for p in (second, other)] == [two.tokens, three.tokens]
        assert fresh.load()["prompt_tokens_reused"] == 0
    finally:
        engine.stop()
        fresh.stop()


@pytest.mark.slow
def test_sigterm_finishes_open_requests(tiny, tmp_path):
    checkpoint = lowbit.save_quantized(tiny, tmp_path / "tiny-int4")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "serve", str(checkpoint), "--port", str(port),
                             "--max-batch", "2", "--max-seq-len", "2048", "--model-name", NAME],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: proc.poll() is None and not _refused(url), timeout=120)
        body = {"model": NAME, "prompt": "Count:", "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: _refused(url))  # no new connections ...
            rest = [line for line in lines if line]  # ... while the open request runs to its end
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        # uvicorn ends by re-raising the signal it handled, once the shutdown is done.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "Shutting down" in output, output


def _refused(url) -> bool:
    try:
        httpx.get(url + "/health", timeout=5)
        return False
    except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
        # Refused, or (the listening socket closing as it was connected to) closed without an answer.
        return True


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths: Debian's packages (make test installs them where apt-get can)."""
    import shutil
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.mark.slow
def test_chat_page_in_a_headless_browser(smollm2):
    webdriver = pytest.importorskip("selenium.webdriver")
    browser = find_browser()
    if browser is None:
        pytest.skip("no Chromium with chromedriver here (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    model = lowbit.quantize_model(smollm2, 4, 64, inplace=False)
    with serving(model, name="SmolLM2-135M-Instruct", max_batch=2, max_seq_len=1024) as (url, _):
        options = webdriver.ChromeOptions()
        options.binary_location = browser[0]
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,720"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=browser[1]), options=options)
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: "int4" in d.find_element(By.ID, "model-info").text)
            info = driver.find_element(By.ID, "model-info").text
            assert "bits/weight" in info and "MB" in info
            driver.find_element(By.ID, "temperature").clear()
            driver.find_element(By.ID, "temperature").send_keys("0")
            # Counts the page's updates of the conversation: a streamed reply is written piece by piece.
            driver.execute_script("window.updates = 0; new MutationObserver(() => window.updates++).observe("
                                  "document.getElementById('messages'), {subtree: true, childList: true, "
                                  "characterData: true});")
            driver.find_element(By.ID, "input").send_keys("What is the capital of France, and what is it known for?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant .stats"))
            reply = driver.find_element(By.CSS_SELECTOR, ".message.assistant").text
            assert "Paris" in reply and "tokens/s" in reply
            tokens = int(reply.split("\n")[-1].split(" tokens,")[0])
            assert tokens > 10 and driver.execute_script("return window.updates") > tokens // 2
            assert not driver.find_elements(By.CSS_SELECTOR, ".message.error")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            assert driver.save_screenshot(str(SCREENSHOT))
        finally:
            driver.quit()


@pytest.mark.slow
def test_bench_serve_quick(tmp_path):
    out = tmp_path / "serve"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serve.py"), "--quick", "--clients", "1", "3",
                    "--max-batch", "2", "--out", str(out)], check=True, timeout=600, capture_output=True)
    result = json.loads(out.with_suffix(".json").read_text())
    assert [level["clients"] for level in result["levels"]] == [1, 3]
    for level in result["levels"]:
        assert level["failed"] == 0 and level["tokens"] == 16 * level["clients"] and level["tokens_per_s"] > 0
        assert 0 < level["ttft_p50_s"] <= level["ttft_p99_s"] and 0 < level["itl_p50_ms"] <= level["itl_p99_ms"]
        # Distinct questions after a shared system prompt: the server reuses that prefix and computes the rest.
        assert 0 < level["prompt_tokens_reused"] < level["prompt_tokens"]
    assert "| 3 | 3 | 0 |" in out.with_suffix(".md").read_text()
