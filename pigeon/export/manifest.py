"""The artifact manifest (`manifest.json`), read without torch so serving can verify what it loads."""

from __future__ import annotations

import json
from pathlib import Path

from pigeon.export.errors import ManifestError
from pigeon.files import hash_mismatch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1

# The precisions an artifact folder's ONNX files come in: floating point (pigeon.export.onnx_export)
# and quantized (pigeon.export.quantize); declared here, without torch, for the CLI's choices too
FLOAT_PRECISIONS = ("fp32", "fp16")
QUANTIZED_PRECISIONS = ("int8", "mixed")
PRECISIONS = FLOAT_PRECISIONS + QUANTIZED_PRECISIONS


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
            problem = hash_mismatch(artifacts / name, entry["files"], MANIFEST)
            if problem:
                raise ManifestError(problem)
    return manifest
