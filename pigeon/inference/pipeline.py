"""`PigeonPipeline`: history + reference + text -> personalized image, on any runner.

Stages (docs/DESIGN.md, "Inference, step by step"), each timed:
    preprocess        decode, pad to square, resize (pigeon.core.images)
    history_encoder   history images and reference -> visual token ids + keep flags
    personalize       mask generator scores -> Gumbel top-k masks -> masked reference through the
                      condition adapter -> <emb>; prompt assembly; personalizer generation (KV cache)
    condition         generated tokens -> prompt_embeds, pooled_embeds (condition adapter)
    denoise           sampler loop over the UNet with classifier-free guidance (zero negatives);
                      with strength < 1 it starts from the reference's latents (vae_encoder), noised,
                      the reference first recoloured from the history by scheduler.style_start;
                      with unet.reference_input every UNet call also sees those latents as channels
    vae_decoder       latents -> pixels

All glue is NumPy and lives in `pigeon.serving` and `pigeon.diffusion`, so the Triton models run the
same code. Every random choice (mask Gumbel noise, token sampling, initial latents) draws from streams
spawned from the request's seed. A request's `timeout_ms` is checked before every step of the two
loops (token generation, denoising; `pigeon.core.deadline`).

    >>> pipe = PigeonPipeline.from_checkpoint("runs/tiny")                      # doctest: +SKIP
    >>> result = pipe(GenerationRequest(history=[...], reference=ref, text="a cat"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pigeon.config import STYLE_STARTS, PipelineConfig
from pigeon.core.deadline import MAX_TIMEOUT_MS, NO_DEADLINE, Deadline
from pigeon.core.decoding import Decoder
from pigeon.core.images import check_array, to_model_input, to_uint8
from pigeon.core.masking import gumbel_noise, mask_sequence, pad_right, select_keep
from pigeon.core.prompt import PromptBuilder, left_pad
from pigeon.core.style_start import recolour
from pigeon.diffusion.guidance import cfg_batch, split_guidance
from pigeon.diffusion.scheduler import SAMPLERS, add_noise, make_sampler, start_index
from pigeon.inference.runners import Runner
from pigeon.specs import component_specs
from pigeon.vocab import TextTokenizer, vocab_layout

MAX_TEXT_CHARS = 1000


class RequestError(ValueError):
    """A request that cannot be served; the message names the field and the value."""


@dataclass
class GenerationRequest:
    history: list[np.ndarray]  # uint8 (H, W, 3) images, oldest first
    reference: np.ndarray  # uint8 (H, W, 3)
    text: str
    seed: int = 0
    steps: int | None = None  # None: the checkpoint's scheduler default
    guidance: float | None = None
    reference_mask_ratio: float | None = None
    sampler: str | None = None
    # None: the checkpoint's scheduler.strength (1.0: from pure noise)
    strength: float | None = None
    # the time budget from the call (served: from the request's arrival); 0 or None: none
    timeout_ms: int | None = None
    style_start: str | None = None  # None: the checkpoint's scheduler.style_start


@dataclass
class PersonalizeInput:
    """One request's tokenized images and instruction, as the personalize stage needs them."""

    history_ids: np.ndarray  # (N, P) code ids
    history_keep: np.ndarray  # (N, P) tokenizer keep flags
    reference_ids: np.ndarray  # (P,)
    reference_keep: np.ndarray  # (P,)
    text: str
    reference_mask_ratio: float


def request_streams(seed: int) -> tuple[np.random.Generator, ...]:
    """Independent generators for the mask Gumbel noise, token sampling and the initial latents."""
    return tuple(np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))


@dataclass
class GenerationResult:
    image: np.ndarray  # uint8 (H, W, 3)
    tokens: np.ndarray  # generated visual codes
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, for the batch


