"""CPU kernels against the reference, for every ISA this machine has.

Which path runs depends on the row count, the activation dtype and the ISA
(lowbit.build_info()["cpu_int8_max_rows"]). Tolerances (relative to max |y| of the reference):
  int8 path (int8 activations per 64 cols):      reference model of the int8 steps (tests/reference.py),
                                                  2e-5; and the exact reference within 2% relative RMS error
  GEMM path (dequantized tiles and BLAS):         exact reference, 2e-5
  bfloat16 / float16 outputs add their rounding:  8e-3 / 1e-3
"""

import os
import sys

import pytest
import torch

import lowbit
from lowbit import formats
from reference import check_non_finite_rows, int8_activation_linear, reference_linear

M_VALUES = [1, 2, 3, 7, 8, 16, 33, 128]
OUT_TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def int8_limit(dtype):
    """Rows of this dtype up to which linear runs the int8 kernels with the active ISA (None: all)."""
    return lowbit.build_info()["cpu_int8_max_rows"][str(dtype).removeprefix("torch.")]


def int8_path(m, dtype):
    limit = int8_limit(dtype)
    return limit is None or m <= limit


def make_weight(n, k, bits, group_size, with_perm):
    perm = torch.randperm(k).to(torch.int32) if with_perm else None
    return lowbit.quantize_weight(torch.randn(n, k), bits, group_size, perm=perm)


def check_linear(x, qw, bias):
    y = lowbit.linear(x, qw, bias)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qw.shape[0])
    exact = reference_linear(x.float(), qw, None if bias is None else bias.float())
    scale = exact.abs().max().item() + 1e-6
    m = x.reshape(-1, x.shape[-1]).shape[0]
    tol = OUT_TOL[x.dtype] * scale
    if int8_path(m, x.dtype):
        model = int8_activation_linear(x.float(), qw, None if bias is None else bias.float())
        assert (y.double() - model).abs().max().item() <= tol
        assert ((y.double() - exact).norm() / exact.norm()).item() < 0.02
    else:
        assert (y.double() - exact).abs().max().item() <= tol


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
@pytest.mark.parametrize("m", M_VALUES)
def test_linear_matches_reference_every_m_and_group_size(isa, bits, group_size, m):
    n, k = 100, 328  # neither a multiple of 64; K pads up to the group size
    qw = make_weight(n, k, bits, group_size, with_perm=False)
    check_linear(torch.randn(m, k), qw, None)


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("with_perm", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_dtypes_bias_perm(isa, bits, dtype, m, with_perm, with_bias):
    n, k = 72, 576
    qw = make_weight(n, k, bits, 128, with_perm)
    bias = torch.randn(n).to(dtype) if with_bias else None
    check_linear(torch.randn(m, k).to(dtype), qw, bias)


@pytest.mark.parametrize("bits", formats.BITS)
def test_linear_3d_and_non_contiguous_inputs(isa, bits):
    n, k = 48, 160
    qw = make_weight(n, k, bits, 32, with_perm=True)
    x3 = torch.randn(2, 3, k)
    check_linear(x3, qw, None)
    strided = torch.randn(k, 6).t()            # [6, K] with column stride != 1
    assert not strided.is_contiguous()
    check_linear(strided, qw, None)
    sliced = torch.randn(2, 20, 2 * k)[:, ::2, ::2]  # 3-D, strided in every dimension (M = 20)
    check_linear(sliced, qw, None)
    y = lowbit.linear(x3, qw)
    assert torch.equal(y, lowbit.linear(x3.contiguous(), qw))


@pytest.mark.parametrize("bits", formats.BITS)
def test_int8_row_blocks_match_single_rows(isa, bits):
    # Each activation row is quantized and summed on its own, whichever block of rows it runs in.
    limit = int8_limit(torch.float32)
    m = 37 if limit is None else limit
    qw = make_weight(64, 512, bits, 64, with_perm=True)
    x = torch.randn(m, 512)
    one_by_one = torch.cat([lowbit.linear(x[i:i + 1], qw) for i in range(m)])
    assert torch.equal(lowbit.linear(x, qw), one_by_one)


@pytest.mark.parametrize("bits", formats.BITS)
def test_int8_and_gemm_paths_agree(isa, bits):
    dtype = next((d for d in (torch.float32, torch.bfloat16) if int8_limit(d) is not None), None)
    if dtype is None:
        pytest.skip("every row count runs the int8 kernels with this ISA and activation dtype")
    m = int8_limit(dtype) + 1
    qw = make_weight(64, 512, bits, 64, with_perm=False)
    x = torch.randn(m, 512).to(dtype)
    assert int8_path(1, dtype) and not int8_path(m, dtype)
    batched = lowbit.linear(x, qw).float()                               # GEMM path
    one_by_one = torch.cat([lowbit.linear(x[i:i + 1], qw) for i in range(m)]).float()  # int8 path
    assert ((batched - one_by_one).norm() / batched.norm()).item() < 0.02


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
@pytest.mark.parametrize("with_perm", [False, True])
def test_dequantize_matches_reference(isa, bits, group_size, with_perm):
    qw = make_weight(37, 300, bits, group_size, with_perm)
    ref = formats.dequantize(*qw.op_args(), qw.bits, qw.group_size, qw.in_features)
    out = qw.dequantize()
    assert out.dtype == torch.float32 and out.shape == (37, 300)
    assert (out - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("bits", formats.BITS)
def test_isas_agree_exactly_on_integer_path(bits):
    # All ISAs compute identical integer dot products; only float summation order may differ.
    qw = make_weight(64, 640, bits, 128, with_perm=True)
    x = torch.randn(3, 640)
    outputs = []
    previous = lowbit.cpu_isa()
    for name in lowbit.build_info()["cpu_isas_available"]:
        lowbit.set_cpu_isa(name)
        outputs.append(lowbit.linear(x, qw))
    lowbit.set_cpu_isa(previous)
    scale = outputs[0].abs().max().item()
    for y in outputs[1:]:
        assert (y - outputs[0]).abs().max().item() <= 2e-6 * scale


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
def test_bfloat16_tiles_agree_across_isas(bits, group_size):
    # AVX-512 builds bfloat16 prefill tiles of int4 and int3.5 by table lookup, AVX2 by arithmetic (and both
    # int8's): the same values, and the two share one column order, so the products are identical.
    available = lowbit.build_info()["cpu_isas_available"]
    if "avx512_vnni" not in available or not lowbit.build_info()["cpu_features"]["avx512_bf16"]:
        pytest.skip("needs AVX-512 with bfloat16 dot products (the only ISA with the lookup)")
    qw = make_weight(200, 576, bits, group_size, with_perm=True)
    x = torch.randn(64, 576).bfloat16()
    previous = lowbit.cpu_isa()
    outputs = []
    for name in ("avx2", "avx512_vnni"):
        lowbit.set_cpu_isa(name)
        assert not int8_path(64, torch.bfloat16)
        outputs.append(lowbit.linear(x, qw))
    lowbit.set_cpu_isa(previous)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("sign", [1, -1])
def test_int8_extreme_codes_and_activations_are_exact(isa, sign):
    # Codes 255 next to activation codes +-127: a pair of products is 2 * 255 * 127, past int16, where a
    # saturating u8 x s8 pair sum (vpmaddubsw) would clip it. Every ISA must sum it exactly.
    w = torch.ones(40, 256)
    w[:, ::64] = 0.0                       # each group's range is [0, 1]: code 255 for 1.0, code 0 for 0.0
    qw = lowbit.quantize_weight(w, 8, 64)
    assert formats.unpack(qw.qweight, 8).max() == 255
    x = torch.full((3, 256), float(sign))
    y = lowbit.linear(x, qw)
    model = int8_activation_linear(x, qw)
    assert (y.double() - model).abs().max().item() <= 1e-5 * model.abs().max().item()
    assert torch.allclose(y, torch.full_like(y, sign * 252.0), rtol=1e-3)


def test_respects_thread_count():
    qw = make_weight(256, 1024, 4, 128, with_perm=False)
    x = torch.randn(1, 1024)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = lowbit.linear(x, qw)
        torch.set_num_threads(2)
        y2 = lowbit.linear(x, qw)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)  # rows are independent: the split over threads changes nothing


def test_empty_batch():
    qw = make_weight(16, 64, 4, 32, with_perm=False)
    assert lowbit.linear(torch.randn(0, 64), qw).shape == (0, 16)


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 40])  # the int8 path, and beyond it where the ISA has a row limit
def test_non_finite_activations_propagate(isa, bits, dtype, m):
    # A NaN or inf activation makes its row's outputs non-finite, as with F.linear; other rows are untouched.
    qw = make_weight(64, 256, bits, 64, with_perm=True)
    x = torch.randn(m, 256).to(dtype)
    check_non_finite_rows(x, qw)


