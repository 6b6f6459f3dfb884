"""Runners: one interface, `run(component, feeds) -> outputs`, with spec-named NumPy dicts.

    TorchRunner   the export wrappers of `pigeon.models.export_wrappers` (the reference)
    OrtRunner     ONNX files from `pigeon export onnx`, on ONNX Runtime (CPU, or CUDA/TensorRT providers)
    TrtRunner     TensorRT engines from `pigeon export tensorrt` (GPU), torch CUDA tensors as buffers

They compute the same function, so `PigeonPipeline` and the Triton models swap them freely (the Triton
side's own runner, `BlsRunner` in `pigeon.serving.triton_backend`, calls the served networks through
BLS behind the same interface). This module imports neither torch, onnxruntime nor TensorRT until a
runner is built: the Triton Python models stay light.

ONNX Runtime's settings are `OrtOptions`, made from the serving config (`OrtOptions.from_serving`) for
the in-process runner and from the same config's `config.pbtxt` parameters (`OrtOptions.to_parameters`,
`from_parameters`) inside the Triton models, so both run with the same session settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pigeon.export.errors import ExportError
from pigeon.specs import ComponentSpec, component_specs


class Runner(Protocol):
    name: str

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _ordered(spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    missing = [n for n in spec.input_names if n not in feeds]
    if missing:
        raise KeyError(f"{spec.name}: missing input {missing[0]!r}")
    return [
        np.ascontiguousarray(feeds[n]) if isinstance(feeds[n], np.ndarray) else feeds[n]
        for n in spec.input_names
    ]


# torch.compile modes for a GPU: the fixed-shape components replay as CUDA graphs (reduce-overhead; at
# this model size a UNet call is launch-bound: on an H100, 11.6-13.1 ms eager vs 1.5-1.7 ms compiled);
# the personalizer's decode step grows by one cache position per call, so it compiles without graphs.
GPU_COMPILE = {
    "history_encoder": "reduce-overhead",
    "unet": "reduce-overhead",
    "vae_decoder": "reduce-overhead",
    "personalizer": "default",
}


class TorchRunner:
    """The export wrappers on `device`; `compile` maps a component to a `torch.compile` mode (its
    first call of each new shape compiles; the outputs match eager within float rounding).

    Off the CPU, the outputs a spec declares `carried` (the KV cache) come back as device tensors
    and go straight back in on the next call: decoding then moves one logits row per step to the
    host instead of the whole cache both ways (`resident=False` turns this off)."""

    name = "pytorch"

    def __init__(
        self,
        model: Any,
        device: str = "cpu",
        compile: dict[str, str] | None = None,
        resident: bool | None = None,
    ) -> None:
        import torch

        from pigeon.models.export_wrappers import export_module

        self.torch = torch
        self.model = model.eval().to(device)
        self.device = device
        self.resident = (device != "cpu") if resident is None else resident
        self.specs = component_specs(model.config)
        self.modules = {name: export_module(model, name) for name in self.specs}
        for name, mode in (compile or {}).items():
            if name not in self.specs:
                raise ValueError(f"compile: unknown component {name!r} (have {sorted(self.specs)})")
            self.modules[name] = torch.compile(self.modules[name], mode=mode)

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        torch = self.torch
        args = [
            a.to(self.device)
            if isinstance(a, torch.Tensor)
            else torch.from_numpy(a).to(self.device)
            for a in _ordered(spec, feeds)
        ]
        with torch.inference_mode():
            outputs = self.modules[component](*args)
        out = {}
        for n, o in zip(spec.output_names, outputs, strict=True):
            # Under autocast a float output comes back in fp16; the runner contract is the declared
            # dtype (float32), so numpy-side scheduler math stays in fp32.
            o = o.float() if o.is_floating_point() else o
            # a resident output is cloned: a CUDA-graph replay would overwrite it
            out[n] = o.clone() if self.resident and n in spec.carried else o.cpu().numpy()
        return out


GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")


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
    # sequential | parallel (independent nodes on inter_op_threads; the graphs here are mostly chains)
    execution_mode: str = "sequential"
    # components run through an IOBinding: inputs bound without copies, outputs written into buffers
    # allocated once per shape and reused (the denoise loop: "unet", same shapes every step). Their
    # outputs are those buffers: valid until the component's next run on this runner.
    io_binding: tuple[str, ...] = ()
    # one InferenceSession per (file, settings) in a process, shared by every runner built from it
    session_reuse: bool = False
    # (component, intra-op threads) where a component's own count differs from intra_op_threads
    component_threads: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise ValueError(
                f"graph_optimization={self.graph_optimization!r} is not one of "
                f"{list(GRAPH_OPTIMIZATIONS)}"
            )
        if self.execution_mode not in EXECUTION_MODES:
            raise ValueError(
                f"execution_mode={self.execution_mode!r} is not one of {list(EXECUTION_MODES)}"
            )

    def for_component(self, name: str) -> OrtOptions:
        """These settings with `name`'s own intra-op thread count, where it has one."""
        threads = dict(self.component_threads).get(name)
        return self if threads is None else replace(self, intra_op_threads=threads)

    def of_component(self, name: str) -> OrtOptions:
        """The settings of `name`'s session alone: its thread count resolved, no per-component
        table left (what a model serving that one network is configured with)."""
        return replace(self.for_component(name), component_threads=())

    @classmethod
    def from_serving(cls, serving: Any) -> OrtOptions:
        """The settings a `ServingConfig` asks for (its `ort_*` fields)."""
        return cls(
            component_threads=(
                (("personalizer", serving.ort_personalizer_threads),)
                if serving.ort_personalizer_threads
                else ()
            ),
            intra_op_threads=serving.ort_threads,
            inter_op_threads=serving.ort_inter_op_threads,
            graph_optimization=serving.ort_graph_optimization,
            execution_mode=serving.ort_execution_mode,
            allow_spinning=serving.ort_allow_spinning,
            io_binding=("unet",) if serving.ort_io_binding else (),
            session_reuse=serving.ort_session_reuse,
        )

    def to_parameters(self) -> dict[str, str]:
        """The session settings as Triton model parameters (config.pbtxt string values); the
        per-component table only where there is one."""
        parameters = {
            "ort_threads": str(self.intra_op_threads),
            "ort_inter_op_threads": str(self.inter_op_threads),
            "ort_graph_optimization": self.graph_optimization,
            "ort_execution_mode": self.execution_mode,
            "ort_allow_spinning": "true" if self.allow_spinning else "false",
        }
        if self.component_threads:
            table = ",".join(f"{n}={t}" for n, t in self.component_threads)
            parameters["ort_component_threads"] = table
        return parameters

    @classmethod
    def from_parameters(cls, parameters: dict) -> OrtOptions:
        """Back from a Triton model config's `parameters` ({key: {"string_value": ...}}); a key that
        is absent keeps the default of a one-thread instance."""

        def get(key: str, default: str) -> str:
            return parameters.get(key, {}).get("string_value", default)

        return cls(
            intra_op_threads=int(get("ort_threads", "1")),
            inter_op_threads=int(get("ort_inter_op_threads", "1")),
            graph_optimization=get("ort_graph_optimization", "all"),
            execution_mode=get("ort_execution_mode", "sequential"),
            allow_spinning=get("ort_allow_spinning", "false") == "true",
            component_threads=tuple(
                (name, int(threads))
                for name, threads in (
                    item.split("=") for item in get("ort_component_threads", "").split(",") if item
                )
            ),
        )

    def session_options(self) -> Any:
        import onnxruntime as ort

        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = self.inter_op_threads
        so.graph_optimization_level = levels[self.graph_optimization]
        so.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL
            if self.execution_mode == "parallel"
            else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        so.log_severity_level = 3
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.allow_spinning else "0"
        )
        return so

    def session(self, path: str | Path) -> Any:
        """An InferenceSession of `path` with these settings; the shared one when session_reuse."""
        import onnxruntime as ort

        if not self.session_reuse:
            return ort.InferenceSession(
                str(path), self.session_options(), providers=list(self.providers)
            )
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, self._session_key())
        if key not in _SESSIONS:
            _SESSIONS[key] = ort.InferenceSession(
                str(path), self.session_options(), providers=list(self.providers)
            )
        return _SESSIONS[key]

    def _session_key(self) -> OrtOptions:
        return replace(self, io_binding=(), session_reuse=True)


