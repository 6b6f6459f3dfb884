"""File helpers shared by checkpoints, artifacts and published model versions (torch-free).

Everything that is published is first written into a sibling staging folder, then renamed into place,
so a reader sees the old version or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def staging_dir(target: Path) -> Path:
    """A new empty folder beside `target` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    return staging


def replace_dir(staging: Path, target: Path) -> None:
    """Move `staging` to `target`, replacing what was there (the old folder is removed afterwards)."""
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
