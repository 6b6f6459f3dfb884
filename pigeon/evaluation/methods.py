"""What is evaluated: reference baselines drawn from the dataset (no model) and model methods from
checkpoints (stage ablations, mask-generator switches, best-of-k selection).

Baselines (docs/RESULTS.md §2):
    oracle              the ground truth x(c*, s_u) (upper bound)
    style_vote_lookup   StyleNet votes on the history styles, majority -> x(c*, s_hat) (bounds
                        preference inference; isolates "inferred the style" from "can draw it")
    reference_copy      the reference image (right concept, wrong style)
    reference_recolour  the reference recoloured from the history, no model (the histogram
                        `scheduler.style_start`: what the image-to-image start already carries)
    history_copy        a random history image (right style, wrong concept)
    fixed_style         x(c*, first style of the dataset) (no personalization)
    mean_history        the pixel mean of the history (degenerate lower bound)

Model methods (a run folder RUN with RUN/{lmm,sft,dpo}/best):
    lmm_no_history      stage 0 only: the base text-to-image LMM, prompt "Instruction: text <img>"
    sft                 Pigeon after stage 1 (masked preference reconstruction)
    pigeon              Pigeon after stages 1+2 (DPO); mask generator as trained (mutual)
    mask_off            the final checkpoint with mask_generator.mask_type=none at inference
    mask_random         the final checkpoint with mask_generator.mask_type=random at inference
    mask_frozen         a run trained with mask_generator.training=frozen (--checkpoint-for)
    best_of_k           the final checkpoint, one candidate per reference mask ratio, the one with
                        the highest personalization score kept (the stage-2 scorer: the model's own
                        history-encoder ViT, never the evaluation's metric nets)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pigeon.core.images import to_uint8
from pigeon.core.style_start import recolour_image
from pigeon.evaluation.data import EvalCase, EvalData
from pigeon.evaluation.errors import EvaluationError
from pigeon.evaluation.metrics import resize_images
from pigeon.evaluation.options import BASELINES, DEFAULT_RATIOS, MODEL_METHODS

DESCRIPTIONS = {
    "oracle": "ground truth (upper bound)",
    "style_vote_lookup": "StyleNet majority vote on history + dataset lookup",
    "reference_copy": "the reference image (right concept, wrong style)",
    "reference_recolour": "the reference recoloured from the history (no model)",
    "history_copy": "a random history image (right style, wrong concept)",
    "fixed_style": "the target concept in the first style (no personalization)",
    "mean_history": "pixel mean of the history",
    "lmm_no_history": "stage 0 only: base LMM, text prompt, no history",
    "sft": "Pigeon after stage 1",
    "pigeon": "Pigeon after stages 1+2 (mask generator trained)",
    "mask_off": "Pigeon, mask generator off (mask_type=none)",
    "mask_random": "Pigeon, random masks (mask_type=random)",
    "mask_frozen": "Pigeon trained with a frozen mask generator",
    "best_of_k": "Pigeon, best-of-k over reference mask ratios",
}


class MethodError(EvaluationError):
    """A method that cannot run; the message names the method and the value at fault."""


class Skipped(Exception):
    """A method that is not run here, with the reason shown in the report."""


@dataclass
class Context:
    """What methods may use besides the data: the frozen style net (style vote) and a seed."""

    style_probs: object = None  # callable uint8 images -> (N, K) probabilities
    seed: int = 0


# --- baselines --------------------------------------------------------------------------------


def style_vote(probs: np.ndarray, k: int) -> int:
    """Majority of the argmax votes; ties go to the largest summed probability."""
    votes = np.bincount(probs.argmax(1), minlength=k).astype(float)
    best = np.flatnonzero(votes == votes.max())
    return int(best[np.argmax(probs.sum(0)[best])])


def run_baseline(name: str, data: EvalData, cases: list[EvalCase], ctx: Context) -> np.ndarray:
    """uint8 (N, S, S, 3) for one baseline."""
    if name == "oracle":
        return data.truth(cases)
    if name == "reference_copy":
        return data.images([c.reference for c in cases])
    if name == "reference_recolour":
        return np.stack(
            [recolour_image(data.image(c.reference), data.history(c), "histogram") for c in cases]
        )
    if name == "fixed_style":
        return data.images([(c.target[0], 0) for c in cases])
    if name == "history_copy":
        rng = np.random.default_rng([ctx.seed, 1])
        return data.images([c.history[int(rng.integers(len(c.history)))] for c in cases])
    if name == "mean_history":
        return np.stack(
            [np.round(data.history(c).astype(np.float64).mean(0)).astype(np.uint8) for c in cases]
        )
    if name == "style_vote_lookup":
        if ctx.style_probs is None:
            raise Skipped("needs the style net")
        lengths = [len(c.history) for c in cases]
        probs = ctx.style_probs(np.concatenate([data.history(c) for c in cases]))
        bounds = np.cumsum([0, *lengths])
        k = len(data.styles)
        return data.images(
            [
                (c.target[0], style_vote(probs[a:b], k))
                for c, a, b in zip(cases, bounds[:-1], bounds[1:], strict=True)
            ]
        )
    raise MethodError(f"unknown baseline {name!r}; known: {list(BASELINES)}")


# --- model methods ------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """How to run one model method."""

    name: str
    checkpoint: Path
    overrides: list[str] = field(default_factory=list)  # config `--set` KEY=VALUE
    request: dict = field(default_factory=dict)  # GenerationRequest fields (steps, guidance, ...)
    text_only: bool = False
    ratios: tuple[float, ...] | None = None  # best-of-k over these reference mask ratios
    batch: int = 8
    info: str = ""  # shown in the report (e.g. which stage stands in for the final model)


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / "pipeline.json").is_file()


def resolve_model_specs(
    run: str | Path | None,
    names: Sequence[str],
    *,
    checkpoint_for: dict[str, str] | None = None,
    overrides: Sequence[str] = (),
    request: dict | None = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    batch: int = 8,
) -> tuple[list[ModelSpec], dict[str, str]]:
    """Model specs for the requested names, and {name: reason} for those that cannot run.

    `run` is a run folder (RUN/{lmm,sft,dpo}/best) or a single checkpoint (then it is the final
    model and the stage ablations need --checkpoint-for). `checkpoint_for` sets any method's
    checkpoint explicitly (required for mask_frozen)."""
    checkpoint_for = dict(checkpoint_for or {})
    for name, path in checkpoint_for.items():
        if name not in MODEL_METHODS:
            raise MethodError(
                f"--checkpoint-for {name}=...: {name!r} is not a model method "
                f"({', '.join(MODEL_METHODS)})"
            )
        if not is_checkpoint(Path(path)):
            raise MethodError(
                f"--checkpoint-for {name}={path}: not a checkpoint (no pipeline.json)"
            )
    stages: dict[str, Path] = {}
    final: Path | None = None
    if run is not None:
        run = Path(run)
        if is_checkpoint(run):
            final = run
        elif run.is_dir():
            for stage in ("lmm", "sft", "dpo"):
                if is_checkpoint(run / stage / "best"):
                    stages[stage] = run / stage / "best"
            final = stages.get("dpo") or stages.get("sft")
            if not stages:
                raise MethodError(
                    f"--checkpoint {str(run)!r}: neither a checkpoint (pipeline.json) nor a run "
                    "folder with lmm/best, sft/best or dpo/best"
                )
        else:
            raise MethodError(f"--checkpoint {str(run)!r}: no such folder")
    specs, skipped = [], {}
    for name in names:
        if name not in MODEL_METHODS:
            continue
        path: Path | None = Path(checkpoint_for[name]) if name in checkpoint_for else None
        if path is None:
            if name == "lmm_no_history":
                path = stages.get("lmm")
            elif name == "sft":
                path = stages.get("sft")
            elif name == "mask_frozen":
                skipped[name] = (
                    "needs a run trained with --set mask_generator.training=frozen; give it with "
                    "--checkpoint-for mask_frozen=PATH"
                )
                continue
            else:
                path = final
        if path is None:
            stage = {"lmm_no_history": "lmm", "sft": "sft"}.get(name, "dpo (or sft)")
            skipped[name] = (
                f"no checkpoint: give --checkpoint RUN with {stage}/best, "
                f"or --checkpoint-for {name}=PATH"
            )
            continue
        spec = ModelSpec(
            name, path, overrides=list(overrides), request=dict(request or {}), batch=batch
        )
        if path == final and "dpo" not in stages and stages and name not in checkpoint_for:
            spec.info = "the run has no dpo/best: the final model here is sft/best (stage 1 only)"
        if name == "lmm_no_history":
            spec.text_only = True
        elif name == "mask_off":
            spec.overrides.append("mask_generator.mask_type=none")
        elif name == "mask_random":
            spec.overrides.append("mask_generator.mask_type=random")
        elif name == "best_of_k":
            spec.ratios = tuple(float(r) for r in ratios)
        specs.append(spec)
    return specs, skipped


def evaluation_requests(data: EvalData, cases: list[EvalCase], config, seed: int = 0, **fields):
    """One GenerationRequest per case, as every model method is asked: the most recent history items
    that fit the model, the case's reference and text, seed = seed + index; `fields` set the rest."""
    from pigeon.inference.pipeline import GenerationRequest

    max_history = config.personalizer.max_history
    return [
        GenerationRequest(
            history=list(data.history(c))[-max_history:],
            reference=data.image(c.reference),
            text=c.text,
            seed=seed + i,
            **fields,
        )
        for i, c in enumerate(cases)
    ]


