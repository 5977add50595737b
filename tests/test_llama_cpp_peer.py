"""benchmarks/llama_cpp_peer.py: the tokenizer and random model it builds (no llama.cpp needed), and, where
llama-cpp-python and llama.cpp's source are present, that llama.cpp computes what lowbit computes on its files."""

import os
import sys
from pathlib import Path

import pytest
import torch

import lowbit

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import llama_cpp_peer as peer  # noqa: E402

sentencepiece = pytest.importorskip("sentencepiece")

BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = ["▁", "h", "e", "l", "o", "▁h", "ll", "▁he", "llo", "▁hello"]
SMALL_SHAPE = peer.TINYLLAMA_SHAPE | {"vocab_size": 3 + 256 + len(PIECES), "hidden_size": 64,
                                      "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "num_key_value_heads": 2}


def small_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + BYTES + PIECES
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(PIECES))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    return tokens, scores, types


def write_vocab_gguf(path: Path) -> Path:
    """A vocabulary-only GGUF like the ones llama.cpp ships for its tokenizer tests."""
    import gguf
    tokens, scores, types = small_vocab()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


def test_sentencepiece_model_is_read_back_by_sentencepiece(tmp_path):
    tokens, scores, types = small_vocab()
    (tmp_path / "tokenizer.model").write_bytes(peer.sentencepiece_model(tokens, scores, types))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.vocab_size() == len(tokens)
    assert [sp.id_to_piece(i) for i in range(len(tokens))] == tokens
    assert [sp.get_score(i) for i in range(len(tokens))] == scores
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.is_byte(3 + ord("x")) and sp.is_control(1) and sp.is_unknown(0)
    hello = 3 + 256 + PIECES.index("▁hello")
    # BPE merges by score, a dummy prefix marks the first word, bytes outside the vocabulary fall back.
    assert sp.encode("hello") == [hello]
    assert sp.encode("hello hello") == [hello, hello]
    assert sp.encode("hex") == [3 + 256 + PIECES.index("▁he"), 3 + ord("x")]
    assert sp.decode(sp.encode("hello  wörld")) == "hello  wörld"


def test_random_llama_dir_loads_in_lowbit(tmp_path):
    vocab = write_vocab_gguf(tmp_path / "vocab.gguf")
    out = peer.random_llama_dir(tmp_path / "model", vocab, SMALL_SHAPE, seed=1)
    model = lowbit.LlamaForCausalLM.from_pretrained(out)
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.tie_word_embeddings) == (3 + 256 + len(PIECES), 64, 160, 2, 4, 2, False)
    hello = 3 + 256 + PIECES.index("▁hello")
    assert model.tokenizer.encode("hello hello") == [1, hello, hello]  # with <s>, as LLaMA's tokenizer
    w = model.layers[0].ffn.w_down.weight
    assert 0.018 < w.std().item() < 0.022 and not torch.equal(model.lm_head.weight, model.embed.weight)
    with torch.no_grad():
        logits = model(torch.tensor([[1, hello, 200, 7]]))
    assert logits.shape == (1, 4, c.vocab_size) and torch.isfinite(logits).all()
    again = peer.random_llama_dir(tmp_path / "again", vocab, SMALL_SHAPE, seed=1)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_bad_requests_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown GGUF type 'q3_k'"):
        peer.gguf_file(tmp_path, "q3_k", tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        peer.gguf_file(tmp_path, "f32", tmp_path)
    with pytest.raises(ValueError, match=r"token ids must be a non-empty list in \[0, 10\)"):
        peer.check_ids([3, 10], 10, "prompt_ids")
    with pytest.raises(ValueError, match="new_tokens must be at least 2"):
        peer.llama_cpp_decode(tmp_path / "x.gguf", [1, 2], 1, threads=1)


def llama_cpp_source_or_skip() -> Path:
    """$LLAMA_CPP_SOURCE, or the source llama_cpp_peer.py extracted for the installed llama-cpp-python."""
    if "LLAMA_CPP_SOURCE" in os.environ:
        return peer.llama_cpp_source(Path("."))
    pytest.importorskip("llama_cpp")
    cached = peer.cache_dir() / "llama_cpp" / f"llama.cpp-{peer.import_llama_cpp().__version__}"
    if not (cached / peer.CONVERTER).is_file():
        pytest.skip("llama.cpp's converter is not here: run benchmarks/llama_cpp_peer.py once, or set LLAMA_CPP_SOURCE")
    return cached


def test_llama_tokenizer_encodes_llama_cpp_test_strings(tmp_path):
    vocab = llama_cpp_source_or_skip() / peer.LLAMA_SPM_VOCAB
    peer.write_llama_tokenizer(tmp_path, vocab)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    texts = Path(f"{vocab}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = Path(f"{vocab}.out").read_text().split("\n")
    assert sp.vocab_size() == 32000 and len(texts) > 40
    for text, ids in zip(texts, expected):
        assert sp.encode(text) == [int(i) for i in ids.split()], text


@pytest.mark.slow
def test_llama_cpp_computes_what_lowbit_computes(tmp_path):
    pytest.importorskip("llama_cpp")
    source = llama_cpp_source_or_skip()
    model_dir = peer.random_llama_dir(tmp_path / "model", source / peer.LLAMA_SPM_VOCAB,
                                      SMALL_SHAPE | {"vocab_size": 32000}, std=0.1)
    f32 = peer.gguf_file(model_dir, "f32", tmp_path / "cache", source)
    assert peer.gguf_file(model_dir, "f32", tmp_path / "cache", source) == f32  # cached
    model = lowbit.LlamaForCausalLM.from_pretrained(model_dir)
    prompt = model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    forced = peer.llama_cpp_decode(f32, prompt, 12, threads=1)
    assert forced["new_tokens"] == 12 and forced["decode_tok_s"] > 0 and forced["prefill_tok_s"] > 0
    ids = list(prompt)
    with torch.no_grad():  # lowbit's greedy tokens from the plain forward over the whole sequence
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert forced["tokens"] == ids[len(prompt):]
    tokens = torch.randint(3, 32000, (2 * 64 + 1,), generator=torch.Generator().manual_seed(0))
    ours = lowbit.eval.perplexity(model, tokens, seq_len=64, progress=False)
    assert peer.llama_cpp_perplexity(f32, tokens.tolist(), threads=1, seq_len=64) == pytest.approx(ours, rel=1e-3)
    q4 = peer.gguf_file(model_dir, "q4_0", tmp_path / "cache", source)
    summary = peer.gguf_summary(q4)
    assert 4.5 <= summary["bits_per_weight"] < 9 and summary["file_MB"] < peer.gguf_summary(f32)["file_MB"] / 3
    assert peer.llama_cpp_prefill(q4, tokens[:64].tolist(), threads=1)["prefill_tok_s"] > 0
