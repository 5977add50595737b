"""Quantized checkpoints: save/load, streaming convert, --align, AutoAWQ in/out, inspect, bad files, fuzzing."""

import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from conftest import tiny_hf_llama
from lowbit.cli import main as cli
from lowbit.io.autoawq import AWQ_NIBBLE, awq_pack, awq_unpack
from lowbit.io.hf import CheckpointError
from lowbit.io.safetensors_io import PAD_PREFIX
from lowbit.models.llama import LlamaForCausalLM

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def hf_dir(tmp_path):
    tiny_hf_llama(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def saved(hf_dir, tmp_path):
    """A tiny int4 RTN lowbit checkpoint and the in-memory model it was saved from."""
    model = lowbit.quantize_model(LlamaForCausalLM.from_pretrained(hf_dir), 4, 32)
    return lowbit.save_quantized(model, tmp_path / "q4"), model


def logits(model):
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("bits,method", [(4, "rtn"), (3.5, "awq"), (4, "gptq"), (3.5, "awq+gptq")])
def test_save_load_round_trip(hf_dir, tmp_path, bits, method):
    model = LlamaForCausalLM.from_pretrained(hf_dir)
    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    q = lowbit.quantize_model(model, bits, 32, method=method, calib=calib if method != "rtn" else None)
    out = lowbit.save_quantized(q, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "lowbit", "format_version": 1, "bits": bits, "group_size": 32, "method": method,
                  "modules_not_converted": ["lm_head"]}
    for loaded in (lowbit.load_quantized(out), LlamaForCausalLM.from_pretrained(out)):
        assert torch.equal(logits(loaded), logits(q))
        assert isinstance(loaded.layers[0].attn.wqkv, lowbit.QuantLinear)
        assert (loaded.layers[0].attn.wqkv.perm is not None) == (bits == 3.5)  # saliency order is saved
    with pytest.raises(FileExistsError, match="exists"):
        lowbit.save_quantized(q, out)
    lowbit.save_quantized(q, out, force=True)


def test_sharded_checkpoint(saved, tmp_path):
    _, model = saved
    out = lowbit.save_quantized(model, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    assert torch.equal(logits(lowbit.load_quantized(out)), logits(model))


def test_convert_streams_the_same_quantization(hf_dir, saved, tmp_path):
    """`lowbit convert` (layer by layer, float parts in float16) stores exactly what quantize_model computes."""
    ckpt, model = saved
    assert cli(["convert", str(hf_dir), str(tmp_path / "conv"), "--bits", "4", "--group-size", "32"]) == 0
    ours, ref = load_file(str(tmp_path / "conv" / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert ours.keys() == ref.keys()
    for name in ours:
        as_half = ref[name].is_floating_point() and ours[name].dtype == torch.float16
        expected = ref[name].half() if as_half else ref[name]
        assert torch.equal(ours[name], expected), name
    # Existing output: refused without --force, and left as it was.
    before = (tmp_path / "conv" / "model.safetensors").read_bytes()
    assert cli(["convert", str(hf_dir), str(tmp_path / "conv"), "--bits", "3.5", "--group-size", "32"]) == 1
    assert (tmp_path / "conv" / "model.safetensors").read_bytes() == before


def test_convert_grid_option(hf_dir, tmp_path):
    """--grid minmax gives quantize_model(grid="minmax")'s tensors, which differ from the default searched grid."""
    model = lowbit.quantize_model(LlamaForCausalLM.from_pretrained(hf_dir), 4, 32, grid="minmax")
    ref = lowbit.save_quantized(model, tmp_path / "minmax-ref")
    assert cli(["convert", str(hf_dir), str(tmp_path / "conv"), "--bits", "4", "--group-size", "32",
                "--grid", "minmax"]) == 0
    ours, ref = load_file(str(tmp_path / "conv" / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    name = "layers.0.attn.wqkv.scales"
    assert name in ours and torch.equal(ours[name], ref[name])
    searched = lowbit.quantize_model(LlamaForCausalLM.from_pretrained(hf_dir), 4, 32)
    assert not torch.equal(searched.layers[0].attn.wqkv.scales, model.layers[0].attn.wqkv.scales)


def test_failed_conversion_leaves_nothing(hf_dir, tmp_path):
    shard = hf_dir / "model.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")  # fails late, after other layers
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match="non-finite"):
        lowbit.convert(hf_dir, tmp_path / "out", bits=4, group_size=32, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_align_1024(hf_dir, saved, tmp_path):
    out = lowbit.convert(hf_dir, tmp_path / "aligned", bits=3.5, group_size=64, align=1024, progress=False)
    raw = (out / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    starts = [8 + n + v["data_offsets"][0] for k, v in header.items()
              if k != "__metadata__" and not k.startswith(PAD_PREFIX)]  # the fillers between tensors
    assert len(starts) > 40 and all(s % 1024 == 0 for s in starts)
    stock = load_file(str(out / "model.safetensors"))  # the stock library reads it
    plain = lowbit.convert(hf_dir, tmp_path / "plain", bits=3.5, group_size=64, progress=False)
    assert torch.equal(logits(lowbit.load_quantized(out)), logits(lowbit.load_quantized(plain)))
    assert all(torch.equal(t, stock[k]) for k, t in load_file(str(plain / "model.safetensors")).items())


# --- int8, and an output head in its own format ------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_int8_head_on_int4_layers_round_trip(tmp_path, tied):
    """An int8 head on int4 layers: saved with its format in module_formats, loaded back, shown by inspect, and the
    streaming converter writes exactly what quantize_model computes."""
    tiny_hf_llama(tmp_path / "hf", tie_word_embeddings=tied)
    q = lowbit.quantize_model(LlamaForCausalLM.from_pretrained(tmp_path / "hf"), 4, 32, lm_head_bits=8,
                              lm_head_group_size=64)
    assert (q.lm_head.bits, q.lm_head.group_size, q.layers[0].attn.wo.bits) == (8, 64, 4)
    assert q.quantization["module_formats"] == {"lm_head": {"bits": 8, "group_size": 64}}
    out = lowbit.save_quantized(q, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["modules_not_converted"]) == (4, 32, [])
    assert qc["module_formats"] == {"lm_head": {"bits": 8, "group_size": 64}}
    loaded = lowbit.load_quantized(out, verify=True)
    assert (loaded.lm_head.bits, loaded.lm_head.group_size) == (8, 64)
    assert loaded.quantization["module_formats"] == qc["module_formats"]
    assert torch.equal(logits(loaded), logits(q))
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "conv"), "--bits", "4", "--group-size", "32",
                "--lm-head-bits", "8", "--lm-head-group-size", "64", "--float-dtype", "float32"]) == 0
    assert json.loads((tmp_path / "conv" / "config.json").read_text())["quantization_config"] == qc
    ours, ref = load_file(str(tmp_path / "conv" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ours)
    assert cli(["inspect", str(out)]) == 0


def test_int8_checkpoint_and_inspect(hf_dir, tmp_path, capsys):
    assert cli(["convert", str(hf_dir), str(tmp_path / "q8"), "--bits", "8", "--group-size", "128",
                "--quantize-lm-head"]) == 0
    model = lowbit.load_quantized(tmp_path / "q8", verify=True)
    assert {m.bits for m in model.modules() if isinstance(m, lowbit.QuantLinear)} == {8}
    float_model = LlamaForCausalLM.from_pretrained(hf_dir)
    a, b = logits(model), logits(float_model)
    assert ((a - b).norm() / b.norm()).item() < 0.02  # int8 weights (and the CPU's int8 activations): close
    capsys.readouterr()
    assert cli(["inspect", str(tmp_path / "q8")]) == 0
    text = capsys.readouterr().out
    assert "int8, group size 128" in text and "lm_head" in text and "int8 g128" in text
    assert "checks: all passed" in text


def test_inspect_names_the_other_formats(saved, tmp_path, capsys):
    _, model = saved
    model.lm_head = lowbit.QuantLinear.from_linear(model.lm_head, 8, 128)
    out = lowbit.save_quantized(model, tmp_path / "head8")
    capsys.readouterr()
    assert cli(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "int4, group size 32; lm_head: int8 g128" in text
    assert [line.split()[1:3] for line in text.splitlines() if line.startswith("lm_head ")] == [["int8", "g128"]]


@pytest.mark.parametrize("entry,match", [
    ({"lm_head": {"bits": 3, "group_size": 32}}, r"module_formats\['lm_head'\]: bits must be one of"),
    ({"lm_head": {"bits": 8}}, r"module_formats\['lm_head'\] must be"),
    ({"lm_head": {"bits": 8, "group_size": 48}}, "group_size must be one of"),
    ({"layers.0.attn.wo": {"bits": 8, "group_size": 32}}, r"layers.0.attn.wo: qweight must be"),
    ({"layers.9.attn.wo": {"bits": 8, "group_size": 32}}, "not quantized linear layers"),
    ({"embed": {"bits": 8, "group_size": 32}}, "not quantized linear layers"),
    ([8], "module_formats must map"),
])
def test_bad_module_formats_raise_clear_errors(saved, capsys, entry, match):
    ckpt, _ = saved
    cfg = ckpt / "config.json"
    config = json.loads(cfg.read_text())
    config["quantization_config"]["module_formats"] = entry
    cfg.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        lowbit.load_quantized(ckpt)
    assert cli(["inspect", str(ckpt)]) == 1
    assert "Traceback" not in capsys.readouterr().out


def test_module_format_of_an_unconverted_module_is_refused(saved):
    ckpt, _ = saved
    cfg = ckpt / "config.json"
    config = json.loads(cfg.read_text())
    config["quantization_config"]["module_formats"] = {"lm_head": {"bits": 8, "group_size": 32}}
    cfg.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lm_head is also in modules_not_converted"):
        lowbit.load_quantized(ckpt)


def test_export_refuses_int8(hf_dir, tmp_path):
    q8 = lowbit.convert(hf_dir, tmp_path / "q8", bits=8, group_size=32, integer_zeros=True, progress=False)
    with pytest.raises(ValueError, match="4-bit weights only; this checkpoint is int8"):
        lowbit.io.autoawq.export_awq(q8, tmp_path / "awq8")
    head8 = lowbit.convert(hf_dir, tmp_path / "head8", bits=4, group_size=32, integer_zeros=True, lm_head_bits=8,
                           progress=False)
    with pytest.raises(ValueError, match="the output head is quantized"):
        lowbit.io.autoawq.export_awq(head8, tmp_path / "awq_head8")
    assert not (tmp_path / "awq8").exists() and not (tmp_path / "awq_head8").exists()


# --- AutoAWQ ----------------------------------------------------------------------------------------

def awq_reference_dequantize(qweight, qzeros, scales, group_size):
    """AutoAWQ's GEMM dequantization written out from its format: W^T [K, N] in float16."""
    def unpack(p):
        nibbles = [(p >> (4 * i)) & 15 for i in range(8)]          # nibble i of every word
        return torch.stack([nibbles[AWQ_NIBBLE[c]] for c in range(8)], -1).reshape(p.shape[0], -1)
    q, z = unpack(qweight), unpack(qzeros).repeat_interleave(group_size, 0)
    return (q - z).half() * scales.repeat_interleave(group_size, 0)


def write_awq_dir(path, group_size=32):
    """A tiny random AutoAWQ GEMM checkpoint (HF names, transformers' quantization_config)."""
    model = tiny_hf_llama(path)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for name, t in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if name.endswith("_proj.weight"):
            n, k = t.shape
            words = torch.randint(-2**31, 2**31, (k, n // 8), generator=g, dtype=torch.int64)
            tensors[f"{module}.qweight"] = words.to(torch.int32)
            tensors[f"{module}.qzeros"] = torch.randint(-2**31, 2**31, (k // group_size, n // 8), generator=g,
                                                        dtype=torch.int64).to(torch.int32)
            tensors[f"{module}.scales"] = (torch.rand(k // group_size, n, generator=g) * 0.02 + 1e-3).half()
        else:
            tensors[name] = t.half()
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                                     "version": "gemm", "modules_to_not_convert": None}
    (path / "config.json").write_text(json.dumps(config))
    return tensors


def test_awq_pack_order():
    values = torch.arange(8, dtype=torch.int32).view(1, 8)
    word = awq_pack(values).item() & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 15 for i in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]
    codes = torch.randint(0, 16, (5, 24), dtype=torch.int32)
    assert torch.equal(awq_unpack(awq_pack(codes)), codes)


def test_autoawq_import_is_exact_and_round_trips(tmp_path):
    src = tmp_path / "awq"
    tensors = write_awq_dir(src)
    assert cli(["convert", str(src), str(tmp_path / "lowbit")]) == 0
    model = lowbit.load_quantized(tmp_path / "lowbit")
    # Dequantized weights equal AutoAWQ's, bit for bit (fused q/k/v rows in order).
    q, k, v = (f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
    expected = torch.cat([awq_reference_dequantize(tensors[f"{m}.qweight"], tensors[f"{m}.qzeros"],
                                                   tensors[f"{m}.scales"], 32).T for m in (q, k, v)])
    assert torch.equal(model.layers[1].attn.wqkv.dequantize().half(), expected)
    # from_pretrained reads AutoAWQ directories directly.
    assert torch.equal(logits(LlamaForCausalLM.from_pretrained(src)), logits(model))
    # And back: lowbit -> AutoAWQ is the original, bit for bit.
    assert cli(["export", str(tmp_path / "lowbit"), str(tmp_path / "awq2"), "--format", "awq"]) == 0
    back = load_file(str(tmp_path / "awq2" / "model.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    config = json.loads((tmp_path / "awq2" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                             "version": "gemm", "modules_to_not_convert": None}


def test_export_needs_integer_zeros(hf_dir, saved, tmp_path, capsys):
    ckpt, _ = saved
    assert cli(["export", str(ckpt), str(tmp_path / "awq")]) == 1
    assert "zero points are not integers" in capsys.readouterr().err and not (tmp_path / "awq").exists()
    lowbit.convert(hf_dir, tmp_path / "int", bits=4, group_size=32, integer_zeros=True, progress=False)
    assert cli(["export", str(tmp_path / "int"), str(tmp_path / "awq")]) == 0
    a = lowbit.load_quantized(tmp_path / "int").layers[0].ffn.w_down.dequantize()
    b = LlamaForCausalLM.from_pretrained(tmp_path / "awq").layers[0].ffn.w_down.dequantize()
    assert torch.equal(a, b)
    q35 = lowbit.convert(hf_dir, tmp_path / "q35", bits=3.5, group_size=32, progress=False)
    with pytest.raises(ValueError, match="4-bit weights only"):
        lowbit.io.autoawq.export_awq(q35, tmp_path / "awq35")


# --- inspect and bad files ----------------------------------------------------------------------------

def test_inspect(saved, tmp_path, capsys):
    ckpt, _ = saved
    assert cli(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "layers.2.ffn.w_down" in text and "int4 g32" in text and "checks: all passed" in text
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["layers.1.attn.wo.scales"][3, 0] = float("inf")
    save_file(tensors, str(ckpt / "model.safetensors"))
    assert cli(["inspect", str(ckpt)]) == 1
    text = capsys.readouterr().out
    assert "FAILED" in text and "layers.1.attn.wo.scales has non-finite values" in text
    assert "checks: 1 failed" in text


def rewrite(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("case,match", [
    ("truncated", "not a readable safetensors file"),
    ("header lies", "not a readable safetensors file"),
    ("wrong dtype", "scales must be torch.float16"),
    ("wrong shape", "qweight must be"),
    ("missing tensor", "missing tensor 'layers.2.ffn.w_down.zeros'"),
    ("extra tensor", "unexpected tensors"),
    ("non-finite scales", "layers.0.attn.wqkv.scales has non-finite values"),
    ("bad perm", "perm must be a permutation"),
    ("unsupported bits", "bits must be one of"),
    ("unsupported group size", "group_size must be one of"),
    ("config disagrees", "has shape"),
    ("not json", "config.json"),
])
def test_bad_checkpoints_raise_clear_errors(saved, case, match):
    ckpt, _ = saved
    st, cfg = ckpt / "model.safetensors", ckpt / "config.json"
    config = json.loads(cfg.read_text())
    if case == "truncated":
        st.write_bytes(st.read_bytes()[:-1000])
    elif case == "header lies":
        raw = st.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header["layers.0.attn.wo.qweight"]["data_offsets"][1] += 64
        encoded = json.dumps(header).encode()
        st.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:])
    elif case == "wrong dtype":
        rewrite(st, lambda t: t.__setitem__("layers.1.attn.wo.scales", t["layers.1.attn.wo.scales"].float()))
    elif case == "wrong shape":
        name = "layers.1.attn.wo.qweight"
        rewrite(st, lambda t: t.__setitem__(name, t[name][:, :-16].contiguous()))
    elif case == "missing tensor":
        rewrite(st, lambda t: t.pop("layers.2.ffn.w_down.zeros"))
    elif case == "extra tensor":
        rewrite(st, lambda t: t.__setitem__("layers.9.attn.wo.qweight", torch.zeros(1, dtype=torch.uint8)))
    elif case == "non-finite scales":
        rewrite(st, lambda t: t["layers.0.attn.wqkv.scales"].view(-1).__setitem__(5, float("nan")))
    elif case == "bad perm":
        rewrite(st, lambda t: t.__setitem__("layers.0.attn.wo.perm", torch.zeros(128, dtype=torch.int32)))
    elif case == "unsupported bits":
        config["quantization_config"]["bits"] = 3
    elif case == "unsupported group size":
        config["quantization_config"]["group_size"] = 48
    elif case == "config disagrees":
        config["vocab_size"] = 500
    elif case == "not json":
        cfg.write_text("{not json")
    if case not in ("not json",):
        cfg.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        lowbit.load_quantized(ckpt)


def test_fuzzed_checkpoints_load_consistently_or_raise(saved):
    """tests/fuzz_checkpoint.py in a child process with a memory limit and a timeout, so that a crash or a hang
    fails the test (naming the last case) instead of taking pytest down. Every corruption ends as a CheckpointError,
    a model equal to the original, or one with different but finite logits (data changed, verify off); with
    verify=True no data corruption loads. Counts are printed (pytest -s). Longer run:
    LOWBIT_FUZZ_ITERATIONS=5000 pytest -s tests/test_checkpoint.py -k fuzz."""
    import resource
    import subprocess
    import sys

    ckpt, _ = saved
    iterations = int(os.environ.get("LOWBIT_FUZZ_ITERATIONS", 150))

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))

    script = Path(__file__).parent / "fuzz_checkpoint.py"
    try:
        proc = subprocess.run([sys.executable, str(script), str(ckpt), str(iterations)], capture_output=True,
                              text=True, timeout=120 + 0.2 * iterations, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired as e:
        last = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"fuzz child hung; last case: {last.strip().splitlines()[-1:]}")
    last_case = [line for line in proc.stderr.splitlines() if line.startswith("case ")][-1:]
    assert proc.returncode == 0, f"fuzz child failed (status {proc.returncode}) at {last_case}:\n{proc.stderr[-3000:]}"
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    print(outcomes)
    assert outcomes["rejected"] > 0 and outcomes["equal"] + outcomes["different, finite"] > 0, outcomes
    assert outcomes["data corruptions caught by checksum"] > 0, outcomes


def test_no_pickle_anywhere():
    import pathlib
    root = pathlib.Path(lowbit.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, path


def test_awq_with_integer_zeros_exports_to_autoawq(hf_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(hf_dir)
    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    q = lowbit.quantize_model(model, 4, 32, method="awq", calib=calib, integer_zeros=True)
    zeros = q.layers[0].attn.wqkv.zeros
    assert torch.equal(zeros, zeros.round()) and q.layers[0].attn.wqkv.awq_scales is not None
    lowbit.save_quantized(q, tmp_path / "q")
    assert cli(["export", str(tmp_path / "q"), str(tmp_path / "awq"), "--format", "awq"]) == 0
    back = LlamaForCausalLM.from_pretrained(tmp_path / "awq")
    for name in ("layers.0.attn.wqkv", "layers.1.ffn.w_down"):
        assert torch.equal(back.get_submodule(name).dequantize(), q.get_submodule(name).dequantize()), name
    # AutoAWQ keeps the float parts in float16 (the norms hold AWQ's folded scales): only their rounding differs.
    a, b = logits(back), logits(q)
    assert ((a - b).norm() / b.norm()).item() < 2e-2


def test_rmse_report_refuses_a_reloaded_awq_model(hf_dir, tmp_path):
    model = LlamaForCausalLM.from_pretrained(hf_dir)
    calib = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    q = lowbit.quantize_model(model, 4, 32, method="awq", calib=calib, inplace=False)
    assert lowbit.eval.rmse_report(model, q, IDS, progress=False).totals  # fresh: the scales are known
    loaded = lowbit.load_quantized(lowbit.save_quantized(q, tmp_path / "q"))
    with pytest.raises(ValueError, match="checkpoints do not keep them"):
        lowbit.eval.rmse_report(model, loaded, IDS, progress=False)


# --- config values, checksums ---------------------------------------------------------------------------

CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id"]
BAD_VALUES = ["text", -1, 0, 2 ** 62, 1e9, float("nan"), None, [4], {"a": 1}, True, 0.5]


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_every_config_value_loads_or_raises_a_checkpoint_error(saved, key):
    # Each key set to every class of wrong value: a clean CheckpointError naming the checkpoint, or a model that
    # loads and gives finite logits (the same, for values the forward does not use, such as an EOS id; different,
    # for a valid but other rope_theta). Nothing else: no other exception, no hang from a huge size, no NaN.
    ckpt, model = saved
    cfg = ckpt / "config.json"
    original = cfg.read_text()
    expected = logits(model)
    outcomes = {"rejected": 0, "same": 0, "different": 0}
    for value in BAD_VALUES:
        config = json.loads(original)
        config[key] = value
        cfg.write_text(json.dumps(config))
        try:
            loaded = lowbit.load_quantized(ckpt)
        except CheckpointError as e:
            assert str(ckpt) in str(e), e
            outcomes["rejected"] += 1
            continue
        got = logits(loaded)
        assert torch.isfinite(got).all(), (key, value)
        outcomes["same" if torch.equal(got, expected) else "different"] += 1
    cfg.write_text(original)
    print(key, outcomes)
    assert outcomes["rejected"] >= 5, outcomes


@pytest.mark.parametrize("case,match", [
    ("non-utf8", "config.json"),
    ("rope_scaling string", "rope_scaling must be an object"),
    ("llama3 without factor", "rope_scaling.factor"),
    ("kv heads changed", "the config needs 256"),
    ("method missing", "quantization_config.method"),
    ("bias shape", "the config needs \\[192\\]"),
])
def test_more_bad_configs(saved, case, match):
    ckpt, _ = saved
    cfg, st = ckpt / "config.json", ckpt / "model.safetensors"
    config = json.loads(cfg.read_text())
    if case == "non-utf8":
        cfg.write_bytes(b'{"vocab_size": "\xff\xfe"}')
    else:
        if case == "rope_scaling string":
            config["rope_scaling"] = "llama3"
        elif case == "llama3 without factor":
            config["rope_scaling"] = {"rope_type": "llama3"}
        elif case == "kv heads changed":
            config["num_key_value_heads"] = 4  # q/k/v rows 128 + 2 * 64: the checkpoint's 192 do not match
        elif case == "method missing":
            del config["quantization_config"]["method"]
        elif case == "bias shape":
            config["attention_bias"] = True
            rewrite(st, lambda t: t.__setitem__("layers.0.attn.wqkv.bias", torch.zeros(1, 192)))
        cfg.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        lowbit.load_quantized(ckpt)
    if case != "non-utf8":
        assert cli(["inspect", str(ckpt)]) == 1


def test_checksums_catch_corrupted_data(saved, capsys, recwarn):
    ckpt, model = saved
    st = ckpt / "model.safetensors"
    assert cli(["inspect", str(ckpt)]) == 0
    assert "checksums: " in capsys.readouterr().out
    assert torch.equal(logits(lowbit.load_quantized(ckpt, verify=True)), logits(model))
    raw = bytearray(st.read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    rng = random.Random(1)
    caught = 0
    for _ in range(20):  # one data byte changed: verify names the tensor, every time
        data = bytearray(raw)
        i = rng.randrange(header_end, len(raw))
        data[i] ^= 1 << rng.randrange(8)
        st.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="is corrupted: CRC-32"):
            lowbit.load_quantized(ckpt, verify=True)
        assert cli(["inspect", str(ckpt)]) == 1 and "is corrupted" in capsys.readouterr().out
        caught += 1
    st.write_bytes(bytes(raw))
    assert caught == 20
    # A file without lowbit's checksums (written by another tool) loads; verify says there is nothing to check.
    rewrite(st, lambda t: None)
    lowbit.load_quantized(ckpt, verify=True)
    assert any("no checksums to verify" in str(w.message) for w in recwarn)


def test_huge_float_weights_and_unknown_dtypes_are_rejected(saved, capsys):
    ckpt, _ = saved
    st = ckpt / "model.safetensors"
    rewrite(st, lambda t: t["layers.0.attn_norm.weight"].__setitem__(0, 1e30))
    with pytest.raises(CheckpointError, match="beyond ±65504"):
        lowbit.load_quantized(ckpt)
    rewrite(st, lambda t: t.__setitem__("layers.0.attn_norm.weight", t["layers.0.attn_norm.weight"].clamp(-2, 2)
                                        .to(torch.float8_e5m2)))
    with pytest.raises(CheckpointError):
        lowbit.load_quantized(ckpt)
    assert cli(["inspect", str(ckpt)]) == 1
    assert "Traceback" not in capsys.readouterr().out


def test_index_with_non_string_files_is_rejected(saved, tmp_path):
    _, model = saved
    out = lowbit.save_quantized(model, tmp_path / "sharded", max_shard_bytes=1 << 16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["embed.weight"] = 7
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        lowbit.load_quantized(out)
