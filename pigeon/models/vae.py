"""The VAE between pixels and latents: diffusers `AutoencoderKL`.

Images are in [-1, 1] inside the VAE; latents are scaled by `scaling_factor` before the UNet sees them.
The decoder's GroupNorms may have their own group count (`VAEConfig.decoder_norm_num_groups`), which
diffusers' one `norm_num_groups` cannot say: `build_vae` swaps them after diffusers builds the model.
"""

from __future__ import annotations

from diffusers import AutoencoderKL
from torch import nn

from pigeon.config import PipelineConfig


def build_vae(config: PipelineConfig) -> AutoencoderKL:
    v = config.vae
    n = len(v.block_out_channels)
    vae = AutoencoderKL(
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
    if v.decoder_groups != v.norm_num_groups:
        regroup(vae.decoder, v.decoder_groups)
    return vae


def regroup(module: nn.Module, groups: int) -> None:
    """Every GroupNorm inside `module` with `groups` groups; its per-channel affine weights stay."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                norm = nn.GroupNorm(groups, child.num_channels, child.eps, child.affine)
                norm.load_state_dict(child.state_dict())
                setattr(parent, name, norm)
