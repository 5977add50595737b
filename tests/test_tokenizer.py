"""SentencePiece tokenizer.model directories (LLaMA-2 style)."""

import json

import pytest
import torch

import lowbit
from conftest import tiny_hf_llama

sentencepiece = pytest.importorskip("sentencepiece")


def test_sentencepiece_tokenizer_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lowbit.data.texts("calibration")[:20]))
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=512, model_type="bpe", bos_id=1, eos_id=2, unk_id=0,
                                             pad_id=-1)
    tiny_hf_llama(tmp_path)  # vocab_size 512: ids from the tokenizer are valid inputs
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
         "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"}))
    model = lowbit.LlamaForCausalLM.from_pretrained(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    text = "Assignment statements are used to (re)bind names to values."
    ids = model.tokenizer.encode(text)
    assert ids == [1] + sp.encode(text)
    assert model.tokenizer.decode(ids) == text
    assert model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    with torch.no_grad():
        assert model(torch.tensor([ids])).shape == (1, len(ids), 512)
