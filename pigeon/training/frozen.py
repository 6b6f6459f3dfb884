"""What the frozen encoders make of each training image, computed once per image.

In the image and decoder stages the VAE does not train, and in the decoder stage neither does the
tokenizer (run in eval mode: a deterministic keep decision). A `small` image stage draws 64,000
images (2,000 steps of 32) from EmojiPrefs' 7,517 training images, and the decoder stage encodes two
images a step (the target and its reference) and tokenizes one, so most of those encoder passes
repeat earlier ones. `FrozenEncodings` keeps their outputs, keyed by the image's bytes, up to a memory budget
(`train.frozen_cache_mib`).

Each image is encoded alone and from a contiguous copy, so its entry is the same whichever batch first
drew it and however that batch was laid out in memory: a resumed stage, which starts with an empty
cache, ends bit for bit where the uninterrupted one does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from pigeon.models.pigeon import PigeonModel, encoder_input


def image_latents(model: PigeonModel, images: torch.Tensor) -> torch.Tensor:
    """images in [0, 1] (batch, 3, S, S) -> the VAE's scaled posterior-mean latents."""
    return model.vae.encode(images * 2 - 1).latent_dist.mean * model.config.vae.scaling_factor


def frozen_tokens(model: PigeonModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens serving makes of these images: the history encoder in eval mode (deterministic
    keep), without a graph. -> code ids (batch, P), keep (batch, P)."""
    encoder = model.history_encoder
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        ids, keep = encoder(encoder_input(model, images))
    encoder.train(was_training)
    return ids, keep


class FrozenEncodings:
    """`image_latents` and `frozen_tokens`, remembered per image up to `budget_mib` of tensors (0:
    nothing remembered, every call encodes its batch at once, as before the cache). Only for
    encoders that do not train while it lives."""

    def __init__(self, budget_mib: float = 0.0) -> None:
        self.budget = int(budget_mib * 2**20)
        self.used = 0  # bytes held
        self.encoded = 0  # images encoded (lookups that missed)
        self.entries: dict[tuple[str, bytes], tuple[torch.Tensor, ...]] = {}  # (kind, digest)

    def latents(self, model: PigeonModel, images: torch.Tensor) -> torch.Tensor:
        if self.budget <= 0:
            with torch.no_grad():
                return image_latents(model, images)
        (latents,) = self._per_image("latents", images, lambda x: (image_latents(model, x),))
        return latents

    def tokens(self, model: PigeonModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.budget <= 0:
            return frozen_tokens(model, images)
        ids, keep = self._per_image("tokens", images, lambda x: frozen_tokens(model, x))
        return ids, keep

    def summary(self) -> dict[str, float]:
        return {
            "images": len(self.entries),
            "mib": round(self.used / 2**20, 1),
            "encoded": self.encoded,
        }

    def _per_image(
        self,
        kind: str,
        images: torch.Tensor,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        # validation runs in float32 beside bf16 training steps: their encodings differ
        kind = f"{kind}-{torch.is_autocast_enabled(images.device.type)}"
        rows = images.detach().cpu().contiguous().numpy()
        found = []
        for i, row in enumerate(rows):
            key = (kind, hashlib.blake2b(row.tobytes(), digest_size=16).digest())
            entry = self.entries.get(key)
            if entry is None:
                with torch.no_grad():  # contiguous: a strided view takes another conv kernel
                    entry = tuple(t[0] for t in encode(images[i : i + 1].contiguous()))
                self.encoded += 1
                size = sum(t.nbytes for t in entry)
                if self.used + size <= self.budget:
                    self.entries[key] = entry
                    self.used += size
            found.append(entry)
        return tuple(torch.stack(parts) for parts in zip(*found, strict=True))
