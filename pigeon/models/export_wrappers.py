"""One named wrapper per component in `pigeon.specs`: tensors in the declared order, a tuple out.

No dict arguments, no `return_dict`, no randomness (noise is an input), no Python branching on tensor
values. `TorchRunner` runs these same modules, so PyTorch, ONNX Runtime, TensorRT and Triton compute the
same function.
"""

from __future__ import annotations

import torch
from torch import nn

from pigeon.models.pigeon import PigeonModel
from pigeon.models.unet import unet_forward


class HistoryEncoderForExport(nn.Module):
    def __init__(self, model: PigeonModel) -> None:
        super().__init__()
        self.encoder = model.history_encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(images)


class MaskGeneratorForExport(nn.Module):
    """Looks the code ids up in the personalizer's (frozen) input embeddings, then scores them."""

    def __init__(self, model: PigeonModel) -> None:
        super().__init__()
        self.mask_generator = model.mask_generator
        self.embeddings = model.personalizer.input_embeddings()
        self.visual_offset = model.vocab.visual_offset

    def forward(
        self, token_ids: torch.Tensor, position_ids: torch.Tensor, type_ids: torch.Tensor
    ) -> tuple[torch.Tensor]:
        embeds = self.embeddings(token_ids + self.visual_offset)
        return (self.mask_generator(embeds, position_ids, type_ids),)


class PersonalizerForExport(nn.Module):
    """One prefill-or-decode step with an explicit KV cache, flattened as past_key_i / past_value_i.

    Returns only the last position's logits over [</img>, code_0 .. code_{K-1}]: text and <img>/<emb>
    ids are never generated after <img>, so their rows of the LM head are not even computed.
    """

    def __init__(self, model: PigeonModel) -> None:
        super().__init__()
        self.personalizer = model.personalizer
        vocab = model.vocab
        allowed = torch.cat(
            [torch.tensor([vocab.img_end]), torch.arange(vocab.visual_offset, vocab.size)]
        )
        self.register_buffer("allowed_ids", allowed, persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        embed_keep: torch.Tensor,
        reference_embedding: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_flat: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        p = self.personalizer
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(p.num_layers)]
        hidden, present = p.transformer(
            input_ids, embed_keep, reference_embedding, attention_mask, position_ids, past
        )
        head = p.llm.lm_head.weight[self.allowed_ids]  # (1 + K, hidden)
        logits = hidden[:, -1] @ head.t()  # (batch, 1 + K)
        present = [t for kv in present for t in kv]
        return (logits, *present)


class ConditionAdapterForExport(nn.Module):
    """Code ids -> the history encoder's unit code vectors -> the condition adapter."""

    def __init__(self, model: PigeonModel) -> None:
        super().__init__()
        self.quantizer = model.history_encoder.quantizer
        self.adapter = model.condition_adapter

    def forward(
        self, token_ids: torch.Tensor, token_keep: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return self.adapter(self.quantizer.code_vectors(token_ids), token_keep)


class UNetForExport(nn.Module):
    """reference_latents: the last input only when `unet.reference_input` is on (see pigeon.specs)."""

    def __init__(self, model: PigeonModel) -> None:
        super().__init__()
        self.unet = model.unet
        self.config = model.config

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        reference_latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        noise_pred = unet_forward(
            self.unet,
            self.config,
            latents,
            timestep,
            prompt_embeds,
            pooled_embeds,
            time_ids,
            reference_latents,
        )
        return (noise_pred,)


class VAEEncoderForExport(nn.Module):
    """Images in [0, 1] -> scaled latents (the posterior mean: deterministic, as img2img needs)."""

    def __init__(self, model: PigeonModel) -> None:
        super().__init__()
        self.vae = model.vae
        self.scaling_factor = model.config.vae.scaling_factor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        posterior = self.vae.encode(images * 2 - 1, return_dict=False)[0]
        return (posterior.mean * self.scaling_factor,)


class VAEDecoderForExport(nn.Module):
    """Scaled latents -> images in [0, 1]."""

    def __init__(self, model: PigeonModel) -> None:
        super().__init__()
        self.vae = model.vae
        self.scaling_factor = model.config.vae.scaling_factor

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor]:
        images = self.vae.decode(latents / self.scaling_factor, return_dict=False)[0]
        return ((images / 2 + 0.5).clamp(0, 1),)


WRAPPERS: dict[str, type[nn.Module]] = {
    "history_encoder": HistoryEncoderForExport,
    "mask_generator": MaskGeneratorForExport,
    "personalizer": PersonalizerForExport,
    "condition_adapter": ConditionAdapterForExport,
    "vae_encoder": VAEEncoderForExport,
    "unet": UNetForExport,
    "vae_decoder": VAEDecoderForExport,
}


def export_module(model: PigeonModel, name: str) -> nn.Module:
    """The wrapper for component `name`, in eval mode."""
    if name not in WRAPPERS:
        raise KeyError(f"unknown component {name!r}; known: {sorted(WRAPPERS)}")
    return WRAPPERS[name](model).eval()
