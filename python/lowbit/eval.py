"""Quality of a (quantized) model against float: perplexity."""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(model, tokens: torch.Tensor, seq_len: int = 512, progress: bool = True) -> float:
    """exp(mean next-token NLL) over tokens [1, T] (or [T]) cut into windows of seq_len (no overlap)."""
    stream = tokens.reshape(-1)
    n_windows = (len(stream) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {len(stream)}")
    total, count = 0.0, 0
    for w in tqdm(range(n_windows), desc="perplexity", disable=not progress):
        window = stream[w * seq_len:(w + 1) * seq_len + 1].unsqueeze(0).to(model.device)
        logits = model(window[:, :-1])
        total += F.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum").item()
        count += seq_len
    return math.exp(total / count)