def check_request_fields(request: dict) -> None:
    """`--request KEY=VALUE` keys must be GenerationRequest fields; the error names the bad one."""
    from pigeon.inference.pipeline import GenerationRequest

    fields = {f.name for f in dataclasses.fields(GenerationRequest)}
    bad = sorted(set(request) - fields)
    if bad:
        raise MethodError(
            f"--request {bad[0]}=...: GenerationRequest has no field {bad[0]!r} "
            f"(fields: {', '.join(sorted(fields - {'history', 'reference', 'text'}))})"
        )


class ModelRunner:
    """Loads checkpoints once and generates for a ModelSpec; outputs are resized to the data size."""

    def __init__(self) -> None:
        self._checkpoints: dict[str, object] = {}

    def checkpoint(self, path: Path):
        from pigeon.checkpoint import load_checkpoint

        key = str(Path(path).resolve())
        if key not in self._checkpoints:
            self._checkpoints[key] = load_checkpoint(path)
        return self._checkpoints[key]

    def pipeline(self, spec: ModelSpec):
        from pigeon.config import apply_overrides
        from pigeon.inference.pipeline import PigeonPipeline
        from pigeon.inference.runners import TorchRunner

        ckpt = self.checkpoint(spec.checkpoint)
        config = apply_overrides(ckpt.config, spec.overrides) if spec.overrides else ckpt.config
        return ckpt, PigeonPipeline(config, ckpt.tokenizer, TorchRunner(ckpt.model))

    def requests(self, spec: ModelSpec, pipe, data: EvalData, cases: list[EvalCase], seed: int):
        check_request_fields(spec.request)
        return evaluation_requests(data, cases, pipe.config, seed, **spec.request)

    def generate(
        self, spec: ModelSpec, data: EvalData, cases: list[EvalCase], seed: int = 0
    ) -> tuple[np.ndarray, dict]:
        """uint8 (N, S, S, 3) at the data's size, and notes (truncation, image size, timings)."""
        ckpt, pipe = self.pipeline(spec)
        requests = self.requests(spec, pipe, data, cases, seed)
        images: list[np.ndarray] = []
        start, cpu = time.perf_counter(), time.process_time()
        for j in range(0, len(requests), spec.batch):
            chunk = requests[j : j + spec.batch]
            if spec.text_only:
                images += list(text_only_generate(pipe, chunk))
            elif spec.ratios:
                images += [best_of_k(pipe, ckpt.model, r, spec.ratios) for r in chunk]
            else:
                images += [r.image for r in pipe(chunk)]
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
        out = np.stack(images)
        notes = {
            "checkpoint": str(spec.checkpoint),
            "checkpoint_sha256": ckpt.digest,
            "model_image_size": int(out.shape[1]),
            "overrides": spec.overrides,
            "request": spec.request,
            "max_history": pipe.config.personalizer.max_history,
            "history_truncated": int(
                sum(len(c.history) > pipe.config.personalizer.max_history for c in cases)
            ),
            "generate_seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / max(1, len(cases)), 4),
            # CPU time of all threads: comparable across machines loads (wall time is not)
            "cpu_seconds_per_image": round(cpu / max(1, len(cases)), 4),
        }
        if spec.ratios:
            notes["ratios"] = list(spec.ratios)
        if spec.info:
            notes["info"] = spec.info
        if spec.text_only:
            notes["prompt"] = "stage-0 text-to-image prompt; history and reference unused"
        return resize_images(out, data.size), notes


