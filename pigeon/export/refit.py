"""A LoRA version's personalizer engine by refitting the base version's, not rebuilding it.

`pigeon deploy --lora` publishes a version whose personalizer graph is the base version's with other
LoRA weights (`publish.publish_lora` refuses an adapter of another rank or other target modules, so
every weight keeps its shape). On the GPU target, TensorRT's refit API then swaps those weights into
the base engine in seconds instead of a full build:

    plan = refit_plan(base_onnx, lora_onnx)        # the initializers whose values differ, checked
    engine = refitted_engine(base_plan, plan, ...)  # trt.Refitter.set_named_weights, per name

The plan is computed on any machine (it reads the two ONNX files); the refit itself needs TensorRT and
a GPU, and an engine built refittable (`BuilderFlag.REFIT`; `tensorrt.build_engine` sets it for the
personalizer). Refitted engines are cached under a key of the base engine's key and the new ONNX
file's SHA-256, with a record of what was refitted beside them (`<key>.json`), so a version published
twice, or rolled back and forth, is refitted once and its ONNX files are not read again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pigeon.export.errors import ExportError
from pigeon.files import sha256_file, write_atomic

REFITTABLE = ("personalizer",)  # the components a LoRA version changes


@dataclass
class RefitPlan:
    """The weights that differ between two ONNX files of one graph: initializer name -> new value."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    unchanged: int = 0  # initializers equal in both files

    def __len__(self) -> int:
        return len(self.weights)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))  # external data too: a large personalizer keeps it beside
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def refit_plan(base_onnx: str | Path, new_onnx: str | Path) -> RefitPlan:
    """What a refit from `base_onnx`'s engine to `new_onnx` sets. Refused by name: an initializer
    that one file has and the other has not (the graph changed: build a new engine), or one whose
    shape or dtype changed (a LoRA of another rank)."""
    base, new = _initializers(Path(base_onnx)), _initializers(Path(new_onnx))
    missing, extra = sorted(set(base) - set(new)), sorted(set(new) - set(base))
    if missing or extra:
        which = f"missing {missing[:3]}" if missing else f"new {extra[:3]}"
        raise ExportError(
            f"{new_onnx}: not the graph of {base_onnx} ({which} initializers); a refit only "
            "changes weights, so build a new engine"
        )
    plan = RefitPlan()
    for name, old in base.items():
        value = new[name]
        if value.shape != old.shape or value.dtype != old.dtype:
            raise ExportError(
                f"{new_onnx}: initializer {name!r} is {value.dtype}{list(value.shape)}, the base "
                f"engine's is {old.dtype}{list(old.shape)}; a refit keeps every weight's shape"
            )
        if np.array_equal(value, old):
            plan.unchanged += 1
        else:
            plan.weights[name] = value
    if not plan.weights:
        raise ExportError(f"{new_onnx}: every weight equals {base_onnx}'s; nothing to refit")
    return plan


def refit_key(base_engine_key: str, new_onnx_sha256: str) -> str:
    """The cache key of a refitted engine: the engine it starts from and the weights it takes."""
    record = json.dumps({"base_engine": base_engine_key, "onnx": new_onnx_sha256}, sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()


def refitted_engine(
    base_engine: Path, base_key: str, base_onnx: Path, new_onnx: Path, cache: Path
) -> tuple[Path, dict]:
    """The base engine with `new_onnx`'s changed weights refitted in (TensorRT, GPU), from the cache
    when refitted before. Returns (engine path, record)."""
    from pigeon.inference.runners import import_tensorrt

    new_sha = sha256_file(new_onnx)
    key = refit_key(base_key, new_sha)
    cached, described = cache / f"{key}.plan", cache / f"{key}.json"
    if cached.exists() and described.exists():  # refitted before: no second comparison
        return cached, {**json.loads(described.read_text()), "cache_hit": True}
    plan = refit_plan(base_onnx, new_onnx)
    record = {
        "refit_from": base_key,
        "key": key,
        "onnx_sha256": new_sha,
        "weights_refitted": sorted(plan.weights),
    }
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(base_engine.read_bytes())
    if engine is None or not engine.refittable:
        raise ExportError(
            f"{base_engine}: not a refittable engine; build it with BuilderFlag.REFIT "
            "(pigeon export tensorrt does for the personalizer)"
        )
    refitter = trt.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    arrays = {n: np.ascontiguousarray(v) for n, v in plan.weights.items()}  # alive until the refit
    for name, value in arrays.items():
        if name not in known:
            raise ExportError(
                f"{base_engine}: weight {name!r} is not refittable in this engine (TensorRT "
                "folded it into another); build a new engine"
            )
        refitter.set_named_weights(name, trt.Weights(value))
    missing = refitter.get_missing_weights()
    if missing or not refitter.refit_cuda_engine():
        raise ExportError(f"{base_engine}: the refit failed (weights still missing: {missing})")
    write_atomic(cached, bytes(engine.serialize()))
    write_atomic(described, json.dumps(record, indent=2) + "\n")
    return cached, {**record, "cache_hit": False}