_SESSIONS: dict[tuple, Any] = {}  # OrtOptions.session with session_reuse


def symbol_values(spec: ComponentSpec, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The value of every shape symbol that an input dimension names alone."""
    values = {}
    for t in spec.inputs:
        for dim, size in zip(t.shape, feeds[t.name].shape, strict=False):
            if isinstance(dim, str) and "+" not in dim:
                values[dim] = size
    return values


class OrtRunner:
    name = "onnxruntime"

    def __init__(
        self,
        sessions: dict[str, Any],
        specs: dict[str, ComponentSpec],
        options: OrtOptions = OrtOptions(),
    ) -> None:
        self.sessions = sessions
        self.specs = specs
        self.options = options
        self._bindings: dict[str, Any] = {}
        self._buffers: dict[tuple, dict[str, np.ndarray]] = {}

    @classmethod
    def from_files(
        cls, files: dict[str, str | Path], config: Any, options: OrtOptions = OrtOptions()
    ) -> OrtRunner:
        sessions = {name: options.for_component(name).session(path) for name, path in files.items()}
        return cls(sessions, component_specs(config), options)

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

    def _run_bound(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One run through an IOBinding, outputs into this runner's buffers for these shapes."""
        spec = self.specs[component]
        arrays = _ordered(spec, feeds)
        shapes = tuple(a.shape for a in arrays)
        buffers = self._buffers.get((component, shapes))
        if buffers is None:
            values = symbol_values(spec, dict(zip(spec.input_names, arrays, strict=True)))
            buffers = {
                t.name: np.empty(spec.shape_of(t, values), dtype=t.dtype) for t in spec.outputs
            }
            self._buffers[(component, shapes)] = buffers
        session = self.sessions[component]
        binding = self._bindings.get(component)
        if binding is None:
            binding = self._bindings[component] = session.io_binding()
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, a in zip(spec.input_names, arrays, strict=True):
            binding.bind_cpu_input(name, a)
        for name, b in buffers.items():
            binding.bind_output(name, "cpu", 0, b.dtype, list(b.shape), b.ctypes.data)
        session.run_with_iobinding(binding)
        return dict(buffers)

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self.specs[component]
        if component not in self.sessions:
            raise KeyError(f"no ONNX file for component {component!r}")
        if component in self.options.io_binding:
            return self._run_bound(component, feeds)
        outputs = self.sessions[component].run(
            spec.output_names, dict(zip(spec.input_names, _ordered(spec, feeds), strict=True))
        )
        return dict(zip(spec.output_names, outputs, strict=True))


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise ExportError(
            "TensorRT is not installed here (it needs NVIDIA's own index and a GPU); build engines in "
            "the NVIDIA TensorRT or Triton container, e.g. with the project's Dockerfile"
        ) from exc
    return tensorrt


class TrtRunner:
    """Runs TensorRT engines with torch CUDA tensors as buffers (the same `run` as every runner)."""

    name = "tensorrt"

    def __init__(self, engines: dict[str, Path], config: Any) -> None:
        import torch

        trt = import_tensorrt()
        self.torch = torch
        self.specs = component_specs(config)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {
            n: runtime.deserialize_cuda_engine(Path(p).read_bytes()) for n, p in engines.items()
        }
        self.contexts = {n: e.create_execution_context() for n, e in self.engines.items()}
        self.stream = torch.cuda.Stream()

    def run(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        spec = self.specs[component]
        context = self.contexts[component]
        inputs = {
            n: torch.from_numpy(np.ascontiguousarray(feeds[n])).cuda() for n in spec.input_names
        }
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for t in spec.outputs:
            shape = tuple(context.get_tensor_shape(t.name))
            dtype = torch.float32 if t.dtype == "float32" else torch.int64
            outputs[t.name] = torch.empty(shape, dtype=dtype, device="cuda")
            context.set_tensor_address(t.name, outputs[t.name].data_ptr())
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{component}: TensorRT execution failed")
        self.stream.synchronize()
        return {n: o.cpu().numpy() for n, o in outputs.items()}
