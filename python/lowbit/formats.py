"""The int4, int3.5 and int8 weight formats: the one pure-PyTorch reference (docs/FORMAT.md).

Everything here is plain tensor code, slow and easy to read; the C++/CUDA kernels are tested against it.

A weight W [N, K] is stored as
    qweight  uint8   [N, Kp // 2]       (int4: two codes per byte)
             uint8   [N, Kp // 16 * 7]  (int3.5: 16 codes in 7 bytes)
             uint8   [N, Kp]            (int8: one code per byte)
    scales   float16 [N, Kp // group_size]
    zeros    float16 [N, Kp // group_size]
    perm     int32   [K] or absent       stored column j holds input feature perm[j]
where Kp is K rounded up to a multiple of group_size (the padding columns hold the codes of 0.0).
"""

import torch

GROUP_SIZES = (32, 64, 128, 256)
BITS = (4, 3.5, 8)
STEP3 = 15.0 / 7.0  # int3.5: a 3-bit step spans 15/7 four-bit steps, so both cover the same range
# How the codes were chosen (a checkpoint's quantization_config.method); every method writes the same format.
METHODS = ("rtn", "awq", "gptq", "awq+gptq")
GPTQ_METHODS = ("gptq", "awq+gptq")  # those that round with GPTQ (act-order applies to them)


def check_bits(bits) -> float:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    return float(bits)


def check_group_size(group_size) -> int:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    return int(group_size)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a float tensor is finite: a NaN or infinity makes its sum non-finite, so one sum
    (a fast reduction) answers, and only a sum that overflowed takes the elementwise check."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    total = t.sum(dtype=torch.float32 if t.element_size() < 4 else t.dtype)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def padded_in_features(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size) * group_size


def packed_row_bytes(bits: float, padded_features: int) -> int:
    return {4: padded_features // 2, 3.5: padded_features // 16 * 7, 8: padded_features}[bits]


def quantized_nbytes(out_features: int, in_features: int, bits: float, group_size: int, has_perm: bool) -> int:
    """Bytes of one saved quantized weight: codes, float16 scales and zeros, and the int32 permutation if any
    (what lowbit.eval's bits per weight and the bits-per-weight budget count)."""
    kp = padded_in_features(in_features, group_size)
    perm = 4 * in_features if has_perm else 0
    return out_features * packed_row_bytes(bits, kp) + 2 * 2 * out_features * (kp // group_size) + perm


def code_max(bits: float) -> torch.Tensor:
    """Largest code per column position within a pair: int4 (15, 15), int3.5 (15, 7), int8 (255, 255)."""
    return torch.tensor({4: [15, 15], 3.5: [15, 7], 8: [255, 255]}[bits], dtype=torch.int32)


def pack(codes: torch.Tensor, bits: float) -> torch.Tensor:
    """codes [N, Kp] integer (even columns 0..15; odd columns 0..15 for int4, 0..7 for int3.5; every column
    0..255 for int8) -> qweight."""
    n, kp = codes.shape
    if kp % 32:
        raise ValueError(f"packed width must be a multiple of 32 columns, got {kp}")
    c = codes if codes.dtype == torch.uint8 else codes.to(torch.int32)
    even, odd = c[:, 0::2], c[:, 1::2]
    limit = code_max(bits)
    if (c.dtype != torch.uint8 and c.min() < 0) or even.max() > limit[0] or odd.max() > limit[1]:
        raise ValueError(f"codes out of range for bits={bits}")
    if bits == 8:
        return c.to(torch.uint8)
    pairs = even | (odd << 4)  # (in range: odd < 16, so an uint8 shift loses nothing)
    if bits == 4:
        return pairs.to(torch.uint8)
    # int3.5: pair p of a 16-column block is the 7-bit value even | odd << 4 at bits [7p, 7p + 7) of
    # the block's 56-bit little-endian integer, which is written as 7 bytes.
    pairs = pairs.to(torch.int64).view(n, kp // 16, 8)
    block = (pairs << (7 * torch.arange(8, device=c.device))).sum(-1)  # disjoint bit ranges: sum == or
    block_bytes = (block.unsqueeze(-1) >> (8 * torch.arange(7, device=c.device))) & 0xFF
    return block_bytes.to(torch.uint8).reshape(n, kp // 16 * 7)


def unpack(qweight: torch.Tensor, bits: float) -> torch.Tensor:
    """qweight -> codes [N, Kp] as int32 (the inverse of pack)."""
    n = qweight.shape[0]
    if bits == 8:
        return qweight.to(torch.int32)
    b = qweight.to(torch.int64)
    if bits == 4:
        even, odd = b & 15, b >> 4
    else:
        blocks = b.view(n, -1, 7)
        block = (blocks << (8 * torch.arange(7, device=b.device))).sum(-1)
        pairs = ((block.unsqueeze(-1) >> (7 * torch.arange(8, device=b.device))) & 0x7F).reshape(n, -1)
        even, odd = pairs & 15, pairs >> 4
    return torch.stack([even, odd], dim=-1).reshape(n, -1).to(torch.int32)


def dequantize(qweight, scales, zeros, perm, bits: float, group_size: int, in_features: int) -> torch.Tensor:
    """The reference decoder: W [N, K] float32 in logical column order."""
    codes = unpack(qweight, bits).to(torch.float32)
    n, kp = codes.shape
    if bits == 3.5:
        codes[:, 1::2] *= STEP3
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)
    z = zeros.to(torch.float32).repeat_interleave(group_size, dim=1)
    stored = ((codes - z) * s)[:, :in_features]
    if perm is None:
        return stored
    w = torch.empty_like(stored)
    w[:, perm.long()] = stored
    return w
