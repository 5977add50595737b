"""Bad input gets a clear exception that names the problem."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit.ops import OPS


@pytest.fixture
def qw():
    return lowbit.quantize_weight(torch.randn(32, 128), 4, 64)


def call(qw, x, bias=None, group_size=None, in_features=None):
    linear_op, _ = OPS[qw.bits]
    group_size = qw.group_size if group_size is None else group_size
    in_features = qw.in_features if in_features is None else in_features
    return linear_op(x, *qw.op_args(), bias, group_size, in_features)


def test_wrong_activation_dtype(qw):
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        lowbit.linear(torch.ones(1, 128, dtype=torch.int32), qw)
    with pytest.raises(TypeError, match="x must be float32"):
        lowbit.linear(torch.ones(1, 128, dtype=torch.float64), qw)


def test_k_mismatch(qw):
    with pytest.raises(ValueError, match="in_features = 128"):
        lowbit.linear(torch.randn(1, 127), qw)
    with pytest.raises(ValueError, match="in_features = 128"):
        lowbit.QuantLinear(qw)(torch.randn(4, 130))


@pytest.mark.parametrize("group_size", [0, 16, 48, 100, 512])
def test_unsupported_group_size(qw, group_size):
    with pytest.raises(ValueError, match="group_size must be one of"):
        lowbit.quantize_weight(torch.randn(4, 128), 4, group_size)
    with pytest.raises(ValueError, match="group_size must be one of"):
        call(qw, torch.randn(1, 128), group_size=group_size)


@pytest.mark.parametrize("bits", [3, 2, 16, 4.5, "4", "8"])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        lowbit.quantize_weight(torch.randn(4, 128), bits, 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights(bad):
    w = torch.randn(4, 128)
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"non-finite values \(first at \[2, 5\]\)"):
        lowbit.quantize_weight(w, 4, 64)


def test_weights_too_large_for_float16_scales():
    with pytest.raises(ValueError, match="float16"):
        lowbit.quantize_weight(torch.full((2, 64), 1e7), 4, 32)


def test_bad_weight_argument():
    with pytest.raises(ValueError, match="2-D floating-point"):
        lowbit.quantize_weight(torch.randn(4, 4, 4), 4, 32)
    with pytest.raises(ValueError, match="2-D floating-point"):
        lowbit.quantize_weight(torch.ones(4, 64, dtype=torch.int64), 4, 32)
    with pytest.raises(ValueError, match="must not be empty"):
        lowbit.quantize_weight(torch.ones(0, 64), 4, 32)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        lowbit.QuantLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_tensors_on_different_devices(qw):
    with pytest.raises(RuntimeError, match="x is on cpu but qweight is on meta"):
        lowbit.linear(torch.randn(1, 128), qw.to("meta"))
    with pytest.raises(ValueError, match="scales is on meta but qweight is on cpu"):
        lowbit.QuantizedWeight(qw.qweight, qw.scales.to("meta"), qw.zeros, None, 4, 64, 128)
    with pytest.raises(RuntimeError, match="bias is on meta"):
        call(qw, torch.randn(1, 128), bias=torch.randn(32, device="meta"))


def test_corrupt_weight_tensors(qw):
    with pytest.raises(ValueError, match=r"qweight must be torch.uint8 \[32, 64\]"):
        lowbit.QuantizedWeight(qw.qweight[:, :-1], qw.scales, qw.zeros, None, 4, 64, 128)
    with pytest.raises(ValueError, match=r"scales must be torch.float16"):
        lowbit.QuantizedWeight(qw.qweight, qw.scales.float(), qw.zeros, None, 4, 64, 128)
    with pytest.raises(ValueError, match="perm must be a permutation"):
        lowbit.QuantizedWeight(qw.qweight, qw.scales, qw.zeros, torch.zeros(128, dtype=torch.int32), 4, 64, 128)
    # The same checks in the op itself, for callers that skip QuantizedWeight.
    linear_op, _ = OPS[4]
    x = torch.randn(1, 128)
    with pytest.raises(ValueError, match=r"qweight must be \[32, 64\]"):
        linear_op(x, qw.qweight[:, :-1].contiguous(), qw.scales, qw.zeros, None, None, 64, 128)
    with pytest.raises(TypeError, match="scales must be float16"):
        linear_op(x, qw.qweight, qw.scales.float(), qw.zeros, None, None, 64, 128)
    with pytest.raises(ValueError, match="zeros shape"):
        linear_op(x, qw.qweight, qw.scales, qw.zeros[:1], None, None, 64, 128)
    with pytest.raises(ValueError, match="perm is not a permutation"):
        linear_op(x, qw.qweight, qw.scales, qw.zeros, torch.zeros(128, dtype=torch.int32), None, 64, 128)
    with pytest.raises(ValueError, match=r"perm\[0\] = 500 is outside"):
        linear_op(x, qw.qweight, qw.scales, qw.zeros, torch.full((128,), 500, dtype=torch.int32), None, 64, 128)
    with pytest.raises(ValueError, match=r"bias must be \[32\]"):
        linear_op(x, qw.qweight, qw.scales, qw.zeros, None, torch.randn(31), 64, 128)
    with pytest.raises(TypeError, match="bias dtype"):
        linear_op(x, qw.qweight, qw.scales, qw.zeros, None, torch.randn(32, dtype=torch.float64), 64, 128)


def test_unknown_cpu_isa():
    with pytest.raises(ValueError, match="unknown CPU ISA 'sse9'"):
        lowbit.set_cpu_isa("sse9")


def test_clip_ratios_are_checked():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="clip ratios must lie in"):
        lowbit.quantize_weight(w, 4, 32, clip=torch.full((8, 2), -1.0))
    with pytest.raises(ValueError, match="clip must be a tensor of ratios \\[8, 2\\]"):
        lowbit.quantize_weight(w, 4, 32, clip=torch.ones(8))


def test_linear_is_inference_only(qw):
    x = torch.randn(2, qw.in_features, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        lowbit.linear(x, qw)
    with torch.no_grad():
        assert lowbit.linear(x, qw).shape == (2, qw.out_features)


def test_convert_checks_align_first(tmp_path):
    with pytest.raises(ValueError, match="align must be a power of two"):
        lowbit.convert(tmp_path / "missing", tmp_path / "out", align=1000)


def test_cli_reports_file_errors_in_one_line(tmp_path, capsys):
    from lowbit.cli import main as cli
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli(["convert", str(tmp_path / "src"), str(blocker / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lowbit convert: error:") and len(err.strip().splitlines()) == 1
    from lowbit.io.atomic import atomic_directory
    with pytest.raises(NotADirectoryError, match="is a file, not a directory"):
        with atomic_directory(blocker / "out"):
            pass


def test_int8_op_checks_its_packed_width():
    q4 = lowbit.quantize_weight(torch.randn(32, 128), 4, 64)  # int4's [32, 64] bytes passed as int8
    with pytest.raises(ValueError, match=r"lowbit.int8_linear: qweight must be \[32, 128\]"):
        torch.ops.lowbit.int8_linear(torch.randn(1, 128), *q4.op_args(), None, 64, 128)
    with pytest.raises(ValueError, match=r"lowbit.int8_dequantize: qweight must be \[32, 128\]"):
        torch.ops.lowbit.int8_dequantize(*q4.op_args(), 64, 128)


def test_unknown_grid_is_named():
    with pytest.raises(ValueError, match="grid must be one of \\('mse', 'minmax'\\), got 'best'"):
        lowbit.quantize_weight(torch.randn(8, 64), 4, 32, grid="best")
