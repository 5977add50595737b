"""A bits-per-weight budget (lowbit.budget): per-layer formats within the budget in real bytes, less error for more
bytes, at least as good as one uniform format of the same size; saved, inspected, loaded and run (fused and
eager) as mixed formats; clear errors."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

import lowbit
from conftest import tiny_hf_llama
from lowbit.budget import CANDIDATES, candidate_bytes, choose_formats, format_table, model_formats, residual_energy
from lowbit.calibration import measure_errors, output_sensitivity
from lowbit.cli import main as cli
from lowbit.cpu_decode import FusedDecoder
from lowbit.eval import linear_stats
from lowbit.generate import Sampling, Stats, generate_tokens
from lowbit.gptq import DAMP, gptq_quantize, hessian
from lowbit.io.checkpoint import load_quantized, save_quantized
from lowbit.io.hf import CheckpointError
from lowbit.io.inspect import inspect_checkpoint
from lowbit.models.llama import LlamaForCausalLM


@pytest.fixture
def tiny(tmp_path):
    tiny_hf_llama(tmp_path / "hf")
    return LlamaForCausalLM.from_pretrained(tmp_path / "hf")


def calib_tokens(seed=1, n=4, t=64):
    return torch.randint(0, 512, (n, t), generator=torch.Generator().manual_seed(seed))


def total(errors, choice):
    return sum(errors[n][f] for n, f in choice.items())


@pytest.mark.parametrize("saliency_order", [False, True])
def test_choice_fits_the_budget_and_more_bytes_give_less_error(tiny, saliency_order):
    errors, shapes = measure_errors(tiny, calib_tokens(), list(CANDIDATES), saliency_order, progress=False)
    assert len(errors) == 4 * 3  # wqkv, wo, w_gate_up, w_down per block
    nbytes = {n: {f: candidate_bytes(shapes[n], f, saliency_order) for f in CANDIDATES} for n in shapes}
    cheapest, largest = (sum(pick(b.values()) for b in nbytes.values()) for pick in (min, max))
    previous = float("inf")
    for fraction in (0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1):
        budget = int(cheapest + fraction * (largest - cheapest))
        choice = choose_formats(errors, nbytes, budget)
        assert sum(nbytes[n][f] for n, f in choice.items()) <= budget
        assert total(errors, choice) <= previous
        previous = total(errors, choice)
    # A budget of uniform int4 g64's size: at least as good as uniform int4 g64 (strictly better here).
    uniform = {n: (4.0, 64) for n in errors}
    choice = choose_formats(errors, nbytes, sum(nbytes[n][f] for n, f in uniform.items()))
    assert total(errors, choice) < total(errors, uniform)


def test_awq_errors_are_measured_on_a_scaled_copy(tiny):
    """With AWQ's scales the errors are those of the channel-scaled weights (they differ from the plain ones), and the
    model itself is not changed by measuring them."""
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    fmts = [(4.0, 32), (4.0, 64), (3.5, 64)]
    plain, shapes = measure_errors(tiny, calib_tokens(), fmts, True, progress=False)
    scaled, scaled_shapes = measure_errors(tiny, calib_tokens(), fmts, True, progress=False, awq_format=(4.0, 64))
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())
    assert scaled_shapes == shapes and scaled.keys() == plain.keys()
    assert all(e >= 0 and e < float("inf") for errs in scaled.values() for e in errs.values())
    assert any(abs(scaled[n][f] - plain[n][f]) > 1e-3 * plain[n][f] for n in plain for f in fmts)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_model_within_budget(tiny, method):
    """The achieved bits per weight is what lowbit.eval counts, within the target; a budget of uniform int4 g64's
    size moves the model's next-token distributions less from the float model's than uniform int4 g64 does (KL
    divergence on other tokens than the calibration ones)."""
    calib = calib_tokens()
    uniform = lowbit.quantize_model(tiny, 4, 64, method=method, calib=calib, inplace=False)
    weights, nbytes = linear_stats(uniform)
    q = lowbit.quantize_model(tiny, bits_per_weight=8 * nbytes / weights, method=method, calib=calib,
                              inplace=False, progress=False)
    weights_q, nbytes_q = linear_stats(q)
    assert weights_q == weights and nbytes_q <= nbytes
    achieved = q.quantization["bits_per_weight"]
    assert achieved["achieved"] == 8 * nbytes_q / weights_q <= achieved["target"]
    assert len(set(model_formats(q).values())) > 1  # really mixed
    held_out = calib_tokens(seed=2)
    with torch.no_grad():
        reference = tiny(held_out).log_softmax(-1)
        kl = {name: F.kl_div(m(held_out).log_softmax(-1), reference, log_target=True, reduction="sum").item()
              for name, m in (("budget", q), ("uniform", uniform))}
    assert kl["budget"] < kl["uniform"], kl


def test_awq_gptq_on_transformers_llama_with_a_budget(tmp_path):
    """q/k/v are separate linears in transformers' model: each gets its own format, also under AWQ's shared
    scale search; int3.5's stored permutation is counted in the budget."""
    model = tiny_hf_llama(tmp_path)
    calib = calib_tokens()
    q = lowbit.quantize_model(model, bits_per_weight=4.1, method="awq+gptq", calib=calib, inplace=False,
                              progress=False)
    fmts = model_formats(q)
    assert len(fmts) == 7 * 3 and "lm_head" not in fmts
    weights, nbytes = linear_stats(q)
    assert 8 * nbytes / weights == q.quantization["bits_per_weight"]["achieved"] <= 4.1
    assert any(m.perm is not None for m in q.modules() if isinstance(m, lowbit.QuantLinear) and m.bits == 3.5)
    with torch.no_grad():
        ids = calib_tokens(seed=2, n=2)
        ref = model(ids).logits
        assert ((q(ids).logits - ref).norm() / ref.norm()).item() < 0.5


