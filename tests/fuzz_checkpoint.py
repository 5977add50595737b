"""Fuzz a lowbit checkpoint in a child process (run by tests/test_checkpoint.py, which limits its memory and
time): random corruptions of model.safetensors (header bytes, data bytes, truncation), each loaded with and
without checksum verification. Prints `case <i> <kind>` to stderr before each case, and the outcome counts as
JSON on stdout at the end. Any outcome other than a CheckpointError, a model equal to the original or one with
different but finite logits raises (exit status 1); a crash or hang shows as the parent's timeout or signal.

    python tests/fuzz_checkpoint.py CHECKPOINT_DIR ITERATIONS [SEED]
"""

import json
import random
import struct
import sys
from pathlib import Path

import torch

import lowbit
from lowbit.io.hf import CheckpointError

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))


def logits(model):
    with torch.no_grad():
        return model(IDS)


def main(ckpt: Path, iterations: int, seed: int = 0) -> dict:
    st = ckpt / "model.safetensors"
    original = st.read_bytes()
    expected = logits(lowbit.load_quantized(ckpt, verify=True))
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    rng = random.Random(seed)
    outcomes = {"rejected": 0, "equal": 0, "different, finite": 0, "data corruptions caught by checksum": 0}
    try:
        for i in range(iterations):
            raw = bytearray(original)
            kind = rng.choice(["header", "data", "truncate"])
            if kind == "truncate":
                raw = raw[:rng.randrange(len(raw))]
            else:
                lo, hi = (0, header_end) if kind == "header" else (header_end, len(raw))
                for _ in range(rng.randint(1, 8)):
                    raw[rng.randrange(lo, hi)] = rng.randrange(256)
            print(f"case {i} {kind}", file=sys.stderr, flush=True)
            st.write_bytes(bytes(raw))
            for verify in (False, True):
                try:
                    loaded = lowbit.load_quantized(ckpt, verify=verify)
                except CheckpointError as e:
                    outcomes["rejected"] += 1
                    if verify and "is corrupted: CRC-32" in str(e):
                        outcomes["data corruptions caught by checksum"] += 1
                    continue
                buffers = [b for n, b in loaded.named_buffers() if n.endswith(("scales", "zeros"))]
                assert all(torch.isfinite(t).all() for t in buffers + list(loaded.parameters())), "non-finite tensor"
                got = logits(loaded)
                assert got.shape == (2, 24, 512) and torch.isfinite(got).all(), "non-finite logits"
                assert not (verify and kind == "data" and bytes(raw) != original), "verify missed a data corruption"
                outcomes["equal" if torch.equal(got, expected) else "different, finite"] += 1
    finally:
        st.write_bytes(original)
    return outcomes


if __name__ == "__main__":
    import warnings
    warnings.simplefilter("ignore")  # "no checksums to verify" when a header corruption hides them
    counts = main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    print(json.dumps(counts))
