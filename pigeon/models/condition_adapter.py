"""Condition adapter: LaVIT's token decoder, visual tokens -> UNet conditioning.

    code vectors of the kept tokens (batch, P, c) -> in_proj -> + pos_embed[index in kept order]
    Q learned queries -> blocks(self-attn on queries, cross-attn to tokens with a key mask, MLP) -> LN
    -> decode layer (Linear, Tanh, Linear)
    -> prompt_embeds (batch, Q, context_dim)         per-token context for UNet cross-attention
    -> pooled_embeds (batch, pooled_dim)             attention pooling, SDXL's `text_embeds`
    reference_embedding = mean_Q(prompt_embeds)      what the personalizer's <emb> slot is built from

A learned null token is always visible to the cross-attention, so a fully masked reference (mask ratio 1)
still gives finite conditioning.
"""

from __future__ import annotations

import torch
from torch import nn

from pigeon.config import ConditionAdapterConfig
from pigeon.models.layers import MLP, Attention


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.norm1(q)
        q = q + self.self_attn(h)
        q = q + self.cross_attn(self.norm2(q), tokens, key_keep=keep)
        return q + self.mlp(self.norm3(q))


class AttentionPool(nn.Module):
    """CLIP's AttentionPool: the mean token (plus position) queries all tokens -> one vector."""

    def __init__(self, dim: int, num_tokens: int, num_heads: int, out_dim: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(num_tokens + 1, dim) * dim**-0.5)
        self.attn = Attention(dim, num_heads)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos  # (batch, 1+Q, dim)
        return self.out(self.attn(x[:, :1], x)[:, 0])


class ConditionAdapter(nn.Module):
    def __init__(self, config: ConditionAdapterConfig, code_dim: int, max_tokens: int) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.in_proj = nn.Linear(code_dim, w)
        self.pos_embed = nn.Parameter(torch.randn(max_tokens, w) * 0.02)
        self.null_token = nn.Parameter(torch.zeros(1, 1, w))
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, w) * 0.02)
        self.blocks = nn.ModuleList(
            DecoderBlock(w, config.num_heads, config.mlp_ratio) for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(w)
        self.decode = nn.Sequential(nn.Linear(w, w), nn.Tanh(), nn.Linear(w, w))
        self.context_proj = nn.Linear(w, config.context_dim)
        self.pool = AttentionPool(w, config.num_queries, config.num_heads, config.pooled_dim)

    def forward(
        self, code_vectors: torch.Tensor, token_keep: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """code_vectors (batch, P, c), token_keep (batch, P) -> prompt_embeds (batch, Q, ctx),
        pooled_embeds (batch, pooled), reference_embedding (batch, ctx)."""
        keep = token_keep.to(code_vectors.dtype)
        b = code_vectors.shape[0]
        order = (torch.cumsum(keep, dim=1) - 1).clamp(min=0).long()  # index in kept order
        tokens = self.in_proj(code_vectors) + self.pos_embed[order]  # (batch, P, w)
        tokens = torch.cat([self.null_token.expand(b, 1, -1), tokens], dim=1)  # (batch, 1+P, w)
        key_keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)
        q = self.queries.expand(b, -1, -1)
        for block in self.blocks:
            q = block(q, tokens, key_keep)
        h = self.decode(self.norm(q))
        prompt_embeds = self.context_proj(h)
        return prompt_embeds, self.pool(h), prompt_embeds.mean(dim=1)
