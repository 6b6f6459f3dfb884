"""Module 1, the mutual mask generator (the paper's module 1).

Scores every history and reference token by how well the encoder's output agrees with the token itself:

    h0 = Dropout(LN(e + PE_sin[pos] + TypeEmb[type]))          e: frozen LLM input embeddings
    h1 = TransformerEncoder(h0)                                post-norm, ReLU, key padding mask
    o  = Dropout(tanh(W LN(h1)))                               the same LN as in h0
    s_j = cos(e_j, o_j)                                        token_scores (batch, L)

`select_keep` turns scores into keep decisions by Gumbel top-k with k = max(1, int(n (1 - r))): jointly
over all history tokens (r = history_mask_ratio), and over the reference tokens with the training /
inference flip of the keep probability (1 - softmax in training, softmax at inference). In training the
result is straight-through (y_hard - sg(y_soft) + y_soft), so the LM loss can train this network when
the config asks for it. `pigeon.core.masking` is the NumPy twin used by every inference path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pigeon.config import MaskGeneratorConfig
from pigeon.core.masking import HISTORY_TYPE, PAD_TYPE, REFERENCE_TYPE, num_kept
from pigeon.models.layers import EncoderLayer, sinusoid_table


class MaskGenerator(nn.Module):
    def __init__(self, config: MaskGeneratorConfig, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.register_buffer(
            "position_table", sinusoid_table(config.max_position, embed_dim), persistent=False
        )
        self.type_embed = nn.Embedding(3, embed_dim)
        self.norm = nn.LayerNorm(embed_dim)  # shared by input and output, as in the official code
        self.embed_dropout = nn.Dropout(config.embed_dropout)
        self.encoder = nn.ModuleList(
            EncoderLayer(embed_dim, config.num_heads, config.ff_dim, config.encoder_dropout)
            for _ in range(config.num_layers)
        )
        self.head = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, token_embeds: torch.Tensor, position_ids: torch.Tensor, type_ids: torch.Tensor
    ) -> torch.Tensor:
        """token_embeds (batch, L, d), position_ids (batch, L) 1-based per image (0 = pad),
        type_ids (batch, L) in {0 pad, 1 history, 2 reference} -> token_scores (batch, L)."""
        h = token_embeds + self.position_table[position_ids] + self.type_embed(type_ids)
        h = self.embed_dropout(self.norm(h))
        key_keep = type_ids != PAD_TYPE
        for layer in self.encoder:
            h = layer(h, key_keep)
        out = self.embed_dropout(torch.tanh(self.head(self.norm(h))))
        return F.cosine_similarity(token_embeds, out, dim=-1)


def _gumbel_topk(
    logits: torch.Tensor,
    member: torch.Tensor,
    k: torch.Tensor,
    gumbel: torch.Tensor | None,
    straight_through: bool,
) -> torch.Tensor:
    """Keep the k[b] members of row b with the largest logits + Gumbel noise (batch, L)."""
    y = logits + (gumbel if gumbel is not None else 0.0)
    y = y.masked_fill(~member, -math.inf)
    rank = (-y).argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
    hard = ((rank < k[:, None]) & member).to(logits.dtype)
    if not straight_through:
        return hard
    soft = torch.softmax(y, dim=-1).nan_to_num(0.0)  # rows with no member are all -inf
    return hard - soft.detach() + soft


def select_keep(
    scores: torch.Tensor,
    type_ids: torch.Tensor,
    *,
    history_ratio: float,
    reference_ratio: float,
    training: bool,
    gumbel: torch.Tensor | None = None,
    straight_through: bool = False,
) -> torch.Tensor:
    """Keep decisions (batch, L): 1 for a kept history or reference token, 0 for masked or pad.

    scores: token_scores (batch, L); gumbel: Gumbel(0, 1) noise (batch, L), None for a deterministic
    top-k (tests, reproducible serving).
    """
    keep = torch.zeros_like(scores)
    for token_type, ratio in ((HISTORY_TYPE, history_ratio), (REFERENCE_TYPE, reference_ratio)):
        member = type_ids == token_type
        n = member.sum(dim=-1)
        k = torch.tensor([num_kept(int(c), ratio) if c else 0 for c in n], device=scores.device)
        log_p = torch.log_softmax(scores.masked_fill(~member, -math.inf), dim=-1)
        if token_type == REFERENCE_TYPE and training:
            # training flips the preference: high-score reference tokens are more likely masked
            logits = torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))
        else:
            logits = log_p
        keep = keep + _gumbel_topk(logits.nan_to_num(0.0), member, k, gumbel, straight_through)
    return keep


def random_reference_keep(
    type_ids: torch.Tensor, ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """The `mask_type="random"` ablation: ceil(n r) uniformly random reference tokens masked,
    history unmasked."""
    keep = (type_ids == HISTORY_TYPE).float()
    for b in range(type_ids.shape[0]):
        ref = (type_ids[b] == REFERENCE_TYPE).nonzero().flatten()
        n_masked = min(len(ref), math.ceil(len(ref) * ratio))
        order = ref[torch.randperm(len(ref), generator=generator)]
        keep[b, order[n_masked:]] = 1.0
    return keep
