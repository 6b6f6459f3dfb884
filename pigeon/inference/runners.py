"""Runners: one interface, `run(component, feeds) -> outputs`, with spec-named NumPy dicts.

    TorchRunner   the export wrappers of `pigeon.models.export_wrappers` (the reference)
    OrtRunner     ONNX files from `pigeon export onnx`, on ONNX Runtime (CPU, or CUDA/TensorRT providers)

Both compute the same function, so `PigeonPipeline` and the Triton models swap them freely. This module
imports neither torch nor onnxruntime until a runner is built: the Triton Python models stay light.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pigeon.specs import ComponentSpec, component_specs


class Runner(Protocol):
    name: str

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _ordered(spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    missing = [n for n in spec.input_names if n not in feeds]
    if missing:
        raise KeyError(f"{spec.name}: missing input {missing[0]!r}")
    return [np.ascontiguousarray(feeds[n]) for n in spec.input_names]


class TorchRunner:
    name = "pytorch"

    def __init__(self, model: Any, device: str = "cpu") -> None:
        import torch

        from pigeon.models.export_wrappers import export_module

        self.torch = torch
        self.model = model.eval().to(device)
        self.device = device
        self.specs = component_specs(model.config)
        self.modules = {name: export_module(model, name) for name in self.specs}

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        args = [self.torch.from_numpy(a).to(self.device) for a in _ordered(spec, feeds)]
        with self.torch.inference_mode():
            outputs = self.modules[component](*args)
        return {n: o.cpu().numpy() for n, o in zip(spec.output_names, outputs, strict=True)}


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime session settings (a serving config, not code edits)."""

    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 0
    graph_optimization: str = "all"  # disable | basic | extended | all
    # Idle intra-op threads spin by default; with one session per component, the spinning threads of
    # the session that just ran steal the cores of the next one (measured: prefill 23 ms alone, 130 ms
    # inside the pipeline). Off unless a component runs alone on its cores.
    allow_spinning: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


class OrtRunner:
    name = "onnxruntime"

    def __init__(self, sessions: dict[str, Any], specs: dict[str, ComponentSpec]) -> None:
        self.sessions = sessions
        self.specs = specs

    @classmethod
    def from_files(
        cls, files: dict[str, str | Path], config: Any, options: OrtOptions = OrtOptions()
    ) -> OrtRunner:
        import onnxruntime as ort

        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = levels[options.graph_optimization]
        so.log_severity_level = 3
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if options.allow_spinning else "0"
        )
        sessions = {
            name: ort.InferenceSession(str(path), so, providers=list(options.providers))
            for name, path in files.items()
        }
        return cls(sessions, component_specs(config))

    @classmethod
    def from_artifacts(
        cls, artifacts: str | Path, config: Any, options: OrtOptions = OrtOptions()
    ) -> OrtRunner:
        """Load every component of an artifact folder after checking its files against the manifest."""
        from pigeon.export.manifest import read_manifest

        artifacts = Path(artifacts)
        manifest = read_manifest(artifacts)
        files = {n: artifacts / e["file"] for n, e in manifest["components"].items()}
        return cls.from_files(files, config, options)

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        if component not in self.sessions:
            raise KeyError(f"no ONNX file for component {component!r}")
        outputs = self.sessions[component].run(
            spec.output_names, dict(zip(spec.input_names, _ordered(spec, feeds), strict=True))
        )
        return dict(zip(spec.output_names, outputs, strict=True))
