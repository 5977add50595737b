"""CUDA kernels against the reference; the whole module is skipped without a CUDA GPU.

int4 and int3.5 weights on a GPU hold the tile layout (lowbit.tiled); int8 weights keep the canonical layout and
take the dense path (dequantize + cuBLAS) for every M. The matmul kernel (M <= 64) runs on tensor cores
with float16 inputs and float32 accumulation:
  weights  q - z (int3.5's 3-bit codes q * 15/7 - z) rounded once to float16 in registers: up to 2^-11
           relative per weight; the group's scale is applied in float32 to the group's float32 sum;
  x        float16 as is; bfloat16 exactly (after a power-of-two scale per row); float32 rounded to
           float16 (up to 2^-11 relative);
  y        rounded once to x's dtype: up to 2^-11 of |y| for float16, 2^-8 for bfloat16.
Hence, relative to max |y| of the exact reference (float64 x @ W.T): 2e-3 for float32 and float16
outputs, 1.2e-2 for bfloat16. The dense path (M > 64, and the canonical layout's ops: W dequantized to
x's dtype, then cuBLAS) stays within the same bounds. The dequantize ops are exact: the float32 operations of
lowbit.formats.dequantize, in the same order.
"""

import copy
import functools

import pytest
import torch
from torch import nn

