"""Every exportable component declared once: ordered named tensors, dtypes, symbolic shapes, ranges.

Everything else derives from these declarations: the export wrappers' signatures, sample inputs, ONNX
dynamic axes, TensorRT profiles, Triton configs, validation and tests. Tensor names are public API and
are the same in PyTorch, ONNX, TensorRT, Triton and the client.

A shape entry is an int, a symbol (`"batch"`) or a sum of symbols (`"past_len+seq"`); every symbol has a
`DimRange` (min / opt / max).

    >>> from pigeon.config import preset
    >>> spec = component_specs(preset("tiny"))["unet"]
    >>> [t.name for t in spec.inputs]
    ['latents', 'timestep', 'prompt_embeds', 'pooled_embeds', 'time_ids']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pigeon.config import PipelineConfig

# SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
TIME_IDS = 6

DType = Literal["float32", "int64"]
Point = Literal["min", "opt", "max"]


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.opt <= self.max:
            raise ValueError(f"DimRange needs 0 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: DType
    shape: tuple[int | str, ...]

    def symbols(self) -> list[str]:
        return [s for dim in self.shape if isinstance(dim, str) for s in dim.split("+")]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    # integer outputs (argmax ids, keep flags) may flip on near ties; the share of elements allowed to differ
    max_mismatch: float = 0.0
    # quantized outputs are judged against the output's own scale, not per element (int8 error is a
    # share of a tensor's range, and a per-element rtol fails on every value near zero):
    # |got - expected| <= atol + rtol * |expected| + peak_rtol * max|expected| everywhere, and
    # ||got - expected|| / ||expected|| <= rms_rtol when set
    peak_rtol: float = 0.0
    rms_rtol: float | None = None


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange]
    tolerance: dict[str, Tolerance] = field(default_factory=dict)
    opset: int = 18
    # state carried between calls: output name -> the input it is fed back as on the next call (the
    # personalizer's KV cache); a GPU runner may keep these on the device between calls
    carried: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: input and output names must be unique, got {names}")
        for out, inp in self.carried.items():
            if out not in self.output_names or inp not in self.input_names:
                raise ValueError(f"{self.name}: carried {out!r} -> {inp!r} names no output/input")
        for t in self.inputs + self.outputs:
            for s in t.symbols():
                if s not in self.dims:
                    raise ValueError(f"{self.name}.{t.name}: symbol {s!r} has no DimRange")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def point(self, which: Point | dict[str, int]) -> dict[str, int]:
        """Symbol values at min / opt / max, or the given overrides on top of opt (an odd shape)."""
        if isinstance(which, dict):
            return {**{s: r.opt for s, r in self.dims.items()}, **which}
        return {s: getattr(r, which) for s, r in self.dims.items()}

    def shape_of(self, tensor: TensorSpec, values: dict[str, int]) -> tuple[int, ...]:
        return tuple(
            dim if isinstance(dim, int) else sum(values[s] for s in dim.split("+"))
            for dim in tensor.shape
        )


def sample_inputs(
    spec: ComponentSpec,
    config: PipelineConfig,
    point: Point | dict[str, int] = "opt",
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded inputs of the declared shapes, with values valid for each tensor's meaning."""
    rng = np.random.default_rng(seed)
    values = spec.point(point)
    feeds = {}
    for t in spec.inputs:
        shape = spec.shape_of(t, values)
        feeds[t.name] = _sample_tensor(t.name, shape, config, rng)
    if spec.name == "mask_generator":  # 1-based positions within each image
        feeds["position_ids"] = (np.indices(feeds["position_ids"].shape)[1] % 17 + 1).astype(
            np.int64
        )
    if spec.name == "personalizer":  # the step's positions continue after the cache
        seq = values["seq"]
        feeds["position_ids"] = np.tile(
            np.arange(values["past_len"], values["past_len"] + seq),
            (feeds["input_ids"].shape[0], 1),
        ).astype(np.int64)
    if "attention_mask" in feeds:  # left padding: a prefix of zeros in some rows
        mask = feeds["attention_mask"]
        for b in range(1, mask.shape[0], 2):
            mask[b, : min(2, mask.shape[1] - 1)] = 0
    return feeds


