"""Writing safetensors files: sharded as HF does, optionally with every tensor aligned in the file.

Reading goes through the `safetensors` library (memory-mapped). Writing is done here: the library's
save_file first copies every tensor into a bytes object, which doubles the memory of a shard, while this
writer streams each tensor's own buffer to the file. With `align`, every tensor's data starts on an
`align`-byte boundary of the file. The format forbids holes between tensors, so the gaps are filled by
uint8 tensors named PAD_PREFIX + index, which readers skip; the stock library loads such files unchanged.

Every file's metadata holds a CRC-32 of each tensor's bytes under CHECKSUM_KEY (a JSON object, name -> checksum):
safetensors itself has no integrity check, so bit rot in the data would otherwise load silently.
"""

import json
import struct
import zlib
from pathlib import Path

import torch

PAD_PREFIX = "__lowbit_pad__."
CHECKSUM_KEY = "lowbit.crc32"
DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
               torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64"}


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes in row-major order, as they lie in a safetensors file."""
    return zlib.crc32(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                      align: int | None = None) -> None:
    if align is not None and (align < 8 or align & (align - 1)):
        raise ValueError(f"align must be a power of two >= 8, got {align}")
    header, chunks, offset, checksums = {}, [], 0, {}
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        checksums[name] = tensor_crc32(t)
        gap = -offset % align if align else 0
        if gap:
            header[f"{PAD_PREFIX}{len(header)}"] = {"dtype": "U8", "shape": [gap],
                                                    "data_offsets": [offset, offset + gap]}
            chunks.append(bytes(gap))
            offset += gap
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        chunks.append(t.reshape(-1).view(torch.uint8).numpy())
        offset += nbytes
    header["__metadata__"] = {**(metadata or {}), CHECKSUM_KEY: json.dumps(checksums, separators=(",", ":"))}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # Data starts on a multiple of 8 (of align when given); trailing spaces in the header are allowed.
    encoded += b" " * (-(8 + len(encoded)) % (align or 8))
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for chunk in chunks:
                f.write(chunk)
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e  # e.g. a full disk: say which file


class ShardWriter:
    """Tensors added in order, written as shards of at most max_bytes: model.safetensors when one is
    enough, else model-0000i-of-0000n.safetensors plus model.safetensors.index.json. Only the current
    shard is held in memory."""

    def __init__(self, directory: Path, max_bytes: int, align: int | None = None, metadata: dict | None = None):
        self.directory, self.max_bytes, self.align, self.metadata = Path(directory), max_bytes, align, metadata
        self.pending, self.pending_bytes, self.shards, self.total = {}, 0, [], 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self.shards)}.safetensors"
        write_safetensors(path, self.pending, self.metadata, self.align)
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Writes what is left and names the shards; returns the file names."""
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.directory / "model.safetensors")
            return ["model.safetensors"]
        n, weight_map, names = len(self.shards), {}, []
        for i, (path, tensor_names) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.directory / name)
            names.append(name)
            weight_map |= {t: name for t in tensor_names}
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        return names
