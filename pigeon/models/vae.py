"""The VAE between pixels and latents: diffusers `AutoencoderKL`.

Images are in [-1, 1] inside the VAE; latents are scaled by `scaling_factor` before the UNet sees them.
"""

from __future__ import annotations

from diffusers import AutoencoderKL

from pigeon.config import PipelineConfig


def build_vae(config: PipelineConfig) -> AutoencoderKL:
    v = config.vae
    n = len(v.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=v.block_out_channels,
        layers_per_block=v.layers_per_block,
        latent_channels=v.latent_channels,
        norm_num_groups=v.norm_num_groups,
        sample_size=config.image_size,
        scaling_factor=v.scaling_factor,
    )
