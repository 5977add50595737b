"""Directories that appear only when complete: every checkpoint writer goes through atomic_directory."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(out: Path, force: bool = False):
    """Yields a temporary directory beside `out` that becomes `out` only if the block completes."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (use force to overwrite)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{out}: {parent} is a file, not a directory")
            break
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
