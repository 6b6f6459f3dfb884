"""The reliability suite's shared fixtures: one validated ONNX export of the tiny checkpoint and one
server over it, shared by every file of the package."""

from __future__ import annotations

import pytest

from pigeon.serving.server import TritonServer

from .support import ADMIN, BLS_UNET, STARTUP_S, make_repository


@pytest.fixture(scope="package")
def artifacts(tmp_path_factory, checkpoint_dir):
    """One validated ONNX export of the tiny checkpoint; every repository below publishes it."""
    from pigeon.export.artifacts import export_onnx

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_onnx(checkpoint_dir, out)
    return out


@pytest.fixture(scope="package")
def served(tmp_path_factory, checkpoint_dir, artifacts):
    """The default serving config (4 instances of each loop model), admin APIs behind a key."""
    repo = make_repository(
        tmp_path_factory.mktemp("served"), checkpoint_dir, artifacts, serving=BLS_UNET
    )
    with TritonServer(repo, admin_header=ADMIN, startup_timeout_s=STARTUP_S) as server:
        yield server
