"""The fused CPU decode step (lowbit.cpu_decode) against the model's own forward, the definition."""

import pytest
import torch

import lowbit
from lowbit.cpu_decode import FusedDecoder, unsupported
from lowbit.generate import Sampling, Stats, decode_step, generate_tokens
from lowbit.models.llama import LlamaConfig, LlamaForCausalLM
from lowbit.nn import QuantLinear, replace_linears


# Head sizes: 32, 64 and 128 take the 16-float attention kernel on AVX-512 (compiled per size), 24 the 8-float one
# everywhere.
def tiny_model(bits, lm_head_bits=None, perm=False, bias=False, seed=0, head_dim=24):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=224, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim, attention_bias=bias,
                         mlp_bias=bias, rope_theta=10000.0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08)
        for layer in model.layers:  # norms near one, as trained models have them
            layer.attn_norm.weight.add_(1.0)
            layer.ffn_norm.weight.add_(1.0)
        model.norm.weight.add_(1.0)

    def quantize(name, linear):
        b = lm_head_bits if name == "lm_head" else bits
        if b is None:
            return linear
        order = torch.randperm(linear.in_features) if perm else None
        return QuantLinear.from_linear(linear, b, 32, perm=order)

    replace_linears(model, quantize)
    return model


def reference_logits(model, prompt, token, cache_len):
    """The next-token logits of `token` after `prompt` from the model's forward, with a batch-1 cache."""
    model.setup_cache(1, cache_len)
    model(prompt[None], torch.arange(len(prompt)))
    logits = model(token.view(1, 1), torch.tensor([len(prompt)]))[0, -1]
    return logits, [(l.attn.kv_cache.k[0].clone(), l.attn.kv_cache.v[0].clone()) for l in model.layers]


@pytest.mark.parametrize("bits,lm_head_bits,perm,bias,head_dim", [
    (4, None, False, False, 24), (3.5, 4, True, True, 32), (4, 3.5, True, False, 24), (8, 8, True, True, 32),
    (4, 8, False, False, 32), (None, None, False, True, 24), (None, None, False, False, 32), (4, 8, False, False, 64),
    (None, None, False, False, 128)])
@torch.inference_mode()
def test_fused_step_matches_the_forward(isa, bits, lm_head_bits, perm, bias, head_dim):
    # Three sequences of different lengths in permuted cache rows, each decoding one token at its own position.
    model = tiny_model(bits, lm_head_bits, perm, bias, head_dim=head_dim)
    prompts = [torch.randint(0, 300, (n,)) for n in (5, 17, 1)]
    tokens = torch.randint(0, 300, (3,))
    cache_len, slots = 32, torch.tensor([2, 0, 1])
    refs = [reference_logits(model, p, t, cache_len) for p, t in zip(prompts, tokens)]
    model.setup_cache(3, cache_len)
    for (_, caches), slot in zip(refs, slots):  # the prompts' keys and values, as the forward wrote them
        for layer, (k, v) in zip(model.layers, caches):
            layer.attn.kv_cache.k[slot], layer.attn.kv_cache.v[slot] = k, v
    positions = torch.tensor([len(p) for p in prompts])
    logits = FusedDecoder(model)(tokens, positions, slots)
    # Both run the same kernels on the same weights; the quantized linears quantize their inputs to int8, where
    # a last-bit difference of the norm's output can move one code by a step (~1 % of the logits, measured 1.9 %
    # once in this test's cases); float linears show what is left: ~1e-6.
    tolerance = 1e-4 if bits is None and lm_head_bits is None else 3e-2
    for i, (ref, _) in enumerate(refs):
        assert (logits[i] - ref).abs().max().item() < tolerance * ref.abs().max().item(), (isa, i)
    # The new keys and values landed at (slot, position), as the forward writes them.
    for layer, (k, v) in zip(model.layers, refs[2][1]):
        cache = layer.attn.kv_cache
        for new, ref in ((cache.k[1, :, :2], k[:, :2]), (cache.v[1, :, :2], v[:, :2])):
            assert (new - ref).abs().max().item() < tolerance * ref.abs().max().item()