def check_request(
    config: PipelineConfig, request: GenerationRequest, index: int = 0
) -> GenerationRequest:
    """Validate and normalise one request; errors name the field and its value."""
    where = f"request {index}"
    max_history = config.personalizer.max_history
    if not isinstance(request.history, (list, tuple)) or len(request.history) == 0:
        raise RequestError(f"{where}: history is empty; give 1 to {max_history} images")
    if len(request.history) > max_history:
        raise RequestError(
            f"{where}: history has {len(request.history)} images, more than the configured "
            f"maximum of {max_history}"
        )
    history = [check_array(h, f"{where}: history[{i}]") for i, h in enumerate(request.history)]
    reference = check_array(request.reference, f"{where}: reference")
    if not isinstance(request.text, str) or not request.text.strip():
        raise RequestError(f"{where}: text is empty")
    if len(request.text) > MAX_TEXT_CHARS:
        raise RequestError(
            f"{where}: text has {len(request.text)} characters, more than {MAX_TEXT_CHARS}"
        )
    sched = config.scheduler
    steps = sched.num_inference_steps if request.steps is None else request.steps
    if (
        isinstance(steps, bool)
        or not isinstance(steps, int)
        or not (1 <= steps <= sched.num_train_timesteps)
    ):
        raise RequestError(
            f"{where}: steps={steps!r} must be an integer in [1, {sched.num_train_timesteps}]"
        )
    guidance = sched.guidance_scale if request.guidance is None else request.guidance
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
        raise RequestError(f"{where}: guidance={guidance!r} must be a finite number >= 0")
    ratio = (
        config.generation.reference_mask_ratio
        if request.reference_mask_ratio is None
        else request.reference_mask_ratio
    )
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise RequestError(f"{where}: reference_mask_ratio={ratio!r} must be in [0, 1]")
    if (
        isinstance(request.seed, bool)
        or not isinstance(request.seed, int)
        or not (0 <= request.seed < 2**63)
    ):
        raise RequestError(f"{where}: seed={request.seed!r} must be a non-negative integer")
    sampler = request.sampler or sched.sampler
    if sampler not in SAMPLERS:
        raise RequestError(f"{where}: sampler={sampler!r} is not one of {sorted(SAMPLERS)}")
    strength = sched.strength if request.strength is None else request.strength
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not 0.0 < strength <= 1.0
    ):
        raise RequestError(f"{where}: strength={strength!r} must be in (0, 1]")
    timeout_ms = request.timeout_ms or 0
    if (
        isinstance(timeout_ms, bool)
        or not isinstance(timeout_ms, int)
        or not 0 <= timeout_ms <= MAX_TIMEOUT_MS
    ):
        raise RequestError(
            f"{where}: timeout_ms={timeout_ms!r} must be an integer in [0, {MAX_TIMEOUT_MS}] "
            "(0: no deadline)"
        )
    style_start = request.style_start or sched.style_start
    if style_start not in STYLE_STARTS:
        raise RequestError(
            f"{where}: style_start={style_start!r} is not one of {', '.join(STYLE_STARTS)}"
        )
    return GenerationRequest(
        history,
        reference,
        request.text,
        request.seed,
        steps,
        float(guidance),
        float(ratio),
        sampler,
        float(strength),
        timeout_ms,
        style_start,
    )


