"""Sampling, streaming, stop conditions, chat template, CLI."""

import pytest
import torch

import lowbit
from lowbit.generate import Sampling, generate_tokens, next_token


def test_streaming_never_splits_multibyte_characters(smollm2):
    tok = smollm2.tokenizer
    text = "naïve café — 日本語のテキスト 😀👍🏽 Ünïcödé"
    ids = tok.encode(text, add_special_tokens=False)
    decoder = tok.stream()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # text really comes out incrementally


def test_chat_template(smollm2):
    text = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_is_deterministic_and_matches_top_k_1(smollm2):
    prompt = "The three primary colours are"
    a = lowbit.generate(smollm2, prompt, max_new_tokens=12)
    assert a == lowbit.generate(smollm2, prompt, max_new_tokens=12)
    assert a == lowbit.generate(smollm2, prompt, max_new_tokens=12, temperature=0.8, top_k=1, seed=3)
    assert a == lowbit.generate(smollm2, prompt, max_new_tokens=12, temperature=0.8, top_p=1e-6, seed=3)


def test_sampling_seed_reproducible(smollm2):
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = lowbit.generate(smollm2, "Once upon a time", **kw)
    assert a == lowbit.generate(smollm2, "Once upon a time", **kw)
    assert a != lowbit.generate(smollm2, "Once upon a time", **{**kw, "seed": 8})


def test_stop_strings_and_max_new_tokens(smollm2):
    full = lowbit.generate(smollm2, "1, 2, 3, 4,", max_new_tokens=20)
    assert " 7," in full
    cut = lowbit.generate(smollm2, "1, 2, 3, 4,", max_new_tokens=20, stop=[" 7,"])
    assert cut == full[:full.index(" 7,")]
    stream = lowbit.stream(smollm2, "1, 2, 3, 4,", max_new_tokens=5)
    "".join(stream)
    assert stream.stats.new_tokens == 5 and len(stream.tokens) == 5


def test_chat_stops_at_eos(smollm2):
    stream = lowbit.stream(smollm2, [{"role": "user", "content": "Say hello."}], max_new_tokens=100)
    reply = "".join(stream)
    assert reply and stream.stats.new_tokens < 100 and "<|im_end|>" not in reply


def test_next_token_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    history = torch.tensor([[1]])
    g = torch.Generator().manual_seed(0)
    assert next_token(logits, history, Sampling(), g).item() == 1
    # A strong repetition penalty on token 1 makes token 2 the greedy choice.
    assert next_token(logits, history, Sampling(repetition_penalty=10.0), g).item() == 2
    draws = {next_token(logits, history, Sampling(temperature=1.0, top_k=2), g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {next_token(logits, history, Sampling(temperature=1.0, top_p=0.5), g).item() for _ in range(50)}
    assert draws == {1}


def test_bad_sampling_arguments():
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=-1),
                dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_batch_generation_matches_single(smollm2):
    tok = smollm2.tokenizer
    a, b = tok.encode("The sky is"), tok.encode("Grass is")
    assert len(a) == len(b)
    s = Sampling(max_new_tokens=6)
    both = torch.stack([t for t in generate_tokens(smollm2, torch.tensor([a, b]), s)], 1)
    one = torch.stack([t for t in generate_tokens(smollm2, torch.tensor([a]), s)], 1)
    assert both[0].tolist() == one[0].tolist()


def test_cli_generate(smollm2_dir, capsys):
    from lowbit.cli import main
    assert main(["generate", str(smollm2_dir), "--prompt", "The capital of France is", "--max-new-tokens", "4",
                 "--bits", "4"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and "tok/s" in err


def test_ignore_eos_produces_every_token(smollm2):
    # A chat reply ends with EOS well before 64 tokens; ignore_eos (what the benchmarks use) goes on.
    chat = [{"role": "user", "content": "Say hi."}]
    stream = lowbit.stream(smollm2, chat, max_new_tokens=64)
    "".join(stream)
    assert stream.stats.new_tokens < 64
    forced = lowbit.stream(smollm2, chat, max_new_tokens=64, ignore_eos=True)
    "".join(forced)
    assert forced.stats.new_tokens == 64 and len(forced.tokens) == 64


def test_decode_step_is_reused_and_matches_the_forward(smollm2):
    from lowbit.generate import decode_step
    ids = torch.tensor([smollm2.tokenizer.encode("The capital of France is")])
    t = ids.shape[1]
    with torch.inference_mode():
        smollm2.setup_cache(1, 64)
        smollm2(ids, torch.arange(t))
        step = decode_step(smollm2, 1)
        assert decode_step(smollm2, 1) is step
        logits = step(ids[0, -1:], t).clone()
        smollm2.setup_cache(1, 64)
        assert decode_step(smollm2, 1) is not step  # a new cache: a new step
        full = smollm2(torch.cat([ids, ids[:, -1:]], 1))[:, -1]
    assert (logits - full).abs().max().item() < 1e-3


@pytest.mark.slow
def test_compiled_decode_step_compiles_once(smollm2):
    # The position is a tensor: 64 decode steps, no recompilation after the first.
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager = lowbit.generate(smollm2, "The three primary colours are", max_new_tokens=66, ignore_eos=True)
    stream = lowbit.stream(smollm2, "The three primary colours are", max_new_tokens=66, ignore_eos=True,
                           compile=True)
    assert "".join(stream) == eager
    # The step compiled in its warm-up, before the decode clock started, and is reported apart.
    assert stream.stats.warm_up_seconds > 0 and "decode step prepared in" in str(stream.stats)
    assert counters["stats"]["unique_graphs"] == 1
    again = lowbit.stream(smollm2, "The three primary colours are", max_new_tokens=8, compile=True)
    "".join(again)
    assert again.stats.warm_up_seconds == 0  # the same model and cache: nothing to prepare
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_decode_step_goes_with_its_model():
    """The step made for a model lives on it (not in a table that kept every model alive); copies leave it."""
    import copy
    import gc
    import weakref
    from lowbit.generate import decode_step
    from lowbit.models.llama import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2)).eval()
    tokens = list(generate_tokens(model, torch.tensor([[1, 2, 3]]), Sampling(max_new_tokens=4, ignore_eos=True)))
    assert len(tokens) == 4 and model.decode_step is decode_step(model, 1)
    assert copy.deepcopy(model).decode_step is None
    model.drop_cache()
    assert model.decode_step is None
    list(generate_tokens(model, torch.tensor([[1, 2, 3]]), Sampling(max_new_tokens=2, ignore_eos=True)))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
