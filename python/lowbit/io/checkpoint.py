"""Quantized checkpoints (docs/FORMAT.md, "Checkpoints"): save, load (checksums verified on request), and write
one block at a time, resumably (the calibration pipeline's sink).

A lowbit checkpoint is an HF-style directory: config.json with a `quantization_config`, safetensors
(sharded past a size limit) holding each quantized linear as <module>.qweight / .scales / .zeros
(/ .perm / .bias) under lowbit's module names, and the tokenizer files. Loading builds the model on the
meta device and assigns the memory-mapped tensors; the float model is never built.
"""

import json
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .. import formats
from ..models.llama import LlamaConfig, LlamaForCausalLM, rope_inv_freq
from ..nn import QuantLinear, replace_linears
from ..tokenizer import Tokenizer
from ..weight import QuantizedWeight
from .atomic import atomic_directory
from .hf import CheckpointError, SafetensorsDir, read_config
from .safetensors_io import PAD_PREFIX, ShardWriter, write_safetensors

FORMAT_VERSION = 1
MAX_SHARD_BYTES = 1 << 30
CONVERT_SHARD_BYTES = 1 << 29  # the converter holds one shard in memory: keep it small
QUANT_TENSORS = ("qweight", "scales", "zeros")
FLOAT_LIMIT = 65504.0  # largest float16: float tensors beyond it could not run in float16 anyway
LAYER_LINEARS = ("attn.wqkv", "attn.wo", "ffn.w_gate_up", "ffn.w_down")


def quantization_config(bits: float, group_size: int, method: str, not_converted: list[str],
                        module_formats: dict | None = None, bits_per_weight: dict | None = None) -> dict:
    """module_formats: {module name: {"bits": b, "group_size": g}} for quantized modules in another format
    than bits / group_size (written only when there are some). bits_per_weight: {"target": t, "achieved": a} of a
    bits-per-weight budget (lowbit.budget), written when the formats were chosen for one."""
    qc = {"quant_method": "lowbit", "format_version": FORMAT_VERSION, "bits": bits, "group_size": group_size,
          "method": method, "modules_not_converted": sorted(not_converted)}
    if module_formats:
        qc["module_formats"] = {name: dict(module_formats[name]) for name in sorted(module_formats)}
    if bits_per_weight is not None:
        qc["bits_per_weight"] = dict(bits_per_weight)
    return qc


def module_format(qc: dict, name: str) -> tuple[float, int]:
    """(bits, group_size) of the quantized module `name`: its module_formats entry, else the checkpoint's."""
    entry = qc.get("module_formats", {}).get(name, qc)
    return float(entry["bits"]), int(entry["group_size"])


def checked_quantization_config(config: dict, where: Path) -> dict:
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "lowbit":
        raise CheckpointError(f"{where}: config.json has no lowbit quantization_config")
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {qc.get('format_version')!r} is not supported "
                              f"(this lowbit reads {FORMAT_VERSION})")
    try:
        formats.check_bits(qc.get("bits"))
        formats.check_group_size(qc.get("group_size"))
    except ValueError as e:
        raise CheckpointError(f"{where}: quantization_config: {e}") from e
    if qc.get("method") not in formats.METHODS:
        raise CheckpointError(f"{where}: quantization_config.method must be one of {formats.METHODS}, "
                              f"got {qc.get('method')!r}")
    names = qc.get("modules_not_converted")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{where}: quantization_config.modules_not_converted must be a list of module names")
    entries = qc.get("module_formats", {})
    if not isinstance(entries, dict):
        raise CheckpointError(f"{where}: quantization_config.module_formats must map module names to formats")
    for name, entry in entries.items():
        key = f"quantization_config.module_formats[{name!r}]"
        if not isinstance(entry, dict) or set(entry) != {"bits", "group_size"}:
            raise CheckpointError(f"{where}: {key} must be {{\"bits\": ..., \"group_size\": ...}}, got {entry!r}")
        try:
            formats.check_bits(entry["bits"])
            formats.check_group_size(entry["group_size"])
        except ValueError as e:
            raise CheckpointError(f"{where}: {key}: {e}") from e
        if name in names:
            raise CheckpointError(f"{where}: {key}: {name} is also in modules_not_converted")
    budget = qc.get("bits_per_weight", {"target": 0.0, "achieved": 0.0})
    if not (isinstance(budget, dict) and set(budget) == {"target", "achieved"}
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in budget.values())):
        raise CheckpointError(f"{where}: quantization_config.bits_per_weight must be {{\"target\": number, "
                              f"\"achieved\": number}}, got {budget!r}")
    return qc


# --- writing ----------------------------------------------------------------------------------------

