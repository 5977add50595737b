"""The CUDA tile layout: how a quantized weight lies in GPU memory (docs/FORMAT.md, "CUDA tile layout").

Plain tensor code: the repack from the canonical layout and its exact inverse. The canonical layout stays
what is saved; `QuantizedWeight.to("cuda")` repacks once, `.to("cpu")` and saving unpack.

The CUDA matmul kernels feed mma.m16n8k16 with 16 weight rows (a tile) and 16 columns per MMA. A warp
reads one unit (16 rows x 128 stored columns) with 16-byte loads, lane l = 4 g + c at offset 16 l of
each 512-byte plane, and finds in its registers the codes it needs in the order it consumes them:

    qweight  uint8   [n_tiles, n_units, 1024 | 896]   one unit per (tile, 128 columns)
    scales   float16 [n_tiles, n_groups, 16]          entry 2 g + j is row 16 t + g + 8 j
    zeros    float16 [n_tiles, n_groups, 16]          (rows g and g + 8 of a lane side by side)

where n_tiles = ceil(N / 16), Kt = Kp rounded up to 128, n_units = Kt / 128, n_groups = Kt / group_size.
Rows past N and columns past Kp hold code 0 with scale and zero 0.

In a unit, MMA step s (0..7) covers columns 16 s .. 16 s + 15, and lane (g, c) holds, for rows r0 = g
and r1 = g + 8, columns e = 16 s + 4 c + (0, 1, 2, 3). Its eight codes form a 32-bit word of nibbles
    n0 = r0 e0, n1 = r1 e0, n2 = r0 e2, n3 = r1 e2, n4 = r0 e1, n5 = r1 e1, n6 = r0 e3, n7 = r1 e3
so that nibbles (0, 4), (1, 5), (2, 6), (3, 7) are the four MMA operand pairs.

int4: the word of step s lies at byte 16 l + 4 s (s < 4), 512 + 16 l + 4 (s - 4) (s >= 4).
int3.5: n0..n3 are 4-bit codes (even columns), n4..n7 3-bit codes (odd columns), stored in three planes:
    nibbles  bytes 0..511:   word j (16 l + 4 j) = low 16 bits of step 2 j | those of step 2 j + 1 << 16
    2-bit    bytes 512..767: word J (512 + 8 l + 4 J), step s = 4 J + 2 h + b, code n(4+i):
                             bits 0-1 of the code at bit 16 h + 4 i + 2 b
    1-bit    bytes 768..895: word at 768 + 4 l, step s = 4 J + 2 h + b: bit 2 of code n(4+i) at
                             bit 16 h + 4 i + 2 J + b
"""

import torch

TILE_ROWS = 16
UNIT_COLS = 128
_LANES = 32
# Nibble k of a lane's word holds (row half j, column e): k = j + 2 (e // 2) + 4 (e % 2).
_NIBBLE_J = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
_NIBBLE_E = torch.tensor([0, 0, 2, 2, 1, 1, 3, 3])