def test_mixed_formats_save_inspect_load_and_generate(tiny, tmp_path, capsys):
    """A quantized head (int8, counted in the budget) and mixed decoder formats: saved with module_formats and the
    budget, shown by inspect, loaded back bit for bit; greedy generation, fused and eager, equal to the forward."""
    q = lowbit.quantize_model(tiny, bits_per_weight=4.6, calib=calib_tokens(), lm_head_bits=8, progress=False)
    fmts = model_formats(q)
    assert fmts["lm_head"] == (8.0, 128) and len(set(fmts.values())) > 2
    out = save_quantized(q, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits_per_weight"] == q.quantization["bits_per_weight"]
    assert len(qc["module_formats"]) == sum(f != (qc["bits"], qc["group_size"]) for f in fmts.values())
    assert inspect_checkpoint(out)
    shown = capsys.readouterr().out
    assert "bits/weight budget 4.6" in shown and "int8 g128 x1" in shown
    loaded = load_quantized(out)
    assert model_formats(loaded) == fmts and loaded.quantization == q.quantization
    ids = calib_tokens(seed=3, n=1, t=12)
    with torch.no_grad():
        assert torch.equal(loaded(ids), q(ids))
        runs = {}
        for fused in (True, False):
            stats = Stats()
            runs[fused] = [int(t[0]) for t in generate_tokens(
                loaded, ids, Sampling(max_new_tokens=8, ignore_eos=True), stats, fused=fused)]
            assert stats.decode_path == ("fused" if fused else "eager")
        assert runs[True] == runs[False]
        # The fused step's logits against the forward's, one decode step after the prompt.
        loaded.setup_cache(1, 32)
        loaded(ids, torch.arange(ids.shape[1]))
        token = torch.tensor([runs[True][0]])
        position = torch.tensor([ids.shape[1]])
        ref = loaded(token.view(1, 1), position)[0, -1]
        loaded.setup_cache(1, 32)
        FusedDecoder(loaded).prefill(ids)
        fused = FusedDecoder(loaded)(token, position, torch.tensor([0]))[0]
    assert (fused - ref).abs().max().item() < 3e-2 * ref.abs().max().item()


def test_format_table():
    table = format_table({"layers.0.attn.wo": (4.0, 64), "layers.0.ffn.w_down": (3.5, 128),
                          "layers.1.attn.wo": (4.0, 64), "lm_head": (8.0, 128)})
    assert "| layers.0 | int4 g64 | int3.5 g128 |" in table and "| layers.1 | int4 g64 |  |" in table
    assert "outside the blocks: lm_head int8 g128\n" in table
    assert table.endswith("linears per format: int4 g64 x2, int3.5 g128 x1, int8 g128 x1")


@pytest.mark.slow  # calibrates on 8 x 512 tokens twice, with a 49,152-token vocabulary
def test_convert_and_generate_cli_with_a_budget(tmp_path, smollm2_dir, capsys):
    """`lowbit convert --bits-per-weight` prints the chosen map; the checkpoint holds it and the budget."""
    hf = tmp_path / "hf"
    tiny_hf_llama(hf, vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, hf / name)
    out = tmp_path / "q"
    assert cli(["convert", str(hf), str(out), "--bits-per-weight", "4.25", "--group-size", "64"]) == 0
    printed = capsys.readouterr()
    assert "formats for 4.25 bits/weight" in printed.err and "| layers.2 |" in printed.err
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits_per_weight"]["target"] == 4.25 and qc["bits_per_weight"]["achieved"] <= 4.25
    assert qc["group_size"] == 64 and all(f["group_size"] == 64 for f in qc.get("module_formats", {}).values())
    assert cli(["inspect", str(out)]) == 0
    # generate quantizes for the budget itself, then runs the fused step. Its default int8 head on the CPU counts in
    # the budget: with this model's 49,152 x 128 head, 8 bits per weight is near the cheapest possible.
    assert cli(["generate", str(hf), "--bits-per-weight", "8.1", "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().err
    assert "formats for 8.1 bits/weight" in printed and "outside the blocks: lm_head int8 g128" in printed and "(fused)" in printed


def test_bad_budgets_raise_clear_errors(tiny, tmp_path, capsys):
    calib = calib_tokens(n=2, t=32)
    with pytest.raises(ValueError, match=r"bits_per_weight must lie in \[3\.\d+, 9\.\d+\].*got 3.0"):
        lowbit.quantize_model(tiny, bits_per_weight=3.0, calib=calib, inplace=False, progress=False)
    with pytest.raises(ValueError, match=r"bits_per_weight must lie in \[3\.\d+, 9\.\d+\].*got 9.5"):
        lowbit.quantize_model(tiny, bits_per_weight=9.5, calib=calib, inplace=False, progress=False)
    with pytest.raises(ValueError, match="bits_per_weight must be a number"):
        lowbit.quantize_model(tiny, bits_per_weight="4", calib=calib, inplace=False, progress=False)
    with pytest.raises(ValueError, match="give bits_per_weight .* or bits .*, not both"):
        lowbit.quantize_model(tiny, 4, bits_per_weight=4.25, calib=calib, inplace=False)
    with pytest.raises(ValueError, match="the bits-per-weight budget needs calibration tokens"):
        lowbit.quantize_model(tiny, bits_per_weight=4.25, inplace=False)
    with pytest.raises(ValueError, match="modules_to_not_convert is not supported with bits_per_weight"):
        lowbit.quantize_model(tiny, bits_per_weight=4.25, calib=calib, modules_to_not_convert=["wo"])
    with pytest.raises(ValueError, match="group_size must be one of"):
        lowbit.quantize_model(tiny, bits_per_weight=4.25, group_size=48, calib=calib, inplace=False)
    hf = tmp_path / "hf"
    tiny_hf_llama(hf)
    assert cli(["convert", str(hf), str(tmp_path / "q"), "--bits", "4", "--bits-per-weight", "4.25"]) == 1
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("entry", [4.25, {"target": 4.25}, {"target": "4.25", "achieved": 4.2},
                                   {"target": 4.25, "achieved": -1}])
def test_bad_budget_entry_in_a_checkpoint(tiny, tmp_path, entry):
    out = save_quantized(lowbit.quantize_model(tiny, bits_per_weight=4.5, calib=calib_tokens(n=2, t=32),
                                               progress=False), tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["bits_per_weight"] = entry
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantization_config.bits_per_weight must be"):
        load_quantized(out)


def test_residual_energy_is_what_gptq_leaves_a_column():
    """1 / U_cc^2: a column's input energy not explained by the columns rounded after it (the damped Hessian's
    Schur complement): the last one keeps its whole energy, the first one 1 / [H^-1]_cc; with uncorrelated
    inputs every column keeps its own energy."""
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0)) @ torch.randn(
        16, 16, generator=torch.Generator().manual_seed(1))
    h = x.T @ x
    damped = (h + DAMP * h.diagonal().mean() * torch.eye(16)).double()
    order = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    energy = residual_energy(h, order)
    first, last = order[0], order[-1]
    assert energy[last].item() == pytest.approx(damped[last, last].item(), rel=1e-4)
    assert energy[first].item() == pytest.approx(1 / torch.linalg.inv(damped)[first, first].item(), rel=1e-3)
    assert bool((energy <= damped.diagonal().float() * (1 + 1e-4)).all()) and energy[first] < damped[first, first] / 2
    diagonal = torch.diag(torch.rand(16) + 0.5)
    expected = diagonal.diagonal() + DAMP * diagonal.diagonal().mean()
    torch.testing.assert_close(residual_energy(diagonal, order), expected)


def test_gptq_errors_predict_what_gptq_leaves(tiny):
    """measure_errors(gptq=True) estimates the output error GPTQ leaves in each layer far better than the
    round-to-nearest error does (which GPTQ's compensation shrinks by a factor that differs between layers)."""
    calib = calib_tokens()
    fmts = [(4.0, 32), (3.5, 64)]
    rtn, _ = measure_errors(tiny, calib, fmts, False, progress=False, weighted=False)
    compensated, _ = measure_errors(tiny, calib, fmts, False, progress=False, gptq=True, weighted=False)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: inputs.setdefault(n, []).append(args[0]))
             for n, m in tiny.named_modules() if n in rtn]
    with torch.no_grad():
        tiny(calib)
    for h in hooks:
        h.remove()
    for name in ("layers.0.attn.wqkv", "layers.1.ffn.w_down"):
        w = tiny.get_submodule(name).weight.data
        x = torch.cat(inputs[name]).reshape(-1, w.shape[1])
        for fmt in fmts:
            dq = w - gptq_quantize(w, hessian(x), *fmt, weighted_grid=False).dequantize()
            actual = ((dq @ (x.T @ x)) * dq).sum().item()
            assert abs(math.log(compensated[name][fmt] / actual)) < math.log(1.6) < math.log(rtn[name][fmt] / actual)