def generated_images(pipe, requests: list, desc: str, batch: int = 8) -> np.ndarray:
    """uint8 (N, S, S, 3): the pipeline's images for `requests`, `batch` at a time, with progress
    and the wall time printed (the results tools' rows)."""
    from tqdm import tqdm

    began, images = time.perf_counter(), []
    for i in tqdm(range(0, len(requests), batch), desc=desc):
        images += [r.image for r in pipe(requests[i : i + batch])]
    print(desc, f"{time.perf_counter() - began:.0f}s", flush=True)
    return np.stack(images)


def pooled_condition(pipe, images: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N, D) unit pooled condition embeddings of uint8 images: the pipeline's own history encoder
    and condition adapter, the route a user's history takes to the UNet (the results tools' picks,
    never the evaluation's nets)."""
    from pigeon.inference.pipeline import to_model_input

    size = pipe.config.history_encoder.image_size
    encoded = pipe.runner.run(
        "history_encoder", {"images": np.stack([to_model_input(i, size) for i in images])}
    )
    pooled = pipe.runner.run(
        "condition_adapter",
        {"token_ids": encoded["token_ids"], "token_keep": encoded["token_keep"]},
    )["pooled_embeds"].astype(np.float64)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def best_of_k(pipe, model, request, ratios: Sequence[float]) -> np.ndarray:
    """One candidate per reference mask ratio (same seed), the one the stage-2 personalization
    scorer (the model's own history-encoder features) ranks highest."""
    from pigeon.inference.scoring import personalization_scores

    candidates = pipe([dataclasses.replace(request, reference_mask_ratio=float(r)) for r in ratios])
    images = np.stack([c.image for c in candidates])
    history = resize_images(np.stack(request.history), images.shape[1])
    scores = personalization_scores(model, images, history)
    return images[int(np.argmax(scores))]


