"""The calibration pipeline (lowbit.calibration): checkpoints converted one block at a time equal the in-memory
results, memory does not grow with the model's depth, an interrupted conversion resumes to the same bytes, and bad
input fails clearly with nothing partial left behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lowbit
from lowbit import calibration
from lowbit.calibration import GPTQ, NotEnoughMemoryError, quantize_blocks
from lowbit.io.hf import CheckpointError
from lowbit.tokenizer import Tokenizer


def write_float_checkpoint(directory: Path, tokenizer_dir: Path, layers: int = 3, hidden: int = 128,
                           intermediate: int = 256, heads: int = 4, kv_heads: int = 2, vocab: int = 49152,
                           dtype=torch.bfloat16, shards: int = 2, tie: bool = False) -> Path:
    """A random LLaMA HF directory (sharded safetensors in `dtype`) with SmolLM2's tokenizer."""
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    head_dim = hidden // heads

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)
    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": (1 + rand(hidden)).to(dtype)}
    if not tie:
        tensors["lm_head.weight"] = rand(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
                    p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
                    p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
                    p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
                    p + "mlp.gate_proj.weight": rand(intermediate, hidden),
                    p + "mlp.up_proj.weight": rand(intermediate, hidden),
                    p + "mlp.down_proj.weight": rand(hidden, intermediate),
                    p + "input_layernorm.weight": (1 + rand(hidden)).to(dtype),
                    p + "post_attention_layernorm.weight": (1 + rand(hidden)).to(dtype)}
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(directory / file), metadata={"format": "pt"})
        weight_map |= {k: file for k in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", vocab_size=vocab,
                  hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory, smollm2_dir):
    return write_float_checkpoint(tmp_path_factory.mktemp("float") / "hf", Path(smollm2_dir))


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def calib_of(directory: Path, n: int = 2) -> torch.Tensor:
    return lowbit.data.calibration_tokens(Tokenizer.from_dir_if_present(directory), n_samples=n,
                                          seq_len=512)


@pytest.mark.parametrize("bits, group_size, head", [(4, 32, False), (3.5, 64, True), (8, 128, False)])
def test_rtn_from_disk_equals_rtn_in_memory_bit_for_bit(tmp_path, float_dir, bits, group_size, head):
    out = lowbit.convert(float_dir, tmp_path / "q", bits=bits, group_size=group_size, quantize_lm_head=head,
                         float_dtype=torch.float32, progress=False)
    model = lowbit.quantize_model(lowbit.load(float_dir), bits, group_size, quantize_lm_head=head, progress=False)
    expected = {k: v for k, v in model.state_dict().items()}
    got = tensors_of(out)
    assert set(got) == set(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq"])
def test_calibrated_from_disk_matches_in_memory(tmp_path, float_dir, method):
    """The checkpoint streamed from disk and quantize_model on the loaded model: the same codes but for the few that
    float summation order flips (the pipeline runs every sequence through a block at once), close logits."""
    calib = calib_of(float_dir)
    out = lowbit.convert(float_dir, tmp_path / "q", bits=4, group_size=32, method=method, calib_samples=2,
                         float_dtype=torch.float32, progress=False)
    model = lowbit.quantize_model(lowbit.load(float_dir), 4, 32, method=method, calib=calib, progress=False)
    loaded = lowbit.load(out)
    differing = total = 0
    for name, m in model.named_modules():
        if isinstance(m, lowbit.QuantLinear):
            a, b = m.dequantize(), loaded.get_submodule(name).dequantize()
            differing += int((a != b).sum())
            total += a.numel()
    assert differing / total < 2e-3, (differing, total)
    ids = calib[:1, :64]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=2e-2 * model(ids).abs().max().item())