import lowbit
from lowbit import formats
from lowbit.ops import OPS, TILED_OPS
from reference import check_non_finite_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
TOL = {torch.float32: 2e-3, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def make_weight(n, k, bits, group_size, with_perm, device=CUDA):
    perm = torch.randperm(k).to(torch.int32) if with_perm else None
    return lowbit.quantize_weight(torch.randn(n, k), bits, group_size, perm=perm).to(device)


def random_weight(n, k, bits, group_size=128):
    """A weight of random codes (any byte is a valid code), quicker to make than quantizing [11008, 4096]."""
    kp = formats.padded_in_features(k, group_size)
    g = torch.Generator().manual_seed(n * 7 + k)
    qweight = torch.randint(0, 256, (n, formats.packed_row_bytes(bits, kp)), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, kp // group_size, generator=g) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, kp // group_size, generator=g) * 15).half()
    return lowbit.QuantizedWeight(qweight, scales, zeros, None, bits, group_size, k)


def reference_weight(qw):
    """W [N, K] from the pure-PyTorch reference (on the CPU), as float64 on the GPU."""
    cpu = qw.to("cpu")
    w = formats.dequantize(*cpu.op_args(), cpu.bits, cpu.group_size, cpu.in_features)
    return w.to(CUDA, torch.float64)


def check_linear(x, qw, bias=None, w_ref=None):
    y = lowbit.linear(x, qw, bias)
    assert y.dtype == x.dtype and y.device == x.device and y.shape == (*x.shape[:-1], qw.shape[0])
    w = reference_weight(qw) if w_ref is None else w_ref
    exact = x.double() @ w.T
    if bias is not None:
        exact = exact + bias.double()
    scale = exact.abs().max().item() + 1e-30
    err = (y.double() - exact).abs().max().item() / scale
    assert err <= TOL[x.dtype], f"max error {err:.2e} of max |y|"
    return y


def test_extension_has_cuda_kernels():
    assert lowbit.build_info()["cuda"], "lowbit was built without its CUDA kernels (nvcc or CUDA torch missing)"


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 16, 17, 33, 40, 64, 65, 256])
@pytest.mark.parametrize("n, k", [
    (100, 328),  # neither a multiple of 64; K pads up to the group size (int3.5 rows of odd length)
    (40, 640),   # int3.5 rows a multiple of 8 bytes, not of 16 (the GEMV's 8-byte loads)
])
def test_linear_every_m_and_group_size(bits, group_size, m, n, k):
    qw = make_weight(n, k, bits, group_size, with_perm=False)
    check_linear(torch.randn(m, k, device=CUDA).half(), qw)


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("with_perm", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_dtypes_bias_perm(bits, dtype, m, with_perm, with_bias):
    n, k = 72, 576
    qw = make_weight(n, k, bits, 64, with_perm)
    bias = torch.randn(n, device=CUDA).to(dtype) if with_bias else None
    check_linear(torch.randn(m, k, device=CUDA).to(dtype), qw, bias)


@pytest.mark.parametrize("bits", [4, 3.5])
@pytest.mark.parametrize("m", [12, 40])
def test_linear_split_k(bits, m):
    # Few output tiles and a long K: the tiled kernel splits K over blocks and adds the parts up.
    n, k = 130, 4000
    qw = make_weight(n, k, bits, 32, with_perm=True)
    bias = torch.randn(n, device=CUDA).bfloat16()
    check_linear(torch.randn(m, k, device=CUDA).bfloat16(), qw, bias)
    check_linear(torch.randn(m, k, device=CUDA).half(), qw)


@functools.cache
def llama_weight(n, k, bits):
    qw = random_weight(n, k, bits).to(CUDA)
    return qw, reference_weight(qw)


@pytest.mark.parametrize("bits", [4, 3.5])
@pytest.mark.parametrize("n, k, m_values", [
    (4096, 4096, [1, 3, 8, 16, 64, 256, 1024, 4096]),
    (11008, 4096, [1, 8, 33, 1024]),
    (4096, 11008, [1, 7, 16, 256]),
])
def test_linear_llama_shapes(bits, n, k, m_values):
    qw, w_ref = llama_weight(n, k, bits)
    for m in m_values:
        check_linear(torch.randn(m, k, device=CUDA).half(), qw, w_ref=w_ref)
    check_linear(torch.randn(5, k, device=CUDA).bfloat16(), qw, torch.randn(n, device=CUDA).bfloat16(), w_ref)


@pytest.mark.parametrize("bits", formats.BITS)
def test_linear_3d_non_contiguous_and_empty(bits):
    n, k = 48, 160
    qw = make_weight(n, k, bits, 32, with_perm=True)
    x3 = torch.randn(2, 3, k, device=CUDA).half()
    check_linear(x3, qw)
    check_linear(torch.randn(k, 6, device=CUDA).half().t(), qw)            # column stride != 1
    check_linear(torch.randn(2, 20, 2 * k, device=CUDA)[:, ::2, ::2], qw)  # strided everywhere, M = 20
    check_linear(torch.randn(k, device=CUDA).half(), qw)                    # 1-D x
    check_linear(torch.randn(1, k, device=CUDA).half().expand(4, k), qw)    # row stride 0
    assert torch.equal(lowbit.linear(x3, qw), lowbit.linear(x3.contiguous(), qw))
    assert lowbit.linear(torch.randn(0, k, device=CUDA), qw).shape == (0, n)


@pytest.mark.parametrize("bits", [4, 3.5])
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
@pytest.mark.parametrize("n, k", [(37, 300), (64, 1024), (48, 200)])
def test_to_cuda_repacks_and_back_is_exact(bits, group_size, n, k):
    cpu = make_weight(n, k, bits, group_size, with_perm=True, device="cpu")
    gpu = cpu.to(CUDA)
    assert gpu.layout == "tiled" and gpu.qweight.device.type == "cuda" and gpu.shape == cpu.shape
    tiled_on_cpu = cpu.to_layout("tiled")  # the same repack, by the same functions, on the CPU
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(gpu, name).cpu(), getattr(tiled_on_cpu, name))
    back = gpu.to("cpu")
    assert back.layout == "canonical"
    for name, t in cpu.tensors().items():
        assert torch.equal(back.tensors()[name], t)
        assert torch.equal(gpu.tensors()[name].cpu(), t)  # saving from the GPU: canonical


@pytest.mark.parametrize("bits", formats.BITS)
def test_canonical_tensors_on_cuda(bits):
    # The canonical ops on CUDA tensors (dequantize + cuBLAS), also from a view at an odd byte offset.
    n, k = 64, 520
    cpu = make_weight(n, k, bits, 64, with_perm=True, device="cpu")
    canonical = lowbit.QuantizedWeight.from_tensors({name: t.to(CUDA) for name, t in cpu.tensors().items()},
                                                    bits, 64, k)
    storage = torch.zeros(canonical.qweight.numel() + 1, dtype=torch.uint8, device=CUDA)
    storage[1:].copy_(canonical.qweight.reshape(-1))
    odd = lowbit.QuantizedWeight(storage[1:].view(canonical.qweight.shape), canonical.scales, canonical.zeros,
                                 canonical.perm, bits, 64, k)
    for m in (1, 20, 100):
        x = torch.randn(m, k, device=CUDA).half()
        y = check_linear(x, canonical)
        assert torch.equal(lowbit.linear(x, odd), y)
        tiled_y = check_linear(x, canonical.to(CUDA))
        assert ((tiled_y.float() - y.float()).norm() / y.float().norm()).item() < 2e-3
    assert torch.equal(odd.dequantize(), canonical.dequantize())


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("magnitude", [1e6, 1e-12])
def test_activations_outside_float16_range(bits, dtype, magnitude):
    # bfloat16/float32 rows are scaled by a power of two before the float16 tensor cores.
    qw = make_weight(64, 256, bits, 64, with_perm=False)
    for m in (3, 20):
        x = (torch.randn(m, 256, device=CUDA) * magnitude).to(dtype)
        y = check_linear(x, qw)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("bits", [4, 3.5])