def text_only_generate(pipe, requests) -> np.ndarray:
    """The stage-0 base LMM as a text-to-image model: the prompt of its training objective
    ("Instruction: " text "\\nResponse: " <img>) with a zero reference embedding, then the same
    condition / denoise / decode stages as the pipeline, the reference not recoloured (it sees no
    history). uint8 (N, S, S, 3)."""
    from pigeon.core.prompt import Prompt, left_pad
    from pigeon.inference.pipeline import request_streams

    requests = [pipe.check_request(r, i) for i, r in enumerate(requests)]
    streams = [request_streams(r.seed) for r in requests]
    _, token_rngs, latent_rngs = (list(s) for s in zip(*streams, strict=True))
    prompts = []
    for r in requests:
        # build_text_to_image appends the target run + </img>; with no target codes that is just
        # </img>, so dropping the last token leaves the prompt ending at <img>
        p = pipe.prompts.build_text_to_image(r.text, np.zeros(0, np.int64))
        prompts.append(
            Prompt(p.input_ids[:-1], p.embed_keep[:-1], p.labels[:-1], p.keep_source[:-1])
        )
    batch = left_pad(prompts)
    reference = np.zeros((len(requests), pipe.config.condition_adapter.context_dim), np.float32)
    codes = pipe.decoder.generate(
        batch,
        reference,
        pipe.config.generation,
        pipe.config.history_encoder.num_patches,
        token_rngs,
    )
    cond = pipe.condition(codes)
    first = requests[0]
    latents = pipe.denoise(
        cond["prompt_embeds"],
        cond["pooled_embeds"],
        first.steps,
        first.guidance,
        first.sampler,
        latent_rngs,
        pipe.reference_pixels(requests, first.strength, from_history=False),
        first.strength,
    )
    return to_uint8(pipe.runner.run("vae_decoder", {"latents": latents})["images"])
