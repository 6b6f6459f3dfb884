"""Runners: one interface, `run(component, feeds) -> outputs`, with spec-named NumPy dicts.

`TorchRunner` runs the export wrappers of `pigeon.models.export_wrappers`, so the PyTorch path computes
exactly the function that ONNX Runtime, TensorRT and Triton runners compute from the exported files.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from pigeon.models.export_wrappers import export_module
from pigeon.models.pigeon import PigeonModel
from pigeon.specs import ComponentSpec, component_specs


class Runner(Protocol):
    name: str

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TorchRunner:
    name = "pytorch"

    def __init__(self, model: PigeonModel, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.specs: dict[str, ComponentSpec] = component_specs(model.config)
        self.modules = {name: export_module(model, name) for name in self.specs}

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        missing = [n for n in spec.input_names if n not in feeds]
        if missing:
            raise KeyError(f"{component}: missing input {missing[0]!r}")
        args = [
            torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
            for n in spec.input_names
        ]
        with torch.inference_mode():
            outputs = self.modules[component](*args)
        return {n: o.cpu().numpy() for n, o in zip(spec.output_names, outputs, strict=True)}
