import pytest
import torch

import lowbit
from lowbit import formats


@pytest.mark.parametrize("bits", formats.BITS)
def test_pack_unpack_round_trip_every_code_at_every_position(bits):
    # Column c of row r holds code (r + 16 c) % (max + 1): every code appears at every position of a block.
    kp = 64
    limit = formats.code_max(bits)
    cols = torch.arange(kp)
    rows = torch.arange(256)[:, None]
    maxima = limit[cols % 2]
    codes = ((rows + 16 * cols) % (maxima + 1)).to(torch.int32)
    packed = formats.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (256, {4: kp // 2, 3.5: kp // 16 * 7, 8: kp}[bits])
    assert torch.equal(formats.unpack(packed, bits), codes)


def test_int35_is_sixteen_weights_in_seven_bytes_with_no_spare_bits():
    # All 2^56 bit patterns of a block are valid: random bytes unpack and repack to themselves.
    packed = torch.randint(0, 256, (8, 7 * 4), dtype=torch.uint8)
    codes = formats.unpack(packed, 3.5)
    assert codes.shape == (8, 64)
    assert torch.equal(formats.pack(codes, 3.5), packed)


def test_int35_bit_layout_matches_format_doc():
    # docs/FORMAT.md: pair p = (4-bit code of column 2p) | (3-bit code of column 2p+1) << 4, stored at
    # bits [7p, 7p+7) of the block's little-endian 56-bit integer.
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 0], codes[0, 1] = 0b1010, 0b011     # pair 0 = 0b0111010
    codes[0, 14], codes[0, 15] = 0b0001, 0b111   # pair 7 = 0b1110001 at bits 49..55
    block = 0b0111010 | (0b1110001 << 49)
    expected = [(block >> (8 * i)) & 0xFF for i in range(7)]
    assert formats.pack(codes, 3.5)[0, :7].tolist() == expected


def test_int4_bit_layout_matches_format_doc():
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 0], codes[0, 1], codes[0, 31] = 3, 12, 9
    packed = formats.pack(codes, 4)
    assert packed[0, 0].item() == 3 | (12 << 4)
    assert packed[0, 15].item() == 9 << 4


def test_int8_bit_layout_matches_format_doc():
    # docs/FORMAT.md: byte j of a row is the code of column j.
    codes = torch.arange(64, dtype=torch.int32).view(1, 64) * 4 + 3
    assert formats.pack(codes, 8).tolist() == codes.tolist()


@pytest.mark.parametrize("bits,column,code", [(3.5, 1, 8), (4, 0, 16), (8, 5, 256), (8, 2, -1)])
def test_pack_rejects_codes_out_of_range(bits, column, code):
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, column] = code  # e.g. an odd column of int3.5 holds 3-bit codes
    with pytest.raises(ValueError, match="out of range"):
        formats.pack(codes, bits)


