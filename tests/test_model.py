"""The LLaMA model: parity with transformers, KV cache, quantized inference."""

import pytest
import torch

import lowbit
from conftest import tiny_hf_llama
from lowbit.generate import generate_tokens
from lowbit.models.llama import LlamaConfig, LlamaForCausalLM, rope_inv_freq

transformers = pytest.importorskip("transformers")


def greedy_hf(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def greedy_ours(model, ids, n):
    sampling = lowbit.Sampling(max_new_tokens=n)
    model.config.eos_token_id = None  # compare all n tokens, as eos_token_id=None does for transformers
    try:
        return [int(t[0]) for t in generate_tokens(model, ids, sampling)]
    finally:
        model.config.eos_token_id = 2


@pytest.mark.parametrize("tied", [False, True])
def test_parity_with_transformers_tiny_llama3_rope_scaling(tmp_path, tied):
    hf = tiny_hf_llama(tmp_path, tie_word_embeddings=tied)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_scaling["rope_type"] == "llama3" and ours.config.num_key_value_heads == 2
    for seed in range(3):
        ids = torch.randint(0, 512, (2, 70), generator=torch.Generator().manual_seed(seed))  # past 64 positions
        with torch.no_grad():
            diff = (hf(ids).logits - ours(ids)).abs().max().item()
        assert diff <= 1e-3
    ids = torch.randint(0, 512, (1, 9))
    assert greedy_ours(ours, ids, 32) == greedy_hf(hf, ids, 32)


@pytest.mark.slow
def test_parity_with_transformers_smollm2(smollm2_dir, smollm2):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = smollm2.tokenizer
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in 1832, a",
               tok.apply_chat_template([{"role": "user", "content": "Name three colours."}])]
    for text in prompts:
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            diff = (hf(ids).logits - smollm2(ids)).abs().max().item()
        assert diff <= 1e-3, text
        assert greedy_ours(smollm2, ids, 32) == greedy_hf(hf, ids, 32), text


def test_kv_cache_decode_matches_full_forward(tmp_path):
    tiny_hf_llama(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(2, 64)
        steps = [model(ids[:, :25], torch.arange(25))]
        steps += [model(ids[:, i:i + 1], torch.tensor([i])) for i in range(25, 40)]
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


def test_kv_cache_errors(tmp_path):
    tiny_hf_llama(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([3]))
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="outside the cache of 8"):
        model(torch.zeros(1, 9, dtype=torch.long), torch.arange(9))
    with pytest.raises(ValueError, match="int64 tensor of 2 positions"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="int64 tensor of 1 positions"):
        model(torch.zeros(1, 1, dtype=torch.long), 3)
    assert model(torch.zeros(1, 9, dtype=torch.long)).shape == (1, 9, 512)  # stateless: no cache limit


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=2)
    with pytest.raises(ValueError, match="head_dim must be even"):
        LlamaConfig(hidden_size=4095, num_attention_heads=9)
    with pytest.raises(ValueError, match="num_hidden_layers must be an integer in \\[1, 1024\\]"):
        LlamaConfig(num_hidden_layers=10 ** 9)
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.from_dict({"model_type": "llama", "hidden_act": "gelu"})


