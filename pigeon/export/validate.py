"""Validation that blocks an export: the exported graph against the declaration and against PyTorch.

For each component: input/output names, order, dtypes and dimension names must equal the declaration
in `pigeon.specs`; then the artifact runs at the min, opt and max shapes and at one odd shape (batch 3),
and every output must be finite, have the declared shape, and lie within the component's tolerance of
PyTorch (or, for TensorRT engines, of ONNX Runtime). Errors are typed and name component, tensor, shape
point and the measured error.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from pigeon.config import PipelineConfig
from pigeon.export.errors import IONameError, NonFiniteError, ShapeError, ToleranceError
from pigeon.specs import ComponentSpec, TensorSpec, Tolerance, sample_inputs

ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int64": onnx.TensorProto.INT64}
ODD_POINT = {"batch": 3}
POINTS: dict[str, str | dict[str, int]] = {
    "min": "min",
    "opt": "opt",
    "max": "max",
    "odd": ODD_POINT,
}
RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def normalize_dim_names(spec: ComponentSpec, model: onnx.ModelProto) -> None:
    """Name every symbolic input/output dimension of the graph as the declaration does.

    The dynamo exporter names derived or automatic dimensions itself (`s53`, `seq + past_len`); the
    names are public API (Triton, TensorRT profiles, clients), so they are rewritten to the declared ones.
    """
    for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        declared = {t.name: t for t in tensors}
        for value in values:
            if value.name not in declared:
                continue
            for dim, want in zip(
                value.type.tensor_type.shape.dim, declared[value.name].shape, strict=False
            ):
                if isinstance(want, str):
                    dim.dim_param = want


def check_graph_io(spec: ComponentSpec, model: onnx.ModelProto) -> None:
    """Names, order, dtypes and dimensions of the graph's inputs and outputs equal the declaration."""
    for kind, values, tensors in (
        ("input", model.graph.input, spec.inputs),
        ("output", model.graph.output, spec.outputs),
    ):
        names = [v.name for v in values]
        want = [t.name for t in tensors]
        if names != want:
            raise IONameError(f"{spec.name}: graph {kind}s are {names}, declared {want}")
        for value, t in zip(values, tensors, strict=True):
            _check_value(spec.name, value, t)


def _check_value(component: str, value: onnx.ValueInfoProto, t: TensorSpec) -> None:
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type != ONNX_DTYPES[t.dtype]:
        got = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise IONameError(f"{component}.{t.name}: dtype {got}, declared {t.dtype}")
    dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
    if len(dims) != len(t.shape):
        raise ShapeError(f"{component}.{t.name}: rank {len(dims)} {dims}, declared {t.shape}")
    for got, want in zip(dims, t.shape, strict=True):
        if got != want:
            raise ShapeError(f"{component}.{t.name}: dimensions {dims}, declared {list(t.shape)}")


def compare(
    spec: ComponentSpec,
    tolerance: Tolerance,
    point: str,
    shape_values: dict[str, int],
    expected: dict[str, np.ndarray],
    actual: dict[str, np.ndarray],
    relative: dict[str, float] | None = None,
) -> dict[str, float]:
    """Check `actual` against `expected`; returns the max abs error (or mismatch share) per output.

    `relative`, when given, receives each float output's error relative to its own scale,
    ||actual - expected|| / ||expected|| (the mismatch share for integer outputs).
    """
    errors = {}
    for t in spec.outputs:
        where = f"{spec.name}.{t.name} at {point} {shape_values}"
        want_shape = spec.shape_of(t, shape_values)
        a, e = actual[t.name], expected[t.name]
        if a.shape != want_shape:
            raise ShapeError(f"{where}: shape {a.shape}, declared {want_shape}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise NonFiniteError(f"{where}: {bad} NaN/Inf values of {a.size}")
        if t.dtype == "int64":
            share = float((a != e).mean()) if a.size else 0.0
            if share > tolerance.max_mismatch:
                raise ToleranceError(
                    f"{where}: {share:.2%} of values differ (allowed {tolerance.max_mismatch:.2%})"
                )
            errors[t.name] = share
            if relative is not None:
                relative[t.name] = share
            continue
        diff = np.abs(a.astype(np.float64) - e.astype(np.float64))
        magnitude = np.abs(e.astype(np.float64))
        peak = float(magnitude.max()) if a.size else 0.0
        limit = tolerance.atol + tolerance.rtol * magnitude + tolerance.peak_rtol * peak
        if a.size and (diff > limit).any():
            i = np.unravel_index(int(np.argmax(diff - limit)), diff.shape)
            peak_part = f" + peak_rtol {tolerance.peak_rtol:g} x peak {peak:.3g}" * bool(
                tolerance.peak_rtol
            )
            raise ToleranceError(
                f"{where}: max abs error {diff.max():.3g} exceeds atol {tolerance.atol:g} + rtol "
                f"{tolerance.rtol:g}{peak_part} (worst at {tuple(int(x) for x in i)}: got "
                f"{a[i]:.6g}, expected {e[i]:.6g})"
            )
        norm = float(np.sqrt((magnitude**2).sum()))
        rel = float(np.sqrt((diff**2).sum())) / norm if norm > 0 else float(diff.max(initial=0.0))
        if tolerance.rms_rtol is not None and rel > tolerance.rms_rtol:
            raise ToleranceError(
                f"{where}: relative error ||got - expected|| / ||expected|| = {rel:.3g} exceeds "
                f"rms_rtol {tolerance.rms_rtol:g}"
            )
        if relative is not None:
            relative[t.name] = rel
        errors[t.name] = float(diff.max()) if a.size else 0.0
    return errors


def validate(
    spec: ComponentSpec,
    config: PipelineConfig,
    precision: str,
    run_reference: RunFn,
    run_artifact: RunFn,
    points: dict[str, str | dict[str, int]] | None = None,
    seed: int = 0,
    inputs: Callable[[str | dict[str, int], int], dict[str, np.ndarray]] | None = None,
    relative: dict[str, dict[str, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """Run both at every shape point; returns {point: {output: max error}} or raises.

    `inputs(point, seed)` replaces the seeded `sample_inputs` (statically quantized files are checked
    on held-out real inputs); `relative`, when given, receives {point: {output: relative error}}.
    """
    tolerance = spec.tolerance[precision]
    measured = {}
    for name, point in (points or POINTS).items():
        feeds = inputs(point, seed) if inputs else sample_inputs(spec, config, point, seed=seed)
        values = spec.point(point)
        rel: dict[str, float] | None = {} if relative is not None else None
        measured[name] = compare(
            spec, tolerance, name, values, run_reference(feeds), run_artifact(feeds), rel
        )
        if relative is not None:
            relative[name] = rel
    return measured
