"""PyTorch -> ONNX, one file per declared component, validated before anything is written in place.

Uses torch's own (dynamo) exporter. Dynamic axes come from the declarations in `pigeon.specs`: each
symbol becomes a `torch.export.Dim` with the declared range, a sum such as `past_len+seq` is left for
the exporter to derive, and the graph's dimension names are then rewritten to the declared ones.
`--fused-attention` exports at opset 23, where SDPA becomes the standard ONNX `Attention` op (the
GPU-side gain; ONNX Runtime also runs it on CPU). fp16 keeps fp32 inputs and outputs, so the interface
does not change with precision.

Layout of an artifact folder:

    ART/manifest.json                 every component: file, SHA-256, opset, precision, measured errors
    ART/<component>/model.onnx        (+ model.onnx.data when the graph would pass 2 GB)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import onnx
import onnx.numpy_helper
import torch
from torch.export import Dim

from pigeon.checkpoint import Checkpoint, load_checkpoint
from pigeon.export.errors import ExportError, ToleranceError
from pigeon.export.manifest import FLOAT_PRECISIONS, MANIFEST, MANIFEST_FORMAT
from pigeon.export.validate import check_graph_io, normalize_dim_names, validate
from pigeon.files import replace_dir, sha256_file, staging_dir
from pigeon.inference.runners import OrtOptions, OrtRunner, TorchRunner
from pigeon.models.export_wrappers import export_module
from pigeon.specs import ComponentSpec, component_specs, sample_inputs

log = logging.getLogger(__name__)
FUSED_ATTENTION_OPSET = 23
EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GB limit, with room for the graph


def dynamic_shapes(spec: ComponentSpec) -> tuple:
    """torch.export dynamic shapes, in the wrapper's argument structure (KV tensors are *varargs)."""
    dims = {s: Dim(s, min=r.min, max=r.max) for s, r in spec.dims.items()}
    per_input = []
    for t in spec.inputs:
        axes = {}
        for i, d in enumerate(t.shape):
            if isinstance(d, str):
                axes[i] = Dim.AUTO if "+" in d else dims[d]
        per_input.append(axes or None)
    if spec.name == "personalizer":  # forward(input_ids, ..., position_ids, *past_flat)
        return (*per_input[:5], tuple(per_input[5:]))
    return tuple(per_input)


def to_onnx(model: torch.nn.Module, spec: ComponentSpec, config, opset: int) -> onnx.ModelProto:
    """Trace one component's export wrapper at its opt shape; returns the ONNX model."""
    wrapper = export_module(model, spec.name)
    feeds = sample_inputs(spec, config, "opt")
    args = tuple(torch.from_numpy(feeds[n]) for n in spec.input_names)
    # the exporter prints its progress and warns about torchvision ops we do not use: keep both out
    # of the user's terminal (they are in the debug log)
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    captured = io.StringIO()
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(captured):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes(spec),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    log.debug("%s export log:\n%s", spec.name, captured.getvalue())
    proto = program.model_proto
    normalize_dim_names(spec, proto)
    return proto


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 weights and arithmetic, fp32 inputs and outputs (casts at the edges).

    Rotary angles stay fp32 (`rotary_angle_nodes`): position x inv_freq in fp16 is off by up to
    position * 2^-11 rad, which turned the small personalizer's keys at position 280 by 0.1 rad
    (0.056 abs error on present_key_0, over the fp16 tolerance).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    block = rotary_angle_nodes(proto.graph)
    used = {i for n in proto.graph.node if n.name in block for i in n.input}
    fp32_weights = {
        i.name: onnx.numpy_helper.to_array(i)
        for i in proto.graph.initializer
        if i.name in used and i.data_type == onnx.TensorProto.FLOAT
    }
    proto = convert_float_to_float16(
        proto, keep_io_types=True, disable_shape_infer=True, node_block_list=block
    )
    _keep_fp32_islands(proto.graph, fp32_weights)
    topological_sort(proto.graph)
    return proto


def rotary_angle_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes on a path from the `position_ids` input to a Cos or Sin: the rotary angle computation."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producers = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    after, stack = set(), ["position_ids"]
    while stack:
        for n in consumers.get(stack.pop(), []):
            if n.name not in after:
                after.add(n.name)
                stack.extend(n.output)
    before, stack = set(), [o for n in graph.node if n.op_type in ("Cos", "Sin") for o in n.output]
    while stack:
        n = producers.get(stack.pop())
        if n is not None and n.name not in before:
            before.add(n.name)
            stack.extend(n.input)
    return sorted(after & before)


def _keep_fp32_islands(graph: onnx.GraphProto, fp32_weights: dict) -> None:
    """The fp16 converter joins two kept-fp32 nodes through a cast to fp16 and back, and feeds them
    their weights converted to fp16 and cast back: both lose the precision the nodes were kept for.
    Cast(fp16) -> Cast(fp32) pairs are bypassed, and those weights restored from the fp32 model."""
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {i.name: i for i in graph.initializer}

    def to(node: onnx.NodeProto) -> int:
        return next(a.i for a in node.attribute if a.name == "to")

    for n in graph.node:
        if n.op_type != "Cast" or to(n) != onnx.TensorProto.FLOAT:
            continue
        source = producers.get(n.input[0])
        if (
            source is not None
            and source.op_type == "Cast"
            and to(source) == onnx.TensorProto.FLOAT16
        ):
            n.input[0] = source.input[0]
        elif n.input[0] in fp32_weights and n.input[0] in initializers:
            name = n.input[0] + "_fp32"
            if name not in initializers:
                tensor = onnx.numpy_helper.from_array(fp32_weights[n.input[0]], name)
                graph.initializer.append(tensor)
                initializers[name] = tensor
            n.input[0] = name


