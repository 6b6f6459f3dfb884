"""The training loop shared by every stage: one command per stage, resumable, distributed.

    pigeon train image --preset tiny --data procedural --out runs/tiny
    pigeon train all   --preset small --data data/emojiprefs --out runs/small [--resume]
    torchrun --nproc-per-node 2 -m pigeon.cli train sft --preset tiny --data procedural --out runs/x

Layout of a run (each stage starts from the previous stage's best checkpoint):

    RUN/<stage>/train_config.json   the resolved TrainConfig and model config, with versions
    RUN/<stage>/log.jsonl           one line per logged step and per validation
    RUN/<stage>/last/, best/        checkpoints (safetensors + JSON; what inference loads)
    RUN/<stage>/trainer_state.pt    optimizer, scheduler, RNG states, step: only --resume reads it

Exact resume: a step's data come from `rng([seed, step])` and every torch random draw from a generator
reseeded per step, so an interrupted run continued with --resume equals an uninterrupted one.
Distributed: under `torchrun`, every rank makes the same global batch and trains on its slice with
DistributedDataParallel (gloo on CPU, NCCL on GPU); rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pigeon.checkpoint import load_checkpoint, save_checkpoint
from pigeon.config import ConfigError, PipelineConfig, apply_overrides, preset, save_json, to_dict
from pigeon.core.prompt import PromptBuilder
from pigeon.core.style_start import recolour_image
from pigeon.diffusion.scheduler import alphas_cumprod
from pigeon.models.pigeon import to_tensor
from pigeon.models.unet import ConditionSketch
from pigeon.training import objectives as O
from pigeon.training.curves import plot_curves
from pigeon.training.data import User, load_data
from pigeon.training.frozen import FrozenEncodings, image_latents
from pigeon.training.stages import STAGE_NAMES, STYLE_STAGES, set_trainable, stage_spec
from pigeon.vocab import DEFAULT_CORPUS, TextTokenizer, train_text_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One stage's optimisation and data settings (`train.KEY=VALUE` overrides them)."""

    stage: str  # a name of pigeon.training.stages.STAGES
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    val_every: int = 50
    val_batches: int = 2
    history_length: int = 5
    noise_ratio: float = 0.2
    # the reference of stages 1 and 2: "other_style", the target's concept in another style, where
    # the data pair one (procedural, EmojiPrefs); "target", the target itself (the official code's
    # window, user data); "auto" picks by the data
    reference: Literal["auto", "target", "other_style"] = "auto"
    dpo_beta: float = 0.1
    dpo_pairs: int = 32
    dpo_ratios: tuple[float, ...] = (0.0, 0.5, 1.0)
    dpo_steps_per_candidate: int = 4
    # "shared": one seed for a pair's candidates (pigeon.training.dpo.candidate_requests)
    dpo_seeds: Literal["shared", "per_candidate"] = "shared"
    # image stage: fail when the tokenizer's code perplexity on validation images (exp entropy of the
    # codes of kept tokens) is below this after a quarter of the steps: a collapsed tokenizer makes
    # every later stage meaningless (0 = no check)
    min_code_perplexity: float = 0.0
    # image stage: weight of the latent reconstruction from the condition (the UNet's condition
    # sketch, or a training-only probe of the same form for a UNet without one)
    reconstruct_weight: float = 0.0
    # decoder stage: the share of each batch whose tokens come from a history image (the user's
    # style, another concept) rather than the target's own. The target's tokens carry its concept, so
    # a UNet trained on them alone learns to ignore the reference input, and at serving the
    # personalizer's tokens, which miss the concept, then decide it; a history image's tokens carry
    # only the style, so the concept has to come from the reference
    history_token_share: float = 0.0
    # image and decoder stages: weight of a style classification of the condition's pooled
    # embedding (the style of the image whose tokens made it), by a training-only linear head. In
    # the decoder stage the condition adapter then trains beside the UNet, so the pooled embedding,
    # which reaches every ResNet block through the time embedding, becomes a style code; in the
    # image stage the gradient reaches the tokenizer too, so the codes themselves carry the style.
    # Needs data with style labels (EmojiPrefs, procedural); the stages that read the tokens or
    # the reference embedding (lmm, sft) must come after it
    style_weight: float = 0.0
    # image and decoder stages: Min-SNR-gamma weighting of the diffusion loss (0 = uniform). The
    # epsilon loss weighs an error in the image by the timestep's SNR, so uniform timesteps spend
    # most of the gradient on low-noise steps where the noisy latents give the answer and the
    # condition matters least; 5 is the Min-SNR paper's gamma
    snr_gamma: float = 0.0
    # decoder stage: draw the training timesteps from the first this share of the schedule. Serving
    # starts from the reference noised to strength x T (0.5 for `checkpoints/small`), so the UNet is
    # only ever asked about the timesteps below that; 1 = the whole schedule
    max_timestep_fraction: float = 1.0
    # decoder stage: the share of each batch trained on serving's image-to-image path, the noisy
    # latents started from the reference (another style) at a strength below
    # `reference_start_strength` while the target stays the target
    # (objectives.reference_start_noise). Otherwise the noisy latents always show the target's own
    # style, so the UNet learns to trust them, and at serving the reference's noised latents decide
    # the style; 0 = off
    reference_start_share: float = 0.0
    reference_start_strength: float = 0.8
    # decoder stage: each reference recoloured from its user's history (`history_length` images,
    # `noise_ratio` of them in another style) as serving does with `scheduler.style_start`, so the
    # UNet's reference input is trained on what it is fed at serving; "none" = the reference as is
    style_start: Literal["none", "moments", "histogram"] = "none"
    # vae stage: weight of the perceptual distance (pigeon.training.perceptual) beside L1
    perceptual_weight: float = 0.0
    # vae stage: train the decoder alone on the frozen encoder's latents. The latent space, and so
    # every network trained on it after the VAE, stays valid: a longer VAE decoder can be trained
    # into a finished checkpoint (`--init CKPT`) without retraining the stages after it
    vae_decoder_only: bool = False
    # vae, image, decoder: validation users on which the stage's link of the image chain is
    # scored (pigeon.evaluation.chain; EmojiPrefs data only); 0 = none
    chain_users: int = 32
    # sft, dpo: train the personalizer's LoRA alone (`pigeon train sft --lora-only`), so that the
    # result is an adapter for `pigeon deploy --lora`, the rest of the checkpoint unchanged
    lora_only: bool = False
    # sft stage: train the LLM's base weights beside its LoRA (other stages ignore it). The paper's
    # LMM is pretrained and large, so a rank-8 LoRA on q and v is enough there; a small LLM trained
    # here from scratch gains from it (docs/RESULTS.md §7). A checkpoint trained so has a new base:
    # `pigeon deploy --lora` refuses adapters trained on the old one.
    sft_base: bool = False
    # "bf16": the forward pass under CPU/CUDA autocast to bfloat16 (weights, optimizer and losses
    # stay float32); validation always runs in float32. "auto": bf16 where the device computes it
    # natively (`resolve_precision`), else fp32
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    # image and decoder stages: memory for what the frozen encoders make of each image drawn (the
    # VAE's latents; in the decoder stage the tokenizer's codes too), computed once per image
    # (pigeon.training.frozen); 0 = encode every batch afresh
    frozen_cache_mib: float = 1024.0

    def __post_init__(self) -> None:
        if self.sft_base and self.lora_only:
            raise ConfigError(
                "train.sft_base trains the LLM's base weights, --lora-only the LoRA alone: "
                "choose one"
            )
        if self.stage not in STAGE_NAMES:
            raise ConfigError(f"train.stage={self.stage!r} is not one of {list(STAGE_NAMES)}")
        if self.style_weight < 0:
            raise ConfigError(f"train.style_weight={self.style_weight} is negative")
        if not 0.0 < self.max_timestep_fraction <= 1.0:
            raise ConfigError(
                f"train.max_timestep_fraction={self.max_timestep_fraction} is outside (0, 1]"
            )
        if not 0.0 <= self.reference_start_share <= 1.0:
            raise ConfigError(
                f"train.reference_start_share={self.reference_start_share} is outside [0, 1]"
            )
        if not 0.0 < self.reference_start_strength <= 1.0:
            raise ConfigError(
                f"train.reference_start_strength={self.reference_start_strength} is outside (0, 1]"
            )
        if self.snr_gamma < 0:
            raise ConfigError(f"train.snr_gamma={self.snr_gamma} is negative (0 turns it off)")
        if not 0.0 <= self.history_token_share <= 1.0:
            raise ConfigError(
                f"train.history_token_share={self.history_token_share} is outside [0, 1]"
            )
        if self.frozen_cache_mib < 0:
            raise ConfigError(f"train.frozen_cache_mib={self.frozen_cache_mib} is negative")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(
                f"train: steps={self.steps}, batch_size={self.batch_size}, "
                f"lr={self.lr} must be positive"
            )


