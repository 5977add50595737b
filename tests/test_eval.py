"""lowbit.eval: the per-layer RMSE report, the uniform reference quantizers, perplexity."""

import math

import pytest
import torch

import lowbit
from conftest import tiny_hf_llama
from lowbit.models.llama import LlamaForCausalLM
from lowbit.quantize import fake_quantize


def test_uniform_reference_quantizers_bracket_int35():
    w = torch.randn(64, 256)
    err = {b: (fake_quantize(w, b, 64) - w).norm().item() for b in (3, 3.5, 4)}
    assert err[3] > err[3.5] > err[4]
    levels = fake_quantize(w, 3, 64).view(64, 4, 64)[0, 0].unique()
    assert len(levels) <= 8
    with pytest.raises(ValueError, match="bits must be 3.5 or an integer"):
        fake_quantize(w, 2.5, 64)


@pytest.fixture
def tiny(tmp_path):
    tiny_hf_llama(tmp_path)
    return LlamaForCausalLM.from_pretrained(tmp_path)


def test_rmse_report_rtn(tiny):
    q = lowbit.quantize_model(tiny, 4, 32, inplace=False)
    ids = torch.randint(0, 512, (3, 40))
    report = lowbit.eval.rmse_report(tiny, q, ids, baselines=(3, 4), progress=False)
    assert [r["layer"] for r in report.rows][:4] == ["layers.0.attn.wqkv", "layers.0.attn.wo", "layers.0.ffn.w_gate_up",
                                                     "layers.0.ffn.w_down"]
    assert len(report.rows) == 12
    first = report.rows[0]
    w = tiny.layers[0].attn.wqkv.weight
    expected = ((q.layers[0].attn.wqkv.dequantize() - w).norm() / w.norm()).item()
    assert math.isclose(first["weight_rel_rmse"], expected, rel_tol=1e-6)
    # codes + float16 scales and zeros
    assert first["bits_per_weight"] == 5.0 and first["bytes"] == 192 * 128 // 2 + 192 * 4 * 2 * 2
    # int4 RTN is the uniform 4-bit quantizer, so its output error is the baseline's (float weights
    # rounded, float activations) plus the small error of the kernels' int8 activations; uniform 3-bit is
    # clearly worse.
    for row in report.rows:
        assert math.isclose(row["output_rel_rmse"], row["output_rel_rmse_uniform4"], rel_tol=1e-2)
        assert row["output_rel_rmse_uniform3"] > 1.5 * row["output_rel_rmse"]
    t = report.totals
    assert t["quantized_layers"] == 12 and t["bits_per_weight"] == 5.0
    assert t["model_mb"] < t["float16_mb"] * 2  # float32 embeddings and norms, 5-bit linears
    text = str(report)
    assert "layers.2.ffn.w_down" in text and "uniform3" in text and "all quantized layers" in text


def test_rmse_report_undoes_awq_scales(tiny):
    calib = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    awq = lowbit.quantize_model(tiny, 4, 32, method="awq", calib=calib, inplace=False)
    rtn = lowbit.quantize_model(tiny, 4, 32, inplace=False)
    ids = torch.randint(0, 512, (2, 40))
    r_awq = lowbit.eval.rmse_report(tiny, awq, ids, progress=False).totals
    r_rtn = lowbit.eval.rmse_report(tiny, rtn, ids, progress=False).totals
    # Compared in the folded basis, the scaled weights would be off by the AWQ scales (errors of order 1).
    assert r_awq["weight_rel_rmse"] < 2 * r_rtn["weight_rel_rmse"]
    assert r_awq["output_rel_rmse"] < 1.5 * r_rtn["output_rel_rmse"]


def test_rmse_report_errors(tiny, tmp_path):
    ids = torch.randint(0, 512, (1, 16))
    with pytest.raises(ValueError, match="no QuantLinear"):
        lowbit.eval.rmse_report(tiny, tiny, ids)
    q = lowbit.quantize_model(tiny, 4, 32, inplace=False)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no nn.Linear named 'layers.0.attn.wqkv'"):
        lowbit.eval.rmse_report(other, q, ids)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tiny):
    class Uniform(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, ids):
            return torch.zeros(*ids.shape, 512)
    assert math.isclose(lowbit.eval.perplexity(Uniform(), torch.arange(100), seq_len=32, progress=False), 512,
                        rel_tol=1e-5)
    with pytest.raises(ValueError, match="need more than seq_len"):
        lowbit.eval.perplexity(tiny, torch.arange(10), seq_len=32)
