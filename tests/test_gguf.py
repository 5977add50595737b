"""GGUF input: weights equal gguf's own dequantizer, tokenizer equals transformers' GGUF conversion."""

import gguf
import numpy as np
import pytest
import torch

from lowbit import LlamaForCausalLM
from lowbit.io.fetch import cache_dir, fetch
from lowbit.io.gguf import GGUFFile, hf_name, unpermute_rows
from lowbit.io.hf import CheckpointError


@pytest.fixture(scope="session")
def gguf_path():
    fetch("smollm2", quiet=True)
    return cache_dir() / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_tensors_match_gguf_dequantizer(gguf_path):
    file = GGUFFile(gguf_path)
    ours = file.tensors()
    reader = gguf.GGUFReader(str(gguf_path))
    checked = 0
    for t in reader.tensors:
        if not (t.name.startswith(("blk.0.", "blk.29.")) or t.name == "token_embd.weight"):
            continue
        raw = gguf.quants.dequantize(t.data, t.tensor_type)
        expected = torch.from_numpy(np.array(raw, dtype=np.float32)).reshape(tuple(reversed(t.shape.tolist())))
        if t.name.endswith("attn_q.weight"):
            expected = unpermute_rows(expected, 9)
        elif t.name.endswith("attn_k.weight"):
            expected = unpermute_rows(expected, 3)
        assert torch.equal(ours[hf_name(t.name)], expected), t.name
        checked += 1
    assert checked == 19  # embedding + 9 tensors in each of two blocks


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(6 * 8, 5)
    n_heads = 6
    # llama.cpp's convert_hf_to_gguf permutation of q/k rows
    permuted = w.reshape(n_heads, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(unpermute_rows(permuted, n_heads), w)


def test_model_from_gguf_matches_converted_directory(gguf_path, smollm2):
    direct = LlamaForCausalLM.from_pretrained(gguf_path)
    ids = torch.tensor([smollm2.tokenizer.encode("GGUF files hold quantized weights.")])
    with torch.no_grad():
        assert torch.equal(direct(ids), smollm2(ids))


def test_tokenizer_matches_transformers_gguf_conversion(gguf_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours = GGUFFile(gguf_path).tokenizer()
    for text in ["Hello, world!", "Numbers 1234567 and 3.14159", "  leading spaces\tand\ttabs\n\nnewlines",
                 "naïve café 日本語 😀", "<|im_start|>user\nHi<|im_end|>", "don't won't I'm we'll"]:
        assert ours.encode(text) == ref.encode(text), text
    assert ours.chat_template == ref.chat_template


def test_bad_gguf_files(tmp_path, gguf_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="bad.gguf"):
        GGUFFile(bad)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_path.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        GGUFFile(truncated).tensors()
