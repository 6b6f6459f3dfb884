"""The recipe's stages, one record each: what a stage trains, what a step reads, its loss, and what its
validation measures beside the loss. The loop (`pigeon.training.loop`), the CLI and the recipe read
this table; the losses themselves are in `pigeon.training.objectives`.

    stage    trains                                       reads     validation logs
    vae      VAE                                          images    latent scale, VAE round trip
    image    history encoder, condition adapter, UNet     images    tokenizer health, target tokens
             (+ style head: style_weight)
    decoder  UNet (+ condition adapter: style_weight)     targets   condition gain, target tokens
    lmm      LLM base weights                             images
    sft      LoRA, reference adapter, mask generator      users
             (+ LLM base: sft_base)
    dpo      LoRA                                         pairs

`set_trainable(model, stage)` freezes everything else, so a stage can only change its own parameters.
The table imports no torch (the objectives load when a stage runs), so the CLI builds its choices
and help from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pigeon.models.pigeon import PigeonModel

# what a step reads: images and captions; targets with their reference (and a history image);
# users (history, reference, target, text); stage 2's preference pairs
Reads = Literal["images", "targets", "users", "pairs"]
# what validation measures beside the loss: the VAE's latent scale (and sets it), the tokenizer's
# code perplexity and keep ratio, the UNet's condition gain
Health = Literal["latent_scale", "tokenizer", "condition"]


def _vae(module, batch: dict) -> torch.Tensor:
    from pigeon.training import objectives as O

    return O.vae_objective(
        module.model,
        batch["images"],
        perceptual=module.perceptual,
        perceptual_weight=module.options.perceptual_weight,
        decoder_only=module.options.vae_decoder_only,
    )


def _image(module, batch: dict) -> torch.Tensor:
    from pigeon.training import objectives as O

    return O.image_objective(
        module.model,
        batch["images"],
        module.alphas_cumprod,
        probe=module.heads["probe"] if "probe" in module.heads else None,
        reconstruct_weight=module.options.reconstruct_weight,
        style_head=module.heads["style"] if "style" in module.heads else None,
        style_weight=module.options.style_weight,
        styles=batch.get("styles"),
        snr_gamma=module.options.snr_gamma,
        frozen=module.frozen,
    )


def _decoder(module, batch: dict) -> torch.Tensor:
    from pigeon.training import objectives as O

    return O.decoder_objective(
        module.model,
        batch["targets"],
        batch["references"],
        module.alphas_cumprod,
        history=batch["history"],
        history_token_share=module.options.history_token_share,
        style_head=module.heads["style"] if "style" in module.heads else None,
        style_weight=module.options.style_weight,
        target_styles=batch.get("target_styles"),
        history_styles=batch.get("history_styles"),
        snr_gamma=module.options.snr_gamma,
        max_timestep_fraction=module.options.max_timestep_fraction,
        reference_start_share=module.options.reference_start_share,
        reference_start_strength=module.options.reference_start_strength,
        frozen=module.frozen,
    )


def _lmm(module, batch: dict) -> torch.Tensor:
    from pigeon.training import objectives as O

    return O.lmm_objective(module.model, module.builder, batch["images"], batch["texts"])


def _sft(module, batch: dict) -> torch.Tensor:
    from pigeon.training import objectives as O

    return O.sft_objective(module.model, module.builder, batch["users"], batch["generator"])


def _dpo(module, batch: dict) -> torch.Tensor:
    from pigeon.training import objectives as O

    return O.dpo_objective(
        module.model,
        module.reference_personalizer,
        module.builder,
        batch["users"],
        batch["chosen"],
        batch["rejected"],
        batch["beta"],
        batch["generator"],
    )


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line, for `pigeon train --help`
    # prefixes of the parameter names the stage trains; the personalizer's LoRA weights are in the
    # set only where `lora` says so (the lmm stage trains the LLM's base weights, not its LoRA)
    trains: tuple[str, ...]
    reads: Reads
    objective: Callable[[nn.Module, dict], torch.Tensor]  # (StageModule, batch) -> loss
    lora: bool = False
    health: Health | None = None
    chain_link: str | None = None  # the link of the image chain it logs (pigeon.evaluation.chain)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "vae",
            "the VAE: L1 + KL + perceptual",
            ("vae.",),
            "images",
            _vae,
            health="latent_scale",
            chain_link="vae_round_trip",
        ),
        Stage(
            "image",
            "tokenizer, condition adapter and UNet: diffusion on images given their own tokens",
            ("history_encoder.", "condition_adapter.", "unet."),
            "images",
            _image,
            health="tokenizer",
            chain_link="target_tokens",
        ),
        Stage(
            "decoder",
            "the UNet with the reference as input channels (the detokenizer)",
            ("unet.",),
            "targets",
            _decoder,
            health="condition",
            chain_link="target_tokens",
        ),
        Stage(
            "lmm",
            "the LLM's base weights: next-token loss on captions and image tokens",
            ("personalizer.llm.",),
            "images",
            _lmm,
        ),
        Stage(
            "sft",
            "stage 1, masked preference reconstruction: LoRA, reference adapter, mask generator",
            ("personalizer.reference_adapter.", "mask_generator."),
            "users",
            _sft,
            lora=True,
        ),
        Stage("dpo", "stage 2, DPO on ranked pairs: the LoRA", (), "pairs", _dpo, lora=True),
    )
}
STAGE_NAMES = tuple(STAGES)  # the recipe's order
STYLE_STAGES = ("image", "decoder")  # the stages that read `TrainConfig.style_weight`
VAE_DECODER = ("vae.decoder.", "vae.post_quant_conv.")  # what `vae_decoder_only` trains


def stage_spec(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {list(STAGE_NAMES)}")
    return STAGES[name]


def stage_parameters(
    model: PigeonModel,
    name: str,
    lora_only: bool = False,
    sft_base: bool = False,
    decoder_condition: bool = False,
    vae_decoder_only: bool = False,
) -> dict[str, torch.nn.Parameter]:
    """The parameters stage `name` trains, by their name in `model`. `lora_only` (sft, dpo): the
    personalizer's LoRA alone, an adapter that `pigeon deploy --lora` publishes without the rest.
    `sft_base` (sft): the LLM's base weights too, beside its LoRA (`TrainConfig.sft_base`).
    `decoder_condition` (decoder): the condition adapter too (`TrainConfig.style_weight`); the
    tokens stay, so the lmm stage's codes hold, and stage 1, after it, reads the new reference
    embedding. `vae_decoder_only` (vae): the VAE's decoder alone (`TrainConfig.vae_decoder_only`)."""
    spec = stage_spec(name)
    if sft_base and (name != "sft" or lora_only):
        raise ValueError(f"sft_base applies to the sft stage without lora_only, not {name!r}")
    if decoder_condition and name != "decoder":
        raise ValueError(f"decoder_condition applies to the decoder stage, not {name!r}")
    if lora_only and not spec.lora:
        raise ValueError(f"lora_only applies to the sft and dpo stages, not {name!r}")
    if vae_decoder_only and name != "vae":
        raise ValueError(f"vae_decoder_only applies to the vae stage, not {name!r}")
    prefixes = spec.trains + (("condition_adapter.",) if decoder_condition else ())
    if vae_decoder_only:
        prefixes = VAE_DECODER
    if name == "sft" and model.config.mask_generator.training != "straight_through":
        prefixes = tuple(p for p in prefixes if p != "mask_generator.")  # the official code's
    named = dict(model.named_parameters())
    lora = {n: p for n, p in named.items() if n.startswith("personalizer.") and "lora_" in n}
    if lora_only:
        return lora
    chosen = {n: p for n, p in named.items() if n.startswith(prefixes) and "lora_" not in n}
    if spec.lora:
        chosen.update(lora)
    if sft_base:
        chosen.update(stage_parameters(model, "lmm"))
    return chosen


def set_trainable(
    model: PigeonModel,
    name: str,
    lora_only: bool = False,
    sft_base: bool = False,
    decoder_condition: bool = False,
    vae_decoder_only: bool = False,
) -> dict[str, torch.nn.Parameter]:
    chosen = stage_parameters(model, name, lora_only, sft_base, decoder_condition, vae_decoder_only)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return chosen
