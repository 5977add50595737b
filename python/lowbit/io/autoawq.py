"""AutoAWQ GEMM checkpoints in and out (the layout transformers and vLLM read with quant_method "awq").

Per linear W [N, K] (nn.Linear layout), AutoAWQ's GEMM version stores the transpose, packed along N:
    qweight int32   [K, N / 8]   eight 4-bit codes per word
    qzeros  int32   [K / G, N / 8]  integer zero points, packed the same way
    scales  float16 [K / G, N]
with column c of each group of eight in the nibble at bits 4 * AWQ_NIBBLE[c], and W = (q - z) * s.
lowbit's int4 holds the same numbers (codes, float16 scales, zeros) in its own layout, so importing is
exact, and exporting is exact whenever the zero points are integers in 0..15 and no permutation is used.
"""

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import formats
from ..models.llama import LlamaConfig
from ..tokenizer import Tokenizer
from ..weight import QuantizedWeight
from .checkpoint import load_quantized, quantization_config, write_checkpoint
from .atomic import atomic_directory
from .hf import FUSED, SINGLE, CheckpointError, SafetensorsDir, read_config
from .safetensors_io import ShardWriter

AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # column c of a group of eight lives in nibble AWQ_NIBBLE[c]


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """[R, C] integers in 0..15 (C a multiple of 8) -> int32 [R, C / 8] in AutoAWQ's nibble order."""
    r, c = values.shape
    v = values.to(torch.int64).view(r, c // 8, 8)
    shifts = 4 * torch.tensor(AWQ_NIBBLE, dtype=torch.int64)
    word = (v << shifts).sum(-1)                               # disjoint nibbles: sum == or
    return (word - (word >> 31 << 32)).to(torch.int32)         # the same 32 bits as a signed int32


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] -> [R, C] int32 codes in column order."""
    shifts = 4 * torch.tensor(AWQ_NIBBLE, dtype=torch.int64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    return ((words.unsqueeze(-1) >> shifts) & 15).reshape(packed.shape[0], -1).to(torch.int32)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             where: str) -> QuantizedWeight:
    k, n8 = qweight.shape
    n = 8 * n8
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise CheckpointError(f"{where}: qweight and qzeros must be int32, got {qweight.dtype}, {qzeros.dtype}")
    if scales.dtype != torch.float16:
        raise CheckpointError(f"{where}: scales must be float16, got {scales.dtype}")
    if k % group_size or tuple(qzeros.shape) != (k // group_size, n8) or tuple(scales.shape) != (k // group_size, n):
        raise CheckpointError(f"{where}: shapes qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, scales "
                              f"{list(scales.shape)} do not form a group-size-{group_size} AWQ weight")
    if not torch.isfinite(scales).all():
        raise CheckpointError(f"{where}: scales have non-finite values")
    codes = awq_unpack(qweight).T.contiguous()                 # [N, K]
    zeros = awq_unpack(qzeros).T.to(torch.float16).contiguous()
    return QuantizedWeight(formats.pack(codes, 4), scales.T.contiguous(), zeros, None, 4, group_size, k)


def to_awq(weight: QuantizedWeight, where: str) -> dict[str, torch.Tensor]:
    if weight.bits != 4:
        raise ValueError(f"{where}: AutoAWQ stores 4-bit weights only; this layer is int{weight.bits:g}")
    if weight.perm is not None:
        raise ValueError(f"{where}: has an input permutation, which AutoAWQ cannot express")
    n, k = weight.shape
    if k % weight.group_size or n % 8:
        raise ValueError(f"{where}: AutoAWQ needs in_features ({k}) divisible by the group size ({weight.group_size}) "
                         f"and out_features ({n}) divisible by 8")
    zeros = weight.zeros.float()
    if not torch.equal(zeros, zeros.round()) or zeros.min() < 0 or zeros.max() > 15:
        raise ValueError(f"{where}: zero points are not integers in 0..15 (lowbit's default keeps them exact in "
                         f"float16); AutoAWQ stores 4-bit integer zeros. Quantize with integer zero points: "
                         f"`lowbit convert ... --integer-zeros` or quantize_model(..., integer_zeros=True)")
    codes = formats.unpack(weight.qweight, 4)[:, :k]
    return {"qweight": awq_pack(codes.T.contiguous()), "qzeros": awq_pack(zeros.to(torch.int32).T.contiguous()),
            "scales": weight.scales.T.contiguous()}


def _awq_group_size(src: Path, raw: dict) -> int:
    qc = raw["quantization_config"]
    if qc.get("bits", 4) != 4 or str(qc.get("version", "gemm")).lower() != "gemm" or not qc.get("zero_point", True):
        raise CheckpointError(f"{src}: only AutoAWQ GEMM checkpoints with 4 bits and zero points can be read, got "
                              f"{ {k: qc.get(k) for k in ('bits', 'version', 'zero_point')} }")
    g = qc.get("group_size", qc.get("q_group_size"))
    if g not in formats.GROUP_SIZES:
        raise CheckpointError(f"{src}: AWQ group_size {g!r} is not supported (lowbit: {formats.GROUP_SIZES})")
    if qc.get("modules_to_not_convert"):
        raise CheckpointError(f"{src}: modules_to_not_convert {qc['modules_to_not_convert']} is not supported")
    return g


def import_awq(src: Path, out: Path, align: int | None = None, force: bool = False, progress: bool = True) -> Path:
    """An AutoAWQ GEMM directory -> a lowbit int4 checkpoint with identical dequantized weights."""
    raw = json.loads((src / "config.json").read_text())
    group_size = _awq_group_size(src, raw)
    config = read_config(src)
    config.extra.pop("quantization_config", None)
    st = SafetensorsDir(src)
    tokenizer = Tokenizer.from_dir_if_present(src)

    def fused(prefix: str, parts) -> dict[str, torch.Tensor]:
        ws = [from_awq(st.get(f"{prefix}{p}.qweight"), st.get(f"{prefix}{p}.qzeros"), st.get(f"{prefix}{p}.scales"),
                       group_size, f"{src}: {prefix}{p}") for p in parts]
        out = {k: torch.cat([w.tensors()[k] for w in ws]) for k in ("qweight", "scales", "zeros")}
        if f"{prefix}{parts[0]}.bias" in st:
            out["bias"] = torch.cat([st.get(f"{prefix}{p}.bias") for p in parts])
        return out

    def tensors():
        yield "embed.weight", st.get("model.embed_tokens.weight")
        yield "norm.weight", st.get("model.norm.weight")
        if not config.tie_word_embeddings:
            yield "lm_head.weight", st.get("lm_head.weight")
        for i in tqdm(range(config.num_hidden_layers), desc="AutoAWQ import", disable=not progress):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            for name, parts in FUSED.items():
                yield from ((f"{ours}{name}.{k}", t) for k, t in fused(hf, parts).items())
            for name, hf_name in SINGLE.items():
                if name in ("attn.wo", "ffn.w_down"):
                    yield from ((f"{ours}{name}.{k}", t) for k, t in fused(hf, [hf_name]).items())
                else:
                    yield f"{ours}{name}.weight", st.get(f"{hf}{hf_name}.weight")
    qconfig = quantization_config(4, group_size, "awq", ["lm_head"])
    return write_checkpoint(out, config, qconfig, tensors(), tokenizer, force, align)


def export_awq(src, out, force: bool = False) -> Path:
    """A lowbit int4 checkpoint -> an AutoAWQ GEMM directory (HF names, float16 float tensors)."""
    model = load_quantized(src, dtype=torch.float16)
    c: LlamaConfig = model.config
    group_size = model.quantization["group_size"]
    if model.quantization["bits"] != 4:
        raise ValueError(f"{src}: AutoAWQ stores 4-bit weights only; this checkpoint is "
                         f"int{model.quantization['bits']:g}")
    if "lm_head" not in model.quantization["modules_not_converted"]:
        raise ValueError(f"{src}: the output head is quantized; AutoAWQ checkpoints keep lm_head in float16")
    if model.quantization["module_formats"]:
        raise ValueError(f"{src}: layers in other formats than int4 g{group_size} "
                         f"({', '.join(sorted(model.quantization['module_formats'])[:3])}); AutoAWQ stores one "
                         f"4-bit format for every layer")
    splits = c.fused_splits()
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not c.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        hf = f"model.layers.{i}."
        for name, parts in FUSED.items():
            q = layer.get_submodule(name)
            t = q.weight.tensors()  # canonical, whatever the device
            rows = torch.tensor(splits[name]).cumsum(0).tolist()
            for part, end, size in zip(parts, rows, splits[name]):
                sl = slice(end - size, end)
                w = QuantizedWeight(t["qweight"][sl], t["scales"][sl], t["zeros"][sl], None, 4, group_size,
                                    q.in_features)
                state |= {f"{hf}{part}.{k}": t for k, t in to_awq(w, f"layers.{i}.{name} ({part})").items()}
                if q.bias is not None:
                    state[f"{hf}{part}.bias"] = q.bias[sl]
        for name, hf_name in SINGLE.items():
            m = layer.get_submodule(name)
            if name in ("attn.wo", "ffn.w_down"):
                state |= {f"{hf}{hf_name}.{k}": t for k, t in to_awq(m.weight, f"layers.{i}.{name}").items()}
                if m.bias is not None:
                    state[f"{hf}{hf_name}.bias"] = m.bias
            else:
                state[f"{hf}{hf_name}.weight"] = m.weight
    config = c.to_dict() | {"torch_dtype": "float16", "quantization_config": {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None}}
    with atomic_directory(Path(out), force) as tmp:
        writer = ShardWriter(tmp, 1 << 30, metadata={"format": "pt"})
        for name, t in state.items():
            writer.add(name, t.detach().half() if t.is_floating_point() else t)
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if model.tokenizer is not None:
            model.tokenizer.save(tmp)
    return Path(out)