# The decode step's linear (torch.classes.lowbit.PreparedLinear): the int8 path on the interleaved layout where
# the ISA has a kernel for it (AVX-512 VNNI), the canonical GEMV elsewhere.
def prepared(qw, bias=None):
    perm = qw.perm
    return torch.classes.lowbit.PreparedLinear(float(qw.bits), qw.qweight, qw.scales, qw.zeros, perm, bias,
                                               qw.group_size, qw.in_features)


def check_prepared(x, qw, bias=None):
    lin = prepared(qw, bias)
    y = lin.forward(x)
    model = int8_activation_linear(x, qw, bias)
    exact = reference_linear(x, qw, bias)
    assert y.shape == exact.shape and y.dtype == torch.float32
    assert (y.double() - model).abs().max().item() <= 2e-5 * (exact.abs().max().item() + 1e-6)
    assert ((y.double() - exact).norm() / exact.norm()).item() < 0.02
    return lin


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
@pytest.mark.parametrize("m", [1, 3, 6, 8, 9, 15, 20])
def test_prepared_linear_matches_reference(isa, bits, group_size, m):
    # N = 100: six blocks of 16 rows and a partial one; K = 328 pads up to the group size.
    lin = check_prepared(torch.randn(m, 328), make_weight(100, 328, bits, group_size, with_perm=False))
    assert lin.interleaved() == (isa == "avx512_vnni")


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 48])
def test_prepared_linear_bias_perm_and_row_counts(isa, bits, n):
    qw = make_weight(n, 576, bits, 64, with_perm=True)
    check_prepared(torch.randn(5, 576), qw, torch.randn(n))