def test_int8_codes_of_a_weight_on_the_grid_are_exact():
    # A weight that already lies on an int8 grid (integer zero points; every group reaching codes 0 and 255)
    # comes back with exactly its codes, scales and zero points: nothing is lost on the way.
    n, groups, g = 16, 4, 64
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (n, groups, g), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 255
    scales = (torch.rand(n, groups, generator=gen) * 0.01 + 1e-4).half()
    zeros = torch.randint(0, 256, (n, groups), generator=gen).half()
    w = ((codes - zeros.float()[..., None]) * scales.float()[..., None]).view(n, -1)
    qw = lowbit.quantize_weight(w, 8, g)
    assert torch.equal(formats.unpack(qw.qweight, 8), codes.view(n, -1).to(torch.int32))
    assert torch.equal(qw.scales, scales) and torch.equal(qw.zeros, zeros)
    assert torch.equal(qw.dequantize(), w)


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
@pytest.mark.parametrize("k", [576, 100, 256])
def test_quantize_weight_error_within_half_a_step(bits, group_size, k):
    w = torch.randn(24, k)
    qw = lowbit.quantize_weight(w, bits, group_size, grid="minmax")
    kp = formats.padded_in_features(k, group_size)
    assert qw.shape == (24, k) and qw.scales.shape == (24, kp // group_size)
    deq = formats.dequantize(*qw.op_args(), qw.bits, qw.group_size, qw.in_features)
    step = qw.scales.float().repeat_interleave(group_size, 1)[:, :k]
    if bits == 3.5:
        step[:, 1::2] *= formats.STEP3
    # Round to nearest: at most half a step off (plus float16 rounding of scale and zero).
    assert ((deq - w).abs() <= 0.5 * step * 1.01 + 1e-6).all()


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("group_size", [32, 128])
def test_mse_grid_beats_minmax_in_every_group(bits, group_size):
    # The default grid searches shrunken ranges with least-squares refits and keeps the min-max grid where none is
    # better: no group may come out worse, and on Gaussian weights the total is clearly lower.
    w = torch.randn(64, 200)
    errors = {}
    for grid in ("mse", "minmax"):
        qw = lowbit.quantize_weight(w, bits, group_size, grid=grid)
        deq = formats.dequantize(*qw.op_args(), qw.bits, qw.group_size, qw.in_features)
        padded = torch.nn.functional.pad(deq - w, (0, formats.padded_in_features(200, group_size) - 200))
        errors[grid] = padded.view(64, -1, group_size).square().sum(-1)
    assert (errors["mse"] <= errors["minmax"]).all()
    assert errors["mse"].sum() < 0.99 * errors["minmax"].sum()


def test_quantize_weight_nbytes_and_bits_per_weight():
    w = torch.randn(4096, 4096)
    q4, q35, q8 = (lowbit.quantize_weight(w, bits, 128) for bits in (4, 3.5, 8))
    assert q4.nbytes == 4096 * 2048 + 2 * 4096 * 32 * 2
    assert q35.nbytes == 4096 * 4096 // 16 * 7 + 2 * 4096 * 32 * 2
    assert q8.nbytes == 4096 * 4096 + 2 * 4096 * 32 * 2
    assert q4.bits_per_weight == pytest.approx(4.25)
    assert q35.bits_per_weight == pytest.approx(3.75)
    assert q8.bits_per_weight == pytest.approx(8.25)


def test_quantize_with_perm_stores_permuted_columns():
    w = torch.randn(8, 96)
    perm = torch.randperm(96).to(torch.int32)
    qw = lowbit.quantize_weight(w, 4, 32, perm=perm)
    plain = lowbit.quantize_weight(w[:, perm.long()], 4, 32)
    assert torch.equal(qw.qweight, plain.qweight)
    deq = formats.dequantize(*qw.op_args(), 4, 32, 96)
    deq_plain = formats.dequantize(*plain.op_args(), 4, 32, 96)
    assert torch.equal(deq[:, perm.long()], deq_plain)


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(2, 64)
    w[1, :32] = 0.75
    deq = formats.dequantize(*lowbit.quantize_weight(w, 4, 32).op_args(), 4, 32, 64)
    assert torch.allclose(deq, w, atol=1e-3)


@pytest.mark.parametrize("bits", formats.BITS)
def test_quantized_weight_to_and_tensors(bits):
    qw = lowbit.quantize_weight(torch.randn(16, 64), bits, 32, perm=torch.randperm(64))
    assert set(qw.tensors()) == {"qweight", "scales", "zeros", "perm"}
    again = lowbit.QuantizedWeight.from_tensors(qw.to("cpu").tensors(), bits, 32, 64)
    assert torch.equal(again.dequantize(), qw.dequantize())


def test_int8_has_no_tiled_layout():
    qw = lowbit.quantize_weight(torch.randn(16, 64), 8, 32)
    assert lowbit.weight.device_layout(8, torch.device("cuda")) == "canonical"
    assert lowbit.weight.device_layout(4, torch.device("cuda")) == "tiled"
    with pytest.raises(ValueError, match="int8 has no tiled layout"):
        qw.to_layout("tiled")


def test_all_finite():
    assert formats.all_finite(torch.randn(100)) and formats.all_finite(torch.arange(5))
    assert formats.all_finite(torch.empty(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            t = torch.randn(1000).to(dtype)
            t[737] = bad
            assert not formats.all_finite(t)
    huge = torch.full((10,), 3e38)  # finite values whose sum overflows: the elementwise check answers
    assert formats.all_finite(huge) and formats.all_finite(torch.full((100000,), 60000.0, dtype=torch.float16))
    huge[3] = float("inf")
    assert not formats.all_finite(huge)