def _three_bit_shifts(device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bit positions of int3.5's 3-bit codes in the planes: for step s = 4 J + 2 h + b and code i, bits 0-1 at
    16 h + 4 i + 2 b of 2-bit word J ([h, b, i]), bit 2 at 16 h + 4 i + 2 J + b of the 1-bit word ([J, h, b, i])."""
    h = torch.arange(2, device=device).view(2, 1, 1)
    b = torch.arange(2, device=device).view(1, 2, 1)
    i = torch.arange(4, device=device).view(1, 1, 4)
    big_j = torch.arange(2, device=device).view(2, 1, 1, 1)
    return 16 * h + 4 * i + 2 * b, 16 * h + 4 * i + 2 * big_j + b


def unit_bytes(bits: float) -> int:
    return 1024 if bits == 4 else 896


def tiled_shapes(bits: float, group_size: int, in_features: int, out_features: int) -> dict[str, tuple]:
    """Shapes of the tiled qweight, scales and zeros of an [out_features, in_features] weight."""
    kp = -(-in_features // group_size) * group_size
    kt = -(-kp // UNIT_COLS) * UNIT_COLS
    n_tiles = -(-out_features // TILE_ROWS)
    return {"qweight": (n_tiles, kt // UNIT_COLS, unit_bytes(bits)),
            "scales": (n_tiles, kt // group_size, TILE_ROWS), "zeros": (n_tiles, kt // group_size, TILE_ROWS)}


def _to_bytes(words: torch.Tensor, n: int) -> torch.Tensor:
    """int64 words [..., w] -> uint8 [..., w * n], little-endian n bytes per word."""
    shifts = 8 * torch.arange(n, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).flatten(-2)


def _from_bytes(b: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [..., w * n] -> int64 words [..., w]."""
    shifts = 8 * torch.arange(n, device=b.device)
    return (b.to(torch.int64).unflatten(-1, (-1, n)) << shifts).sum(-1)


def _params_to_tiles(p: torch.Tensor, n_tiles: int, n_groups: int) -> torch.Tensor:
    out = p.new_zeros(n_tiles * TILE_ROWS, n_groups)
    out[:p.shape[0], :p.shape[1]] = p
    return out.view(n_tiles, 2, 8, n_groups).permute(0, 3, 2, 1).reshape(n_tiles, n_groups, TILE_ROWS).contiguous()


def _params_from_tiles(t: torch.Tensor, n: int, groups: int) -> torch.Tensor:
    n_tiles, n_groups, _ = t.shape
    return t.view(n_tiles, n_groups, 8, 2).permute(0, 3, 2, 1).reshape(-1, n_groups)[:n, :groups].contiguous()


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: float, group_size: int):
    """Canonical codes [N, Kp] (lowbit.formats.unpack), scales and zeros [N, Kp / group_size] -> tiled
    (qweight, scales, zeros)."""
    n, kp = codes.shape
    kt = -(-kp // UNIT_COLS) * UNIT_COLS
    n_tiles, n_units = -(-n // TILE_ROWS), kt // UNIT_COLS
    c = codes.new_zeros(n_tiles * TILE_ROWS, kt, dtype=torch.int64)
    c[:n, :kp] = codes
    # row = 16 t + 8 j + g, column = 128 u + 16 s + 4 c + e  ->  [t, u, g, c, s, j, e]
    c = c.view(n_tiles, 2, 8, n_units, 8, 4, 4).permute(0, 3, 2, 5, 4, 1, 6)
    nib = c[..., _NIBBLE_J.to(c.device), _NIBBLE_E.to(c.device)]          # [t, u, g, c, s, 8]
    if bits == 4:
        word = (nib << (4 * torch.arange(8, device=c.device))).sum(-1)      # [t, u, g, c, s]
        word = word.unflatten(-1, (2, 4)).permute(0, 1, 4, 2, 3, 5)        # [t, u, half, g, c, s % 4]
        q = _to_bytes(word.reshape(n_tiles, n_units, 2 * _LANES * 4), 4)
    else:
        low = (nib[..., :4] << (4 * torch.arange(4, device=c.device))).sum(-1)   # [t, u, g, c, s]
        nibbles = low[..., 0::2] | (low[..., 1::2] << 16)                          # [t, u, g, c, 4]
        three = nib[..., 4:].unflatten(-2, (2, 2, 2))                              # [t, u, g, c, J, h, b, i]
        two_at, one_at = _three_bit_shifts(c.device)
        two = ((three & 3) << two_at).flatten(-3).sum(-1)                          # [t, u, g, c, J]
        one = ((three >> 2) << one_at).flatten(-4).sum(-1)                         # [t, u, g, c]
        q = torch.cat([_to_bytes(nibbles.reshape(n_tiles, n_units, -1), 4),
                       _to_bytes(two.reshape(n_tiles, n_units, -1), 4),
                       _to_bytes(one.reshape(n_tiles, n_units, -1), 4)], dim=-1)
    n_groups = kt // group_size
    return q.contiguous(), _params_to_tiles(scales, n_tiles, n_groups), _params_to_tiles(zeros, n_tiles, n_groups)


def unpack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: float, group_size: int,
           padded_features: int, out_features: int):
    """The inverse of pack: tiled tensors -> canonical codes [N, Kp] (int32), scales and zeros [N, Kp / G]."""
    n_tiles, n_units, _ = qweight.shape
    dev = qweight.device
    if bits == 4:
        word = _from_bytes(qweight, 4).view(n_tiles, n_units, 2, 8, 4, 4).permute(0, 1, 3, 4, 2, 5)
        word = word.reshape(n_tiles, n_units, 8, 4, 8)                              # [t, u, g, c, s]
        nib = (word.unsqueeze(-1) >> (4 * torch.arange(8, device=dev))) & 15        # [t, u, g, c, s, 8]
    else:
        nibbles = _from_bytes(qweight[..., :512], 4).view(n_tiles, n_units, 8, 4, 4)
        two = _from_bytes(qweight[..., 512:768], 4).view(n_tiles, n_units, 8, 4, 2)
        one = _from_bytes(qweight[..., 768:], 4).view(n_tiles, n_units, 8, 4)
        low = torch.stack([nibbles & 0xFFFF, nibbles >> 16], dim=-1).flatten(-2)     # [t, u, g, c, s]
        four = (low.unsqueeze(-1) >> (4 * torch.arange(4, device=dev))) & 15        # [t, u, g, c, s, 4]
        two_at, one_at = _three_bit_shifts(dev)
        lo2 = (two[..., None, None, None] >> two_at) & 3                             # [t, u, g, c, J, h, b, i]
        hi1 = (one[..., None, None, None, None] >> one_at) & 1
        three = (lo2 | (hi1 << 2)).flatten(-4, -2)                                  # [t, u, g, c, s, 4]
        nib = torch.cat([four, three], dim=-1)
    c = torch.empty(*nib.shape[:-1], 2, 4, dtype=torch.int64, device=dev)           # [t, u, g, c, s, j, e]
    c[..., _NIBBLE_J.to(dev), _NIBBLE_E.to(dev)] = nib
    codes = c.permute(0, 5, 2, 1, 4, 3, 6).reshape(n_tiles * TILE_ROWS, n_units * UNIT_COLS)
    groups = padded_features // group_size
    return (codes[:out_features, :padded_features].to(torch.int32).contiguous(),
            _params_from_tiles(scales, out_features, groups), _params_from_tiles(zeros, out_features, groups))