def test_budget_from_disk_chooses_as_in_memory(tmp_path, float_dir):
    """The budget measured block by block from disk (errors, then the Fisher pass backward block by block) chooses
    the formats the in-memory budget chooses, and records the bits per weight it achieved."""
    calib = calib_of(float_dir)
    out = lowbit.convert(float_dir, tmp_path / "q", bits_per_weight=4.5, method="gptq", act_order=True,
                         calib_samples=2, progress=False)
    model = lowbit.quantize_model(lowbit.load(float_dir), bits_per_weight=4.5, method="gptq", act_order=True,
                                  calib=calib, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["module_formats"] == model.quantization["module_formats"]
    assert qc["bits_per_weight"]["achieved"] == pytest.approx(model.quantization["bits_per_weight"]["achieved"])
    assert 4.3 < qc["bits_per_weight"]["achieved"] <= 4.5


def peak_rss_gb(code: str) -> float:
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, code
    return usage.ru_maxrss * 1024 / 1e9


@pytest.mark.slow
def test_memory_does_not_grow_with_depth(tmp_path, smollm2_dir):
    """GPTQ from disk of a 2-layer and a 10-layer model of the same shapes: the deeper one (400 MB more in float32,
    which loading the whole model would hold) peaks within a fraction of one block of the shallow one."""
    peaks = {}
    for layers in (2, 10):
        src = write_float_checkpoint(tmp_path / f"hf{layers}", Path(smollm2_dir), layers=layers, hidden=1024,
                                     intermediate=2816, heads=8, kv_heads=8, shards=1)
        peaks[layers] = peak_rss_gb(f"import lowbit; lowbit.convert({str(src)!r}, {str(tmp_path / f'q{layers}')!r}, "
                                    f"method='gptq', calib_samples=1, progress=False)")
    block_gb = (4 * 1024 * 1024 + 3 * 1024 * 2816) * 4 / 1e9
    assert peaks[10] - peaks[2] < 2 * block_gb, (peaks, block_gb)  # whole-model loading: + 8 blocks


def run_cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lowbit.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def test_killed_conversion_resumes_to_the_same_bytes(tmp_path, smollm2_dir):
    src = write_float_checkpoint(tmp_path / "hf", Path(smollm2_dir), layers=8, hidden=256, intermediate=1024)
    args = ["convert", str(src), "--method", "gptq", "--calib-samples", "1", "--bits", "4", "--group-size", "64"]
    assert run_cli(args + [str(tmp_path / "whole")]).wait() == 0
    state = tmp_path / ".resumed.partial" / "state.json"
    proc = run_cli(args + [str(tmp_path / "resumed")])
    done = 0
    while proc.poll() is None and done < 3:
        time.sleep(0.02)
        try:
            done = json.loads(state.read_text())["blocks_done"]
        except (OSError, ValueError):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= done < 8 and not (tmp_path / "resumed").exists()  # killed mid-way: no output yet
    resumed = run_cli(args + [str(tmp_path / "resumed")])
    log = resumed.communicate()[0].decode()
    assert resumed.returncode == 0 and "resuming" in log, log
    assert not state.parent.exists()
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_interrupt_keeps_the_finished_blocks_and_other_options_start_afresh(tmp_path, float_dir, monkeypatch):
    calls = []
    real = calibration.GPTQ.__call__

    def interrupted(self, view, name, x):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, view, name, x)
    monkeypatch.setattr(calibration.GPTQ, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lowbit.convert(float_dir, tmp_path / "q", method="gptq", calib_samples=1, progress=False)
    partial = tmp_path / ".q.partial"
    assert json.loads((partial / "state.json").read_text())["blocks_done"] == 1
    monkeypatch.setattr(calibration.GPTQ, "__call__", real)
    # Other options are another run: it starts from the first block.
    calls.clear()
    monkeypatch.setattr(calibration.GPTQ, "__call__", lambda self, view, name, x: calls.append(name) or real(
        self, view, name, x))
    lowbit.convert(float_dir, tmp_path / "q", method="gptq", calib_samples=1, group_size=64, progress=False)
    assert calls[0] == "layers.0" and not partial.exists() and (tmp_path / "q").is_dir()


def test_bad_sources_fail_naming_the_file_and_leave_nothing(tmp_path, float_dir):
    def fresh(name):
        copy = tmp_path / name
        shutil.copytree(float_dir, copy)
        return copy

    def check(src, match, **kwargs):
        before = {p.name: p.read_bytes() for p in src.iterdir()}
        with pytest.raises((CheckpointError, ValueError, FileNotFoundError), match=match):
            lowbit.convert(src, tmp_path / f"out-{src.name}", progress=False, **kwargs)
        assert not list(tmp_path.glob(f"*out-{src.name}*"))  # neither the output nor a partial directory
        assert before == {p.name: p.read_bytes() for p in src.iterdir()}  # the source is untouched

    truncated = fresh("truncated")
    shard = truncated / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    check(truncated, "model-00002-of-00002.safetensors", method="gptq", calib_samples=1)
    missing = fresh("missing")
    (missing / "model-00001-of-00002.safetensors").unlink()
    check(missing, "model-00001-of-00002.safetensors")
    wrong = fresh("wrong")
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps(config | {"intermediate_size": 384}))
    check(wrong, r"mlp.gate_proj.weight.* has shape \[256, 128\], the config needs \[384, 128\]", method="gptq",
          calib_samples=1)
    deeper = fresh("deeper")
    (deeper / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 4}))
    check(deeper, r"missing tensor 'model.layers.3.", method="gptq", calib_samples=1)
    ints = fresh("ints")
    tensors = tensors_of(ints)
    first = ints / "model-00001-of-00002.safetensors"
    with safe_open(str(first), framework="pt") as f:
        keys = list(f.keys())
    layer_key = next(k for k in keys if "layers.1." in k and k.endswith("proj.weight"))
    save_file({k: tensors[k].to(torch.int16) if k == layer_key else tensors[k] for k in keys}, str(first))
    check(ints, f"{layer_key}.*dtype torch.int16")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    check(fresh("short"), "fewer than seq_len", method="gptq", calib_file=short)


