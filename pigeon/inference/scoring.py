"""The personalization scorer of stage 2 and of `best_of_k`: how close a candidate image is to a
user's history, by the model's own history encoder (its ViT, trained in stage 0b on the training split
only). It is not an evaluation metric: evaluation uses separately trained style and concept networks."""

from __future__ import annotations

import numpy as np
import torch

from pigeon.models.pigeon import encoder_input, to_tensor


@torch.no_grad()
def image_features(model, images: np.ndarray) -> torch.Tensor:
    """uint8 (n, S, S, 3) -> unit ViT features (n, D): mean over patches of the last hidden state."""
    x = encoder_input(model, to_tensor(images))
    hidden = model.history_encoder.vit(pixel_values=model.history_encoder.normalize(x))
    return torch.nn.functional.normalize(hidden.last_hidden_state[:, 1:].mean(dim=1), dim=-1)


def personalization_scores(model, candidates: np.ndarray, history: np.ndarray) -> np.ndarray:
    """Mean cosine similarity of each candidate to the history images, (n_candidates,)."""
    c, h = image_features(model, candidates), image_features(model, history)
    return (c @ h.t()).mean(dim=1).numpy()
