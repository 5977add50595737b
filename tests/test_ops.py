import pytest
import torch
from torch import nn

import lowbit
from lowbit import formats
from lowbit.ops import OPS


def sample_args(bits, m, with_perm, with_bias, dtype=torch.float32):
    k, n, g = 200, 48, 64
    perm = torch.randperm(k) if with_perm else None
    qw = lowbit.quantize_weight(torch.randn(n, k), bits, g, perm=perm)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    return qw, x, bias


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("m", [1, 12])
@pytest.mark.parametrize("with_perm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_linear(bits, m, with_perm, dtype):
    qw, x, bias = sample_args(bits, m, with_perm, with_bias=True, dtype=dtype)
    linear_op, _ = OPS[bits]
    torch.library.opcheck(linear_op.default, (x, *qw.op_args(), bias, qw.group_size, qw.in_features))
    torch.library.opcheck(linear_op.default, (x, *qw.op_args(), None, qw.group_size, qw.in_features))


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("with_perm", [False, True])
def test_opcheck_dequantize(bits, with_perm):
    qw, _, _ = sample_args(bits, 1, with_perm, with_bias=False)
    _, dequantize_op = OPS[bits]
    torch.library.opcheck(dequantize_op.default, (*qw.op_args(), qw.group_size, qw.in_features))


@pytest.mark.parametrize("bits", formats.BITS)
def test_torch_compile_fullgraph(bits):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(256, 96), nn.SiLU(), nn.Linear(96, 64))
    for i in (0, 2):
        model[i] = lowbit.QuantLinear.from_linear(model[i], bits, 32)
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 3, 20):
        x = torch.randn(m, 256)
        assert torch.allclose(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", formats.BITS)
def test_quant_linear_replaces_nn_linear(bits):
    linear = nn.Linear(320, 80)
    q = lowbit.QuantLinear.from_linear(linear, bits, 64)
    x = torch.randn(2, 5, 320)
    y = q(x)
    expected = x @ q.dequantize().T + linear.bias
    assert y.shape == (2, 5, 80)
    assert ((y - expected).norm() / expected.norm()).item() < 0.02
    assert (q.in_features, q.out_features, q.bits, q.group_size) == (320, 80, bits, 64)
    # The float layer and the quantized one agree to within the quantization error.
    err = ((y - linear(x)).norm() / linear(x).norm()).item()
    assert err < {4: 0.15, 3.5: 0.25, 8: 0.02}[bits]
    # Buffers travel with state_dict into a fresh module.
    state = q.state_dict()
    assert set(state) == {"qweight", "scales", "zeros", "bias"}
    again = lowbit.QuantLinear(lowbit.QuantizedWeight.from_tensors(state, bits, 64, 320), state["bias"])
    assert torch.equal(again(x), y)
    assert "bits=" in repr(q)


def test_quant_linear_bfloat16_activations():
    q = lowbit.QuantLinear.from_linear(nn.Linear(128, 32), 4, 128)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16


def test_quant_linear_survives_dtype_casts():
    q = lowbit.QuantLinear.from_linear(nn.Linear(128, 32, bias=False), 4, 64)
    x = torch.randn(2, 128)
    y = q(x)
    q.to(torch.bfloat16).to(torch.float32)  # the format is untouched: float16 scales and zeros
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    assert torch.equal(q(x), y)