def test_full_disk_and_too_little_memory_fail_clearly(tmp_path, float_dir, monkeypatch):
    from lowbit.io import checkpoint

    def full(path, tensors, metadata=None, align=None):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(checkpoint, "write_safetensors", full)
    with pytest.raises(OSError, match=r"No space left on device.*\.q\.partial/\.globals\.safetensors"):
        lowbit.convert(float_dir, tmp_path / "q", progress=False)
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    monkeypatch.setattr(calibration, "available_bytes", lambda device: 10 ** 6)
    with pytest.raises(NotEnoughMemoryError, match=r"needs about .* GB for one decoder block with 1024 calibration "
                                                   r"tokens.*--calib-samples"):
        lowbit.convert(float_dir, tmp_path / "q", method="gptq", calib_samples=2, progress=False)
    monkeypatch.undo()

    def allocator_failure(self, view, name, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 27600000000 bytes")
    monkeypatch.setattr(calibration.GPTQ, "__call__", allocator_failure)
    with pytest.raises(NotEnoughMemoryError, match="out of memory in decoder block 0 .*--calib-samples"):
        lowbit.convert(float_dir, tmp_path / "q", method="gptq", calib_samples=1, progress=False)
    assert not list(tmp_path.iterdir())


def test_quantize_blocks_in_memory_is_quantize_model(float_dir):
    """quantize_model's GPTQ is the pipeline's GPTQ step over the model's own blocks."""
    calib = calib_of(float_dir, 1)
    model = lowbit.load(float_dir)
    a = lowbit.quantize_model(model, 4, 64, method="gptq", calib=calib, inplace=False, progress=False)
    b = quantize_blocks(lowbit.load(float_dir), GPTQ(4, 64), calib, progress=False)
    for name, m in a.named_modules():
        if isinstance(m, lowbit.QuantLinear) and name != "lm_head":
            assert torch.equal(m.qweight, b.get_submodule(name).qweight), name
