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
    """Move `staging` to `target`, replacing what was there (the old folder is removed afterwards).
    If the second rename fails, the old folder is put back."""
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        target.rename(old)
        try:
            staging.rename(target)
        except BaseException:
            old.rename(target)
            raise
        shutil.rmtree(old)
    else:
        staging.rename(target)


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` beside `path`, then rename it into place: readers never see half a file. A failed
    write (a full disk) leaves `path` as it was and no temporary file behind; concurrent writers of
    one path each use their own temporary file (the last rename wins)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def hash_mismatch(root: Path, files: dict[str, str], index: str) -> str | None:
    """The first file under `root` that is missing or whose SHA-256 differs from `files` (relative
    path -> digest, as recorded in `index`), as a message naming it; None when all match."""
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            return f"{path}: missing (listed in {index})"
        if sha256_file(path) != digest:
            return f"{path}: SHA-256 differs from {index}; refusing to load an altered file"
    return None