def test_decode_prefill_and_dense_paths_agree(bits):
    n, k = 256, 1024
    qw = make_weight(n, k, bits, 128, with_perm=True)
    x = torch.randn(1024, k, device=CUDA).half()
    dense = lowbit.linear(x, qw)[:64]                                        # M > 16: cuBLAS
    for m in (16, 8):                                                        # 2 and 1 token tiles
        y = torch.cat([lowbit.linear(x[i:i + m], qw) for i in range(0, 64, m)])
        assert ((y.float() - dense.float()).norm() / dense.float().norm()).item() < 2e-3


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
@pytest.mark.parametrize("with_perm", [False, True])
@pytest.mark.parametrize("n, k", [(37, 300), (100, 328), (64, 1024)])
def test_dequantize_is_exact(bits, group_size, with_perm, n, k):
    qw = make_weight(n, k, bits, group_size, with_perm)
    cpu = qw.to("cpu")
    expected = formats.dequantize(*cpu.op_args(), bits, group_size, k)
    canonical = lowbit.QuantizedWeight.from_tensors({name: t.to(CUDA) for name, t in cpu.tensors().items()},
                                                    bits, group_size, k)
    for w in (qw, canonical):  # tile layout, canonical layout
        out = w.dequantize()
        assert out.dtype == torch.float32 and out.device.type == "cuda" and out.shape == (n, k)
        assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("m", [1, 12])
@pytest.mark.parametrize("with_perm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_opcheck_linear(bits, m, with_perm, dtype):
    qw = make_weight(45, 200, bits, 64, with_perm)
    x = torch.randn(m, 200, device=CUDA).to(dtype)
    bias = torch.randn(45, device=CUDA).to(dtype)
    if bits in TILED_OPS:  # int8 stays canonical on the GPU
        linear_op, _ = TILED_OPS[bits]
        for b in (bias, None):
            torch.library.opcheck(linear_op.default, (x, *qw.op_args(), b, qw.group_size, qw.in_features, 45))
    canonical = qw.to_layout("canonical")
    linear_op, _ = OPS[bits]
    torch.library.opcheck(linear_op.default, (x, *canonical.op_args(), bias, qw.group_size, qw.in_features))


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("with_perm", [False, True])
def test_opcheck_dequantize(bits, with_perm):
    qw = make_weight(48, 200, bits, 64, with_perm)
    if bits in TILED_OPS:
        _, dequantize_op = TILED_OPS[bits]
        torch.library.opcheck(dequantize_op.default, (*qw.op_args(), qw.group_size, qw.in_features, 48))
    canonical = qw.to_layout("canonical")
    _, dequantize_op = OPS[bits]
    torch.library.opcheck(dequantize_op.default, (*canonical.op_args(), qw.group_size, qw.in_features))


@pytest.mark.parametrize("bits", formats.BITS)
def test_torch_compile_fullgraph(bits):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(256, 96), nn.SiLU(), nn.Linear(96, 64))
    for i in (0, 2):
        model[i] = lowbit.QuantLinear.from_linear(model[i], bits, 32)
    model = model.to(CUDA).half()
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 3, 20):
        x = torch.randn(m, 256, device=CUDA).half()
        assert torch.allclose(compiled(x), model(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16])
