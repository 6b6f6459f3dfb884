"""ONNX -> TensorRT engines, with profiles from the declarations and a keyed engine cache.

TensorRT is imported lazily: it exists on the target GPU (the NVIDIA Triton and TensorRT containers),
not on the CPU development machines, where `pigeon export tensorrt` stops with a clear message. The key,
profile and build-record logic below has no TensorRT dependency and is tested everywhere.

An engine is reused only when its key matches: SHA-256 over the ONNX file hash, the precision, the
optimisation profile, the TensorRT version and the GPU's compute capability. Each engine has a
`build.json` beside it saying how it was built. An engine is validated against ONNX Runtime before it
is written into the artifact folder.

    ART/tensorrt/<component>/engine.plan, build.json
    CACHE/<key>.plan, <key>.json, timing.cache

The personalizer's engine is built refittable: a LoRA version (`pigeon deploy --lora`) gets the base
version's engine with its LoRA weights refitted in (`pigeon.export.refit`), not a new build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from pigeon.export.errors import ExportError
from pigeon.export.manifest import read_manifest
from pigeon.export.refit import REFITTABLE, refitted_engine
from pigeon.files import replace_dir, sha256_file, staging_dir, write_atomic
from pigeon.inference.runners import TrtRunner, import_tensorrt
from pigeon.specs import ComponentSpec, component_specs

log = logging.getLogger(__name__)
ENGINE_PRECISIONS = ("fp32", "fp16")
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def trt_profile(spec: ComponentSpec) -> Profile:
    """Input name -> (min, opt, max) shapes, from the declared ranges of every symbol."""
    points = [spec.point(p) for p in ("min", "opt", "max")]
    return {t.name: tuple(spec.shape_of(t, v) for v in points) for t in spec.inputs}


def engine_key(
    onnx_sha256: str,
    precision: str,
    profile: Profile,
    trt_version: str,
    compute_capability: tuple[int, int],
    refittable: bool = False,
) -> str:
    """What an engine depends on; any change means a rebuild, never a stale engine."""
    record = json.dumps(
        {
            "onnx": onnx_sha256,
            "precision": precision,
            "profile": {k: [list(s) for s in v] for k, v in sorted(profile.items())},
            "tensorrt": trt_version,
            "sm": list(compute_capability),
            "refit": refittable,
        },
        sort_keys=True,
    )
    return hashlib.sha256(record.encode()).hexdigest()


def build_record(
    component: str,
    key: str,
    onnx_sha256: str,
    precision: str,
    profile: Profile,
    trt_version: str,
    compute_capability: tuple[int, int],
    gpu_name: str,
    build_s: float,
) -> dict:
    return {
        "component": component,
        "key": key,
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profile": {
            k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in profile.items()
        },
        "tensorrt": trt_version,
        "compute_capability": list(compute_capability),
        "gpu": gpu_name,
        "build_s": round(build_s, 2),
    }


def gpu_identity() -> tuple[tuple[int, int], str]:
    """(compute capability, name) of GPU 0, from nvidia-smi (no torch needed in the container)."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ExportError(
            "no CUDA device (nvidia-smi failed): TensorRT engines are built on the "
            "GPU that serves them"
        ) from exc
    cap, name = (part.strip() for part in out.splitlines()[0].split(",", 1))
    major, minor = cap.split(".")
    return (int(major), int(minor)), name


