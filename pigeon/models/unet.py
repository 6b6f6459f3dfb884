"""Module 3's denoiser: diffusers `UNet2DConditionModel` with SDXL-style added conditioning.

Context (cross-attention) comes from the condition adapter's `prompt_embeds`; the pooled vector and the
six `time_ids` (orig_h, orig_w, crop_top, crop_left, target_h, target_w) enter through the "text_time"
added embedding, as in SDXL and LaVIT's high-resolution decoder. Attention runs on PyTorch SDPA.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel

from pigeon.config import PipelineConfig
from pigeon.specs import TIME_IDS


def build_unet(config: PipelineConfig) -> UNet2DConditionModel:
    """The UNet whose sizes are derived from the other components (context dims, latent shape)."""
    u = config.unet
    n = len(u.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.vae.latent_channels,
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