def module_tensors(name: str, module: nn.Module, float_dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one module: a QuantLinear's buffers, or float parameters."""
    def cast(t):
        return t.detach() if float_dtype is None else t.detach().to(float_dtype)
    if isinstance(module, QuantLinear):
        out = {f"{name}.{k}": t for k, t in module.weight.tensors().items()}
        if module.bias is not None:
            out[f"{name}.bias"] = cast(module.bias)
        return out
    return {f"{name}.{k}": cast(p) for k, p in module.named_parameters(recurse=False)}


def write_checkpoint(out: Path, config: LlamaConfig, qconfig: dict, tensors, tokenizer: Tokenizer | None,
                     force: bool = False, align: int | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """tensors: an iterable of (name, tensor), consumed once; the directory appears only when complete."""
    with atomic_directory(out, force) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, align, metadata={"format": "pt"})
        for name, tensor in tensors:
            writer.add(name, tensor)
        writer.close()
        full_config = config.to_dict() | {"quantization_config": qconfig}
        (tmp / "config.json").write_text(json.dumps(full_config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(out)


def save_quantized(model: LlamaForCausalLM, out, force: bool = False, align: int | None = None,
                   float_dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a quantized lowbit LlamaForCausalLM as a checkpoint directory (atomically).

    float_dtype: store the float tensors (embeddings, norms, unquantized linears) in this dtype (default:
    as they are). align: start every tensor's data on this byte boundary of its file (e.g. 1024)."""
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"save_quantized takes a lowbit.LlamaForCausalLM, got {type(model).__name__}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layers (use lowbit.quantize_model first)")
    # The most common format is the checkpoint's; the layers in another one are listed in module_formats.
    (bits, group_size), _ = Counter((m.bits, m.group_size) for m in layers.values()).most_common(1)[0]
    module_formats = {name: {"bits": m.bits, "group_size": m.group_size} for name, m in layers.items()
                      if (m.bits, m.group_size) != (bits, group_size)}
    method = getattr(model, "quantization", {}).get("method", "rtn")
    not_converted = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    qconfig = quantization_config(bits, group_size, method, not_converted, module_formats,
                                  getattr(model, "quantization", {}).get("bits_per_weight"))
    tied = model.config.tie_word_embeddings and model.lm_head.weight is model.embed.weight

    def tensors():
        for name, module in model.named_modules():
            if name == "lm_head" and tied:
                continue
            yield from module_tensors(name, module, float_dtype).items()
    return write_checkpoint(Path(out), model.config, qconfig, tensors(), model.tokenizer, force, align,
                            max_shard_bytes)


# --- reading ----------------------------------------------------------------------------------------

def verify_checksums(st: SafetensorsDir, path: Path) -> int:
    """Every tensor with a stored CRC-32 checked (CheckpointError naming the first corrupted one); returns how
    many were checked, after a warning when there were none."""
    checked = sum(st.verify(k) for k in st.keys() if not k.startswith(PAD_PREFIX))
    if checked == 0:
        warnings.warn(f"{path}: no checksums to verify (written before lowbit stored them)", stacklevel=3)
    return checked


def quantized_weight(st, name: str, bits: float, group_size: int, in_features: int) -> QuantizedWeight:
    """A QuantizedWeight from checkpoint tensors, checked: shapes, dtypes, permutation, finite scales."""
    tensors = {k: st.get(f"{name}.{k}") for k in QUANT_TENSORS}
    if f"{name}.perm" in st:
        tensors["perm"] = st.get(f"{name}.perm")
    where = st.file_of(f"{name}.qweight") if hasattr(st, "file_of") else st
    try:
        weight = QuantizedWeight.from_tensors(tensors, bits, group_size, in_features)
    except ValueError as e:
        raise CheckpointError(f"{where}: {name}: {e}") from e
    for k in ("scales", "zeros"):
        if not torch.isfinite(tensors[k]).all():
            raise CheckpointError(f"{where}: tensor {name}.{k} has non-finite values")
    return weight


def load_quantized(path, dtype: torch.dtype = torch.float32, device="cpu", verify: bool = False) -> LlamaForCausalLM:
    """A lowbit checkpoint directory as a LlamaForCausalLM with QuantLinear layers (float parts in dtype).

    verify: check every tensor against the CRC-32 the writer stored (reads every byte once more); a checkpoint
    written before lowbit stored checksums has none to check, which is said once as a warning."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint directory")
    config = read_config(path)
    qc = checked_quantization_config(config.extra, path)
    st = SafetensorsDir(path)
    if verify:
        verify_checksums(st, path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    not_converted = set(qc["modules_not_converted"])
    expected = set()

    def quant_linear(name: str, linear: nn.Linear) -> QuantLinear:
        weight = quantized_weight(st, name, *module_format(qc, name), linear.in_features)
        if weight.out_features != linear.out_features:
            raise CheckpointError(f"{st.file_of(name + '.qweight')}: {name} has {weight.out_features} rows, the config "
                                  f"needs {linear.out_features}")
        expected.update(f"{name}.{k}" for k in weight.layout_tensors())
        bias = None
        if linear.bias is not None:
            expected.add(f"{name}.bias")
            bias = _float(st, f"{name}.bias", dtype)
            if tuple(bias.shape) != (linear.out_features,):
                raise CheckpointError(f"{st.file_of(name + '.bias')}: tensor {name + '.bias'!r} has shape "
                                      f"{list(bias.shape)}, the config needs [{linear.out_features}]")
        return QuantLinear(weight, bias)

    replaced = set(replace_linears(model, quant_linear, skip=[n for n in not_converted if n]))
    unknown = sorted(set(qc.get("module_formats", {})) - replaced)
    if unknown:
        raise CheckpointError(f"{path}: quantization_config.module_formats names {unknown[:5]}, which are not "
                              f"quantized linear layers of this model")
    for name, module in list(model.named_modules()):
        if name in replaced:
            continue
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            if full == "lm_head.weight" and config.tie_word_embeddings:
                continue
            t = _float(st, full, dtype)
            if tuple(t.shape) != tuple(param.shape):
                raise CheckpointError(f"{st.file_of(full)}: tensor {full!r} has shape {list(t.shape)}, the config "
                                      f"needs {list(param.shape)}")
            setattr(module, pname, nn.Parameter(t, requires_grad=False))
            expected.add(full)
    unexpected = sorted(k for k in st.keys() if k not in expected and not k.startswith(PAD_PREFIX))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]} (the config does not use them)")
    if config.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear):
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(config)
    model.quantization = {k: qc[k] for k in ("bits", "group_size", "method", "modules_not_converted")}
    model.quantization["module_formats"] = qc.get("module_formats", {})
    if "bits_per_weight" in qc:
        model.quantization["bits_per_weight"] = qc["bits_per_weight"]
    model.tokenizer = Tokenizer.from_dir_if_present(path)
    return model.to(device).eval()


def _float(st, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = st.get(name)
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise CheckpointError(f"{st.file_of(name)}: tensor {name!r} must be float16, bfloat16, float32 or float64, "
                              f"got {t.dtype}")
    if not formats.all_finite(t):
        raise CheckpointError(f"{st.file_of(name)}: tensor {name!r} has non-finite values")
    if t.numel() and t.abs().max() > FLOAT_LIMIT:
        raise CheckpointError(f"{st.file_of(name)}: tensor {name!r} has values beyond ±{FLOAT_LIMIT:g} (float16's "
                              f"range), which no LLaMA weight reaches: the file is corrupt")
    return t.to(dtype)


# --- writing a checkpoint block by block, resumably --------------------------------------------------

def float_source(src: Path):
    """(a function returning a fresh reader of an HF float directory's or a .gguf file's tensors, config,
    tokenizer or None). Source tensors are memory-mapped, and a mapping's pages stay resident while any tensor read
    through it lives: readers that take one block at a time open a fresh one for each."""
    src = Path(src)
    if src.is_file() and src.suffix == ".gguf":
        from .gguf import GGUFFile
        gguf = GGUFFile(src)
        return lambda: gguf, LlamaConfig.from_dict(gguf.config()), gguf.tokenizer()
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a model directory or .gguf file")
    config = read_config(src)
    tokenizer = Tokenizer.from_dir_if_present(src)
    SafetensorsDir(src)  # every file opens, or the error names the bad one
    return lambda: SafetensorsDir(src), config, tokenizer


class ResumableCheckpoint:
    """A lowbit checkpoint written one decoder block at a time into a partial directory beside `out`
    (.<name>.partial): each finished block is a file there, with the activations entering the next block and a
    state file naming the run (its fingerprint) and how far it got, each written whole (a temporary file renamed).
    Entered again with the same fingerprint, the run resumes after its last finished block; with another, the
    partial directory is started afresh. finish() assembles the shards in block order, whatever the interruptions,
    so a resumed run writes the same bytes as an uninterrupted one, and `out` appears only then (atomically).

    On an error the partial directory is removed (nothing partial is left behind); on KeyboardInterrupt (and when
    the process is killed) it stays, for the next run of the same command."""

    STATE = "state.json"

    def __init__(self, out: Path, fingerprint: str, force: bool = False, align: int | None = None,
                 float_dtype: torch.dtype = torch.float16, max_shard_bytes: int = CONVERT_SHARD_BYTES):
        self.out, self.fingerprint, self.force, self.align = Path(out), fingerprint, force, align
        self.float_dtype, self.max_shard_bytes = float_dtype, max_shard_bytes
        self.directory = self.out.parent / f".{self.out.name}.partial"

    def __enter__(self) -> "ResumableCheckpoint":
        if self.out.exists() and not self.force:
            raise FileExistsError(f"{self.out} exists (use force to overwrite)")
        for parent in self.out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise NotADirectoryError(f"{self.out}: {parent} is a file, not a directory")
                break
        state = self.load_json(self.STATE) if self.directory.is_dir() else None
        if state is not None and state.get("fingerprint") == self.fingerprint:
            self.state = state
            if state["blocks_done"]:
                print(f"resuming {self.out} after block {state['blocks_done'] - 1} ({self.directory})", flush=True)
        else:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True)
            self.state = {"fingerprint": self.fingerprint, "blocks_done": 0, "globals": False,
                          "quantized": [0, 0]}
            self._save_state()
        return self

    def __exit__(self, kind, error, tb):
        if error is not None and not isinstance(error, KeyboardInterrupt):
            shutil.rmtree(self.directory, ignore_errors=True)
        elif error is not None:
            print(f"\ninterrupted: {self.state['blocks_done']} blocks are kept in {self.directory}; the same command "
                  f"continues from there", flush=True)
        return False

    # the pipeline's sink
    def resume_point(self) -> tuple[int, torch.Tensor | None]:
        """(the first block still to do, the activations entering it or None)."""
        path = self.directory / "activations.safetensors"
        x = None
        if self.state["blocks_done"] and path.is_file():
            with safe_open(str(path), framework="pt") as f:
                x = f.get_tensor("x")
        return self.state["blocks_done"], x

    def add(self, i: int, block: nn.Module, x: torch.Tensor | None) -> None:
        """Block i, quantized (lowbit's Block), and the activations it passes on (None without calibration)."""
        if i != self.state["blocks_done"]:
            raise RuntimeError(f"block {i} added after {self.state['blocks_done']} finished blocks")
        tensors = {}
        for name, module in block.named_modules():
            tensors |= module_tensors(f"layers.{i}.{name}" if name else f"layers.{i}", module, self.float_dtype)
            if isinstance(module, QuantLinear):
                self._count(module.in_features * module.out_features, module.weight.nbytes)
        self._write(f"block-{i:05d}.safetensors", tensors)
        if x is not None:
            self._write("activations.safetensors", {"x": x.float()})
        self.state["blocks_done"] = i + 1
        self._save_state()

    def has_globals(self) -> bool:
        return self.state["globals"]

    def add_globals(self, tensors, quantized: tuple[int, int] = (0, 0)) -> None:
        """The tensors outside the blocks (name, tensor pairs): embedding, final norm, output head; quantized: the
        (weights, bytes) of a quantized head among them."""
        self._count(*quantized)
        self._write("globals.safetensors", dict(tensors))
        self.state["globals"] = True
        self._save_state()

    def quantized_stats(self) -> tuple[int, int]:
        """(weights, bytes) of the quantized linears written so far (lowbit.eval.linear_stats' count)."""
        return tuple(self.state["quantized"])

    def load_json(self, name: str):
        try:
            return json.loads((self.directory / name).read_text())
        except (OSError, ValueError):
            return None

    def save_json(self, name: str, value) -> None:
        tmp = self.directory / f".{name}.tmp"
        tmp.write_text(json.dumps(value))
        os.replace(tmp, self.directory / name)

    def remove_matching(self, pattern: str) -> None:
        for path in self.directory.glob(pattern):
            path.unlink()

    def finish(self, config: LlamaConfig, qconfig: dict, tokenizer: Tokenizer | None) -> Path:
        """Assemble the checkpoint (shards in block order) at out, then remove the partial directory."""
        files = ["globals.safetensors"] + [f"block-{i:05d}.safetensors" for i in range(self.state["blocks_done"])]

        def tensors():
            for name in files:
                with safe_open(str(self.directory / name), framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)
        write_checkpoint(self.out, config, qconfig, tensors(), tokenizer, self.force, self.align,
                         self.max_shard_bytes)
        shutil.rmtree(self.directory, ignore_errors=True)
        return self.out

    def _count(self, weights: int, nbytes: int) -> None:
        self.state["quantized"] = [self.state["quantized"][0] + weights, self.state["quantized"][1] + nbytes]

    def _write(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.directory / f".{name}.tmp"
        write_safetensors(tmp, tensors)
        os.replace(tmp, self.directory / name)

    def _save_state(self) -> None:
        self.save_json(self.STATE, self.state)
