"""`PigeonModel`: every network of the pipeline in one module, sizes derived from one `PipelineConfig`."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pigeon.config import COMPONENT_MODULES, PipelineConfig
from pigeon.models.condition_adapter import ConditionAdapter
from pigeon.models.history_encoder import HistoryEncoder
from pigeon.models.mask_generator import MaskGenerator
from pigeon.models.personalizer import Personalizer
from pigeon.models.unet import add_reference_input, build_unet
from pigeon.models.vae import build_vae
from pigeon.vocab import vocab_layout


def to_tensor(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 (..., S, S, 3) -> float (..., 3, S, S) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images))).float() / 255.0
    return x.movedim(-1, -3)


def encoder_input(model: PigeonModel, images: torch.Tensor) -> torch.Tensor:
    """images in [0, 1] (batch, 3, S, S) at the history encoder's input size (bicubic)."""
    size = model.config.history_encoder.image_size
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


class PigeonModel(nn.Module):
    def __init__(self, config: PipelineConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab = vocab_layout(config)
        self.history_encoder = HistoryEncoder(config.history_encoder)
        self.mask_generator = MaskGenerator(config.mask_generator, config.personalizer.hidden_size)
        self.personalizer = Personalizer(
            config.personalizer, self.vocab, config.condition_adapter.context_dim
        )
        self.condition_adapter = ConditionAdapter(
            config.condition_adapter,
            config.history_encoder.code_dim,
            config.history_encoder.num_patches,
        )
        self.unet = build_unet(config)
        self.vae = build_vae(config)

    def enable_reference_input(self) -> None:
        """Give the UNet the reference's latents as extra input channels (`unet.reference_input`),
        zero-initialised so the model computes what it did before; the `decoder` stage trains them."""
        self.unet, self.config = add_reference_input(self.unet, self.config)

    def set_latent_scale(self, scaling_factor: float) -> None:
        """Latent diffusion's `vae.scaling_factor`: the UNet sees the VAE's latents times it, so that
        they have unit variance and the noise schedule's signal-to-noise ratios mean what they were
        designed to (SD's 0.18215 is 1/std of its VAE's latents)."""
        if not (scaling_factor > 0 and scaling_factor < float("inf")):
            raise ValueError(
                f"vae.scaling_factor must be a positive finite number, got {scaling_factor}"
            )
        vae = dataclasses.replace(self.config.vae, scaling_factor=float(scaling_factor))
        self.config = dataclasses.replace(self.config, vae=vae)
        self.vae.register_to_config(scaling_factor=float(scaling_factor))

    def components(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in COMPONENT_MODULES}