# Steps per stage, then the batch of the stages that read images or targets and of those that read
# users. `small` is sized for a 2-core CPU with EmojiPrefs at 64 px: about 90 minutes in all where the
# convolutional stages run in bf16 (AVX-512 bf16), about 3 hours 20 minutes in float32 on an AVX2 CPU,
# from each stage's measured step time (docs/DESIGN.md, "Training").
RECIPE_STEPS = {
    "tiny": ({"vae": 4, "image": 16, "decoder": 8, "lmm": 8, "sft": 8, "dpo": 2}, 4, 4),
    "small": (
        {"vae": 1500, "image": 2000, "decoder": 1000, "lmm": 800, "sft": 800, "dpo": 200},
        32,
        8,
    ),
    "base": (
        {"vae": 10000, "image": 40000, "decoder": 20000, "lmm": 20000, "sft": 20000, "dpo": 5000},
        64,
        16,
    ),
}


def recipe(preset_name: str) -> dict[str, TrainConfig]:
    """Per-stage defaults: `tiny` runs the whole recipe in about a minute on 2 cores; `small` is sized
    for EmojiPrefs at 64 px on a 2-core CPU (90 minutes with bf16, 3 hours 20 without); `base` for
    GPUs."""
    if preset_name not in RECIPE_STEPS:
        raise ConfigError(
            f"no training recipe for preset {preset_name!r}; choose {sorted(RECIPE_STEPS)}"
        )
    steps, batch, users = RECIPE_STEPS[preset_name]
    # the convolutional stages under bf16 autocast where the device has native bf16: about 2x faster
    # VAE steps on a 2-core CPU with AVX-512 bf16; the small transformer stages stay float32
    precision = "fp32" if preset_name == "tiny" else "auto"

    def every(stage_steps: int) -> int:  # validate four times a stage
        return max(2, stage_steps // 4)

    return {
        "vae": TrainConfig(
            stage="vae",
            steps=steps["vae"],
            batch_size=batch,
            lr=1e-3,
            val_every=every(steps["vae"]),
            perceptual_weight=0.0 if preset_name == "tiny" else 0.1,
            precision=precision,
        ),
        "image": TrainConfig(
            stage="image",
            steps=steps["image"],
            batch_size=batch,
            lr=5e-4,
            val_every=every(steps["image"]),
            min_code_perplexity=0.0 if preset_name == "tiny" else 4.0,
            # measured on small: without it the UNet ignored its condition (docs/RESULTS.md §4)
            reconstruct_weight=1.0,
            precision=precision,
        ),
        "decoder": TrainConfig(
            stage="decoder",
            steps=steps["decoder"],
            batch_size=batch,
            lr=5e-4,
            val_every=every(steps["decoder"]),
            precision=precision,
        ),
        "lmm": TrainConfig(
            stage="lmm",
            steps=steps["lmm"],
            batch_size=batch,
            lr=5e-4,
            val_every=every(steps["lmm"]),
        ),
        "sft": TrainConfig(
            stage="sft",
            steps=steps["sft"],
            batch_size=users,
            lr=1e-3,
            val_every=every(steps["sft"]),
        ),
        "dpo": TrainConfig(
            stage="dpo",
            steps=steps["dpo"],
            batch_size=users,
            lr=5e-5,
            val_every=every(steps["dpo"]),
            dpo_pairs=max(4, users * 4),
            # the 8-step tiny LM generates the same tokens at every mask ratio under one seed
            dpo_seeds="per_candidate" if preset_name == "tiny" else "shared",
        ),
    }


# --- distributed -------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size())


# --- one step's batch --------------------------------------------------------------------------


def step_rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A seed for (run seed, step, salt) that is the same in every process (no str hashing)."""
    return int(np.random.SeedSequence([seed, step, salt]).generate_state(1)[0])


def native_bf16(device: str) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU that supports it, or a CPU whose oneDNN
    has bf16 kernels (AVX-512 bf16 / AMX). Elsewhere bf16 convolutions take PyTorch's slow
    reference path (measured 34 s against 1.7 s for a `small` decoder step on an AVX2 CPU)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return kind == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: str) -> str:
    """`train.precision` -> "fp32" or "bf16": "auto" takes bf16 where `native_bf16`; an explicit
    "bf16" without it is kept, with a warning that it will be slow."""
    if precision == "auto":
        chosen = "bf16" if native_bf16(device) else "fp32"
        log.info("train.precision=auto -> %s on %s", chosen, device)
        return chosen
    if precision == "bf16" and not native_bf16(device):
        log.warning(
            "train.precision=bf16 on %s without native bf16: its convolutions take the slow "
            "reference path (about 20x slower here); train.precision=auto or fp32 avoids it",
            device,
        )
    return precision


def reseed_torch(seed: int, step: int, rank: int) -> None:
    """Every torch random draw of a step (noise, timesteps, dropout, Gumbel) from a known state."""
    torch.manual_seed(step_seed(seed, step, 1 + rank))


class StageModule(nn.Module):
    """The stage's objective (`Stage.objective`) as a module, so DistributedDataParallel can wrap it.
    `options` is the stage's TrainConfig; `style_count` the data's number of style labels."""

    def __init__(
        self,
        model: nn.Module,
        name: str,
        builder: PromptBuilder,
        options: TrainConfig,
        reference_personalizer: nn.Module | None = None,
        style_count: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = stage_spec(name)
        self.builder = builder
        self.options = options
        self.reference_personalizer = reference_personalizer
        self.perceptual = None
        self.frozen = FrozenEncodings(
            options.frozen_cache_mib
        )  # read by the image and decoder stages
        if name == "vae" and options.perceptual_weight > 0:
            from pigeon.training.perceptual import PerceptualDistance

            self.perceptual = PerceptualDistance()
        # training-only heads (their weights live in the trainer state, not the model): the image
        # stage's latent probe, the decoder stage's style classifier; initialised from a fixed seed,
        # so a run's start does not hang on what drew from the global generator before it
        self.heads = nn.ModuleDict()
        with torch.random.fork_rng():
            torch.manual_seed(options.seed)
            sketching = model.config.unet.condition_sketch
            if name == "image" and options.reconstruct_weight > 0 and not sketching:
                self.heads["probe"] = ConditionSketch(model.config)
            if name in STYLE_STAGES and options.style_weight > 0:
                pooled_dim = model.config.condition_adapter.pooled_dim
                self.heads["style"] = nn.Linear(pooled_dim, style_count)
        self.register_buffer(
            "alphas_cumprod",
            torch.from_numpy(alphas_cumprod(model.config.scheduler)).float(),
            persistent=False,
        )

    def train(self, mode: bool = True) -> StageModule:
        """DPO's policy trains with every dropout off, as its frozen reference runs (TRL's
        `disable_dropout`): otherwise the log-ratio differs between the two by dropout noise alone."""
        super().train(mode)
        if self.spec.name == "dpo":
            for module in self.model.modules():
                if isinstance(module, nn.Dropout):
                    module.eval()
        return self

    def forward(self, batch: dict) -> torch.Tensor:
        return self.spec.objective(self, batch)


def users_batch(users: list[User], config: TrainConfig, device: str) -> O.PersonalizationBatch:
    return O.PersonalizationBatch(
        history=to_tensor([u.history for u in users]).to(device),
        target=to_tensor([u.target for u in users]).to(device),
        texts=[u.text for u in users],
        reference=(
            to_tensor([u.reference for u in users]).to(device)
            if config.reference == "other_style"
            else None
        ),
    )


def decoder_batch(
    users: list[User], device: str, paired_reference: bool, history: bool = False
) -> dict:
    """Targets, each user's last history image where `history` (`history_token_share` > 0),
    references for a UNet that takes them (data that pair one apart from the target), and the
    targets' and those history images' style labels where the data carry them."""
    labelled = all(u.target_style is not None and u.history_styles for u in users)
    return {
        "targets": to_tensor([u.target for u in users]).to(device),
        "history": to_tensor([u.history[-1] for u in users]).to(device) if history else None,
        "references": (
            to_tensor([u.reference for u in users]).to(device) if paired_reference else None
        ),
        "target_styles": (
            torch.tensor([u.target_style for u in users], device=device) if labelled else None
        ),
        "history_styles": (
            torch.tensor([u.history_styles[-1] for u in users], device=device) if labelled else None
        ),
    }


def resolve_reference(config: TrainConfig, data, data_source: str) -> TrainConfig:
    """`train.reference=auto` -> what the data offer; other_style on data without it is refused."""
    if config.reference == "auto":
        chosen = "other_style" if data.paired_reference else "target"
        return dataclasses.replace(config, reference=chosen)
    if config.reference == "other_style" and not data.paired_reference:
        raise ConfigError(
            f"train.reference=other_style needs data with a reference apart from the target; "
            f"--data {data_source} ({data.name}) has none: use train.reference=target or auto"
        )
    return config


def make_batch(
    data, config: TrainConfig, step: int, dist: Dist, device: str, pairs: list | None = None
) -> dict:
    """The global batch of `step`, then this rank's slice of it."""
    rng = step_rng(config.seed, step)
    share = slice(
        dist.rank * config.batch_size // dist.world,
        (dist.rank + 1) * config.batch_size // dist.world,
    )
    generator = random.Random(step_seed(config.seed, step))  # r ~ U(0, 1): once per global batch
    reads = stage_spec(config.stage).reads
    if reads == "images":
        images, texts, styles = data.labelled_images(rng, config.batch_size)
        return {
            "images": to_tensor(images[share]).to(device),
            "texts": texts[share],
            "styles": None if styles is None else torch.from_numpy(styles[share]).to(device),
        }
    if reads == "targets":  # a target, its concept in another style, one history image
        if config.style_start == "none":
            users = data.users(rng, config.batch_size, 1, 0.0)[share]
        else:  # a history to recolour the reference from, as serving's
            users = data.users(rng, config.batch_size, config.history_length, config.noise_ratio)
            users = [
                dataclasses.replace(
                    u, reference=recolour_image(u.reference, u.history, config.style_start)
                )
                for u in users[share]
            ]
        return decoder_batch(users, device, data.paired_reference, config.history_token_share > 0)
    if reads == "users":
        users = data.users(rng, config.batch_size, config.history_length, config.noise_ratio)
        return {"users": users_batch(users[share], config, device), "generator": generator}
    chosen = rng.choice(len(pairs), config.batch_size)[share]
    picked = [pairs[i] for i in chosen]
    return {
        "users": users_batch([p["user"] for p in picked], config, device),
        "chosen": [p["chosen"] for p in picked],
        "rejected": [p["rejected"] for p in picked],
        "beta": config.dpo_beta,
        "generator": generator,
    }