def _sample_tensor(
    name: str, shape: tuple[int, ...], config: PipelineConfig, rng: np.random.Generator
) -> np.ndarray:
    codebook = config.history_encoder.codebook_size
    if name == "images":
        return rng.random(shape, dtype=np.float32)
    if name == "token_ids":
        return rng.integers(0, codebook, shape, dtype=np.int64)
    if name == "token_keep":
        keep = (rng.random(shape) < 0.7).astype(np.int64)
        keep[:, 0] = 1
        return keep
    if name == "type_ids":
        types = np.ones(shape, dtype=np.int64)
        types[:, shape[1] // 2 :] = 2
        types[1::2, -1] = 0
        return types
    if name == "input_ids":
        return rng.integers(
            0, config.personalizer.text_vocab_size + 3 + codebook, shape, dtype=np.int64
        )
    if name == "embed_keep":
        return (rng.random(shape) < 0.8).astype(np.float32)
    if name == "attention_mask":
        return np.ones(shape, dtype=np.int64)
    if name == "timestep":
        return rng.integers(0, config.scheduler.num_train_timesteps, shape).astype(np.float32)
    if name == "time_ids":
        s = float(config.image_size)
        return np.tile(np.array([s, s, 0, 0, s, s], dtype=np.float32), (shape[0], 1))
    return rng.standard_normal(shape, dtype=np.float32)


_MASK_INPUTS = ("token_ids", "position_ids", "type_ids")

FP32 = Tolerance(atol=1e-4, rtol=1e-3)
FP16 = Tolerance(atol=2e-2, rtol=2e-2)
IDS = Tolerance(atol=0, rtol=0, max_mismatch=0.02)
# int8 (pigeon.export.quantize): errors relative to each output's scale; a component that exceeds its
# int8 tolerance is kept in fp16 or fp32 and the manifest says so. This catches a broken quantization
# (wrong calibration ranges, clipped activations); what users see is checked on the whole variant:
INT8 = Tolerance(atol=1e-3, rtol=0.0, peak_rtol=0.5, rms_rtol=0.4)
# held-out users' images from the int8 variant against the fp32 one: mean |pixel difference| (0-255)
INT8_IMAGE_MAE = 4.0


def component_specs(config: PipelineConfig) -> dict[str, ComponentSpec]:
    """The seven components, in pipeline order, sized for `config`."""
    he, ca, pz = config.history_encoder, config.condition_adapter, config.personalizer
    p = he.num_patches
    n_img = pz.max_history + 1  # history images + the reference
    c, h = config.vae.latent_channels, config.latent_size
    s_enc, s_out = he.image_size, config.image_size
    heads, head_dim = pz.num_heads, pz.hidden_size // pz.num_heads
    batch = DimRange(1, 2, 16)
    kv = [
        TensorSpec(f"{kind}_{i}", "float32", ("batch", heads, "past_len", head_dim))
        for i in range(pz.num_layers)
        for kind in ("past_key", "past_value")
    ]
    present = [
        TensorSpec(f"{kind}_{i}", "float32", ("batch", heads, "past_len+seq", head_dim))
        for i in range(pz.num_layers)
        for kind in ("present_key", "present_value")
    ]
    max_seq = pz.max_positions
    # the reference's latents as extra UNet input channels (config.unet.reference_input)
    reference_latents = (
        (TensorSpec("reference_latents", "float32", ("batch", c, h, h)),)
        if config.unet.reference_input
        else ()
    )
    specs = [
        ComponentSpec(
            "history_encoder",
            inputs=(TensorSpec("images", "float32", ("batch", 3, s_enc, s_enc)),),
            outputs=(
                TensorSpec("token_ids", "int64", ("batch", p)),
                TensorSpec("token_keep", "int64", ("batch", p)),
            ),
            dims={"batch": DimRange(1, n_img, 16 * n_img)},
            tolerance={"fp32": IDS, "fp16": IDS, "int8": IDS},
        ),
        ComponentSpec(
            "mask_generator",
            inputs=tuple(TensorSpec(n, "int64", ("batch", "mask_len")) for n in _MASK_INPUTS),
            outputs=(TensorSpec("token_scores", "float32", ("batch", "mask_len")),),
            dims={"batch": batch, "mask_len": DimRange(2, n_img * p // 2, n_img * p)},
            tolerance={"fp32": FP32, "fp16": FP16, "int8": INT8},
        ),
        ComponentSpec(
            "personalizer",
            inputs=(
                TensorSpec("input_ids", "int64", ("batch", "seq")),
                TensorSpec("embed_keep", "float32", ("batch", "seq")),
                TensorSpec("reference_embedding", "float32", ("batch", ca.context_dim)),
                TensorSpec("attention_mask", "int64", ("batch", "past_len+seq")),
                TensorSpec("position_ids", "int64", ("batch", "seq")),
                *kv,
            ),
            outputs=(
                TensorSpec("visual_logits", "float32", ("batch", 1 + he.codebook_size)),
                *present,
            ),
            dims={
                "batch": batch,
                "seq": DimRange(1, min(max_seq // 2, (pz.max_history * p) // 2 + 16), max_seq // 2),
                "past_len": DimRange(
                    0, min(max_seq // 2, (pz.max_history * p) // 2 + 16), max_seq // 2
                ),
            },
            tolerance={"fp32": FP32, "fp16": FP16, "int8": INT8},
            carried={t.name: k.name for t, k in zip(present, kv, strict=True)},
        ),
        ComponentSpec(
            "condition_adapter",
            inputs=(
                TensorSpec("token_ids", "int64", ("batch", p)),
                TensorSpec("token_keep", "int64", ("batch", p)),
            ),
            outputs=(
                TensorSpec("prompt_embeds", "float32", ("batch", ca.num_queries, ca.context_dim)),
                TensorSpec("pooled_embeds", "float32", ("batch", ca.pooled_dim)),
                TensorSpec("reference_embedding", "float32", ("batch", ca.context_dim)),
            ),
            dims={"batch": batch},
            tolerance={"fp32": FP32, "fp16": FP16, "int8": INT8},
        ),
        ComponentSpec(
            "vae_encoder",  # the reference's latents, for image-to-image (scheduler.strength < 1)
            inputs=(TensorSpec("images", "float32", ("batch", 3, s_out, s_out)),),
            outputs=(TensorSpec("latents", "float32", ("batch", c, h, h)),),
            dims={"batch": batch},
            tolerance={"fp32": FP32, "fp16": FP16, "int8": INT8},
        ),
        ComponentSpec(
            "unet",
            inputs=(
                TensorSpec("latents", "float32", ("batch", c, h, h)),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("prompt_embeds", "float32", ("batch", ca.num_queries, ca.context_dim)),
                TensorSpec("pooled_embeds", "float32", ("batch", ca.pooled_dim)),
                TensorSpec("time_ids", "float32", ("batch", TIME_IDS)),
                *reference_latents,
            ),
            outputs=(TensorSpec("noise_pred", "float32", ("batch", c, h, h)),),
            dims={"batch": DimRange(1, 2, 32)},  # 2 x requests under classifier-free guidance
            tolerance={"fp32": FP32, "fp16": FP16, "int8": INT8},
        ),
        ComponentSpec(
            "vae_decoder",
            inputs=(TensorSpec("latents", "float32", ("batch", c, h, h)),),
            outputs=(TensorSpec("images", "float32", ("batch", 3, s_out, s_out)),),
            dims={"batch": batch},
            tolerance={"fp32": FP32, "fp16": FP16, "int8": INT8},
        ),
    ]
    return {spec.name: spec for spec in specs}