def build_engine(onnx_path: Path, spec: ComponentSpec, precision: str, timing_cache: Path) -> bytes:
    """Parse the ONNX file, add the declared profile, build a serialized engine."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{spec.name}: TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if spec.name in REFITTABLE:  # a LoRA version refits its weights (pigeon.export.refit)
        config.set_flag(trt.BuilderFlag.REFIT)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in trt_profile(spec).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{spec.name}: TensorRT failed to build an engine from {onnx_path}")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def cached_engine(
    onnx_path: Path,
    spec: ComponentSpec,
    precision: str,
    cache: Path,
    trt_version: str,
    capability: tuple[int, int],
    gpu_name: str,
) -> tuple[Path, dict]:
    """The engine for this ONNX file, precision, profile, TensorRT and GPU: from the cache when its
    key matches, else built and cached. Returns (engine path, build record)."""
    start = time.perf_counter()
    onnx_sha = sha256_file(onnx_path)
    profile = trt_profile(spec)
    key = engine_key(onnx_sha, precision, profile, trt_version, capability, spec.name in REFITTABLE)
    cached = cache / f"{key}.plan"
    if cached.exists():
        log.info("%s: engine cache hit %s", spec.name, key[:12])
    else:
        write_atomic(cached, build_engine(onnx_path, spec, precision, cache / "timing.cache"))
    return cached, build_record(
        spec.name,
        key,
        onnx_sha,
        precision,
        profile,
        trt_version,
        capability,
        gpu_name,
        time.perf_counter() - start,
    )


def export_tensorrt(
    artifacts: str | Path, *, precision: str = "fp16", cache_dir: str | Path | None = None
) -> dict[str, dict]:
    """Build (or reuse from the cache) one engine per component, validate each against ONNX Runtime,
    then write them under ART/tensorrt/ atomically. Returns the build records."""
    from pigeon.checkpoint import load_config
    from pigeon.export.validate import validate
    from pigeon.inference.runners import OrtRunner

    if precision not in ENGINE_PRECISIONS:
        raise ExportError(f"precision={precision!r} is not one of {list(ENGINE_PRECISIONS)}")
    trt = import_tensorrt()
    capability, gpu_name = gpu_identity()
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    config = load_config(manifest["checkpoint"])
    specs = component_specs(config)
    cache = Path(cache_dir or artifacts / ".engine-cache")
    cache.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(artifacts / "tensorrt")
    records = {}
    try:
        engines = {}
        for name, entry in manifest["components"].items():
            cached, record = cached_engine(
                artifacts / entry["file"],
                specs[name],
                precision,
                cache,
                trt.__version__,
                capability,
                gpu_name,
            )
            (staging / name).mkdir()
            shutil.copyfile(cached, staging / name / "engine.plan")
            (staging / name / "build.json").write_text(json.dumps(record, indent=2) + "\n")
            engines[name] = staging / name / "engine.plan"
            records[name] = record
        reference = OrtRunner.from_artifacts(artifacts, config)
        engine_runner = TrtRunner(engines, config)
        for name in engines:
            records[name]["max_error"] = validate(
                specs[name],
                config,
                precision,
                lambda f, n=name: reference.run(n, f),
                lambda f, n=name: engine_runner.run(n, f),
            )
            (staging / name / "build.json").write_text(json.dumps(records[name], indent=2) + "\n")
        replace_dir(staging, artifacts / "tensorrt")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return records


def build_repository_engines(
    repository: str | Path,
    version: int,
    *,
    precision: str = "fp16",
    cache_dir: str | Path | None = None,
) -> dict[str, dict]:
    """GPU target: give every network of `version` a `model.plan` built on this GPU.

    Reads `<repository>/<network>/<version>/model.onnx` (published by `pigeon export all --target
    gpu`), reuses a cached engine when its key matches, and writes `model.plan` + `build.json` beside
    the ONNX file. Run in the serving container before `tritonserver` starts (see the Dockerfile).
    """
    from pigeon.checkpoint import load_config

    trt = import_tensorrt()
    capability, gpu_name = gpu_identity()
    repository = Path(repository)
    cache = Path(cache_dir or repository / ".engine-cache")
    cache.mkdir(parents=True, exist_ok=True)
    config = load_config(repository / "personalize" / str(version) / "pipeline")
    lora = read_manifest(repository / "personalizer" / str(version), verify=False).get("lora")
    records = {}
    for name, spec in component_specs(config).items():
        folder = repository / name / str(version)
        onnx_path = folder / "model.onnx"
        if not onnx_path.exists():
            raise ExportError(f"{onnx_path}: missing; publish version {version} first")
        base = repository / name / str(lora["base_version"]) if lora else None
        refitted = None
        if base is not None and name in REFITTABLE and (base / "model.plan").exists():
            # a LoRA version: the base version's engine with this version's LoRA weights
            base_key = json.loads((base / "build.json").read_text())["key"]
            try:
                refitted = refitted_engine(
                    base / "model.plan", base_key, base / "model.onnx", onnx_path, cache
                )
            except ExportError as exc:  # e.g. an untrained base LoRA the exporter folded away
                log.warning("%s: no refit (%s); building a new engine", name, exc)
        if refitted is not None:
            cached, records[name] = refitted
        else:
            cached, records[name] = cached_engine(
                onnx_path, spec, precision, cache, trt.__version__, capability, gpu_name
            )
        tmp = folder / ".model.plan.tmp"
        shutil.copyfile(cached, tmp)
        tmp.replace(folder / "model.plan")
        (folder / "build.json").write_text(json.dumps(records[name], indent=2) + "\n")
        log.info("%s: engine %s ready", name, records[name]["key"][:12])
    return records