# --- checkpoints and state ---------------------------------------------------------------------


def stage_dir(run: Path, stage: str) -> Path:
    return run / stage


def initial_model(run: Path, stage: str, config: PipelineConfig, init: str | None):
    """`--init` where given, else the previous stage's best (or last) checkpoint in the run folder,
    else a fresh model and tokenizer."""
    if init:
        ckpt = load_checkpoint(init)
        return ckpt.model, ckpt.tokenizer, init
    order = list(STAGE_NAMES)
    for previous in reversed(order[: order.index(stage)]):
        for kind in ("best", "last"):
            path = stage_dir(run, previous) / kind
            if (path / "pipeline.json").exists():
                ckpt = load_checkpoint(path)
                return ckpt.model, ckpt.tokenizer, str(path)
    size = config.personalizer.text_vocab_size
    return (
        fresh_model(config),
        TextTokenizer(train_text_tokenizer(DEFAULT_CORPUS, size), size),
        "fresh",
    )


def fresh_model(config: PipelineConfig):
    """The untrained model a fresh run starts from: the same weights for the same config, every
    time (seed 0), so that a stage can be rerun from the draw an earlier run started with."""
    from pigeon.models.pigeon import PigeonModel

    torch.manual_seed(0)
    return PigeonModel(config)


def with_model_overrides(model, overrides: list[str], source: str):
    """`--set` model overrides on a model loaded from a checkpoint (a previous stage's, --init's or
    --resume's): the same weights under the changed config, e.g. `mask_generator.training=frozen`
    for the sft stage. An override that would change a weight's shape is refused: it needs a
    fresh run (or, for unet.reference_input, the decoder stage)."""
    from pigeon.models.pigeon import PigeonModel

    config = apply_overrides(model.config, overrides)
    if config == model.config:
        return model
    rebuilt = PigeonModel(config)
    try:
        rebuilt.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError:
        raise ConfigError(
            f"{source}: --set {' '.join(overrides)} changes the shape of its weights; "
            "start a fresh run (a new --out) with it"
        ) from None
    return rebuilt


