"""Module 3's denoiser: diffusers `UNet2DConditionModel` with SDXL-style added conditioning.

Context (cross-attention) comes from the condition adapter's `prompt_embeds`; the pooled vector and the
six `time_ids` (orig_h, orig_w, crop_top, crop_left, target_h, target_w) enter through the "text_time"
added embedding, as in SDXL and LaVIT's high-resolution decoder. Attention runs on PyTorch SDPA.

The UNet's input channels, in order (`unet_input` builds them for training and export alike):

    noisy latents                          always
    the condition's sketch                 unet.condition_sketch: `ConditionSketch` draws the
                                           prompt_embeds as latents, a spatial route for the tokens
    the reference image's latents          unet.reference_input (InstructPix2Pix); the `decoder`
                                           stage turns it on with `add_reference_input`, which
                                           leaves what a trained UNet computes unchanged

Cross-attention alone learns slowly at this scale (the condition reaches every pixel through a
softmax over 16 tokens), while a spatially aligned input is picked up within a few hundred steps; the
sketch gives the tokens that spatial route. It is the LaVIT detokenizer's feature reconstruction made
part of the model: the image stage trains it to reconstruct the image's latents from its own tokens.
Its weights live in the UNet component (`unet.condition_sketch`), so the exported UNet computes it
from the `prompt_embeds` input it already has and no serving interface changes.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from pigeon.config import PipelineConfig
from pigeon.specs import TIME_IDS


class ConditionSketch(nn.Module):
    """prompt_embeds (batch, Q, ctx) -> latents (batch, C, h, h): one linear map of the flattened
    condition. Zeroed prompt_embeds (classifier-free guidance's negative) give its bias alone."""

    def __init__(self, config: PipelineConfig) -> None:
        super().__init__()
        ca = config.condition_adapter
        self.latent_shape = (config.vae.latent_channels, config.latent_size, config.latent_size)
        self.proj = nn.Linear(ca.num_queries * ca.context_dim, math.prod(self.latent_shape))

    def forward(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        return self.proj(prompt_embeds.flatten(1)).view(-1, *self.latent_shape)


def input_channels(config: PipelineConfig) -> int:
    """Noisy latents, the sketch (`unet.condition_sketch`), the reference (`unet.reference_input`)."""
    c = config.vae.latent_channels
    return c * (1 + config.unet.condition_sketch + config.unet.reference_input)


def build_unet(config: PipelineConfig) -> UNet2DConditionModel:
    """The UNet whose sizes are derived from the other components (context dims, latent shape)."""
    u = config.unet
    n = len(u.block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=input_channels(config),
        out_channels=config.vae.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=u.block_out_channels,
        layers_per_block=u.layers_per_block,
        norm_num_groups=u.norm_num_groups,
        cross_attention_dim=config.condition_adapter.context_dim,
        attention_head_dim=u.attention_heads,  # diffusers: heads per block
        transformer_layers_per_block=u.transformer_layers_per_block or 1,
        use_linear_projection=u.use_linear_projection,
        addition_embed_type="text_time",
        addition_time_embed_dim=u.addition_time_embed_dim,
        projection_class_embeddings_input_dim=(
            config.condition_adapter.pooled_dim + TIME_IDS * u.addition_time_embed_dim
        ),
    )
    if u.condition_sketch:  # a submodule, so the UNet component's weights carry it
        unet.condition_sketch = ConditionSketch(config)
    return unet


def unet_input(
    unet: UNet2DConditionModel,
    config: PipelineConfig,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    reference_latents: torch.Tensor | None,
) -> torch.Tensor:
    """(batch, C, h, h) -> the UNet's input (batch, input_channels(config), h, h)."""
    parts = [latents]
    if config.unet.condition_sketch:
        parts.append(unet.condition_sketch(prompt_embeds).to(latents))
    if config.unet.reference_input:
        if reference_latents is None:
            raise ValueError("unet.reference_input is on: the UNet needs the reference's latents")
        parts.append(reference_latents.to(latents))
    return torch.cat(parts, dim=1) if len(parts) > 1 else latents


def unet_forward(
    unet: UNet2DConditionModel,
    config: PipelineConfig,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    time_ids: torch.Tensor,
    reference_latents: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's prediction (noise or v) for noisy `latents` at `timestep` given the condition."""
    return unet(
        unet_input(unet, config, latents, prompt_embeds, reference_latents),
        timestep,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs={"text_embeds": pooled_embeds, "time_ids": time_ids},
        return_dict=False,
    )[0]


def add_reference_input(
    unet: UNet2DConditionModel, config: PipelineConfig
) -> tuple[UNet2DConditionModel, PipelineConfig]:
    """Widen `conv_in` for the reference's latents (the last channels), the new channels' weights
    zero: the widened UNet computes exactly what `unet` did until training moves them
    (InstructPix2Pix's initialisation)."""
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