@torch.inference_mode()
def test_generation_with_and_without_the_fused_step(smollm2):
    # SmolLM2 int4 g64 with an int4 head, greedy, 48 tokens each way. Every path rounds differently (the int8
    # activation codes turn last-bit differences into whole steps: ~3 % of the largest logit here, the PyTorch
    # step's own cache included), so greedy runs may part at a near tie. Along the PyTorch run's tokens (teacher
    # forcing), the fused step must stay as close to a stateless forward as the PyTorch step itself does.
    model = LlamaForCausalLM.from_pretrained(lowbit.fetch("smollm2", quiet=True))
    lowbit.quantize_model(model, 4, 64, quantize_lm_head=True)
    prompt = torch.tensor(model.tokenizer.encode("The three primary colours are"))
    runs = {}
    for fused in (True, False):
        stats = Stats()
        runs[fused] = [int(t[0]) for t in generate_tokens(model, prompt[None], Sampling(max_new_tokens=48,
                                                                                           ignore_eos=True),
                                                          stats, fused=fused)]
        assert stats.decode_path == ("fused" if fused else "eager") and stats.new_tokens == 48
    tokens, n = runs[False], len(prompt)
    reference = model(torch.cat([prompt, torch.tensor(tokens[:-1])])[None])[0, n - 1:]  # stateless forward
    zeros = torch.zeros(n, dtype=torch.long)
    model.setup_cache(1, 128)
    step = FusedDecoder(model)
    fused = [step(prompt, torch.arange(n), zeros, torch.tensor([n - 1]))[0]]
    fused += [step(torch.tensor([t]), torch.tensor([n + i]), zeros[:1])[0] for i, t in enumerate(tokens[:-1])]
    model.setup_cache(1, 128)
    eager = [model(prompt[None], torch.arange(n))[0, -1]]
    eager += [model(torch.tensor([[t]]), torch.tensor([n + i]))[0, -1] for i, t in enumerate(tokens[:-1])]
    deviation = {name: (torch.stack(logits) - reference).abs().max().item()
                 for name, logits in (("fused", fused), ("eager", eager))}
    # Measured: fused 1.92, eager 1.34 (largest logit 34.5).
    assert deviation["fused"] <= 2 * deviation["eager"] and deviation["eager"] < 0.06 * reference.abs().max(), \
        deviation


@torch.inference_mode()
def test_step_is_rebuilt_when_weights_change():
    model = tiny_model(4)
    model.setup_cache(1, 16)
    step = decode_step(model, 1)
    assert step.path == "fused" and decode_step(model, 1) is step
    lowbit.quantize_model(model, 4, 32, quantize_lm_head=True)  # a new head: the old step would read the old one
    assert decode_step(model, 1) is not step
    assert decode_step(model, 1, fused=False).path == "eager"


def test_models_the_fused_step_does_not_run_fall_back():
    model = tiny_model(4).to(torch.bfloat16)
    model.setup_cache(1, 16)
    assert "bfloat16" in unsupported(model)
    assert decode_step(model, 1).path == "eager"
    with pytest.raises(ValueError, match="cannot run this model: the model is torch.bfloat16"):
        FusedDecoder(model)
    model = tiny_model(4)
    assert "no KV cache" in unsupported(model)


@torch.inference_mode()
def test_bad_step_arguments_raise_clear_errors():
    model = tiny_model(4)
    model.setup_cache(2, 16)
    step = FusedDecoder(model)
    one = torch.tensor([1, 1])
    for tokens, positions, slots, match in [
            (torch.tensor([1, 300]), one, torch.tensor([0, 1]), r"tokens\[1\] = 300 is outside \[0, 300\)"),
            (one, torch.tensor([0, 16]), torch.tensor([0, 1]), r"positions\[1\] = 16 is outside \[0, 16\)"),
            (one, one, torch.tensor([0, 2]), r"slots\[1\] = 2 is outside \[0, 2\)"),
            (one, one.int(), torch.tensor([0, 1]), "positions must be int64"),
            (one, torch.tensor([1]), torch.tensor([0, 1]), "positions must be a contiguous CPU tensor of 2 values")]:
        with pytest.raises((ValueError, TypeError), match=match):
            step(tokens, positions, slots)


