import pytest
import torch

import lowbit
from lowbit import formats


@pytest.mark.parametrize("bits", [4, 3.5])
def test_pack_unpack_round_trip_every_code_at_every_position(bits):
    # Column c of row r holds code (r + c) % (max + 1): every code appears at every position of a block.
    kp = 64
    limit = formats.code_max(bits)
    cols = torch.arange(kp)
    rows = torch.arange(16)[:, None]
    maxima = limit[cols % 2]
    codes = ((rows + cols) % (maxima + 1)).to(torch.int32)
    packed = formats.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (16, kp // 2 if bits == 4 else kp // 16 * 7)
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


def test_pack_rejects_codes_out_of_range():
    codes = torch.zeros(1, 32, dtype=torch.int32)
    codes[0, 1] = 8  # odd column of int3.5 holds 3-bit codes
    with pytest.raises(ValueError, match="out of range"):
        formats.pack(codes, 3.5)


@pytest.mark.parametrize("bits", [4, 3.5])
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
@pytest.mark.parametrize("k", [576, 100, 256])
def test_quantize_weight_error_within_half_a_step(bits, group_size, k):
    w = torch.randn(24, k)
    qw = lowbit.quantize_weight(w, bits, group_size)
    kp = formats.padded_in_features(k, group_size)
    assert qw.shape == (24, k) and qw.scales.shape == (24, kp // group_size)
    deq = formats.dequantize(*qw.op_args(), qw.bits, qw.group_size, qw.in_features)
    step = qw.scales.float().repeat_interleave(group_size, 1)[:, :k]
    if bits == 3.5:
        step[:, 1::2] *= formats.STEP3
    # Round to nearest: at most half a step off (plus float16 rounding of scale and zero).
    assert ((deq - w).abs() <= 0.5 * step * 1.01 + 1e-6).all()


def test_quantize_weight_nbytes_and_bits_per_weight():
    w = torch.randn(4096, 4096)
    q4, q35 = lowbit.quantize_weight(w, 4, 128), lowbit.quantize_weight(w, 3.5, 128)
    assert q4.nbytes == 4096 * 2048 + 2 * 4096 * 32 * 2
    assert q35.nbytes == 4096 * 4096 // 16 * 7 + 2 * 4096 * 32 * 2
    assert q4.bits_per_weight == pytest.approx(4.25)
    assert q35.bits_per_weight == pytest.approx(3.75)


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


def test_quantized_weight_to_and_tensors():
    qw = lowbit.quantize_weight(torch.randn(16, 64), 3.5, 32, perm=torch.randperm(64))
    assert set(qw.tensors()) == {"qweight", "scales", "zeros", "perm"}
    again = lowbit.QuantizedWeight.from_tensors(qw.to("cpu").tensors(), 3.5, 32, 64)
    assert torch.equal(again.dequantize(), qw.dequantize())
