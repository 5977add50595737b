"""The CUDA tile layout (lowbit.tiled) on the CPU: the repack is a bijection with the canonical layout."""

import pytest
import torch
from torch import nn

import lowbit
from lowbit import formats, tiled


def random_codes(n, kp, bits, generator):
    codes = torch.randint(0, 16, (n, kp), generator=generator)
    if bits == 3.5:
        codes[:, 1::2] %= 8
    return codes


@pytest.mark.parametrize("bits", [4, 3.5])
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
@pytest.mark.parametrize("n, k", [(1, 32), (37, 300), (16, 128), (100, 328), (48, 640), (64, 1024), (5, 2000)])
def test_pack_then_unpack_is_identity(bits, group_size, n, k):
    g = torch.Generator().manual_seed(n * 1000 + k + group_size)
    kp = formats.padded_in_features(k, group_size)
    codes = random_codes(n, kp, bits, g)
    scales = torch.rand(n, kp // group_size, generator=g).half()
    zeros = torch.rand(n, kp // group_size, generator=g).half()
    q, s, z = tiled.pack(codes, scales, zeros, bits, group_size)
    shapes = tiled.tiled_shapes(bits, group_size, k, n)
    assert (tuple(q.shape), tuple(s.shape), tuple(z.shape)) == (shapes["qweight"], shapes["scales"], shapes["zeros"])
    assert q.dtype == torch.uint8 and s.dtype == torch.float16
    c2, s2, z2 = tiled.unpack(q, s, z, bits, group_size, kp, n)
    assert torch.equal(c2, codes.to(torch.int32)) and torch.equal(s2, scales) and torch.equal(z2, zeros)


@pytest.mark.parametrize("bits", [4, 3.5])
@pytest.mark.parametrize("group_size", [32, 128, 256])
def test_every_tiled_byte_is_a_code(bits, group_size):
    # Without padding (N a multiple of 16, Kp of 128) the layouts are in bijection: random bytes of the
    # tile layout come back unchanged, so every bit of a unit holds exactly one bit of one code.
    n_tiles, n_units = 3, 4
    kp = 128 * n_units
    g = torch.Generator().manual_seed(7)
    q = torch.randint(0, 256, (n_tiles, n_units, tiled.unit_bytes(bits)), dtype=torch.uint8, generator=g)
    s = torch.rand(n_tiles, kp // group_size, 16, generator=g).half()
    codes, s1, z1 = tiled.unpack(q, s, s, bits, group_size, kp, 16 * n_tiles)
    q2, s2, _ = tiled.pack(codes, s1, z1, bits, group_size)
    assert torch.equal(q2, q) and torch.equal(s2, s)


def test_layout_of_one_lane():
    # Spot check of docs/FORMAT.md: lane l = 4 g + c, step s, nibble k = j + 2 (e // 2) + 4 (e % 2) holds
    # row 8 j + g, column 16 s + 4 c + e; int4 step s < 4 lies at byte 16 l + 4 s.
    codes = torch.zeros(16, 128, dtype=torch.int64)
    codes[8 + 3, 16 * 2 + 4 * 1 + 3] = 9                 # j = 1, g = 3, s = 2, c = 1, e = 3 -> nibble 7
    q, _, _ = tiled.pack(codes, torch.zeros(16, 1).half(), torch.zeros(16, 1).half(), 4, 128)
    lane = 4 * 3 + 1
    word = int.from_bytes(bytes(q[0, 0, 16 * lane + 8: 16 * lane + 12].tolist()), "little")
    assert word == 9 << 28 and int(q.to(torch.int64).sum()) == 9 << 4


@pytest.mark.parametrize("bits", [4, 3.5])
def test_quantized_weight_layouts(bits):
    w = lowbit.quantize_weight(torch.randn(40, 200), bits, 64, perm=torch.randperm(200).to(torch.int32))
    t = w.to_layout("tiled")
    assert t.layout == "tiled" and t.shape == w.shape and t.nbytes == w.nbytes
    assert all(torch.equal(t.tensors()[k], v) for k, v in w.tensors().items())
    back = t.to_layout("canonical")
    assert all(torch.equal(getattr(back, k), getattr(w, k)) for k in ("qweight", "scales", "zeros", "perm"))
    assert w.to("cpu").layout == "canonical" and t.to("cpu").layout == "canonical"
    with pytest.raises(ValueError, match="needs out_features"):
        lowbit.QuantizedWeight(t.qweight, t.scales, t.zeros, None, bits, 64, 200, "tiled")
    with pytest.raises(ValueError, match="tiled layout"):
        lowbit.QuantizedWeight(t.qweight, t.scales, t.zeros, None, bits, 64, 200, "tiled", 60)
    with pytest.raises(ValueError, match="layout must be"):
        lowbit.QuantizedWeight(w.qweight, w.scales, w.zeros, None, bits, 64, 200, "marlin")


def test_quant_linear_state_dict_is_canonical_in_any_layout():
    q = lowbit.QuantLinear.from_linear(nn.Linear(200, 40), 3.5, 64)
    canonical = q.state_dict()
    tiled_module = lowbit.QuantLinear(q.weight.to_layout("tiled"), q.bias)
    assert tiled_module.layout == "tiled" and tiled_module.qweight.dim() == 3
    state = tiled_module.state_dict()
    assert state.keys() == canonical.keys() and all(torch.equal(state[k], v) for k, v in canonical.items())
    other = lowbit.QuantLinear(lowbit.QuantLinear.from_linear(nn.Linear(200, 40), 3.5, 64).weight.to_layout("tiled"))
    other.bias = nn.Parameter(torch.zeros(40), requires_grad=False)
    other.load_state_dict(canonical)  # repacked into the module's layout
    assert all(torch.equal(getattr(other, k), getattr(tiled_module, k)) for k in ("qweight", "scales", "zeros"))