@pytest.mark.parametrize("bits", formats.BITS)
def test_prepared_linear_matches_the_op_and_extreme_codes(isa, bits):
    # The interleaved kernel sums the same integer products as the canonical GEMV, codes 0 and 2^b - 1 included.
    w = torch.randn(40, 256)
    w[:, ::64] = 50.0  # a large weight per group: the others land on low codes, it on the top code
    w[:, 1::64] = -50.0
    qw = lowbit.quantize_weight(w, bits, 64, grid="minmax")
    codes = formats.unpack(qw.qweight, bits)
    assert codes.min() == 0 and codes.max() == (255 if bits == 8 else 15)
    x = torch.randn(3, 256)
    x[:, ::7] = 100.0  # activation codes +-127
    y = prepared(qw).forward(x)
    assert (y - lowbit.linear(x, qw)).abs().max().item() <= 1e-5 * y.abs().max().item()


def test_prepared_linear_threads_and_bad_input():
    qw = make_weight(256, 1024, 4, 128, with_perm=False)
    lin = prepared(qw)
    x = torch.randn(2, 1024)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = lin.forward(x)
        torch.set_num_threads(2)
        y2 = lin.forward(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)
    assert lin.forward(torch.randn(0, 1024)).shape == (0, 256)
    with pytest.raises(ValueError, match=r"x must be a CPU tensor \[rows, 1024\]"):
        lin.forward(torch.randn(2, 1000))
    with pytest.raises(TypeError, match="x must be float32"):
        lin.forward(torch.randn(2, 1024).double())
    with pytest.raises(ValueError, match="bits must be 4, 3.5 or 8"):
        torch.classes.lowbit.PreparedLinear(5.0, qw.qweight, qw.scales, qw.zeros, None, None, 128, 1024)


def hugepage_advised_kib():
    """KiB of this process's memory advised for transparent huge pages (VmFlags "hg" in /proc/self/smaps)."""
    total, size = 0, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("VmFlags:") and " hg" in line:
                total += size
    return total


def test_prepared_linears_share_and_release_their_memory(isa):
    # Repacked weights are carved from shared mappings (cpu/weight_memory.cpp): a layer freed before or after
    # others leaves theirs intact, and so does a layer too large for a shared mapping.
    small = [make_weight(48, 256, bits, 64, with_perm=False) for bits in formats.BITS]
    x, x_large = torch.randn(3, 256), torch.randn(2, 1024)
    expected = [prepared(qw).forward(x) for qw in small]
    large = random_int8_weight(70_000, 1024)  # 72 MB of codes, more than a shared mapping holds
    y_large = prepared(large).forward(x_large)
    assert (y_large - lowbit.linear(x_large, large)).abs().max().item() <= 1e-5 * y_large.abs().max().item()
    for _ in range(2):
        lins = [prepared(qw) for qw in small]
        big = prepared(large)
        assert torch.equal(big.forward(x_large), y_large)
        del lins[1]
        more = [prepared(qw) for qw in small]
        for lin, y in zip(lins, expected[:1] + expected[2:]):
            assert torch.equal(lin.forward(x), y)
        del big
        for lin, y in zip(more, expected):
            assert torch.equal(lin.forward(x), y)


def random_int8_weight(n, k):
    """An int8 g128 weight of random codes, without quantizing a float matrix of its size."""
    g = torch.Generator().manual_seed(0)
    return lowbit.QuantizedWeight(torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g),
                                  (torch.rand(n, k // 128, generator=g) * 1e-3).half(),
                                  torch.full((n, k // 128), 128.0).half(), None, 8, 128, k)


@pytest.mark.skipif(sys.platform != "linux" or not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                    reason="transparent huge pages are a Linux feature that this kernel lacks")
def test_prepared_linear_asks_for_huge_pages(isa):
    # The interleaved copy of a layer larger than a shared mapping gets a mapping of its own, advised for
    # 2 MiB pages ("hg" in /proc/self/smaps), whatever the system then grants.
    if isa != "avx512_vnni":
        pytest.skip("only the interleaved layout is repacked (AVX-512 VNNI)")
    before = hugepage_advised_kib()
    held = prepared(random_int8_weight(70_000, 1024))
    assert hugepage_advised_kib() >= before + 70_000 * 1024 // 1024
    del held
    assert hugepage_advised_kib() < before + 70_000 * 1024 // 1024  # unmapped with the last tensor


@pytest.mark.parametrize("bits", formats.BITS)
def test_prepared_linear_non_finite_rows(isa, bits):
    qw = make_weight(40, 256, bits, 64, with_perm=True)
    x = torch.randn(4, 256)
    x[1, 7] = float("nan")
    x[2, 100] = float("inf")
    y = prepared(qw).forward(x)
    assert y[1].isnan().all() and not y[2].isfinite().any()
    assert torch.equal(y[[0, 3]], prepared(qw).forward(x[[0, 3]]))
