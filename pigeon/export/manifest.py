"""The artifact manifest (`manifest.json`), read without torch so serving can verify what it loads."""

from __future__ import annotations

import json
from pathlib import Path

from pigeon.export.errors import ManifestError
from pigeon.files import sha256_file

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def read_manifest(artifacts: str | Path, verify: bool = True) -> dict:
    """The manifest of an artifact folder, with every file checked against its SHA-256."""
    artifacts = Path(artifacts)
    path = artifacts / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: missing; not a Pigeon artifact folder")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("_format") != MANIFEST_FORMAT or "components" not in manifest:
        raise ManifestError(
            f"{path}: not a supported manifest (format {manifest.get('_format')!r})"
        )
    if verify:
        for name, entry in manifest["components"].items():
            for file, digest in entry["files"].items():
                full = artifacts / name / file
                if not full.is_file():
                    raise ManifestError(f"{full}: missing from the artifacts")
                if sha256_file(full) != digest:
                    raise ManifestError(
                        f"{full}: SHA-256 differs from {MANIFEST}; refusing to load"
                    )
    return manifest