def test_cuda_graph_replay_matches_eager(bits, dtype, m):
    # A decode step (M = 1, and a short prefill chunk) captured once and replayed on new inputs; bf16
    # and perm exercise the activation buffers allocated inside the graph.
    layers = nn.Sequential(
        lowbit.QuantLinear(make_weight(384, 512, bits, 64, with_perm=True), torch.randn(384)),
        nn.SiLU(),
        lowbit.QuantLinear(make_weight(512, 384, bits, 128, with_perm=False)),
    ).to(CUDA, dtype)
    static_x = torch.randn(m, 512, device=CUDA, dtype=dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            layers(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layers(static_x)
    for _ in range(3):
        x = torch.randn_like(static_x)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, layers(x))  # same kernels, fixed summation order: bit for bit


def test_device_and_dtype_errors():
    qw_cpu = make_weight(64, 128, 4, 32, with_perm=True, device="cpu")
    qw = qw_cpu.to(CUDA)
    x = torch.randn(2, 128, device=CUDA)
    with pytest.raises(ValueError, match="x is on cuda.* but the weight is on cpu"):
        lowbit.linear(x, qw_cpu)
    with pytest.raises(ValueError, match="x is on cpu but the weight is on cuda"):
        lowbit.linear(x.cpu(), qw)
    with pytest.raises(ValueError, match="bias is on cpu but x is on cuda"):
        lowbit.linear(x, qw, torch.randn(64))
    with pytest.raises(ValueError, match="perm is on cpu but qweight is on cuda"):
        torch.ops.lowbit.int4_tiled_linear(x, qw.qweight, qw.scales, qw.zeros, qw.perm.cpu(), None, 32, 128, 64)
    with pytest.raises(ValueError, match="must be on one device"):
        torch.ops.lowbit.int4_tiled_dequantize(qw.qweight, qw.scales.cpu(), qw.zeros, None, 32, 128, 64)
    with pytest.raises(ValueError, match="tiled qweight must be"):
        torch.ops.lowbit.int4_tiled_linear(x, qw.qweight, qw.scales, qw.zeros, None, None, 32, 128, 80)
    canonical = qw_cpu.tensors()
    with pytest.raises(ValueError, match="must be on one device"):
        torch.ops.lowbit.int4_dequantize(canonical["qweight"].to(CUDA), canonical["scales"],
                                         canonical["zeros"].to(CUDA), None, 32, 128)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        lowbit.linear(x.double(), qw)
    with pytest.raises(TypeError, match="bias dtype"):
        lowbit.linear(x.half(), qw, torch.randn(64, device=CUDA))


def test_quant_linear_to_cuda_keeps_the_format():
    q = lowbit.QuantLinear.from_linear(nn.Linear(256, 64), 3.5, 64)
    x = torch.randn(3, 256)
    expected = x @ q.dequantize().T + q.bias
    q = q.to(CUDA, torch.bfloat16)
    assert q.qweight.device.type == "cuda" and q.qweight.dtype == torch.uint8
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16 and q.scales.device.type == "cuda"
    assert q.bias.dtype == torch.bfloat16
    y = q(x.to(CUDA, torch.bfloat16))
    assert ((y.float().cpu() - expected).norm() / expected.norm()).item() < 1e-2
    assert q.layout == "tiled"
    cpu_state = lowbit.QuantLinear.from_linear(nn.Linear(256, 64), 3.5, 64).state_dict()
    state = q.state_dict()  # canonical, as saved
    assert {name: t.shape for name, t in state.items()} == {name: t.shape for name, t in cpu_state.items()}
    fresh = copy.deepcopy(q)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x.to(CUDA, torch.bfloat16)), y)
    q.cpu()
    assert q.qweight.device.type == "cpu" and q.scales.dtype == torch.float16 and q.layout == "canonical"
    assert all(torch.equal(q.state_dict()[name], t.cpu()) for name, t in state.items())


@pytest.mark.parametrize("group_size", formats.GROUP_SIZES)
def test_int8_stays_canonical_on_cuda(group_size):
    # int8 has no tile layout: on the GPU it keeps the canonical tensors (dequantize + cuBLAS), bit for bit.
    cpu = make_weight(37, 300, 8, group_size, with_perm=True, device="cpu")
    gpu = cpu.to(CUDA)
    assert gpu.layout == "canonical" and gpu.qweight.device.type == "cuda"
    assert all(torch.equal(gpu.tensors()[name].cpu(), t) for name, t in cpu.tensors().items())
    q = lowbit.QuantLinear(cpu, torch.randn(37)).to(CUDA)
    assert q.layout == "canonical" and q.qweight.device.type == "cuda"
    x = torch.randn(5, 300)
    check_linear(x.to(CUDA), q.weight, q.bias)
    assert all(torch.equal(t.cpu(), cpu.tensors()[name]) for name, t in q.state_dict().items() if name != "bias")
    assert q.cpu().layout == "canonical"