@pytest.mark.parametrize("head_dim", [24, 32, 64])
@torch.inference_mode()
def test_non_finite_values_propagate(head_dim):
    model = tiny_model(4, head_dim=head_dim)
    model.setup_cache(2, 16)
    model.embed.weight[7, 3] = float("nan")
    logits = FusedDecoder(model)(torch.tensor([7, 8]), torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert logits[0].isnan().all() and logits[1].isfinite().all()


@pytest.mark.parametrize("bits", [4, None])
@pytest.mark.parametrize("head_dim", [24, 32, 64, 128])
@torch.inference_mode()
def test_fused_prefill_matches_the_forward(isa, bits, head_dim):
    # Two prompts of 40 tokens in one call (causal attention over each one's own cache row): the last tokens'
    # logits and every cached key and value as the forward makes them.
    model = tiny_model(bits, bits, head_dim=head_dim)
    prompts = torch.randint(0, 300, (2, 40))
    model.setup_cache(2, 64)
    ref = model(prompts, torch.arange(40))[:, -1]
    ref_cache = [(l.attn.kv_cache.k.clone(), l.attn.kv_cache.v.clone()) for l in model.layers]
    model.setup_cache(2, 64)
    logits = FusedDecoder(model).prefill(prompts)
    tolerance = 1e-4 if bits is None else 3e-2  # as in test_fused_step_matches_the_forward
    assert (logits - ref).abs().max().item() < tolerance * ref.abs().max().item()
    for layer, (k, v) in zip(model.layers, ref_cache):
        scale = k.abs().max().item()
        assert (layer.attn.kv_cache.k - k).abs().max().item() < tolerance * scale
        assert (layer.attn.kv_cache.v - v).abs().max().item() < tolerance * v.abs().max().item()


@pytest.mark.parametrize("bits,head_dim", [(4, 24), (4, 64), (None, 64)])
@torch.inference_mode()
def test_float16_kv_cache(isa, bits, head_dim):
    # A float16 cache under a float32 model: the fused step stores keys and values rounded as the forward stores
    # them, and its prefill and decode logits match the forward's; both stay close to a float32 cache's (float
    # linears show the cache's own rounding; quantized ones may move an int8 activation code by a step, as in
    # test_fused_step_matches_the_forward).
    model = tiny_model(bits, bits and 8, head_dim=head_dim)
    tolerance, float16_tolerance = (3e-2, 3e-2) if bits else (1e-4, 3e-3)
    prompts, tokens = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2,))

    def forward_run():
        model.setup_cache(2, 64)
        prefill = model(prompts, torch.arange(40))[:, -1]
        decode = model(tokens[:, None], torch.tensor([40]))[:, -1]
        return prefill, decode, [(l.attn.kv_cache.k.clone(), l.attn.kv_cache.v.clone()) for l in model.layers]

    exact = forward_run()
    model.kv_cache_dtype = torch.float16
    ref = forward_run()
    assert ref[2][0][0].dtype == torch.float16
    model.setup_cache(2, 64)
    step = FusedDecoder(model)
    fused = (step.prefill(prompts), step(tokens, torch.tensor([40, 40]), torch.arange(2)))
    for got, want, full in zip(fused, ref, exact):
        assert (got - want).abs().max().item() < tolerance * want.abs().max().item()
        assert (want - full).abs().max().item() < float16_tolerance * full.abs().max().item()
    for layer, (k, v) in zip(model.layers, ref[2]):
        for new, old in ((layer.attn.kv_cache.k, k), (layer.attn.kv_cache.v, v)):
            assert new.dtype == torch.float16
            assert (new.float() - old.float()).abs().max().item() <= max(tolerance, 1e-3) * old.abs().max().item()


@torch.inference_mode()
def test_float16_cache_values_are_rounded_as_torch_rounds(isa):
    """Layer 0's keys and values (nothing before them differs): the float16 cache holds the float32 cache's values
    as torch converts them, bit for bit, also where they overflow float16 (inf) or fall to its subnormals."""
    model = tiny_model(None, head_dim=64)
    kv_rows = slice(8 * 64, None)  # wqkv's key and value rows
    with torch.no_grad():
        w = model.layers[0].attn.wqkv.weight[kv_rows]
        w[::3] *= 1e6    # beyond float16's range
        w[1::3] *= 1e-6  # float16 subnormals
    prompts, tokens = torch.randint(0, 300, (2, 12)), torch.randint(0, 300, (2,))
    caches = {}
    for dtype in (torch.float32, torch.float16):
        model.kv_cache_dtype = dtype
        model.setup_cache(2, 16)
        step = FusedDecoder(model)
        step.prefill(prompts)
        step(tokens, torch.tensor([12, 12]), torch.arange(2))
        cache = model.layers[0].attn.kv_cache
        caches[dtype] = (cache.k[:, :, :13].clone(), cache.v[:, :, :13].clone())
    for exact, rounded in zip(*caches.values()):
        assert rounded.dtype == torch.float16
        assert torch.isinf(exact.half()).any() and ((exact.half() != 0) & (exact.half().abs() < 6.1e-5)).any()
        assert torch.equal(rounded.view(torch.int16), exact.half().view(torch.int16))