class PigeonPipeline:
    def __init__(self, config: PipelineConfig, tokenizer: TextTokenizer, runner: Runner) -> None:
        self.config = config
        self.runner = runner
        self.vocab = vocab_layout(config)
        self.prompts = PromptBuilder(tokenizer, self.vocab)
        self.specs = component_specs(config)
        pz = config.personalizer
        self.decoder = Decoder(
            lambda feeds: runner.run("personalizer", feeds),
            self.vocab,
            pz.num_layers,
            pz.num_heads,
            pz.hidden_size // pz.num_heads,
        )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "cpu", compile: dict[str, str] | None = None
    ) -> PigeonPipeline:
        """The PyTorch pipeline of a checkpoint folder (other backends: their runner + `__init__`);
        `compile` maps components to torch.compile modes (`runners.GPU_COMPILE` on a GPU)."""
        from pigeon.checkpoint import load_checkpoint
        from pigeon.inference.runners import TorchRunner

        ckpt = load_checkpoint(path)
        return cls(ckpt.config, ckpt.tokenizer, TorchRunner(ckpt.model, device, compile))

    # ----------------------------------------------------------------------------------------------
    def check_request(self, request: GenerationRequest, index: int = 0) -> GenerationRequest:
        return check_request(self.config, request, index)

    # ----------------------------------------------------------------------------------------------
    def __call__(
        self, requests: GenerationRequest | list[GenerationRequest]
    ) -> list[GenerationResult]:
        single = isinstance(requests, GenerationRequest)
        requests = [requests] if single else list(requests)
        if not requests:
            raise RequestError("no requests given")
        received_s = time.time()
        requests = [self.check_request(r, i) for i, r in enumerate(requests)]
        first = requests[0]
        shared = ("steps", "guidance", "sampler", "strength", "timeout_ms")
        for i, r in enumerate(requests[1:], 1):
            if any(getattr(r, k) != getattr(first, k) for k in shared):
                raise RequestError(
                    f"request {i}: {', '.join(shared)} must match request 0 within one batch"
                )
        deadline = Deadline.after(first.timeout_ms, received_s)
        timings: dict[str, float] = {}
        streams = [request_streams(r.seed) for r in requests]
        mask_rngs, token_rngs, latent_rngs = (list(s) for s in zip(*streams, strict=True))

        with _timer(timings, "preprocess"):
            size = self.config.history_encoder.image_size
            images = [
                to_model_input(img, size) for r in requests for img in (*r.history, r.reference)
            ]
        with _timer(timings, "history_encoder"):
            encoded = self.runner.run("history_encoder", {"images": np.stack(images)})
        with _timer(timings, "personalize"):
            items, start = [], 0
            ids, keep = encoded["token_ids"], encoded["token_keep"]
            for r in requests:
                n = len(r.history)
                items.append(
                    PersonalizeInput(
                        ids[start : start + n],
                        keep[start : start + n],
                        ids[start + n],
                        keep[start + n],
                        r.text,
                        r.reference_mask_ratio,
                    )
                )
                start += n + 1
            codes = self.personalize(items, mask_rngs, token_rngs, deadline)
        with _timer(timings, "condition"):
            cond = self.condition(codes)
        with _timer(timings, "denoise"):
            latents = self.denoise(
                cond["prompt_embeds"],
                cond["pooled_embeds"],
                first.steps,
                first.guidance,
                first.sampler,
                latent_rngs,
                self.reference_pixels(requests, first.strength),
                first.strength,
                deadline,
            )
        with _timer(timings, "vae_decoder"):
            pixels = self.runner.run("vae_decoder", {"latents": latents})["images"]
        out = to_uint8(pixels)
        timings["total"] = sum(timings.values())
        return [GenerationResult(out[i], codes[i], dict(timings)) for i in range(len(requests))]

    # ----------------------------------------------------------------------------------------------
    def personalize(
        self,
        items: list[PersonalizeInput],
        mask_rngs: list[np.random.Generator],
        token_rngs: list[np.random.Generator],
        deadline: Deadline = NO_DEADLINE,
    ) -> list[np.ndarray]:
        """Mask generator -> masked reference -> prompt -> generated codes, one array per item;
        `deadline` is checked before each generated token."""
        # 1. per item: kept tokens of each image, in raster order
        runs = [
            (
                [h[k > 0] for h, k in zip(it.history_ids, it.history_keep, strict=True)],
                it.reference_ids[it.reference_keep > 0],
            )
            for it in items
        ]
        # 2. mask generator scores, then Gumbel top-k keep decisions
        seqs = [mask_sequence(h, ref) for h, ref in runs]
        ids, pos, types = (pad_right([s[j] for s in seqs]) for j in range(3))
        scores = self.runner.run(
            "mask_generator", {"token_ids": ids, "position_ids": pos, "type_ids": types}
        )
        noise = np.stack([gumbel_noise(g, ids.shape[1:]) for g in mask_rngs])
        mg = self.config.mask_generator
        keep = np.stack(
            [
                select_keep(
                    scores["token_scores"][i : i + 1],
                    types[i : i + 1],
                    history_ratio=mg.history_mask_ratio if mg.mask_type == "mutual" else 0.0,
                    reference_ratio=r.reference_mask_ratio if mg.mask_type != "none" else 0.0,
                    gumbel=noise[i : i + 1],
                )[0]
                for i, r in enumerate(items)
            ]
        )
        # 3. the masked reference through the condition adapter -> reference_embedding for <emb>
        p = self.config.history_encoder.num_patches
        ref_ids = np.zeros((len(items), p), np.int64)
        ref_keep = np.zeros((len(items), p), np.int64)
        history_keep = []
        for i, (hist, ref) in enumerate(runs):
            n_hist = sum(len(h) for h in hist)
            kept = keep[i, n_hist : n_hist + len(ref)] > 0
            ref_ids[i, : len(ref)] = ref
            ref_keep[i, : len(ref)] = kept
            bounds = np.cumsum([0] + [len(h) for h in hist])
            history_keep.append(
                [keep[i, a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=False)]
            )
        reference = self.runner.run(
            "condition_adapter", {"token_ids": ref_ids, "token_keep": ref_keep}
        )
        # 4. prompt and generation
        prompts = [
            self.prompts.build(r.text, hist, hk)
            for r, (hist, _), hk in zip(items, runs, history_keep, strict=True)
        ]
        batch = left_pad(prompts)
        seq_max = self.specs["personalizer"].dims["seq"].max
        if batch.input_ids.shape[1] > seq_max:
            raise RequestError(
                f"prompt has {batch.input_ids.shape[1]} tokens (history images and text), more "
                f"than the personalizer's maximum of {seq_max} (half of "
                f"personalizer.max_positions={self.config.personalizer.max_positions}); send fewer "
                "history images or a shorter text"
            )
        return self.decoder.generate(
            batch, reference["reference_embedding"], self.config.generation, p, token_rngs, deadline
        )

    def condition(self, codes: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Generated codes -> UNet conditioning (prompt_embeds, pooled_embeds)."""
        ids, keep = codes_to_tokens(codes, self.config.history_encoder.num_patches)
        return self.runner.run("condition_adapter", {"token_ids": ids, "token_keep": keep})

    def reference_pixels(
        self, requests: list[GenerationRequest], strength: float, from_history: bool = True
    ) -> np.ndarray | None:
        """The requests' references as `denoise` takes them (batch, 3, S, S) in [0, 1], or None when
        neither the image-to-image start nor the UNet's reference input needs them.
        from_history=False: not recoloured by `scheduler.style_start` (a method that sees no history)."""
        if strength >= 1.0 and not self.config.unet.reference_input:
            return None
        return np.stack(
            [
                reference_start(
                    self.config,
                    r.reference,
                    r.history if from_history else None,
                    strength,
                    r.style_start,
                )
                for r in requests
            ]
        )

    def denoise(
        self,
        prompt_embeds: np.ndarray,
        pooled_embeds: np.ndarray,
        steps: int,
        guidance: float,
        sampler_name: str,
        rngs: list[np.random.Generator],
        references: np.ndarray | None = None,
        strength: float = 1.0,
        deadline: Deadline = NO_DEADLINE,
    ) -> np.ndarray:
        """The visible denoising loop: sampler + classifier-free guidance over the UNet, with
        `deadline` checked before each step.

        strength < 1 (image-to-image): `references` (batch, 3, S, S) in [0, 1] are encoded, noised to
        the first timestep kept by `start_index`, and the loop runs only the remaining steps. With
        `unet.reference_input` their latents are also an input of every UNet call, in both branches.
        """
        c, h = self.config.vae.latent_channels, self.config.latent_size
        sampler = make_sampler(self.config.scheduler, steps, sampler_name)
        noise = np.stack([g.standard_normal((c, h, h), dtype=np.float32) for g in rngs])
        start = start_index(steps, strength)
        reference_input = self.config.unet.reference_input
        clean = None
        if strength < 1.0 or reference_input:
            if references is None:
                why = "the UNet's reference input" if reference_input else f"strength={strength}"
                raise RequestError(f"{why} needs the reference images")
            clean = self.runner.run("vae_encoder", {"images": references})["latents"]
        if strength < 1.0:
            a_start = sampler.a(int(sampler.timesteps[start]))
            latents = add_noise(clean, noise, np.float32(a_start)).astype(np.float32)
        else:
            latents = noise * np.float32(sampler.init_noise_sigma)
        context, pooled = cfg_batch(prompt_embeds, pooled_embeds, guidance)
        s = float(self.config.image_size)
        time_ids = np.tile(np.array([s, s, 0, 0, s, s], np.float32), (len(context), 1))
        branches = len(context) // len(latents)  # 2 under classifier-free guidance
        # the reference stays in both branches: guidance amplifies the personalized tokens only
        reference = (
            {"reference_latents": np.concatenate([clean] * branches)} if reference_input else {}
        )
        for i in range(start, len(sampler.timesteps)):
            deadline.check(i - start, len(sampler.timesteps) - start, "denoising steps")
            t = sampler.timesteps[i]
            model_input = np.concatenate([latents] * branches)
            noise_pred = self.runner.run(
                "unet",
                {
                    "latents": model_input,
                    "timestep": np.full(len(model_input), t, np.float32),
                    "prompt_embeds": context,
                    "pooled_embeds": pooled,
                    "time_ids": time_ids,
                    **reference,
                },
            )["noise_pred"]
            latents = sampler.step(split_guidance(noise_pred, guidance), i, latents)
        return latents


def reference_start(
    config: PipelineConfig,
    reference: np.ndarray,
    history: list[np.ndarray] | None,
    strength: float,
    style_start: str | None = None,
) -> np.ndarray:
    """One request's reference as `denoise` takes it, (3, S, S) in [0, 1]: below strength 1,
    recoloured from its history by `style_start` (None: the checkpoint's `scheduler.style_start`;
    `pigeon.core.style_start`); a history of None leaves it as it is."""
    size = config.image_size
    pixels = to_model_input(reference, size)
    method = style_start or config.scheduler.style_start
    if strength >= 1.0 or method == "none" or history is None:
        return pixels
    return recolour(pixels, np.stack([to_model_input(h, size) for h in history]), method)


def codes_to_tokens(codes: list[np.ndarray], p: int) -> tuple[np.ndarray, np.ndarray]:
    """Generated codes -> token_ids, token_keep (batch, P): the first len(codes) slots kept."""
    ids = np.zeros((len(codes), p), np.int64)
    keep = np.zeros((len(codes), p), np.int64)
    for i, c in enumerate(codes):
        ids[i, : len(c)] = c[:p]
        keep[i, : min(len(c), p)] = 1
    return ids, keep


class _timer:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = time.perf_counter() - self.start
