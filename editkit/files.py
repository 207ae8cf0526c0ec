"""Files the project writes and reads: atomic writes, hashes, slugs.

Every file the project writes goes through :func:`atomic_path`, so an interrupted run never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

# Suffixes of pickle-based checkpoints: never loaded (unpickling can run code); exports are safetensors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The writer creates the temporary file itself, so it gets the usual permissions (umask), not 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def slug(text: str) -> str:
    """A file-name-safe form of a word or token: "[I]" → "I", "ice-cream" → "ice_cream"."""
    return re.sub(r"\W", "_", text).strip("_") or "token"