def tiny_llama(bits):
    config = lowbit.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = lowbit.LlamaForCausalLM(config).eval()
    for p in model.parameters():
        if p.dim() == 2:  # embeddings and linear layers; norms stay at 1
            nn.init.normal_(p, std=0.05)
    return lowbit.quantize_model(model, bits, 64, quantize_lm_head=True)


def rel_rms(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def exact_model(model):
    """A float64 copy of a quantized model with every QuantLinear replaced by nn.Linear holding its exactly
    dequantized weight: what both backends approximate."""
    exact = copy.deepcopy(model).cpu().double()
    for name, module in list(exact.named_modules()):
        if isinstance(module, lowbit.QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None).double()
            with torch.no_grad():
                linear.weight.copy_(module.dequantize(torch.float64))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            exact.set_submodule(name, linear)
    return exact


@pytest.mark.parametrize("bits", formats.BITS)
def test_llama_on_cuda_matches_cpu(bits):
    # Both backends against the float64 model with the same (exactly dequantized) weights, each within the
    # bound of its own arithmetic: CUDA rounds activations and weights to float16 inside the matmul
    # (about 1e-3 relative per matmul, < 5e-3 after the 9 matmuls in sequence of 2 layers and the head);
    # the CPU quantizes activations to int8 (0.6-0.9 % per matmul, docs/FORMAT.md; 2.6-3.1 % measured
    # after the 9, so < 5e-2).
    cpu = tiny_llama(bits)
    gpu = copy.deepcopy(cpu).to(CUDA)
    exact = exact_model(cpu)
    tokens = torch.randint(0, 512, (2, 24))
    with torch.inference_mode():
        ref = exact(tokens)
        assert rel_rms(gpu(tokens.to(CUDA)), ref) < 5e-3
        assert rel_rms(cpu(tokens), ref) < 5e-2
        for m in (cpu, gpu, exact):
            m.setup_cache(2, 32)
        pos = torch.arange(24)
        ref = exact(tokens, pos)
        assert rel_rms(gpu(tokens.to(CUDA), pos.to(CUDA)), ref) < 5e-3
        assert rel_rms(cpu(tokens, pos), ref) < 5e-2
        for i in range(4):
            step, pos = torch.randint(0, 512, (2, 1)), torch.tensor([24 + i])
            ref = exact(step, pos)
            assert rel_rms(gpu(step.to(CUDA), pos.to(CUDA)), ref) < 5e-3
            assert rel_rms(cpu(step, pos), ref) < 5e-2
        # Half-precision models on the GPU stay close to the float32 one (on the CPU: 1e-3 and 9e-3).
        for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 3e-2)):
            half = copy.deepcopy(gpu).to(dtype)
            assert rel_rms(half(tokens.to(CUDA)), gpu(tokens.to(CUDA))) < tol


@pytest.mark.parametrize("bits", formats.BITS)
def test_generate_on_cuda_replays_one_graph(bits):
    # lowbit.generate's decode step on CUDA is a CUDA graph captured once; its greedy tokens are those of
    # stateless forwards over the growing sequence on the same GPU.
    from lowbit.generate import Sampling, decode_step, generate_tokens
    model = tiny_llama(bits).to(CUDA, torch.float16)
    prompt = torch.randint(0, 512, (1, 12), device=CUDA)
    tokens = torch.stack(list(generate_tokens(model, prompt, Sampling(max_new_tokens=20, ignore_eos=True))), 1)
    step = decode_step(model, 1)
    assert step.graph is not None
    seq = prompt
    with torch.inference_mode():
        for i in range(20):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            assert int(nxt) == int(tokens[0, i]), i
            seq = torch.cat([seq, nxt], 1)
    list(generate_tokens(model, prompt, Sampling(max_new_tokens=5, ignore_eos=True)))
    assert decode_step(model, 1) is step  # same cache: the captured graph is reused


@pytest.mark.parametrize("bits", formats.BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 9, 40])  # the tile kernel with one and two token tiles, and cuBLAS
def test_non_finite_activations_propagate(bits, dtype, m):
    qw = make_weight(64, 256, bits, 64, with_perm=True)
    x = torch.randn(m, 256, device=CUDA).to(dtype)
    check_non_finite_rows(x, qw)