def test_output_sensitivity_is_the_fisher_diagonal(tiny):
    """Each decoder linear's output features: the squared gradient of the log-likelihood of tokens sampled from the
    model (seed 0), summed over the tokens, checked against gradients taken another way (a zero added to the
    output); no parameter gets a gradient, and it runs from inference mode too."""
    calib = calib_tokens(n=2, t=32)
    with torch.inference_mode():
        f = output_sensitivity(tiny, calib)
    assert set(f) == {n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert all(p.grad is None for p in tiny.parameters())
    for name in ("layers.0.attn.wqkv", "layers.1.ffn.w_down"):
        expected, generator = 0, torch.Generator().manual_seed(0)
        for ids in calib:
            zero = torch.zeros(len(ids), tiny.get_submodule(name).out_features, requires_grad=True)
            hook = tiny.get_submodule(name).register_forward_hook(lambda mod, args, out: out + zero)
            logits = tiny(ids[None])[0]
            hook.remove()
            labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator)[:, 0]
            loss = F.cross_entropy(logits, labels, reduction="sum")
            expected = expected + torch.autograd.grad(loss, zero)[0].square().sum(0)
        torch.testing.assert_close(f[name], expected, rtol=1e-4, atol=1e-8)
    assert len({round(v.mean().item(), 6) for v in f.values()}) > 1  # the layers are weighted differently