def test_kv_cache_dtypes_the_model_and_the_fused_step_take():
    model = tiny_model(4)
    for bad in (torch.int8, torch.float64):
        model.kv_cache_dtype = bad
        with pytest.raises(ValueError, match="kv_cache_dtype must be a floating dtype no wider"):
            model.setup_cache(1, 16)
    model.kv_cache_dtype = torch.bfloat16  # the forward keeps it; the fused step does not
    model.setup_cache(1, 16)
    assert "the KV cache is torch.bfloat16" in unsupported(model)
    assert decode_step(model, 1).path == "eager"


def test_cli_defaults_to_a_float16_kv_cache_on_the_cpu(smollm2_dir):
    from lowbit.cli import build_parser, load_for_cli
    parse = build_parser().parse_args
    model = load_for_cli(parse(["generate", str(smollm2_dir), "--bits", "4"]))
    assert model.kv_cache_dtype == torch.float16
    model = load_for_cli(parse(["serve", str(smollm2_dir), "--kv-cache-dtype", "float32"]))
    assert model.kv_cache_dtype == torch.float32
    model = load_for_cli(parse(["generate", str(smollm2_dir), "--dtype", "bfloat16"]))
    assert model.kv_cache_dtype is None  # the model's own


def test_cli_defaults_to_an_int8_head_and_the_fused_step(smollm2_dir, capsys):
    from lowbit.cli import build_parser, head_format, main
    parse = build_parser().parse_args
    assert head_format(parse(["generate", "m", "--bits", "4"]), default="8") == {
        "quantize_lm_head": True, "lm_head_bits": 8.0, "lm_head_group_size": None}
    assert head_format(parse(["generate", "m", "--bits", "4", "--lm-head-bits", "none"]), default="8") == {
        "quantize_lm_head": False}
    assert head_format(parse(["generate", "m", "--bits", "3.5", "--quantize-lm-head"]))["lm_head_bits"] == 3.5
    assert head_format(parse(["convert", "a", "b"])) == {"quantize_lm_head": False}  # checkpoints: float by default
    with pytest.raises(ValueError, match="needs a quantized head"):
        head_format(parse(["generate", "m", "--lm-head-bits", "none", "--lm-head-group-size", "64"]))
    for flags, path in (([], "(fused)"), (["--no-fused"], "(eager)")):
        assert main(["generate", str(smollm2_dir), "--bits", "4", "--prompt", "Hi", "--max-new-tokens", "3", *flags]) == 0
        assert path in capsys.readouterr().err


@torch.inference_mode()
def test_a_sequences_logits_do_not_depend_on_the_batch(isa):
    # 40 sequences in one step (more rows than any kernel block) give each row exactly what it gives alone.
    model = tiny_model(4, 8)
    model.setup_cache(40, 16)
    step = FusedDecoder(model)
    tokens, positions, slots = torch.randint(0, 300, (40,)), torch.randint(0, 16, (40,)), torch.randperm(40)
    together = step(tokens, positions, slots)
    for i in (0, 17, 39):
        assert torch.equal(step(tokens[i:i + 1], positions[i:i + 1], slots[i:i + 1])[0], together[i])


@pytest.mark.parametrize("bits", [4, None])
@torch.inference_mode()
def test_a_prompts_logits_do_not_depend_on_the_rows_beside_it(isa, bits):
    # The engine runs new prompts in the same call as other sequences' decode rows: a 40-token prompt (beyond the
    # kernels' bfloat16 crossover) gives the same logits and cache alone and beside two decode rows, with
    # quantized and with float linears (one BLAS call per sequence).
    model = tiny_model(bits, bits)
    prompt = torch.randint(0, 300, (40,))
    model.setup_cache(3, 64)
    step = FusedDecoder(model)
    alone = step(prompt, torch.arange(40), torch.zeros(40, dtype=torch.long), torch.tensor([39]))
    cache_alone = [layer.attn.kv_cache.k[0, :, :40].clone() for layer in model.layers]
    tokens = torch.cat([torch.tensor([5, 6]), prompt])
    positions = torch.cat([torch.tensor([3, 7]), torch.arange(40)])
    slots = torch.cat([torch.tensor([1, 2]), torch.zeros(40, dtype=torch.long)])
    beside = step(tokens, positions, slots, torch.tensor([0, 1, 41]))
    assert torch.equal(beside[2], alone[0])
    for layer, k in zip(model.layers, cache_alone):
        assert torch.equal(layer.attn.kv_cache.k[0, :, :40], k)