def save_state(
    path: Path, step: int, optimizer, scheduler, best: float, heads: nn.Module | None = None
) -> None:
    tmp = path.with_suffix(".tmp")
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best": best,
    }
    if heads is not None and len(heads):
        state["heads"] = heads.state_dict()
    torch.save(state, tmp)
    tmp.replace(path)


def lr_lambda(config: TrainConfig):
    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return schedule


# --- the loop ----------------------------------------------------------------------------------


def train_stage(
    stage: str,
    run: str | Path,
    *,
    preset_name: str = "tiny",
    data_source: str = "procedural",
    overrides: list[str] | None = None,
    resume: bool = False,
    init: str | None = None,
    device: str = "cpu",
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train one stage into RUN/<stage>; returns a summary (losses, times, peak memory).

    stop_after: leave after this many steps of this invocation (checkpoint and state saved), to be
    continued with resume=True, e.g. a long recipe spread over several sittings."""
    import resource

    try:
        spec = stage_spec(stage)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    dist = init_distributed()
    run = Path(run)
    out = stage_dir(run, stage)
    train_overrides = [
        o.split("=", 1)[0].removeprefix("train.") + "=" + o.split("=", 1)[1]
        for o in overrides or []
        if o.startswith("train.")
    ]
    model_overrides = [o for o in overrides or [] if not o.startswith("train.")]
    config = apply_overrides(recipe(preset_name)[stage], train_overrides)
    state_path = out / "trainer_state.pt"
    if resume and (out / "last" / "pipeline.json").exists():
        ckpt = load_checkpoint(out / "last")
        model, tokenizer, source = ckpt.model, ckpt.tokenizer, str(out / "last")
    else:
        if resume:
            log.info("%s: nothing to resume in %s; starting the stage", stage, out)
        resume = False
        pipeline_config = apply_overrides(preset(preset_name), model_overrides)
        model, tokenizer, source = initial_model(run, stage, pipeline_config, init)
    model = with_model_overrides(model, model_overrides, source)
    data = load_data(data_source, model.config.image_size)
    config = resolve_reference(config, data, data_source)
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))
    if stage == "decoder" and data.paired_reference and not model.config.unet.reference_input:
        model.enable_reference_input()  # zero-initialised: the model computes what it did
    if stage == "decoder" and not data.paired_reference and model.config.unet.reference_input:
        raise ConfigError(
            f"{source}: this model's UNet takes the reference's latents (unet.reference_input), "
            f"but --data {data_source} pairs no reference apart from the target, and the decoder "
            "stage would teach it to copy its input; start from a checkpoint without it"
        )
    if stage == "decoder" and config.reference_start_share > 0 and not data.paired_reference:
        raise ConfigError(
            f"train.reference_start_share={config.reference_start_share} starts from the "
            f"reference, but --data {data_source} pairs no reference apart from the target"
        )
    if stage == "image" and model.config.unet.reference_input:
        raise ConfigError(
            f"{source}: the image stage trains the UNet without a reference, but this model's "
            "unet.reference_input is on (the decoder stage, which comes after it, turns it on)"
        )
    model.to(device).train()
    link = None  # the stage's link of the image chain, logged at validation
    emojiprefs = getattr(data, "name", "") == "emojiprefs"
    if dist.main and spec.chain_link and emojiprefs and config.chain_users > 0:
        from pigeon.evaluation.chain import TrainingLink

        link = TrainingLink.load(data_source, config.chain_users)
    builder = PromptBuilder(tokenizer, model.vocab)
    if config.lora_only and not spec.lora:
        raise ConfigError(f"train.lora_only applies to the sft and dpo stages, not {stage!r}")
    style_weight = config.style_weight if stage in STYLE_STAGES else 0.0
    if style_weight > 0 and not data.style_names:
        raise ConfigError(
            f"train.style_weight={config.style_weight}: --data {data_source} carries no style "
            "labels (EmojiPrefs and procedural data do); leave it at 0"
        )
    # sft_base and style_weight are read by their own stage only (`pigeon train all --set ...`)
    trainable = set_trainable(
        model,
        stage,
        config.lora_only,
        config.sft_base and stage == "sft",
        style_weight > 0 and stage == "decoder",
        config.vae_decoder_only and stage == "vae",
    )
    pairs, reference = None, None
    if stage == "dpo":
        from pigeon.training.dpo import build_pairs

        reference = copy.deepcopy(model.personalizer).eval().requires_grad_(False)
        pairs = build_pairs(model, tokenizer, data, config, device)
        model.train()
    module = StageModule(model, stage, builder, config, reference, len(data.style_names)).to(device)
    module.train()  # (DPO: dropout off, see StageModule.train)
    trainable.update({f"heads.{n}": p for n, p in module.heads.named_parameters()})
    wrapped = module
    if dist.world > 1:
        wrapped = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(
        trainable.values(), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    start_step, best = 0, math.inf
    if resume and state_path.exists():
        state = torch.load(state_path, weights_only=True)
        if "heads" in state:
            module.heads.load_state_dict(state["heads"])
        elif "probe" in state and "probe" in module.heads:  # a trainer state saved before heads
            module.heads["probe"].load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, best = state["step"], state["best"]
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(config, out / "train_config.json")
        (out / "model_config.json").write_text(
            json.dumps(
                {
                    "source": source,
                    "data": data_source,
                    "preset": preset_name,
                    "world_size": dist.world,
                    "model": to_dict(model.config),
                },
                indent=2,
            )
            + "\n"
        )
    logf = open(out / "log.jsonl", "a") if dist.main else None
    started = time.perf_counter()
    losses = []
    bar = tqdm(
        range(start_step, config.steps),
        desc=f"{stage}",
        disable=not (progress and dist.main),
        initial=start_step,
        total=config.steps,
    )
    stop_at = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
    done = start_step
    health: dict[str, float] = {}
    for step in bar:
        if step >= stop_at:
            break
        done = step + 1
        reseed_torch(config.seed, step, dist.rank)
        batch = make_batch(data, config, step, dist, device, pairs)
        with torch.autocast(
            torch.device(device).type, torch.bfloat16, enabled=config.precision == "bf16"
        ):
            loss = wrapped(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.values(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        value = _global_mean(float(loss.detach()), dist)
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if logf and (step % config.log_every == 0 or step == config.steps - 1):
            logf.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": value,
                        "lr": scheduler.get_last_lr()[0],
                        "elapsed_s": round(time.perf_counter() - started, 2),
                    }
                )
                + "\n"
            )
            logf.flush()
        last = step == config.steps - 1
        if (step + 1) % config.val_every == 0 or last or step + 1 == stop_at:
            val = validate(module, data, config, device, pairs)
            if spec.health == "tokenizer":
                health = tokenizer_health(model, data, config, device)
            if spec.health == "condition":
                health = decoder_health(model, data, config, device)
            if link is not None:
                health.update(link.measure(spec.chain_link, model, tokenizer))
            if spec.health == "latent_scale" and not config.vae_decoder_only:  # else unmoved
                health["scaling_factor"] = calibrate_latent_scale(model, data, config, device)
            if dist.main:
                logf.write(json.dumps({"step": step, "val_loss": val, **health}) + "\n")
                logf.flush()
            check_tokenizer(health, config, step)
            if dist.main:
                save_checkpoint(model, tokenizer, out / "last", overwrite=True)
                if val < best:
                    best = val
                    save_checkpoint(model, tokenizer, out / "best", overwrite=True)
                save_state(state_path, step + 1, optimizer, scheduler, best, module.heads)
            module.train()
    if logf:
        logf.close()
        plot_curves(out / "log.jsonl", out / "curves.png", title=f"{run.name}: {stage}")
    return {
        "stage": stage,
        "steps": config.steps,
        "completed": done >= config.steps,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "best_val_loss": best,
        "seconds": round(time.perf_counter() - started, 1),
        "world_size": dist.world,
        **({"tokenizer": health} if health else {}),
        **({"frozen_cache": module.frozen.summary()} if module.frozen.encoded else {}),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "out": str(out),
    }


CALIBRATION_IMAGES = 256  # training images whose latents set vae.scaling_factor


def calibrate_latent_scale(model, data, config: TrainConfig, device: str) -> float:
    """Set `vae.scaling_factor` to 1 / std of the VAE's posterior-mean latents over a fixed draw of
    training images (latent diffusion's rule), and return it. The VAE stage calls it before every
    checkpoint, so the stages after it see unit-variance latents."""
    rng = np.random.default_rng([config.seed, CALIBRATION_IMAGES])
    was_training = model.vae.training
    model.vae.eval()
    latents = []
    with torch.no_grad():
        for start in range(0, CALIBRATION_IMAGES, config.batch_size):
            images, _ = data.images(rng, min(config.batch_size, CALIBRATION_IMAGES - start))
            x = to_tensor(images).to(device) * 2 - 1
            latents.append(model.vae.encode(x).latent_dist.mean.float())
    model.vae.train(was_training)
    std = float(torch.cat(latents).std())
    model.set_latent_scale(1.0 / std)
    return round(1.0 / std, 5)


def _global_mean(value: float, dist: Dist) -> float:
    if dist.world == 1:
        return value
    import torch.distributed as td

    t = torch.tensor([value])
    td.all_reduce(t)
    return float(t) / dist.world


@torch.no_grad()
def tokenizer_health(model, data, config: TrainConfig, device: str) -> dict[str, float]:
    """The history encoder on fixed validation images, as serving runs it (eval mode): the
    perplexity of its codes over kept tokens and the share of patches it keeps."""
    from pigeon.models.history_encoder import code_perplexity

    encoder = model.history_encoder
    was_training = model.training
    model.eval()
    images, _ = data.images(step_rng(config.seed + 2_000_003, 0), config.batch_size)
    images = to_tensor(images).to(device)
    with torch.no_grad():
        ids, keep = encoder(O.encoder_input(model, images))
        gain = condition_gain(model, images, step_seed(config.seed + 2_000_003, 1))
    model.train(was_training)
    return {
        "code_perplexity": round(code_perplexity(ids, keep, encoder.config.codebook_size), 2),
        "keep_ratio": round(float(keep.float().mean()), 3),
        "condition_gain": round(gain, 5),
    }


@torch.no_grad()
def decoder_health(model, data, config: TrainConfig, device: str) -> dict[str, float]:
    """The decoder stage's condition gain on fixed validation users (target tokens, reference)."""
    was_training = model.training
    model.eval()
    batch = decoder_batch(
        data.validation_users(config.batch_size, 1), device, data.paired_reference
    )
    seed = step_seed(config.seed + 2_000_003, 1)
    gain = condition_gain(model, batch["targets"], seed, batch["references"])
    model.train(was_training)
    return {"condition_gain": round(gain, 5)}


def condition_gain(
    model, images: torch.Tensor, seed: int, references: torch.Tensor | None = None
) -> float:
    """How much the UNet uses its condition: diffusion loss with the condition zeroed (CFG's
    negative) minus with the images' own tokens, same noise and timesteps (and the same reference,
    for a UNet with `unet.reference_input`). About 0 means the UNet ignores the tokens, and nothing
    the personalizer generates can change the image."""
    g = torch.Generator().manual_seed(seed)
    prompt_embeds, pooled = O.serving_condition(model, images)
    latents = image_latents(model, images)
    reference_latents = None if references is None else image_latents(model, references)
    noise = torch.randn(latents.shape, generator=g).to(latents)
    ac = torch.from_numpy(alphas_cumprod(model.config.scheduler)).to(latents)
    t = torch.randint(0, len(ac), (len(images),), generator=g).to(images.device)

    def loss(context: torch.Tensor, pooled_embeds: torch.Tensor) -> float:
        return float(
            O.denoising_loss(
                model, latents, noise, t, ac, context, pooled_embeds, reference_latents
            )
        )

    return loss(prompt_embeds * 0, pooled * 0) - loss(prompt_embeds, pooled)


def check_tokenizer(health: dict, config: TrainConfig, step: int) -> None:
    """Stop the image stage when its tokenizer has collapsed (see TrainConfig.min_code_perplexity)."""
    if "code_perplexity" not in health or step + 1 < config.steps // 4:
        return
    if health["code_perplexity"] < config.min_code_perplexity:
        raise TrainingError(
            f"image stage, step {step + 1}: the tokenizer has collapsed: code perplexity "
            f"{health['code_perplexity']} < train.min_code_perplexity={config.min_code_perplexity} "
            f"(keep ratio {health['keep_ratio']}); later stages would learn nothing from its tokens"
        )


class TrainingError(RuntimeError):
    """A stage that cannot produce a useful model; the message says why."""


@torch.no_grad()
def validate(
    module: StageModule, data, config: TrainConfig, device: str, pairs: list | None
) -> float:
    """Mean loss over fixed validation batches (fixed seeds; eval mode, no dropout)."""
    module.eval()
    losses = []
    val_config = dataclasses.replace(config, seed=config.seed + 1_000_003)
    n = config.batch_size
    reads = module.spec.reads
    if reads in ("targets", "users"):  # the fixed validation users, loaded once
        history = 1 if reads == "targets" else config.history_length
        users = data.validation_users(n * config.val_batches, history)
    for k in range(config.val_batches):
        reseed_torch(val_config.seed, k, 0)
        if reads == "targets":
            batch = decoder_batch(
                users[k * n : (k + 1) * n],
                device,
                data.paired_reference,
                config.history_token_share > 0,
            )
        elif reads == "users":
            batch = {
                "users": users_batch(users[k * n : (k + 1) * n], config, device),
                "generator": random.Random(k),
            }
        else:
            batch = make_batch(data, val_config, k, Dist(), device, pairs)
        losses.append(float(module(batch)))
    return float(np.mean(losses))


def train_all(run: str | Path, init: str | None = None, **kwargs) -> list[dict]:
    """Every stage in order; the first starts from `init` (or fresh), each later one from the
    previous one's best checkpoint."""
    return [
        train_stage(stage, run, init=init if i == 0 else None, **kwargs)
        for i, stage in enumerate(STAGE_NAMES)
    ]
