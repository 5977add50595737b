"""GPTQ: round-to-nearest when inputs are uncorrelated, a smaller output error than RTN when they are correlated,
deterministic, the same format (pipeline, CLI, checkpoints), clear errors."""

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from conftest import tiny_hf_llama
from lowbit.cli import main as cli
from lowbit.generate import Sampling, Stats, generate_tokens
from lowbit.calibration import GPTQ, quantize_blocks
from lowbit.gptq import DAMP, act_order_perm, gptq_quantize, hessian, inverse_cholesky
from lowbit.models.llama import LlamaForCausalLM
from lowbit.quantize import grid_values, group_grid, quantize_weight, round_to_grid


def correlated_inputs(n_tokens: int, k: int, seed: int) -> torch.Tensor:
    """Samples (seeded) of one distribution of activations with strongly correlated channels of uneven size."""
    g = torch.Generator().manual_seed(0)
    mix, size = torch.randn(k // 8, k, generator=g), torch.rand(k, generator=g) + 0.2
    t = torch.Generator().manual_seed(seed)
    return (torch.randn(n_tokens, k // 8, generator=t) @ mix + 0.1 * torch.randn(n_tokens, k, generator=t)) * size


def output_error(w, qw, x) -> float:
    ref = x @ w.T
    return ((x @ qw.dequantize().T - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits", [4, 3.5])
def test_diagonal_hessian_gives_round_to_nearest(bits):
    """With uncorrelated inputs no error is spread: GPTQ's codes, scales and zeros are RTN's, bit for bit, with
    the unweighted grid, or with the weighted one when every input has the same energy (K = 200 also checks the
    padding columns; perm and clip as quantize_weight takes them)."""
    w = torch.randn(48, 200)
    perm = torch.randperm(200).to(torch.int32)
    clip = torch.rand(48, 4) * 0.5 + 0.5
    h = torch.diag(torch.rand(200) + 0.1)
    for p, c in ((None, None), (perm, clip)):
        ref = quantize_weight(w, bits, 64, perm=p, clip=c).tensors()
        for ours in (gptq_quantize(w, h, bits, 64, perm=p, clip=c, weighted_grid=False).tensors(),
                     gptq_quantize(w, torch.eye(200), bits, 64, perm=p, clip=c).tensors()):
            assert ours.keys() == ref.keys()
            for name in ref:
                assert torch.equal(ours[name], ref[name]), name


def test_weighted_grid_fits_the_columns_with_large_inputs():
    """Inputs of very uneven size: the weighted grid gives a smaller output error than the unweighted one, and the
    large-input columns' weights a smaller error."""
    k = 256
    size = torch.ones(k)
    size[::8] = 30.0  # one column in 8 carries most of the output
    x = torch.randn(2048, k, generator=torch.Generator().manual_seed(4)) * size
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(5))
    h = torch.diag(hessian(x).diagonal())  # uncorrelated inputs: no error spreading, only the grids differ
    plain = gptq_quantize(w, h, 4, 64, weighted_grid=False)
    weighted = gptq_quantize(w, h, 4, 64)
    assert output_error(w, weighted, x) < 0.9 * output_error(w, plain, x)
    large = slice(0, None, 8)
    assert (weighted.dequantize() - w)[:, large].norm() < (plain.dequantize() - w)[:, large].norm()


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 128), (3.5, 64), (3.5, 256)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    """Output error of a synthetic layer on held-out inputs from the same distribution as the calibration."""
    k = 256
    w = torch.randn(96, k)
    calib, held_out = correlated_inputs(2048, k, seed=1), correlated_inputs(512, k, seed=2)
    order = act_order_perm(hessian(calib))
    rtn = output_error(w, quantize_weight(w, bits, group_size), held_out)
    gptq = output_error(w, gptq_quantize(w, hessian(calib), bits, group_size), held_out)
    ordered = gptq_quantize(w, hessian(calib), bits, group_size, order=order)
    assert ordered.perm is None  # act-order stores nothing
    assert gptq < 0.7 * rtn, (gptq, rtn)
    assert output_error(w, ordered, held_out) < 0.7 * rtn, (output_error(w, ordered, held_out), rtn)


@pytest.mark.parametrize("bits", [4, 3.5, 8])
def test_rounding_order(bits):
    """order=arange is the default, bit for bit; with a diagonal Hessian any order is round-to-nearest on the
    unweighted grid (each group's grid comes from its own, uncorrected columns); and a group's grid sees the
    corrections of the columns rounded before it in other blocks: blocks of one group agree with one block of all
    columns up to rounding ties (K = 200: a partial last group, int3.5's 4-/3-bit column parity under a perm)."""
    k = 200
    w, x = torch.randn(64, k), correlated_inputs(1024, k, seed=3)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(2))
    h = hessian(x)
    for p in (None, perm):
        default = gptq_quantize(w, h, bits, 32, perm=p).tensors()
        ordered = gptq_quantize(w, h, bits, 32, perm=p, order=torch.arange(k)).tensors()
        assert all(torch.equal(default[n], ordered[n]) for n in default)
        diagonal = torch.diag(h.diagonal())
        rtn = quantize_weight(w, bits, 32, perm=p).tensors()
        ours = gptq_quantize(w, diagonal, bits, 32, perm=p, order=order, weighted_grid=False).tensors()
        assert all(torch.equal(ours[n], rtn[n]) for n in rtn)
        one_block = gptq_quantize(w, h, bits, 32, perm=p, order=order, block_size=k).tensors()
        blocks = gptq_quantize(w, h, bits, 32, perm=p, order=order, block_size=32).tensors()
        codes = [lowbit.formats.unpack(t["qweight"], bits) for t in (one_block, blocks)]
        assert (codes[0] != codes[1]).float().mean() < 0.01
        assert torch.allclose(one_block["scales"].float(), blocks["scales"].float(), rtol=0.01, atol=1e-3)
    with pytest.raises(ValueError, match="order must be a permutation of the 200 input features"):
        gptq_quantize(w, h, bits, 32, order=torch.zeros(k, dtype=torch.long))


def test_hessian_and_inverse_cholesky_match_float64():
    """The Hessian by blocks of rows (its upper blocks mirrored) and U by a flipped factorisation and a triangular
    inverse by halves (K above 256 recurses) equal the textbook float64 formulas."""
    for k in (7, 200, 600):
        x = correlated_inputs(900, k - k % 8 or 8, seed=k)[:, :k] if k >= 8 else torch.randn(900, k)
        h = hessian(x, block=64)
        ref = 2 * x.double().T @ x.double() / len(x)
        assert torch.allclose(h.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert torch.equal(h[:64, 64:], h[64:, :64].T)  # mirrored blocks
        before = h.clone()
        u = inverse_cholesky(h, DAMP)
        assert torch.equal(h, before)  # the caller's H is left as it was
        damped = ref + DAMP * ref.diagonal().mean() * torch.eye(k, dtype=torch.float64)
        expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
        assert torch.equal(u.tril(-1), torch.zeros_like(u))
        assert torch.allclose(u.double(), expected, rtol=1e-3, atol=1e-4 * expected.abs().max().item())


def textbook_gptq(w, h, bits, group_size, order):
    """GPTQ as the paper states it, in float64: the columns rounded one at a time in `order`, each error spread
    over every later column at once; a group's grid fixed (the weighted "mse" search) when its first column is
    reached. Codes [N, K] (stored order)."""
    n, k = w.shape
    damped = h.double() + DAMP * h.diagonal().mean().double() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(damped[order][:, order]), upper=True)
    w = w.double()[:, order].clone()
    position = torch.empty_like(order)
    position[order] = torch.arange(k)
    codes, grids = torch.empty(n, k), {}
    for j, col in enumerate(order.tolist()):
        g = col // group_size
        if g not in grids:
            columns = slice(g * group_size, min(g * group_size + group_size, k))
            grids[g] = group_grid(w[:, position[columns]].float(), bits, columns=h.diagonal()[columns])
        s, z = grids[g]
        q = round_to_grid(w[:, j:j + 1].float(), s, z, bits, col)
        codes[:, col] = q[:, 0]
        err = (w[:, j] - grid_values(q, s, z, bits, col)[:, 0].double()) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None]
    return codes


@pytest.mark.parametrize("bits", [4, 3.5])
def test_gptq_equals_the_textbook_column_loop(bits):
    """Lazy updates by blocks and by slices of columns within a block (corrections still pending when a group's
    grid is fixed: act-order scatters a group over blocks) compute what the column-at-a-time float64 loop does:
    codes agree up to rounding ties, whose corrections can flip a few more codes after them (K = 300: a partial last
    group, several blocks and slices)."""
    k = 300
    w, x = torch.randn(96, k, generator=torch.Generator().manual_seed(0)), correlated_inputs(2048, 304, seed=5)[:, :k]
    h = hessian(x)
    for order in (torch.arange(k), act_order_perm(h).long()):
        ours = gptq_quantize(w, h, bits, 32, order=order, block_size=64)
        codes = lowbit.formats.unpack(ours.qweight, bits)[:, :k].float()
        assert (codes != textbook_gptq(w, h, bits, 32, order)).float().mean() < 0.01


def test_gptq_is_deterministic_and_block_size_invariant():
    w, x = torch.randn(64, 192), correlated_inputs(512, 192, seed=2)
    a = gptq_quantize(w, hessian(x), 3.5, 32, block_size=128).tensors()
    b = gptq_quantize(w, hessian(x), 3.5, 32, block_size=128).tensors()
    assert all(torch.equal(a[n], b[n]) for n in a)
    # Lazy batch updates change only the order of the additions: codes agree up to a few rounding ties.
    c = gptq_quantize(w, hessian(x), 3.5, 32, block_size=32).tensors()
    assert (lowbit.formats.unpack(a["qweight"], 3.5) != lowbit.formats.unpack(c["qweight"], 3.5)).float().mean() < 0.01


def test_gptq_rejects_bad_input():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"Hessian must be a finite \[64, 64\]"):
        gptq_quantize(w, torch.eye(32))
    with pytest.raises(ValueError, match="Hessian must be a finite"):
        gptq_quantize(w, torch.full((64, 64), float("nan")))
    with pytest.raises(ValueError, match="damp must be a positive number"):
        gptq_quantize(w, torch.eye(64), damp=0)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(64) * 10, damp=0.01)
    with pytest.raises(ValueError, match="non-finite"):
        gptq_quantize(w.masked_fill(w > 1, float("inf")), torch.eye(64))
    with pytest.raises(ValueError, match="bits must be"):
        gptq_quantize(w, torch.eye(64), bits=3)
    with pytest.raises(TypeError, match="GPTQ works on lowbit.LlamaForCausalLM"):
        quantize_blocks(torch.nn.Module(), GPTQ(4, 32), torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_gptq_on_transformers_llama(tmp_path, method):
    """quantize_model(method=...) on transformers' LlamaForCausalLM: every linear but lm_head quantized,
    logits closer to float than round-to-nearest on the min-max grid. (AWQ+GPTQ against AWQ alone is measured on
    SmolLM2 by bench_quality, 17.10 against 17.56: on these random weights the two are within a few percent and
    their order flipped with the kernels' summation order, 0.248 against 0.241.)"""
    model = tiny_hf_llama(tmp_path)
    calib = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(2))
    baseline = "rtn"
    quantized = {m: lowbit.quantize_model(model, 3.5, 32, method=m, calib=calib, inplace=False,
                                          grid="minmax" if m == "rtn" else "mse")
                 for m in (method, baseline)}
    names = [n for n, m in quantized[method].named_modules() if isinstance(m, lowbit.QuantLinear)]
    assert len(names) == 7 * 3 and isinstance(quantized[method].lm_head, torch.nn.Linear)
    with torch.no_grad():
        ref = model(ids).logits
        err = {k: ((m(ids).logits - ref).norm() / ref.norm()).item() for k, m in quantized.items()}
    assert err[method] < err[baseline], err