@pytest.mark.parametrize("bits", [4, 3.5])
def test_quantized_tiny_model_matches_dequantized_float(tmp_path, bits):
    tiny_hf_llama(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    q = lowbit.quantize_model(model, bits, 32, inplace=False)
    assert isinstance(q.layers[0].attn.wqkv, lowbit.QuantLinear) and not isinstance(q.lm_head, lowbit.QuantLinear)
    # The same model with each QuantLinear replaced by its dequantized float weight.
    d = lowbit.quantize_model(model, bits, 32, inplace=False)
    for name, module in list(d.named_modules()):
        if isinstance(module, lowbit.QuantLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = module.dequantize()
            parent, _, child = name.rpartition(".")
            setattr(d.get_submodule(parent), child, linear)
    ids = torch.randint(0, 512, (1, 30))
    previous = lowbit.cpu_isa()
    with torch.no_grad():
        for rows in (ids, ids[:, :1]):                          # int8 activations (docs/FORMAT.md)
            y_q, y_d = q(rows), d(rows)
            assert ((y_q - y_d).norm() / y_d.norm()).item() <= 0.02
        try:
            lowbit.set_cpu_isa("scalar")                        # M = 30 > 8: dequantized tiles, exact
            assert (q(ids) - d(ids)).abs().max().item() <= 1e-3
        finally:
            lowbit.set_cpu_isa(previous)


@pytest.mark.slow
@pytest.mark.parametrize("bits,group_size,min_agree,max_rel", [(4, 64, 0.75, 0.2), (3.5, 32, 0.6, 0.3)])
def test_quantized_smollm2_is_coherent_and_close(smollm2, bits, group_size, min_agree, max_rel):
    q = lowbit.quantize_model(smollm2, bits, group_size, inplace=False)
    ids = lowbit.data.evaluation_tokens(smollm2.tokenizer, max_tokens=512)
    with torch.no_grad():
        ref, out = smollm2(ids), q(ids)
    # Metrics over 512 held-out tokens: how often the quantized model's top-1 next token equals the float
    # model's, and the relative RMSE of the logits (measured on the default searched grid: int4 0.80 / 0.14,
    # int3.5 0.65 / 0.25; on the min-max grid 0.79 / 0.17 and 0.59 / 0.27).
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert agree >= min_agree and rel <= max_rel, (agree, rel)
    # One greedy answer, for int4 only: int3.5 RTN g32 (better by both metrics than on the min-max grid) does
    # not name Paris for this prompt; int3.5 needs AWQ or GPTQ for answers like this (README, quality).
    if bits == 4:
        answer = lowbit.generate(q, [{"role": "user", "content": "What is the capital of France? Answer in one "
                                                                  "sentence."}], max_new_tokens=24)
        assert "Paris" in answer


def serving_decode(model, prompts, slots, n_new):
    """Greedy decoding of prompts in the given cache rows, all together (the serving form): tokens and the
    logits of every step, per sequence."""
    tokens = [[] for _ in prompts]
    logits = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        out = model(p[None], torch.arange(len(p)), slots=slots[i:i + 1])[0, -1]
        tokens[i].append(int(out.argmax()))
    for _ in range(n_new - 1):
        last = torch.tensor([[t[-1]] for t in tokens])
        positions = torch.tensor([[len(p) + len(t) - 1] for p, t in zip(prompts, tokens)])
        out = model(last, positions, slots=slots)[:, -1]
        for i, t in enumerate(tokens):
            logits[i].append(out[i])
            t.append(int(out[i].argmax()))
    return tokens, logits


def test_batched_slots_decode_matches_each_sequence_alone(tmp_path):
    # Serving form: sequences of different lengths in scattered cache rows, each at its own position, decoded
    # together. Each produces exactly the logits it produces decoding alone (every layer, the output head
    # included, is quantized: the int8 kernels and the decode attention compute each row on its own), the tokens
    # of generate on the same (PyTorch forward) path, and logits close to a stateless forward.
    tiny_hf_llama(tmp_path)
    model = lowbit.quantize_model(LlamaForCausalLM.from_pretrained(tmp_path), 4, 128, quantize_lm_head=True)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=gen) for n in (5, 11, 3, 130)]  # spans 128 and 256
    n_new = 10
    expected = [[int(t[0]) for t in generate_tokens(model, p[None], lowbit.Sampling(max_new_tokens=n_new,
                                                                                    ignore_eos=True), fused=False)]
                for p in prompts]
    slots = torch.tensor([4, 0, 2, 5])
    with torch.inference_mode():
        model.setup_cache(6, 256)
        tokens, logits = serving_decode(model, prompts, slots, n_new)
        assert tokens == expected
        for i, p in enumerate(prompts):
            alone_tokens, alone_logits = serving_decode(model, [p], slots[i:i + 1], n_new)
            assert alone_tokens[0] == tokens[i]
            assert all(torch.equal(a, b) for a, b in zip(alone_logits[0], logits[i]))
            for step, out in enumerate(logits[i]):
                reference = model(torch.cat([p, torch.tensor(tokens[i][:step + 1])])[None])[0, -1]  # stateless
                # Loose: the int8 activations of the quantized layers turn float rounding into whole steps.
                assert (out - reference).abs().max().item() < 1e-2
        # Without slots, input_pos [B, T] uses rows 0..B-1; positions [T] are shared by every row.
        same = torch.stack([prompts[0][:3], prompts[2][:3]])
        assert torch.equal(model(same, torch.arange(3).expand(2, 3)), model(same, torch.arange(3)))


def test_bad_slots_and_positions():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    model.setup_cache(3, 16)
    x = torch.zeros(2, 1, dtype=torch.long)
    pos = torch.zeros(2, 1, dtype=torch.long)
    for slots, match in ((torch.tensor([1, 1]), "distinct"), (torch.tensor([0, 3]), "distinct cache rows"),
                         (torch.tensor([0]), "slots must be an int64 tensor of 2"),
                         (torch.tensor([0.0, 1.0]), "slots must be an int64")):
        with pytest.raises(ValueError, match=match):
            model(x, pos, slots=slots)
    with pytest.raises(ValueError, match="input_pos must be"):
        model(x, torch.zeros(3, 1, dtype=torch.long), slots=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside the cache"):
        model(x, torch.full((2, 1), 16), slots=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), slots=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="cache has 3 rows"):
        model(torch.zeros(4, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long))


def test_dtype_and_device_changes_keep_rope_float32_and_move_its_tables():
    """model.to(half) keeps the RoPE frequencies float32 (half-precision angles drift by ~1 rad at position 1000);
    setup_cache's tables and mask follow the model's device."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, rope_theta=500000.0)
    model = LlamaForCausalLM(config)
    model.setup_cache(1, 2048)
    cos = model.rope_cos.clone()
    for dtype in (torch.bfloat16, torch.float16):
        model.to(dtype)
        assert model.dtype == dtype and model.inv_freq.dtype == torch.float32
        assert torch.equal(model.inv_freq, rope_inv_freq(config)) and torch.equal(model.rope_cos, cos)
    model.to("meta")
    assert {t.device.type for t in (model.inv_freq, model.rope_cos, model.rope_sin, model.causal_mask)} == {"meta"}
