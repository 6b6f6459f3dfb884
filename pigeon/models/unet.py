"""Module 3's denoiser: diffusers `UNet2DConditionModel` with SDXL-style added conditioning.

Context (cross-attention) comes from the condition adapter's `prompt_embeds`; the pooled vector and the
six `time_ids` (orig_h, orig_w, crop_top, crop_left, target_h, target_w) enter through the "text_time"
added embedding, as in SDXL and LaVIT's high-resolution decoder. Attention runs on PyTorch SDPA.

With `unet.reference_input`, the reference image's latents are concatenated to the noisy latents as
extra input channels (InstructPix2Pix): `unet_input` builds that input for training and export alike,
and `add_reference_input` turns it on for a trained UNet without changing what it computes.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import UNet2DConditionModel

from pigeon.config import PipelineConfig
from pigeon.specs import TIME_IDS


def input_channels(config: PipelineConfig) -> int:
    """Noisy latents, then the reference's latents when `unet.reference_input` is on."""
    c = config.vae.latent_channels
    return 2 * c if config.unet.reference_input else c


def build_unet(config: PipelineConfig) -> UNet2DConditionModel:
    """The UNet whose sizes are derived from the other components (context dims, latent shape)."""
    u = config.unet
    n = len(u.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=input_channels(config),
        out_channels=config.vae.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=u.block_out_channels,
        layers_per_block=u.layers_per_block,
        norm_num_groups=u.norm_num_groups,
        cross_attention_dim=config.condition_adapter.context_dim,
        attention_head_dim=u.attention_head_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=u.addition_time_embed_dim,
        projection_class_embeddings_input_dim=(
            config.condition_adapter.pooled_dim + TIME_IDS * u.addition_time_embed_dim
        ),
    )


def unet_input(
    config: PipelineConfig, latents: torch.Tensor, reference_latents: torch.Tensor | None
) -> torch.Tensor:
    """(batch, C, h, h) -> the UNet's input: (batch, 2C, h, h) with the reference's latents."""
    if not config.unet.reference_input:
        return latents
    if reference_latents is None:
        raise ValueError("unet.reference_input is on: the UNet needs the reference's latents")
    return torch.cat([latents, reference_latents.to(latents)], dim=1)


def add_reference_input(
    unet: UNet2DConditionModel, config: PipelineConfig
) -> tuple[UNet2DConditionModel, PipelineConfig]:
    """Widen `conv_in` for the reference's latents, the new channels' weights zero: the widened UNet
    computes exactly what `unet` did until training moves them (InstructPix2Pix's initialisation)."""
    if config.unet.reference_input:
        raise ValueError("unet.reference_input is already on")
    widened = dataclasses.replace(
        config, unet=dataclasses.replace(config.unet, reference_input=True)
    )
    old = unet.conv_in
    new = torch.nn.Conv2d(
        input_channels(widened), old.out_channels, old.kernel_size, padding=old.padding
    ).to(old.weight)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)
    return unet, widened