def test_awq_gptq_is_deterministic(tmp_path):
    tiny_hf_llama(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    a = quantize_blocks(copy.deepcopy(model), GPTQ(4, 32, awq=True, n_grid=5), calib, progress=False)
    b = quantize_blocks(copy.deepcopy(model), GPTQ(4, 32, awq=True, n_grid=5), calib, progress=False)
    for (name, ta), (_, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(ta, tb), name
    with pytest.raises(ValueError, match=r"AWQ\+GPTQ needs calibration tokens"):
        lowbit.quantize_model(model, 4, 32, method="awq+gptq", calib=None)


def tiny_dir_with_smollm2_tokenizer(tmp_path, smollm2_dir):
    """A tiny HF LLaMA directory with SmolLM2's vocabulary and tokenizer (so lowbit.data can calibrate it)."""
    hf = tmp_path / "hf"
    tiny_hf_llama(hf, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, hf / name)
    return hf


def assert_saved_as(out, expected):
    """The checkpoint at out holds expected's tensors bit for bit (the tied head aside)."""
    saved = load_file(str(out / "model.safetensors"))
    for name, t in expected.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(saved[name], t), name


def test_convert_cli_with_gptq(tmp_path, smollm2_dir):
    """`lowbit convert --method gptq` on a tiny model with SmolLM2's tokenizer (calibration from lowbit.data):
    the checkpoint holds exactly what quantize_model computes, passes inspect and loads as the same model."""
    hf = tiny_dir_with_smollm2_tokenizer(tmp_path, smollm2_dir)
    out = tmp_path / "q"
    assert cli(["convert", str(hf), str(out), "--bits", "3.5", "--group-size", "32", "--method", "gptq",
                "--float-dtype", "float32"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method"] == "gptq"
    assert cli(["inspect", str(out)]) == 0
    model = LlamaForCausalLM.from_pretrained(hf)
    calib = lowbit.data.calibration_tokens(model.tokenizer, n_samples=8, seq_len=512)
    expected = lowbit.quantize_model(model, 3.5, 32, method="gptq", calib=calib)
    assert_saved_as(out, expected)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lowbit.load_quantized(out)(ids), expected(ids))


def qlinears(model) -> list:
    return [m for m in model.modules() if isinstance(m, lowbit.QuantLinear)]


@pytest.mark.parametrize("mode", ["order", "perm"])
def test_convert_cli_with_act_order_and_more_calibration(tmp_path, smollm2_dir, mode):
    """`--act-order [order|perm] --calib-samples 2`: the int4 decoder linears hold other codes than left-to-right
    rounding; "order" stores no permutation (the plain format's size), "perm" stores one in every layer. The
    checkpoint holds what quantize_model computes on 2 calibration windows, and the fused CPU decode runs it as
    the eager forward does (greedy tokens equal)."""
    hf = tiny_dir_with_smollm2_tokenizer(tmp_path, smollm2_dir)
    out = tmp_path / "q"
    flags = ["--act-order"] if mode == "order" else ["--act-order", "perm"]
    assert cli(["convert", str(hf), str(out), "--bits", "4", "--group-size", "32", "--method", "awq+gptq",
                *flags, "--calib-samples", "2", "--float-dtype", "float32"]) == 0
    model = LlamaForCausalLM.from_pretrained(hf)
    calib = lowbit.data.calibration_tokens(model.tokenizer, n_samples=2, seq_len=512)
    expected = lowbit.quantize_model(model, 4, 32, method="awq+gptq", calib=calib, act_order=mode)
    loaded = lowbit.load_quantized(out)
    assert qlinears(loaded) and all((m.perm is not None) == (mode == "perm") for m in qlinears(loaded))
    assert_saved_as(out, expected)
    plain = lowbit.quantize_model(LlamaForCausalLM.from_pretrained(hf), 4, 32, method="awq+gptq", calib=calib)
    plain_bytes, ordered_bytes = lowbit.eval.linear_stats(plain)[1], lowbit.eval.linear_stats(expected)[1]
    assert ordered_bytes == plain_bytes if mode == "order" else ordered_bytes > plain_bytes
    assert any(not torch.equal(a.qweight, b.qweight) for a, b in zip(qlinears(plain), qlinears(expected)))
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected(ids))
        runs = {fused: [int(t[0]) for t in generate_tokens(loaded, ids, Sampling(max_new_tokens=8, ignore_eos=True),
                                                           Stats(), fused=fused)] for fused in (True, False)}
    assert runs[True] == runs[False]


def test_act_order_and_calibration_size_are_checked(tmp_path):
    tiny_hf_llama(tmp_path / "hf")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    calib = torch.randint(0, 512, (2, 32))
    with pytest.raises(ValueError, match="act_order must be .* needs method 'gptq' or 'awq\\+gptq'"):
        lowbit.quantize_model(model, 4, 32, method="awq", calib=calib, act_order=True)
    with pytest.raises(ValueError, match="act_order must be False, 'order' \\(or True\\) or 'perm'"):
        lowbit.quantize_model(model, 4, 32, method="gptq", calib=calib, act_order="desc")
    with pytest.raises(ValueError, match="act_order='perm' adds a permutation .* budget"):
        lowbit.quantize_model(model, bits_per_weight=4.5, method="gptq", calib=calib, act_order="perm")
    with pytest.raises(ValueError, match="needs method 'gptq'"):
        lowbit.convert(tmp_path / "hf", tmp_path / "q", act_order=True)
    with pytest.raises(ValueError, match="calib_samples must be a positive number"):
        lowbit.convert(tmp_path / "hf", tmp_path / "q", method="gptq", calib_samples=0)


@pytest.mark.slow
def test_gptq_beats_rtn_on_smollm2(smollm2):
    """On real activations and held-out text, GPTQ's logits are closer to float than RTN's (int3.5, group size 64,
    a small calibration): clearly closer than RTN on the min-max grid, and closer than RTN on the default searched
    grid (measured with one thread: GPTQ 0.235, RTN searched grid 0.340, RTN min-max 0.394). AWQ+GPTQ against AWQ
    is not asserted here: with this calibration (2 x 256 tokens) it measured 0.314 against AWQ's 0.204; with the
    benchmark's 8 x 512 its perplexity is lower (bench_quality)."""
    tok = smollm2.tokenizer
    calib = lowbit.data.calibration_tokens(tok, n_samples=2, seq_len=256)
    ids = lowbit.data.evaluation_tokens(tok, max_tokens=512)
    models = {m: lowbit.quantize_model(smollm2, 3.5, 64, method=m, calib=calib, inplace=False)
              for m in ("rtn", "gptq")}
    models["rtn minmax"] = lowbit.quantize_model(smollm2, 3.5, 64, inplace=False, grid="minmax")
    with torch.no_grad():
        ref = smollm2(ids)
        err = {m: ((q(ids) - ref).norm() / ref.norm()).item() for m, q in models.items()}
    assert err["gptq"] < 0.9 * err["rtn minmax"] and err["gptq"] < err["rtn"], err
