"""Calibration and evaluation text that exists offline on any machine with Python.

Source: the Python Language Reference topics shipped with every CPython in `pydoc_data.topics` (real
English prose with code examples, written by the Python documentation authors, PSF license). The topics
are sorted by name and split alternately: even positions for calibration, odd for evaluation, so the two
sets never share a passage.
"""

import torch

SPLITS = ("calibration", "evaluation")


def texts(split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from pydoc_data.topics import topics
    names = sorted(topics)
    return [topics[name] for i, name in enumerate(names) if i % 2 == SPLITS.index(split)]


def token_stream(tokenizer, split: str) -> torch.Tensor:
    """All texts of the split, tokenized and concatenated: [T] int64."""
    ids = []
    for text in texts(split):
        ids += tokenizer.encode(text + "\n\n", add_special_tokens=False)
    return torch.tensor(ids, dtype=torch.long)


def calibration_tokens(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                       text: str | None = None) -> torch.Tensor:
    """[n_samples, seq_len] windows drawn at random (seeded) from the calibration split, or from `text`."""
    if text is None:
        stream = token_stream(tokenizer, "calibration")
    else:
        stream = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    if len(stream) <= seq_len:
        raise ValueError(f"calibration text has {len(stream)} tokens, fewer than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (n_samples,), generator=g)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def evaluation_tokens(tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """The evaluation split as one sequence [1, T] (optionally its first max_tokens tokens)."""
    stream = token_stream(tokenizer, "evaluation")
    return stream[:max_tokens].unsqueeze(0) if max_tokens else stream.unsqueeze(0)