def has_discrete_output(spec: ComponentSpec) -> bool:
    """Integer outputs (token ids, keep flags) come from an argmax or a threshold."""
    return any(t.dtype == "int64" for t in spec.outputs)


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its inputs' producers (the fp16 converter appends its input
    casts at the end, which the ONNX checker rejects)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError(f"graph {graph.name!r} has a cycle or an undefined input")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def save_onnx(proto: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    large = proto.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=path.name + ".data" if large else None,
    )
    onnx.checker.check_model(str(path))


def tool_versions() -> dict[str, str]:
    import diffusers
    import onnxruntime
    import transformers

    import pigeon

    return {
        "pigeon": pigeon.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers.__version__,
    }


def export_float(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    precision: str = "fp32",
    fused_attention: bool = False,
    components: list[str] | None = None,
    overwrite: bool = False,
    model_hook=None,
    strict: bool = False,
    manifest_extra: dict | None = None,
) -> dict:
    """Export fp32 or fp16 files, validate them and write the artifact folder atomically; returns
    the manifest (`pigeon.export.artifacts.export_onnx` is the entry point for every precision).
    `manifest_extra`: more manifest fields (the variant and its sampling defaults).

    model_hook(model) runs after tracing and before validation (tests use it to break an export on
    purpose: validation must then reject it and nothing is written). fp16: a component with integer
    outputs (an argmax or threshold, e.g. the history encoder's nearest code) that fails fp16
    validation is kept in fp32 and the manifest says why, unless `strict`; any other failure is an
    error.
    """
    if precision not in FLOAT_PRECISIONS:
        raise ExportError(f"precision={precision!r} is not one of {list(FLOAT_PRECISIONS)}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists (pass --overwrite to replace it)")
    specs = component_specs(ckpt.config)
    names = components or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ExportError(f"unknown component {unknown[0]!r}; known: {list(specs)}")
    staging = staging_dir(out)
    try:
        entries = {}
        for name in names:
            spec = specs[name]
            opset = FUSED_ATTENTION_OPSET if fused_attention else spec.opset
            start = time.perf_counter()
            proto = to_onnx(ckpt.model, spec, ckpt.config, opset)
            if precision == "fp16":
                proto = to_fp16(proto)
            check_graph_io(spec, proto)
            path = staging / name / "model.onnx"
            save_onnx(proto, path)
            entries[name] = {
                "file": f"{name}/model.onnx",
                "opset": opset,
                "export_s": round(time.perf_counter() - start, 2),
            }
            log.info(
                "exported %s (opset %d, %s) in %.1fs",
                name,
                opset,
                precision,
                entries[name]["export_s"],
            )
        if model_hook is not None:
            model_hook(ckpt.model)
        reference = TorchRunner(ckpt.model)
        artifact = OrtRunner.from_files(
            {n: staging / e["file"] for n, e in entries.items()}, ckpt.config
        )
        for name, entry in entries.items():

            def check(precision: str, n: str = name) -> dict:
                return validate(
                    specs[n],
                    ckpt.config,
                    precision,
                    lambda f: reference.run(n, f),
                    lambda f: artifact.run(n, f),
                )

            try:
                errors = check(precision)
            except ToleranceError as exc:
                if precision != "fp16" or strict or not has_discrete_output(specs[name]):
                    raise
                # an argmax or threshold in fp16 flips where its candidates are close: keep the
                # component in fp32, say so in the manifest, and validate that instead
                log.warning("%s: fp16 fails validation (%s); kept in fp32", name, exc)
                shutil.rmtree(staging / name)
                proto = to_onnx(ckpt.model, specs[name], ckpt.config, entry["opset"])
                check_graph_io(specs[name], proto)
                save_onnx(proto, staging / entry["file"])
                artifact.sessions[name] = OrtOptions(session_reuse=False).session(
                    staging / entry["file"]
                )
                entry["precision"] = "fp32"
                entry["kept_fp32_because"] = str(exc)
                errors = check("fp32")
            entry["max_error"] = errors
            entry["files"] = {p.name: sha256_file(p) for p in sorted((staging / name).iterdir())}
            log.info(
                "validated %s: worst error %.3g",
                name,
                max(v for e in errors.values() for v in e.values()),
            )
        manifest = {
            "_class": "PigeonArtifacts",
            "_format": MANIFEST_FORMAT,
            "precision": precision,
            "fused_attention": fused_attention,
            "checkpoint": str(ckpt.path),
            "checkpoint_sha256": ckpt.digest,
            "preset": ckpt.config.preset,
            "tools": tool_versions(),
            **(manifest_extra or {}),
            "components": entries,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
