"""The request's parameters declared once, as `pigeon.specs` declares the networks' tensors.

A request is its payload (history images, reference image, text) and the optional parameters below.
Everything that carries a parameter derives from `PARAMETERS`:

    GenerationRequest          one field per parameter (a test fails on a field declared nowhere)
    serving.triton_config      the ensemble's optional inputs, preprocess's `<name>_out` outputs (the
                               parameters with readers), the inputs of the Python models named in
                               `readers`, the ensemble's wiring
    serving.triton_backend     preprocess reads, checks and forwards each one; personalize and denoise
                               read theirs by name
    serving.client             `PigeonClient.generate(..., name=value)` packs them
    cli                        `pigeon generate` and `pigeon client generate` flags (`--name-with-dashes`)

Checking (types, ranges, the checkpoint's defaults) is `inference.pipeline.check_request`, the one
check that in-process and served requests both pass through.

    >>> [p.name for p in PARAMETERS]
    ['seed', 'steps', 'guidance', 'reference_mask_ratio', 'sampler', 'strength', 'timeout_ms', 'style_start']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pigeon.config import STYLE_STARTS
from pigeon.diffusion.scheduler import SAMPLERS

ParameterDType = Literal["int64", "float32", "bytes"]
Reader = Literal["personalize", "denoise"]

# The payload: every request has them; the ensemble's required inputs carry them.
PAYLOAD = ("history", "reference", "text")

STRENGTH_HELP = (
    "1: denoise from pure noise (the paper); below 1: from the reference's latents noised "
    "(image-to-image); default: the checkpoint's scheduler.strength"
)


@dataclass(frozen=True)
class RequestParameter:
    name: str  # GenerationRequest's field, the served input's name, the CLI flag's stem
    dtype: ParameterDType  # as served (bytes: a UTF-8 string)
    # the Python models after preprocess that take the checked value; () for one that preprocess
    # alone uses (it reads every parameter)
    readers: tuple[Reader, ...]
    help: str
    choices: tuple[str, ...] = ()

    @property
    def python_type(self) -> type:
        return {"int64": int, "float32": float, "bytes": str}[self.dtype]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def checked(self) -> str:
        """The ensemble tensor that carries the value preprocess checked (and defaulted)."""
        return f"{self.name}_checked"

    def to_array(self, value: object) -> np.ndarray:
        """One value as the (1,) tensor that travels through the ensemble."""
        if self.dtype == "bytes":
            return np.array([str(value).encode("utf-8")], dtype=np.object_)
        return np.array([value], dtype=np.dtype(self.dtype))


PARAMETERS = (
    RequestParameter(
        "seed",
        "int64",
        ("personalize", "denoise"),
        "seeds the reference masking, token sampling and initial latents (default 0)",
    ),
    RequestParameter("steps", "int64", ("denoise",), "denoising steps; default: the checkpoint's"),
    RequestParameter(
        "guidance", "float32", ("denoise",), "classifier-free guidance; default: the checkpoint's"
    ),
    RequestParameter(
        "reference_mask_ratio",
        "float32",
        ("personalize",),
        "share of the reference's tokens masked before personalization; default: the checkpoint's",
    ),
    RequestParameter(
        "sampler",
        "bytes",
        ("denoise",),
        "the denoising sampler; default: the checkpoint's",
        choices=tuple(sorted(SAMPLERS)),
    ),
    RequestParameter("strength", "float32", ("denoise",), STRENGTH_HELP),
    RequestParameter(
        "timeout_ms",
        "int64",
        ("personalize", "denoise"),
        "the request's time budget in ms from its arrival: past it the work stops between two "
        "steps and the request ends UNAVAILABLE (default 0: none; PigeonClient sends its own timeout)",
    ),
    RequestParameter(
        "style_start",
        "bytes",
        (),
        "below strength 1, recolour the reference from the history before it is noised "
        "(histogram, moments) or keep it as it is (none); default: the checkpoint's "
        "scheduler.style_start",
        choices=STYLE_STARTS,
    ),
)


# the parameters that travel past preprocess (its `<name>_out` outputs)
FORWARDED = tuple(p for p in PARAMETERS if p.readers)


def parameters_read_by(reader: Reader) -> tuple[RequestParameter, ...]:
    return tuple(p for p in PARAMETERS if reader in p.readers)


def add_parameter_flags(parser) -> None:
    """One argparse flag per parameter; one not given is left out of the namespace, so the
    request's own default applies (`parameter_values`)."""
    import argparse

    for p in PARAMETERS:
        parser.add_argument(
            p.flag,
            dest=p.name,
            type=p.python_type,
            default=argparse.SUPPRESS,
            choices=p.choices or None,
            help=p.help,
        )


def parameter_values(source: object) -> dict[str, object]:
    """{name: value} of the parameters `source` (an argparse namespace, a request) sets."""
    values = {p.name: getattr(source, p.name, None) for p in PARAMETERS}
    return {k: v for k, v in values.items() if v is not None}
